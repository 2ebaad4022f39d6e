//! The kernels run by the CPU emulator: one safe function per kernel (or
//! per layer and direction, where a layer takes several launches), with the
//! same argument order and semantics as the `stride-kernels` function it
//! mirrors. Each checks every slice length against the shape (and every
//! index a kernel reads from a buffer) before the launch, runs the launch
//! configuration of [`crate::launch`], and returns the emulator's errors
//! (deadlock, invalid launch, misuse) as [`EmuError`]s.
//!
//! Storage is `f32` or [`Bf16`](crate::Bf16) ([`Storage`]); the kernels
//! compute in f32, and statistics, losses, partial sums and gradients of
//! parameters are f32 buffers whatever the storage.

use std::fmt;

use crate::bf16::{Bf16, Storage};
use crate::ffi::{self, Arg};
use crate::launch::{self, Launch};

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

fn expect_len(what: &str, len: usize, want: usize) -> Result {
    if len == want {
        Ok(())
    } else {
        Err(shape_error(format!(
            "{what}: {len} values, the shape needs {want}"
        )))
    }
}

fn expect_at_least(what: &str, len: usize, want: usize) -> Result {
    if len >= want {
        Ok(())
    } else {
        Err(shape_error(format!(
            "{what}: {len} values, the shape needs at least {want}"
        )))
    }
}

/// A size as the kernels' `int`.
fn int(what: &str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| shape_error(format!("{what} = {x} does not fit an int")))
}

/// A flat length as the kernels' `long long`.
fn long(what: &str, x: usize) -> Result<i64> {
    i64::try_from(x).map_err(|_| shape_error(format!("{what} = {x} does not fit a long long")))
}

