#!/usr/bin/env python3
"""What a user of Stride's failure handling asks, measured with release
binaries on this machine (README, "When things fail"):

  kill      time from a worker's `kill -9` to the first step of the new
            generation (`--local`, so the dead process is restarted): on
            `tiny`, and on GPT-2 small (124 M parameters, context 1,024,
            CPU) — the restart re-hashes and loads a 1.5 GB checkpoint.
  disk      time from a checkpoint write meeting a full disk to the job's
            exit (a real ENOSPC: checkpoint.dir on a small tmpfs; needs
            root to mount it, skipped otherwise).

    cargo build --release
    python3 bench/recovery.py [kill-tiny] [kill-gpt2] [disk]

Each figure is the median of --runs runs (default 3), printed with all of
them; nothing here is asserted (the tests do not measure time).
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COORDINATOR = os.path.join(ROOT, "target", "release", "coordinator")

TINY = ["--config", "tiny", "--workers", "2", "--local",
        "--set", "train.max_steps=400", "--set", "checkpoint.interval=100",
        "--set", "train.eval_interval=0"]

# GPT-2 small on the built-in synthetic corpus (vocabulary 50,304).
GPT2 = ["--config", "tiny", "--workers", "2", "--local",
        "--set", "model.n_layer=12", "--set", "model.n_head=12",
        "--set", "model.n_embd=768", "--set", "model.vocab_size=50304",
        "--set", "model.context=1024", "--set", "data.stride=1024",
        "--set", "data.synthetic_tokens=300000",
        "--set", "train.global_batch=2", "--set", "train.micro_batch=1",
        "--set", "train.max_steps=8", "--set", "train.warmup_steps=1",
        "--set", "checkpoint.interval=2", "--set", "train.eval_interval=0",
        "--set", "cluster.step_timeout_s=600",
        "--set", "cluster.heartbeat_timeout_s=60",
        "--set", "cluster.startup_timeout_s=900"]


def wait_for(what, check, limit=1800, every=0.02):
    deadline = time.time() + limit
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise SystemExit(f"timed out waiting for {what}")


def read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def step_lines(run_dir):
    out = []
    for line in read(os.path.join(run_dir, "metrics.jsonl")).splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        out.append(r)
    return out


def kill_once(args, kill_after_step):
    """One run: returns (seconds to the new generation's first step
    starting, seconds to it finishing)."""
    with tempfile.TemporaryDirectory() as d:
        coord = subprocess.Popen([COORDINATOR, *args], cwd=d,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env={**os.environ, "RUST_LOG": "info"})
        run_dir = os.path.join(d, "runs", "tiny")
        log = os.path.join(run_dir, "train.log")
        try:
            wait_for(f"step {kill_after_step}", lambda: any(
                r.get("step", -1) >= kill_after_step and "loss" in r
                for r in step_lines(run_dir)))
            pids = re.findall(r"worker local-1 joined \([^,]+, pid (\d+)", read(log))
            victim = int(pids[-1])
            lines_before = len(step_lines(run_dir))
            starts_before = read(log).count("training starts at step")
            os.kill(victim, signal.SIGKILL)
            killed = time.time()
            started = wait_for("the new generation", lambda: (
                read(log).count("training starts at step") > starts_before and time.time()))
            stepped = wait_for("its first step", lambda: any(
                "loss" in r for r in step_lines(run_dir)[lines_before:]) and time.time())
            coord.wait(timeout=1800)
            return started - killed, stepped - killed
        finally:
            if coord.poll() is None:
                coord.kill()
                coord.wait()


def disk_once():
    """Seconds from the ENOSPC (the log's error line) to the job's exit,
    and its exit code."""
    with tempfile.TemporaryDirectory() as d:
        mnt = os.path.join(d, "small")
        os.mkdir(mnt)
        # One tiny checkpoint is 1.35 MB: the second does not fit.
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mnt], check=True)
        try:
            args = ["--config", "tiny", "--workers", "2", "--local",
                    "--set", "train.max_steps=400", "--set", "checkpoint.interval=20",
                    "--set", "train.eval_interval=0", "--set", f"checkpoint.dir={mnt}"]
            coord = subprocess.Popen([COORDINATOR, *args], cwd=d,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "RUST_LOG": "info"})
            log = os.path.join(d, "runs", "tiny", "train.log")
            seen = wait_for("the ENOSPC", lambda: "ENOSPC" in read(log) and time.time(),
                            every=0.005)
            code = coord.wait(timeout=600)
            exited = time.time()
            leftovers = [n for n in os.listdir(mnt) if n.startswith(".tmp")]
            return exited - seen, code, leftovers
        finally:
            subprocess.run(["umount", mnt], check=False)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", nargs="*", default=["kill-tiny", "kill-gpt2", "disk"])
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    if not os.path.exists(COORDINATOR):
        sys.exit(f"{COORDINATOR} is not built: cargo build --release")
    print(f"machine: {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}")
    for what in a.what:
        if what in ("kill-tiny", "kill-gpt2"):
            args, after = (TINY, 150) if what == "kill-tiny" else (GPT2, 3)
            runs = [kill_once(args, after) for _ in range(a.runs)]
            starts = [r[0] for r in runs]
            steps = [r[1] for r in runs]
            print(f"{what}: kill -9 → new generation's first step starts "
                  f"{statistics.median(starts):.2f} s (runs: {', '.join(f'{s:.2f}' for s in starts)}), "
                  f"finishes {statistics.median(steps):.2f} s "
                  f"(runs: {', '.join(f'{s:.2f}' for s in steps)})")
        elif what == "disk":
            if os.geteuid() != 0 or not shutil.which("mount"):
                print("disk: skipped (mounting a tmpfs needs root)")
                continue
            runs = [disk_once() for _ in range(a.runs)]
            gaps = [r[0] for r in runs]
            print(f"disk: ENOSPC logged → job exited {statistics.median(gaps):.2f} s "
                  f"(runs: {', '.join(f'{g:.2f}' for g in gaps)}); exit codes "
                  f"{sorted({r[1] for r in runs})}; temporary folders left: "
                  f"{sum(len(r[2]) for r in runs)}")
        else:
            sys.exit(f"unknown measurement {what}")


if __name__ == "__main__":
    main()
