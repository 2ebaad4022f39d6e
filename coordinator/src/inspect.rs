//! `coordinator inspect-data`: what a token file yields at a context and
//! stride — samples, overlap, tokens read per epoch, steps per epoch — and,
//! used as a validation split, its windows at `val_stride` and the tokens
//! of an evaluation that reads them all.
//!
//! Read-only: maps the file, scans it once for the largest token id, and
//! prints. It exists because the seed run trained at stride 1 without
//! noticing that every token was read ~1,023 times per epoch.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use stride_job::sampler::{DataStats, window_count};
use stride_job::tokens::Tokens;

/// What `inspect-data --json` prints: SPEC §5's fields, then extras.
#[derive(Debug, Serialize)]
pub struct Inspection {
    #[serde(flatten)]
    pub stats: DataStats,
    pub file: String,
    pub format: String,
    pub max_token: u16,
    pub global_batch: usize,
    pub steps_per_epoch: f64,
    /// Windows of this file at `val_stride`, as a validation split.
    pub val_stride: usize,
    pub validation_windows: u64,
    /// Tokens predicted by an evaluation of all those windows.
    pub validation_tokens: u64,
    pub warnings: Vec<String>,
}

/// The distance between training samples and between validation windows.
#[derive(Debug, Clone, Copy)]
pub struct Strides {
    pub train: usize,
    pub val: usize,
}

pub fn inspect(
    path: &Path,
    context: usize,
    strides: Strides,
    global_batch: usize,
    vocab_size: usize,
) -> Result<Inspection> {
    let stride = strides.train;
    anyhow::ensure!(context >= 1, "--context must be at least 1");
    anyhow::ensure!(stride >= 1, "--stride must be at least 1");
    anyhow::ensure!(strides.val >= 1, "--val-stride must be at least 1");
    anyhow::ensure!(global_batch >= 1, "--global-batch must be at least 1");
    let tokens = Tokens::open(path)?;
    let stats = DataStats::new(tokens.len(), context, stride);
    let max_token = tokens.max_token().unwrap_or(0);
    let mut warnings = Vec::new();
    if stats.samples == 0 {
        warnings.push(format!(
            "{} tokens is shorter than one window of context + 1 = {} tokens: no samples",
            tokens.len(),
            context + 1
        ));
    }
    if stride < context {
        warnings.push(format!(
            "stride {stride} < context {context}: consecutive samples overlap by {:.1}% and each token is read ~{:.0} times per epoch; use stride = context ({context}) for non-overlapping windows",
            100.0 * stats.overlap,
            stats.views_per_token
        ));
    }
    if usize::from(max_token) >= vocab_size {
        warnings.push(format!(
            "largest token id {max_token} is not below vocab_size {vocab_size}: training with this vocabulary would be refused"
        ));
    }
    let validation_windows = window_count(tokens.len(), context, strides.val);
    Ok(Inspection {
        val_stride: strides.val,
        validation_windows,
        validation_tokens: validation_windows * context as u64,
        file: path.display().to_string(),
        format: tokens.format.map(|f| f.to_string()).unwrap_or_default(),
        max_token,
        global_batch,
        steps_per_epoch: stats.samples as f64 / global_batch as f64,
        stats,
        warnings,
    })
}

/// Groups digits in threes, as the SPEC writes its reference numbers.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

pub fn render(i: &Inspection) -> String {
    let s = &i.stats;
    let mut out = String::new();
    let _ = writeln!(out, "file              {} ({})", i.file, i.format);
    let _ = writeln!(out, "tokens            {}", thousands(s.tokens));
    let _ = writeln!(out, "largest token id  {}", i.max_token);
    let _ = writeln!(out, "context / stride  {} / {}", s.context, s.stride);
    let _ = writeln!(out, "samples           {}", thousands(s.samples));
    let _ = writeln!(out, "overlap           {:.1}%", 100.0 * s.overlap);
    let _ = writeln!(out, "tokens per epoch  {}", thousands(s.tokens_per_epoch));
    let _ = writeln!(out, "reads per token   {:.1} per epoch", s.views_per_token);
    let _ = writeln!(
        out,
        "steps per epoch   {:.2} at global batch {}",
        i.steps_per_epoch, i.global_batch
    );
    let _ = writeln!(
        out,
        "as validation     {} windows at val_stride {}; an evaluation of all of them predicts {} tokens",
        thousands(i.validation_windows),
        i.val_stride,
        thousands(i.validation_tokens)
    );
    for w in &i.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups() {
        for (n, s) in [
            (0, "0"),
            (968, "968"),
            (990_362, "990,362"),
            (1_000_000, "1,000,000"),
        ] {
            assert_eq!(thousands(n), s);
        }
    }
}
