//! The GPT-2 model: parameters, deterministic initialisation, forward pass
//! and loss, written with differentiable Candle ops only.
//!
//! Architecture (SPEC §3): token + learned position embeddings, pre-LayerNorm
//! blocks of causal self-attention and a GELU (tanh) MLP ×4, a final
//! LayerNorm, and an LM head tied to the token embedding. Parameter names
//! and layouts follow nanoGPT's `GPT` module (Linear weights are (out, in)),
//! so `model.safetensors` loads by name elsewhere.
//!
//! Candle's fused `LayerNorm`, `softmax_last_dim` and `rms_norm` have no
//! backward pass: gradients silently stop there. This module therefore builds
//! layer norm, softmax and cross-entropy from elementary ops, and a test
//! checks that every parameter receives a non-zero gradient.
//!
//! Parameters live in a `BTreeMap`, so every iteration is in name order:
//! ranks flatten, hash and all-reduce them identically.
//!
//! Mixed precision (bf16 on GPUs, see [`compute_dtype`]) is autocast-style:
//! parameters and matmuls run in the compute dtype, while LayerNorm
//! statistics, the attention softmax and the loss are computed in f32 (the
//! [`wide`] dtype). Master weights and optimizer state stay f32 in the
//! trainer, which loads them into the model before every step.

use std::collections::BTreeMap;

use candle_core::{D, DType, Device, Result, Tensor, Var};
use stride_job::config::ModelConfig;
use stride_job::config::Precision;
use stride_job::rng::{Rng, Stream};

pub use stride_job::params::{Slot, layout, parameter_count};

/// The parameters of a GPT, by nanoGPT name.
#[derive(Debug)]
pub struct Gpt {
    pub config: ModelConfig,
    params: BTreeMap<String, Var>,
    /// (T, T) additive causal mask: 0 on and below the diagonal, −∞ above.
    mask: Tensor,
}

/// GPT-2's initial values, drawn from Stride's seeded RNG in name order:
/// normal(0, 0.02) for matrices, with the residual projections
/// (`attn.c_proj`, `mlp.c_proj`) scaled by 1/√(2·n_layer); zero biases;
/// LayerNorm gains of one.
pub fn initial_weights(c: &ModelConfig, seed: u64) -> Vec<f32> {
    let slots = layout(c);
    let mut rng = Rng::new(seed, Stream::Init);
    let mut out = vec![0f32; parameter_count(&slots)];
    let residual_std = 0.02 / ((2 * c.n_layer) as f64).sqrt();
    for s in &slots {
        let dst = &mut out[s.offset..s.offset + s.len];
        if s.name.ends_with(".bias") {
            // zeros
        } else if s.name.contains(".ln_") || s.name.contains("ln_f") {
            dst.fill(1.0);
        } else {
            let std = if s.name.ends_with("c_proj.weight") {
                residual_std
            } else {
                0.02
            };
            for x in dst.iter_mut() {
                *x = (rng.normal() * std) as f32;
            }
        }
    }
    out
}

/// The dtype the model computes in: `worker.precision`, where `auto` is
/// bf16 on CUDA (H100s run bf16 matmuls at ~2× the rate of tf32, with half
/// the memory traffic of f32) and f32 on CPUs (Candle's CPU bf16 kernels
/// are slower than its f32 ones).
pub fn compute_dtype(device: &Device, precision: Precision) -> DType {
    match precision {
        Precision::F32 => DType::F32,
        Precision::Bf16 => DType::BF16,
        Precision::Auto if device.is_cuda() => DType::BF16,
        Precision::Auto => DType::F32,
    }
}

