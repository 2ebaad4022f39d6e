//! The fused GPT: the whole model's forward and backward as a short
//! sequence of named layer calls (`kernels.rs`), over activations and
//! gradient scratch allocated once, for the largest micro-batch, and reused
//! every step — as llm.c's `train_gpt2.c` does.
//!
//! Weights are read straight from the trainer's flat master buffer and
//! gradients added straight into its flat gradient buffer (both in
//! parameter-name order, see `stride_job::params`), so there is no copy
//! between the model and the optimiser and nothing the size of an
//! activation is allocated after construction.
//!
//! What is kept for the backward, per block: the block's input, both
//! LayerNorm outputs with their mean and 1/σ, qkv, the attention
//! probabilities (B, NH, T, T), the attention output, the residual after
//! attention, and the MLP's pre- and post-GELU activations. The backward
//! needs one block's worth of gradient scratch, reused block after block.
//! The LM head never holds the (B·T, V) logits: see
//! [`kernels::head_cross_entropy`].

use std::ops::Range;

use stride_job::config::ModelConfig;
use stride_job::params::Slot;

use stride_kernels::{self as kernels, HeadGrad, Heads, Real};

/// Rows of logits the LM head computes at once. 256 × 50,304 f32 is 51 MB:
/// large enough that the embedding-gradient product (whose k is this) runs
/// near full speed, small next to the (B·T, V) logits it replaces.
const HEAD_ROWS: usize = 256;

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

impl LinearParams {
    /// out (N, OC) = inp (N, IC) · wᵀ + b (+ residual).
    fn forward<T: Real>(&self, w: &[T], out: &mut [T], inp: &[T], residual: Option<&[T]>) {
        kernels::linear_forward(out, inp, &w[self.w.clone()], &w[self.b.clone()], residual);
    }

    /// dinp ← dout · w; the weight's and bias's gradients added into `grad`.
    fn backward<T: Real>(
        &self,
        w: &[T],
        grad: &mut [T],
        partials: &mut [T],
        dinp: &mut [T],
        dout: &[T],
        inp: &[T],
    ) {
        let (dw, db) = pair(grad, &self.w, &self.b);
        kernels::linear_backward(Some(dinp), dw, db, partials, dout, inp, &w[self.w.clone()]);
    }
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

/// Two disjoint parameter ranges of one buffer, both mutable.
fn pair<'a, T>(g: &'a mut [T], a: &Range<usize>, b: &Range<usize>) -> (&'a mut [T], &'a mut [T]) {
    if a.end <= b.start {
        let (lo, hi) = g.split_at_mut(b.start);
        (&mut lo[a.clone()], &mut hi[..b.len()])
    } else {
        assert!(b.end <= a.start, "parameter ranges overlap");
        let (lo, hi) = g.split_at_mut(a.start);
        (&mut hi[..a.len()], &mut lo[b.clone()])
    }
}

/// A LayerNorm's output, with the statistics its backward needs, for up
/// to N rows.
#[derive(Debug)]
struct NormActs<T> {
    out: Vec<T>,  // (N, C)
    mean: Vec<T>, // (N)
    rstd: Vec<T>, // (N)
}

impl<T: Real> NormActs<T> {
    fn new(n: usize, c: usize) -> NormActs<T> {
        NormActs {
            out: vec![T::zero(); n * c],
            mean: vec![T::zero(); n],
            rstd: vec![T::zero(); n],
        }
    }

    /// The output's first `n` rows.
    fn out(&self, n: usize) -> &[T] {
        &self.out[..n * (self.out.len() / self.mean.len())]
    }

    /// out = LayerNorm(x) over the n rows of x.
    fn forward(&mut self, w: &[T], p: &NormParams, x: &[T]) {
        let n = x.len() / p.w.len();
        kernels::layernorm_forward(
            &mut self.out[..x.len()],
            &mut self.mean[..n],
            &mut self.rstd[..n],
            x,
            &w[p.w.clone()],
            &w[p.b.clone()],
        );
    }

    /// dx += the gradient through this norm of dout (its forward read x);
    /// the gain's and bias's gradients added into `grad`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        w: &[T],
        p: &NormParams,
        grad: &mut [T],
        partials: &mut [T],
        dx: &mut [T],
        dout: &[T],
        x: &[T],
    ) {
        let n = x.len() / p.w.len();
        let (dw, db) = pair(grad, &p.w, &p.b);
        kernels::layernorm_backward(
            dx,
            dw,
            db,
            partials,
            dout,
            x,
            &w[p.w.clone()],
            &self.mean[..n],
            &self.rstd[..n],
        );
    }
}

/// What one block keeps from its forward for its backward. Shapes for N =
/// B·T rows.
#[derive(Debug)]
struct BlockActs<T> {
    ln_1: NormActs<T>,
    qkv: Vec<T>,  // (N, 3C)
    att: Vec<T>,  // (B, NH, T, T)
    atty: Vec<T>, // (N, C)
    res2: Vec<T>, // (N, C): block input + attention
    ln_2: NormActs<T>,
    fc: Vec<T>,   // (N, 4C): before GELU
    gelu: Vec<T>, // (N, 4C)
}

