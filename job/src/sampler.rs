//! The data plan: which samples exist, in which order they are read, and
//! which rank reads which.
//!
//! A sample is the window of `context + 1` tokens starting at `i · stride`
//! (input = the first `context`, target = the same shifted by one), so a
//! split of N tokens has `floor((N − context − 1)/stride) + 1` samples.
//!
//! Each epoch reads every sample once, in a permutation seeded by
//! (seed, epoch). The coordinator takes each step's global batch as the next
//! `global_batch` entries of that endless stream (crossing into the next
//! epoch when one runs out) and splits it among ranks. The [`DataCursor`]
//! (epoch, position in the epoch's permutation) is all the state there is:
//! saved in a checkpoint, it reproduces the exact future sample stream, and
//! because the stream never depends on the number of workers, a resume with
//! another world size reads the same samples in the same steps.

use serde::{Deserialize, Serialize};

use crate::rng::{Rng, Stream};

/// Number of windows of `context + 1` tokens at `stride` in `tokens` tokens.
pub fn window_count(tokens: usize, context: usize, stride: usize) -> u64 {
    if stride == 0 || tokens < context + 1 {
        return 0;
    }
    ((tokens - context - 1) / stride + 1) as u64
}

/// Where sample `i` starts.
pub fn window_start(sample: u64, stride: usize) -> usize {
    sample as usize * stride
}

/// The permutation of `0..samples` for one epoch.
pub fn epoch_permutation(samples: u64, seed: u64, epoch: u64) -> Vec<u64> {
    let mut perm: Vec<u64> = (0..samples).collect();
    Rng::new(seed, Stream::Epoch(epoch)).shuffle(&mut perm);
    perm
}

/// Position of the data stream: the next sample is entry `position` of
/// epoch `epoch`'s permutation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCursor {
    pub epoch: u64,
    pub position: u64,
}

/// One step's global batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Global sample indices, in order.
    pub samples: Vec<u64>,
    /// The epoch of the first sample.
    pub epoch: u64,
}

/// Hands out global batches from the seeded epoch stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    samples: u64,
    seed: u64,
    cursor: DataCursor,
    /// The permutation of `cursor.epoch`, computed on first use.
    perm: Option<(u64, Vec<u64>)>,
}

/// A sampler that cannot be positioned.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SamplerError {
    #[error("the training split has no complete sample")]
    NoSamples,
    #[error(
        "data cursor position {position} is beyond the {samples} samples of an epoch (was the checkpoint made on another corpus?)"
    )]
    CursorBeyondEpoch { position: u64, samples: u64 },
}

impl Sampler {
    /// A sampler positioned at `cursor` (the start is `DataCursor::default()`).
    pub fn new(samples: u64, seed: u64, cursor: DataCursor) -> Result<Sampler, SamplerError> {
        if samples == 0 {
            return Err(SamplerError::NoSamples);
        }
        if cursor.position > samples {
            return Err(SamplerError::CursorBeyondEpoch {
                position: cursor.position,
                samples,
            });
        }
        Ok(Sampler {
            samples,
            seed,
            cursor,
            perm: None,
        })
    }

    pub fn cursor(&self) -> DataCursor {
        self.cursor
    }

    /// The next `size` samples of the stream.
    pub fn next_batch(&mut self, size: usize) -> Batch {
        if self.cursor.position == self.samples {
            self.cursor = DataCursor {
                epoch: self.cursor.epoch + 1,
                position: 0,
            };
        }
        let epoch = self.cursor.epoch;
        let mut samples = Vec::with_capacity(size);
        while samples.len() < size {
            if self.cursor.position == self.samples {
                self.cursor = DataCursor {
                    epoch: self.cursor.epoch + 1,
                    position: 0,
                };
            }
            let e = self.cursor.epoch;
            if self.perm.as_ref().is_none_or(|(pe, _)| *pe != e) {
                self.perm = Some((e, epoch_permutation(self.samples, self.seed, e)));
            }
            let perm = self
                .perm
                .as_ref()
                .map(|(_, p)| p.as_slice())
                .unwrap_or_default();
            let from = self.cursor.position as usize;
            let take = (size - samples.len()).min(perm.len() - from);
            samples.extend_from_slice(&perm[from..from + take]);
            self.cursor.position += take as u64;
        }
        Batch { samples, epoch }
    }
}

