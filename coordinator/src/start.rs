//! How a job starts: fresh from a config, resumed from a checkpoint (with an
//! optional `--extend-steps`, Strategy A), or initialised from a
//! checkpoint's weights (`--init-from`, Strategy B).
//!
//! This module decides what carries over and refuses to guess: a resume
//! whose model, optimiser, schedule or data settings differ from the
//! checkpoint's is an error listing the keys, naming `--init-from` and
//! `--extend-steps`. It reads checkpoints but never writes or deletes one.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use stride_job::checkpoint::{self, HistoryEvent, Sums, Unverified};
use stride_job::config::{Config, ConfigSource, RawConfig};
use stride_job::params;
use stride_job::schedule::{Cooldown, Schedule};

use crate::driver::RestartPoint;
use crate::refused::Refused;

/// `--resume` of a checkpoint at the end of its run: the job is done
/// (exit code 0). A coordinator restarted after its final commit says so,
/// and tells the workers that reconnect to it to stop.
#[derive(Debug, thiserror::Error)]
#[error(
    "{dir} is the end of its run (step {step} of {step}): nothing left to train; `--extend-steps N` continues it with a cooldown to step N (`--decay` {}, {} by default)",
    stride_job::schedule::Cooldown::choices(),
    stride_job::schedule::Cooldown::default()
)]
pub struct NothingToTrain {
    pub dir: String,
    pub step: u64,
    /// The run's config (its cluster section says how long to wait for
    /// workers that reconnect).
    pub config: Box<Config>,
}

/// Everything `train()` needs to know about where the job starts.
#[derive(Debug)]
pub struct StartPoint {
    pub name: String,
    pub source: String,
    pub config: Config,
    pub schedule: Schedule,
    /// Step, data cursor, checkpoint to load and metrics carried over.
    pub from: RestartPoint,
    pub history: Vec<HistoryEvent>,
    pub run_dir: PathBuf,
    /// Where this job's checkpoints go: `checkpoint.dir` inside the run
    /// directory, or as written when absolute.
    pub checkpoint_dir: PathBuf,
    /// False when a resumed run appends to its earlier logs.
    pub fresh_run_dir: bool,
    /// Line appended to metrics.jsonl to mark a resume.
    pub marker: Option<serde_json::Value>,
    /// Said once the log is open (fallbacks, extensions).
    pub notes: Vec<String>,
    pub warnings: Vec<String>,
    /// A resume's checkpoint files still to hash ([`Request::sums`]).
    pub unverified: Unverified,
    /// The resume named `latest` or a folder: if `unverified` does not
    /// check out, start again from the checkpoint before it.
    pub falls_back: bool,
    /// The data the resumed checkpoint was trained on (empty for a fresh
    /// start, `--init-from`, or a checkpoint of format 1).
    pub data: Vec<stride_job::tokens::Fingerprint>,
}

/// How the user asked to start.
#[derive(Debug, Default)]
pub struct Request<'a> {
    pub config: Option<&'a str>,
    pub set: &'a [String],
    pub workers: Option<usize>,
    pub run_dir: Option<&'a Path>,
    pub resume: Option<&'a Path>,
    pub extend_steps: Option<u64>,
    /// The shape of the cooldown `extend_steps` appends.
    pub decay: Cooldown,
    pub init_from: Option<&'a Path>,
    /// When a resume hashes its checkpoint's safetensors files: `Later`
    /// leaves them in [`StartPoint::unverified`], for the coordinator to
    /// hash while the workers load them.
    pub sums: Sums,
}

/// Keys a resume must not change: they define the model, the optimiser,
/// the schedule and the data stream. (`max_steps` changes only through
/// `--extend-steps`.) Everything else — workers, micro-batch, evaluation,
/// checkpointing, timeouts, data paths — may change on resume.
const MUST_MATCH: &[(&str, Option<&[&str]>)] = &[
    ("model", None),
    ("optim", None),
    (
        "train",
        Some(&[
            "max_steps",
            "warmup_steps",
            "lr",
            "min_lr_ratio",
            "decay",
            "global_batch",
            "seed",
        ]),
    ),
    (
        "data",
        Some(&[
            "stride",
            "val_fraction",
            "synthetic_tokens",
            "synthetic_branching",
        ]),
    ),
];

