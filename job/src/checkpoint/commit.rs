//! Putting a checkpoint in place and keeping its folder tidy: the
//! temporary directory, fsyncs, the rename that commits, the `latest` and
//! `best` pointers, pruning, and the repair of what a crash left.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::names::hex;

use super::*;

fn fsync_dir(dir: &Path) -> Result<(), CheckpointError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<String, CheckpointError> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(hex(&Sha256::digest(bytes)))
}

/// A fresh temporary directory for the checkpoint of `step` in `folder`.
pub fn temp_dir(folder: &Path, step: u64, tag: &str) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(folder).map_err(io_err(folder))?;
    let dir = folder.join(format!(".tmp-{}-{tag}", step_dir_name(step)));
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    Ok(dir)
}

/// Finishes a checkpoint whose tensor files are already in `tmp`: writes
/// config.toml and train_state.json (with every file's sha256), COMPLETE
/// last, fsyncs, and renames it to `step-NNNNNNNN`. An existing directory
/// of that name (a checkpoint of an earlier attempt at the same step) is
/// moved aside to `.superseded-…`, never deleted.
pub fn commit(
    tmp: &Path,
    folder: &Path,
    mut state: TrainState,
    config_toml: &str,
) -> Result<PathBuf, CheckpointError> {
    let sum = write_synced(&tmp.join(CONFIG_FILE), config_toml.as_bytes())?;
    state.files.insert(CONFIG_FILE.to_string(), sum);
    let json = serde_json::to_string_pretty(&state).map_err(|e| CheckpointError::Invalid {
        path: tmp.to_path_buf(),
        message: format!("cannot serialise the train state: {e}"),
    })?;
    let state_sum = write_synced(&tmp.join(STATE_FILE), json.as_bytes())?;
    write_synced(
        &tmp.join(COMPLETE_FILE),
        format!("{state_sum}  {STATE_FILE}\n").as_bytes(),
    )?;
    fsync_dir(tmp)?;
    let dest = folder.join(step_dir_name(state.step));
    if dest.exists() {
        let aside = folder.join(format!(
            ".superseded-{}-{}",
            step_dir_name(state.step),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        ));
        std::fs::rename(&dest, &aside).map_err(io_err(&dest))?;
    }
    std::fs::rename(tmp, &dest).map_err(io_err(tmp))?;
    fsync_dir(folder)?;
    Ok(dest)
}

/// Points `folder/name` at `step-NNNNNNNN` by renaming a new symlink over
/// the old one (atomic: a reader sees the old or the new target).
pub fn set_pointer(folder: &Path, name: &str, step: u64) -> Result<(), CheckpointError> {
    let link = folder.join(name);
    let tmp = folder.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(step_dir_name(step), &tmp).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &link).map_err(io_err(&link))?;
    fsync_dir(folder)
}

/// The step a pointer names, if it exists.
pub fn pointer_step(folder: &Path, name: &str) -> Option<u64> {
    std::fs::read_link(folder.join(name))
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
        .and_then(|n| parse_step_dir(&n))
}

/// Removes complete `step-*` directories beyond the newest `keep_last`,
/// except the one `best` points at. Returns what was removed.
pub fn prune(folder: &Path, keep_last: usize) -> Result<Vec<PathBuf>, CheckpointError> {
    let best = pointer_step(folder, BEST);
    let complete: Vec<(u64, PathBuf)> = list_steps(folder)
        .into_iter()
        .filter(|(_, d)| d.join(COMPLETE_FILE).is_file())
        .collect();
    let cut = complete.len().saturating_sub(keep_last);
    let mut removed = Vec::new();
    for (step, dir) in &complete[..cut] {
        if Some(*step) == best {
            continue;
        }
        std::fs::remove_dir_all(dir).map_err(io_err(dir))?;
        removed.push(dir.clone());
    }
    Ok(removed)
}

/// Removes what interrupted writes left in `folder`: temporary checkpoint
/// folders (`.tmp-step-…`, never complete, never loaded), checkpoints an
/// earlier attempt at the same step moved aside (`.superseded-…`) and
/// half-made pointer links. Only a coordinator holding the folder's lock
/// may call it (no other process is writing there). Returns what it
/// removed.
pub fn clean_leftovers(folder: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut removed = Vec::new();
    for e in std::fs::read_dir(folder).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let is_link = e.file_type().map(|t| t.is_symlink()).unwrap_or(false);
        let leftover_dir = !is_link
            && path.is_dir()
            && (name.starts_with(".tmp-step-") || name.starts_with(".superseded-step-"));
        let leftover_link = is_link
            && [LATEST, BEST]
                .iter()
                .any(|p| name.starts_with(&format!(".{p}.tmp-")));
        if leftover_dir {
            std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
        } else if leftover_link {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        } else {
            continue;
        }
        removed.push(path);
    }
    removed.sort();
    Ok(removed)
}

/// Points `latest` back at the newest complete checkpoint when it names a
/// folder that is gone or incomplete (a crash between a prune and the
/// pointer's move, a hand-deleted step); removes it when no complete
/// checkpoint is left. Returns what it did, for a warning. Only a
/// coordinator holding the folder's lock may call it.
pub fn repair_latest(folder: &Path) -> Result<Option<String>, CheckpointError> {
    let link = folder.join(LATEST);
    let Ok(target) = std::fs::read_link(&link) else {
        return Ok(None);
    };
    if folder.join(&target).join(COMPLETE_FILE).is_file() {
        return Ok(None);
    }
    let newest = list_steps(folder)
        .into_iter()
        .rev()
        .find(|(_, d)| d.join(COMPLETE_FILE).is_file());
    Ok(Some(match newest {
        Some((step, dir)) => {
            set_pointer(folder, LATEST, step)?;
            format!(
                "{} named {}, which is not a complete checkpoint; it now names {}",
                link.display(),
                target.display(),
                dir.display()
            )
        }
        None => {
            std::fs::remove_file(&link).map_err(io_err(&link))?;
            format!(
                "{} named {}, which is not a complete checkpoint, and no complete checkpoint is left: removed it",
                link.display(),
                target.display()
            )
        }
    }))
}
