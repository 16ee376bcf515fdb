//! The `vibebox.internal.runtime.v1.RuntimeService` adapter: converts wire
//! messages into domain calls on [`Orchestrator`] and errors into statuses.
//! Callers are restricted to the gateway by the server kit (mTLS identity).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Response, Status, Streaming};
use vibebox_proto::environment as env_pb;
use vibebox_proto::runtime::runtime_service_server::RuntimeService;
use vibebox_proto::runtime::*;

use crate::audit::Caller;
use crate::docker::SpecError;
use crate::feed;
use crate::service::{CreateRequest, Error, Orchestrator, Rejection};
use crate::store::{EnvRecord, State};
use crate::streams::{ExecInput, ExecOutput, ExecStart, LogOptions, Output};

/// `ErrorInfo.reason` of a refusal because another operation is in
/// progress on the environment (metadata `state`, `operation`: the one in
/// progress, `requested`: the one refused).
pub const OPERATION_IN_PROGRESS: &str = "environment.operation_in_progress";
/// `ErrorInfo.reason` of an operation that does not apply to the
/// environment's state (metadata `state`, `operation`).
pub const BAD_STATE: &str = "environment.bad_state";
/// `ErrorInfo.reason` of a create whose environment id is taken.
pub const ID_TAKEN: &str = "environment.id_taken";
/// `ErrorInfo.reason` of a refusal by a team quota (with a QuotaFailure;
/// metadata `quota`, `unit`, `limit`, `reserved`, `requested`).
pub const QUOTA_EXCEEDED: &str = "environment.quota_exceeded";
/// `ErrorInfo.reason` of an environment held by a short platform action
/// for longer than an operation waits (ABORTED: retry).
pub const BUSY: &str = "environment.busy";
/// `ErrorInfo.reason` of a create whose request id another owner's create
/// in the team used (FAILED_PRECONDITION; metadata `request_id`).
pub const REQUEST_ID_REUSED: &str = "request_id.reused";
/// `ErrorInfo.reason` of a listing ordered by name or state that selects
/// more than one call sorts (FAILED_PRECONDITION; metadata `max`).
pub const TOO_MANY_TO_SORT: &str = "listing.too_many_to_sort";