/// `section.key: checkpoint A, now B` for every guarded key that differs,
/// comparing typed values (the configs serialised to TOML values, not
/// their text); a config that cannot be serialised is an error, never a
/// match.
pub fn differing_keys(checkpoint: &Config, now: &Config) -> Result<Vec<String>> {
    let table = |c: &Config, which: &str| {
        toml::Table::try_from(c).with_context(|| format!("cannot compare the {which} config"))
    };
    let (a, b) = (table(checkpoint, "checkpoint's")?, table(now, "requested")?);
    let mut out = Vec::new();
    for (section, keys) in MUST_MATCH {
        let sa = a
            .get(*section)
            .and_then(|v| v.as_table())
            .cloned()
            .unwrap_or_default();
        let sb = b
            .get(*section)
            .and_then(|v| v.as_table())
            .cloned()
            .unwrap_or_default();
        let mut names: Vec<&String> = sa.keys().chain(sb.keys()).collect();
        names.sort();
        names.dedup();
        for k in names {
            if keys.is_some_and(|ks| !ks.contains(&k.as_str())) {
                continue;
            }
            let (va, vb) = (sa.get(k), sb.get(k));
            if va != vb {
                let show =
                    |v: Option<&toml::Value>| v.map_or("absent".to_string(), |v| v.to_string());
                out.push(format!(
                    "{section}.{k}: checkpoint {}, now {}",
                    show(va),
                    show(vb)
                ));
            }
        }
    }
    Ok(out)
}

/// The checkpoint folder already holding checkpoints, if any.
fn existing_checkpoints(folder: &Path) -> Option<String> {
    let steps = checkpoint::list_steps(folder);
    steps.last().map(|(s, _)| checkpoint::step_dir_name(*s))
}

pub fn start(req: &Request) -> Result<StartPoint> {
    if let Some(path) = req.resume {
        return resume(req, path);
    }
    let mut raw = RawConfig::locate(req.config.unwrap_or("tiny"))?;
    let config = raw.resolve_with(req.workers, req.set)?;
    let run_dir = req
        .run_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| Path::new("runs").join(&raw.name));
    let folder = &config.checkpoint.folder(&run_dir);
    let mut sp = StartPoint {
        name: raw.name.clone(),
        source: raw.source.to_string(),
        schedule: Schedule::from_config(&config.train),
        config: config.clone(),
        from: RestartPoint::default(),
        history: vec![HistoryEvent {
            step: 0,
            event: "start".into(),
            detail: format!("config `{}` from {}", raw.name, raw.source),
        }],
        checkpoint_dir: folder.clone(),
        run_dir: run_dir.clone(),
        fresh_run_dir: true,
        marker: None,
        notes: Vec::new(),
        warnings: Vec::new(),
        unverified: Unverified::default(),
        falls_back: false,
        data: Vec::new(),
    };
    if let Some(path) = req.init_from {
        let (ckpt, warnings) = checkpoint::resolve(path)?;
        sp.warnings.extend(warnings);
        let shapes = checkpoint::tensor_shapes(&ckpt.dir.join(checkpoint::MODEL_FILE))?;
        let diff = checkpoint::layout_mismatch(&shapes, &params::layout(&config.model));
        if !diff.is_empty() {
            return Err(Refused(format!(
                "--init-from {}: the checkpoint's tensors do not fit the model of `{}`:\n  {}",
                ckpt.dir.display(),
                raw.name,
                diff.join("\n  ")
            ))
            .into());
        }
        let src_folder = ckpt.dir.parent().unwrap_or(Path::new("."));
        if same_dir(src_folder, folder) {
            return Err(Refused(format!(
                "--init-from {}: this run would write its own checkpoints into {} and prune the one it starts from; give it another run directory with --run-dir DIR",
                ckpt.dir.display(),
                folder.display()
            )).into());
        }
        sp.notes.push(format!(
            "Strategy B: weights from {} (step {} of run `{}`); step 0, fresh optimizer, schedule and data order of `{}`",
            ckpt.dir.display(),
            ckpt.state.step,
            ckpt.state.config_name,
            raw.name
        ));
        sp.history.push(HistoryEvent {
            step: 0,
            event: "init-from".into(),
            detail: format!(
                "weights of {} (step {})",
                ckpt.dir.display(),
                ckpt.state.step
            ),
        });
        sp.from = RestartPoint::init_from(&ckpt)?;
    }
    if let Some(last) = existing_checkpoints(folder) {
        return Err(Refused(format!(
            "{} already holds checkpoints of a run (newest {last}); continue it with `--resume {}`, or start a new run in another run directory with --run-dir DIR",
            folder.display(),
            run_dir.display()
        )).into());
    }
    Ok(sp)
}

