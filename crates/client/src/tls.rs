//! TLS for `https://` gateways: the system's root certificates (read with
//! rustls-native-certs) plus any CA the caller adds.

use base64::Engine as _;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::error::Error;

/// The TLS configuration of a connection.
pub(crate) fn config(
    system_roots: bool,
    extra_ca_pem: &[u8],
    identity: Option<&(Vec<u8>, Vec<u8>)>,
    domain: Option<&str>,
) -> Result<ClientTlsConfig, Error> {
    let mut config = ClientTlsConfig::new();
    let mut roots = 0;
    if system_roots {
        let found = rustls_native_certs::load_native_certs();
        if !found.errors.is_empty() {
            tracing::debug!(errors = ?found.errors, "some system root certificates could not be read");
        }
        roots += found.certs.len();
        if !found.certs.is_empty() {
            config = config.ca_certificate(Certificate::from_pem(to_pem(&found.certs)));
        }
    }
    if extra_ca_pem.iter().any(|b| !b.is_ascii_whitespace()) {
        let extra = CertificateDer::pem_slice_iter(extra_ca_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Tls(format!("the CA is not PEM certificates: {e}")))?;
        if extra.is_empty() {
            return Err(Error::Tls("the CA holds no PEM certificate".into()));
        }
        roots += extra.len();
        config = config.ca_certificate(Certificate::from_pem(extra_ca_pem));
    }
    if roots == 0 {
        return Err(Error::Tls(
            "no root certificate to verify the gateway with: the system has none; \
             pass the gateway's CA (tls_ca)"
                .into(),
        ));
    }
    if let Some((cert, key)) = identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    if let Some(domain) = domain {
        config = config.domain_name(domain);
    }
    Ok(config)
}

/// DER certificates as one PEM bundle.
fn to_pem(certs: &[CertificateDer<'_>]) -> Vec<u8> {
    let mut pem = String::new();
    for cert in certs {
        let body = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in body.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    pem.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_round_trips_through_the_pem_bundle() {
        let certs = vec![
            CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]),
            CertificateDer::from((0..200u8).collect::<Vec<_>>()),
        ];
        let pem = to_pem(&certs);
        let back: Vec<_> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(back, certs);
    }

    #[test]
    fn a_ca_that_is_not_pem_is_refused() {
        assert!(matches!(
            config(false, b"not a certificate", None, None),
            Err(Error::Tls(_))
        ));
        assert!(matches!(config(false, b"", None, None), Err(Error::Tls(_))));
    }
}