/// RESOURCE_EXHAUSTED for a team quota: a QuotaFailure naming the team
/// (`team:<id>`) and the quota with its limit, and an ErrorInfo with the
/// figures.
fn quota_status(team: &str, exceeded: &crate::admission::QuotaExceeded) -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let description = exceeded.to_string();
    let mut details = ErrorDetails::new();
    details.add_quota_failure_violation(format!("team:{team}"), description.clone());
    details.set_error_info(
        QUOTA_EXCEEDED,
        vibebox_server_kit::status::ERROR_DOMAIN,
        [
            ("quota", exceeded.quota.as_str().to_owned()),
            ("unit", exceeded.quota.unit().to_owned()),
            ("limit", exceeded.amount(exceeded.limit)),
            ("reserved", exceeded.amount(exceeded.reserved)),
            ("requested", exceeded.amount(exceeded.requested)),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    Status::with_error_details(
        tonic::Code::ResourceExhausted,
        format!("team quota exceeded: {description}"),
        details,
    )
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        use vibebox_server_kit::status;
        match e {
            Error::InvalidArgument { field, reason } => status::invalid_field(field, &reason),
            Error::Clearance(why) => {
                let rule = match &why {
                    Rejection::Missing => "clearance.missing",
                    Rejection::Replayed => "clearance.replayed",
                    Rejection::Invalid(_) => "clearance.invalid",
                    Rejection::ImageMismatch => "clearance.image_mismatch",
                };
                let msg = format!("clearance refused: {why}");
                if why.is_stale() {
                    status::precondition_failure(&msg, &[(rule, "clearance", &why.to_string())])
                } else {
                    Status::permission_denied(msg)
                }
            }
            Error::Spec(SpecError::BindSource {
                index,
                source_path: _,
                reason,
            }) => status::precondition_failure(
                &format!("bind source refused on the host: {reason}"),
                &[(
                    "mount.bind_source",
                    &format!("spec.mounts[{index}].source"),
                    &reason.to_string(),
                )],
            ),
            Error::Spec(s) => status::precondition_failure(
                "the cleared spec cannot be applied",
                &[("orchestrator.spec", "spec", &s.to_string())],
            ),
            Error::NotFound => Status::not_found("environment not found"),
            Error::AlreadyExists(id) => status::with_reason(
                tonic::Code::AlreadyExists,
                &format!("environment id {id} is already in use"),
                ID_TAKEN,
                &[("environment_id", &id)],
                &[],
            ),
            Error::Quota { team, exceeded } => quota_status(&team, &exceeded),
            Error::Capacity(m) => status::retry_later(
                &format!("host capacity exceeded: {m}"),
                std::time::Duration::from_secs(30),
            ),
            Error::SubnetsExhausted => status::retry_later(
                "no free subnet left in the environment address pool",
                std::time::Duration::from_secs(30),
            ),
            Error::BadState { state, operation } => status::with_reason(
                tonic::Code::FailedPrecondition,
                &format!("environment is {state}; cannot {operation}"),
                BAD_STATE,
                &[("state", state), ("operation", operation)],
                &[],
            ),
            e @ Error::OperationInProgress {
                state,
                operation,
                requested,
            } => status::with_reason(
                tonic::Code::FailedPrecondition,
                &e.to_string(),
                OPERATION_IN_PROGRESS,
                &[
                    ("state", state),
                    ("operation", operation),
                    ("requested", requested),
                ],
                &[],
            ),
            e @ Error::Busy { requested } => status::with_reason(
                tonic::Code::Aborted,
                &e.to_string(),
                BUSY,
                &[("requested", requested)],
                &[],
            ),
            e @ Error::Superseded { operation } => status::with_reason(
                tonic::Code::Aborted,
                &e.to_string(),
                OPERATION_IN_PROGRESS,
                &[
                    ("state", "deleting"),
                    ("operation", "delete"),
                    ("requested", operation),
                ],
                &[],
            ),
            e @ Error::ImageUnavailable { .. } => status::precondition_failure(
                &e.to_string(),
                &[("orchestrator.image", "image", "image not available")],
            ),
            Error::EngineRefused { field, reason } => status::precondition_failure(
                &format!("the Docker Engine refused the spec: {reason}"),
                &[("engine.refused", &field, &reason)],
            ),
            Error::Docker(bollard::errors::Error::DockerResponseServerError {
                status_code: 409,
                message,
            }) => Status::failed_precondition(conflict_message(&message)),
            Error::Docker(e) if crate::service::engine_unreachable(&e) => {
                status::unavailable("Docker Engine", &e)
            }
            e @ Error::Docker(_) => status::internal(&e),
            Error::Store(crate::store::StoreError::Db(e)) if vibebox_db::is_transient(&e) => {
                status::unavailable("orchestrator database", &e)
            }
            e @ Error::Store(_) => status::internal(&e),
            e @ Error::Audit(_) => status::unavailable("audit outbox", &e),
            e @ Error::Keys(_) => status::unavailable("policy clearance keys", &e),
            e @ Error::SimulatedCrash => status::internal(&e),
            e @ Error::Egress(_) => status::unavailable("egress gate", &e),
            Error::Update(refusal) => update_refusal(&refusal),
            e @ Error::TooManyToSort { max } => status::with_reason(
                tonic::Code::FailedPrecondition,
                &e.to_string(),
                TOO_MANY_TO_SORT,
                &[("max", &max.to_string())],
                &[(
                    TOO_MANY_TO_SORT,
                    "order_by",
                    &format!("at most {max} environments are sorted by name or state"),
                )],
            ),
            ref e @ Error::RequestIdReused { ref request_id } => status::with_reason(
                tonic::Code::FailedPrecondition,
                &e.to_string(),
                REQUEST_ID_REUSED,
                &[("request_id", request_id)],
                &[],
            ),
            Error::LifetimeCeiling { latest, max } => status::precondition_failure(
                &format!(
                    "cannot extend past the maximum lifetime of {max}: the latest possible time is {latest}"
                ),
                &[(
                    "lifetime.max_lifetime",
                    "duration",
                    &format!("the latest possible time is {latest}"),
                )],
            ),
        }
    }
}

/// The status of an in-place update refused for what it asks: a path that
/// needs a new container (FAILED_PRECONDITION, the path in the ErrorInfo's
/// metadata and in a PreconditionFailure), or a spec made from an older
/// record (ABORTED: read again and retry).
fn update_refusal(refusal: &crate::update::UpdateRefusal) -> Status {
    use crate::update::{REQUIRES_RECREATE, UpdateRefusal};
    use vibebox_server_kit::status::with_reason;
    let message = refusal.to_string();
    match refusal {
        UpdateRefusal::RequiresRecreate { path } => with_reason(
            tonic::Code::FailedPrecondition,
            &message,
            REQUIRES_RECREATE,
            &[("path", path)],
            &[(REQUIRES_RECREATE, path, "cannot be changed in place")],
        ),
        UpdateRefusal::ChangedMeanwhile => with_reason(
            tonic::Code::Aborted,
            &message,
            crate::update::CHANGED_MEANWHILE,
            &[],
            &[],
        ),
    }
}

