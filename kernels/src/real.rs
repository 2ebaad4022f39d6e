//! The scalar types the fused engine computes in: `f32` for training and
//! `f64` for the gradient checks in tests. One generic kernel serves both,
//! so the f64 finite-difference tests run exactly the code training runs.
//!
//! `exp` is the one function where the two differ: `f64` uses the C
//! library's, `f32` a branch-free polynomial (Cephes' `expf`, within 2 ulp)
//! that the compiler vectorises. The C library's `expf` is a call per
//! element; the cross-entropy takes B·T × V of them per micro-batch.

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, MulAssign, SubAssign};

/// A float the fused kernels run in.
pub trait Real:
    num_traits::Float
    + AddAssign
    + SubAssign
    + MulAssign
    + Sum
    + Default
    + Debug
    + Send
    + Sync
    + 'static
{
    /// The nearest value of this type to `x`.
    fn of(x: f64) -> Self;
    /// As f64 (exact for both types).
    fn wide(self) -> f64;
    /// e^x; for `f32` a polynomial that vectorises (see the module doc).
    fn exp_fast(self) -> Self;
}

impl Real for f64 {
    #[inline(always)]
    fn of(x: f64) -> f64 {
        x
    }
    #[inline(always)]
    fn wide(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp_fast(self) -> f64 {
        self.exp()
    }
}

impl Real for f32 {
    #[inline(always)]
    fn of(x: f64) -> f32 {
        x as f32
    }
    #[inline(always)]
    fn wide(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn exp_fast(self) -> f32 {
        exp_f32(self)
    }
}

/// e^x in f32 without branches: x = n·ln2 + r with |r| ≤ ln2/2, e^r by
/// Cephes' degree-6 polynomial, 2^n by building the exponent bits. Inputs
/// are clamped to [−87.3, 88.3]: below, the result is ~1e-38 instead of a
/// subnormal or 0, which no caller can tell apart from 0 in a sum of ≥ 1.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to the nearest integer in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes: 5.0000001201e-1, which is 0.5 in f32
    let er = p * r * r + r + 1.0;
    // n is in [−126, 127]: a normal power of two.
    let bits = ((shifted.to_bits() as i32 - ROUND.to_bits() as i32) + 127) << 23;
    er * f32::from_bits(bits as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_two_ulp_of_the_library() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (f64::from(exp_f32(x)), f64::from(x).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        // 2 ulp of f32 is 2.4e-7 relative.
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1000.0) < 1e-37 && exp_f32(-1000.0) >= 0.0);
        assert!(exp_f32(1000.0).is_finite());
    }
}
