//! The whole fused model against the composed (Candle) model in f64 and
//! against central differences of its own loss; its f32 version against
//! its f64 one; refused batches. (Each kernel is checked against its
//! formula in `stride-kernels`.)

use candle_core::{DType, Device, Tensor};
use stride_job::config::ModelConfig;
use stride_job::rng::{Rng, Stream};

use super::gpt::FusedGpt;
use crate::model::{self, Gpt};

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

// ---- the whole model ------------------------------------------------------------

fn awkward() -> ModelConfig {
    ModelConfig {
        n_layer: 2,
        n_head: 3,
        n_embd: 9,
        vocab_size: 13,
        context: 7,
    }
}

/// (inputs, targets) of `b` sequences for `c`.
fn tokens(c: &ModelConfig, b: usize, seed: usize) -> (Vec<u32>, Vec<u32>) {
    let ids: Vec<u32> = (0..b * (c.context + 1))
        .map(|i| ((i * 7 + seed * 3 + i / 5) % c.vocab_size) as u32)
        .collect();
    let x = ids
        .chunks(c.context + 1)
        .flat_map(|w| w[..c.context].to_vec())
        .collect();
    let y = ids
        .chunks(c.context + 1)
        .flat_map(|w| w[1..].to_vec())
        .collect();
    (x, y)
}

/// Weights with generic LayerNorm gains and biases (not 1 and 0).
fn weights(c: &ModelConfig) -> Vec<f32> {
    let mut w = model::initial_weights(c, 2);
    let mut rng = Rng::new(5, Stream::Init);
    for x in w.iter_mut() {
        *x += (rng.normal() * 0.05) as f32;
    }
    w
}

fn composed_f64(c: &ModelConfig, w: &[f32], x: &[u32], y: &[u32]) -> (f64, Vec<f64>) {
    composed(c, w, x, y, DType::F64)
}

/// The composed model's loss and gradient (one whole-graph backward) in
/// `dtype`, widened to f64 (exactly).
fn composed(c: &ModelConfig, w: &[f32], x: &[u32], y: &[u32], dtype: DType) -> (f64, Vec<f64>) {
    let dev = Device::Cpu;
    let b = x.len() / c.context;
    let m = Gpt::new(c, w, dtype, &dev).expect("model");
    let xt = Tensor::from_slice(x, (b, c.context), &dev).expect("x");
    let yt = Tensor::from_slice(y, (b, c.context), &dev).expect("y");
    let loss = m.loss(&xt, &yt).expect("loss");
    let grads = loss.backward().expect("backward");
    let flat = m
        .vars()
        .flat_map(|(name, var)| {
            grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"))
                .flatten_all()
                .and_then(|g| g.to_dtype(DType::F64))
                .and_then(|g| g.to_vec1::<f64>())
                .expect("gradient")
        })
        .collect();
    let loss = loss.to_dtype(DType::F64).and_then(|l| l.to_scalar::<f64>());
    (loss.expect("loss"), flat)
}

#[test]
fn fused_model_equals_composed_model_in_f64() {
    let c = awkward();
    let slots = model::layout(&c);
    let w32 = weights(&c);
    let w: Vec<f64> = w32.iter().map(|v| f64::from(*v)).collect();
    for b in [1, 3] {
        let (x, y) = tokens(&c, b, b);
        let (want_loss, want_grad) = composed_f64(&c, &w32, &x, &y);
        let mut m = FusedGpt::<f64>::new(&c, &slots, 3).expect("fused");
        m.set_head_rows(4); // several chunks, the last one short
        let mut grad = vec![0.0; w.len()];
        let loss = m.forward_backward(&w, &mut grad, &x, &y).expect("step");
        assert!(
            (loss - want_loss).abs() < 1e-12,
            "b {b}: loss {loss} vs composed {want_loss}"
        );
        assert_eq!(m.loss(&w, &x, &y).expect("loss"), loss);
        // Candle's GELU backward uses 6-digit constants (0.797885,
        // 0.0356774), so Candle's gradients are off by ~1e-7 relative; the
        // central-difference test below holds the fused ones to 1e-8.
        for s in &slots {
            assert_close(
                &s.name,
                &grad[s.offset..s.offset + s.len],
                &want_grad[s.offset..s.offset + s.len],
                1e-5,
            );
        }
        // Gradients accumulate: a second micro-batch adds its own.
        let mut twice = grad.clone();
        m.forward_backward(&w, &mut twice, &x, &y).expect("step");
        assert_close(
            "accumulated",
            &twice,
            &grad.iter().map(|g| 2.0 * g).collect::<Vec<_>>(),
            1e-14,
        );
    }
}

#[test]
fn fused_model_gradient_matches_central_differences() {
    let c = awkward();
    let slots = model::layout(&c);
    let w: Vec<f64> = weights(&c).iter().map(|v| f64::from(*v)).collect();
    let (x, y) = tokens(&c, 2, 0);
    let mut m = FusedGpt::<f64>::new(&c, &slots, 2).expect("fused");
    let mut grad = vec![0.0; w.len()];
    m.forward_backward(&w, &mut grad, &x, &y).expect("step");
    // A handful of elements of every parameter.
    for s in &slots {
        for i in [0, s.len / 2, s.len - 1] {
            let at = s.offset + i;
            let h = 1e-5;
            let mut plus = w.clone();
            plus[at] += h;
            let mut minus = w.clone();
            minus[at] -= h;
            let numeric = (m.loss(&plus, &x, &y).expect("loss")
                - m.loss(&minus, &x, &y).expect("loss"))
                / (2.0 * h);
            assert!(
                (numeric - grad[at]).abs() < 1e-8 * (1.0 + numeric.abs()),
                "{}[{i}]: analytic {} vs central difference {numeric}",
                s.name,
                grad[at]
            );
        }
    }
}

#[test]
fn every_parameter_receives_a_gradient_from_the_fused_model() {
    let c = awkward();
    let slots = model::layout(&c);
    let w = weights(&c);
    let (x, y) = tokens(&c, 2, 1);
    let mut m = FusedGpt::<f32>::new(&c, &slots, 2).expect("fused");
    let mut grad = vec![0.0f32; w.len()];
    m.forward_backward(&w, &mut grad, &x, &y).expect("step");
    let silent: Vec<&str> = slots
        .iter()
        .filter(|s| {
            let g = &grad[s.offset..s.offset + s.len];
            !g.iter().all(|v| v.is_finite()) || g.iter().all(|v| *v == 0.0)
        })
        .map(|s| s.name.as_str())
        .collect();
    assert!(
        silent.is_empty(),
        "no (finite, non-zero) gradient reached: {silent:?}"
    );
}

