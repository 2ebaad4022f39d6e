//! Checkpoints end to end: exact resume after SIGKILL, resume with another
//! worker count, Strategy A (extend) and B (init-from), refusals, damage.

use std::collections::BTreeMap;
use std::f64::consts::PI;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::{
    copy_folder, eventually, metrics, run, snapshot, spawn, spawn_env, worker_pids,
};
use serde_json::Value;
use stride_job::checkpoint;
use stride_job::test_hooks::Hook;

const LIMIT: Duration = Duration::from_secs(300);

/// tiny, shortened: warmup 10, evaluation only at the end.
fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--config",
        "tiny",
        "--local",
        "--set",
        "train.warmup_steps=10",
        "--set",
        "train.eval_interval=0",
    ];
    v.extend_from_slice(extra);
    v
}

fn ok(args: &[&str], cwd: &Path) -> String {
    let (status, out) = run(args, cwd, LIMIT);
    assert!(status.success(), "{args:?} failed:\n{out}");
    out
}

fn refused(args: &[&str], cwd: &Path, needles: &[&str]) {
    let (status, out) = run(args, cwd, LIMIT);
    assert_eq!(
        status.code(),
        Some(2),
        "{args:?} must be refused with exit code 2:\n{out}"
    );
    for n in needles {
        assert!(out.contains(n), "{args:?}: output lacks `{n}`:\n{out}");
    }
}

/// Step lines only (not resume markers), the last occurrence of each step.
fn steps(run_dir: &Path) -> BTreeMap<u64, Value> {
    metrics(run_dir)
        .into_iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| (r["step"].as_u64().expect("step"), r))
        .collect()
}

/// A finished 20-step `tiny` run in `dir` with `workers` workers and
/// checkpoints at steps 10 and 20; returns its checkpoint folder.
fn twenty_steps(dir: &Path, workers: &str) -> PathBuf {
    ok(
        &args(&[
            "--workers",
            workers,
            "--set",
            "train.max_steps=20",
            "--set",
            "checkpoint.interval=10",
        ]),
        dir,
    );
    dir.join("runs/tiny/checkpoints")
}

/// Replaces a checkpoint's train_state.json with `edit` of it and its sum
/// in COMPLETE: a state that checks out but says something else.
fn rewrite_state(dir: &Path, edit: impl FnOnce(&str) -> String) {
    let file = dir.join(checkpoint::STATE_FILE);
    let t = std::fs::read_to_string(&file).expect("r");
    std::fs::write(&file, edit(&t)).expect("w");
    let sum = checkpoint::sha256_file(&file).expect("sha");
    std::fs::write(dir.join("COMPLETE"), format!("{sum}  train_state.json\n")).expect("w");
}

fn state(dir: &Path) -> checkpoint::TrainState {
    checkpoint::validate(dir).expect("valid checkpoint").state
}

fn lr_of(m: &BTreeMap<u64, Value>, step: u64) -> f64 {
    m[&step]["lr"].as_f64().expect("lr")
}

fn cosine(min: f64, lr_r: f64, r: u64, n: u64, s: u64) -> f64 {
    min + (lr_r - min) * 0.5 * (1.0 + (PI * (s - r) as f64 / (n - r) as f64).cos())
}

