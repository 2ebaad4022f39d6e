//! `coordinator export --checkpoint CKPT --format hf --out DIR`: a
//! checkpoint's weights as a folder Hugging Face `transformers` loads with
//! `GPT2LMHeadModel.from_pretrained(DIR)`.
//!
//! What changes on the way (nothing else does; the values are Stride's
//! f32 weights, bit for bit):
//! - names: Stride's are nanoGPT's, which are also HF GPT-2's
//!   (`transformer.h.0.attn.c_attn.weight`, …); the LM head is tied
//!   (`tie_word_embeddings`), so there is no `lm_head.weight`;
//! - layout: HF's GPT-2 keeps `c_attn`, `c_proj` and `c_fc` as `Conv1D`,
//!   whose weight is (in, out), the transpose of Stride's Linear (out, in);
//! - vocabulary: a model padded past GPT-2's 50,257 ids (nanoGPT's 50,304)
//!   is cut back to 50,257 rows — the padding ids never occur in GPT-2 BPE
//!   text — and `config.json` says 50,257; a smaller vocabulary (the
//!   synthetic `tiny`) is kept as it is;
//! - `config.json` holds the shape, GELU's tanh form (`gelu_new`),
//!   LayerNorm's ε (1e-5) and no dropout.
//!
//! The tokenizer is GPT-2's; the folder's README says to load it with
//! `GPT2TokenizerFast.from_pretrained("gpt2")` (or `tiktoken`'s "gpt2"):
//! Stride's `prepare` uses the same r50k_base vocabulary, and no tokenizer
//! file is shipped in the binary to copy. Reads the checkpoint only after
//! its sums check out; writes only into `--out`, which must not hold an
//! export already unless `--force`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use stride_job::checkpoint;
use stride_job::config::Config;
use stride_job::params;

/// GPT-2's vocabulary before nanoGPT's padding.
pub const GPT2_VOCAB: usize = 50_257;

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Hugging Face transformers' GPT-2 (config.json + model.safetensors).
    Hf,
}

/// An export that cannot be made (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadExport(String);

/// What was written.
#[derive(Debug)]
pub struct Exported {
    pub dir: PathBuf,
    pub step: u64,
    pub vocab_size: usize,
    pub tensors: usize,
}

/// Whether Stride's (out, in) weight `name` is an HF `Conv1D` (in, out).
fn is_conv1d(name: &str) -> bool {
    [
        ".attn.c_attn.weight",
        ".attn.c_proj.weight",
        ".mlp.c_fc.weight",
        ".mlp.c_proj.weight",
    ]
    .iter()
    .any(|s| name.ends_with(s))
}

/// The (rows, cols) matrix `m` transposed.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}

/// A tensor to write: name, shape, values.
pub type Tensor = (String, Vec<usize>, Vec<f32>);

/// The HF tensors of Stride's flat weights, and the vocabulary they keep.
pub fn hf_tensors(config: &Config, weights: &[f32]) -> (Vec<Tensor>, usize) {
    let m = &config.model;
    let vocab = if m.vocab_size > GPT2_VOCAB {
        GPT2_VOCAB
    } else {
        m.vocab_size
    };
    let tensors = params::layout(m)
        .into_iter()
        .map(|s| {
            let data = &weights[s.offset..s.offset + s.len];
            if is_conv1d(&s.name) {
                let (rows, cols) = (s.shape[0], s.shape[1]);
                (s.name, vec![cols, rows], transpose(data, rows, cols))
            } else if s.name == "transformer.wte.weight" {
                let c = s.shape[1];
                (s.name, vec![vocab, c], data[..vocab * c].to_vec())
            } else {
                (s.name, s.shape, data.to_vec())
            }
        })
        .collect();
    (tensors, vocab)
}

/// `config.json` for `transformers.GPT2Config`.
pub fn hf_config(config: &Config, vocab: usize) -> serde_json::Value {
    let m = &config.model;
    // GPT-2's end-of-text id, where the vocabulary is GPT-2's.
    let eot = (vocab == GPT2_VOCAB).then_some(50_256);
    serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab,
        "n_positions": m.context,
        "n_ctx": m.context,
        "n_embd": m.n_embd,
        "n_layer": m.n_layer,
        "n_head": m.n_head,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "tie_word_embeddings": true,
        "scale_attn_weights": true,
        "torch_dtype": "float32",
    })
}

