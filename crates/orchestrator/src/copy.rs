//! Files in and out of an environment (`CopyTo`, `CopyFrom`) over the
//! engine's archive API: every path is resolved by the engine inside the
//! container's own filesystem (never on the host).
//!
//! Decisions, each with its reason:
//! - **Running environments only.** The archive API also works on a stopped
//!   container, but a stopped, failed or quarantined environment is at rest
//!   (or under investigation) and a copy is activity: FAILED_PRECONDITION
//!   naming the state.
//! - **Paths**: absolute, no control characters, at most 4096 bytes,
//!   normalized lexically (`..` stops at the root) before anything else.
//! - **Reserved paths, checked lexically.** `/proc`, `/sys`, `/dev` and the
//!   engine-managed `/etc/hostname`, `/etc/hosts`, `/etc/resolv.conf` (the
//!   policy's reserved mount targets) are refused as the destination (after
//!   normalization, and after following the destination itself once when
//!   the engine reports it as a symbolic link) and as the landing path of
//!   an archive entry (destination joined with the entry's path). These
//!   checks compare strings: they do not resolve symbolic links already in
//!   the container below the destination. With `/workspace/e -> /etc` in
//!   the container, an entry `e/hosts` passes the check and the engine
//!   follows the link. That is accepted, because it reaches nothing the
//!   environment's own user could not: the engine resolves every link
//!   inside the container's filesystem (never the host's), the
//!   engine-managed files are bind mounts there that it cannot replace
//!   (the engine fails the copy with EBUSY at that entry; entries before
//!   it may already be extracted), and under
//!   `/proc`, `/sys`, `/dev` it writes into the container's image
//!   directories that the running container's own mounts hide. So the
//!   reserved-path check is a guard against mistakes, not a security
//!   boundary; the boundary is the container's filesystem.
//! - **No host bind mounts.** The engine reads and writes with its own
//!   (root) rights and follows the container's symbolic links; in a host
//!   directory that would get around the host's permissions. An environment
//!   with a bind mount is refused (`files.bind_mount`); `env exec` with `tar`
//!   runs as the environment's user and still works there.
//! - **No tmpfs mounts.** The engine does not see them (a copy would land,
//!   invisible, in the directory under the mount): refused (`files.tmpfs`).
//! - **Spool, check, then upload.** The engine extracts an archive while it
//!   streams, so the client's archive is first read to the end into an
//!   unnamed spool file under the orchestrator's data directory (gone with
//!   the process), counted against the environment's copy limit
//!   (`ContainerSpec.copy_limit_mb`, default [`DEFAULT_COPY_LIMIT_MB`]) and
//!   checked entry by entry: relative paths without `..`, only files,
//!   directories, symbolic and hard links (no device nodes, FIFOs or sparse
//!   files), nothing below a symbolic link of the same archive (links are
//!   stored, never followed by us), hard links only to files earlier in the
//!   archive. An archive over the limit (`files.copy_limit`), malformed or
//!   with one bad entry is refused whole and nothing is extracted.
//! - **Bounded memory per archive** (`files.archive_limits`,
//!   FAILED_PRECONDITION). The tar crate reads a GNU long-name or long-link
//!   header or a PAX header whole into memory, so the raw 512-byte headers
//!   are checked by us before it reads them (sizes parsed as the crate
//!   parses them, a PAX `size` applied as it applies it, so that both see
//!   the same headers): such a header's body is at most [`MAX_META`] bytes,
//!   a name at most 4096 bytes, an archive at most [`MAX_ENTRIES`] entries
//!   and [`MAX_NAME_BYTES`] bytes of names and link targets.
//! - **Spool slots are taken when data arrives**: at most
//!   [`UPLOADS_PER_ENV`] uploads of one environment and
//!   [`UPLOADS_PER_USER`] of one caller are spooled at once (more:
//!   RESOURCE_EXHAUSTED with a QuotaFailure `files.copy_concurrency`, to
//!   that caller only) and [`UPLOADS`] in all (more: RESOURCE_EXHAUSTED
//!   with a RetryInfo). A CopyTo that has sent no data holds no slot.
//! - **Idle copies end** (`files.copy_idle`, DEADLINE_EXCEEDED): a CopyTo
//!   whose client sends no data for [`IDLE_TIMEOUT`] (before its first
//!   chunk or between two), or a CopyFrom whose client reads nothing for as
//!   long, fails and frees its slot (an abandoned CopyTo extracts nothing).
//! - **Owned by the environment's user.** The spool holds a rewritten
//!   archive: every entry owned by the container's user and group (numeric,
//!   or names resolved in the container's own `/etc/passwd` and
//!   `/etc/group`), set-id and sticky bits dropped, the destination
//!   directory itself (a `./` entry) left alone. The engine's own
//!   `copyUIDGID` is not used: it resolves the user on the host.
//! - **CopyFrom is spooled too.** The engine holds the container's lock
//!   while it streams an archive (Docker 20.10: its stat and inspect of that
//!   container wait meanwhile, the reconciler's drift check included), so
//!   its archive is read at the engine's pace into an unnamed spool file,
//!   and the client is served from there at its own. It stops with
//!   `files.copy_limit` once the archive passes the limit, before a byte
//!   is sent (a single file over it is refused before the engine is
//!   asked). At most [`DOWNLOADS_PER_ENV`] run at once per environment and
//!   [`DOWNLOADS_PER_USER`] per caller (more: RESOURCE_EXHAUSTED, QuotaFailure `files.copy_concurrency`) and
//!   [`DOWNLOADS`] in all (more: RESOURCE_EXHAUSTED with a RetryInfo).
//! - Messages stay small: clients send chunks of at most [`MAX_CHUNK`];
//!   the orchestrator sends [`SEND_CHUNK`].
//! - Every copy that names an existing environment is audited once
//!   (`environment.copy_to` / `environment.copy_from`) with its path, the
//!   archive bytes and its outcome, and holds an activity session while it
//!   runs.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::errors::Error as DockerError;
use bollard::query_parameters::{
    ContainerArchiveInfoOptionsBuilder, DownloadFromContainerOptionsBuilder,
    UploadToContainerOptionsBuilder,
};
use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::{Code, Status};
use vibebox_proto::audit::{Outcome, Severity};
use vibebox_proto::environment::{ContainerSpec, MountType};

use crate::audit::{Caller, Event};
use crate::service::{Error, Orchestrator};
use crate::store::{EnvRecord, State};

/// The copy limit of an environment whose spec sets none (older ones).
pub const DEFAULT_COPY_LIMIT_MB: i64 = 1024;
/// Largest chunk a client may send in one message.
pub const MAX_CHUNK: usize = 1024 * 1024;
/// Size of the chunks the orchestrator sends.
pub const SEND_CHUNK: usize = 64 * 1024;
/// Uploads of one environment spooled at the same time (each may take up
/// to its limit on disk).
pub const UPLOADS_PER_ENV: usize = 2;
/// Uploads of one user spooled at the same time, whatever environments
/// they go to (so that one user cannot take every slot there is).
pub const UPLOADS_PER_USER: usize = 4;
/// Uploads spooled at the same time in all.
pub const UPLOADS: usize = 16;
/// CopyFrom streams of one environment at the same time (each spools up
/// to its limit on disk).
pub const DOWNLOADS_PER_ENV: usize = 4;
/// CopyFrom streams of one user at the same time.
pub const DOWNLOADS_PER_USER: usize = 8;
/// CopyFrom streams at the same time in all.
pub const DOWNLOADS: usize = 16;
/// How long a copy may wait for its client (the next chunk of a CopyTo, a
/// CopyFrom's client reading the next one).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest body of a GNU long-name or long-link header or a PAX header (the
/// tar crate reads each whole into memory).
pub const MAX_META: u64 = 64 * 1024;
/// Most entries in one archive (each costs memory while it is checked).
pub const MAX_ENTRIES: u64 = 100_000;
/// Most bytes of entry names and link targets in one archive.
pub const MAX_NAME_BYTES: u64 = 16 * MIB;
const MAX_PATH: usize = 4096;
const MIB: u64 = 1024 * 1024;
/// Largest `/etc/passwd` or `/etc/group` read to resolve a user name.
const MAX_ACCOUNT_FILE: usize = 1024 * 1024;
/// Where nothing is ever written (the policy's reserved mount targets).
pub const RESERVED: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/etc/hostname",
    "/etc/hosts",
    "/etc/resolv.conf",
];

