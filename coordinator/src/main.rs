//! `coordinator`: the Stride control plane.
//!
//! This file is the command line: it parses flags, resolves the config and
//! hands each command its inputs; it maps errors to exit codes (2 = bad
//! input a user can fix: config, data, flags; 1 = anything else) and prints
//! them once, with their context chain. It must never link Candle, CUDA or
//! NCCL, and never touch a tensor.

mod driver;
mod export;
mod inspect;
mod local;
mod metrics;
mod output;
mod plan;
mod prepare;
mod refused;
mod report;
mod resume_check;
mod serve;
mod server;
mod start;
mod status;
mod train;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use stride_job::checkpoint;
use stride_job::config::{ConfigError, RawConfig};
use stride_job::schedule::Cooldown;

#[derive(Debug, Parser)]
#[command(
    name = "coordinator",
    version,
    about = "Stride coordinator: owns a GPT training job and drives its workers",
    long_about = "Stride coordinator: owns a GPT training job and drives its workers.\n\n\
        Without a subcommand it runs a job: `coordinator --config tiny --workers 2 --local` \
        starts two local workers itself; without --local it waits for `worker --connect URL`.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

/// Running a job (no subcommand).
#[derive(Debug, Clone, Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Start the workers as processes on this machine.
    #[arg(long)]
    local: bool,
    /// gRPC address to listen on [default: 127.0.0.1:0 with --local, else 127.0.0.1:29400].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Where train.log, metrics.jsonl and worker logs go [default: runs/<config name>,
    /// or the resumed run's directory].
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue a run from a checkpoint: a step directory, `…/best`,
    /// `…/latest`, or a checkpoint folder (its newest complete checkpoint).
    #[arg(long, value_name = "PATH", conflicts_with = "init_from")]
    resume: Option<PathBuf>,
    /// With --resume: the new total number of steps; a cosine decay from the
    /// LR in force to min_lr_ratio × lr is appended (Strategy A).
    #[arg(long, value_name = "N", requires = "resume", value_parser = steps())]
    extend_steps: Option<u64>,
    /// With --extend-steps: the cooldown's shape (formulas: stride-job's
    /// `schedule` module).
    #[arg(
        long,
        value_name = "SHAPE",
        requires = "extend_steps",
        default_value = "cosine",
        value_parser = cooldown()
    )]
    decay: Cooldown,
    /// File holding the shared job token (else $STRIDE_TOKEN; --local makes one).
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Check the flags and the config, print what would run, and exit.
    #[arg(long)]
    dry_run: bool,
    /// Serve gRPC over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9400).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Start a new run (step 0, fresh optimizer, the config's schedule) from
    /// a checkpoint's weights (Strategy B).
    #[arg(long, value_name = "PATH")]
    init_from: Option<PathBuf>,
    /// With --resume: the token files differ from the ones the checkpoint
    /// was trained on, on purpose. The run continues on the new data from
    /// the start of its next epoch (a new permutation of the new samples);
    /// without this flag such a resume is refused.
    #[arg(long, requires = "resume")]
    data_changed: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the resolved config, the LR schedule and the epoch arithmetic.
    Plan(PlanArgs),
    /// Print what a token file yields: samples, overlap, reads per token.
    InspectData(InspectArgs),
    /// Tokenise UTF-8 text with GPT-2 BPE into train.bin / val.bin.
    Prepare(PrepareArgs),
    /// Print the live state of a running job (authenticated like a worker).
    Status(StatusArgs),
    /// Plot loss, val loss and LR against step from a run's metrics.jsonl.
    Report(ReportArgs),
    /// Tell a running job to cool down from its next step and end after K
    /// more steps (the segment `--resume --extend-steps --decay` would add).
    Decay(DecayArgs),
    /// Write a checkpoint's weights for another tool: `--format hf` is a
    /// folder Hugging Face transformers loads (GPT2LMHeadModel).
    Export(ExportArgs),
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// A step directory, `…/best`, `…/latest`, a checkpoint folder or a run
    /// directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// What to write.
    #[arg(long, value_enum, default_value_t = export::Format::Hf)]
    format: export::Format,
    /// The folder to write (config.json, model.safetensors, README.md).
    #[arg(long)]
    out: PathBuf,
    /// Replace an export already in --out.
    #[arg(long)]
    force: bool,
}

