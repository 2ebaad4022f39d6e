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

/// Records each bucket all-reduce (a one-rank collective: the sums change
/// nothing) and how much of the token embedding's gradient was written
/// when it came.
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
        1
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
    use stride_job::config::{Engine as Choice, OptimConfig, Precision};

    use crate::device_state::DeviceState;
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

    let transfers = Transfers::default();
    let mut engine = super::Engine::new(
        Choice::Composed,
        &c,
        &w,
        2,
        &dev,
        Precision::F32,
        transfers.clone(),
    )
    .expect("engine");
    let mut state =
        DeviceState::new(&w, &slots, &OptimConfig::default(), &dev, transfers).expect("state");
    let wte = slots
        .iter()
        .find(|s| s.name == "transformer.wte.weight")
        .map(|s| s.offset..s.offset + s.len)
        .expect("wte");
    let mut recorder = Recorder {
        wte: wte.clone(),
        calls: Vec::new(),
    };
    state.zero_grad();
    state.begin_micro_batch().expect("micro-batch");
    let value = engine
        .forward_backward_on(&mut state, &x, &y, Some(&mut recorder))
        .and_then(|l| Ok(f64::from(l.to_scalar::<f32>()?)))
        .expect("forward and backward");
    assert!((value - want).abs() <= 1e-6 * want, "{value} vs {want}");
    let mut got = Vec::new();
    state.grad_to_host(&mut got).expect("gradient");
    assert_eq!(got.len(), whole.len());
    for (i, (g, w)) in got.iter().map(|g| f64::from(*g)).zip(&whole).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * (1e-2 + w.abs()),
            "[{i}]: {g} vs {w}"
        );
    }

    let order: Vec<_> = recorder.calls.iter().map(|(r, _)| r.clone()).collect();
    assert_eq!(order, state.buckets(), "every bucket, in launch order");
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
    state.all_reduce(&mut recorder).expect("nothing left");
    assert_eq!(recorder.calls.len(), order.len(), "no bucket twice");

    // Two micro-batches: the second adds to the first.
    state.zero_grad();
    for reduce in [false, true] {
        state.begin_micro_batch().expect("micro-batch");
        let r: Option<&mut dyn crate::collective::Collective> =
            if reduce { Some(&mut recorder) } else { None };
        engine
            .forward_backward_on(&mut state, &x, &y, r)
            .expect("forward and backward");
    }
    let mut twice = Vec::new();
    state.grad_to_host(&mut twice).expect("gradient");
    for (a, b) in twice.iter().zip(&got) {
        assert_eq!(
            *a,
            b + b,
            "the same micro-batch twice sums to twice its gradient"
        );
    }
}
