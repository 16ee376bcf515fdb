//! Decisions per second of the evaluation engine for a typical allowed spec
//! and a typical denied one (criterion reports `thrpt` in decisions/s).
//! Run with `cargo bench -p vibebox-policy`.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vibebox_policy::{Policy, evaluate};
use vibebox_proto::environment::{ContainerSpec, Mount, MountType};

fn allowed() -> ContainerSpec {
    ContainerSpec {
        image: "python:3.12".into(),
        command: vec!["sleep".into(), "infinity".into()],
        env: BTreeMap::from([
            ("LANG".into(), "C.UTF-8".into()),
            ("TERM".into(), "xterm".into()),
        ]),
        working_dir: "/workspace".into(),
        labels: BTreeMap::from([("project".into(), "demo".into())]),
        cpu_limit: Some(1.0),
        memory_limit_mb: Some(2048),
        mounts: vec![Mount {
            r#type: MountType::Volume as i32,
            source: "cache".into(),
            target: "/cache".into(),
            read_only: false,
            size_mb: None,
        }],
        ..Default::default()
    }
}

fn denied() -> ContainerSpec {
    ContainerSpec {
        image: "docker:24-dind".into(),
        privileged: true,
        mounts: vec![Mount {
            r#type: MountType::Bind as i32,
            source: "/var/run/docker.sock".into(),
            target: "/var/run/docker.sock".into(),
            read_only: false,
            size_mb: None,
        }],
        ..allowed()
    }
}

fn bench(c: &mut Criterion) {
    let policy = Policy::builtin();
    let rules = policy.rules_for("");
    let mut group = c.benchmark_group("decisions");
    group.throughput(Throughput::Elements(1));
    let spec = allowed();
    assert!(evaluate(rules, &spec).allowed());
    group.bench_function("allowed_spec", |b| {
        b.iter(|| evaluate(rules, black_box(&spec)))
    });
    let spec = denied();
    assert!(!evaluate(rules, &spec).allowed());
    group.bench_function("denied_spec", |b| {
        b.iter(|| evaluate(rules, black_box(&spec)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
