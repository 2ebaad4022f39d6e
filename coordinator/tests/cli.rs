//! The coordinator's offline commands, run as a user runs them: `plan`,
//! `inspect-data`, `prepare`, and their errors.
//!
//! An integration test of this package (not a module of the suite in
//! `tests/`) because it is what makes `cargo test --workspace` build the
//! coordinator's binaries, which the suite runs.

use std::path::Path;
use std::process::{Command, Output};

use stride_job::tokens::{Tokens, write_llmc, write_nanogpt};

fn coordinator(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .output()
        .expect("coordinator runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}

#[test]
fn inspect_data_prints_the_seed_corpus_figures() {
    // SPEC §2: 991,386 tokens at context 1024 → 990,362 samples at stride 1
    // and 968 at stride 1024. Both file formats must give the same answer.
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens: Vec<u16> = (0..991_386u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) % 50_257) as u16)
        .collect();
    let raw = dir.path().join("seed.bin");
    let llmc = dir.path().join("seed_llmc.bin");
    write_nanogpt(&raw, &tokens).expect("write");
    write_llmc(&llmc, &tokens).expect("write");
    for file in [&raw, &llmc] {
        let f = file.to_str().expect("utf8");
        let o = coordinator(
            &[
                "inspect-data",
                "--data",
                f,
                "--context",
                "1024",
                "--stride",
                "1",
                "--json",
            ],
            dir.path(),
        );
        let j = json(&o);
        assert_eq!(j["tokens"], 991_386);
        assert_eq!(j["samples"], 990_362);
        assert_eq!(j["context"], 1024);
        assert_eq!(j["stride"], 1);
        assert!((j["overlap"].as_f64().expect("f64") - 1023.0 / 1024.0).abs() < 1e-12);
        assert_eq!(j["tokens_per_epoch"], 990_362u64 * 1024);
        let views = j["views_per_token"].as_f64().expect("f64");
        assert!((views - 1023.0).abs() < 1.0, "{views}");
        assert!(
            stderr(&o).contains("overlap"),
            "stride < context must warn: {}",
            stderr(&o)
        );

        let o = coordinator(
            &[
                "inspect-data",
                "--data",
                f,
                "--context",
                "1024",
                "--stride",
                "1024",
            ],
            dir.path(),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let text = stdout(&o);
        assert!(text.contains("samples           968"), "{text}");
        assert!(text.contains("991,386"), "{text}");
        assert!(text.contains("121.00 at global batch 8"), "{text}");
        assert!(!text.contains("warning"), "{text}");
        let o = coordinator(&["inspect-data", "--data", f, "--stride", "1"], dir.path());
        assert!(stdout(&o).contains("990,362"), "{}", stdout(&o));
    }
}

#[test]
fn inspect_data_rejects_bad_files_without_touching_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: &[(&str, &[u8], &str)] = &[
        ("empty.bin", b"", "the file is empty"),
        ("odd.bin", &[1, 2, 3], "odd length"),
    ];
    for (name, bytes, want) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).expect("write");
        let o = coordinator(&["inspect-data", "--data", name], dir.path());
        assert_eq!(o.status.code(), Some(2), "{name}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(name) && stderr(&o).contains(want),
            "{name}: {}",
            stderr(&o)
        );
        assert_eq!(std::fs::read(&p).expect("read"), *bytes);
    }
    let o = coordinator(&["inspect-data", "--data", "absent.bin"], dir.path());
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("absent.bin"), "{}", stderr(&o));
}