#[test]
fn resume_after_sigkill_is_exact_and_independent_of_the_worker_count() {
    let _turn = crate::common::beside_others();
    let straight = tempfile::tempdir().expect("tmp");
    let base = args(&[
        "--workers",
        "2",
        "--set",
        "train.max_steps=60",
        "--set",
        "checkpoint.interval=30",
    ]);
    ok(&base, straight.path());
    let a_ckpt = straight.path().join("runs/tiny/checkpoints");
    let a_steps = steps(&straight.path().join("runs/tiny"));
    assert_eq!(a_steps.len(), 60);

    // The same job, killed with SIGKILL (coordinator and workers) once the
    // checkpoint at step 30 is complete, then resumed.
    let killed = tempfile::tempdir().expect("tmp");
    let mut coord = spawn("coordinator", &base, killed.path(), "coordinator.out");
    let ckpt = killed.path().join("runs/tiny/checkpoints");
    eventually(LIMIT, "checkpoint at step 30", || {
        ckpt.join("step-00000030/COMPLETE").exists().then_some(())
    });
    let log = std::fs::read_to_string(killed.path().join("runs/tiny/train.log")).expect("log");
    let mut victims = worker_pids(&log);
    victims.push(coord.pid());
    for pid in victims {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    coord.wait(Duration::from_secs(30));
    let before = steps(&killed.path().join("runs/tiny")).len();
    assert!(before < 60, "the job finished before it could be killed");

    let out = ok(
        &["--resume", "runs/tiny/checkpoints/latest", "--local"],
        killed.path(),
    );
    assert!(
        out.contains("resuming") && out.contains("at step 30"),
        "{out}"
    );
    let all = metrics(&killed.path().join("runs/tiny"));
    let marker = all
        .iter()
        .rposition(|r| r["event"] == "resume")
        .expect("resume marker");
    assert_eq!(all[marker]["step"], 30);
    let resumed: Vec<&Value> = all[marker + 1..].iter().collect();
    assert_eq!(resumed.len(), 30);
    for r in &resumed {
        let s = r["step"].as_u64().expect("step");
        assert_eq!(
            r["loss"], a_steps[&s]["loss"],
            "loss at step {s} differs from the uninterrupted run"
        );
        assert_eq!(
            r["samples_digest"], a_steps[&s]["samples_digest"],
            "samples at step {s}"
        );
    }
    // Bit-identical weights and optimizer state at the end.
    let (a, b) = (
        state(&a_ckpt.join("step-00000060")),
        state(&ckpt.join("step-00000060")),
    );
    for f in [checkpoint::MODEL_FILE, checkpoint::OPTIMIZER_FILE] {
        assert_eq!(a.files[f], b.files[f], "{f} differs after the resume");
    }
    assert_eq!(a.data_cursor, b.data_cursor);

    // The 2-worker checkpoint of step 30, resumed with 1 and with 4 workers:
    // the same samples in every step, the same losses within 1e-4.
    let from = a_ckpt.join("step-00000030");
    let from = from.to_str().expect("utf8");
    // (4 × micro-batch 16 would exceed the global batch of 32: the
    // micro-batch may change on resume, the global batch may not.)
    for (workers, micro) in [("1", "16"), ("4", "8")] {
        let d = tempfile::tempdir().expect("tmp");
        let micro = format!("train.micro_batch={micro}");
        ok(
            &[
                "--resume",
                from,
                "--workers",
                workers,
                "--local",
                "--set",
                &micro,
                "--run-dir",
                "runs/tiny",
            ],
            d.path(),
        );
        let m = steps(&d.path().join("runs/tiny"));
        assert_eq!(m.len(), 30, "{workers} workers");
        for (s, r) in &m {
            assert_eq!(r["workers"], workers.parse::<u64>().expect("n"));
            assert_eq!(
                r["samples_digest"], a_steps[s]["samples_digest"],
                "{workers} workers, step {s}"
            );
            let (x, y) = (
                r["loss"].as_f64().expect("loss"),
                a_steps[s]["loss"].as_f64().expect("loss"),
            );
            assert!(
                ((x - y) / y).abs() < 1e-4,
                "{workers} workers, step {s}: {x} vs {y}"
            );
        }
    }
}

/// `worker.weights_check_interval = 5`: the ranks hash their weights after
/// every 5th step and the last, and nowhere else; the checkpoint of step
/// 12 (after the unchecked step 11) still records the hash of the weights
/// it holds (rank 0's, from the snapshot), so resuming it passes the
/// ranks' weights check; losses and hashes agree with a run that checks
/// every step.
#[test]
fn weights_checked_every_k_steps_and_checkpoints_still_record_their_hash() {
    let _turn = crate::common::beside_others();
    let base = args(&[
        "--workers",
        "2",
        "--set",
        "train.max_steps=24",
        "--set",
        "checkpoint.interval=12",
    ]);
    let every = tempfile::tempdir().expect("tmp");
    ok(&base, every.path());
    let a = steps(&every.path().join("runs/tiny"));
    let sparse = tempfile::tempdir().expect("tmp");
    let mut k = base.clone();
    k.extend(["--set", "worker.weights_check_interval=5"]);
    ok(&k, sparse.path());
    let b = steps(&sparse.path().join("runs/tiny"));
    assert_eq!(b.len(), 24);
    for (s, r) in &b {
        assert_eq!(r["loss"], a[s]["loss"], "step {s}");
        if (s + 1) % 5 == 0 || s + 1 == 24 {
            assert_eq!(r["weights_hash"], a[s]["weights_hash"], "step {s}");
        } else {
            assert_eq!(r["weights_hash"], "", "step {s} was not to be checked");
        }
    }
    let ckpt = sparse.path().join("runs/tiny/checkpoints/step-00000012");
    assert_eq!(
        serde_json::json!(state(&ckpt).weights_hash),
        a[&11]["weights_hash"]
    );
    let resumed = tempfile::tempdir().expect("tmp");
    ok(
        &[
            "--resume",
            ckpt.to_str().expect("utf8"),
            "--local",
            "--run-dir",
            "runs/tiny",
        ],
        resumed.path(),
    );
    let c = steps(&resumed.path().join("runs/tiny"));
    assert_eq!(c[&23]["weights_hash"], a[&23]["weights_hash"]);
}

#[test]
fn strategy_a_extends_with_a_cosine_that_starts_where_the_run_stopped() {
    let _turn = crate::common::beside_others();
    let d = tempfile::tempdir().expect("tmp");
    let run_dir = d.path().join("runs/tiny");
    // Phase 1: warmup 30, then constant, to step 40; a checkpoint every 10.
    ok(
        &args(&[
            "--workers",
            "2",
            "--set",
            "train.max_steps=40",
            "--set",
            "train.warmup_steps=30",
            "--set",
            "checkpoint.interval=10",
            "--set",
            "checkpoint.keep_last=10",
        ]),
        d.path(),
    );
    let (peak, floor) = (3e-3, 3e-4);
    let p1 = steps(&run_dir);
    assert_eq!(lr_of(&p1, 35), peak);

    // Extend 40 → 70.
    let out = ok(
        &[
            "--resume",
            "runs/tiny/checkpoints/latest",
            "--extend-steps",
            "70",
            "--local",
        ],
        d.path(),
    );
    assert!(out.contains("max_steps 40 → 70"), "{out}");
    let m = steps(&run_dir);
    assert_eq!(lr_of(&m, 40), lr_of(&m, 39));
    for s in 40..70 {
        assert!(
            (lr_of(&m, s) - cosine(floor, peak, 40, 70, s)).abs() < 1e-9,
            "step {s}"
        );
    }
    let last = state(&d.path().join("runs/tiny/checkpoints/step-00000070"));
    assert_eq!(last.max_steps, 70);
    assert!((last.schedule.segments.last().expect("seg").lr_at(70) - floor).abs() < 1e-12);

    // An extension can be extended again, here with another cooldown
    // shape: 70 → 90, 1-sqrt from the LR in force.
    let lr69 = lr_of(&m, 69);
    let out = ok(
        &[
            "--resume",
            "runs/tiny/checkpoints/latest",
            "--extend-steps",
            "90",
            "--decay",
            "1-sqrt",
            "--local",
        ],
        d.path(),
    );
    assert!(out.contains("appended 1-sqrt segment"), "{out}");
    let m = steps(&run_dir);
    assert_eq!(lr_of(&m, 70), lr69);
    for s in 70..90 {
        let one_minus_sqrt = floor + (lr69 - floor) * (1.0 - ((s - 70) as f64 / 20.0).sqrt());
        assert!((lr_of(&m, s) - one_minus_sqrt).abs() < 1e-9, "step {s}");
    }

    // From the middle of warmup (step 20 of 30), into a separate folder.
    let lr19 = peak * 20.0 / 30.0;
    assert!((lr_of(&p1, 19) - lr19).abs() < 1e-12);
    ok(
        &[
            "--resume",
            "runs/tiny/checkpoints/step-00000020",
            "--extend-steps",
            "50",
            "--local",
            "--run-dir",
            "runs/mid",
        ],
        d.path(),
    );
    checkpoint::validate(&d.path().join("runs/mid/checkpoints/step-00000050"))
        .expect("the branch's checkpoints are in its own run directory");
    // A branch's metrics.jsonl begins with where it branched from.
    let first = std::fs::read_to_string(d.path().join("runs/mid/metrics.jsonl"))
        .expect("branch metrics")
        .lines()
        .next()
        .map(|l| serde_json::from_str::<Value>(l).expect("json"))
        .expect("a first line");
    assert_eq!(first["event"], "resume");
    assert_eq!(first["branched_from"], "runs/tiny");
    assert_eq!(first["step"], 20);
    let m = steps(&d.path().join("runs/mid"));
    assert_eq!(lr_of(&m, 20), lr19);
    for s in 20..50 {
        assert!(
            (lr_of(&m, s) - cosine(floor, lr19, 20, 50, s)).abs() < 1e-9,
            "step {s}"
        );
    }

    // N ≤ the resume step is refused, and nothing on disk changes; so is a
    // branch that would write into (and prune) the source run's folder
    // (possible only with an absolute checkpoint.dir), and a shorter end
    // in the run's own directory (it would overwrite its later
    // checkpoints: a branch is for that).
    let before = snapshot(&d.path().join("runs/tiny/checkpoints"));
    let source_folder = format!(
        "checkpoint.dir={}",
        d.path().join("runs/tiny/checkpoints").display()
    );
    refused(
        &[
            "--resume",
            "runs/tiny/checkpoints/step-00000020",
            "--extend-steps",
            "50",
            "--local",
            "--run-dir",
            "runs/careless",
            "--set",
            &source_folder,
        ],
        d.path(),
        &[
            "--run-dir runs/careless branches from",
            "prune its checkpoints",
            "relative checkpoint.dir",
        ],
    );
    assert!(!d.path().join("runs/careless").exists());
    refused(
        &[
            "--resume",
            "runs/tiny/checkpoints/step-00000020",
            "--extend-steps",
            "50",
            "--local",
        ],
        d.path(),
        &[
            "--extend-steps 50",
            "later checkpoints",
            "step-00000090",
            "--run-dir",
        ],
    );
    refused(
        &[
            "--resume",
            "runs/tiny/checkpoints/latest",
            "--extend-steps",
            "90",
            "--local",
        ],
        d.path(),
        &["--extend-steps 90", "greater than", "(90)"],
    );
    assert_eq!(before, snapshot(&d.path().join("runs/tiny/checkpoints")));
}

#[test]
fn strategy_b_and_the_refusals_that_point_to_it() {
    let _turn = crate::common::beside_others();
    let d = tempfile::tempdir().expect("tmp");
    ok(
        &args(&["--workers", "1", "--set", "train.max_steps=20"]),
        d.path(),
    );
    let best = d.path().join("runs/tiny/checkpoints/best");
    let best_state = state(&best);
    let best_s = best.to_str().expect("utf8");
    let before = snapshot(&d.path().join("runs/tiny/checkpoints"));

    // Strategy B: weights only, step 0, warmup again, a new folder.
    let out = ok(
        &[
            "--config",
            "tiny",
            "--workers",
            "1",
            "--local",
            "--init-from",
            best_s,
            "--run-dir",
            "runs/b",
            "--set",
            "train.max_steps=5",
            "--set",
            "train.warmup_steps=5",
        ],
        d.path(),
    );
    assert!(
        out.contains(&format!(
            "loaded the checkpoint's weights (hash {})",
            best_state.weights_hash
        )),
        "step 0 must start from the checkpoint's weights:\n{out}"
    );
    let m = steps(&d.path().join("runs/b"));
    assert_eq!(m.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    assert!(
        (lr_of(&m, 0) - 3e-3 / 5.0).abs() < 1e-15,
        "the warmup restarts"
    );
    // A fresh optimizer: the workers' own step count in optimizer.safetensors
    // is 5 (it would be 25 had the moments of the 20-step run come along),
    // and so is the coordinator's record.
    let b_dir = d.path().join("runs/b/checkpoints/step-00000005");
    let b = state(&b_dir);
    let tiny = stride_job::config::RawConfig::parse(
        stride_job::config::preset_text("tiny").expect("preset"),
        "tiny".into(),
        stride_job::config::ConfigSource::Embedded("tiny"),
    )
    .and_then(|r| r.resolve())
    .expect("tiny");
    let slots = stride_job::params::layout(&tiny.model);
    let (_, _, written_step) =
        checkpoint::read_optimizer(&b_dir, &slots).expect("optimizer.safetensors");
    assert_eq!(written_step, 5, "the optimizer restarted from step 0");
    assert_eq!(b.optimizer_step, written_step);

    // --config X --resume with a different schedule or optimiser: refused,
    // naming the keys and both strategies.
    refused(
        &["--config", "tiny", "--resume", best_s, "--local"],
        d.path(),
        &[
            "train.max_steps: checkpoint 20, now 400",
            "--init-from",
            "--extend-steps",
        ],
    );
    refused(
        &["--resume", best_s, "--local", "--set", "optim.beta2=0.99"],
        d.path(),
        &["optim.beta2", "--init-from", "--extend-steps"],
    );
    // A model of another shape cannot start from these weights.
    refused(
        &[
            "--config",
            "tiny",
            "--local",
            "--init-from",
            best_s,
            "--set",
            "model.n_embd=32",
            "--set",
            "checkpoint.dir=ckpt_c",
        ],
        d.path(),
        &["transformer.wte.weight: checkpoint [128, 64], model [128, 32]"],
    );
    // A fresh run into a folder that holds checkpoints would prune them.
    refused(
        &args(&["--workers", "1"]),
        d.path(),
        &["already holds checkpoints", "--resume"],
    );
    assert_eq!(
        before,
        snapshot(&d.path().join("runs/tiny/checkpoints")),
        "a refused start changed the checkpoints"
    );
}

#[test]
fn damaged_checkpoints_are_refused_or_skipped_never_touched() {
    let _turn = crate::common::beside_others();
    let d = tempfile::tempdir().expect("tmp");
    let good = twenty_steps(d.path(), "1");

    type Damage = fn(&Path);
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "no-complete",
            |p| std::fs::remove_file(p.join("COMPLETE")).expect("rm"),
            "incomplete",
        ),
        (
            "truncated-model",
            |p| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(p.join("model.safetensors"))
                    .expect("open");
                f.set_len(100).expect("truncate");
            },
            "model.safetensors does not match its sha256",
        ),
        (
            "modified-model",
            |p| {
                let mut bytes = std::fs::read(p.join("model.safetensors")).expect("read");
                let n = bytes.len();
                bytes[n - 1] ^= 0x40;
                std::fs::write(p.join("model.safetensors"), bytes).expect("write");
            },
            "does not match its sha256",
        ),
        (
            // One character of the data cursor: trained from silently
            // before train_state.json had a sum of its own (in COMPLETE).
            "edited-state",
            |p| {
                let t = std::fs::read_to_string(p.join("train_state.json")).expect("r");
                let edited = t.replacen("\"position\": ", "\"position\": 1", 1);
                assert_ne!(t, edited);
                std::fs::write(p.join("train_state.json"), edited).expect("w");
            },
            "train_state.json does not match its sha256",
        ),
        (
            "edited-weights-hash",
            |p| {
                let t = std::fs::read_to_string(p.join("train_state.json")).expect("r");
                let edited = t.replacen("\"weights_hash\": \"", "\"weights_hash\": \"0", 1);
                assert_ne!(t, edited);
                std::fs::write(p.join("train_state.json"), edited).expect("w");
            },
            "train_state.json does not match its sha256",
        ),
        (
            "bad-state",
            |p| {
                rewrite_state(p, |_| "{\"format_version\": 2,".into());
            },
            "not valid JSON",
        ),
        (
            "future-version",
            |p| {
                rewrite_state(p, |t| {
                    t.replace("\"format_version\": 2", "\"format_version\": 7")
                })
            },
            "format version 7 is newer",
        ),
    ];
    // Each case damages a copy of the whole run directory (a resume writes
    // into the run directory its checkpoint belongs to).
    let good_run = good.parent().expect("run dir").to_path_buf();
    for (name, damage, want) in cases {
        let run = d.path().join("runs").join(name);
        copy_folder(&good_run, &run);
        let folder = run.join("checkpoints");
        damage(&folder.join("step-00000020"));
        let before = snapshot(&folder);
        let explicit = folder.join("step-00000020");
        refused(
            &["--resume", explicit.to_str().expect("utf8"), "--local"],
            d.path(),
            &[&explicit.display().to_string(), want],
        );
        assert_eq!(
            before,
            snapshot(&folder),
            "{name}: a failed resume changed the folder"
        );
    }

    // `latest` of an edited state falls back to the checkpoint before it
    // (it used to train from the edit, or fail with exit 1 for an edited
    // weights hash).
    for name in ["edited-state", "edited-weights-hash"] {
        let out = ok(
            &[
                "--resume",
                &format!("runs/{name}/checkpoints/latest"),
                "--local",
            ],
            d.path(),
        );
        assert!(
            out.contains("train_state.json does not match its sha256")
                && out.contains("falling back to")
                && out.contains("at step 10"),
            "{name}: {out}"
        );
    }

    // `latest` (and a folder) fall back to the newest valid checkpoint,
    // saying what was skipped; the damaged directory is kept.
    let folder = d.path().join("runs/no-complete/checkpoints");
    let out = ok(
        &["--resume", "runs/no-complete/checkpoints/latest", "--local"],
        d.path(),
    );
    assert!(
        out.contains("`latest` is not usable") && out.contains("falling back to"),
        "{out}"
    );
    assert!(out.contains("at step 10"), "{out}");
    let kept = std::fs::read_dir(&folder).expect("ls").flatten().any(|e| {
        e.file_name()
            .to_string_lossy()
            .starts_with(".superseded-step-00000020")
    });
    assert!(
        kept,
        "the incomplete step-20 must be moved aside, not deleted"
    );
}

