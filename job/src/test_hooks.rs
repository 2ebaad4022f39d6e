//! Test hooks: the faults and pauses the end-to-end tests put into real
//! coordinator and worker processes (a panic at a step, a full disk, a
//! stalled driver, a job held mid-run).
//!
//! They are compiled in only with the `test-hooks` feature of this crate.
//! The coordinator and the worker turn it on through their
//! dev-dependency on `stride-job`, so the binaries `cargo test
//! --workspace` builds (the ones the suite in `tests/` runs) have them, and
//! a binary built by `cargo build` or `cargo install`, in any profile, does
//! not: there every function here is a constant "not set" and reads
//! nothing. A test sets a hook in the environment of the process it starts
//! (the one channel it has into a child): `STRIDE_TEST_<NAME>=<value>`.
//!
//! This module owns the hooks' names and the parsing of their values; the
//! places that fire them decide what they do. It must not hold state.

use std::path::PathBuf;

/// One hook: its environment variable, and what its value means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// Seconds the coordinator's driver waits before forming the workers
    /// (the health service must notice).
    StallDriverS,
    /// Seconds the hashing of a resumed checkpoint starts late (the ranks
    /// load first).
    DelayCheckS,
    /// `N:PATH`: the driver waits after publishing step N until PATH
    /// exists, ten minutes at most.
    HoldAfterStep,
    /// Step whose checkpoint commit meets a full disk on the coordinator.
    CoordinatorFullDiskAtStep,
    /// Step at whose start the worker's compute thread panics.
    PanicAtStep,
    /// Step at whose start rank 0 reports, once per process, a failed
    /// all-reduce with rank 1 while every rank lives.
    CollectiveErrorAtStep,
    /// Step whose checkpoint write meets a full disk on the worker.
    FullDiskAtStep,
}

impl Hook {
    /// The environment variable that sets it.
    pub const fn var(self) -> &'static str {
        match self {
            Hook::StallDriverS => "STRIDE_TEST_STALL_DRIVER_S",
            Hook::DelayCheckS => "STRIDE_TEST_DELAY_CHECK_S",
            Hook::HoldAfterStep => "STRIDE_TEST_HOLD_AFTER_STEP",
            Hook::CoordinatorFullDiskAtStep => "STRIDE_TEST_COORDINATOR_FULL_DISK_AT_STEP",
            Hook::PanicAtStep => "STRIDE_TEST_PANIC_AT_STEP",
            Hook::CollectiveErrorAtStep => "STRIDE_TEST_COLLECTIVE_ERROR_AT_STEP",
            Hook::FullDiskAtStep => "STRIDE_TEST_FULL_DISK_AT_STEP",
        }
    }
}

/// The variable the suite sets to ask a binary whether it has the hooks:
/// one that has them answers [`PROBE_ANSWER`] on stdout and exits 0 before
/// doing anything else ([`answer_probe`]); one built by `cargo build`
/// ignores it and goes on to parse its flags.
pub const PROBE: &str = "STRIDE_TEST_HOOKS_PROBE";
pub const PROBE_ANSWER: &str = "stride test hooks: on";

/// Called first in `main` of the coordinator and the worker (see
/// [`PROBE`]).
pub fn answer_probe() {
    #[cfg(feature = "test-hooks")]
    if std::env::var_os(PROBE).is_some() {
        println!("{PROBE_ANSWER}");
        std::process::exit(0);
    }
}

/// The hook's raw value, where this build has hooks and the test set it.
#[cfg(feature = "test-hooks")]
fn raw(hook: Hook) -> Option<String> {
    std::env::var(hook.var()).ok()
}

#[cfg(not(feature = "test-hooks"))]
fn raw(_: Hook) -> Option<String> {
    None
}

/// A duration hook's seconds (finite, 0 to an hour; anything else unset).
pub fn seconds(hook: Hook) -> Option<f64> {
    raw(hook)
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && (0.0..=3600.0).contains(s))
}

/// Whether a step hook is set to `step`.
pub fn at_step(hook: Hook, step: u64) -> bool {
    raw(hook).and_then(|v| v.trim().parse::<u64>().ok()) == Some(step)
}

/// [`Hook::HoldAfterStep`]'s step and release file.
pub fn hold_after_step() -> Option<(u64, PathBuf)> {
    parse_hold(&raw(Hook::HoldAfterStep)?)
}

fn parse_hold(v: &str) -> Option<(u64, PathBuf)> {
    let (at, path) = v.split_once(':')?;
    let at = at.trim().parse().ok()?;
    (!path.is_empty()).then(|| (at, PathBuf::from(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_names_a_step_and_a_file() {
        assert_eq!(
            parse_hold("39:/tmp/x:y"),
            Some((39, PathBuf::from("/tmp/x:y")))
        );
        for bad in ["", "39", "39:", "x:/tmp/a", "-1:/tmp/a"] {
            assert_eq!(parse_hold(bad), None, "{bad:?}");
        }
    }
}
