//! Every kernel against its definition, in f64: the forward against a
//! plain loop written from the formula, the backward against central
//! differences of that forward. Shapes are awkward on purpose (one
//! sequence, one head, T and N not multiples of any block or chunk size, a
//! vocabulary that is not a multiple of anything).

use crate::{self as kernels, HeadGrad, Heads};

/// Deterministic values of about `scale` (splitmix64, uniform in ±√3·scale:
/// unit variance for scale 1).
fn random(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 11) as f64 / (1u64 << 53) as f64;
            (2.0 * u - 1.0) * 3f64.sqrt() * scale
        })
        .collect()
}

/// Central differences of `f` at `x`, element by element, against
/// `analytic`; `what` names the checked tensor in the message.
fn check_gradient(what: &str, x: &[f64], analytic: &[f64], f: impl Fn(&[f64]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let h = 1e-5;
    for i in 0..x.len() {
        let mut plus = x.to_vec();
        plus[i] += h;
        let mut minus = x.to_vec();
        minus[i] -= h;
        let numeric = (f(&plus) - f(&minus)) / (2.0 * h);
        let tol = 1e-7 * (1.0 + numeric.abs());
        assert!(
            (numeric - analytic[i]).abs() < tol,
            "{what}[{i}]: analytic {} vs central difference {numeric}",
            analytic[i]
        );
    }
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

fn weighted(out: &[f64], r: &[f64]) -> f64 {
    out.iter().zip(r).map(|(a, b)| a * b).sum()
}

// ---- references, straight from the formulas ---------------------------------

fn layernorm_ref(x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
    let c = w.len();
    x.chunks(c)
        .flat_map(|row| {
            let mean = row.iter().sum::<f64>() / c as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c as f64;
            let sd = (var + 1e-5).sqrt();
            (0..c).map(move |j| (row[j] - mean) / sd * w[j] + b[j])
        })
        .collect()
}

fn linear_ref(x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
    let oc = b.len();
    let ic = w.len() / oc;
    x.chunks(ic)
        .flat_map(|row| {
            (0..oc).map(move |o| b[o] + (0..ic).map(|i| row[i] * w[o * ic + i]).sum::<f64>())
        })
        .collect()
}

fn gelu_ref(x: &[f64]) -> Vec<f64> {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    x.iter()
        .map(|&v| 0.5 * v * (1.0 + (k * (v + 0.044715 * v * v * v)).tanh()))
        .collect()
}

fn attention_ref(qkv: &[f64], s: Heads) -> Vec<f64> {
    let (t, c, hs) = (s.t, s.c, s.c / s.nh);
    let mut out = vec![0.0; s.b * t * c];
    let at = |bi: usize, ti: usize, part: usize, h: usize, d: usize| {
        qkv[(bi * t + ti) * 3 * c + part * c + h * hs + d]
    };
    for bi in 0..s.b {
        for h in 0..s.nh {
            for i in 0..t {
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..hs)
                            .map(|d| at(bi, i, 0, h, d) * at(bi, j, 1, h, d))
                            .sum::<f64>()
                            / (hs as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|v| (v - m).exp()).sum();
                for d in 0..hs {
                    out[(bi * t + i) * c + h * hs + d] = (0..=i)
                        .map(|j| (scores[j] - m).exp() / z * at(bi, j, 2, h, d))
                        .sum();
                }
            }
        }
    }
    out
}

fn head_ref(x: &[f64], wte: &[f64], targets: &[u32]) -> f64 {
    let c = x.len() / targets.len();
    let v = wte.len() / c;
    x.chunks(c)
        .zip(targets)
        .map(|(row, &tg)| {
            let logits: Vec<f64> = (0..v)
                .map(|k| (0..c).map(|j| row[j] * wte[k * c + j]).sum())
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln() - logits[tg as usize]
        })
        .sum()
}

// ---- one kernel at a time -----------------------------------------------------

#[test]
fn layernorm_forward_and_backward() {
    for (n, c) in [(1, 5), (37, 7), (70, 3)] {
        let x = random(n * c, 1, 1.5);
        let w = random(c, 2, 1.0);
        let b = random(c, 3, 1.0);
        let r = random(n * c, 4, 1.0);
        let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        kernels::layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &b);
        assert_close("layernorm forward", &out, &layernorm_ref(&x, &w, &b), 1e-12);
        let (mut dx, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
        let mut partials = vec![0.0; kernels::blocks(n) * 2 * c];
        kernels::layernorm_backward(
            &mut dx,
            &mut dw,
            &mut db,
            &mut partials,
            &r,
            &x,
            &w,
            &mean,
            &rstd,
        );
        check_gradient("layernorm dx", &x, &dx, |x| {
            weighted(&layernorm_ref(x, &w, &b), &r)
        });
        check_gradient("layernorm dw", &w, &dw, |w| {
            weighted(&layernorm_ref(&x, w, &b), &r)
        });
        check_gradient("layernorm db", &b, &db, |b| {
            weighted(&layernorm_ref(&x, &w, b), &r)
        });
    }
}

#[test]
fn linear_forward_and_backward() {
    for (n, ic, oc) in [(1, 3, 2), (35, 4, 9), (66, 5, 3)] {
        let x = random(n * ic, 1, 1.0);
        let w = random(oc * ic, 2, 1.0);
        let b = random(oc, 3, 1.0);
        let res = random(n * oc, 5, 1.0);
        let r = random(n * oc, 4, 1.0);
        let mut out = vec![0.0; n * oc];
        kernels::linear_forward(&mut out, &x, &w, &b, None);
        assert_close("linear forward", &out, &linear_ref(&x, &w, &b), 1e-12);
        kernels::linear_forward(&mut out, &x, &w, &b, Some(&res));
        let want: Vec<f64> = linear_ref(&x, &w, &b)
            .iter()
            .zip(&res)
            .map(|(a, b)| a + b)
            .collect();
        assert_close("linear forward + residual", &out, &want, 1e-12);
        let (mut dx, mut dw, mut db) = (vec![0.0; n * ic], vec![0.0; oc * ic], vec![0.0; oc]);
        let mut partials = vec![0.0; kernels::blocks(n) * oc];
        kernels::linear_backward(Some(&mut dx), &mut dw, &mut db, &mut partials, &r, &x, &w);
        check_gradient("linear dx", &x, &dx, |x| {
            weighted(&linear_ref(x, &w, &b), &r)
        });
        check_gradient("linear dw", &w, &dw, |w| {
            weighted(&linear_ref(&x, w, &b), &r)
        });
        check_gradient("linear db", &b, &db, |b| {
            weighted(&linear_ref(&x, &w, b), &r)
        });
    }
}

#[test]
fn gelu_forward_and_backward() {
    let x: Vec<f64> = random(1001, 1, 2.5);
    let r = random(1001, 2, 1.0);
    let mut out = vec![0.0; x.len()];
    kernels::gelu_forward(&mut out, &x);
    assert_close("gelu forward", &out, &gelu_ref(&x), 1e-12);
    let mut d = r.clone();
    kernels::gelu_backward(&mut d, &x);
    check_gradient("gelu", &x, &d, |x| weighted(&gelu_ref(x), &r));
}

#[test]
fn attention_forward_and_backward() {
    for s in [
        Heads {
            b: 1,
            t: 1,
            c: 2,
            nh: 1,
        },
        Heads {
            b: 2,
            t: 5,
            c: 6,
            nh: 2,
        },
        Heads {
            b: 1,
            t: 7,
            c: 4,
            nh: 1,
        },
        Heads {
            b: 3,
            t: 4,
            c: 9,
            nh: 3,
        },
    ] {
        let (n, c, t, hs) = (s.b * s.t, s.c, s.t, s.c / s.nh);
        let qkv = random(n * 3 * c, 1, 1.0);
        let r = random(n * c, 2, 1.0);
        let mut out = vec![0.0; n * c];
        let mut att = vec![0.0; s.b * s.nh * t * t];
        let mut heads = vec![0.0; n * c];
        kernels::attention_forward(&mut out, &mut att, &mut heads, &qkv, s);
        assert_close("attention forward", &out, &attention_ref(&qkv, s), 1e-12);
        // Probabilities: rows sum to one, nothing above the diagonal.
        for (i, row) in att.chunks(t).enumerate() {
            let (seen, future) = row.split_at(i % t + 1);
            assert!((seen.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            assert!(future.iter().all(|p| *p == 0.0), "causal mask");
        }
        let mut dqkv = vec![0.0; n * 3 * c];
        let mut datt = vec![0.0; s.b * s.nh * t * t];
        let mut dheads = vec![0.0; 3 * n * c];
        kernels::attention_backward(
            &mut dqkv,
            &mut datt,
            &mut heads,
            &mut dheads,
            &r,
            &att,
            &qkv,
            s,
        );
        check_gradient("attention dqkv", &qkv, &dqkv, |q| {
            weighted(&attention_ref(q, s), &r)
        });
        assert_eq!(hs * s.nh, c);
    }
}

#[test]
fn lm_head_and_cross_entropy_in_row_chunks() {
    // N = 7 rows in chunks of 3 (7 is not a multiple), V = 11.
    for (n, c, v, chunk) in [(7, 4, 11, 3), (1, 3, 5, 4), (9, 2, 13, 9)] {
        let x = random(n * c, 1, 1.0);
        let wte = random(v * c, 2, 1.0);
        let targets: Vec<u32> = (0..n).map(|i| ((i * 5 + 3) % v) as u32).collect();
        let scale = 0.37;
        let mut logits = vec![0.0; chunk * v];
        let mut row_loss = vec![0.0; n];
        let total =
            kernels::head_cross_entropy(&x, &wte, &targets, &mut logits, &mut row_loss, None, 1.0);
        assert!((total - head_ref(&x, &wte, &targets)).abs() < 1e-11);
        let (mut dx, mut dwte) = (vec![0.0; n * c], vec![0.0; v * c]);
        let again = kernels::head_cross_entropy(
            &x,
            &wte,
            &targets,
            &mut logits,
            &mut row_loss,
            Some(HeadGrad {
                dx: &mut dx,
                dwte: &mut dwte,
            }),
            scale,
        );
        assert_eq!(total, again);
        check_gradient("head dx", &x, &dx, |x| scale * head_ref(x, &wte, &targets));
        check_gradient("head dwte", &wte, &dwte, |w| {
            scale * head_ref(&x, w, &targets)
        });
    }
}

#[test]
fn embedding_forward_and_backward() {
    let (b, t, c, v) = (3, 5, 4, 7);
    let tokens: Vec<u32> = (0..b * t).map(|i| ((i * 3) % v) as u32).collect();
    let wte = random(v * c, 1, 1.0);
    let wpe = random(t * c, 2, 1.0);
    let r = random(b * t * c, 3, 1.0);
    let reference = |wte: &[f64], wpe: &[f64]| -> Vec<f64> {
        (0..b * t)
            .flat_map(|n| {
                let tok = tokens[n] as usize;
                (0..c).map(move |j| wte[tok * c + j] + wpe[(n % t) * c + j])
            })
            .collect()
    };
    let mut out = vec![0.0; b * t * c];
    kernels::embed_forward(&mut out, &tokens, &wte, &wpe, t);
    assert_close("embedding forward", &out, &reference(&wte, &wpe), 0.0);
    let (mut dwte, mut dwpe) = (vec![0.0; v * c], vec![0.0; t * c]);
    kernels::token_embedding_backward(&mut dwte, &r, &tokens, c);
    kernels::position_embedding_backward(&mut dwpe, &r, t, c);
    check_gradient("wte", &wte, &dwte, |w| weighted(&reference(w, &wpe), &r));
    check_gradient("wpe", &wpe, &dwpe, |w| weighted(&reference(&wte, w), &r));
}