/// A resume hashes the checkpoint's two large files while the workers load
/// them, and no step runs before they check out. When they do not, the
/// job never trains from it: an explicit checkpoint fails with the
/// checksum error (exit code 2) and adds nothing to the run's metrics;
/// `latest` starts from the checkpoint before it, with the same workers —
/// also when the damage makes the workers' load fail (a truncated file) —
/// and the damaged directory is kept. Each case runs twice: as it comes
/// (on `tiny` the check ends before the workers join), and with the check
/// held back 3 s (a test hook), so that the ranks have loaded the
/// damaged files — or failed to — before the verdict.
#[test]
fn a_checkpoint_damaged_past_its_first_check_is_never_trained_from() {
    let _turn = crate::common::beside_others();
    let d = tempfile::tempdir().expect("tmp");
    let good = twenty_steps(d.path(), "2");
    type Damage = fn(&Path);
    let cases: [(&str, Damage); 2] = [
        ("flipped", |p| {
            let mut bytes = std::fs::read(p).expect("read");
            let n = bytes.len();
            bytes[n - 1] ^= 0x40;
            std::fs::write(p, bytes).expect("write");
        }),
        ("truncated", |p| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .expect("open");
            let n = f.metadata().expect("len").len();
            f.set_len(n - 4096).expect("truncate");
        }),
    ];
    let good_run = good.parent().expect("run dir").to_path_buf();
    for ((name, damage), delay) in cases.into_iter().flat_map(|c| [(c, "0"), (c, "3")]) {
        let name = &format!("{name}-{delay}");
        // A copy of the whole run: the resume continues in it.
        let tiny = d.path().join("runs").join(name);
        copy_folder(&good_run, &tiny);
        let folder = tiny.join("checkpoints");
        let model = folder.join("step-00000020").join(checkpoint::MODEL_FILE);
        damage(&model);
        let damaged = std::fs::read(&model).expect("read");
        let before = snapshot(&folder);
        let resume = |path: &str| {
            let args = ["--resume", path, "--extend-steps", "30", "--local"];
            let env = [(Hook::DelayCheckS.var(), delay)];
            let mut p = spawn_env("coordinator", &args, d.path(), "coordinator.out", &env);
            let status = p.wait(LIMIT);
            let out = std::fs::read_to_string(d.path().join("coordinator.out")).unwrap_or_default();
            (status, out)
        };

        // Explicit: the checksum error, nothing written anywhere.
        let explicit = folder.join("step-00000020");
        let explicit = explicit.to_str().expect("utf8");
        let seen = metrics(&tiny).len();
        let (status, out) = resume(explicit);
        assert_eq!(status.code(), Some(2), "{name}: must fail with 2:\n{out}");
        // Found while the workers loaded it, not before they started.
        for needle in [
            explicit,
            "model.safetensors does not match its sha256",
            "starting 2 local workers",
        ] {
            assert!(out.contains(needle), "{name}: lacks `{needle}`:\n{out}");
        }
        assert_eq!(before, snapshot(&folder), "{name}: the folder changed");
        assert_eq!(
            metrics(&tiny).len(),
            seen,
            "{name}: a resume that never ran wrote metrics"
        );

        // `latest`: from step 10, extended as asked, with the same workers.
        let (status, out) = resume(&format!("runs/{name}/checkpoints/latest"));
        assert!(status.success(), "{name}: failed:\n{out}");
        for needle in [
            "model.safetensors does not match its sha256",
            "no step ran from it",
            "falling back to",
        ] {
            assert!(out.contains(needle), "{name}: lacks `{needle}`:\n{out}");
        }
        let lines = metrics(&tiny).split_off(seen);
        let markers: Vec<u64> = lines
            .iter()
            .filter(|r| r["event"] == "resume")
            .map(|r| r["step"].as_u64().expect("step"))
            .collect();
        assert_eq!(markers, vec![10], "{name}: one resume, from step 10");
        let ran: Vec<u64> = lines
            .iter()
            .filter(|r| r.get("loss").is_some())
            .map(|r| r["step"].as_u64().expect("step"))
            .collect();
        assert_eq!(ran, (10..30).collect::<Vec<_>>(), "{name}: steps 10..30");
        // Step 20 is written again; the damaged one is moved aside.
        let aside = std::fs::read_dir(&folder)
            .expect("ls")
            .flatten()
            .find(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".superseded-step-00000020")
            })
            .expect("the damaged step-20 is kept aside");
        assert_eq!(
            std::fs::read(aside.path().join(checkpoint::MODEL_FILE)).expect("read"),
            damaged,
            "{name}: the damaged file is kept as it was"
        );
    }
}

