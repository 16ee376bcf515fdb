//! Authenticated unary RPCs through the gateway (`GetEnvironment`: token
//! check, rate limit, orchestrator lookup, authorization) next to a bare
//! tonic server on the same machine (the kit's `ProbeService`, no layers,
//! its own two-thread runtime) driven by the same client code over the same
//! kind of channel.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::oneshot;
use tonic::{Request, Response, Status};
use vibebox_proto::environment::GetEnvironmentRequest;
use vibebox_proto::environment::environment_service_client::EnvironmentServiceClient;
use vibebox_proto::kit::probe_service_client::ProbeServiceClient;
use vibebox_proto::kit::probe_service_server::{ProbeService, ProbeServiceServer};
use vibebox_proto::kit::{ProbeRequest, ProbeResponse};

use crate::ctx::Ctx;
use crate::platform::{Authed, bearer};
use crate::report::{Figure, Unit};
use crate::stats::{self, Load};

/// Knobs of the unary section.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RpcSettings {
    pub(crate) concurrency: usize,
    pub(crate) seconds: f64,
}

struct Bare;

#[tonic::async_trait]
impl ProbeService for Bare {
    async fn probe(
        &self,
        request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        let _ = request.into_inner();
        Ok(Response::new(ProbeResponse {
            request_id: "bare".into(),
            ..Default::default()
        }))
    }
}

/// A bare tonic server on its own runtime (as if another process), stopped
/// when the returned sender is dropped.
pub(crate) fn bare_server() -> anyhow::Result<(SocketAddr, oneshot::Sender<()>)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("bare server runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            // Nagle off, as the platform's servers have it (tonic sets it
            // only on listeners it binds itself).
            let incoming = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                |accepted| {
                    let stream = accepted?;
                    stream.set_nodelay(true)?;
                    Ok::<_, std::io::Error>(stream)
                },
            );
            let _ = tonic::transport::Server::builder()
                .add_service(ProbeServiceServer::new(Bare))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
    });
    Ok((addr, stop))
}

fn load_json(l: &Load) -> serde_json::Value {
    serde_json::to_value(l).unwrap_or_default()
}

pub(crate) async fn run(
    ctx: &Ctx,
    environment_id: &str,
    s: RpcSettings,
) -> anyhow::Result<(Vec<Figure>, serde_json::Value)> {
    let warmup = Duration::from_millis(500);
    let duration = Duration::from_secs_f64(s.seconds);

    let gateway: EnvironmentServiceClient<Authed> = ctx.environments();
    let id = environment_id.to_owned();
    let get = move || {
        let mut client = gateway.clone();
        let id = id.clone();
        async move {
            client
                .get_environment(GetEnvironmentRequest { environment_id: id })
                .await
                .map(|_| ())
        }
    };

    let (addr, stop) = bare_server()?;
    let channel = vibebox_server_kit::connect_plaintext(&format!("http://{addr}"))?;
    let bare = ProbeServiceClient::with_interceptor(channel, bearer(&ctx.token));
    let probe = move || {
        let mut client = bare.clone();
        async move { client.probe(ProbeRequest::default()).await.map(|_| ()) }
    };

    // Saturation: closed loops.
    let bare_max = stats::closed_loop(probe.clone(), s.concurrency, warmup, duration).await;
    let gw_max = stats::closed_loop(get.clone(), s.concurrency, warmup, duration).await;
    anyhow::ensure!(
        gw_max.ok > 0,
        "no GetEnvironment succeeded: {:?}",
        gw_max.first_error
    );
    // Half of each one's own maximum, open loop.
    let gw_half = stats::open_loop(get, gw_max.per_second / 2.0, duration, 2000).await;
    let bare_half = stats::open_loop(probe, bare_max.per_second / 2.0, duration, 2000).await;
    drop(stop);

    let figures = vec![
        Figure::new(
            "rpc.throughput",
            "unary RPC throughput (GetEnvironment via gateway)",
            gw_max.per_second,
            Unit::PerSecond,
        )
        .baseline("bare tonic", bare_max.per_second)
        .ratio_at_least(0.5)
        .note(format!(
            "{} concurrent calls on one HTTP/2 connection for {:.0} s; errors: gateway {}, bare {}",
            s.concurrency, s.seconds, gw_max.errors, bare_max.errors
        )),
        Figure::new(
            "rpc.p50_half_load",
            "unary RPC p50 at half load (gateway)",
            gw_half.latency.p50,
            Unit::Millis,
        )
        .baseline("bare tonic at its half load", bare_half.latency.p50),
        Figure::new(
            "rpc.p99_half_load",
            "unary RPC p99 at half load (gateway)",
            gw_half.latency.p99,
            Unit::Millis,
        )
        .baseline("bare tonic at its half load", bare_half.latency.p99)
        .value_below(5.0)
        .note(format!(
            "open loop at {:.0}/s (gateway) and {:.0}/s (bare) for {:.0} s; errors: gateway {}, bare {}",
            gw_max.per_second / 2.0,
            bare_max.per_second / 2.0,
            s.seconds,
            gw_half.errors,
            bare_half.errors
        )),
    ];
    Ok((
        figures,
        serde_json::json!({
            "gateway_saturated": load_json(&gw_max),
            "bare_saturated": load_json(&bare_max),
            "gateway_half_load": load_json(&gw_half),
            "bare_half_load": load_json(&bare_half),
        }),
    ))
}
