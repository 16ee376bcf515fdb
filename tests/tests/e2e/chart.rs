//! The Helm chart (helm/vibebox): lints strictly, renders for the default
//! values and every option (each Docker-in-Docker runtime, cert-manager with
//! and without an issuer, Secrets of the operator, PostgreSQL, the Ingress and
//! the GRPCRoute, an emptyDir data root, every extension point), validates
//! against the Kubernetes 1.31 schemas, and enforces the isolation rules of
//! the security model. NetworkPolicies are checked by evaluating them
//! (Kubernetes semantics: a pod selected by a policy of a direction only
//! allows what some rule of such a policy allows) over every pair of
//! platform pods; Pod Security levels by evaluating the pod specs against
//! the Pod Security Standards. The PKI the chart makes when given no value
//! runs the real services: their processes get the rendered pods' files and
//! environment, call each other over mutual TLS with those certificates,
//! refuse a wrong identity, and reach Docker through a mutual-TLS endpoint
//! holding the chart's daemon certificate.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use vibebox_proto::environment::environment_service_client::EnvironmentServiceClient;
use vibebox_proto::environment::{ContainerSpec, CreateEnvironmentRequest, EnvironmentState};
use vibebox_proto::identity::identity_service_client::IdentityServiceClient;
use vibebox_proto::identity::{
    AddTeamMemberRequest, CreateTeamRequest, CreateUserRequest, LoginRequest, PlatformRole,
    TeamRole, WhoAmIRequest,
};
use vibebox_proto::policy::GetPolicyRequest;
use vibebox_proto::policy::policy_service_client::PolicyServiceClient;
use vibebox_server_kit::TlsMaterial;
use vibebox_tests::{Settle, bearer, binary, dev_image, repo_root};

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

/// `helm template` with `--set` values and an optional values file.
fn template(sets: &[&str], values: Option<&str>) -> Result<String, String> {
    template_chart(&chart(), sets, values)
}

fn template_chart(chart: &Path, sets: &[&str], values: Option<&str>) -> Result<String, String> {
    let file = tempfile::NamedTempFile::new().expect("values file");
    let mut cmd = Command::new(tool("helm-lite"));
    cmd.args(["template", "rel"]).arg(chart);
    if let Some(values) = values {
        std::fs::write(file.path(), values).expect("writing values");
        cmd.arg("-f").arg(file.path());
    }
    for s in sets {
        cmd.args(["--set", s]);
    }
    let (ok, yaml, err) = pipe(&mut cmd, b"");
    if ok { Ok(yaml) } else { Err(err) }
}

/// Custom resources the Kubernetes schemas do not hold; each is checked by
/// the tests that render it.
const CUSTOM_KINDS: [&str; 3] = ["Certificate", "Issuer", "GRPCRoute"];

/// Renders the chart, validates it strictly against the Kubernetes 1.31
/// schemas and returns its documents.
fn render_values(sets: &[&str], values: Option<&str>) -> Vec<Value> {
    let yaml = template(sets, values)
        .unwrap_or_else(|e| panic!("rendering with {sets:?} {values:?} failed: {e}"));
    validated(yaml, sets, values)
}

fn validated(yaml: String, sets: &[&str], values: Option<&str>) -> Vec<Value> {
    let (ok, out, err) = pipe(
        Command::new(tool("kubernetes-validate")).args(["--strict", "-k", "1.31.0", "-"]),
        yaml.as_bytes(),
    );
    assert!(
        ok,
        "rendering with {sets:?} {values:?} does not validate:\n{out}\n{err}"
    );
    // Only the custom resources may go without a schema.
    for line in out.lines().chain(err.lines()) {
        if line.contains("Couldn't find schema") {
            assert!(
                CUSTOM_KINDS
                    .iter()
                    .any(|k| line.contains(&format!("kind {k} "))),
                "{line}"
            );
        }
    }
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

fn render(sets: &[&str]) -> Vec<Value> {
    render_values(sets, None)
}

/// NOTES.txt as `helm install` prints it (helm-lite leaves it out of its
/// output; the same SDK renders it here).
fn notes(values: &Value) -> String {
    let (ok, out, err) = pipe(
        Command::new(tool("python3")).args([
            "-c",
            "import sys, json, helm_python as helm\n\
             vals = json.loads(sys.argv[2]) or None\n\
             out = helm.Chart.load(sys.argv[1]).render(vals, name='rel', namespace='default', is_install=True)\n\
             print(next(v for k, v in out.items() if k.endswith('NOTES.txt')))",
            &chart().display().to_string(),
            &values.to_string(),
        ]),
        b"",
    );
    assert!(ok, "rendering NOTES.txt: {err}");
    out
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn workload<'a>(docs: &'a [Value], component: &str) -> &'a Value {
    let name = format!("rel-vibebox-{component}");
    docs.iter()
        .find(|d| {
            (d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
                && d["metadata"]["name"] == name
        })
        .unwrap_or_else(|| panic!("no workload {name}"))
}

fn pod_spec<'a>(docs: &'a [Value], component: &str) -> &'a Value {
    &workload(docs, component)["spec"]["template"]["spec"]
}

