//! `EnvironmentService/UpdateEnvironment` (AIP-134): an environment changed
//! in place, with a field mask.
//!
//! Paths:
//! - `name`, `labels`: metadata of the record, no policy involved;
//! - `spec.cpu_limit`, `spec.memory_limit_mb`, `spec.pids_limit`: the new
//!   spec is the environment's stored (hardened) spec with these values,
//!   judged by policy again exactly as a create is
//!   (`IssueClearance`: a refusal names the rule, e.g. `resources.ceiling`),
//!   and applied live by the orchestrator with the clearance. A path in the
//!   mask whose value is unset resets it to the policy's default (AIP-134:
//!   a masked field that is absent is cleared);
//! - the rest of the spec (`spec`, `spec.image`, `spec.mounts`, ...):
//!   FAILED_PRECONDITION with `ErrorInfo.reason` `update.requires_recreate`
//!   naming the path (a real field, but it needs a new container);
//! - anything else (output-only or immutable fields such as `id`,
//!   `team_id`, `state`; unknown names; `*`; map keys like `labels.ci`):
//!   INVALID_ARGUMENT naming `update_mask.paths[i]`.
//!
//! The mask must name at least one path (no implied mask). Validation comes
//! first (INVALID_ARGUMENT, audited as `request.invalid`), then the caller
//! is authorized on the environment (`environment.update`: its owner, a
//! developer, or a team admin), then `update.requires_recreate`.

use std::sync::Arc;

use tonic::Request;
use vibebox_proto::authz::Resource;
use vibebox_proto::clearance::IssueClearanceRequest;
use vibebox_proto::environment::{
    Environment, UpdateEnvironmentRequest, UpdateEnvironmentResponse,
};
use vibebox_proto::runtime;

use crate::error::{GatewayError, Result};
use crate::gateway::{Gateway, ORCHESTRATOR, POLICY};
use crate::validate::{self, FieldViolation};

/// Most paths one mask may name.
const MAX_PATHS: usize = 32;

/// A path that can be changed in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Path {
    Name,
    Labels,
    CpuLimit,
    MemoryLimitMb,
    PidsLimit,
}

impl Path {
    const ALL: [Path; 5] = [
        Path::Name,
        Path::Labels,
        Path::CpuLimit,
        Path::MemoryLimitMb,
        Path::PidsLimit,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Path::Name => "name",
            Path::Labels => "labels",
            Path::CpuLimit => "spec.cpu_limit",
            Path::MemoryLimitMb => "spec.memory_limit_mb",
            Path::PidsLimit => "spec.pids_limit",
        }
    }

    fn is_resource(self) -> bool {
        matches!(self, Path::CpuLimit | Path::MemoryLimitMb | Path::PidsLimit)
    }
}

/// What a valid request asks for.
#[derive(Debug, PartialEq)]
pub(crate) struct Checked {
    /// The paths, in order, once each.
    pub(crate) paths: Vec<Path>,
    /// The first path that names a part of the spec that cannot change in
    /// place (refused once the caller is authorized).
    pub(crate) recreate: Option<String>,
}

fn violation(field: impl Into<String>, description: impl Into<String>) -> FieldViolation {
    FieldViolation {
        field: field.into(),
        description: description.into(),
    }
}

