//! `coordinator status`: the live state of a running job, read over the
//! same authenticated gRPC service the workers use (`Status` RPC). Read
//! only: it changes nothing in the job.
//!
//! `coordinator decay`: the one command that changes a running job — a
//! cooldown from its next step boundary (`Decay` RPC; the driver applies
//! it, see `Driver::apply_decay`).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use stride_job::schedule::Cooldown;
use stride_proto::client::TokenInterceptor;
use stride_proto::v1::coordinator_client::CoordinatorClient;
use stride_proto::v1::{DecayRequest, StatusRequest};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A client of a running job's coordinator, authenticated with the job
/// token (shared by `status` and `decay`).
pub async fn connect(
    url: &str,
    token_file: Option<&Path>,
    tls_ca: Option<&Path>,
) -> Result<CoordinatorClient<InterceptedService<Channel, TokenInterceptor>>> {
    let token = stride_job::auth::load(token_file)?.ok_or(stride_job::auth::TokenError::Missing)?;
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .with_context(|| format!("--connect {url}: not a URL such as http://HOST:PORT"))?;
    if url.starts_with("https://") {
        endpoint = endpoint.tls_config(stride_proto::client::client_tls(tls_ca, None, None)?)?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        NoJob(format!(
            "no coordinator answered at {url} ({e}): is the job still running? (a finished job serves nothing)"
        ))
    })?;
    Ok(CoordinatorClient::with_interceptor(
        channel,
        TokenInterceptor::new(&token)?,
    ))
}

/// No running job answered at the URL (exit code 2: the user's to fix).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NoJob(String);

/// The job refused a request (a wrong token, an impossible decay): exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RefusedByJob(pub String);

/// Fetches the status and renders it (text, or JSON with `json`).
pub async fn fetch(
    url: &str,
    token_file: Option<&Path>,
    tls_ca: Option<&Path>,
    json: bool,
) -> Result<String> {
    let mut client = connect(url, token_file, tls_ca).await?;
    let s = client
        .status(StatusRequest {})
        .await
        .map_err(|e| anyhow!("status refused: {}", e.message()))?
        .into_inner();
    if json {
        let ranks: Vec<serde_json::Value> = s
            .ranks
            .iter()
            .map(|r| serde_json::json!({"rank": r.rank, "host": r.host, "pid": r.pid, "last_step": r.last_step, "step_s": r.step_s}))
            .collect();
        let v = serde_json::json!({
            "config_name": s.config_name, "step": s.step, "max_steps": s.max_steps, "lr": s.lr,
            "last_loss": s.last_loss, "last_val_loss": if s.last_val_loss.is_nan() { None } else { Some(s.last_val_loss) },
            "eta_s": s.eta_s, "workers_connected": s.workers_connected, "world_size": s.world_size,
            "restarts": s.restarts, "last_checkpoint": s.last_checkpoint, "schedule": s.schedule, "ranks": ranks,
        });
        return Ok(format!("{}\n", serde_json::to_string_pretty(&v)?));
    }
    let mut out = String::new();
    if s.max_steps == 0 {
        let _ = writeln!(
            out,
            "job `{}`: waiting for workers (no step yet)",
            s.config_name
        );
        return Ok(out);
    }
    let _ = writeln!(
        out,
        "job `{}`: step {}/{} ({:.1}%), ETA {:.0} s",
        s.config_name,
        s.step,
        s.max_steps,
        100.0 * s.step as f64 / s.max_steps as f64,
        s.eta_s
    );
    let val = if s.last_val_loss.is_nan() {
        "no evaluation yet".to_string()
    } else {
        format!("val loss {:.4}", s.last_val_loss)
    };
    let _ = writeln!(out, "lr {:.3e}, loss {:.4}, {val}", s.lr, s.last_loss);
    if !s.schedule.is_empty() {
        let _ = writeln!(out, "schedule: {}", s.schedule);
    }
    let ckpt = if s.last_checkpoint.is_empty() {
        "none yet"
    } else {
        s.last_checkpoint.as_str()
    };
    let _ = writeln!(
        out,
        "workers {}/{}, restarts {}, last checkpoint {ckpt}",
        s.workers_connected, s.world_size, s.restarts
    );
    for r in &s.ranks {
        let _ = writeln!(
            out,
            "  rank {:<3} {} pid {:<8} last step {:<8} step {:.3} s",
            r.rank, r.host, r.pid, r.last_step, r.step_s
        );
    }
    Ok(out)
}

/// `coordinator decay`: asks the running job for a cooldown of `shape` over
/// `over` steps from its next step boundary, and says what it did.
pub async fn decay(
    url: &str,
    token_file: Option<&Path>,
    tls_ca: Option<&Path>,
    over: u64,
    shape: Cooldown,
) -> Result<String> {
    let mut client = connect(url, token_file, tls_ca).await?;
    let r = client
        .decay(DecayRequest {
            over,
            shape: shape.name().to_string(),
        })
        .await
        .map_err(|e| RefusedByJob(format!("decay refused: {}", e.message())))?
        .into_inner();
    Ok(format!(
        "cooldown ({}) from step {} to {}: lr {:.3e} → {:.3e}; the run now ends at step {}\n",
        shape.name(),
        r.start_step,
        r.max_steps,
        r.start_lr,
        r.end_lr,
        r.max_steps
    ))
}
