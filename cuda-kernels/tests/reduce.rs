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

/// Values that exercise the rounding: ties, near-ties, subnormals, the
/// largest finite values, infinities, NaNs, both signs.
fn awkward() -> Vec<f32> {
    let mut x = vec![
        0.0,
        -0.0,
        1.0,
        f32::from_bits(0x3f80_8000), // 1 + 2⁻⁸: a tie, to even (down)
        f32::from_bits(0x3f81_8000), // a tie, to even (up)
        f32::from_bits(0x3f80_8001), // just above a tie
        f32::from_bits(0x3f80_7fff), // just below a tie
        f32::MAX,
        f32::MIN,
        f32::from_bits(0x7f7f_8000), // rounds to infinity
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0xffc0_1234),
        f32::from_bits(0x7f80_0001), // signalling NaN
        f32::from_bits(0x0000_8000), // subnormal tie
        f32::from_bits(0x0001_8000),
        f32::from_bits(0x8000_0001),
        f32::MIN_POSITIVE,
    ];
    let mut rng = Inputs::new(70);
    x.extend(rng.uniform(5000, 100.0));
    x.extend(rng.below(5000, u32::MAX).into_iter().map(f32::from_bits));
    x
}

#[test]
fn cast_to_bf16_rounds_to_nearest_even_and_keeps_nan() {
    let x = awkward();
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
