//! The kernels run by the CPU emulator: one safe function per kernel (or
//! per layer and direction, where a layer takes several launches), with the
//! same argument order and semantics as the `stride-kernels` function it
//! mirrors. Each checks every slice length against the shape (and every
//! index a kernel reads from a buffer) before the launch, runs the launch
//! configuration of [`crate::launch`], and returns the emulator's errors
//! (deadlock, invalid launch, misuse) as [`EmuError`]s. The checks, the
//! configurations and the argument lists are the GPU layer's too: both
//! take them from one plan per call (`src/plan.rs`).
//!
//! Storage is `f32` or [`Bf16`](crate::Bf16) ([`Storage`]); the kernels
//! compute in f32, and statistics, losses, partial sums and gradients of
//! parameters are f32 buffers whatever the storage.

use std::fmt;

use crate::bf16::{Bf16, Storage};
use crate::ffi::{self, Arg};
use crate::launch::Launch;
use crate::plan::{self, Param};

pub use crate::plan::{AdamWCoefficients, Heads};

/// What went wrong in an emulated launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The launch configuration is not valid on an H100.
    BadLaunch,
    /// Every live thread waits on a barrier that cannot complete.
    Deadlock,
    /// A barrier or warp operation used in a way that CUDA leaves undefined
    /// or the emulator does not implement.
    Misuse,
    /// The argument list does not match the kernel's parameters.
    BadArgs,
    /// No memory for the fibers' stacks or the shared memory.
    Resources,
    /// A slice does not match the shape (found before launching).
    Shape,
    /// An error code the emulator does not define.
    Unknown,
}

impl ErrorKind {
    pub(crate) fn from_code(code: i32) -> ErrorKind {
        match code {
            1 => ErrorKind::BadLaunch,
            2 => ErrorKind::Deadlock,
            3 => ErrorKind::Misuse,
            4 => ErrorKind::BadArgs,
            5 => ErrorKind::Resources,
            _ => ErrorKind::Unknown,
        }
    }
}

/// An emulated launch that did not run to its end, or was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmuError {
    /// The kind of failure.
    pub kind: ErrorKind,
    /// The emulator's (or the shape check's) message.
    pub message: String,
}

impl fmt::Display for EmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for EmuError {}

/// The result of an emulated kernel.
pub type Result<T = ()> = std::result::Result<T, EmuError>;

fn shape_error(message: String) -> EmuError {
    EmuError {
        kind: ErrorKind::Shape,
        message,
    }
}

/// Runs a call's plan ([`crate::plan`]: the checks, configurations and
/// argument lists the GPU layer shares) with `buffers` as its buffers.
fn run_plan(plan: plan::Checked, buffers: &[Arg]) -> Result {
    for step in plan.map_err(shape_error)? {
        let args = step
            .params
            .iter()
            .map(|p| match *p {
                Param::Buf(i) => buffers.get(i).copied().ok_or_else(|| EmuError {
                    kind: ErrorKind::BadArgs,
                    message: format!("{}: no buffer {i} in this call", step.kernel),
                }),
                Param::I32(v) => Ok(Arg::I32(v)),
                Param::I64(v) => Ok(Arg::I64(v)),
                Param::F32(v) => Ok(Arg::F32(v)),
            })
            .collect::<Result<Vec<Arg>>>()?;
        run(&step.kernel, step.launch, &args)?;
    }
    Ok(())
}

/// Runs `kernel` with `config` after checking the configuration here too.
fn run(kernel: &str, config: Launch, args: &[Arg]) -> Result {
    config.check().map_err(|m| EmuError {
        kind: ErrorKind::BadLaunch,
        message: format!("{kernel}: {m}"),
    })?;
    ffi::launch(kernel, &config, args)
}

/// The order in which the emulator runs a launch's blocks and, at every
/// pass of a block's scheduler, its threads. Nothing orders them on a GPU:
/// a kernel whose results change with the schedule has a race (a missing
/// barrier, blocks that depend on each other), which running it under
/// each schedule shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Block and thread numbers rising (the default).
    InOrder,
    /// Falling.
    Reversed,
    /// A pseudo-random order for every pass and every launch, from a seed.
    Shuffled(u64),
}

/// Sets the schedule of this OS thread's launches from now on.
pub fn set_schedule(schedule: Schedule) {
    match schedule {
        Schedule::InOrder => ffi::set_schedule(0, 0),
        Schedule::Reversed => ffi::set_schedule(1, 0),
        Schedule::Shuffled(seed) => ffi::set_schedule(2, seed),
    }
}

