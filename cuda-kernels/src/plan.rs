//! What a kernel call launches, decided once for both back ends: every
//! shape and length check, the launch configurations of [`crate::launch`],
//! the kernels' names and their argument lists. The emulator ([`crate::emu`])
//! and the GPU layer (`crate::gpu`, feature `cuda`) both turn a call into a
//! [`Plan`] here and differ only in how they run it, so a check, a launch
//! configuration or an argument order cannot drift apart between the two.
//!
//! A plan's buffers are numbered in the order the public function takes
//! them (the `buffers:` line of each function below); a step's
//! [`Param::Buf`] names one of them. An empty plan launches nothing (an
//! empty input).
//!
//! Index buffers (tokens, targets, token buckets) are checked through a
//! summary — the largest index, [`Buckets`] — that the emulator computes
//! from the host slice at the call and the GPU layer when it uploads them
//! (it cannot read device memory without waiting for the GPU).
//!
//! Its length (~730 lines before its tests) is one plan function per kernel,
//! each with its checks; the point is that they sit in one place.

use crate::launch::{self, Launch};
use stride_job::cuda_shapes::{HEAD_SIZE_STEP, MAX_HEAD_SIZE, head_size_ok};

/// A shape error's message.
pub(crate) type Checked<T = Plan> = Result<T, String>;

/// One argument of a kernel, as the kernel's parameter has it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Param {
    /// A pointer to buffer number `.0` of the call.
    Buf(usize),
    /// `int`.
    I32(i32),
    /// `long long`.
    I64(i64),
    /// `float`.
    F32(f32),
}

/// One launch: the kernel by its exported name, its configuration, its
/// arguments in the kernel's parameter order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Step {
    pub kernel: String,
    pub launch: Launch,
    pub params: Vec<Param>,
}

/// The launches of one call, in order (on one stream: each sees the
/// previous one's results).
pub(crate) type Plan = Vec<Step>;

fn step(kernel: String, launch: Launch, params: Vec<Param>) -> Step {
    Step {
        kernel,
        launch,
        params,
    }
}

fn name(kernel: &str, suffix: &str) -> String {
    format!("stride_{kernel}_{suffix}")
}

pub(crate) fn expect_len(what: &str, len: usize, want: usize) -> Checked<()> {
    if len == want {
        Ok(())
    } else {
        Err(format!("{what}: {len} values, the shape needs {want}"))
    }
}

pub(crate) fn expect_at_least(what: &str, len: usize, want: usize) -> Checked<()> {
    if len >= want {
        Ok(())
    } else {
        Err(format!(
            "{what}: {len} values, the shape needs at least {want}"
        ))
    }
}

/// A size as the kernels' `int`.
fn int(what: &str, x: usize) -> Checked<i32> {
    i32::try_from(x).map_err(|_| format!("{what} = {x} does not fit an int"))
}

/// A flat length as the kernels' `long long`.
fn long(what: &str, x: usize) -> Checked<i64> {
    i64::try_from(x).map_err(|_| format!("{what} = {x} does not fit a long long"))
}

/// The largest value of an index buffer (`None` when it is empty).
pub(crate) fn max_index(x: &[u32]) -> Option<u32> {
    x.iter().copied().max()
}

/// Every index (summarised by the largest) is below `v`.
fn indices_below(what: &str, max: Option<u32>, v: usize) -> Checked<()> {
    match max {
        Some(bad) if bad as usize >= v => Err(format!("{what} {bad} is not below V = {v}")),
        _ => Ok(()),
    }
}

// ---- embeddings -----------------------------------------------------------------

/// buffers: out, tokens, wte, wpe.
#[allow(clippy::too_many_arguments)]
pub(crate) fn embedding_forward(
    suffix: &str,
    out: usize,
    tokens: usize,
    max_token: Option<u32>,
    wte: usize,
    wpe: usize,
    t: usize,
    c: usize,
) -> Checked {
    if t == 0 || c == 0 {
        return Err(format!("T = {t}, C = {c}: both must be at least 1"));
    }
    let n = tokens;
    expect_len("out", out, n * c)?;
    expect_at_least("wpe", wpe, t.min(n) * c)?;
    indices_below("token", max_token, wte / c)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    Ok(vec![step(
        name("embedding_forward", suffix),
        launch::embedding_forward_launch(n, c),
        vec![
            Param::Buf(0),
            Param::Buf(1),
            Param::Buf(2),
            Param::Buf(3),
            Param::I32(int("N", n)?),
            Param::I32(int("T", t)?),
            Param::I32(int("C", c)?),
        ],
    )])
}

