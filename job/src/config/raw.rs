//! Stage one of loading a config: the TOML as written — a file, an
//! embedded preset or `--set` overrides — with every key checked against
//! [`SCHEMA`] (and the nearest valid key, or the name another tool gives
//! it, suggested for a typo) and the defaults that depend on other keys
//! filled in. Nothing is typed or checked for sense here; that is
//! [`super::Config`]'s stage.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::names::Hint;

use super::*;

/// The presets shipped inside every binary, so `--config tiny` works from
/// any directory. Files in `configs/` take precedence (see [`RawConfig::locate`]).
pub const PRESETS: &[(&str, &str)] = &[
    ("tiny", include_str!("../../../configs/tiny.toml")),
    ("h100_1k", include_str!("../../../configs/h100_1k.toml")),
    ("h100", include_str!("../../../configs/h100.toml")),
];

/// Every valid `section.key`. SPEC §5 fixes these names so that `--set`
/// means the same thing everywhere; a test checks this list against the
/// fields of [`Config`].
pub const SCHEMA: &[(&str, &[&str])] = &[
    (
        "model",
        &["n_layer", "n_head", "n_embd", "vocab_size", "context"],
    ),
    (
        "data",
        &[
            "train",
            "val",
            "stride",
            "val_stride",
            "val_fraction",
            "synthetic_tokens",
            "synthetic_branching",
        ],
    ),
    (
        "train",
        &[
            "max_steps",
            "warmup_steps",
            "lr",
            "min_lr_ratio",
            "decay",
            "global_batch",
            "micro_batch",
            "eval_interval",
            "eval_batches",
            "seed",
            "grad_comm_dtype",
            "shard_optimizer",
            "overlap_grad_comm",
        ],
    ),
    (
        "optim",
        &["beta1", "beta2", "eps", "weight_decay", "grad_clip"],
    ),
    (
        "checkpoint",
        &["dir", "interval", "keep_last", "write_timeout_s"],
    ),
    (
        "worker",
        &[
            "device",
            "precision",
            "engine",
            "threads",
            "weights_check_interval",
        ],
    ),
    (
        "cluster",
        &[
            "workers",
            "min_workers",
            "max_workers",
            "heartbeat_interval_s",
            "heartbeat_timeout_s",
            "startup_timeout_s",
            "rejoin_timeout_s",
            "step_timeout_s",
            "max_restarts",
            "collective",
        ],
    ),
];

/// Where a config's text came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    Embedded(&'static str),
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::File(p) => write!(f, "{}", p.display()),
            ConfigSource::Embedded(n) => write!(f, "built-in preset `{n}`"),
        }
    }
}

/// Stage one: the TOML table as written, with `--set` overrides applied and
/// every key known, but nothing typed or checked for sense yet.
#[derive(Debug, Clone)]
pub struct RawConfig {
    /// A short name for the run (file stem or preset name), used for the
    /// default run directory `runs/<name>`.
    pub name: String,
    pub source: ConfigSource,
    table: toml::Table,
    /// `section.key` → the flag that set it, for error messages.
    overridden: BTreeMap<String, String>,
}

impl RawConfig {
    /// Finds `name` as a path, else `configs/<name>.toml` (relative to the
    /// current directory), else the preset embedded in the binary.
    pub fn locate(name: &str) -> Result<RawConfig, ConfigError> {
        let direct = Path::new(name);
        let in_configs = Path::new("configs").join(format!("{name}.toml"));
        // A path that exists but is no regular file (a FIFO would block
        // the read) is refused, not looked up as a preset.
        if direct.exists() && !direct.is_file() {
            let message = crate::files::check_regular(direct)
                .err()
                .unwrap_or_default();
            return Err(ConfigError::Io {
                origin: direct.display().to_string(),
                message,
            });
        }
        let source = if direct.is_file() {
            ConfigSource::File(direct.to_path_buf())
        } else if !name.contains(['/', '\\']) && in_configs.is_file() {
            ConfigSource::File(in_configs)
        } else if let Some((preset, _)) = PRESETS.iter().find(|(n, _)| *n == name) {
            ConfigSource::Embedded(preset)
        } else {
            return Err(ConfigError::NotFound {
                name: name.to_string(),
                tried: format!("`{}`, `{}`", direct.display(), in_configs.display()),
                presets: preset_names(),
            });
        };
        let text = match &source {
            ConfigSource::File(p) => std::fs::read_to_string(p).map_err(|e| ConfigError::Io {
                origin: p.display().to_string(),
                message: e.to_string(),
            })?,
            ConfigSource::Embedded(n) => preset_text(n).unwrap_or_default().to_string(),
        };
        let stem = match &source {
            ConfigSource::File(p) => p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".to_string()),
            ConfigSource::Embedded(n) => (*n).to_string(),
        };
        RawConfig::parse(&text, stem, source)
    }

