//! The fused GPT: the whole model's forward and backward as a short
//! sequence of named layer calls, over activations and gradient scratch
//! allocated once, for the largest micro-batch, and reused every step — as
//! llm.c's `train_gpt2.c` does. Written once against [`Backend`]: the same
//! sequence runs on the CPU kernels of `stride-kernels` ([`Cpu`]) and on
//! the CUDA kernels of `stride-cuda-kernels` (their CPU emulation in tests,
//! the GPU with the `cuda` feature).
//!
//! Weights are read straight from the engine's flat weight buffer and
//! gradients added straight into its flat gradient buffer (both in
//! parameter-name order, see `stride_job::params`; the state is
//! `fused.rs`'s), so there is no copy between the model and the optimiser
//! and nothing the size of an activation is allocated after construction.
//!
//! What is kept for the backward, per block: the block's input, both
//! LayerNorm outputs with their mean and 1/σ, qkv, what attention saves
//! (the CPU: the probabilities (B, NH, T, T); the CUDA kernels: the
//! log-sum-exp of each row, (B, NH, T)), the attention output, the
//! residual after attention, and the MLP's pre- and post-GELU activations.
//! The backward needs one block's worth of gradient scratch, reused block
//! after block. The LM head never holds the (B·T, V) logits (see
//! [`Backend::head_cross_entropy`]).
//!
//! Its length (~750 lines) is the model's: forward and backward are read
//! together, layer against layer, and split they could not be.

use std::ops::Range;

use stride_job::config::ModelConfig;
use stride_job::params::Slot;

use stride_kernels::{Heads, Real};

pub use super::backend::HEAD_ROWS;
use super::backend::{Backend, BackendError, Cpu};

/// Input the fused model refuses (the trainer checked the config; these
/// guard against a plan or a token file that disagrees with it).
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(
        "a micro-batch of {b} sequences of {t} tokens does not fit the engine's buffers ({max_b} sequences of {context})"
    )]
    TooLarge {
        b: usize,
        t: usize,
        max_b: usize,
        context: usize,
    },
    #[error("{inputs} input tokens and {targets} targets for {b} sequences of {t}")]
    Length {
        inputs: usize,
        targets: usize,
        b: usize,
        t: usize,
    },
    #[error(
        "token id {token} at position {position} of the micro-batch is not below model.vocab_size = {vocab}: the token file does not belong to this model"
    )]
    Token {
        token: u32,
        position: usize,
        vocab: usize,
    },
    #[error("the model has no parameter {0} (layout and engine disagree)")]
    Layout(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// A LayerNorm's gain and bias in the flat buffer.
#[derive(Debug, Clone)]
struct NormParams {
    w: Range<usize>,
    b: Range<usize>,
}

/// A Linear layer's weight (out, in) and bias in the flat buffer.
#[derive(Debug, Clone)]
struct LinearParams {
    w: Range<usize>,
    b: Range<usize>,
}

/// Where each parameter of one block lies in the flat buffer.
#[derive(Debug, Clone)]
struct BlockParams {
    ln_1: NormParams,
    c_attn: LinearParams,
    attn_proj: LinearParams,
    ln_2: NormParams,
    c_fc: LinearParams,
    mlp_proj: LinearParams,
}

/// Where every parameter lies in the flat buffer (by name, from the layout).
#[derive(Debug, Clone)]
struct ParamIndex {
    wte: Range<usize>,
    wpe: Range<usize>,
    ln_f: NormParams,
    blocks: Vec<BlockParams>,
}

impl ParamIndex {
    fn new(slots: &[Slot], n_layer: usize) -> Result<ParamIndex, BatchError> {
        let find = |name: String| {
            slots
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.offset..s.offset + s.len)
                .ok_or(BatchError::Layout(name))
        };
        let norm = |prefix: &str| -> Result<NormParams, BatchError> {
            Ok(NormParams {
                w: find(format!("{prefix}.weight"))?,
                b: find(format!("{prefix}.bias"))?,
            })
        };
        let linear = |prefix: &str| -> Result<LinearParams, BatchError> {
            Ok(LinearParams {
                w: find(format!("{prefix}.weight"))?,
                b: find(format!("{prefix}.bias"))?,
            })
        };
        let blocks = (0..n_layer)
            .map(|i| {
                let p = format!("transformer.h.{i}");
                Ok(BlockParams {
                    ln_1: norm(&format!("{p}.ln_1"))?,
                    c_attn: linear(&format!("{p}.attn.c_attn"))?,
                    attn_proj: linear(&format!("{p}.attn.c_proj"))?,
                    ln_2: norm(&format!("{p}.ln_2"))?,
                    c_fc: linear(&format!("{p}.mlp.c_fc"))?,
                    mlp_proj: linear(&format!("{p}.mlp.c_proj"))?,
                })
            })
            .collect::<Result<_, BatchError>>()?;
        Ok(ParamIndex {
            wte: find("transformer.wte.weight".into())?,
            wpe: find("transformer.wpe.weight".into())?,
            ln_f: norm("transformer.ln_f")?,
            blocks,
        })
    }
}