/// The dtype numerically sensitive reductions run in: f32 for 16-bit
/// compute dtypes, the compute dtype otherwise (f64 tests stay f64).
pub fn wide(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

impl Gpt {
    /// A model holding `weights` (a flat buffer in [`layout`] order).
    pub fn new(
        config: &ModelConfig,
        weights: &[f32],
        dtype: DType,
        device: &Device,
    ) -> Result<Gpt> {
        let slots = layout(config);
        if weights.len() != parameter_count(&slots) {
            candle_core::bail!(
                "weights hold {} values, the model needs {}",
                weights.len(),
                parameter_count(&slots)
            );
        }
        let mut params = BTreeMap::new();
        for s in &slots {
            let t = Tensor::from_slice(
                &weights[s.offset..s.offset + s.len],
                s.shape.as_slice(),
                device,
            )?
            .to_dtype(dtype)?;
            params.insert(s.name.clone(), Var::from_tensor(&t)?);
        }
        let t = config.context;
        let mask: Vec<f32> = (0..t * t)
            .map(|i| {
                if i % t > i / t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), device)?.to_dtype(wide(dtype))?;
        Ok(Gpt {
            config: config.clone(),
            params,
            mask,
        })
    }

    /// The parameters in name order.
    pub fn vars(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.params.iter()
    }

    fn p(&self, name: &str) -> Result<&Tensor> {
        self.params
            .get(name)
            .map(|v| v.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg(format!("no parameter {name}")))
    }

    /// y = x Wᵀ + b for a (…, in) input and an (out, in) weight.
    fn linear(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let w = self.p(&format!("{prefix}.weight"))?;
        let b = self.p(&format!("{prefix}.bias"))?;
        x.broadcast_matmul(&w.t()?)?.broadcast_add(b)
    }

    /// LayerNorm over the last dim from elementary (differentiable) ops,
    /// computed in the wide dtype and returned in the input's.
    fn layer_norm(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let (dtype, wide) = (x.dtype(), wide(x.dtype()));
        let w = self.p(&format!("{prefix}.weight"))?.to_dtype(wide)?;
        let b = self.p(&format!("{prefix}.bias"))?.to_dtype(wide)?;
        let x = x.to_dtype(wide)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        xn.broadcast_mul(&w)?.broadcast_add(&b)?.to_dtype(dtype)
    }

    /// Causal self-attention of one block. x: (B, T, C).
    fn attention(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let nh = self.config.n_head;
        let hs = c / nh;
        let qkv = self.linear(x, &format!("{prefix}.c_attn"))?; // (B, T, 3C)
        let heads = |i: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, i * c, c)? // (B, T, C)
                .reshape((b, t, nh, hs))?
                .transpose(1, 2)? // (B, nh, T, hs)
                .contiguous()
        };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
        let scale = 1.0 / (hs as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?.to_dtype(self.mask.dtype())?; // (B, nh, T, T)
        let att = att.broadcast_add(&self.mask.narrow(0, 0, t)?.narrow(1, 0, t)?)?;
        let att = softmax_last_dim(&att)?.to_dtype(v.dtype())?;
        let y = att.matmul(&v)?; // (B, nh, T, hs)
        let y = y.transpose(1, 2)?.reshape((b, t, c))?; // (B, T, C)
        self.linear(&y, &format!("{prefix}.c_proj"))
    }

    /// The MLP of one block: C → 4C → GELU(tanh) → C. x: (B, T, C).
    fn mlp(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let h = self.linear(x, &format!("{prefix}.c_fc"))?.gelu()?; // (B, T, 4C)
        self.linear(&h, &format!("{prefix}.c_proj"))
    }

    /// Logits for token ids `idx`: (B, T) u32 → (B, T, V).
    pub fn forward(&self, idx: &Tensor) -> Result<Tensor> {
        self.head(&self.residual(idx)?)
    }

    /// The residual stream after every block: (B, T) u32 → (B, T, C).
    fn residual(&self, idx: &Tensor) -> Result<Tensor> {
        let mut x = self.embed(idx)?;
        for i in 0..self.config.n_layer {
            x = self.block(i, &x)?;
        }
        Ok(x)
    }

    /// The residual stream's start: token plus position embeddings of
    /// `idx` (B, T) u32 → (B, T, C).
    pub fn embed(&self, idx: &Tensor) -> Result<Tensor> {
        let (_b, t) = idx.dims2()?;
        if t > self.config.context {
            candle_core::bail!(
                "sequence of {t} tokens exceeds model.context {}",
                self.config.context
            );
        }
        let wte = self.p("transformer.wte.weight")?; // (V, C)
        let tok = wte
            .embedding(&idx.flatten_all()?)?
            .reshape((idx.dim(0)?, t, ()))?; // (B, T, C)
        let pos = self.p("transformer.wpe.weight")?.narrow(0, 0, t)?; // (T, C)
        tok.broadcast_add(&pos)
    }

    /// Transformer block `i` on the residual stream x: (B, T, C).
    pub fn block(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        let p = format!("transformer.h.{i}");
        let x = (x + self.attention(
            &self.layer_norm(x, &format!("{p}.ln_1"))?,
            &format!("{p}.attn"),
        )?)?;
        &x + self.mlp(
            &self.layer_norm(&x, &format!("{p}.ln_2"))?,
            &format!("{p}.mlp"),
        )?
    }

    /// The final LayerNorm and the tied LM head: (B, T, C) → (B, T, V).
    fn head(&self, x: &Tensor) -> Result<Tensor> {
        let wte = self.p("transformer.wte.weight")?;
        let x = self.layer_norm(x, "transformer.ln_f")?;
        x.broadcast_matmul(&wte.t()?)
    }

    /// Mean cross-entropy of predicting `targets` (B, T) from `idx` (B, T),
    /// in the wide dtype (f32 for a bf16 model).
    pub fn loss(&self, idx: &Tensor, targets: &Tensor) -> Result<Tensor> {
        self.head_loss(&self.residual(idx)?, targets)
    }

    /// The loss from the residual stream's end (B, T, C): the head and
    /// the mean cross-entropy, in the wide dtype.
    pub fn head_loss(&self, x: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let logits = self.head(x)?; // (B, T, V)
        let logits = logits.to_dtype(wide(logits.dtype()))?;
        let v = logits.dim(D::Minus1)?;
        cross_entropy(&logits.reshape(((), v))?, &targets.flatten_all()?)
    }
}