#[test]
fn f32_fused_model_tracks_the_f64_one() {
    let c = awkward();
    let slots = model::layout(&c);
    let w32 = weights(&c);
    let w64: Vec<f64> = w32.iter().map(|v| f64::from(*v)).collect();
    let (x, y) = tokens(&c, 3, 2);
    let mut m32 = FusedGpt::<f32>::new(&c, &slots, 3).expect("fused");
    let mut m64 = FusedGpt::<f64>::new(&c, &slots, 3).expect("fused");
    let (mut g32, mut g64) = (vec![0.0f32; w32.len()], vec![0.0f64; w32.len()]);
    let l32 = m32.forward_backward(&w32, &mut g32, &x, &y).expect("step");
    let l64 = m64.forward_backward(&w64, &mut g64, &x, &y).expect("step");
    assert!((l32 - l64).abs() < 1e-5 * l64, "{l32} vs {l64}");
    let g32: Vec<f64> = g32.iter().map(|v| f64::from(*v)).collect();
    assert_close("f32 gradient", &g32, &g64, 1e-4);
}

#[test]
fn bad_batches_are_refused_not_indexed() {
    let c = awkward();
    let slots = model::layout(&c);
    let w = weights(&c);
    let mut m = FusedGpt::<f32>::new(&c, &slots, 2).expect("fused");
    let mut grad = vec![0.0f32; w.len()];
    let (mut x, y) = tokens(&c, 2, 0);
    x[5] = c.vocab_size as u32;
    let e = m
        .forward_backward(&w, &mut grad, &x, &y)
        .expect_err("token past the vocabulary");
    assert!(
        e.to_string().contains("not below model.vocab_size = 13"),
        "{e}"
    );
    let (x, y) = tokens(&c, 3, 0);
    let e = m
        .loss(&w, &x, &y)
        .expect_err("more sequences than the buffers hold");
    assert!(e.to_string().contains("does not fit"), "{e}");
    let e = m
        .loss(&w, &x[..5], &y[..5])
        .expect_err("not whole sequences");
    assert!(e.to_string().contains("targets"), "{e}");
    assert!(
        grad.iter().all(|g| *g == 0.0),
        "a refused batch changes no gradient"
    );
}

// ---- the composed engine's segmented backward ------------------------------------

/// Records each bucket all-reduce and how much of the token embedding's
/// gradient was written when it came. It claims two ranks (a sum over one
/// is skipped: nothing to call) but sums nothing.
#[derive(Debug, Default)]
struct Recorder {
    wte: std::ops::Range<usize>,
    calls: Vec<(std::ops::Range<usize>, usize)>,
}

impl crate::collective::Collective for Recorder {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        2
    }
    fn all_reduce_sum(&mut self, _: &mut [f32]) -> Result<(), crate::collective::CollectiveError> {
        Ok(())
    }
    fn all_reduce_tensor(
        &mut self,
        t: &Tensor,
        part: std::ops::Range<usize>,
    ) -> Result<(), crate::collective::CollectiveError> {
        let values = t.to_vec1::<f32>().expect("gradient");
        let written = values[self.wte.clone()]
            .iter()
            .filter(|v| **v != 0.0)
            .count();
        self.calls.push((part, written));
        Ok(())
    }
}

/// The segmented backward (block by block, each block's input a fresh
/// leaf) gives the gradients of one whole-graph backward, and — on the
/// step's last micro-batch — all-reduces every bucket in launch order as
/// backward finishes it: all but the token embedding's before backward
/// has reached the embedding. A second micro-batch adds to the first.
#[test]
fn segmented_backward_equals_one_backward_and_reduces_as_it_goes() {
    use stride_job::config::OptimConfig;

    use crate::transfer::Transfers;

    let c = ModelConfig {
        n_layer: 3,
        ..awkward()
    };
    let w = weights(&c);
    let (x, y) = tokens(&c, 2, 1);
    let dev = Device::Cpu;
    let slots = model::layout(&c);
    // One whole-graph backward, f32.
    let (want, whole) = composed(&c, &w, &x, &y, DType::F32);

    let mut engine = super::Composed::new(
        &c,
        &w,
        DType::F32,
        &dev,
        &OptimConfig::default(),
        Transfers::default(),
    )
    .expect("engine");
    let wte = slots
        .iter()
        .find(|s| s.name == "transformer.wte.weight")
        .map(|s| s.offset..s.offset + s.len)
        .expect("wte");
    let mut recorder = Recorder {
        wte: wte.clone(),
        calls: Vec::new(),
    };
    engine.begin_step();
    let value = engine
        .forward_backward(&x, &y, Some(&mut recorder))
        .and_then(|l| Ok(f64::from(l.to_scalar::<f32>()?)))
        .expect("forward and backward");
    assert!((value - want).abs() <= 1e-6 * want, "{value} vs {want}");
    let mut got = Vec::new();
    engine.state().grad_to_host(&mut got).expect("gradient");
    assert_eq!(got.len(), whole.len());
    for (i, (g, w)) in got.iter().map(|g| f64::from(*g)).zip(&whole).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * (1e-2 + w.abs()),
            "[{i}]: {g} vs {w}"
        );
    }

    let order: Vec<_> = recorder.calls.iter().map(|(r, _)| r.clone()).collect();
    assert_eq!(
        order,
        engine.state().buckets(),
        "every bucket, in launch order"
    );
    let (last, before) = recorder.calls.split_last().expect("calls");
    assert_eq!(last.0, wte, "the tied embedding goes last");
    assert!(
        before.iter().all(|(_, written)| *written == 0),
        "buckets went before backward reached the embedding: {:?}",
        recorder.calls
    );
    assert_eq!(
        last.1,
        wte.len(),
        "the embedding's own bucket comes once it is written"
    );
    engine.all_reduce(&mut recorder).expect("nothing left");
    assert_eq!(recorder.calls.len(), order.len(), "no bucket twice");

    // Two micro-batches: the second adds to the first.
    engine.begin_step();
    for reduce in [false, true] {
        let r: Option<&mut dyn crate::collective::Collective> =
            if reduce { Some(&mut recorder) } else { None };
        engine
            .forward_backward(&x, &y, r)
            .expect("forward and backward");
    }
    let mut twice = Vec::new();
    engine.state().grad_to_host(&mut twice).expect("gradient");
    for (a, b) in twice.iter().zip(&got) {
        assert_eq!(
            *a,
            b + b,
            "the same micro-batch twice sums to twice its gradient"
        );
    }
}

// ---- the GPU step, emulated ------------------------------------------------------

