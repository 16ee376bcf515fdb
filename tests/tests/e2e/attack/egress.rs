//! Outbound access by policy, against a stand-in internet built here: HTTP
//! servers in containers on Docker networks this test creates, a "public"
//! one in a documentation range (198.51.100.0/24 or 203.0.113.0/24) and a
//! "private" one (RFC 1918), a server on the Docker host itself, and a DNS
//! server run by this test that answers names for all of them, including
//! names that rebind to loopback and to the cloud metadata address. Nothing
//! leaves this machine.
//!
//! The platform's egress gates join both networks (`--egress-network`), so
//! every forbidden destination is *routable* from the gate: what keeps an
//! environment out is the gate's decision, and the test proves it by
//! reaching the same servers when policy allows.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use simple_dns::rdata::{A, RData};
use simple_dns::{CLASS, Packet, PacketFlag, QTYPE, RCODE, ResourceRecord, TYPE};
use vibebox_proto::audit::{EventFilter, QueryEventsRequest};
use vibebox_proto::environment::{
    ContainerSpec, CreateEnvironmentRequest, Egress, EgressMode, EgressRule, Environment,
    EnvironmentState, StreamStatsRequest,
};
use vibebox_proto::identity::TeamRole;
use vibebox_proto::policy::EvaluateSpecRequest;
use vibebox_tests::attack::detail_strings;
use vibebox_tests::cluster::{Cluster, Service, exec};
use vibebox_tests::{Settle, dev_image};

/// Docker objects of one test run, removed on drop.
struct Objects {
    run: String,
    networks: Vec<String>,
}

impl Objects {
    fn label(&self) -> String {
        format!("vibebox.test={}", self.run)
    }

    /// A /28 network in the first free candidate range; its subnet base.
    fn network(&mut self, name: &str, candidates: &[Ipv4Addr]) -> (String, Ipv4Addr) {
        let name = format!("vbt-{}-{name}", self.run);
        for base in candidates {
            let out = Command::new("docker")
                .args(["network", "create", "--driver", "bridge"])
                .arg(format!("--subnet={base}/28"))
                .arg(format!("--label={}", self.label()))
                .arg(&name)
                .output()
                .expect("docker network create");
            if out.status.success() {
                self.networks.push(name.clone());
                return (name, *base);
            }
        }
        panic!("no free /28 for {name}");
    }

    /// An HTTP server answering `body` on port 80 at `ip`.
    fn server(&self, image: &str, network: &str, ip: Ipv4Addr, body: &str) {
        let script = format!(
            "mkdir -p /tmp/www && echo {body} > /tmp/www/index.html && exec httpd -f -p 80 -h /tmp/www"
        );
        let out = Command::new("docker")
            .args(["run", "-d", "--user", "0"])
            .arg(format!("--label={}", self.label()))
            .arg(format!("--network={network}"))
            .arg(format!("--ip={ip}"))
            .arg(format!("--name=vbt-{}-{body}", self.run))
            .args([image, "sh", "-c", &script])
            .output()
            .expect("docker run");
        assert!(
            out.status.success(),
            "server {body}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Objects {
    fn drop(&mut self) {
        let label = format!("label={}", self.label());
        if let Ok(out) = Command::new("docker")
            .args(["ps", "-aq", "--filter", &label])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
        for n in &self.networks {
            let _ = Command::new("docker").args(["network", "rm", n]).output();
        }
    }
}

fn offset(base: Ipv4Addr, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + n)
}

/// A DNS server answering A questions from `names`, NXDOMAIN otherwise.
async fn dns_server(bind: Ipv4Addr, names: HashMap<String, Ipv4Addr>) -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind((bind, 0))
        .await
        .expect("bind dns");
    let addr = socket.local_addr().unwrap();
    let names = Arc::new(names);
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                continue;
            };
            let Ok(q) = Packet::parse(&buf[..n]) else {
                continue;
            };
            let mut r = Packet::new_reply(q.id());
            r.set_flags(PacketFlag::RECURSION_AVAILABLE);
            let Some(question) = q.questions.first() else {
                continue;
            };
            r.questions.push(question.clone());
            let name = question.qname.to_string().to_ascii_lowercase();
            match names.get(name.trim_end_matches('.')) {
                Some(ip) if question.qtype == QTYPE::TYPE(TYPE::A) => {
                    r.answers.push(ResourceRecord::new(
                        question.qname.clone(),
                        CLASS::IN,
                        1,
                        RData::A(A::from(*ip)),
                    ));
                }
                Some(_) => {}
                None => *r.rcode_mut() = RCODE::NameError,
            }
            if let Ok(bytes) = r.build_bytes_vec() {
                let _ = socket.send_to(&bytes, from).await;
            }
        }
    });
    addr
}