/// What the token-embedding backward needs to know of its buckets
/// ([`crate::bucket_tokens`]), checked by [`buckets`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Buckets {
    /// N: the rows `order` holds.
    pub rows: usize,
    /// S: the segments.
    pub segments: usize,
    /// The last (largest) segment token.
    pub last_token: Option<u32>,
}

/// Checks buckets: `offsets` (S + 1) rise from 0 to N = order.len(), every
/// row of `order` is below N, and the segment tokens increase strictly (so
/// no two blocks write one row of dwte).
pub(crate) fn buckets(order: &[u32], offsets: &[u32], segment_tokens: &[u32]) -> Checked<Buckets> {
    let n = order.len();
    let s = segment_tokens.len();
    expect_len("offsets", offsets.len(), s + 1)?;
    if offsets.first() != Some(&0)
        || offsets.last().map(|&o| o as usize) != Some(n)
        || offsets.windows(2).any(|w| w[0] > w[1])
    {
        return Err(format!(
            "offsets must rise from 0 to N = {n}: {:?}..",
            &offsets[..offsets.len().min(8)]
        ));
    }
    if let Some(bad) = order.iter().find(|&&r| r as usize >= n) {
        return Err(format!("row {bad} in order is not below N = {n}"));
    }
    if segment_tokens.windows(2).any(|w| w[0] >= w[1]) {
        return Err("segment tokens must increase strictly".into());
    }
    Ok(Buckets {
        rows: n,
        segments: s,
        last_token: segment_tokens.last().copied(),
    })
}

/// buffers: dwte, dout, order, offsets, segment_tokens.
pub(crate) fn token_embedding_backward(
    suffix: &str,
    dwte: usize,
    dout: usize,
    b: Buckets,
    c: usize,
) -> Checked {
    if c == 0 {
        return Err("C must be at least 1".into());
    }
    expect_len("dout", dout, b.rows * c)?;
    indices_below("segment token", b.last_token, dwte / c)?;
    if b.segments == 0 {
        return Ok(Vec::new());
    }
    Ok(vec![step(
        name("token_embedding_backward", suffix),
        launch::token_embedding_backward_launch(b.segments, c),
        vec![
            Param::Buf(0),
            Param::Buf(1),
            Param::Buf(2),
            Param::Buf(3),
            Param::Buf(4),
            Param::I32(int("C", c)?),
        ],
    )])
}

/// buffers: dwpe, dout.
pub(crate) fn position_embedding_backward(
    suffix: &str,
    dwpe: usize,
    dout: usize,
    t: usize,
    c: usize,
) -> Checked {
    if t == 0 || c == 0 || !dout.is_multiple_of(t * c) {
        return Err(format!("dout ({dout}) is not (B, T = {t}, C = {c})"));
    }
    let b = dout / (t * c);
    expect_at_least("dwpe", dwpe, t * c)?;
    Ok(vec![step(
        name("position_embedding_backward", suffix),
        launch::position_embedding_backward_launch(t, c),
        vec![
            Param::Buf(0),
            Param::Buf(1),
            Param::I32(int("B", b)?),
            Param::I32(int("T", t)?),
            Param::I32(int("C", c)?),
        ],
    )])
}

// ---- LayerNorm ----------------------------------------------------------------------

/// buffers: out, mean, rstd, inp, w, b.
pub(crate) fn layernorm_forward(
    suffix: &str,
    out: usize,
    mean: usize,
    rstd: usize,
    inp: usize,
    w: usize,
    b: usize,
) -> Checked {
    let c = w;
    if c == 0 || !inp.is_multiple_of(c) {
        return Err(format!("inp ({inp}) is not (N, C = {c})"));
    }
    let n = inp / c;
    expect_len("b", b, c)?;
    expect_len("out", out, n * c)?;
    expect_len("mean", mean, n)?;
    expect_len("rstd", rstd, n)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    Ok(vec![step(
        name("layernorm_forward", suffix),
        launch::layernorm_forward_launch(n, c),
        vec![
            Param::Buf(0),
            Param::Buf(1),
            Param::Buf(2),
            Param::Buf(3),
            Param::Buf(4),
            Param::Buf(5),
            Param::I32(int("N", n)?),
            Param::I32(int("C", c)?),
        ],
    )])
}

