//! Logging and tracing: a `tracing` subscriber with an OpenTelemetry layer
//! and the W3C trace-context propagator. Spans are exported over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set; without it trace ids still exist and
//! propagate, they are just not exported.

use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetryArgs};
use crate::error::KitError;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Flushes exported spans when dropped.
pub struct TelemetryGuard(());

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = PROVIDER.get() {
            let _ = provider.force_flush();
        }
    }
}

fn provider(service: &str) -> Result<SdkTracerProvider, KitError> {
    let resource = Resource::builder()
        .with_service_name(format!("vibebox-{service}"))
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let exporting = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").is_ok_and(|v| !v.is_empty());
    Ok(if exporting {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| KitError::Telemetry(e.to_string()))?;
        builder.with_batch_exporter(exporter).build()
    } else {
        builder.build()
    })
}

/// Installs the global subscriber and propagator. Call once per process,
/// before serving. A second call (or one after [`ensure_initialized`]) keeps
/// the first subscriber.
pub fn init(service: &str, args: &TelemetryArgs) -> Result<TelemetryGuard, KitError> {
    let filter = EnvFilter::try_new(&args.log_filter)
        .map_err(|e| KitError::Telemetry(format!("bad --log-filter: {e}")))?;
    install(service, args.log_format, filter)?;
    Ok(TelemetryGuard(()))
}

fn install(service: &str, format: LogFormat, filter: EnvFilter) -> Result<(), KitError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = PROVIDER.get_or_init(|| {
        provider(service).unwrap_or_else(|e| {
            eprintln!("vibebox: OTLP exporter disabled: {e}");
            SdkTracerProvider::builder().build()
        })
    });
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("vibebox"))
        .with_filter(LevelFilter::INFO);
    let registry = tracing_subscriber::registry().with(otel);
    let result = match format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_filter(filter))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_filter(filter),
            )
            .try_init(),
    };
    // Already initialized (tests, `vibebox up`): the first subscriber stays.
    let _ = result;
    Ok(())
}

/// Installs a default subscriber (text, `RUST_LOG` or `warn`) unless one is
/// installed already. Servers call it so that trace context propagates even
/// in tests and embedded runs.
pub fn ensure_initialized() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
        let _ = install("test", LogFormat::Text, filter);
    });
}