/// A model the CUDA kernels take (head size a multiple of 8), with a
/// context that is not a multiple of their 32-row tiles and a vocabulary
/// that fills no block.
fn gpu_shaped() -> ModelConfig {
    ModelConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        vocab_size: 37,
        context: 13,
    }
}

/// The largest |got − want| over a tensor, relative to its largest |want|.
fn worst(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0f64, |m, w| m.max(w.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .fold(0f64, |m, (g, w)| m.max((g - w).abs() / scale))
}

/// The whole model's forward and backward through the CUDA kernels (run by
/// their CPU emulator, products by the cuBLASLt contract on the host), in
/// f32 and in bf16, against the CPU engine in f64: the loss, and every
/// parameter's gradient, over two micro-batches (the second adds to the
/// first). The CUDA backend's GPU test holds the GPU to the same
/// tolerances ([`EMULATED_F32`], [`EMULATED_BF16`]).
#[test]
fn the_gpu_step_emulated_equals_the_cpu_engine() {
    use super::emulated::Emulated;
    use super::gpt::Gpt;
    use stride_cuda_kernels::Bf16;
    let c = gpu_shaped();
    let slots = model::layout(&c);
    let w32 = weights(&c);
    let batches = [tokens(&c, 3, 1), tokens(&c, 2, 2)];
    let (want_loss, want) = cpu_reference(&c, &slots, &w32, &batches);

    // f32 storage: the kernels' and products' own rounding only.
    let mut gpu = Gpt::on(Emulated::<f32>::default(), &c, &slots, 3).expect("emulated f32");
    gpu.set_head_rows(7); // several chunks of the head, the last one short
    let mut grad = vec![0f32; w32.len()];
    let sums: Vec<f64> = batches
        .iter()
        .map(|(x, y)| {
            gpu.forward_backward_sum(&w32.as_slice(), &mut grad.as_mut_slice(), x, y)
                .expect("emulated step")
        })
        .collect();
    let (loss, gradient) = (&want_loss, &want);
    assert_step(
        "f32",
        &slots,
        &batches,
        &sums,
        &grad,
        loss,
        gradient,
        EMULATED_F32,
    );

    // bf16 storage (the H100 configuration): weights rounded to bf16,
    // activations stored in bf16, gradients and every sum in f32.
    let wb: Vec<Bf16> = w32.iter().map(|v| Bf16::from_f32(*v)).collect();
    let mut gpu = Gpt::on(Emulated::<Bf16>::default(), &c, &slots, 3).expect("emulated bf16");
    let mut grad = vec![0f32; w32.len()];
    let sums: Vec<f64> = batches
        .iter()
        .map(|(x, y)| {
            gpu.forward_backward_sum(&wb.as_slice(), &mut grad.as_mut_slice(), x, y)
                .expect("emulated bf16 step")
        })
        .collect();
    assert_step(
        "bf16",
        &slots,
        &batches,
        &sums,
        &grad,
        loss,
        gradient,
        EMULATED_BF16,
    );
}

/// Three whole training steps — forward and backward, the global norm,
/// clipping, AdamW — with the GPU's kernels in f32 (emulated) against the
/// CPU engine: the weights, the gradient norm and both AdamW moments agree
/// to 1e-4 of their scale after every step (the weights alone would be a
/// weak check: one AdamW step moves them by about ±lr whatever the
/// gradient).
#[test]
fn three_emulated_gpu_steps_track_the_cpu_engine() {
    use super::emulated::Emulated;
    use super::gpt::Gpt;
    use crate::optim::{AdamW, clip_global_norm};
    use stride_job::config::OptimConfig;
    let c = gpu_shaped();
    let slots = model::layout(&c);
    let optim = OptimConfig::default();
    let mut w_cpu = weights(&c);
    let mut w_gpu = w_cpu.clone();
    let (mut o_cpu, mut o_gpu) = (AdamW::new(&optim, &slots), AdamW::new(&optim, &slots));
    let mut cpu = FusedGpt::<f32>::new(&c, &slots, 2).expect("cpu");
    let mut gpu = Gpt::on(Emulated::<f32>::default(), &c, &slots, 2).expect("emulated");
    let lr = 1e-3;
    let mut noise = vec![false; w_cpu.len()];
    for step in 0..3 {
        let (x, y) = tokens(&c, 2, 10 + step);
        let mut g_cpu = vec![0f32; w_cpu.len()];
        let mut g_gpu = vec![0f32; w_gpu.len()];
        cpu.forward_backward(&w_cpu, &mut g_cpu, &x, &y)
            .expect("cpu");
        gpu.forward_backward_sum(&w_gpu.as_slice(), &mut g_gpu.as_mut_slice(), &x, &y)
            .expect("emulated");
        let n_cpu = clip_global_norm(&mut g_cpu, optim.grad_clip);
        let n_gpu = clip_global_norm(&mut g_gpu, optim.grad_clip);
        assert!(
            ((n_gpu - n_cpu) / n_cpu).abs() < 1e-4,
            "step {step}: gradient norm {n_gpu} vs {n_cpu}"
        );
        o_cpu.update(&mut w_cpu, &g_cpu, lr);
        o_gpu.update(&mut w_gpu, &g_gpu, lr);
        mark_noise(&mut noise, &slots, &g_cpu, &g_gpu);
        assert_tracks(
            &format!("step {step}"),
            step + 1,
            lr,
            &slots,
            &noise,
            [
                ("weights", &w_gpu, &w_cpu),
                ("first moments", &o_gpu.m, &o_cpu.m),
                ("second moments", &o_gpu.v, &o_cpu.v),
            ],
        );
    }
}

/// Marks the weights whose gradient is cancellation noise in either run
/// (`a`, `b`: the same step's gradients, each scaled as its run keeps it):
/// below 1e-6 of its tensor's largest in that run. AdamW's normalised
/// update g/(|g| + ε) of such a gradient is noise too, whatever the
/// engine; [`assert_tracks`] holds those weights to 2·lr a step. Fewer
/// than 1 % of the weights may be noise.
pub(crate) fn mark_noise(
    noise: &mut [bool],
    slots: &[stride_job::params::Slot],
    a: &[f32],
    b: &[f32],
) {
    for s in slots {
        let r = s.offset..s.offset + s.len;
        let floor = |g: &[f32]| 1e-6 * g[r.clone()].iter().fold(0f32, |m, g| m.max(g.abs()));
        let (fa, fb) = (floor(a), floor(b));
        for i in r.clone().filter(|&i| a[i].abs() < fa || b[i].abs() < fb) {
            noise[i] = true;
        }
    }
    let noisy = noise.iter().filter(|n| **n).count();
    assert!(
        noisy * 100 < noise.len(),
        "{noisy} noisy gradients of {}",
        noise.len()
    );
}

/// Two runs' states after `steps` AdamW steps at `lr` agree: the weights
/// and both moments ((what, got, want)) within 1e-4 of each tensor's
/// largest |want|, the weights [`mark_noise`] marked within 2·lr a step
/// (the weights alone would be a weak check: one AdamW step moves them by
/// about ±lr whatever the gradient).
pub(crate) fn assert_tracks(
    when: &str,
    steps: usize,
    lr: f64,
    slots: &[stride_job::params::Slot],
    noise: &[bool],
    state: [(&str, &[f32], &[f32]); 3],
) {
    for (what, got, want) in state {
        assert_eq!(got.len(), want.len(), "{when}: {what}");
        for s in slots {
            let r = s.offset..s.offset + s.len;
            let scale = want[r.clone()].iter().fold(0f32, |m, x| m.max(x.abs()));
            for i in r {
                let allowed = if what == "weights" && noise[i] {
                    2.0 * lr as f32 * steps as f32
                } else {
                    1e-4 * scale
                };
                let err = (got[i] - want[i]).abs();
                assert!(
                    err <= allowed,
                    "{when}, {what} of {} [{i}]: {} vs {} (allowed {allowed:e})",
                    s.name,
                    got[i],
                    want[i]
                );
            }
        }
    }
}

/// Mixed precision as the H100 runs it (emulated): f32 master weights and
/// AdamW moments, a bf16 copy of the weights refreshed after every update,
/// bf16 activations, f32 gradients — 20 steps, each step's loss within 1 %
/// of the same steps in f32.
#[test]
fn twenty_emulated_bf16_steps_stay_within_one_percent_of_f32() {
    use super::emulated::Emulated;
    use super::gpt::Gpt;
    use crate::optim::{AdamW, clip_global_norm};
    use stride_cuda_kernels::Bf16;
    use stride_job::config::OptimConfig;
    let c = gpu_shaped();
    let slots = model::layout(&c);
    let optim = OptimConfig::default();
    let mut w32 = weights(&c);
    let mut master = w32.clone();
    let (mut o32, mut o16) = (AdamW::new(&optim, &slots), AdamW::new(&optim, &slots));
    let mut f32_gpu = Gpt::on(Emulated::<f32>::default(), &c, &slots, 2).expect("f32");
    let mut bf16_gpu = Gpt::on(Emulated::<Bf16>::default(), &c, &slots, 2).expect("bf16");
    for step in 0..20 {
        let (x, y) = tokens(&c, 2, 100 + step);
        let mut g32 = vec![0f32; w32.len()];
        let mut g16 = vec![0f32; w32.len()];
        let l32 = f32_gpu
            .forward_backward_sum(&w32.as_slice(), &mut g32.as_mut_slice(), &x, &y)
            .expect("f32 step");
        let copy: Vec<Bf16> = master.iter().map(|v| Bf16::from_f32(*v)).collect();
        let l16 = bf16_gpu
            .forward_backward_sum(&copy.as_slice(), &mut g16.as_mut_slice(), &x, &y)
            .expect("bf16 step");
        assert!(
            ((l16 - l32) / l32).abs() < 0.01,
            "step {step}: bf16 loss {l16} vs f32 {l32}"
        );
        clip_global_norm(&mut g32, optim.grad_clip);
        clip_global_norm(&mut g16, optim.grad_clip);
        o32.update(&mut w32, &g32, 3e-3);
        o16.update(&mut master, &g16, 3e-3);
    }
}

// ---- the GPU step through a backend's own buffers ---------------------------------

/// The CPU engine in f64 over `batches` (accumulating one gradient): each
/// micro-batch's mean loss, and the gradient.
fn cpu_reference(
    c: &ModelConfig,
    slots: &[stride_job::params::Slot],
    w32: &[f32],
    batches: &[(Vec<u32>, Vec<u32>)],
) -> (Vec<f64>, Vec<f64>) {
    let w64: Vec<f64> = w32.iter().map(|v| f64::from(*v)).collect();
    let mut cpu = FusedGpt::<f64>::new(c, slots, 3).expect("cpu");
    let mut grad = vec![0.0f64; w64.len()];
    let losses = batches
        .iter()
        .map(|(x, y)| {
            cpu.forward_backward(&w64, &mut grad, x, y)
                .expect("cpu step")
        })
        .collect();
    (losses, grad)
}

/// The whole model's forward and backward on backend `B` with the weights
/// and the gradient in the backend's own buffers, as a trainer on a device
/// holds them: `w` uploaded, then `batches` in turn (the gradient
/// accumulates), then each micro-batch's summed loss and the gradient
/// read back.
fn steps_on<B: super::backend::Backend<G = f32>>(
    model: &mut super::gpt::Gpt<B>,
    w: &[B::A],
    batches: &[(Vec<u32>, Vec<u32>)],
) -> (Vec<f64>, Vec<f32>) {
    let be = model.backend_mut();
    let mut weights = be.alloc::<B::A>(w.len()).expect("weights");
    be.upload(B::view_mut(&mut weights), w).expect("upload");
    let mut grad = be.alloc::<f32>(w.len()).expect("gradient");
    let losses: Vec<B::Loss> = batches
        .iter()
        .map(|(x, y)| {
            model
                .forward_backward_sum(&B::view(&weights), &mut B::view_mut(&mut grad), x, y)
                .expect("step")
        })
        .collect();
    let be = model.backend_mut();
    let sums = losses
        .iter()
        .map(|l| be.loss_value(l).expect("loss"))
        .collect();
    let mut host = vec![0f32; w.len()];
    be.download(B::view(&grad), &mut host).expect("download");
    (sums, host)
}

/// The GPU step's tolerances against the CPU engine in f64, as (the loss,
/// relative; each parameter's gradient, relative to its largest value):
/// f32 storage, where only the kernels' and products' rounding differs,
/// and bf16 storage.
const EMULATED_F32: (f64, f64) = (1e-5, 2e-5);
const EMULATED_BF16: (f64, f64) = (1e-2, 6e-2);

/// Each micro-batch's loss within `loss_tol` (relative) of the CPU's, and
/// every parameter's gradient within `grad_tol` of its scale.
#[allow(clippy::too_many_arguments)]
fn assert_step(
    what: &str,
    slots: &[stride_job::params::Slot],
    batches: &[(Vec<u32>, Vec<u32>)],
    sums: &[f64],
    grad: &[f32],
    want_loss: &[f64],
    want: &[f64],
    (loss_tol, grad_tol): (f64, f64),
) {
    assert_eq!(sums.len(), batches.len(), "{what}: one loss a micro-batch");
    for (((x, _), sum), want_loss) in batches.iter().zip(sums).zip(want_loss) {
        let loss = sum / x.len() as f64;
        assert!(
            ((loss - want_loss) / want_loss).abs() < loss_tol,
            "{what}: loss {loss} vs {want_loss}"
        );
    }
    for s in slots {
        let got: Vec<f64> = grad[s.offset..s.offset + s.len]
            .iter()
            .map(|g| f64::from(*g))
            .collect();
        let err = worst(&got, &want[s.offset..s.offset + s.len]);
        assert!(
            err < grad_tol,
            "{what} {}: gradient off by {err:e} of its scale",
            s.name
        );
    }
}

/// The path a device backend takes (weights uploaded into its buffers,
/// the gradient and the losses read back) gives, on the emulated GPU,
/// exactly what the host slices give; a copy of the wrong length is
/// refused, not a panic.
#[test]
fn emulated_backend_through_its_own_buffers_equals_host_slices() {
    use super::backend::Backend;
    use super::emulated::Emulated;
    use super::gpt::Gpt;
    let c = gpu_shaped();
    let slots = model::layout(&c);
    let w32 = weights(&c);
    let batches = [tokens(&c, 3, 1), tokens(&c, 2, 2)];
    let mut direct = Gpt::on(Emulated::<f32>::default(), &c, &slots, 3).expect("emulated");
    let mut want = vec![0f32; w32.len()];
    let want_sums: Vec<f64> = batches
        .iter()
        .map(|(x, y)| {
            direct
                .forward_backward_sum(&w32.as_slice(), &mut want.as_mut_slice(), x, y)
                .expect("step")
        })
        .collect();
    let mut model = Gpt::on(Emulated::<f32>::default(), &c, &slots, 3).expect("emulated");
    let (sums, grad) = steps_on(&mut model, &w32, &batches);
    assert_eq!(sums, want_sums);
    assert_eq!(grad, want);

    let be = model.backend_mut();
    let mut short = vec![0f32; 3];
    let e = be
        .upload(short.as_mut_slice(), &w32[..4])
        .expect_err("4 values into 3");
    assert!(
        e.to_string().contains("4 elements into a buffer of 3"),
        "{e}"
    );
    let e = be
        .download(&w32[..2], short.as_mut_slice())
        .expect_err("2 values into 3");
    assert!(
        e.to_string().contains("2 elements into a buffer of 3"),
        "{e}"
    );
}

// ---- the engine choice ------------------------------------------------------------

/// `worker.engine` × device × compute dtype × shape → engine, in one
/// table: `auto` is fused wherever the fused kernels take the model
/// (the CPU's in f32, CUDA's in f32 or bf16 for the shapes
/// `stride_cuda_kernels::supports` accepts), composed otherwise — with a
/// note only where CUDA's fused engine was expected; `fused` where it
/// cannot run is refused naming the key and the reason; `composed` is
/// composed everywhere.
#[test]
fn the_engine_choice_is_one_table() {
    use super::{DeviceKind as D, Resolved as R, resolve};
    use stride_cuda_kernels::ModelShape;
    use stride_job::config::Engine as Choice;
    let gpt2 = ModelShape {
        n_head: 12,
        n_embd: 768,
        vocab_size: 50_304,
        context: 1024,
        micro_batch: 16,
    };
    // Head size 3: the CPU kernels take it, the CUDA ones do not.
    let odd = ModelShape {
        n_head: 3,
        n_embd: 9,
        vocab_size: 13,
        context: 7,
        micro_batch: 3,
    };
    let (f32, bf16) = (DType::F32, DType::BF16);
    type Want = Result<(R, Option<&'static [&'static str]>), &'static [&'static str]>;
    let cases: [(Choice, D, DType, ModelShape, Want); 15] = [
        (Choice::Auto, D::Cpu, f32, gpt2, Ok((R::FusedCpu, None))),
        (Choice::Auto, D::Cpu, f32, odd, Ok((R::FusedCpu, None))),
        (Choice::Auto, D::Cpu, bf16, gpt2, Ok((R::Composed, None))),
        (
            Choice::Auto,
            D::Cuda,
            bf16,
            gpt2,
            Ok((R::FusedCuda { bf16: true }, None)),
        ),
        (
            Choice::Auto,
            D::Cuda,
            f32,
            gpt2,
            Ok((R::FusedCuda { bf16: false }, None)),
        ),
        (
            Choice::Auto,
            D::Cuda,
            bf16,
            odd,
            Ok((
                R::Composed,
                Some(&["composed engine", "`model.n_head`", "head size"]),
            )),
        ),
        (Choice::Auto, D::Other, f32, gpt2, Ok((R::Composed, None))),
        (
            Choice::Composed,
            D::Cuda,
            bf16,
            gpt2,
            Ok((R::Composed, None)),
        ),
        (Choice::Composed, D::Cpu, f32, gpt2, Ok((R::Composed, None))),
        (Choice::Fused, D::Cpu, f32, odd, Ok((R::FusedCpu, None))),
        (
            Choice::Fused,
            D::Cuda,
            bf16,
            gpt2,
            Ok((R::FusedCuda { bf16: true }, None)),
        ),
        (
            Choice::Fused,
            D::Cpu,
            bf16,
            gpt2,
            Err(&["worker.engine = fused", "computes in f32"]),
        ),
        (
            Choice::Fused,
            D::Cuda,
            f32,
            odd,
            Err(&[
                "worker.engine = fused",
                "`model.n_head`",
                "multiples of 8",
                "`composed`",
            ]),
        ),
        (
            Choice::Fused,
            D::Cuda,
            bf16,
            ModelShape {
                micro_batch: 6000,
                context: 8,
                ..gpt2
            },
            Err(&["`train.micro_batch`", "65535"]),
        ),
        (
            Choice::Fused,
            D::Other,
            f32,
            gpt2,
            Err(&["CPU and on CUDA"]),
        ),
    ];
    for (choice, device, dtype, shape, want) in cases {
        let got = resolve(choice, device, dtype, &shape);
        let case = format!("{choice:?} on {device:?} in {dtype:?}, {shape:?}: {got:?}");
        match (got, want) {
            (Ok((r, note)), Ok((want_r, want_note))) => {
                assert_eq!(r, want_r, "{case}");
                match (note, want_note) {
                    (None, None) => {}
                    (Some(note), Some(parts)) => {
                        for part in parts {
                            assert!(note.contains(part), "{part:?} in the note: {case}");
                        }
                    }
                    _ => panic!("the note: {case}"),
                }
            }
            (Err(e), Err(parts)) => {
                for part in parts {
                    assert!(e.contains(part), "{part:?} in the refusal: {case}");
                }
            }
            _ => panic!("{case}"),
        }
    }
}

