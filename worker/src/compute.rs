//! The worker's compute thread: it owns the [`Trainer`] and does the
//! coordinator's work in order, one method per kind of work — form a
//! collective and build the trainer ([`Compute::assign`]), drop it after an
//! abort ([`Compute::reset`]), run a step, write a checkpoint, evaluate.
//! It reports through the session's outbound queue and never decides
//! anything itself; a failure it cannot recover from ends it with a
//! [`Stop`] (the worker then exits with its code).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use candle_core::Device;
use stride_job::config::{Config, Device as DeviceKind};
use stride_job::test_hooks::{self, Hook};
use stride_job::tokens::{Corpus, DataError, Scan};
use stride_proto::exit;
use stride_proto::v1::{
    Assignment, CheckpointPlan, CheckpointReport, CollectiveBootstrap, DataSplit, EvalPlan,
    EvalReport, Ready, StepPlan, StepReport, WorkerError, WorkerMessage, worker_message,
};
use tokio::sync::mpsc;

use crate::collective::{self, AbortHandle, Bootstrap, CollectiveError};
use crate::trainer::{Cancelled, Signals, Trainer};

/// Work for the compute thread.
pub(crate) enum Work {
    Assign(Assignment),
    /// The coordinator aborted the generation: drop the trainer.
    Reset,
    /// The shared id the collective of a generation is formed from.
    Bootstrap(CollectiveBootstrap),
    Step(StepPlan),
    Eval(EvalPlan),
    Checkpoint(CheckpointPlan),
}

/// Why the compute thread ended on its own, and the exit code it means.
#[derive(Debug)]
pub(crate) struct Stop {
    pub why: String,
    pub code: i32,
    /// The generation of the last message that said why, when it was not
    /// fatal: the coordinator ignores it once that generation is over. A
    /// fatal report (`None`) is acted on whatever its generation.
    pub stale_after: Option<u64>,
}

/// Where the compute thread leaves the abort handle of its collective.
pub(crate) type AbortSlot = Arc<Mutex<Option<AbortHandle>>>;

/// A data fingerprint as the wire carries it.
pub(crate) fn wire(f: &stride_job::tokens::Fingerprint) -> DataSplit {
    DataSplit {
        split: f.split.clone(),
        name: f.name.clone(),
        tokens: f.tokens,
        checksum: u64::from_str_radix(&f.xxh3, 16).unwrap_or(0),
    }
}

/// A worker message of `body`.
pub(crate) fn msg(body: worker_message::Body) -> WorkerMessage {
    WorkerMessage { body: Some(body) }
}

/// The trainer of the generation it was built for.
struct Current {
    generation: u64,
    trainer: Trainer,
}

/// The compute thread's state.
pub(crate) struct Compute {
    pub work: Receiver<Work>,
    pub out: mpsc::Sender<WorkerMessage>,
    /// What the collective bootstraps from (opened before registering).
    pub bootstrap: Bootstrap,
    /// `--threads` (0: the job's `worker.threads`, else all cores).
    pub threads: usize,
    pub signals: Arc<Signals>,
    pub abort: AbortSlot,
    /// The generation being worked on (the session reads it).
    pub current_generation: Arc<AtomicU64>,
    current: Option<Current>,
    /// Work read early while forming a collective, handled next.
    deferred: Option<Work>,
    /// The job's data as opened (and fingerprinted) at registration, with
    /// the config it was opened for: every trainer of the same job reuses
    /// it instead of opening and hashing the files again.
    corpus: Option<(Config, Corpus)>,
}

impl Compute {
    pub fn new(
        work: Receiver<Work>,
        out: mpsc::Sender<WorkerMessage>,
        bootstrap: Bootstrap,
        threads: usize,
        signals: Arc<Signals>,
        abort: AbortSlot,
        current_generation: Arc<AtomicU64>,
    ) -> Compute {
        Compute {
            work,
            out,
            bootstrap,
            threads,
            signals,
            abort,
            current_generation,
            current: None,
            deferred: None,
            corpus: None,
        }
    }

