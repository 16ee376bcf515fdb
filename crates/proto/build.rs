//! Compiles `proto/**/*.proto` with the pure-Rust protox compiler, so that
//! `cargo build` needs no `protoc`.

use std::path::{Path, PathBuf};

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let root = root.canonicalize().expect("proto directory");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut files = Vec::new();
    collect(&root, &mut files);
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let relative: Vec<_> = files
        .iter()
        .map(|f| f.strip_prefix(&root).expect("under proto/").to_path_buf())
        .collect();
    let fds = protox::compile(&relative, [&root]).expect("compiling protos");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(
        out.join("vibebox_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )
    .expect("writing descriptor set");
    tonic_prost_build::configure()
        // Deterministic encoding: maps as BTreeMap so that the same spec always
        // encodes to the same bytes (the clearance binds a digest of them).
        .btree_map(".")
        .compile_fds(fds)
        .expect("generating code");
}