/// Runs any emulated kernel by name with an explicit configuration and
/// plain scalar/pointer arguments: for the emulator's own tests (the self
/// test kernels take one output buffer and ints). `out` is the kernel's
/// first argument and must be long enough for what the kernel writes
/// (checked: `out_min_len`).
#[doc(hidden)]
pub fn run_selftest(
    kernel: &str,
    config: Launch,
    out: &mut [f32],
    out_min_len: usize,
    ints: &[i32],
) -> Result {
    if !kernel.starts_with("stride_test_") || kernel == "stride_test_indices" {
        return Err(shape_error(format!(
            "{kernel} is not a float self-test kernel"
        )));
    }
    plan::expect_at_least("out", out.len(), out_min_len).map_err(shape_error)?;
    plan::expect_at_least("out", out.len(), config.threads() as usize).map_err(shape_error)?;
    let mut args = vec![Arg::output(out)];
    args.extend(ints.iter().map(|&i| Arg::I32(i)));
    // Raw launch: the configuration is not checked here, so that the
    // emulator's own check can be tested.
    ffi::launch(kernel, &config, &args)
}

/// The emulator's index self test: every thread writes 9 values (its
/// indices, the block's and the grid's sizes) to `out`, thread 0 of each
/// block the first word of the dynamic shared memory (before any write) to
/// `poison`.
#[doc(hidden)]
pub fn run_index_selftest(config: Launch, out: &mut [u32], poison: &mut [u32]) -> Result {
    let blocks: u64 = config.grid.iter().map(|&g| u64::from(g)).product();
    let threads = blocks * config.threads();
    plan::expect_len("out", out.len(), (9 * threads) as usize).map_err(shape_error)?;
    plan::expect_len("poison", poison.len(), blocks as usize).map_err(shape_error)?;
    if u64::from(config.shared_bytes) < 4 * config.threads() {
        return Err(shape_error("shared memory below 4 bytes per thread".into()));
    }
    run(
        "stride_test_indices",
        config,
        &[Arg::output(out), Arg::output(poison)],
    )
}

// ---- embeddings -------------------------------------------------------------

/// out (N, C) = wte[tokens] + wpe[position], for sequences of T positions
/// (N = tokens.len(); position n % T). Every token must be below V =
/// wte.len() / C.
pub fn embedding_forward<T: Storage>(
    out: &mut [T],
    tokens: &[u32],
    wte: &[T],
    wpe: &[T],
    t: usize,
    c: usize,
) -> Result {
    let plan = plan::embedding_forward(
        T::SUFFIX,
        out.len(),
        tokens.len(),
        plan::max_index(tokens),
        wte.len(),
        wpe.len(),
        t,
        c,
    );
    run_plan(
        plan,
        &[
            Arg::output(out),
            Arg::input(tokens),
            Arg::input(wte),
            Arg::input(wpe),
        ],
    )
}

/// The rows of `tokens` grouped by token for the token-embedding backward:
/// `order` holds the row numbers sorted by (token, row), `offsets` (S + 1)
/// cuts `order` into S segments of one token each, `segment_tokens` (S,
/// strictly increasing) names each segment's token.
pub fn bucket_tokens(tokens: &[u32]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut order: Vec<u32> = (0..tokens.len() as u32).collect();
    // Stable: rows of one token stay in row order.
    order.sort_by_key(|&r| tokens[r as usize]);
    let mut offsets = Vec::new();
    let mut segment_tokens = Vec::new();
    for (k, &row) in order.iter().enumerate() {
        let token = tokens[row as usize];
        if segment_tokens.last() != Some(&token) {
            segment_tokens.push(token);
            offsets.push(k as u32);
        }
    }
    offsets.push(order.len() as u32);
    (order, offsets, segment_tokens)
}

/// dwte[token] += dout[row] for every row of dout (N, C), grouped by
/// [`bucket_tokens`]: each token's rows added in row order, as the CPU does
/// (the same bits in f32).
pub fn token_embedding_backward<T: Storage>(
    dwte: &mut [f32],
    dout: &[T],
    order: &[u32],
    offsets: &[u32],
    segment_tokens: &[u32],
    c: usize,
) -> Result {
    let buckets = plan::buckets(order, offsets, segment_tokens).map_err(shape_error)?;
    let plan = plan::token_embedding_backward(T::SUFFIX, dwte.len(), dout.len(), buckets, c);
    run_plan(
        plan,
        &[
            Arg::output(dwte),
            Arg::input(dout),
            Arg::input(order),
            Arg::input(offsets),
            Arg::input(segment_tokens),
        ],
    )
}

/// dwpe[p] += Σ_b dout[b, p] for dout (B, T, C), sequences added in order
/// (the CPU's bits in f32).
pub fn position_embedding_backward<T: Storage>(
    dwpe: &mut [f32],
    dout: &[T],
    t: usize,
    c: usize,
) -> Result {
    let plan = plan::position_embedding_backward(T::SUFFIX, dwpe.len(), dout.len(), t, c);
    run_plan(plan, &[Arg::output(dwpe), Arg::input(dout)])
}

