//! Token signing keys: private halves in `<data-dir>/keys/token-<id>.key`
//! (hex, mode 0600), public halves and retirement in the `token_keys` table.
//!
//! The newest unretired key whose private half is present signs new
//! tokens; every unretired key verifies. Rotation adds a key and makes it
//! current; retirement removes a key from the verifying ring.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use chrono::Utc;
use sea_orm::ConnectionTrait;
use vibebox_token::{KeyRing, RootKey, TokenError, VerifiedToken};

use crate::error::{Error, Result};
use crate::store;

/// Public information about one signing key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    pub key_id: u32,
    pub public_key: Vec<u8>,
    pub retired: bool,
}

struct Keys {
    current: Arc<RootKey>,
    ring: KeyRing,
    all: Vec<KeyInfo>,
}

/// The identity service's signing keys.
pub struct KeyStore {
    dir: PathBuf,
    keys: RwLock<Keys>,
}

fn key_path(dir: &Path, key_id: u32) -> PathBuf {
    dir.join(format!("token-{key_id}.key"))
}

fn internal(context: &str, err: impl std::fmt::Display) -> Error {
    Error::Internal(format!("{context}: {err}"))
}

fn write_private(dir: &Path, key: &RootKey) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| internal("creating the key directory", e))?;
    let path = key_path(dir, key.key_id());
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(&path)
        .map_err(|e| internal("creating a key file", e))?;
    file.write_all(hex::encode(key.private_key_bytes()).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| internal("writing a key file", e))
}

fn read_private(dir: &Path, key_id: u32) -> Result<Option<RootKey>> {
    let path = key_path(dir, key_id);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(internal("reading a key file", e)),
    };
    let bytes = hex::decode(text.trim()).map_err(|e| internal("decoding a key file", e))?;
    Ok(Some(RootKey::from_private_bytes(key_id, &bytes)?))
}

impl KeyStore {
    /// Loads the keys, creating the first one on an empty database.
    pub async fn open(db: &impl ConnectionTrait, dir: &Path) -> Result<Self> {
        let keys = Self::load(db, dir).await?;
        Ok(Self {
            dir: dir.to_owned(),
            keys: RwLock::new(keys),
        })
    }

    async fn load(db: &impl ConnectionTrait, dir: &Path) -> Result<Keys> {
        let (mut ring, mut all) = read_keys(db).await?;
        let mut current = None;
        for key in all.iter().filter(|k| !k.retired) {
            if let Some(private) = read_private(dir, key.key_id)? {
                if private.public_key_bytes() != key.public_key {
                    return Err(Error::Internal(format!(
                        "key file for token key {} does not match the database",
                        key.key_id
                    )));
                }
                current = Some(private);
            }
        }
        let current = match current {
            Some(k) => k,
            None => {
                let next = all.iter().map(|k| k.key_id).max().map_or(1, |m| m + 1);
                let key = Self::create(db, dir, next).await?;
                ring.insert(next, &key.public_key_bytes())?;
                all.push(KeyInfo {
                    key_id: next,
                    public_key: key.public_key_bytes(),
                    retired: false,
                });
                key
            }
        };
        Ok(Keys {
            current: Arc::new(current),
            ring,
            all,
        })
    }

    async fn create(db: &impl ConnectionTrait, dir: &Path, key_id: u32) -> Result<RootKey> {
        let key = RootKey::generate(key_id);
        write_private(dir, &key)?;
        store::insert_token_key(db, i64::from(key_id), hex::encode(key.public_key_bytes())).await?;
        tracing::info!(key_id, "created a token signing key");
        Ok(key)
    }

    /// Adds a new signing key and makes it current; older keys keep
    /// verifying until retired. Returns the new key id.
    pub async fn rotate(&self, db: &impl ConnectionTrait) -> Result<u32> {
        let next = self
            .keys()
            .iter()
            .map(|k| k.key_id)
            .max()
            .map_or(1, |m| m + 1);
        Self::create(db, &self.dir, next).await?;
        let reloaded = Self::load(db, &self.dir).await?;
        *self.keys.write().expect("key lock") = reloaded;
        Ok(next)
    }

    /// Retires a key: tokens it signed stop verifying. The current key
    /// cannot be retired (rotate first).
    pub async fn retire(&self, db: &impl ConnectionTrait, key_id: u32) -> Result<()> {
        if self.current().key_id() == key_id {
            return Err(Error::FailedPrecondition(
                "the current signing key cannot be retired; rotate first".into(),
            ));
        }
        if !store::retire_token_key(db, i64::from(key_id), Utc::now()).await? {
            return Err(Error::NotFound("token key"));
        }
        let reloaded = Self::load(db, &self.dir).await?;
        *self.keys.write().expect("key lock") = reloaded;
        Ok(())
    }

