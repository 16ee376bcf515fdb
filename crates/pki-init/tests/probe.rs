//! The PKI the compose init step writes is usable by the services, and the
//! health probe reports a real server's gRPC health over mutual TLS.

use std::path::Path;

use tokio_util::sync::CancellationToken;
use vibebox_pki_init::{ProbeArgs, init_pki, probe};
use vibebox_server_kit::{ServerArgs, ServerBuilder, TlsMaterial};

fn probe_args(url: String, pki: &Path, service: &str) -> ProbeArgs {
    ProbeArgs {
        url,
        service: String::new(),
        tls_cert: Some(pki.join(format!("{service}.pem"))),
        tls_key: Some(pki.join(format!("{service}-key.pem"))),
        tls_ca: Some(pki.join("ca.pem")),
        timeout_ms: 5000,
    }
}

#[tokio::test]
async fn probe_passes_against_an_mtls_service_of_the_generated_pki() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    init_pki(&pki, &["identity.vibebox.svc".to_owned()]).unwrap();
    let before = std::fs::read(pki.join("identity.pem")).unwrap();
    init_pki(&pki, &[]).unwrap();
    assert_eq!(
        before,
        std::fs::read(pki.join("identity.pem")).unwrap(),
        "idempotent"
    );

    let material = TlsMaterial::from_files(
        &pki.join("ca.pem"),
        &pki.join("identity.pem"),
        &pki.join("identity-key.pem"),
    )
    .unwrap();
    assert_eq!(material.identity().unwrap(), "identity");

    let args = ServerArgs::for_data_dir(dir.path());
    let listener = vibebox_server_kit::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = ServerBuilder::new("identity", &args)
        .tls(Some(material))
        .allow_callers(&["gateway"])
        .serve(listener, shutdown.clone());
    let task = tokio::spawn(server);

    // The service's own certificate (what its container healthcheck uses)
    // may ask for health although it is not an allowed caller.
    let ok = probe(&probe_args(
        format!("https://127.0.0.1:{}", addr.port()),
        &pki,
        "identity",
    ))
    .await;
    assert!(ok.is_ok(), "{ok:?}");

    // A certificate from another CA is refused at the handshake.
    let foreign_dir = tempfile::tempdir().unwrap();
    init_pki(foreign_dir.path(), &[]).unwrap();
    let mut foreign = probe_args(
        format!("https://127.0.0.1:{}", addr.port()),
        foreign_dir.path(),
        "identity",
    );
    foreign.tls_ca = Some(pki.join("ca.pem"));
    assert!(probe(&foreign).await.is_err());

    // Plaintext against a TLS port fails.
    let plain = probe(&probe_args(
        format!("http://127.0.0.1:{}", addr.port()),
        &pki,
        "identity",
    ))
    .await;
    assert!(plain.is_err());

    shutdown.cancel();
    task.await.unwrap().unwrap();

    // Nothing listening any more: the probe fails.
    let gone = probe(&probe_args(
        format!("https://127.0.0.1:{}", addr.port()),
        &pki,
        "identity",
    ))
    .await;
    assert!(gone.is_err());
}

#[tokio::test]
async fn probe_speaks_plaintext_to_a_public_listener() {
    let dir = tempfile::tempdir().unwrap();
    let args = ServerArgs::for_data_dir(dir.path());
    let listener = vibebox_server_kit::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(ServerBuilder::new("gateway", &args).serve(listener, shutdown.clone()));
    let mut plain = probe_args(
        format!("http://127.0.0.1:{}", addr.port()),
        dir.path(),
        "gateway",
    );
    plain.tls_cert = None;
    plain.tls_key = None;
    plain.tls_ca = None;
    let ok = probe(&plain).await;
    assert!(ok.is_ok(), "{ok:?}");
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[test]
fn certificates_name_the_service_and_the_extra_hosts() {
    use x509_parser::extensions::GeneralName;
    let dir = tempfile::tempdir().unwrap();
    init_pki(
        dir.path(),
        &[
            "orchestrator".to_owned(),
            "vibebox-orchestrator.ns.svc".to_owned(),
        ],
    )
    .unwrap();
    for service in vibebox_pki_init::SERVICES {
        let pem = std::fs::read(dir.path().join(format!("{service}.pem"))).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = pem.parse_x509().unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(format!("dns:{d}")),
                GeneralName::URI(u) => Some(format!("uri:{u}")),
                _ => None,
            })
            .collect();
        assert!(
            names.contains(&format!("uri:spiffe://vibebox/{service}")),
            "{names:?}"
        );
        assert!(
            names.contains(&"dns:vibebox-orchestrator.ns.svc".to_owned()),
            "{names:?}"
        );
        assert!(names.contains(&format!("dns:{service}")), "{names:?}");
    }
}