fn name<T: Storage>(kernel: &str) -> String {
    format!("stride_{kernel}_{}", T::SUFFIX)
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
    expect_at_least("out", out.len(), out_min_len)?;
    expect_at_least("out", out.len(), config.threads() as usize)?;
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
    expect_len("out", out.len(), (9 * threads) as usize)?;
    expect_len("poison", poison.len(), blocks as usize)?;
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
    if t == 0 || c == 0 {
        return Err(shape_error(format!(
            "T = {t}, C = {c}: both must be at least 1"
        )));
    }
    let n = tokens.len();
    expect_len("out", out.len(), n * c)?;
    expect_at_least("wpe", wpe.len(), t.min(n) * c)?;
    let v = wte.len() / c;
    if let Some(bad) = tokens.iter().find(|&&tok| tok as usize >= v) {
        return Err(shape_error(format!("token {bad} is not below V = {v}")));
    }
    if n == 0 {
        return Ok(());
    }
    run(
        &name::<T>("embedding_forward"),
        launch::embedding_forward_launch(n, c),
        &[
            Arg::output(out),
            Arg::input(tokens),
            Arg::input(wte),
            Arg::input(wpe),
            Arg::I32(int("N", n)?),
            Arg::I32(int("T", t)?),
            Arg::I32(int("C", c)?),
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
    if c == 0 {
        return Err(shape_error("C must be at least 1".into()));
    }
    let n = order.len();
    expect_len("dout", dout.len(), n * c)?;
    let s = segment_tokens.len();
    expect_len("offsets", offsets.len(), s + 1)?;
    if offsets[0] != 0 || offsets[s] as usize != n || offsets.windows(2).any(|w| w[0] > w[1]) {
        return Err(shape_error(format!(
            "offsets must rise from 0 to N = {n}: {:?}..",
            &offsets[..offsets.len().min(8)]
        )));
    }
    if let Some(bad) = order.iter().find(|&&r| r as usize >= n) {
        return Err(shape_error(format!(
            "row {bad} in order is not below N = {n}"
        )));
    }
    // Strictly increasing: no two blocks write the same row of dwte.
    let v = dwte.len() / c;
    if segment_tokens.windows(2).any(|w| w[0] >= w[1])
        || segment_tokens.last().is_some_and(|&tok| tok as usize >= v)
    {
        return Err(shape_error(format!(
            "segment tokens must increase strictly and stay below V = {v}"
        )));
    }
    if s == 0 {
        return Ok(());
    }
    run(
        &name::<T>("token_embedding_backward"),
        launch::token_embedding_backward_launch(s, c),
        &[
            Arg::output(dwte),
            Arg::input(dout),
            Arg::input(order),
            Arg::input(offsets),
            Arg::input(segment_tokens),
            Arg::I32(int("C", c)?),
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
    if t == 0 || c == 0 || !dout.len().is_multiple_of(t * c) {
        return Err(shape_error(format!(
            "dout ({}) is not (B, T = {t}, C = {c})",
            dout.len()
        )));
    }
    let b = dout.len() / (t * c);
    expect_at_least("dwpe", dwpe.len(), t * c)?;
    run(
        &name::<T>("position_embedding_backward"),
        launch::position_embedding_backward_launch(t, c),
        &[
            Arg::output(dwpe),
            Arg::input(dout),
            Arg::I32(int("B", b)?),
            Arg::I32(int("T", t)?),
            Arg::I32(int("C", c)?),
        ],
    )
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
    let c = w.len();
    if c == 0 || !inp.len().is_multiple_of(c) {
        return Err(shape_error(format!(
            "inp ({}) is not (N, C = {c})",
            inp.len()
        )));
    }
    let n = inp.len() / c;
    expect_len("b", b.len(), c)?;
    expect_len("out", out.len(), n * c)?;
    expect_len("mean", mean.len(), n)?;
    expect_len("rstd", rstd.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    run(
        &name::<T>("layernorm_forward"),
        launch::layernorm_forward_launch(n, c),
        &[
            Arg::output(out),
            Arg::output(mean),
            Arg::output(rstd),
            Arg::input(inp),
            Arg::input(w),
            Arg::input(b),
            Arg::I32(int("N", n)?),
            Arg::I32(int("C", c)?),
        ],
    )
}

/// acc[j] += Σ_k partials[k·stride + at + j], blocks in order.
fn reduce_partials(
    acc: &mut [f32],
    partials: &[f32],
    blocks: usize,
    stride: usize,
    at: usize,
) -> Result {
    let w = acc.len();
    if blocks == 0 || w == 0 {
        return Ok(());
    }
    expect_at_least("partials", partials.len(), (blocks - 1) * stride + at + w)?;
    run(
        "stride_reduce_partials_f32",
        launch::reduce_partials_launch(w),
        &[
            Arg::output(acc),
            Arg::input(partials),
            Arg::I32(int("blocks", blocks)?),
            Arg::I32(int("stride", stride)?),
            Arg::I32(int("at", at)?),
            Arg::I32(int("W", w)?),
        ],
    )
}

/// LayerNorm backward: dinp (N, C) += ∂/∂x; dw (C) += Σ norm·dout and db
/// (C) += Σ dout over rows, through `partials` (at least
/// [`launch::partial_blocks`]`(N)` × 2C): per block of 32 rows, then the
/// blocks in order.
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
    let c = w.len();
    if c == 0 || !dout.len().is_multiple_of(c) {
        return Err(shape_error(format!(
            "dout ({}) is not (N, C = {c})",
            dout.len()
        )));
    }
    let n = dout.len() / c;
    expect_len("dinp", dinp.len(), n * c)?;
    expect_len("inp", inp.len(), n * c)?;
    expect_len("dw", dw.len(), c)?;
    expect_len("db", db.len(), c)?;
    expect_len("mean", mean.len(), n)?;
    expect_len("rstd", rstd.len(), n)?;
    let blocks = launch::partial_blocks(n);
    expect_at_least("partials", partials.len(), blocks * 2 * c)?;
    if n == 0 {
        return Ok(());
    }
    run(
        &name::<T>("layernorm_backward"),
        launch::layernorm_backward_launch(n, c),
        &[
            Arg::output(dinp),
            Arg::output(partials),
            Arg::input(dout),
            Arg::input(inp),
            Arg::input(w),
            Arg::input(mean),
            Arg::input(rstd),
            Arg::I32(int("N", n)?),
            Arg::I32(int("C", c)?),
        ],
    )?;
    reduce_partials(dw, partials, blocks, 2 * c, 0)?;
    reduce_partials(db, partials, blocks, 2 * c, c)
}

/// acc (W) += Σ rows of x (N, W), through `partials` (at least
/// [`launch::partial_blocks`]`(N)` × W): the CPU's blocks and order, so f32
/// gives the CPU's bits.
pub fn column_sums<T: Storage>(acc: &mut [f32], partials: &mut [f32], x: &[T]) -> Result {
    let w = acc.len();
    if w == 0 || !x.len().is_multiple_of(w) {
        return Err(shape_error(format!("x ({}) is not (N, W = {w})", x.len())));
    }
    let n = x.len() / w;
    let blocks = launch::partial_blocks(n);
    expect_at_least("partials", partials.len(), blocks * w)?;
    if n == 0 {
        return Ok(());
    }
    run(
        &name::<T>("column_sums"),
        launch::column_sums_launch(n, w),
        &[
            Arg::output(partials),
            Arg::input(x),
            Arg::I32(int("N", n)?),
            Arg::I32(int("W", w)?),
        ],
    )?;
    reduce_partials(acc, partials, blocks, w, 0)
}

// ---- elementwise --------------------------------------------------------------

/// GELU (tanh form): out = x·σ(2u), u = √(2/π)(x + 0.044715x³).
pub fn gelu_forward<T: Storage>(out: &mut [T], inp: &[T]) -> Result {
    expect_len("out", out.len(), inp.len())?;
    if inp.is_empty() {
        return Ok(());
    }
    run(
        &name::<T>("gelu_forward"),
        launch::gelu_launch(inp.len()),
        &[
            Arg::output(out),
            Arg::input(inp),
            Arg::I64(long("n", inp.len())?),
        ],
    )
}

/// GELU backward in place: d holds dout and becomes dinp; inp is the
/// forward's input.
pub fn gelu_backward<T: Storage>(d: &mut [T], inp: &[T]) -> Result {
    expect_len("d", d.len(), inp.len())?;
    if inp.is_empty() {
        return Ok(());
    }
    run(
        &name::<T>("gelu_backward"),
        launch::gelu_launch(inp.len()),
        &[
            Arg::output(d),
            Arg::input(inp),
            Arg::I64(long("n", inp.len())?),
        ],
    )
}

/// out = a + b, elementwise.
pub fn add<T: Storage>(out: &mut [T], a: &[T], b: &[T]) -> Result {
    expect_len("a", a.len(), out.len())?;
    expect_len("b", b.len(), out.len())?;
    if out.is_empty() {
        return Ok(());
    }
    let n = out.len();
    run(
        &name::<T>("add"),
        launch::elementwise_launch(n),
        &[
            Arg::output(out),
            Arg::input(a),
            Arg::input(b),
            Arg::I64(long("n", n)?),
        ],
    )
}

// ---- attention ------------------------------------------------------------------

/// The shape of one attention call (as stride-kernels' `Heads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    /// Sequences.
    pub b: usize,
    /// Positions per sequence.
    pub t: usize,
    /// Model width.
    pub c: usize,
    /// Heads (c / nh wide each).
    pub nh: usize,
}

impl Heads {
    /// The head size: C / NH.
    pub fn hs(&self) -> usize {
        self.c / self.nh.max(1)
    }

    fn check(&self) -> Result {
        let hs = self.hs();
        if self.b == 0 || self.t == 0 || self.nh == 0 || !self.c.is_multiple_of(self.nh) {
            return Err(shape_error(format!(
                "{self:?}: B, T, NH ≥ 1 and NH dividing C"
            )));
        }
        if !hs.is_multiple_of(8) || hs > 128 {
            return Err(shape_error(format!(
                "{self:?}: head size {hs} must be a multiple of 8, at most 128"
            )));
        }
        int("B·NH", self.b * self.nh)?;
        int("B·T·3C", self.b * self.t * 3 * self.c)?;
        Ok(())
    }

    fn ints(&self) -> [Arg; 3] {
        // Checked in `check`: all fit (they are below B·T·3C).
        [
            Arg::I32(self.t as i32),
            Arg::I32(self.c as i32),
            Arg::I32(self.nh as i32),
        ]
    }
}

/// Causal self-attention, flash style. qkv (B, T, 3C) holds [q | k | v]
/// per row; out (B, T, C) receives the heads side by side; lse (B, NH, T)
/// the log-sum-exp of each row's scaled scores (f32), for the backward.
pub fn attention_forward<T: Storage>(
    out: &mut [T],
    lse: &mut [f32],
    qkv: &[T],
    s: Heads,
) -> Result {
    s.check()?;
    expect_len("qkv", qkv.len(), s.b * s.t * 3 * s.c)?;
    expect_len("out", out.len(), s.b * s.t * s.c)?;
    expect_len("lse", lse.len(), s.b * s.nh * s.t)?;
    let [t, c, nh] = s.ints();
    run(
        &name::<T>("attention_forward"),
        launch::attention_forward_launch(s.b, s.t, s.c, s.nh),
        &[
            Arg::output(out),
            Arg::output(lse),
            Arg::input(qkv),
            t,
            c,
            nh,
        ],
    )
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
    s.check()?;
    expect_len("qkv", qkv.len(), s.b * s.t * 3 * s.c)?;
    expect_len("dqkv", dqkv.len(), s.b * s.t * 3 * s.c)?;
    expect_len("out", out.len(), s.b * s.t * s.c)?;
    expect_len("dout", dout.len(), s.b * s.t * s.c)?;
    expect_len("lse", lse.len(), s.b * s.nh * s.t)?;
    expect_len("dots", dots.len(), s.b * s.nh * s.t)?;
    let [t, c, nh] = s.ints();
    run(
        &name::<T>("attention_row_dots"),
        launch::attention_row_dots_launch(s.b, s.t, s.nh),
        &[
            Arg::output(dots),
            Arg::input(out),
            Arg::input(dout),
            Arg::I32(s.b as i32),
            t,
            c,
            nh,
        ],
    )?;
    run(
        &name::<T>("attention_backward_dkv"),
        launch::attention_backward_dkv_launch(s.b, s.t, s.c, s.nh),
        &[
            Arg::output(dqkv),
            Arg::input(qkv),
            Arg::input(dout),
            Arg::input(lse),
            Arg::input(dots),
            t,
            c,
            nh,
        ],
    )?;
    run(
        &name::<T>("attention_backward_dq"),
        launch::attention_backward_dq_launch(s.b, s.t, s.c, s.nh),
        &[
            Arg::output(dqkv),
            Arg::input(qkv),
            Arg::input(dout),
            Arg::input(lse),
            Arg::input(dots),
            t,
            c,
            nh,
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
    let rows = targets.len();
    if v == 0 {
        return Err(shape_error("V must be at least 1".into()));
    }
    expect_len("logits", logits.len(), rows * v)?;
    expect_len("row_loss", row_loss.len(), rows)?;
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= v) {
        return Err(shape_error(format!("target {bad} is not below V = {v}")));
    }
    if rows == 0 {
        return Ok(());
    }
    int("R·V", rows * v)?;
    run(
        "stride_cross_entropy_f32",
        launch::cross_entropy_launch(rows, v),
        &[
            Arg::output(logits),
            Arg::output(row_loss),
            Arg::input(targets),
            Arg::I32(int("V", v)?),
            Arg::F32(loss_scale),
            Arg::I32(i32::from(with_grad)),
        ],
    )
}

// ---- reductions and casts ---------------------------------------------------------

/// out[0] = Σ x², in two passes: per-block partials (at least
/// [`launch::sumsq_blocks`]`(N)` of them), then one block adds them in
/// order. The result depends on x alone.
pub fn sum_of_squares(out: &mut [f32], partials: &mut [f32], x: &[f32]) -> Result {
    expect_len("out", out.len(), 1)?;
    let blocks = launch::sumsq_blocks(x.len());
    expect_at_least("partials", partials.len(), blocks)?;
    run(
        "stride_sumsq_partials_f32",
        launch::sumsq_partials_launch(x.len()),
        &[
            Arg::output(partials),
            Arg::input(x),
            Arg::I64(long("n", x.len())?),
        ],
    )?;
    run(
        "stride_sumsq_final_f32",
        launch::sumsq_final_launch(blocks),
        &[
            Arg::output(out),
            Arg::input(partials),
            Arg::I32(int("blocks", blocks)?),
        ],
    )
}

/// f32 → bf16, round to nearest even (the compute weights' refresh).
pub fn cast_f32_to_bf16(out: &mut [Bf16], x: &[f32]) -> Result {
    expect_len("out", out.len(), x.len())?;
    if x.is_empty() {
        return Ok(());
    }
    run(
        "stride_cast_f32_to_bf16",
        launch::cast_launch(x.len()),
        &[
            Arg::output(out),
            Arg::input(x),
            Arg::I64(long("n", x.len())?),
        ],
    )
}

/// bf16 → f32 (exact).
pub fn cast_bf16_to_f32(out: &mut [f32], x: &[Bf16]) -> Result {
    expect_len("out", out.len(), x.len())?;
    if x.is_empty() {
        return Ok(());
    }
    run(
        "stride_cast_bf16_to_f32",
        launch::cast_launch(x.len()),
        &[
            Arg::output(out),
            Arg::input(x),
            Arg::I64(long("n", x.len())?),
        ],
    )
}
