//! The sum of squares (the gradient norm) and the f32 ↔ bf16 casts,
//! emulated. stride-kernels has no kernel for these: the sum of squares is
//! checked against an f64 sum, the casts bit for bit against the host's
//! conversions (and those against the `half` crate's).

mod common;

use common::*;
use stride_cuda_kernels::{Bf16, emu, from_bf16, launch, to_bf16};

#[test]
fn sum_of_squares_matches_an_f64_sum() {
    // Empty, one, a block, a block and one, more than the 512-block grid
    // covers in one pass.
    for (i, &n) in [0usize, 1, 256, 257, 100_003, (1 << 20) + 7]
        .iter()
        .enumerate()
    {
        let x = Inputs::new(60 + i as u64).uniform(n, 1.0);
        let want: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let mut out = [f32::NAN];
        let mut partials = vec![f32::NAN; launch::sumsq_blocks(n)];
        emu::sum_of_squares(&mut out, &mut partials, &x).expect("sum_of_squares");
        // Positive terms: no cancellation. Each thread sums ≤ n/(512·256)
        // terms in order, then 17 levels of pairwise sums: ~1e-6 relative.
        let err = (f64::from(out[0]) - want).abs();
        assert!(err <= 2e-6 * want, "n={n}: got {}, want {want}", out[0]);
        // The same bits again.
        let mut again = [0f32];
        emu::sum_of_squares(&mut again, &mut partials, &x).expect("sum_of_squares");
        assert_eq!(out[0].to_bits(), again[0].to_bits());
    }
}

#[test]
fn cast_to_bf16_rounds_to_nearest_even_and_keeps_nan() {
    let x = awkward(5000);
    let mut got = vec![Bf16::default(); x.len()];
    emu::cast_f32_to_bf16(&mut got, &x).expect("cast");
    for (&v, g) in x.iter().zip(&got) {
        if v.is_nan() {
            assert_eq!(g.0, 0x7fff, "NaN {:#x} → canonical NaN", v.to_bits());
            continue;
        }
        assert_eq!(g.0, to_bf16(v), "{v:e} ({:#x})", v.to_bits());
        // The host's conversion is half's (round to nearest even).
        assert_eq!(g.0, half::bf16::from_f32(v).to_bits(), "{v:e} against half");
    }
}

#[test]
fn cast_from_bf16_is_exact() {
    let bits: Vec<Bf16> = (0..=u16::MAX).map(Bf16).collect();
    let mut got = vec![0f32; bits.len()];
    emu::cast_bf16_to_f32(&mut got, &bits).expect("cast");
    for (b, g) in bits.iter().zip(&got) {
        assert_eq!(g.to_bits(), u32::from(b.0) << 16);
        assert_eq!(g.to_bits(), from_bf16(b.0).to_bits());
        // (half quiets signalling NaNs; the kernel, like the GPU's
        // conversion, only shifts the bits.)
        if !g.is_nan() {
            assert_eq!(g.to_bits(), half::bf16::from_bits(b.0).to_f32().to_bits());
        }
    }
}
