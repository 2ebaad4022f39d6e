//! The fused engine's CPU kernels: one function per layer and direction,
//! in the order a step calls them, each with its shapes in its doc. They
//! write into buffers the caller owns and allocate nothing.
//!
//! Parallelism: row-wise kernels split rows over rayon's pool (each row is
//! computed by one thread, in one order, so the bits do not depend on the
//! thread count); reductions over rows (bias, LayerNorm and position
//! gradients) sum fixed blocks of [`BLOCK_ROWS`] rows into partial sums and
//! add the blocks in order. The products go to `gemm` (see `gemm.rs`).
//!
//! Vectorisation: the loops are plain Rust compiled, through
//! [`vectorized`], for the best instruction set the CPU has (AVX2+FMA or
//! AVX-512, detected at run time), so one binary runs everywhere and still
//! uses wide registers. Reductions keep [`LANES`] separate accumulators,
//! which is what lets the compiler vectorise them (it may not reorder one
//! float sum by itself).
//!
//! Its length (~700 lines) is one function per layer and direction, in
//! the order a step calls them.

use rayon::prelude::*;

use crate::gemm::{Threads, View, matmul};
use crate::real::Real;

/// Rows in one block of a column sum: fixed, so the blocks and the order
/// they are added in depend on the shape alone.
pub const BLOCK_ROWS: usize = 32;

/// Independent accumulators in a reduction (two AVX2 registers of f32).
const LANES: usize = 16;

/// Runs `f` compiled for the best vector instructions of this CPU.
#[inline(always)]
fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// Rows per parallel task for rows of `width` values (tasks of ~16 K values).
fn rows_per_task(width: usize) -> usize {
    (16 * 1024 / width.max(1)).max(1)
}

/// Number of [`BLOCK_ROWS`] blocks of `n` rows: the rows of a partial-sum
/// buffer for column sums.
pub fn blocks(n: usize) -> usize {
    n.div_ceil(BLOCK_ROWS)
}

#[inline(always)]
fn sum<T: Real>(x: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let mut chunks = x.chunks_exact(LANES);
    for ch in &mut chunks {
        for i in 0..LANES {
            acc[i] += ch[i];
        }
    }
    let mut s = T::zero();
    for a in acc {
        s += a;
    }
    for r in chunks.remainder() {
        s += *r;
    }
    s
}

#[inline(always)]
fn dot<T: Real>(x: &[T], y: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let mut xs = x.chunks_exact(LANES);
    let mut ys = y.chunks_exact(LANES);
    for (a, b) in (&mut xs).zip(&mut ys) {
        for i in 0..LANES {
            acc[i] += a[i] * b[i];
        }
    }
    let mut s = T::zero();
    for a in acc {
        s += a;
    }
    for (a, b) in xs.remainder().iter().zip(ys.remainder()) {
        s += *a * *b;
    }
    s
}

#[inline(always)]
fn max<T: Real>(x: &[T]) -> T {
    let mut acc = [T::neg_infinity(); LANES];
    let mut chunks = x.chunks_exact(LANES);
    for ch in &mut chunks {
        for i in 0..LANES {
            acc[i] = if ch[i] > acc[i] { ch[i] } else { acc[i] };
        }
    }
    let mut m = T::neg_infinity();
    for a in acc.into_iter().chain(chunks.remainder().iter().copied()) {
        m = if a > m { a } else { m };
    }
    m
}

/// x ← e^(x − shift) for every element; returns the sum of the results.
#[inline(always)]
fn exp_shifted_sum<T: Real>(x: &mut [T], shift: T) -> T {
    for v in x.iter_mut() {
        *v = (*v - shift).exp_fast();
    }
    sum(x)
}

// ---- embeddings -----------------------------------------------------------

/// out (N, C) = wte[tokens] + wpe[position], for sequences of T positions.
/// `tokens` (N) must be below V (the engine checks before calling).
pub fn embed_forward<T: Real>(out: &mut [T], tokens: &[u32], wte: &[T], wpe: &[T], t: usize) {
    let c = out.len() / tokens.len().max(1);
    out.par_chunks_mut(c)
        .zip(tokens.par_iter())
        .enumerate()
        .for_each(|(n, (row, &tok))| {
            let (tok, p) = (tok as usize, n % t);
            let (e, pos) = (&wte[tok * c..(tok + 1) * c], &wpe[p * c..(p + 1) * c]);
            for ((o, a), b) in row.iter_mut().zip(e).zip(pos) {
                *o = *a + *b;
            }
        });
}

