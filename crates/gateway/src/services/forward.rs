//! `EnvironmentService/PortForward`: one TCP connection to a port inside an
//! environment per stream. The first message names the environment and the
//! port; the gateway validates both, authorizes `environment.port_forward`
//! on the environment (its owner or a team admin, like exec) and relays the
//! rest to the orchestrator, which makes the connection from inside the
//! environment's network namespace (see the orchestrator's `forward`
//! module). The stream is re-authorized like every long stream
//! ([`Recheck`]): revoking the token, disabling the user, a demotion or a
//! removal from the team ends it. A data message larger than
//! [`MAX_DATA_BYTES`] ends the stream with INVALID_ARGUMENT naming `data`.

use std::sync::Arc;

use futures::stream::StreamExt;
use tokio::sync::oneshot;
use tonic::{Code, Request, Status, Streaming};
use vibebox_proto::authz::Resource;
use vibebox_proto::environment::{
    PortForwardRequest, PortForwardResponse, PortForwardStart, port_forward_request,
};
use vibebox_proto::runtime;

use super::{ProxyStream, Recheck, relay};
use crate::error::{GatewayError, Result};
use crate::gateway::{Gateway, ORCHESTRATOR};
use crate::validate::{self, FieldViolation};

/// Largest `data` message a client may send.
pub(crate) const MAX_DATA_BYTES: usize = 1024 * 1024;

fn violation(field: &str, description: &str) -> GatewayError {
    GatewayError::Invalid(FieldViolation {
        field: field.to_owned(),
        description: description.to_owned(),
    })
}

/// Checks a start message; the environment id.
pub(crate) fn check_start(start: &PortForwardStart) -> Result<String> {
    let id = validate::uuid("start.environment_id", &start.environment_id)?;
    if !(1..=65535).contains(&start.port) {
        return Err(violation(
            "start.port",
            "must be a TCP port between 1 and 65535",
        ));
    }
    Ok(id.to_string())
}

/// What is wrong with a message after the start, if anything.
fn check_next(request: &PortForwardRequest) -> Option<GatewayError> {
    match &request.message {
        Some(port_forward_request::Message::Start(_)) => {
            Some(violation("start", "only the first message may be start"))
        }
        Some(port_forward_request::Message::Data(data)) if data.len() > MAX_DATA_BYTES => {
            Some(violation(
                "data",
                &format!("at most {MAX_DATA_BYTES} bytes per message"),
            ))
        }
        _ => None,
    }
}

/// Handles one PortForward call.
pub(crate) async fn port_forward(
    gw: &Arc<Gateway>,
    request: Request<Streaming<PortForwardRequest>>,
    resource_of: fn(&vibebox_proto::environment::Environment) -> Resource,
) -> Result<ProxyStream<PortForwardResponse>> {
    let info = gw.stream_info(&request);
    let call = gw.authenticate(info).await?;
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
    let Some(port_forward_request::Message::Start(start)) = &first.message else {
        return Err(violation("start", "the first message must be start"));
    };
    let id = check_start(start)?;
    let (environment, _) = gw.environment(&call, &id).await?;
    let recheck = Recheck::new(gw.clone(), call, resource_of(&environment));
    let call = &recheck.call;

    // The first message carries the caller; the rest are relayed as they
    // come until one breaks the protocol (which ends the stream with its
    // error) or the client's stream ends or fails (the orchestrator then
    // half-closes, or drops, the connection).
    let (broken_tx, broken_rx) = oneshot::channel::<GatewayError>();
    let mut broken_tx = Some(broken_tx);
    let rest = inbound
        .take_while(move |item| {
            let keep = match item {
                Ok(request) => match check_next(request) {
                    Some(error) => {
                        if let Some(tx) = broken_tx.take() {
                            let _ = tx.send(error);
                        }
                        false
                    }
                    None => true,
                },
                Err(status) => {
                    // A message over the gateway's request size limit ends
                    // the stream with its reason; any other failure of the
                    // client's stream ends the input (the client is gone).
                    if status.code() == Code::OutOfRange
                        && let Some(tx) = broken_tx.take()
                    {
                        let _ = tx.send(violation(
                            "data",
                            "the message is larger than the gateway accepts",
                        ));
                    }
                    false
                }
            };
            futures::future::ready(keep)
        })
        .filter_map(|item| futures::future::ready(item.ok()))
        .map(|request| runtime::PortForwardRequest {
            caller: None,
            request: Some(request),
        })
        // Input stops with the stream (rights withdrawn, client gone).
        .take_until(recheck.ended.clone().cancelled_owned());
    let outbound = futures::stream::once(futures::future::ready(runtime::PortForwardRequest {
        caller: Some(call.caller()),
        request: Some(first),
    }))
    .chain(rest);
    let upstream_stream = gw
        .runtime
        .clone()
        .port_forward(call.forward_stream(outbound))
        .await
        .map_err(GatewayError::upstream(ORCHESTRATOR))?
        .into_inner();
    let relayed = relay(ORCHESTRATOR, upstream_stream, |m| m.response, recheck);
    Ok(until_broken(relayed, broken_rx))
}

