use sha2::{Digest, Sha256};

use super::*;
use crate::config::TrainConfig;
use crate::names::hex;

fn state(step: u64) -> TrainState {
    TrainState {
        format_version: FORMAT_VERSION,
        stride_version: "test".into(),
        step,
        max_steps: 100,
        schedule: Schedule::from_config(&TrainConfig::default()),
        data_cursor: DataCursor {
            epoch: 1,
            position: 7,
        },
        rng: RngState {
            seed: 1,
            algorithm: "chacha8".into(),
        },
        world_size: 2,
        config_name: "t".into(),
        config_hash: "h".into(),
        run_dir: "runs/t".into(),
        weights_hash: "00".into(),
        optimizer_step: step,
        metrics: MetricsSoFar::default(),
        history: vec![],
        data: vec![Fingerprint::new("train", "t.bin", 1000, 42)],
        files: BTreeMap::new(),
    }
}

/// Writes a complete checkpoint of `step` into `folder`.
fn make(folder: &Path, step: u64) -> PathBuf {
    let tmp = temp_dir(folder, step, "t").expect("tmp");
    let w = [1.0f32, 2.0, 3.0];
    let mut s = state(step);
    let m = write_tensors(
        &tmp.join(MODEL_FILE),
        &[("a.weight".into(), vec![3], &w)],
        HashMap::new(),
    )
    .expect("model");
    let o = write_tensors(
        &tmp.join(OPTIMIZER_FILE),
        &[("exp_avg.a.weight".into(), vec![3], &w)],
        HashMap::new(),
    )
    .expect("opt");
    s.files.insert(MODEL_FILE.into(), m);
    s.files.insert(OPTIMIZER_FILE.into(), o);
    commit(&tmp, folder, s, "[train]\n").expect("commit")
}

/// Replaces the state file with `edit` of it and COMPLETE with its new
/// sum: a state that is consistent, but says something else.
fn rewrite_state(dir: &Path, edit: impl FnOnce(&str) -> String) {
    let t = std::fs::read_to_string(dir.join(STATE_FILE)).expect("r");
    let t = edit(&t);
    std::fs::write(dir.join(STATE_FILE), &t).expect("w");
    let sum = hex(&Sha256::digest(t.as_bytes()));
    std::fs::write(dir.join(COMPLETE_FILE), format!("{sum}  {STATE_FILE}\n")).expect("w");
}

/// Two slots of a small model, in name order, and values for them.
fn two_slots() -> (Vec<Slot>, Vec<f32>) {
    let slots = vec![
        Slot {
            name: "a.bias".into(),
            shape: vec![3],
            offset: 0,
            len: 3,
        },
        Slot {
            name: "b.weight".into(),
            shape: vec![2, 2],
            offset: 3,
            len: 4,
        },
    ];
    let values = (0..7).map(|i| i as f32 * 0.25 - 1.0).collect();
    (slots, values)
}

#[test]
fn the_streaming_writer_writes_the_safetensors_crates_bytes() {
    let d = tempfile::tempdir().expect("tmp");
    let w: Vec<f32> = (0..12).map(|i| i as f32 / 7.0).collect();
    // Given out of order: both writers lay tensors out by name.
    let tensors: Vec<(String, Vec<usize>, &[f32])> = vec![
        ("z.weight".into(), vec![2, 3], &w[..6]),
        ("a.bias".into(), vec![5], &w[6..11]),
        ("m".into(), vec![1], &w[11..]),
    ];
    let meta = HashMap::from([("step".to_string(), "42".to_string())]);
    let (ours, theirs) = (d.path().join("ours"), d.path().join("theirs"));
    let sha = write_tensors(&ours, &tensors, meta.clone()).expect("ours");
    let sha_ref = reference::write_tensors(&theirs, &tensors, meta).expect("theirs");
    assert_eq!(
        std::fs::read(&ours).expect("read"),
        std::fs::read(&theirs).expect("read")
    );
    assert_eq!(sha, sha_ref);
    assert_eq!(sha, sha256_file(&ours).expect("hash"));
}

