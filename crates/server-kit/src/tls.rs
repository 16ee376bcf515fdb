//! Mutual TLS material and service identities.
//!
//! Every service certificate is signed by the platform CA and names its
//! service twice: as the subject common name and as a URI SAN
//! `spiffe://vibebox/<service>`. A server learns its caller's identity from
//! the verified client certificate (see [`service_identity`]).

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::error::KitError;

/// The prefix of the URI SAN carrying a service identity.
pub const IDENTITY_URI_PREFIX: &str = "spiffe://vibebox/";

/// A service's certificate and key, and the CA that signs its peers.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial").finish_non_exhaustive() // never print keys
    }
}

fn read(path: &Path) -> Result<Vec<u8>, KitError> {
    std::fs::read(path).map_err(|source| KitError::Read {
        path: path.display().to_string(),
        source,
    })
}

impl TlsMaterial {
    /// Loads PEM files.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, KitError> {
        let material = Self {
            ca_pem: read(ca)?,
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        };
        material.identity()?;
        Ok(material)
    }

    /// The service identity written in this material's own certificate.
    pub fn identity(&self) -> Result<String, KitError> {
        let der = first_pem_der(&self.cert_pem)?;
        service_identity(&der)
            .ok_or_else(|| KitError::Tls("certificate names no VibeBox service".into()))
    }

    /// Server side: present our certificate, require a client certificate
    /// signed by the CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// Client side: trust only the CA, present our certificate.
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }
}

fn first_pem_der(pem: &[u8]) -> Result<Vec<u8>, KitError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem)
        .map(|der| der.to_vec())
        .map_err(|e| KitError::Tls(format!("no usable certificate in PEM: {e}")))
}

/// The VibeBox service a DER certificate belongs to: its
/// `spiffe://vibebox/<service>` URI SAN, else its common name.
pub fn service_identity(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && let Some(service) = uri.strip_prefix(IDENTITY_URI_PREFIX)
                && is_service_name(service)
            {
                return Some(service.to_owned());
            }
        }
    }
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    is_service_name(cn).then(|| cn.to_owned())
}

fn is_service_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_certificate_of_a_pem_is_read_and_garbage_is_refused() {
        let pki = crate::testing::TestPki::new();
        let material = pki.material("gateway");
        let der = first_pem_der(&material.cert_pem).unwrap();
        assert_eq!(service_identity(&der).as_deref(), Some("gateway"));
        assert!(first_pem_der(b"not a certificate").is_err());
        assert!(
            first_pem_der(b"-----BEGIN CERTIFICATE-----\na*b\n-----END CERTIFICATE-----\n")
                .is_err()
        );
    }
}