#[test]
fn model_safetensors_has_the_names_and_shapes_of_a_nanogpt_gpt() {
    let _turn = crate::common::beside_others();
    let d = tempfile::tempdir().expect("tmp");
    ok(
        &args(&[
            "--workers",
            "1",
            "--set",
            "train.max_steps=2",
            "--set",
            "train.warmup_steps=1",
        ]),
        d.path(),
    );
    let shapes = checkpoint::tensor_shapes(
        &d.path()
            .join("runs/tiny/checkpoints/latest/model.safetensors"),
    )
    .expect("header");
    // nanoGPT's GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64,
    // vocab_size=128, bias=True)).state_dict(), without the tied lm_head.
    let (c, v, t) = (64usize, 128usize, 64usize);
    let mut want: BTreeMap<String, Vec<usize>> = BTreeMap::from([
        ("transformer.wte.weight".into(), vec![v, c]),
        ("transformer.wpe.weight".into(), vec![t, c]),
        ("transformer.ln_f.weight".into(), vec![c]),
        ("transformer.ln_f.bias".into(), vec![c]),
    ]);
    for i in 0..2 {
        for (k, s) in [
            ("ln_1.weight", vec![c]),
            ("ln_1.bias", vec![c]),
            ("attn.c_attn.weight", vec![3 * c, c]),
            ("attn.c_attn.bias", vec![3 * c]),
            ("attn.c_proj.weight", vec![c, c]),
            ("attn.c_proj.bias", vec![c]),
            ("ln_2.weight", vec![c]),
            ("ln_2.bias", vec![c]),
            ("mlp.c_fc.weight", vec![4 * c, c]),
            ("mlp.c_fc.bias", vec![4 * c]),
            ("mlp.c_proj.weight", vec![c, 4 * c]),
            ("mlp.c_proj.bias", vec![c]),
        ] {
            want.insert(format!("transformer.h.{i}.{k}"), s);
        }
    }
    assert_eq!(shapes, want);
}

