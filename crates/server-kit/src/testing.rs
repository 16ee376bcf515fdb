//! Helpers for tests that run real servers on loopback: a throwaway dev PKI
//! and server arguments pointing at it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::config::ServerArgs;
use crate::tls::TlsMaterial;

/// A CA and a certificate for every service, in a temporary directory that
/// lives as long as this value.
pub struct TestPki {
    dir: tempfile::TempDir,
    next: AtomicU32,
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    /// Generates the PKI (the five services plus `tester`, a service
    /// identity no server allows).
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut services: Vec<&str> = crate::pki::SERVICES.to_vec();
        services.push("tester");
        crate::pki::ensure_dev_pki(&dir.path().join("pki"), &services, &[]).expect("dev PKI");
        Self {
            dir,
            next: AtomicU32::new(0),
        }
    }

    /// The directory holding `ca.pem` and the service certificates.
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// The root of this PKI's temporary directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// TLS material of `service`.
    pub fn material(&self, service: &str) -> TlsMaterial {
        let pki = self.pki_dir();
        TlsMaterial::from_files(
            &pki.join("ca.pem"),
            &pki.join(format!("{service}.pem")),
            &pki.join(format!("{service}-key.pem")),
        )
        .expect("test TLS material")
    }

    /// Server arguments for `service`: a fresh data directory and this PKI.
    pub fn server_args(&self, service: &str) -> ServerArgs {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let data_dir = self.dir.path().join(format!("data-{service}-{n}"));
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let pki = self.pki_dir();
        let mut args = ServerArgs::for_data_dir(data_dir);
        args.listen = Some("127.0.0.1:0".parse().expect("addr"));
        args.tls.tls_ca = Some(pki.join("ca.pem"));
        args.tls.tls_cert = Some(pki.join(format!("{service}.pem")));
        args.tls.tls_key = Some(pki.join(format!("{service}-key.pem")));
        args
    }
}