/// Why a copy was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// A request field is wrong (`path`, `start`, `data`).
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// The archive is malformed or one of its entries is refused.
    #[error("the archive is refused: {0}")]
    Archive(String),
    /// The archive passed the environment's copy limit.
    #[error("the archive is larger than the copy limit of {limit_mb} MiB")]
    TooLarge { limit_mb: i64 },
    /// A rule of this module refuses the copy (`files.*`).
    #[error("{reason}")]
    Refused {
        rule: &'static str,
        subject: String,
        reason: String,
    },
    /// The path does not exist in the environment.
    #[error("no such file or directory in the environment: {0}")]
    Missing(String),
    #[error("too many copies are being spooled; retry")]
    Busy,
    /// The environment has as many copies of this kind running as it may.
    #[error("{whose} already has {max} {what} running, the most at once; retry when one has ended")]
    Crowded {
        /// "this environment" or "the caller".
        whose: &'static str,
        what: &'static str,
        max: usize,
    },
    /// The client sent (or read) nothing for too long.
    #[error(
        "the client {what} nothing for {} s: the copy was abandoned",
        .idle.as_secs()
    )]
    Idle { what: &'static str, idle: Duration },
    /// The client went away or broke its stream.
    #[error("the copy was cancelled: {0}")]
    Cancelled(String),
    /// The spool file could not be written or read.
    #[error("spool: {0}")]
    Spool(#[from] std::io::Error),
    #[error(transparent)]
    Orchestrator(#[from] Error),
}

/// Result alias of this module.
pub type Result<T, E = CopyError> = std::result::Result<T, E>;

impl From<CopyError> for Status {
    fn from(e: CopyError) -> Self {
        use vibebox_server_kit::status;
        match e {
            CopyError::Invalid { field, reason } => status::invalid_field(field, &reason),
            e @ CopyError::Archive(_) => {
                let reason = e.to_string();
                status::bad_request(&reason, &[("data", &reason)])
            }
            e @ CopyError::TooLarge { .. } => {
                let message = e.to_string();
                status::quota_failure(&message, "files.copy_limit", &message)
            }
            CopyError::Refused {
                rule,
                subject,
                reason,
            } => status::precondition_failure(&reason, &[(rule, &subject, &reason)]),
            e @ CopyError::Missing(_) => Status::not_found(e.to_string()),
            e @ CopyError::Busy => {
                status::retry_later(&e.to_string(), std::time::Duration::from_secs(5))
            }
            e @ CopyError::Crowded { .. } => {
                let message = e.to_string();
                status::quota_failure(&message, "files.copy_concurrency", &message)
            }
            e @ CopyError::Idle { .. } => {
                let message = e.to_string();
                with_code(
                    status::precondition_failure(
                        &message,
                        &[("files.copy_idle", "data", &message)],
                    ),
                    Code::DeadlineExceeded,
                )
            }
            e @ CopyError::Cancelled(_) => Status::cancelled(e.to_string()),
            e @ CopyError::Spool(_) => status::internal(&e),
            CopyError::Orchestrator(e) => Status::from(e),
        }
    }
}

/// `google.rpc.Status`, the encoding of a status's details.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

/// `status` with another code, its details kept (a PreconditionFailure
/// naming the rule on a status whose code is not FAILED_PRECONDITION).
fn with_code(status: Status, code: Code) -> Status {
    use prost::Message as _;
    let mut details = RpcStatus::decode(status.details()).unwrap_or_default();
    details.code = code as i32;
    Status::with_details(
        code,
        status.message().to_owned(),
        details.encode_to_vec().into(),
    )
}

/// A refusal of `files.archive_limits`.
fn over_limit(reason: String) -> CopyError {
    CopyError::Refused {
        rule: "files.archive_limits",
        subject: "data".into(),
        reason,
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> CopyError {
    CopyError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Normalizes an absolute path inside the environment: `//a/./b/../c/`
/// becomes `/a/c`; `..` at the root stays at the root.
pub fn normalize(path: &str) -> Result<String> {
    if path.is_empty() {
        return Err(invalid("path", "must not be empty"));
    }
    if path.len() > MAX_PATH {
        return Err(invalid("path", format!("longer than {MAX_PATH} bytes")));
    }
    if path.chars().any(char::is_control) {
        return Err(invalid(
            "path",
            "must not contain NUL or control characters",
        ));
    }
    if !path.starts_with('/') {
        return Err(invalid(
            "path",
            "must be absolute (a path inside the environment, starting with /)",
        ));
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// A path as the audit records it before it is normalized: escaped, at
/// most [`MAX_PATH`] bytes.
fn shown(path: &str) -> String {
    let mut s = path.escape_debug().to_string();
    if s.len() > MAX_PATH {
        let mut end = MAX_PATH;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Whether normalized `path` is `prefix` or lies below it.
fn within(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || path == prefix
        || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

/// The reserved path `path` is or lies below, if any.
pub fn reserved(path: &str) -> Option<&'static str> {
    RESERVED.iter().copied().find(|r| within(path, r))
}

/// Why `path` (reserved by `r`) is refused.
fn reserved_reason(path: &str, r: &str) -> String {
    if path == r {
        format!("{r} is reserved: copies cannot write there")
    } else {
        format!("{path} is under {r}, where copies cannot write")
    }
}

/// The copy limit of a spec, in bytes (unset: the default; zero or less:
/// copying is off).
pub fn limit_bytes(spec: &ContainerSpec) -> (i64, u64) {
    let mb = spec.copy_limit_mb.unwrap_or(DEFAULT_COPY_LIMIT_MB).max(0);
    (mb, (mb as u64).saturating_mul(MIB))
}

/// The targets of the spec's tmpfs mounts (normalized).
fn tmpfs_targets(spec: &ContainerSpec) -> Vec<String> {
    spec.mounts
        .iter()
        .filter(|m| m.r#type == MountType::Tmpfs as i32)
        .filter_map(|m| normalize(&m.target).ok())
        .collect()
}

/// Refuses an environment whose spec binds a host directory.
fn no_bind_mounts(spec: &ContainerSpec) -> Result<()> {
    match spec
        .mounts
        .iter()
        .position(|m| m.r#type == MountType::Bind as i32)
    {
        Some(i) => Err(CopyError::Refused {
            rule: "files.bind_mount",
            subject: format!("spec.mounts[{i}]"),
            reason: "the environment binds a host directory: copies act with the engine's \
                     rights and are refused here (use `env exec` with tar, which runs as the \
                     environment's user)"
                .into(),
        }),
        None => Ok(()),
    }
}

/// Refuses a path on a tmpfs mount (the engine cannot see it).
fn not_on_tmpfs(path: &str, tmpfs: &[String]) -> Result<()> {
    match tmpfs.iter().find(|t| within(path, t)) {
        Some(t) => Err(CopyError::Refused {
            rule: "files.tmpfs",
            subject: "path".into(),
            reason: format!(
                "{path} is on the tmpfs mount {t}, which the engine's archive API cannot reach \
                 (copy to the workspace or another volume)"
            ),
        }),
        None => Ok(()),
    }
}

/// The engine's refusal of an archive operation on `path`, in the copy's
/// terms (without the engine's object ids).
fn engine(path: &str, e: DockerError) -> CopyError {
    match &e {
        DockerError::DockerResponseServerError {
            status_code: 404, ..
        } => CopyError::Missing(path.to_owned()),
        DockerError::DockerResponseServerError {
            status_code: 400 | 403,
            message,
        } => CopyError::Refused {
            rule: "files.engine",
            subject: "path".into(),
            reason: format!(
                "the engine refused the copy at {path}: {}",
                message.split(" in container ").next().unwrap_or_default()
            ),
        },
        _ => CopyError::Orchestrator(Error::Docker(e)),
    }
}

/// Go's `os.ModeType` bits (the engine's path stat): anything but a
/// regular file.
const GO_MODE_TYPE: u32 =
    (1 << 31) | (1 << 27) | (1 << 26) | (1 << 25) | (1 << 24) | (1 << 21) | (1 << 19);
const GO_MODE_DIR: u32 = 1 << 31;
const GO_MODE_SYMLINK: u32 = 1 << 27;

/// Where an archive is extracted and whom its files belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Normalized absolute directory.
    pub destination: String,
    pub uid: u64,
    pub gid: u64,
    /// Normalized paths no entry may land in or below (reserved, tmpfs).
    pub forbidden: Vec<String>,
}

/// What a checked archive holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub entries: u64,
    /// Bytes of file contents.
    pub content_bytes: u64,
}

/// Counts what passes through a reader.
struct Counted<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Where a [`Guard`] is in the raw archive.
#[derive(Debug, Clone, Copy)]
enum At {
    /// Reading the next header block: `filled` bytes of it so far.
    Header { filled: usize },
    /// Handing on a checked header block (`len` bytes, fewer at a cut
    /// end); `then` the data and padding after it (`None`: the end).
    Release {
        given: usize,
        len: usize,
        then: Option<u64>,
    },
    /// Passing on `left` bytes of a member's data and padding.
    Data { left: u64 },
    /// After the end-of-archive block, where the tar crate stops reading
    /// (or after a cut header): the rest passes on unchecked.
    End,
}

const BLOCK: usize = 512;

/// Checks the raw headers of an archive before the tar crate reads them:
/// the crate reads the body of a GNU long-name or long-link header or of a
/// PAX header whole into memory, so a body over [`MAX_META`] (or a long
/// name over 4096 bytes, or an archive of more than [`MAX_ENTRIES`]
/// entries) is refused before a byte of it is handed on. Each header block
/// is read whole and checked first; data blocks pass through counted.
///
/// The framing is the tar crate's own (`tar::Header` parses the size field,
/// octal or base-256; a PAX `size` record replaces the size of the next
/// entry as the crate does), so both see the same headers.
struct Guard<R> {
    inner: R,
    at: At,
    block: [u8; BLOCK],
    /// The body of a PAX header being passed on, and its size.
    pax_body: Option<(Vec<u8>, usize)>,
    /// The records of the last PAX header, for the next entry.
    pax: Option<Vec<u8>>,
    /// Entries so far (extension headers not counted).
    entries: u64,
    /// The input ended.
    eof: bool,
    /// Why the archive was refused (the tar crate sees a read error).
    refused: Option<CopyError>,
}

impl<R: Read> Guard<R> {
    fn new(inner: R) -> Self {
        Guard {
            inner,
            at: At::Header { filled: 0 },
            block: [0; BLOCK],
            pax_body: None,
            pax: None,
            entries: 0,
            eof: false,
            refused: None,
        }
    }

    fn pass(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.eof = true;
        }
        Ok(n)
    }

    /// Checks the header block read whole: the data and padding after it,
    /// or `None` for the end-of-archive block.
    fn check(&mut self) -> Result<Option<u64>> {
        if self.block.iter().all(|b| *b == 0) {
            return Ok(None);
        }
        let header = tar::Header::from_byte_slice(&self.block);
        let kind = header.entry_type();
        let named = kind.is_gnu_longname() || kind.is_gnu_longlink();
        let extension = named || kind.is_pax_local_extensions() || kind.is_pax_global_extensions();
        // As the tar crate: only a GNU or ustar header describes the next
        // entry; anything else is an entry of its own.
        let recognized = header.as_gnu().is_some() || header.as_ustar().is_some();
        let mut size = header
            .entry_size()
            .map_err(|e| CopyError::Archive(format!("malformed archive: {e}")))?;
        if !extension && let Some(pax_size) = self.pax.as_deref().and_then(pax_size) {
            size = pax_size;
        }
        if !(recognized && (named || kind.is_pax_local_extensions())) {
            self.pax = None;
            self.entries += 1;
            if self.entries > MAX_ENTRIES {
                return Err(over_limit(format!(
                    "the archive has more than {MAX_ENTRIES} entries"
                )));
            }
        }
        if extension && size > MAX_META {
            return Err(over_limit(format!(
                "a {kind:?} header of {size} bytes: long names, long links and PAX headers may \
                 be at most {MAX_META} bytes"
            )));
        }
        if named && size > MAX_PATH as u64 + 1 {
            return Err(over_limit(format!(
                "a {kind:?} header of {size} bytes: names may be at most {MAX_PATH} bytes"
            )));
        }
        if kind.is_gnu_sparse() {
            // The tar crate would read its extension blocks as part of the
            // header; sparse files are refused anyway.
            return Err(CopyError::Archive(format!(
                "entries of type {kind:?} are not allowed (only files, directories, symbolic \
                 and hard links)"
            )));
        }
        if recognized && kind.is_pax_local_extensions() {
            self.pax_body = Some((Vec::with_capacity(size as usize), size as usize));
        }
        size.checked_add(BLOCK as u64 - 1)
            .map(|s| Some(s & !(BLOCK as u64 - 1)))
            .ok_or_else(|| CopyError::Archive("malformed archive: size overflow".into()))
    }

    fn refuse(&mut self, e: CopyError) -> std::io::Error {
        let error = std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
        self.refused = Some(e);
        error
    }
}

/// The `size` record of PAX records, read as the tar crate reads it.
fn pax_size(records: &[u8]) -> Option<u64> {
    for record in tar::PaxExtensions::new(records) {
        let record = record.ok()?;
        if record.key() != Ok("size") {
            continue;
        }
        return record.value().ok()?.parse().ok();
    }
    None
}

impl<R: Read> Read for Guard<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(refused) = &self.refused {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                refused.to_string(),
            ));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.at {
                At::End => return self.pass(buf),
                At::Data { left: 0 } => {
                    if let Some((body, _)) = self.pax_body.take() {
                        self.pax = Some(body);
                    }
                    self.at = At::Header { filled: 0 };
                }
                At::Data { left } => {
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let n = self.pass(&mut buf[..want])?;
                    if let Some((body, size)) = &mut self.pax_body {
                        let room = size.saturating_sub(body.len()).min(n);
                        body.extend_from_slice(&buf[..room]);
                    }
                    self.at = At::Data {
                        left: left - n as u64,
                    };
                    return Ok(n);
                }
                At::Release { given, len, then } if given == len => {
                    self.at = match then {
                        Some(left) if len == BLOCK => At::Data { left },
                        _ => At::End,
                    };
                }
                At::Release { given, len, then } => {
                    let n = buf.len().min(len - given);
                    buf[..n].copy_from_slice(&self.block[given..given + n]);
                    self.at = At::Release {
                        given: given + n,
                        len,
                        then,
                    };
                    return Ok(n);
                }
                At::Header { mut filled } => {
                    while filled < BLOCK {
                        let n = self.inner.read(&mut self.block[filled..])?;
                        if n == 0 {
                            self.eof = true;
                            break;
                        }
                        filled += n;
                        self.at = At::Header { filled };
                    }
                    if filled == 0 {
                        return Ok(0);
                    }
                    let then = if filled < BLOCK {
                        // Cut inside a header: the tar crate says so.
                        None
                    } else {
                        match self.check() {
                            Ok(then) => then,
                            Err(e) => return Err(self.refuse(e)),
                        }
                    };
                    self.at = At::Release {
                        given: 0,
                        len: filled,
                        then,
                    };
                }
            }
        }
    }
}

/// The components of an archive entry's path, relative, without `.`;
/// refused when absolute or with `..`.
fn entry_components(raw: &[u8]) -> std::result::Result<Vec<&[u8]>, String> {
    let shown = || String::from_utf8_lossy(raw).escape_debug().to_string();
    if raw.first() == Some(&b'/') {
        return Err(format!("{}: absolute paths are not allowed", shown()));
    }
    let mut parts = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(format!("{}: '..' is not allowed", shown())),
            p => parts.push(p),
        }
    }
    Ok(parts)
}

fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&b'/')
}