/// Shapes and sizes of an update (everything decidable without the
/// environment).
pub(crate) fn check(
    req: &UpdateEnvironmentRequest,
) -> std::result::Result<Checked, FieldViolation> {
    let Some(environment) = &req.environment else {
        return Err(violation("environment", "is required"));
    };
    validate::uuid("environment.id", &environment.id)?;
    validate::optional_id("request_id", &req.request_id)?;
    let raw = req.update_mask.as_ref().map_or(&[][..], |m| &m.paths[..]);
    if raw.is_empty() {
        return Err(violation(
            "update_mask",
            "must name at least one path: name, labels, spec.cpu_limit, \
             spec.memory_limit_mb, spec.pids_limit",
        ));
    }
    if raw.len() > MAX_PATHS {
        return Err(violation(
            "update_mask",
            format!("must name at most {MAX_PATHS} paths"),
        ));
    }
    let mut paths = Vec::new();
    let mut recreate = None;
    for (i, path) in raw.iter().enumerate() {
        let field = format!("update_mask.paths[{i}]");
        validate::text(&field, path, 256)?;
        if let Some(p) = Path::ALL.into_iter().find(|p| p.as_str() == path) {
            paths.push(p);
        } else if path == "spec" || path.starts_with("spec.") {
            recreate.get_or_insert_with(|| path.clone());
        } else {
            return Err(violation(
                field,
                format!(
                    "{path:?} cannot be updated: the paths are name, labels, spec.cpu_limit, \
                     spec.memory_limit_mb and spec.pids_limit"
                ),
            ));
        }
    }
    paths.sort();
    paths.dedup();
    let spec = environment.spec.clone().unwrap_or_default();
    for path in &paths {
        match path {
            Path::Name => validate::environment_name("environment.name", &environment.name)?,
            Path::Labels => validate::labels("environment.labels", &environment.labels)?,
            Path::CpuLimit => {
                if let Some(cpu) = spec.cpu_limit
                    && !(cpu.is_finite() && cpu > 0.0)
                {
                    return Err(violation(
                        "environment.spec.cpu_limit",
                        "must be a positive number",
                    ));
                }
            }
            Path::MemoryLimitMb => {
                if spec.memory_limit_mb.is_some_and(|m| m <= 0) {
                    return Err(violation(
                        "environment.spec.memory_limit_mb",
                        "must be positive",
                    ));
                }
            }
            Path::PidsLimit => {
                if spec.pids_limit.is_some_and(|p| p <= 0) {
                    return Err(violation("environment.spec.pids_limit", "must be positive"));
                }
            }
        }
    }
    Ok(Checked { paths, recreate })
}

/// The environment's stored spec with the new resources the mask names (an
/// unset one is left to the policy's default).
pub(crate) fn resized(
    current: &Environment,
    new: &Environment,
    paths: &[Path],
) -> vibebox_proto::environment::ContainerSpec {
    let mut spec = current.spec.clone().unwrap_or_default();
    let asked = new.spec.clone().unwrap_or_default();
    for path in paths {
        match path {
            Path::CpuLimit => spec.cpu_limit = asked.cpu_limit,
            Path::MemoryLimitMb => spec.memory_limit_mb = asked.memory_limit_mb,
            Path::PidsLimit => spec.pids_limit = asked.pids_limit,
            Path::Name | Path::Labels => {}
        }
    }
    spec
}

