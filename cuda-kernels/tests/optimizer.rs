//! The optimizer step, emulated: AdamW and the gradient factor. stride-kernels
//! has no optimizer, so the references are host loops written here in the
//! worker's operation order (`optim::Coefficients::apply`,
//! `DeviceState::write_factor`), and the kernels must give their bits: each
//! operation is rounded once on both sides (src/cuda/optimizer.cu). The
//! worker checks the same kernel against its own `AdamW` (worker/src/optim.rs).

mod common;

use common::*;
use stride_cuda_kernels::emu::{self, ErrorKind};
use stride_cuda_kernels::{AdamWCoefficients, launch};

/// The coefficients of update `step` (from 1), as the worker's
/// `Coefficients::new` computes them: in f64, rounded to f32 once.
fn coefficients(step: i32, lr: f64, weight_decay: f64) -> AdamWCoefficients {
    let (beta1, beta2, eps) = (0.9f64, 0.95f64, 1e-8f64);
    AdamWCoefficients {
        beta1: beta1 as f32,
        one_minus_beta1: 1.0 - beta1 as f32,
        beta2: beta2 as f32,
        one_minus_beta2: 1.0 - beta2 as f32,
        step_size: (lr / (1.0 - beta1.powi(step))) as f32,
        bc2_sqrt: (1.0 - beta2.powi(step)).sqrt() as f32,
        eps: eps as f32,
        shrink: (1.0 - lr * weight_decay) as f32,
    }
}

/// The host loop: `Coefficients::apply` with the gradient scaled as read,
/// written out operation by operation (Rust never contracts a·b + c).
fn host_adamw(
    w: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    grad: &[f32],
    decay: &[u8],
    factor: f32,
    k: &AdamWCoefficients,
) {
    for i in 0..w.len() {
        let g = grad[i] * factor;
        if decay[i] != 0 {
            w[i] *= k.shrink;
        }
        m[i] = k.beta1 * m[i] + k.one_minus_beta1 * g;
        v[i] = k.beta2 * v[i] + k.one_minus_beta2 * g * g;
        w[i] -= k.step_size * m[i] / (v[i].sqrt() / k.bc2_sqrt + k.eps);
    }
}

/// Gradients with awkward values among uniform ones: zeros, signed zeros,
/// tiny values whose squares are subnormal or 0, large ones.
fn gradient(rng: &mut Inputs, n: usize, scale: f32) -> Vec<f32> {
    let mut g = rng.uniform(n, scale);
    let awkward = [0.0, -0.0, 1e-20, -3e-23, 1e-30, 7.5e3, -2e4, 1.0];
    for (i, &a) in awkward.iter().enumerate() {
        if let Some(x) = g.get_mut(1 + i * 7) {
            *x = a;
        }
    }
    g
}