/// Every pod spec of the rendering (workloads and the `helm test` pod).
fn pod_specs(docs: &[Value]) -> Vec<(String, &Value)> {
    docs.iter()
        .filter_map(|d| {
            let name = d["metadata"]["name"].as_str()?.to_owned();
            match d["kind"].as_str()? {
                "Deployment" | "StatefulSet" => Some((name, &d["spec"]["template"]["spec"])),
                "Pod" => Some((name, &d["spec"])),
                _ => None,
            }
        })
        .collect()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == name)
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
        // The data root is a volume claim or, explicitly, an emptyDir.
        "dind.storage.type=hostPath",
        "dind.storage.persistence=false",
        // A GRPCRoute attaches to some Gateway.
        "gateway.grpcRoute.enabled=true",
        // Extension points are typed.
        "policy.priorityClassName=1",
        "audit.topologySpreadConstraints[0].maxSkew=1",
        "dind.extraVolumeMounts[0].name=x",
        "identity.podLabels.team=1",
        "tls.generated.certValidityDays=0",
    ] {
        assert!(template(&[bad], None).is_err(), "{bad} was accepted");
    }
    // A renewal window as long as the certificates is refused by the chart.
    let err = template(&["tls.generated.renewBeforeDays=365"], None).unwrap_err();
    assert!(err.contains("renewBeforeDays"), "{err}");
    // `global` takes anything (the chart as a subchart, under Argo CD).
    render(&[
        "global.imageRegistry=registry.example.com",
        "global.x.y[0]=1",
    ]);
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
        let labels = &workload(&docs, service)["metadata"]["labels"];
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
        // The daemon listens on one TCP port with mutual TLS only. `dockerd`
        // first: the image's entrypoint then adds none of its own defaults
        // (a unix socket, a plaintext-port listener on 2375).
        let args = strings(&c["args"]);
        assert_eq!(args[0], "dockerd", "{runtime}: {args:?}");
        assert!(args.contains(&"--tlsverify"), "{runtime}: {args:?}");
        let hosts: Vec<&&str> = args.iter().filter(|a| a.starts_with("--host")).collect();
        assert_eq!(hosts, [&"--host=tcp://0.0.0.0:2376"], "{runtime}");
        assert!(args.iter().all(|a| !a.contains("2375")));
        assert_eq!(
            env_value(c, "DOCKER_TLS_CERTDIR").expect("DOCKER_TLS_CERTDIR")["value"],
            ""
        );
        // Rootless dockerd lives in rootlesskit's network namespace: the
        // port reaches the pod only through rootlesskit's forward of it.
        let forward = env_value(c, "DOCKERD_ROOTLESS_ROOTLESSKIT_FLAGS");
        if runtime == "rootless" {
            assert_eq!(
                forward.expect("port forward")["value"],
                "-p 0.0.0.0:2376:2376/tcp"
            );
        } else {
            assert!(forward.is_none(), "{runtime}");
        }
        assert_eq!(c["ports"][0]["containerPort"], 2376);
        assert_eq!(
            find(&docs, "Service", "rel-vibebox-dind")["spec"]["ports"][0]["targetPort"],
            c["ports"][0]["name"]
        );
        // The platform pods stay hardened whatever the daemon's runtime.
        for service in SERVICES {
            let p = pod_spec(&docs, service);
            assert_hardened_container(service, p, &p["containers"][0]);
            assert!(p["runtimeClassName"].is_null());
        }
        assert_isolation(&docs);
    }
    // A changed port moves the listener, the forward and the Service together.
    let docs = render(&["dind.runtime=rootless", "dind.port=3376"]);
    let c = &pod_spec(&docs, "dind")["containers"][0];
    assert!(strings(&c["args"]).contains(&"--host=tcp://0.0.0.0:3376"));
    assert_eq!(
        env_value(c, "DOCKERD_ROOTLESS_ROOTLESSKIT_FLAGS").unwrap()["value"],
        "-p 0.0.0.0:3376:3376/tcp"
    );
    assert_eq!(
        env_value(
            &pod_spec(&docs, "orchestrator")["containers"][0],
            "DOCKER_HOST"
        )
        .unwrap()["value"],
        "tcp://rel-vibebox-dind:3376"
    );

    // Options around the runtime render and validate too.
    let docs = render(&[
        "database.existingSecret=vibebox-db",
        "gateway.ingress.enabled=true",
        "gateway.ingress.tlsSecret=vibebox-public-tls",
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
    // The Ingress speaks gRPC to the gateway and lets quiet streams (an idle
    // exec, logs of a quiet container, a watch between heartbeats) live.
    let ingress = find(&docs, "Ingress", "rel-vibebox-gateway");
    let annotations = &ingress["metadata"]["annotations"];
    assert_eq!(
        annotations["nginx.ingress.kubernetes.io/backend-protocol"],
        "GRPC"
    );
    for timeout in ["proxy-read-timeout", "proxy-send-timeout"] {
        let seconds: u64 = annotations[format!("nginx.ingress.kubernetes.io/{timeout}")]
            .as_str()
            .expect(timeout)
            .parse()
            .expect("seconds");
        assert!(seconds >= 3600, "{timeout}: {seconds}");
    }
    assert_eq!(
        annotations["nginx.ingress.kubernetes.io/proxy-body-size"],
        "0"
    );
    assert_isolation(&docs);

    // cert-manager issues each service's identity (its CRDs have no bundled
    // schema: validation only warns about them).
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
        // Without an issuer of the operator's, the services CA the chart
        // makes with cert-manager signs them.
        assert_eq!(cert["spec"]["issuerRef"]["name"], "rel-vibebox-ca");
    }
    let dind = find(&docs, "Certificate", "rel-vibebox-dind");
    assert!(strings(&dind["spec"]["dnsNames"]).contains(&"rel-vibebox-dind"));
    // The daemon's certificates come from a CA of their own: no service
    // certificate opens the daemon.
    assert_eq!(dind["spec"]["issuerRef"]["name"], "rel-vibebox-dind-ca");
    let client = find(&docs, "Certificate", "rel-vibebox-dind-client");
    assert_eq!(client["spec"]["issuerRef"]["name"], "rel-vibebox-dind-ca");
    for ca in ["rel-vibebox-ca", "rel-vibebox-dind-ca"] {
        let cert = find(&docs, "Certificate", ca);
        assert_eq!(cert["spec"]["isCA"], true);
        assert_eq!(cert["spec"]["issuerRef"]["name"], "rel-vibebox-selfsigned");
        assert_eq!(find(&docs, "Issuer", ca)["spec"]["ca"]["secretName"], ca);
    }
    assert!(!find(&docs, "Issuer", "rel-vibebox-selfsigned")["spec"]["selfSigned"].is_null());
    assert_no_chart_pki(&docs);
    // An operator's issuer signs everything, and the chart makes no CA.
    let docs = render(&[
        "tls.certManager.enabled=true",
        "tls.certManager.issuerRef.name=corp-ca",
        "tls.certManager.issuerRef.kind=ClusterIssuer",
    ]);
    for d in docs.iter().filter(|d| d["kind"] == "Certificate") {
        assert_eq!(
            d["spec"]["issuerRef"]["name"], "corp-ca",
            "{}",
            d["metadata"]["name"]
        );
        assert_eq!(d["spec"]["issuerRef"]["kind"], "ClusterIssuer");
    }
    assert!(!docs.iter().any(|d| d["kind"] == "Issuer"));
    assert_no_chart_pki(&docs);
}

/// The chart made none of the certificates (another source provides them).
fn assert_no_chart_pki(docs: &[Value]) {
    let made: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "Secret" && d["type"] == "kubernetes.io/tls")
        .map(|d| &d["metadata"]["name"])
        .collect();
    assert!(made.is_empty(), "{made:?}");
}

// ---- Pod Security Standards ---------------------------------------------------

/// The capabilities "baseline" lets a container add.
const BASELINE_CAPABILITIES: [&str; 13] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// The Pod Security Standards (v1.31) level a pod spec meets: "restricted",
/// "baseline" or "privileged", with the controls it fails.
fn pss_level(pod: &Value) -> (&'static str, Vec<String>) {
    let mut baseline = Vec::new();
    let mut restricted = Vec::new();
    let containers: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod[*k].as_array().into_iter().flatten())
        .collect();
    for ns in ["hostNetwork", "hostPID", "hostIPC"] {
        if pod[ns] == true {
            baseline.push(ns.to_owned());
        }
    }
    for v in pod["volumes"].as_array().into_iter().flatten() {
        if !v["hostPath"].is_null() {
            baseline.push("hostPath".into());
        }
        let allowed = [
            "configMap",
            "csi",
            "downwardAPI",
            "emptyDir",
            "ephemeral",
            "persistentVolumeClaim",
            "projected",
            "secret",
        ];
        let kind = v
            .as_object()
            .and_then(|o| o.keys().find(|k| *k != "name").cloned());
        if !kind.as_deref().is_some_and(|k| allowed.contains(&k)) {
            restricted.push(format!("volume type {kind:?}"));
        }
    }
    if !pod["securityContext"]["sysctls"].is_null() {
        baseline.push("sysctls".into());
    }
    let psc = &pod["securityContext"];
    for (who, sc) in std::iter::once(("pod".to_owned(), psc)).chain(containers.iter().map(|c| {
        (
            c["name"].as_str().unwrap_or("?").to_owned(),
            &c["securityContext"],
        )
    })) {
        if sc["seccompProfile"]["type"] == "Unconfined" {
            baseline.push(format!("{who}: seccomp Unconfined"));
        }
        if let Some(t) = sc["appArmorProfile"]["type"].as_str()
            && t != "RuntimeDefault"
            && t != "Localhost"
        {
            baseline.push(format!("{who}: AppArmor {t}"));
        }
        if !sc["seLinuxOptions"]["user"].is_null() || !sc["seLinuxOptions"]["role"].is_null() {
            baseline.push(format!("{who}: SELinux"));
        }
    }
    for c in &containers {
        let who = c["name"].as_str().unwrap_or("?");
        let sc = &c["securityContext"];
        if sc["privileged"] == true {
            baseline.push(format!("{who}: privileged"));
        }
        if sc["procMount"].as_str().is_some_and(|m| m != "Default") {
            baseline.push(format!("{who}: procMount"));
        }
        for cap in strings(&sc["capabilities"]["add"]) {
            if !BASELINE_CAPABILITIES.contains(&cap) {
                baseline.push(format!("{who}: adds {cap}"));
            }
            if cap != "NET_BIND_SERVICE" {
                restricted.push(format!("{who}: adds {cap}"));
            }
        }
        for p in c["ports"].as_array().into_iter().flatten() {
            if p["hostPort"].as_u64().unwrap_or(0) != 0 {
                baseline.push(format!("{who}: hostPort"));
            }
        }
        if sc["allowPrivilegeEscalation"] != false {
            restricted.push(format!("{who}: allowPrivilegeEscalation"));
        }
        if !strings(&sc["capabilities"]["drop"]).contains(&"ALL") {
            restricted.push(format!("{who}: does not drop ALL"));
        }
        let non_root = sc["runAsNonRoot"] == true
            || (sc["runAsNonRoot"].is_null() && psc["runAsNonRoot"] == true);
        if !non_root || sc["runAsUser"] == 0 || psc["runAsUser"] == 0 {
            restricted.push(format!("{who}: may run as root"));
        }
        let seccomp = sc["seccompProfile"]["type"]
            .as_str()
            .or(psc["seccompProfile"]["type"].as_str());
        if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
            restricted.push(format!("{who}: seccomp {seccomp:?}"));
        }
    }
    if !baseline.is_empty() {
        ("privileged", baseline)
    } else if !restricted.is_empty() {
        ("baseline", restricted)
    } else {
        ("restricted", Vec::new())
    }
}

/// The level NOTES.txt tells the operator to label the namespace with.
fn notes_level(notes: &str) -> String {
    let line = notes
        .lines()
        .find(|l| l.contains("pod-security.kubernetes.io/enforce="))
        .unwrap_or_else(|| panic!("NOTES name no Pod Security level:\n{notes}"));
    assert!(
        line.contains("kubectl label --overwrite ns default"),
        "{line}"
    );
    line.rsplit('=').next().unwrap().trim().to_owned()
}

