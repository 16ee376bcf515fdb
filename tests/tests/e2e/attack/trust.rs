//! The trust chain: internal services called directly, clearances,
//! internal RPCs through the gateway, forged metadata, tokens, other teams.

use super::*;

type Channel = tonic::transport::Channel;

/// Sets `authorization` to exactly `value` (no `Bearer ` added).
#[derive(Clone)]
struct RawAuth(
    Option<MetadataValue<tonic::metadata::Ascii>>,
    Vec<(&'static str, String)>,
);

impl Interceptor for RawAuth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        for (key, value) in &self.1 {
            request
                .metadata_mut()
                .insert(*key, value.parse().expect("metadata value"));
        }
        Ok(request)
    }
}

fn raw(authorization: &str) -> RawAuth {
    RawAuth(authorization.parse().ok(), Vec::new())
}

fn bearer(token: &str) -> RawAuth {
    raw(&format!("Bearer {token}"))
}

fn gateway_channel(p: &Platform) -> Channel {
    plaintext(&format!("http://{}", p.gateway))
}

fn envs(
    p: &Platform,
    auth: RawAuth,
) -> EnvironmentServiceClient<tonic::codegen::InterceptedService<Channel, RawAuth>> {
    EnvironmentServiceClient::with_interceptor(gateway_channel(p), auth)
}

/// The error a streaming call ends with (at the call or as its first
/// message); `None` if it succeeded.
async fn stream_error<M>(
    call: impl std::future::Future<Output = Result<tonic::Response<tonic::Streaming<M>>, tonic::Status>>,
) -> Option<tonic::Status> {
    match call.await {
        Err(status) => Some(status),
        Ok(response) => response.into_inner().message().await.err(),
    }
}

/// A small hardened spec for the environments this test creates.
fn small(image: &str) -> ContainerSpec {
    ContainerSpec {
        cpu_limit: Some(0.25),
        memory_limit_mb: Some(64),
        pids_limit: Some(64),
        ..spec(image)
    }
}

fn small_expected() -> Expected {
    Expected {
        nano_cpus: 250_000_000,
        memory_bytes: 64 * 1024 * 1024,
        pids: 64,
        ..Expected::default()
    }
}

/// Removes a local image tag this test created, when dropped.
struct ImageTag(String);

impl Drop for ImageTag {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rmi", &self.0])
            .output();
    }
}