/// Rank `rank`'s contiguous share of a global batch that divides evenly
/// (training: `global_batch = world × micro_batch × accumulation`).
pub fn shard(samples: &[u64], world: usize, rank: usize) -> &[u64] {
    let per = samples.len() / world.max(1);
    &samples[rank * per..(rank + 1) * per]
}

/// Rank `rank`'s contiguous share when the count need not divide
/// (evaluation): the first `len % world` ranks get one more.
pub fn shard_uneven(samples: &[u64], world: usize, rank: usize) -> &[u64] {
    let world = world.max(1);
    let (per, extra) = (samples.len() / world, samples.len() % world);
    let start = rank * per + rank.min(extra);
    let len = per + usize::from(rank < extra);
    &samples[start..start + len]
}

/// The validation windows of one evaluation (windows at `data.val_stride`,
/// disjoint by default): all of them when `eval_batches` is 0, else
/// `eval_batches × global_batch` of them spread evenly over the whole split
/// (window `⌊i · windows / m⌋` for i in 0..m), or all of them when the split
/// has fewer (the coordinator warns). The same windows at every
/// evaluation and for every number of workers, so evaluations compare.
pub fn eval_samples(val_windows: u64, eval_batches: usize, global_batch: usize) -> Vec<u64> {
    let wanted = (eval_batches as u64).saturating_mul(global_batch as u64);
    if eval_batches == 0 || wanted >= val_windows {
        return (0..val_windows).collect();
    }
    (0..wanted)
        .map(|i| (u128::from(i) * u128::from(val_windows) / u128::from(wanted)) as u64)
        .collect()
}

/// What one evaluation reads, as the coordinator logs it and `plan`
/// prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValidationStats {
    /// Validation windows of the split at `val_stride`.
    pub windows: u64,
    pub val_stride: usize,
    /// Windows read per evaluation.
    pub per_evaluation: u64,
    /// Tokens predicted per evaluation.
    pub tokens_per_evaluation: u64,
    /// An evaluation's compute in training steps: a forward pass is about
    /// a third of a forward and backward.
    pub step_equivalents: f64,
    /// `eval_batches × global_batch` when that exceeds the windows.
    pub requested: Option<u64>,
}

impl ValidationStats {
    pub fn new(config: &crate::config::Config, windows: u64) -> ValidationStats {
        let t = &config.train;
        let per_evaluation = eval_samples(windows, t.eval_batches, t.global_batch).len() as u64;
        let context = config.model.context as u64;
        let tokens_per_evaluation = per_evaluation * context;
        let requested = (t.eval_batches as u64).saturating_mul(t.global_batch as u64);
        ValidationStats {
            windows,
            val_stride: config.data.val_stride,
            per_evaluation,
            tokens_per_evaluation,
            step_equivalents: tokens_per_evaluation as f64
                / (t.global_batch as u64 * context) as f64
                / 3.0,
            requested: (t.eval_batches > 0 && requested > windows).then_some(requested),
        }
    }

    /// One line: windows, what an evaluation reads, and its cost in steps.
    pub fn describe(&self) -> String {
        format!(
            "{} windows (val_stride {}); each evaluation reads {} of them = {} tokens, ≈ {:.1} training steps of compute",
            self.windows,
            self.val_stride,
            self.per_evaluation,
            self.tokens_per_evaluation,
            self.step_equivalents
        )
    }

    /// The documented clamp: more windows asked for than the split has.
    pub fn clamp_warning(&self) -> Option<String> {
        self.requested.map(|r| {
            format!(
                "train.eval_batches × train.global_batch = {r} windows, but the validation split has {}: every evaluation reads all of them",
                self.windows
            )
        })
    }
}

/// Epoch arithmetic of a run, as `plan` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpochStats {
    pub samples: u64,
    pub global_batch: usize,
    pub steps_per_epoch: f64,
    pub epochs: f64,
}

impl EpochStats {
    pub fn new(samples: u64, global_batch: usize, max_steps: u64) -> EpochStats {
        let steps_per_epoch = samples as f64 / global_batch as f64;
        EpochStats {
            samples,
            global_batch,
            steps_per_epoch,
            epochs: max_steps as f64 / steps_per_epoch,
        }
    }
}

/// More passes over the training data than this, and a run is told it
/// will memorise rather than learn (nanoGPT's Shakespeare char run is ~4
/// epochs of overfitting; 20 is far past where validation loss turns).
pub const MANY_EPOCHS: f64 = 20.0;