/// What a Docker conflict (409) means for the environment, without the
/// engine's own wording (which names internal objects).
fn conflict_message(engine: &str) -> &'static str {
    let engine = engine.to_ascii_lowercase();
    if engine.contains("is paused") {
        "the environment's container is paused"
    } else if engine.contains("is restarting") {
        "the environment's container is restarting; retry"
    } else if engine.contains("not running") {
        "the environment's container is not running"
    } else if engine.contains("removal") || engine.contains("being removed") {
        "the environment's container is being removed"
    } else {
        "the environment's container is busy with another operation; retry"
    }
}

fn ts_ms(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn state_pb(state: State) -> env_pb::EnvironmentState {
    match state {
        State::Creating => env_pb::EnvironmentState::Creating,
        State::Running => env_pb::EnvironmentState::Running,
        State::Stopped => env_pb::EnvironmentState::Stopped,
        State::Failed => env_pb::EnvironmentState::Failed,
        State::Deleting => env_pb::EnvironmentState::Deleting,
        State::Deleted => env_pb::EnvironmentState::Deleted,
        State::Quarantined => env_pb::EnvironmentState::Quarantined,
        State::Starting => env_pb::EnvironmentState::Starting,
        State::Stopping => env_pb::EnvironmentState::Stopping,
    }
}

/// The wire form of a record.
pub fn environment_pb(r: &EnvRecord) -> env_pb::Environment {
    let spec = Orchestrator::spec_of(r);
    let idle_stop_time = crate::lifecycle::idle_stop_at(r, &spec, None).map(ts_ms);
    env_pb::Environment {
        id: r.id.clone(),
        team_id: r.team_id.clone(),
        owner_id: r.owner_id.clone(),
        name: r.name.clone(),
        state: state_pb(r.state) as i32,
        spec: Some(spec),
        policy_version: r.policy_version.clone(),
        policy_digest: r.policy_digest.clone(),
        create_time: Some(ts_ms(r.create_time_ms)),
        update_time: Some(ts_ms(r.update_time_ms)),
        failure_reason: r.failure_reason.clone(),
        status_message: r.status_message.clone(),
        canonical_image: r.canonical_image.clone(),
        // Idle stop and lifetime (see `crate::lifecycle`): the persisted
        // activity, at most one sweep behind.
        stop_reason: r.stop_reason.clone(),
        last_activity_time: r.last_activity_ms.map(ts_ms),
        idle_stop_time,
        expire_time: r.expire_at_ms.map(ts_ms),
        progress_percent: r.progress_percent,
        labels: crate::update::labels_of(r),
    }
}

fn caller_of<T>(req: &Request<T>, c: Option<&vibebox_proto::runtime::Caller>) -> Caller {
    let mut caller = c
        .map(|c| Caller {
            user_id: c.user_id.clone(),
            token_id: c.token_id.clone(),
            request_id: c.request_id.clone(),
            client_address: c.client_address.clone(),
            actor_kind: c.actor_kind.clone(),
        })
        .unwrap_or_default();
    if caller.request_id.is_empty() {
        caller.request_id = vibebox_server_kit::request_id(req).unwrap_or_default();
    }
    caller
}

/// The caller of a stream's first message (the request id from the
/// metadata when it carries none).
fn caller_of_stream(c: Option<vibebox_proto::runtime::Caller>, request_id: String) -> Caller {
    let mut caller = c
        .map(|c| Caller {
            user_id: c.user_id,
            token_id: c.token_id,
            request_id: c.request_id,
            client_address: c.client_address,
            actor_kind: c.actor_kind,
        })
        .unwrap_or_default();
    if caller.request_id.is_empty() {
        caller.request_id = request_id;
    }
    caller
}

/// Runs a state change to its end even when the caller goes away (the
/// gateway died or the client hung up): dropping it halfway would leave
/// Docker and the store apart, or a committed change without its audit event,
/// which only a later reconcile could repair. The request's span goes along,
/// so its audit events keep the trace id.
async fn to_completion<T, F>(change: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, Error>> + Send + 'static,
{
    let change = tracing::Instrument::instrument(change, tracing::Span::current());
    match tokio::spawn(change).await {
        Ok(result) => result.map_err(Status::from),
        Err(e) => Err(vibebox_server_kit::status::internal(&e)),
    }
}

/// The RuntimeService handler.
#[derive(Clone)]
pub struct RuntimeHandler {
    orchestrator: Orchestrator,
    /// Ends the endless streams (the environment feed) when the server
    /// shuts down, so that its graceful drain does not wait for them.
    shutdown: CancellationToken,
    feed_delay: std::time::Duration,
    /// CopyTo and CopyFrom (`crate::copy`).
    copier: crate::copy::Copier,
}

impl RuntimeHandler {
    /// A handler over `orchestrator`.
    pub fn new(orchestrator: Orchestrator, shutdown: CancellationToken) -> Self {
        let copier = crate::copy::Copier::new(
            orchestrator.clone(),
            std::env::temp_dir().join("vibebox-orchestrator-spool"),
        );
        RuntimeHandler {
            orchestrator,
            shutdown,
            feed_delay: std::time::Duration::ZERO,
            copier,
        }
    }

    /// Spools CopyTo archives in `dir` (the data directory's `spool`).
    pub fn spool_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.copier = crate::copy::Copier::new(self.orchestrator.clone(), dir);
        self
    }

    /// Holds every change on the environment feed back by `delay` (tests).
    #[cfg(feature = "test-hooks")]
    pub fn feed_delay(mut self, delay: std::time::Duration) -> Self {
        self.feed_delay = delay;
        self
    }

    /// A response (also an error: a change may have failed halfway) with
    /// the feed position that reflects everything committed before it.
    fn marked<T>(&self, result: Result<T, Status>) -> Result<Response<T>, Status> {
        let mark = feed::change_mark(self.orchestrator.inner.store.changes());
        let value: Option<MetadataValue<Ascii>> = mark.parse().ok();
        match result {
            Ok(message) => {
                let mut response = Response::new(message);
                if let Some(value) = value {
                    response
                        .metadata_mut()
                        .insert(feed::CHANGE_MARK_HEADER, value);
                }
                Ok(response)
            }
            Err(mut status) => {
                if let Some(value) = value {
                    status
                        .metadata_mut()
                        .insert(feed::CHANGE_MARK_HEADER, value);
                }
                Err(status)
            }
        }
    }
}

type RpcStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl RuntimeService for RuntimeHandler {
    async fn create_environment(
        &self,
        request: Request<CreateEnvironmentRequest>,
    ) -> Result<Response<CreateEnvironmentResponse>, Status> {
        let caller = caller_of(&request, request.get_ref().caller.as_ref());
        let r = request.into_inner();
        let orchestrator = self.orchestrator.clone();
        let rec = to_completion(async move {
            orchestrator
                .create(CreateRequest {
                    caller,
                    request_id: r.request_id,
                    environment_id: r.environment_id,
                    team_id: r.team_id,
                    owner_id: r.owner_id,
                    name: r.name,
                    spec: r.spec,
                    clearance: r.clearance,
                    canonical_image: r.canonical_image,
                    labels: r.labels,
                })
                .await
        })
        .await;
        self.marked(rec.map(|rec| CreateEnvironmentResponse {
            environment: Some(environment_pb(&rec)),
        }))
    }

    async fn get_environment(
        &self,
        request: Request<GetEnvironmentRequest>,
    ) -> Result<Response<GetEnvironmentResponse>, Status> {
        // Marked too: the gateway's replica must not answer older than this
        // once the caller has seen it.
        let found = self
            .orchestrator
            .get(&request.get_ref().environment_id)
            .await
            .map_err(Status::from);
        self.marked(found.map(|rec| GetEnvironmentResponse {
            environment: Some(environment_pb(&rec)),
        }))
    }

    async fn list_environments(
        &self,
        request: Request<ListEnvironmentsRequest>,
    ) -> Result<Response<ListEnvironmentsResponse>, Status> {
        let r = request.into_inner();
        let invalid = |e: vibebox_listing::InvalidArgument| {
            vibebox_server_kit::status::invalid_field(e.field, &e.description)
        };
        let query =
            vibebox_listing::Query::new(&r.filter, &r.order_by, r.show_deleted).map_err(invalid)?;
        let size = vibebox_listing::page_size(r.page_size).map_err(invalid)?;
        let cursor = query.cursor(&r.page_token).map_err(invalid)?;
        let page = self
            .orchestrator
            .list(&r.team_ids, &query, size, cursor.as_ref())
            .await?;
        self.marked(Ok(ListEnvironmentsResponse {
            environments: page.environments,
            next_page_token: page.next_page_token,
        }))
    }

    async fn start_environment(
        &self,
        request: Request<StartEnvironmentRequest>,
    ) -> Result<Response<StartEnvironmentResponse>, Status> {
        let caller = caller_of(&request, request.get_ref().caller.as_ref());
        let (orchestrator, id) = (
            self.orchestrator.clone(),
            request.into_inner().environment_id,
        );
        let rec = to_completion(async move { orchestrator.start(&caller, &id).await }).await;
        self.marked(rec.map(|rec| StartEnvironmentResponse {
            environment: Some(environment_pb(&rec)),
        }))
    }

    async fn stop_environment(
        &self,
        request: Request<StopEnvironmentRequest>,
    ) -> Result<Response<StopEnvironmentResponse>, Status> {
        let caller = caller_of(&request, request.get_ref().caller.as_ref());
        let (orchestrator, r) = (self.orchestrator.clone(), request.into_inner());
        let rec = to_completion(async move {
            orchestrator
                .stop(&caller, &r.environment_id, r.timeout_seconds)
                .await
        })
        .await;
        self.marked(rec.map(|rec| StopEnvironmentResponse {
            environment: Some(environment_pb(&rec)),
        }))
    }

    async fn restart_environment(
        &self,
        request: Request<RestartEnvironmentRequest>,
    ) -> Result<Response<RestartEnvironmentResponse>, Status> {
        let caller = caller_of(&request, request.get_ref().caller.as_ref());
        let (orchestrator, r) = (self.orchestrator.clone(), request.into_inner());
        let rec = to_completion(async move {
            orchestrator
                .restart(&caller, &r.environment_id, r.timeout_seconds)
                .await
        })
        .await;
        self.marked(rec.map(|rec| RestartEnvironmentResponse {
            environment: Some(environment_pb(&rec)),
        }))
    }

    async fn delete_environment(
        &self,
        request: Request<DeleteEnvironmentRequest>,
    ) -> Result<Response<DeleteEnvironmentResponse>, Status> {
        let caller = caller_of(&request, request.get_ref().caller.as_ref());
        let (orchestrator, id) = (
            self.orchestrator.clone(),
            request.into_inner().environment_id,
        );
        let rec = to_completion(async move { orchestrator.delete(&caller, &id).await }).await;
        self.marked(rec.map(|rec| DeleteEnvironmentResponse {
            environment: Some(environment_pb(&rec)),
        }))
    }

    type WatchEnvironmentsStream = RpcStream<WatchEnvironmentsResponse>;

    async fn watch_environments(
        &self,
        _request: Request<WatchEnvironmentsRequest>,
    ) -> Result<Response<Self::WatchEnvironmentsStream>, Status> {
        let (sink, receiver) = tokio::sync::mpsc::channel(8);
        tokio::spawn(feed::run(
            self.orchestrator.clone(),
            sink,
            self.shutdown.clone(),
            self.feed_delay,
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    type StreamLogsStream = RpcStream<StreamLogsResponse>;

    async fn stream_logs(
        &self,
        request: Request<StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let r = request.into_inner().request.unwrap_or_default();
        let stream = self
            .orchestrator
            .logs(
                &r.environment_id,
                LogOptions {
                    follow: r.follow,
                    tail: r.tail_lines,
                    since: r.since_time.map(|t| t.seconds),
                    timestamps: r.timestamps,
                    stdout: r.include_stdout,
                    stderr: r.include_stderr,
                },
            )
            .await?;
        let out = stream.map(|item| {
            let c = item?;
            Ok(StreamLogsResponse {
                chunk: Some(env_pb::StreamLogsResponse {
                    stream: match c.stream {
                        Output::Stdout => env_pb::OutputStream::Stdout,
                        Output::Stderr => env_pb::OutputStream::Stderr,
                    } as i32,
                    data: c.data.to_vec(),
                    time: c.time.map(|t| prost_types::Timestamp {
                        seconds: t.timestamp(),
                        nanos: t.timestamp_subsec_nanos() as i32,
                    }),
                }),
            })
        });
        Ok(Response::new(Box::pin(out)))
    }

    type ExecStream = RpcStream<ExecResponse>;

    async fn exec(
        &self,
        request: Request<Streaming<ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let request_id = vibebox_server_kit::request_id(&request).unwrap_or_default();
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| vibebox_server_kit::status::invalid_field("start", "missing"))?;
        let mut caller = first
            .caller
            .map(|c| Caller {
                user_id: c.user_id,
                token_id: c.token_id,
                request_id: c.request_id,
                client_address: c.client_address,
                actor_kind: c.actor_kind,
            })
            .unwrap_or_default();
        if caller.request_id.is_empty() {
            caller.request_id = request_id;
        }
        let Some(env_pb::exec_request::Message::Start(start)) =
            first.request.and_then(|r| r.message)
        else {
            return Err(vibebox_server_kit::status::invalid_field(
                "start",
                "the first message must be start",
            ));
        };
        let size = start.terminal_size.map(|s| {
            (
                s.rows.min(u16::MAX.into()) as u16,
                s.columns.min(u16::MAX.into()) as u16,
            )
        });
        let input = inbound.filter_map(|m| async move {
            match m.ok()?.request?.message? {
                env_pb::exec_request::Message::Stdin(b) => Some(ExecInput::Stdin(b.into())),
                env_pb::exec_request::Message::Resize(s) => Some(ExecInput::Resize(
                    s.rows.min(u16::MAX.into()) as u16,
                    s.columns.min(u16::MAX.into()) as u16,
                )),
                env_pb::exec_request::Message::CloseStdin(_) => Some(ExecInput::CloseStdin),
                env_pb::exec_request::Message::Start(_) => None,
            }
        });
        let stream = self
            .orchestrator
            .exec(
                &caller,
                ExecStart {
                    environment_id: start.environment_id,
                    command: start.command,
                    tty: start.tty,
                    env: start.env,
                    working_dir: start.working_dir,
                    size,
                    stdin: start.stdin,
                },
                Box::pin(input),
            )
            .await?;
        let out = stream.map(|item| {
            let m = match item? {
                ExecOutput::Stdout(b) => env_pb::exec_response::Message::Stdout(b.to_vec()),
                ExecOutput::Stderr(b) => env_pb::exec_response::Message::Stderr(b.to_vec()),
                ExecOutput::Exit(code) => {
                    env_pb::exec_response::Message::Exit(env_pb::ExecExit { exit_code: code })
                }
            };
            Ok(ExecResponse {
                response: Some(env_pb::ExecResponse { message: Some(m) }),
            })
        });
        Ok(Response::new(Box::pin(out)))
    }

    type StreamStatsStream = RpcStream<StreamStatsResponse>;

    async fn stream_stats(
        &self,
        request: Request<StreamStatsRequest>,
    ) -> Result<Response<Self::StreamStatsStream>, Status> {
        let r = request.into_inner().request.unwrap_or_default();
        let stream = self
            .orchestrator
            .stats(&r.environment_id, r.one_shot)
            .await?;
        let orchestrator = self.orchestrator.clone();
        let env = r.environment_id.clone();
        let out = stream.map(move |item| {
            let s = item?;
            let (allowed, denied) = orchestrator.egress_counts(&env);
            Ok(StreamStatsResponse {
                sample: Some(env_pb::StreamStatsResponse {
                    time: s.time.map(|t| prost_types::Timestamp {
                        seconds: t.timestamp(),
                        nanos: t.timestamp_subsec_nanos() as i32,
                    }),
                    cpu_percent: s.cpu_percent,
                    memory_usage_bytes: s.memory_usage_bytes,
                    memory_limit_bytes: s.memory_limit_bytes,
                    pids: s.pids,
                    network_rx_bytes: s.network_rx_bytes,
                    network_tx_bytes: s.network_tx_bytes,
                    egress_allowed_connections: allowed,
                    egress_denied_connections: denied,
                }),
            })
        });
        Ok(Response::new(Box::pin(out)))
    }

    type PortForwardStream = RpcStream<PortForwardResponse>;

    async fn port_forward(
        &self,
        request: Request<Streaming<PortForwardRequest>>,
    ) -> Result<Response<Self::PortForwardStream>, Status> {
        use crate::forward::{ForwardInput, ForwardOutput};
        use env_pb::{port_forward_request, port_forward_response};
        let request_id = vibebox_server_kit::request_id(&request).unwrap_or_default();
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| vibebox_server_kit::status::invalid_field("start", "missing"))?;
        let mut caller = caller_of(&Request::new(()), first.caller.as_ref());
        if caller.request_id.is_empty() {
            caller.request_id = request_id;
        }
        let Some(port_forward_request::Message::Start(start)) =
            first.request.and_then(|r| r.message)
        else {
            return Err(vibebox_server_kit::status::invalid_field(
                "start",
                "the first message must be start",
            ));
        };
        let input = inbound.filter_map(|m| async move {
            let message = match m {
                Ok(m) => m.request?.message?,
                Err(_) => return Some(ForwardInput::Aborted),
            };
            Some(match message {
                port_forward_request::Message::Data(b) => ForwardInput::Data(b.into()),
                port_forward_request::Message::CloseWrite(_) => ForwardInput::CloseWrite,
                port_forward_request::Message::Start(_) => ForwardInput::Invalid {
                    field: "start",
                    reason: "only the first message may be start".into(),
                },
            })
        });
        let stream = self
            .orchestrator
            .port_forward(&caller, &start.environment_id, start.port, Box::pin(input))
            .await?;
        let out = stream.map(|item| {
            let message = match item? {
                ForwardOutput::Ready => port_forward_response::Message::Ready(true),
                ForwardOutput::Data(b) => port_forward_response::Message::Data(b.to_vec()),
            };
            Ok(PortForwardResponse {
                response: Some(env_pb::PortForwardResponse {
                    message: Some(message),
                }),
            })
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn copy_to(
        &self,
        request: Request<Streaming<CopyToRequest>>,
    ) -> Result<Response<CopyToResponse>, Status> {
        let request_id = vibebox_server_kit::request_id(&request).unwrap_or_default();
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| vibebox_server_kit::status::invalid_field("start", "missing"))?;
        let caller = caller_of_stream(first.caller, request_id);
        let Some(env_pb::copy_to_request::Message::Start(start)) =
            first.request.and_then(|r| r.message)
        else {
            return Err(vibebox_server_kit::status::invalid_field(
                "start",
                "the first message must be start",
            ));
        };
        // A broken client stream is an error, never the end of the archive.
        let input = inbound.map(|item| match item {
            Ok(m) => match m.request.and_then(|r| r.message) {
                Some(env_pb::copy_to_request::Message::Data(data)) => Ok(bytes::Bytes::from(data)),
                Some(env_pb::copy_to_request::Message::Start(_)) => {
                    Err(crate::copy::CopyError::Invalid {
                        field: "start",
                        reason: "only the first message may be start".into(),
                    })
                }
                None => Ok(bytes::Bytes::new()),
            },
            Err(status) => Err(crate::copy::CopyError::Cancelled(
                status.message().to_owned(),
            )),
        });
        // Runs to its end (upload and audit) even if the caller goes away.
        let copier = self.copier.clone();
        let copied = tokio::spawn(tracing::Instrument::instrument(
            async move {
                copier
                    .copy_to(&caller, &start.environment_id, &start.path, input)
                    .await
            },
            tracing::Span::current(),
        ))
        .await
        .map_err(|e| vibebox_server_kit::status::internal(&e))?;
        let bytes = copied?;
        Ok(Response::new(CopyToResponse {
            response: Some(env_pb::CopyToResponse { bytes }),
        }))
    }

    type CopyFromStream = RpcStream<CopyFromResponse>;

    async fn copy_from(
        &self,
        request: Request<CopyFromRequest>,
    ) -> Result<Response<Self::CopyFromStream>, Status> {
        let request_id = vibebox_server_kit::request_id(&request).unwrap_or_default();
        let r = request.into_inner();
        let caller = caller_of_stream(r.caller, request_id);
        let req = r.request.unwrap_or_default();
        let stream = self
            .copier
            .copy_from(&caller, &req.environment_id, &req.path)
            .await?;
        let out = stream.map(|item| {
            Ok(CopyFromResponse {
                response: Some(env_pb::CopyFromResponse {
                    data: item?.to_vec(),
                }),
            })
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn update_environment(
        &self,
        request: Request<UpdateEnvironmentRequest>,
    ) -> Result<Response<UpdateEnvironmentResponse>, Status> {
        let caller = caller_of(&request, request.get_ref().caller.as_ref());
        let r = request.into_inner();
        let orchestrator = self.orchestrator.clone();
        // Runs to its end (engine, audit, commit, or the restore of the old
        // limits) even if the caller goes away.
        let rec = to_completion(async move {
            orchestrator
                .update(crate::update::UpdateRequest {
                    caller,
                    environment_id: r.environment_id,
                    update_mask: r.update_mask,
                    name: r.name,
                    labels: r.labels,
                    spec: r.spec,
                    clearance: r.clearance,
                    request_id: r.request_id,
                })
                .await
        })
        .await;
        self.marked(rec.map(|rec| UpdateEnvironmentResponse {
            environment: Some(environment_pb(&rec)),
        }))
    }

    async fn extend_environment(
        &self,
        request: Request<ExtendEnvironmentRequest>,
    ) -> Result<Response<ExtendEnvironmentResponse>, Status> {
        let caller = caller_of(&request, request.get_ref().caller.as_ref());
        let r = request.into_inner().request.unwrap_or_default();
        let duration = r
            .duration
            .and_then(|d| std::time::Duration::try_from(d).ok())
            .ok_or_else(|| {
                vibebox_server_kit::status::invalid_field(
                    "duration",
                    "must be a positive duration between 1m and 7 days",
                )
            })?;
        let orchestrator = self.orchestrator.clone();
        let rec = to_completion(async move {
            orchestrator
                .extend(&caller, &r.environment_id, duration)
                .await
        })
        .await;
        self.marked(rec.map(|rec| ExtendEnvironmentResponse {
            environment: Some(environment_pb(&rec)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_conflicts_say_what_the_container_is_doing() {
        let status = |message: &str| {
            Status::from(Error::Docker(
                bollard::errors::Error::DockerResponseServerError {
                    status_code: 409,
                    message: message.into(),
                },
            ))
        };
        let not_running = status("Container 1f2e3d is not running");
        assert_eq!(not_running.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            not_running.message(),
            "the environment's container is not running"
        );
        let paused = status("Container 1f2e3d is paused, unpause the container before exec");
        assert_eq!(paused.message(), "the environment's container is paused");
        let restarting =
            status("Container 1f2e3d is restarting, wait until the container is running");
        assert!(restarting.message().contains("restarting"));
        let removing = status("removal of container 1f2e3d is already in progress");
        assert!(removing.message().contains("being removed"));
        let other = status("Conflict. The container name \"/x\" is already in use by 9a8b");
        assert_eq!(other.code(), tonic::Code::FailedPrecondition);
        assert!(!other.message().contains("9a8b"), "{}", other.message());
    }

    #[test]
    fn an_unreachable_engine_is_unavailable_and_engine_answers_are_not() {
        for unreachable in [
            bollard::errors::Error::IOError {
                err: std::io::Error::new(std::io::ErrorKind::NotFound, "/run/x.sock"),
            },
            bollard::errors::Error::RequestTimeoutError,
            bollard::errors::Error::SocketNotFoundError("/run/x.sock".into()),
        ] {
            let s = Status::from(Error::Docker(unreachable));
            assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
            assert_eq!(s.message(), "Docker Engine is unavailable, retry later");
            assert_eq!(
                vibebox_server_kit::status::unavailable_dependency(&s).as_deref(),
                Some("Docker Engine")
            );
        }
        let answered = bollard::errors::Error::DockerResponseServerError {
            status_code: 500,
            message: "driver failed".into(),
        };
        let s = Status::from(Error::Docker(answered));
        assert_eq!(s.code(), tonic::Code::Internal);
    }

    #[test]
    fn refusals_of_the_spec_are_the_callers_to_fix_and_name_the_field() {
        let s = Status::from(Error::EngineRefused {
            field: "spec.command".into(),
            reason: "No command specified".into(),
        });
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert!(s.message().contains("No command specified"), "{s:?}");
        assert_eq!(
            vibebox_server_kit::status::violated_rules(&s),
            ["engine.refused"]
        );
        let s = Status::from(Error::Spec(SpecError::BindSource {
            index: 1,
            source_path: "/srv/p/link".into(),
            reason: crate::docker::BindSourceReason::Symlink("/srv/p/link".into()),
        }));
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            vibebox_server_kit::status::violated_rules(&s),
            ["mount.bind_source"]
        );
        assert!(s.message().contains("symbolic link"), "{s:?}");
    }

    #[test]
    fn refusals_carry_a_stable_reason_and_quotas_their_limit() {
        use tonic_types::StatusExt;
        let reason = |s: &Status| {
            let info = s.get_details_error_info().expect("ErrorInfo");
            assert_eq!(info.domain, "vibebox");
            (info.reason, info.metadata)
        };
        let s = Status::from(Error::OperationInProgress {
            state: "starting",
            operation: "start",
            requested: "stop",
        });
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            s.message(),
            "environment is starting (start in progress); cannot stop"
        );
        let (r, m) = reason(&s);
        assert_eq!(r, OPERATION_IN_PROGRESS);
        assert_eq!(
            (m["state"].as_str(), m["operation"].as_str()),
            ("starting", "start")
        );
        assert_eq!(m["requested"], "stop");

        let s = Status::from(Error::BadState {
            state: "running",
            operation: "start",
        });
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(s.message(), "environment is running; cannot start");
        assert_eq!(reason(&s).0, BAD_STATE);

        let s = Status::from(Error::AlreadyExists("e1".into()));
        assert_eq!(s.code(), tonic::Code::AlreadyExists);
        let (r, m) = reason(&s);
        assert_eq!((r.as_str(), m["environment_id"].as_str()), (ID_TAKEN, "e1"));

        let s = Status::from(Error::Quota {
            team: "t1".into(),
            exceeded: crate::admission::QuotaExceeded {
                quota: crate::admission::Quota::Memory,
                limit: 8192 << 20,
                reserved: 8192 << 20,
                requested: 512 << 20,
            },
        });
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        let quota = s.get_details_quota_failure().expect("QuotaFailure");
        assert_eq!(quota.violations[0].subject, "team:t1");
        assert_eq!(
            quota.violations[0].description,
            "team memory quota: 8192 MiB reserved of 8192 MiB, 512 MiB more requested"
        );
        let (r, m) = reason(&s);
        assert_eq!(r, QUOTA_EXCEEDED);
        assert_eq!(
            (m["quota"].as_str(), m["limit"].as_str()),
            ("memory", "8192")
        );
        assert!(
            s.get_details_retry_info().is_none(),
            "a quota is no rate limit"
        );

        let s = Status::from(Error::Busy { requested: "stop" });
        assert_eq!(s.code(), tonic::Code::Aborted);
        assert_eq!(reason(&s).0, BUSY);
    }

    #[test]
    fn update_refusals_carry_their_reason_and_path() {
        use crate::update::UpdateRefusal;
        use vibebox_server_kit::status::{error_reason, violated_rules};
        let s = Status::from(Error::Update(UpdateRefusal::RequiresRecreate {
            path: "spec.image".into(),
        }));
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            error_reason(&s).as_deref(),
            Some(crate::update::REQUIRES_RECREATE)
        );
        assert_eq!(violated_rules(&s), [crate::update::REQUIRES_RECREATE]);
        assert!(s.message().contains("spec.image"), "{s:?}");
        let s = Status::from(Error::Update(UpdateRefusal::ChangedMeanwhile));
        assert_eq!(s.code(), tonic::Code::Aborted);
        assert_eq!(
            error_reason(&s).as_deref(),
            Some(crate::update::CHANGED_MEANWHILE)
        );
    }
}