    /// The data opened at registration ([`Compute::corpus`]).
    pub fn with_corpus(mut self, corpus: Option<(Config, Corpus)>) -> Compute {
        self.corpus = corpus;
        self
    }

    /// Does the work in order. Returns why it stopped when that was its own
    /// decision (a failure retrying cannot fix), `None` when its queue
    /// closed.
    pub fn run(mut self) -> Option<Stop> {
        loop {
            let w = match self.deferred.take() {
                Some(w) => w,
                None => self.work.recv().ok()?,
            };
            let done = match w {
                Work::Bootstrap(_) => Ok(()), // of a formation that already failed
                Work::Assign(a) => self.assign(a),
                Work::Reset => {
                    self.reset();
                    Ok(())
                }
                Work::Step(p) => {
                    self.step(p);
                    Ok(())
                }
                Work::Checkpoint(p) => self.checkpoint(p),
                Work::Eval(p) => {
                    self.evaluate(p);
                    Ok(())
                }
            };
            if let Err(stop) = done {
                return Some(stop);
            }
        }
    }

    fn send(&self, body: worker_message::Body) {
        let _ = self.out.blocking_send(msg(body));
    }

    /// Reports a failure of `generation`. Fatal: retrying cannot help (bad
    /// config, data, device). Not fatal: a step failed (a peer died); the
    /// coordinator restarts the generation. A collective's failure names
    /// the peer it failed with: a symptom the coordinator weighs.
    fn fail(&self, generation: u64, e: anyhow::Error, fatal: bool) {
        tracing::error!("{e:#}");
        let collective_peer = e
            .chain()
            .find_map(|c| match c.downcast_ref::<CollectiveError>() {
                Some(CollectiveError::Peer { peer, .. }) => u32::try_from(*peer).ok(),
                _ => None,
            });
        self.send(worker_message::Body::Error(WorkerError {
            generation,
            message: format!("{e:#}"),
            fatal,
            collective_peer,
        }));
    }

    /// The trainer, if it belongs to `generation` (plans of another
    /// generation are stale and ignored).
    fn trainer_of(&mut self, generation: u64) -> Option<&mut Trainer> {
        self.current
            .as_mut()
            .filter(|c| c.generation == generation)
            .map(|c| &mut c.trainer)
    }

    /// A new generation: form its collective and build the trainer, then
    /// report `Ready` (or why not).
    fn assign(&mut self, a: Assignment) -> Result<(), Stop> {
        let generation = a.generation;
        self.current_generation.store(generation, Ordering::Relaxed);
        self.current = None;
        // The abort that preceded this assignment is over.
        self.signals.cancel.store(false, Ordering::Relaxed);
        let span = tracing::info_span!(
            "assign",
            rank = i64::from(a.rank),
            world_size = i64::from(a.world_size),
            generation = generation as i64,
            load = %a.load_checkpoint,
        );
        stride_telemetry::set_parent(&span, &a.trace_context);
        let (work, deferred, out) = (&self.work, &mut self.deferred, &self.out);
        let mut exchange = |mine: Option<Vec<u8>>, timeout: Duration| {
            if let Some(unique_id) = mine {
                let _ =
                    out.blocking_send(msg(worker_message::Body::Bootstrap(CollectiveBootstrap {
                        generation,
                        unique_id,
                    })));
            }
            wait_for_id(work, generation, timeout, deferred)
        };
        let corpus = &self.corpus;
        let built = span.in_scope(|| {
            build_trainer(
                &a,
                &self.bootstrap,
                self.threads,
                &self.abort,
                corpus,
                &mut exchange,
            )
        });
        let built = built.and_then(|t| {
            let hash = t.weights_hash()?;
            Ok((t, hash))
        });
        match built {
            Ok((mut t, weights_hash)) => {
                self.send(worker_message::Body::Ready(Ready {
                    generation,
                    parameter_layout_hash: t.layout_hash().to_le_bytes().to_vec(),
                    weights_hash: weights_hash.to_le_bytes().to_vec(),
                    parameter_count: t.parameter_count() as u64,
                    data: t.data_fingerprints().iter().map(wire).collect(),
                }));
                t.set_signals(self.signals.clone());
                self.current = Some(Current {
                    generation,
                    trainer: t,
                });
                Ok(())
            }
            Err(e) => {
                // A ring that could not form (a peer died meanwhile) is
                // retried by the coordinator, and a checkpoint that could
                // not be read is judged by it (it hashes the files while
                // the ranks load them: a damaged `latest` falls back to an
                // older checkpoint, with this worker); anything else is
                // bad input for this worker.
                let transient = e.chain().any(|c| c.is::<CollectiveError>())
                    || e.downcast_ref::<LoadFailed>().is_some();
                let why = format!("{e:#}");
                self.fail(generation, e, !transient);
                if transient {
                    return Ok(());
                }
                // The job's config, data or device cannot work here: bad
                // input for this worker.
                Err(Stop {
                    why,
                    code: exit::BAD_INPUT,
                    stale_after: None,
                })
            }
        }
    }

