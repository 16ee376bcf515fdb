//! `vibebox env cp SRC DST`: files and directories into and out of an
//! environment, like `docker cp` and `kubectl cp`. One side is `ENV:/path`
//! (ENV an id or a name, the path absolute inside the environment); the
//! other a local path, or `-` for a tar archive on stdin or stdout.
//!
//! Where things land (as `docker cp`):
//! - `cp ./dir ENV:/tmp` makes `/tmp/dir` when `/tmp` is a directory, and
//!   `/tmp` itself (with the contents of `./dir`) when it does not exist;
//!   `./dir/.` copies the contents of `./dir` into the destination;
//! - `cp ENV:/tmp/dir ./out` makes `./out` when it does not exist and
//!   `./out/dir` when it is a directory (`ENV:/tmp/dir/.`: the contents);
//! - a file replaces a file of the same name.
//!
//! Archives are built and unpacked with the `tar` crate in blocking tasks,
//! streamed through bounded channels in 256 KiB messages. A copy out is
//! received whole into an unnamed spool file beside its destination before
//! anything is unpacked, so a copy the platform refuses or a broken stream
//! leaves nothing behind; the environment side does the same for a copy in.
//! Unpacking never goes through a symbolic link below the destination, one
//! of the archive (its root included) or one already on disk (say, left by
//! an earlier copy): such an entry stops the copy there, with an error (the
//! entries before it stay). A progress bar shows on stderr when it is a
//! terminal.

use std::collections::HashSet;
use std::io::{IsTerminal, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Args;
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;
use vibebox_proto::environment::{CopyFromRequest, CopyToRequest, CopyToStart, copy_to_request};

use crate::client::{CallError, CallExt, Session};
use crate::cmd::env::resolve_env;

/// Size of the messages sent (the platform accepts up to 1 MiB).
const CHUNK: usize = 256 * 1024;

#[derive(Args, Debug)]
pub(crate) struct CpArgs {
    /// Follow SRC when it is a local symbolic link (copy what it points to).
    #[arg(short = 'L', long)]
    follow_link: bool,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
    /// What to copy: a local path, `-` (a tar archive on stdin) or ENV:/path.
    src: String,
    /// Where to: a local path, `-` (the tar archive to stdout) or ENV:/path.
    dst: String,
}

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    /// `-`: a tar archive on stdin or stdout.
    Stdio,
    Local(String),
    /// `ENV:/path`.
    Remote {
        env: String,
        path: String,
    },
}

/// Reads one side: `-`, `ENV:/path` (ENV without `/`), or a local path
/// (write `./a:b` for a local name with a colon).
fn location(arg: &str) -> Result<Location> {
    if arg == "-" {
        return Ok(Location::Stdio);
    }
    if let Some((env, path)) = arg.split_once(':')
        && !env.is_empty()
        && !env.contains('/')
    {
        if !path.starts_with('/') {
            bail!(
                "{arg:?}: the path inside the environment must be absolute ({env}:/path); \
                 write ./{arg} for a local file"
            );
        }
        return Ok(Location::Remote {
            env: env.to_owned(),
            path: path.to_owned(),
        });
    }
    if arg.is_empty() {
        bail!("an empty path");
    }
    Ok(Location::Local(arg.to_owned()))
}

/// `vibebox env cp`.
pub(crate) async fn run(a: CpArgs, session: &Session) -> Result<ExitCode> {
    let (src, dst) = (location(&a.src)?, location(&a.dst)?);
    let show = !a.quiet && std::io::stderr().is_terminal();
    let bytes = match (src, dst) {
        (Location::Remote { .. }, Location::Remote { .. }) => {
            bail!(
                "copying from one environment to another is not supported: copy to a local path first"
            )
        }
        (Location::Remote { env, path }, dst) => {
            let id = resolve_env(session, &env).await?;
            copy_out(session, &id, &path, &dst, show).await?
        }
        (src, Location::Remote { env, path }) => {
            let id = resolve_env(session, &env).await?;
            copy_in(session, &id, &src, &path, a.follow_link, show).await?
        }
        _ => bail!(
            "one of SRC and DST must be ENV:/path (an environment and an absolute path in it)"
        ),
    };
    if show {
        eprintln!("copied {} to {}", human(bytes), a.dst);
    }
    Ok(ExitCode::SUCCESS)
}