/// Each daemon runtime meets exactly the Pod Security level the docs and
/// NOTES.txt name for it; everything else meets "restricted".
#[test]
fn pod_security_levels_are_the_ones_the_operator_is_told() {
    let cases: [(&str, &[&str], &str); 5] = [
        ("privileged", &[], "privileged"),
        // Unconfined seccomp and AppArmor for the nested user namespaces.
        ("rootless", &[], "privileged"),
        // With Localhost profiles that allow them instead.
        (
            "rootless",
            &[
                "dind.rootless.seccompProfile.type=Localhost",
                "dind.rootless.seccompProfile.localhostProfile=profiles/rootless-dockerd.json",
                "dind.rootless.appArmorProfile.type=Localhost",
                "dind.rootless.appArmorProfile.localhostProfile=rootless-dockerd",
            ],
            "baseline",
        ),
        ("sysbox", &[], "baseline"),
        // privileged: true, inside the VM: Pod Security sees the spec only.
        ("kata", &[], "privileged"),
    ];
    for (runtime, extra, expected) in cases {
        let runtime_set = format!("dind.runtime={runtime}");
        let mut sets = vec![runtime_set.as_str()];
        sets.extend_from_slice(extra);
        let docs = render(&sets);
        let (level, why) = pss_level(pod_spec(&docs, "dind"));
        assert_eq!(level, expected, "{runtime} {extra:?}: {why:?}");
        for (name, pod) in pod_specs(&docs) {
            if name != "rel-vibebox-dind" {
                let (level, why) = pss_level(pod);
                assert_eq!(level, "restricted", "{name}: {why:?}");
            }
        }
        // What NOTES.txt asks for, from the same values.
        let mut values = json!({"dind": {"runtime": runtime}});
        if !extra.is_empty() {
            values["dind"]["rootless"] = json!({
                "seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/rootless-dockerd.json"},
                "appArmorProfile": {"type": "Localhost", "localhostProfile": "rootless-dockerd"},
            });
        }
        assert_eq!(
            notes_level(&notes(&values)),
            expected,
            "{runtime} {extra:?}"
        );
    }
}

// ---- The daemon's data root -------------------------------------------------------

#[test]
fn the_daemon_keeps_its_data_root_on_a_claim_and_no_eviction_stops_it() {
    let docs = render(&[
        "dind.storage.size=200Gi",
        "dind.storage.storageClass=fast-ssd",
    ]);
    let sts = find(&docs, "StatefulSet", "rel-vibebox-dind");
    assert_eq!(sts["spec"]["replicas"], 1);
    assert_eq!(sts["spec"]["serviceName"], "rel-vibebox-dind");
    let claims = sts["spec"]["volumeClaimTemplates"]
        .as_array()
        .expect("claims");
    assert_eq!(claims.len(), 1);
    let claim = &claims[0];
    assert_eq!(claim["metadata"]["name"], "docker-data");
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "200Gi");
    assert_eq!(claim["spec"]["storageClassName"], "fast-ssd");
    // Kept when the release goes (workspaces outlive an uninstall).
    assert_eq!(
        sts["spec"]["persistentVolumeClaimRetentionPolicy"],
        json!({"whenDeleted": "Retain", "whenScaled": "Retain"})
    );
    let pod = &sts["spec"]["template"]["spec"];
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "docker-data")
        .expect("data root mounted");
    assert_eq!(mount["mountPath"], "/var/lib/docker");
    assert!(
        !pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "docker-data"),
        "the claim, not a pod volume, backs the data root"
    );
    // No voluntary disruption (drain, autoscaler) may stop the daemon.
    let pdb = find(&docs, "PodDisruptionBudget", "rel-vibebox-dind");
    assert_eq!(pdb["spec"]["maxUnavailable"], 0);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        sts["spec"]["selector"]["matchLabels"]
    );
    // Rootless dockerd keeps its data under its home: the claim goes there.
    let docs = render(&["dind.runtime=rootless"]);
    let pod = pod_spec(&docs, "dind");
    assert!(
        pod["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "docker-data"
                && m["mountPath"] == "/home/rootless/.local/share/docker")
    );
    assert_eq!(pod["securityContext"]["fsGroup"], 1000);
    // An emptyDir only when asked for.
    let docs = render(&[
        "dind.storage.type=emptyDir",
        "dind.storage.emptyDirSizeLimit=20Gi",
    ]);
    let sts = find(&docs, "StatefulSet", "rel-vibebox-dind");
    assert!(sts["spec"]["volumeClaimTemplates"].is_null());
    let data = sts["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "docker-data")
        .expect("emptyDir volume");
    assert_eq!(data["emptyDir"]["sizeLimit"], "20Gi");
    assert!(notes(&json!({"dind": {"storage": {"type": "emptyDir"}}})).contains("emptyDir (lost"));
}

// ---- Extension points, GRPCRoute, policy document --------------------------------

/// Every extension point, set for every service and the daemon.
fn extension_values() -> String {
    let mut values = String::from("global: {registry: registry.example.com}\n");
    for component in SERVICES.iter().chain(["dind"].iter()) {
        values.push_str(&format!(
            "{component}:
  extraEnv: [{{name: EXTRA_{up}, value: \"1\"}}]
  extraVolumes: [{{name: extra, emptyDir: {{}}}}]
  extraVolumeMounts: [{{name: extra, mountPath: /extra, readOnly: true}}]
  podAnnotations: {{example.com/owner: {component}}}
  podLabels: {{example.com/team: platform, app.kubernetes.io/component: hijacked}}
  nodeSelector: {{example.com/pool: {component}}}
  tolerations: [{{key: dedicated, operator: Equal, value: {component}, effect: NoSchedule}}]
  affinity: {{nodeAffinity: {{requiredDuringSchedulingIgnoredDuringExecution: {{nodeSelectorTerms: [{{matchExpressions: [{{key: example.com/zone, operator: In, values: [a]}}]}}]}}}}}}
  topologySpreadConstraints: [{{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: ScheduleAnyway}}]
  priorityClassName: vibebox-{component}
",
            up = component.to_uppercase()
        ));
    }
    values
}

#[test]
fn every_pod_takes_every_extension_point() {
    let docs = render_values(&[], Some(&extension_values()));
    for component in SERVICES.iter().chain(["dind"].iter()) {
        let template = &workload(&docs, component)["spec"]["template"];
        let pod = &template["spec"];
        let c = &pod["containers"][0];
        assert_eq!(
            env_value(c, &format!("EXTRA_{}", component.to_uppercase())).expect("extraEnv")["value"],
            "1"
        );
        assert!(
            pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["name"] == "extra"),
            "{component}: extraVolumes"
        );
        assert!(
            c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["name"] == "extra" && m["mountPath"] == "/extra"),
            "{component}: extraVolumeMounts"
        );
        let meta = &template["metadata"];
        assert_eq!(meta["annotations"]["example.com/owner"], *component);
        assert_eq!(meta["labels"]["example.com/team"], "platform");
        // The chart's own labels win: the selector still selects the pods.
        assert_eq!(meta["labels"]["app.kubernetes.io/component"], *component);
        assert_eq!(pod["nodeSelector"]["example.com/pool"], *component);
        assert_eq!(pod["tolerations"][0]["value"], *component);
        assert!(!pod["affinity"]["nodeAffinity"].is_null());
        assert_eq!(pod["priorityClassName"], format!("vibebox-{component}"));
        // A spread constraint without a selector spreads this component's pods.
        let spread = &pod["topologySpreadConstraints"][0];
        assert_eq!(
            spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"],
            *component
        );
        assert_eq!(spread["topologyKey"], "kubernetes.io/hostname");
    }
    // The platform stays hardened and isolated with all of it.
    for service in SERVICES {
        let p = pod_spec(&docs, service);
        assert_hardened_container(service, p, &p["containers"][0]);
    }
    assert_isolation(&docs);
}

#[test]
fn a_grpc_route_reaches_the_gateway_service() {
    let docs = render_values(
        &[],
        Some(
            "gateway:
  grpcRoute:
    enabled: true
    annotations: {example.com/route: public}
    parentRefs: [{name: edge, namespace: gateway-system, sectionName: https}]
    hostnames: [vibebox.example.com, \"*.vibebox.example.com\"]
",
        ),
    );
    let route = find(&docs, "GRPCRoute", "rel-vibebox-gateway");
    // GRPCRoute is a CRD (Gateway API standard channel, v1): no bundled
    // schema, so its shape is checked here against the v1 API.
    assert_eq!(route["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(
        route["metadata"]["annotations"]["example.com/route"],
        "public"
    );
    let spec = route["spec"].as_object().expect("spec");
    let keys: BTreeSet<&str> = spec.keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["parentRefs", "hostnames", "rules"]));
    assert_eq!(
        route["spec"]["parentRefs"],
        json!([{"name": "edge", "namespace": "gateway-system", "sectionName": "https"}])
    );
    let hostname = regex_free_hostname;
    for h in strings(&route["spec"]["hostnames"]) {
        assert!(hostname(h), "{h} is no Gateway API hostname");
    }
    let rules = route["spec"]["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), 1);
    let rule = rules[0].as_object().expect("rule");
    assert_eq!(
        rule.keys().collect::<Vec<_>>(),
        ["backendRefs"],
        "every method"
    );
    let backends = rules[0]["backendRefs"].as_array().expect("backendRefs");
    assert_eq!(backends.len(), 1);
    let backend = backends[0].as_object().expect("backend");
    let keys: BTreeSet<&str> = backend.keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["name", "port"]));
    // The backend is the gateway's Service, on its port, which speaks gRPC.
    let service = find(&docs, "Service", backend["name"].as_str().unwrap());
    assert_eq!(service["spec"]["ports"][0]["port"], backend["port"]);
    assert_eq!(service["spec"]["ports"][0]["appProtocol"], "grpc");
    assert_eq!(
        service["spec"]["selector"]["app.kubernetes.io/component"],
        "gateway"
    );
    // Not rendered unless asked.
    assert!(!render(&[]).iter().any(|d| d["kind"] == "GRPCRoute"));
}

