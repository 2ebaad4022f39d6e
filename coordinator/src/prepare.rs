//! `coordinator prepare`: UTF-8 text → GPT-2 BPE token files.
//!
//! Tokenises with `tiktoken-rs`'s r50k_base (GPT-2's vocabulary, shipped
//! inside the crate: nothing is downloaded). Each input file is one
//! document followed by `<|endoftext|>` (50256), as nanoGPT's OpenWebText
//! preparation does. The token stream is split at a token boundary: the
//! first `1 − val_fraction` is `train.bin`, the rest `val.bin`.
//!
//! It refuses to overwrite existing outputs unless `--force`, and writes
//! each file atomically, so an interrupted run never leaves half a file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use stride_job::tokens::{self, split_point};

/// An input `prepare` cannot use (exit code 2): no input, a bad fraction,
/// an output that exists, an input that cannot be read or is not UTF-8.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(String);

fn bad(message: String) -> anyhow::Error {
    BadInput(message).into()
}

/// GPT-2's end-of-text token.
pub const EOT: u32 = 50_256;

/// How the token files are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Raw little-endian uint16, as nanoGPT's prepare.py writes.
    Nanogpt,
    /// llm.c: 1024-byte header, then uint16.
    Llmc,
}

#[derive(Debug)]
pub struct Prepared {
    pub train: PathBuf,
    pub val: PathBuf,
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub documents: usize,
}

pub fn tokenizer() -> Result<tiktoken_rs::CoreBPE> {
    tiktoken_rs::r50k_base().context("cannot build the GPT-2 tokenizer shipped with tiktoken-rs")
}

pub fn prepare(
    inputs: &[PathBuf],
    out: &Path,
    val_fraction: f64,
    format: Format,
    force: bool,
) -> Result<Prepared> {
    if inputs.is_empty() {
        return Err(bad("prepare needs at least one --input file".into()));
    }
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(bad(format!(
            "--val-fraction {val_fraction} must be in [0, 1)"
        )));
    }
    let train = out.join("train.bin");
    let val = out.join("val.bin");
    for p in [&train, &val] {
        if p.exists() && !force {
            return Err(bad(format!(
                "{} already exists; pass --force to replace it",
                p.display()
            )));
        }
    }
    let bpe = tokenizer()?;
    let mut all: Vec<u16> = Vec::new();
    for input in inputs {
        stride_job::files::require_regular(input)?;
        let bytes = std::fs::read(input)
            .map_err(|e| bad(format!("cannot read {}: {e}", input.display())))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            bad(format!(
                "{}: not UTF-8 text (invalid byte at offset {}); convert it first, e.g. with iconv",
                input.display(),
                e.utf8_error().valid_up_to()
            ))
        })?;
        for t in bpe.encode_ordinary(&text).into_iter().chain([EOT]) {
            // r50k_base ids are < 50,257, so they always fit in u16.
            all.push(
                u16::try_from(t).with_context(|| format!("token id {t} does not fit uint16"))?,
            );
        }
    }
    let cut = split_point(all.len(), val_fraction);
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let write = match format {
        Format::Nanogpt => tokens::write_nanogpt,
        Format::Llmc => tokens::write_llmc,
    };
    write(&train, &all[..cut]).with_context(|| format!("cannot write {}", train.display()))?;
    write(&val, &all[cut..]).with_context(|| format!("cannot write {}", val.display()))?;
    Ok(Prepared {
        train,
        val,
        train_tokens: cut,
        val_tokens: all.len() - cut,
        documents: inputs.len(),
    })
}
