//! `coordinator` (no subcommand): a training job from its flags to its
//! end — the start resolved and checked (config, checkpoint, the data a
//! resume must read), the run directory and its lock, the server, local
//! workers, the driver — and what a finished job tells workers that
//! reconnect. `main.rs` parses the flags and maps errors to exit codes.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use stride_job::checkpoint::{self, Sums};
use stride_job::sampler::window_count;
use stride_job::tokens::{Corpus, Fingerprint, Scan};

use crate::{RunArgs, driver, local, metrics, output, refused, resume_check, serve, server, start};

impl RunArgs {
    pub(crate) fn request(&self, sums: Sums) -> start::Request<'_> {
        start::Request {
            config: self.config.config.as_deref(),
            set: &self.config.set,
            workers: self.config.workers,
            run_dir: self.run_dir.as_deref(),
            resume: self.resume.as_deref(),
            extend_steps: self.extend_steps,
            decay: self.decay,
            init_from: self.init_from.as_deref(),
            sums,
        }
    }

    /// Where the gRPC service listens, with what TLS; `coordinator.addr`
    /// goes into `run_dir`.
    fn listen_on<'a>(&'a self, run_dir: Option<&'a std::path::Path>) -> serve::Listen<'a> {
        serve::Listen {
            addr: self.listen,
            local: self.local,
            tls_cert: self.tls_cert.as_deref(),
            tls_key: self.tls_key.as_deref(),
            tls_client_ca: self.tls_client_ca.as_deref(),
            addr_file_dir: run_dir,
        }
    }
}