/// Reads a client's archive from `input`, checks every entry against
/// `plan` and writes the rewritten archive (owner, modes) to `out`. The
/// first refused entry ends it with the reason, and nothing more of the
/// input is read. Headers are checked by a [`Guard`] before the tar crate
/// reads them.
pub fn check_and_rewrite<R: Read, W: Write>(input: R, out: W, plan: &Plan) -> Result<Summary> {
    let mut guard = Guard::new(input);
    let rewritten = rewrite(&mut guard, out, plan);
    // A refusal of the guard reaches the tar crate as a read error: the
    // guard says why.
    match guard.refused.take() {
        Some(refused) => Err(refused),
        None => rewritten,
    }
}

fn rewrite<R: Read, W: Write>(guard: &mut Guard<R>, out: W, plan: &Plan) -> Result<Summary> {
    use std::os::unix::ffi::OsStrExt;
    let refused = |reason: String| CopyError::Archive(reason);
    let mut archive = tar::Archive::new(&mut *guard);
    let mut builder = tar::Builder::new(out);
    let mut summary = Summary::default();
    // Paths of the archive so far: files (hard link targets) and symbolic links.
    let mut files: HashSet<Vec<u8>> = HashSet::new();
    let mut links: HashSet<Vec<u8>> = HashSet::new();
    let mut names = 0u64;
    let entries = archive
        .entries()
        .map_err(|e| refused(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| refused(format!("malformed archive: {e}")))?;
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            continue;
        }
        let raw = entry.path_bytes().into_owned();
        let link_len = entry.link_name_bytes().map_or(0, |l| l.len());
        if raw.len().max(link_len) > MAX_PATH {
            return Err(over_limit(format!(
                "an entry with a name or link target of {} bytes: at most {MAX_PATH}",
                raw.len().max(link_len)
            )));
        }
        names += (raw.len() + link_len) as u64;
        if names > MAX_NAME_BYTES {
            return Err(over_limit(format!(
                "the archive's names and link targets pass {MAX_NAME_BYTES} bytes"
            )));
        }
        let parts = entry_components(&raw).map_err(refused)?;
        let rel = join(&parts);
        let shown = String::from_utf8_lossy(&rel).escape_debug().to_string();
        if parts.is_empty() {
            // `./`: the destination itself is never changed.
            if kind == tar::EntryType::Directory {
                continue;
            }
            return Err(refused(format!(
                "an entry of type {kind:?} names the destination itself"
            )));
        }
        for i in 1..parts.len() {
            let prefix = join(&parts[..i]);
            if links.contains(&prefix) {
                return Err(refused(format!(
                    "{shown}: lies below the symbolic link {} of the same archive",
                    String::from_utf8_lossy(&prefix).escape_debug()
                )));
            }
        }
        let landing = if plan.destination == "/" {
            format!("/{}", String::from_utf8_lossy(&rel))
        } else {
            format!("{}/{}", plan.destination, String::from_utf8_lossy(&rel))
        };
        if let Some(f) = plan.forbidden.iter().find(|f| within(&landing, f)) {
            return Err(refused(format!(
                "{shown}: would land in {f}, where copies cannot write"
            )));
        }
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        let mtime = entry.header().mtime().unwrap_or(0);
        let mut header = tar::Header::new_gnu();
        header.set_uid(plan.uid);
        header.set_gid(plan.gid);
        header.set_mtime(mtime);
        header.set_mode(mode);
        let path = std::ffi::OsStr::from_bytes(&rel);
        let written = match kind {
            tar::EntryType::Regular => {
                let size = entry.size();
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(size);
                let mut counted = Counted {
                    inner: &mut entry,
                    count: 0,
                };
                let appended = builder.append_data(&mut header, path, &mut counted);
                if counted.count != size {
                    return Err(refused(format!(
                        "{shown}: the archive ends inside this file"
                    )));
                }
                summary.content_bytes += size;
                files.insert(rel.clone());
                links.remove(&rel);
                appended
            }
            tar::EntryType::Directory => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                files.remove(&rel);
                links.remove(&rel);
                builder.append_data(&mut header, path, std::io::empty())
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| refused(format!("{shown}: a symbolic link without a target")))?;
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                files.remove(&rel);
                links.insert(rel.clone());
                builder.append_link(&mut header, path, std::ffi::OsStr::from_bytes(&target))
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let target = join(&entry_components(&target).map_err(refused)?);
                if !files.contains(&target) {
                    return Err(refused(format!(
                        "{shown}: a hard link must point to a file earlier in the archive"
                    )));
                }
                header.set_entry_type(tar::EntryType::Link);
                header.set_size(0);
                files.insert(rel.clone());
                links.remove(&rel);
                builder.append_link(&mut header, path, std::ffi::OsStr::from_bytes(&target))
            }
            other => {
                return Err(refused(format!(
                    "{shown}: entries of type {other:?} are not allowed (only files, \
                     directories, symbolic and hard links)"
                )));
            }
        };
        written?;
        summary.entries += 1;
    }
    // A complete archive ends with its end-of-archive blocks: input that
    // stops without them was cut (a client or a connection gone mid-way),
    // and is refused rather than extracted in part.
    if guard.eof {
        return Err(refused(
            "the archive is incomplete: it ends without the end-of-archive marker".to_owned(),
        ));
    }
    builder.into_inner().and_then(|mut out| out.flush())?;
    Ok(summary)
}

