//! Errors of the kit itself (configuration, TLS material, serving).

/// What can go wrong while bootstrapping a server or client.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid configuration file {path}: {message}")]
    ConfigFile { path: String, message: String },
    #[error("invalid TLS material: {0}")]
    Tls(String),
    #[error("certificate generation failed: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("invalid endpoint {url}: {message}")]
    Endpoint { url: String, message: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("telemetry setup failed: {0}")]
    Telemetry(String),
}