#[test]
fn files_of_the_reference_writer_load_straight_into_buffers() {
    let d = tempfile::tempdir().expect("tmp");
    let (slots, w) = two_slots();
    let m: Vec<f32> = w.iter().map(|x| x * 3.0).collect();
    let v: Vec<f32> = w.iter().map(|x| x * x).collect();
    // The model file as a checkpoint written before the streaming
    // writer existed.
    reference::write_model(d.path(), &slots, &w).expect("model");
    write_optimizer(d.path(), &slots, &m, &v, 9).expect("optimizer");
    let mut got = vec![f32::NAN; 7];
    read_model_into(d.path(), &slots, &mut got).expect("model");
    assert_eq!(got, w);
    let (mut gm, mut gv) = (vec![0.0; 7], vec![0.0; 7]);
    let step = read_optimizer_into(d.path(), &slots, &mut gm, &mut gv).expect("opt");
    assert_eq!((gm, gv, step), (m.clone(), v.clone(), 9));

    // One tensor at a time: every slot once, the same values.
    for (kind, want) in [
        (Kind::Weights, &w),
        (Kind::FirstMoments, &m),
        (Kind::SecondMoments, &v),
    ] {
        let mut r = TensorReader::open(d.path(), &slots, kind).expect("open");
        let mut flat = vec![f32::NAN; 7];
        let mut seen = Vec::new();
        while let Some((slot, values)) = r.next_tensor().expect("read") {
            flat[slot.offset..slot.offset + slot.len].copy_from_slice(values);
            seen.push(slot.name.clone());
        }
        seen.sort();
        let mut names: Vec<String> = slots.iter().map(|s| s.name.clone()).collect();
        names.sort();
        assert_eq!((&flat, seen), (want, names), "{kind:?}");
        if kind != Kind::Weights {
            assert_eq!(r.optimizer_step().expect("step"), 9);
        }
    }
    let other = [Slot {
        name: "a.bias".into(),
        shape: vec![7],
        offset: 0,
        len: 7,
    }];
    let e = TensorReader::open(d.path(), &other, Kind::Weights).expect_err("another model");
    assert!(e.to_string().contains("differ from the model"), "{e}");
}

#[test]
fn damaged_or_foreign_tensor_files_are_refused_with_what_is_wrong() {
    let d = tempfile::tempdir().expect("tmp");
    let (slots, w) = two_slots();
    write_model(d.path(), &slots, &w).expect("model");
    let path = d.path().join(MODEL_FILE);
    let good = std::fs::read(&path).expect("read");
    let load = || {
        let mut out = vec![0.0; 7];
        read_model_into(d.path(), &slots, &mut out)
            .expect_err("refused")
            .to_string()
    };
    std::fs::write(&path, &good[..good.len() - 4]).expect("truncate");
    assert!(load().contains("truncated or damaged"), "{}", load());
    std::fs::write(&path, &good[..5]).expect("truncate");
    assert!(load().contains("shorter than its header"), "{}", load());
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &huge).expect("write");
    assert!(load().contains("not a safetensors file"), "{}", load());
    // Another model: a tensor of another shape, one missing.
    let other = vec![Slot {
        name: "a.bias".into(),
        shape: vec![7],
        offset: 0,
        len: 7,
    }];
    write_model(d.path(), &other, &w).expect("model");
    let e = load();
    assert!(
        e.contains("a.bias: checkpoint [7], model [3]") && e.contains("b.weight"),
        "{e}"
    );
}

#[test]
fn a_committed_checkpoint_validates_and_reads_back() {
    let d = tempfile::tempdir().expect("tmp");
    let dir = make(d.path(), 10);
    assert_eq!(
        dir.file_name().and_then(|n| n.to_str()),
        Some("step-00000010")
    );
    let c = validate(&dir).expect("valid");
    assert_eq!(
        c.state.data_cursor,
        DataCursor {
            epoch: 1,
            position: 7
        }
    );
    let (t, _) = reference::read_tensors(&dir.join(MODEL_FILE)).expect("read");
    assert_eq!(t[0].data, vec![1.0, 2.0, 3.0]);
    assert_eq!(
        tensor_shapes(&dir.join(MODEL_FILE)).expect("shapes")["a.weight"],
        vec![3]
    );
    assert!(!d.path().join(".tmp-step-00000010-t").exists());
}