/// Serves `UpdateEnvironment`.
pub(crate) async fn update(
    gw: &Arc<Gateway>,
    request: Request<UpdateEnvironmentRequest>,
) -> Result<UpdateEnvironmentResponse> {
    let call = gw.authenticate(gw.info(&request)).await?;
    let req = request.into_inner();
    let checked = match check(&req) {
        Ok(checked) => checked,
        Err(v) => {
            let error = GatewayError::from(v);
            let id = req
                .environment
                .as_ref()
                .map(|e| e.id.clone())
                .unwrap_or_default();
            let resource = Resource {
                kind: "environment".into(),
                environment_id: id.clone(),
                id,
                ..Resource::default()
            };
            gw.record_invalid(&call, &error, &resource);
            return Err(error);
        }
    };
    let new = req.environment.unwrap_or_default();
    let (current, decision) = gw.environment(&call, &new.id).await?;
    if let Some(path) = checked.recreate {
        return Err(GatewayError::RequiresRecreate(path));
    }
    let paths = checked.paths;
    let (spec, clearance) = if paths.iter().any(|p| p.is_resource()) {
        // Judged again exactly as a create: the whole hardened spec with the
        // new resources, for this environment and team, by this caller.
        let cleared = gw
            .clearance
            .clone()
            .issue_clearance(call.forward(IssueClearanceRequest {
                spec: Some(resized(&current, &new, &paths)),
                environment_id: current.id.clone(),
                team_id: current.team_id.clone(),
                user_id: call.user_id().to_owned(),
                team_role: decision.team_role,
            }))
            .await
            .map_err(GatewayError::upstream(POLICY))?
            .into_inner();
        (
            cleared.evaluation.unwrap_or_default().hardened_spec,
            cleared.clearance,
        )
    } else {
        (None, None)
    };
    let request_id = if req.request_id.is_empty() {
        uuid::Uuid::new_v4().to_string()
    } else {
        req.request_id
    };
    let updated = gw
        .runtime
        .clone()
        .update_environment(call.forward(runtime::UpdateEnvironmentRequest {
            caller: Some(call.caller()),
            environment_id: current.id.clone(),
            update_mask: paths.iter().map(|p| p.as_str().to_owned()).collect(),
            name: new.name,
            labels: new.labels,
            spec,
            clearance,
            request_id,
        }))
        .await
        .map_err(GatewayError::upstream(ORCHESTRATOR))?
        .into_inner();
    Ok(UpdateEnvironmentResponse {
        environment: updated.environment.map(super::environment::redact),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use vibebox_proto::environment::ContainerSpec;

    const ID: &str = "2f1c3e4a-9b7d-4c1e-8a2b-3c4d5e6f7a8b";

    fn request(paths: &[&str], environment: Environment) -> UpdateEnvironmentRequest {
        UpdateEnvironmentRequest {
            environment: Some(Environment {
                id: ID.into(),
                ..environment
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            }),
            request_id: String::new(),
        }
    }

    fn field_of(req: &UpdateEnvironmentRequest) -> String {
        check(req).unwrap_err().field
    }

    #[test]
    fn updatable_paths_are_checked_once_each_in_order() {
        let env = Environment {
            name: "web-2".into(),
            labels: BTreeMap::from([("ci".into(), "true".into())]),
            spec: Some(ContainerSpec {
                cpu_limit: Some(1.5),
                memory_limit_mb: Some(512),
                pids_limit: Some(256),
                ..Default::default()
            }),
            ..Default::default()
        };
        let checked = check(&request(
            &[
                "spec.pids_limit",
                "labels",
                "name",
                "spec.cpu_limit",
                "labels",
                "spec.memory_limit_mb",
            ],
            env,
        ))
        .unwrap();
        assert_eq!(checked.paths, Path::ALL.to_vec());
        assert_eq!(checked.recreate, None);
        // A masked resource left unset resets to the policy's default.
        assert!(check(&request(&["spec.cpu_limit"], Environment::default())).is_ok());
        // Labels masked and empty clear every label.
        assert!(check(&request(&["labels"], Environment::default())).is_ok());
    }

    #[test]
    fn the_rest_of_the_spec_needs_a_recreate_and_other_paths_are_invalid() {
        let checked = check(&request(
            &["name", "spec.image", "spec"],
            Environment {
                name: "ok".into(),
                ..Default::default()
            },
        ))
        .unwrap();
        assert_eq!(checked.recreate.as_deref(), Some("spec.image"));
        for invalid in [
            "id",
            "team_id",
            "owner_id",
            "state",
            "*",
            "labels.ci",
            "Name",
            "specs",
            "",
        ] {
            assert_eq!(
                field_of(&request(
                    &["name", invalid],
                    Environment {
                        name: "ok".into(),
                        ..Default::default()
                    }
                )),
                "update_mask.paths[1]",
                "{invalid:?}"
            );
        }
    }

    #[test]
    fn malformed_requests_name_their_field() {
        let mut no_env = request(&["name"], Environment::default());
        no_env.environment = None;
        assert_eq!(field_of(&no_env), "environment");
        let mut bad_id = request(&["name"], Environment::default());
        bad_id.environment.as_mut().unwrap().id = "../x".into();
        assert_eq!(field_of(&bad_id), "environment.id");
        assert_eq!(
            field_of(&request(&[], Environment::default())),
            "update_mask"
        );
        let mut no_mask = request(&["name"], Environment::default());
        no_mask.update_mask = None;
        assert_eq!(field_of(&no_mask), "update_mask");
        let many: Vec<&str> = vec!["name"; MAX_PATHS + 1];
        assert_eq!(
            field_of(&request(&many, Environment::default())),
            "update_mask"
        );
        assert_eq!(
            field_of(&request(
                &["name"],
                Environment {
                    name: "Not Valid".into(),
                    ..Default::default()
                }
            )),
            "environment.name"
        );
        assert_eq!(
            field_of(&request(
                &["labels"],
                Environment {
                    labels: BTreeMap::from([("Bad".into(), "x".into())]),
                    ..Default::default()
                }
            )),
            "environment.labels[\"Bad\"]"
        );
        let spec = |spec: ContainerSpec| Environment {
            spec: Some(spec),
            ..Default::default()
        };
        for (path, env) in [
            (
                "spec.cpu_limit",
                spec(ContainerSpec {
                    cpu_limit: Some(f64::NAN),
                    ..Default::default()
                }),
            ),
            (
                "spec.cpu_limit",
                spec(ContainerSpec {
                    cpu_limit: Some(0.0),
                    ..Default::default()
                }),
            ),
            (
                "spec.memory_limit_mb",
                spec(ContainerSpec {
                    memory_limit_mb: Some(-1),
                    ..Default::default()
                }),
            ),
            (
                "spec.pids_limit",
                spec(ContainerSpec {
                    pids_limit: Some(0),
                    ..Default::default()
                }),
            ),
        ] {
            assert_eq!(
                field_of(&request(&[path], env)),
                format!("environment.{path}")
            );
        }
        // Values of paths the mask does not name are not looked at.
        assert!(
            check(&request(
                &["labels"],
                spec(ContainerSpec {
                    cpu_limit: Some(-1.0),
                    ..Default::default()
                })
            ))
            .is_ok()
        );
        let mut bad_request_id = request(
            &["name"],
            Environment {
                name: "ok".into(),
                ..Default::default()
            },
        );
        bad_request_id.request_id = "a/b".into();
        assert_eq!(field_of(&bad_request_id), "request_id");
    }

    #[test]
    fn a_resize_keeps_everything_but_the_named_resources() {
        let current = Environment {
            spec: Some(ContainerSpec {
                image: "docker.io/vibebox/devbox:1".into(),
                env: BTreeMap::from([("TOKEN".into(), "kept".into())]),
                cpu_limit: Some(0.5),
                memory_limit_mb: Some(128),
                pids_limit: Some(64),
                ..Default::default()
            }),
            ..Default::default()
        };
        let new = Environment {
            spec: Some(ContainerSpec {
                image: "ignored".into(),
                cpu_limit: Some(1.0),
                memory_limit_mb: Some(256),
                ..Default::default()
            }),
            ..Default::default()
        };
        let spec = resized(&current, &new, &[Path::CpuLimit, Path::PidsLimit]);
        assert_eq!(spec.image, "docker.io/vibebox/devbox:1");
        assert_eq!(spec.env.get("TOKEN").map(String::as_str), Some("kept"));
        assert_eq!(spec.cpu_limit, Some(1.0));
        assert_eq!(spec.memory_limit_mb, Some(128), "not in the mask");
        assert_eq!(
            spec.pids_limit, None,
            "masked and unset: the policy's default"
        );
    }

    #[test]
    fn a_recreate_is_a_failed_precondition_with_its_reason_and_path() {
        let status = tonic::Status::from(GatewayError::RequiresRecreate("spec.image".into()));
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            vibebox_server_kit::status::error_reason(&status).as_deref(),
            Some("update.requires_recreate")
        );
        assert_eq!(
            vibebox_server_kit::status::violated_rules(&status),
            ["update.requires_recreate"]
        );
        assert!(status.message().contains("spec.image"), "{status:?}");
    }
}