/// acc (buffer `acc`, `w` values) += Σ_k partials[k·stride + at + j]
/// (buffer `partials`), blocks in order; `None` when there is nothing to add.
fn reduce_partials(
    acc: (usize, usize),
    partials: (usize, usize),
    blocks: usize,
    stride: usize,
    at: usize,
) -> Checked<Option<Step>> {
    let (acc_buf, w) = acc;
    let (partials_buf, partials_len) = partials;
    if blocks == 0 || w == 0 {
        return Ok(None);
    }
    expect_at_least("partials", partials_len, (blocks - 1) * stride + at + w)?;
    Ok(Some(step(
        "stride_reduce_partials_f32".into(),
        launch::reduce_partials_launch(w),
        vec![
            Param::Buf(acc_buf),
            Param::Buf(partials_buf),
            Param::I32(int("blocks", blocks)?),
            Param::I32(int("stride", stride)?),
            Param::I32(int("at", at)?),
            Param::I32(int("W", w)?),
        ],
    )))
}

/// buffers: dinp, dw, db, partials, dout, inp, w, mean, rstd.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layernorm_backward(
    suffix: &str,
    dinp: usize,
    dw: usize,
    db: usize,
    partials: usize,
    dout: usize,
    inp: usize,
    w: usize,
    mean: usize,
    rstd: usize,
) -> Checked {
    let c = w;
    if c == 0 || !dout.is_multiple_of(c) {
        return Err(format!("dout ({dout}) is not (N, C = {c})"));
    }
    let n = dout / c;
    expect_len("dinp", dinp, n * c)?;
    expect_len("inp", inp, n * c)?;
    expect_len("dw", dw, c)?;
    expect_len("db", db, c)?;
    expect_len("mean", mean, n)?;
    expect_len("rstd", rstd, n)?;
    let blocks = launch::partial_blocks(n);
    expect_at_least("partials", partials, blocks * 2 * c)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut plan = vec![step(
        name("layernorm_backward", suffix),
        launch::layernorm_backward_launch(n, c),
        vec![
            Param::Buf(0),
            Param::Buf(3),
            Param::Buf(4),
            Param::Buf(5),
            Param::Buf(6),
            Param::Buf(7),
            Param::Buf(8),
            Param::I32(int("N", n)?),
            Param::I32(int("C", c)?),
        ],
    )];
    plan.extend(reduce_partials((1, dw), (3, partials), blocks, 2 * c, 0)?);
    plan.extend(reduce_partials((2, db), (3, partials), blocks, 2 * c, c)?);
    Ok(plan)
}

/// buffers: acc, partials, x.
pub(crate) fn column_sums(suffix: &str, acc: usize, partials: usize, x: usize) -> Checked {
    let w = acc;
    if w == 0 || !x.is_multiple_of(w) {
        return Err(format!("x ({x}) is not (N, W = {w})"));
    }
    let n = x / w;
    let blocks = launch::partial_blocks(n);
    expect_at_least("partials", partials, blocks * w)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut plan = vec![step(
        name("column_sums", suffix),
        launch::column_sums_launch(n, w),
        vec![
            Param::Buf(1),
            Param::Buf(2),
            Param::I32(int("N", n)?),
            Param::I32(int("W", w)?),
        ],
    )];
    plan.extend(reduce_partials((0, acc), (1, partials), blocks, w, 0)?);
    Ok(plan)
}

// ---- elementwise --------------------------------------------------------------------

/// buffers: out (or d, in place), inp. `kernel`: gelu_forward or gelu_backward.
pub(crate) fn gelu(kernel: &str, suffix: &str, out_name: &str, out: usize, inp: usize) -> Checked {
    expect_len(out_name, out, inp)?;
    if inp == 0 {
        return Ok(Vec::new());
    }
    Ok(vec![step(
        name(kernel, suffix),
        launch::gelu_launch(inp),
        vec![Param::Buf(0), Param::Buf(1), Param::I64(long("n", inp)?)],
    )])
}

