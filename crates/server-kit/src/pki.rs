//! A development PKI: one CA and a certificate per service, generated with
//! rcgen into a directory (`ca.pem`, `ca-key.pem`, `<service>.pem`,
//! `<service>-key.pem`). Keys are written with mode 0600. Production
//! deployments bring their own certificates (Helm Secrets, cert-manager).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::error::KitError;
use crate::tls::IDENTITY_URI_PREFIX;

/// Every VibeBox service that gets a certificate.
pub const SERVICES: &[&str] = &["gateway", "identity", "policy", "orchestrator", "audit"];

fn write(path: &Path, contents: &str, private: bool) -> Result<(), KitError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| KitError::Write {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

fn read(path: &Path) -> Result<String, KitError> {
    std::fs::read_to_string(path).map_err(|source| KitError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Makes sure `dir` holds a CA and a certificate for each service, creating
/// what is missing. Existing files are kept, so a second run changes nothing.
/// `extra_hosts` become DNS SANs of every service certificate (for example
/// compose service names).
pub fn ensure_dev_pki(dir: &Path, services: &[&str], extra_hosts: &[&str]) -> Result<(), KitError> {
    std::fs::create_dir_all(dir).map_err(|source| KitError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca-key.pem");
    if !ca_cert.exists() || !ca_key.exists() {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "VibeBox development CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        write(&ca_key, &key.serialize_pem(), true)?;
        write(&ca_cert, &cert.pem(), false)?;
    }
    let ca_key_pair = KeyPair::from_pem(&read(&ca_key)?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_cert)?, ca_key_pair)?;
    for service in services {
        let cert_path = dir.join(format!("{service}.pem"));
        let key_path = dir.join(format!("{service}-key.pem"));
        if cert_path.exists() && key_path.exists() {
            continue;
        }
        let key = KeyPair::generate()?;
        let params = service_params(service, extra_hosts)?;
        let cert = params.signed_by(&key, &issuer)?;
        write(&key_path, &key.serialize_pem(), true)?;
        write(&cert_path, &cert.pem(), false)?;
    }
    Ok(())
}

fn service_params(service: &str, extra_hosts: &[&str]) -> Result<CertificateParams, KitError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, service);
    params.distinguished_name = dn;
    let mut sans = vec![
        SanType::URI(format!("{IDENTITY_URI_PREFIX}{service}").try_into()?),
        SanType::DnsName(service.try_into()?),
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ];
    for host in extra_hosts {
        sans.push(SanType::DnsName((*host).try_into()?));
    }
    params.subject_alt_names = sans;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}

/// Issues a certificate for `service` signed by a *different*, throwaway CA:
/// what an attacker without the platform CA could present. Tests use it.
pub fn foreign_material(service: &str) -> Result<crate::TlsMaterial, KitError> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let cert = service_params(service, &[])?.signed_by(&key, &issuer)?;
    Ok(crate::TlsMaterial {
        ca_pem: ca_cert.pem().into_bytes(),
        cert_pem: cert.pem().into_bytes(),
        key_pem: key.serialize_pem().into_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_and_names_each_service() {
        let dir = tempfile::tempdir().unwrap();
        ensure_dev_pki(dir.path(), SERVICES, &[]).unwrap();
        let before = std::fs::read(dir.path().join("policy.pem")).unwrap();
        ensure_dev_pki(dir.path(), SERVICES, &[]).unwrap();
        assert_eq!(
            before,
            std::fs::read(dir.path().join("policy.pem")).unwrap()
        );
        for service in SERVICES {
            let m = crate::TlsMaterial::from_files(
                &dir.path().join("ca.pem"),
                &dir.path().join(format!("{service}.pem")),
                &dir.path().join(format!("{service}-key.pem")),
            )
            .unwrap();
            assert_eq!(m.identity().unwrap(), *service);
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("gateway-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
