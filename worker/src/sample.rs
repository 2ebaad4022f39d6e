//! `worker sample`: text (or token ids) continued by a checkpoint's model,
//! computed by the same fused engine the workers train with
//! ([`FusedGpt::logits_at`]), on the CPU.
//!
//! It lives in the worker because the coordinator never links the model
//! code. A prompt is GPT-2 BPE text (tiktoken-rs' r50k_base, shipped in
//! the binary) for a model with GPT-2's vocabulary, or token ids for any
//! other (the `tiny` preset's synthetic 128 ids). Each new token is drawn
//! from the last position's logits: the argmax at temperature 0, otherwise
//! softmax(logits / T) over the `top_k` largest, with Stride's own seeded
//! RNG (stream `Sample`), so a seed gives the same text on every machine.
//! The context window slides: the model sees the last `model.context`
//! tokens.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use stride_job::checkpoint;
use stride_job::config::Config;
use stride_job::rng::{Rng, Stream};

use crate::engine::gpt::FusedGpt;
use crate::model;

/// GPT-2's vocabulary before nanoGPT's padding to 50,304.
pub const GPT2_VOCAB: usize = 50_257;

/// A sampling request the model cannot serve (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

/// What to sample.
#[derive(Debug, Clone)]
pub struct Request {
    /// A step directory, a pointer, a checkpoint folder or a run directory.
    pub checkpoint: PathBuf,
    pub prompt: Prompt,
    /// New tokens to generate.
    pub tokens: usize,
    /// 0: greedy (argmax).
    pub temperature: f64,
    /// Draw among the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    pub seed: u64,
}

/// A prompt as text (GPT-2 BPE) or as token ids.
#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// What came out.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The prompt's tokens followed by the new ones.
    pub tokens: Vec<u32>,
    /// How many of them are the prompt's.
    pub prompt_len: usize,
    /// The continuation as text, for a GPT-2 vocabulary.
    pub text: Option<String>,
}

/// A checkpoint's model, ready to predict.
#[derive(Debug)]
pub struct Sampler {
    config: Config,
    weights: Vec<f32>,
    gpt: FusedGpt<f32>,
    window: Vec<u32>,
    logits: Vec<f32>,
}

