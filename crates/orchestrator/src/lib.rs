//! The orchestrator: the only holder of a Docker connection; creates only what policy cleared.
