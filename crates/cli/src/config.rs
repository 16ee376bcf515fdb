//! The CLI's configuration file: named contexts (one per platform), each a
//! gateway URL, a bearer token and optional defaults, under
//! `<config dir>/vibebox/config.toml` (or `$VIBEBOX_CONFIG_DIR/config.toml`),
//! written with mode 0600 because it holds tokens.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context as _, Result, anyhow};
use serde::{Deserialize, Serialize};

/// The default gateway address.
pub(crate) const DEFAULT_SERVER: &str = "http://127.0.0.1:7700";

/// The whole configuration file.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Config {
    /// The context used when `--context` is not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) current_context: Option<String>,
    #[serde(default)]
    pub(crate) contexts: BTreeMap<String, Context>,
}

/// One platform the CLI talks to.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Context {
    /// Gateway URL, e.g. `http://127.0.0.1:7700`.
    pub(crate) server: String,
    /// The bearer token (biscuit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) token: Option<String>,
    /// Who the token belongs to (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) username: Option<String>,
    /// Default team (id or name) for commands that take `--team`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) team: Option<String>,
    /// TLS: CA certificate (PEM) to trust for an `https://` gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls_ca: Option<PathBuf>,
    /// TLS: client certificate (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// TLS: client key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tls_key: Option<PathBuf>,
}

/// The directory holding `config.toml`.
pub(crate) fn config_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("VIBEBOX_CONFIG_DIR") {
        return Ok(PathBuf::from(dir));
    }
    dirs::config_dir()
        .map(|d| d.join("vibebox"))
        .ok_or_else(|| anyhow!("cannot find the user's config directory (set VIBEBOX_CONFIG_DIR)"))
}

/// Path of the configuration file.
pub(crate) fn config_path() -> Result<PathBuf> {
    Ok(config_dir()?.join("config.toml"))
}

impl Config {
    /// Loads the file, or an empty configuration when there is none.
    pub(crate) fn load() -> Result<Self> {
        let path = config_path()?;
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                toml::from_str(&text).with_context(|| format!("reading {}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the file atomically with mode 0600.
    pub(crate) fn save(&self) -> Result<()> {
        let path = config_path()?;
        let dir = path.parent().expect("config path has a parent");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let text = toml::to_string_pretty(self).context("encoding the configuration")?;
        let tmp = path.with_extension("toml.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// The context named `name`, or the current one.
    pub(crate) fn context(&self, name: Option<&str>) -> Result<(String, Context)> {
        let name = match name.or(self.current_context.as_deref()) {
            Some(n) => n.to_owned(),
            None => {
                return Ok((
                    "default".to_owned(),
                    Context {
                        server: DEFAULT_SERVER.to_owned(),
                        ..Context::default()
                    },
                ));
            }
        };
        let ctx = self
            .contexts
            .get(&name)
            .cloned()
            .ok_or_else(|| anyhow!("no context named {name:?} (see `vibebox context ls`)"))?;
        Ok((name, ctx))
    }
}