#[test]
fn plan_json_has_the_spec_fields_and_the_h100_1k_schedule() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = json(&coordinator(
        &["plan", "--config", "h100_1k", "--json"],
        dir.path(),
    ));
    assert_eq!(j["config"]["train"]["max_steps"], 1000);
    assert_eq!(j["config"]["model"]["vocab_size"], 50_304);
    let segs = j["schedule"].as_array().expect("segments");
    assert_eq!(segs.len(), 2);
    assert_eq!(segs[0]["kind"], "linear_warmup");
    assert_eq!(segs[0]["end_step"], 100);
    assert_eq!(segs[1]["kind"], "constant");
    assert_eq!(segs[1]["start_lr"], 1e-3);
    // No data on this machine: the plan still prints, and says why the
    // epoch figures are missing.
    assert!(j["epoch"].is_null());
    assert!(
        j["epoch_note"]
            .as_str()
            .expect("note")
            .contains("data/train.bin")
    );

    let j = json(&coordinator(
        &[
            "plan",
            "--config",
            "h100_1k",
            "--extend-steps",
            "10000",
            "--json",
        ],
        dir.path(),
    ));
    let segs = j["schedule"].as_array().expect("segments");
    assert_eq!(segs.len(), 3);
    assert_eq!(segs[2]["kind"], "cosine");
    assert_eq!(
        (segs[2]["start_step"].as_u64(), segs[2]["end_step"].as_u64()),
        (Some(1000), Some(10_000))
    );
    assert_eq!(segs[2]["start_lr"], 1e-3);
    assert!((segs[2]["end_lr"].as_f64().expect("f64") - 1e-4).abs() < 1e-18);
    // The schedule is the one source of the run's length; the config's
    // max_steps stays the value that seeded the first schedule.
    assert_eq!(
        j["schedule"]
            .as_array()
            .and_then(|s| s.last())
            .map(|s| s["end_step"].clone()),
        Some(10_000.into())
    );
    assert_eq!(j["config"]["train"]["max_steps"], 1000);
    assert_eq!(j["extension"]["shape"], "cosine");
    let text = stdout(&coordinator(
        &["plan", "--config", "h100_1k", "--extend-steps", "10000"],
        dir.path(),
    ));
    assert!(text.contains("max_steps 1000 → 10000"), "{text}");
    assert!(text.contains("LR schedule (10000 steps)"), "{text}");
}

/// `plan` reports what an evaluation reads: disjoint windows whatever the
/// training stride, a subset spread over the split, its cost in steps,
/// and the clamp when more windows are asked for than exist.
#[test]
fn plan_reports_the_validation_windows_of_an_evaluation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let j = |sets: &[&str]| {
        let mut args = vec!["plan", "--config", "tiny", "--json"];
        for s in sets {
            args.extend(["--set", s]);
        }
        json(&coordinator(&args, dir.path()))["validation"].clone()
    };
    // tiny: 40,000 validation tokens = 624 windows of 65 at stride 64.
    let all = j(&[]);
    assert_eq!(all["windows"], 624);
    assert_eq!(all["per_evaluation"], 624);
    assert_eq!(all["tokens_per_evaluation"], 624 * 64);
    assert_eq!(
        j(&["data.stride=1"]),
        all,
        "the training stride changes nothing"
    );
    let some = j(&["train.eval_batches=2"]);
    assert_eq!(some["per_evaluation"], 64);
    assert!((some["step_equivalents"].as_f64().expect("f64") - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(j(&["data.val_stride=1"])["windows"], 40_000 - 64);

    let text = coordinator(
        &[
            "plan",
            "--config",
            "tiny",
            "--set",
            "train.eval_batches=100",
        ],
        dir.path(),
    );
    let out = String::from_utf8_lossy(&text.stdout);
    assert!(
        out.contains("Validation: 624 windows (val_stride 64)"),
        "{out}"
    );
    assert!(
        out.contains("warning: train.eval_batches × train.global_batch = 3200 windows, but the validation split has 624"),
        "{out}"
    );
}

#[test]
fn plan_batches_on_real_data_are_an_epoch_permutation() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 968 samples of 1024 at stride 1024: the seed corpus shape.
    let tokens: Vec<u16> = (0..991_386u32).map(|i| (i % 50_000) as u16).collect();
    std::fs::create_dir(dir.path().join("data")).expect("mkdir");
    write_nanogpt(&dir.path().join("data/train.bin"), &tokens).expect("write");
    write_nanogpt(&dir.path().join("data/val.bin"), &tokens[..10_000]).expect("write");
    let j = json(&coordinator(
        &["plan", "--config", "h100_1k", "--batches", "121", "--json"],
        dir.path(),
    ));
    assert_eq!(j["epoch"]["samples"], 968);
    assert_eq!(j["epoch"]["global_batch"], 8);
    assert_eq!(j["epoch"]["steps_per_epoch"], 121.0);
    let mut all: Vec<u64> = j["batches"]
        .as_array()
        .expect("batches")
        .iter()
        .flat_map(|b| {
            b.as_array()
                .expect("batch")
                .iter()
                .map(|x| x.as_u64().expect("index"))
        })
        .collect();
    assert_eq!(all.len(), 968);
    all.sort_unstable();
    assert_eq!(
        all,
        (0..968).collect::<Vec<_>>(),
        "121 steps of 8 read each sample exactly once"
    );
}

