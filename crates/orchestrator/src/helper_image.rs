//! The platform's helper image: the running VibeBox executable and the
//! shared libraries it has loaded, imported into the engine as
//! `vibebox/helper:<version>-<fingerprint>`. Egress gates and port-forward
//! helpers run from it (`/vibebox-gate gate ...`, see `vibebox_gate`).
//!
//! Built from what runs, not pulled: there is no registry to trust, the
//! image is exactly the code the orchestrator is (so the gate and the
//! orchestrator always agree on the gate's protocol), and it works the same
//! against a local engine and a remote Docker-in-Docker daemon (the body of
//! a `docker import` goes over the API). The fingerprint covers the
//! executable's size, modification time and inode, so a rebuilt binary gets
//! a new image and a second orchestrator of the same build reuses it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use bollard::Docker;
use bollard::query_parameters::CreateImageOptionsBuilder;
use futures::StreamExt;

/// Repository of the helper image.
pub const REPOSITORY: &str = "vibebox/helper";

/// Building the helper image failed.
#[derive(Debug, thiserror::Error)]
pub enum HelperImageError {
    #[error("reading the running executable: {0}")]
    Io(#[from] std::io::Error),
    #[error("importing the helper image: {0}")]
    Docker(#[from] bollard::errors::Error),
}

/// The running executable (the default content of the helper image).
pub fn running_executable() -> std::io::Result<PathBuf> {
    std::fs::read_link("/proc/self/exe").or_else(|_| std::env::current_exe())
}

/// The reference the helper image of `exe` has.
pub fn reference(exe: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(exe)?;
    let mut h = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut h, &meta.len().to_le_bytes());
    std::hash::Hasher::write(&mut h, &meta.mtime().to_le_bytes());
    std::hash::Hasher::write(&mut h, &meta.mtime_nsec().to_le_bytes());
    std::hash::Hasher::write(&mut h, &meta.ino().to_le_bytes());
    let fp = std::hash::Hasher::finish(&h);
    Ok(format!(
        "{REPOSITORY}:{}-{fp:016x}",
        env!("CARGO_PKG_VERSION")
    ))
}

/// Makes sure the helper image of `exe` (a VibeBox executable that calls
/// `vibebox_gate::dispatch`) exists; its reference.
pub async fn ensure(docker: &Docker, exe: &Path) -> Result<String, HelperImageError> {
    let reference = reference(exe)?;
    if docker.inspect_image(&reference).await.is_ok() {
        return Ok(reference);
    }
    let exe = exe.to_path_buf();
    let tarball = tokio::task::spawn_blocking(move || rootfs(&exe))
        .await
        .map_err(|e| HelperImageError::Io(std::io::Error::other(e.to_string())))??;
    let (repo, tag) = reference.split_once(':').expect("reference has a tag");
    let options = CreateImageOptionsBuilder::new()
        .from_src("-")
        .repo(repo)
        .tag(tag)
        .changes(vec![
            format!("ENTRYPOINT [\"{}\"]", vibebox_gate::EXECUTABLE),
            "LABEL vibebox.managed=true vibebox.role=helper-image".to_string(),
        ])
        .build();
    let mut import = docker.create_image(
        Some(options),
        Some(bollard::body_full(tarball.into())),
        None,
    );
    while let Some(step) = import.next().await {
        step?;
    }
    docker.inspect_image(&reference).await?;
    tracing::info!(%reference, "helper image imported");
    prune_other_builds(docker, &reference).await;
    Ok(reference)
}

/// Removes the helper images of other builds that no container uses (the
/// engine refuses to remove one in use; an installation whose image went
/// away imports its own again). Keeps the engine's disk bounded across
/// upgrades and rebuilds.
async fn prune_other_builds(docker: &Docker, keep: &str) {
    use bollard::query_parameters::{ListImagesOptionsBuilder, RemoveImageOptionsBuilder};
    let filters =
        std::collections::HashMap::from([("reference".to_string(), vec![REPOSITORY.to_string()])]);
    let Ok(images) = docker
        .list_images(Some(
            ListImagesOptionsBuilder::new().filters(&filters).build(),
        ))
        .await
    else {
        return;
    };
    for tag in images
        .into_iter()
        .flat_map(|i| i.repo_tags)
        .filter(|t| t != keep && t.starts_with(&format!("{REPOSITORY}:")))
    {
        let options = RemoveImageOptionsBuilder::new().force(false).build();
        if docker.remove_image(&tag, Some(options), None).await.is_ok() {
            tracing::info!(image = %tag, "removed the helper image of another build");
        }
    }
}

/// The shared objects this process has mapped.
fn mapped_libraries() -> BTreeSet<PathBuf> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.starts_with('/') && p.contains(".so"))
        .map(PathBuf::from)
        .collect()
}