// ---- LayerNorm ----------------------------------------------------------------

/// LayerNorm over rows of C = w.len() (ε = 1e-5): out (N, C) =
/// (x − mean)·rstd·w + b, saving mean (N) and rstd (N) in f32.
pub fn layernorm_forward<T: Storage>(
    out: &mut [T],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[T],
    w: &[T],
    b: &[T],
) -> Result {
    let plan = plan::layernorm_forward(
        T::SUFFIX,
        out.len(),
        mean.len(),
        rstd.len(),
        inp.len(),
        w.len(),
        b.len(),
    );
    run_plan(
        plan,
        &[
            Arg::output(out),
            Arg::output(mean),
            Arg::output(rstd),
            Arg::input(inp),
            Arg::input(w),
            Arg::input(b),
        ],
    )
}

/// LayerNorm backward: dinp (N, C) += ∂/∂x; dw (C) += Σ norm·dout and db
/// (C) += Σ dout over rows, through `partials` (at least
/// [`launch::partial_blocks`](crate::launch::partial_blocks)`(N)` × 2C):
/// per block of 32 rows, then the blocks in order.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<T: Storage>(
    dinp: &mut [T],
    dw: &mut [f32],
    db: &mut [f32],
    partials: &mut [f32],
    dout: &[T],
    inp: &[T],
    w: &[T],
    mean: &[f32],
    rstd: &[f32],
) -> Result {
    let plan = plan::layernorm_backward(
        T::SUFFIX,
        dinp.len(),
        dw.len(),
        db.len(),
        partials.len(),
        dout.len(),
        inp.len(),
        w.len(),
        mean.len(),
        rstd.len(),
    );
    run_plan(
        plan,
        &[
            Arg::output(dinp),
            Arg::output(dw),
            Arg::output(db),
            Arg::output(partials),
            Arg::input(dout),
            Arg::input(inp),
            Arg::input(w),
            Arg::input(mean),
            Arg::input(rstd),
        ],
    )
}

/// acc (W) += Σ rows of x (N, W), through `partials` (at least
/// [`launch::partial_blocks`](crate::launch::partial_blocks)`(N)` × W): the
/// CPU's blocks and order, so f32 gives the CPU's bits.
pub fn column_sums<T: Storage>(acc: &mut [f32], partials: &mut [f32], x: &[T]) -> Result {
    let plan = plan::column_sums(T::SUFFIX, acc.len(), partials.len(), x.len());
    run_plan(
        plan,
        &[Arg::output(acc), Arg::output(partials), Arg::input(x)],
    )
}

// ---- elementwise --------------------------------------------------------------

/// GELU (tanh form): out = x·σ(2u), u = √(2/π)(x + 0.044715x³).
pub fn gelu_forward<T: Storage>(out: &mut [T], inp: &[T]) -> Result {
    let plan = plan::gelu("gelu_forward", T::SUFFIX, "out", out.len(), inp.len());
    run_plan(plan, &[Arg::output(out), Arg::input(inp)])
}

/// GELU backward in place: d holds dout and becomes dinp; inp is the
/// forward's input.
pub fn gelu_backward<T: Storage>(d: &mut [T], inp: &[T]) -> Result {
    let plan = plan::gelu("gelu_backward", T::SUFFIX, "d", d.len(), inp.len());
    run_plan(plan, &[Arg::output(d), Arg::input(inp)])
}

/// out = a + b, elementwise.
pub fn add<T: Storage>(out: &mut [T], a: &[T], b: &[T]) -> Result {
    let plan = plan::add(T::SUFFIX, out.len(), a.len(), b.len());
    run_plan(plan, &[Arg::output(out), Arg::input(a), Arg::input(b)])
}

// ---- attention ------------------------------------------------------------------

/// Causal self-attention, flash style. qkv (B, T, 3C) holds [q | k | v]
/// per row; out (B, T, C) receives the heads side by side; lse (B, NH, T)
/// the log-sum-exp of each row's scaled scores (f32), for the backward.
pub fn attention_forward<T: Storage>(
    out: &mut [T],
    lse: &mut [f32],
    qkv: &[T],
    s: Heads,
) -> Result {
    let plan = plan::attention_forward(T::SUFFIX, out.len(), lse.len(), qkv.len(), s);
    run_plan(plan, &[Arg::output(out), Arg::output(lse), Arg::input(qkv)])
}

