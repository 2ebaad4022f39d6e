//! The fused engine's GPU step on the CPU, call for call: a [`Backend`]
//! whose kernels are the CUDA kernels of `stride-cuda-kernels` run by
//! their CPU emulator, and whose products follow the cuBLASLt contract of
//! `stride_cuda_kernels::matmul` (computed on the host). Storage `S` is
//! f32 or bf16, gradients and statistics f32 — what the CUDA backend holds
//! on the device. Only the driver calls (allocation, launches, cuBLASLt)
//! are not exercised; everything the engine asks of a GPU — which kernel,
//! on which buffers, in what order, with which shapes — is.
//!
//! Tests run the whole model's forward and backward and whole AdamW steps
//! on it against the CPU engine ([`super::backend::Cpu`]). It also trains
//! ([`Train`]): the optimizer step through the emulated sum of squares,
//! gradient factor and AdamW kernels, the bf16 compute weights refreshed by
//! the emulated cast — so the fused engine's training state
//! (`fused::Fused`) runs here exactly as it does on a GPU.

use std::ops::Range;

use stride_cuda_kernels::emu;
use stride_cuda_kernels::launch::{partial_blocks, sumsq_blocks};
use stride_cuda_kernels::matmul::{self, Gemm, Op};
use stride_cuda_kernels::{Bf16, Storage};
use stride_kernels::Heads;

use super::backend::{
    AttentionSizes, Backend, BackendError, Elem, Train, Update, UpdateError, host_copy, pair,
};

/// See the module doc.
#[derive(Debug, Default)]
pub struct Emulated<S> {
    /// One chunk of the LM head's logits (rows × V), f32.
    logits: Vec<f32>,
    /// The same chunk as `S`, the operand of the head's backward products.
    dlogits: Vec<S>,
    /// Each row's loss of the last head call.
    row_loss: Vec<f32>,
    /// The sum of squares' partial sums (the optimizer step's scratch).
    sumsq_partials: Vec<f32>,
}

fn emu_err(e: emu::EmuError) -> BackendError {
    BackendError(format!("emulated CUDA kernel: {e}"))
}

fn mm_err(e: matmul::MatmulError) -> BackendError {
    BackendError(e.to_string())
}

fn heads(s: Heads) -> stride_cuda_kernels::Heads {
    stride_cuda_kernels::Heads {
        b: s.b,
        t: s.t,
        c: s.c,
        nh: s.nh,
    }
}