fn human(bytes: u64) -> String {
    let mut value = bytes as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if value < 1024.0 || unit == "GiB" {
            return if unit == "B" {
                format!("{bytes} B")
            } else {
                format!("{value:.1} {unit}")
            };
        }
        value /= 1024.0;
    }
    format!("{bytes} B")
}

/// A progress bar on stderr (hidden unless shown).
fn progress(show: bool, total: Option<u64>, message: String) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let (bar, template) = match total {
        Some(total) => (
            ProgressBar::new(total),
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        ),
        None => (
            ProgressBar::new_spinner(),
            "{spinner} {msg} {bytes} {bytes_per_sec}",
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message);
    bar
}

/// The last component of a path inside the environment (`None` for `/`).
fn remote_name(path: &str) -> Option<String> {
    path.split('/')
        .rfind(|p| !p.is_empty() && *p != ".")
        .map(str::to_owned)
}

/// Splits a path inside the environment into its directory and last name.
fn remote_split(path: &str) -> Option<(String, String)> {
    let trimmed = path.trim_end_matches('/');
    let (dir, name) = trimmed.rsplit_once('/')?;
    if name.is_empty() || name == "." || name == ".." {
        return None;
    }
    Some((
        if dir.is_empty() { "/" } else { dir }.to_owned(),
        name.to_owned(),
    ))
}

/// Whether a path names "the contents of" a directory (`dir/.`, `.`).
fn contents_of(path: &str) -> bool {
    path == "." || path.ends_with("/.")
}

// ---------------------------------------------------------------------------
// Into an environment.

/// A writer sending what it is given as chunks on a channel (the blocking
/// side of an upload).
struct ChunkWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "upload ended"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// What a local source is.
struct LocalSource {
    path: PathBuf,
    is_dir: bool,
    /// The name it takes in the environment (`None`: its contents).
    name: Option<String>,
    follow: bool,
}

/// The archive's estimated size (for the progress bar).
fn estimate(path: &Path, follow: bool) -> u64 {
    let meta = if follow {
        std::fs::metadata(path)
    } else {
        std::fs::symlink_metadata(path)
    };
    let Ok(meta) = meta else { return 0 };
    if meta.is_dir() {
        let children = std::fs::read_dir(path)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| estimate(&e.path(), false))
                    .sum()
            })
            .unwrap_or(0);
        512 + children
    } else if meta.is_file() {
        512 + meta.len().div_ceil(512) * 512
    } else {
        512
    }
}

/// Appends `path` to the archive as `name`: directories recursively,
/// symbolic links as links (never followed below the top); anything else
/// (sockets, FIFOs, devices) is skipped with a warning.
fn append(
    builder: &mut tar::Builder<ChunkWriter>,
    name: &Path,
    path: &Path,
    follow: bool,
) -> std::io::Result<()> {
    let meta = if follow {
        std::fs::metadata(path)?
    } else {
        std::fs::symlink_metadata(path)?
    };
    let kind = meta.file_type();
    if kind.is_dir() {
        builder.append_dir(name, path)?;
        let mut children: Vec<_> = std::fs::read_dir(path)?.collect::<Result<_, _>>()?;
        children.sort_by_key(|e| e.file_name());
        for child in children {
            append(builder, &name.join(child.file_name()), &child.path(), false)?;
        }
    } else if kind.is_file() {
        builder.append_file(name, &mut std::fs::File::open(path)?)?;
    } else if kind.is_symlink() {
        let mut header = tar::Header::new_gnu();
        header.set_metadata(&meta);
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        builder.append_link(&mut header, name, std::fs::read_link(path)?)?;
    } else {
        eprintln!(
            "vibebox: skipping {}: not a file, directory or symbolic link",
            path.display()
        );
    }
    Ok(())
}

/// Why an upload failed: the platform's answer, or the local side.
enum UploadError {
    Call(tonic::Status),
    Local(anyhow::Error),
}