/// Runs a training job: checks the config and data, serves gRPC, starts
/// local workers if asked, and hands over to the driver.
pub async fn train(args: RunArgs) -> Result<()> {
    stride_telemetry::check_env()?;
    // A start refused with the files unhashed is tried again hashing them
    // first, so that it ends as it would have: a damaged checkpoint is
    // reported (or `latest` falls back) before anything else is judged.
    let started = if args.dry_run {
        start::start(&args.request(Sums::Now))
    } else {
        start::start(&args.request(Sums::Later)).or_else(|_| start::start(&args.request(Sums::Now)))
    };
    let mut sp = match started {
        Err(e) if e.is::<start::NothingToTrain>() => return finished(&args, e).await,
        other => other?,
    };
    if args.dry_run {
        // The data must be there and readable, as for a run (layout only:
        // a full scan is a read of every file).
        let c = &sp.config;
        let corpus = Corpus::open(&c.data, &c.model, c.train.seed, Scan::Layout)?;
        let samples = window_count(corpus.train.len(), c.model.context, c.data.stride);
        let device = match c.worker.device {
            stride_job::config::Device::Cpu => String::new(),
            d => format!(
                "; worker.device = {d}: the workers must be CUDA builds (`cargo build --release -p stride-worker --features cuda`, deploy/Dockerfile.cuda) on machines with GPUs"
            ),
        };
        println!(
            "dry run: would train `{}` ({}) from step {} to {} with {} workers on {samples} training samples ({}), listening on {}, run directory {}, checkpoints in {}{device}",
            sp.name,
            sp.source,
            sp.from.step,
            sp.schedule.max_steps(),
            c.cluster.workers,
            corpus.train.name,
            args.listen
                .map_or_else(|| "the default address".to_string(), |a| a.to_string()),
            sp.run_dir.display(),
            sp.checkpoint_dir.display()
        );
        return Ok(());
    }
    let (token, generated) = match stride_job::auth::load(args.token_file.as_deref())? {
        Some(t) => (t, false),
        None if args.local => (
            stride_job::auth::generate().context("cannot generate a job token")?,
            true,
        ),
        None => return Err(stride_job::auth::TokenError::Missing.into()),
    };
    let config = sp.config.clone();
    let run_dir = sp.run_dir.clone();
    let folder = sp.checkpoint_dir.clone();
    // Every folder this job writes is held: a second coordinator on the
    // same run directory or checkpoint folder is refused.
    let _lock = output::RunLock::acquire(&run_dir, &folder)?;
    if generated {
        // Kept in the run directory (owner-only) so that `coordinator status
        // --token-file runs/<name>/token` can read the job.
        serve::write_private(&run_dir.join("token"), &token)?;
    }
    let mut run = output::RunDir::create(&run_dir, sp.fresh_run_dir)?;
    let schedule = sp.schedule.clone();
    let (bar, _traces) = output::init_run_logging(&run.log_path(), schedule.max_steps(), &sp.name)?;
    tracing::info!(
        "job `{}` from {} (config hash {}), run directory {}",
        sp.name,
        sp.source,
        &config.hash()[..16],
        run_dir.display()
    );
    if let Some(torn) = run.repaired.take() {
        tracing::warn!("{torn}");
    }
    for w in &sp.warnings {
        tracing::warn!("{w}");
    }
    for n in &sp.notes {
        tracing::info!("{n}");
    }
    // What an interrupted write left behind; only this coordinator (it
    // holds the folder's lock) writes here.
    for gone in checkpoint::clean_leftovers(&folder)? {
        tracing::warn!(
            "removed {}, left by an interrupted checkpoint write",
            gone.display()
        );
    }
    if let Some(repaired) = checkpoint::repair_latest(&folder)? {
        tracing::warn!("{repaired}");
    }
    // The data's fingerprints, for the resume's fallback to check too.
    let fingerprints: Arc<std::sync::OnceLock<Vec<Fingerprint>>> = Arc::default();
    // From here on, the checkpoint's files are hashed beside everything else.
    let check = resume_check::start_check(&args, &sp, fingerprints.clone());

    // Check the data once, here, before any worker starts.
    let corpus = Corpus::open(&config.data, &config.model, config.train.seed, Scan::Full)?;
    let (context, stride) = (config.model.context, config.data.stride);
    let train_samples = window_count(corpus.train.len(), context, stride);
    let val_samples = window_count(corpus.val.len(), context, config.data.val_stride);
    let entropy_floor = corpus.synthetic.as_ref().map(|s| s.entropy_rate());
    tracing::info!(
        "data: {} training samples ({} tokens), {} validation samples{}",
        train_samples,
        corpus.train.len(),
        val_samples,
        entropy_floor
            .map(|f| format!("; synthetic source, entropy floor {f:.4} nats/token"))
            .unwrap_or_default()
    );
    if val_samples == 0 {
        tracing::warn!(
            "no validation split (data.val_fraction = 0 and no data.val): evaluation is skipped"
        );
    } else {
        let v = stride_job::sampler::ValidationStats::new(&config, val_samples);
        tracing::info!("validation: {}", v.describe());
        if let Some(w) = v.clamp_warning() {
            tracing::warn!("{w}");
        }
    }
    let epoch = stride_job::sampler::EpochStats::new(
        train_samples,
        config.train.global_batch,
        sp.schedule.max_steps(),
    );
    for w in
        stride_job::sampler::data_plan_warnings(&epoch, sp.schedule.max_steps(), Some(val_samples))?
    {
        tracing::warn!("{w}");
    }
    let data = corpus.fingerprints().to_vec();
    let _ = fingerprints.set(data.clone());
    let change = resumed_data(&sp.data, &data, args.data_changed)?;
    if let Some(change) = &change {
        tracing::warn!("{change}");
        change.apply(&mut sp.from, &mut sp.history, &mut sp.marker);
    }
    let data_files = [&config.data.train, &config.data.val]
        .into_iter()
        .flatten()
        .map(|path| {
            Ok(driver::DataFile {
                path: path.clone(),
                stamp: driver::FileStamp::of(path)
                    .with_context(|| format!("cannot stat {}", path.display()))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    drop(corpus);

    let metrics = Arc::new(metrics::Metrics::new(&sp.name));
    if let Some(addr) = args.metrics_listen {
        let bound = metrics::serve(addr, metrics.clone()).await?;
        let addr_file = run_dir.join("metrics.addr");
        stride_job::files::write_whole(&addr_file, &format!("http://{bound}/metrics\n"))
            .with_context(|| format!("cannot write {}", addr_file.display()))?;
        tracing::info!("Prometheus metrics at http://{bound}/metrics");
    }
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let shared = server::Shared::new(
        events_tx.clone(),
        Duration::from_secs_f64(config.cluster.heartbeat_interval_s),
        metrics,
        server::JobForWorkers {
            config_toml: config.to_toml(),
            data: data.clone(),
            finished: None,
        },
    );
    let serving = serve::start(args.listen_on(Some(&run_dir)), &token, shared.clone()).await?;
    let url = serving.url.clone();
    tokio::spawn(serve::forward_signals(events_tx));

    let workers = config.cluster.workers;
    let local = if args.local {
        let threads = local::threads_per_worker(config.worker.threads, workers);
        tracing::info!(
            "starting {workers} local workers ({threads} threads each), logs in {}",
            run_dir.display()
        );
        Some(local::LocalWorkers::spawn(
            workers, &url, threads, &run_dir, &token,
        )?)
    } else {
        tracing::info!(
            "listening on {url}; waiting for {workers} workers: `worker --connect {url}`"
        );
        None
    };

    let spec = driver::JobSpec {
        name: sp.name.clone(),
        checkpoint_dir: folder,
        train_samples,
        val_samples,
        data,
        data_files,
        entropy_floor,
        run_dir: run_dir.clone(),
    };
    let course = driver::Course {
        config,
        schedule,
        start: sp.from,
        history: sp.history,
        marker: sp.marker,
        check,
    };
    let mut driver = driver::Driver::new(spec, course, events_rx, shared, local, run, bar);
    let result = driver.run().await;
    serving.stop().await;
    let summary = result?;
    let val = summary
        .final_val_loss
        .map(|v| format!(", val loss {v:.4}"))
        .unwrap_or_default();
    let floor = entropy_floor
        .map(|f| format!(" (entropy floor {f:.4})"))
        .unwrap_or_default();
    tracing::info!(
        "done: {} steps in {:.1} s; final train loss {:.4}{val}{floor}; {:.0} tokens/s",
        summary.steps,
        summary.wall_s,
        summary.final_loss,
        summary.tokens as f64 / summary.wall_s.max(1e-9)
    );
    Ok(())
}

/// A resume of a run that is already at its end: exit 0, saying so. A
/// coordinator restarted after its final commit may have workers trying
/// to reconnect (hand-started, or pods): it serves for a short while and
/// tells each that joins that the job is finished (exit 0), so that none
/// waits out its `--connect-timeout` and fails.
async fn finished(args: &RunArgs, e: anyhow::Error) -> Result<()> {
    output::init_console_logging();
    let Some(done) = e.downcast_ref::<start::NothingToTrain>() else {
        return Err(e);
    };
    tracing::info!("{done}");
    if args.local || args.dry_run {
        return Ok(());
    }
    let Some(token) = stride_job::auth::load(args.token_file.as_deref())? else {
        return Ok(());
    };
    let c = &done.config.cluster;
    // Workers that lost their coordinator retry every 2 s at most.
    let linger = Duration::from_secs_f64(c.heartbeat_timeout_s.max(10.0));
    let (events, _ignored) = tokio::sync::mpsc::unbounded_channel();
    let shared = server::Shared::new(
        events,
        Duration::from_secs_f64(c.heartbeat_interval_s),
        Arc::new(metrics::Metrics::new(
            &done.config.checkpoint.dir.display().to_string(),
        )),
        server::JobForWorkers {
            finished: Some(format!("the job is finished: {}", done.dir)),
            ..server::JobForWorkers::default()
        },
    );
    let serving = serve::start(args.listen_on(None), &token, shared.clone()).await?;
    tracing::info!(
        "telling workers that reconnect to {} within {:.0} s that the job is finished",
        serving.url,
        linger.as_secs_f64()
    );
    let ticker = async {
        loop {
            shared.driver_tick();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    tokio::select! {
        () = tokio::time::sleep(linger) => {}
        () = ticker => {}
    }
    serving.stop().await;
    Ok(())
}

/// What a resume does about its data, when it differs from the data the
/// checkpoint was trained on.
#[derive(Debug)]
pub(crate) struct DataChange {
    recorded: Vec<Fingerprint>,
    now: Vec<Fingerprint>,
}

impl std::fmt::Display for DataChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--data-changed: the data differs from the checkpoint's ({}); training continues on it from the start of the next epoch",
            describe_change(&self.recorded, &self.now)
        )
    }
}

impl DataChange {
    /// The run goes on from the start of the next epoch: a new permutation
    /// of the new data's samples (a position inside the old data's
    /// permutation means nothing for other data).
    pub(crate) fn apply(
        &self,
        from: &mut driver::RestartPoint,
        history: &mut Vec<checkpoint::HistoryEvent>,
        marker: &mut Option<serde_json::Value>,
    ) {
        let step = from.step;
        from.cursor = stride_job::DataCursor {
            epoch: from.cursor.epoch + 1,
            position: 0,
        };
        history.push(checkpoint::HistoryEvent {
            step,
            event: "data-changed".into(),
            detail: describe_change(&self.recorded, &self.now),
        });
        if let Some(m) = marker {
            m["data_changed"] = serde_json::json!(describe_change(&self.recorded, &self.now));
            m["epoch"] = serde_json::json!(from.cursor.epoch);
        }
    }
}

/// `train: A (checkpoint) → B (now); val: …` for the splits that differ.
fn describe_change(recorded: &[Fingerprint], now: &[Fingerprint]) -> String {
    now.iter()
        .filter_map(|n| {
            let r = recorded.iter().find(|r| r.split == n.split);
            if r.is_some_and(|r| r.same_tokens(n)) {
                return None;
            }
            let was = r.map_or("none recorded".to_string(), Fingerprint::describe);
            Some(format!(
                "{}: {was} (checkpoint) → {} (now)",
                n.split,
                n.describe()
            ))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A resume must read the data its checkpoint was trained on: otherwise it
/// is refused, naming both fingerprints, unless `--data-changed` says the
/// change is on purpose. Checkpoints of format 1 recorded no fingerprint.
pub(crate) fn resumed_data(
    recorded: &[Fingerprint],
    now: &[Fingerprint],
    data_changed: bool,
) -> Result<Option<DataChange>> {
    let same = recorded.is_empty()
        || now.iter().all(|n| {
            recorded
                .iter()
                .any(|r| r.split == n.split && r.same_tokens(n))
        });
    if same {
        if data_changed {
            tracing::info!(
                "--data-changed: the data is the checkpoint's own; the data cursor is kept"
            );
        }
        return Ok(None);
    }
    let change = DataChange {
        recorded: recorded.to_vec(),
        now: now.to_vec(),
    };
    if !data_changed {
        return Err(refused::Refused(format!(
            "the data differs from the data the checkpoint was trained on: {}. A resume continues the same samples in the same order, which other data cannot give: restore the files (data.train / data.val), or pass --data-changed to continue on the new data from the start of the next epoch",
            describe_change(&change.recorded, &change.now)
        ))
        .into());
    }
    Ok(Some(change))
}
