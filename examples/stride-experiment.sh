#!/usr/bin/env bash
# The seed's experiment, on real English text: train the same model on
# windows at stride 1 (every offset, 98 % overlap) and at stride = context
# (disjoint windows) for the same number of tokens, extend both with a
# cosine cooldown, and compare them on the same validation windows.
#
#   bash examples/stride-experiment.sh          # ~15 minutes on 2 cores
#
# The text is Jane Austen's "Pride and Prejudice" (1813, public domain),
# committed as examples/data/pride-and-prejudice.txt (taken from Debian's
# r-cran-janeaustenr package). Nothing is downloaded. Everything goes to
# runs/stride-experiment/; delete it to start over.
set -euo pipefail
cd "$(dirname "$0")/.."

coordinator=target/release/coordinator
[ -x "$coordinator" ] || cargo build --release
out=runs/stride-experiment
data=$out/data
mkdir -p "$out"

# GPT-2 BPE tokens; the last 10 % are the validation split.
"$coordinator" prepare --input examples/data/pride-and-prejudice.txt --out "$data" --val-fraction 0.1 --force
"$coordinator" inspect-data --data "$data/train.bin" --context 64 --stride 1 --global-batch 32 --vocab-size 50304

# A 2-layer GPT with GPT-2's vocabulary, context 64; 2 local workers; a
# global batch of 32 windows (2,048 tokens) a step. Phase 1: 200 steps
# (410 K tokens, ~3 epochs of the disjoint windows) at a constant LR after
# warmup; phase 2: extended to 300 steps with a cosine decay. Validation:
# all disjoint windows of val.bin (data.val_stride = context), every 25 steps.
job=(
    --config tiny --workers 2 --local
    --set "data.train=$data/train.bin" --set "data.val=$data/val.bin"
    --set model.vocab_size=50304 --set model.n_layer=2 --set model.n_head=2
    --set model.n_embd=128 --set model.context=64
    --set train.max_steps=200 --set train.warmup_steps=20 --set train.lr=1e-3
    --set train.eval_interval=25 --set train.eval_batches=0
    --set checkpoint.interval=50
)
for stride in 1 64; do
    run=$out/stride-$stride
    if [ ! -e "$run/checkpoints/latest" ]; then
        "$coordinator" "${job[@]}" --set "data.stride=$stride" --run-dir "$run"
    fi
    "$coordinator" --resume "$run/checkpoints/latest" --extend-steps 300 --local --run-dir "$run"
    "$coordinator" report "$run"
done

# Validation loss of both runs at every evaluation, side by side.
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
def curve(stride):
    vals = {}
    with open(f"{out}/stride-{stride}/metrics.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r.get("val_loss") is not None:
                vals[r["step"]] = r["val_loss"]
    return vals
a, b = curve(1), curve(64)
print(f"{'step':>6} {'val loss, stride 1':>20} {'val loss, stride 64':>20}")
for step in sorted(set(a) | set(b)):
    fmt = lambda v: f"{v:20.4f}" if v is not None else " " * 20
    print(f"{step:>6} {fmt(a.get(step))} {fmt(b.get(step))}")
PY
echo "charts: $out/stride-1/report.png and $out/stride-64/report.png"