/// buffers: out, a, b.
pub(crate) fn add(suffix: &str, out: usize, a: usize, b: usize) -> Checked {
    expect_len("a", a, out)?;
    expect_len("b", b, out)?;
    if out == 0 {
        return Ok(Vec::new());
    }
    Ok(vec![step(
        name("add", suffix),
        launch::elementwise_launch(out),
        vec![
            Param::Buf(0),
            Param::Buf(1),
            Param::Buf(2),
            Param::I64(long("n", out)?),
        ],
    )])
}

// ---- attention ------------------------------------------------------------------------

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

    fn check(&self) -> Checked<[Param; 3]> {
        let hs = self.hs();
        if self.b == 0 || self.t == 0 || self.nh == 0 || !self.c.is_multiple_of(self.nh) {
            return Err(format!("{self:?}: B, T, NH ≥ 1 and NH dividing C"));
        }
        if !head_size_ok(hs) {
            return Err(format!(
                "{self:?}: head size {hs} must be a multiple of {HEAD_SIZE_STEP}, at most \
                 {MAX_HEAD_SIZE}"
            ));
        }
        int("B·NH", self.b * self.nh)?;
        int("B·T·3C", self.b * self.t * 3 * self.c)?;
        // All fit: they are below B·T·3C.
        Ok([
            Param::I32(self.t as i32),
            Param::I32(self.c as i32),
            Param::I32(self.nh as i32),
        ])
    }
}

/// buffers: out, lse, qkv.
pub(crate) fn attention_forward(
    suffix: &str,
    out: usize,
    lse: usize,
    qkv: usize,
    s: Heads,
) -> Checked {
    let [t, c, nh] = s.check()?;
    expect_len("qkv", qkv, s.b * s.t * 3 * s.c)?;
    expect_len("out", out, s.b * s.t * s.c)?;
    expect_len("lse", lse, s.b * s.nh * s.t)?;
    Ok(vec![step(
        name("attention_forward", suffix),
        launch::attention_forward_launch(s.b, s.t, s.c, s.nh),
        vec![Param::Buf(0), Param::Buf(1), Param::Buf(2), t, c, nh],
    )])
}

/// buffers: dqkv, dots, dout, out, lse, qkv.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    suffix: &str,
    dqkv: usize,
    dots: usize,
    dout: usize,
    out: usize,
    lse: usize,
    qkv: usize,
    s: Heads,
) -> Checked {
    let [t, c, nh] = s.check()?;
    expect_len("qkv", qkv, s.b * s.t * 3 * s.c)?;
    expect_len("dqkv", dqkv, s.b * s.t * 3 * s.c)?;
    expect_len("out", out, s.b * s.t * s.c)?;
    expect_len("dout", dout, s.b * s.t * s.c)?;
    expect_len("lse", lse, s.b * s.nh * s.t)?;
    expect_len("dots", dots, s.b * s.nh * s.t)?;
    let tiles = |kernel: &str, launch: Launch| {
        step(
            name(kernel, suffix),
            launch,
            vec![
                Param::Buf(0),
                Param::Buf(5),
                Param::Buf(2),
                Param::Buf(4),
                Param::Buf(1),
                t,
                c,
                nh,
            ],
        )
    };
    Ok(vec![
        step(
            name("attention_row_dots", suffix),
            launch::attention_row_dots_launch(s.b, s.t, s.nh),
            vec![
                Param::Buf(1),
                Param::Buf(3),
                Param::Buf(2),
                Param::I32(s.b as i32),
                t,
                c,
                nh,
            ],
        ),
        tiles(
            "attention_backward_dkv",
            launch::attention_backward_dkv_launch(s.b, s.t, s.c, s.nh),
        ),
        tiles(
            "attention_backward_dq",
            launch::attention_backward_dq_launch(s.b, s.t, s.c, s.nh),
        ),
    ])
}

// ---- cross-entropy --------------------------------------------------------------------

/// buffers: logits, row_loss, targets.
pub(crate) fn cross_entropy(
    logits: usize,
    row_loss: usize,
    targets: usize,
    max_target: Option<u32>,
    v: usize,
    loss_scale: f32,
    with_grad: bool,
) -> Checked {
    let rows = targets;
    if v == 0 {
        return Err("V must be at least 1".into());
    }
    expect_len("logits", logits, rows * v)?;
    expect_len("row_loss", row_loss, rows)?;
    indices_below("target", max_target, v)?;
    if rows == 0 {
        return Ok(Vec::new());
    }
    int("R·V", rows * v)?;
    Ok(vec![step(
        "stride_cross_entropy_f32".into(),
        launch::cross_entropy_launch(rows, v),
        vec![
            Param::Buf(0),
            Param::Buf(1),
            Param::Buf(2),
            Param::I32(int("V", v)?),
            Param::F32(loss_scale),
            Param::I32(i32::from(with_grad)),
        ],
    )])
}