/// The run directory a checkpoint belongs to, wherever its run was copied
/// or moved: its checkpoint folder with the config's relative
/// `checkpoint.dir` taken off the end (`runs/x/checkpoints` → `runs/x`).
/// For an absolute `checkpoint.dir` (a shared volume) or a checkpoint of
/// format 1 (whose `checkpoint.dir` was relative to the current directory),
/// the run directory its state recorded.
fn home_run_dir(ckpt: &checkpoint::Checkpoint, saved: &Config) -> PathBuf {
    let folder = ckpt.dir.parent().unwrap_or(Path::new("."));
    let dir = &saved.checkpoint.dir;
    if ckpt.state.format_version >= 2 && dir.is_relative() {
        let mut home = folder.to_path_buf();
        let mut matches = true;
        for part in dir.components().rev() {
            if home.file_name() != Some(part.as_os_str()) {
                matches = false;
                break;
            }
            home.pop();
        }
        if matches {
            return if home.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                home
            };
        }
    }
    ckpt.state.run_dir.clone()
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn resume(req: &Request, path: &Path) -> Result<StartPoint> {
    let resolved = checkpoint::resolve_with(path, req.sums)?;
    let (ckpt, warnings) = (resolved.checkpoint, resolved.warnings);
    let state = &ckpt.state;
    let config_path = ckpt.dir.join(checkpoint::CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let saved = Config::from_toml(&text, &config_path.display().to_string())?;
    let mut raw = match req.config {
        Some(name) => RawConfig::locate(name)?,
        None => RawConfig::parse(
            &text,
            state.config_name.clone(),
            ConfigSource::File(config_path.clone()),
        )?,
    };
    let mut config = raw.resolve_with(req.workers, req.set)?;
    let diff = differing_keys(&saved, &config)?;
    if !diff.is_empty() {
        return Err(Refused(format!(
            "--resume {} continues the checkpoint's own run, but the requested config differs from it in:\n  {}\n\
             A resume never guesses which to trust. To train further with a new decay from step {}, use \
             `--resume {} --extend-steps N` (Strategy A); to start a new run from these weights with \
             another config, use `--config NAME --init-from {}` (Strategy B).",
            path.display(),
            diff.join("\n  "),
            state.step,
            path.display(),
            path.display()
        )).into());
    }
    let r = state.step;
    let mut schedule = state.schedule.clone();
    let mut notes = Vec::new();
    let mut history = state.history.clone();
    let old_max = schedule.max_steps();
    if let Some(n) = req.extend_steps {
        schedule = schedule.extend(r, n, config.train.lr * config.train.min_lr_ratio, req.decay)?;
        let seg = schedule.segments.last().copied();
        let detail = seg.map_or(String::new(), |s| {
            format!(
                "max_steps {old_max} → {n}: appended {} segment, steps {}..{}, lr {:.6e} → {:.6e}",
                s.kind.name(),
                s.start_step,
                s.end_step,
                s.start_lr,
                s.end_lr
            )
        });
        notes.push(format!(
            "Strategy A: {detail} (lr at step {} = lr at step {})",
            r,
            r.saturating_sub(1)
        ));
        if seg.is_some_and(|s| s.start_lr < s.end_lr) {
            notes.push(
                "the LR in force is below min_lr_ratio × lr: this \"decay\" rises to the floor"
                    .into(),
            );
        }
        history.push(HistoryEvent {
            step: r,
            event: "extend".into(),
            detail,
        });
    } else if r >= old_max {
        return Err(NothingToTrain {
            dir: ckpt.dir.display().to_string(),
            step: r,
            config: Box::new(config),
        }
        .into());
    }
    history.push(HistoryEvent {
        step: r,
        event: "resume".into(),
        detail: format!(
            "from {} with {} workers",
            ckpt.dir.display(),
            config.cluster.workers
        ),
    });
    // A resume continues in the run directory its checkpoint belongs to
    // (wherever it was copied or moved); `--run-dir` elsewhere is a branch:
    // it reads this checkpoint and writes only there.
    let home = home_run_dir(&ckpt, &saved);
    let run_dir = req.run_dir.map(Path::to_path_buf).unwrap_or(home.clone());
    let branch = !same_dir(&run_dir, &home) && run_dir != home;
    let src_folder = ckpt.dir.parent().unwrap_or(Path::new(".")).to_path_buf();
    if state.format_version < 2 && saved.checkpoint.dir.is_relative() {
        // Format 1: `checkpoint.dir` was relative to the current directory.
        // Its folder stays this run's if it is inside the run directory;
        // otherwise new checkpoints go into the run directory, and the
        // user is told where.
        match src_folder.strip_prefix(&run_dir) {
            Ok(inside) if !branch && !inside.as_os_str().is_empty() => {
                config.checkpoint.dir = inside.to_path_buf();
            }
            _ => {
                // Unless the user named a folder, the default one.
                if config.checkpoint.dir == saved.checkpoint.dir {
                    config.checkpoint.dir = PathBuf::from(checkpoint::DEFAULT_FOLDER);
                }
                notes.push(format!(
                    "{} was written by an older Stride that kept checkpoints outside the run directory; new checkpoints go to {}",
                    ckpt.dir.display(),
                    config.checkpoint.folder(&run_dir).display()
                ));
            }
        }
    }
    let checkpoint_dir = config.checkpoint.folder(&run_dir);
    if branch && same_dir(&src_folder, &checkpoint_dir) {
        return Err(Refused(format!(
            "--run-dir {} branches from {} (run {}), but its checkpoint folder {} is that run's own (checkpoint.dir = {} is absolute): the branch would write into it and prune its checkpoints; give the branch a relative checkpoint.dir (inside its run directory), e.g. --set checkpoint.dir=checkpoints",
            run_dir.display(),
            ckpt.dir.display(),
            home.display(),
            checkpoint_dir.display(),
            config.checkpoint.dir.display()
        ))
        .into());
    }
    // An extension in the run's own directory must not rewrite its
    // history: never a shorter end, never over checkpoints later than the
    // one resumed. A branch (`--run-dir`) is for both.
    if let Some(n) = req.extend_steps
        && !branch
    {
        // (Through `latest` or a folder, every newer one was skipped as
        // not valid: those are not the run's history any more.)
        let later = checkpoint::list_steps(&checkpoint_dir)
            .into_iter()
            .filter(|_| !resolved.falls_back)
            .rfind(|(s, d)| *s > r && d.join(checkpoint::COMPLETE_FILE).is_file());
        if let Some((_, newest)) = later {
            return Err(Refused(format!(
                "--resume {} --extend-steps {n} in its own run directory would overwrite the run's later checkpoints (newest: {}) with another schedule; branch into a run directory of its own with --run-dir DIR",
                ckpt.dir.display(),
                newest.display()
            ))
            .into());
        }
        if n < old_max {
            return Err(Refused(format!(
                "--extend-steps {n} would end the run at step {n}, before its own end ({old_max}): an extension never shortens a run in place; branch a shorter cooldown into a run directory of its own with --run-dir DIR, or tell a running job `coordinator decay`"
            ))
            .into());
        }
    }
    let mut marker = serde_json::json!({
        "event": "resume",
        "step": r,
        "checkpoint": ckpt.dir.display().to_string(),
        "previous_max_steps": old_max,
        "max_steps": schedule.max_steps(),
        "workers": config.cluster.workers,
    });
    if branch {
        marker["branched_from"] = serde_json::json!(home.display().to_string());
    }
    notes.insert(
        0,
        format!(
            "resuming {} at step {r} (epoch {}, position {}), max_steps {}",
            ckpt.dir.display(),
            state.data_cursor.epoch,
            state.data_cursor.position,
            schedule.max_steps()
        ),
    );
    Ok(StartPoint {
        name: state.config_name.clone(),
        source: raw.source.to_string(),
        config,
        schedule,
        from: RestartPoint::resume(&ckpt)?,
        history,
        run_dir,
        checkpoint_dir,
        fresh_run_dir: false,
        marker: Some(marker),
        notes,
        warnings,
        unverified: resolved.unverified,
        falls_back: resolved.falls_back,
        data: state.data.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(set: &[&str]) -> Config {
        let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        RawConfig::locate("tiny")
            .expect("tiny")
            .resolve_with(None, &set)
            .expect("valid")
    }

    #[test]
    fn guarded_keys_are_compared_as_values_and_others_may_change() {
        let saved = tiny(&[]);
        assert!(
            differing_keys(&saved, &tiny(&[]))
                .expect("comparable")
                .is_empty()
        );
        // The same value written differently is the same value.
        assert!(
            differing_keys(&saved, &tiny(&["train.lr=0.003"]))
                .expect("comparable")
                .is_empty()
        );
        let diff = differing_keys(&saved, &tiny(&["train.lr=1e-3", "model.n_layer=3"]))
            .expect("comparable");
        assert_eq!(diff.len(), 2, "{diff:?}");
        assert!(
            diff.iter()
                .any(|d| d.starts_with("train.lr: checkpoint 0.003, now 0.001")),
            "{diff:?}"
        );
        assert!(
            diff.iter()
                .any(|d| d.starts_with("model.n_layer: checkpoint 2, now 3")),
            "{diff:?}"
        );
        // Keys outside the guarded ones may change on resume.
        assert!(
            differing_keys(
                &saved,
                &tiny(&["cluster.workers=1", "train.eval_interval=7"])
            )
            .expect("comparable")
            .is_empty()
        );
    }
}