/// Gradient scratch, reused block after block.
#[derive(Debug)]
struct Scratch<T> {
    dres: Vec<T>,       // (N, C): gradient of the residual stream
    dln: Vec<T>,        // (N, C): gradient of a LayerNorm output
    datty: Vec<T>,      // (N, C)
    dqkv: Vec<T>,       // (N, 3C)
    dfc: Vec<T>,        // (N, 4C)
    heads: Vec<T>,      // (B, NH, T, hs): head-major y, then dy
    dheads: Vec<T>,     // (B, NH, 3, T, hs)
    datt: Vec<T>,       // (B, NH, T, T)
    partials: Vec<T>,   // (blocks(N), 4C): column-sum partials
    logits: Vec<T>,     // (HEAD_ROWS, V)
    row_loss: Vec<f64>, // (N)
}

/// A GPT whose forward and backward run on the fused CPU kernels; see the
/// module doc.
#[derive(Debug)]
pub struct FusedGpt<T> {
    config: ModelConfig,
    max_batch: usize,
    /// Rows of logits per chunk of the LM head.
    head_rows: usize,
    index: ParamIndex,
    /// The residual stream entering each block, and (last) leaving the
    /// final block: n_layer + 1 of (N, C).
    res: Vec<Vec<T>>,
    blocks: Vec<BlockActs<T>>,
    ln_f: NormActs<T>,
    scratch: Scratch<T>,
}

impl<T: Real> FusedGpt<T> {
    /// A model for micro-batches of up to `max_batch` sequences, with every
    /// buffer a step needs. `slots` is the layout of the weights it will be
    /// handed.
    pub fn new(
        config: &ModelConfig,
        slots: &[Slot],
        max_batch: usize,
    ) -> Result<FusedGpt<T>, BatchError> {
        let (b, t, c, nh, v) = (
            max_batch.max(1),
            config.context,
            config.n_embd,
            config.n_head,
            config.vocab_size,
        );
        let n = b * t;
        let z = |len: usize| vec![T::zero(); len];
        let blocks = (0..config.n_layer)
            .map(|_| BlockActs {
                ln_1: NormActs::new(n, c),
                qkv: z(3 * n * c),
                att: z(b * nh * t * t),
                atty: z(n * c),
                res2: z(n * c),
                ln_2: NormActs::new(n, c),
                fc: z(4 * n * c),
                gelu: z(4 * n * c),
            })
            .collect();
        Ok(FusedGpt {
            index: ParamIndex::new(slots, config.n_layer)?,
            config: config.clone(),
            max_batch: b,
            head_rows: HEAD_ROWS.min(n),
            res: (0..=config.n_layer).map(|_| z(n * c)).collect(),
            blocks,
            ln_f: NormActs::new(n, c),
            scratch: Scratch {
                dres: z(n * c),
                dln: z(n * c),
                datty: z(n * c),
                dqkv: z(3 * n * c),
                dfc: z(4 * n * c),
                heads: z(n * c),
                dheads: z(3 * n * c),
                datt: z(b * nh * t * t),
                partials: z(kernels::blocks(n) * 4 * c),
                logits: z(HEAD_ROWS.min(n) * v),
                row_loss: vec![0.0; n],
            },
        })
    }