/// The program interpreter (dynamic loader) named in an ELF executable.
fn interpreter(elf: &[u8]) -> Option<String> {
    // 64-bit little-endian ELF only (what we build for).
    if elf.get(..4)? != b"\x7fELF" || elf.get(4)? != &2 || elf.get(5)? != &1 {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let kind = u32::from_le_bytes(elf.get(ph..ph + 4)?.try_into().ok()?);
        if kind == 3 {
            let off = usize::try_from(u64_at(ph + 8)?).ok()?;
            let size = usize::try_from(u64_at(ph + 32)?).ok()?;
            let raw = elf.get(off..off + size)?;
            let raw = raw.split(|b| *b == 0).next()?;
            return String::from_utf8(raw.to_vec()).ok();
        }
    }
    None
}

/// The root filesystem of the helper image, as a tarball.
fn rootfs(exe: &Path) -> Result<Vec<u8>, HelperImageError> {
    let exe = std::fs::read(exe)?;
    let mut files: Vec<(PathBuf, PathBuf)> = Vec::new();
    let libs = mapped_libraries();
    for lib in &libs {
        files.push((lib.clone(), lib.clone()));
        // The loader's default directories, whatever the host's layout
        // (merged /usr or not, multiarch or not).
        if let Some(name) = lib.file_name() {
            for dir in ["/lib", "/usr/lib", "/lib64"] {
                files.push((Path::new(dir).join(name), lib.clone()));
            }
            if let Some(parent) = lib.parent().and_then(Path::file_name) {
                for dir in ["/lib", "/usr/lib"] {
                    files.push((Path::new(dir).join(parent).join(name), lib.clone()));
                }
            }
        }
    }
    if let Some(interp) = interpreter(&exe) {
        let source = libs
            .iter()
            .find(|l| l.file_name() == Path::new(&interp).file_name())
            .cloned()
            .unwrap_or_else(|| PathBuf::from(&interp));
        files.push((PathBuf::from(interp), source));
    }
    let mut builder = tar::Builder::new(Vec::with_capacity(exe.len() + (16 << 20)));
    let mut seen = BTreeSet::new();
    let mut dirs = BTreeSet::new();
    let mut append = |builder: &mut tar::Builder<Vec<u8>>,
                      path: &Path,
                      data: &[u8],
                      mode: u32|
     -> std::io::Result<()> {
        let rel = path.strip_prefix("/").unwrap_or(path);
        if !seen.insert(rel.to_path_buf()) {
            return Ok(());
        }
        let mut ancestors: Vec<&Path> = rel.ancestors().skip(1).collect();
        ancestors.reverse();
        for dir in ancestors {
            if dir.as_os_str().is_empty() || !dirs.insert(dir.to_path_buf()) {
                continue;
            }
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_mtime(0);
            builder.append_data(&mut h, dir, std::io::empty())?;
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        builder.append_data(&mut h, rel, data)
    };
    append(
        &mut builder,
        Path::new(vibebox_gate::EXECUTABLE),
        &exe,
        0o755,
    )?;
    for (at, source) in files {
        let data = std::fs::read(&source)?;
        append(&mut builder, &at, &data, 0o755)?;
    }
    Ok(builder.into_inner()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_test_binary_names_its_loader() {
        let path = running_executable().unwrap();
        let exe = std::fs::read(&path).unwrap();
        let interp = interpreter(&exe).expect("a dynamically linked test binary");
        assert!(interp.contains("ld-linux"), "{interp}");
        assert!(interpreter(b"not an elf").is_none());
        assert!(
            mapped_libraries()
                .iter()
                .any(|l| l.to_string_lossy().contains("libc"))
        );
        assert!(reference(&path).unwrap().starts_with("vibebox/helper:"));
    }
}