/// `Engine::new` builds what the table says and refuses what it refuses,
/// with its message.
#[test]
fn engine_new_builds_the_resolved_engine_or_refuses_it() {
    use stride_job::config::{Engine as Choice, OptimConfig, Precision};

    use super::{Engine, Setup};
    use crate::transfer::Transfers;
    let c = gpu_shaped();
    let w = weights(&c);
    let optim = OptimConfig::default();
    let build = |choice, precision| {
        Engine::new(
            choice,
            Setup {
                model: &c,
                optim: &optim,
                weights: w.clone(),
                micro_batch: 2,
                device: &Device::Cpu,
                precision,
                transfers: Transfers::default(),
                shard: None,
            },
        )
    };
    let fused = build(Choice::Auto, Precision::Auto).expect("auto on the CPU");
    assert_eq!((fused.name(), fused.is_device_resident()), ("fused", false));
    assert_eq!(fused.len(), w.len());
    let composed = build(Choice::Auto, Precision::Bf16).expect("bf16 on the CPU");
    assert_eq!(
        (composed.name(), composed.is_device_resident()),
        ("composed", true)
    );
    let e = build(Choice::Fused, Precision::Bf16).expect_err("fused bf16 on the CPU");
    assert!(e.to_string().contains("computes in f32 on the CPU"), "{e}");
    // Every engine hashes the same weights alike.
    assert_eq!(
        fused.weights_hash().expect("hash"),
        composed.weights_hash().expect("hash")
    );
}