// ---- reductions and casts ----------------------------------------------------------------

/// buffers: out, partials, x.
pub(crate) fn sum_of_squares(out: usize, partials: usize, x: usize) -> Checked {
    expect_len("out", out, 1)?;
    let blocks = launch::sumsq_blocks(x);
    expect_at_least("partials", partials, blocks)?;
    Ok(vec![
        step(
            "stride_sumsq_partials_f32".into(),
            launch::sumsq_partials_launch(x),
            vec![Param::Buf(1), Param::Buf(2), Param::I64(long("n", x)?)],
        ),
        step(
            "stride_sumsq_final_f32".into(),
            launch::sumsq_final_launch(blocks),
            vec![
                Param::Buf(0),
                Param::Buf(1),
                Param::I32(int("blocks", blocks)?),
            ],
        ),
    ])
}

/// buffers: out, x. `kernel`: stride_cast_f32_to_bf16 or stride_cast_bf16_to_f32.
pub(crate) fn cast(kernel: &str, out: usize, x: usize) -> Checked {
    expect_len("out", out, x)?;
    if x == 0 {
        return Ok(Vec::new());
    }
    Ok(vec![step(
        kernel.into(),
        launch::cast_launch(x),
        vec![Param::Buf(0), Param::Buf(1), Param::I64(long("n", x)?)],
    )])
}

// ---- the optimizer step ------------------------------------------------------------------

/// The constants of one AdamW update, in f32, as `stride_adamw_f32` takes
/// them: the worker's `optim::Coefficients` field for field (computed
/// there, for update number t at learning rate lr; the kernel only
/// applies them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWCoefficients {
    /// β1.
    pub beta1: f32,
    /// 1 − β1.
    pub one_minus_beta1: f32,
    /// β2.
    pub beta2: f32,
    /// 1 − β2.
    pub one_minus_beta2: f32,
    /// lr / (1 − β1^t): bias correction of the first moment folded in.
    pub step_size: f32,
    /// √(1 − β2^t).
    pub bc2_sqrt: f32,
    /// ε.
    pub eps: f32,
    /// 1 − lr·weight_decay.
    pub shrink: f32,
}

/// buffers: w, m, v, grad, decay, factor.
pub(crate) fn adamw(
    w: usize,
    m: usize,
    v: usize,
    grad: usize,
    decay: usize,
    factor: usize,
    k: AdamWCoefficients,
) -> Checked {
    let n = w;
    expect_len("m", m, n)?;
    expect_len("v", v, n)?;
    expect_len("grad", grad, n)?;
    expect_len("decay", decay, n)?;
    expect_len("factor", factor, 1)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    Ok(vec![step(
        "stride_adamw_f32".into(),
        launch::adamw_launch(n),
        vec![
            Param::Buf(0),
            Param::Buf(1),
            Param::Buf(2),
            Param::Buf(3),
            Param::Buf(4),
            Param::Buf(5),
            Param::I64(long("n", n)?),
            Param::F32(k.beta1),
            Param::F32(k.one_minus_beta1),
            Param::F32(k.beta2),
            Param::F32(k.one_minus_beta2),
            Param::F32(k.step_size),
            Param::F32(k.bc2_sqrt),
            Param::F32(k.eps),
            Param::F32(k.shrink),
        ],
    )])
}