/// What [`Gpt::forward_backward_ready`] calls with a block's parameters and
/// their finished gradient.
pub type Ready<'a, B> = dyn FnMut(&B, Range<usize>, <B as Backend>::View<'_, <B as Backend>::G>) -> Result<(), BackendError>
    + 'a;

/// The flat range a block's parameters span (contiguous in the layout).
fn block_range(b: &BlockParams) -> Range<usize> {
    let all = [
        &b.ln_1.w,
        &b.ln_1.b,
        &b.c_attn.w,
        &b.c_attn.b,
        &b.attn_proj.w,
        &b.attn_proj.b,
        &b.ln_2.w,
        &b.ln_2.b,
        &b.c_fc.w,
        &b.c_fc.b,
        &b.mlp_proj.w,
        &b.mlp_proj.b,
    ];
    let start = all.iter().map(|r| r.start).min().unwrap_or(0);
    let end = all.iter().map(|r| r.end).max().unwrap_or(0);
    start..end
}

/// A LayerNorm's output, with the statistics its backward needs, for up
/// to N rows of C.
#[derive(Debug)]
struct NormActs<B: Backend> {
    out: B::Buf<B::A>,  // (N, C)
    mean: B::Buf<B::G>, // (N)
    rstd: B::Buf<B::G>, // (N)
    c: usize,
}

impl<B: Backend> NormActs<B> {
    fn new(be: &mut B, n: usize, c: usize) -> Result<NormActs<B>, BackendError> {
        Ok(NormActs {
            out: be.alloc(n * c)?,
            mean: be.alloc(n)?,
            rstd: be.alloc(n)?,
            c,
        })
    }

    /// The output's first `n` rows.
    fn out(&self, n: usize) -> B::View<'_, B::A> {
        B::part(&self.out, 0..n * self.c)
    }

    /// out = LayerNorm(x) over the n rows of x.
    fn forward(
        &mut self,
        be: &mut B,
        w: &B::View<'_, B::A>,
        p: &NormParams,
        x: B::View<'_, B::A>,
        n: usize,
    ) -> Result<(), BackendError> {
        be.layernorm_forward(
            B::part_mut(&mut self.out, 0..n * self.c),
            B::part_mut(&mut self.mean, 0..n),
            B::part_mut(&mut self.rstd, 0..n),
            x,
            B::sub(w, p.w.clone()),
            B::sub(w, p.b.clone()),
        )
    }

    /// dx += the gradient through this norm of dout (its forward read x);
    /// the gain's and bias's gradients added into `grad`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        be: &mut B,
        w: &B::View<'_, B::A>,
        p: &NormParams,
        grad: &mut B::ViewMut<'_, B::G>,
        partials: &mut B::Buf<B::G>,
        dx: B::ViewMut<'_, B::A>,
        dout: B::View<'_, B::A>,
        x: B::View<'_, B::A>,
        n: usize,
    ) -> Result<(), BackendError> {
        let (dw, db) = B::pair_mut(grad, p.w.clone(), p.b.clone());
        be.layernorm_backward(
            dx,
            dw,
            db,
            B::view_mut(partials),
            dout,
            x,
            B::sub(w, p.w.clone()),
            B::part(&self.mean, 0..n),
            B::part(&self.rstd, 0..n),
        )
    }
}