/// A reader over chunks arriving on a channel (the spooling thread's end).
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

/// Boxed stream of copy results.
pub type CopyStream<T> = Pin<Box<dyn Stream<Item = Result<T>> + Send>>;

/// Copies of one kind running at once: at most `per_env` for one
/// environment, `per_user` for one caller and, when `total` is set, that
/// many in all.
struct Limiter {
    /// What the copies are, as a refusal names them.
    what: &'static str,
    per_env: usize,
    per_user: usize,
    total: Option<Arc<Semaphore>>,
    /// Copies running per key (`env:<id>`, `user:<id>`).
    running: Arc<Mutex<HashMap<String, usize>>>,
}

/// One running copy of a [`Limiter`]: freed when dropped.
#[must_use]
struct Slot {
    keys: [String; 2],
    running: Arc<Mutex<HashMap<String, usize>>>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            if let Some(n) = running.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    running.remove(key);
                }
            }
        }
    }
}

impl Limiter {
    fn new(what: &'static str, per_env: usize, per_user: usize, total: Option<usize>) -> Self {
        Limiter {
            what,
            per_env,
            per_user,
            total: total.map(|n| Arc::new(Semaphore::new(n))),
            running: Arc::default(),
        }
    }

    /// A slot for a copy of `env` by `user`, if it may run now: the
    /// environment's and the caller's caps first (a refusal for those
    /// callers only), then the total.
    fn take(&self, env: &str, user: &str) -> Result<Slot> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let keys = [format!("env:{env}"), format!("user:{user}")];
        for (key, whose, max) in [
            (&keys[0], "this environment", self.per_env),
            (&keys[1], "the caller", self.per_user),
        ] {
            if running.get(key).copied().unwrap_or(0) >= max {
                return Err(CopyError::Crowded {
                    whose,
                    what: self.what,
                    max,
                });
            }
        }
        let permit = match &self.total {
            Some(total) => Some(
                total
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| CopyError::Busy)?,
            ),
            None => None,
        };
        for key in &keys {
            *running.entry(key.clone()).or_default() += 1;
        }
        Ok(Slot {
            keys,
            running: self.running.clone(),
            _permit: permit,
        })
    }

    /// Copies of `env` running now.
    #[cfg(test)]
    fn running(&self, env: &str) -> usize {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.get(&format!("env:{env}")).copied().unwrap_or(0)
    }
}

/// The next non-empty chunk of a client's stream (`None`: it ended),
/// waiting at most `idle` (empty messages do not count as activity).
async fn next_data<S>(input: &mut S, idle: Duration) -> Result<Option<Bytes>>
where
    S: Stream<Item = Result<Bytes>> + Unpin,
{
    let next = async {
        while let Some(item) = input.next().await {
            let chunk = item?;
            if !chunk.is_empty() {
                return Ok(Some(chunk));
            }
        }
        Ok(None)
    };
    tokio::time::timeout(idle, next)
        .await
        .map_err(|_| CopyError::Idle { what: "sent", idle })?
}

/// Receives uploads into checked spool files: the spool directory, the
/// upload slots and the idle timeout.
#[derive(Clone)]
struct Spooler {
    dir: PathBuf,
    uploads: Arc<Limiter>,
    idle: Duration,
}

/// A checked archive waiting in its spool file, and the slot it holds.
struct Spooled {
    summary: Summary,
    file: std::fs::File,
    _slot: Slot,
}

impl Spooler {
    fn new(dir: PathBuf) -> Self {
        Spooler {
            dir,
            uploads: Arc::new(Limiter::new(
                "uploads being spooled",
                UPLOADS_PER_ENV,
                UPLOADS_PER_USER,
                Some(UPLOADS),
            )),
            idle: IDLE_TIMEOUT,
        }
    }

    /// A new unnamed spool file (gone when closed, and with the process).
    fn file(&self) -> Result<std::fs::File> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&self.dir)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(tempfile::tempfile_in(&self.dir)?)
    }

    /// Receives the archive of an upload to `env` from `input`, counting
    /// its bytes in `received` against `limit` (bytes; `limit_mb` as the
    /// refusal says it), and checks it against `plan` into an unnamed spool
    /// file. The upload slot is taken when the first data arrives; each
    /// wait for the client is bounded by the idle timeout. Any refusal
    /// leaves nothing but the error.
    async fn receive<S>(
        &self,
        (env, user): (&str, &str),
        plan: Plan,
        (limit_mb, limit): (i64, u64),
        input: &mut S,
        received: &mut u64,
    ) -> Result<Spooled>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        let mut next = next_data(input, self.idle).await?;
        let slot = self.uploads.take(env, user)?;
        let spool = self.file()?;
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        let checker = tokio::task::spawn_blocking(move || {
            let mut reader = ChannelReader {
                rx,
                current: Bytes::new(),
            };
            let mut out = std::io::BufWriter::with_capacity(SEND_CHUNK, spool);
            let checked = check_and_rewrite(&mut reader, &mut out, &plan);
            // Whatever follows the end of an accepted archive is read (and
            // counted by the receiving side), never extracted; a refused
            // one is not read further (the receiving side stops).
            if checked.is_ok() {
                let _ = std::io::copy(&mut reader, &mut std::io::sink());
            }
            let spool = out
                .into_inner()
                .map_err(|e| CopyError::Spool(e.into_error()));
            checked.and_then(|summary| spool.map(|file| (summary, file)))
        });

        // Receive everything, counting against the limit.
        let mut refused = None;
        while let Some(chunk) = next {
            if chunk.len() > MAX_CHUNK {
                refused = Some(invalid(
                    "data",
                    format!("chunks must be at most {MAX_CHUNK} bytes"),
                ));
                break;
            }
            *received += chunk.len() as u64;
            if *received > limit {
                refused = Some(CopyError::TooLarge { limit_mb });
                break;
            }
            if tx.send(chunk).await.is_err() {
                // The checker refused the archive (it reads to the end of
                // the input otherwise): it says why below.
                break;
            }
            next = match next_data(input, self.idle).await {
                Ok(next) => next,
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            };
        }
        drop(tx);
        let checked = checker
            .await
            .map_err(|e| CopyError::Spool(std::io::Error::other(e)))?;
        if let Some(refused) = refused {
            return Err(refused);
        }
        let (summary, file) = checked?;
        Ok(Spooled {
            summary,
            file,
            _slot: slot,
        })
    }
}

/// Sends a spooled archive to a CopyFrom's client in [`SEND_CHUNK`]
/// messages, counting them in `sent`; a client that reads nothing for
/// `idle` ends it (`files.copy_idle`).
async fn send_spool(
    mut spool: tokio::fs::File,
    client: &mpsc::Sender<Result<Bytes>>,
    idle: Duration,
    sent: &mut u64,
) -> Result<()> {
    loop {
        let mut buf = BytesMut::zeroed(SEND_CHUNK);
        let n = spool.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        buf.truncate(n);
        match tokio::time::timeout(idle, client.send(Ok(buf.freeze()))).await {
            Ok(Ok(())) => *sent += n as u64,
            Ok(Err(_)) => return Err(CopyError::Cancelled("the client went away".into())),
            Err(_) => return Err(CopyError::Idle { what: "read", idle }),
        }
    }
}

/// The copy operations of one orchestrator (cheap to clone).
#[derive(Clone)]
pub struct Copier {
    orchestrator: Orchestrator,
    spooler: Spooler,
    downloads: Arc<Limiter>,
}

/// What a CopyTo or CopyFrom did, for its audit event.
struct Done<'a> {
    action: &'static str,
    rec: &'a EnvRecord,
    path: String,
    bytes: u64,
    entries: Option<u64>,
}

impl Copier {
    /// Copies for `orchestrator`, spooling uploads in `spool_dir`.
    pub fn new(orchestrator: Orchestrator, spool_dir: PathBuf) -> Self {
        Copier {
            orchestrator,
            spooler: Spooler::new(spool_dir),
            downloads: Arc::new(Limiter::new(
                "downloads",
                DOWNLOADS_PER_ENV,
                DOWNLOADS_PER_USER,
                Some(DOWNLOADS),
            )),
        }
    }