impl<S: Storage + Elem> Backend for Emulated<S> {
    type A = S;
    type G = f32;
    super::backend::host_memory!();
    fn prepare(&mut self, n: usize, _c: usize, v: usize) -> Result<(), BackendError> {
        let rows = super::backend::HEAD_ROWS.min(n);
        self.logits = vec![0.0; rows * v];
        self.dlogits = vec![S::default(); rows * v];
        self.row_loss = vec![0.0; n];
        Ok(())
    }
    fn partials_len(n: usize, width: usize) -> usize {
        partial_blocks(n) * width
    }
    fn attention_sizes(s: Heads) -> AttentionSizes {
        // lse (B, NH, T) kept; the backward's row dots (B, NH, T) scratch.
        AttentionSizes {
            saved: s.b * s.nh * s.t,
            scratch: s.b * s.nh * s.t,
        }
    }
    fn embed_forward(
        &mut self,
        out: &mut [S],
        tokens: &[u32],
        wte: &[S],
        wpe: &[S],
        t: usize,
    ) -> Result<(), BackendError> {
        let c = out.len() / tokens.len().max(1);
        emu::embedding_forward(out, tokens, wte, wpe, t, c).map_err(emu_err)
    }
    fn token_embedding_backward(
        &mut self,
        dwte: &mut [f32],
        dout: &[S],
        tokens: &[u32],
        c: usize,
    ) -> Result<(), BackendError> {
        // The CUDA backend uploads these buckets (gpu::TokenBuckets).
        let (order, offsets, segments) = emu::bucket_tokens(tokens);
        emu::token_embedding_backward(dwte, dout, &order, &offsets, &segments, c).map_err(emu_err)
    }
    fn position_embedding_backward(
        &mut self,
        dwpe: &mut [f32],
        dout: &[S],
        t: usize,
        c: usize,
    ) -> Result<(), BackendError> {
        emu::position_embedding_backward(dwpe, dout, t, c).map_err(emu_err)
    }
    fn layernorm_forward(
        &mut self,
        out: &mut [S],
        mean: &mut [f32],
        rstd: &mut [f32],
        x: &[S],
        w: &[S],
        b: &[S],
    ) -> Result<(), BackendError> {
        emu::layernorm_forward(out, mean, rstd, x, w, b).map_err(emu_err)
    }
    fn layernorm_backward(
        &mut self,
        dx: &mut [S],
        dw: &mut [f32],
        db: &mut [f32],
        partials: &mut [f32],
        dout: &[S],
        x: &[S],
        w: &[S],
        mean: &[f32],
        rstd: &[f32],
    ) -> Result<(), BackendError> {
        emu::layernorm_backward(dx, dw, db, partials, dout, x, w, mean, rstd).map_err(emu_err)
    }
    fn linear_forward(
        &mut self,
        out: &mut [S],
        inp: &[S],
        w: &[S],
        b: &[S],
        residual: Option<&[S]>,
    ) -> Result<(), BackendError> {
        // out (N, OC) = inp (N, IC) · wᵀ + b (+ residual as C, beta 1).
        let oc = b.len();
        let ic = w.len() / oc.max(1);
        let n = inp.len() / ic.max(1);
        let mut g = Gemm::new(n, oc, ic, Op::N, Op::T);
        if residual.is_some() {
            g = g.scaled(1.0, 1.0);
        }
        matmul::host(&g, inp, w, residual, out, Some(b)).map_err(mm_err)
    }
    fn linear_backward(
        &mut self,
        dinp: &mut [S],
        dw: &mut [f32],
        db: &mut [f32],
        partials: &mut [f32],
        dout: &[S],
        inp: &[S],
        w: &[S],
    ) -> Result<(), BackendError> {
        let oc = db.len();
        let ic = w.len() / oc.max(1);
        let n = dout.len() / oc.max(1);
        // dinp (N, IC) = dout (N, OC) · w (OC, IC)
        let g = Gemm::new(n, ic, oc, Op::N, Op::N);
        matmul::host(&g, dout, w, None, dinp, None).map_err(mm_err)?;
        // dw (OC, IC) += doutᵀ · inp, in f32
        let g = Gemm::new(oc, ic, n, Op::T, Op::N).scaled(1.0, 1.0);
        matmul::host(&g, dout, inp, None, dw, None).map_err(mm_err)?;
        emu::column_sums(db, partials, dout).map_err(emu_err)
    }
    fn gelu_forward(&mut self, out: &mut [S], inp: &[S]) -> Result<(), BackendError> {
        emu::gelu_forward(out, inp).map_err(emu_err)
    }
    fn gelu_backward(&mut self, d: &mut [S], inp: &[S]) -> Result<(), BackendError> {
        emu::gelu_backward(d, inp).map_err(emu_err)
    }
    fn attention_forward(
        &mut self,
        out: &mut [S],
        saved: &mut [f32],
        _scratch: &mut [f32],
        qkv: &[S],
        shape: Heads,
    ) -> Result<(), BackendError> {
        let lse = &mut saved[..shape.b * shape.nh * shape.t];
        emu::attention_forward(out, lse, qkv, heads(shape)).map_err(emu_err)
    }
    fn attention_backward(
        &mut self,
        dqkv: &mut [S],
        scratch: &mut [f32],
        dout: &[S],
        out: &[S],
        saved: &[f32],
        qkv: &[S],
        shape: Heads,
    ) -> Result<(), BackendError> {
        let rows = shape.b * shape.nh * shape.t;
        emu::attention_backward(
            dqkv,
            &mut scratch[..rows],
            dout,
            out,
            &saved[..rows],
            qkv,
            heads(shape),
        )
        .map_err(emu_err)
    }
    fn head_cross_entropy(
        &mut self,
        x: &[S],
        wte: &[S],
        targets: &[u32],
        mut grad: Option<(&mut [S], &mut [f32])>,
        loss_scale: f64,
        head_rows: usize,
    ) -> Result<f64, BackendError> {
        let n = targets.len();
        let c = x.len() / n.max(1);
        let v = wte.len() / c.max(1);
        let chunk = head_rows.min(self.logits.len() / v.max(1)).max(1);
        for r0 in (0..n).step_by(chunk) {
            let rows = chunk.min(n - r0);
            let xr = &x[r0 * c..(r0 + rows) * c];
            let logits = &mut self.logits[..rows * v];
            // logits (rows, V) = x (rows, C) · wteᵀ, in f32
            let g = Gemm::new(rows, v, c, Op::N, Op::T);
            matmul::host(&g, xr, wte, None, logits, None).map_err(mm_err)?;
            emu::cross_entropy(
                logits,
                &mut self.row_loss[r0..r0 + rows],
                &targets[r0..r0 + rows],
                v,
                loss_scale as f32,
                grad.is_some(),
            )
            .map_err(emu_err)?;
            if let Some((dx, dwte)) = grad.as_mut() {
                let dl = &mut self.dlogits[..rows * v];
                for (d, l) in dl.iter_mut().zip(logits.iter()) {
                    *d = S::from_f32(*l);
                }
                // dx (rows, C) = dlogits (rows, V) · wte (V, C)
                let g = Gemm::new(rows, c, v, Op::N, Op::N);
                matmul::host(&g, dl, wte, None, &mut dx[r0 * c..(r0 + rows) * c], None)
                    .map_err(mm_err)?;
                // dwte (V, C) += dlogitsᵀ · x, in f32
                let g = Gemm::new(v, c, rows, Op::T, Op::N).scaled(1.0, 1.0);
                matmul::host(&g, dl, xr, None, dwte, None).map_err(mm_err)?;
            }
        }
        Ok(self.row_loss[..n].iter().map(|l| f64::from(*l)).sum())
    }
}