/// A checkpoint records the fingerprint (length and xxh3) of the data it
/// was trained on. A resume on other data — truncated, another file of the
/// same size, one token changed — is refused with both fingerprints and
/// changes nothing; with `--data-changed` it goes on, on the new data,
/// from the start of the next epoch.
#[test]
fn a_resume_on_other_data_is_refused_unless_declared() {
    let _turn = crate::common::beside_others();
    let d = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(d.path().join("data")).expect("mkdir");
    let train = d.path().join("data/train.bin");
    let tokens: Vec<u16> = (0..40_000u32).map(|i| (i * 7 % 128) as u16).collect();
    stride_job::tokens::write_nanogpt(&train, &tokens).expect("write");
    let data = ["--set", "data.train=data/train.bin"];
    let mut first = args(&["--workers", "1", "--set", "train.max_steps=20"]);
    first.extend_from_slice(&["--set", "checkpoint.interval=10"]);
    first.extend_from_slice(&data);
    ok(&first, d.path());
    let folder = d.path().join("runs/tiny/checkpoints");
    let recorded = state(&folder.join("step-00000010")).data;
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    assert_eq!(recorded[0].tokens, 36_000);
    let resume = ["--resume", "runs/tiny/checkpoints/step-00000010", "--local"];
    type Change = fn(&mut Vec<u16>);
    let changes: [(&str, Change); 3] = [
        ("truncated", |t| t.truncate(30_000)),
        ("same size, other tokens", |t| {
            for x in t.iter_mut() {
                *x = (*x + 1) % 128;
            }
        }),
        ("one token changed", |t| t[123] ^= 1),
    ];
    let before = snapshot(&folder);
    for (what, change) in changes {
        let mut changed = tokens.clone();
        change(&mut changed);
        stride_job::tokens::write_nanogpt(&train, &changed).expect("write");
        refused(
            &resume,
            d.path(),
            &[
                "the data differs from the data the checkpoint was trained on",
                &format!(
                    "train: data/train.bin (first 36000 tokens): 36000 tokens, xxh3 {}",
                    recorded[0].xxh3
                ),
                "(checkpoint) →",
                "--data-changed",
            ],
        );
        assert_eq!(before, snapshot(&folder), "{what}: the folder changed");
    }
    // Declared: the run goes on from the start of the checkpoint's next
    // epoch, on the data as it is now.
    let mut declared = resume.to_vec();
    declared.push("--data-changed");
    let out = ok(&declared, d.path());
    assert!(out.contains("--data-changed: the data differs"), "{out}");
    let epoch_then = state(&folder.join("step-00000010")).data_cursor.epoch;
    let m = steps(&d.path().join("runs/tiny"));
    assert_eq!(m[&10]["epoch"].as_u64(), Some(epoch_then + 1), "{out}");
    let marker = metrics(&d.path().join("runs/tiny"))
        .into_iter()
        .rfind(|r| r["event"] == "resume")
        .expect("a resume marker");
    assert!(marker["data_changed"].as_str().is_some(), "{marker}");
}

