//! Stride's traces: an optional OTLP/gRPC export of `tracing` spans and the
//! W3C trace context that ties a step's spans on the coordinator and on
//! every worker into one trace.
//!
//! - Export is on only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and `OTEL_SDK_DISABLED`
//!   is not `true`. Otherwise [`otlp_layer`] returns no layer: spans are
//!   still created for the logs, nothing is exported, and the propagated
//!   context is empty.
//! - Only OTLP over gRPC is spoken (the collector's port 4317). A
//!   `OTEL_EXPORTER_OTLP_PROTOCOL` asking for HTTP is refused with a clear
//!   error rather than silently ignored.
//! - The exporter runs its gRPC client on a runtime of its own (one
//!   thread), so exporting neither depends on nor blocks the process's
//!   runtime, and works from the OpenTelemetry batch thread (the known
//!   "no reactor running" trap of `opentelemetry-otlp`).
//! - The exporter's own crates (`h2`, `hyper`, `tonic`, `tower`, `rustls`,
//!   `opentelemetry*`) never produce exported spans: it must not trace
//!   itself. Only Stride's own targets (`stride*`, and the `coordinator`
//!   and `worker` binaries) are exported.
//! - Span fields that are numbers are recorded as `i64` by the callers:
//!   tracing-opentelemetry exports unsigned integers as strings.
//! - Context crosses process boundaries as the W3C `traceparent` (and
//!   `tracestate`) header: in gRPC metadata for unary calls
//!   ([`inject_metadata`], [`parent_from_metadata`]), and in a
//!   `trace_context` map on the plans sent over the long-lived session
//!   stream ([`carrier`], [`set_parent`]) — a stream has metadata only once,
//!   at its start, and each step needs its own parent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, Result};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::registry::LookupSpan;

/// Service names (`service.name`) of the two programs.
pub const COORDINATOR_SERVICE: &str = "stride-coordinator";
pub const WORKER_SERVICE: &str = "stride-worker";

/// The endpoint variables, signal-specific first (as the OTLP spec orders them).
const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// Keeps the exporter alive; dropping it flushes the spans not yet sent
/// (bounded by the exporter's timeout) and stops the export thread.
#[derive(Debug, Default)]
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Guard {
    /// Where spans go, for the start-up log line (None: nowhere).
    pub fn endpoint(&self) -> Option<String> {
        self.provider.as_ref().and_then(|_| endpoint())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            // Errors here mean the collector went away; the job's outcome
            // does not depend on it.
            let _ = p.shutdown();
        }
    }
}

fn endpoint() -> Option<String> {
    ENDPOINT_VARS
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()))
}

/// An `OTEL_*` variable Stride cannot honour (exit code 2: fix the input).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EnvError(String);

/// Checks the `OTEL_*` variables before anything starts: a user who asked
/// for traces must not find out after a long run that none were sent.
pub fn check_env() -> std::result::Result<(), EnvError> {
    if !enabled() {
        return Ok(());
    }
    if let Ok(p) = std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL")
        && !p.eq_ignore_ascii_case("grpc")
    {
        return Err(EnvError(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={p}: Stride exports traces over OTLP/gRPC only; \
             unset it (or set it to grpc) and point OTEL_EXPORTER_OTLP_ENDPOINT at the collector's gRPC port (4317)"
        )));
    }
    if let Some(e) = endpoint()
        && !(e.starts_with("http://") || e.starts_with("https://"))
    {
        return Err(EnvError(format!(
            "OTEL_EXPORTER_OTLP_ENDPOINT={e}: not a URL; write it as http://HOST:4317"
        )));
    }
    Ok(())
}

/// The console / log-file filter of both programs: `RUST_LOG`, else info
/// for Stride and warnings only from the gRPC stack.
pub fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,h2=warn,hyper=warn,tower=warn,tonic=warn")
    })
}

/// Whether the environment asks for trace export.
pub fn enabled() -> bool {
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && endpoint().is_some()
}