impl LinearParams {
    /// out (N, OC) = inp (N, IC) · wᵀ + b (+ residual).
    fn forward<B: Backend>(
        &self,
        be: &mut B,
        w: &B::View<'_, B::A>,
        out: B::ViewMut<'_, B::A>,
        inp: B::View<'_, B::A>,
        residual: Option<B::View<'_, B::A>>,
    ) -> Result<(), BackendError> {
        be.linear_forward(
            out,
            inp,
            B::sub(w, self.w.clone()),
            B::sub(w, self.b.clone()),
            residual,
        )
    }

    /// dinp ← dout · w; the weight's and bias's gradients added into `grad`.
    #[allow(clippy::too_many_arguments)]
    fn backward<B: Backend>(
        &self,
        be: &mut B,
        w: &B::View<'_, B::A>,
        grad: &mut B::ViewMut<'_, B::G>,
        partials: &mut B::Buf<B::G>,
        dinp: B::ViewMut<'_, B::A>,
        dout: B::View<'_, B::A>,
        inp: B::View<'_, B::A>,
    ) -> Result<(), BackendError> {
        let (dw, db) = B::pair_mut(grad, self.w.clone(), self.b.clone());
        be.linear_backward(
            dinp,
            dw,
            db,
            B::view_mut(partials),
            dout,
            inp,
            B::sub(w, self.w.clone()),
        )
    }
}

/// What one block keeps from its forward for its backward. Shapes for N =
/// B·T rows.
#[derive(Debug)]
struct BlockActs<B: Backend> {
    ln_1: NormActs<B>,
    qkv: B::Buf<B::A>,  // (N, 3C)
    att: B::Buf<B::G>,  // what attention saves (Backend::attention_sizes)
    atty: B::Buf<B::A>, // (N, C)
    res2: B::Buf<B::A>, // (N, C): block input + attention
    ln_2: NormActs<B>,
    fc: B::Buf<B::A>,   // (N, 4C): before GELU
    gelu: B::Buf<B::A>, // (N, 4C)
}

/// Gradient scratch, reused block after block.
#[derive(Debug)]
struct Scratch<B: Backend> {
    dres: B::Buf<B::A>,      // (N, C): gradient of the residual stream
    dln: B::Buf<B::A>,       // (N, C): gradient of a LayerNorm output
    datty: B::Buf<B::A>,     // (N, C)
    dqkv: B::Buf<B::A>,      // (N, 3C)
    dfc: B::Buf<B::A>,       // (N, 4C)
    attention: B::Buf<B::G>, // attention's scratch (Backend::attention_sizes)
    partials: B::Buf<B::G>,  // column-sum partials for rows of up to 4C
}

/// A GPT whose forward and backward run layer by layer on a [`Backend`];
/// see the module doc.
#[derive(Debug)]
pub struct Gpt<B: Backend> {
    backend: B,
    config: ModelConfig,
    max_batch: usize,
    /// Rows of logits per chunk of the LM head.
    head_rows: usize,
    index: ParamIndex,
    /// The residual stream entering each block, and (last) leaving the
    /// final block: n_layer + 1 of (N, C).
    res: Vec<B::Buf<B::A>>,
    blocks: Vec<BlockActs<B>>,
    ln_f: NormActs<B>,
    scratch: Scratch<B>,
}

/// The fused engine on the CPU kernels, in `T` (f32 to train, f64 for
/// gradient checks).
pub type FusedGpt<T> = Gpt<Cpu<T>>;

