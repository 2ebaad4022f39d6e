//! The learning-rate schedule: an explicit list of segments, and the LR as a
//! pure function of (segments, step).
//!
//! This module owns the schedule's meaning. It must never hold state that
//! advances with training: the seed's LR bug came from a stateful scheduler
//! that had to be "fast-forwarded" on resume. Here `lr_at(step)` is a lookup,
//! the segment list is saved in every checkpoint, and an extension
//! (Strategy A) *appends* a segment instead of recomputing anything.
//!
//! Each segment covers steps `start_step..end_step` (end exclusive). Its
//! curve, per kind (SPEC §1):
//!
//! - `linear_warmup`: `start_lr + (end_lr − start_lr) · (s − start + 1)/(end − start)`,
//!   so with `start_lr = 0`, `lr(s) = peak · (s+1)/W` and the last warmup
//!   step reaches the peak;
//! - `constant`: `start_lr`;
//! - `linear`: `start_lr + (end_lr − start_lr) · (s − start)/(end − start)`;
//! - `cosine`: `end_lr + (start_lr − end_lr) · ½(1 + cos(π (s − start)/(end − start)))`;
//! - `1-sqrt`: `end_lr + (start_lr − end_lr) · (1 − sqrt((s − start)/(end − start)))`
//!   (the cooldown of Hägele et al. 2024, arXiv 2405.18392).
//!
//! For `linear`, `cosine` and `1-sqrt`, `end_lr` is the value the curve
//! reaches *at* `end_step` (the first step after the segment), which is where
//! a run's schedule ends: a cosine to `min_lr` over `R..N` has
//! `lr(N) = min_lr`.
//!
//! When an extension cuts a segment short, the kept part follows exactly the
//! curve it followed before. Warmup, constant and linear pieces are exact
//! with new endpoints; a cosine or 1-sqrt piece keeps the curve it was cut
//! from in `curve_end` (absent for uncut segments).
//!
//! An extension (`--extend-steps N --decay SHAPE`, Strategy A) appends one
//! segment of that shape from the LR in force at the resume step R (the LR
//! of step R − 1, so there is no jump) to `min_lr_ratio × lr` at N.

use serde::{Deserialize, Serialize};

use crate::config::{Decay, TrainConfig};

crate::named_choices! {
    /// The shape of a cooldown appended by an extension (`--decay`) or by
    /// `decay`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub enum Cooldown: "cooldown shape" {
        #[default]
        Cosine = "cosine",
        Linear = "linear",
        OneMinusSqrt = "1-sqrt",
    }
}

impl Cooldown {
    fn kind(self) -> SegmentKind {
        match self {
            Cooldown::Cosine => SegmentKind::Cosine,
            Cooldown::Linear => SegmentKind::Linear,
            Cooldown::OneMinusSqrt => SegmentKind::OneMinusSqrt,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SegmentKind {
    LinearWarmup,
    Constant,
    Cosine,
    Linear,
    #[serde(rename = "1-sqrt")]
    OneMinusSqrt,
}

impl SegmentKind {
    pub fn name(self) -> &'static str {
        match self {
            SegmentKind::LinearWarmup => "linear_warmup",
            SegmentKind::Constant => "constant",
            SegmentKind::Cosine => "cosine",
            SegmentKind::Linear => "linear",
            SegmentKind::OneMinusSqrt => "1-sqrt",
        }
    }
}

/// Where the curve of a cosine segment that was cut short really ends.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CurveEnd {
    pub step: u64,
    pub lr: f64,
}

/// One piece of the schedule; see the module doc for each kind's formula.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    pub kind: SegmentKind,
    pub start_step: u64,
    pub end_step: u64,
    pub start_lr: f64,
    pub end_lr: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub curve_end: Option<CurveEnd>,
}

impl Segment {
    fn new(
        kind: SegmentKind,
        start_step: u64,
        end_step: u64,
        start_lr: f64,
        end_lr: f64,
    ) -> Segment {
        Segment {
            kind,
            start_step,
            end_step,
            start_lr,
            end_lr,
            curve_end: None,
        }
    }