/// A run directory holds everything its run writes (SPEC §1): a resume
/// continues in the run directory its checkpoint is in — wherever the run
/// was copied or moved — and never writes into the original; a branch
/// (`--run-dir B`) reads A and writes only B; `--resume RUN_DIR` takes the
/// run's latest checkpoint; a checkpoint of the old layout (format 1,
/// `checkpoint.dir` relative to the current directory, beside the run
/// directory) still resumes, saying where new checkpoints go.
#[test]
fn a_run_directory_holds_its_run_wherever_it_is_copied_or_moved() {
    let _turn = crate::common::beside_others();
    let d = tempfile::tempdir().expect("tmp");
    let runs = d.path().join("runs");
    ok(
        &args(&[
            "--workers",
            "1",
            "--set",
            "train.max_steps=20",
            "--set",
            "checkpoint.interval=10",
            "--run-dir",
            "runs/live",
        ]),
        d.path(),
    );
    let original = snapshot(&runs.join("live"));
    let extend = |from: &str, n: &str, extra: &[&str]| {
        let mut a = vec!["--resume", from, "--extend-steps", n, "--local"];
        a.extend_from_slice(extra);
        ok(&a, d.path())
    };

    // A copy resumes into itself.
    copy_folder(&runs.join("live"), &runs.join("livecopy"));
    let out = extend("runs/livecopy/checkpoints/latest", "30", &[]);
    assert!(out.contains("run directory runs/livecopy"), "{out}");
    state(&runs.join("livecopy/checkpoints/step-00000030"));
    assert_eq!(
        original,
        snapshot(&runs.join("live")),
        "the original changed"
    );

    // A moved run resumes where it is now; its old name is not recreated.
    std::fs::rename(runs.join("livecopy"), runs.join("moved")).expect("mv");
    let out = extend("runs/moved/checkpoints/latest", "40", &[]);
    assert!(out.contains("run directory runs/moved"), "{out}");
    state(&runs.join("moved/checkpoints/step-00000040"));
    assert!(!runs.join("livecopy").exists(), "the old name came back");

    // `--resume RUN_DIR`: its latest checkpoint.
    let out = extend("runs/moved", "50", &[]);
    assert!(out.contains("at step 40"), "{out}");
    state(&runs.join("moved/checkpoints/step-00000050"));

    // A branch reads the source and writes only its own run directory.
    let out = extend(
        "runs/live/checkpoints/step-00000010",
        "25",
        &["--run-dir", "runs/branch"],
    );
    assert!(out.contains("run directory runs/branch"), "{out}");
    state(&runs.join("branch/checkpoints/step-00000025"));
    assert_eq!(original, snapshot(&runs.join("live")), "the source changed");

    // The old layout: checkpoints in ./old/checkpoints, run dir runs/old.
    let old = d.path().join("old/checkpoints");
    std::fs::create_dir_all(d.path().join("old")).expect("mkdir");
    copy_folder(&runs.join("live/checkpoints"), &old);
    let step = old.join("step-00000020");
    let config = step.join(checkpoint::CONFIG_FILE);
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("dir = \"checkpoints\"", "dir = \"old/checkpoints\""),
    )
    .expect("w");
    let mut st: checkpoint::TrainState = serde_json::from_str(
        &std::fs::read_to_string(step.join(checkpoint::STATE_FILE)).expect("state"),
    )
    .expect("json");
    st.format_version = 1;
    st.run_dir = "runs/old".into();
    st.data.clear();
    st.files.insert(
        checkpoint::CONFIG_FILE.into(),
        checkpoint::sha256_file(&config).expect("sha"),
    );
    std::fs::write(
        step.join(checkpoint::STATE_FILE),
        serde_json::to_string_pretty(&st).expect("json"),
    )
    .expect("w");
    std::fs::write(step.join(checkpoint::COMPLETE_FILE), "").expect("w");
    let out = extend("old/checkpoints/step-00000020", "30", &[]);
    assert!(
        out.contains("checkpoint format 1")
            && out.contains("kept checkpoints outside the run directory; new checkpoints go to runs/old/checkpoints"),
        "{out}"
    );
    state(&runs.join("old/checkpoints/step-00000030"));
}

