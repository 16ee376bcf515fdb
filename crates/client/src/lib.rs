//! A typed client of VibeBox's public gRPC API (the gateway): token auth,
//! TLS, retries with backoff on UNAVAILABLE, waits for long-running
//! operations and a watch that resumes where it broke off.
//!
//! ```no_run
//! use std::time::Duration;
//! use vibebox_client::{Client, create_request};
//!
//! # async fn run() -> vibebox_client::Result<()> {
//! let client = Client::connect("http://127.0.0.1:7700").token("...").build()?;
//! let request = create_request("team id", "demo", "vibebox/devbox:1");
//! let env = client.create_environment_and_wait(request, Duration::from_secs(300)).await?;
//! let out = client.exec(&env.id, ["echo", "hello"]).await?;
//! print!("{}", out.stdout_lossy());
//! client.delete_environment(&env.id).await?;
//! # Ok(())
//! # }
//! ```
//!
//! The generated clients of the four public services are there for every
//! other call ([`Client::environments`], [`Client::identity`],
//! [`Client::audit`], [`Client::policy`]), each carrying the token; their
//! messages are re-exported as [`environment`], [`identity`], [`audit`] and
//! [`policy`]. [`Client::retry`] gives any call that is safe to repeat the
//! same retries as the helpers.
//!
//! Connecting: `https://host:port` is TLS (the system's roots, plus
//! [`ClientBuilder::tls_ca`]). A bare `host:port` means TLS too, except on
//! loopback (`127.0.0.0/8`, `::1`, `localhost`: `vibebox up` serves
//! plaintext there), where it is plaintext. The bearer token goes with
//! every call, so plaintext `http://` to any other host is refused unless
//! [`ClientBuilder::insecure`] opts in (the token then travels in clear:
//! only on a network you trust, such as a private link to a test gateway).
//!
//! Conventions of the API (Google's AIPs): create, start, stop, restart and
//! delete return as soon as the change is accepted, with the environment in
//! its transitional state (CREATING, ...); [`Client::wait`] blocks until it
//! has settled. Creates carry a `request_id` (idempotency key): the helpers
//! make one when it is empty, so that a retried create returns the same
//! environment. Errors carry google.rpc details: [`Error::reason`]
//! (`ErrorInfo`, or the violated policy rule), [`Error::retry_delay`]
//! (`RetryInfo`), [`Error::quota_violations`] (`QuotaFailure`).

mod auth;
mod error;
mod exec;
mod retry;
mod tls;
mod watch;

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::Stream;
use tonic::codegen::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

pub use vibebox_proto::{audit, environment, identity, policy};

pub use auth::Bearer;
pub use error::{Error, RESUME_TOKEN_EXPIRED, Result, state_name};
pub use exec::ExecOutput;
pub use retry::{RetryPolicy, is_retryable, watch_reconnects};
pub use watch::is_resume_token_expired;

use audit::audit_service_client::AuditServiceClient;
use environment::environment_service_client::EnvironmentServiceClient;
use environment::{
    CreateEnvironmentRequest, DeleteEnvironmentRequest, Environment, EnvironmentState, ExecStart,
    GetEnvironmentRequest, ListEnvironmentsRequest, WaitEnvironmentRequest,
    WatchEnvironmentsResponse,
};
use identity::identity_service_client::IdentityServiceClient;
use policy::policy_service_client::PolicyServiceClient;

/// The channel every generated client of this crate runs on: the
/// connection, with the bearer token added to each call.
pub type AuthedChannel = InterceptedService<Channel, Bearer>;

/// The longest single `WaitEnvironment` call; a longer wait is several.
const WAIT_CALL_MAX: Duration = Duration::from_secs(300);
/// Added to a `WaitEnvironment` call's own timeout for its gRPC deadline,
/// so that the platform answers with the environment before the deadline.
const WAIT_CALL_SLACK: Duration = Duration::from_secs(10);
/// Polling bounds when the platform has no `WaitEnvironment` (UNIMPLEMENTED).
const POLL_MIN: Duration = Duration::from_millis(200);
const POLL_MAX: Duration = Duration::from_secs(2);

