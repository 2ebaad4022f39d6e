//! bf16 on the host: the 16 high bits of an f32. The conversions are the
//! kernels' (portable.cuh): round to nearest, ties to even; every NaN
//! becomes the canonical quiet NaN 0x7fff, as the GPU's cvt.rn.bf16.f32
//! makes it; overflow rounds to infinity.

/// f32 → bf16 bits, round to nearest even.
pub fn to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return 0x7fff;
    }
    let rounded = u.wrapping_add(0x7fff + ((u >> 16) & 1));
    (rounded >> 16) as u16
}

/// bf16 bits → f32 (exact).
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// x rounded to the nearest bf16, as an f32.
pub fn round_bf16(x: f32) -> f32 {
    from_bf16(to_bf16(x))
}

/// A bf16 value in memory (the kernels' `bf16`: 2 bytes, the bits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Bf16 {
    /// The nearest bf16 to `x` (ties to even).
    pub fn from_f32(x: f32) -> Bf16 {
        Bf16(to_bf16(x))
    }
    /// The value as f32 (exact).
    pub fn to_f32(self) -> f32 {
        from_bf16(self.0)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for super::Bf16 {}
}

/// The storage types the kernels are instantiated for: `f32` and [`Bf16`].
/// Kernels compute in f32 whatever the storage.
pub trait Storage:
    sealed::Sealed + Copy + Default + Send + Sync + std::fmt::Debug + 'static
{
    /// The suffix of the kernels' names: `f32` or `bf16`.
    const SUFFIX: &'static str;
    /// The element type, as [`crate::matmul`] names it.
    const DTYPE: crate::matmul::DType;
    /// The value as f32 (exact).
    fn to_f32(self) -> f32;
    /// The nearest value to `x` (for bf16: ties to even).
    fn from_f32(x: f32) -> Self;
}

impl Storage for f32 {
    const SUFFIX: &'static str = "f32";
    const DTYPE: crate::matmul::DType = crate::matmul::DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> f32 {
        x
    }
}

impl Storage for Bf16 {
    const SUFFIX: &'static str = "bf16";
    const DTYPE: crate::matmul::DType = crate::matmul::DType::Bf16;
    fn to_f32(self) -> f32 {
        Bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Bf16 {
        Bf16::from_f32(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_nearest_even() {
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties to even (1).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), to_bf16(1.0));
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: even is the upper.
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 1.0 / 64.0);
        // Just above halfway rounds up.
        assert_eq!(
            from_bf16(to_bf16(f32::from_bits((1.0f32).to_bits() + 0x8001))),
            1.0 + 1.0 / 128.0
        );
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(to_bf16(f32::NEG_INFINITY), 0xff80);
        assert_eq!(to_bf16(f32::MAX), 0x7f80); // overflow → ∞
        assert_eq!(to_bf16(-0.0), 0x8000);
        assert_eq!(to_bf16(f32::NAN), 0x7fff);
        assert!(from_bf16(to_bf16(f32::from_bits(0xff80_0001))).is_nan());
        // Subnormals round like everything else.
        assert_eq!(to_bf16(f32::from_bits(0x0000_8000)), 0x0000);
        assert_eq!(to_bf16(f32::from_bits(0x0001_8000)), 0x0002);
    }
}