/// Whether a status is a refusal (any error) and, when `code` is given, that one.
fn refused_as(result: &Result<impl std::fmt::Debug, tonic::Status>, code: Option<Code>) -> bool {
    match (result, code) {
        (Ok(_), _) => false,
        (Err(_), None) => true,
        (Err(s), Some(c)) => s.code() == c,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trust_chain_cannot_be_bypassed() {
    let mut report = SuiteReport::new("attack", "the_trust_chain_cannot_be_bypassed");
    let image = dev_image();
    let p = Platform::start();
    let admin = p.admin_token();
    let installation = p.installation_id().expect("installation id");
    let data = p.data_dir().to_path_buf();
    let services = Services::read(&data);
    let alpha = team(&p, &admin, "alpha").await;
    let beta = team(&p, &admin, "beta").await;
    let (dev_id, dev) = member(&p, &admin, "dev", &alpha, TeamRole::Developer).await;
    let (_, outsider) = member(&p, &admin, "outsider", &beta, TeamRole::Developer).await;
    let admin_id = p
        .identity(&admin)
        .who_am_i(WhoAmIRequest {})
        .await
        .expect("admin whoami")
        .into_inner()
        .user
        .expect("admin user")
        .id;
    let dev_token_id = p
        .identity(&dev)
        .who_am_i(WhoAmIRequest {})
        .await
        .expect("dev whoami")
        .into_inner()
        .token_id;

    // An environment made the normal way, inspected.
    let env_a = create_ok(&p, &dev, &alpha, "alpha-one", small(&image)).await;
    assert_hardened(&p, &dev, &env_a, &small_expected(), &mut report).await;
    let mut expected_objects = objects_of(&env_a);
    let mut failures: Vec<String> = Vec::new();
    let mut check = |report: &mut SuiteReport, what: &str, ok: bool, detail: String| {
        report.case(ok);
        if !ok {
            failures.push(format!("{what}: {detail}"));
        }
    };

    // 1. Internal services called directly, as anyone but the right caller.
    let gateway_cert = material(&data, "gateway");
    let policy_url = services.url("policy").to_owned();
    let orchestrator_url = services.url("orchestrator").to_owned();
    let clearances = ClearanceServiceClient::new(mtls(&policy_url, &gateway_cert));
    let issue = |environment_id: &str| {
        let request = IssueClearanceRequest {
            spec: Some(small(&image)),
            environment_id: environment_id.to_owned(),
            team_id: alpha.clone(),
            user_id: dev_id.clone(),
            team_role: TeamRole::Developer as i32,
        };
        let mut client = clearances.clone();
        async move {
            client
                .issue_clearance(request)
                .await
                .expect("a clearance from policy, as the gateway")
                .into_inner()
        }
    };
    let e1 = uuid::Uuid::new_v4().to_string();
    let issued = issue(&e1).await;
    let evaluation = issued.evaluation.clone().expect("evaluation");
    let hardened = evaluation.hardened_spec.clone().expect("hardened spec");
    let canonical = evaluation.canonical_image.clone();
    let c1 = issued.clearance.clone().expect("clearance");
    let create = |request_id: &str,
                  environment_id: &str,
                  team: &str,
                  spec: ContainerSpec,
                  clearance: Option<Clearance>| {
        with_id(
            request_id,
            runtime::CreateEnvironmentRequest {
                labels: Default::default(),
                caller: Some(runtime::Caller {
                    user_id: dev_id.clone(),
                    request_id: request_id.to_owned(),
                    ..Default::default()
                }),
                request_id: request_id.to_owned(),
                environment_id: environment_id.to_owned(),
                team_id: team.to_owned(),
                owner_id: dev_id.clone(),
                name: format!("direct-{}", &environment_id[..8]),
                spec: Some(spec),
                clearance,
                canonical_image: canonical.clone(),
            },
        )
    };

    let strangers: Vec<(String, Channel, Option<Code>)> = {
        let mut v = vec![
            ("plaintext".to_owned(), plaintext(&orchestrator_url), None),
            (
                "TLS without a client certificate".to_owned(),
                tls_without_client_cert(&orchestrator_url, &data),
                Some(Code::Unauthenticated),
            ),
            (
                "a foreign CA's \"gateway\"".to_owned(),
                mtls(&orchestrator_url, &foreign(&data, "gateway")),
                None,
            ),
        ];
        for service in ["identity", "policy", "audit", "orchestrator"] {
            v.push((
                format!("the {service} certificate"),
                mtls(&orchestrator_url, &material(&data, service)),
                Some(Code::PermissionDenied),
            ));
        }
        v
    };
    for (who, channel, code) in &strangers {
        let mut runtime_client = RuntimeServiceClient::new(channel.clone());
        let listed = runtime_client
            .list_environments(runtime::ListEnvironmentsRequest::default())
            .await;
        check(
            &mut report,
            &format!("orchestrator ListEnvironments as {who}"),
            refused_as(&listed, *code),
            format!("{listed:?}"),
        );
        let created = runtime_client
            .create_environment(create(
                "trust-stranger",
                &e1,
                &alpha,
                hardened.clone(),
                Some(c1.clone()),
            ))
            .await;
        check(
            &mut report,
            &format!("orchestrator CreateEnvironment as {who}"),
            refused_as(&created, *code),
            format!("{created:?}"),
        );
    }
    let policy_strangers: Vec<(String, Channel, Option<Code>)> = vec![
        ("plaintext".into(), plaintext(&policy_url), None),
        (
            "TLS without a client certificate".into(),
            tls_without_client_cert(&policy_url, &data),
            Some(Code::Unauthenticated),
        ),
        (
            "a foreign CA's \"gateway\"".into(),
            mtls(&policy_url, &foreign(&data, "gateway")),
            None,
        ),
        (
            "the identity certificate".into(),
            mtls(&policy_url, &material(&data, "identity")),
            Some(Code::PermissionDenied),
        ),
        (
            "the audit certificate".into(),
            mtls(&policy_url, &material(&data, "audit")),
            Some(Code::PermissionDenied),
        ),
        (
            "the orchestrator certificate".into(),
            mtls(&policy_url, &material(&data, "orchestrator")),
            Some(Code::PermissionDenied),
        ),
    ];
    for (who, channel, code) in &policy_strangers {
        let result = ClearanceServiceClient::new(channel.clone())
            .issue_clearance(IssueClearanceRequest {
                spec: Some(ContainerSpec {
                    privileged: true,
                    ..small(&image)
                }),
                environment_id: uuid::Uuid::new_v4().to_string(),
                team_id: alpha.clone(),
                user_id: dev_id.clone(),
                team_role: TeamRole::Admin as i32,
            })
            .await;
        check(
            &mut report,
            &format!("policy IssueClearance as {who}"),
            refused_as(&result, *code),
            format!("{result:?}"),
        );
    }
    let identity_url = services.url("identity").to_owned();
    let audit_url = services.url("audit").to_owned();
    for (who, channel, code) in [
        ("plaintext", plaintext(&identity_url), None),
        (
            "TLS without a client certificate",
            tls_without_client_cert(&identity_url, &data),
            Some(Code::Unauthenticated),
        ),
        (
            "a foreign CA's \"gateway\"",
            mtls(&identity_url, &foreign(&data, "gateway")),
            None,
        ),
        (
            "the policy certificate",
            mtls(&identity_url, &material(&data, "policy")),
            Some(Code::PermissionDenied),
        ),
        (
            "the orchestrator certificate",
            mtls(&identity_url, &material(&data, "orchestrator")),
            Some(Code::PermissionDenied),
        ),
    ] {
        let mut authz = AuthorizationServiceClient::new(channel);
        let decided = authz
            .authorize(AuthorizeRequest {
                token: dev.clone(),
                operation: "environment.create".into(),
                resource: None,
            })
            .await;
        check(
            &mut report,
            &format!("identity Authorize as {who}"),
            refused_as(&decided, code),
            format!("{decided:?}"),
        );
        let scopes = authz
            .list_caller_scopes(ListCallerScopesRequest { token: dev.clone() })
            .await;
        check(
            &mut report,
            &format!("identity ListCallerScopes as {who}"),
            refused_as(&scopes, code),
            format!("{scopes:?}"),
        );
    }
    for (who, channel, code) in [
        ("plaintext", plaintext(&audit_url), None),
        (
            "TLS without a client certificate",
            tls_without_client_cert(&audit_url, &data),
            Some(Code::Unauthenticated),
        ),
        (
            "a foreign CA's \"gateway\"",
            mtls(&audit_url, &foreign(&data, "gateway")),
            None,
        ),
    ] {
        let forged = vibebox_proto::audit::AuditEvent {
            id: uuid::Uuid::new_v4().to_string(),
            action: "environment.delete".into(),
            ..Default::default()
        };
        let appended = AuditIngestServiceClient::new(channel)
            .append_events(AppendEventsRequest {
                events: vec![forged],
            })
            .await;
        check(
            &mut report,
            &format!("audit AppendEvents as {who}"),
            refused_as(&appended, code),
            format!("{appended:?}"),
        );
    }
    // Control: the same calls with the right identity work.
    let mut orchestrator = RuntimeServiceClient::new(mtls(&orchestrator_url, &gateway_cert));
    orchestrator
        .list_environments(runtime::ListEnvironmentsRequest::default())
        .await
        .expect("the gateway may list");

    // 2. The gateway's own certificate, without a good clearance.
    let mut clearance_cases: Vec<(
        String,
        tonic::Request<runtime::CreateEnvironmentRequest>,
        Code,
        Option<&str>,
    )> = Vec::new();
    let mut n = 0;
    let mut next_id = || {
        n += 1;
        format!("trust-clr-{n}")
    };
    let altered = |f: &dyn Fn(&mut ContainerSpec)| {
        let mut s = hardened.clone();
        f(&mut s);
        s
    };
    let denied = Code::PermissionDenied;
    clearance_cases.push((
        "no clearance".into(),
        create(&next_id(), &e1, &alpha, hardened.clone(), None),
        denied,
        None,
    ));
    for (what, spec) in [
        ("privileged", altered(&|s| s.privileged = true)),
        (
            "the Docker socket",
            altered(&|s| {
                s.mounts.push(Mount {
                    r#type: MountType::Bind as i32,
                    source: "/var/run/docker.sock".into(),
                    target: "/var/run/docker.sock".into(),
                    ..Default::default()
                })
            }),
        ),
        (
            "SYS_ADMIN",
            altered(&|s| s.cap_add = vec!["SYS_ADMIN".into()]),
        ),
        ("root", altered(&|s| s.user = Some("0:0".into()))),
        ("host network", altered(&|s| s.network_mode = "host".into())),
        (
            "no limits",
            altered(&|s| {
                s.memory_limit_mb = None;
                s.pids_limit = None;
                s.cpu_limit = None;
            }),
        ),
        (
            "another image",
            altered(&|s| s.image = "docker.io/library/docker:24-dind".into()),
        ),
        (
            "a forged platform label",
            altered(&|s| {
                s.labels
                    .insert("vibebox.installation".into(), "someone-else".into());
            }),
        ),
        (
            "seccomp off",
            altered(&|s| s.security_opt = vec!["seccomp=unconfined".into()]),
        ),
    ] {
        clearance_cases.push((
            format!("a clearance for another spec ({what})"),
            create(&next_id(), &e1, &alpha, spec, Some(c1.clone())),
            denied,
            None,
        ));
    }
    let e_other = uuid::Uuid::new_v4().to_string();
    clearance_cases.push((
        "a clearance for another environment".into(),
        create(
            &next_id(),
            &e_other,
            &alpha,
            hardened.clone(),
            Some(c1.clone()),
        ),
        denied,
        None,
    ));
    clearance_cases.push((
        "a clearance for another team".into(),
        create(&next_id(), &e1, &beta, hardened.clone(), Some(c1.clone())),
        denied,
        None,
    ));
    let body = ClearanceBody::decode(c1.body.as_slice()).expect("clearance body");
    let tampered = |f: &dyn Fn(&mut ClearanceBody)| {
        let mut b = body.clone();
        f(&mut b);
        Clearance {
            body: b.encode_to_vec(),
            ..c1.clone()
        }
    };
    for (what, clearance) in [
        (
            "another team in the body",
            tampered(&|b| b.team_id = beta.clone()),
        ),
        (
            "a later expiry in the body",
            tampered(&|b| {
                if let Some(t) = b.expire_time.as_mut() {
                    t.seconds += 3600;
                }
            }),
        ),
        (
            "another spec digest in the body",
            tampered(&|b| {
                b.spec_digest = vibebox_clearance::spec_digest(&ContainerSpec {
                    privileged: true,
                    ..hardened.clone()
                })
                .to_vec()
            }),
        ),
        (
            "a zeroed signature",
            Clearance {
                signature: vec![0; 64],
                ..c1.clone()
            },
        ),
        (
            "a truncated signature",
            Clearance {
                signature: c1.signature[..32].to_vec(),
                ..c1.clone()
            },
        ),
        (
            "an unknown key id",
            Clearance {
                key_id: "ed25519:0000000000000000".into(),
                ..c1.clone()
            },
        ),
        ("an empty clearance", Clearance::default()),
    ] {
        clearance_cases.push((
            format!("a tampered clearance ({what})"),
            create(&next_id(), &e1, &alpha, hardened.clone(), Some(clearance)),
            denied,
            None,
        ));
    }
    let grant = |environment_id: &str, team: &str| vibebox_clearance::Grant {
        environment_id: environment_id.to_owned(),
        team_id: team.to_owned(),
        user_id: dev_id.clone(),
        policy_digest: body.policy_digest.clone(),
        policy_version: body.policy_version.clone(),
    };
    let e2 = uuid::Uuid::new_v4().to_string();
    let stranger_key = vibebox_clearance::ClearanceSigner::generate();
    let forged_body = vibebox_clearance::new_body(
        &hardened,
        grant(&e2, &alpha),
        SystemTime::now(),
        Duration::from_secs(60),
    );
    clearance_cases.push((
        "a clearance signed by an untrusted key".into(),
        create(
            &next_id(),
            &e2,
            &alpha,
            hardened.clone(),
            Some(stranger_key.sign(&forged_body)),
        ),
        denied,
        None,
    ));
    clearance_cases.push((
        "an untrusted key's signature under the policy's key id".into(),
        create(
            &next_id(),
            &e2,
            &alpha,
            hardened.clone(),
            Some(Clearance {
                key_id: c1.key_id.clone(),
                ..stranger_key.sign(&forged_body)
            }),
        ),
        denied,
        None,
    ));
    // With the policy's real signing key (read from the data dir): stale
    // clearances, and specs the orchestrator refuses even when signed.
    let keys = vibebox_clearance::KeyStore::open_or_init(&data.join("keys/clearance"))
        .expect("policy key store");
    let real = keys.active();
    assert_eq!(
        real.key_id(),
        c1.key_id,
        "the policy signs with its active key"
    );
    let stale = Code::FailedPrecondition;
    let signed = |spec: &ContainerSpec, environment_id: &str, at: SystemTime, ttl: Duration| {
        real.sign(&vibebox_clearance::new_body(
            spec,
            grant(environment_id, &alpha),
            at,
            ttl,
        ))
    };
    let e3 = uuid::Uuid::new_v4().to_string();
    let hour = Duration::from_secs(3600);
    clearance_cases.push((
        "an expired clearance".into(),
        create(
            &next_id(),
            &e3,
            &alpha,
            hardened.clone(),
            Some(signed(
                &hardened,
                &e3,
                SystemTime::now() - hour,
                Duration::from_secs(60),
            )),
        ),
        stale,
        Some("clearance.invalid"),
    ));
    clearance_cases.push((
        "a clearance issued in the future".into(),
        create(
            &next_id(),
            &e3,
            &alpha,
            hardened.clone(),
            Some(signed(&hardened, &e3, SystemTime::now() + hour, hour)),
        ),
        stale,
        Some("clearance.invalid"),
    ));
    let mut timeless =
        vibebox_clearance::new_body(&hardened, grant(&e3, &alpha), SystemTime::now(), hour);
    timeless.expire_time = None;
    clearance_cases.push((
        "a clearance without expiry".into(),
        create(
            &next_id(),
            &e3,
            &alpha,
            hardened.clone(),
            Some(real.sign(&timeless)),
        ),
        denied,
        None,
    ));
    for (what, spec) in [
        (
            "privileged",
            ContainerSpec {
                privileged: true,
                ..hardened.clone()
            },
        ),
        (
            "host network",
            ContainerSpec {
                network_mode: "host".into(),
                ..hardened.clone()
            },
        ),
        (
            "published ports",
            ContainerSpec {
                ports: vec![PortMapping {
                    container_port: 80,
                    host_port: 8080,
                    host_ip: "0.0.0.0".into(),
                    protocol: "tcp".into(),
                }],
                ..hardened.clone()
            },
        ),
    ] {
        let e = uuid::Uuid::new_v4().to_string();
        let clearance = signed(&spec, &e, SystemTime::now(), Duration::from_secs(60));
        clearance_cases.push((
            format!("a validly signed {what} spec (the orchestrator's floor)"),
            create(&next_id(), &e, &alpha, spec, Some(clearance)),
            Code::FailedPrecondition,
            Some("orchestrator.spec"),
        ));
    }
    let mut rejected_ids = Vec::new();
    for (what, request, code, rule) in clearance_cases {
        let id = request.get_ref().request_id.clone();
        let result = orchestrator.create_environment(request).await;
        let ok = match &result {
            Ok(_) => false,
            Err(s) => {
                let r = Refusal::of(s);
                s.code() == code && rule.is_none_or(|rule| r.rules.iter().any(|x| x == rule))
            }
        };
        if ok && rule != Some("orchestrator.spec") {
            rejected_ids.push(id);
        }
        check(&mut report, &what, ok, format!("{result:?}"));
    }
    assert_eq!(
        labelled_objects(&installation),
        sorted(expected_objects.clone()),
        "no clearance game created anything"
    );

    // The good clearance works once; a replay is refused.
    let created = orchestrator
        .create_environment(create(
            "trust-legit",
            &e1,
            &alpha,
            hardened.clone(),
            Some(c1.clone()),
        ))
        .await
        .expect("a valid clearance creates")
        .into_inner()
        .environment
        .expect("environment");
    assert_eq!(created.id, e1);
    // Create is a long operation: it runs once it has settled (watched
    // through the gateway, as its owner).
    let created = p
        .environments(&dev)
        .settle(&e1)
        .await
        .expect("the created environment settles");
    assert_eq!(created.state(), EnvironmentState::Running, "{created:?}");
    expected_objects.extend(objects_of(&e1));
    assert_hardened(&p, &dev, &e1, &small_expected(), &mut report).await;
    let replay_id = "trust-replay";
    let replayed = orchestrator
        .create_environment(create(
            replay_id,
            &e1,
            &alpha,
            hardened.clone(),
            Some(c1.clone()),
        ))
        .await;
    let ok = matches!(&replayed, Err(s) if s.code() == Code::FailedPrecondition
        && Refusal::of(s).rules.iter().any(|r| r == "clearance.replayed"));
    check(
        &mut report,
        "a replayed clearance",
        ok,
        format!("{replayed:?}"),
    );
    rejected_ids.push(replay_id.to_owned());
    let retried = orchestrator
        .create_environment(create(
            "trust-legit",
            &e1,
            &alpha,
            hardened.clone(),
            Some(c1.clone()),
        ))
        .await
        .expect("a retried create is idempotent")
        .into_inner()
        .environment
        .expect("environment");
    check(
        &mut report,
        "a retried create makes nothing new",
        retried.id == e1,
        format!("{retried:?}"),
    );
    assert_eq!(
        labelled_objects(&installation),
        sorted(expected_objects.clone())
    );

    // A valid clearance with another image to run than the one it cleared
    // (`canonical_image` is a separate field of the runtime request).
    let uncleared = ImageTag(format!(
        "vibebox-attack/uncleared-{}:1",
        &installation[..8.min(installation.len())]
    ));
    let tagged = std::process::Command::new("docker")
        .args(["tag", &image, &uncleared.0])
        .status()
        .expect("docker tag");
    assert!(tagged.success());
    let e4 = uuid::Uuid::new_v4().to_string();
    let c4 = issue(&e4).await.clearance.expect("clearance");
    let mut swapped = create("trust-image-swap", &e4, &alpha, hardened.clone(), Some(c4));
    swapped.get_mut().canonical_image = uncleared.0.clone();
    let refused = orchestrator
        .create_environment(swapped)
        .await
        .expect_err("an image no clearance signed is never run");
    report.case(true);
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("image"), "{refused:?}");
    rejected_ids.push("trust-image-swap".to_owned());
    assert_eq!(
        labelled_objects(&installation),
        sorted(expected_objects.clone())
    );

    // Every clearance refusal is audited as critical.
    let events = events_for(&p, &admin, "clearance.rejected", &rejected_ids).await;
    for id in &rejected_ids {
        let audited = events[id]
            .iter()
            .any(|e| e.severity == Severity::Critical as i32);
        check(
            &mut report,
            &format!("clearance refusal {id} audited as critical"),
            audited,
            format!("{:?}", events[id]),
        );
    }

    // 3. Internal RPCs through the gateway's public port: not served.
    let gw = gateway_channel(&p);
    let admin_auth = bearer(&admin);
    let mut internal: Vec<(String, Result<(), tonic::Status>)> = Vec::new();
    let mut rt = RuntimeServiceClient::with_interceptor(gw.clone(), admin_auth.clone());
    internal.push((
        "runtime ListEnvironments".into(),
        rt.list_environments(runtime::ListEnvironmentsRequest::default())
            .await
            .map(|_| ()),
    ));
    internal.push((
        "runtime CreateEnvironment".into(),
        rt.create_environment(runtime::CreateEnvironmentRequest {
            request_id: "via-gateway".into(),
            environment_id: uuid::Uuid::new_v4().to_string(),
            team_id: alpha.clone(),
            owner_id: admin_id.clone(),
            name: "via-gateway".into(),
            spec: Some(ContainerSpec {
                privileged: true,
                ..spec(&image)
            }),
            ..Default::default()
        })
        .await
        .map(|_| ()),
    ));
    internal.push((
        "runtime DeleteEnvironment".into(),
        rt.delete_environment(runtime::DeleteEnvironmentRequest {
            caller: None,
            environment_id: env_a.clone(),
        })
        .await
        .map(|_| ()),
    ));
    let mut cl = ClearanceServiceClient::with_interceptor(gw.clone(), admin_auth.clone());
    internal.push((
        "clearance IssueClearance".into(),
        cl.issue_clearance(IssueClearanceRequest {
            spec: Some(ContainerSpec {
                privileged: true,
                ..spec(&image)
            }),
            environment_id: uuid::Uuid::new_v4().to_string(),
            team_id: alpha.clone(),
            user_id: admin_id.clone(),
            team_role: TeamRole::Admin as i32,
        })
        .await
        .map(|_| ()),
    ));
    internal.push((
        "clearance GetClearanceKeys".into(),
        cl.get_clearance_keys(GetClearanceKeysRequest {})
            .await
            .map(|_| ()),
    ));
    let mut az = AuthorizationServiceClient::with_interceptor(gw.clone(), admin_auth.clone());
    internal.push((
        "authz Authorize".into(),
        az.authorize(AuthorizeRequest {
            token: dev.clone(),
            operation: "environment.delete".into(),
            resource: None,
        })
        .await
        .map(|_| ()),
    ));
    internal.push((
        "authz GetTokenKeys".into(),
        az.get_token_keys(GetTokenKeysRequest {}).await.map(|_| ()),
    ));
    internal.push((
        "authz ListCallerScopes".into(),
        az.list_caller_scopes(ListCallerScopesRequest { token: dev.clone() })
            .await
            .map(|_| ()),
    ));
    internal.push((
        "audit AppendEvents".into(),
        AuditIngestServiceClient::with_interceptor(gw.clone(), admin_auth.clone())
            .append_events(AppendEventsRequest { events: vec![] })
            .await
            .map(|_| ()),
    ));
    internal.push((
        "kit Probe".into(),
        vibebox_proto::kit::probe_service_client::ProbeServiceClient::with_interceptor(
            gw.clone(),
            admin_auth.clone(),
        )
        .probe(vibebox_proto::kit::ProbeRequest::default())
        .await
        .map(|_| ()),
    ));
    for path in [
        "/vibebox.internal.runtime.v1.RuntimeService/ListEnvironments/",
        "//vibebox.internal.runtime.v1.RuntimeService/ListEnvironments",
        "/vibebox.environment.v1.EnvironmentService/../../vibebox.internal.runtime.v1.RuntimeService/ListEnvironments",
        "/vibebox.environment.v1.EnvironmentService/../vibebox.internal.runtime.v1.RuntimeService/ListEnvironments",
        "/VIBEBOX.INTERNAL.RUNTIME.V1.RUNTIMESERVICE/ListEnvironments",
        "/vibebox.internal.runtime.v1.RuntimeService%2FListEnvironments",
        "/vibebox.internal.runtime.v1.runtimeservice/ListEnvironments",
    ] {
        let mut grpc = tonic::client::Grpc::new(gw.clone());
        let result = async {
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unknown(e.to_string()))?;
            let codec = tonic_prost::ProstCodec::<
                runtime::ListEnvironmentsRequest,
                runtime::ListEnvironmentsResponse,
            >::default();
            let path = tonic::codegen::http::uri::PathAndQuery::from_maybe_shared(path)
                .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
            let mut request = tonic::Request::new(runtime::ListEnvironmentsRequest::default());
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {admin}").parse().expect("header"),
            );
            grpc.unary(request, path, codec).await.map(|_| ())
        }
        .await;
        internal.push((path.to_owned(), result));
    }
    for (what, result) in internal {
        let ok = matches!(&result, Err(s) if s.code() == Code::Unimplemented);
        check(
            &mut report,
            &format!("{what} through the gateway"),
            ok,
            format!("{result:?}"),
        );
    }

    // 4. Forged trust metadata on the public port is ignored.
    let forged_headers = vec![
        ("x-vibebox-user-id", admin_id.clone()),
        ("x-vibebox-token-id", "forged".to_owned()),
        ("x-vibebox-client-address", "10.0.0.1:1".to_owned()),
    ];
    let mut spoofed =
        vibebox_proto::identity::identity_service_client::IdentityServiceClient::with_interceptor(
            gateway_channel(&p),
            RawAuth(format!("Bearer {dev}").parse().ok(), forged_headers.clone()),
        );
    let me = spoofed
        .who_am_i(WhoAmIRequest {})
        .await
        .expect("whoami")
        .into_inner();
    check(
        &mut report,
        "x-vibebox-user-id from a client",
        me.user.as_ref().is_some_and(|u| u.id == dev_id),
        format!("{me:?}"),
    );
    let made = spoofed
        .create_user(CreateUserRequest {
            request_id: Default::default(),
            username: "mallory-admin".into(),
            display_name: "m".into(),
            password: "mallory-password-123".into(),
            platform_role: PlatformRole::Admin as i32,
        })
        .await;
    check(
        &mut report,
        "admin-only call with a forged user id",
        refused_as(&made, Some(Code::PermissionDenied)),
        format!("{made:?}"),
    );
    let anonymous =
        vibebox_proto::identity::identity_service_client::IdentityServiceClient::with_interceptor(
            gateway_channel(&p),
            RawAuth(None, forged_headers),
        )
        .who_am_i(WhoAmIRequest {})
        .await;
    check(
        &mut report,
        "no token, a forged user id",
        refused_as(&anonymous, Some(Code::Unauthenticated)),
        format!("{anonymous:?}"),
    );

    // 5. Tokens.
    let get = |auth: RawAuth, env: String| {
        let mut client = envs(&p, auth);
        async move {
            client
                .get_environment(GetEnvironmentRequest {
                    environment_id: env,
                })
                .await
                .map(|_| ())
        }
    };
    get(bearer(&dev), env_a.clone())
        .await
        .expect("control: the developer reads its environment");
    let real_token_key = {
        let hex_key =
            std::fs::read_to_string(data.join("keys/token-1.key")).expect("identity token key");
        vibebox_token::RootKey::from_private_bytes(
            1,
            &hex::decode(hex_key.trim()).expect("hex key"),
        )
        .expect("root key")
    };
    let in_an_hour = chrono::Utc::now() + chrono::Duration::hours(1);
    let a_minute_ago = chrono::Utc::now() - chrono::Duration::minutes(1);
    let mut flipped = dev.clone().into_bytes();
    let middle = flipped.len() / 2;
    flipped[middle] = if flipped[middle] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).expect("ascii token");
    let unauthenticated: Vec<(&str, RawAuth)> = vec![
        ("no token", RawAuth(None, Vec::new())),
        ("an empty bearer", raw("Bearer ")),
        ("a garbage token", bearer("abc")),
        ("a tampered token", bearer(&flipped)),
        ("a truncated token", bearer(&dev[..dev.len() - 10])),
        ("two tokens", raw(&format!("Bearer {dev} {dev}"))),
        ("Basic auth", raw(&format!("Basic {dev}"))),
        (
            "a token minted by another key under the real key id",
            bearer(
                &vibebox_token::mint(
                    &vibebox_token::RootKey::generate(1),
                    &vibebox_token::Claims::new(&dev_id, &dev_token_id, in_an_hour),
                )
                .expect("mint"),
            ),
        ),
        (
            "a token minted by an unknown key id",
            bearer(
                &vibebox_token::mint(
                    &vibebox_token::RootKey::generate(42),
                    &vibebox_token::Claims::new(&dev_id, &dev_token_id, in_an_hour),
                )
                .expect("mint"),
            ),
        ),
        (
            "an expired token (real key)",
            bearer(
                &vibebox_token::mint(
                    &real_token_key,
                    &vibebox_token::Claims::new(&dev_id, &dev_token_id, a_minute_ago),
                )
                .expect("mint"),
            ),
        ),
        (
            "a token attenuated to an expiry in the past",
            bearer(
                &vibebox_token::attenuate(
                    &dev,
                    &vibebox_token::Restriction::default().expires_at(a_minute_ago),
                )
                .expect("attenuate"),
            ),
        ),
    ];
    for (what, auth) in unauthenticated {
        let result = get(auth, env_a.clone()).await;
        check(
            &mut report,
            what,
            refused_as(&result, Some(Code::Unauthenticated)),
            format!("{result:?}"),
        );
    }
    let expired = bearer(
        &vibebox_token::attenuate(
            &dev,
            &vibebox_token::Restriction::default().expires_at(a_minute_ago),
        )
        .expect("attenuate"),
    );
    // Listing "all my teams" asks identity for the caller's teams first; an
    // expired token must not see anything (it is answered OK and empty today:
    // noted in the report).
    let listed = envs(&p, expired)
        .list_environments(ListEnvironmentsRequest::default())
        .await;
    let nothing = match &listed {
        Err(s) => s.code() == Code::Unauthenticated,
        Ok(r) => {
            report.note(
                "expired token, ListEnvironments without team",
                "OK with an empty list, not UNAUTHENTICATED",
            );
            r.get_ref().environments.is_empty()
        }
    };
    check(
        &mut report,
        "an expired token listing all its teams",
        nothing,
        format!("{listed:?}"),
    );

    let attenuate = |restriction: vibebox_token::Restriction| {
        bearer(&vibebox_token::attenuate(&dev, &restriction).expect("attenuate"))
    };
    let to_a = attenuate(vibebox_token::Restriction::default().environment(&env_a));
    get(to_a.clone(), env_a.clone())
        .await
        .expect("control: a token attenuated to A reads A");
    let denied_env = get(to_a.clone(), e1.clone()).await;
    check(
        &mut report,
        "a token attenuated to another environment",
        refused_as(&denied_env, Some(Code::PermissionDenied)),
        format!("{denied_env:?}"),
    );
    let created = envs(&p, to_a.clone())
        .create_environment(CreateEnvironmentRequest {
            labels: Default::default(),
            request_id: "att-1".into(),
            team_id: alpha.clone(),
            name: "att".into(),
            spec: Some(small(&image)),
        })
        .await;
    check(
        &mut report,
        "creating with a token attenuated to one environment",
        refused_as(&created, Some(Code::PermissionDenied)),
        format!("{created:?}"),
    );
    let to_beta = attenuate(vibebox_token::Restriction::default().team(&beta));
    let r = get(to_beta, env_a.clone()).await;
    check(
        &mut report,
        "a token attenuated to another team",
        refused_as(&r, Some(Code::PermissionDenied)),
        format!("{r:?}"),
    );
    let widened = bearer(
        &vibebox_token::attenuate(
            &vibebox_token::attenuate(&dev, &vibebox_token::Restriction::default().team(&beta))
                .expect("attenuate"),
            &vibebox_token::Restriction::default().team(&alpha),
        )
        .expect("attenuate"),
    );
    let r = get(widened, env_a.clone()).await;
    check(
        &mut report,
        "re-attenuating to widen a team restriction",
        refused_as(&r, Some(Code::PermissionDenied)),
        format!("{r:?}"),
    );
    let read_only =
        attenuate(vibebox_token::Restriction::default().operations(["environment.get"]));
    get(read_only.clone(), env_a.clone())
        .await
        .expect("control: a read-only token reads");
    let r = envs(&p, read_only.clone())
        .delete_environment(DeleteEnvironmentRequest {
            environment_id: env_a.clone(),
        })
        .await;
    check(
        &mut report,
        "deleting with a read-only token",
        refused_as(&r, Some(Code::PermissionDenied)),
        format!("{r:?}"),
    );
    let r = envs(&p, read_only.clone())
        .stop_environment(StopEnvironmentRequest {
            environment_id: env_a.clone(),
            timeout_seconds: Some(1),
        })
        .await;
    check(
        &mut report,
        "stopping with a read-only token",
        refused_as(&r, Some(Code::PermissionDenied)),
        format!("{r:?}"),
    );
    let start = ExecRequest {
        message: Some(exec_request::Message::Start(ExecStart {
            environment_id: env_a.clone(),
            command: vec!["id".into()],
            ..Default::default()
        })),
    };
    let r = stream_error(envs(&p, read_only).exec(tokio_stream::iter(vec![start.clone()]))).await;
    check(
        &mut report,
        "exec with a read-only token",
        r.as_ref()
            .is_some_and(|s| s.code() == Code::PermissionDenied),
        format!("{r:?}"),
    );

    // Revocation: the token and every token derived from it stop working.
    let api = p
        .identity(&dev)
        .create_api_token(CreateApiTokenRequest {
            request_id: Default::default(),
            restrictions: Default::default(),
            description: "attack".into(),
            ttl_seconds: Some(3600),
        })
        .await
        .expect("api token")
        .into_inner();
    let derived = vibebox_token::attenuate(
        &api.token,
        &vibebox_token::Restriction::default().team(&alpha),
    )
    .expect("attenuate");
    get(bearer(&api.token), env_a.clone())
        .await
        .expect("control: the API token works");
    get(bearer(&derived), env_a.clone())
        .await
        .expect("control: its attenuation works");
    p.identity(&dev)
        .revoke_token(RevokeTokenRequest {
            token_id: api.token_id.clone(),
        })
        .await
        .expect("revoke");
    let mallory_team_token = member(&p, &admin, "mallory", &alpha, TeamRole::Viewer).await;
    get(bearer(&mallory_team_token.1), env_a.clone())
        .await
        .expect("control: a viewer reads");
    p.identity(&admin)
        .set_user_disabled(SetUserDisabledRequest {
            user_id: mallory_team_token.0.clone(),
            disabled: true,
        })
        .await
        .expect("disable mallory");
    for (what, token) in [
        ("a revoked token", api.token.clone()),
        ("a token attenuated from a revoked one", derived.clone()),
        ("a disabled user's token", mallory_team_token.1.clone()),
    ] {
        let deadline = Instant::now() + Duration::from_secs(10);
        let result = loop {
            let result = get(bearer(&token), env_a.clone()).await;
            if result.is_err() || Instant::now() > deadline {
                break result;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        check(
            &mut report,
            what,
            refused_as(&result, Some(Code::Unauthenticated)),
            format!("{result:?}"),
        );
    }

    // 6. Another team's environment looks exactly like a missing one.
    let missing = uuid::Uuid::new_v4().to_string();
    let upper = env_a.to_uppercase();
    let outsider_auth = bearer(&outsider);
    let probe = |env: String| {
        let auth = outsider_auth.clone();
        let p = &p;
        async move {
            let mut c = envs(p, auth);
            let start = ExecRequest {
                message: Some(exec_request::Message::Start(ExecStart {
                    environment_id: env.clone(),
                    command: vec!["id".into()],
                    ..Default::default()
                })),
            };
            vec![
                (
                    "get",
                    c.get_environment(GetEnvironmentRequest {
                        environment_id: env.clone(),
                    })
                    .await
                    .err(),
                ),
                (
                    "start",
                    c.start_environment(StartEnvironmentRequest {
                        environment_id: env.clone(),
                    })
                    .await
                    .err(),
                ),
                (
                    "stop",
                    c.stop_environment(StopEnvironmentRequest {
                        environment_id: env.clone(),
                        timeout_seconds: Some(1),
                    })
                    .await
                    .err(),
                ),
                (
                    "restart",
                    c.restart_environment(RestartEnvironmentRequest {
                        environment_id: env.clone(),
                        timeout_seconds: Some(1),
                    })
                    .await
                    .err(),
                ),
                (
                    "delete",
                    c.delete_environment(DeleteEnvironmentRequest {
                        environment_id: env.clone(),
                    })
                    .await
                    .err(),
                ),
                (
                    "exec",
                    stream_error(c.exec(tokio_stream::iter(vec![start]))).await,
                ),
                (
                    "logs",
                    stream_error(c.stream_logs(StreamLogsRequest {
                        environment_id: env.clone(),
                        ..Default::default()
                    }))
                    .await,
                ),
                (
                    "stats",
                    stream_error(c.stream_stats(StreamStatsRequest {
                        environment_id: env.clone(),
                        one_shot: true,
                    }))
                    .await,
                ),
            ]
        }
    };
    let theirs = probe(env_a.clone()).await;
    let absent = probe(missing).await;
    let shouting = probe(upper).await;
    for (((op, theirs), (_, absent)), (_, shouting)) in theirs.into_iter().zip(absent).zip(shouting)
    {
        let key = |s: &Option<tonic::Status>| {
            s.as_ref()
                .map(|s| (s.code(), s.message().to_owned(), s.details().to_vec()))
        };
        let same =
            theirs.is_some() && key(&theirs) == key(&absent) && key(&shouting) == key(&absent);
        check(
            &mut report,
            &format!("another team's environment: {op}"),
            same,
            format!("{theirs:?} vs missing {absent:?} vs upper-case {shouting:?}"),
        );
    }
    let listed = envs(&p, bearer(&outsider))
        .list_environments(ListEnvironmentsRequest {
            team_id: alpha.clone(),
            ..Default::default()
        })
        .await;
    check(
        &mut report,
        "listing another team",
        refused_as(&listed, Some(Code::PermissionDenied)),
        format!("{listed:?}"),
    );
    let mine = envs(&p, bearer(&outsider))
        .list_environments(ListEnvironmentsRequest::default())
        .await
        .expect("own list")
        .into_inner();
    check(
        &mut report,
        "another team's environment in one's own list",
        mine.environments
            .iter()
            .all(|e| e.id != env_a && e.id != e1),
        format!("{mine:?}"),
    );
    let created = envs(&p, bearer(&outsider))
        .create_environment(CreateEnvironmentRequest {
            labels: Default::default(),
            request_id: "cross-1".into(),
            team_id: alpha.clone(),
            name: "cross".into(),
            spec: Some(small(&image)),
        })
        .await;
    check(
        &mut report,
        "creating in another team",
        refused_as(&created, Some(Code::PermissionDenied)),
        format!("{created:?}"),
    );
    let still = get(bearer(&dev), env_a.clone()).await;
    assert!(still.is_ok(), "A survived the outsider: {still:?}");
    let a = envs(&p, bearer(&dev))
        .get_environment(GetEnvironmentRequest {
            environment_id: env_a.clone(),
        })
        .await
        .expect("get A")
        .into_inner();
    assert_eq!(
        a.environment.expect("A").state(),
        EnvironmentState::Running,
        "the outsider stopped nothing"
    );

    assert!(
        failures.is_empty(),
        "{} trust cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(
        labelled_objects(&installation),
        sorted(expected_objects),
        "nothing else was created"
    );
}