/// A Gateway API hostname (RFC 1123, optionally one leading wildcard label).
fn regex_free_hostname(h: &str) -> bool {
    let rest = h.strip_prefix("*.").unwrap_or(h);
    !rest.is_empty()
        && h.len() <= 253
        && rest.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

const POLICY_DOCUMENT: &str = "version = \"chart-pki-test\"\n\n[egress]\nmode = \"none\"\n";

#[test]
fn the_policy_document_comes_from_a_config_map_and_rolls_the_policy_pod() {
    // Default: the built-in policy, nothing mounted.
    let docs = render(&[]);
    assert!(!docs.iter().any(|d| d["kind"] == "ConfigMap"));
    let c = &pod_spec(&docs, "policy")["containers"][0];
    assert!(env_value(c, "VIBEBOX_POLICY_FILE").is_none());

    let values = format!(
        "policy:\n  document: {}\n",
        serde_json::to_string(POLICY_DOCUMENT).unwrap()
    );
    let docs = render_values(&[], Some(&values));
    let map = find(&docs, "ConfigMap", "rel-vibebox-policy");
    assert_eq!(map["data"]["policy.toml"], POLICY_DOCUMENT);
    let template = &workload(&docs, "policy")["spec"]["template"];
    let pod = &template["spec"];
    let c = &pod["containers"][0];
    let file = env_value(c, "VIBEBOX_POLICY_FILE").expect("policy file")["value"]
        .as_str()
        .unwrap()
        .to_owned();
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"] == "rel-vibebox-policy")
        .expect("ConfigMap volume");
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("mounted");
    assert_eq!(mount["readOnly"], true);
    assert_eq!(
        file,
        format!("{}/policy.toml", mount["mountPath"].as_str().unwrap())
    );
    assert!(template["metadata"]["annotations"]["checksum/policy"].is_string());
    // Only the policy service reads it.
    for service in SERVICES.iter().filter(|s| **s != "policy") {
        assert!(
            env_value(
                &pod_spec(&docs, service)["containers"][0],
                "VIBEBOX_POLICY_FILE"
            )
            .is_none()
        );
    }
    // And the policy binary reads that variable.
    let help = Command::new(binary("vibebox-policy"))
        .arg("--help")
        .output()
        .expect("vibebox-policy --help");
    assert!(String::from_utf8_lossy(&help.stdout).contains("VIBEBOX_POLICY_FILE"));
}

// ---- The chart's own PKI -------------------------------------------------------

/// The Secrets, ConfigMaps and claims the pods of a rendering refer to that
/// the rendering does not create (cert-manager creates a Certificate's
/// Secret; a StatefulSet its claims).
fn missing_references(docs: &[Value]) -> BTreeSet<String> {
    let mut made = BTreeSet::new();
    for d in docs {
        let name = d["metadata"]["name"].as_str().unwrap_or_default();
        match d["kind"].as_str().unwrap_or_default() {
            "Secret" => {
                made.insert(format!("Secret/{name}"));
            }
            "ConfigMap" => {
                made.insert(format!("ConfigMap/{name}"));
            }
            "PersistentVolumeClaim" => {
                made.insert(format!("PersistentVolumeClaim/{name}"));
            }
            "ServiceAccount" => {
                made.insert(format!("ServiceAccount/{name}"));
            }
            "Certificate" => {
                made.insert(format!(
                    "Secret/{}",
                    d["spec"]["secretName"].as_str().unwrap()
                ));
            }
            "StatefulSet" => {
                for claim in d["spec"]["volumeClaimTemplates"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    made.insert(format!(
                        "VolumeClaimTemplate/{}",
                        claim["metadata"]["name"].as_str().unwrap()
                    ));
                }
            }
            _ => {}
        }
    }
    let mut used = BTreeSet::new();
    for (_, pod) in pod_specs(docs) {
        if let Some(sa) = pod["serviceAccountName"].as_str() {
            used.insert(format!("ServiceAccount/{sa}"));
        }
        for s in pod["imagePullSecrets"].as_array().into_iter().flatten() {
            used.insert(format!("Secret/{}", s["name"].as_str().unwrap()));
        }
        for v in pod["volumes"].as_array().into_iter().flatten() {
            if let Some(s) = v["secret"]["secretName"].as_str() {
                used.insert(format!("Secret/{s}"));
            }
            if let Some(m) = v["configMap"]["name"].as_str() {
                used.insert(format!("ConfigMap/{m}"));
            }
            if let Some(c) = v["persistentVolumeClaim"]["claimName"].as_str() {
                used.insert(format!("PersistentVolumeClaim/{c}"));
            }
        }
        let containers: Vec<&Value> = ["initContainers", "containers"]
            .iter()
            .flat_map(|k| pod[*k].as_array().into_iter().flatten())
            .collect();
        for c in containers {
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                let name = m["name"].as_str().unwrap();
                if !pod["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|v| v["name"] == name)
                {
                    used.insert(format!("VolumeClaimTemplate/{name}"));
                }
            }
            for e in c["env"].as_array().into_iter().flatten() {
                if let Some(s) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
                    used.insert(format!("Secret/{s}"));
                }
                if let Some(m) = e["valueFrom"]["configMapKeyRef"]["name"].as_str() {
                    used.insert(format!("ConfigMap/{m}"));
                }
            }
            for e in c["envFrom"].as_array().into_iter().flatten() {
                if let Some(s) = e["secretRef"]["name"].as_str() {
                    used.insert(format!("Secret/{s}"));
                }
            }
        }
    }
    used.difference(&made).cloned().collect()
}

