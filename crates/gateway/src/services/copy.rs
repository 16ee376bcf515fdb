//! `EnvironmentService/CopyTo` and `CopyFrom`: tar archives into and out of
//! an environment. The gateway checks what it can see without the
//! environment (the id, the shape of the path, the size of each chunk),
//! authorizes `environment.copy_to` / `environment.copy_from` on the
//! environment (its owner or a team admin, like exec) and relays the stream
//! to the orchestrator, which owns every other rule (state, reserved paths,
//! limits, the archive's entries, copies running at once per environment,
//! the idle timeout; see its `copy` module) and audits each copy. Its
//! refusals pass through with their details (`files.copy_concurrency` in a
//! QuotaFailure, `files.copy_idle` and `files.archive_limits` in a
//! PreconditionFailure). Both streams are re-authorized like every long stream
//! ([`Recheck`]): losing the right ends them with PERMISSION_DENIED or
//! UNAUTHENTICATED.
//!
//! A CopyTo whose client stream fails, breaks the protocol or loses its
//! rights cancels the upstream call; the orchestrator extracts only an
//! archive it received whole (with its end-of-archive marker), so a cut
//! stream extracts nothing.

use std::sync::Arc;
use std::time::Instant;

use futures::stream::StreamExt;
use tokio::sync::mpsc;
use tonic::{Request, Streaming};
use vibebox_proto::authz::Resource;
use vibebox_proto::environment::{
    CopyFromRequest, CopyFromResponse, CopyToRequest, CopyToResponse, Environment, copy_to_request,
};
use vibebox_proto::runtime;

use super::{ProxyStream, Recheck, relay};
use crate::error::{GatewayError, Result};
use crate::gateway::{Call, Gateway, ORCHESTRATOR};
use crate::metrics::StreamGuard;
use crate::validate::{self, FieldViolation};

/// Largest `data` chunk a client may send in one message.
pub(crate) const MAX_CHUNK_BYTES: usize = 1024 * 1024;
/// Longest path accepted.
const MAX_PATH_BYTES: usize = 4096;

fn violation(field: &str, description: &str) -> GatewayError {
    GatewayError::Invalid(FieldViolation {
        field: field.to_owned(),
        description: description.to_owned(),
    })
}

/// The shape of a path inside the environment (the orchestrator normalizes
/// it and applies the rest of the rules).
pub(crate) fn check_path(field: &str, path: &str) -> Result<()> {
    if path.is_empty() {
        return Err(violation(field, "must not be empty"));
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(violation(
            field,
            &format!("must be at most {MAX_PATH_BYTES} bytes"),
        ));
    }
    if path.chars().any(char::is_control) {
        return Err(violation(
            field,
            "must not contain NUL or control characters",
        ));
    }
    if !path.starts_with('/') {
        return Err(violation(
            field,
            "must be absolute (a path inside the environment, starting with /)",
        ));
    }
    Ok(())
}

/// Checks the id and path of a copy, auditing a refusal as invalid input.
fn check_request(gw: &Gateway, call: &Call, environment_id: &str, path: &str) -> Result<()> {
    let checked = validate::uuid("environment_id", environment_id)
        .map_err(GatewayError::from)
        .and_then(|_| check_path("path", path));
    if let Err(error) = &checked {
        let resource = Resource {
            kind: "environment".into(),
            environment_id: environment_id.to_owned(),
            ..Resource::default()
        };
        gw.record_invalid(call, error, &resource);
    }
    checked
}

/// What is wrong with a CopyTo message after the start, if anything.
fn check_next(request: &CopyToRequest) -> Option<GatewayError> {
    match &request.message {
        Some(copy_to_request::Message::Start(_)) => {
            Some(violation("start", "only the first message may be start"))
        }
        Some(copy_to_request::Message::Data(data)) if data.len() > MAX_CHUNK_BYTES => {
            Some(violation(
                "data",
                &format!("at most {MAX_CHUNK_BYTES} bytes per message"),
            ))
        }
        _ => None,
    }
}