    /// The coordinator aborted the generation: drop the trainer and its
    /// collective.
    fn reset(&mut self) {
        self.current = None;
        if let Ok(mut h) = self.abort.lock() {
            *h = None;
        }
    }

    /// One training step; reports it, or why it failed (then the trainer
    /// is dropped: the coordinator restarts the generation).
    fn step(&mut self, p: StepPlan) {
        let signals = self.signals.clone();
        let Some(t) = self.trainer_of(p.generation) else {
            return;
        };
        let span = tracing::info_span!(
            "step",
            rank = t.rank(),
            step = p.step as i64,
            lr = p.lr,
            loss = tracing::field::Empty,
            grad_norm = tracing::field::Empty,
            compute_s = tracing::field::Empty,
            allreduce_s = tracing::field::Empty,
        );
        stride_telemetry::set_parent(&span, &p.trace_context);
        let result = injected_failure(p.step, t.rank())
            .and_then(|()| span.in_scope(|| t.step(&p.samples, p.lr)))
            .and_then(|o| {
                let hash = if p.hash_weights {
                    t.weights_hash()?.to_le_bytes().to_vec()
                } else {
                    Vec::new()
                };
                Ok((o, hash))
            });
        match result {
            Ok((o, weights_hash)) => {
                span.record("loss", o.loss);
                span.record("grad_norm", o.grad_norm);
                span.record("compute_s", o.compute_s);
                span.record("allreduce_s", o.allreduce_s);
                signals.step.store(p.step, Ordering::Relaxed);
                self.send(worker_message::Body::Step(StepReport {
                    generation: p.generation,
                    step: p.step,
                    loss: o.loss,
                    grad_norm: o.grad_norm,
                    tokens: o.tokens,
                    compute_s: o.compute_s,
                    allreduce_s: o.allreduce_s,
                    exposed_comm_s: o.exposed_comm_s,
                    total_s: o.total_s,
                    weights_hash,
                    host_device_bytes: o.host_device_bytes,
                }));
            }
            Err(e) if e.is::<Cancelled>() => {
                tracing::info!("step {}: {e}", p.step);
                self.current = None;
            }
            Err(e) => {
                // Data changed under the job: retrying cannot help.
                let fatal = e.chain().any(|c| c.is::<DataError>());
                self.fail(p.generation, e.context(format!("step {}", p.step)), fatal);
                self.current = None;
            }
        }
    }