/// Streams the archive `produce` writes into the directory `dir` of an
/// environment; the archive bytes sent.
async fn upload<F>(
    session: &Session,
    id: &str,
    dir: &str,
    bar: &ProgressBar,
    produce: F,
) -> Result<u64, UploadError>
where
    F: FnOnce(ChunkWriter) -> Result<()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
    let producer = tokio::task::spawn_blocking(move || {
        produce(ChunkWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        })
    });
    let start = CopyToRequest {
        message: Some(copy_to_request::Message::Start(CopyToStart {
            environment_id: id.to_owned(),
            path: dir.to_owned(),
        })),
    };
    let counter = bar.clone();
    let chunks = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    })
    .map(move |chunk| {
        counter.inc(chunk.len() as u64);
        CopyToRequest {
            message: Some(copy_to_request::Message::Data(chunk)),
        }
    });
    let requests = futures::stream::once(async { start }).chain(chunks);
    let answer = session.environments().copy_to(requests).await;
    let produced = producer
        .await
        .map_err(|e| UploadError::Local(anyhow!("archive task failed: {e}")))?;
    match (answer, produced) {
        (Ok(response), _) => Ok(response.into_inner().bytes),
        // The local side failed first (a file unreadable mid-way): say so.
        (Err(_), Err(e))
            if e.downcast_ref::<std::io::Error>()
                .is_none_or(|io| io.kind() != std::io::ErrorKind::BrokenPipe) =>
        {
            Err(UploadError::Local(e))
        }
        (Err(status), _) => Err(UploadError::Call(status)),
    }
}

/// Sends a local tree as `name` (or its contents) into `dir`.
async fn upload_tree(
    session: &Session,
    id: &str,
    dir: &str,
    source: &LocalSource,
    name: Option<String>,
    bar: &ProgressBar,
) -> Result<u64, UploadError> {
    let (path, follow) = (source.path.clone(), source.follow);
    upload(session, id, dir, bar, move |writer| {
        let mut builder = tar::Builder::new(writer);
        builder.follow_symlinks(false);
        let top = PathBuf::from(name.as_deref().unwrap_or("."));
        append(&mut builder, &top, &path, follow)
            .with_context(|| format!("reading {}", path.display()))?;
        builder
            .into_inner()
            .and_then(|mut w| w.flush())
            .map_err(anyhow::Error::from)
    })
    .await
}

fn missing(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::NotFound
}

fn not_a_directory(status: &tonic::Status) -> bool {
    vibebox_server_kit::status::violated_rules(status)
        .iter()
        .any(|r| r == "files.not_a_directory")
}

fn failed(error: UploadError) -> anyhow::Error {
    match error {
        UploadError::Call(status) => CallError(status).into(),
        UploadError::Local(e) => e,
    }
}

async fn copy_in(
    session: &Session,
    id: &str,
    src: &Location,
    dest: &str,
    follow: bool,
    show: bool,
) -> Result<u64> {
    let local = match src {
        Location::Local(path) => path,
        Location::Stdio => {
            // A tar archive on stdin, extracted into the directory `dest`.
            let bar = progress(show, None, format!("copying stdin to {dest}"));
            let sent = upload(session, id, dest, &bar, |mut writer| {
                std::io::copy(&mut std::io::stdin().lock(), &mut writer)
                    .context("reading stdin")?;
                writer.flush().map_err(anyhow::Error::from)
            })
            .await
            .map_err(failed)?;
            bar.finish_and_clear();
            return Ok(sent);
        }
        Location::Remote { .. } => unreachable!("checked by the caller"),
    };
    let path = PathBuf::from(local);
    let meta = if follow {
        std::fs::metadata(&path)
    } else {
        std::fs::symlink_metadata(&path)
    }
    .with_context(|| format!("{local}: cannot read it"))?;
    let name = if contents_of(local) {
        None
    } else {
        let named = match path.file_name() {
            Some(n) => Some(n.to_owned()),
            None => std::fs::canonicalize(&path)?
                .file_name()
                .map(|n| n.to_owned()),
        };
        Some(
            named
                .ok_or_else(|| {
                    anyhow!("{local}: cannot copy the root directory as such; use {local}/.")
                })?
                .to_string_lossy()
                .into_owned(),
        )
    };
    let source = LocalSource {
        path: path.clone(),
        is_dir: meta.is_dir(),
        name,
        follow,
    };
    let total = {
        let (p, f) = (path.clone(), follow);
        tokio::task::spawn_blocking(move || estimate(&p, f))
            .await
            .unwrap_or(0)
    };
    let bar = progress(show, Some(total), format!("{local} -> {dest}"));
    // Into `dest` as a directory; when it is missing (or a file), as `dest`
    // itself (docker cp's rules).
    let first = upload_tree(session, id, dest, &source, source.name.clone(), &bar).await;
    let result = match first {
        Err(UploadError::Call(status))
            if !dest.ends_with('/') && (missing(&status) || not_a_directory(&status)) =>
        {
            if source.is_dir && not_a_directory(&status) {
                bail!("cannot copy a directory onto the file {dest} in the environment");
            }
            let (dir, name) = remote_split(dest)
                .ok_or_else(|| anyhow!("{dest}: not a directory in the environment"))?;
            bar.set_position(0);
            match upload_tree(session, id, &dir, &source, Some(name), &bar).await {
                Err(UploadError::Call(status)) if missing(&status) => {
                    bail!("{dir}: no such directory in the environment")
                }
                other => other,
            }
        }
        other => other,
    };
    bar.finish_and_clear();
    result.map_err(failed)
}