/// `relayed`, ended by the client's protocol error when there is one
/// (dropping `relayed` cancels the upstream call).
fn until_broken(
    relayed: ProxyStream<PortForwardResponse>,
    broken: oneshot::Receiver<GatewayError>,
) -> ProxyStream<PortForwardResponse> {
    // A sender dropped without an error (the input ended normally) must not
    // end the output.
    let broken = async move {
        match broken.await {
            Ok(error) => error,
            Err(_) => futures::future::pending().await,
        }
    };
    futures::stream::unfold(
        (relayed, Some(Box::pin(broken))),
        |(mut relayed, broken)| async move {
            let mut broken = broken?;
            tokio::select! {
                error = &mut broken => {
                    drop(relayed);
                    let status: std::result::Result<PortForwardResponse, Status> =
                        Err(Status::from(error));
                    Some((status, (futures::stream::empty().boxed(), None)))
                }
                item = relayed.next() => item.map(|item| (item, (relayed, Some(broken)))),
            }
        },
    )
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(id: &str, port: u32) -> PortForwardStart {
        PortForwardStart {
            environment_id: id.into(),
            port,
        }
    }

    const ID: &str = "2f1c3e4a-9b7d-4c1e-8a2b-3c4d5e6f7a8b";

    #[test]
    fn a_start_needs_a_uuid_and_a_port_in_range() {
        assert_eq!(check_start(&start(ID, 8080)).unwrap(), ID);
        assert_eq!(check_start(&start(ID, 1)).unwrap(), ID);
        assert_eq!(check_start(&start(ID, 65535)).unwrap(), ID);
        for port in [0, 65536, 70000] {
            match check_start(&start(ID, port)) {
                Err(GatewayError::Invalid(v)) => assert_eq!(v.field, "start.port", "{port}"),
                other => panic!("{port}: {other:?}"),
            }
        }
        match check_start(&start("../x", 80)) {
            Err(GatewayError::Invalid(v)) => assert_eq!(v.field, "start.environment_id"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn oversized_data_and_a_second_start_break_the_protocol() {
        let data = |n: usize| PortForwardRequest {
            message: Some(port_forward_request::Message::Data(vec![0; n])),
        };
        assert!(check_next(&data(MAX_DATA_BYTES)).is_none());
        match check_next(&data(MAX_DATA_BYTES + 1)) {
            Some(GatewayError::Invalid(v)) => assert_eq!(v.field, "data"),
            other => panic!("{other:?}"),
        }
        let again = PortForwardRequest {
            message: Some(port_forward_request::Message::Start(start(ID, 80))),
        };
        match check_next(&again) {
            Some(GatewayError::Invalid(v)) => assert_eq!(v.field, "start"),
            other => panic!("{other:?}"),
        }
        let close = PortForwardRequest {
            message: Some(port_forward_request::Message::CloseWrite(true)),
        };
        assert!(check_next(&close).is_none());
    }

    #[tokio::test]
    async fn a_protocol_error_ends_the_relayed_stream_with_it() {
        let (tx, rx) = oneshot::channel();
        // An upstream that never ends.
        let relayed: ProxyStream<PortForwardResponse> = futures::stream::pending().boxed();
        let mut out = until_broken(relayed, rx);
        tx.send(violation("data", "too big")).unwrap();
        let status = out.next().await.expect("an item").expect_err("an error");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(out.next().await.is_none());

        // A sender dropped without an error leaves the stream alone.
        let (tx, rx) = oneshot::channel::<GatewayError>();
        let relayed: ProxyStream<PortForwardResponse> =
            futures::stream::iter(vec![Ok(PortForwardResponse::default())]).boxed();
        let mut out = until_broken(relayed, rx);
        drop(tx);
        assert!(out.next().await.expect("the item").is_ok());
        assert!(out.next().await.is_none());
    }
}
