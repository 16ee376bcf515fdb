//! [`ServerBuilder`]: the one way a VibeBox service serves gRPC.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::config::{LimitArgs, ServerArgs};
use crate::error::KitError;
use crate::layer::{Callers, KitLayer, Shared};
use crate::tls::TlsMaterial;

/// Collects a service's handlers and serves them with everything the kit
/// provides (see the crate docs).
pub struct ServerBuilder {
    service: &'static str,
    tls: Option<TlsMaterial>,
    callers: Callers,
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    limits: LimitArgs,
    timeout: std::time::Duration,
}

fn owned(callers: &[&str]) -> Vec<String> {
    callers.iter().map(|c| (*c).to_owned()).collect()
}

/// Binds a listener, naming the address on failure.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, KitError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| KitError::Bind { addr, source })
}

impl ServerBuilder {
    /// A builder for `service` (its name in logs and refusals).
    pub fn new(service: &'static str, args: &ServerArgs) -> Self {
        Self {
            service,
            tls: None,
            callers: Callers::default(),
            routes: RoutesBuilder::default(),
            names: Vec::new(),
            limits: args.limits.clone(),
            timeout: args.request_timeout(),
        }
    }

    /// Serve over TLS with this material, requesting client certificates.
    /// `None` serves plaintext, which is only allowed without
    /// [`allow_callers`](Self::allow_callers).
    pub fn tls(mut self, material: Option<TlsMaterial>) -> Self {
        self.tls = material;
        self
    }

    /// Only callers presenting a CA-signed certificate of one of these
    /// services may call (health and reflection excepted), unless a service
    /// or method names its own callers.
    pub fn allow_callers(mut self, callers: &[&str]) -> Self {
        self.callers.default = Some(owned(callers));
        self
    }

    /// Registers a service that only callers with a CA-signed certificate
    /// of one of `callers` may call: where a service is added is where its
    /// callers are stated.
    pub fn add_service_for<S>(mut self, service: S, callers: &[&str]) -> Self
    where
        S: tower::Service<http::Request<Body>, Error = std::convert::Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.callers
            .rules
            .push((format!("/{}/", S::NAME), owned(callers)));
        self.add_service(service)
    }

    /// Lets `callers` call one method (`/pkg.Service/Method`) whatever its
    /// service allows (a key listing that more services read, say).
    pub fn allow_method(mut self, path: &str, callers: &[&str]) -> Self {
        self.callers.rules.push((path.to_owned(), owned(callers)));
        self
    }

    /// Overrides the concurrency limit.
    pub fn max_concurrency(mut self, limit: usize) -> Self {
        self.limits.max_concurrency = limit;
        self
    }

    /// Registers a generated tonic service.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<http::Request<Body>, Error = std::convert::Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Serves on `listener` until `shutdown` is cancelled, then drains.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), KitError> {
        crate::telemetry::ensure_initialized();
        if self.callers.restricts() && self.tls.is_none() {
            return Err(KitError::Tls(format!(
                "{} restricts its callers and therefore needs TLS material",
                self.service
            )));
        }

        let (reporter, health) = tonic_health::server::health_reporter();
        for name in &self.names {
            reporter
                .set_service_status(*name, ServingStatus::Serving)
                .await;
        }
        // Describe only what this server serves: the files defining its
        // services and their imports, never another (internal) contract.
        let descriptors = descriptors_for(&self.names);
        let mut v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(&descriptors)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc error details, so that grpcurl can print them.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        let mut v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(&descriptors)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc error details, so that grpcurl can print them.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        for name in &self.names {
            v1 = v1.with_service_name(*name);
            v1alpha = v1alpha.with_service_name(*name);
        }
        self.routes
            .add_service(health)
            .add_service(v1.build_v1()?)
            .add_service(v1alpha.build_v1alpha()?);

        let layer = KitLayer {
            shared: Arc::new(Shared {
                callers: self.callers.clone(),
                permits: Arc::new(Semaphore::new(self.limits.max_concurrency.max(1))),
                service: self.service,
                identities: Default::default(),
            }),
        };
        let mut server = Server::builder().timeout(self.timeout);
        if let Some(material) = &self.tls {
            server = server.tls_config(material.server_config().client_auth_optional(true))?;
        }
        let local = listener.local_addr().ok();
        tracing::info!(service = self.service, addr = ?local, tls = self.tls.is_some(), "serving");
        let incoming = accept_nodelay(listener);
        let token = shutdown.clone();
        let result = server
            .layer(layer)
            .add_routes(self.routes.routes())
            .serve_with_incoming_shutdown(incoming, async move { token.cancelled().await })
            .await;
        for name in &self.names {
            reporter
                .set_service_status(*name, ServingStatus::NotServing)
                .await;
        }
        tracing::info!(service = self.service, "stopped");
        Ok(result?)
    }
}

/// Accepted connections with Nagle's algorithm off. tonic applies its own
/// `tcp_nodelay` only to listeners it binds itself; on these (handed over
/// already bound) a response written in several pieces (HTTP/2 headers,
/// data and trailers, TLS records) would otherwise wait for the peer's
/// delayed ACK, adding tens of milliseconds to a unary call.
fn accept_nodelay(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot disable Nagle's algorithm on a connection");
        }
        Ok(stream)
    })
}

/// The encoded descriptor set holding the files that define `services` and
/// everything they import.
fn descriptors_for(services: &[&str]) -> Vec<u8> {
    use prost::Message;
    let all = prost_types::FileDescriptorSet::decode(vibebox_proto::FILE_DESCRIPTOR_SET)
        .expect("the generated descriptor set decodes");
    let mut wanted: Vec<String> = all
        .file
        .iter()
        .filter(|f| {
            f.service.iter().any(|s| {
                let full = format!("{}.{}", f.package(), s.name());
                services.contains(&full.as_str())
            })
        })
        .map(|f| f.name().to_owned())
        .collect();
    let mut i = 0;
    while i < wanted.len() {
        if let Some(file) = all.file.iter().find(|f| f.name() == wanted[i]) {
            for dep in &file.dependency {
                if !wanted.contains(dep) {
                    wanted.push(dep.clone());
                }
            }
        }
        i += 1;
    }
    prost_types::FileDescriptorSet {
        file: all
            .file
            .into_iter()
            .filter(|f| wanted.iter().any(|w| w == f.name()))
            .collect(),
    }
    .encode_to_vec()
}