    /// Copies the state now (the step boundary) and writes it on a thread
    /// of its own while the next steps run; the coordinator commits on the
    /// report.
    fn checkpoint(&mut self, p: CheckpointPlan) -> Result<(), Stop> {
        if !p.write {
            return Ok(());
        }
        let Some(t) = self.trainer_of(p.generation) else {
            return Ok(());
        };
        let span = tracing::info_span!(
            "checkpoint_write",
            rank = t.rank(),
            step = p.step as i64,
            dir = %p.tmp_dir,
        );
        stride_telemetry::set_parent(&span, &p.trace_context);
        let generation = p.generation;
        let snapshot = match span.in_scope(|| t.snapshot(p.hash_weights)) {
            Ok(s) => s,
            Err(e) => {
                let e = e.context(format!("copying the state of step {} to the host", p.step));
                self.fail(generation, e, true);
                return Ok(());
            }
        };
        let out = self.out.clone();
        let spawned = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                let start = std::time::Instant::now();
                let dir = std::path::Path::new(&p.tmp_dir);
                full_disk_for_tests(p.step, dir);
                let written = span.in_scope(|| snapshot.write(dir));
                let mut report = CheckpointReport {
                    generation,
                    step: p.step,
                    write_s: start.elapsed().as_secs_f64(),
                    ..CheckpointReport::default()
                };
                match written {
                    Ok(sha256) => {
                        report.sha256 = sha256.into_iter().collect();
                        report.weights_hash = snapshot
                            .weights_hash()
                            .map(|h| h.to_le_bytes().to_vec())
                            .unwrap_or_default();
                    }
                    Err(e) => {
                        tracing::error!("writing the checkpoint of step {}: {e:#}", p.step);
                        report.error = write_failure(&e, dir, snapshot.file_bytes());
                    }
                }
                let body = worker_message::Body::Checkpoint(report);
                let _ = out.blocking_send(msg(body));
            });
        if let Err(e) = spawned {
            let why = format!("cannot start the checkpoint writer: {e}");
            self.fail(generation, anyhow!("{why}"), true);
            return Err(Stop {
                why,
                code: exit::FAILED,
                stale_after: None,
            });
        }
        Ok(())
    }

    /// The validation loss over the plan's samples; reports its sum.
    fn evaluate(&mut self, p: EvalPlan) {
        let Some(t) = self.trainer_of(p.generation) else {
            return;
        };
        let span = tracing::info_span!(
            "evaluation",
            rank = t.rank(),
            step = p.step as i64,
            samples = p.samples.len() as i64,
        );
        stride_telemetry::set_parent(&span, &p.trace_context);
        match span.in_scope(|| t.evaluate(&p.samples)) {
            Ok((loss_sum, tokens)) => self.send(worker_message::Body::Eval(EvalReport {
                generation: p.generation,
                step: p.step,
                loss_sum,
                tokens,
            })),
            Err(e) if e.is::<Cancelled>() => {
                tracing::info!("evaluation after step {}: {e}", p.step);
                self.current = None;
            }
            Err(e) => {
                let fatal = e.chain().any(|c| c.is::<DataError>());
                self.fail(
                    p.generation,
                    e.context(format!("evaluation after step {}", p.step)),
                    fatal,
                );
                self.current = None;
            }
        }
    }
}

/// Test hooks fired as step `step` starts: [`Hook::PanicAtStep`] (a panic
/// must reach the coordinator with its message and end the worker) and
/// [`Hook::CollectiveErrorAtStep`] (a symptom the coordinator must not take
/// for a verdict).
fn injected_failure(step: u64, rank: i64) -> Result<()> {
    static COLLECTIVE_ERROR_INJECTED: AtomicBool = AtomicBool::new(false);
    if test_hooks::at_step(Hook::PanicAtStep, step) {
        panic!("injected by STRIDE_TEST_PANIC_AT_STEP at step {step}");
    }
    if rank == 0
        && test_hooks::at_step(Hook::CollectiveErrorAtStep, step)
        && !COLLECTIVE_ERROR_INJECTED.swap(true, Ordering::Relaxed)
    {
        return Err(CollectiveError::Peer {
            op: "all-reduce",
            peer: 1,
            error: std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "injected by STRIDE_TEST_COLLECTIVE_ERROR_AT_STEP",
            ),
        }
        .into());
    }
    Ok(())
}