/// Fewer validation windows than this, and the validation loss is
/// called noisy.
pub const FEW_VALIDATION_WINDOWS: u64 = 8;

/// Data that cannot mean anything: fewer training samples than one global
/// batch (every step would repeat samples within itself).
#[derive(Debug, thiserror::Error)]
#[error(
    "the training split gives {samples} samples (windows of model.context + 1 tokens), fewer than one global batch of {global_batch} (train.global_batch): every step would repeat samples; use more data, a smaller data.stride, or a smaller train.global_batch"
)]
pub struct TooFewSamples {
    pub samples: u64,
    pub global_batch: usize,
}

/// Checks a run's data plan: an error for fewer samples than a global
/// batch; warnings, with the figures, for a run that will see the data
/// more than [`MANY_EPOCHS`] times and for a validation split of fewer
/// than [`FEW_VALIDATION_WINDOWS`] windows.
pub fn data_plan_warnings(
    epoch: &EpochStats,
    max_steps: u64,
    val_windows: Option<u64>,
) -> Result<Vec<String>, TooFewSamples> {
    if epoch.samples < epoch.global_batch as u64 {
        return Err(TooFewSamples {
            samples: epoch.samples,
            global_batch: epoch.global_batch,
        });
    }
    let mut warnings = Vec::new();
    if epoch.epochs > MANY_EPOCHS {
        warnings.push(format!(
            "the run sees its training data {:.1} times ({max_steps} steps × {} samples over {} samples): past ~{MANY_EPOCHS:.0} epochs a model memorises rather than learns; use more data or fewer steps",
            epoch.epochs, epoch.global_batch, epoch.samples
        ));
    }
    if let Some(w) = val_windows.filter(|w| *w > 0 && *w < FEW_VALIDATION_WINDOWS) {
        warnings.push(format!(
            "the validation split holds only {w} window(s): its loss will be noisy; give it more tokens (data.val_fraction, or a larger data.val)"
        ));
    }
    Ok(warnings)
}

/// What a token split yields at a context and stride, as `inspect-data`
/// prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataStats {
    pub tokens: u64,
    pub samples: u64,
    pub context: usize,
    pub stride: usize,
    /// Share of a window that the next window repeats: `max(0, context − stride)/context`.
    pub overlap: f64,
    /// Input tokens read per epoch: `samples × context`.
    pub tokens_per_epoch: u64,
    /// How often the average token is read per epoch: `tokens_per_epoch / tokens`.
    pub views_per_token: f64,
}