/// A checkpoint is something you can talk to and take elsewhere: `worker
/// sample` continues a prompt with the model the workers trained (the same
/// tokens for the same seed), and `coordinator export --format hf` writes a
/// folder with Hugging Face GPT-2's names and Conv1D layout.
#[test]
fn a_checkpoint_can_be_sampled_and_exported() {
    let _turn = crate::common::beside_others();
    let d = tempfile::tempdir().expect("tmp");
    ok(
        &args(&["--workers", "1", "--set", "train.max_steps=20"]),
        d.path(),
    );
    let sample = |extra: &[&str]| {
        let mut a = vec!["sample", "--checkpoint", "runs/tiny", "--tokens", "8"];
        a.extend_from_slice(extra);
        let out = std::process::Command::new(crate::common::bin("worker"))
            .args(&a)
            .current_dir(d.path())
            .output()
            .expect("worker sample");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, greedy, err) = sample(&["--prompt-ids", "1,2,3", "--temperature", "0"]);
    assert_eq!(code, Some(0), "{err}");
    let ids: Vec<u32> = greedy
        .split(',')
        .map(|t| t.parse().expect("a token id"))
        .collect();
    assert!(ids.len() == 8 && ids.iter().all(|t| *t < 128), "{greedy}");
    assert_eq!(
        sample(&["--prompt-ids", "1,2,3", "--temperature", "0"]).1,
        greedy
    );
    let drawn = sample(&["--prompt-ids", "1,2,3", "--seed", "7"]).1;
    assert_eq!(sample(&["--prompt-ids", "1,2,3", "--seed", "7"]).1, drawn);
    let (code, _, err) = sample(&["--prompt", "hello"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not GPT-2's"), "{err}");

    let export = |extra: &[&str]| {
        let mut a = vec![
            "export",
            "--checkpoint",
            "runs/tiny",
            "--format",
            "hf",
            "--out",
            "hf",
        ];
        a.extend_from_slice(extra);
        run(&a, d.path(), LIMIT)
    };
    let (status, out) = export(&[]);
    assert!(status.success(), "{out}");
    let shapes = checkpoint::tensor_shapes(&d.path().join("hf/model.safetensors")).expect("read");
    assert_eq!(shapes["transformer.h.0.attn.c_attn.weight"], vec![64, 192]);
    assert_eq!(shapes["transformer.h.1.mlp.c_proj.weight"], vec![256, 64]);
    assert_eq!(shapes["transformer.wte.weight"], vec![128, 64]);
    assert!(!shapes.contains_key("lm_head.weight"));
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("hf/config.json")).expect("config.json"),
    )
    .expect("json");
    assert_eq!(config["model_type"], "gpt2");
    assert_eq!(config["n_layer"], 2);
    let (status, out) = export(&[]);
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("--force"), "{out}");
}