fn secret_bytes(docs: &[Value], name: &str, key: &str) -> Vec<u8> {
    let encoded = find(docs, "Secret", name)["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("Secret {name} has no {key}"));
    base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("base64")
}

fn chart_material(docs: &[Value], secret: &str) -> TlsMaterial {
    TlsMaterial {
        ca_pem: secret_bytes(docs, secret, "ca.crt"),
        cert_pem: secret_bytes(docs, secret, "tls.crt"),
        key_pem: secret_bytes(docs, secret, "tls.key"),
    }
}

#[test]
fn with_no_value_the_chart_makes_its_pki_and_every_reference_resolves() {
    let docs = render(&[]);
    // Two CAs, one Secret per service and per side of the daemon, and the
    // first admin's password.
    let secrets: BTreeSet<&str> = docs
        .iter()
        .filter(|d| d["kind"] == "Secret")
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    let mut expected: BTreeSet<String> = SERVICES
        .iter()
        .map(|s| format!("rel-vibebox-{s}-tls"))
        .collect();
    for name in [
        "rel-vibebox-ca",
        "rel-vibebox-dind-ca",
        "rel-vibebox-dind-tls",
        "rel-vibebox-dind-client-tls",
        "rel-vibebox-initial-admin",
    ] {
        expected.insert(name.into());
    }
    assert_eq!(
        secrets,
        expected.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    let ca = secret_bytes(&docs, "rel-vibebox-ca", "tls.crt");
    let dind_ca = secret_bytes(&docs, "rel-vibebox-dind-ca", "tls.crt");
    assert_ne!(ca, dind_ca, "the daemon has a CA of its own");
    for service in SERVICES {
        let name = format!("rel-vibebox-{service}-tls");
        assert_eq!(find(&docs, "Secret", &name)["type"], "kubernetes.io/tls");
        let material = chart_material(&docs, &name);
        assert_eq!(material.ca_pem, ca, "{service}: signed by the services CA");
        // The identity server-kit reads from it (the CN: Helm cannot write
        // URI SANs), and a key rustls takes (ECDSA P-256, SEC1).
        assert_eq!(material.identity().expect("identity"), service);
        assert!(
            String::from_utf8_lossy(&material.key_pem)
                .starts_with("-----BEGIN EC PRIVATE KEY-----")
        );
        // Renewal bookkeeping for `helm upgrade`.
        let annotations = &find(&docs, "Secret", &name)["metadata"]["annotations"];
        assert!(
            annotations["vibebox.io/not-after"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .is_ok()
        );
    }
    let client = chart_material(&docs, "rel-vibebox-dind-client-tls");
    assert_eq!(client.ca_pem, dind_ca);
    let server = chart_material(&docs, "rel-vibebox-dind-tls");
    assert_eq!(server.ca_pem, dind_ca);
    // The CA keys reach no pod.
    for (name, pod) in pod_specs(&docs) {
        for v in pod["volumes"].as_array().into_iter().flatten() {
            let s = v["secret"]["secretName"].as_str().unwrap_or_default();
            assert!(
                s != "rel-vibebox-ca" && s != "rel-vibebox-dind-ca",
                "{name} mounts {s}"
            );
        }
    }
    // Each pod rolls when its certificates change.
    for component in SERVICES.iter().chain(["dind"].iter()) {
        assert!(
            workload(&docs, component)["spec"]["template"]["metadata"]["annotations"]["checksum/tls"]
                .is_string(),
            "{component}"
        );
    }

    // No pod refers to anything the rendering does not make, whatever the
    // option; the operator's own Secrets are the only outside references.
    let external = |names: &[&str]| -> BTreeSet<String> {
        names.iter().map(|n| format!("Secret/{n}")).collect()
    };
    let operator_tls: Vec<String> = SERVICES
        .iter()
        .map(|s| format!("rel-vibebox-{s}-tls"))
        .chain([
            "rel-vibebox-dind-tls".into(),
            "rel-vibebox-dind-client-tls".into(),
        ])
        .collect();
    let operator_tls: Vec<&str> = operator_tls.iter().map(String::as_str).collect();
    let cases: Vec<(Vec<&str>, Option<String>, BTreeSet<String>)> = vec![
        (vec![], None, external(&[])),
        (vec!["tls.certManager.enabled=true"], None, external(&[])),
        (
            vec![
                "tls.certManager.enabled=true",
                "tls.certManager.issuerRef.name=corp",
            ],
            None,
            external(&[]),
        ),
        (
            vec!["tls.existingSecrets=true"],
            None,
            external(&operator_tls),
        ),
        (
            vec!["database.existingSecret=vibebox-db"],
            None,
            external(&["vibebox-db"]),
        ),
        (
            vec!["identity.bootstrapAdminPassword.existingSecret=admin-pw"],
            None,
            external(&["admin-pw"]),
        ),
        (
            vec!["identity.bootstrapAdminPassword.generate=false"],
            None,
            external(&[]),
        ),
        (vec!["dind.runtime=rootless"], None, external(&[])),
        (vec!["dind.runtime=sysbox"], None, external(&[])),
        (vec!["dind.runtime=kata"], None, external(&[])),
        (vec!["dind.storage.type=emptyDir"], None, external(&[])),
        (
            vec![
                "gateway.grpcRoute.enabled=true",
                "gateway.grpcRoute.parentRefs[0].name=edge",
            ],
            None,
            external(&[]),
        ),
        (vec![], Some(extension_values()), external(&[])),
    ];
    for (sets, values, outside) in cases {
        let docs = render_values(&sets, values.as_deref());
        assert_eq!(missing_references(&docs), outside, "{sets:?}");
        if sets.iter().any(|s| s.starts_with("tls.")) {
            assert_no_chart_pki(&docs);
        }
    }
    // Naming any Secret means bringing them all: no half-made PKI.
    let docs = render(&["tls.secretNames.gateway=corp-gateway-tls"]);
    assert_no_chart_pki(&docs);
    assert!(missing_references(&docs).contains("Secret/corp-gateway-tls"));
}

/// A copy of the chart whose one change is that a `lookup` of a Secret reads
/// `fakeCluster.<name>` from the values: `helm upgrade` against a cluster
/// holding those Secrets, rendered offline.
fn upgrade_chart() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("chart copy");
    let copy = Command::new("cp")
        .arg("-r")
        .arg(chart())
        .arg(dir.path().join("vibebox"))
        .status()
        .expect("cp");
    assert!(copy.success());
    let root = dir.path().join("vibebox");
    for (file, lookup, fake) in [
        (
            "templates/_helpers.tpl",
            "lookup \"v1\" \"Secret\" $root.Release.Namespace $a.name",
            "(get ($root.Values.fakeCluster | default dict) $a.name | default dict)",
        ),
        (
            "templates/pki.yaml",
            "lookup \"v1\" \"Secret\" .Release.Namespace $name",
            "(get (.Values.fakeCluster | default dict) $name | default dict)",
        ),
    ] {
        let path = root.join(file);
        let text = std::fs::read_to_string(&path).expect("template");
        assert_eq!(text.matches(lookup).count(), 1, "{file}: {lookup}");
        assert_eq!(text.matches("lookup ").count(), 1, "{file}: another lookup");
        std::fs::write(&path, text.replace(lookup, fake)).expect("template");
    }
    let path = root.join("values.schema.json");
    let mut schema: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("schema")).expect("json");
    schema["properties"]["fakeCluster"] = json!({"type": "object"});
    std::fs::write(&path, schema.to_string()).expect("schema");
    dir
}

fn render_upgrade(chart: &tempfile::TempDir, cluster: &Value) -> Result<Vec<Value>, String> {
    let values = json!({"fakeCluster": cluster}).to_string();
    let yaml = template_chart(&chart.path().join("vibebox"), &[], Some(&values))?;
    Ok(validated(yaml, &[], None))
}

/// The Secrets of a rendering as the cluster holds them after the install
/// (Helm marks what it manages), each passed through `edit`.
fn cluster_of(docs: &[Value], edit: impl Fn(&str, &mut Value)) -> Value {
    let mut cluster = serde_json::Map::new();
    for d in docs.iter().filter(|d| d["kind"] == "Secret") {
        let name = d["metadata"]["name"].as_str().unwrap().to_owned();
        let mut secret = d.clone();
        secret["metadata"]["annotations"]["meta.helm.sh/release-name"] = json!("rel");
        secret["metadata"]["annotations"]["meta.helm.sh/release-namespace"] = json!(NAMESPACE);
        edit(&name, &mut secret);
        cluster.insert(name, secret);
    }
    Value::Object(cluster)
}

fn checksum<'a>(docs: &'a [Value], component: &str) -> &'a Value {
    &workload(docs, component)["spec"]["template"]["metadata"]["annotations"]["checksum/tls"]
}

/// `openssl verify`: `leaf` chains to `ca` for TLS server and client use.
fn chains_to(ca: &[u8], leaf: &[u8]) -> bool {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("ca.pem"), ca).unwrap();
    std::fs::write(dir.path().join("leaf.pem"), leaf).unwrap();
    ["sslserver", "sslclient"].iter().all(|purpose| {
        Command::new("openssl")
            .args(["verify", "-purpose", purpose, "-CAfile"])
            .arg(dir.path().join("ca.pem"))
            .arg(dir.path().join("leaf.pem"))
            .output()
            .expect("openssl verify")
            .status
            .success()
    })
}