// ---- the fused engine's training state on the emulated GPU ------------------------

/// One whole step of `f` over `batches` (micro-batches, one rank), as the
/// trainer runs it: the summed gradient (before the update) and the
/// scalars it reads back.
fn fused_step<B: super::backend::Train>(
    f: &mut super::Fused<B>,
    batches: &[(Vec<u32>, Vec<u32>)],
    lr: f64,
) -> (Vec<f32>, super::Scalars) {
    use crate::collective::Solo;
    f.begin_step().expect("begin");
    for (x, y) in batches {
        f.forward_backward(x, y).expect("forward and backward");
    }
    f.sum_gradient(&mut Solo).expect("all-reduce");
    let grad = f.gradient().expect("gradient");
    (
        grad,
        f.update(batches.len(), lr, &mut Solo).expect("update"),
    )
}

/// Weights, both moments and the update count of `f`.
fn fused_state<B: super::backend::Train>(
    f: &super::Fused<B>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, u64) {
    let (mut w, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new());
    let step = f.read_state(&mut w, &mut m, &mut v).expect("state");
    (w, m, v, step)
}

/// A fused engine and its state on `backend` for `gpu_shaped` (micro-batches
/// of 2), from the tests' weights.
fn fused_on<B: super::backend::Train>(backend: B, lr_clip: f64) -> super::Fused<B> {
    fused_on_shard(backend, lr_clip, None)
}

