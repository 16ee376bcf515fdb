//! `vibebox context ...`: the local contexts (one per platform), no service call.

use anyhow::{Result, bail};
use clap::Subcommand;
use serde::Serialize;

use crate::config::Config;
use crate::output::{self, Format};

/// Context commands.
#[derive(Subcommand, Debug)]
pub(crate) enum ContextCommand {
    /// List contexts (the current one marked with *).
    Ls,
    /// Make a context the current one.
    Use { name: String },
    /// Show the current context's name.
    Current,
    /// Delete a context.
    Rm { name: String },
}

#[derive(Serialize)]
struct ContextView {
    name: String,
    current: bool,
    server: String,
    username: Option<String>,
    team: Option<String>,
    logged_in: bool,
}

/// `vibebox context ...` (local only).
pub(crate) fn run(cmd: ContextCommand, format: Format) -> Result<()> {
    let mut cfg = Config::load()?;
    match cmd {
        ContextCommand::Ls => {
            let views: Vec<ContextView> = cfg
                .contexts
                .iter()
                .map(|(n, c)| ContextView {
                    name: n.clone(),
                    current: cfg.current_context.as_deref() == Some(n),
                    server: c.server.clone(),
                    username: c.username.clone(),
                    team: c.team.clone(),
                    logged_in: c.token.is_some(),
                })
                .collect();
            if format == Format::Json {
                output::json(&views);
            } else {
                let rows: Vec<Vec<String>> = views
                    .into_iter()
                    .map(|v| {
                        vec![
                            if v.current { "*".into() } else { String::new() },
                            v.name,
                            v.server,
                            v.username.unwrap_or_default(),
                            v.team.unwrap_or_default(),
                        ]
                    })
                    .collect();
                output::table(&["", "NAME", "SERVER", "USER", "TEAM"], &rows);
            }
        }
        ContextCommand::Use { name } => {
            if !cfg.contexts.contains_key(&name) {
                bail!("no context named {name:?}");
            }
            cfg.current_context = Some(name.clone());
            cfg.save()?;
            println!("switched to context {name}");
        }
        ContextCommand::Current => {
            println!("{}", cfg.current_context.as_deref().unwrap_or("(none)"));
        }
        ContextCommand::Rm { name } => {
            if cfg.contexts.remove(&name).is_none() {
                bail!("no context named {name:?}");
            }
            if cfg.current_context.as_deref() == Some(&name) {
                cfg.current_context = None;
            }
            cfg.save()?;
            println!("deleted context {name}");
        }
    }
    Ok(())
}