    /// Reads the keys' retirement from the database again, so that a key
    /// another identity process retired (or rotated in) takes effect here
    /// too. Never creates a key: if no key this process can sign with is
    /// left, it keeps signing with the old one (tokens nobody accepts, so
    /// the failure is closed) and says so.
    pub async fn reload(&self, db: &impl ConnectionTrait) -> Result<()> {
        let (ring, all) = read_keys(db).await?;
        let signer = all.iter().rev().find(|k| !k.retired).map(|k| k.key_id);
        let previous = self.current();
        let current = match signer {
            Some(id) if id == previous.key_id() => previous,
            Some(id) => match read_private(&self.dir, id)? {
                Some(key) => Arc::new(key),
                None => previous,
            },
            None => previous,
        };
        if !ring.key_ids().contains(&current.key_id()) {
            tracing::error!(
                key_id = current.key_id(),
                "the signing key was retired and no newer key is available here"
            );
        }
        let mut keys = self.keys.write().expect("key lock");
        if keys.all != all || keys.current.key_id() != current.key_id() {
            tracing::info!("token keys changed in the database; reloaded");
        }
        *keys = Keys { current, ring, all };
        Ok(())
    }

    /// The key that signs new tokens.
    pub fn current(&self) -> Arc<RootKey> {
        self.keys.read().expect("key lock").current.clone()
    }

    /// Every key, retired ones included.
    pub fn keys(&self) -> Vec<KeyInfo> {
        self.keys.read().expect("key lock").all.clone()
    }

    /// Verifies a token's signature against the unretired keys.
    pub fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        let ring = self.keys.read().expect("key lock").ring.clone();
        ring.verify(token)
    }
}

/// Every key of the table, and the ring of those not retired.
async fn read_keys(db: &impl ConnectionTrait) -> Result<(KeyRing, Vec<KeyInfo>)> {
    let mut ring = KeyRing::new();
    let mut all = Vec::new();
    for row in store::token_keys(db).await? {
        let key_id = u32::try_from(row.key_id).map_err(|e| internal("key id", e))?;
        let public_key = hex::decode(&row.public_key).map_err(|e| internal("public key", e))?;
        let retired = row.retired_at.is_some();
        if !retired {
            ring.insert(key_id, &public_key)?;
        }
        all.push(KeyInfo {
            key_id,
            public_key,
            retired,
        });
    }
    Ok((ring, all))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm_migration::MigratorTrait;
    use vibebox_token::{Claims, mint};

    #[tokio::test]
    async fn keys_persist_rotate_and_retire_on_every_database() {
        for test_db in vibebox_db::testing::databases().await {
            let db = test_db.connect().await;
            crate::migration::Migrator::up(&db, None).await.unwrap();
            let dir = tempfile::tempdir().unwrap();
            let store = KeyStore::open(&db, dir.path()).await.unwrap();
            let first = store.current();
            assert_eq!(first.key_id(), 1);
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(key_path(dir.path(), 1))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600);
            }
            // Reopening loads the same key rather than making a new one.
            let again = KeyStore::open(&db, dir.path()).await.unwrap();
            assert_eq!(again.current().public_key_bytes(), first.public_key_bytes());
            assert_eq!(again.keys().len(), 1);

            let exp = Utc::now() + chrono::Duration::hours(1);
            let old_token = mint(&first, &Claims::new("u", "t1", exp)).unwrap();
            let new_id = store.rotate(&db).await.unwrap();
            assert_eq!(new_id, 2);
            assert_eq!(store.current().key_id(), 2);
            store.verify(&old_token).unwrap();
            assert!(matches!(
                store.retire(&db, 2).await,
                Err(Error::FailedPrecondition(_))
            ));
            store.retire(&db, 1).await.unwrap();
            assert!(matches!(
                store.verify(&old_token),
                Err(TokenError::UnknownKey)
            ));
            let keys = store.keys();
            assert_eq!(keys.len(), 2);
            assert!(keys[0].retired && !keys[1].retired);
            // Another process's retirement reaches a running store on reload.
            let other = KeyStore::open(&db, dir.path()).await.unwrap();
            let newest = other.rotate(&db).await.unwrap();
            let t_two = mint(&store.current(), &Claims::new("u", "t2", exp)).unwrap();
            other.retire(&db, 2).await.unwrap();
            store.verify(&t_two).unwrap();
            store.reload(&db).await.unwrap();
            assert!(matches!(store.verify(&t_two), Err(TokenError::UnknownKey)));
            assert_eq!(store.current().key_id(), newest);
            // A restart keeps the retirement and the current key.
            let reopened = KeyStore::open(&db, dir.path()).await.unwrap();
            assert_eq!(reopened.current().key_id(), newest);
            assert!(reopened.verify(&old_token).is_err());
        }
    }
}
