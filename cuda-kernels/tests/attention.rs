//! Causal self-attention, flash style, emulated, against stride-kernels'
//! attention (which keeps the T×T probabilities): the f32 kernels against
//! the CPU kernel in f64, the bf16 kernels against the CPU kernel in f32 on
//! the bf16-rounded inputs (tolerances: tests/common).
//!
//! The CPU kernel has no log-sum-exp; the reference for lse comes from its
//! probabilities: p_ii = e^(s_ii − lse_i), so lse_i = s_ii − ln p_ii with
//! s_ii = q_i·k_i/√hs (in f64).

mod common;

use common::*;
use stride_cuda_kernels::emu::{self, Heads};
use stride_cuda_kernels::{Bf16, Storage};

fn heads((b, t, c, nh): (usize, usize, usize, usize)) -> Heads {
    Heads { b, t, c, nh }
}

fn cpu_heads(s: Heads) -> stride_kernels::Heads {
    stride_kernels::Heads {
        b: s.b,
        t: s.t,
        c: s.c,
        nh: s.nh,
    }
}

struct Reference {
    out: Vec<f64>,
    lse: Vec<f64>,
    dqkv: Vec<f64>,
}

/// The CPU kernels forward and backward, in f64 (f32 storage) or f32 (on
/// the rounded values, bf16 storage).
fn reference<T: Storage>(qkv: &[f32], dout: &[f32], s: Heads) -> Reference {
    let (b, t, c, nh) = (s.b, s.t, s.c, s.nh);
    let hs = c / nh;
    let cs = cpu_heads(s);
    let (out, att, dqkv) = if T::SUFFIX == "f32" {
        let mut out = vec![0f64; b * t * c];
        let mut att = vec![0f64; b * nh * t * t];
        let mut scratch = vec![0f64; b * nh * t * hs];
        let q = wide(qkv);
        stride_kernels::attention_forward(&mut out, &mut att, &mut scratch, &q, cs);
        let mut dqkv = vec![0f64; b * t * 3 * c];
        let mut datt = vec![0f64; b * nh * t * t];
        let mut dheads = vec![0f64; b * nh * 3 * t * hs];
        stride_kernels::attention_backward(
            &mut dqkv,
            &mut datt,
            &mut scratch,
            &mut dheads,
            &wide(dout),
            &att,
            &q,
            cs,
        );
        (out, att, dqkv)
    } else {
        let mut out = vec![0f32; b * t * c];
        let mut att = vec![0f32; b * nh * t * t];
        let mut scratch = vec![0f32; b * nh * t * hs];
        stride_kernels::attention_forward(&mut out, &mut att, &mut scratch, qkv, cs);
        let mut dqkv = vec![0f32; b * t * 3 * c];
        let mut datt = vec![0f32; b * nh * t * t];
        let mut dheads = vec![0f32; b * nh * 3 * t * hs];
        stride_kernels::attention_backward(
            &mut dqkv,
            &mut datt,
            &mut scratch,
            &mut dheads,
            dout,
            &att,
            qkv,
            cs,
        );
        (wide(&out), wide(&att), wide(&dqkv))
    };
    let scale = 1.0 / (hs as f64).sqrt();
    let mut lse = vec![0f64; b * nh * t];
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let row = (bi * t + i) * 3 * c + h * hs;
                let s_ii: f64 = (0..hs)
                    .map(|d| f64::from(qkv[row + d]) * f64::from(qkv[row + c + d]))
                    .sum::<f64>()
                    * scale;
                let p_ii = att[((bi * nh + h) * t + i) * t + i];
                lse[(bi * nh + h) * t + i] = s_ii - p_ii.ln();
            }
        }
    }
    Reference { out, lse, dqkv }
}

fn attention<T: Storage>(seed: u64) {
    for &shape in ATTENTION_SHAPES {
        let s = heads(shape);
        let (b, t, c, nh) = shape;
        let mut rng = Inputs::new(seed + (b * t * c * nh) as u64);
        // Scores of a few units: the softmax is neither flat nor one-hot.
        let qkv = as_stored::<T>(&rng.uniform(b * t * 3 * c, 1.5));
        let dout = as_stored::<T>(&rng.uniform(b * t * c, 1.0));
        let want = reference::<T>(&qkv, &dout, s);

        let qkv_t = store::<T>(&qkv);
        let mut out = vec![T::default(); b * t * c];
        let mut lse = vec![0f32; b * nh * t];
        emu::attention_forward(&mut out, &mut lse, &qkv_t, s).expect("attention_forward");
        let what = format!("{} B{b} T{t} C{c} NH{nh}", T::SUFFIX);
        assert_close(
            &format!("{what} out"),
            &load(&out),
            &want.out,
            tol_for::<T>(),
        );
        assert_close(&format!("{what} lse"), &lse, &want.lse, F32);

        // The backward reads the forward's out and lse, as in training.
        let mut dqkv = vec![T::from_f32(f32::NAN); b * t * 3 * c];
        let mut dots = vec![f32::NAN; b * nh * t];
        emu::attention_backward(
            &mut dqkv,
            &mut dots,
            &store::<T>(&dout),
            &out,
            &lse,
            &qkv_t,
            s,
        )
        .expect("attention_backward");
        assert_close(
            &format!("{what} dqkv"),
            &load(&dqkv),
            &want.dqkv,
            tol_for::<T>(),
        );
    }
}

#[test]
fn forward_and_backward_f32() {
    attention::<f32>(30);
}

#[test]
fn forward_and_backward_bf16() {
    attention::<Bf16>(31);
}

#[test]
fn unsupported_head_sizes_are_refused() {
    for (c, nh) in [(12, 1), (136, 1), (24, 5)] {
        let s = Heads { b: 1, t: 4, c, nh };
        let qkv = vec![0f32; 4 * 3 * c];
        let mut out = vec![0f32; 4 * c];
        let mut lse = vec![0f32; 4 * nh];
        let e = emu::attention_forward(&mut out, &mut lse, &qkv, s).expect_err("head size");
        assert_eq!(e.kind, emu::ErrorKind::Shape, "{e}");
    }
}