    /// Parses TOML text and checks every section and key against [`SCHEMA`].
    pub fn parse(text: &str, name: String, source: ConfigSource) -> Result<RawConfig, ConfigError> {
        let origin = source.to_string();
        let table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    origin: origin.clone(),
                    message: e.to_string().trim_end().to_string(),
                })?;
        check_keys(&table, &origin)?;
        Ok(RawConfig {
            name,
            source,
            table,
            overridden: BTreeMap::new(),
        })
    }

    /// Applies one `--set section.key=value`. The value is read as a TOML
    /// value (`3e-4`, `true`, `"x"`); anything that is not valid TOML is
    /// taken as a string, so `--set worker.device=cuda:0` works unquoted.
    /// An empty value removes the key (back to its default).
    pub fn set(&mut self, arg: &str) -> Result<(), ConfigError> {
        self.set_from(arg, &format!("--set {arg}"))
    }

    /// [`RawConfig::set`] for a value that came from another flag (such as
    /// `--workers 4`), named by `flag` in error messages.
    pub fn set_from(&mut self, arg: &str, flag: &str) -> Result<(), ConfigError> {
        let bad = |reason: &str| ConfigError::BadOverride {
            arg: arg.to_string(),
            reason: reason.to_string(),
        };
        let (path, value) = arg.split_once('=').ok_or_else(|| bad("missing `=`"))?;
        let path = path.trim();
        let (section, key) = path
            .split_once('.')
            .ok_or_else(|| bad("the key must be `section.key`"))?;
        let origin = flag.to_string();
        let mut probe = toml::Table::new();
        let mut inner = toml::Table::new();
        inner.insert(key.to_string(), toml::Value::Boolean(true));
        probe.insert(section.to_string(), toml::Value::Table(inner));
        check_keys(&probe, &origin)?;

        let value = value.trim();
        let entry = self
            .table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(sec) = entry else {
            return Err(bad("the section is not a table in the config file"));
        };
        if value.is_empty() {
            sec.remove(key);
        } else {
            sec.insert(key.to_string(), parse_value(value));
        }
        self.overridden.insert(path.to_string(), flag.to_string());
        Ok(())
    }

    /// `--workers N`: sets `cluster.workers` and widens
    /// `cluster.min_workers..=cluster.max_workers` to include N when the
    /// file set them narrower (an explicit worker count is the user's
    /// intent; the bounds only matter for restarts).
    pub fn set_workers(&mut self, n: usize) -> Result<(), ConfigError> {
        let flag = format!("--workers {n}");
        let current = |s: &RawConfig, k: &str| {
            s.table
                .get("cluster")
                .and_then(|c| c.get(k))
                .and_then(|v| v.as_integer())
        };
        if let Some(min) = current(self, "min_workers")
            && min > n as i64
        {
            self.set_from(&format!("cluster.min_workers={n}"), &flag)?;
        }
        if let Some(max) = current(self, "max_workers")
            && max < n as i64
        {
            self.set_from(&format!("cluster.max_workers={n}"), &flag)?;
        }
        self.set_from(&format!("cluster.workers={n}"), &flag)
    }

    /// The command-line adjustments every command shares, in order:
    /// `--workers N` (see [`RawConfig::set_workers`]) then each `--set`;
    /// then stage two.
    pub fn resolve_with(
        &mut self,
        workers: Option<usize>,
        sets: &[String],
    ) -> Result<Config, ConfigError> {
        if let Some(n) = workers {
            self.set_workers(n)?;
        }
        for s in sets {
            self.set(s)?;
        }
        self.resolve()
    }

    /// Stage two: types, derived defaults and validation.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let mut table = self.table.clone();
        fill_derived_defaults(&mut table);
        let origin_of = |key: &str| {
            self.overridden
                .get(key)
                .cloned()
                .unwrap_or_else(|| self.source.to_string())
        };
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                ConfigError::WrongType {
                    origin: origin_of(&key),
                    message: e.inner().to_string().trim_end().to_string(),
                    key,
                }
            })?;
        config.validate().map_err(|v| ConfigError::Invalid {
            origin: origin_of(&v.key),
            key: v.key,
            value: v.value,
            reason: v.reason,
        })?;
        Ok(config)
    }
}