/// dwte[tokens[n]] += dout[n] for every row, in row order (two rows may
/// share a token, so this stays on one thread: N·C additions).
pub fn token_embedding_backward<T: Real>(dwte: &mut [T], dout: &[T], tokens: &[u32], c: usize) {
    for (row, &tok) in dout.chunks_exact(c).zip(tokens) {
        let tok = tok as usize;
        for (d, g) in dwte[tok * c..(tok + 1) * c].iter_mut().zip(row) {
            *d += *g;
        }
    }
}

/// dwpe[p] += Σ_b dout[b, p]: dout is (B, T, C); positions in parallel,
/// sequences summed in order.
pub fn position_embedding_backward<T: Real>(dwpe: &mut [T], dout: &[T], t: usize, c: usize) {
    let b = dout.len() / (t * c).max(1);
    dwpe[..t * c]
        .par_chunks_mut(c)
        .enumerate()
        .for_each(|(p, d)| {
            for bi in 0..b {
                let row = &dout[(bi * t + p) * c..(bi * t + p + 1) * c];
                for (x, g) in d.iter_mut().zip(row) {
                    *x += *g;
                }
            }
        });
}

// ---- LayerNorm --------------------------------------------------------------

/// LayerNorm over rows of C (ε = 1e-5): out (N, C) = (x − mean)·rstd·w + b,
/// saving mean (N) and rstd (N) for the backward.
pub fn layernorm_forward<T: Real>(
    out: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
    inp: &[T],
    w: &[T],
    b: &[T],
) {
    let c = w.len();
    let per = rows_per_task(c);
    out.par_chunks_mut(per * c)
        .zip(mean.par_chunks_mut(per))
        .zip(rstd.par_chunks_mut(per))
        .enumerate()
        .for_each(|(task, ((o, m), s))| {
            vectorized(|| {
                for (r, orow) in o.chunks_exact_mut(c).enumerate() {
                    let i = task * per + r;
                    let x = &inp[i * c..(i + 1) * c];
                    let mu = sum(x) / T::of(c as f64);
                    let mut acc = [T::zero(); LANES];
                    let mut chunks = x.chunks_exact(LANES);
                    for ch in &mut chunks {
                        for l in 0..LANES {
                            let d = ch[l] - mu;
                            acc[l] += d * d;
                        }
                    }
                    let mut var = sum(&acc);
                    for v in chunks.remainder() {
                        var += (*v - mu) * (*v - mu);
                    }
                    let sd = T::one() / (var / T::of(c as f64) + T::of(1e-5)).sqrt();
                    for j in 0..c {
                        orow[j] = (x[j] - mu) * sd * w[j] + b[j];
                    }
                    m[r] = mu;
                    s[r] = sd;
                }
            })
        });
}