// ---------------------------------------------------------------------------
// Out of an environment.

async fn copy_out(
    session: &Session,
    id: &str,
    path: &str,
    dst: &Location,
    show: bool,
) -> Result<u64> {
    let mut stream = session
        .environments()
        .copy_from(CopyFromRequest {
            environment_id: id.to_owned(),
            path: path.to_owned(),
        })
        .await
        .call()?;
    let bar = progress(show, None, format!("copying {path}"));
    let mut received = 0u64;
    let local = match dst {
        Location::Stdio => {
            let mut out = std::io::stdout().lock();
            while let Some(message) = stream.message().await.map_err(CallError)? {
                out.write_all(&message.data)?;
                received += message.data.len() as u64;
                bar.inc(message.data.len() as u64);
            }
            out.flush()?;
            bar.finish_and_clear();
            return Ok(received);
        }
        Location::Local(local) => local,
        Location::Remote { .. } => unreachable!("checked by the caller"),
    };
    let (target, parent) = local_target(path, local)?;
    // Everything is received before anything is unpacked.
    let mut spool = tempfile::tempfile_in(&parent)
        .with_context(|| format!("cannot write in {}", parent.display()))?;
    while let Some(message) = stream.message().await.map_err(CallError)? {
        spool.write_all(&message.data)?;
        received += message.data.len() as u64;
        bar.inc(message.data.len() as u64);
    }
    bar.finish_and_clear();
    spool.rewind()?;
    let into = target.clone();
    tokio::task::spawn_blocking(move || unpack(spool, &into))
        .await
        .map_err(|e| anyhow!("unpacking failed: {e}"))??;
    Ok(received)
}

/// Where a copy of the environment's `path` into the local path `local`
/// lands (docker cp's rules), and the directory its spool goes in.
fn local_target(path: &str, local: &str) -> Result<(PathBuf, PathBuf)> {
    let dpath = PathBuf::from(local);
    let target = if contents_of(path) {
        dpath.clone()
    } else if dpath.is_dir() {
        match remote_name(path) {
            Some(name) => dpath.join(name),
            None => dpath.clone(),
        }
    } else if local.ends_with('/') {
        bail!("{local}: no such directory");
    } else {
        dpath.clone()
    };
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        bail!("{}: no such directory", parent.display());
    }
    // The directory the user named is followed when it is a symbolic link
    // (nothing below it is: see `unpack`).
    if target == dpath && dpath.is_dir() {
        let resolved = std::fs::canonicalize(&dpath)
            .with_context(|| format!("resolving {}", dpath.display()))?;
        return Ok((resolved, parent));
    }
    Ok((target, parent))
}

