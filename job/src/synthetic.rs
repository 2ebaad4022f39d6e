//! The built-in synthetic corpus of the `tiny` preset: a seeded first-order
//! Markov source whose entropy rate is known exactly.
//!
//! Each token has `branching` possible successors with random probabilities
//! (a Dirichlet(1) draw). Because the next token depends only on the current
//! one, and every prediction a GPT makes sees at least the current token, the
//! best achievable cross-entropy is the source's entropy rate
//! `H = Σ_s π(s) · H(P(·|s))` (π the stationary distribution reached from the
//! start token): a trained model's validation loss must approach it, and a
//! test computes `H` from the generator rather than trusting a constant.
//!
//! This module owns generation only; it must stay deterministic for a given
//! (vocab, branching, seed) on every machine.

use crate::rng::{Rng, Stream};

/// A first-order Markov source over `0..vocab`.
#[derive(Debug, Clone)]
pub struct MarkovSource {
    vocab: usize,
    /// For each token: (successor, probability), probabilities summing to 1.
    successors: Vec<Vec<(u16, f64)>>,
}

impl MarkovSource {
    pub fn new(vocab: usize, branching: usize, seed: u64) -> MarkovSource {
        let vocab = vocab.clamp(1, crate::config::MAX_VOCAB);
        let branching = branching.clamp(1, vocab);
        let mut rng = Rng::new(seed, Stream::SyntheticTable);
        let mut ids: Vec<u16> = (0..vocab).map(|v| v as u16).collect();
        let successors = (0..vocab)
            .map(|_| {
                rng.shuffle(&mut ids);
                // Exponential weights normalised = a uniform Dirichlet draw.
                let weights: Vec<f64> = (0..branching)
                    .map(|_| -(1.0 - rng.uniform()).ln())
                    .collect();
                let total: f64 = weights.iter().sum();
                ids[..branching]
                    .iter()
                    .zip(weights)
                    .map(|(&t, w)| (t, w / total))
                    .collect()
            })
            .collect();
        MarkovSource { vocab, successors }
    }

    /// `n` tokens of a walk that starts at token 0.
    pub fn generate(&self, n: usize, seed: u64) -> Vec<u16> {
        let mut rng = Rng::new(seed, Stream::SyntheticWalk);
        let mut out = Vec::with_capacity(n);
        let mut state = 0u16;
        for _ in 0..n {
            out.push(state);
            let u = rng.uniform();
            let row = &self.successors[state as usize];
            let mut acc = 0.0;
            // Falls back to the last successor if rounding leaves acc < u.
            state = row.last().map_or(0, |&(t, _)| t);
            for &(t, p) in row {
                acc += p;
                if u < acc {
                    state = t;
                    break;
                }
            }
        }
        out
    }

    /// The stationary distribution reached from token 0, by power iteration
    /// of the lazy chain ½(I + P) (aperiodic, so it converges).
    pub fn stationary(&self) -> Vec<f64> {
        let mut pi = vec![0.0; self.vocab];
        pi[0] = 1.0;
        for _ in 0..100_000 {
            let mut next: Vec<f64> = pi.iter().map(|p| 0.5 * p).collect();
            for (s, row) in self.successors.iter().enumerate() {
                for &(t, p) in row {
                    next[t as usize] += 0.5 * pi[s] * p;
                }
            }
            let change: f64 = next.iter().zip(&pi).map(|(a, b)| (a - b).abs()).sum();
            pi = next;
            if change < 1e-13 {
                break;
            }
        }
        pi
    }

    /// Entropy rate in nats per token: the floor of any model's loss.
    pub fn entropy_rate(&self) -> f64 {
        let pi = self.stationary();
        self.successors
            .iter()
            .zip(&pi)
            .map(|(row, p)| {
                p * row
                    .iter()
                    .map(|&(_, q)| if q > 0.0 { -q * q.ln() } else { 0.0 })
                    .sum::<f64>()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_in_vocabulary() {
        let a = MarkovSource::new(128, 4, 9).generate(10_000, 9);
        let b = MarkovSource::new(128, 4, 9).generate(10_000, 9);
        assert_eq!(a, b);
        assert!(a.iter().all(|&t| t < 128));
        let c = MarkovSource::new(128, 4, 10).generate(10_000, 10);
        assert_ne!(a, c);
    }

    #[test]
    fn empirical_conditional_entropy_matches_the_rate() {
        let src = MarkovSource::new(64, 4, 1);
        let tokens = src.generate(400_000, 1);
        // Plug-in estimate of H(next | current) from bigram counts.
        let mut counts = vec![vec![0u32; 64]; 64];
        for w in tokens.windows(2) {
            counts[w[0] as usize][w[1] as usize] += 1;
        }
        let n = (tokens.len() - 1) as f64;
        let mut h = 0.0;
        for row in &counts {
            let total: u32 = row.iter().sum();
            for &c in row.iter().filter(|&&c| c > 0) {
                let p = c as f64 / total as f64;
                h -= c as f64 / n * p.ln();
            }
        }
        let rate = src.entropy_rate();
        assert!((h - rate).abs() < 0.01, "empirical {h} vs rate {rate}");
        assert!(rate > 0.3 && rate < 4f64.ln(), "{rate}");
    }

    #[test]
    fn one_successor_means_zero_entropy() {
        let src = MarkovSource::new(16, 1, 2);
        assert!(src.entropy_rate().abs() < 1e-12);
    }
}
