//! Configuration shared by every service.
//!
//! Precedence, lowest first: built-in defaults, a TOML file (`--config` or
//! `VIBEBOX_CONFIG`), `VIBEBOX_*` environment variables, command-line flags.
//! A TOML key is a flag's long name (`listen`, `data-dir` or `data_dir`); an
//! unknown key is an error, not silently ignored.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};

use crate::error::KitError;
use crate::tls::TlsMaterial;

/// Flags every server shares.
#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Address to listen on (each service has its own default port on 127.0.0.1).
    #[arg(long, env = "VIBEBOX_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for databases, keys, certificates and the audit outbox.
    #[arg(long, env = "VIBEBOX_DATA_DIR", default_value = ".vibebox")]
    pub data_dir: PathBuf,
    /// TOML file with defaults for any of these flags (keys are long flag names).
    #[arg(long, env = "VIBEBOX_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Mutual TLS material. Defaults to `<data-dir>/pki/{ca.pem,<service>.pem,<service>-key.pem}`.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// PEM certificate of this service (its identity towards peers).
    #[arg(long, env = "VIBEBOX_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of this service.
    #[arg(long, env = "VIBEBOX_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM certificate of the CA that signs every service certificate.
    #[arg(long, env = "VIBEBOX_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

/// How logs are written.
#[derive(ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Logging and tracing. Spans are exported over OTLP when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
#[derive(Args, Debug, Clone)]
pub struct TelemetryArgs {
    /// Log format.
    #[arg(long, env = "VIBEBOX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing-subscriber EnvFilter syntax).
    #[arg(long, env = "VIBEBOX_LOG", default_value = "info")]
    pub log_filter: String,
}

/// Protection against overload.
#[derive(Args, Debug, Clone)]
pub struct LimitArgs {
    /// Calls served at once; calls beyond it are shed with RESOURCE_EXHAUSTED
    /// instead of queueing without bound.
    #[arg(long, env = "VIBEBOX_MAX_CONCURRENCY", default_value_t = 512)]
    pub max_concurrency: usize,
    /// Deadline for unary calls without a shorter grpc-timeout, in milliseconds.
    #[arg(long, env = "VIBEBOX_REQUEST_TIMEOUT_MS", default_value_t = 60_000)]
    pub request_timeout_ms: u64,
}

impl Default for LimitArgs {
    fn default() -> Self {
        Self {
            max_concurrency: 512,
            request_timeout_ms: 60_000,
        }
    }
}

impl Default for TelemetryArgs {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_filter: "info".into(),
        }
    }
}

impl ServerArgs {
    /// Arguments for a server whose state lives in `data_dir`.
    pub fn for_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: None,
            data_dir: data_dir.into(),
            config: None,
            tls: TlsArgs::default(),
            telemetry: TelemetryArgs::default(),
            limits: LimitArgs::default(),
        }
    }

    /// The listen address, or `127.0.0.1:<default_port>`.
    pub fn listen_or(&self, default_port: u16) -> SocketAddr {
        self.listen
            .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, default_port)))
    }

    /// The deadline for calls without a client deadline.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.request_timeout_ms)
    }

    /// The directory holding the dev PKI by default.
    pub fn pki_dir(&self) -> PathBuf {
        self.data_dir.join("pki")
    }

    /// Loads this service's certificate, key and the CA.
    pub fn tls_material(&self, service: &str) -> Result<TlsMaterial, KitError> {
        let pki = self.pki_dir();
        let cert = self
            .tls
            .tls_cert
            .clone()
            .unwrap_or_else(|| pki.join(format!("{service}.pem")));
        let key = self
            .tls
            .tls_key
            .clone()
            .unwrap_or_else(|| pki.join(format!("{service}-key.pem")));
        let ca = self
            .tls
            .tls_ca
            .clone()
            .unwrap_or_else(|| pki.join("ca.pem"));
        TlsMaterial::from_files(&ca, &cert, &key)
    }
}

/// A service configuration: a clap parser embedding [`ServerArgs`].
pub trait ServiceConfig: Parser {
    fn server_args(&self) -> &ServerArgs;
}

/// Parses the process arguments with config-file support (see module docs).
/// Exits with clap's message on bad flags.
pub fn parse_config<C: Parser>() -> Result<C, KitError> {
    parse_config_from(std::env::args_os())
}

/// Like [`parse_config`], for explicit arguments.
pub fn parse_config_from<C: Parser, I>(args: I) -> Result<C, KitError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let path = flag_value(&args, "--config").or_else(|| std::env::var_os("VIBEBOX_CONFIG"));
    let Some(path) = path else {
        return Ok(C::parse_from(args));
    };
    let path = PathBuf::from(path);
    let text = std::fs::read_to_string(&path).map_err(|source| KitError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| KitError::ConfigFile {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    let command = C::command();
    let mut from_file: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some(arg) = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()))
        else {
            return Err(KitError::ConfigFile {
                path: path.display().to_string(),
                message: format!("unknown key {key:?}"),
            });
        };
        let flag = format!("--{long}");
        if args.iter().any(|a| {
            a.to_str()
                .is_some_and(|s| s == flag || s.starts_with(&format!("{flag}=")))
        }) {
            continue; // a flag wins over the file
        }
        if arg
            .get_env()
            .is_some_and(|env| std::env::var_os(env).is_some())
        {
            continue; // so does the environment
        }
        let values: Vec<&toml::Value> = match value {
            toml::Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        for value in values {
            match value {
                toml::Value::Boolean(true) if !arg.get_action().takes_values() => {
                    from_file.push(flag.clone().into())
                }
                toml::Value::Boolean(false) if !arg.get_action().takes_values() => {}
                toml::Value::String(s) => from_file.push(format!("{flag}={s}").into()),
                toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => {
                    from_file.push(format!("{flag}={value}").into())
                }
                other => {
                    return Err(KitError::ConfigFile {
                        path: path.display().to_string(),
                        message: format!("unsupported value for {key:?}: {other}"),
                    });
                }
            }
        }
    }
    let mut merged = Vec::with_capacity(args.len() + from_file.len());
    merged.extend(args.first().cloned());
    merged.extend(from_file);
    merged.extend(args.into_iter().skip(1));
    Ok(C::parse_from(merged))
}

fn flag_value(args: &[OsString], flag: &str) -> Option<OsString> {
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let s = arg.to_str()?;
        if s == flag {
            return iter.next().cloned();
        }
        if let Some(v) = s.strip_prefix(&format!("{flag}=")) {
            return Some(v.into());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Parser, Debug)]
    struct Demo {
        #[command(flatten)]
        server: ServerArgs,
        /// A service flag.
        #[arg(long, default_value_t = 1)]
        widgets: u32,
    }

    #[test]
    fn file_values_apply_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9\"\nwidgets = 5\nlog_format = \"json\"\n",
        )
        .unwrap();
        let demo: Demo = parse_config_from([
            "demo".into(),
            "--config".into(),
            file.clone().into_os_string(),
            "--widgets".into(),
            "7".into(),
        ])
        .unwrap();
        assert_eq!(demo.server.listen, Some("127.0.0.1:9".parse().unwrap()));
        assert_eq!(demo.widgets, 7);
        assert_eq!(demo.server.telemetry.log_format, LogFormat::Json);
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "no_such_flag = 1\n").unwrap();
        let err = parse_config_from::<Demo, _>([
            OsString::from("demo"),
            "--config".into(),
            file.into_os_string(),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("no_such_flag"), "{err}");
    }
}
