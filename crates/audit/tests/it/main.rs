//! The audit service's integration tests, one binary:
//! - [`grpc`]: the service over real gRPC on loopback;
//! - [`tail`]: a tail cut from the database, found by the receipts.

mod common;
mod grpc;
mod tail;
