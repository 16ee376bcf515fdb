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
    let text =
        std::str::from_utf8(pem).map_err(|_| KitError::Tls("certificate is not PEM".into()))?;
    let begin = "-----BEGIN CERTIFICATE-----";
    let end = "-----END CERTIFICATE-----";
    let start = text
        .find(begin)
        .ok_or_else(|| KitError::Tls("no certificate in PEM".into()))?
        + begin.len();
    let stop = text[start..]
        .find(end)
        .ok_or_else(|| KitError::Tls("unterminated certificate in PEM".into()))?
        + start;
    let b64: String = text[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    decode_base64(&b64).ok_or_else(|| KitError::Tls("bad base64 in PEM".into()))
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
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
    fn base64_round_trip() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGk=").unwrap(), b"hi");
        assert!(decode_base64("a*b").is_none());
    }
}
