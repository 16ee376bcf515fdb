//! The Helm chart (helm/vibebox): lints strictly, renders for the default
//! values and every Docker-in-Docker runtime option, validates against the
//! Kubernetes 1.31 schemas, and enforces the isolation rules of the security
//! model. NetworkPolicies are checked by evaluating them (Kubernetes
//! semantics: a pod selected by a policy of a direction only allows what
//! some rule of such a policy allows) over every pair of platform pods.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;
use vibebox_tests::repo_root;

const SERVICES: [&str; 5] = ["gateway", "identity", "policy", "orchestrator", "audit"];
const RUNTIMES: [&str; 4] = ["privileged", "rootless", "sysbox", "kata"];
const NAMESPACE: &str = "default";

/// The operator tools (scripts/install-tools.sh): helm-lite, kubernetes-validate, PyYAML.
fn tool(name: &str) -> PathBuf {
    let dir = std::env::var_os("VIBEBOX_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".vibebox-tools")
        });
    let path = dir.join("bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `just tools`",
        path.display()
    );
    path
}

fn chart() -> PathBuf {
    repo_root().join("helm/vibebox")
}

fn pipe(cmd: &mut Command, input: &[u8]) -> (bool, String, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("waiting");
    writer.join().expect("writer").expect("writing stdin");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Renders the chart with `--set` values, validates it strictly against the
/// Kubernetes 1.31 schemas and returns its documents.
fn render(sets: &[&str]) -> Vec<Value> {
    let mut cmd = Command::new(tool("helm-lite"));
    cmd.args(["template", "rel"]).arg(chart());
    for s in sets {
        cmd.args(["--set", s]);
    }
    let (ok, yaml, err) = pipe(&mut cmd, b"");
    assert!(ok, "rendering with {sets:?} failed: {err}");
    let (ok, out, err) = pipe(
        Command::new(tool("kubernetes-validate")).args(["--strict", "-k", "1.31.0", "-"]),
        yaml.as_bytes(),
    );
    assert!(
        ok,
        "rendering with {sets:?} does not validate:\n{out}\n{err}"
    );
    let (ok, json, err) = pipe(
        Command::new(tool("python3")).args([
            "-c",
            "import sys, json, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ]),
        yaml.as_bytes(),
    );
    assert!(ok, "parsing the rendering: {err}");
    serde_json::from_str::<Vec<Value>>(&json).expect("json")
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn pod_spec<'a>(docs: &'a [Value], component: &str) -> &'a Value {
    &find(docs, "Deployment", &format!("rel-vibebox-{component}"))["spec"]["template"]["spec"]
}

#[test]
fn chart_lints_strictly() {
    let out = Command::new(tool("helm-lite"))
        .args(["lint", "--strict"])
        .arg(chart())
        .output()
        .expect("helm-lite lint");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn values_schema_rejects_an_unknown_runtime_and_unknown_keys() {
    for bad in [
        "dind.runtime=docker-socket",
        "gateway.replicaz=3",
        "containerSecurityContext.readOnlyRootFilesystem=false",
    ] {
        let out = Command::new(tool("helm-lite"))
            .args(["template", "rel"])
            .arg(chart())
            .args(["--set", bad])
            .output()
            .expect("helm-lite template");
        assert!(!out.status.success(), "{bad} was accepted");
    }
}

fn assert_hardened_container(who: &str, pod: &Value, container: &Value) {
    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true, "{who}: runAsNonRoot");
    assert!(
        psc["runAsUser"].as_i64().unwrap_or(0) > 0,
        "{who}: non-root uid"
    );
    assert_eq!(
        psc["seccompProfile"]["type"], "RuntimeDefault",
        "{who}: pod seccomp"
    );
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{who}: read-only root");
    assert_eq!(
        sc["allowPrivilegeEscalation"], false,
        "{who}: no privilege escalation"
    );
    assert_eq!(sc["privileged"], false, "{who}: not privileged");
    assert_eq!(
        sc["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{who}: drops ALL"
    );
    assert!(
        sc["capabilities"]["add"].is_null(),
        "{who}: adds no capability"
    );
    assert_eq!(
        sc["seccompProfile"]["type"], "RuntimeDefault",
        "{who}: seccomp"
    );
    assert_eq!(
        pod["automountServiceAccountToken"], false,
        "{who}: no API token"
    );
    assert!(
        pod["hostNetwork"].is_null() && pod["hostPID"].is_null(),
        "{who}: no host namespaces"
    );
    for volume in pod["volumes"].as_array().into_iter().flatten() {
        assert!(volume["hostPath"].is_null(), "{who}: no hostPath volume");
    }
}

#[test]
fn platform_pods_run_hardened_with_grpc_health_probes_and_resources() {
    let docs = render(&[]);
    for service in SERVICES {
        let pod = pod_spec(&docs, service);
        let containers = pod["containers"].as_array().expect("containers");
        assert_eq!(containers.len(), 1);
        let c = &containers[0];
        assert_hardened_container(service, pod, c);
        for kind in ["requests", "limits"] {
            for res in ["cpu", "memory"] {
                assert!(
                    !c["resources"][kind][res].is_null(),
                    "{service}: {kind}.{res}"
                );
            }
        }
        // Readiness through gRPC health: the kubelet's own probe for the
        // plaintext gateway, the image's mTLS health probe for the others.
        let readiness = &c["readinessProbe"];
        if service == "gateway" {
            assert_eq!(readiness["grpc"]["port"], 7700);
        } else {
            let cmd = readiness["exec"]["command"].as_array().expect("exec probe");
            assert_eq!(cmd[0], "/usr/local/bin/vibebox-health-probe");
            assert!(cmd.iter().any(|a| {
                a.as_str()
                    .is_some_and(|a| a.starts_with("https://127.0.0.1:"))
            }));
        }
        assert!(!c["livenessProbe"].is_null() && !c["startupProbe"].is_null());
        // mTLS material from a Secret.
        let tls = pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == "tls")
            .expect("tls volume");
        assert_eq!(
            tls["secret"]["secretName"],
            format!("rel-vibebox-{service}-tls")
        );
        // Only the orchestrator is told where Docker is.
        let env = c["env"].as_array().expect("env");
        let docker_host = env.iter().find(|e| e["name"] == "DOCKER_HOST");
        if service == "orchestrator" {
            assert_eq!(
                docker_host.expect("DOCKER_HOST")["value"],
                "tcp://rel-vibebox-dind:2376"
            );
            assert!(
                env.iter()
                    .any(|e| e["name"] == "DOCKER_TLS_VERIFY" && e["value"] == "1")
            );
        } else {
            assert!(docker_host.is_none(), "{service} knows nothing of Docker");
        }
        let pdb = find(
            &docs,
            "PodDisruptionBudget",
            &format!("rel-vibebox-{service}"),
        );
        assert_eq!(
            pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"],
            service
        );
        let labels =
            &find(&docs, "Deployment", &format!("rel-vibebox-{service}"))["metadata"]["labels"];
        for key in [
            "name",
            "instance",
            "version",
            "component",
            "part-of",
            "managed-by",
        ] {
            assert!(
                labels[format!("app.kubernetes.io/{key}")].is_string(),
                "{service}: label {key}"
            );
        }
    }
    // The helm test hook calls the gateway's health, hardened as well.
    let test = docs
        .iter()
        .find(|d| d["kind"] == "Pod" && d["metadata"]["annotations"]["helm.sh/hook"] == "test")
        .expect("helm test pod");
    let c = &test["spec"]["containers"][0];
    assert_hardened_container("helm test", &test["spec"], c);
    assert!(
        c["command"]
            .as_array()
            .expect("command")
            .iter()
            .any(|a| a == "http://rel-vibebox-gateway:7700")
    );
}

#[test]
fn every_runtime_option_renders_validates_and_isolates_the_daemon_as_chosen() {
    for runtime in RUNTIMES {
        let docs = render(&[&format!("dind.runtime={runtime}")]);
        let pod = pod_spec(&docs, "dind");
        let c = &pod["containers"][0];
        let privileged = c["securityContext"]["privileged"] == true;
        match runtime {
            "privileged" => {
                assert!(privileged);
                assert!(pod["runtimeClassName"].is_null());
            }
            "rootless" => {
                assert!(!privileged);
                assert_eq!(c["securityContext"]["runAsUser"], 1000);
                assert!(c["image"].as_str().expect("image").contains("rootless"));
            }
            "sysbox" => {
                assert!(!privileged);
                assert_eq!(pod["runtimeClassName"], "sysbox-runc");
            }
            "kata" => {
                // Privileged inside the Kata VM, not on the node.
                assert_eq!(pod["runtimeClassName"], "kata");
            }
            _ => unreachable!(),
        }
        // The daemon listens on TCP with mutual TLS only.
        let args: Vec<&str> = c["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(args.contains(&"--tlsverify"), "{runtime}: {args:?}");
        assert!(
            args.iter()
                .all(|a| !a.starts_with("--host=unix") && !a.contains(":2375"))
        );
        // The platform pods stay hardened whatever the daemon's runtime.
        for service in SERVICES {
            let p = pod_spec(&docs, service);
            assert_hardened_container(service, p, &p["containers"][0]);
            assert!(p["runtimeClassName"].is_null());
        }
        assert_isolation(&docs);
    }
    // Options around the runtime render and validate too.
    let docs = render(&[
        "database.existingSecret=vibebox-db",
        "gateway.ingress.enabled=true",
        "gateway.ingress.tlsSecret=vibebox-public-tls",
        "dind.storage.persistence=true",
    ]);
    for service in ["identity", "policy", "orchestrator", "audit"] {
        let env = pod_spec(&docs, service)["containers"][0]["env"]
            .as_array()
            .expect("env")
            .clone();
        let db = env
            .iter()
            .find(|e| e["name"] == "VIBEBOX_DATABASE_URL")
            .expect("database url");
        assert_eq!(
            db["valueFrom"]["secretKeyRef"]["name"], "vibebox-db",
            "{service}"
        );
    }
    find(&docs, "Ingress", "rel-vibebox-gateway");
    assert_isolation(&docs);

    // cert-manager issues each service's identity (its CRD has no bundled
    // schema: validation only warns about it).
    let docs = render(&["tls.certManager.enabled=true"]);
    for service in SERVICES {
        let cert = find(&docs, "Certificate", &format!("rel-vibebox-{service}"));
        assert_eq!(
            cert["spec"]["uris"][0],
            format!("spiffe://vibebox/{service}")
        );
        assert_eq!(
            cert["spec"]["secretName"],
            format!("rel-vibebox-{service}-tls")
        );
    }
    let dind = find(&docs, "Certificate", "rel-vibebox-dind");
    assert!(
        dind["spec"]["dnsNames"]
            .as_array()
            .expect("dns names")
            .iter()
            .any(|n| n == "rel-vibebox-dind")
    );
    find(&docs, "Certificate", "rel-vibebox-dind-client");
}

// ---- NetworkPolicy evaluation -------------------------------------------------

/// A pod as the policies see it.
struct Pod {
    labels: BTreeMap<String, String>,
    namespace_labels: BTreeMap<String, String>,
    ip: Ipv4Addr,
}

fn platform_pod(component: &str, ip: u8) -> Pod {
    let labels = [
        ("app.kubernetes.io/name", "vibebox"),
        ("app.kubernetes.io/instance", "rel"),
        ("app.kubernetes.io/component", component),
        ("app.kubernetes.io/part-of", "vibebox"),
    ];
    Pod {
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        namespace_labels: BTreeMap::from([(
            "kubernetes.io/metadata.name".into(),
            NAMESPACE.into(),
        )]),
        ip: Ipv4Addr::new(10, 244, 0, ip),
    }
}

fn matches_selector(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    assert!(
        selector["matchExpressions"].is_null(),
        "matchExpressions are not evaluated here"
    );
    selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
}

fn in_cidr(ip: Ipv4Addr, cidr: &str) -> bool {
    let (net, len) = cidr.split_once('/').expect("cidr");
    let net: Ipv4Addr = net.parse().expect("cidr address");
    let len: u32 = len.parse().expect("prefix");
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// Does a policy peer (`from`/`to` entry) match `pod`, for a policy in NAMESPACE?
fn peer_matches(peer: &Value, pod: &Pod) -> bool {
    if let Some(block) = peer.get("ipBlock") {
        return in_cidr(pod.ip, block["cidr"].as_str().expect("cidr"))
            && !block["except"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| in_cidr(pod.ip, e.as_str().expect("except")));
    }
    let namespace_ok = match peer.get("namespaceSelector") {
        Some(sel) => matches_selector(sel, &pod.namespace_labels),
        None => {
            pod.namespace_labels
                .get("kubernetes.io/metadata.name")
                .map(String::as_str)
                == Some(NAMESPACE)
        }
    };
    let pod_ok = peer
        .get("podSelector")
        .is_none_or(|sel| matches_selector(sel, &pod.labels));
    namespace_ok && pod_ok
}

fn rule_allows(rule: &Value, peers_key: &str, other: &Pod, port: u16) -> bool {
    let port_ok = match rule["ports"].as_array() {
        None => true,
        Some(ports) => ports.iter().any(|p| {
            p["protocol"].as_str().unwrap_or("TCP") == "TCP"
                && p["port"].as_u64().is_none_or(|n| n == u64::from(port))
        }),
    };
    let peer_ok = match rule[peers_key].as_array() {
        None => true,
        Some(peers) => peers.iter().any(|p| peer_matches(p, other)),
    };
    port_ok && peer_ok
}

/// Kubernetes semantics for one direction: if no policy of that direction
/// selects `subject`, everything is allowed; otherwise some rule must allow.
fn direction_allows(
    policies: &[&Value],
    subject: &Pod,
    direction: &str,
    other: &Pod,
    port: u16,
) -> bool {
    let (rules_key, peers_key) = if direction == "Ingress" {
        ("ingress", "from")
    } else {
        ("egress", "to")
    };
    let selecting: Vec<&&Value> = policies
        .iter()
        .filter(|p| matches_selector(&p["spec"]["podSelector"], &subject.labels))
        .filter(|p| {
            p["spec"]["policyTypes"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == direction))
        })
        .collect();
    selecting.is_empty()
        || selecting.iter().any(|p| {
            p["spec"][rules_key]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| rule_allows(r, peers_key, other, port))
        })
}

fn connects(policies: &[&Value], from: &Pod, to: &Pod, port: u16) -> bool {
    direction_allows(policies, from, "Egress", to, port)
        && direction_allows(policies, to, "Ingress", from, port)
}

fn assert_isolation(docs: &[Value]) {
    let policies: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "NetworkPolicy")
        .collect();
    let ports: BTreeMap<&str, u16> = BTreeMap::from([
        ("gateway", 7700),
        ("identity", 7701),
        ("policy", 7702),
        ("orchestrator", 7703),
        ("audit", 7704),
        ("dind", 2376),
    ]);
    let components = [
        "gateway",
        "identity",
        "policy",
        "orchestrator",
        "audit",
        "dind",
    ];
    let pods: BTreeMap<&str, Pod> = components
        .iter()
        .enumerate()
        .map(|(i, c)| (*c, platform_pod(c, 10 + i as u8)))
        .collect();
    // Some other workload in the cluster.
    let outsider = Pod {
        labels: BTreeMap::from([("app".into(), "something-else".into())]),
        namespace_labels: BTreeMap::from([("kubernetes.io/metadata.name".into(), "other".into())]),
        ip: Ipv4Addr::new(10, 244, 1, 5),
    };

    // Who may call whom (and nothing else): the security model's graph.
    let allowed: &[(&str, &str)] = &[
        ("gateway", "identity"),
        ("gateway", "policy"),
        ("gateway", "orchestrator"),
        ("gateway", "audit"),
        ("identity", "audit"),
        ("policy", "audit"),
        ("orchestrator", "policy"),
        ("orchestrator", "audit"),
        ("orchestrator", "dind"),
    ];
    for from in components {
        for to in components {
            if from == to {
                continue;
            }
            let expected = allowed.contains(&(from, to));
            assert_eq!(
                connects(&policies, &pods[from], &pods[to], ports[to]),
                expected,
                "{from} -> {to}:{}",
                ports[to]
            );
        }
    }
    // Only orchestrator pods reach the daemon; only the gateway reaches the orchestrator.
    assert!(
        !connects(&policies, &outsider, &pods["dind"], 2376),
        "outsider -> dind"
    );
    assert!(
        !connects(&policies, &outsider, &pods["orchestrator"], 7703),
        "outsider -> orchestrator"
    );
    assert!(
        connects(&policies, &outsider, &pods["gateway"], 7700),
        "the gateway is public"
    );
    // User containers (behind the daemon pod) reach nothing of the platform,
    // no other pod nor the metadata service, only the outside world.
    for service in SERVICES {
        assert!(
            !connects(&policies, &pods["dind"], &pods[service], ports[service]),
            "dind -> {service}"
        );
    }
    let elsewhere = |ip: Ipv4Addr| Pod {
        labels: BTreeMap::new(),
        namespace_labels: BTreeMap::from([("kubernetes.io/metadata.name".into(), "other".into())]),
        ip,
    };
    assert!(
        !connects(&policies, &pods["dind"], &outsider, 80),
        "dind -> another workload"
    );
    assert!(
        !connects(
            &policies,
            &pods["dind"],
            &elsewhere(Ipv4Addr::new(169, 254, 169, 254)),
            80
        ),
        "dind -> metadata"
    );
    assert!(
        connects(
            &policies,
            &pods["dind"],
            &elsewhere(Ipv4Addr::new(93, 184, 216, 34)),
            443
        ),
        "dind -> internet"
    );
    // Platform services make no calls outside their graph (no internet).
    for service in SERVICES {
        assert!(
            !connects(
                &policies,
                &pods[service],
                &elsewhere(Ipv4Addr::new(93, 184, 216, 34)),
                443
            ),
            "{service} -> internet"
        );
    }
}

/// The orchestrator (the one Docker holder and writer of its environments)
/// never overlaps a second copy during a rollout, with or without a volume;
/// the stateless gateway rolls.
#[test]
fn the_orchestrator_is_replaced_never_overlapped() {
    for sets in [vec![], vec!["orchestrator.persistence.enabled=false"]] {
        let docs = render(&sets);
        let deployment = find(&docs, "Deployment", "rel-vibebox-orchestrator");
        assert_eq!(
            deployment["spec"]["strategy"]["type"], "Recreate",
            "{sets:?}"
        );
        let gateway = find(&docs, "Deployment", "rel-vibebox-gateway");
        assert_ne!(gateway["spec"]["strategy"]["type"], "Recreate", "{sets:?}");
    }
}

#[test]
fn an_admin_password_secret_reaches_identity_alone_as_a_read_only_file() {
    const ENV: &str = "VIBEBOX_BOOTSTRAP_ADMIN_PASSWORD_FILE";
    let has_env = |pod: &Value| {
        pod["containers"][0]["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == ENV)
            .cloned()
    };
    // By default nobody is given a password file.
    let docs = render(&[]);
    for service in SERVICES {
        assert!(has_env(pod_spec(&docs, service)).is_none(), "{service}");
    }

    let docs = render(&["identity.bootstrapAdminPassword.existingSecret=admin-pw"]);
    for service in SERVICES.iter().filter(|s| **s != "identity") {
        let pod = pod_spec(&docs, service);
        assert!(has_env(pod).is_none(), "{service} gets no password");
        assert!(
            !pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["secret"]["secretName"] == "admin-pw"),
            "{service} mounts no password"
        );
    }
    let pod = pod_spec(&docs, "identity");
    let file = has_env(pod).expect("identity is told the file")["value"]
        .as_str()
        .unwrap()
        .to_owned();
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"] == "admin-pw")
        .expect("the Secret is a volume");
    assert_eq!(volume["secret"]["items"][0]["key"], "password");
    assert_eq!(
        volume["secret"]["optional"], true,
        "read on first start only: the Secret may go"
    );
    let path = volume["secret"]["items"][0]["path"].as_str().unwrap();
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("mounted");
    assert_eq!(mount["readOnly"], true);
    assert_eq!(
        file,
        format!("{}/{path}", mount["mountPath"].as_str().unwrap()),
        "the file identity reads is the Secret's key"
    );
    // And the identity binary reads that variable.
    let help = Command::new(vibebox_tests::binary("vibebox-identity"))
        .arg("--help")
        .output()
        .expect("vibebox-identity --help");
    assert!(
        String::from_utf8_lossy(&help.stdout).contains(ENV),
        "vibebox-identity does not read {ENV}"
    );
}