/// A TCP server on the Docker host answering every request with `host-ok`.
fn host_server() -> u16 {
    let listener = std::net::TcpListener::bind("0.0.0.0:0").expect("bind host server");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut buf = [0u8; 1024];
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\nhost-ok\n");
            });
        }
    });
    port
}

struct Env {
    cluster: Cluster,
    token: String,
    team: String,
}

impl Env {
    async fn create(&self, name: &str, egress: Option<Egress>) -> Environment {
        let env = self
            .cluster
            .environments(&self.token)
            .create_settled(CreateEnvironmentRequest {
                labels: Default::default(),
                request_id: format!("egress-{name}"),
                team_id: self.team.clone(),
                name: name.into(),
                spec: Some(ContainerSpec {
                    image: dev_image(),
                    egress,
                    ..Default::default()
                }),
            })
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e:?}"));
        assert_eq!(env.state(), EnvironmentState::Running, "{env:?}");
        env
    }

    /// `wget` in the environment: Some(body) on success.
    async fn fetch(&self, env: &str, url: &str, proxy: bool) -> Option<String> {
        // busybox wget's own -T crashes; `timeout` bounds it instead.
        let mut cmd = vec!["timeout", "10", "env"];
        if !proxy {
            cmd.extend(["-u", "http_proxy", "-u", "HTTP_PROXY"]);
        }
        cmd.extend(["wget", "-O", "-", url]);
        let out = exec(&mut self.cluster.environments(&self.token), env, &cmd)
            .await
            .expect("exec");
        if out.exit_code != 0 {
            let gate_logs = Command::new("docker")
                .args(["logs", &format!("vibebox-gate-{env}")])
                .output()
                .unwrap();
            eprintln!(
                "wget {url} (proxy {proxy}) in {env}: {} / gate: {}{}",
                out.stderr.trim(),
                String::from_utf8_lossy(&gate_logs.stdout),
                String::from_utf8_lossy(&gate_logs.stderr)
            );
        }
        (out.exit_code == 0).then_some(out.stdout.trim().to_owned())
    }
}

/// A TLS ClientHello naming `name` (SNI), as printf escapes.
fn client_hello_printf(name: &str) -> String {
    vibebox_gate::sniff::client_hello(name)
        .iter()
        .map(|b| format!("\\{b:03o}"))
        .collect()
}

/// The host's own IPv4 addresses outside loopback and Docker's bridges
/// (its uplink: what a tenant would try to reach host services through).
fn host_uplink_addresses() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .expect("ip addr");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let dev = f.nth(1)?;
            let addr = f.nth(1)?.split('/').next()?.to_owned();
            let docker = dev == "lo"
                || dev.starts_with("docker")
                || dev.starts_with("br-")
                || dev.starts_with("veth");
            (!docker).then_some(addr)
        })
        .collect()
}

