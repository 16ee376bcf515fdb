//! The runtime seam: what provisioning and lifecycle ask of one container
//! engine, as a small trait. [`DockerRuntime`] is the implementation over a
//! Docker Engine (bollard); the service holds an `Arc<dyn Runtime>`, so that
//! a fleet of engines (one runtime per host) or an engine with another
//! network setup can stand behind the same admission, provisioning and
//! lifecycle code.
//!
//! The calls are deliberately thin: each is one engine request with the
//! engine's own answer (`DockerError` with its status code), so that the
//! rules about which answers to tolerate (304 on start, 404 on removal, 409
//! on a create that already happened) stay in the service, in one place.
//! Reconcile and the log, exec and stats streams still read the engine
//! through the service's `docker()` handle: they are the next to move.

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerUpdateBody, CreateImageInfo, NetworkCreateRequest,
    VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListNetworksOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveVolumeOptionsBuilder, RestartContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::subnet::Cidr;

/// An engine's answer.
pub type EngineResult<T> = Result<T, DockerError>;

/// One container engine, as provisioning and lifecycle use it.
pub trait Runtime: Send + Sync + 'static {
    /// The engine's memory in bytes (0 when it does not say).
    fn memory_bytes(&self) -> BoxFuture<'_, EngineResult<i64>>;
    /// The subnets of every network on the engine (ours and others').
    fn subnets(&self) -> BoxFuture<'_, EngineResult<Vec<Cidr>>>;
    /// Whether `image` is present (the engine's 404 when it is not).
    fn inspect_image<'a>(&'a self, image: &'a str) -> BoxFuture<'a, EngineResult<()>>;
    /// Pulls `image`, with the engine's progress.
    fn pull_image<'a>(&'a self, image: &'a str) -> BoxStream<'a, EngineResult<CreateImageInfo>>;
    /// Creates a network.
    fn create_network(&self, request: NetworkCreateRequest) -> BoxFuture<'_, EngineResult<()>>;
    /// Creates a volume.
    fn create_volume(&self, request: VolumeCreateRequest) -> BoxFuture<'_, EngineResult<()>>;
    /// Creates a container named `name`; its id.
    fn create_container<'a>(
        &'a self,
        name: &'a str,
        body: ContainerCreateBody,
    ) -> BoxFuture<'a, EngineResult<String>>;
    /// The id of the container called (or with the id) `name`.
    fn container_id<'a>(&'a self, name: &'a str) -> BoxFuture<'a, EngineResult<Option<String>>>;
    /// Starts a container.
    fn start_container<'a>(&'a self, id: &'a str) -> BoxFuture<'a, EngineResult<()>>;
    /// Stops a container: SIGTERM, then SIGKILL after `timeout_secs`.
    fn stop_container<'a>(
        &'a self,
        id: &'a str,
        timeout_secs: i32,
    ) -> BoxFuture<'a, EngineResult<()>>;
    /// Restarts a container (stop as above, then start).
    fn restart_container<'a>(
        &'a self,
        id: &'a str,
        timeout_secs: i32,
    ) -> BoxFuture<'a, EngineResult<()>>;
    /// Changes the resource limits of a container in place, running or
    /// stopped (`docker update`).
    fn update_container<'a>(
        &'a self,
        id: &'a str,
        body: ContainerUpdateBody,
    ) -> BoxFuture<'a, EngineResult<()>>;
    /// Removes a container, running or not, with its anonymous volumes.
    fn remove_container<'a>(&'a self, name: &'a str) -> BoxFuture<'a, EngineResult<()>>;
    /// Removes a network.
    fn remove_network<'a>(&'a self, name: &'a str) -> BoxFuture<'a, EngineResult<()>>;
    /// Removes a volume, even in use by a stopped container.
    fn remove_volume<'a>(&'a self, name: &'a str) -> BoxFuture<'a, EngineResult<()>>;
}

/// [`Runtime`] over one Docker Engine.
#[derive(Clone)]
pub struct DockerRuntime {
    docker: Docker,
}