#[test]
fn damaged_checkpoints_are_refused_by_name() {
    let d = tempfile::tempdir().expect("tmp");
    type Damage = fn(&Path);
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "no COMPLETE",
            |p| std::fs::remove_file(p.join(COMPLETE_FILE)).expect("rm"),
            "incomplete",
        ),
        (
            "truncated model",
            |p| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(p.join(MODEL_FILE))
                    .expect("open");
                f.set_len(10).expect("truncate");
            },
            "does not match its sha256",
        ),
        (
            "an edited train_state.json",
            |p| {
                let t = std::fs::read_to_string(p.join(STATE_FILE)).expect("r");
                std::fs::write(
                    p.join(STATE_FILE),
                    t.replace("\"position\": 7", "\"position\": 8"),
                )
                .expect("w");
            },
            "train_state.json does not match its sha256",
        ),
        (
            "COMPLETE emptied",
            |p| std::fs::write(p.join(COMPLETE_FILE), "").expect("w"),
            "holds no sha256 of train_state.json, which format 2 requires",
        ),
        (
            "COMPLETE garbled",
            |p| std::fs::write(p.join(COMPLETE_FILE), "nonsense\n").expect("w"),
            "is not a `SHA256  FILE` line",
        ),
        (
            "bad json",
            |p| rewrite_state(p, |_| "{not json".into()),
            "not valid JSON",
        ),
        (
            "future version",
            |p| {
                rewrite_state(p, |t| {
                    t.replace("\"format_version\": 2", "\"format_version\": 99")
                })
            },
            "format version 99 is newer",
        ),
    ];
    for (i, (what, damage, want)) in cases.into_iter().enumerate() {
        let dir = make(d.path(), i as u64);
        damage(&dir);
        let e = validate(&dir).expect_err(what).to_string();
        assert!(
            e.contains(&dir.display().to_string()) && e.contains(want),
            "{what}: {e}"
        );
    }
}

#[test]
fn latest_falls_back_explicit_paths_do_not() {
    let d = tempfile::tempdir().expect("tmp");
    make(d.path(), 10);
    let newer = make(d.path(), 20);
    set_pointer(d.path(), LATEST, 20).expect("ptr");
    std::fs::remove_file(newer.join(COMPLETE_FILE)).expect("rm");
    let (c, warnings) = resolve(&d.path().join(LATEST)).expect("falls back");
    assert_eq!(c.state.step, 10);
    assert!(warnings[0].contains("falling back"), "{warnings:?}");
    let (c, warnings) = resolve(d.path()).expect("folder");
    assert_eq!(c.state.step, 10);
    assert!(warnings[0].contains("step-00000020"), "{warnings:?}");
    let e = resolve(&newer).expect_err("explicit").to_string();
    assert!(e.contains("incomplete"), "{e}");
    let empty = tempfile::tempdir().expect("tmp");
    assert!(resolve(empty.path()).is_err());
}

/// With the sums left for later, resolving reads only the small files:
/// a damaged model file is found by `verify` (the error `validate`
/// gives), and resolving `latest` again now skips it.
#[test]
fn sums_left_for_later_are_checked_by_verify() {
    let d = tempfile::tempdir().expect("tmp");
    make(d.path(), 10);
    let newer = make(d.path(), 20);
    set_pointer(d.path(), LATEST, 20).expect("ptr");
    let model = newer.join(MODEL_FILE);
    let mut bytes = std::fs::read(&model).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&model, bytes).expect("write");

    let later = resolve_with(&d.path().join(LATEST), Sums::Later).expect("resolves");
    assert_eq!(later.checkpoint.state.step, 20, "not hashed yet");
    assert!(later.falls_back && later.warnings.is_empty());
    let e = later.unverified.verify().expect_err("damaged").to_string();
    assert_eq!(e, validate(&newer).expect_err("damaged").to_string());
    assert!(
        e.contains("model.safetensors does not match its sha256"),
        "{e}"
    );

    let (now, warnings) = resolve(&d.path().join(LATEST)).expect("falls back");
    assert_eq!(now.state.step, 10);
    assert!(warnings[0].contains("falling back"), "{warnings:?}");
    let explicit = resolve_with(&newer, Sums::Later).expect("resolves");
    assert!(!explicit.falls_back);
    assert!(
        resolve_with(d.path(), Sums::Later)
            .expect("folder")
            .falls_back
    );
    let whole = resolve_with(&d.path().join("step-00000010"), Sums::Later).expect("ok");
    assert_eq!(whole.unverified.files.len(), 2, "model and optimizer");
    whole.unverified.verify().expect("intact");
    assert!(resolve_with(&newer, Sums::Now).is_err());
    assert!(
        validate_with(&d.path().join("step-00000010"), Sums::Now)
            .expect("valid")
            .1
            .is_empty()
    );
}

