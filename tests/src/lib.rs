//! Shared harness for the end-to-end tests under `tests/tests/`.