impl<T: Real + super::backend::Elem> Gpt<Cpu<T>> {
    /// A model on the CPU kernels; see [`Gpt::on`].
    pub fn new(
        config: &ModelConfig,
        slots: &[Slot],
        max_batch: usize,
    ) -> Result<FusedGpt<T>, BatchError> {
        Gpt::on(Cpu::default(), config, slots, max_batch)
    }

    /// Each row's loss of the last [`Gpt::loss`] call: row p of sequence b
    /// at `b·T + p` (a test reads one position's cross-entropy).
    pub fn row_losses(&self) -> &[f64] {
        self.backend.row_losses()
    }

    /// The logits (V) at `position` of one sequence of T token ids, into
    /// `out`, for sampling: the training forward through the final
    /// LayerNorm, then that row times the (tied) token embedding. Tokens
    /// after `position` do not change them (causal attention), so a prompt
    /// shorter than the context is padded with any token.
    pub fn logits_at(
        &mut self,
        w: &[T],
        inputs: &[u32],
        position: usize,
        out: &mut [T],
    ) -> Result<(), BatchError> {
        let (t, c, v) = (
            self.config.context,
            self.config.n_embd,
            self.config.vocab_size,
        );
        let b = self.check(inputs, inputs)?;
        if b != 1 || position >= t || out.len() != v {
            return Err(BatchError::Length {
                inputs: inputs.len(),
                targets: out.len(),
                b,
                t,
            });
        }
        self.forward(&w, inputs, 1)?;
        let x = &self.ln_f.out[position * c..(position + 1) * c];
        let wte = &w[self.index.wte.clone()];
        for (o, row) in out.iter_mut().zip(wte.chunks_exact(c)) {
            *o = x
                .iter()
                .zip(row)
                .fold(T::zero(), |acc, (a, b)| acc + *a * *b);
        }
        Ok(())
    }
}

