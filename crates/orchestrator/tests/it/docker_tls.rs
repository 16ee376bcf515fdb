//! The orchestrator reaches a remote Docker Engine (Docker-in-Docker in a
//! cluster) over TCP with mutual TLS. The engine here is the local one behind
//! a TLS terminator that demands a client certificate from the engine's CA,
//! exactly as `dockerd --tlsverify` does.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixStream};
use vibebox_orchestrator::DockerEndpoint;
use vibebox_orchestrator::testkit::{self, Harness, hardened_spec};
use vibebox_proto::runtime::{Caller, CreateEnvironmentRequest, DeleteEnvironmentRequest};

/// An engine CA with a server certificate (`dind`) and a client one
/// (`orchestrator`), the client's laid out as DOCKER_CERT_PATH expects.
struct EnginePki {
    _dir: tempfile::TempDir,
    pki: PathBuf,
    client: PathBuf,
}

fn engine_pki() -> EnginePki {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("engine-pki");
    vibebox_server_kit::pki::ensure_dev_pki(&pki, &["dind", "orchestrator"], &[]).unwrap();
    let client = dir.path().join("client");
    std::fs::create_dir_all(&client).unwrap();
    std::fs::copy(pki.join("ca.pem"), client.join("ca.pem")).unwrap();
    std::fs::copy(pki.join("orchestrator.pem"), client.join("cert.pem")).unwrap();
    std::fs::copy(pki.join("orchestrator-key.pem"), client.join("key.pem")).unwrap();
    EnginePki {
        _dir: dir,
        pki,
        client,
    }
}

fn certs(path: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Serves the local engine's socket on 127.0.0.1 over TLS, requiring a
/// client certificate signed by `pki`'s CA. Returns the port.
async fn tls_engine(pki: &Path) -> u16 {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(&pki.join("ca.pem")) {
        roots.add(cert).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .unwrap();
    let key = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::PrivateKeyDer::from_pem_file(pki.join("dind-key.pem")).unwrap()
    };
    let config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&pki.join("dind.pem")), key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut engine) = UnixStream::connect("/var/run/docker.sock").await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut engine).await;
            });
        }
    });
    port
}

fn endpoint(port: u16, cert_path: Option<PathBuf>) -> DockerEndpoint {
    DockerEndpoint {
        host: format!("tcp://127.0.0.1:{port}"),
        tls_verify: true,
        cert_path,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environments_are_created_on_an_engine_reached_over_mutual_tls() {
    let engine = engine_pki();
    let port = tls_engine(&engine.pki).await;
    let docker_endpoint = endpoint(port, Some(engine.client.clone()));
    let docker = docker_endpoint.connect().unwrap();
    docker.ping().await.expect("ping over mutual TLS");

    let h = Harness::start(|c| c.docker = docker_endpoint.clone())
        .await
        .unwrap();
    let spec = hardened_spec(&["sleep", "600"]);
    let env = uuid::Uuid::new_v4().to_string();
    let created = h
        .client()
        .create_environment(CreateEnvironmentRequest {
            labels: Default::default(),
            caller: Some(Caller {
                user_id: "user-1".into(),
                ..Default::default()
            }),
            request_id: env.clone(),
            environment_id: env.clone(),
            team_id: "team-a".into(),
            owner_id: "user-1".into(),
            name: "over-tls".into(),
            spec: Some(spec.clone()),
            clearance: Some(testkit::clearance(
                &h.signer,
                &spec,
                &env,
                "team-a",
                Duration::from_secs(60),
            )),
            canonical_image: String::new(),
        })
        .await
        .expect("create over TLS")
        .into_inner()
        .environment
        .unwrap();
    assert_eq!(created.id, env);
    let running = crate::common::settled(&h.client(), &env).await;
    assert_eq!(
        running.state(),
        vibebox_proto::environment::EnvironmentState::Running
    );
    let objects = h.objects();
    assert!(
        objects.iter().any(|o| o.starts_with("container:")),
        "the container exists on the engine: {objects:?}"
    );
    h.client()
        .delete_environment(DeleteEnvironmentRequest {
            caller: Some(Caller {
                user_id: "user-1".into(),
                ..Default::default()
            }),
            environment_id: env.clone(),
        })
        .await
        .expect("delete over TLS");
    crate::common::settled(&h.client(), &env).await;
    assert!(
        h.objects().is_empty(),
        "delete leaves nothing: {:?}",
        h.objects()
    );
}

#[tokio::test]
async fn an_engine_refuses_clients_without_its_certificates_and_tls_never_downgrades() {
    let engine = engine_pki();
    let port = tls_engine(&engine.pki).await;

    // A client certificate from another CA: the handshake fails.
    let stranger = engine_pki();
    let docker = endpoint(port, Some(stranger.client.clone()))
        .connect()
        .unwrap();
    assert!(
        docker.ping().await.is_err(),
        "a foreign client certificate is refused"
    );

    // Plain HTTP to the TLS port is no Docker API.
    let plain = DockerEndpoint {
        host: format!("tcp://127.0.0.1:{port}"),
        tls_verify: false,
        cert_path: None,
    };
    assert!(plain.connect().unwrap().ping().await.is_err());

    // TLS asked for but no certificates: refused before any connection.
    let err = endpoint(port, None).connect().unwrap_err().to_string();
    assert!(err.contains("DOCKER_CERT_PATH"), "{err}");
    let empty = tempfile::tempdir().unwrap();
    let err = endpoint(port, Some(empty.path().to_owned()))
        .connect()
        .unwrap_err()
        .to_string();
    assert!(err.contains("ca.pem"), "{err}");

    // An unknown scheme is refused, not guessed.
    let err = DockerEndpoint {
        host: "ftp://127.0.0.1:1".into(),
        ..DockerEndpoint::default()
    }
    .connect()
    .unwrap_err()
    .to_string();
    assert!(err.contains("unsupported Docker host"), "{err}");
}