/// `helm upgrade` keeps what the install made; it issues anew only what
/// expires within the renewal window (or no longer names what the chart
/// would), with the CA that is in force, and only the pods using it roll.
#[test]
fn an_upgrade_keeps_the_pki_and_renews_only_what_expires() {
    let installed = render(&[]);
    let chart = upgrade_chart();
    let secrets: Vec<String> = installed
        .iter()
        .filter(|d| d["kind"] == "Secret")
        .map(|d| d["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    let same = |a: &[Value], b: &[Value], name: &str| {
        find(a, "Secret", name)["data"] == find(b, "Secret", name)["data"]
    };
    let components: Vec<&str> = SERVICES.iter().copied().chain(["dind"]).collect();

    // Nothing expires: the same Secrets, the same pods.
    let upgraded = render_upgrade(&chart, &cluster_of(&installed, |_, _| {})).expect("upgrade");
    for name in &secrets {
        assert!(same(&installed, &upgraded, name), "{name} changed");
    }
    for component in &components {
        assert_eq!(
            checksum(&installed, component),
            checksum(&upgraded, component),
            "{component}"
        );
    }

    // One certificate inside its renewal window: that one alone, signed by
    // the same CA; its pod alone rolls.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let soon = json!((now + 86_400).to_string());
    let upgraded = render_upgrade(
        &chart,
        &cluster_of(&installed, |name, s| {
            if name == "rel-vibebox-policy-tls" {
                s["metadata"]["annotations"]["vibebox.io/not-after"] = soon.clone();
            }
        }),
    )
    .expect("upgrade");
    for name in &secrets {
        assert_eq!(
            same(&installed, &upgraded, name),
            name != "rel-vibebox-policy-tls",
            "{name}"
        );
    }
    let renewed = chart_material(&upgraded, "rel-vibebox-policy-tls");
    assert_eq!(
        renewed.ca_pem,
        secret_bytes(&installed, "rel-vibebox-ca", "tls.crt")
    );
    assert!(chains_to(&renewed.ca_pem, &renewed.cert_pem));
    assert_eq!(renewed.identity().unwrap(), "policy");
    for component in &components {
        assert_eq!(
            checksum(&installed, component) == checksum(&upgraded, component),
            *component != "policy",
            "{component}"
        );
    }

    // The services CA inside its window: a new CA and all it signs; the
    // daemon's CA and certificates stay.
    let upgraded = render_upgrade(
        &chart,
        &cluster_of(&installed, |name, s| {
            if name == "rel-vibebox-ca" {
                s["metadata"]["annotations"]["vibebox.io/not-after"] = soon.clone();
            }
        }),
    )
    .expect("upgrade");
    let ca = secret_bytes(&upgraded, "rel-vibebox-ca", "tls.crt");
    assert_ne!(ca, secret_bytes(&installed, "rel-vibebox-ca", "tls.crt"));
    for service in SERVICES {
        let material = chart_material(&upgraded, &format!("rel-vibebox-{service}-tls"));
        assert_eq!(material.ca_pem, ca, "{service}");
        assert!(chains_to(&ca, &material.cert_pem), "{service}");
    }
    for name in [
        "rel-vibebox-dind-ca",
        "rel-vibebox-dind-tls",
        "rel-vibebox-dind-client-tls",
        "rel-vibebox-initial-admin",
    ] {
        assert!(same(&installed, &upgraded, name), "{name}");
    }

    // A certificate naming other hosts than the chart's (another subject) is
    // issued anew.
    let upgraded = render_upgrade(
        &chart,
        &cluster_of(&installed, |name, s| {
            if name == "rel-vibebox-gateway-tls" {
                s["metadata"]["annotations"]["vibebox.io/subject"] = json!("0000000000000000");
            }
        }),
    )
    .expect("upgrade");
    assert!(!same(&installed, &upgraded, "rel-vibebox-gateway-tls"));
    assert!(same(&installed, &upgraded, "rel-vibebox-identity-tls"));

    // A Secret of that name that the release did not make is refused,
    // naming the way out.
    let err = render_upgrade(
        &chart,
        &cluster_of(&installed, |name, s| {
            if name == "rel-vibebox-audit-tls" {
                s["metadata"]["annotations"]
                    .as_object_mut()
                    .unwrap()
                    .remove("meta.helm.sh/release-name");
            }
        }),
    )
    .expect_err("an operator's Secret was taken over");
    assert!(
        err.contains("rel-vibebox-audit-tls") && err.contains("tls.existingSecrets=true"),
        "{err}"
    );
}

// ---- The chart's PKI runs the platform ------------------------------------------

/// Serves the local Docker engine on 127.0.0.1 over TLS, demanding a client
/// certificate from the given CA, as `dockerd --tlsverify` of the daemon pod
/// does (OpenSSL, through Python's ssl module, stands in for Go's TLS
/// stack). Prints its port, then pumps bytes; exits when stdin closes.
const DOCKER_TLS_ENDPOINT: &str = r#"
import asyncio, os, ssl, sys, threading
ca, cert, key = sys.argv[1:4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.load_verify_locations(ca)
ctx.verify_mode = ssl.CERT_REQUIRED
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()

async def pump(reader, writer, half_close):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if half_close and writer.can_write_eof():
            writer.write_eof()
            return
    except (OSError, ssl.SSLError):
        pass
    writer.close()

async def handle(reader, writer):
    try:
        er, ew = await asyncio.open_unix_connection("/var/run/docker.sock")
    except OSError:
        writer.close()
        return
    await asyncio.gather(pump(reader, ew, True), pump(er, writer, False))

async def main():
    # A refused handshake is the point of some calls: no traceback for it.
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"#;

/// One container of a rendered pod, run as a local process: its volumes
/// written under `root` (Secrets and ConfigMaps with their items, empty
/// directories for claims and emptyDirs), its environment with every mount
/// path moved there.
struct LocalPod {
    env: Vec<(String, String)>,
    mounts: Vec<(String, PathBuf)>,
}

impl LocalPod {
    fn materialize(docs: &[Value], pod: &Value, root: &Path) -> LocalPod {
        let c = &pod["containers"][0];
        let mut mounts = Vec::new();
        for m in c["volumeMounts"].as_array().expect("volumeMounts") {
            let mount_path = m["mountPath"].as_str().unwrap().to_owned();
            let dir = root.join(mount_path.trim_start_matches('/'));
            std::fs::create_dir_all(&dir).expect("mount dir");
            // No pod volume of that name: a StatefulSet's claim (empty).
            let volume = pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == m["name"])
                .unwrap_or(&Value::Null);
            let files: Vec<(String, Vec<u8>)> =
                if let Some(name) = volume["secret"]["secretName"].as_str() {
                    let secret = docs
                        .iter()
                        .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == name);
                    match secret {
                        Some(secret) => secret["data"]
                            .as_object()
                            .unwrap()
                            .iter()
                            .map(|(k, v)| {
                                let bytes = base64::engine::general_purpose::STANDARD
                                    .decode(v.as_str().unwrap())
                                    .expect("base64");
                                (k.clone(), bytes)
                            })
                            .collect(),
                        None => {
                            assert_eq!(
                                volume["secret"]["optional"], true,
                                "Secret {name} is not rendered"
                            );
                            Vec::new()
                        }
                    }
                } else if let Some(name) = volume["configMap"]["name"].as_str() {
                    find(docs, "ConfigMap", name)["data"]
                        .as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().as_bytes().to_vec()))
                        .collect()
                } else {
                    Vec::new()
                };
            let source = if volume["secret"].is_null() {
                &volume["configMap"]
            } else {
                &volume["secret"]
            };
            for (key, bytes) in files {
                let path = match source["items"].as_array() {
                    None => Some(key.clone()),
                    Some(items) => items
                        .iter()
                        .find(|i| i["key"] == key.as_str())
                        .map(|i| i["path"].as_str().unwrap().to_owned()),
                };
                if let Some(path) = path {
                    std::fs::write(dir.join(path), bytes).expect("writing a volume file");
                }
            }
            mounts.push((mount_path, dir));
        }
        // Longest mount path first: /etc/vibebox/tls before /etc.
        mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        let mut pod = LocalPod {
            env: Vec::new(),
            mounts,
        };
        for e in c["env"].as_array().expect("env") {
            let name = e["name"].as_str().unwrap().to_owned();
            let value = e["value"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: only literal values with no value set"));
            let value = pod.local_path(value);
            pod.env.push((name, value));
        }
        pod
    }

    /// `path` (inside the pod) on this machine.
    fn local_path(&self, path: &str) -> String {
        for (mount, dir) in &self.mounts {
            if path == mount {
                return dir.display().to_string();
            }
            if let Some(rest) = path.strip_prefix(&format!("{mount}/")) {
                return dir.join(rest).display().to_string();
            }
        }
        path.to_owned()
    }

    fn env(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn set_env(&mut self, name: &str, value: String) {
        match self.env.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = value,
            None => self.env.push((name.to_owned(), value)),
        }
    }

    /// A command with exactly this pod's environment (and PATH, HOME).
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear();
        for keep in ["PATH", "HOME"] {
            if let Some(v) = std::env::var_os(keep) {
                cmd.env(keep, v);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }
}

/// The processes of the test; killed (and their Docker objects removed) on drop.
struct Running {
    children: Vec<(String, Child)>,
    logs: PathBuf,
    installation: String,
}