/// buffers: factor, norm, sumsq. `scale` (1 / the micro-batches over all
/// ranks) must be finite and positive; `max_norm` ≤ 0 disables clipping
/// (as the worker's `grad_clip = 0`), NaN is refused. The f32 constants
/// are rounded from f64 here as the composed engine's Candle ops round
/// theirs (`DeviceState::write_factor`): scale, max_norm and the product
/// max_norm·scale each rounded once.
pub(crate) fn grad_factor(
    factor: usize,
    norm: usize,
    sumsq: usize,
    scale: f64,
    max_norm: f64,
) -> Checked {
    expect_len("factor", factor, 1)?;
    expect_len("norm", norm, 1)?;
    expect_len("sumsq", sumsq, 1)?;
    if !(scale.is_finite() && scale > 0.0 && (scale as f32).is_normal()) {
        return Err(format!(
            "scale = {scale}: the averaging scale must be a positive normal f32"
        ));
    }
    if max_norm.is_nan() {
        return Err("max_norm is NaN (0 disables clipping)".into());
    }
    let clip = max_norm > 0.0;
    let (max_norm, clip_scale) = if clip {
        (max_norm as f32, (max_norm * scale) as f32)
    } else {
        (0.0, 0.0)
    };
    Ok(vec![step(
        "stride_grad_factor_f32".into(),
        launch::grad_factor_launch(),
        vec![
            Param::Buf(0),
            Param::Buf(1),
            Param::Buf(2),
            Param::F32(scale as f32),
            Param::I32(i32::from(clip)),
            Param::F32(max_norm),
            Param::F32(clip_scale),
        ],
    )])
}

#[cfg(test)]
mod tests {
    use super::*;
    use stride_job::cuda_shapes::{MAX_HEAD_ROWS, ModelShape, supports};

    /// Every plan names kernels the fatbin and the emulator hold, and only
    /// buffers the call has.
    #[test]
    fn plans_name_existing_kernels_and_buffers() {
        let s = Heads {
            b: 2,
            t: 33,
            c: 64,
            nh: 2,
        };
        let b = buckets(&[1, 0, 2], &[0, 2, 3], &[4, 9]).expect("buckets");
        let mut plans = Vec::new();
        for suffix in ["f32", "bf16"] {
            plans.push((4, embedding_forward(suffix, 8, 2, Some(3), 32, 8, 2, 4)));
            plans.push((5, token_embedding_backward(suffix, 40, 12, b, 4)));
            plans.push((2, position_embedding_backward(suffix, 8, 16, 2, 4)));
            plans.push((6, layernorm_forward(suffix, 12, 3, 3, 12, 4, 4)));
            plans.push((9, layernorm_backward(suffix, 12, 4, 4, 8, 12, 12, 4, 3, 3)));
            plans.push((3, column_sums(suffix, 4, 4, 12)));
            plans.push((2, gelu("gelu_forward", suffix, "out", 5, 5)));
            plans.push((2, gelu("gelu_backward", suffix, "d", 5, 5)));
            plans.push((3, add(suffix, 5, 5, 5)));
            plans.push((
                3,
                attention_forward(suffix, 2 * 33 * 64, 2 * 2 * 33, 2 * 33 * 192, s),
            ));
            plans.push((
                6,
                attention_backward(
                    suffix,
                    2 * 33 * 192,
                    2 * 2 * 33,
                    2 * 33 * 64,
                    2 * 33 * 64,
                    2 * 2 * 33,
                    2 * 33 * 192,
                    s,
                ),
            ));
        }
        plans.push((3, cross_entropy(6, 2, 2, Some(2), 3, 0.5, true)));
        plans.push((3, sum_of_squares(1, 1, 100)));
        plans.push((2, cast("stride_cast_f32_to_bf16", 3, 3)));
        plans.push((2, cast("stride_cast_bf16_to_f32", 3, 3)));
        let k = AdamWCoefficients {
            beta1: 0.9,
            one_minus_beta1: 0.1,
            beta2: 0.95,
            one_minus_beta2: 0.05,
            step_size: 1e-3,
            bc2_sqrt: 0.2,
            eps: 1e-8,
            shrink: 0.9999,
        };
        plans.push((6, adamw(7, 7, 7, 7, 7, 1, k)));
        plans.push((3, grad_factor(1, 1, 1, 0.25, 1.0)));
        let mut launched = std::collections::BTreeSet::new();
        for (buffers, plan) in plans {
            let plan = plan.expect("a valid call");
            assert!(!plan.is_empty());
            for step in plan {
                assert!(
                    crate::KERNEL_NAMES.contains(&step.kernel.as_str()),
                    "{step:?}"
                );
                assert!(step.launch.check().is_ok(), "{step:?}");
                for p in &step.params {
                    if let Param::Buf(i) = p {
                        assert!(*i < buffers, "{step:?}: buffer {i} of {buffers}");
                    }
                }
                launched.insert(step.kernel);
            }
        }
        // Between them the plans launch every kernel of the fatbin.
        let all: std::collections::BTreeSet<String> =
            crate::KERNEL_NAMES.iter().map(|k| k.to_string()).collect();
        assert_eq!(launched, all);
    }