impl Sampler {
    /// Loads the weights of the checkpoint `path` names (checked against
    /// its sums) into a fused model for one sequence.
    pub fn open(path: &Path) -> Result<Sampler> {
        let (ckpt, warnings) = checkpoint::resolve(path)?;
        for w in warnings {
            tracing::warn!("{w}");
        }
        let config_path = ckpt.dir.join(checkpoint::CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {}", config_path.display()))?;
        let config = Config::from_toml(&text, &config_path.display().to_string())?;
        let slots = model::layout(&config.model);
        let weights = checkpoint::read_model(&ckpt.dir, &slots)?;
        Sampler::new(config, weights)
    }

    /// A sampler over `weights` (flat, in the layout of `config.model`).
    pub fn new(config: Config, weights: Vec<f32>) -> Result<Sampler> {
        let slots = model::layout(&config.model);
        anyhow::ensure!(
            weights.len() == model::parameter_count(&slots),
            "{} weights for a model of {}",
            weights.len(),
            model::parameter_count(&slots)
        );
        let gpt = FusedGpt::new(&config.model, &slots, 1)?;
        Ok(Sampler {
            window: vec![0; config.model.context],
            logits: vec![0.0; config.model.vocab_size],
            config,
            weights,
            gpt,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The logits after `tokens` (their last position), the model seeing
    /// the last `model.context` of them.
    pub fn next_logits(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        let t = self.config.model.context;
        let seen = &tokens[tokens.len().saturating_sub(t)..];
        anyhow::ensure!(!seen.is_empty(), "no token to continue");
        self.window[..seen.len()].copy_from_slice(seen);
        self.window[seen.len()..].fill(0);
        self.gpt.logits_at(
            &self.weights,
            &self.window,
            seen.len() - 1,
            &mut self.logits,
        )?;
        Ok(&self.logits)
    }

    /// The prompt's token ids: GPT-2 BPE of a text (for a GPT-2
    /// vocabulary), or the ids given; each below the vocabulary.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let vocab = self.config.model.vocab_size;
        let tokens = match prompt {
            Prompt::Text(text) if vocab >= GPT2_VOCAB => tiktoken_rs::r50k_base()
                .context("cannot build the GPT-2 tokenizer")?
                .encode_ordinary(text),
            Prompt::Text(_) => {
                return Err(BadRequest(format!(
                    "this model's vocabulary ({vocab} ids) is not GPT-2's: give the prompt as token ids with --prompt-ids"
                ))
                .into());
            }
            Prompt::Ids(ids) => ids.clone(),
        };
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(BadRequest(format!(
                "prompt token {bad} is not below model.vocab_size = {vocab}"
            ))
            .into());
        }
        if tokens.is_empty() {
            return Err(BadRequest("the prompt is empty".into()).into());
        }
        Ok(tokens)
    }

    /// `request.tokens` new tokens after the prompt.
    pub fn sample(&mut self, request: &Request) -> Result<Sampled> {
        let vocab = self.config.model.vocab_size;
        let gpt2 = vocab >= GPT2_VOCAB;
        let mut tokens = self.prompt_ids(&request.prompt)?;
        let bpe = if gpt2 {
            Some(tiktoken_rs::r50k_base().context("cannot build the GPT-2 tokenizer")?)
        } else {
            None
        };
        let prompt_len = tokens.len();
        // Ids past GPT-2's vocabulary are nanoGPT's padding: never drawn
        // when the text must be decoded.
        let drawable = if gpt2 { GPT2_VOCAB } else { vocab };
        let mut rng = Rng::new(request.seed, Stream::Sample);
        for _ in 0..request.tokens {
            let logits = &self.next_logits(&tokens)?[..drawable];
            let next = choose(logits, request.temperature, request.top_k, &mut rng);
            tokens.push(next);
        }
        let text = match bpe {
            Some(bpe) => Some(
                bpe.decode(&tokens[prompt_len..])
                    .context("the continuation is not valid UTF-8 text")?,
            ),
            None => None,
        };
        Ok(Sampled {
            tokens,
            prompt_len,
            text,
        })
    }
}

/// The next token: the first largest logit at temperature 0, else a draw
/// from softmax(logits / temperature) restricted to the `top_k` largest
/// (all when 0), ties in favour of the lower id.
pub fn choose(logits: &[f32], temperature: f64, top_k: usize, rng: &mut Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &l)| {
                if l > best.1 { (i, l) } else { best }
            })
            .0 as u32
    };
    if temperature <= 0.0 {
        return argmax();
    }
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    let k = if top_k == 0 {
        order.len()
    } else {
        top_k.min(order.len())
    };
    let top = &order[..k];
    let max = f64::from(logits[top[0] as usize]);
    let weights: Vec<f64> = top
        .iter()
        .map(|&i| ((f64::from(logits[i as usize]) - max) / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.uniform() * total;
    for (&i, w) in top.iter().zip(&weights) {
        if u < *w {
            return i;
        }
        u -= w;
    }
    top[k - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use stride_job::config::{ConfigSource, RawConfig};

    fn config() -> Config {
        let text = "[model]\nn_layer = 2\nn_head = 2\nn_embd = 16\nvocab_size = 32\ncontext = 16\n\
                    [data]\nsynthetic_tokens = 2000\n[train]\nglobal_batch = 2\nmicro_batch = 1\n";
        RawConfig::parse(text, "t".into(), ConfigSource::File("t.toml".into()))
            .and_then(|r| r.resolve())
            .expect("config")
    }

    /// Greedy decoding takes, at every step, the token the training
    /// forward pass (`FusedGpt::loss`, the cross-entropy the workers
    /// minimise) finds most likely: the one whose loss as a target at that
    /// position is lowest. Also across the sliding window (more tokens
    /// than the context).
    #[test]
    fn greedy_decoding_is_the_argmax_of_the_training_forward() {
        let c = config();
        let slots = model::layout(&c.model);
        // Initial weights with strong position embeddings: the most likely
        // token changes along the sequence.
        let mut w = model::initial_weights(&c.model, 3);
        let wpe = slots
            .iter()
            .find(|s| s.name == "transformer.wpe.weight")
            .expect("wpe");
        for x in &mut w[wpe.offset..wpe.offset + wpe.len] {
            *x *= 40.0;
        }
        let mut sampler = Sampler::new(c.clone(), w.clone()).expect("sampler");
        let request = Request {
            checkpoint: PathBuf::new(),
            prompt: Prompt::Ids(vec![1, 2, 3]),
            tokens: 20,
            temperature: 0.0,
            top_k: 0,
            seed: 1,
        };
        let out = sampler.sample(&request).expect("sample");
        assert_eq!(out.tokens.len(), 23);
        let (t, v) = (c.model.context, c.model.vocab_size);
        let mut gpt = FusedGpt::<f32>::new(&c.model, &slots, 1).expect("model");
        let mut distinct = std::collections::BTreeSet::new();
        for end in out.prompt_len..out.tokens.len() {
            let seen = &out.tokens[end.saturating_sub(t)..end];
            let p = seen.len() - 1;
            let mut inputs = seen.to_vec();
            inputs.resize(t, 0);
            let mut targets = vec![0u32; t];
            let losses: Vec<f64> = (0..v as u32)
                .map(|cand| {
                    targets[p] = cand;
                    gpt.loss(&w, &inputs, &targets).expect("loss");
                    gpt.row_losses()[p]
                })
                .collect();
            let best = losses.iter().copied().fold(f64::INFINITY, f64::min);
            let chosen = out.tokens[end] as usize;
            assert!(
                losses[chosen] <= best + 1e-5,
                "token {end}: chose {chosen} (loss {}), the forward's best is {best}",
                losses[chosen]
            );
            distinct.insert(chosen);
        }
        assert!(distinct.len() > 1, "a degenerate model: {:?}", out.tokens);
    }

    #[test]
    fn prompts_the_model_cannot_read_are_refused() {
        let c = config();
        let w = model::initial_weights(&c.model, 3);
        let mut sampler = Sampler::new(c, w).expect("sampler");
        for (prompt, want) in [
            (Prompt::Text("hello".into()), "not GPT-2's"),
            (
                Prompt::Ids(vec![1, 99]),
                "99 is not below model.vocab_size = 32",
            ),
            (Prompt::Ids(vec![]), "empty"),
        ] {
            let r = Request {
                checkpoint: PathBuf::new(),
                prompt,
                tokens: 3,
                temperature: 0.0,
                top_k: 0,
                seed: 1,
            };
            let e = sampler.sample(&r).expect_err("refused").to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn temperature_zero_is_argmax_and_top_k_limits_the_draw() {
        let logits = [0.1f32, 3.0, 2.9, -1.0, 3.0];
        let mut rng = Rng::new(1, Stream::Sample);
        assert_eq!(choose(&logits, 0.0, 0, &mut rng), 1, "first of the ties");
        for _ in 0..200 {
            let t = choose(&logits, 1.0, 2, &mut rng);
            assert!(t == 1 || t == 4, "top-2 is ids 1 and 4, got {t}");
        }
        // A seed gives the same draws.
        let draw = |seed| {
            let mut r = Rng::new(seed, Stream::Sample);
            (0..20)
                .map(|_| choose(&logits, 0.8, 0, &mut r))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }
}
