//! The parameters of a GPT-2 model as names and shapes: the layout both
//! the workers (flat buffers, all-reduce, hashes) and the checkpoint format
//! (safetensors names) rely on. Pure function of `[model]`; no tensors.
//!
//! Names and layouts follow nanoGPT's `GPT` module (Linear weights are
//! (out, in)); the LM head is tied to `transformer.wte.weight` and has no
//! tensor of its own. Slots are in name order, which is the order of every
//! flat buffer.

use crate::config::ModelConfig;

/// One parameter's place in the flat buffer of all parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
}

impl Slot {
    /// Weight decay applies to matrices (embeddings and Linear weights),
    /// not to biases and LayerNorm gains.
    pub fn decays(&self) -> bool {
        self.shape.len() >= 2
    }
}

/// Names and shapes of every parameter of a GPT with this config, in name
/// order — the order of the flat buffers, the hash and the all-reduce.
pub fn layout(c: &ModelConfig) -> Vec<Slot> {
    let (v, t, e) = (c.vocab_size, c.context, c.n_embd);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("transformer.wte.weight".into(), vec![v, e]),
        ("transformer.wpe.weight".into(), vec![t, e]),
        ("transformer.ln_f.weight".into(), vec![e]),
        ("transformer.ln_f.bias".into(), vec![e]),
    ];
    for i in 0..c.n_layer {
        let p = format!("transformer.h.{i}");
        shapes.extend([
            (format!("{p}.ln_1.weight"), vec![e]),
            (format!("{p}.ln_1.bias"), vec![e]),
            (format!("{p}.attn.c_attn.weight"), vec![3 * e, e]),
            (format!("{p}.attn.c_attn.bias"), vec![3 * e]),
            (format!("{p}.attn.c_proj.weight"), vec![e, e]),
            (format!("{p}.attn.c_proj.bias"), vec![e]),
            (format!("{p}.ln_2.weight"), vec![e]),
            (format!("{p}.ln_2.bias"), vec![e]),
            (format!("{p}.mlp.c_fc.weight"), vec![4 * e, e]),
            (format!("{p}.mlp.c_fc.bias"), vec![4 * e]),
            (format!("{p}.mlp.c_proj.weight"), vec![e, 4 * e]),
            (format!("{p}.mlp.c_proj.bias"), vec![e]),
        ]);
    }
    shapes.sort_by(|a, b| a.0.cmp(&b.0));
    let mut offset = 0;
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let len = shape.iter().product();
            let slot = Slot {
                name,
                shape,
                offset,
                len,
            };
            offset += len;
            slot
        })
        .collect()
}

/// Total number of parameters of a layout.
pub fn parameter_count(slots: &[Slot]) -> usize {
    slots.last().map_or(0, |s| s.offset + s.len)
}
