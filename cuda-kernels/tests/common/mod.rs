//! What the kernel tests share: deterministic inputs, bf16 rounding, and
//! the comparisons with their tolerances.
//!
//! Tolerances (|got − want| ≤ rel·|want| + abs·max|want| over the tensor):
//!
//! - [`F32`]: rel 1e-5, abs 1e-6. The kernels compute in f32 like the CPU
//!   but sum in another order (warp butterflies, tiles, online softmax) and
//!   use the C library's expf (the CPU a ≤ 2 ulp polynomial): a few ulp
//!   (1 ulp = 6e-8 relative) per operation over sums of up to ~100 terms,
//!   where a value near 0 after cancellation is measured against the
//!   tensor's scale. The reference is the CPU kernel in f64 where it exists
//!   (so the bound is the kernel's own error) or in f32.
//! - [`BF16`]: rel 2⁻⁸, abs 2⁻⁸. The reference is the CPU kernel in f32 on
//!   the bf16-rounded inputs; the kernel computes in f32 from the same
//!   values, and its bf16 output is rounded once (≤ 2⁻⁹ relative, half a
//!   bf16 ulp): 2⁻⁸ is that plus room for the f32 differences above and,
//!   where a bf16 intermediate feeds a later step (the attention backward
//!   reads the bf16 forward output), its rounding carried through.
//! - Exact (bits) where the kernel promises it: the embeddings' forward (one
//!   f32 add, rounded once), their backwards and the column sums (the CPU's
//!   additions in the CPU's order).

#![allow(dead_code)]

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use stride_cuda_kernels::{Storage, round_bf16};

/// A tolerance: |got − want| ≤ rel·|want| + abs·max|want|.
#[derive(Debug, Clone, Copy)]
pub struct Tol {
    pub rel: f64,
    pub abs: f64,
}

pub const F32: Tol = Tol {
    rel: 1e-5,
    abs: 1e-6,
};

pub const BF16: Tol = Tol {
    rel: 1.0 / 256.0,
    abs: 1.0 / 256.0,
};

/// Deterministic inputs from a seed (ChaCha8).
pub struct Inputs(ChaCha8Rng);

impl Inputs {
    pub fn new(seed: u64) -> Inputs {
        Inputs(ChaCha8Rng::seed_from_u64(seed))
    }

    /// Uniform in [−scale, scale).
    pub fn uniform(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u = (self.0.next_u32() >> 8) as f32 / (1u32 << 24) as f32;
                (2.0 * u - 1.0) * scale
            })
            .collect()
    }

    /// Integers in [0, below).
    pub fn below(&mut self, n: usize, below: u32) -> Vec<u32> {
        (0..n)
            .map(|_| ((u64::from(self.0.next_u32()) * u64::from(below)) >> 32) as u32)
            .collect()
    }
}

/// Each value rounded to the nearest bf16.
pub fn rounded(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| round_bf16(v)).collect()
}

/// The values in storage type T (for bf16: rounded).
pub fn store<T: Storage>(x: &[f32]) -> Vec<T> {
    x.iter().map(|&v| T::from_f32(v)).collect()
}

/// The stored values as f32.
pub fn load<T: Storage>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// What the CPU reference gets for inputs stored as T: the values
/// themselves for f32, the bf16-rounded values for bf16.
pub fn as_stored<T: Storage>(x: &[f32]) -> Vec<f32> {
    load(&store::<T>(x))
}

/// The tolerance for outputs stored as T.
pub fn tol_for<T: Storage>() -> Tol {
    if T::SUFFIX == "bf16" { BF16 } else { F32 }
}

pub fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

pub fn narrow(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// Checks got against want within `tol`; returns the worst error relative
/// to the bound (≤ 1 passes) for reporting.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: Tol) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f64, |m, w| m.max(w.abs()));
    let mut worst = 0f64;
    let mut worst_at = 0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let bound = tol.rel * w.abs() + tol.abs * scale;
        let err = (f64::from(g) - w).abs();
        assert!(
            err <= bound || (bound == 0.0 && err == 0.0),
            "{what}[{i}]: got {g:e}, want {w:e} (error {err:e}, bound {bound:e}, scale {scale:e})"
        );
        let ratio = if bound > 0.0 { err / bound } else { 0.0 };
        if ratio > worst {
            worst = ratio;
            worst_at = i;
        }
    }
    eprintln!("{what}: worst error {worst:.3} of the bound (at {worst_at})");
    worst
}

/// The same bits.
#[track_caller]
pub fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "{what}[{i}]: got {g:e}, want {w:e}"
        );
    }
}

/// Values that exercise the rounding: ties, near-ties, subnormals, the
/// largest finite values, infinities, NaNs, both signs; then 5,000
/// uniform values and `random_bits` random bit patterns.
pub fn awkward(random_bits: usize) -> Vec<f32> {
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
    x.extend(
        rng.below(random_bits, u32::MAX)
            .into_iter()
            .map(f32::from_bits),
    );
    x
}

/// (B, T, C, NH): T = 1, T not a multiple of the 32-row tiles, T below and
/// above a tile; one head and several; head sizes 8, 32, 64 (GPT-2), 96,
/// 128 (the attention tests, on the emulator and on a GPU).
pub const ATTENTION_SHAPES: &[(usize, usize, usize, usize)] = &[
    (1, 1, 8, 1),
    (2, 17, 24, 3),
    (1, 33, 64, 2),
    (2, 100, 96, 1),
    (1, 70, 128, 2),
    (1, 45, 128, 1),
    (2, 32, 16, 2),
    (1, 64, 256, 2),
];