/// [`Hook::FullDiskAtStep`]: the checkpoint's model file is made a link
/// to `/dev/full`, so the write fails with the kernel's own ENOSPC and
/// takes the same path as on a disk that is really full.
fn full_disk_for_tests(step: u64, dir: &std::path::Path) {
    if test_hooks::at_step(Hook::FullDiskAtStep, step) {
        let _ =
            std::os::unix::fs::symlink("/dev/full", dir.join(stride_job::checkpoint::MODEL_FILE));
    }
}

/// Why a checkpoint write failed, for the coordinator: the error, and for
/// a full disk the folder, the bytes the files need and the bytes free.
fn write_failure(e: &anyhow::Error, dir: &std::path::Path, needed: u64) -> String {
    let full = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull)
            || c.downcast_ref::<stride_job::checkpoint::CheckpointError>()
                .is_some_and(|ce| matches!(ce, stride_job::checkpoint::CheckpointError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull))
    });
    let folder = dir.parent().unwrap_or(dir);
    if !full {
        return format!("writing into {}: {e}", dir.display());
    }
    let free = stride_job::files::free_bytes(folder).map_or_else(
        || "an unknown number of bytes are".into(),
        |b| format!("{b} bytes ({:.1} MB) are", b as f64 / 1e6),
    );
    format!(
        "no space left on device (ENOSPC) in {}: the checkpoint's files need {needed} bytes ({:.1} MB) and {free} free; free space or give checkpoints another folder (checkpoint.dir), then resume ({e})",
        folder.display(),
        needed as f64 / 1e6
    )
}

/// Waits for the coordinator to hand out the collective id of `generation`.
/// A new assignment or an abort arriving first ends the wait (and is kept
/// in `deferred` for the compute loop).
fn wait_for_id(
    work: &Receiver<Work>,
    generation: u64,
    timeout: Duration,
    deferred: &mut Option<Work>,
) -> Result<Vec<u8>> {
    use std::sync::mpsc::RecvTimeoutError;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match work.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(Work::Bootstrap(b)) if b.generation == generation => return Ok(b.unique_id),
            Ok(w @ (Work::Assign(_) | Work::Reset)) => {
                *deferred = Some(w);
                return Err(CollectiveError::Setup(
                    "the coordinator re-formed the worker set before this collective formed".into(),
                )
                .into());
            }
            Ok(_) => {} // stale plans or ids of an earlier generation
            Err(RecvTimeoutError::Timeout) => {
                return Err(CollectiveError::Setup(format!(
                    "no collective id from the coordinator within {:.0} s (cluster.startup_timeout_s)",
                    timeout.as_secs_f64()
                ))
                .into());
            }
            Err(RecvTimeoutError::Disconnected) => bail!("the session with the coordinator ended"),
        }
    }
}