/// Causal self-attention backward: dqkv (B, T, 3C) is overwritten from
/// dout (B, T, C) and the forward's qkv, out and lse; dots (B, NH, T) is
/// scratch (the rows' dout·out). Three launches, no atomics.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Storage>(
    dqkv: &mut [T],
    dots: &mut [f32],
    dout: &[T],
    out: &[T],
    lse: &[f32],
    qkv: &[T],
    s: Heads,
) -> Result {
    let plan = plan::attention_backward(
        T::SUFFIX,
        dqkv.len(),
        dots.len(),
        dout.len(),
        out.len(),
        lse.len(),
        qkv.len(),
        s,
    );
    run_plan(
        plan,
        &[
            Arg::output(dqkv),
            Arg::output(dots),
            Arg::input(dout),
            Arg::input(out),
            Arg::input(lse),
            Arg::input(qkv),
        ],
    )
}

// ---- cross-entropy ------------------------------------------------------------

/// Softmax cross-entropy over logits (R, V), f32, in place: row_loss[r] =
/// max + ln Σ e^(l − max) − l[target] (f32), and the rows become
/// e^(l − max) (as the CPU leaves them), or with `with_grad`
/// (softmax − one-hot)·loss_scale. Every target must be below V.
pub fn cross_entropy(
    logits: &mut [f32],
    row_loss: &mut [f32],
    targets: &[u32],
    v: usize,
    loss_scale: f32,
    with_grad: bool,
) -> Result {
    let plan = plan::cross_entropy(
        logits.len(),
        row_loss.len(),
        targets.len(),
        plan::max_index(targets),
        v,
        loss_scale,
        with_grad,
    );
    run_plan(
        plan,
        &[
            Arg::output(logits),
            Arg::output(row_loss),
            Arg::input(targets),
        ],
    )
}

// ---- reductions and casts ---------------------------------------------------------

/// out[0] = Σ x², in two passes: per-block partials (at least
/// [`launch::sumsq_blocks`](crate::launch::sumsq_blocks)`(N)` of them),
/// then one block adds them in order. The result depends on x alone.
pub fn sum_of_squares(out: &mut [f32], partials: &mut [f32], x: &[f32]) -> Result {
    let plan = plan::sum_of_squares(out.len(), partials.len(), x.len());
    run_plan(
        plan,
        &[Arg::output(out), Arg::output(partials), Arg::input(x)],
    )
}

/// f32 → bf16, round to nearest even (the compute weights' refresh).
pub fn cast_f32_to_bf16(out: &mut [Bf16], x: &[f32]) -> Result {
    let plan = plan::cast("stride_cast_f32_to_bf16", out.len(), x.len());
    run_plan(plan, &[Arg::output(out), Arg::input(x)])
}

/// bf16 → f32 (exact).
pub fn cast_bf16_to_f32(out: &mut [f32], x: &[Bf16]) -> Result {
    let plan = plan::cast("stride_cast_bf16_to_f32", out.len(), x.len());
    run_plan(plan, &[Arg::output(out), Arg::input(x)])
}

// ---- the optimizer step ------------------------------------------------------------

/// One AdamW update in place of f32 master weights `w` and moments `m`,
/// `v` (n each, separate buffers) with the gradient `grad` (n) scaled by
/// `factor[0]` as it is read, weight decay where `decay` (n bytes) is
/// nonzero: the worker's `optim::Coefficients::apply`, operation for
/// operation, so the same bits as the worker's CPU update from the same
/// gradient (src/cuda/optimizer.cu). n = 0 launches nothing.
pub fn adamw(
    w: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    grad: &[f32],
    decay: &[u8],
    factor: &[f32],
    k: AdamWCoefficients,
) -> Result {
    let plan = plan::adamw(
        w.len(),
        m.len(),
        v.len(),
        grad.len(),
        decay.len(),
        factor.len(),
        k,
    );
    run_plan(
        plan,
        &[
            Arg::output(w),
            Arg::output(m),
            Arg::output(v),
            Arg::input(grad),
            Arg::input(decay),
            Arg::input(factor),
        ],
    )
}

/// The step's gradient factor from `sumsq[0]`, the sum of squares of the
/// summed gradient ([`sum_of_squares`]): `norm[0]` = √sumsq·scale (the
/// averaged gradient's norm) and `factor[0]` = scale, times
/// max_norm / (norm + 1e-6) when `max_norm` > 0 and norm > max_norm — in
/// the order and the f32 roundings of the composed engine's
/// `DeviceState::write_factor`. `scale` (1 / the micro-batches over all
/// ranks) must be positive; `max_norm` ≤ 0 disables clipping.
pub fn grad_factor(
    factor: &mut [f32],
    norm: &mut [f32],
    sumsq: &[f32],
    scale: f64,
    max_norm: f64,
) -> Result {
    let plan = plan::grad_factor(factor.len(), norm.len(), sumsq.len(), scale, max_norm);
    run_plan(
        plan,
        &[Arg::output(factor), Arg::output(norm), Arg::input(sumsq)],
    )
}