/// LayerNorm backward: dinp (N, C) += ∂/∂x; dw (C) += Σ norm·dout and
/// db (C) += Σ dout over rows, through `partials` (blocks(N) × 2C).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<T: Real>(
    dinp: &mut [T],
    dw: &mut [T],
    db: &mut [T],
    partials: &mut [T],
    dout: &[T],
    inp: &[T],
    w: &[T],
    mean: &[T],
    rstd: &[T],
) {
    let c = w.len();
    let n = dout.len() / c;
    let inv_c = T::one() / T::of(c as f64);
    dinp.par_chunks_mut(BLOCK_ROWS * c)
        .zip(partials[..blocks(n) * 2 * c].par_chunks_mut(2 * c))
        .enumerate()
        .for_each(|(blk, (dx, part))| {
            vectorized(|| {
                part.fill(T::zero());
                let (pw, pb) = part.split_at_mut(c);
                for (r, dxr) in dx.chunks_exact_mut(c).enumerate() {
                    let i = blk * BLOCK_ROWS + r;
                    let (x, g) = (&inp[i * c..(i + 1) * c], &dout[i * c..(i + 1) * c]);
                    let (mu, sd) = (mean[i], rstd[i]);
                    let mut a_dn = [T::zero(); LANES];
                    let mut a_dnn = [T::zero(); LANES];
                    let (mut dn_sum, mut dnn_sum) = (T::zero(), T::zero());
                    for j0 in (0..c).step_by(LANES) {
                        for l in 0..LANES.min(c - j0) {
                            let j = j0 + l;
                            let norm = (x[j] - mu) * sd;
                            let dn = w[j] * g[j];
                            a_dn[l] += dn;
                            a_dnn[l] += dn * norm;
                            pw[j] += norm * g[j];
                            pb[j] += g[j];
                        }
                    }
                    for l in 0..LANES {
                        dn_sum += a_dn[l];
                        dnn_sum += a_dnn[l];
                    }
                    let (dn_mean, dnn_mean) = (dn_sum * inv_c, dnn_sum * inv_c);
                    for j in 0..c {
                        let norm = (x[j] - mu) * sd;
                        dxr[j] += (w[j] * g[j] - dn_mean - norm * dnn_mean) * sd;
                    }
                }
            })
        });
    reduce_blocks(dw, partials, n, 2 * c, 0);
    reduce_blocks(db, partials, n, 2 * c, c);
}

/// acc[j] += Σ_blocks partials[blk][at + j], blocks in order.
fn reduce_blocks<T: Real>(acc: &mut [T], partials: &[T], n: usize, stride: usize, at: usize) {
    let nb = blocks(n);
    let per = 256;
    acc.par_chunks_mut(per).enumerate().for_each(|(task, a)| {
        let j0 = task * per;
        for blk in 0..nb {
            let p = &partials[blk * stride + at + j0..blk * stride + at + j0 + a.len()];
            for (x, y) in a.iter_mut().zip(p) {
                *x += *y;
            }
        }
    });
}

/// acc (W) += Σ rows of x (N, W), through `partials` (blocks(N) × W).
pub fn column_sums<T: Real>(acc: &mut [T], partials: &mut [T], x: &[T]) {
    let w = acc.len();
    let n = x.len() / w;
    partials[..blocks(n) * w]
        .par_chunks_mut(w)
        .zip(x.par_chunks(BLOCK_ROWS * w))
        .for_each(|(part, rows)| {
            vectorized(|| {
                part.copy_from_slice(&rows[..w]);
                for row in rows.chunks_exact(w).skip(1) {
                    for (p, v) in part.iter_mut().zip(row) {
                        *p += *v;
                    }
                }
            })
        });
    reduce_blocks(acc, partials, n, w, 0);
}

// ---- Linear layers ----------------------------------------------------------

/// out (N, OC) = inp (N, IC) · wᵀ + b (+ residual (N, OC) when given);
/// w is (OC, IC) as nn.Linear stores it.
pub fn linear_forward<T: Real>(out: &mut [T], inp: &[T], w: &[T], b: &[T], residual: Option<&[T]>) {
    let oc = b.len();
    let ic = w.len() / oc;
    let n = out.len() / oc;
    let per = rows_per_task(oc);
    out.par_chunks_mut(per * oc)
        .enumerate()
        .for_each(|(task, o)| {
            vectorized(|| {
                for (r, row) in o.chunks_exact_mut(oc).enumerate() {
                    match residual {
                        Some(res) => {
                            let i = task * per + r;
                            for ((x, a), bb) in
                                row.iter_mut().zip(&res[i * oc..(i + 1) * oc]).zip(b)
                            {
                                *x = *a + *bb;
                            }
                        }
                        None => row.copy_from_slice(b),
                    }
                }
            })
        });
    matmul(
        out,
        View::rows(n, oc),
        true,
        inp,
        View::rows(n, ic),
        w,
        View::rows(oc, ic).t(),
        T::one(),
        Threads::All,
    );
}