/// Exports the checkpoint `path` names into `out`.
pub fn export(path: &Path, format: Format, out: &Path, force: bool) -> Result<Exported> {
    let Format::Hf = format;
    let (ckpt, warnings) = checkpoint::resolve(path)?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    let config_path = ckpt.dir.join(checkpoint::CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let config = Config::from_toml(&text, &config_path.display().to_string())?;
    let (model_file, config_file) = (out.join("model.safetensors"), out.join("config.json"));
    if !force && (model_file.exists() || config_file.exists()) {
        return Err(BadExport(format!(
            "{} already holds an export; pass --force to replace it",
            out.display()
        ))
        .into());
    }
    let slots = params::layout(&config.model);
    let weights = checkpoint::read_model(&ckpt.dir, &slots)?;
    let (tensors, vocab) = hf_tensors(&config, &weights);
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let views: Vec<(String, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), d.as_slice()))
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    checkpoint::write_tensors(&model_file, &views, metadata)?;
    let json = serde_json::to_string_pretty(&hf_config(&config, vocab))?;
    std::fs::write(&config_file, json + "\n")
        .with_context(|| format!("cannot write {}", config_file.display()))?;
    let cut = if config.model.vocab_size > vocab {
        format!(
            "\nThe model's vocabulary was padded to {} ids; the export keeps GPT-2's {vocab} (the padding ids never occur in GPT-2 BPE text).\n",
            config.model.vocab_size
        )
    } else {
        String::new()
    };
    let readme = format!(
        "# {} (step {}), exported by Stride\n\n\
         ```python\n\
         from transformers import GPT2LMHeadModel, GPT2TokenizerFast\n\
         model = GPT2LMHeadModel.from_pretrained(\"{}\")\n\
         tok = GPT2TokenizerFast.from_pretrained(\"gpt2\")   # GPT-2's BPE, as `coordinator prepare` used\n\
         ```\n\n\
         The tokenizer is GPT-2's (r50k_base; `tiktoken.get_encoding(\"gpt2\")` is the same); no tokenizer \
         file is included. Weights are f32, LM head tied to `transformer.wte.weight`.\n{cut}",
        ckpt.state.config_name,
        ckpt.state.step,
        out.display()
    );
    std::fs::write(out.join("README.md"), readme)
        .with_context(|| format!("cannot write {}", out.join("README.md").display()))?;
    Ok(Exported {
        dir: out.to_path_buf(),
        step: ckpt.state.step,
        vocab_size: vocab,
        tensors: tensors.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use stride_job::config::{ConfigSource, RawConfig};

    fn config(vocab: usize) -> Config {
        let text = format!(
            "[model]\nn_layer = 2\nn_head = 2\nn_embd = 8\nvocab_size = {vocab}\ncontext = 4\n\
             [data]\nsynthetic_tokens = 2000\n[train]\nglobal_batch = 2\nmicro_batch = 1\n"
        );
        RawConfig::parse(&text, "t".into(), ConfigSource::File("t.toml".into()))
            .and_then(|r| r.resolve())
            .expect("config")
    }

    /// Names, shapes and transposes against Stride's layout: every Conv1D
    /// weight is the transpose of the Linear weight, everything else is the
    /// same values, and a padded vocabulary is cut to GPT-2's.
    #[test]
    fn hf_tensors_have_gpt2_names_shapes_and_transposes() {
        for (vocab, want) in [(50_304, GPT2_VOCAB), (128, 128)] {
            let c = config(vocab);
            let slots = params::layout(&c.model);
            let w: Vec<f32> = (0..params::parameter_count(&slots))
                .map(|i| i as f32)
                .collect();
            let (tensors, v) = hf_tensors(&c, &w);
            assert_eq!(v, want);
            assert_eq!(tensors.len(), slots.len());
            let by_name: HashMap<&str, &Tensor> =
                tensors.iter().map(|t| (t.0.as_str(), t)).collect();
            let e = c.model.n_embd;
            for s in &slots {
                let (_, shape, data) = by_name[s.name.as_str()];
                let ours = &w[s.offset..s.offset + s.len];
                if is_conv1d(&s.name) {
                    let (out, inp) = (s.shape[0], s.shape[1]);
                    assert_eq!(shape, &vec![inp, out], "{}", s.name);
                    for r in 0..out {
                        for k in 0..inp {
                            assert_eq!(data[k * out + r], ours[r * inp + k], "{}", s.name);
                        }
                    }
                } else if s.name == "transformer.wte.weight" {
                    assert_eq!(shape, &vec![want, e]);
                    assert_eq!(data[..], ours[..want * e]);
                } else {
                    assert_eq!((shape, &data[..]), (&s.shape, ours), "{}", s.name);
                }
            }
            let c_attn = by_name["transformer.h.1.attn.c_attn.weight"];
            assert_eq!(c_attn.1, vec![e, 3 * e], "HF's Conv1D is (in, out)");
            let cfg = hf_config(&c, v);
            assert_eq!(cfg["vocab_size"], want);
            assert_eq!(cfg["activation_function"], "gelu_new");
            assert_eq!(cfg["n_positions"], 4);
        }
    }
}