/// How to reach a running job (shared by `status` and `decay`).
#[derive(Debug, Args)]
struct ConnectArgs {
    /// The coordinator's URL (see runs/<name>/coordinator.addr).
    #[arg(long)]
    connect: String,
    /// File holding the job token [default: $STRIDE_TOKEN].
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Trust this CA (PEM) for an https:// coordinator.
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct DecayArgs {
    #[command(flatten)]
    job: ConnectArgs,
    /// Steps of cooldown: the run ends at S + K, S its next step boundary.
    #[arg(long, value_name = "K", value_parser = steps())]
    over: u64,
    /// The cooldown's shape.
    #[arg(long, default_value = "cosine", value_parser = cooldown())]
    shape: Cooldown,
}

#[derive(Debug, Args)]
struct ReportArgs {
    /// Run directories (each holds metrics.jsonl), e.g. runs/tiny; several
    /// are drawn on one chart, one colour per run.
    #[arg(required = true, num_args = 1.., value_name = "RUN_DIR")]
    run_dirs: Vec<PathBuf>,
    /// The PNG to write [default: RUN_DIR/report.png for one run,
    /// ./compare.png for several].
    #[arg(long, value_name = "FILE.png")]
    out: Option<PathBuf>,
    /// Draw only this metric, one line per run: loss, val_loss, lr,
    /// grad_norm or tokens_per_s.
    #[arg(long, value_name = "METRIC")]
    metric: Option<report::Metric>,
    /// Print per run the best validation loss and its step, the final
    /// losses and the tokens seen, as JSON (draws only with --out).
    #[arg(long)]
    json: bool,
    /// Image width in pixels.
    #[arg(long, default_value_t = report::WIDTH, value_parser = clap::value_parser!(u32).range(200..=10_000))]
    width: u32,
    /// Image height in pixels.
    #[arg(long, default_value_t = report::HEIGHT, value_parser = clap::value_parser!(u32).range(200..=10_000))]
    height: u32,
    /// Only these steps (inclusive): `200..400`, `200..` or `..400`.
    #[arg(long, value_name = "A..B", value_parser = report::parse_steps)]
    steps: Option<(Option<u64>, Option<u64>)>,
    /// The left axis's range, e.g. `1.0..1.6` [default: from the data shown,
    /// leaving out the first tenth of the steps' early losses].
    #[arg(long, value_name = "LO..HI", value_parser = report::parse_ylim)]
    ylim: Option<(f64, f64)>,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    job: ConnectArgs,
    /// Print the raw status as JSON.
    #[arg(long)]
    json: bool,
}

/// Selecting and adjusting a config (shared by every command that takes one).
#[derive(Debug, Clone, Args)]
struct ConfigArgs {
    /// A preset name (`tiny`, `h100_1k`, `h100`) or a TOML path; a name is
    /// looked up as a path, then `configs/NAME.toml`, then the built-in preset.
    #[arg(long, short = 'c')]
    config: Option<String>,
    /// Override any key: `--set train.lr=3e-4` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Number of workers (sets `cluster.workers`).
    #[arg(long)]
    workers: Option<usize>,
}

impl ConfigArgs {
    fn load(&self) -> Result<(RawConfig, stride_job::Config), ConfigError> {
        let mut raw = RawConfig::locate(self.config.as_deref().unwrap_or("tiny"))?;
        let config = raw.resolve_with(self.workers, &self.set)?;
        Ok((raw, config))
    }
}

#[derive(Debug, Args)]
struct PlanArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Preview Strategy A: the schedule if the run were resumed at its last
    /// step and extended to this new total number of steps.
    #[arg(long, value_name = "N", value_parser = steps())]
    extend_steps: Option<u64>,
    /// With --extend-steps: the cooldown's shape.
    #[arg(
        long,
        value_name = "SHAPE",
        requires = "extend_steps",
        default_value = "cosine",
        value_parser = cooldown()
    )]
    decay: Cooldown,
    /// Also list the global sample indices of the first K steps.
    #[arg(long, value_name = "K", value_parser = count(1 << 20))]
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
    #[arg(long, default_value_t = 1024, value_parser = count(1 << 20))]
    context: usize,
    /// Distance between sample starts (default: = context).
    #[arg(long, value_parser = count(1 << 32))]
    stride: Option<usize>,
    /// Samples per step, for the steps-per-epoch figure.
    #[arg(long, default_value_t = 8, value_parser = count(1 << 24))]
    global_batch: usize,
    /// Distance between validation windows, for the figures of this file
    /// used as a validation split (default: = context, as data.val_stride).
    #[arg(long, value_parser = count(1 << 32))]
    val_stride: Option<usize>,
    /// Vocabulary the ids must stay below.
    #[arg(long, default_value_t = 50_304, value_parser = count(stride_job::config::MAX_VOCAB as u64))]
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

/// A number of steps for a flag: 1..=`MAX_STEPS`, the config's own bound.
fn steps() -> clap::builder::RangedU64ValueParser<u64> {
    clap::builder::RangedU64ValueParser::new().range(1..=stride_job::config::MAX_STEPS)
}

/// A cooldown shape for a flag: its `--help` lists the shapes
/// (`Cooldown::NAMES`, the one list).
fn cooldown() -> impl clap::builder::TypedValueParser<Value = Cooldown> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Cooldown::NAMES.iter().map(|(name, _)| *name))
        .try_map(|s| s.parse::<Cooldown>())
}