impl DataStats {
    pub fn new(tokens: usize, context: usize, stride: usize) -> DataStats {
        let samples = window_count(tokens, context, stride);
        let tokens_per_epoch = samples * context as u64;
        DataStats {
            tokens: tokens as u64,
            samples,
            context,
            stride,
            overlap: context.saturating_sub(stride) as f64 / context.max(1) as f64,
            tokens_per_epoch,
            views_per_token: tokens_per_epoch as f64 / tokens.max(1) as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_counts_of_the_seed_corpus() {
        // SPEC §2's reference numbers: N = 991,386 tokens, context 1024.
        assert_eq!(window_count(991_386, 1024, 1), 990_362);
        assert_eq!(window_count(991_386, 1024, 1024), 968);
        let table = [
            // (tokens, context, stride, samples)
            (1025, 1024, 1024, 1),
            (1024, 1024, 1024, 0),
            (2049, 1024, 1024, 2),
            (2048, 1024, 1024, 1),
            (10, 3, 2, 4), // starts 0,2,4,6: window 6..10 fits
            (0, 3, 1, 0),
        ];
        for (n, c, s, want) in table {
            assert_eq!(window_count(n, c, s), want, "{n} {c} {s}");
            if want > 0 {
                // The last window ends inside the data, one more would not.
                let last = window_start(want - 1, s) + c + 1;
                assert!(last <= n && last + s > n, "{n} {c} {s}");
            }
        }
        let st = DataStats::new(991_386, 1024, 1);
        assert!((st.overlap - 1023.0 / 1024.0).abs() < 1e-12);
        assert!(
            (st.views_per_token - 1023.0).abs() < 1.0,
            "{}",
            st.views_per_token
        );
    }

    #[test]
    fn an_epoch_reads_every_sample_once() {
        let mut s = Sampler::new(100, 7, DataCursor::default()).expect("sampler");
        let mut seen: Vec<u64> = (0..10).flat_map(|_| s.next_batch(10).samples).collect();
        assert_eq!(
            s.cursor(),
            DataCursor {
                epoch: 0,
                position: 100
            }
        );
        seen.sort_unstable();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        // The next epoch is another permutation.
        let b = s.next_batch(100);
        assert_eq!(b.epoch, 1);
        assert_ne!(b.samples, epoch_permutation(100, 7, 0));
    }

    #[test]
    fn batches_cross_epoch_boundaries_without_loss() {
        let mut s = Sampler::new(10, 1, DataCursor::default()).expect("sampler");
        let a = s.next_batch(4);
        let b = s.next_batch(4);
        let c = s.next_batch(4); // 2 from epoch 0, 2 from epoch 1
        assert_eq!(c.epoch, 0);
        let e0 = epoch_permutation(10, 1, 0);
        let e1 = epoch_permutation(10, 1, 1);
        let all: Vec<u64> = [a.samples, b.samples, c.samples].concat();
        assert_eq!(&all[..10], &e0[..]);
        assert_eq!(&all[10..], &e1[..2]);
        assert_eq!(
            s.cursor(),
            DataCursor {
                epoch: 1,
                position: 2
            }
        );
    }

    #[test]
    fn a_restored_cursor_continues_the_same_stream() {
        let mut straight = Sampler::new(37, 3, DataCursor::default()).expect("sampler");
        let mut first: Vec<Vec<u64>> = Vec::new();
        for _ in 0..5 {
            first.push(straight.next_batch(8).samples);
        }
        let saved = straight.cursor();
        let rest: Vec<Vec<u64>> = (0..20).map(|_| straight.next_batch(8).samples).collect();
        let mut resumed = Sampler::new(37, 3, saved).expect("sampler");
        let again: Vec<Vec<u64>> = (0..20).map(|_| resumed.next_batch(8).samples).collect();
        assert_eq!(rest, again);
    }

    #[test]
    fn the_stream_does_not_depend_on_the_world_size() {
        // The same global batches, sharded for 1, 2 and 4 ranks, put back
        // together in rank order, are the same batches.
        let batches: Vec<Vec<u64>> = {
            let mut s = Sampler::new(50, 9, DataCursor::default()).expect("sampler");
            (0..10).map(|_| s.next_batch(8).samples).collect()
        };
        for world in [1, 2, 4] {
            for b in &batches {
                let joined: Vec<u64> = (0..world)
                    .flat_map(|r| shard(b, world, r).to_vec())
                    .collect();
                assert_eq!(&joined, b);
            }
        }
    }

    #[test]
    fn uneven_shards_cover_everything_once() {
        let v: Vec<u64> = (0..10).collect();
        for world in 1..=4 {
            let joined: Vec<u64> = (0..world)
                .flat_map(|r| shard_uneven(&v, world, r).to_vec())
                .collect();
            assert_eq!(joined, v);
        }
        assert_eq!(eval_samples(100, 2, 16).len(), 32);
        assert_eq!(eval_samples(20, 2, 16).len(), 20);
        assert_eq!(eval_samples(20, 0, 16).len(), 20);
        // A subset is spread over the whole split: first and last tenth
        // are both read, no window twice.
        let some = eval_samples(1000, 2, 16);
        assert_eq!(some.first(), Some(&0));
        assert!(*some.last().expect("last") >= 950, "{some:?}");
        assert!(some.windows(2).all(|w| w[0] < w[1]), "{some:?}");
        assert_eq!(
            eval_samples(1000, 2, 16),
            some,
            "the same at every evaluation"
        );
    }

    #[test]
    fn bad_cursors_are_refused() {
        assert_eq!(
            Sampler::new(0, 1, DataCursor::default()).err(),
            Some(SamplerError::NoSamples)
        );
        assert_eq!(
            Sampler::new(
                10,
                1,
                DataCursor {
                    epoch: 0,
                    position: 11
                }
            )
            .err(),
            Some(SamplerError::CursorBeyondEpoch {
                position: 11,
                samples: 10
            })
        );
    }

    #[test]
    fn epoch_arithmetic_of_h100_1k() {
        let e = EpochStats::new(968, 8, 1000);
        assert_eq!(e.steps_per_epoch, 121.0);
        assert!((e.epochs - 1000.0 / 121.0).abs() < 1e-12);
    }
}