/// The components below the archive's root of an entry path, and that root
/// (`/` for the absolute entries of a copy of `/`, `.` for a `dir/.`).
fn split_entry(raw: &[u8]) -> Result<(Vec<u8>, Vec<Vec<u8>>)> {
    let shown = || String::from_utf8_lossy(raw).into_owned();
    let (root, rest) = if raw.first() == Some(&b'/') {
        (b"/".to_vec(), &raw[1..])
    } else {
        let mut parts = raw.splitn(2, |b| *b == b'/');
        let first = parts.next().unwrap_or_default().to_vec();
        (first, parts.next().unwrap_or_default())
    };
    let mut components = Vec::new();
    for part in rest.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => bail!("refused an archive entry with '..': {}", shown()),
            p => components.push(p.to_vec()),
        }
    }
    if root.is_empty() || root == b".." {
        bail!("refused an archive entry: {}", shown());
    }
    Ok((root, components))
}

/// Refuses to write through a symbolic link already on disk: `target`
/// (when `with_target`) and every directory from it down to the parent of
/// `components` must be missing or a real directory (checked with
/// `symlink_metadata`, never followed).
fn no_link_on_the_way(target: &Path, components: &[Vec<u8>], with_target: bool) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let mut path = target.to_path_buf();
    let depth = components.len().saturating_sub(1);
    for i in 0..=depth {
        if i > 0 {
            path.push(std::ffi::OsStr::from_bytes(&components[i - 1]));
        } else if !with_target {
            continue;
        }
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => bail!(
                "refused to write through the symbolic link {} (it is on the way to an entry \
                 of the archive)",
                path.display()
            ),
            Ok(_) => {}
            // Nothing there: nothing below it either.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
        }
    }
    Ok(())
}

