//! Stride's own random numbers: seeded, portable, and checkpointable.
//!
//! Every random choice in a job (weight initialisation, the per-epoch sample
//! permutation, the synthetic corpus) draws from a ChaCha8 stream identified
//! by (seed, [`Stream`]). The same seed gives the same numbers on every
//! machine and every process, so ranks agree without talking, and a resumed
//! run sees exactly what an uninterrupted one would. Candle's CPU RNG cannot
//! be seeded, so it is never used.
//!
//! The algorithms on top of the raw stream (unbiased integer range, uniform
//! and normal floats, Fisher–Yates) are written here rather than taken from
//! `rand`, whose sampling algorithms may change between versions: a
//! checkpoint's data order must not depend on a dependency bump.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// Independent purposes of random numbers, each its own ChaCha stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Initial weights.
    Init,
    /// The transition table of the synthetic corpus.
    SyntheticTable,
    /// The walk that emits the synthetic corpus.
    SyntheticWalk,
    /// Token choices when sampling text from a model (`worker sample`).
    Sample,
    /// The sample permutation of one epoch.
    Epoch(u64),
}

impl Stream {
    fn id(self) -> u64 {
        match self {
            Stream::Init => 1,
            Stream::SyntheticTable => 2,
            Stream::SyntheticWalk => 3,
            Stream::Sample => 4,
            // Epoch streams live in the upper half of the id space.
            Stream::Epoch(e) => (1 << 63) | e,
        }
    }
}

/// A seeded generator; see the module doc.
#[derive(Debug, Clone)]
pub struct Rng {
    inner: ChaCha8Rng,
}

impl Rng {
    pub fn new(seed: u64, stream: Stream) -> Rng {
        let mut inner = ChaCha8Rng::seed_from_u64(seed);
        inner.set_stream(stream.id());
        Rng { inner }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }

    /// Uniform integer in `0..n` (n > 0), without modulo bias (Lemire's
    /// widening multiply with rejection).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller; one value per call for simplicity).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]: ln is finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_numbers_other_stream_other_numbers() {
        let a: Vec<u64> = (0..4)
            .map(|_| Rng::new(7, Stream::Init).next_u64())
            .collect();
        assert!(a.iter().all(|x| *x == a[0]));
        let mut e0 = Rng::new(7, Stream::Epoch(0));
        let mut e1 = Rng::new(7, Stream::Epoch(1));
        assert_ne!(e0.next_u64(), e1.next_u64());
    }

    #[test]
    fn the_stream_is_pinned() {
        // Changing these numbers changes every saved run's data order: only
        // do it with a checkpoint format version bump.
        let mut r = Rng::new(1337, Stream::Epoch(0));
        let got: Vec<u64> = (0..3).map(|_| r.below(1000)).collect();
        assert_eq!(got, PINNED_EPOCH0_BELOW_1000);
    }
    const PINNED_EPOCH0_BELOW_1000: [u64; 3] = [904, 773, 37];

    #[test]
    fn below_is_uniform_enough_and_in_range() {
        let mut r = Rng::new(1, Stream::Init);
        let mut counts = [0u32; 6];
        for _ in 0..60_000 {
            counts[r.below(6) as usize] += 1;
        }
        for c in counts {
            assert!((9_400..10_600).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn normal_has_unit_variance() {
        let mut r = Rng::new(3, Stream::Init);
        let xs: Vec<f64> = (0..100_000).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<u32> = (0..1000).collect();
        Rng::new(5, Stream::Epoch(3)).shuffle(&mut v);
        assert_ne!(v, (0..1000).collect::<Vec<_>>());
        v.sort_unstable();
        assert_eq!(v, (0..1000).collect::<Vec<_>>());
    }
}