/// A fresh idempotency key for a create (a UUID v4).
pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A create request for an environment of `team_id` named `name` running
/// `image`, everything else the platform's defaults (policy fills them in).
/// Change any field before sending it: labels, resources, command, egress.
pub fn create_request(team_id: &str, name: &str, image: &str) -> CreateEnvironmentRequest {
    CreateEnvironmentRequest {
        team_id: team_id.to_owned(),
        name: name.to_owned(),
        spec: Some(environment::ContainerSpec {
            image: image.to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Whether `state` is a settled one: no operation in progress (not
/// CREATING, STARTING, STOPPING or DELETING).
pub fn is_settled(state: i32) -> bool {
    !matches!(
        EnvironmentState::try_from(state),
        Ok(EnvironmentState::Creating
            | EnvironmentState::Starting
            | EnvironmentState::Stopping
            | EnvironmentState::Deleting)
    )
}

/// A connection to one VibeBox gateway as one caller. Cheap to clone (the
/// clones share the connection).
#[derive(Clone, Debug)]
pub struct Client {
    channel: Channel,
    bearer: Bearer,
    retry: RetryPolicy,
    watch_retry: RetryPolicy,
}

/// How to connect: [`Client::connect`] makes one, [`ClientBuilder::build`]
/// returns a client that connects on first use (and reconnects as needed);
/// awaiting the builder connects at once (and fails if the gateway cannot
/// be reached).
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until it is built or awaited"]
pub struct ClientBuilder {
    url: String,
    token: Option<String>,
    ca_pem: Vec<u8>,
    system_roots: bool,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain: Option<String>,
    connect_timeout: Duration,
    retry: RetryPolicy,
    watch_retry: RetryPolicy,
    insecure: bool,
}

impl Client {
    /// Starts the configuration of a client of the gateway at `url`:
    /// `https://host:port` (TLS, verified against the system's root
    /// certificates and any [`ClientBuilder::tls_ca`]); `host:port` (TLS
    /// too, but plaintext on loopback: `127.0.0.0/8`, `::1`, `localhost`);
    /// `http://host:port` (plaintext, as `vibebox up` serves on loopback;
    /// to any other host only with [`ClientBuilder::insecure`], since the
    /// token would travel in clear).
    ///
    /// ```no_run
    /// # async fn run() -> vibebox_client::Result<()> {
    /// let client = vibebox_client::Client::connect("https://vibebox.example.com")
    ///     .token(std::env::var("VIBEBOX_TOKEN").unwrap_or_default())
    ///     .await?; // connects now; `.build()?` connects on first use
    /// # Ok(())
    /// # }
    /// ```
    pub fn connect(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            token: None,
            ca_pem: Vec::new(),
            system_roots: true,
            identity: None,
            domain: None,
            connect_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            watch_retry: RetryPolicy::watch(),
            insecure: false,
        }
    }

    /// `EnvironmentService`, every call with the token.
    pub fn environments(&self) -> EnvironmentServiceClient<AuthedChannel> {
        EnvironmentServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    /// `IdentityService`, every call with the token.
    pub fn identity(&self) -> IdentityServiceClient<AuthedChannel> {
        IdentityServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    /// `AuditService`, every call with the token.
    pub fn audit(&self) -> AuditServiceClient<AuthedChannel> {
        AuditServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    /// `PolicyService`, every call with the token.
    pub fn policy(&self) -> PolicyServiceClient<AuthedChannel> {
        PolicyServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    /// Runs `call` with this client's retries: again after UNAVAILABLE
    /// (backoff with jitter, [`ClientBuilder::retry`]), never after any
    /// other code. Only for calls that are safe to repeat (reads, waits,
    /// deletes, creates with a `request_id`).
    ///
    /// ```no_run
    /// # async fn run(client: vibebox_client::Client) -> vibebox_client::Result<()> {
    /// use vibebox_client::identity::ListTeamsRequest;
    /// let teams = client
    ///     .retry(|| {
    ///         let mut identity = client.identity();
    ///         async move { identity.list_teams(ListTeamsRequest::default()).await }
    ///     })
    ///     .await?
    ///     .into_inner()
    ///     .teams;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn retry<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, Status>>,
    {
        retry::run(&self.retry, call).await.map_err(Error::from)
    }

    /// Creates an environment and returns it as accepted (CREATING while
    /// the platform pulls the image and starts it; [`Client::wait`] waits
    /// for the end). An empty `request_id` is filled in with a fresh one, so
    /// that retries after UNAVAILABLE cannot create it twice.
    pub async fn create_environment(
        &self,
        mut request: CreateEnvironmentRequest,
    ) -> Result<Environment> {
        if request.request_id.is_empty() {
            request.request_id = new_request_id();
        }
        let created = self
            .retry(|| {
                let mut environments = self.environments();
                let request = request.clone();
                async move { environments.create_environment(request).await }
            })
            .await?;
        environment_of(created.into_inner().environment)
    }

    /// Creates an environment and waits until it has settled (at most
    /// `timeout`): RUNNING normally; [`Error::EnvironmentFailed`] when it
    /// failed (its `failure_reason` says why), [`Error::Timeout`] when it was
    /// still being created.
    pub async fn create_environment_and_wait(
        &self,
        request: CreateEnvironmentRequest,
        timeout: Duration,
    ) -> Result<Environment> {
        let created = self.create_environment(request).await?;
        let settled = self.wait(&created.id, timeout).await?;
        if settled.state == EnvironmentState::Failed as i32 {
            return Err(Error::EnvironmentFailed(Box::new(settled)));
        }
        Ok(settled)
    }

    /// The environment as it is now.
    pub async fn get_environment(&self, environment_id: &str) -> Result<Environment> {
        let got = self
            .retry(|| {
                let mut environments = self.environments();
                let request = GetEnvironmentRequest {
                    environment_id: environment_id.to_owned(),
                };
                async move { environments.get_environment(request).await }
            })
            .await?;
        environment_of(got.into_inner().environment)
    }

    /// Every environment of `team_id` (empty: of every team the caller is
    /// in) that `filter` selects (AIP-160 subset, for example
    /// `state = RUNNING AND labels.ci = "true"`; empty: all), newest first,
    /// all pages.
    pub async fn list_environments(&self, team_id: &str, filter: &str) -> Result<Vec<Environment>> {
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .retry(|| {
                    let mut environments = self.environments();
                    let request = ListEnvironmentsRequest {
                        team_id: team_id.to_owned(),
                        filter: filter.to_owned(),
                        page_size: 500,
                        page_token: page_token.clone(),
                        ..Default::default()
                    };
                    async move { environments.list_environments(request).await }
                })
                .await?
                .into_inner();
            all.extend(page.environments);
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            page_token = page.next_page_token;
        }
    }

    /// Deletes an environment (its container, network and workspace); it is
    /// returned as accepted (DELETING, then DELETED: [`Client::wait`]).
    pub async fn delete_environment(&self, environment_id: &str) -> Result<Environment> {
        let deleted = self
            .retry(|| {
                let mut environments = self.environments();
                let request = DeleteEnvironmentRequest {
                    environment_id: environment_id.to_owned(),
                };
                async move { environments.delete_environment(request).await }
            })
            .await?;
        environment_of(deleted.into_inner().environment)
    }

    /// Waits until the environment has no operation in progress (see
    /// [`is_settled`]) and returns it; [`Error::Timeout`] (with the
    /// environment as last seen) when `timeout` passes first.
    ///
    /// Uses `WaitEnvironment` (the platform answers when the state changes);
    /// a platform without it (UNIMPLEMENTED) is polled with
    /// `GetEnvironment` instead, every 200 ms growing to 2 s.
    pub async fn wait(&self, environment_id: &str, timeout: Duration) -> Result<Environment> {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut server_waits = true;
        let mut poll = POLL_MIN;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let environment = if server_waits && !remaining.is_zero() {
                match self.wait_call(environment_id, remaining).await {
                    Ok(environment) => environment,
                    Err(Error::Status(status)) if status.code() == Code::Unimplemented => {
                        tracing::debug!("WaitEnvironment is not implemented: polling");
                        server_waits = false;
                        continue;
                    }
                    // A deadline cut by a proxy on the way: ask again.
                    Err(Error::Status(status))
                        if status.code() == Code::DeadlineExceeded && Instant::now() < deadline =>
                    {
                        tokio::time::sleep(POLL_MIN.min(remaining)).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            } else {
                self.get_environment(environment_id).await?
            };
            if is_settled(environment.state) {
                return Ok(environment);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::Timeout {
                    environment: Box::new(environment),
                    waited: started.elapsed(),
                });
            }
            if server_waits {
                // The platform answered before its timeout without the
                // operation being over (a shorter deadline on the way):
                // never a tight loop.
                tokio::time::sleep(POLL_MIN.min(remaining)).await;
            } else {
                tokio::time::sleep(poll.min(remaining)).await;
                poll = (poll * 2).min(POLL_MAX);
            }
        }
    }

    /// One `WaitEnvironment` call of at most `remaining` (and at most
    /// [`WAIT_CALL_MAX`]).
    async fn wait_call(&self, environment_id: &str, remaining: Duration) -> Result<Environment> {
        let chunk = remaining.min(WAIT_CALL_MAX);
        let waited = self
            .retry(|| {
                let mut environments = self.environments();
                let mut request = tonic::Request::new(WaitEnvironmentRequest {
                    environment_id: environment_id.to_owned(),
                    timeout: prost_types::Duration::try_from(chunk).ok(),
                });
                request.set_timeout(chunk + WAIT_CALL_SLACK);
                async move { environments.wait_environment(request).await }
            })
            .await?;
        environment_of(waited.into_inner().environment)
    }

    /// Runs `command` (argv) in the environment without a terminal or
    /// input and returns its exit code and its output, stdout and stderr
    /// apart. Not retried (a command is not safe to run twice). The output
    /// is held in memory: for large or endless output use
    /// [`Client::environments`]`().exec(...)` and read the stream.
    ///
    /// ```no_run
    /// # async fn run(client: vibebox_client::Client, id: &str) -> vibebox_client::Result<()> {
    /// let out = client.exec(id, ["sh", "-c", "echo hi; exit 3"]).await?;
    /// assert_eq!((out.exit_code, out.stdout_lossy().as_ref()), (3, "hi\n"));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn exec<I, S>(&self, environment_id: &str, command: I) -> Result<ExecOutput>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let start = ExecStart {
            environment_id: environment_id.to_owned(),
            command: command.into_iter().map(Into::into).collect(),
            ..Default::default()
        };
        self.exec_with(start, None).await
    }

    /// Like [`Client::exec`] with every option of `ExecStart` (environment
    /// variables, working directory, ...) and, when `stdin` is given, those
    /// bytes as the command's input (then end of input).
    pub async fn exec_with(&self, start: ExecStart, stdin: Option<Vec<u8>>) -> Result<ExecOutput> {
        exec::run(self.environments(), start, stdin).await
    }

    /// Every change of the environments of `team_id` (empty: of every team
    /// the caller can see): first the current ones, then each change in
    /// order, the deleted ones once more with state DELETED.
    ///
    /// When the stream breaks (UNAVAILABLE, ABORTED, a lost connection) the
    /// watch reconnects with the last resume token after a bounded backoff
    /// ([`ClientBuilder::watch_retry`]) and misses nothing. It ends with
    /// [`Error::ResumeTokenExpired`] when the platform no longer has the
    /// changes since that token (list again and start a new watch), and with
    /// [`Error::Status`] on any refusal or after too many failed reconnects.
    ///
    /// ```no_run
    /// # async fn run(client: vibebox_client::Client) -> vibebox_client::Result<()> {
    /// use futures::StreamExt;
    /// let mut changes = std::pin::pin!(client.watch_environments("team id"));
    /// while let Some(env) = changes.next().await {
    ///     let env = env?;
    ///     println!("{} {} {}%", env.name, env.state, env.progress_percent);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn watch_environments(
        &self,
        team_id: impl Into<String>,
    ) -> impl Stream<Item = Result<Environment>> + Send + 'static {
        use futures::StreamExt;
        self.watch_environments_from(team_id, String::new())
            .filter_map(|item| async move {
                match item {
                    Ok(message) => message.environment.map(Ok),
                    Err(e) => Some(Err(e)),
                }
            })
    }

    /// The watch's messages themselves, from `resume_token` (empty: start
    /// with the current environments): changes, heartbeats (no environment)
    /// and the `caught_up` marker that ends the initial listing. Every
    /// message carries the token to resume after it: keep the last one to
    /// continue in another process. Reconnects as
    /// [`Client::watch_environments`] does.
    pub fn watch_environments_from(
        &self,
        team_id: impl Into<String>,
        resume_token: impl Into<String>,
    ) -> impl Stream<Item = Result<WatchEnvironmentsResponse>> + Send + 'static {
        let client = self.clone();
        let mut resume = watch::Resume::new(
            team_id.into(),
            resume_token.into(),
            self.watch_retry.clone(),
        );
        async_stream::stream! {
            loop {
                let ended = match client.environments().watch_environments(resume.request()).await {
                    Ok(response) => {
                        let mut stream = response.into_inner();
                        loop {
                            match stream.message().await {
                                Ok(Some(message)) => {
                                    resume.received(&message);
                                    yield Ok(message);
                                }
                                Ok(None) => break None,
                                Err(status) => break Some(status),
                            }
                        }
                    }
                    Err(status) => Some(status),
                };
                match resume.ended(ended) {
                    watch::Next::Reconnect(delay) => {
                        tracing::debug!(?delay, "watch interrupted, resuming");
                        tokio::time::sleep(delay).await;
                    }
                    watch::Next::Stop(error) => {
                        yield Err(error);
                        return;
                    }
                }
            }
        }
    }
}

/// The environment of an answer (a platform that leaves it out broke the
/// contract: reported as such, not as a panic).
fn environment_of(environment: Option<Environment>) -> Result<Environment> {
    environment.ok_or_else(|| Error::Status(Status::internal("the answer carries no environment")))
}

impl ClientBuilder {
    /// Sends `authorization: Bearer <token>` with every call (surrounding
    /// whitespace removed, so the content of a token file works as is).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Trusts these CA certificates (PEM, one or more) for an `https://`
    /// gateway, in addition to the system's roots.
    pub fn tls_ca(mut self, pem: impl AsRef<[u8]>) -> Self {
        self.ca_pem.extend_from_slice(pem.as_ref());
        self.ca_pem.push(b'\n');
        self
    }

    /// Whether the system's root certificates are trusted (default: yes).
    /// With `false`, only [`ClientBuilder::tls_ca`] is.
    pub fn system_roots(mut self, trust: bool) -> Self {
        self.system_roots = trust;
        self
    }

    /// Presents this client certificate (PEM certificate chain and key) to a
    /// gateway that asks for one.
    pub fn tls_identity(mut self, cert_pem: impl AsRef<[u8]>, key_pem: impl AsRef<[u8]>) -> Self {
        self.identity = Some((cert_pem.as_ref().to_vec(), key_pem.as_ref().to_vec()));
        self
    }

    /// Verifies the gateway's certificate for this name instead of the URL's
    /// host.
    pub fn tls_domain(mut self, name: impl Into<String>) -> Self {
        self.domain = Some(name.into());
        self
    }

    /// Allows plaintext `http://` to a host that is not loopback. The bearer
    /// token, and everything else, then travels in clear: anyone on the path
    /// can read it and act as the caller. Only for a network you trust (a
    /// test gateway on a private link); loopback needs no opt-in.
    pub fn insecure(mut self) -> Self {
        self.insecure = true;
        self
    }

    /// How long establishing a connection may take (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Retries of the calls that are safe to repeat (default
    /// [`RetryPolicy::default`]; [`RetryPolicy::never`] turns them off).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Reconnects of the watch (default [`RetryPolicy::watch`]).
    pub fn watch_retry(mut self, policy: RetryPolicy) -> Self {
        self.watch_retry = policy;
        self
    }

    /// A client that connects on first use and reconnects as needed (an
    /// unreachable gateway shows as UNAVAILABLE on the calls, retried).
    /// Call it within a Tokio runtime.
    pub fn build(self) -> Result<Client> {
        let (endpoint, bearer) = self.endpoint()?;
        Ok(Client {
            channel: endpoint.connect_lazy(),
            bearer,
            retry: self.retry,
            watch_retry: self.watch_retry,
        })
    }

    /// The endpoint to dial, and the token to send.
    fn endpoint(&self) -> Result<(Endpoint, Bearer)> {
        let invalid = |message: String| Error::InvalidUrl {
            url: self.url.clone(),
            message,
        };
        let (url, tls) = resolve(&self.url, self.insecure).map_err(invalid)?;
        let mut endpoint = Endpoint::from_shared(url)
            .map_err(|e| invalid(e.to_string()))?
            .user_agent(concat!("vibebox-client/", env!("CARGO_PKG_VERSION")))
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            // Long waits and watches stay quiet for minutes: keep the
            // connection known alive (a dead one fails the call as
            // UNAVAILABLE instead of hanging).
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        if tls {
            let config = tls::config(
                self.system_roots,
                &self.ca_pem,
                self.identity.as_ref(),
                self.domain.as_deref(),
            )?;
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| Error::Tls(e.to_string()))?;
        } else if !self.ca_pem.is_empty() || self.identity.is_some() {
            return Err(invalid(
                "TLS options were given for a plaintext URL: use https://".into(),
            ));
        }
        let bearer = match &self.token {
            Some(token) => Bearer::new(token)?,
            None => Bearer::none(),
        };
        Ok((endpoint, bearer))
    }
}

/// The URL to dial for `url` as given, and whether it is TLS (see
/// [`Client::connect`]); why it cannot be used otherwise.
fn resolve(url: &str, insecure: bool) -> std::result::Result<(String, bool), String> {
    let (url, tls) = match url.split_once("://") {
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => (url.to_owned(), true),
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("http") => (url.to_owned(), false),
        Some(_) => return Err("the scheme must be http:// or https://".into()),
        None if is_loopback(&host_of(&format!("http://{url}"))?) => {
            (format!("http://{url}"), false)
        }
        None => (format!("https://{url}"), true),
    };
    if !tls && !insecure {
        let host = host_of(&url)?;
        if !is_loopback(&host) {
            return Err(format!(
                "plaintext http:// to {host} would send the token in clear: use https://, \
                 or opt in with ClientBuilder::insecure"
            ));
        }
    }
    Ok((url, tls))
}

/// The host of a URL.
fn host_of(url: &str) -> std::result::Result<String, String> {
    let uri: tonic::codegen::http::Uri = url.parse().map_err(|e| format!("{e}"))?;
    uri.host()
        .map(str::to_owned)
        .ok_or_else(|| "the URL names no host".to_owned())
}

/// Whether `host` (a name, an IPv4 address or an IPv6 one, bracketed or
/// not) is this machine's loopback: `localhost`, `127.0.0.0/8`, `::1`.
fn is_loopback(host: &str) -> bool {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

impl IntoFuture for ClientBuilder {
    type Output = Result<Client>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Client>> + Send>>;

    /// Connects now: fails with [`Error::Connect`] when the gateway cannot
    /// be reached (the client still reconnects later as needed).
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let (endpoint, bearer) = self.endpoint()?;
            let channel = endpoint.connect().await.map_err(Error::Connect)?;
            Ok(Client {
                channel,
                bearer,
                retry: self.retry,
                watch_retry: self.watch_retry,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_states_are_the_ones_without_an_operation() {
        use EnvironmentState as S;
        for s in [S::Creating, S::Starting, S::Stopping, S::Deleting] {
            assert!(!is_settled(s as i32), "{s:?}");
        }
        for s in [
            S::Running,
            S::Stopped,
            S::Failed,
            S::Deleted,
            S::Quarantined,
        ] {
            assert!(is_settled(s as i32), "{s:?}");
        }
    }

    #[test]
    fn bare_addresses_are_tls_but_on_loopback() {
        let plain = |url: &str| Ok((format!("http://{url}"), false));
        for loopback in [
            "127.0.0.1:7700",
            "127.8.9.10:1",
            "localhost:7700",
            "LocalHost",
            "[::1]:7700",
            "[::ffff:127.0.0.1]:7700",
        ] {
            assert_eq!(resolve(loopback, false), plain(loopback), "{loopback}");
        }
        for remote in [
            "vibebox.example.com:7700",
            "vibebox.example.com",
            "10.0.0.5:7700",
            "128.0.0.1:7700",
            "[2001:db8::1]:443",
            "localhost.example.com:7700",
        ] {
            assert_eq!(
                resolve(remote, false),
                Ok((format!("https://{remote}"), true)),
                "{remote}"
            );
        }
    }

    #[test]
    fn plaintext_to_another_host_needs_the_opt_in() {
        for url in [
            "http://127.0.0.1:7700",
            "http://[::1]:1",
            "HTTP://localhost:7700",
        ] {
            assert_eq!(resolve(url, false), Ok((url.to_owned(), false)), "{url}");
        }
        for url in ["http://10.0.0.5:7700", "http://vibebox.example.com"] {
            let refused = resolve(url, false).unwrap_err();
            assert!(
                refused.contains("in clear") && refused.contains("insecure"),
                "{refused}"
            );
            assert_eq!(resolve(url, true), Ok((url.to_owned(), false)), "{url}");
        }
        assert_eq!(
            resolve("https://10.0.0.5:7700", false),
            Ok(("https://10.0.0.5:7700".to_owned(), true))
        );
    }

    #[tokio::test]
    async fn urls_are_checked_and_tls_options_need_https() {
        assert!(Client::connect("127.0.0.1:7700").build().is_ok());
        assert!(Client::connect("http://127.0.0.1:7700").build().is_ok());
        assert!(matches!(
            Client::connect("http://10.0.0.5:7700").token("t").build(),
            Err(Error::InvalidUrl { .. })
        ));
        assert!(
            Client::connect("http://10.0.0.5:7700")
                .token("t")
                .insecure()
                .build()
                .is_ok()
        );
        assert!(matches!(
            Client::connect("ftp://127.0.0.1").build(),
            Err(Error::InvalidUrl { .. })
        ));
        assert!(matches!(
            Client::connect("http://127.0.0.1:7700").tls_ca("x").build(),
            Err(Error::InvalidUrl { .. })
        ));
        assert!(matches!(
            Client::connect("http://127.0.0.1:7700")
                .token("bad\ntoken")
                .build(),
            Err(Error::InvalidToken)
        ));
    }

    #[test]
    fn request_ids_are_fresh_and_valid_for_the_platform() {
        let (a, b) = (new_request_id(), new_request_id());
        assert_ne!(a, b);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
        );
    }
}
