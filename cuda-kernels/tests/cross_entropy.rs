//! The softmax cross-entropy over a chunk of logits, emulated, against the
//! inner loop of stride-kernels' `head_cross_entropy` (f32, tolerances:
//! tests/common).
//!
//! `head_cross_entropy` makes its logits itself, as x·wteᵀ. With C = 1 each
//! logit is one product x_r·w_v: the reference runs the CPU kernel in f64
//! (where the product of two f32s is exact) and the kernel gets the same
//! products rounded to f32 (half an ulp, ≤ 3e-8 relative, away).

mod common;

use common::*;
use stride_cuda_kernels::emu;

/// (R, V): a vocabulary of one, odd ones, one above a 1,024-thread block's
/// stride, GPT-2's padded 50,304.
const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (3, 37),
    (17, 1000),
    (4, 8193),
    (5, 50_304),
    (2, 50_257),
];

fn check(rows: usize, v: usize, x_scale: f32, seed: u64) {
    let mut rng = Inputs::new(seed);
    let x = rng.uniform(rows, x_scale);
    let w = rng.uniform(v, 3.0);
    let targets = rng.below(rows, v as u32);
    let loss_scale = 1.0 / rows as f32;
    let logits: Vec<f32> = x
        .iter()
        .flat_map(|&xr| w.iter().map(move |&wv| xr * wv))
        .collect();
    for with_grad in [false, true] {
        let mut cpu_logits = vec![0f64; rows * v];
        let mut cpu_loss = vec![0f64; rows];
        let mut dx = vec![0f64; rows];
        let mut dwte = vec![0f64; v];
        let grad = with_grad.then_some(stride_kernels::HeadGrad {
            dx: &mut dx,
            dwte: &mut dwte,
        });
        stride_kernels::head_cross_entropy(
            &wide(&x),
            &wide(&w),
            &targets,
            &mut cpu_logits,
            &mut cpu_loss,
            grad,
            f64::from(loss_scale),
        );
        let mut got = logits.clone();
        let mut loss = vec![f32::NAN; rows];
        emu::cross_entropy(&mut got, &mut loss, &targets, v, loss_scale, with_grad)
            .expect("cross_entropy");
        let what = format!("R{rows} V{v} x±{x_scale} grad={with_grad}");
        // The loss is a difference of terms of the logits' size: measured
        // against max|logit|, not against itself.
        let scale = logits.iter().fold(1f32, |m, l| m.max(l.abs()));
        for (r, (&g, &want)) in loss.iter().zip(&cpu_loss).enumerate() {
            let err = (f64::from(g) - want).abs();
            assert!(
                err <= F32.rel * want.abs() + 4e-7 * f64::from(scale),
                "{what} loss[{r}]: got {g}, want {want}"
            );
        }
        // With the gradient: (softmax − one-hot)/R; without: e^(l − max).
        assert_close(&format!("{what} logits"), &got, &cpu_logits, F32);
    }
}

#[test]
fn cross_entropy_with_and_without_the_gradient() {
    for (i, &(rows, v)) in SHAPES.iter().enumerate() {
        check(rows, v, 2.0, 40 + i as u64);
    }
}

#[test]
fn large_logits_are_shifted_by_their_maximum() {
    // Logits up to ±90: e^90 overflows f32 without the shift.
    check(3, 1000, 30.0, 50);
    check(2, 50_304, 30.0, 51);
}

#[test]
fn targets_beyond_the_vocabulary_are_refused() {
    let mut logits = vec![0f32; 2 * 5];
    let mut loss = vec![0f32; 2];
    let e = emu::cross_entropy(&mut logits, &mut loss, &[1, 5], 5, 1.0, true)
        .expect_err("target 5 of 5");
    assert_eq!(e.kind, emu::ErrorKind::Shape, "{e}");
}