/// Linear backward: dinp (N, IC) ← dout · w (when wanted), dw (OC, IC) +=
/// doutᵀ · inp, db (OC) += Σ rows of dout (through `partials`).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward<T: Real>(
    dinp: Option<&mut [T]>,
    dw: &mut [T],
    db: &mut [T],
    partials: &mut [T],
    dout: &[T],
    inp: &[T],
    w: &[T],
) {
    let oc = db.len();
    let ic = w.len() / oc;
    let n = dout.len() / oc;
    if let Some(dinp) = dinp {
        matmul(
            dinp,
            View::rows(n, ic),
            false,
            dout,
            View::rows(n, oc),
            w,
            View::rows(oc, ic),
            T::one(),
            Threads::All,
        );
    }
    matmul(
        dw,
        View::rows(oc, ic),
        true,
        dout,
        View::rows(n, oc).t(),
        inp,
        View::rows(n, ic),
        T::one(),
        Threads::All,
    );
    column_sums(db, partials, dout);
}

// ---- GELU ---------------------------------------------------------------------

const GELU_K: f64 = 0.797_884_560_802_865_4; // √(2/π)
const GELU_A: f64 = 0.044_715;

/// GELU, tanh form: out = x·σ(2u) = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³).
pub fn gelu_forward<T: Real>(out: &mut [T], inp: &[T]) {
    let per = rows_per_task(1);
    out.par_chunks_mut(per)
        .zip(inp.par_chunks(per))
        .for_each(|(o, x)| {
            vectorized(|| {
                let (k2, a) = (T::of(-2.0 * GELU_K), T::of(GELU_A));
                for (y, &x) in o.iter_mut().zip(x) {
                    let u = x + a * x * x * x;
                    *y = x / (T::one() + (k2 * u).exp_fast());
                }
            })
        });
}

/// GELU backward in place: d holds dout and becomes dinp; inp is the
/// forward's input.
pub fn gelu_backward<T: Real>(d: &mut [T], inp: &[T]) {
    let per = rows_per_task(1);
    d.par_chunks_mut(per)
        .zip(inp.par_chunks(per))
        .for_each(|(d, x)| {
            vectorized(|| {
                let (k2, a, a3) = (T::of(-2.0 * GELU_K), T::of(GELU_A), T::of(3.0 * GELU_A));
                let two_k = T::of(2.0 * GELU_K);
                for (g, &x) in d.iter_mut().zip(x) {
                    let u = x + a * x * x * x;
                    let s = T::one() / (T::one() + (k2 * u).exp_fast()); // σ(2u)
                    let du = T::one() + a3 * x * x;
                    *g *= s + x * s * (T::one() - s) * two_k * du;
                }
            })
        });
}

/// out = a + b, elementwise.
pub fn add<T: Real>(out: &mut [T], a: &[T], b: &[T]) {
    let per = rows_per_task(1);
    out.par_chunks_mut(per)
        .zip(a.par_chunks(per).zip(b.par_chunks(per)))
        .for_each(|(o, (a, b))| {
            vectorized(|| {
                for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                    *o = *a + *b;
                }
            })
        });
}

// ---- causal self-attention ------------------------------------------------------

/// The shape of one attention call.
#[derive(Debug, Clone, Copy)]
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
    fn hs(&self) -> usize {
        self.c / self.nh
    }
    /// q, k or v (part 0, 1, 2) of head h of sequence bi inside qkv
    /// (B, T, 3C): a (T, hs) view.
    fn part(&self, bi: usize, h: usize, part: usize) -> View {
        let hs = self.hs();
        View::strided(
            self.t,
            hs,
            bi * self.t * 3 * self.c + part * self.c + h * hs,
            3 * self.c,
        )
    }
}