#[test]
fn adamw_is_the_host_loop_bit_for_bit() {
    // n: one, below a block, a block, a block and one, not a multiple of
    // 256; decay everywhere, nowhere, on a pattern; factors 1 and others.
    let cases: &[(usize, &str, f32)] = &[
        (1, "all", 1.0),
        (1, "none", 0.3),
        (255, "pattern", 0.125),
        (256, "all", 1.0),
        (257, "none", 0.7),
        (1000, "pattern", 1.0),
        (70_001, "pattern", 0.093_75),
        (70_001, "all", 3.5),
    ];
    for (c, &(n, decay_kind, factor)) in cases.iter().enumerate() {
        let mut rng = Inputs::new(80 + c as u64);
        let decay: Vec<u8> = (0..n)
            .map(|i| match decay_kind {
                "all" => 1,
                "none" => 0,
                // Any nonzero byte means decay.
                _ => [0, 1, 0, 2, 255][i % 5],
            })
            .collect();
        let w0 = rng.uniform(n, 1.0);
        let (mut w, mut m, mut v) = (w0.clone(), vec![0f32; n], vec![0f32; n]);
        let (mut hw, mut hm, mut hv) = (w0.clone(), vec![0f32; n], vec![0f32; n]);
        // Three consecutive updates: the moments carry over and the bias
        // corrections change.
        for step in 1..=3 {
            let what = format!("n={n} decay={decay_kind} factor={factor} step {step}");
            let grad = gradient(&mut rng, n, 2.0);
            let k = coefficients(step, 3e-3, 0.1);
            emu::adamw(&mut w, &mut m, &mut v, &grad, &decay, &[factor], k).expect("adamw");
            host_adamw(&mut hw, &mut hm, &mut hv, &grad, &decay, factor, &k);
            assert_bits(&format!("{what}: w"), &w, &hw);
            assert_bits(&format!("{what}: m"), &m, &hm);
            assert_bits(&format!("{what}: v"), &v, &hv);
        }
        assert!(w != w0, "the updates moved the weights");
        if decay_kind != "none" {
            // Decay made a difference where it applies: with shrink = 1
            // (no decay) the decayed elements come out otherwise.
            let mut plain = w0.clone();
            let (mut pm, mut pv) = (vec![0f32; n], vec![0f32; n]);
            let mut again = Inputs::new(80 + c as u64);
            let _ = again.uniform(n, 1.0);
            for step in 1..=3 {
                let grad = gradient(&mut again, n, 2.0);
                let k = coefficients(step, 3e-3, 0.0);
                emu::adamw(&mut plain, &mut pm, &mut pv, &grad, &decay, &[factor], k)
                    .expect("adamw");
            }
            let differ = (0..n).filter(|&i| plain[i] != w[i]).count();
            assert!(differ > 0, "decay changed nothing");
            assert!(
                (0..n).all(|i| decay[i] != 0 || plain[i] == w[i]),
                "decay touched an element its mask leaves alone"
            );
        }
    }
}

#[test]
fn adamw_reads_the_factor_from_memory() {
    // The factor scales the gradient: a factor of 2 on g is g·2 on a
    // factor of 1 (both exact), bit for bit.
    let n = 513;
    let mut rng = Inputs::new(90);
    let decay = vec![1u8; n];
    let w0 = rng.uniform(n, 1.0);
    let grad = rng.uniform(n, 1.0);
    let doubled: Vec<f32> = grad.iter().map(|g| g * 2.0).collect();
    let k = coefficients(1, 1e-2, 0.1);
    let (mut a, mut am, mut av) = (w0.clone(), vec![0f32; n], vec![0f32; n]);
    let (mut b, mut bm, mut bv) = (w0.clone(), vec![0f32; n], vec![0f32; n]);
    emu::adamw(&mut a, &mut am, &mut av, &grad, &decay, &[2.0], k).expect("adamw");
    emu::adamw(&mut b, &mut bm, &mut bv, &doubled, &decay, &[1.0], k).expect("adamw");
    assert_bits("w", &a, &b);
    assert_bits("v", &av, &bv);
    // A factor of 0: only the decay moves the weights (m = v = 0, so the
    // step is 0 / (0 + ε) = 0).
    let (mut z, mut zm, mut zv) = (w0.clone(), vec![0f32; n], vec![0f32; n]);
    emu::adamw(&mut z, &mut zm, &mut zv, &grad, &decay, &[0.0], k).expect("adamw");
    let shrunk: Vec<f32> = w0.iter().map(|w| w * k.shrink).collect();
    assert_bits("w with factor 0", &z, &shrunk);
}

