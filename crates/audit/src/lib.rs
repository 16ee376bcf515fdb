//! The audit service: an append-only, hash-chained audit log with queries, a live watch stream and alert rules.