#[test]
fn bad_configs_exit_2_naming_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("typo.toml"), "[train]\nmax_step = 10\n").expect("write");
    std::fs::write(
        dir.path().join("warm.toml"),
        "[train]\nmax_steps = 10\nwarmup_steps = 50\n",
    )
    .expect("write");
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["plan", "--config", "typo.toml"],
            &[
                "typo.toml",
                "train.max_step",
                "did you mean `train.max_steps`",
            ],
        ),
        (
            &["plan", "--config", "warm.toml"],
            &["warm.toml", "train.warmup_steps", "max_steps = 10"],
        ),
        (
            &["plan", "--config", "nosuch"],
            &["`nosuch` not found", "tiny"],
        ),
        (
            &["plan", "--set", "data.stride=0"],
            &["--set data.stride=0", "data.stride"],
        ),
        (
            &["plan", "--set", "train.lr=fast"],
            &["train.lr", "wrong type"],
        ),
        (
            &["plan", "--config", "tiny", "--workers", "3"],
            &["train.global_batch", "3 × 16"],
        ),
        (
            &["plan", "--config", "tiny", "--workers", "0"],
            &["--workers 0", "cluster.workers"],
        ),
        (
            &["plan", "--config", "h100_1k", "--extend-steps", "1000"],
            &["--extend-steps 1000", "greater than"],
        ),
    ];
    for (args, needles) in cases {
        let o = coordinator(args, dir.path());
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        for n in *needles {
            assert!(err.contains(n), "{args:?}: `{err}` lacks `{n}`");
        }
        assert_eq!(err.matches("error:").count(), 1, "one error line: {err}");
    }
}

#[test]
fn a_config_file_in_configs_wins_over_the_preset() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("configs")).expect("mkdir");
    std::fs::write(
        dir.path().join("configs/tiny.toml"),
        "[train]\nmax_steps = 7\nwarmup_steps = 0\n",
    )
    .expect("write");
    let j = json(&coordinator(
        &["plan", "--config", "tiny", "--json"],
        dir.path(),
    ));
    assert_eq!(j["config"]["train"]["max_steps"], 7);
}

#[test]
fn prepare_round_trips_english_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A real English text from the machine (Debian ships the GPL), else one
    // written here; plus non-ASCII to exercise byte-level BPE.
    let gpl = Path::new("/usr/share/common-licenses/GPL-3");
    let mut text = std::fs::read_to_string(gpl).unwrap_or_else(|_| {
        "It was the best of times, it was the worst of times, it was the age of wisdom.\n"
            .repeat(500)
    });
    text.push_str("Naïve café — “quotes”, emoji 🚀, 日本語.\n");
    let a = dir.path().join("a.txt");
    let b = dir.path().join("b.txt");
    std::fs::write(&a, &text).expect("write");
    std::fs::write(&b, "A second, short document.\n").expect("write");
    let out = dir.path().join("data");
    let o = coordinator(
        &[
            "prepare",
            "--input",
            "a.txt",
            "b.txt",
            "--out",
            "data",
            "--val-fraction",
            "0.1",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));

    let train = Tokens::open(&out.join("train.bin")).expect("train.bin");
    let val = Tokens::open(&out.join("val.bin")).expect("val.bin");
    let total = train.len() + val.len();
    assert!(!val.is_empty() && (val.len() as f64 / total as f64 - 0.1).abs() < 0.01);
    let all: Vec<u32> = (0..train.len())
        .map(|i| train.get(i))
        .chain((0..val.len()).map(|i| val.get(i)))
        .map(u32::from)
        .collect();
    let bpe = tiktoken_rs::r50k_base().expect("tokenizer");
    let docs: Vec<&[u32]> = all
        .split(|&t| t == 50_256)
        .filter(|d| !d.is_empty())
        .collect();
    assert_eq!(docs.len(), 2);
    assert_eq!(bpe.decode(docs[0]).expect("decode"), text);
    assert_eq!(
        bpe.decode(docs[1]).expect("decode"),
        "A second, short document.\n"
    );

    // A second run must not overwrite without --force.
    let before = std::fs::read(out.join("train.bin")).expect("read");
    let o = coordinator(
        &["prepare", "--input", "b.txt", "--out", "data"],
        dir.path(),
    );
    assert!(
        !o.status.success() && stderr(&o).contains("--force"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(out.join("train.bin")).expect("read"), before);

    // Not UTF-8: a clear error naming the file.
    std::fs::write(dir.path().join("latin1.txt"), b"caf\xe9\n").expect("write");
    let o = coordinator(
        &["prepare", "--input", "latin1.txt", "--out", "other"],
        dir.path(),
    );
    assert!(
        stderr(&o).contains("latin1.txt") && stderr(&o).contains("not UTF-8"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.path().join("other/train.bin").exists());
}
