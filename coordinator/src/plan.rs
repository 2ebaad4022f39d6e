//! `coordinator plan`: the resolved config, the LR schedule and the epoch
//! arithmetic of a job, without starting anything.
//!
//! This module only reads: it never writes a file, starts a worker or opens
//! a socket, so it is safe to run anywhere (a laptop without the data, CI).

use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde::Serialize;
use stride_job::config::Config;
use stride_job::sampler::{
    DataCursor, EpochStats, Sampler, ValidationStats, data_plan_warnings, window_count,
};
use stride_job::schedule::{Cooldown, Schedule};
use stride_job::tokens;

/// What `plan --json` prints (SPEC §5).
#[derive(Debug, Serialize)]
pub struct PlanReport {
    pub config: Config,
    pub schedule: Schedule,
    /// Present when the training split could be measured.
    pub epoch: Option<EpochStats>,
    /// Why `epoch` is absent, if it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch_note: Option<String>,
    /// What each evaluation reads, when the validation split could be
    /// measured and is not empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation: Option<ValidationStats>,
    /// Why `validation` is absent, if it is and the split could be measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_note: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batches: Option<Vec<Vec<u64>>>,
    /// Gradient accumulation steps at `cluster.workers` workers.
    pub accumulation: usize,
    /// Set when the plan previews `--extend-steps`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extension: Option<Extension>,
    /// What the data plan cannot mean, with the figures (too many epochs,
    /// a tiny validation split).
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Extension {
    pub resume_step: u64,
    pub old_max_steps: u64,
    pub new_max_steps: u64,
    /// The cooldown's shape (`Cooldown::name`).
    pub shape: &'static str,
}

/// Builds the plan of `config`; `extend_to` previews Strategy A (a
/// cooldown of that shape to that step) as if the run were resumed at its
/// last step; `batches` lists the first K global batches.
pub fn build(
    config: &Config,
    extend_to: Option<(u64, Cooldown)>,
    batches: Option<usize>,
) -> Result<PlanReport> {
    let t = &config.train;
    let mut schedule = Schedule::from_config(t);
    let mut extension = None;
    if let Some((n, shape)) = extend_to {
        let r = schedule.max_steps();
        schedule = schedule.extend(r, n, t.lr * t.min_lr_ratio, shape)?;
        extension = Some(Extension {
            resume_step: r,
            old_max_steps: r,
            new_max_steps: n,
            shape: shape.name(),
        });
    }
    let accumulation = config.accumulation_for(config.cluster.workers)?;
    let samples = tokens::train_split_len(&config.data)
        .map(|n| window_count(n, config.model.context, config.data.stride));
    let (epoch, epoch_note) = match &samples {
        Ok(s) => (
            Some(EpochStats::new(*s, t.global_batch, schedule.max_steps())),
            None,
        ),
        Err(e) => (
            None,
            Some(format!(
                "{e} — the epoch arithmetic needs the training data (run `coordinator prepare`, or `--set data.train=PATH`)"
            )),
        ),
    };
    let val_tokens = tokens::val_split_len(&config.data).ok();
    let validation = val_tokens
        .map(|n| window_count(n, config.model.context, config.data.val_stride))
        .filter(|w| *w > 0)
        .map(|w| ValidationStats::new(config, w));
    let validation_note = match val_tokens {
        Some(n) if n > 0 && validation.is_none() => Some(format!(
            "the validation split holds {n} tokens, shorter than one window of model.context + 1 = {}: a run is refused (raise data.val_fraction or give data.val)",
            config.model.context + 1
        )),
        Some(0) => Some(
            "no validation split (data.val_fraction = 0 and no data.val): no evaluation".into(),
        ),
        _ => None,
    };
    let batches = match batches {
        None => None,
        Some(k) => {
            let samples = samples.context("--batches needs the training data")?;
            let mut sampler = Sampler::new(samples, t.seed, DataCursor::default())?;
            Some(
                (0..k)
                    .map(|_| sampler.next_batch(t.global_batch).samples)
                    .collect(),
            )
        }
    };
    let val_windows = validation.as_ref().map(|v| v.windows);
    let warnings = match &epoch {
        Some(e) => data_plan_warnings(e, schedule.max_steps(), val_windows)?,
        None => Vec::new(),
    };
    // The config as written; the run's length is the schedule's (above).
    let config = config.clone();
    Ok(PlanReport {
        config,
        schedule,
        epoch,
        epoch_note,
        validation,
        validation_note,
        batches,
        accumulation,
        extension,
        warnings,
    })
}

/// The human-readable form.
pub fn render(plan: &PlanReport, name: &str, source: &str) -> String {
    let mut out = String::new();
    let c = &plan.config;
    let _ = writeln!(
        out,
        "# config `{name}` from {source} (resolved; config hash {})",
        &c.hash()[..16]
    );
    out.push_str(&c.to_toml());
    let _ = writeln!(out);

    if let Some(x) = &plan.extension {
        let _ = writeln!(
            out,
            "Strategy A preview: resumed at step {}, max_steps {} → {}; a {} cooldown is appended from the LR in force at step {} to min_lr_ratio × lr = {:.3e}.",
            x.resume_step,
            x.old_max_steps,
            x.new_max_steps,
            x.shape,
            x.resume_step,
            c.train.lr * c.train.min_lr_ratio
        );
    }
    let _ = writeln!(out, "LR schedule ({} steps):", plan.schedule.max_steps());
    let _ = writeln!(
        out,
        "  {:<14} {:>9} {:>9} {:>11} {:>11}",
        "kind", "start", "end", "start_lr", "end_lr"
    );
    for s in &plan.schedule.segments {
        let _ = writeln!(
            out,
            "  {:<14} {:>9} {:>9} {:>11.4e} {:>11.4e}",
            s.kind.name(),
            s.start_step,
            s.end_step,
            s.start_lr,
            s.end_lr
        );
    }
    let _ = writeln!(out, "LR at representative steps:");
    for step in plan.schedule.representative_steps() {
        let _ = writeln!(
            out,
            "  step {step:>9}  lr {:.6e}",
            plan.schedule.lr_at(step)
        );
    }
    let _ = writeln!(out);
    let t = &c.train;
    let _ = writeln!(
        out,
        "Batch: global {} = {} workers × micro-batch {} × accumulation {} ({} tokens per step)",
        t.global_batch,
        c.cluster.workers,
        t.micro_batch,
        plan.accumulation,
        t.global_batch * c.model.context
    );
    match (&plan.epoch, &plan.epoch_note) {
        (Some(e), _) => {
            let _ = writeln!(
                out,
                "Epoch: {} samples (context {}, stride {}) / global batch {} = {:.2} steps per epoch; {} steps = {:.2} epochs",
                e.samples,
                c.model.context,
                c.data.stride,
                e.global_batch,
                e.steps_per_epoch,
                plan.schedule.max_steps(),
                e.epochs
            );
        }
        (None, Some(note)) => {
            let _ = writeln!(out, "Epoch: unknown: {note}");
        }
        (None, None) => {}
    }
    if let Some(v) = &plan.validation {
        let when = match c.train.eval_interval {
            0 => "at the end".to_string(),
            n => format!("every {n} steps and at the end"),
        };
        let _ = writeln!(out, "Validation: {}; {when}", v.describe());
        if let Some(w) = v.clamp_warning() {
            let _ = writeln!(out, "warning: {w}");
        }
    }
    if let Some(note) = &plan.validation_note {
        let _ = writeln!(out, "Validation: {note}");
    }
    for w in &plan.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    if c.data.stride < c.model.context {
        let _ = writeln!(
            out,
            "warning: data.stride {} < model.context {}: consecutive samples overlap by {:.1}%",
            c.data.stride,
            c.model.context,
            100.0 * (c.model.context - c.data.stride) as f64 / c.model.context as f64
        );
    }
    if let Some(batches) = &plan.batches {
        let _ = writeln!(
            out,
            "First {} global batches (sample indices):",
            batches.len()
        );
        for (i, b) in batches.iter().enumerate() {
            let _ = writeln!(out, "  step {i}: {b:?}");
        }
    }
    out
}