    /// The LR of this segment's curve at `step` (any step, also outside the
    /// segment: used to evaluate the curve at the cut point).
    pub fn lr_at(&self, step: u64) -> f64 {
        let (a, b) = (self.start_lr, self.end_lr);
        let done = step as f64 - self.start_step as f64;
        let span = (self.end_step - self.start_step) as f64;
        match self.kind {
            SegmentKind::Constant => a,
            SegmentKind::LinearWarmup => a + (b - a) * (done + 1.0) / span,
            SegmentKind::Linear => a + (b - a) * done / span,
            SegmentKind::Cosine | SegmentKind::OneMinusSqrt => {
                let (end_step, end_lr) = match self.curve_end {
                    Some(c) => (c.step, c.lr),
                    None => (self.end_step, b),
                };
                let x = done / (end_step - self.start_step) as f64;
                let shape = if self.kind == SegmentKind::Cosine {
                    0.5 * (1.0 + (std::f64::consts::PI * x).cos())
                } else {
                    1.0 - x.max(0.0).sqrt()
                };
                end_lr + (a - end_lr) * shape
            }
        }
    }

    /// Whether this segment cools the LR down (a decaying cosine, linear or
    /// 1-sqrt piece).
    pub fn is_cooldown(&self) -> bool {
        matches!(
            self.kind,
            SegmentKind::Cosine | SegmentKind::Linear | SegmentKind::OneMinusSqrt
        ) && self.start_lr > self.end_lr
    }

    /// This segment restricted to `start_step..cut`, following the same curve.
    fn cut_at(&self, cut: u64) -> Segment {
        debug_assert!(self.start_step < cut && cut < self.end_step);
        let mut s = *self;
        s.end_step = cut;
        match self.kind {
            SegmentKind::Constant => {}
            // Both are linear in the step, so new endpoints give the same line.
            SegmentKind::LinearWarmup => s.end_lr = self.lr_at(cut - 1),
            SegmentKind::Linear => s.end_lr = self.lr_at(cut),
            SegmentKind::Cosine | SegmentKind::OneMinusSqrt => {
                s.curve_end = Some(self.curve_end.unwrap_or(CurveEnd {
                    step: self.end_step,
                    lr: self.end_lr,
                }));
                s.end_lr = self.lr_at(cut);
            }
        }
        s
    }
}

/// What can be wrong with a schedule or an extension request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error(
        "--extend-steps {new_total} must be greater than the step the run resumes at ({resume_step}): it is the new total number of steps, not a number of extra steps"
    )]
    ExtendNotAfterResume { resume_step: u64, new_total: u64 },
    #[error("schedule: {0}")]
    Malformed(String),
}

/// The whole schedule: segments in step order, contiguous from step 0 to
/// `max_steps`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Schedule {
    pub segments: Vec<Segment>,
}

impl Schedule {
    /// Warmup (if any) then the configured decay to `max_steps`.
    pub fn from_config(t: &TrainConfig) -> Schedule {
        let peak = t.lr;
        let floor = t.lr * t.min_lr_ratio;
        let mut segments = Vec::new();
        let w = t.warmup_steps.min(t.max_steps);
        if w > 0 {
            segments.push(Segment::new(SegmentKind::LinearWarmup, 0, w, 0.0, peak));
        }
        if w < t.max_steps {
            let seg = match t.decay {
                Decay::Constant => Segment::new(SegmentKind::Constant, w, t.max_steps, peak, peak),
                Decay::Cosine => Segment::new(SegmentKind::Cosine, w, t.max_steps, peak, floor),
                Decay::Linear => Segment::new(SegmentKind::Linear, w, t.max_steps, peak, floor),
                Decay::OneMinusSqrt => {
                    Segment::new(SegmentKind::OneMinusSqrt, w, t.max_steps, peak, floor)
                }
            };
            segments.push(seg);
        }
        Schedule { segments }
    }