impl Running {
    fn log_tail(&self, name: &str) -> String {
        let text =
            std::fs::read_to_string(self.logs.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn spawn(&mut self, name: &str, mut cmd: Command) {
        let log = std::fs::File::create(self.logs.join(format!("{name}.log"))).expect("log");
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        self.children.push((name.to_owned(), child));
    }

    fn exited(&mut self, name: &str) -> Option<std::process::ExitStatus> {
        let (_, child) = self.children.iter_mut().find(|(n, _)| n == name)?;
        child.try_wait().ok().flatten()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let filter = format!("label=vibebox.installation={}", self.installation);
        for (what, rm) in [
            (["ps", "-aq"], vec!["rm", "-f", "-v"]),
            (["network", "ls"], vec!["network", "rm"]),
            (["volume", "ls"], vec!["volume", "rm", "-f"]),
        ] {
            let mut list = Command::new("docker");
            list.args(what);
            if what[0] != "ps" {
                list.arg("-q");
            }
            let Ok(out) = list.args(["--filter", &filter]).output() else {
                continue;
            };
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker").args(&rm).arg(id).output();
            }
        }
    }
}

fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("ephemeral port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
}

/// The rendered readiness probe of a service's pod, run with that pod's
/// environment (the image's `vibebox-health-probe` and the chart's
/// certificate), against the local port.
fn probe(pod: &Value, local: &LocalPod, service: &str, port: u16) -> Result<(), String> {
    let c = &pod["containers"][0];
    let mut cmd = local.command(&binary("vibebox-health-probe"));
    if service == "gateway" {
        // The kubelet's gRPC probe on the plaintext port.
        assert_eq!(c["readinessProbe"]["grpc"]["port"], 7700);
        cmd.args(["--url", &format!("http://127.0.0.1:{port}")]);
    } else {
        let rendered = strings(&c["readinessProbe"]["exec"]["command"]);
        assert_eq!(rendered[0], "/usr/local/bin/vibebox-health-probe");
        for arg in &rendered[1..] {
            match arg.strip_prefix("https://127.0.0.1:") {
                Some(_) => cmd.arg(format!("https://127.0.0.1:{port}")),
                None => cmd.arg(arg),
            };
        }
    }
    let out = cmd.output().expect("running the health probe");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

async fn health(channel: tonic::transport::Channel) -> Result<ServingStatus, tonic::Status> {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(response.into_inner().status())
}

fn mtls_channel(
    port: u16,
    material: &TlsMaterial,
    domain: Option<&str>,
) -> tonic::transport::Channel {
    let mut tls = material.client_config();
    if let Some(domain) = domain {
        tls = tls.domain_name(domain);
    }
    tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .tls_config(tls)
        .expect("tls config")
        .connect_lazy()
}

/// The certificates a release with no value makes run the five services:
/// each process gets exactly its rendered pod's files (the Secrets it
/// mounts, the policy ConfigMap) and environment (certificate paths, peer
/// URLs, the admin password file, Docker's TLS material), only addresses
/// moved to loopback. Their mutual-TLS calls succeed; the rendered health
/// probes pass; a certificate naming another service, one of the daemon's
/// CA and one of a foreign CA are refused; the in-cluster DNS names verify;
/// the generated admin password logs in; the policy document is the one
/// from the ConfigMap; and an environment is created through the gateway on
/// a Docker endpoint that demands the chart's daemon client certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_made_certificates_run_the_platform_over_mutual_tls() {
    // The PKI and every pod of a release with no value; the policy pod and
    // its ConfigMap of one with a policy document (the PKI is the same code).
    let docs = render(&[]);
    let values = format!(
        "policy:\n  document: {}\n",
        serde_json::to_string(POLICY_DOCUMENT).unwrap()
    );
    let with_policy = render_values(&[], Some(&values));
    let mut files: Vec<Value> = docs.clone();
    files.push(find(&with_policy, "ConfigMap", "rel-vibebox-policy").clone());
    let image = dev_image();

    let scratch = tempfile::tempdir().expect("scratch");
    let root = scratch.path().canonicalize().expect("canonical");
    std::fs::create_dir_all(root.join("logs")).unwrap();
    let mut running = Running {
        children: Vec::new(),
        logs: root.join("logs"),
        installation: format!("chart-pki-{}", uuid::Uuid::new_v4().simple()),
    };

    // The daemon pod's side: its server certificate, behind a TLS endpoint
    // in front of the local engine.
    let dind = LocalPod::materialize(&docs, pod_spec(&docs, "dind"), &root.join("dind"));
    let dind_args = strings(&pod_spec(&docs, "dind")["containers"][0]["args"]);
    let flag = |name: &str| -> String {
        let value = dind_args
            .iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("dockerd has no --{name}"));
        dind.local_path(value)
    };
    let mut endpoint = Command::new(tool("python3"));
    endpoint
        .args(["-c", DOCKER_TLS_ENDPOINT])
        .args([flag("tlscacert"), flag("tlscert"), flag("tlskey")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut endpoint = endpoint.spawn().expect("Docker TLS endpoint");
    let docker_port: u16 = {
        use std::io::BufRead as _;
        let mut line = String::new();
        std::io::BufReader::new(endpoint.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("endpoint port");
        line.trim().parse().expect("port")
    };
    running.children.push(("docker-endpoint".into(), endpoint));

    // The five services, in the order their peers need them.
    let ports: BTreeMap<&str, u16> = SERVICES.iter().copied().zip(free_ports(5)).collect();
    let mut pods: BTreeMap<&str, LocalPod> = BTreeMap::new();
    for service in ["audit", "identity", "policy", "orchestrator", "gateway"] {
        let source = if service == "policy" {
            &with_policy
        } else {
            &docs
        };
        let spec = pod_spec(source, service);
        let mut pod = LocalPod::materialize(&files, spec, &root.join(service));
        let listen = pod
            .env("VIBEBOX_LISTEN")
            .expect("VIBEBOX_LISTEN")
            .to_owned();
        assert_eq!(
            listen,
            format!(
                "0.0.0.0:{}",
                spec["containers"][0]["ports"][0]["containerPort"]
            )
        );
        pod.set_env("VIBEBOX_LISTEN", format!("127.0.0.1:{}", ports[service]));
        for peer in SERVICES {
            let key = format!("VIBEBOX_{}_URL", peer.to_uppercase());
            if let Some(url) = pod.env(&key) {
                assert!(
                    url.starts_with(&format!("https://rel-vibebox-{peer}:")),
                    "{service}: {url}"
                );
                pod.set_env(&key, format!("https://127.0.0.1:{}", ports[peer]));
            }
        }
        if service == "orchestrator" {
            assert_eq!(pod.env("DOCKER_HOST"), Some("tcp://rel-vibebox-dind:2376"));
            pod.set_env("DOCKER_HOST", format!("tcp://127.0.0.1:{docker_port}"));
            pod.set_env("VIBEBOX_INSTALLATION_ID", running.installation.clone());
        }
        if service == "gateway" {
            pod.set_env("VIBEBOX_METRICS_LISTEN", "127.0.0.1:0".into());
        }
        running.spawn(service, pod.command(&binary(&format!("vibebox-{service}"))));
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            match probe(spec, &pod, service, ports[service]) {
                Ok(()) => break,
                Err(e) => {
                    if let Some(status) = running.exited(service) {
                        panic!(
                            "vibebox-{service} exited ({status}):\n{}",
                            running.log_tail(service)
                        );
                    }
                    assert!(
                        Instant::now() < deadline,
                        "vibebox-{service} not healthy in 90 s ({e}):\n{}",
                        running.log_tail(service)
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        pods.insert(service, pod);
    }

    // Mutual TLS with the chart's certificates, under the in-cluster names
    // the peers use (rel-vibebox-<service>, the Service's DNS name).
    let gateway_cert = chart_material(&docs, "rel-vibebox-gateway-tls");
    for service in ["identity", "policy", "orchestrator", "audit"] {
        let name = format!("rel-vibebox-{service}");
        let status = health(mtls_channel(ports[service], &gateway_cert, Some(&name)))
            .await
            .unwrap_or_else(|e| panic!("{service} as {name}: {e}"));
        assert_eq!(status, ServingStatus::Serving, "{service}");
        let svc = format!("{name}.{NAMESPACE}.svc");
        health(mtls_channel(ports[service], &gateway_cert, Some(&svc)))
            .await
            .unwrap_or_else(|e| panic!("{service} as {svc}: {e}"));
    }

    // Identity answers the gateway's certificate; another service's chart
    // certificate names that service and is refused by name.
    let identity_port = ports["identity"];
    let as_gateway = IdentityServiceClient::new(mtls_channel(identity_port, &gateway_cert, None))
        .who_am_i(WhoAmIRequest {})
        .await
        .expect_err("no token");
    assert_ne!(as_gateway.code(), Code::PermissionDenied, "{as_gateway:?}");
    for caller in ["policy", "orchestrator", "audit"] {
        let material = chart_material(&docs, &format!("rel-vibebox-{caller}-tls"));
        let refused = IdentityServiceClient::new(mtls_channel(identity_port, &material, None))
            .who_am_i(WhoAmIRequest {})
            .await
            .expect_err("refused");
        assert_eq!(
            refused.code(),
            Code::PermissionDenied,
            "{caller}: {refused:?}"
        );
        assert!(
            refused.message().contains(&format!("\"{caller}\"")),
            "{caller}: {refused:?}"
        );
    }
    // The daemon's client certificate (CN orchestrator, but of the Docker
    // CA) is no service identity; nor is a foreign CA's "gateway".
    let dind_client = chart_material(&docs, "rel-vibebox-dind-client-tls");
    let foreign = vibebox_server_kit::pki::foreign_material("gateway").expect("foreign");
    for (who, cert_pem, key_pem) in [
        (
            "the daemon's client certificate",
            dind_client.cert_pem.clone(),
            dind_client.key_pem.clone(),
        ),
        ("a foreign CA's gateway", foreign.cert_pem, foreign.key_pem),
    ] {
        let material = TlsMaterial {
            ca_pem: gateway_cert.ca_pem.clone(),
            cert_pem,
            key_pem,
        };
        for service in ["identity", "orchestrator"] {
            let refused = IdentityServiceClient::new(mtls_channel(ports[service], &material, None))
                .who_am_i(WhoAmIRequest {})
                .await
                .expect_err("refused");
            // Refused in the handshake: the call never reaches the service
            // (tonic reports the closed connection as one of these).
            assert!(
                matches!(
                    refused.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ),
                "{service} accepted {who}: {refused:?}"
            );
        }
    }
    // The daemon's endpoint takes its own client certificate only.
    let docker_dir = pods["orchestrator"]
        .env("DOCKER_CERT_PATH")
        .map(PathBuf::from)
        .expect("DOCKER_CERT_PATH");
    let connect = |key: &Path, cert: &Path| {
        bollard::Docker::connect_with_ssl(
            &format!("tcp://127.0.0.1:{docker_port}"),
            key,
            cert,
            &docker_dir.join("ca.pem"),
            20,
            bollard::API_DEFAULT_VERSION,
        )
        .expect("Docker client")
    };
    connect(&docker_dir.join("key.pem"), &docker_dir.join("cert.pem"))
        .ping()
        .await
        .expect("the orchestrator's Docker client certificate is accepted");
    let gateway_dir = PathBuf::from(pods["gateway"].env("VIBEBOX_TLS_CERT").unwrap())
        .parent()
        .unwrap()
        .to_owned();
    assert!(
        connect(&gateway_dir.join("tls.key"), &gateway_dir.join("tls.crt"))
            .ping()
            .await
            .is_err(),
        "a service certificate opened the Docker daemon"
    );

    // Through the gateway: the generated first-admin password logs in.
    let gateway =
        vibebox_server_kit::connect_plaintext(&format!("http://127.0.0.1:{}", ports["gateway"]))
            .expect("gateway channel");
    let password =
        String::from_utf8(secret_bytes(&docs, "rel-vibebox-initial-admin", "password")).unwrap();
    assert!(
        password.len() >= 12,
        "identity accepts 12 characters and more"
    );
    let admin = IdentityServiceClient::new(gateway.clone())
        .login(LoginRequest {
            username: "admin".into(),
            password,
        })
        .await
        .expect("admin logs in with the chart's password")
        .into_inner()
        .token;
    let identity =
        |token: &str| IdentityServiceClient::with_interceptor(gateway.clone(), bearer(token));
    // The policy in force is the ConfigMap's document.
    let policy = PolicyServiceClient::with_interceptor(gateway.clone(), bearer(&admin))
        .get_policy(GetPolicyRequest {})
        .await
        .expect("GetPolicy")
        .into_inner();
    assert_eq!(policy.policy_version, "chart-pki-test");

    // An environment, created through every service and the daemon's TLS.
    let team = identity(&admin)
        .create_team(CreateTeamRequest {
            request_id: String::new(),
            name: "chart".into(),
            display_name: "chart".into(),
        })
        .await
        .expect("create team")
        .into_inner()
        .team
        .expect("team")
        .id;
    let user = identity(&admin)
        .create_user(CreateUserRequest {
            request_id: String::new(),
            username: "chartdev".into(),
            display_name: "chartdev".into(),
            password: "chartdev-password-123".into(),
            platform_role: PlatformRole::None as i32,
        })
        .await
        .expect("create user")
        .into_inner()
        .user
        .expect("user");
    identity(&admin)
        .add_team_member(AddTeamMemberRequest {
            team_id: team.clone(),
            user_id: user.id,
            role: TeamRole::Developer as i32,
        })
        .await
        .expect("add member");
    let dev = identity("")
        .login(LoginRequest {
            username: "chartdev".into(),
            password: "chartdev-password-123".into(),
        })
        .await
        .expect("login")
        .into_inner()
        .token;
    let mut environments =
        EnvironmentServiceClient::with_interceptor(gateway.clone(), bearer(&dev));
    let env = environments
        .create_settled(CreateEnvironmentRequest {
            labels: Default::default(),
            request_id: "chart-pki-1".into(),
            team_id: team,
            name: "chart".into(),
            spec: Some(ContainerSpec {
                image: image.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect("create");
    assert_eq!(
        env.state(),
        EnvironmentState::Running,
        "{env:?}\n{}",
        running.log_tail("orchestrator")
    );
    let deleted = environments.delete_settled(&env.id).await.expect("delete");
    assert_eq!(deleted.state(), EnvironmentState::Deleted);
    drop(running);
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
    let has_env = |pod: &Value| env_value(&pod["containers"][0], ENV).cloned();
    // Identity alone mounts the password Secret, read-only, as the file it is
    // told of; `key` is the Secret's key.
    let check = |docs: &[Value], secret: &str, key: &str| {
        for service in SERVICES.iter().filter(|s| **s != "identity") {
            let pod = pod_spec(docs, service);
            assert!(has_env(pod).is_none(), "{service} gets no password");
            assert!(
                !pod["volumes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|v| v["secret"]["secretName"] == secret),
                "{service} mounts no password"
            );
        }
        let pod = pod_spec(docs, "identity");
        let file = has_env(pod).expect("identity is told the file")["value"]
            .as_str()
            .unwrap()
            .to_owned();
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["secret"]["secretName"] == secret)
            .expect("the Secret is a volume");
        assert_eq!(volume["secret"]["items"][0]["key"], key);
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
    };
    // By default the chart makes the password (32 random characters) and
    // keeps it when the release goes, like the volumes of the database.
    let docs = render(&[]);
    check(&docs, "rel-vibebox-initial-admin", "password");
    let secret = find(&docs, "Secret", "rel-vibebox-initial-admin");
    assert_eq!(
        secret["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    assert_eq!(
        secret_bytes(&docs, "rel-vibebox-initial-admin", "password").len(),
        32
    );
    let text = notes(&json!({}));
    assert!(
        text.contains("get secret rel-vibebox-initial-admin -o jsonpath='{.data.password}'")
            && text
                .contains("vibebox login http://localhost:7700 --username admin --password-stdin"),
        "{text}"
    );
    // The operator's own Secret, under its key.
    let docs = render(&[
        "identity.bootstrapAdminPassword.existingSecret=admin-pw",
        "identity.bootstrapAdminPassword.key=pw",
    ]);
    check(&docs, "admin-pw", "pw");
    assert!(
        !docs
            .iter()
            .any(|d| d["metadata"]["name"] == "rel-vibebox-initial-admin")
    );
    assert!(notes(&json!({"identity": {"bootstrapAdminPassword": {"existingSecret": "admin-pw", "key": "pw"}}}))
        .contains("get secret admin-pw -o jsonpath='{.data.pw}'"));
    // Neither: nobody is given a password file; NOTES read the token file.
    let docs = render(&["identity.bootstrapAdminPassword.generate=false"]);
    for service in SERVICES {
        assert!(has_env(pod_spec(&docs, service)).is_none(), "{service}");
    }
    assert!(
        notes(&json!({"identity": {"bootstrapAdminPassword": {"generate": false}}}))
            .contains("/data/admin.token")
    );
    // And the identity binary reads that variable.
    let help = Command::new(binary("vibebox-identity"))
        .arg("--help")
        .output()
        .expect("vibebox-identity --help");
    assert!(
        String::from_utf8_lossy(&help.stdout).contains(ENV),
        "vibebox-identity does not read {ENV}"
    );
}