/// Softmax over the last dim from differentiable ops; the row max is
/// subtracted (detached) for stability.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Mean of −log softmax(logits)[target] over rows. logits: (N, V), targets: (N,) u32.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach(); // (N, 1)
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (N, 1)
    let picked = shifted.gather(&targets.unsqueeze(1)?, D::Minus1)?; // (N, 1)
    (lse - picked)?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig {
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
            vocab_size: 11,
            context: 6,
        }
    }

    fn batch(dev: &Device, c: &ModelConfig) -> (Tensor, Tensor) {
        let t = c.context;
        let ids: Vec<u32> = (0..2 * (t + 1))
            .map(|i| (i * 7 % c.vocab_size) as u32)
            .collect();
        let x: Vec<u32> = [&ids[0..t], &ids[t + 1..2 * t + 1]].concat();
        let y: Vec<u32> = [&ids[1..t + 1], &ids[t + 2..2 * t + 2]].concat();
        (
            Tensor::from_vec(x, (2, t), dev).expect("x"),
            Tensor::from_vec(y, (2, t), dev).expect("y"),
        )
    }

    #[test]
    fn layout_names_follow_nanogpt() {
        let slots = layout(&tiny());
        let names: Vec<&str> = slots.iter().map(|s| s.name.as_str()).collect();
        for want in [
            "transformer.wte.weight",
            "transformer.wpe.weight",
            "transformer.h.0.ln_1.weight",
            "transformer.h.1.attn.c_attn.weight",
            "transformer.h.1.attn.c_proj.bias",
            "transformer.h.0.mlp.c_fc.weight",
            "transformer.h.0.mlp.c_proj.bias",
            "transformer.ln_f.weight",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(
            !names.iter().any(|n| n.contains("lm_head")),
            "LM head is tied to wte"
        );
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
        let fc = slots
            .iter()
            .find(|s| s.name == "transformer.h.0.mlp.c_fc.weight")
            .expect("c_fc");
        assert_eq!(fc.shape, vec![32, 8], "Linear weights are (out, in)");
        // GPT-2 small has 124M parameters with the tied head (vocab 50,304).
        let small = layout(&ModelConfig::default());
        assert_eq!(parameter_count(&small), 124_475_904);
    }

    #[test]
    fn initialisation_is_deterministic_and_gpt2_scaled() {
        let c = ModelConfig {
            n_layer: 4,
            n_embd: 64,
            n_head: 4,
            vocab_size: 512,
            context: 32,
        };
        let a = initial_weights(&c, 7);
        assert_eq!(a, initial_weights(&c, 7));
        assert_ne!(a, initial_weights(&c, 8));
        let slots = layout(&c);
        let std_of = |name: &str| {
            let s = slots.iter().find(|s| s.name == name).expect("slot");
            let x = &a[s.offset..s.offset + s.len];
            (x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
        };
        assert!((std_of("transformer.wte.weight") - 0.02).abs() < 0.001);
        let residual = 0.02 / (8f64).sqrt();
        assert!((std_of("transformer.h.0.mlp.c_proj.weight") - residual).abs() < 0.0005);
        assert_eq!(std_of("transformer.h.0.attn.c_attn.bias"), 0.0);
        assert_eq!(std_of("transformer.ln_f.weight"), 1.0);
    }

    #[test]
    fn every_parameter_gets_a_finite_nonzero_gradient() {
        let c = tiny();
        let dev = Device::Cpu;
        let w = initial_weights(&c, 1);
        let m = Gpt::new(&c, &w, DType::F32, &dev).expect("model");
        let (x, y) = batch(&dev, &c);
        let loss = m.loss(&x, &y).expect("loss");
        let grads = loss.backward().expect("backward");
        for (name, var) in m.vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} received no gradient"));
            let g: Vec<f32> = g.flatten_all().and_then(|t| t.to_vec1()).expect("values");
            assert!(
                g.iter().all(|v| v.is_finite()),
                "{name} has a non-finite gradient"
            );
            assert!(
                g.iter().any(|v| *v != 0.0),
                "{name} has an all-zero gradient"
            );
        }
        // Initial loss ≈ ln(vocab): the model starts uniform.
        let l: f32 = loss.to_scalar().expect("scalar");
        assert!((l - (11f32).ln()).abs() < 0.1, "{l}");
    }

    /// bf16 compute (the GPU path) on the CPU: the loss is f32 and close to
    /// the f32 model's, and every gradient points the same way.
    #[test]
    fn bf16_compute_tracks_f32_with_an_f32_loss() {
        let c = tiny();
        let dev = Device::Cpu;
        let w = initial_weights(&c, 3);
        let (x, y) = batch(&dev, &c);
        let run = |dtype| {
            let m = Gpt::new(&c, &w, dtype, &dev).expect("model");
            let loss = m.loss(&x, &y).expect("loss");
            let grads = loss.backward().expect("backward");
            let flat: Vec<f32> = m
                .vars()
                .flat_map(|(name, var)| {
                    grads
                        .get(var.as_tensor())
                        .unwrap_or_else(|| panic!("{name} received no gradient"))
                        .flatten_all()
                        .and_then(|g| g.to_dtype(DType::F32))
                        .and_then(|g| g.to_vec1::<f32>())
                        .expect("gradient")
                })
                .collect();
            (loss, flat)
        };
        let (l32, g32) = run(DType::F32);
        let (l16, g16) = run(DType::BF16);
        assert_eq!(l16.dtype(), DType::F32, "the loss is computed in f32");
        let (a, b): (f32, f32) = (l32.to_scalar().expect("l"), l16.to_scalar().expect("l"));
        assert!((a - b).abs() < 0.02 * a, "bf16 loss {b} vs f32 loss {a}");
        let dot: f64 = g32
            .iter()
            .zip(&g16)
            .map(|(p, q)| f64::from(*p) * f64::from(*q))
            .sum();
        let norm = |g: &[f32]| g.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        let cosine = dot / (norm(&g32) * norm(&g16));
        assert!(
            cosine > 0.99,
            "bf16 gradients diverge from f32: cosine {cosine}"
        );
    }

    #[test]
    fn gradients_match_central_differences_in_f64() {
        let c = tiny();
        let dev = Device::Cpu;
        let mut w = initial_weights(&c, 2);
        // Non-trivial LayerNorm gains and biases so their gradients are generic.
        let mut rng = Rng::new(5, Stream::Init);
        for x in w.iter_mut() {
            *x += (rng.normal() * 0.05) as f32;
        }
        let slots = layout(&c);
        let (x, y) = batch(&dev, &c);
        let loss_at = |weights: &[f32]| -> f64 {
            let m = Gpt::new(&c, weights, DType::F64, &dev).expect("model");
            m.loss(&x, &y)
                .and_then(|l| l.to_scalar::<f64>())
                .expect("loss")
        };
        let m = Gpt::new(&c, &w, DType::F64, &dev).expect("model");
        let grads = m.loss(&x, &y).and_then(|l| l.backward()).expect("backward");
        let checks = [
            ("transformer.wte.weight", 3),
            ("transformer.wpe.weight", 5),
            ("transformer.h.0.ln_1.weight", 2),
            ("transformer.h.0.attn.c_attn.weight", 17),
            ("transformer.h.1.attn.c_proj.bias", 4),
            ("transformer.h.1.mlp.c_fc.weight", 40),
            ("transformer.h.0.mlp.c_proj.weight", 9),
            ("transformer.ln_f.bias", 1),
        ];
        for (name, i) in checks {
            let slot = slots.iter().find(|s| s.name == name).expect("slot");
            let var = m
                .vars()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v)
                .expect("var");
            let g: Vec<f64> = grads
                .get(var.as_tensor())
                .and_then(|g| g.flatten_all().ok())
                .and_then(|g| g.to_vec1().ok())
                .expect("gradient");
            // The weights are stored as f32, so perturb by an f32-exact h.
            let h = 1.0 / 1024.0;
            let mut plus = w.clone();
            plus[slot.offset + i] += h;
            let mut minus = w.clone();
            minus[slot.offset + i] -= h;
            let step = f64::from(plus[slot.offset + i]) - f64::from(minus[slot.offset + i]);
            let numeric = (loss_at(&plus) - loss_at(&minus)) / step;
            let analytic = g[i];
            let tol = 1e-4 + 1e-3 * analytic.abs();
            assert!(
                (numeric - analytic).abs() < tol,
                "{name}[{i}]: autograd {analytic} vs central difference {numeric}"
            );
        }
    }
}