/// [`fused_on`], keeping the optimizer state of `shard` only.
fn fused_on_shard<B: super::backend::Train>(
    backend: B,
    lr_clip: f64,
    shard: Option<std::ops::Range<usize>>,
) -> super::Fused<B> {
    use stride_job::config::OptimConfig;
    let c = gpu_shaped();
    let optim = OptimConfig {
        grad_clip: lr_clip,
        ..OptimConfig::default()
    };
    super::Fused::new(
        backend,
        &c,
        &model::layout(&c),
        2,
        weights(&c),
        &optim,
        Device::Cpu,
        crate::transfer::Transfers::default(),
        shard,
    )
    .expect("fused engine")
}

/// The fused CUDA engine's whole step — its state in the backend's
/// buffers, the gradient zeroed and accumulated over two micro-batches,
/// the optimizer step as the GPU's kernels (sum of squares, gradient
/// factor, AdamW; emulated), the losses and the norm read at the end —
/// tracks the fused CPU engine's for three steps (clipping active): the
/// losses to 1e-5, the norm to 1e-4, the weights and both moments to 1e-4
/// of their scale ([`assert_tracks`]).
#[test]
fn the_fused_state_on_the_emulated_gpu_tracks_the_cpu_engine() {
    use super::backend::Cpu;
    use super::emulated::Emulated;
    let c = gpu_shaped();
    let slots = model::layout(&c);
    let lr = 1e-3;
    let mut cpu = fused_on(Cpu::<f32>::default(), 0.5);
    let mut gpu = fused_on(Emulated::<f32>::default(), 0.5);
    let mut noise = vec![false; weights(&c).len()];
    let mut clipped = 0;
    for step in 0..3 {
        let batches = [tokens(&c, 2, 10 + step), tokens(&c, 1, 20 + step)];
        let (g_cpu, s_cpu) = fused_step(&mut cpu, &batches, lr);
        let (g_gpu, s_gpu) = fused_step(&mut gpu, &batches, lr);
        assert!(
            ((s_gpu.loss_sum - s_cpu.loss_sum) / s_cpu.loss_sum).abs() < 1e-5,
            "step {step}: {s_gpu:?} vs {s_cpu:?}"
        );
        assert!(
            ((s_gpu.grad_norm - s_cpu.grad_norm) / s_cpu.grad_norm).abs() < 1e-4,
            "step {step}: {s_gpu:?} vs {s_cpu:?}"
        );
        clipped += usize::from(s_cpu.grad_norm > 0.5);
        mark_noise(&mut noise, &slots, &g_cpu, &g_gpu);
        let (a, b) = (fused_state(&gpu), fused_state(&cpu));
        assert_eq!(a.3, b.3, "update counts");
        assert_tracks(
            &format!("step {step}"),
            step + 1,
            lr,
            &slots,
            &noise,
            [
                ("weights", &a.0, &b.0),
                ("first moments", &a.1, &b.1),
                ("second moments", &a.2, &b.2),
            ],
        );
    }
    assert!(clipped > 0, "clipping was exercised");
}

/// One rank's three steps of [`sharded_on_the_emulated_gpu`]: each step's
/// scalars, then all its weights and the moments it keeps.
type RankRun = (
    Vec<super::Scalars>,
    Vec<f32>,
    Vec<f32>,
    Vec<f32>,
    std::ops::Range<usize>,
);

