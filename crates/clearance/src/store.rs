//! Signing keys on disk: generated on first run, rotated and retired.
//!
//! Layout of the key directory (`<data-dir>/keys/clearance/` by default):
//! - `<key id without "ed25519:">.pem`: each private key (PKCS#8 PEM, mode 0600);
//! - `active`: the key id that signs new clearances;
//! - `retired`: key ids (one per line) no longer accepted for verification.
//!
//! Keys that are neither active nor retired keep verifying clearances issued
//! before a rotation.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, spki::der::pem::LineEnding};

use crate::{ClearanceSigner, KeyRing};

/// Errors reading or writing the key directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {0} is not an Ed25519 PKCS#8 key")]
    BadKey(PathBuf),
    #[error("active key {0:?} has no key file")]
    MissingActive(String),
    #[error("cannot retire the active key {0:?}; rotate first")]
    RetireActive(String),
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The signing keys in a directory.
#[derive(Debug)]
pub struct KeyStore {
    dir: PathBuf,
    keys: Vec<ClearanceSigner>,
    active: usize,
    retired: Vec<String>,
}

impl KeyStore {
    /// Opens `dir`, creating it and a first key if it holds none.
    pub fn open_or_init(dir: &Path) -> Result<Self> {
        create_private_dir(dir)?;
        let mut keys = Vec::new();
        for entry in fs::read_dir(dir).map_err(io(dir))? {
            let path = entry.map_err(io(dir))?.path();
            if path.extension().is_some_and(|e| e == "pem") {
                let pem = fs::read_to_string(&path).map_err(io(&path))?;
                let key = SigningKey::from_pkcs8_pem(&pem)
                    .map_err(|_| StoreError::BadKey(path.clone()))?;
                keys.push(ClearanceSigner::from_key(key));
            }
        }
        keys.sort_by(|a, b| a.key_id().cmp(b.key_id()));
        let retired = read_lines(&dir.join("retired"))?;
        let active_path = dir.join("active");
        let active_id = read_lines(&active_path)?.into_iter().next();
        let mut store = Self {
            dir: dir.to_owned(),
            keys,
            active: 0,
            retired,
        };
        match active_id {
            Some(id) => {
                store.active = store
                    .keys
                    .iter()
                    .position(|k| k.key_id() == id)
                    .ok_or(StoreError::MissingActive(id))?;
            }
            None => {
                store.rotate()?;
            }
        }
        Ok(store)
    }

    /// Generates a new key and makes it the active one; older keys keep
    /// verifying until retired. Returns the new key id.
    pub fn rotate(&mut self) -> Result<String> {
        let signer = ClearanceSigner::generate();
        let id = signer.key_id().to_owned();
        let pem = signer
            .signing_key()
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|_| StoreError::BadKey(self.dir.clone()))?;
        let file = self.dir.join(format!("{}.pem", file_stem(&id)));
        write_private(&file, pem.as_bytes())?;
        write_private(&self.dir.join("active"), format!("{id}\n").as_bytes())?;
        self.keys.push(signer);
        self.active = self.keys.len() - 1;
        tracing::info!(key_id = %id, "clearance signing key activated");
        Ok(id)
    }

    /// Stops accepting clearances signed by `key_id`.
    pub fn retire(&mut self, key_id: &str) -> Result<()> {
        if self.active().key_id() == key_id {
            return Err(StoreError::RetireActive(key_id.to_owned()));
        }
        if !self.retired.iter().any(|r| r == key_id) {
            self.retired.push(key_id.to_owned());
            let body: String = self.retired.iter().map(|r| format!("{r}\n")).collect();
            write_private(&self.dir.join("retired"), body.as_bytes())?;
        }
        Ok(())
    }

    /// The key that signs new clearances.
    pub fn active(&self) -> &ClearanceSigner {
        &self.keys[self.active]
    }

    /// Every key still accepted for verification.
    pub fn key_ring(&self) -> KeyRing {
        let mut ring = KeyRing::new();
        for k in &self.keys {
            ring.insert(k.verifying_key());
        }
        for r in &self.retired {
            ring.retire(r);
        }
        ring
    }
}

fn file_stem(key_id: &str) -> &str {
    key_id.strip_prefix("ed25519:").unwrap_or(key_id)
}

fn read_lines(path: &Path) -> Result<Vec<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(s
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io(path)(e)),
    }
}

fn create_private_dir(dir: &Path) -> Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir).map_err(io(dir))
}

/// Writes a file readable only by its owner, atomically (temp file + rename).
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}