/// Builds the trainer for an assignment: config, device, threads, the
/// collective (formed from the id the coordinator hands out), the model.
fn build_trainer(
    a: &Assignment,
    bootstrap: &Bootstrap,
    threads: usize,
    abort: &AbortSlot,
    opened: &Option<(Config, Corpus)>,
    exchange: &mut dyn FnMut(Option<Vec<u8>>, Duration) -> Result<Vec<u8>>,
) -> Result<Trainer> {
    let config = Config::from_toml(&a.config_toml, "the job sent by the coordinator")?;
    // The data opened at registration, if it is this job's.
    let corpus = match opened {
        Some((c, corpus))
            if c.data == config.data
                && c.model == config.model
                && c.train.seed == config.train.seed =>
        {
            corpus.clone()
        }
        _ => Corpus::open(&config.data, &config.model, config.train.seed, Scan::Layout)?,
    };
    let device = match config.worker.device {
        DeviceKind::Cpu => Device::Cpu,
        DeviceKind::Cuda(ordinal) => cuda_device(ordinal)?,
    };
    let threads = if threads > 0 {
        threads
    } else {
        config.worker.threads
    };
    if threads > 0 {
        // Fails harmlessly if the pool already exists (a later generation).
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
    }
    // Rank 0 makes the id once its device is open (a CUDA context takes
    // seconds; a loaded machine, more): part of starting, so it is bounded
    // by the startup timeout, not by a step's.
    let id_timeout = Duration::from_secs_f64(config.cluster.startup_timeout_s);
    // The ring's own stall timeout outlasts the coordinator's patience (at
    // most step_timeout_s after the last heartbeat that showed progress):
    // the coordinator, which hears every rank, names the rank that stalled;
    // a survivor's collective error would only blame the peer it waits on.
    let collective_timeout = Duration::from_secs_f64(
        2.0 * config.cluster.step_timeout_s + 2.0 * config.cluster.heartbeat_interval_s,
    );
    tracing::info!(
        "rank {} of {}: device {}, {} threads, accumulation {}",
        a.rank,
        a.world_size,
        config.worker.device,
        rayon::current_num_threads(),
        a.accumulation
    );
    let kind = config.cluster.collective.on(&config.worker.device);
    let mine = if a.rank == 0 {
        Some(collective::new_shared_id(kind)?)
    } else {
        None
    };
    let shared_id = exchange(mine, id_timeout)?;
    let collective = collective::form(
        kind,
        &device,
        bootstrap,
        &collective::Formation {
            rank: a.rank as usize,
            world: a.world_size as usize,
            peers: &a.peers,
            generation: a.generation,
            shared_id: &shared_id,
            timeout: collective_timeout,
            wire: config.train.grad_comm_dtype,
        },
    )?;
    if let Ok(mut h) = abort.lock() {
        *h = collective.abort_handle();
    }
    let mut trainer =
        Trainer::with_corpus(&config, corpus, collective, a.accumulation as usize, device)?;
    tracing::info!(
        "rank {}: {} engine (worker.engine = {})",
        a.rank,
        trainer.engine_description(),
        String::from(config.worker.engine)
    );
    if !a.load_checkpoint.is_empty() {
        let dir = std::path::Path::new(&a.load_checkpoint);
        trainer
            .load_checkpoint(dir, a.weights_only)
            .context(LoadFailed(dir.to_path_buf()))?;
        tracing::info!(
            "loaded {} from {}",
            if a.weights_only {
                "weights"
            } else {
                "weights and optimizer state"
            },
            dir.display()
        );
    }
    Ok(trainer)
}

/// Reading the checkpoint of an assignment failed.
#[derive(Debug, thiserror::Error)]
#[error("loading {}", .0.display())]
struct LoadFailed(std::path::PathBuf);

/// The GPU of `cuda:N`, or for plain `cuda` the local rank's GPU
/// (`LOCAL_RANK`, else 0: one GPU per pod in the Indexed Job).
#[cfg(feature = "cuda")]
fn cuda_device(ordinal: Option<usize>) -> Result<Device> {
    let ordinal = ordinal
        .or_else(|| {
            std::env::var("LOCAL_RANK")
                .ok()
                .and_then(|r| r.parse().ok())
        })
        .unwrap_or(0);
    let device =
        Device::new_cuda(ordinal).with_context(|| format!("cannot open CUDA device {ordinal}"))?;
    tracing::info!(
        "using CUDA device {ordinal} (LOCAL_RANK={})",
        std::env::var("LOCAL_RANK").unwrap_or_else(|_| "unset".into())
    );
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: Option<usize>) -> Result<Device> {
    bail!(
        "worker.device asks for CUDA, but this worker was built without CUDA support; rebuild with `cargo build --release -p stride-worker --features cuda` (see deploy/Dockerfile.cuda), or run with --set worker.device=cpu"
    )
}