/// Unpacks a received archive so that its root becomes `target`: checked
/// entry by entry (no `..`, nothing below a symbolic link of the same
/// archive, the root included, hard links only to files unpacked before),
/// never through a symbolic link already on disk at or below `target`
/// (`target` itself is followed only when it is the directory the user
/// named: the caller resolves it), owners not kept, set-id bits dropped.
fn unpack(file: std::fs::File, target: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let mut archive = tar::Archive::new(file);
    archive.set_overwrite(true);
    archive.set_preserve_permissions(false);
    let mut root: Option<Vec<u8>> = None;
    let mut links: HashSet<Vec<Vec<u8>>> = HashSet::new();
    let mut files: HashSet<Vec<Vec<u8>>> = HashSet::new();
    let local = |components: &[Vec<u8>]| {
        components.iter().fold(target.to_path_buf(), |p, c| {
            p.join(std::ffi::OsStr::from_bytes(c))
        })
    };
    // Whether an entry lies below a symbolic link of the archive (its root
    // included: the empty prefix).
    let below_link = |links: &HashSet<Vec<Vec<u8>>>, components: &[Vec<u8>]| {
        (0..components.len()).any(|i| links.contains(&components[..i]))
    };
    for entry in archive.entries().context("reading the archive")? {
        let mut entry = entry.context("reading the archive")?;
        let raw = entry.path_bytes().into_owned();
        let (entry_root, components) = split_entry(&raw)?;
        match &root {
            None => root = Some(entry_root),
            Some(r) if *r == entry_root => {}
            Some(_) => bail!(
                "refused an archive entry outside the copied path: {}",
                String::from_utf8_lossy(&raw)
            ),
        }
        if below_link(&links, &components) {
            bail!(
                "refused an archive entry below a symbolic link: {}",
                String::from_utf8_lossy(&raw)
            );
        }
        let kind = entry.header().entry_type();
        // Directories on the way, and a directory entry itself (unpacking
        // one sets the mode of what is there), are never symbolic links.
        no_link_on_the_way(target, &components, !components.is_empty())?;
        let path = local(&components);
        if kind == tar::EntryType::Directory
            && std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink())
        {
            bail!(
                "refused to unpack the directory {} over the symbolic link there",
                path.display()
            );
        }
        if let Some(parent) = path.parent()
            && !components.is_empty()
        {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        match kind {
            tar::EntryType::Regular | tar::EntryType::Directory | tar::EntryType::Symlink => {
                entry
                    .unpack(&path)
                    .with_context(|| format!("writing {}", path.display()))?;
                links.remove(&components);
                files.remove(&components);
                if kind == tar::EntryType::Symlink {
                    links.insert(components);
                } else if kind == tar::EntryType::Regular {
                    files.insert(components);
                }
            }
            tar::EntryType::Link => {
                let name = entry.link_name_bytes().unwrap_or_default().into_owned();
                let (link_root, link_components) = split_entry(&name)?;
                if Some(&link_root) != root.as_ref()
                    || !files.contains(&link_components)
                    || below_link(&links, &link_components)
                {
                    bail!(
                        "refused a hard link to a file not in the archive: {}",
                        String::from_utf8_lossy(&raw)
                    );
                }
                no_link_on_the_way(target, &link_components, true)?;
                let _ = std::fs::remove_file(&path);
                std::fs::hard_link(local(&link_components), &path)
                    .with_context(|| format!("writing {}", path.display()))?;
                files.insert(components);
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            other => eprintln!(
                "vibebox: skipping {} ({other:?}): not a file, directory or link",
                String::from_utf8_lossy(&raw)
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_are_local_stdio_or_env_colon_absolute_path() {
        assert_eq!(location("-").unwrap(), Location::Stdio);
        assert_eq!(
            location("dev:/workspace/x").unwrap(),
            Location::Remote {
                env: "dev".into(),
                path: "/workspace/x".into()
            }
        );
        assert_eq!(location("./a:b").unwrap(), Location::Local("./a:b".into()));
        assert_eq!(location("dir").unwrap(), Location::Local("dir".into()));
        let e = location("dev:relative").unwrap_err().to_string();
        assert!(e.contains("must be absolute"), "{e}");
    }

    #[test]
    fn remote_names_and_splits() {
        assert_eq!(remote_name("/tmp/dir/").as_deref(), Some("dir"));
        assert_eq!(remote_name("/tmp/dir/.").as_deref(), Some("dir"));
        assert_eq!(remote_name("/"), None);
        assert_eq!(
            remote_split("/tmp/new/"),
            Some(("/tmp".into(), "new".into()))
        );
        assert_eq!(remote_split("/x"), Some(("/".into(), "x".into())));
        assert_eq!(remote_split("/"), None);
        assert!(contents_of("dir/.") && contents_of(".") && !contents_of("dir"));
    }

    fn archive(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> std::fs::File {
        let mut out = Vec::new();
        for (name, kind, link, data) in entries {
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_entry_type(*kind);
            h.set_mode(0o4755);
            h.set_size(data.len() as u64);
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(data);
            out.extend(std::iter::repeat_n(0u8, (512 - data.len() % 512) % 512));
        }
        out.extend(std::iter::repeat_n(0u8, 1024));
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&out).unwrap();
        file.rewind().unwrap();
        file
    }

    #[test]
    fn the_archive_root_becomes_the_target_and_hostile_entries_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        use tar::EntryType::{Directory, Link, Regular, Symlink};
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        unpack(
            archive(&[
                ("d/", Directory, "", b""),
                ("d/e/", Directory, "", b""),
                ("d/e/f", Regular, "", b"hello"),
                ("d/l", Symlink, "/etc", b""),
                ("d/h", Link, "d/e/f", b""),
            ]),
            &target,
        )
        .unwrap();
        assert_eq!(std::fs::read(target.join("e/f")).unwrap(), b"hello");
        assert_eq!(std::fs::read(target.join("h")).unwrap(), b"hello");
        assert_eq!(
            std::fs::read_link(target.join("l")).unwrap(),
            Path::new("/etc")
        );
        let mode = std::fs::metadata(target.join("e/f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7000, 0, "no set-id bits: {mode:o}");

        for (what, entries) in [
            (
                "below a link",
                vec![
                    ("d/", Directory, "", &b""[..]),
                    ("d/l", Symlink, "/tmp", b""),
                    ("d/l/x", Regular, "", b"x"),
                ],
            ),
            ("dotdot", vec![("d/../../x", Regular, "", &b"x"[..])]),
            (
                "two roots",
                vec![("d/", Directory, "", &b""[..]), ("e/x", Regular, "", b"x")],
            ),
            (
                "hard link outside",
                vec![
                    ("d/", Directory, "", &b""[..]),
                    ("d/h", Link, "/etc/passwd", b""),
                ],
            ),
        ] {
            let into = dir.path().join(what.replace(' ', "-"));
            let e = unpack(archive(&entries), &into).unwrap_err().to_string();
            assert!(e.contains("refused"), "{what}: {e}");
        }
        // A single file becomes the target itself.
        let single = dir.path().join("single.txt");
        unpack(archive(&[("f", Regular, "", b"one")]), &single).unwrap();
        assert_eq!(std::fs::read(&single).unwrap(), b"one");
    }

    /// What `dir` holds, recursively (not following links).
    fn held(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                out.extend(held(&path));
            }
            out.push(path);
        }
        out.sort();
        out
    }

    #[test]
    fn nothing_is_written_through_a_symbolic_link_of_the_archive_or_on_disk() {
        use std::os::unix::fs::{PermissionsExt, symlink};
        use tar::EntryType::{Directory, Regular, Symlink};
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o700)).unwrap();
        let away = outside.to_str().unwrap();

        // The archive's root is a symbolic link, then an entry below it.
        let target = dir.path().join("out");
        let e = unpack(
            archive(&[("d", Symlink, away, b""), ("d/x", Regular, "", b"evil")]),
            &target,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("below a symbolic link"), "{e}");
        // The same root written as `d/` then `d/./x`.
        let target = dir.path().join("out-dot");
        let e = unpack(
            archive(&[("d/", Symlink, away, b""), ("d/./x", Regular, "", b"evil")]),
            &target,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("below a symbolic link"), "{e}");

        // A symbolic link already on disk below the target (say, left by an
        // earlier copy): a directory on the way, a directory entry on it.
        let target = dir.path().join("existing");
        std::fs::create_dir(&target).unwrap();
        symlink(&outside, target.join("sub")).unwrap();
        let e = unpack(
            archive(&[
                ("d/", Directory, "", b""),
                ("d/sub/x", Regular, "", b"evil"),
            ]),
            &target,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("through the symbolic link"), "{e}");
        let e = unpack(
            archive(&[("d/", Directory, "", b""), ("d/sub/", Directory, "", b"")]),
            &target,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("over the symbolic link"), "{e}");
        // The target itself a link (made by an earlier copy out of a link),
        // with a directory root or entries only below it.
        let target = dir.path().join("was-a-link");
        symlink(&outside, &target).unwrap();
        let e = unpack(
            archive(&[("d/", Directory, "", b""), ("d/x", Regular, "", b"evil")]),
            &target,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("over the symbolic link"), "{e}");
        let e = unpack(archive(&[("d/x", Regular, "", b"evil")]), &target)
            .unwrap_err()
            .to_string();
        assert!(e.contains("through the symbolic link"), "{e}");

        assert_eq!(held(&outside), Vec::<PathBuf>::new(), "nothing outside");
        let mode = std::fs::metadata(&outside).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o700, "its mode untouched");

        // A link the archive replaces with a file, and a file that replaces
        // a link on disk, are fine (links are replaced, never followed).
        let target = dir.path().join("replaced");
        std::fs::create_dir(&target).unwrap();
        symlink(&outside, target.join("f")).unwrap();
        unpack(
            archive(&[
                ("d/", Directory, "", b""),
                ("d/l", Symlink, away, b""),
                ("d/l", Regular, "", b"file"),
                ("d/f", Regular, "", b"file"),
            ]),
            &target,
        )
        .unwrap();
        assert_eq!(std::fs::read(target.join("l")).unwrap(), b"file");
        assert_eq!(std::fs::read(target.join("f")).unwrap(), b"file");
        assert_eq!(held(&outside), Vec::<PathBuf>::new());
    }

    #[test]
    fn the_named_local_directory_is_followed_when_it_is_a_link() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let named = dir.path().join("named");
        symlink(&real, &named).unwrap();
        let named_str = named.to_str().unwrap();
        // `ENV:/x/. ./named`: into what `named` points to.
        let (target, spool) = local_target("/x/.", named_str).unwrap();
        assert_eq!(target, std::fs::canonicalize(&real).unwrap());
        assert_eq!(spool, dir.path());
        // `ENV:/x ./named`: `named/x`, below the link the user named.
        let (target, _) = local_target("/x", named_str).unwrap();
        assert_eq!(target, named.join("x"));
        // `ENV:/x ./new`: `new`, created.
        let new = dir.path().join("new");
        let (target, _) = local_target("/x", new.to_str().unwrap()).unwrap();
        assert_eq!(target, new);
        let e = local_target("/x", &format!("{}/", new.display()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such directory"), "{e}");
    }
}