/// What training on the emulated backend needs of its storage type: the
/// weights its kernels read and their refresh — f32 reads the master
/// weights themselves, bf16 a copy the emulated cast refreshes.
pub trait EmuStorage: Storage + Elem {
    const COPIES: bool;
    fn weights<'a>(master: &'a [f32], copy: Option<&'a [Self]>)
    -> Result<&'a [Self], BackendError>;
    fn refresh(copy: &mut [Self], master: &[f32]) -> Result<(), BackendError>;
}

impl EmuStorage for f32 {
    const COPIES: bool = false;
    fn weights<'a>(master: &'a [f32], _: Option<&'a [f32]>) -> Result<&'a [f32], BackendError> {
        Ok(master)
    }
    fn refresh(_: &mut [f32], _: &[f32]) -> Result<(), BackendError> {
        Ok(())
    }
}

impl EmuStorage for Bf16 {
    const COPIES: bool = true;
    fn weights<'a>(_: &'a [f32], copy: Option<&'a [Bf16]>) -> Result<&'a [Bf16], BackendError> {
        copy.ok_or_else(|| BackendError("bf16 compute without a copy of the weights".into()))
    }
    fn refresh(copy: &mut [Bf16], master: &[f32]) -> Result<(), BackendError> {
        emu::cast_f32_to_bf16(copy, master).map_err(emu_err)
    }
}

/// The GPU's optimizer step, kernel for kernel (`cuda::CudaBackend`'s).
impl<S: EmuStorage> Train for Emulated<S> {
    const COPIES_WEIGHTS: bool = S::COPIES;
    const DECAY_MASK: bool = true;
    super::backend::host_train!();

    fn compute_weights<'a>(
        master: &'a Vec<f32>,
        copy: Option<&'a Vec<S>>,
    ) -> Result<&'a [S], BackendError> {
        S::weights(master, copy.map(Vec::as_slice))
    }
    fn refresh(&mut self, copy: &mut [S], master: &[f32]) -> Result<(), BackendError> {
        S::refresh(copy, master)
    }
    fn update(&mut self, u: Update<'_, Self>) -> Result<f64, UpdateError> {
        let decay = u
            .decay
            .ok_or_else(|| BackendError("the optimizer kernel reads a decay mask".into()))?;
        self.sumsq_partials.resize(sumsq_blocks(u.grad.len()), 0.0);
        let (mut sumsq, mut factor, mut norm) = ([0f32], [0f32], [0f32]);
        emu::sum_of_squares(&mut sumsq, &mut self.sumsq_partials, u.grad).map_err(emu_err)?;
        // A shard's sum of squares, summed over the ranks as the device's
        // would be (NCCL's in-place sum of the one value).
        if let Some(c) = u.across {
            c.all_reduce_sum(&mut sumsq)?;
        }
        let scale = 1.0 / u.micro_batches as f64;
        emu::grad_factor(&mut factor, &mut norm, &sumsq, scale, u.grad_clip).map_err(emu_err)?;
        emu::adamw(u.weights, u.m, u.v, u.grad, decay, &factor, u.k.into()).map_err(emu_err)?;
        Ok(f64::from(norm[0]))
    }
}