fn container_ip(env: &str) -> String {
    let out = Command::new("docker")
        .args([
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &format!("vibebox-{env}"),
        ])
        .output()
        .expect("docker inspect");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn egress_reaches_what_policy_allows_and_nothing_forbidden() {
    let image = dev_image();
    let mut objects = Objects {
        run: uuid::Uuid::new_v4().simple().to_string()[..10].to_owned(),
        networks: Vec::new(),
    };
    let publics: Vec<Ipv4Addr> = (0..16)
        .map(|i| Ipv4Addr::new(198, 51, 100, i * 16))
        .chain((0..16).map(|i| Ipv4Addr::new(203, 0, 113, i * 16)))
        .collect();
    let privates: Vec<Ipv4Addr> = (0..64).map(|i| Ipv4Addr::new(10, 251, i, 0)).collect();
    let (public_net, public) = objects.network("public", &publics);
    let (private_net, private) = objects.network("private", &privates);
    let host_gw = offset(public, 1);
    let (web, other, secret) = (offset(public, 10), offset(public, 11), offset(private, 10));
    objects.server(&image, &public_net, web, "public-ok");
    objects.server(&image, &public_net, other, "other-ok");
    objects.server(&image, &private_net, secret, "private-ok");
    // A TLS "server" that keeps the first bytes it receives.
    let sink = offset(public, 12);
    let sink_name = format!("vbt-{}-tls-sink", objects.run);
    let out = Command::new("docker")
        .args(["run", "-d", "--user", "0"])
        .arg(format!("--label={}", objects.label()))
        .arg(format!("--network={public_net}"))
        .arg(format!("--ip={sink}"))
        .arg(format!("--name={sink_name}"))
        .args([
            image.as_str(),
            "sh",
            "-c",
            "nc -l -p 443 > /tmp/got; sleep 3600",
        ])
        .output()
        .expect("docker run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let host_port = host_server();
    let dns = dns_server(
        host_gw,
        HashMap::from([
            ("public.test".to_string(), web),
            ("other.test".to_string(), other),
            ("private.test".to_string(), secret),
            ("rebind.test".to_string(), Ipv4Addr::LOCALHOST),
            (
                "metadata.test".to_string(),
                Ipv4Addr::new(169, 254, 169, 254),
            ),
            ("host.test".to_string(), host_gw),
            ("tls.test".to_string(), sink),
        ]),
    )
    .await;

    let policy = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(policy.path(), "[egress]\nmode = \"internet\"\n").unwrap();
    let cluster = Cluster::builder()
        .arg(
            Service::Policy,
            format!("--policy-file={}", policy.path().display()),
        )
        .arg(
            Service::Orchestrator,
            format!("--egress-network={public_net},{private_net}"),
        )
        .arg(Service::Orchestrator, format!("--egress-dns={dns}"))
        .arg(Service::Orchestrator, "--reconcile-interval=1")
        .start()
        .await;
    let team = cluster.team("egress").await;
    let token = cluster.user("egress-dev", &team, TeamRole::Developer).await;
    let ctx = Env {
        cluster,
        token,
        team,
    };

    // The dry run shows the decision; a wider request than policy allows is
    // impossible here (internet is the widest), a narrower one is kept.
    let dry = ctx
        .cluster
        .policy(&ctx.token)
        .evaluate_spec(EvaluateSpecRequest {
            spec: Some(ContainerSpec {
                image: image.clone(),
                ..Default::default()
            }),
            team_id: ctx.team.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .evaluation
        .unwrap();
    let hardened = dry.hardened_spec.unwrap().egress.unwrap();
    assert_eq!(hardened.mode(), EgressMode::Internet);

    let open = ctx.create("open", None).await;
    let listed = ctx
        .create(
            "listed",
            Some(Egress {
                mode: EgressMode::AllowList as i32,
                allow: vec![EgressRule {
                    host: "public.test".into(),
                    cidr: String::new(),
                    ports: vec![80],
                }],
            }),
        )
        .await;
    let sealed = ctx
        .create(
            "sealed",
            Some(Egress {
                mode: EgressMode::None as i32,
                allow: vec![],
            }),
        )
        .await;
    assert_eq!(
        listed
            .spec
            .as_ref()
            .unwrap()
            .egress
            .as_ref()
            .unwrap()
            .mode(),
        EgressMode::AllowList
    );

    // Internet: public servers by name (through the proxy and without it,
    // transparently by DNS + Host header) and by address.
    let e = &open.id;
    assert_eq!(
        ctx.fetch(e, "http://public.test/", true).await.as_deref(),
        Some("public-ok")
    );
    assert_eq!(
        ctx.fetch(e, "http://public.test/", false).await.as_deref(),
        Some("public-ok")
    );
    assert_eq!(
        ctx.fetch(e, &format!("http://{other}/"), true)
            .await
            .as_deref(),
        Some("other-ok")
    );
    // TLS without the proxy: the gate reads the server name from the
    // ClientHello and passes the handshake on unchanged.
    let hello = client_hello_printf("tls.test");
    let sent = exec(
        &mut ctx.cluster.environments(&ctx.token),
        e,
        &[
            "sh",
            "-c",
            &format!("printf '{hello}' | timeout 5 nc tls.test 443; true"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(sent.exit_code, 0, "{sent:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = Command::new("docker")
            .args(["exec", &sink_name, "cat", "/tmp/got"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&got.stdout).contains("tls.test") {
            assert_eq!(got.stdout[0], 0x16, "the handshake arrives as sent");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no ClientHello reached the TLS server"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every forbidden class, each routable from the gate.
    let sealed_ip = container_ip(&sealed.id);
    let mut forbidden: Vec<String> = host_uplink_addresses()
        .into_iter()
        .flat_map(|ip| [format!("http://{ip}:{host_port}/"), format!("http://{ip}/")])
        .collect();
    // The engine's default bridge: the host again.
    forbidden.push(format!("http://172.17.0.1:{host_port}/"));
    for url in forbidden {
        assert_eq!(ctx.fetch(e, &url, true).await, None, "{url}");
    }
    for url in [
        "http://private.test/".to_string(),
        format!("http://{secret}/"),
        "http://rebind.test/".to_string(),
        "http://metadata.test/".to_string(),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        format!("http://{host_gw}:{host_port}/"),
        format!("http://host.test:{host_port}/"),
        format!("http://{sealed_ip}/"),
    ] {
        for proxy in [true, false] {
            assert_eq!(
                ctx.fetch(e, &url, proxy).await,
                None,
                "{url} (proxy {proxy})"
            );
        }
    }

    // Allow-list: only the named host, on the named port.
    let l = &listed.id;
    assert_eq!(
        ctx.fetch(l, "http://public.test/", true).await.as_deref(),
        Some("public-ok")
    );
    assert_eq!(ctx.fetch(l, "http://other.test/", true).await, None);
    assert_eq!(ctx.fetch(l, &format!("http://{other}/"), true).await, None);
    assert_eq!(
        ctx.fetch(l, &format!("http://{web}/"), true).await,
        None,
        "address literal of an allowed name"
    );

    // None: nothing at all.
    for url in ["http://public.test/".to_string(), format!("http://{web}/")] {
        for proxy in [true, false] {
            assert_eq!(ctx.fetch(&sealed.id, &url, proxy).await, None, "{url}");
        }
    }
    assert!(
        Command::new("docker")
            .args(["inspect", &format!("vibebox-gate-{}", sealed.id)])
            .output()
            .unwrap()
            .status
            .code()
            != Some(0),
        "an environment without egress has no gate"
    );

    // Counted per environment, the first refusal per destination audited.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (allowed, denied) = loop {
        let sample = ctx
            .cluster
            .environments(&ctx.token)
            .stream_stats(StreamStatsRequest {
                environment_id: open.id.clone(),
                one_shot: true,
            })
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap()
            .unwrap();
        let counts = (
            sample.egress_allowed_connections,
            sample.egress_denied_connections,
        );
        if (counts.0 >= 3 && counts.1 >= 8) || Instant::now() > deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        allowed >= 3 && denied >= 8,
        "allowed {allowed}, denied {denied}"
    );
    let admin = ctx.cluster.admin_token();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let events = ctx
            .cluster
            .audit(&admin)
            .query_events(QueryEventsRequest {
                filter: Some(EventFilter {
                    action: "network.egress_denied".into(),
                    resource_id: open.id.clone(),
                    ..Default::default()
                }),
                page_size: 500,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .events;
        let destinations: Vec<String> = events
            .iter()
            .flat_map(|e| detail_strings(e, "destination"))
            .collect();
        let wanted = [format!("{secret}:80"), "metadata.test".to_string()];
        if wanted
            .iter()
            .all(|w| destinations.iter().any(|d| d.contains(w.as_str())))
        {
            // Once per destination, however often it was tried.
            let secret_events = destinations
                .iter()
                .filter(|d| **d == format!("{secret}:80"))
                .count();
            assert_eq!(secret_events, 1, "{destinations:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "egress refusals not audited: {destinations:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A gate removed behind the platform's back comes back (reconcile),
    // and egress works again; until then the environment has no way out.
    let gate = format!("vibebox-gate-{}", listed.id);
    let removed = Command::new("docker")
        .args(["rm", "-f", &gate])
        .output()
        .unwrap();
    assert!(removed.status.success());
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if ctx.fetch(l, "http://public.test/", true).await.as_deref() == Some("public-ok") {
            break;
        }
        assert!(Instant::now() < deadline, "the gate did not come back");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Stopping the environment stops its gate; starting it starts it again
    // (each settled first: they are long operations).
    let mut envs = ctx.cluster.environments(&ctx.token);
    let stopped = envs.stop_settled(&listed.id, Some(1)).await.unwrap();
    assert_eq!(stopped.state(), EnvironmentState::Stopped, "{stopped:?}");
    let running = |name: &str| {
        let out = Command::new("docker")
            .args(["inspect", "-f", "{{.State.Running}}", name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "true"
    };
    assert!(!running(&gate), "a stopped environment's gate is stopped");
    let started = envs.start_settled(&listed.id).await.unwrap();
    assert_eq!(started.state(), EnvironmentState::Running, "{started:?}");
    assert!(running(&gate));
    assert_eq!(
        ctx.fetch(l, "http://public.test/", true).await.as_deref(),
        Some("public-ok")
    );

    // Deleting the environment removes its gate.
    let deleted = ctx
        .cluster
        .environments(&ctx.token)
        .delete_settled(&open.id)
        .await
        .unwrap();
    assert_eq!(deleted.state(), EnvironmentState::Deleted, "{deleted:?}");
    assert!(
        !Command::new("docker")
            .args(["inspect", &format!("vibebox-gate-{}", open.id)])
            .output()
            .unwrap()
            .status
            .success(),
        "the gate is removed with its environment"
    );
    ctx.cluster.remove_docker_objects();
}