    /// Every launch a step of shape `s` makes for attention (forward and
    /// backward) and the LM head's cross-entropy, planned and checked
    /// against the H100's launch limits: Ok where all of them would run.
    fn step_plans(s: &ModelShape) -> Checked<()> {
        let h = Heads {
            b: s.micro_batch,
            t: s.context,
            c: s.n_embd,
            nh: s.n_head,
        };
        let (n, c) = (h.b * h.t, h.c);
        let rows_of = |x: usize| x.saturating_mul(h.nh.max(1));
        let mut plans = vec![
            attention_forward("bf16", n * c, rows_of(h.b * h.t), n * 3 * c, h)?,
            attention_backward(
                "bf16",
                n * 3 * c,
                rows_of(h.b * h.t),
                n * c,
                n * c,
                rows_of(h.b * h.t),
                n * 3 * c,
                h,
            )?,
        ];
        let rows = n.min(MAX_HEAD_ROWS);
        plans.push(cross_entropy(
            rows * s.vocab_size,
            rows,
            rows,
            s.vocab_size.checked_sub(1).map(|t| t as u32),
            s.vocab_size,
            1.0,
            true,
        )?);
        for step in plans.iter().flatten() {
            step.launch.check()?;
        }
        Ok(())
    }

    /// `supports` accepts exactly the shapes whose step plans all run, and
    /// names the key to change for the others.
    #[test]
    fn supports_agrees_with_the_plans_and_names_the_key() {
        let gpt2 = ModelShape {
            n_head: 12,
            n_embd: 768,
            vocab_size: 50_304,
            context: 1024,
            micro_batch: 16,
        };
        let cases: [(ModelShape, Option<&str>); 14] = [
            (gpt2, None),
            (
                ModelShape {
                    micro_batch: 1,
                    ..gpt2
                },
                None,
            ),
            // GPT-2 XL (head size 64); the `tiny` preset (32); the worker's
            // test model (8, the smallest); head size 128.
            (
                ModelShape {
                    n_head: 25,
                    n_embd: 1600,
                    ..gpt2
                },
                None,
            ),
            (
                ModelShape {
                    n_head: 2,
                    n_embd: 64,
                    vocab_size: 128,
                    context: 64,
                    micro_batch: 16,
                },
                None,
            ),
            (
                ModelShape {
                    n_head: 2,
                    n_embd: 16,
                    vocab_size: 32,
                    context: 16,
                    micro_batch: 2,
                },
                None,
            ),
            (
                ModelShape {
                    n_head: 6,
                    n_embd: 768,
                    ..gpt2
                },
                None,
            ),
            // Head sizes 3 (the engine tests' awkward model), 12, 256; 5
            // heads do not divide 768.
            (
                ModelShape {
                    n_head: 3,
                    n_embd: 9,
                    vocab_size: 13,
                    context: 7,
                    micro_batch: 3,
                },
                Some("model.n_head"),
            ),
            (ModelShape { n_head: 64, ..gpt2 }, Some("model.n_head")),
            (
                ModelShape {
                    n_head: 6,
                    n_embd: 1536,
                    ..gpt2
                },
                Some("model.n_head"),
            ),
            (ModelShape { n_head: 5, ..gpt2 }, Some("model.n_head")),
            // 6,000 × 12 heads: 72,000 block rows; B·T·3C = 2.4 billion.
            (
                ModelShape {
                    micro_batch: 6000,
                    context: 8,
                    ..gpt2
                },
                Some("train.micro_batch"),
            ),
            (
                ModelShape {
                    micro_batch: 1000,
                    ..gpt2
                },
                Some("train.micro_batch"),
            ),
            // 256 rows of 10 million logits.
            (
                ModelShape {
                    vocab_size: 10_000_000,
                    ..gpt2
                },
                Some("model.vocab_size"),
            ),
            (
                ModelShape {
                    micro_batch: 0,
                    ..gpt2
                },
                Some("train.micro_batch"),
            ),
        ];
        for (shape, refused) in cases {
            let verdict = supports(&shape);
            assert_eq!(
                verdict.as_ref().err().map(|u| u.key),
                refused,
                "{shape:?}: {verdict:?}"
            );
            assert_eq!(
                verdict.is_ok(),
                step_plans(&shape).is_ok(),
                "{shape:?}: supports says {verdict:?}, the plans {:?}",
                step_plans(&shape)
            );
        }
        let e = supports(&ModelShape { n_head: 64, ..gpt2 }).expect_err("head size 12");
        for part in [
            "head size",
            "768 / 64 = 12",
            "multiples of 8 up to 128",
            "n_head = 6, 8, 12, 16 would",
        ] {
            assert!(e.to_string().contains(part), "{part:?} in {e}");
        }
    }