fn parse_value(text: &str) -> toml::Value {
    format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

fn preset_names() -> String {
    PRESETS
        .iter()
        .map(|(n, _)| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The embedded text of a preset.
pub fn preset_text(name: &str) -> Option<&'static str> {
    PRESETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

fn schema_keys(section: &str) -> Option<&'static [&'static str]> {
    SCHEMA.iter().find(|(s, _)| *s == section).map(|(_, k)| *k)
}

/// Names other tools (nanoGPT, PyTorch, Hugging Face) give Stride's keys:
/// a key close to one of these is pointed at Stride's.
const ALIASES: &[(&str, &str)] = &[
    ("learning_rate", "train.lr"),
    ("max_iters", "train.max_steps"),
    ("warmup_iters", "train.warmup_steps"),
    ("batch_size", "train.micro_batch"),
    ("gradient_accumulation_steps", "train.global_batch"),
    ("eval_iters", "train.eval_batches"),
    ("block_size", "model.context"),
    ("n_ctx", "model.context"),
    ("n_positions", "model.context"),
    ("weight_decay", "optim.weight_decay"),
    ("grad_clip", "optim.grad_clip"),
    ("out_dir", "checkpoint.dir"),
];

/// The closest valid `section.key` to a mistyped `section.key`, if any is
/// close enough to be worth suggesting.
fn suggest_key(section: &str, key: &str) -> Option<String> {
    let mut best: Option<(f64, String)> = None;
    for (alias, target) in ALIASES {
        let score = strsim::normalized_damerau_levenshtein(key, alias);
        if score >= 0.75 && best.as_ref().is_none_or(|(b, _)| score > *b) {
            best = Some((score, (*target).to_string()));
        }
    }
    for (s, keys) in SCHEMA {
        for k in *keys {
            let mut score = strsim::normalized_damerau_levenshtein(key, k);
            if *s == section {
                score += 0.05;
            }
            if best.as_ref().is_none_or(|(b, _)| score > *b) {
                best = Some((score, format!("{s}.{k}")));
            }
        }
    }
    best.filter(|(score, _)| *score >= 0.6).map(|(_, k)| k)
}

fn check_keys(table: &toml::Table, origin: &str) -> Result<(), ConfigError> {
    for (section, value) in table {
        let Some(keys) = schema_keys(section) else {
            let hint = SCHEMA
                .iter()
                .map(|(s, _)| (strsim::normalized_damerau_levenshtein(section, s), *s))
                .filter(|(score, _)| *score >= 0.5)
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, s)| s.to_string());
            // A top-level key such as `lr = 1e-3` outside any section is the
            // most common mistake: point at the section it belongs to.
            let hint = hint.or_else(|| {
                SCHEMA
                    .iter()
                    .find(|(_, ks)| ks.contains(&section.as_str()))
                    .map(|(s, _)| format!("[{s}] {section}"))
            });
            return Err(ConfigError::UnknownSection {
                origin: origin.to_string(),
                section: section.clone(),
                hint: Hint(hint),
                valid: SCHEMA
                    .iter()
                    .map(|(s, _)| format!("[{s}]"))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let toml::Value::Table(entries) = value else {
            return Err(ConfigError::WrongType {
                origin: origin.to_string(),
                key: section.clone(),
                message: format!(
                    "expected a `[{section}]` table, found a {}",
                    value.type_str()
                ),
            });
        };
        for key in entries.keys() {
            if !keys.contains(&key.as_str()) {
                return Err(ConfigError::UnknownKey {
                    origin: origin.to_string(),
                    key: format!("{section}.{key}"),
                    hint: Hint(suggest_key(section, key)),
                });
            }
        }
    }
    Ok(())
}

/// Defaults that depend on other keys: `data.stride` = `model.context`
/// (non-overlapping windows), `cluster.min_workers`/`max_workers` =
/// `cluster.workers` (a fixed-size job unless told otherwise).
fn fill_derived_defaults(table: &mut toml::Table) {
    let get = |t: &toml::Table, s: &str, k: &str| {
        t.get(s)
            .and_then(|v| v.as_table())
            .and_then(|t| t.get(k))
            .cloned()
    };
    let context = get(table, "model", "context")
        .unwrap_or(toml::Value::Integer(ModelConfig::default().context as i64));
    let workers = get(table, "cluster", "workers").unwrap_or(toml::Value::Integer(
        ClusterConfig::default().workers as i64,
    ));
    let mut set_default = |s: &str, k: &str, v: toml::Value| {
        let sec = table
            .entry(s.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(sec) = sec {
            sec.entry(k.to_string()).or_insert(v);
        }
    };
    // Copied only when they are numbers: a mistyped value is then reported
    // under its own key, not under the keys that default to it.
    if context.is_integer() {
        set_default("data", "stride", context.clone());
        set_default("data", "val_stride", context);
    }
    if workers.is_integer() {
        set_default("cluster", "min_workers", workers.clone());
        set_default("cluster", "max_workers", workers);
    }
}