/// Three steps of `world` ranks on the ring, each the fused engine on the
/// emulated GPU backend `make()` (the CUDA backend's kernels), its
/// optimizer state whole or (`shard`) by shard: the step as the trainer
/// runs it — backward over two micro-batches, the gradient summed (or
/// reduce-scattered), the update, the weights gathered.
fn sharded_on_the_emulated_gpu<B: super::backend::Train + Send>(
    world: usize,
    shard: bool,
    make: impl Fn() -> B + Sync,
) -> Vec<RankRun> {
    let c = gpu_shaped();
    let n = weights(&c).len();
    crate::collective::local_ring(world, |mut coll| {
        let rank = coll.rank();
        let mut f = fused_on_shard(make(), 0.5, shard.then(|| coll.shard(n)));
        let mut scalars = Vec::new();
        for step in 0..3 {
            f.begin_step().expect("begin");
            for b in 0..2 {
                let (x, y) = tokens(&c, 2, 1000 * step + 10 * rank + b);
                f.forward_backward(&x, &y).expect("forward and backward");
            }
            f.sum_gradient(coll.as_mut()).expect("sum");
            scalars.push(f.update(2 * world, 1e-3, coll.as_mut()).expect("update"));
            f.gather_weights(coll.as_mut()).expect("gather");
        }
        let (mut w, mut m, mut v) = (vec![0f32; n], Vec::new(), Vec::new());
        f.weights_into(&mut w).expect("weights");
        let mut part = Vec::new();
        f.read_state(&mut part, &mut m, &mut v).expect("state");
        (scalars, w, m, v, f.shard())
    })
    .expect("ring")
}

/// A sharded optimizer through the GPU's optimizer kernels (emulated), on
/// the ring, 2 and 3 ranks, f32 and bf16 compute: each rank keeps its
/// shard's moments only, sums its shard's squares and sums that over the
/// ranks in place (as NCCL sums the one device value: no host wait), runs
/// the gradient factor and AdamW kernels on its shard, gathers the
/// weights and refreshes the bf16 compute copy from them. Three steps
/// (clipping active) track the same job with the whole state: losses and
/// norms to 1e-5, weights to 1e-6, each shard's moments to 1e-5 of the
/// whole state's (the norm's f32 sum is grouped by shard, so not the same
/// bits — the CPU's f64 sums are, `trainer`'s test).
#[test]
fn a_sharded_optimizer_on_the_emulated_gpu_tracks_the_whole_state() {
    use super::emulated::Emulated;
    use stride_cuda_kernels::Bf16;
    fn check(what: &str, whole: &[RankRun], sharded: &[RankRun], n: usize) {
        let close = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * b.abs().max(1e-3);
        let mut covered = 0;
        for (rank, (a, b)) in whole.iter().zip(sharded).enumerate() {
            for (step, (x, y)) in a.0.iter().zip(&b.0).enumerate() {
                assert!(
                    close(y.loss_sum, x.loss_sum, 1e-5) && close(y.grad_norm, x.grad_norm, 1e-5),
                    "{what} rank {rank} step {step}: sharded {y:?}, whole {x:?}"
                );
            }
            let worst =
                a.1.iter()
                    .zip(&b.1)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
            assert!(
                worst <= 1e-6,
                "{what} rank {rank}: weights apart by {worst}"
            );
            assert_eq!(b.1, sharded[0].1, "{what}: ranks hold the same weights");
            let at = b.4.start;
            assert_eq!(
                b.4.len(),
                b.2.len(),
                "{what} rank {rank}: moments of its shard only"
            );
            covered += b.2.len();
            for (moments, (whole_m, shard_m)) in [("first", (&a.2, &b.2)), ("second", (&a.3, &b.3))]
            {
                let scale = whole_m.iter().fold(0f32, |s, x| s.max(x.abs()));
                let apart = shard_m
                    .iter()
                    .zip(&whole_m[at..at + shard_m.len()])
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(
                    apart <= 1e-5 * scale,
                    "{what} rank {rank}: {moments} moments apart by {apart} (scale {scale})"
                );
            }
        }
        assert_eq!(covered, n, "{what}: the shards cover the state once");
    }
    let n = weights(&gpu_shaped()).len();
    for world in [2, 3] {
        let whole = sharded_on_the_emulated_gpu(world, false, Emulated::<f32>::default);
        let sharded = sharded_on_the_emulated_gpu(world, true, Emulated::<f32>::default);
        check(&format!("f32, world {world}"), &whole, &sharded, n);
        assert!(sharded[0].2.len() < n, "a rank keeps part of the moments");
    }
    let whole = sharded_on_the_emulated_gpu(2, false, Emulated::<Bf16>::default);
    let sharded = sharded_on_the_emulated_gpu(2, true, Emulated::<Bf16>::default);
    check("bf16, world 2", &whole, &sharded, n);
}

/// Mixed precision through the fused state (emulated GPU): the bf16
/// compute copy made from the f32 master weights and refreshed by the
/// emulated cast after every update; ten steps of two micro-batches, each
/// step's loss within 1 % of the same steps in f32 compute.
#[test]
fn ten_fused_bf16_steps_on_the_emulated_gpu_stay_within_one_percent_of_f32() {
    use super::emulated::Emulated;
    use stride_cuda_kernels::Bf16;
    let c = gpu_shaped();
    let mut f32s = fused_on(Emulated::<f32>::default(), 1.0);
    let mut bf16s = fused_on(Emulated::<Bf16>::default(), 1.0);
    for step in 0..10 {
        let batches = [tokens(&c, 2, 100 + step), tokens(&c, 2, 200 + step)];
        let (_, a) = fused_step(&mut f32s, &batches, 3e-3);
        let (_, b) = fused_step(&mut bf16s, &batches, 3e-3);
        assert!(
            ((b.loss_sum - a.loss_sum) / a.loss_sum).abs() < 0.01,
            "step {step}: bf16 {b:?} vs f32 {a:?}"
        );
    }
}