    /// Records the one audit event of a copy.
    async fn audit(
        &self,
        caller: &Caller,
        done: Done<'_>,
        error: Option<&CopyError>,
    ) -> Result<()> {
        let mut details = vec![("path", done.path), ("bytes", done.bytes.to_string())];
        if let Some(entries) = done.entries {
            details.push(("entries", entries.to_string()));
        }
        let (outcome, severity) = match error {
            None => (Outcome::Success, Severity::Low),
            Some(e) => {
                details.push(("error", e.to_string()));
                (Outcome::Failure, Severity::Medium)
            }
        };
        self.orchestrator
            .audit()
            .record(Event {
                action: done.action,
                outcome,
                severity,
                caller: Some(caller),
                team_id: &done.rec.team_id,
                environment_id: &done.rec.id,
                details,
            })
            .await
            .map_err(|e| CopyError::Orchestrator(Error::Audit(e)))
    }

    /// The environment's record and container, if it may be copied to or
    /// from now.
    fn usable(rec: &EnvRecord, operation: &'static str) -> Result<String> {
        crate::operations::not_in_progress(rec, operation).map_err(CopyError::Orchestrator)?;
        if rec.state != State::Running {
            return Err(CopyError::Orchestrator(Error::BadState {
                state: rec.state.as_str(),
                operation,
            }));
        }
        rec.container_id
            .clone()
            .ok_or(CopyError::Orchestrator(Error::BadState {
                state: "creating",
                operation,
            }))
    }

    /// Extracts the archive arriving on `input` into the directory `path` of
    /// an environment (see the module docs); returns the archive bytes
    /// received.
    pub async fn copy_to<S>(
        &self,
        caller: &Caller,
        environment_id: &str,
        path: &str,
        input: S,
    ) -> Result<u64>
    where
        S: Stream<Item = Result<Bytes>> + Send + Unpin,
    {
        let rec = self.orchestrator.get(environment_id).await?;
        let _session = self.orchestrator.session(&rec.id);
        let mut received = 0u64;
        let mut entries = None;
        let mut shown = shown(path);
        let result = self
            .copy_to_inner(
                (&rec, &caller.user_id),
                path,
                input,
                &mut received,
                &mut entries,
                &mut shown,
            )
            .await;
        let done = Done {
            action: "environment.copy_to",
            rec: &rec,
            path: shown,
            bytes: received,
            entries,
        };
        self.audit(caller, done, result.as_ref().err()).await?;
        result.map(|()| received)
    }

