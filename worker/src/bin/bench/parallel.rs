//! Data parallelism on the CPU: two ranks of one job on the TCP ring over
//! loopback, in this process (so they share its cores, as two local
//! workers share a machine), each a real `Trainer` timing `Trainer::step`
//! — with the gradient summed after backward or during it
//! (`train.overlap_grad_comm`), and the optimizer state whole or sharded
//! (ZeRO-1): four variants side by side, in alternating rounds so that
//! the machine's noise falls on all.

use std::time::Instant;

use anyhow::Result;
use stride_job::config::{Config, ConfigSource, RawConfig};
use stride_job::sampler::shard;
use stride_worker::collective::local_ring;
use stride_worker::trainer::Trainer;

use crate::lines::{Shape, shapes};

/// What one variant of the 2-rank step measured.
#[derive(Debug, Clone, Copy)]
struct Figures {
    /// Median step time over the timed steps (the slower rank's).
    step_s: f64,
    /// Median communication the step waited for (the slower rank's).
    exposed_s: f64,
    /// Bytes of AdamW moments one rank keeps.
    optimizer_bytes: usize,
}

/// A config for `shape`, 2 ranks of `batch` samples each, with `extra`.
fn config(shape: &Shape, extra: &str) -> Result<Config> {
    let m = &shape.model;
    let text = format!(
        "[model]\nn_layer = {}\nn_head = {}\nn_embd = {}\nvocab_size = {}\ncontext = {}\n\
         [data]\nsynthetic_tokens = {}\n\
         [train]\nglobal_batch = {}\nmicro_batch = {}\nwarmup_steps = 0\n{extra}\n\
         [cluster]\nworkers = 2\n",
        m.n_layer,
        m.n_head,
        m.n_embd,
        m.vocab_size,
        m.context,
        (2 * shape.batch + 2) * (m.context + 1) * 4,
        2 * shape.batch,
        shape.batch,
    );
    Ok(RawConfig::parse(
        &text,
        "bench".into(),
        ConfigSource::File("bench.toml".into()),
    )?
    .resolve()?)
}

/// `steps` timed steps (after one warm-up) of 2 ranks with `extra` keys.
fn run(shape: &Shape, extra: &str, steps: usize) -> Result<Figures> {
    let c = config(shape, extra)?;
    let samples: Vec<u64> = (0..2 * shape.batch as u64).collect();
    let per_rank = local_ring(2, |coll| -> Result<(Vec<f64>, Vec<f64>, usize)> {
        let rank = coll.rank();
        let mut t = Trainer::new(&c, coll, 1, candle_core::Device::Cpu)?;
        let mine = shard(&samples, 2, rank);
        t.step(mine, 1e-4)?;
        let (mut step, mut exposed) = (Vec::new(), Vec::new());
        for _ in 0..steps {
            let start = Instant::now();
            let o = t.step(mine, 1e-4)?;
            step.push(start.elapsed().as_secs_f64());
            exposed.push(o.exposed_comm_s);
        }
        Ok((step, exposed, t.optimizer_bytes()))
    })?;
    let mut steps_of = Vec::new();
    let mut exposed_of = Vec::new();
    let mut bytes = 0;
    for r in per_rank {
        let (step, exposed, b) = r?;
        steps_of.push(step);
        exposed_of.push(exposed);
        bytes = b;
    }
    Ok(Figures {
        step_s: median_of_worst(&steps_of),
        exposed_s: median_of_worst(&exposed_of),
        optimizer_bytes: bytes,
    })
}

/// The median over steps of the slowest rank's figure.
fn median_of_worst(per_rank: &[Vec<f64>]) -> f64 {
    let steps = per_rank.first().map_or(0, Vec::len);
    let mut worst: Vec<f64> = (0..steps)
        .map(|i| per_rank.iter().map(|r| r[i]).fold(0.0, f64::max))
        .collect();
    worst.sort_by(f64::total_cmp);
    worst.get(worst.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The `main` shape on 2 ranks: whole and sharded optimizer state, in
/// `rounds` alternating rounds of `steps` steps; prints each variant's
/// best round and the ratios.
pub(crate) fn bench_parallel(steps: usize, rounds: usize) -> Result<()> {
    let Some(shape) = shapes().into_iter().find(|s| s.name == "main") else {
        anyhow::bail!("no `main` shape");
    };
    let variants = [
        (
            "sum after backward,  whole state",
            "shard_optimizer = false\noverlap_grad_comm = false",
        ),
        (
            "sum during backward, whole state",
            "shard_optimizer = false\noverlap_grad_comm = true",
        ),
        (
            "sum after backward,  sharded    ",
            "shard_optimizer = true\noverlap_grad_comm = false",
        ),
        (
            "sum during backward, sharded    ",
            "shard_optimizer = true\noverlap_grad_comm = true",
        ),
    ];
    let mut best: Vec<Option<Figures>> = vec![None; variants.len()];
    for _ in 0..rounds.max(1) {
        for (i, (_, extra)) in variants.iter().enumerate() {
            let f = run(&shape, extra, steps.max(1))?;
            if best[i].is_none_or(|b| f.step_s < b.step_s) {
                best[i] = Some(f);
            }
        }
    }
    let tokens = 2 * shape.batch * shape.model.context;
    for ((name, _), f) in variants.iter().zip(&best) {
        let Some(f) = f else { continue };
        println!(
            "2 ranks, `main` shape, {name}: {:>7.1} ms/step {:>8.0} tokens/s, {:>6.1} ms of communication waited for, AdamW moments {:>6.1} MB per rank",
            1e3 * f.step_s,
            tokens as f64 / f.step_s,
            1e3 * f.exposed_s,
            f.optimizer_bytes as f64 / 1e6
        );
    }
    if let [Some(plain), Some(overlap), Some(sharded), Some(both)] = best[..] {
        println!(
            "during / after backward: {:.2}x step time ({:.2}x waited for); sharded / whole: {:.2}x step time, {:.2}x optimizer memory per rank; both / neither: {:.2}x step time",
            overlap.step_s / plain.step_s,
            overlap.exposed_s / plain.exposed_s,
            sharded.step_s / plain.step_s,
            sharded.optimizer_bytes as f64 / plain.optimizer_bytes as f64,
            both.step_s / plain.step_s,
        );
    }
    Ok(())
}