    /// The step after the last one: the run's total number of steps.
    pub fn max_steps(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.end_step)
    }

    /// The LR of `step`. Steps past the end keep the last step's LR.
    pub fn lr_at(&self, step: u64) -> f64 {
        let Some(last) = self.segments.last() else {
            return 0.0;
        };
        let step = step.min(last.end_step.saturating_sub(1));
        self.segment_at(step).unwrap_or(last).lr_at(step)
    }

    /// The segment whose curve gives step `step` its LR (the last one for
    /// steps past the end); `None` for an empty schedule.
    pub fn segment_at(&self, step: u64) -> Option<&Segment> {
        self.segments
            .iter()
            .find(|s| step < s.end_step)
            .or(self.segments.last())
    }

    /// Strategy A: keep the schedule up to `resume_step` exactly, then cool
    /// down with `shape` from the LR in force (the LR of step
    /// `resume_step − 1`, so `lr(R) == lr(R−1)`: no jump) to `floor` at
    /// `new_total`. The one function that extends a schedule (`plan`,
    /// `--resume --extend-steps`).
    pub fn extend(
        &self,
        resume_step: u64,
        new_total: u64,
        floor: f64,
        shape: Cooldown,
    ) -> Result<Schedule, ScheduleError> {
        if new_total <= resume_step {
            return Err(ScheduleError::ExtendNotAfterResume {
                resume_step,
                new_total,
            });
        }
        let in_force = self.lr_at(resume_step.saturating_sub(1));
        let mut segments: Vec<Segment> = Vec::new();
        for s in &self.segments {
            if s.start_step >= resume_step {
                break;
            }
            segments.push(if s.end_step > resume_step {
                s.cut_at(resume_step)
            } else {
                *s
            });
        }
        segments.push(Segment::new(
            shape.kind(),
            resume_step,
            new_total,
            in_force,
            floor,
        ));
        Ok(Schedule { segments })
    }

    /// Checks a schedule read from outside (a checkpoint): contiguous from
    /// step 0, no empty segment, finite non-negative LRs.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        let bad = |m: String| Err(ScheduleError::Malformed(m));
        let mut expected_start = 0;
        if self.segments.is_empty() {
            return bad("no segments".into());
        }
        for (i, s) in self.segments.iter().enumerate() {
            if s.start_step != expected_start {
                return bad(format!(
                    "segment {i} starts at step {} but the previous one ends at {expected_start}",
                    s.start_step
                ));
            }
            if s.end_step <= s.start_step {
                return bad(format!(
                    "segment {i} is empty ({}..{})",
                    s.start_step, s.end_step
                ));
            }
            for lr in [s.start_lr, s.end_lr] {
                if !lr.is_finite() || lr < 0.0 {
                    return bad(format!("segment {i} has LR {lr}"));
                }
            }
            if let Some(c) = s.curve_end
                && (c.step < s.end_step || !c.lr.is_finite())
            {
                return bad(format!("segment {i} has a curve end before its own end"));
            }
            expected_start = s.end_step;
        }
        Ok(())
    }

    /// Steps worth showing in a preview: each boundary, the step before it,
    /// and a few points inside long segments.
    pub fn representative_steps(&self) -> Vec<u64> {
        let mut steps = vec![0];
        for s in &self.segments {
            let len = s.end_step - s.start_step;
            steps.extend([s.start_step, s.start_step + len / 4, s.start_step + len / 2]);
            steps.extend([s.start_step + 3 * len / 4, s.end_step - 1]);
        }
        steps.sort_unstable();
        steps.dedup();
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    /// The one list of cooldown shapes (`Cooldown::NAMES`, which the CLI's
    /// `--decay`/`--shape` parsers and their help show) agrees with the
    /// segment kinds, the config's `train.decay` and `is_cooldown`: a
    /// shape added to one and not the others fails here.
    #[test]
    fn every_cooldown_shape_is_a_segment_kind_and_a_train_decay() {
        for &(name, _) in Cooldown::NAMES {
            let shape: Cooldown = name.parse().expect("a listed name parses");
            assert_eq!(shape.kind().name(), name, "segment kind of {name}");
            let decay = Decay::deserialize(toml::Value::String(name.into()));
            assert!(decay.is_ok(), "train.decay = {name:?} is not accepted");
            let seg = Segment::new(shape.kind(), 0, 10, 1.0, 0.1);
            assert!(seg.is_cooldown(), "{name} is not a cooldown");
        }
    }

    fn train(max_steps: u64, warmup_steps: u64, decay: Decay) -> TrainConfig {
        TrainConfig {
            max_steps,
            warmup_steps,
            lr: 1e-3,
            min_lr_ratio: 0.1,
            decay,
            ..TrainConfig::default()
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12
    }

    /// SPEC §1's closed forms.
    fn warmup(peak: f64, w: u64, s: u64) -> f64 {
        peak * (s + 1) as f64 / w as f64
    }
    fn cosine(min: f64, lr_r: f64, r: u64, n: u64, s: u64) -> f64 {
        min + (lr_r - min) * 0.5 * (1.0 + (PI * (s - r) as f64 / (n - r) as f64).cos())
    }

    #[test]
    fn h100_1k_is_warmup_then_constant() {
        let sch = Schedule::from_config(&train(1000, 100, Decay::Constant));
        assert_eq!(sch.max_steps(), 1000);
        for s in 0..1000 {
            let want = if s < 100 { warmup(1e-3, 100, s) } else { 1e-3 };
            assert!(
                close(sch.lr_at(s), want),
                "step {s}: {} vs {want}",
                sch.lr_at(s)
            );
        }
        assert!(close(sch.lr_at(0), 1e-5));
        assert_eq!(sch.lr_at(99), 1e-3);
    }

    #[test]
    fn configured_cosine_and_linear_follow_the_formulas() {
        let sch = Schedule::from_config(&train(1000, 100, Decay::Cosine));
        for s in 100..1000 {
            assert!(
                close(sch.lr_at(s), cosine(1e-4, 1e-3, 100, 1000, s)),
                "step {s}"
            );
        }
        let sch = Schedule::from_config(&train(1000, 100, Decay::Linear));
        for s in 100..1000 {
            let want = 1e-3 + (1e-4 - 1e-3) * (s - 100) as f64 / 900.0;
            assert!(close(sch.lr_at(s), want), "step {s}");
        }
    }

    #[test]
    fn seed_extension_1000_to_10000() {
        let phase1 = Schedule::from_config(&train(1000, 100, Decay::Constant));
        let sch = phase1
            .extend(1000, 10_000, 1e-4, Cooldown::Cosine)
            .expect("extend");
        assert_eq!(sch.max_steps(), 10_000);
        assert_eq!(sch.segments.len(), 3);
        assert_eq!(sch.lr_at(1000), sch.lr_at(999));
        for s in 0..1000 {
            assert_eq!(sch.lr_at(s), phase1.lr_at(s), "history changed at {s}");
        }
        for s in 1000..10_000 {
            assert!(
                close(sch.lr_at(s), cosine(1e-4, 1e-3, 1000, 10_000, s)),
                "step {s}"
            );
        }
        assert!(close(sch.segments[2].lr_at(10_000), 1e-4));
        // Strictly decreasing after R, never below the floor.
        for s in 1001..10_000 {
            assert!(sch.lr_at(s) < sch.lr_at(s - 1) && sch.lr_at(s) > 1e-4);
        }
    }

    #[test]
    fn extension_from_the_middle_of_warmup() {
        let phase1 = Schedule::from_config(&train(1000, 100, Decay::Constant));
        let r = 40;
        let sch = phase1
            .extend(r, 500, 1e-4, Cooldown::Cosine)
            .expect("extend");
        let in_force = warmup(1e-3, 100, r - 1);
        assert_eq!(sch.lr_at(r), sch.lr_at(r - 1));
        for s in 0..r {
            assert!(close(sch.lr_at(s), warmup(1e-3, 100, s)), "step {s}");
        }
        for s in r..500 {
            assert!(
                close(sch.lr_at(s), cosine(1e-4, in_force, r, 500, s)),
                "step {s}"
            );
        }
    }

    fn one_minus_sqrt(end: f64, start: f64, from: u64, to: u64, s: u64) -> f64 {
        end + (start - end) * (1.0 - ((s - from) as f64 / (to - from) as f64).sqrt())
    }

    fn linear(end: f64, start: f64, from: u64, to: u64, s: u64) -> f64 {
        start + (end - start) * (s - from) as f64 / (to - from) as f64
    }

    fn within(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9
    }

    /// Every cooldown shape, at every step, to 1e-9 against its closed
    /// form, for a first extension and an extension of that extension
    /// (which cuts the first cooldown, with whatever shape, exactly).
    #[test]
    fn every_cooldown_shape_follows_its_closed_form_also_when_extended_again() {
        type Form = fn(f64, f64, u64, u64, u64) -> f64;
        let shapes: [(Cooldown, Form); 3] = [
            (Cooldown::Cosine, cosine),
            (Cooldown::Linear, linear),
            (Cooldown::OneMinusSqrt, one_minus_sqrt),
        ];
        assert_eq!(
            shapes.len(),
            Cooldown::NAMES.len(),
            "every cooldown shape needs its closed form here"
        );
        let phase1 = Schedule::from_config(&train(1000, 100, Decay::Constant));
        for (first, first_form) in shapes {
            let a = phase1.extend(1000, 3000, 1e-4, first).expect("first");
            a.validate().expect("valid");
            for s in 0..1000 {
                assert_eq!(a.lr_at(s), phase1.lr_at(s), "history changed at {s}");
            }
            for s in 1000..3000 {
                assert!(
                    within(a.lr_at(s), first_form(1e-4, 1e-3, 1000, 3000, s)),
                    "{} step {s}",
                    first.name()
                );
            }
            assert!(within(a.segments.last().expect("seg").lr_at(3000), 1e-4));
            for (second, second_form) in shapes {
                // Resume a checkpoint of step 2000 and cool down again, to 5000.
                let b = a.extend(2000, 5000, 1e-4, second).expect("second");
                b.validate().expect("valid");
                for s in 0..2000 {
                    assert!(
                        within(b.lr_at(s), a.lr_at(s)),
                        "{} then {}: history changed at {s}",
                        first.name(),
                        second.name()
                    );
                }
                let lr_r = first_form(1e-4, 1e-3, 1000, 3000, 1999);
                for s in 2000..5000 {
                    assert!(
                        within(b.lr_at(s), second_form(1e-4, lr_r, 2000, 5000, s)),
                        "{} then {}: step {s}",
                        first.name(),
                        second.name()
                    );
                }
                let json = serde_json::to_string(&b).expect("json");
                assert_eq!(serde_json::from_str::<Schedule>(&json).expect("parse"), b);
            }
        }
        // A fresh run's `train.decay = "1-sqrt"` is the same curve.
        let fresh = Schedule::from_config(&train(1000, 100, Decay::OneMinusSqrt));
        for s in 100..1000 {
            assert!(within(
                fresh.lr_at(s),
                one_minus_sqrt(1e-4, 1e-3, 100, 1000, s)
            ));
        }
        assert_eq!("1-sqrt".parse::<Cooldown>(), Ok(Cooldown::OneMinusSqrt));
        let e = "sqrt".parse::<Cooldown>().expect_err("unknown").to_string();
        assert!(e.contains("`cosine`, `linear` or `1-sqrt`"), "{e}");
    }

    #[test]
    fn extension_of_an_extension_keeps_the_cut_cosine_exact() {
        let phase1 = Schedule::from_config(&train(1000, 100, Decay::Constant));
        let a = phase1
            .extend(1000, 10_000, 1e-4, Cooldown::Cosine)
            .expect("first");
        // Resume from a `best` at 6000 and extend again.
        let b = a
            .extend(6000, 20_000, 1e-4, Cooldown::Cosine)
            .expect("second");
        b.validate().expect("valid");
        for s in 0..6000 {
            assert_eq!(b.lr_at(s), a.lr_at(s), "history changed at {s}");
        }
        assert_eq!(b.lr_at(6000), b.lr_at(5999));
        let lr_r = a.lr_at(5999);
        for s in 6000..20_000 {
            assert!(
                close(b.lr_at(s), cosine(1e-4, lr_r, 6000, 20_000, s)),
                "step {s}"
            );
        }
        // Round trip through JSON (as in train_state.json) keeps every LR.
        let json = serde_json::to_string(&b).expect("json");
        let back: Schedule = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, b);
    }

    #[test]
    fn continuity_at_every_boundary() {
        let cases = [
            Schedule::from_config(&train(1000, 100, Decay::Constant)),
            Schedule::from_config(&train(1000, 100, Decay::Cosine)),
            Schedule::from_config(&train(1000, 100, Decay::Linear)),
            Schedule::from_config(&train(1000, 100, Decay::Constant))
                .extend(1000, 10_000, 1e-4, Cooldown::Cosine)
                .expect("ext"),
            Schedule::from_config(&train(1000, 100, Decay::Linear))
                .extend(400, 2000, 1e-4, Cooldown::Cosine)
                .expect("ext"),
        ];
        for sch in &cases {
            sch.validate().expect("valid");
            for seg in sch.segments.iter().skip(1) {
                let b = seg.start_step;
                let (before, after) = (sch.lr_at(b - 1), sch.lr_at(b));
                // Every boundary Stride makes is flat: the last warmup step
                // reaches the peak, a decay starts from the LR in force.
                assert!(
                    close(before, after),
                    "jump at {b}: {before} → {after} in {sch:?}"
                );
            }
        }
    }

    #[test]
    fn extending_to_no_later_step_is_an_error() {
        let sch = Schedule::from_config(&train(1000, 100, Decay::Constant));
        for n in [0, 999, 1000] {
            let e = sch
                .extend(1000, n, 1e-4, Cooldown::Cosine)
                .expect_err("must fail");
            assert!(e.to_string().contains("new total"), "{e}");
        }
    }

    #[test]
    fn malformed_schedules_are_rejected() {
        let mut s = Schedule::from_config(&train(1000, 100, Decay::Constant));
        s.segments[1].start_step = 101;
        assert!(s.validate().is_err());
        let mut s = Schedule::from_config(&train(1000, 100, Decay::Constant));
        s.segments[0].end_lr = f64::NAN;
        assert!(s.validate().is_err());
        assert!(Schedule { segments: vec![] }.validate().is_err());
    }

    #[test]
    fn no_warmup_and_all_warmup() {
        let sch = Schedule::from_config(&train(10, 0, Decay::Constant));
        assert_eq!(sch.segments.len(), 1);
        assert_eq!(sch.lr_at(0), 1e-3);
        let sch = Schedule::from_config(&train(10, 10, Decay::Cosine));
        assert_eq!(sch.segments.len(), 1);
        assert_eq!(sch.lr_at(9), 1e-3);
    }
}