#[test]
fn prune_keeps_the_last_k_and_best() {
    let d = tempfile::tempdir().expect("tmp");
    for s in [10, 20, 30, 40, 50] {
        make(d.path(), s);
    }
    set_pointer(d.path(), BEST, 20).expect("best");
    let removed = prune(d.path(), 2).expect("prune");
    assert_eq!(removed.len(), 2);
    let left: Vec<u64> = list_steps(d.path()).into_iter().map(|(s, _)| s).collect();
    assert_eq!(left, vec![20, 40, 50]);
    assert_eq!(pointer_step(d.path(), BEST), Some(20));
}

#[test]
fn recommitting_a_step_keeps_the_old_one_aside() {
    let d = tempfile::tempdir().expect("tmp");
    make(d.path(), 10);
    make(d.path(), 10);
    let aside = std::fs::read_dir(d.path())
        .expect("ls")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".superseded-step-00000010")
        })
        .count();
    assert_eq!(aside, 1);
    validate(&d.path().join("step-00000010")).expect("valid");
}

#[test]
fn format_1_checkpoints_still_load_with_a_warning() {
    let d = tempfile::tempdir().expect("tmp");
    let dir = make(d.path(), 5);
    let t = std::fs::read_to_string(dir.join(STATE_FILE)).expect("r");
    std::fs::write(
        dir.join(STATE_FILE),
        t.replace("\"format_version\": 2", "\"format_version\": 1"),
    )
    .expect("w");
    std::fs::write(dir.join(COMPLETE_FILE), "").expect("w");
    let r = resolve_with(&dir, Sums::Now).expect("format 1 loads");
    assert_eq!(r.checkpoint.state.format_version, 1);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("checkpoint format 1") && w.contains("covered by no checksum")),
        "{:?}",
        r.warnings
    );
    // Written now, it is format 2, and `sha256sum -c COMPLETE` holds.
    let fresh = make(d.path(), 6);
    let ok = std::process::Command::new("sha256sum")
        .args(["-c", COMPLETE_FILE])
        .current_dir(&fresh)
        .output()
        .expect("sha256sum");
    assert!(ok.status.success(), "{ok:?}");
}

#[test]
fn leftovers_are_cleaned_and_a_dangling_latest_is_repaired() {
    let d = tempfile::tempdir().expect("tmp");
    let f = d.path();
    make(f, 10);
    make(f, 20);
    set_pointer(f, LATEST, 20).expect("latest");
    let tmp = temp_dir(f, 30, "gone").expect("tmp");
    std::fs::write(tmp.join(MODEL_FILE), "half").expect("w");
    std::fs::create_dir(f.join(".superseded-step-00000010-123")).expect("mkdir");
    std::os::unix::fs::symlink("step-00000010", f.join(".latest.tmp-99")).expect("ln");
    let removed = clean_leftovers(f).expect("clean");
    assert_eq!(removed.len(), 3, "{removed:?}");
    assert!(!tmp.exists() && f.join("step-00000010").is_dir());
    assert_eq!(repair_latest(f).expect("fine"), None);

    // `latest` names a step that is gone: it is pointed back.
    set_pointer(f, LATEST, 80).expect("dangling");
    let said = repair_latest(f).expect("repair").expect("repaired");
    assert!(
        said.contains("step-00000080") && said.contains("step-00000020"),
        "{said}"
    );
    assert_eq!(pointer_step(f, LATEST), Some(20));
    // Nothing complete left: the pointer goes.
    for s in [10, 20] {
        std::fs::remove_file(f.join(step_dir_name(s)).join(COMPLETE_FILE)).expect("rm");
    }
    let said = repair_latest(f).expect("repair").expect("removed");
    assert!(said.contains("removed it"), "{said}");
    assert!(std::fs::symlink_metadata(f.join(LATEST)).is_err());
}