impl DockerRuntime {
    /// A runtime over `docker`.
    pub fn new(docker: Docker) -> Self {
        Self { docker }
    }
}

impl Runtime for DockerRuntime {
    fn memory_bytes(&self) -> BoxFuture<'_, EngineResult<i64>> {
        Box::pin(async move { Ok(self.docker.info().await?.mem_total.unwrap_or(0)) })
    }

    fn subnets(&self) -> BoxFuture<'_, EngineResult<Vec<Cidr>>> {
        Box::pin(async move {
            let networks = self
                .docker
                .list_networks(Some(ListNetworksOptionsBuilder::new().build()))
                .await?;
            Ok(networks
                .iter()
                .filter_map(|n| n.ipam.as_ref()?.config.as_ref())
                .flatten()
                .filter_map(|c| c.subnet.as_deref()?.parse().ok())
                .collect())
        })
    }

    fn inspect_image<'a>(&'a self, image: &'a str) -> BoxFuture<'a, EngineResult<()>> {
        Box::pin(async move { self.docker.inspect_image(image).await.map(|_| ()) })
    }

    fn pull_image<'a>(&'a self, image: &'a str) -> BoxStream<'a, EngineResult<CreateImageInfo>> {
        self.docker
            .create_image(
                Some(CreateImageOptionsBuilder::new().from_image(image).build()),
                None,
                None,
            )
            .boxed()
    }

    fn create_network(&self, request: NetworkCreateRequest) -> BoxFuture<'_, EngineResult<()>> {
        Box::pin(async move { self.docker.create_network(request).await.map(|_| ()) })
    }

    fn create_volume(&self, request: VolumeCreateRequest) -> BoxFuture<'_, EngineResult<()>> {
        Box::pin(async move { self.docker.create_volume(request).await.map(|_| ()) })
    }

    fn create_container<'a>(
        &'a self,
        name: &'a str,
        body: ContainerCreateBody,
    ) -> BoxFuture<'a, EngineResult<String>> {
        Box::pin(async move {
            let options = CreateContainerOptionsBuilder::new().name(name).build();
            Ok(self.docker.create_container(Some(options), body).await?.id)
        })
    }

    fn container_id<'a>(&'a self, name: &'a str) -> BoxFuture<'a, EngineResult<Option<String>>> {
        Box::pin(async move { Ok(self.docker.inspect_container(name, None).await?.id) })
    }

    fn start_container<'a>(&'a self, id: &'a str) -> BoxFuture<'a, EngineResult<()>> {
        Box::pin(self.docker.start_container(id, None))
    }

    fn stop_container<'a>(
        &'a self,
        id: &'a str,
        timeout_secs: i32,
    ) -> BoxFuture<'a, EngineResult<()>> {
        let options = StopContainerOptionsBuilder::new().t(timeout_secs).build();
        Box::pin(self.docker.stop_container(id, Some(options)))
    }

    fn restart_container<'a>(
        &'a self,
        id: &'a str,
        timeout_secs: i32,
    ) -> BoxFuture<'a, EngineResult<()>> {
        let options = RestartContainerOptionsBuilder::new()
            .t(timeout_secs)
            .build();
        Box::pin(self.docker.restart_container(id, Some(options)))
    }

    fn update_container<'a>(
        &'a self,
        id: &'a str,
        body: ContainerUpdateBody,
    ) -> BoxFuture<'a, EngineResult<()>> {
        Box::pin(async move { self.docker.update_container(id, body).await.map(|_| ()) })
    }

    fn remove_container<'a>(&'a self, name: &'a str) -> BoxFuture<'a, EngineResult<()>> {
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        Box::pin(self.docker.remove_container(name, Some(options)))
    }

    fn remove_network<'a>(&'a self, name: &'a str) -> BoxFuture<'a, EngineResult<()>> {
        Box::pin(self.docker.remove_network(name))
    }

    fn remove_volume<'a>(&'a self, name: &'a str) -> BoxFuture<'a, EngineResult<()>> {
        let options = RemoveVolumeOptionsBuilder::new().force(true).build();
        Box::pin(self.docker.remove_volume(name, Some(options)))
    }
}
