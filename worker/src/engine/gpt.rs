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

/// Where each parameter of one block lies in the flat buffer.
#[derive(Debug, Clone)]
struct BlockParams {
    ln1_w: Range<usize>,
    ln1_b: Range<usize>,
    attn_w: Range<usize>,
    attn_b: Range<usize>,
    proj_w: Range<usize>,
    proj_b: Range<usize>,
    ln2_w: Range<usize>,
    ln2_b: Range<usize>,
    fc_w: Range<usize>,
    fc_b: Range<usize>,
    fcproj_w: Range<usize>,
    fcproj_b: Range<usize>,
}

/// Where every parameter lies in the flat buffer (by name, from the layout).
#[derive(Debug, Clone)]
struct ParamIndex {
    wte: Range<usize>,
    wpe: Range<usize>,
    lnf_w: Range<usize>,
    lnf_b: Range<usize>,
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
        let blocks = (0..n_layer)
            .map(|i| {
                let p = |s: &str| find(format!("transformer.h.{i}.{s}"));
                Ok(BlockParams {
                    ln1_w: p("ln_1.weight")?,
                    ln1_b: p("ln_1.bias")?,
                    attn_w: p("attn.c_attn.weight")?,
                    attn_b: p("attn.c_attn.bias")?,
                    proj_w: p("attn.c_proj.weight")?,
                    proj_b: p("attn.c_proj.bias")?,
                    ln2_w: p("ln_2.weight")?,
                    ln2_b: p("ln_2.bias")?,
                    fc_w: p("mlp.c_fc.weight")?,
                    fc_b: p("mlp.c_fc.bias")?,
                    fcproj_w: p("mlp.c_proj.weight")?,
                    fcproj_b: p("mlp.c_proj.bias")?,
                })
            })
            .collect::<Result<_, BatchError>>()?;
        Ok(ParamIndex {
            wte: find("transformer.wte.weight".into())?,
            wpe: find("transformer.wpe.weight".into())?,
            lnf_w: find("transformer.ln_f.weight".into())?,
            lnf_b: find("transformer.ln_f.bias".into())?,
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

/// What one block keeps from its forward for its backward. Shapes for N =
/// B·T rows.
#[derive(Debug)]
struct BlockActs<T> {
    ln1: Vec<T>,      // (N, C)
    ln1_mean: Vec<T>, // (N)
    ln1_rstd: Vec<T>, // (N)
    qkv: Vec<T>,      // (N, 3C)
    att: Vec<T>,      // (B, NH, T, T)
    atty: Vec<T>,     // (N, C)
    res2: Vec<T>,     // (N, C): block input + attention
    ln2: Vec<T>,      // (N, C)
    ln2_mean: Vec<T>, // (N)
    ln2_rstd: Vec<T>, // (N)
    fc: Vec<T>,       // (N, 4C): before GELU
    gelu: Vec<T>,     // (N, 4C)
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
    lnf: Vec<T>,      // (N, C)
    lnf_mean: Vec<T>, // (N)
    lnf_rstd: Vec<T>, // (N)
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
                ln1: z(n * c),
                ln1_mean: z(n),
                ln1_rstd: z(n),
                qkv: z(3 * n * c),
                att: z(b * nh * t * t),
                atty: z(n * c),
                res2: z(n * c),
                ln2: z(n * c),
                ln2_mean: z(n),
                ln2_rstd: z(n),
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
            lnf: z(n * c),
            lnf_mean: z(n),
            lnf_rstd: z(n),
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
        let s = &mut self.scratch;
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
            // x + attention(ln_1(x))
            kernels::layernorm_forward(
                &mut a.ln1[..n * c],
                &mut a.ln1_mean[..n],
                &mut a.ln1_rstd[..n],
                x,
                &w[bp.ln1_w.clone()],
                &w[bp.ln1_b.clone()],
            );
            kernels::linear_forward(
                &mut a.qkv[..3 * n * c],
                &a.ln1[..n * c],
                &w[bp.attn_w.clone()],
                &w[bp.attn_b.clone()],
                None,
            );
            kernels::attention_forward(
                &mut a.atty[..n * c],
                &mut a.att,
                &mut s.heads,
                &a.qkv[..3 * n * c],
                Heads { b, t, c, nh },
            );
            kernels::linear_forward(
                &mut a.res2[..n * c],
                &a.atty[..n * c],
                &w[bp.proj_w.clone()],
                &w[bp.proj_b.clone()],
                Some(x),
            );
            // … + mlp(ln_2(…))
            kernels::layernorm_forward(
                &mut a.ln2[..n * c],
                &mut a.ln2_mean[..n],
                &mut a.ln2_rstd[..n],
                &a.res2[..n * c],
                &w[bp.ln2_w.clone()],
                &w[bp.ln2_b.clone()],
            );
            kernels::linear_forward(
                &mut a.fc[..4 * n * c],
                &a.ln2[..n * c],
                &w[bp.fc_w.clone()],
                &w[bp.fc_b.clone()],
                None,
            );
            kernels::gelu_forward(&mut a.gelu[..4 * n * c], &a.fc[..4 * n * c]);
            kernels::linear_forward(
                out,
                &a.gelu[..4 * n * c],
                &w[bp.fcproj_w.clone()],
                &w[bp.fcproj_b.clone()],
                Some(&a.res2[..n * c]),
            );
        }
        let last = &self.res[self.config.n_layer][..n * c];
        kernels::layernorm_forward(
            &mut self.lnf[..n * c],
            &mut self.lnf_mean[..n],
            &mut self.lnf_rstd[..n],
            last,
            &w[p.lnf_w.clone()],
            &w[p.lnf_b.clone()],
        );
    }

    /// Mean cross-entropy of `targets` given `inputs` (each B·T token ids,
    /// B ≤ the micro-batch the model was built for); no gradient.
    pub fn loss(&mut self, w: &[T], inputs: &[u32], targets: &[u32]) -> Result<f64, BatchError> {
        let b = self.check(inputs, targets)?;
        self.forward(w, inputs, b);
        let n = b * self.config.context;
        let c = self.config.n_embd;
        let s = &mut self.scratch;
        let total = kernels::head_cross_entropy(
            &self.lnf[..n * c],
            &w[self.index.wte.clone()],
            targets,
            &mut s.logits[..self.head_rows * self.config.vocab_size],
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
        let p = &self.index;
        let s = &mut self.scratch;
        let shape = Heads { b, t, c, nh };

        // LM head and loss; their gradient reaches ln_f's output.
        let total = kernels::head_cross_entropy(
            &self.lnf[..n * c],
            &w[p.wte.clone()],
            targets,
            &mut s.logits[..self.head_rows * self.config.vocab_size],
            &mut s.row_loss,
            Some(HeadGrad {
                dx: &mut s.dln[..n * c],
                dwte: &mut grad[p.wte.clone()],
            }),
            T::one() / T::of(n as f64),
        );
        let dres = &mut s.dres[..n * c];
        dres.fill(T::zero());
        let (dw, db) = pair(grad, &p.lnf_w, &p.lnf_b);
        kernels::layernorm_backward(
            dres,
            dw,
            db,
            &mut s.partials,
            &s.dln[..n * c],
            &self.res[self.config.n_layer][..n * c],
            &w[p.lnf_w.clone()],
            &self.lnf_mean[..n],
            &self.lnf_rstd[..n],
        );

        for (l, (a, bp)) in self.blocks.iter().zip(&p.blocks).enumerate().rev() {
            // out = res2 + c_proj(gelu(c_fc(ln_2(res2)))): dres flows to res2 as is.
            let (dw, db) = pair(grad, &bp.fcproj_w, &bp.fcproj_b);
            kernels::linear_backward(
                Some(&mut s.dfc[..4 * n * c]),
                dw,
                db,
                &mut s.partials,
                dres,
                &a.gelu[..4 * n * c],
                &w[bp.fcproj_w.clone()],
            );
            kernels::gelu_backward(&mut s.dfc[..4 * n * c], &a.fc[..4 * n * c]);
            let (dw, db) = pair(grad, &bp.fc_w, &bp.fc_b);
            kernels::linear_backward(
                Some(&mut s.dln[..n * c]),
                dw,
                db,
                &mut s.partials,
                &s.dfc[..4 * n * c],
                &a.ln2[..n * c],
                &w[bp.fc_w.clone()],
            );
            let (dw, db) = pair(grad, &bp.ln2_w, &bp.ln2_b);
            kernels::layernorm_backward(
                dres,
                dw,
                db,
                &mut s.partials,
                &s.dln[..n * c],
                &a.res2[..n * c],
                &w[bp.ln2_w.clone()],
                &a.ln2_mean[..n],
                &a.ln2_rstd[..n],
            );
            // res2 = x + c_proj(attention(c_attn(ln_1(x)))): dres flows to x as is.
            let (dw, db) = pair(grad, &bp.proj_w, &bp.proj_b);
            kernels::linear_backward(
                Some(&mut s.datty[..n * c]),
                dw,
                db,
                &mut s.partials,
                dres,
                &a.atty[..n * c],
                &w[bp.proj_w.clone()],
            );
            kernels::attention_backward(
                &mut s.dqkv[..3 * n * c],
                &mut s.datt,
                &mut s.heads,
                &mut s.dheads,
                &s.datty[..n * c],
                &a.att,
                &a.qkv[..3 * n * c],
                shape,
            );
            let (dw, db) = pair(grad, &bp.attn_w, &bp.attn_b);
            kernels::linear_backward(
                Some(&mut s.dln[..n * c]),
                dw,
                db,
                &mut s.partials,
                &s.dqkv[..3 * n * c],
                &a.ln1[..n * c],
                &w[bp.attn_w.clone()],
            );
            let (dw, db) = pair(grad, &bp.ln1_w, &bp.ln1_b);
            kernels::layernorm_backward(
                dres,
                dw,
                db,
                &mut s.partials,
                &s.dln[..n * c],
                &self.res[l][..n * c],
                &w[bp.ln1_w.clone()],
                &a.ln1_mean[..n],
                &a.ln1_rstd[..n],
            );
        }

        // x = wte[tokens] + wpe[positions]
        kernels::token_embedding_backward(&mut grad[p.wte.clone()], dres, inputs, c);
        kernels::position_embedding_backward(&mut grad[p.wpe.clone()], dres, t, c);
        Ok(total / n as f64)
    }
}