    /// Computes the LM head `rows` rows at a time (tests use chunks that do
    /// not divide the batch; the default is [`HEAD_ROWS`]).
    pub fn set_head_rows(&mut self, rows: usize) {
        let v = self.config.vocab_size;
        self.head_rows = rows.clamp(1, self.scratch.logits.len() / v);
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
    fn forward(&mut self, w: &[T], inputs: &[u32], b: usize) {
        let (t, c, nh) = (self.config.context, self.config.n_embd, self.config.n_head);
        let n = b * t;
        let p = &self.index;
        let heads = &mut self.scratch.heads;
        // x = wte[tokens] + wpe[positions]
        kernels::embed_forward(
            &mut self.res[0][..n * c],
            inputs,
            &w[p.wte.clone()],
            &w[p.wpe.clone()],
            t,
        );
        for (l, (a, bp)) in self.blocks.iter_mut().zip(&p.blocks).enumerate() {
            let (done, next) = self.res.split_at_mut(l + 1);
            let (x, out) = (&done[l][..n * c], &mut next[0][..n * c]);
            // res2 = x + c_proj(attention(c_attn(ln_1(x))))
            a.ln_1.forward(w, &bp.ln_1, x);
            bp.c_attn
                .forward(w, &mut a.qkv[..3 * n * c], a.ln_1.out(n), None);
            let shape = Heads { b, t, c, nh };
            kernels::attention_forward(
                &mut a.atty[..n * c],
                &mut a.att,
                heads,
                &a.qkv[..3 * n * c],
                shape,
            );
            bp.attn_proj
                .forward(w, &mut a.res2[..n * c], &a.atty[..n * c], Some(x));
            // out = res2 + c_proj(gelu(c_fc(ln_2(res2))))
            a.ln_2.forward(w, &bp.ln_2, &a.res2[..n * c]);
            bp.c_fc
                .forward(w, &mut a.fc[..4 * n * c], a.ln_2.out(n), None);
            kernels::gelu_forward(&mut a.gelu[..4 * n * c], &a.fc[..4 * n * c]);
            bp.mlp_proj
                .forward(w, out, &a.gelu[..4 * n * c], Some(&a.res2[..n * c]));
        }
        self.ln_f
            .forward(w, &p.ln_f, &self.res[self.config.n_layer][..n * c]);
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
        self.forward(w, inputs, 1);
        let x = &self.ln_f.out(t)[position * c..(position + 1) * c];
        let wte = &w[self.index.wte.clone()];
        for (o, row) in out.iter_mut().zip(wte.chunks_exact(c)) {
            *o = x
                .iter()
                .zip(row)
                .fold(T::zero(), |acc, (a, b)| acc + *a * *b);
        }
        Ok(())
    }

    /// Each row's loss of the last [`FusedGpt::loss`] call: row p of
    /// sequence b at `b·T + p` (a test reads one position's cross-entropy).
    pub fn row_losses(&self) -> &[f64] {
        &self.scratch.row_loss
    }

    /// Mean cross-entropy of `targets` given `inputs` (each B·T token ids,
    /// B ≤ the micro-batch the model was built for); no gradient.
    pub fn loss(&mut self, w: &[T], inputs: &[u32], targets: &[u32]) -> Result<f64, BatchError> {
        let b = self.check(inputs, targets)?;
        self.forward(w, inputs, b);
        let n = b * self.config.context;
        let rows = self.head_rows * self.config.vocab_size;
        let s = &mut self.scratch;
        let total = kernels::head_cross_entropy(
            self.ln_f.out(n),
            &w[self.index.wte.clone()],
            targets,
            &mut s.logits[..rows],
            &mut s.row_loss,
            None,
            T::one(),
        );
        Ok(total / n as f64)
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
        let b = self.check(inputs, targets)?;
        self.forward(w, inputs, b);
        let (t, c, nh) = (self.config.context, self.config.n_embd, self.config.n_head);
        let n = b * t;
        let rows = self.head_rows * self.config.vocab_size;
        let p = &self.index;
        let s = &mut self.scratch;

        // LM head and loss; their gradient reaches ln_f's output.
        let total = kernels::head_cross_entropy(
            self.ln_f.out(n),
            &w[p.wte.clone()],
            targets,
            &mut s.logits[..rows],
            &mut s.row_loss,
            Some(HeadGrad {
                dx: &mut s.dln[..n * c],
                dwte: &mut grad[p.wte.clone()],
            }),
            T::one() / T::of(n as f64),
        );
        let dres = &mut s.dres[..n * c];
        dres.fill(T::zero());
        let last = &self.res[self.config.n_layer][..n * c];
        self.ln_f.backward(
            w,
            &p.ln_f,
            grad,
            &mut s.partials,
            dres,
            &s.dln[..n * c],
            last,
        );

        for (l, (a, bp)) in self.blocks.iter().zip(&p.blocks).enumerate().rev() {
            let (dln, dfc) = (&mut s.dln[..n * c], &mut s.dfc[..4 * n * c]);
            // out = res2 + c_proj(gelu(c_fc(ln_2(res2)))): dres reaches res2 as is.
            bp.mlp_proj
                .backward(w, grad, &mut s.partials, dfc, dres, &a.gelu[..4 * n * c]);
            kernels::gelu_backward(dfc, &a.fc[..4 * n * c]);
            bp.c_fc
                .backward(w, grad, &mut s.partials, dln, dfc, a.ln_2.out(n));
            a.ln_2.backward(
                w,
                &bp.ln_2,
                grad,
                &mut s.partials,
                dres,
                dln,
                &a.res2[..n * c],
            );
            // res2 = x + c_proj(attention(c_attn(ln_1(x)))): dres reaches x as is.
            let (datty, dqkv) = (&mut s.datty[..n * c], &mut s.dqkv[..3 * n * c]);
            bp.attn_proj
                .backward(w, grad, &mut s.partials, datty, dres, &a.atty[..n * c]);
            let shape = Heads { b, t, c, nh };
            kernels::attention_backward(
                dqkv,
                &mut s.datt,
                &mut s.heads,
                &mut s.dheads,
                datty,
                &a.att,
                &a.qkv[..3 * n * c],
                shape,
            );
            bp.c_attn
                .backward(w, grad, &mut s.partials, dln, dqkv, a.ln_1.out(n));
            a.ln_1.backward(
                w,
                &bp.ln_1,
                grad,
                &mut s.partials,
                dres,
                dln,
                &self.res[l][..n * c],
            );
        }

        // x = wte[tokens] + wpe[positions]
        kernels::token_embedding_backward(&mut grad[p.wte.clone()], dres, inputs, c);
        kernels::position_embedding_backward(&mut grad[p.wpe.clone()], dres, t, c);
        Ok(total / n as f64)
    }
}