#[test]
fn adamw_refuses_wrong_lengths_and_launches_nothing_for_nothing() {
    let k = coefficients(1, 1e-3, 0.1);
    let n = 10;
    let (mut w, mut m, mut v) = (vec![1f32; n], vec![0f32; n], vec![0f32; n]);
    let (grad, decay) = (vec![1f32; n], vec![1u8; n]);
    // n = 0: nothing to update, Ok (as every kernel with an empty input).
    emu::adamw(&mut [], &mut [], &mut [], &[], &[], &[1.0], k).expect("empty");
    let shape = |r: emu::Result| assert_eq!(r.expect_err("refused").kind, ErrorKind::Shape);
    shape(emu::adamw(&mut [], &mut [], &mut [], &[], &[], &[], k));
    shape(emu::adamw(
        &mut w,
        &mut m[..9],
        &mut v,
        &grad,
        &decay,
        &[1.0],
        k,
    ));
    shape(emu::adamw(
        &mut w,
        &mut m,
        &mut v[..9],
        &grad,
        &decay,
        &[1.0],
        k,
    ));
    shape(emu::adamw(
        &mut w,
        &mut m,
        &mut v,
        &grad[..9],
        &decay,
        &[1.0],
        k,
    ));
    shape(emu::adamw(
        &mut w,
        &mut m,
        &mut v,
        &grad,
        &decay[..9],
        &[1.0],
        k,
    ));
    shape(emu::adamw(
        &mut w,
        &mut m,
        &mut v,
        &grad,
        &decay,
        &[1.0, 1.0],
        k,
    ));
    assert!(w.iter().all(|&x| x == 1.0), "nothing ran");
}

/// The composed engine's factor (`DeviceState::write_factor`), in f32 in
/// its order: norm = √sumsq·scale; scale, or (1 / (norm + 1e-6))·(max·scale)
/// when clipping and norm > max.
fn host_factor(sumsq: f32, scale: f64, max_norm: f64) -> (f32, f32) {
    let norm = sumsq.sqrt() * scale as f32;
    let factor = if max_norm > 0.0 && norm > max_norm as f32 {
        (1.0 / (norm + 1e-6f32)) * (max_norm * scale) as f32
    } else {
        scale as f32
    };
    (factor, norm)
}

#[test]
fn grad_factor_is_the_composed_engines_arithmetic() {
    // (Σg², scale, max_norm): no clipping, below, above, at the limit,
    // tiny and huge sums, 0, NaN.
    let cases: &[(f32, f64, f64)] = &[
        (16.0, 0.25, 0.0),
        (16.0, 0.25, -1.0),
        (16.0, 0.25, 2.0),
        (16.0, 0.25, 1.0),
        (16.0, 0.25, 0.5),
        (123.456, 1.0 / 3.0, 1.0),
        (1e-30, 1.0 / 24.0, 1.0),
        (3.0e38, 1.0 / 64.0, 1.0),
        (0.0, 0.5, 1.0),
        (f32::NAN, 0.5, 1.0),
        (0.7, 1.0, 1.0),
    ];
    for &(sumsq, scale, max_norm) in cases {
        let (mut factor, mut norm) = ([f32::NAN], [f32::NAN]);
        emu::grad_factor(&mut factor, &mut norm, &[sumsq], scale, max_norm).expect("grad_factor");
        let (want_factor, want_norm) = host_factor(sumsq, scale, max_norm);
        let what = format!("Σg² {sumsq}, scale {scale}, max {max_norm}");
        if sumsq.is_nan() {
            // Not clipped (NaN > max is false), as on the host.
            assert!(norm[0].is_nan(), "{what}: norm {}", norm[0]);
            assert_eq!(factor[0], scale as f32, "{what}");
            continue;
        }
        assert_bits(&format!("{what}: norm"), &norm, &[want_norm]);
        assert_bits(&format!("{what}: factor"), &factor, &[want_factor]);
        // The clip bounds the averaged norm by max_norm (to rounding).
        if max_norm > 0.0 && want_norm > max_norm as f32 {
            let clipped = f64::from(want_norm) * f64::from(factor[0]) / scale;
            assert!(clipped <= max_norm * (1.0 + 1e-6), "{what}: {clipped}");
        }
    }
    // 16·0.25² = 1 exactly: the norm at the limit is not clipped.
    let (mut factor, mut norm) = ([0f32], [0f32]);
    emu::grad_factor(&mut factor, &mut norm, &[16.0], 0.25, 1.0).expect("grad_factor");
    assert_eq!((factor[0], norm[0]), (0.25, 1.0));
    emu::grad_factor(&mut factor, &mut norm, &[16.0], 0.25, 0.5).expect("grad_factor");
    assert!(
        factor[0] < 0.25 * 0.5 && factor[0] > 0.25 * 0.4999,
        "{}",
        factor[0]
    );
}