    #[test]
    fn indices_and_buckets_are_checked() {
        assert!(embedding_forward("f32", 8, 2, Some(8), 32, 8, 2, 4).is_err());
        assert!(cross_entropy(6, 2, 2, Some(3), 3, 1.0, false).is_err());
        assert!(
            buckets(&[0, 1], &[0, 1, 2], &[2, 2]).is_err(),
            "repeated token"
        );
        assert!(buckets(&[0, 2], &[0, 2], &[1]).is_err(), "row 2 of 2");
        assert!(
            buckets(&[0, 1], &[0, 1], &[1]).is_err(),
            "offsets end below N"
        );
        assert!(buckets(&[], &[], &[]).is_err(), "no offsets");
        let b = buckets(&[], &[0], &[]).expect("empty");
        assert_eq!(token_embedding_backward("f32", 8, 0, b, 4), Ok(Vec::new()));
        let b = buckets(&[0], &[0, 1], &[2]).expect("one row");
        assert!(
            token_embedding_backward("f32", 8, 4, b, 4).is_err(),
            "token 2 of V = 2"
        );
    }

    #[test]
    fn optimizer_step_arguments_are_checked() {
        let k = AdamWCoefficients {
            beta1: 0.9,
            one_minus_beta1: 0.1,
            beta2: 0.95,
            one_minus_beta2: 0.05,
            step_size: 1e-3,
            bc2_sqrt: 0.2,
            eps: 1e-8,
            shrink: 1.0,
        };
        // Every buffer n long but the factor, exactly one value.
        assert!(adamw(5, 5, 5, 5, 5, 1, k).is_ok());
        for (m, v, g, d, f) in [
            (4, 5, 5, 5, 1),
            (5, 6, 5, 5, 1),
            (5, 5, 4, 5, 1),
            (5, 5, 5, 4, 1),
            (5, 5, 5, 5, 0),
            (5, 5, 5, 5, 2),
        ] {
            assert!(adamw(5, m, v, g, d, f, k).is_err(), "{m} {v} {g} {d} {f}");
        }
        // n = 0: nothing to launch (the factor is still checked).
        assert_eq!(adamw(0, 0, 0, 0, 0, 1, k), Ok(Vec::new()));
        assert!(adamw(0, 0, 0, 0, 0, 0, k).is_err());
        // The grad factor's constants: f32 roundings of scale, max_norm
        // and their f64 product; max_norm ≤ 0 is no clipping.
        let plan = grad_factor(1, 1, 1, 1.0 / 3.0, 0.7).expect("valid");
        assert_eq!(
            plan[0].params[3..],
            [
                Param::F32((1.0f64 / 3.0) as f32),
                Param::I32(1),
                Param::F32(0.7f64 as f32),
                Param::F32((0.7f64 * (1.0 / 3.0)) as f32),
            ]
        );
        for off in [0.0, -1.0] {
            let plan = grad_factor(1, 1, 1, 0.5, off).expect("valid");
            assert_eq!(plan[0].params[4], Param::I32(0), "max_norm {off}");
        }
        for (scale, max_norm) in [
            (0.0, 1.0),
            (-0.5, 1.0),
            (f64::NAN, 1.0),
            (f64::INFINITY, 1.0),
            (1e-300, 1.0),
            (0.5, f64::NAN),
        ] {
            assert!(
                grad_factor(1, 1, 1, scale, max_norm).is_err(),
                "scale {scale}, max_norm {max_norm}"
            );
        }
        assert!(grad_factor(2, 1, 1, 0.5, 1.0).is_err());
        assert!(grad_factor(1, 0, 1, 0.5, 1.0).is_err());
        assert!(grad_factor(1, 1, 2, 0.5, 1.0).is_err());
    }
}
