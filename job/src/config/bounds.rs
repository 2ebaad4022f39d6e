//! The resolved config's bounds and the rules between its keys: each
//! broken one is a [`Violation`] naming the key, its value and why (with
//! what to use instead where there is one). The typed sections live in
//! `mod.rs`, the TOML stage in `raw.rs`; this file only judges.

use std::fmt;

use super::{Config, Device, Engine, MAX_SECONDS, MAX_STEPS, MAX_THREADS, MAX_VOCAB, Precision};

/// A value that failed validation: which key, what it was, why.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{key}` = {value}: {reason}")]
pub struct Violation {
    pub key: String,
    pub value: String,
    pub reason: String,
}

fn check(ok: bool, key: &str, value: impl fmt::Display, reason: &str) -> Result<(), Violation> {
    if ok {
        Ok(())
    } else {
        Err(Violation {
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        })
    }
}

impl Config {
    /// Every bound and every rule between keys; the first broken one.
    pub(super) fn validate(&self) -> Result<(), Violation> {
        let m = &self.model;
        // Upper bounds of the size keys. Each is far beyond any real job,
        // and small enough that no product of sizes the code forms (tokens
        // of a micro-batch × vocabulary, parameters of the model, workers ×
        // batch) can overflow a 64-bit integer: a mistyped value is refused
        // here with the key and its range, never met later as a panic.
        let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        let (d, t, c, w, cl) = (
            &self.data,
            &self.train,
            &self.checkpoint,
            &self.worker,
            &self.cluster,
        );
        for (key, value, max) in [
            ("model.n_layer", n(m.n_layer), 1 << 10),
            ("model.n_head", n(m.n_head), 1 << 10),
            ("model.n_embd", n(m.n_embd), 1 << 16),
            ("model.context", n(m.context), 1 << 20),
            ("data.stride", n(d.stride), 1 << 32),
            ("data.val_stride", n(d.val_stride), 1 << 32),
            ("data.synthetic_tokens", n(d.synthetic_tokens), 1 << 32),
            ("train.max_steps", t.max_steps, MAX_STEPS),
            ("train.global_batch", n(t.global_batch), 1 << 24),
            ("train.micro_batch", n(t.micro_batch), 1 << 20),
            ("train.eval_interval", t.eval_interval, MAX_STEPS),
            ("train.eval_batches", n(t.eval_batches), 1 << 32),
            ("checkpoint.interval", c.interval, MAX_STEPS),
            ("checkpoint.keep_last", n(c.keep_last), 1 << 16),
            ("worker.threads", n(w.threads), n(MAX_THREADS)),
            (
                "worker.weights_check_interval",
                w.weights_check_interval,
                MAX_STEPS,
            ),
            ("cluster.workers", n(cl.workers), 1 << 16),
            ("cluster.max_workers", n(cl.max_workers), 1 << 16),
            ("cluster.max_restarts", u64::from(cl.max_restarts), 1 << 16),
        ] {
            check(value <= max, key, value, &format!("must be at most {max}"))?;
        }
        check(
            m.n_layer >= 1,
            "model.n_layer",
            m.n_layer,
            "must be at least 1",
        )?;
        check(
            m.n_head >= 1,
            "model.n_head",
            m.n_head,
            "must be at least 1",
        )?;
        check(
            m.n_embd >= 1 && m.n_embd.is_multiple_of(m.n_head),
            "model.n_embd",
            m.n_embd,
            &format!("must be a positive multiple of model.n_head = {}", m.n_head),
        )?;
        check(
            (2..=MAX_VOCAB).contains(&m.vocab_size),
            "model.vocab_size",
            m.vocab_size,
            &format!("must be in 2..={MAX_VOCAB} (token files hold uint16 ids)"),
        )?;
        check(
            m.context >= 1,
            "model.context",
            m.context,
            "must be at least 1",
        )?;

        check(
            d.stride >= 1,
            "data.stride",
            d.stride,
            "must be at least 1 (1 = every offset, context = non-overlapping windows)",
        )?;
        check(
            w.weights_check_interval >= 1,
            "worker.weights_check_interval",
            w.weights_check_interval,
            "must be at least 1 (1 = every step)",
        )?;
        check(
            d.val_stride >= 1,
            "data.val_stride",
            d.val_stride,
            "must be at least 1 (default = model.context: disjoint validation windows)",
        )?;
        check(
            (0.0..1.0).contains(&d.val_fraction),
            "data.val_fraction",
            d.val_fraction,
            "must be in [0, 1)",
        )?;
        check(
            d.synthetic_branching >= 1 && d.synthetic_branching <= m.vocab_size,
            "data.synthetic_branching",
            d.synthetic_branching,
            &format!("must be in 1..=model.vocab_size ({})", m.vocab_size),
        )?;
        check(
            d.synthetic_tokens > m.context + 1,
            "data.synthetic_tokens",
            d.synthetic_tokens,
            &format!("must exceed model.context + 1 = {}", m.context + 1),
        )?;

        check(
            t.max_steps >= 1,
            "train.max_steps",
            t.max_steps,
            "must be at least 1",
        )?;
        check(
            t.warmup_steps <= t.max_steps,
            "train.warmup_steps",
            t.warmup_steps,
            &format!("must not exceed train.max_steps = {}", t.max_steps),
        )?;
        check(
            t.lr.is_finite() && t.lr > 0.0 && t.lr <= 1.0,
            "train.lr",
            t.lr,
            "must be a positive number, at most 1 (an AdamW step moves each weight by about lr; GPT-2-size models train at 1e-4..1e-3)",
        )?;
        check(
            (0.0..=1.0).contains(&t.min_lr_ratio),
            "train.min_lr_ratio",
            t.min_lr_ratio,
            "must be in [0, 1]",
        )?;
        check(
            t.micro_batch >= 1,
            "train.micro_batch",
            t.micro_batch,
            "must be at least 1",
        )?;
        check(
            t.global_batch >= 1,
            "train.global_batch",
            t.global_batch,
            "must be at least 1",
        )?;
        self.accumulation_for(self.cluster.workers)?;

        let o = &self.optim;
        check(
            (0.0..1.0).contains(&o.beta1),
            "optim.beta1",
            o.beta1,
            "must be in [0, 1)",
        )?;
        check(
            (0.0..1.0).contains(&o.beta2),
            "optim.beta2",
            o.beta2,
            "must be in [0, 1)",
        )?;
        check(
            o.eps.is_finite() && o.eps > 0.0,
            "optim.eps",
            o.eps,
            "must be a positive number",
        )?;
        check(
            o.weight_decay.is_finite() && o.weight_decay >= 0.0,
            "optim.weight_decay",
            o.weight_decay,
            "must be a number, not negative",
        )?;
        check(
            o.grad_clip.is_finite() && o.grad_clip >= 0.0,
            "optim.grad_clip",
            o.grad_clip,
            "must be a number, not negative (0 = no clipping)",
        )?;

        check(
            c.keep_last >= 1,
            "checkpoint.keep_last",
            c.keep_last,
            "must be at least 1",
        )?;

        if let Some(why) = cl.collective.refusal(&w.device) {
            check(false, "cluster.collective", cl.collective, why)?;
        }
        if let Some(why) = t.grad_comm_dtype.refusal(cl.collective.on(&w.device)) {
            check(false, "train.grad_comm_dtype", t.grad_comm_dtype, why)?;
        }

        if let Some(why) = self.shard_refusal(t.shard_optimizer) {
            check(false, "train.shard_optimizer", t.shard_optimizer, &why)?;
        }

        if w.engine == Engine::Fused {
            if matches!(w.device, Device::Cuda(_)) {
                // Refused here, naming the key, rather than by a kernel in
                // the middle of a job (`auto` runs such a model composed).
                let shape = crate::cuda_shapes::ModelShape {
                    n_head: self.model.n_head,
                    n_embd: self.model.n_embd,
                    vocab_size: self.model.vocab_size,
                    context: self.model.context,
                    micro_batch: t.micro_batch,
                };
                if let Err(u) = crate::cuda_shapes::supports(&shape) {
                    check(
                        false,
                        "worker.engine",
                        "fused",
                        &format!(
                            "the fused engine's CUDA kernels do not take this model: {u}; use `auto` (which runs it on the composed engine) or `composed`"
                        ),
                    )?;
                }
            } else {
                check(
                    w.precision != Precision::Bf16,
                    "worker.engine",
                    "fused",
                    "the fused engine computes in f32 on the CPU, and worker.precision is `bf16`: use precision `auto` or `f32`, or engine `composed`",
                )?;
            }
        }

        check(
            cl.workers >= 1,
            "cluster.workers",
            cl.workers,
            "must be at least 1",
        )?;
        check(
            cl.min_workers >= 1 && cl.min_workers <= cl.workers,
            "cluster.min_workers",
            cl.min_workers,
            &format!("must be in 1..=cluster.workers ({})", cl.workers),
        )?;
        check(
            cl.max_workers >= cl.workers,
            "cluster.max_workers",
            cl.max_workers,
            &format!("must be at least cluster.workers ({})", cl.workers),
        )?;
        for (key, v) in [
            ("cluster.heartbeat_interval_s", cl.heartbeat_interval_s),
            ("cluster.heartbeat_timeout_s", cl.heartbeat_timeout_s),
            ("cluster.startup_timeout_s", cl.startup_timeout_s),
            ("cluster.rejoin_timeout_s", cl.rejoin_timeout_s),
            ("cluster.step_timeout_s", cl.step_timeout_s),
            ("checkpoint.write_timeout_s", c.write_timeout_s),
        ] {
            check(
                v.is_finite() && v > 0.0 && v <= MAX_SECONDS,
                key,
                v,
                "must be a positive number of seconds, at most 1000000 (11.6 days)",
            )?;
        }
        check(
            cl.step_timeout_s >= 2.0 * cl.heartbeat_interval_s,
            "cluster.step_timeout_s",
            cl.step_timeout_s,
            &format!(
                "must be at least 2 × cluster.heartbeat_interval_s = {}: a rank's progress reaches the coordinator with its heartbeats",
                2.0 * cl.heartbeat_interval_s
            ),
        )?;
        check(
            cl.heartbeat_timeout_s > cl.heartbeat_interval_s,
            "cluster.heartbeat_timeout_s",
            cl.heartbeat_timeout_s,
            &format!(
                "must exceed cluster.heartbeat_interval_s = {}",
                cl.heartbeat_interval_s
            ),
        )?;
        Ok(())
    }

    /// Gradient accumulation steps for `workers` workers:
    /// `global_batch / (workers × micro_batch)`, which must divide exactly;
    /// the error says why the global batch cannot be shared among them.
    pub fn accumulation_for(&self, workers: usize) -> Result<usize, Violation> {
        let t = &self.train;
        let per_pass = workers.max(1) * t.micro_batch;
        check(
            t.global_batch.is_multiple_of(per_pass),
            "train.global_batch",
            t.global_batch,
            &format!(
                "must be divisible by workers × train.micro_batch = {workers} × {} = {per_pass}",
                t.micro_batch
            ),
        )?;
        Ok(t.global_batch / per_pass)
    }
}