/// Handles one CopyTo call.
pub(crate) async fn copy_to(
    gw: &Arc<Gateway>,
    request: Request<Streaming<CopyToRequest>>,
    resource_of: fn(&Environment) -> Resource,
) -> Result<CopyToResponse> {
    let call = gw.authenticate(gw.stream_info(&request)).await?;
    let mut inbound = request.into_inner();
    let first = match inbound.next().await {
        Some(Ok(first)) => first,
        Some(Err(status)) => {
            return Err(GatewayError::Upstream {
                service: "client",
                status,
            });
        }
        None => return Err(violation("start", "the first message must be start")),
    };
    let Some(copy_to_request::Message::Start(start)) = &first.message else {
        return Err(violation("start", "the first message must be start"));
    };
    check_request(gw, &call, &start.environment_id, &start.path)?;
    let (environment, _) = gw.environment(&call, &start.environment_id).await?;
    let recheck = Recheck::new(gw.clone(), call, resource_of(&environment));
    let _active = StreamGuard::new(recheck.call.info.method);

    // The client's chunks go upstream through a small channel. A client
    // stream that fails or breaks the protocol, or rights withdrawn, end the
    // call with an error and drop the upstream call: the orchestrator sees a
    // reset or an archive without its end marker, and extracts nothing.
    let (tx, rx) = mpsc::channel::<runtime::CopyToRequest>(4);
    tx.send(runtime::CopyToRequest {
        caller: Some(recheck.call.caller()),
        request: Some(first),
    })
    .await
    .map_err(|_| violation("start", "the stream closed"))?;
    let outbound = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut client = gw.runtime.clone();
    let upstream = client.copy_to(recheck.call.forward_stream(outbound));
    let pump = async move {
        while let Some(item) = inbound.next().await {
            let request = item.map_err(|status| GatewayError::Upstream {
                service: "client",
                status,
            })?;
            if let Some(error) = check_next(&request) {
                return Err(error);
            }
            if tx
                .send(runtime::CopyToRequest {
                    caller: None,
                    request: Some(request),
                })
                .await
                .is_err()
            {
                // The orchestrator stopped reading: its answer says why.
                break;
            }
        }
        Ok(())
    };
    let withdrawn = until_withdrawn(&recheck);
    tokio::pin!(upstream, pump, withdrawn);
    let mut pumping = true;
    loop {
        tokio::select! {
            answer = &mut upstream => {
                return answer
                    .map(|r| r.into_inner().response.unwrap_or_default())
                    .map_err(GatewayError::upstream(ORCHESTRATOR));
            }
            pumped = &mut pump, if pumping => {
                pumped?;
                pumping = false;
            }
            error = &mut withdrawn => return Err(error),
        }
    }
}

/// Resolves once the caller may no longer do what it does (re-authorized
/// every `stream_recheck`), with the error that ends the stream.
async fn until_withdrawn(recheck: &Recheck) -> GatewayError {
    let period = recheck.gateway.stream_recheck;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_allowed = Instant::now();
    loop {
        tick.tick().await;
        if let Err(error) = recheck.still_allowed(&mut last_allowed).await {
            tracing::debug!(%error, "copy ended: rights re-checked");
            recheck.ended.cancel();
            return error;
        }
    }
}

/// Handles one CopyFrom call.
pub(crate) async fn copy_from(
    gw: &Arc<Gateway>,
    request: Request<CopyFromRequest>,
    resource_of: fn(&Environment) -> Resource,
) -> Result<ProxyStream<CopyFromResponse>> {
    let call = gw.authenticate(gw.stream_info(&request)).await?;
    let req = request.into_inner();
    check_request(gw, &call, &req.environment_id, &req.path)?;
    let (environment, _) = gw.environment(&call, &req.environment_id).await?;
    let upstream = gw
        .runtime
        .clone()
        .copy_from(call.forward_stream(runtime::CopyFromRequest {
            caller: Some(call.caller()),
            request: Some(req),
        }))
        .await
        .map_err(GatewayError::upstream(ORCHESTRATOR))?
        .into_inner();
    Ok(relay(
        ORCHESTRATOR,
        upstream,
        |m| m.response,
        Recheck::new(gw.clone(), call, resource_of(&environment)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_absolute_bounded_and_printable() {
        assert!(check_path("path", "/workspace/a b").is_ok());
        for bad in ["", "workspace", "./x", "/a\0b", "/a\tb"] {
            match check_path("path", bad) {
                Err(GatewayError::Invalid(v)) => assert_eq!(v.field, "path", "{bad:?}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert!(check_path("path", &format!("/{}", "a".repeat(MAX_PATH_BYTES))).is_err());
    }

    #[test]
    fn a_second_start_or_an_oversized_chunk_breaks_the_protocol() {
        let data = |n| CopyToRequest {
            message: Some(copy_to_request::Message::Data(vec![0; n])),
        };
        assert!(check_next(&data(MAX_CHUNK_BYTES)).is_none());
        match check_next(&data(MAX_CHUNK_BYTES + 1)) {
            Some(GatewayError::Invalid(v)) => assert_eq!(v.field, "data"),
            other => panic!("{other:?}"),
        }
        let start = CopyToRequest {
            message: Some(copy_to_request::Message::Start(Default::default())),
        };
        assert!(matches!(check_next(&start), Some(GatewayError::Invalid(v)) if v.field == "start"));
    }
}