/// The OpenTelemetry layer for `service`, or `None` when export is off.
///
/// `instance` becomes `service.instance.id` (the worker identity, or the
/// job name for the coordinator). Standard `OTEL_*` variables
/// (`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`,
/// `OTEL_EXPORTER_OTLP_TIMEOUT`, …) are honoured.
pub fn otlp_layer<S>(
    service: &'static str,
    instance: &str,
) -> Result<(Option<impl Layer<S>>, Guard)>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    if !enabled() {
        return Ok((None, Guard::default()));
    }
    check_env()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("stride-otlp")
        .enable_all()
        .build()
        .context("cannot start the trace exporter's runtime")?;
    let inner = {
        // tonic's channel spawns its worker on the runtime entered here.
        let _entered = runtime.enter();
        let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        if let Some(e) = endpoint() {
            builder = builder.with_endpoint(e);
        }
        builder.build().context(
            "cannot set up the OTLP trace exporter; check OTEL_EXPORTER_OTLP_ENDPOINT (for example http://127.0.0.1:4317)",
        )?
    };
    let exporter = OwnRuntime {
        inner,
        runtime,
        warned: AtomicBool::new(false),
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            instance.to_string(),
        ))
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer(service);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(export_filter());
    Ok((
        Some(layer),
        Guard {
            provider: Some(provider),
        },
    ))
}

/// Exported: Stride's own spans and events; never the transport's.
fn export_filter() -> Targets {
    Targets::new()
        .with_default(LevelFilter::OFF)
        .with_target("stride", LevelFilter::INFO)
        .with_target("coordinator", LevelFilter::INFO)
        .with_target("worker", LevelFilter::INFO)
}

/// The OTLP exporter, driven on its own runtime: the SDK's batch thread
/// polls `export` with a plain executor that has no Tokio reactor.
#[derive(Debug)]
struct OwnRuntime<E> {
    inner: E,
    runtime: tokio::runtime::Runtime,
    warned: AtomicBool,
}

impl<E: SpanExporter> SpanExporter for OwnRuntime<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.runtime.block_on(self.inner.export(batch));
        if let Err(e) = &result
            && !self.warned.swap(true, Ordering::Relaxed)
        {
            // Once: a missing collector must not flood the log. The target
            // is one the export filter drops, so this is not exported.
            tracing::warn!(
                target: "opentelemetry_stride",
                "cannot export traces to {}: {e} (training continues; later failures are not logged)",
                endpoint().unwrap_or_default()
            );
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        let _entered = self.runtime.enter();
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The W3C trace context of `span`, for a `trace_context` field (empty when
/// nothing is exported).
pub fn carrier(span: &tracing::Span) -> HashMap<String, String> {
    let mut map = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut map);
    map
}

/// Makes `span` a child of the remote span described by `carrier` (a
/// no-op for an empty carrier).
pub fn set_parent(span: &tracing::Span, carrier: &HashMap<String, String>) {
    if carrier.is_empty() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(carrier);
    let _ = span.set_parent(cx);
}

/// Adds `span`'s trace context to a request's gRPC metadata.
pub fn inject_metadata(span: &tracing::Span, metadata: &mut tonic::metadata::MetadataMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut MetadataInjector(metadata));
}

/// Makes `span` a child of the caller's span, if the request carries one.
pub fn parent_from_metadata(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    if metadata.get("traceparent").is_none() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    let _ = span.set_parent(cx);
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    /// A context survives a round trip through a plan's map and through
    /// gRPC metadata: the child's trace id is the parent's.
    #[test]
    fn context_round_trips_through_map_and_metadata() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, || {
            let parent = tracing::info_span!(target: "stride", "step", step = 3);
            let map = carrier(&parent);
            let traceparent = map.get("traceparent").expect("a traceparent");
            let trace_id = parent
                .context()
                .span()
                .span_context()
                .trace_id()
                .to_string();
            assert!(
                traceparent.contains(&trace_id),
                "{traceparent} vs {trace_id}"
            );

            let child = tracing::info_span!(target: "stride", "worker_step");
            set_parent(&child, &map);
            let got = child.context().span().span_context().trace_id().to_string();
            assert_eq!(got, trace_id);

            let mut md = tonic::metadata::MetadataMap::new();
            inject_metadata(&parent, &mut md);
            let other = tracing::info_span!(target: "stride", "register");
            parent_from_metadata(&other, &md);
            let got = other.context().span().span_context().trace_id().to_string();
            assert_eq!(got, trace_id);
        });
    }

    #[test]
    fn without_a_subscriber_layer_the_carrier_is_empty() {
        let span = tracing::info_span!("step");
        assert!(carrier(&span).is_empty());
    }
}
