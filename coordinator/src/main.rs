//! `coordinator`: the Stride control plane.
//!
//! This file is the command line: it parses flags, resolves the config and
//! hands each command its inputs; it maps errors to exit codes (2 = bad
//! input a user can fix: config, data, flags; 1 = anything else) and prints
//! them once, with their context chain. It must never link Candle, CUDA or
//! NCCL, and never touch a tensor.

mod inspect;
mod plan;
mod prepare;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use stride_job::config::{ConfigError, RawConfig};

#[derive(Debug, Parser)]
#[command(
    name = "coordinator",
    version,
    about = "Stride coordinator: owns a GPT training job and drives its workers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the resolved config, the LR schedule and the epoch arithmetic.
    Plan(PlanArgs),
    /// Print what a token file yields: samples, overlap, reads per token.
    InspectData(InspectArgs),
    /// Tokenise UTF-8 text with GPT-2 BPE into train.bin / val.bin.
    Prepare(PrepareArgs),
}

/// Selecting and adjusting a config (shared by every command that takes one).
#[derive(Debug, Args)]
struct ConfigArgs {
    /// A preset name (`tiny`, `h100_1k`, `h100`) or a TOML path; a name is
    /// looked up as a path, then `configs/NAME.toml`, then the built-in preset.
    #[arg(long, short = 'c', default_value = "tiny")]
    config: String,
    /// Override any key: `--set train.lr=3e-4` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Number of workers (sets `cluster.workers`).
    #[arg(long)]
    workers: Option<usize>,
}

impl ConfigArgs {
    fn load(&self) -> Result<(RawConfig, stride_job::Config), ConfigError> {
        let mut raw = RawConfig::locate(&self.config)?;
        if let Some(n) = self.workers {
            raw.set_workers(n)?;
        }
        for s in &self.set {
            raw.set(s)?;
        }
        let config = raw.resolve()?;
        Ok((raw, config))
    }
}

#[derive(Debug, Args)]
struct PlanArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Preview Strategy A: the schedule if the run were resumed at its last
    /// step and extended to this new total number of steps.
    #[arg(long, value_name = "N")]
    extend_steps: Option<u64>,
    /// Also list the global sample indices of the first K steps.
    #[arg(long, value_name = "K")]
    batches: Option<usize>,
    /// Print JSON: {config, schedule, epoch, batches}.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct InspectArgs {
    /// A token file (nanoGPT uint16 or llm.c).
    #[arg(long)]
    data: PathBuf,
    /// Tokens per sample.
    #[arg(long, default_value_t = 1024)]
    context: usize,
    /// Distance between sample starts (default: = context).
    #[arg(long)]
    stride: Option<usize>,
    /// Samples per step, for the steps-per-epoch figure.
    #[arg(long, default_value_t = 8)]
    global_batch: usize,
    /// Vocabulary the ids must stay below.
    #[arg(long, default_value_t = 50_304)]
    vocab_size: usize,
    /// Print JSON: {tokens, samples, context, stride, overlap, tokens_per_epoch, views_per_token, ...}.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct PrepareArgs {
    /// UTF-8 text files; each is one document.
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Output folder for train.bin and val.bin.
    #[arg(long)]
    out: PathBuf,
    /// Share of tokens (the last ones) written to val.bin.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// File format.
    #[arg(long, value_enum, default_value_t = prepare::Format::Nanogpt)]
    format: prepare::Format,
    /// Replace existing train.bin / val.bin.
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// 2 for input the user can fix (config, data, flags), 1 otherwise.
fn exit_code(e: &anyhow::Error) -> u8 {
    let user_error = e.chain().any(|c| {
        c.is::<ConfigError>()
            || c.is::<stride_job::tokens::DataError>()
            || c.is::<stride_job::schedule::ScheduleError>()
    });
    if user_error { 2 } else { 1 }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Plan(a) => {
            let (raw, config) = a.config.load()?;
            let plan = plan::build(&config, a.extend_steps, a.batches)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!(
                    "{}",
                    plan::render(&plan, &raw.name, &raw.source.to_string())
                );
            }
        }
        Command::InspectData(a) => {
            let stride = a.stride.unwrap_or(a.context);
            let i = inspect::inspect(&a.data, a.context, stride, a.global_batch, a.vocab_size)?;
            for w in &i.warnings {
                tracing::warn!("{w}");
            }
            if a.json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                print!("{}", inspect::render(&i));
            }
        }
        Command::Prepare(a) => {
            let p = prepare::prepare(&a.input, &a.out, a.val_fraction, a.format, a.force)
                .context("prepare failed")?;
            println!(
                "{} document(s) → {} ({} tokens), {} ({} tokens)",
                p.documents,
                p.train.display(),
                p.train_tokens,
                p.val.display(),
                p.val_tokens
            );
        }
    }
    Ok(())
}