/// Causal self-attention. qkv (B, T, 3C) holds [q | k | v] per row; att
/// (B, NH, T, T) receives the softmax probabilities (0 above the diagonal,
/// kept for the backward); heads (B, NH, T, hs) is scratch; out (B, T, C)
/// receives the heads side by side.
pub fn attention_forward<T: Real>(
    out: &mut [T],
    att: &mut [T],
    heads: &mut [T],
    qkv: &[T],
    s: Heads,
) {
    let (t, hs) = (s.t, s.hs());
    let scale = T::one() / T::of(hs as f64).sqrt();
    att[..s.b * s.nh * t * t]
        .par_chunks_mut(t * t)
        .zip(heads[..s.b * s.nh * t * hs].par_chunks_mut(t * hs))
        .enumerate()
        .for_each(|(bh, (p, y))| {
            let (bi, h) = (bh / s.nh, bh % s.nh);
            // p = scale · q kᵀ   (T, T)
            let (q, k, v) = (s.part(bi, h, 0), s.part(bi, h, 1), s.part(bi, h, 2));
            matmul(
                p,
                View::rows(t, t),
                false,
                qkv,
                q,
                qkv,
                k.t(),
                scale,
                Threads::One,
            );
            vectorized(|| {
                for (i, row) in p.chunks_exact_mut(t).enumerate() {
                    let (seen, future) = row.split_at_mut(i + 1);
                    let m = max(seen);
                    let inv = T::one() / exp_shifted_sum(seen, m);
                    for x in seen.iter_mut() {
                        *x *= inv;
                    }
                    future.fill(T::zero());
                }
            });
            // y = p v   (T, hs)
            matmul(
                y,
                View::rows(t, hs),
                false,
                p,
                View::rows(t, t),
                qkv,
                v,
                T::one(),
                Threads::One,
            );
        });
    heads_to_rows(out, heads, s, 1, 0);
}

/// Copies head-major blocks (B, NH, parts, T, hs) — part `part` of each
/// — into their columns of rows (B, T, parts·C).
fn heads_to_rows<T: Real>(rows: &mut [T], heads: &[T], s: Heads, parts: usize, part: usize) {
    let (t, hs, c) = (s.t, s.hs(), s.c);
    rows[..s.b * t * parts * c]
        .par_chunks_mut(parts * c)
        .enumerate()
        .for_each(|(n, row)| {
            let (bi, ti) = (n / t, n % t);
            for h in 0..s.nh {
                let src = (((bi * s.nh + h) * parts + part) * t + ti) * hs;
                row[part * c + h * hs..part * c + (h + 1) * hs]
                    .copy_from_slice(&heads[src..src + hs]);
            }
        });
}

/// Causal self-attention backward. dout (B, T, C) is the gradient of the
/// forward's out; att and qkv are the forward's; dqkv (B, T, 3C) is
/// overwritten; datt (B, NH, T, T), heads (B, NH, T, hs) and dheads
/// (B, NH, 3, T, hs) are scratch.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Real>(
    dqkv: &mut [T],
    datt: &mut [T],
    heads: &mut [T],
    dheads: &mut [T],
    dout: &[T],
    att: &[T],
    qkv: &[T],
    s: Heads,
) {
    let (t, hs, c) = (s.t, s.hs(), s.c);
    let scale = T::one() / T::of(hs as f64).sqrt();
    // dy of every head, head-major: (B, NH, T, hs).
    heads[..s.b * s.nh * t * hs]
        .par_chunks_mut(t * hs)
        .enumerate()
        .for_each(|(bh, dy)| {
            let (bi, h) = (bh / s.nh, bh % s.nh);
            for (ti, d) in dy.chunks_exact_mut(hs).enumerate() {
                let src = (bi * t + ti) * c + h * hs;
                d.copy_from_slice(&dout[src..src + hs]);
            }
        });
    let heads = &*heads;
    datt[..s.b * s.nh * t * t]
        .par_chunks_mut(t * t)
        .zip(dheads[..s.b * s.nh * 3 * t * hs].par_chunks_mut(3 * t * hs))
        .enumerate()
        .for_each(|(bh, (dp, dqkv_h))| {
            let (bi, h) = (bh / s.nh, bh % s.nh);
            let (q, k, v) = (s.part(bi, h, 0), s.part(bi, h, 1), s.part(bi, h, 2));
            let p = &att[bh * t * t..(bh + 1) * t * t];
            let dy = &heads[bh * t * hs..(bh + 1) * t * hs];
            let (dq, rest) = dqkv_h.split_at_mut(t * hs);
            let (dk, dv) = rest.split_at_mut(t * hs);
            let (tt, th) = (View::rows(t, t), View::rows(t, hs));
            // dp = dy vᵀ;  dv = pᵀ dy
            matmul(dp, tt, false, dy, th, qkv, v.t(), T::one(), Threads::One);
            matmul(dv, th, false, p, tt.t(), dy, th, T::one(), Threads::One);
            // Softmax backward, scaled: ds = p ⊙ (dp − Σ_j p dp) · scale.
            vectorized(|| {
                for (i, (drow, prow)) in dp.chunks_exact_mut(t).zip(p.chunks_exact(t)).enumerate() {
                    let (seen, future) = drow.split_at_mut(i + 1);
                    let pr = &prow[..=i];
                    let inner = dot(seen, pr);
                    for (d, &pv) in seen.iter_mut().zip(pr) {
                        *d = pv * (*d - inner) * scale;
                    }
                    future.fill(T::zero());
                }
            });
            // dq = ds k;  dk = dsᵀ q
            matmul(dq, th, false, dp, tt, qkv, k, T::one(), Threads::One);
            matmul(dk, th, false, dp, tt.t(), qkv, q, T::one(), Threads::One);
        });
    for part in 0..3 {
        heads_to_rows(dqkv, dheads, s, 3, part);
    }
}