#[test]
fn grad_factor_refuses_bad_arguments() {
    let shape = |r: emu::Result| assert_eq!(r.expect_err("refused").kind, ErrorKind::Shape);
    let (mut f, mut n) = ([0f32], [0f32]);
    shape(emu::grad_factor(&mut f, &mut n, &[1.0], 0.0, 1.0));
    shape(emu::grad_factor(&mut f, &mut n, &[1.0], f64::NAN, 1.0));
    shape(emu::grad_factor(&mut f, &mut n, &[1.0], 0.5, f64::NAN));
    shape(emu::grad_factor(&mut f, &mut n, &[], 0.5, 1.0));
    shape(emu::grad_factor(&mut [], &mut n, &[1.0], 0.5, 1.0));
    shape(emu::grad_factor(&mut f, &mut [0.0, 0.0], &[1.0], 0.5, 1.0));
}

/// The whole device step, emulated: the summed gradient's sum of squares,
/// the factor, AdamW — against the host doing the same in the same order.
/// And against the host engine's clip (f64 norm of the averaged gradient,
/// the clip applied to it), which it matches to f32 rounding only.
#[test]
fn the_step_sum_of_squares_factor_adamw_chains() {
    let n = 10_007;
    let (scale, max_norm) = (0.25, 1.0);
    let mut rng = Inputs::new(95);
    let decay: Vec<u8> = (0..n).map(|i| u8::from(i % 3 != 0)).collect();
    let w0 = rng.uniform(n, 1.0);
    let (mut w, mut m, mut v) = (w0.clone(), vec![0f32; n], vec![0f32; n]);
    let (mut hw, mut hm, mut hv) = (w0.clone(), vec![0f32; n], vec![0f32; n]);
    let mut partials = vec![0f32; launch::sumsq_blocks(n)];
    for step in 1..=3 {
        // Large (clipped) on steps 1 and 3, small on step 2.
        let size = if step == 2 { 1e-3 } else { 0.5 };
        let grad = rng.uniform(n, size);
        let mut sumsq = [0f32];
        emu::sum_of_squares(&mut sumsq, &mut partials, &grad).expect("sumsq");
        let (mut factor, mut norm) = ([0f32], [0f32]);
        emu::grad_factor(&mut factor, &mut norm, &sumsq, scale, max_norm).expect("factor");
        let k = coefficients(step, 1e-2, 0.1);
        emu::adamw(&mut w, &mut m, &mut v, &grad, &decay, &factor, k).expect("adamw");

        let (want_factor, want_norm) = host_factor(sumsq[0], scale, max_norm);
        assert_eq!(factor[0].to_bits(), want_factor.to_bits(), "step {step}");
        assert_eq!(norm[0].to_bits(), want_norm.to_bits(), "step {step}");
        host_adamw(&mut hw, &mut hm, &mut hv, &grad, &decay, want_factor, &k);
        assert_bits(&format!("step {step}: w"), &w, &hw);
        assert_bits(&format!("step {step}: m"), &m, &hm);

        // The host engine: average, f64 norm, clip in f64.
        let averaged: Vec<f64> = grad.iter().map(|&g| f64::from(g * scale as f32)).collect();
        let host_norm = averaged.iter().map(|g| g * g).sum::<f64>().sqrt();
        let host_clip = if host_norm > max_norm {
            max_norm / (host_norm + 1e-6)
        } else {
            1.0
        };
        assert_eq!(step != 2, host_norm > max_norm, "step {step}: clipping");
        let rel = |a: f64, b: f64| ((a - b) / b).abs();
        assert!(rel(f64::from(norm[0]), host_norm) < 2e-6, "step {step}");
        assert!(
            rel(f64::from(factor[0]), scale * host_clip) < 4e-6,
            "step {step}: {} vs {}",
            factor[0],
            scale * host_clip
        );
    }
}