/// A job that shards its optimizer state (ZeRO-1: every rank writes its
/// shard's part of both files, the coordinator hashes them) leaves
/// checkpoints byte for byte those of the same job with the state whole,
/// which record the same sums and weights hash; the sharded job's
/// checkpoint resumes on one worker (nothing to shard) to the same losses
/// as the whole job's.
#[test]
fn a_sharded_jobs_checkpoints_are_the_whole_jobs_byte_for_byte() {
    let _turn = crate::common::beside_others();
    let (sharded, whole) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let run = |dir: &Path, shard: &str| {
        let set = format!("train.shard_optimizer={shard}");
        let out = ok(
            &args(&[
                "--workers",
                "2",
                "--set",
                "train.max_steps=20",
                "--set",
                "checkpoint.interval=10",
                "--set",
                &set,
            ]),
            dir,
        );
        dir.join("runs/tiny/checkpoints")
            .join(checkpoint::step_dir_name(20))
            .canonicalize()
            .unwrap_or_else(|e| panic!("no step 20 ({e}):\n{out}"))
    };
    let (a, b) = (run(sharded.path(), "true"), run(whole.path(), "false"));
    for step in [10, 20] {
        let dir = |root: &Path| {
            root.join("runs/tiny/checkpoints")
                .join(checkpoint::step_dir_name(step))
        };
        for file in [checkpoint::MODEL_FILE, checkpoint::OPTIMIZER_FILE] {
            let read = |root: &Path| std::fs::read(dir(root).join(file)).expect("read");
            assert!(
                read(sharded.path()) == read(whole.path()),
                "step {step}: {file} differs between the sharded and the whole job"
            );
        }
        let (sa, sb) = (state(&dir(sharded.path())), state(&dir(whole.path())));
        for file in [checkpoint::MODEL_FILE, checkpoint::OPTIMIZER_FILE] {
            assert_eq!(
                sa.files[file], sb.files[file],
                "step {step}: {file}'s recorded sum"
            );
        }
        assert_eq!(
            sa.weights_hash, sb.weights_hash,
            "step {step}: the weights hash"
        );
        assert!(!sa.weights_hash.is_empty());
    }
    assert_eq!(steps(&sharded.path().join("runs/tiny")).len(), 20);
    // Both resume on one worker to the same next losses.
    let resume = |root: &Path| {
        let ckpt = root
            .join("runs/tiny/checkpoints")
            .join(checkpoint::step_dir_name(10));
        let to = tempfile::tempdir().expect("tmp");
        ok(
            &[
                "--resume",
                ckpt.to_str().expect("utf8"),
                "--local",
                "--workers",
                "1",
                "--run-dir",
                "runs/tiny",
            ],
            to.path(),
        );
        steps(&to.path().join("runs/tiny"))
    };
    let (ra, rb) = (resume(sharded.path()), resume(whole.path()));
    for s in 10..20 {
        assert_eq!(ra[&s]["loss"], rb[&s]["loss"], "step {s}");
        assert_eq!(ra[&s]["weights_hash"], rb[&s]["weights_hash"], "step {s}");
    }
    assert_ne!(a, b);
}