// ---- LM head and cross-entropy ------------------------------------------------

/// The gradient outputs of [`head_cross_entropy`].
#[derive(Debug)]
pub struct HeadGrad<'a, T> {
    /// (N, C): overwritten with ∂loss/∂x.
    pub dx: &'a mut [T],
    /// (V, C): ∂loss/∂wte added.
    pub dwte: &'a mut [T],
}

/// The tied LM head and the cross-entropy of `targets`, in chunks of rows
/// so that the (N, V) logits never exist at once: x (N, C) is the final
/// LayerNorm's output, wte (V, C) the token embedding, logits (R, V)
/// scratch (R rows per chunk), row_loss (N) receives each row's loss.
/// With `grad`, the loss differentiated is `loss_scale · Σ row losses`.
/// Returns Σ row losses.
pub fn head_cross_entropy<T: Real>(
    x: &[T],
    wte: &[T],
    targets: &[u32],
    logits: &mut [T],
    row_loss: &mut [f64],
    mut grad: Option<HeadGrad<'_, T>>,
    loss_scale: T,
) -> f64 {
    let n = targets.len();
    let c = x.len() / n.max(1);
    let v = wte.len() / c.max(1);
    let chunk = (logits.len() / v).max(1);
    for r0 in (0..n).step_by(chunk) {
        let rows = chunk.min(n - r0);
        let xr = View::strided(rows, c, r0 * c, c);
        let lv = View::rows(rows, v);
        matmul(
            logits,
            lv,
            false,
            x,
            xr,
            wte,
            View::rows(v, c).t(),
            T::one(),
            Threads::All,
        );
        let with_grad = grad.is_some();
        logits[..rows * v]
            .par_chunks_mut(v)
            .zip(row_loss[r0..r0 + rows].par_iter_mut())
            .zip(targets[r0..r0 + rows].par_iter())
            .for_each(|((l, loss), &target)| {
                vectorized(|| {
                    let target = target as usize;
                    let picked = l[target];
                    let m = max(l);
                    let total = exp_shifted_sum(l, m);
                    *loss = (m + total.ln() - picked).wide();
                    if with_grad {
                        // l holds e^(logit − max): softmax − one-hot, scaled.
                        let inv = loss_scale / total;
                        for p in l.iter_mut() {
                            *p *= inv;
                        }
                        l[target] -= loss_scale;
                    }
                })
            });
        if let Some(g) = grad.as_mut() {
            // dx = dlogits · wte;  dwte += dlogitsᵀ · x
            matmul(
                g.dx,
                xr,
                false,
                logits,
                lv,
                wte,
                View::rows(v, c),
                T::one(),
                Threads::All,
            );
            matmul(
                g.dwte,
                View::rows(v, c),
                true,
                logits,
                lv.t(),
                x,
                xr,
                T::one(),
                Threads::All,
            );
        }
    }
    row_loss[..n].iter().sum()
}