    async fn copy_to_inner<S>(
        &self,
        (rec, user): (&EnvRecord, &str),
        path: &str,
        mut input: S,
        received: &mut u64,
        entries: &mut Option<u64>,
        shown: &mut String,
    ) -> Result<()>
    where
        S: Stream<Item = Result<Bytes>> + Send + Unpin,
    {
        let destination = normalize(path)?;
        shown.clone_from(&destination);
        if let Some(r) = reserved(&destination) {
            return Err(invalid("path", reserved_reason(&destination, r)));
        }
        let cid = Self::usable(rec, "copy files into")?;
        let spec = Orchestrator::spec_of(rec);
        no_bind_mounts(&spec)?;
        let tmpfs = tmpfs_targets(&spec);
        not_on_tmpfs(&destination, &tmpfs)?;
        let (limit_mb, limit) = limit_bytes(&spec);

        // The destination must be a directory (a symbolic link to one is
        // followed by the engine: check where it leads, and extract there).
        let mut target = destination.clone();
        let mut found = self.stat(&cid, &target).await?;
        if found.file_mode & GO_MODE_SYMLINK != 0 {
            target = normalize(&found.link_target).map_err(|_| CopyError::Refused {
                rule: "files.engine",
                subject: "path".into(),
                reason: format!("{destination} is a symbolic link the engine cannot resolve"),
            })?;
            if let Some(r) = reserved(&target) {
                return Err(invalid(
                    "path",
                    format!("{destination} leads to {r}, where copies cannot write"),
                ));
            }
            not_on_tmpfs(&target, &tmpfs)?;
            found = self.stat(&cid, &target).await?;
        }
        if found.file_mode & GO_MODE_DIR == 0 {
            return Err(CopyError::Refused {
                rule: "files.not_a_directory",
                subject: "path".into(),
                reason: format!("{destination} is not a directory in the environment"),
            });
        }
        let (uid, gid) = self.owner(&cid).await?;
        let mut forbidden: Vec<String> = RESERVED.iter().map(|r| (*r).to_owned()).collect();
        forbidden.extend(tmpfs);
        let plan = Plan {
            destination: target.clone(),
            uid,
            gid,
            forbidden,
        };

        let spooled = self
            .spooler
            .receive(
                (&rec.id, user),
                plan,
                (limit_mb, limit),
                &mut input,
                received,
            )
            .await?;
        *entries = Some(spooled.summary.entries);

        // Only a complete, checked archive reaches the engine.
        let mut file = tokio::fs::File::from_std(spooled.file);
        tokio::io::AsyncSeekExt::rewind(&mut file).await?;
        let body = futures::stream::unfold(file, |mut file| async move {
            let mut buf = BytesMut::zeroed(SEND_CHUNK);
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(buf.freeze()), file))
                }
                Err(e) => Some((Err(e), file)),
            }
        });
        let cid = rec.container_id.clone().unwrap_or_default();
        self.orchestrator
            .docker()
            .upload_to_container(
                &cid,
                Some(
                    UploadToContainerOptionsBuilder::new()
                        .path(&target)
                        .no_overwrite_dir_non_dir("true")
                        .build(),
                ),
                bollard::body_try_stream(body),
            )
            .await
            .map_err(|e| engine(&destination, e))?;
        Ok(())
    }

    /// Streams a path of an environment (file or directory) as a tar
    /// archive, ending with `files.copy_limit` once it passes the limit.
    pub async fn copy_from(
        &self,
        caller: &Caller,
        environment_id: &str,
        path: &str,
    ) -> Result<CopyStream<Bytes>> {
        let rec = self.orchestrator.get(environment_id).await?;
        let session = self.orchestrator.session(&rec.id);
        let mut shown = shown(path);
        let prepared = self
            .copy_from_prepare((&rec, &caller.user_id), path, &mut shown)
            .await;
        let (cid, source, limit_mb, limit, slot) = match prepared {
            Ok(p) => p,
            Err(e) => {
                let done = Done {
                    action: "environment.copy_from",
                    rec: &rec,
                    path: shown,
                    bytes: 0,
                    entries: None,
                };
                self.audit(caller, done, Some(&e)).await?;
                return Err(e);
            }
        };
        let (tx, rx) = mpsc::channel::<Result<Bytes>>(4);
        let idle = self.spooler.idle;
        let this = self.clone();
        let caller = caller.clone();
        // The copy outlives the call: keep its span for the audit event.
        let span = tracing::Span::current();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let _session = session;
                let _slot = slot;
                let mut sent = 0u64;
                let result = match this.download(&cid, &source, (limit_mb, limit), &tx).await {
                    Ok(spool) => send_spool(spool, &tx, idle, &mut sent).await,
                    Err(e) => Err(e),
                };
                let done = Done {
                    action: "environment.copy_from",
                    rec: &rec,
                    path: source.clone(),
                    bytes: sent,
                    entries: None,
                };
                let audited = this.audit(&caller, done, result.as_ref().err()).await;
                if let Err(e) = result.and(audited) {
                    // A client that reads nothing does not hold the copy.
                    let _ = tokio::time::timeout(idle, tx.send(Err(e))).await;
                }
            },
            span,
        ));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    /// Reads the engine's archive of `source` whole into an unnamed spool
    /// file (rewound), stopping with `files.copy_limit` once it passes the
    /// limit. The engine holds the container's lock while it streams an
    /// archive (its stat and inspect of the container wait meanwhile, the
    /// reconciler's too): a client that reads slowly must not hold it, so
    /// the engine is read at its own pace and the client from the spool.
    async fn download(
        &self,
        cid: &str,
        source: &str,
        (limit_mb, limit): (i64, u64),
        client: &mpsc::Sender<Result<Bytes>>,
    ) -> Result<tokio::fs::File> {
        use tokio::io::AsyncWriteExt;
        let mut spool = tokio::fs::File::from_std(self.spooler.file()?);
        let mut archive = self.orchestrator.docker().download_from_container(
            cid,
            Some(
                DownloadFromContainerOptionsBuilder::new()
                    .path(source)
                    .build(),
            ),
        );
        let mut size = 0u64;
        while let Some(item) = archive.next().await {
            let chunk = item.map_err(|e| engine(source, e))?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(CopyError::TooLarge { limit_mb });
            }
            if client.is_closed() {
                return Err(CopyError::Cancelled("the client went away".into()));
            }
            spool.write_all(&chunk).await?;
        }
        drop(archive);
        spool.flush().await?;
        tokio::io::AsyncSeekExt::rewind(&mut spool).await?;
        Ok(spool)
    }

    /// Checks a CopyFrom before a byte moves: its path, the environment,
    /// its downloads running, a single file over the limit.
    async fn copy_from_prepare(
        &self,
        (rec, user): (&EnvRecord, &str),
        path: &str,
        shown: &mut String,
    ) -> Result<(String, String, i64, u64, Slot)> {
        let source = normalize(path)?;
        shown.clone_from(&source);
        let cid = Self::usable(rec, "copy files from")?;
        let slot = self.downloads.take(&rec.id, user)?;
        let spec = Orchestrator::spec_of(rec);
        no_bind_mounts(&spec)?;
        not_on_tmpfs(&source, &tmpfs_targets(&spec))?;
        let (limit_mb, limit) = limit_bytes(&spec);
        let found = self.stat(&cid, &source).await?;
        if found.file_mode & GO_MODE_TYPE == 0 && found.size.max(0) as u64 > limit {
            return Err(CopyError::TooLarge { limit_mb });
        }
        Ok((cid, source, limit_mb, limit, slot))
    }

    /// The engine's stat of a path in the container.
    async fn stat(&self, cid: &str, path: &str) -> Result<bollard::container::PathStatResponse> {
        self.orchestrator
            .docker()
            .get_container_archive_info(
                cid,
                Some(ContainerArchiveInfoOptionsBuilder::new().path(path).build()),
            )
            .await
            .map_err(|e| engine(path, e))
    }

    /// The uid and gid the container runs as (its configured user: numeric,
    /// or names resolved in its own account files).
    async fn owner(&self, cid: &str) -> Result<(u64, u64)> {
        let docker = self.orchestrator.docker();
        let inspected = docker
            .inspect_container(cid, None)
            .await
            .map_err(|e| CopyError::Orchestrator(Error::Docker(e)))?;
        let user = inspected.config.and_then(|c| c.user).unwrap_or_default();
        let (name, group) = match user.split_once(':') {
            Some((u, g)) => (u.to_owned(), Some(g.to_owned())),
            None => (user.clone(), None),
        };
        if name.is_empty() {
            // No user anywhere: the container runs as root, and so do its files.
            return Ok((0, 0));
        }
        let numeric = |s: &str| s.parse::<u32>().ok().map(u64::from);
        if let (Some(uid), Some(gid)) = (numeric(&name), group.as_deref().and_then(numeric)) {
            return Ok((uid, gid));
        }
        let unresolved = |what: &str| CopyError::Refused {
            rule: "files.owner",
            subject: "spec.user".into(),
            reason: format!(
                "cannot resolve the environment's {what} {user:?} in its /etc/passwd or \
                 /etc/group (use a numeric uid:gid)"
            ),
        };
        let passwd = self.account_file(cid, "/etc/passwd").await?;
        let account = passwd.as_deref().and_then(|text| {
            text.lines().find_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                let (uid, gid) = (numeric(fields.get(2)?)?, numeric(fields.get(3)?)?);
                (fields[0] == name || numeric(&name) == Some(uid)).then_some((uid, gid))
            })
        });
        let uid = match (numeric(&name), account) {
            (Some(uid), _) => uid,
            (None, Some((uid, _))) => uid,
            (None, None) => return Err(unresolved("user")),
        };
        let gid = match group.as_deref() {
            Some(g) => match numeric(g) {
                Some(gid) => gid,
                None => {
                    let groups = self.account_file(cid, "/etc/group").await?;
                    groups
                        .as_deref()
                        .and_then(|text| {
                            text.lines().find_map(|line| {
                                let fields: Vec<&str> = line.split(':').collect();
                                (fields.first() == Some(&g))
                                    .then(|| numeric(fields.get(2)?))
                                    .flatten()
                            })
                        })
                        .ok_or_else(|| unresolved("group"))?
                }
            },
            // As the runtime does: the account's group, else root's group.
            None => account.map_or(0, |(_, gid)| gid),
        };
        Ok((uid, gid))
    }

    /// A small regular file of the container (`None`: missing or not one).
    async fn account_file(&self, cid: &str, path: &str) -> Result<Option<String>> {
        let mut archive = self.orchestrator.docker().download_from_container(
            cid,
            Some(
                DownloadFromContainerOptionsBuilder::new()
                    .path(path)
                    .build(),
            ),
        );
        let mut bytes = Vec::new();
        while let Some(item) = archive.next().await {
            match item {
                Ok(chunk) => {
                    bytes.extend_from_slice(&chunk);
                    if bytes.len() > MAX_ACCOUNT_FILE + 64 * 1024 {
                        return Ok(None);
                    }
                }
                Err(DockerError::DockerResponseServerError {
                    status_code: 404, ..
                }) => return Ok(None),
                Err(e) => return Err(CopyError::Orchestrator(Error::Docker(e))),
            }
        }
        let mut tar = tar::Archive::new(bytes.as_slice());
        let Ok(mut entries) = tar.entries() else {
            return Ok(None);
        };
        let Some(Ok(mut entry)) = entries.next() else {
            return Ok(None);
        };
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Ok(None);
        }
        let mut text = String::new();
        Ok(entry.read_to_string(&mut text).ok().map(|_| text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            destination: "/workspace".into(),
            uid: 1000,
            gid: 1000,
            forbidden: RESERVED.iter().map(|r| (*r).to_owned()).collect(),
        }
    }

    /// A raw archive whose headers say exactly what the test wants (the
    /// tar crate's builder refuses some of the paths attackers send).
    fn raw_entry(out: &mut Vec<u8>, name: &[u8], kind: u8, link: &[u8], data: &[u8], mode: u32) {
        let mut header = tar::Header::new_old();
        {
            let bytes = header.as_old_mut();
            bytes.name[..name.len()].copy_from_slice(name);
            bytes.linkname[..link.len()].copy_from_slice(link);
        }
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(data.len() as u64);
        header.set_mtime(1_700_000_000);
        header.as_old_mut().linkflag[0] = kind;
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        out.extend(std::iter::repeat_n(0u8, pad));
    }

    fn finish(mut out: Vec<u8>) -> Vec<u8> {
        out.extend(std::iter::repeat_n(0u8, 1024));
        out
    }

    fn rewrite(archive: &[u8], plan: &Plan) -> std::result::Result<Vec<u8>, String> {
        let mut out = Vec::new();
        check_and_rewrite(archive, &mut out, plan)
            .map(|_| out)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn paths_are_absolute_normalized_and_free_of_control_characters() {
        assert_eq!(normalize("//workspace/./a/../b/").unwrap(), "/workspace/b");
        assert_eq!(normalize("/../../etc").unwrap(), "/etc");
        assert_eq!(normalize("/").unwrap(), "/");
        for bad in ["", "workspace", "./x", "/a\0b", "/a\nb"] {
            assert!(
                matches!(
                    normalize(bad),
                    Err(CopyError::Invalid { field: "path", .. })
                ),
                "{bad:?}"
            );
        }
        assert!(normalize(&format!("/{}", "a".repeat(5000))).is_err());
        // What the audit records of a refused path: escaped and bounded,
        // cut on a character boundary.
        assert_eq!(shown("/a\0b"), "/a\\0b");
        let long = shown(&format!("/{}", "é".repeat(3000)));
        assert!(
            long.len() <= MAX_PATH && long.ends_with('é'),
            "{}",
            long.len()
        );
        assert_eq!(reserved("/proc/self"), Some("/proc"));
        assert_eq!(reserved("/dev"), Some("/dev"));
        assert_eq!(reserved("/etc/hosts"), Some("/etc/hosts"));
        assert_eq!(reserved("/devices"), None);
        assert_eq!(reserved("/etc"), None);
    }

    #[test]
    fn limits_default_and_zero_turns_copying_off() {
        let spec = |mb| ContainerSpec {
            copy_limit_mb: mb,
            ..Default::default()
        };
        assert_eq!(limit_bytes(&spec(None)), (1024, 1024 * MIB));
        assert_eq!(limit_bytes(&spec(Some(2))), (2, 2 * MIB));
        assert_eq!(limit_bytes(&spec(Some(0))), (0, 0));
        assert_eq!(limit_bytes(&spec(Some(-5))), (0, 0));
    }

    #[test]
    fn a_good_archive_is_rewritten_for_the_environments_user() {
        let mut archive = Vec::new();
        raw_entry(&mut archive, b"./", b'5', b"", b"", 0o700);
        raw_entry(&mut archive, b"./dir/", b'5', b"", b"", 0o2755);
        raw_entry(
            &mut archive,
            b"./dir/tool",
            b'0',
            b"",
            b"#!/bin/sh\n",
            0o4755,
        );
        raw_entry(&mut archive, b"./dir/rel", b'2', b"tool", b"", 0o777);
        // A symbolic link may point anywhere: it is stored, never followed.
        raw_entry(&mut archive, b"./dir/abs", b'2', b"/etc/passwd", b"", 0o777);
        raw_entry(&mut archive, b"./dir/hard", b'1', b"dir/tool", b"", 0o644);
        let long = format!("dir/{}", "n".repeat(150));
        // A long name through the tar crate's own writer (GNU long name).
        let mut builder = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o600);
        h.set_uid(0);
        builder.append_data(&mut h, &long, &b"abc"[..]).unwrap();
        let long_part = builder.into_inner().unwrap();
        archive.extend_from_slice(&long_part);
        let archive = finish(archive);

        let out = rewrite(&archive, &plan()).expect("accepted");
        let mut read = tar::Archive::new(out.as_slice());
        let mut seen = Vec::new();
        for entry in read.entries().unwrap() {
            let mut entry = entry.unwrap();
            let h = entry.header().clone();
            let path = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (1000, 1000), "{path}");
            assert_eq!(
                h.mode().unwrap() & !0o777,
                0,
                "{path}: no set-id or sticky bits"
            );
            if let Some(target) = entry.link_name_bytes() {
                data = target.into_owned();
            }
            seen.push((path, h.entry_type(), data));
        }
        let names: Vec<&str> = seen.iter().map(|(p, _, _)| p.as_str()).collect();
        assert_eq!(
            names,
            [
                "dir",
                "dir/tool",
                "dir/rel",
                "dir/abs",
                "dir/hard",
                long.as_str()
            ],
            "the destination itself (./) is left alone"
        );
        assert_eq!(seen[1].2, b"#!/bin/sh\n");
        assert_eq!(seen[1].1, tar::EntryType::Regular);
        assert_eq!(seen[2].1, tar::EntryType::Symlink);
        assert_eq!(seen[2].2, b"tool", "a relative link target is kept");
        assert_eq!(seen[3].1, tar::EntryType::Symlink);
        assert_eq!(seen[3].2, b"/etc/passwd", "an absolute link target is kept");
        assert_eq!(seen[4].1, tar::EntryType::Link);
        assert_eq!(seen[4].2, b"dir/tool");
        assert_eq!(seen[5].2, b"abc");
    }

    #[test]
    fn hostile_entries_refuse_the_whole_archive() {
        let cases: Vec<(&str, &str, Vec<u8>)> = vec![
            ("absolute", "absolute paths", {
                let mut a = Vec::new();
                raw_entry(&mut a, b"/etc/passwd", b'0', b"", b"x", 0o644);
                a
            }),
            ("dotdot", "'..' is not allowed", {
                let mut a = Vec::new();
                raw_entry(&mut a, b"a/../../etc/x", b'0', b"", b"x", 0o644);
                a
            }),
            ("char device", "Char", {
                let mut a = Vec::new();
                raw_entry(&mut a, b"null", b'3', b"", b"", 0o666);
                a
            }),
            ("block device", "Block", {
                let mut a = Vec::new();
                raw_entry(&mut a, b"sda", b'4', b"", b"", 0o666);
                a
            }),
            ("fifo", "Fifo", {
                let mut a = Vec::new();
                raw_entry(&mut a, b"pipe", b'6', b"", b"", 0o666);
                a
            }),
            (
                "below a symlink of the archive",
                "below the symbolic link escape",
                {
                    let mut a = Vec::new();
                    raw_entry(&mut a, b"escape", b'2', b"/proc", b"", 0o777);
                    raw_entry(&mut a, b"escape/x", b'0', b"", b"x", 0o644);
                    a
                },
            ),
            ("hard link outside", "'..' is not allowed", {
                let mut a = Vec::new();
                raw_entry(&mut a, b"h", b'1', b"../../etc/shadow", b"", 0o644);
                a
            }),
            ("hard link to nothing", "earlier in the archive", {
                let mut a = Vec::new();
                raw_entry(&mut a, b"h", b'1', b"missing", b"", 0o644);
                a
            }),
        ];
        for (what, why, entries) in cases {
            let archive = finish(entries);
            let refused = rewrite(&archive, &plan()).unwrap_err();
            assert!(refused.contains(why), "{what}: {refused}");
        }
        // Landing in a reserved path from the root.
        let mut a = Vec::new();
        raw_entry(&mut a, b"proc/x", b'0', b"", b"x", 0o644);
        let root = Plan {
            destination: "/".into(),
            ..plan()
        };
        let e = rewrite(&finish(a), &root).unwrap_err();
        assert!(e.contains("/proc"), "{e}");
        // Truncated inside a file.
        let mut a = Vec::new();
        raw_entry(&mut a, b"big", b'0', b"", &[7u8; 2000], 0o644);
        a.truncate(1024);
        let e = rewrite(&a, &plan()).unwrap_err();
        assert!(e.contains("ends inside this file"), "{e}");
        // Cut at an entry boundary: no end-of-archive marker.
        let mut a = Vec::new();
        raw_entry(&mut a, b"one", b'0', b"", b"1", 0o644);
        let e = rewrite(&a, &plan()).unwrap_err();
        assert!(e.contains("incomplete"), "{e}");
        let e = rewrite(&[], &plan()).unwrap_err();
        assert!(e.contains("incomplete"), "{e}");
        // Not a tar at all.
        let e = rewrite(&[1u8; 4096], &plan()).unwrap_err();
        assert!(e.contains("malformed"), "{e}");
    }

    #[test]
    fn statuses_name_the_rule_or_field() {
        let s = Status::from(CopyError::TooLarge { limit_mb: 1 });
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(s.message().contains("copy limit of 1 MiB"), "{s:?}");
        let s = Status::from(normalize("relative").unwrap_err());
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.message().starts_with("invalid path"), "{s:?}");
        let s = Status::from(CopyError::Archive("x".into()));
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let s = Status::from(
            no_bind_mounts(&ContainerSpec {
                mounts: vec![vibebox_proto::environment::Mount {
                    r#type: MountType::Bind as i32,
                    source: "/srv".into(),
                    target: "/srv".into(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .unwrap_err(),
        );
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            vibebox_server_kit::status::violated_rules(&s),
            ["files.bind_mount"]
        );
        let s = Status::from(engine(
            "/nope",
            DockerError::DockerResponseServerError {
                status_code: 404,
                message: "Could not find the file /nope in container 1f2e3d".into(),
            },
        ));
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert!(!s.message().contains("1f2e3d"), "{}", s.message());
    }

    /// A reader over blocks made on demand (archives too large to hold),
    /// counting what was read of it.
    struct Made<I> {
        blocks: I,
        current: Vec<u8>,
        at: usize,
        read: u64,
    }

    fn made<I: Iterator<Item = Vec<u8>>>(blocks: I) -> Made<I> {
        Made {
            blocks,
            current: Vec::new(),
            at: 0,
            read: 0,
        }
    }

    impl<I: Iterator<Item = Vec<u8>>> Read for Made<I> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            while self.at == self.current.len() {
                match self.blocks.next() {
                    Some(next) => (self.current, self.at) = (next, 0),
                    None => return Ok(0),
                }
            }
            let n = buf.len().min(self.current.len() - self.at);
            buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
            self.at += n;
            self.read += n as u64;
            Ok(n)
        }
    }

    /// A GNU header block (the tar crate treats its extension headers as
    /// such) of `kind` declaring `size` bytes (octal, or base-256 past 8 GiB).
    fn gnu_header(name: &[u8], kind: u8, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    /// `data` padded to whole blocks.
    fn padded(data: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        out.extend(std::iter::repeat_n(0u8, (512 - data.len() % 512) % 512));
        out
    }

    fn rule_of(e: CopyError) -> (String, Vec<String>) {
        let message = e.to_string();
        let status = Status::from(e);
        (message, vibebox_server_kit::status::violated_rules(&status))
    }

    #[test]
    fn huge_long_name_and_pax_headers_are_refused_before_they_are_read() {
        // 1 GiB (octal) and 1 TiB (base-256) declared; 8 MiB supplied.
        for size in [1 << 30, 1 << 40] {
            for kind in [b'L', b'K', b'x', b'g'] {
                let mut input = made(
                    std::iter::once(gnu_header(b"././@LongLink", kind, size))
                        .chain(std::iter::repeat_n(vec![b'a'; 64 * 1024], 128)),
                );
                let e = check_and_rewrite(&mut input, std::io::sink(), &plan()).unwrap_err();
                let (message, rules) = rule_of(e);
                assert_eq!(rules, ["files.archive_limits"], "{kind} {size}: {message}");
                assert!(
                    message.contains(&format!("{size} bytes")) && message.contains("65536"),
                    "{message}"
                );
                assert_eq!(
                    input.read, 512,
                    "{kind} {size}: nothing past the header was read"
                );
            }
        }
        // A long name within the body limit but over 4096 bytes.
        let name = vec![b'n'; 5000];
        let mut a = gnu_header(b"././@LongLink", b'L', name.len() as u64 + 1);
        a.extend(padded(&[name.as_slice(), b"\0"].concat()));
        raw_entry(&mut a, b"short", b'0', b"", b"x", 0o644);
        let (message, rules) =
            rule_of(check_and_rewrite(&finish(a)[..], std::io::sink(), &plan()).unwrap_err());
        assert_eq!(rules, ["files.archive_limits"], "{message}");
        assert!(message.contains("at most 4096"), "{message}");
        // The same through a PAX path record.
        let record = format!("{} path={}\n", 5000 + 11, "p".repeat(5000));
        assert_eq!(record.len(), 5011);
        let mut a = gnu_header(b"pax", b'x', record.len() as u64);
        a[257..265].copy_from_slice(b"ustar\x0000");
        let mut h = tar::Header::from_byte_slice(&a[..512]).clone();
        h.set_cksum();
        a[..512].copy_from_slice(h.as_bytes());
        a.extend(padded(record.as_bytes()));
        raw_entry(&mut a, b"short", b'0', b"", b"x", 0o644);
        let (message, rules) =
            rule_of(check_and_rewrite(&finish(a)[..], std::io::sink(), &plan()).unwrap_err());
        assert_eq!(rules, ["files.archive_limits"], "{message}");
        assert!(message.contains("5000 bytes: at most 4096"), "{message}");
    }

    #[test]
    fn pax_sizes_frame_the_archive_as_the_tar_crate_reads_it() {
        let pax = |size: u64| {
            let record = format!("{} size={size}\n", 8 + size.to_string().len());
            let mut a = gnu_header(b"pax", b'x', record.len() as u64);
            a.extend(padded(record.as_bytes()));
            a
        };
        // The PAX size replaces the header's: five bytes of data.
        let mut a = pax(5);
        raw_entry(&mut a, b"five", b'0', b"", b"", 0o644);
        a.extend(padded(b"12345"));
        let out = rewrite(&finish(a), &plan()).expect("accepted");
        let mut read = tar::Archive::new(out.as_slice());
        let mut entry = read.entries().unwrap().next().unwrap().unwrap();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        assert_eq!(data, b"12345");
        // A header hidden in what its own header calls data, where the PAX
        // size (0) says the next header is: checked as a header.
        let mut a = pax(0);
        let mut hidden = gnu_header(b"././@LongLink", b'L', 1 << 30);
        hidden.extend(std::iter::repeat_n(b'a', 512));
        raw_entry(&mut a, b"cover", b'0', b"", &hidden, 0o644);
        let mut input = made(std::iter::once(a).chain(std::iter::repeat_n(vec![b'a'; 65536], 64)));
        let e = check_and_rewrite(&mut input, std::io::sink(), &plan()).unwrap_err();
        let (message, rules) = rule_of(e);
        assert_eq!(rules, ["files.archive_limits"], "{message}");
        assert!(input.read < 64 * 1024, "{} bytes read", input.read);
    }

    #[test]
    fn entry_and_name_floods_are_refused() {
        // MAX_ENTRIES empty files are fine; one more is not.
        let files = |n: u64| {
            (0..n)
                .map(|i| {
                    let mut block = Vec::new();
                    raw_entry(
                        &mut block,
                        format!("f{i}").as_bytes(),
                        b'0',
                        b"",
                        b"",
                        0o644,
                    );
                    block
                })
                .chain(std::iter::once(vec![0u8; 1024]))
        };
        let summary = check_and_rewrite(made(files(MAX_ENTRIES)), std::io::sink(), &plan())
            .expect("as many entries as allowed");
        assert_eq!(summary.entries, MAX_ENTRIES);
        let mut input = made(files(MAX_ENTRIES + 1));
        let (message, rules) =
            rule_of(check_and_rewrite(&mut input, std::io::sink(), &plan()).unwrap_err());
        assert_eq!(rules, ["files.archive_limits"], "{message}");
        assert!(message.contains("more than 100000 entries"), "{message}");
        // Names of 4000 bytes until they pass MAX_NAME_BYTES.
        let long = (0..)
            .flat_map(|i: u64| {
                let name = format!("{i:0>4000}");
                let mut block = gnu_header(b"././@LongLink", b'L', 4001);
                block.extend(padded(&[name.as_bytes(), b"\0"].concat()));
                raw_entry(&mut block, b"x", b'0', b"", b"", 0o644);
                [block]
            })
            .take((MAX_NAME_BYTES / 4000 + 2) as usize)
            .chain(std::iter::once(vec![0u8; 1024]));
        let (message, rules) =
            rule_of(check_and_rewrite(made(long), std::io::sink(), &plan()).unwrap_err());
        assert_eq!(rules, ["files.archive_limits"], "{message}");
        assert!(message.contains("names and link targets"), "{message}");
    }

    fn stream_of(
        chunks: Vec<Bytes>,
        then_stall: bool,
    ) -> Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>> {
        let chunks = futures::stream::iter(chunks.into_iter().map(Ok));
        if then_stall {
            Box::pin(chunks.chain(futures::stream::pending()))
        } else {
            Box::pin(chunks)
        }
    }

    fn good_archive() -> Bytes {
        let mut a = Vec::new();
        raw_entry(&mut a, b"one.txt", b'0', b"", b"one\n", 0o644);
        Bytes::from(finish(a))
    }

    /// Runs one upload to `env` on `spooler`: its summary or refusal.
    fn upload(
        spooler: &Spooler,
        env: &'static str,
        mut input: Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>,
    ) -> tokio::task::JoinHandle<Result<Summary>> {
        let spooler = spooler.clone();
        tokio::spawn(async move {
            let mut received = 0;
            spooler
                .receive((env, env), plan(), (1, MIB), &mut input, &mut received)
                .await
                .map(|spooled| spooled.summary)
        })
    }

    #[tokio::test]
    async fn stalled_uploads_do_not_block_another_environments_copy() {
        let dir = tempfile::tempdir().unwrap();
        let spooler = Spooler {
            idle: Duration::from_secs(3600),
            ..Spooler::new(dir.path().to_owned())
        };
        let part = good_archive().slice(..512);
        // Streams that send nothing hold no slot, however many.
        let silent: Vec<_> = (0..3)
            .map(|_| upload(&spooler, "a", stream_of(vec![], true)))
            .collect();
        // Two that sent part of an archive and stall hold the two of "a".
        let stalled: Vec<_> = (0..2)
            .map(|_| upload(&spooler, "a", stream_of(vec![part.clone()], true)))
            .collect();
        while spooler.uploads.running("a") < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A third upload to "a" is refused, to its caller only.
        let crowded = upload(&spooler, "a", stream_of(vec![part.clone()], true))
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(crowded, CopyError::Crowded { max: 2, .. }),
            "{crowded}"
        );
        let s = Status::from(crowded);
        assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
        assert!(s.message().contains("already has 2 uploads"), "{s:?}");
        // Another environment copies meanwhile.
        let summary = upload(&spooler, "b", stream_of(vec![good_archive()], false))
            .await
            .unwrap()
            .expect("a copy to another environment");
        assert_eq!(summary.entries, 1);
        assert_eq!(spooler.uploads.running("b"), 0, "its slot was freed");
        // Once the stalled ones end, "a" copies again.
        for task in stalled {
            task.abort();
            assert!(task.await.unwrap_err().is_cancelled());
        }
        assert_eq!(spooler.uploads.running("a"), 0);
        upload(&spooler, "a", stream_of(vec![good_archive()], false))
            .await
            .unwrap()
            .expect("a copy to a once the stalled uploads ended");
        for task in silent {
            assert!(!task.is_finished(), "a silent upload waits");
            task.abort();
        }
    }

    #[tokio::test]
    async fn an_idle_upload_fails_naming_the_rule_and_frees_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        let spooler = Spooler {
            idle: Duration::from_millis(100),
            ..Spooler::new(dir.path().to_owned())
        };
        let part = good_archive().slice(..512);
        let silent = upload(&spooler, "a", stream_of(vec![], true));
        let stalled = upload(&spooler, "a", stream_of(vec![part], true));
        for task in [silent, stalled] {
            let e = task.await.unwrap().unwrap_err();
            assert!(matches!(e, CopyError::Idle { what: "sent", .. }), "{e}");
            let s = Status::from(e);
            assert_eq!(s.code(), tonic::Code::DeadlineExceeded, "{s:?}");
            assert_eq!(
                vibebox_server_kit::status::violated_rules(&s),
                ["files.copy_idle"]
            );
            assert!(s.message().contains("the copy was abandoned"), "{s:?}");
        }
        assert_eq!(spooler.uploads.running("a"), 0, "the slot was freed");
        assert_eq!(
            std::fs::read_dir(dir.path().join("")).unwrap().count(),
            0,
            "no spool file is left"
        );
    }

    #[test]
    fn copies_are_capped_per_environment_per_caller_then_in_all() {
        let limiter = Limiter::new("uploads", 2, 3, Some(4));
        let a1 = limiter.take("a", "ann").unwrap();
        let _a2 = limiter.take("a", "bob").unwrap();
        assert!(matches!(
            limiter.take("a", "cid"),
            Err(CopyError::Crowded {
                max: 2,
                whose: "this environment",
                ..
            })
        ));
        let _b1 = limiter.take("b", "ann").unwrap();
        // One caller cannot take every slot, whatever environments it uses.
        let _c1 = limiter.take("c", "ann").unwrap();
        let crowded = limiter.take("d", "ann").err().expect("ann's cap");
        assert!(matches!(
            crowded,
            CopyError::Crowded {
                max: 3,
                whose: "the caller",
                ..
            }
        ));
        assert_eq!(Status::from(crowded).code(), tonic::Code::ResourceExhausted);
        let busy = limiter.take("d", "dan").err().expect("all slots taken");
        assert!(matches!(busy, CopyError::Busy));
        assert_eq!(Status::from(busy).code(), tonic::Code::ResourceExhausted);
        drop(a1);
        assert_eq!(limiter.running("a"), 1);
        let _d1 = limiter.take("d", "dan").expect("a slot freed");
        // Without a total: only the environment's and the caller's caps.
        let downloads = Limiter::new("downloads", DOWNLOADS_PER_ENV, DOWNLOADS_PER_USER, None);
        let held: Vec<_> = (0..DOWNLOADS_PER_ENV)
            .map(|_| downloads.take("a", "ann").unwrap())
            .collect();
        assert!(matches!(
            downloads.take("a", "bob"),
            Err(CopyError::Crowded { max: 4, .. })
        ));
        assert!(downloads.take("b", "bob").is_ok());
        drop(held);
        assert_eq!(downloads.running("a"), 0);
    }
}