impl<B: Backend> Gpt<B> {
    /// A model for micro-batches of up to `max_batch` sequences on
    /// `backend`, with every buffer a step needs. `slots` is the layout of
    /// the weights it will be handed.
    pub fn on(
        mut backend: B,
        config: &ModelConfig,
        slots: &[Slot],
        max_batch: usize,
    ) -> Result<Gpt<B>, BatchError> {
        let (b, t, c, nh, v) = (
            max_batch.max(1),
            config.context,
            config.n_embd,
            config.n_head,
            config.vocab_size,
        );
        let n = b * t;
        let be = &mut backend;
        let att = B::attention_sizes(Heads { b, t, c, nh });
        let blocks = (0..config.n_layer)
            .map(|_| {
                Ok(BlockActs {
                    ln_1: NormActs::new(be, n, c)?,
                    qkv: be.alloc(3 * n * c)?,
                    att: be.alloc(att.saved)?,
                    atty: be.alloc(n * c)?,
                    res2: be.alloc(n * c)?,
                    ln_2: NormActs::new(be, n, c)?,
                    fc: be.alloc(4 * n * c)?,
                    gelu: be.alloc(4 * n * c)?,
                })
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        let res = (0..=config.n_layer)
            .map(|_| be.alloc(n * c))
            .collect::<Result<Vec<_>, BackendError>>()?;
        let ln_f = NormActs::new(be, n, c)?;
        let scratch = Scratch {
            dres: be.alloc(n * c)?,
            dln: be.alloc(n * c)?,
            datty: be.alloc(n * c)?,
            dqkv: be.alloc(3 * n * c)?,
            dfc: be.alloc(4 * n * c)?,
            attention: be.alloc(att.scratch)?,
            partials: be.alloc(B::partials_len(n, 4 * c))?,
        };
        be.prepare(n, c, v)?;
        Ok(Gpt {
            index: ParamIndex::new(slots, config.n_layer)?,
            config: config.clone(),
            max_batch: b,
            head_rows: HEAD_ROWS.min(n),
            res,
            blocks,
            ln_f,
            scratch,
            backend,
        })
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, to allocate, upload and read buffers of its own (the
    /// weights and gradients the model is handed, on a device).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Computes the LM head `rows` rows at a time (tests use chunks that do
    /// not divide the batch; the default is [`HEAD_ROWS`]).
    pub fn set_head_rows(&mut self, rows: usize) {
        let n = self.max_batch * self.config.context;
        self.head_rows = rows.clamp(1, HEAD_ROWS.min(n));
    }

    /// The number of sequences in `inputs`, after checking the micro-batch
    /// against the buffers and every token against the vocabulary.
    fn check(&self, inputs: &[u32], targets: &[u32]) -> Result<usize, BatchError> {
        let (t, v) = (self.config.context, self.config.vocab_size);
        let b = inputs.len() / t;
        if inputs.len() != targets.len() || inputs.len() != b * t || b == 0 {
            return Err(BatchError::Length {
                inputs: inputs.len(),
                targets: targets.len(),
                b,
                t,
            });
        }
        if b > self.max_batch {
            return Err(BatchError::TooLarge {
                b,
                t,
                max_b: self.max_batch,
                context: t,
            });
        }
        if let Some((position, &token)) = inputs
            .iter()
            .chain(targets)
            .enumerate()
            .find(|(_, tok)| **tok as usize >= v)
        {
            return Err(BatchError::Token {
                token,
                position: position % inputs.len(),
                vocab: v,
            });
        }
        Ok(b)
    }

    /// Forward through the final LayerNorm for `b` sequences of `inputs`
    /// (B·T token ids), keeping what the backward needs.
    fn forward(
        &mut self,
        w: &B::View<'_, B::A>,
        inputs: &[u32],
        b: usize,
    ) -> Result<(), BatchError> {
        let (t, c, nh) = (self.config.context, self.config.n_embd, self.config.n_head);
        let n = b * t;
        let p = &self.index;
        let be = &mut self.backend;
        let s = &mut self.scratch;
        // x = wte[tokens] + wpe[positions]
        be.embed_forward(
            B::part_mut(&mut self.res[0], 0..n * c),
            inputs,
            B::sub(w, p.wte.clone()),
            B::sub(w, p.wpe.clone()),
            t,
        )?;
        for (l, (a, bp)) in self.blocks.iter_mut().zip(&p.blocks).enumerate() {
            let (done, next) = self.res.split_at_mut(l + 1);
            let x = || B::part(&done[l], 0..n * c);
            // res2 = x + c_proj(attention(c_attn(ln_1(x))))
            a.ln_1.forward(be, w, &bp.ln_1, x(), n)?;
            bp.c_attn.forward(
                be,
                w,
                B::part_mut(&mut a.qkv, 0..3 * n * c),
                a.ln_1.out(n),
                None,
            )?;
            be.attention_forward(
                B::part_mut(&mut a.atty, 0..n * c),
                B::view_mut(&mut a.att),
                B::view_mut(&mut s.attention),
                B::part(&a.qkv, 0..3 * n * c),
                Heads { b, t, c, nh },
            )?;
            bp.attn_proj.forward(
                be,
                w,
                B::part_mut(&mut a.res2, 0..n * c),
                B::part(&a.atty, 0..n * c),
                Some(x()),
            )?;
            // out = res2 + c_proj(gelu(c_fc(ln_2(res2))))
            a.ln_2
                .forward(be, w, &bp.ln_2, B::part(&a.res2, 0..n * c), n)?;
            bp.c_fc.forward(
                be,
                w,
                B::part_mut(&mut a.fc, 0..4 * n * c),
                a.ln_2.out(n),
                None,
            )?;
            be.gelu_forward(
                B::part_mut(&mut a.gelu, 0..4 * n * c),
                B::part(&a.fc, 0..4 * n * c),
            )?;
            bp.mlp_proj.forward(
                be,
                w,
                B::part_mut(&mut next[0], 0..n * c),
                B::part(&a.gelu, 0..4 * n * c),
                Some(B::part(&a.res2, 0..n * c)),
            )?;
        }
        let last = B::part(&self.res[self.config.n_layer], 0..n * c);
        self.ln_f.forward(be, w, &p.ln_f, last, n)?;
        Ok(())
    }

    /// Sum of the cross-entropy of `targets` given `inputs` (each B·T
    /// token ids, B ≤ the micro-batch the model was built for), over
    /// the micro-batch's tokens: see [`Gpt::loss`].
    fn head(
        &mut self,
        w: &B::View<'_, B::A>,
        targets: &[u32],
        n: usize,
        grad: Option<&mut B::ViewMut<'_, B::G>>,
    ) -> Result<B::Loss, BatchError> {
        let c = self.config.n_embd;
        let be = &mut self.backend;
        let s = &mut self.scratch;
        let wte = self.index.wte.clone();
        let grad = grad.map(|g| {
            (
                B::part_mut(&mut s.dln, 0..n * c),
                B::sub_mut(g, wte.clone()),
            )
        });
        Ok(be.head_cross_entropy(
            self.ln_f.out(n),
            B::sub(w, wte),
            targets,
            grad,
            1.0 / n as f64,
            self.head_rows,
        )?)
    }

    /// The loss of `targets` given `inputs` (each B·T token ids, B ≤ the
    /// micro-batch the model was built for), summed over the tokens; no
    /// gradient. (The mean is the sum over B·T, see [`Gpt::mean`].)
    pub fn loss_sum(
        &mut self,
        w: &B::View<'_, B::A>,
        inputs: &[u32],
        targets: &[u32],
    ) -> Result<B::Loss, BatchError> {
        let b = self.check(inputs, targets)?;
        self.forward(w, inputs, b)?;
        self.head(w, targets, b * self.config.context, None)
    }

    /// Forward and backward of one micro-batch: adds the gradient of its
    /// mean loss into `grad` (same layout as `w`) and returns its summed
    /// loss (the mean times B·T).
    pub fn forward_backward_sum(
        &mut self,
        w: &B::View<'_, B::A>,
        grad: &mut B::ViewMut<'_, B::G>,
        inputs: &[u32],
        targets: &[u32],
    ) -> Result<B::Loss, BatchError> {
        self.forward_backward_ready(w, grad, inputs, targets, &mut |_, _, _| Ok(()))
    }

    /// The parameters of the blocks (all of them): a prefix of the flat
    /// layout, which sorts `transformer.h.*` before `ln_f`, `wpe`, `wte`.
    pub fn blocks_end(&self) -> usize {
        self.index
            .blocks
            .iter()
            .map(|b| block_range(b).end)
            .max()
            .unwrap_or(0)
    }

    /// [`Gpt::forward_backward_sum`], calling `ready` with each block's
    /// parameters and their gradient as soon as the backward is done with
    /// them (last block first): a data-parallel step sums those while the
    /// blocks below compute. What is left — `ln_f`, `wpe` and the tied
    /// `wte`, whose gradient the embedding backward completes last — is
    /// the layout's tail from [`Gpt::blocks_end`].
    pub fn forward_backward_ready(
        &mut self,
        w: &B::View<'_, B::A>,
        grad: &mut B::ViewMut<'_, B::G>,
        inputs: &[u32],
        targets: &[u32],
        ready: &mut Ready<'_, B>,
    ) -> Result<B::Loss, BatchError> {
        let b = self.check(inputs, targets)?;
        self.forward(w, inputs, b)?;
        let (t, c, nh) = (self.config.context, self.config.n_embd, self.config.n_head);
        let n = b * t;
        // LM head and loss; their gradient reaches ln_f's output (dln).
        let total = self.head(w, targets, n, Some(grad))?;
        let p = &self.index;
        let be = &mut self.backend;
        let s = &mut self.scratch;
        be.zero(B::part_mut(&mut s.dres, 0..n * c))?;
        let last = B::part(&self.res[self.config.n_layer], 0..n * c);
        self.ln_f.backward(
            be,
            w,
            &p.ln_f,
            grad,
            &mut s.partials,
            B::part_mut(&mut s.dres, 0..n * c),
            B::part(&s.dln, 0..n * c),
            last,
            n,
        )?;

        for (l, (a, bp)) in self.blocks.iter().zip(&p.blocks).enumerate().rev() {
            // out = res2 + c_proj(gelu(c_fc(ln_2(res2)))): dres reaches res2 as is.
            bp.mlp_proj.backward(
                be,
                w,
                grad,
                &mut s.partials,
                B::part_mut(&mut s.dfc, 0..4 * n * c),
                B::part(&s.dres, 0..n * c),
                B::part(&a.gelu, 0..4 * n * c),
            )?;
            be.gelu_backward(
                B::part_mut(&mut s.dfc, 0..4 * n * c),
                B::part(&a.fc, 0..4 * n * c),
            )?;
            bp.c_fc.backward(
                be,
                w,
                grad,
                &mut s.partials,
                B::part_mut(&mut s.dln, 0..n * c),
                B::part(&s.dfc, 0..4 * n * c),
                a.ln_2.out(n),
            )?;
            a.ln_2.backward(
                be,
                w,
                &bp.ln_2,
                grad,
                &mut s.partials,
                B::part_mut(&mut s.dres, 0..n * c),
                B::part(&s.dln, 0..n * c),
                B::part(&a.res2, 0..n * c),
                n,
            )?;
            // res2 = x + c_proj(attention(c_attn(ln_1(x)))): dres reaches x as is.
            bp.attn_proj.backward(
                be,
                w,
                grad,
                &mut s.partials,
                B::part_mut(&mut s.datty, 0..n * c),
                B::part(&s.dres, 0..n * c),
                B::part(&a.atty, 0..n * c),
            )?;
            be.attention_backward(
                B::part_mut(&mut s.dqkv, 0..3 * n * c),
                B::view_mut(&mut s.attention),
                B::part(&s.datty, 0..n * c),
                B::part(&a.atty, 0..n * c),
                B::view(&a.att),
                B::part(&a.qkv, 0..3 * n * c),
                Heads { b, t, c, nh },
            )?;
            bp.c_attn.backward(
                be,
                w,
                grad,
                &mut s.partials,
                B::part_mut(&mut s.dln, 0..n * c),
                B::part(&s.dqkv, 0..3 * n * c),
                a.ln_1.out(n),
            )?;
            a.ln_1.backward(
                be,
                w,
                &bp.ln_1,
                grad,
                &mut s.partials,
                B::part_mut(&mut s.dres, 0..n * c),
                B::part(&s.dln, 0..n * c),
                B::part(&self.res[l], 0..n * c),
                n,
            )?;
            // This block's parameters get no more gradient.
            let params = block_range(bp);
            ready(&*be, params.clone(), B::sub(&B::shared(grad), params))?;
        }

        // x = wte[tokens] + wpe[positions]
        be.token_embedding_backward(
            B::sub_mut(grad, p.wte.clone()),
            B::part(&s.dres, 0..n * c),
            inputs,
            c,
        )?;
        be.position_embedding_backward(
            B::sub_mut(grad, p.wpe.clone()),
            B::part(&s.dres, 0..n * c),
            t,
            c,
        )?;
        Ok(total)
    }
}

impl<T: Real + super::backend::Elem> Gpt<Cpu<T>> {
    /// Mean cross-entropy of `targets` given `inputs` (each B·T token ids,
    /// B ≤ the micro-batch the model was built for); no gradient.
    pub fn loss(&mut self, w: &[T], inputs: &[u32], targets: &[u32]) -> Result<f64, BatchError> {
        let total = self.loss_sum(&w, inputs, targets)?;
        Ok(total / inputs.len() as f64)
    }

    /// Forward and backward of one micro-batch: adds the gradient of its
    /// mean loss into `grad` (same layout as `w`) and returns that loss.
    pub fn forward_backward(
        &mut self,
        w: &[T],
        grad: &mut [T],
        inputs: &[u32],
        targets: &[u32],
    ) -> Result<f64, BatchError> {
        let total = self.forward_backward_sum(&w, &mut &mut *grad, inputs, targets)?;
        Ok(total / inputs.len() as f64)
    }
}