/// A checkpoint of the fused state with a bf16 compute copy (emulated
/// GPU) loads — into the same engine and into the fused CPU engine — with
/// the same bits of weights, moments and update count, and the same
/// weights hash; the reloaded bf16 engine's compute copy is refreshed, so
/// its next step is the original's, bit for bit.
#[test]
fn the_fused_state_round_trips_through_a_checkpoint() {
    use super::backend::Cpu;
    use super::emulated::Emulated;
    use stride_cuda_kernels::Bf16;
    use stride_job::checkpoint;
    let c = gpu_shaped();
    let slots = model::layout(&c);
    let mut a = fused_on(Emulated::<Bf16>::default(), 1.0);
    for step in 0..2 {
        fused_step(&mut a, &[tokens(&c, 2, 300 + step)], 3e-3);
    }
    let (w, m, v, step) = fused_state(&a);
    let dir = tempfile::tempdir().expect("tmp");
    checkpoint::write_model(dir.path(), &slots, &w).expect("write");
    checkpoint::write_optimizer(dir.path(), &slots, &m, &v, step).expect("write");

    let mut b = fused_on(Emulated::<Bf16>::default(), 1.0);
    b.load(dir.path(), &slots, false)
        .expect("load on the emulated GPU");
    let mut host = fused_on(Cpu::<f32>::default(), 1.0);
    host.load(dir.path(), &slots, false)
        .expect("load on the CPU");
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    for other in [fused_state(&b), fused_state(&host)] {
        assert_eq!(other.3, step, "update count");
        assert_eq!(bits(&other.0), bits(&w), "weights");
        assert_eq!(bits(&other.1), bits(&m), "first moments");
        assert_eq!(bits(&other.2), bits(&v), "second moments");
    }
    let hash = a.weights_hash().expect("hash");
    assert_eq!(b.weights_hash().expect("hash"), hash);
    assert_eq!(host.weights_hash().expect("hash"), hash);

    let next = [tokens(&c, 2, 400)];
    let (ga, sa) = fused_step(&mut a, &next, 3e-3);
    let (gb, sb) = fused_step(&mut b, &next, 3e-3);
    assert_eq!(sa, sb, "the reloaded compute copy is the original's");
    assert_eq!(bits(&ga), bits(&gb));
    assert_eq!(fused_state(&a).0, fused_state(&b).0);

    // Weights only: a fresh optimizer.
    let mut fresh = fused_on(Emulated::<Bf16>::default(), 1.0);
    fresh.load(dir.path(), &slots, true).expect("load weights");
    let (fw, fm, fv, fstep) = fused_state(&fresh);
    assert_eq!(bits(&fw), bits(&w));
    assert!(fm.iter().chain(&fv).all(|x| *x == 0.0) && fstep == 0);
}

/// The CUDA backend on a GPU (`cuda` feature; ignored unless asked for on
/// a machine with one: `STRIDE_TEST_CUDA=1 cargo test -p stride-worker
/// --features cuda -- --ignored gpu`; asked for without the variable or
/// without a GPU, they fail saying so).
#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::CudaStream;
    use stride_cuda_kernels::Bf16;

    use super::*;
    use crate::engine::backend::Backend;
    use crate::engine::cuda::CudaBackend;
    use crate::engine::gpt::Gpt;

    /// The stream of Candle's CUDA device 0.
    fn stream() -> Arc<CudaStream> {
        crate::test_cuda_device()
            .as_cuda_device()
            .expect("a CUDA device")
            .cuda_stream()
    }

    /// The emulated GPU step's test on the GPU: the whole model's forward
    /// and backward on `Gpt<CudaBackend<_>>`, f32 and bf16, weights and
    /// gradient in device buffers, against the CPU engine in f64 — the
    /// loss of each of two micro-batches and every parameter's
    /// accumulated gradient, to the emulated test's tolerances.
    #[test]
    #[ignore = "needs an NVIDIA GPU: STRIDE_TEST_CUDA=1 cargo test -p stride-worker --features cuda -- --ignored gpu"]
    fn gpu_cuda_backend_step_equals_the_cpu_engine() {
        let c = gpu_shaped();
        let slots = model::layout(&c);
        let w32 = weights(&c);
        let batches = [tokens(&c, 3, 1), tokens(&c, 2, 2)];
        let (want_loss, want) = cpu_reference(&c, &slots, &w32, &batches);

        let be = CudaBackend::<f32>::new(stream()).expect("CUDA backend, f32");
        let mut gpu = Gpt::on(be, &c, &slots, 3).expect("model, f32");
        gpu.set_head_rows(7); // several chunks of the head, the last one short
        let (sums, grad) = steps_on(&mut gpu, &w32, &batches);
        let (loss, gradient) = (&want_loss, &want);
        assert_step(
            "CUDA f32",
            &slots,
            &batches,
            &sums,
            &grad,
            loss,
            gradient,
            EMULATED_F32,
        );

        let wb: Vec<Bf16> = w32.iter().map(|v| Bf16::from_f32(*v)).collect();
        let be = CudaBackend::<Bf16>::new(stream()).expect("CUDA backend, bf16");
        let mut gpu = Gpt::on(be, &c, &slots, 3).expect("model, bf16");
        let (sums, grad) = steps_on(&mut gpu, &wb, &batches);
        assert_step(
            "CUDA bf16",
            &slots,
            &batches,
            &sums,
            &grad,
            loss,
            gradient,
            EMULATED_BF16,
        );
    }

    /// Bad input reaches the CUDA backend as errors that say what is
    /// wrong, before anything is launched: a token past the vocabulary,
    /// buffers of mismatched lengths, the head before `prepare`.
    #[test]
    #[ignore = "needs an NVIDIA GPU: STRIDE_TEST_CUDA=1 cargo test -p stride-worker --features cuda -- --ignored gpu"]
    fn gpu_cuda_backend_refuses_bad_input_without_panicking() {
        type B = CudaBackend<f32>;
        let mut be = B::new(stream()).expect("CUDA backend");
        let (t, c, v) = (4, 8, 5);
        let mut out = be.alloc::<f32>(2 * t * c).expect("out");
        let wte = be.alloc::<f32>(v * c).expect("wte");
        let wpe = be.alloc::<f32>(t * c).expect("wpe");
        let tokens = [0, 1, 2, 3, 4, 5, 0, 1];
        let e = be
            .embed_forward(
                B::view_mut::<f32>(&mut out),
                &tokens,
                B::view::<f32>(&wte),
                B::view::<f32>(&wpe),
                t,
            )
            .expect_err("token 5 of a vocabulary of 5");
        assert!(e.to_string().contains("not below V = 5"), "{e}");
        let e = be
            .gelu_forward(B::view_mut::<f32>(&mut out), B::view::<f32>(&wte))
            .expect_err("64 outputs of 40 inputs");
        assert!(e.to_string().contains("Shape"), "{e}");
        let e = be
            .upload(B::view_mut::<f32>(&mut out), &[1.0f32; 3])
            .expect_err("3 values into 64");
        assert!(
            e.to_string().contains("3 elements into a buffer of 64"),
            "{e}"
        );
        let e = be
            .head_cross_entropy(
                B::view::<f32>(&out),
                B::view::<f32>(&wte),
                &tokens[..1],
                None,
                1.0,
                1,
            )
            .expect_err("no head before prepare");
        assert!(e.to_string().contains("prepare"), "{e}");
    }
}
