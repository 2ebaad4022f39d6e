//! The coordinator's Prometheus endpoint (`--metrics-listen ADDR`): the
//! job's numbers for dashboards and alerts, served as OpenMetrics text at
//! `GET /metrics` (Prometheus scrapes it natively).
//!
//! Only the coordinator serves metrics: it alone knows the step, the LR,
//! the losses and the worker set, so one scrape target describes the job
//! (workers report their step times to it; they serve nothing). Values are
//! updated by the driver as each step completes; a scrape never waits for
//! the training loop. Names follow Prometheus conventions (`stride_`
//! prefix, base units, `_total` counters, `_seconds` durations).
//!
//! No authentication: bind it to a private address (the default is off).
//! The gRPC token protects the job's control, not these read-only numbers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::{Context, Result};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

type FloatGauge = Gauge<f64, AtomicU64>;

/// Labels of a per-rank series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct RankLabel {
    pub rank: u32,
}

/// Every metric the coordinator exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub step: Gauge,
    pub max_steps: Gauge,
    pub loss: FloatGauge,
    pub val_loss: FloatGauge,
    pub lr: FloatGauge,
    pub tokens_per_second: FloatGauge,
    pub tokens: Counter,
    pub workers_connected: Gauge,
    pub world_size: Gauge,
    pub restarts: Counter,
    pub step_seconds: Histogram,
    /// Each rank's own time for the last step (spot a straggler).
    pub rank_step_seconds: Family<RankLabel, FloatGauge>,
    pub checkpoint_seconds: Histogram,
    pub checkpoints: Counter,
}

impl Metrics {
    pub fn new(job: &str) -> Metrics {
        let mut m = Metrics {
            step: Gauge::default(),
            max_steps: Gauge::default(),
            loss: FloatGauge::default(),
            val_loss: FloatGauge::default(),
            lr: FloatGauge::default(),
            tokens_per_second: FloatGauge::default(),
            tokens: Counter::default(),
            workers_connected: Gauge::default(),
            world_size: Gauge::default(),
            restarts: Counter::default(),
            // 1 ms … ~33 min: from tiny CPU steps to large GPU steps.
            step_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 22)),
            rank_step_seconds: Family::default(),
            // 10 ms … ~11 min.
            checkpoint_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 17)),
            checkpoints: Counter::default(),
            registry: Registry::with_prefix("stride"),
        };
        let r = &mut m.registry;
        r.register(
            "job",
            "The job this coordinator runs",
            Info::new(vec![
                ("job".to_string(), job.to_string()),
                ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
            ]),
        );
        r.register(
            "step",
            "Steps completed (the next step to run)",
            m.step.clone(),
        );
        r.register(
            "max_steps",
            "Total steps of the schedule",
            m.max_steps.clone(),
        );
        r.register(
            "loss",
            "Training loss of the last step (mean over ranks)",
            m.loss.clone(),
        );
        r.register(
            "val_loss",
            "Validation loss of the last evaluation (absent before the first)",
            m.val_loss.clone(),
        );
        r.register("lr", "Learning rate of the last step", m.lr.clone());
        r.register(
            "tokens_per_second",
            "Training throughput of the last step, all ranks",
            m.tokens_per_second.clone(),
        );
        r.register(
            "tokens",
            "Tokens trained on by this coordinator",
            m.tokens.clone(),
        );
        r.register(
            "workers_connected",
            "Workers connected (with a rank or waiting for one)",
            m.workers_connected.clone(),
        );
        r.register(
            "world_size",
            "Ranks in the current worker set",
            m.world_size.clone(),
        );
        r.register(
            "restarts",
            "Automatic restarts after a rank failure",
            m.restarts.clone(),
        );
        r.register_with_unit(
            "step_duration",
            "Wall time of a step as seen by the coordinator",
            Unit::Seconds,
            m.step_seconds.clone(),
        );
        r.register_with_unit(
            "rank_step_duration",
            "Each rank's own wall time of the last step (compute + all-reduce)",
            Unit::Seconds,
            m.rank_step_seconds.clone(),
        );
        r.register_with_unit(
            "checkpoint_duration",
            "Time from planning a checkpoint to its commit",
            Unit::Seconds,
            m.checkpoint_seconds.clone(),
        );
        r.register(
            "checkpoints",
            "Checkpoints committed",
            m.checkpoints.clone(),
        );
        m
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serves `GET /metrics` on `addr` until the process exits; returns the
/// bound address (port 0 picks a free port).
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on --metrics-listen {addr}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("the metrics endpoint stopped: {e}");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric_with_its_value() {
        let m = Metrics::new("tiny");
        m.step.set(7);
        m.lr.set(3e-4);
        m.step_seconds.observe(0.25);
        m.restarts.inc();
        m.rank_step_seconds
            .get_or_create(&RankLabel { rank: 1 })
            .set(0.5);
        let text = m.render();
        for line in [
            "stride_step 7",
            "stride_lr 0.0003",
            "stride_restarts_total 1",
            "stride_step_duration_seconds_count 1",
            "stride_rank_step_duration_seconds{rank=\"1\"} 0.5",
            "stride_job_info{job=\"tiny\"",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
