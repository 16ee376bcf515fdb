//! `vibebox policy ...`: dry-run a spec against the platform's policy
//! (every violation with its rule id and CIS id) and show the policy.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use serde::Serialize;
use vibebox_proto::policy::{Decision, EvaluateSpecRequest, GetPolicyRequest, ViolationSeverity};

use crate::client::{CallExt, Session};
use crate::output::{self, Format};
use crate::spec::SpecFile;

/// Policy commands.
#[derive(Subcommand, Debug)]
pub(crate) enum PolicyCommand {
    /// Evaluate a spec file without creating anything (exit 1 when denied).
    Check {
        /// Spec file (TOML, or JSON by extension).
        spec: PathBuf,
        /// Team (id or name) to evaluate for.
        #[arg(long)]
        team: Option<String>,
    },
    /// Show the active policy document.
    Show,
}

#[derive(Serialize)]
struct ViolationView {
    rule_id: String,
    cis_id: String,
    pss_control: String,
    severity: String,
    field: String,
    message: String,
}

#[derive(Serialize)]
struct EvaluationView {
    decision: String,
    policy_version: String,
    policy_digest: String,
    canonical_image: String,
    violations: Vec<ViolationView>,
    /// On allow: what the environment would get (egress, lifetimes, copy limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    hardened: Option<HardenedView>,
}

/// The parts of the hardened spec policy decides beyond the request (#17).
#[derive(Serialize)]
struct HardenedView {
    egress: String,
    egress_allow: Vec<String>,
    idle_timeout: String,
    idle_cpu_percent: f64,
    lifetime: String,
    max_lifetime: String,
    copy_limit_mb: i64,
}

impl HardenedView {
    fn of(spec: &vibebox_proto::environment::ContainerSpec) -> Self {
        let egress = spec.egress.clone().unwrap_or_default();
        let lifetime = spec.lifetime.unwrap_or_default();
        let duration = |s: Option<u32>| vibebox_policy::duration::format(s.unwrap_or_default());
        Self {
            egress: vibebox_proto::environment::EgressMode::try_from(egress.mode)
                .map(|m| output::enum_name(m.as_str_name(), "EGRESS_MODE_").replace('_', "-"))
                .unwrap_or_default(),
            egress_allow: egress
                .allow
                .iter()
                .map(|r| {
                    let target = if r.host.is_empty() { &r.cidr } else { &r.host };
                    let ports: Vec<String> = r.ports.iter().map(u32::to_string).collect();
                    if ports.is_empty() {
                        target.clone()
                    } else {
                        format!("{target} port {}", ports.join(","))
                    }
                })
                .collect(),
            idle_timeout: duration(lifetime.idle_timeout_seconds),
            idle_cpu_percent: lifetime.idle_cpu_percent.unwrap_or_default(),
            lifetime: duration(lifetime.lifetime_seconds),
            max_lifetime: duration(lifetime.max_lifetime_seconds),
            copy_limit_mb: spec.copy_limit_mb.unwrap_or_default(),
        }
    }
}

/// Runs a `policy` subcommand.
pub(crate) async fn run(cmd: PolicyCommand, session: &Session, format: Format) -> Result<ExitCode> {
    let mut client = session.policy();
    match cmd {
        PolicyCommand::Check { spec, team } => {
            let file = SpecFile::read(&spec)?;
            let team_id = match team.or(file.team.clone()) {
                Some(t) => crate::cmd::team::resolve_team(session, Some(&t), None).await?,
                None => String::new(),
            };
            let r = client
                .evaluate_spec(EvaluateSpecRequest {
                    spec: Some(file.to_proto()?),
                    team_id,
                })
                .await
                .call()?;
            let e = r.evaluation.unwrap_or_default();
            let allowed = e.decision == Decision::Allow as i32;
            let view = EvaluationView {
                decision: if allowed {
                    "allow".into()
                } else {
                    "deny".into()
                },
                policy_version: e.policy_version,
                policy_digest: e.policy_digest,
                canonical_image: e.canonical_image,
                violations: e
                    .violations
                    .iter()
                    .map(|v| ViolationView {
                        rule_id: v.rule_id.clone(),
                        cis_id: v.cis_id.clone(),
                        pss_control: v.pss_control.clone(),
                        severity: ViolationSeverity::try_from(v.severity)
                            .map(|s| output::enum_name(s.as_str_name(), "VIOLATION_SEVERITY_"))
                            .unwrap_or_default(),
                        field: v.field.clone(),
                        message: v.message.clone(),
                    })
                    .collect(),
                hardened: e.hardened_spec.as_ref().map(HardenedView::of),
            };
            if format == Format::Json {
                output::json(&view);
            } else {
                println!(
                    "decision: {} (policy {} {})",
                    view.decision.to_uppercase(),
                    view.policy_version,
                    view.policy_digest
                );
                if let Some(h) = &view.hardened {
                    println!(
                        "egress: {}{}",
                        h.egress,
                        if h.egress_allow.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", h.egress_allow.join("; "))
                        }
                    );
                    println!(
                        "idle stop: after {} idle (CPU under {}%); lifetime: {} (max {}); copy limit: {} MiB",
                        h.idle_timeout,
                        h.idle_cpu_percent,
                        h.lifetime,
                        h.max_lifetime,
                        h.copy_limit_mb
                    );
                }
                if !view.violations.is_empty() {
                    let rows: Vec<Vec<String>> = view
                        .violations
                        .iter()
                        .map(|v| {
                            vec![
                                v.rule_id.clone(),
                                if v.cis_id.is_empty() {
                                    "-".into()
                                } else {
                                    v.cis_id.clone()
                                },
                                v.severity.clone(),
                                v.field.clone(),
                                v.message.clone(),
                            ]
                        })
                        .collect();
                    output::table(&["RULE", "CIS", "SEVERITY", "FIELD", "MESSAGE"], &rows);
                }
            }
            if !allowed {
                eprintln!(
                    "vibebox: denied by policy: {}",
                    view.violations
                        .iter()
                        .map(|v| v.rule_id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                return Ok(ExitCode::FAILURE);
            }
        }
        PolicyCommand::Show => {
            let r = client.get_policy(GetPolicyRequest {}).await.call()?;
            if format == Format::Json {
                output::json(&serde_json::json!({
                    "policy_version": r.policy_version,
                    "policy_digest": r.policy_digest,
                    "document": r.document,
                }));
            } else {
                println!("# policy {} ({})", r.policy_version, r.policy_digest);
                println!("{}", r.document.trim_end());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