/// A count for a flag: 1..=`max` (the bound of the config key it mirrors).
fn count(max: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..=max)
}

fn main() -> ExitCode {
    stride_job::test_hooks::answer_probe();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(command) => {
            output::init_console_logging();
            offline(command)
        }
        None => tokio::runtime::Runtime::new()
            .context("cannot start the async runtime")
            .and_then(|rt| rt.block_on(train::train(cli.run))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let logging = output::RUN_LOGGING.load(std::sync::atomic::Ordering::SeqCst);
            if logging && e.chain().any(|c| c.is::<driver::Preempted>()) {
                tracing::warn!("{e:#}");
            } else if logging {
                tracing::error!("{e:#}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

/// 2 for input the user can fix (config, data, flags), 130 for Ctrl-C,
/// 143 after a SIGTERM handled with a checkpoint, 1 otherwise.
fn exit_code(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| c.is::<driver::Interrupted>()) {
        return 130;
    }
    if e.chain().any(|c| c.is::<driver::Preempted>()) {
        return driver::PREEMPTED_EXIT;
    }
    let user_error = e.chain().any(|c| {
        c.is::<ConfigError>()
            || c.is::<stride_job::files::BadFile>()
            || c.is::<stride_job::sampler::TooFewSamples>()
            || c.is::<prepare::BadInput>()
            || c.is::<export::BadExport>()
            || c.is::<refused::Refused>()
            || c.is::<stride_job::auth::TokenError>()
            || c.is::<checkpoint::CheckpointError>()
            || c.is::<driver::DamagedStart>()
            || c.is::<stride_job::tokens::DataError>()
            || c.is::<stride_job::schedule::ScheduleError>()
            || c.is::<status::NoJob>()
            || c.is::<status::RefusedByJob>()
            || c.is::<stride_telemetry::EnvError>()
            || c.is::<report::BadRun>()
    });
    if user_error { 2 } else { 1 }
}

fn offline(command: Command) -> Result<()> {
    match command {
        Command::Export(a) => {
            let e = export::export(&a.checkpoint, a.format, &a.out, a.force)?;
            println!(
                "exported step {} ({} tensors, vocabulary {}) to {}: GPT2LMHeadModel.from_pretrained(\"{}\")",
                e.step,
                e.tensors,
                e.vocab_size,
                e.dir.display(),
                e.dir.display()
            );
        }
        Command::Decay(a) => {
            let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            let text = rt.block_on(status::decay(
                &a.job.connect,
                a.job.token_file.as_deref(),
                a.job.tls_ca.as_deref(),
                a.over,
                a.shape,
            ))?;
            print!("{text}");
        }
        Command::Status(a) => {
            let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            let text = rt.block_on(status::fetch(
                &a.job.connect,
                a.job.token_file.as_deref(),
                a.job.tls_ca.as_deref(),
                a.json,
            ))?;
            print!("{text}");
        }
        Command::Report(a) => {
            // Every run is read before anything is written.
            let runs = a
                .run_dirs
                .iter()
                .map(|d| Ok((d.display().to_string(), report::read(d)?)))
                .collect::<Result<Vec<_>>>()?;
            let size = (a.width, a.height);
            let view = report::View {
                steps: a.steps,
                ylim: a.ylim,
            };
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report::json_summary(&runs))?
                );
            }
            match (&runs[..], a.metric) {
                _ if a.json && a.out.is_none() => {}
                ([(name, curves)], None) => {
                    let out = a.out.unwrap_or_else(|| report::default_out(&a.run_dirs[0]));
                    report::draw(curves, &format!("Stride · {name}"), &out, size, view)?;
                    print!("{}", report::summary(curves, &out));
                }
                _ => {
                    let out = a.out.unwrap_or_else(|| PathBuf::from(report::COMPARE_OUT));
                    let names: Vec<&str> = runs.iter().map(|(n, _)| n.as_str()).collect();
                    let title = format!("Stride · {}", names.join(" vs "));
                    report::draw_runs(&runs, a.metric, &title, &out, size, view)?;
                    for (name, curves) in &runs {
                        print!(
                            "{name}: {}",
                            report::summary(curves, &out).lines().next().unwrap_or("")
                        );
                        println!();
                    }
                    println!("wrote {}", out.display());
                }
            }
        }
        Command::Plan(a) => {
            let (raw, config) = a.config.load()?;
            let extend = a.extend_steps.map(|n| (n, a.decay));
            let plan = plan::build(&config, extend, a.batches)?;
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
            let val_stride = a.val_stride.unwrap_or(a.context);
            let i = inspect::inspect(
                &a.data,
                a.context,
                inspect::Strides {
                    train: stride,
                    val: val_stride,
                },
                a.global_batch,
                a.vocab_size,
            )?;
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
