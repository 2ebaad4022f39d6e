#!/usr/bin/env bash
# "Decay now, or later" on the embedded `tiny` job: a phase-1 run at a
# constant LR, two cooldowns of different lengths branched from one of its
# checkpoints (each in its own run directory), a live job told to cool down
# with `coordinator decay`, and all of them compared with `report`.
#
#   bash examples/decay-now-or-later.sh        # ~2 minutes on 2 cores (release)
#   COORDINATOR=target/debug/coordinator bash examples/decay-now-or-later.sh
#
# Everything goes to runs/decay/; delete it to start over.
set -euo pipefail
cd "$(dirname "$0")/.."

coordinator=${COORDINATOR:-target/release/coordinator}
[ -x "$coordinator" ] || cargo build --release
out=runs/decay
rm -rf "$out"
mkdir -p "$out"
job=(--config tiny --workers 2 --local)

# Phase 1: 400 steps, warmup then a constant LR (tiny's default), a
# checkpoint every 100 steps.
"$coordinator" "${job[@]}" --run-dir $out/phase1

# Two cooldowns from the step-200 checkpoint, 1-sqrt to min_lr_ratio × lr:
# over 100 steps (ends at 300) and over 200 steps (ends at 400, the same
# compute as phase 1).
for n in 300 400; do
    "$coordinator" --resume $out/phase1/checkpoints/step-00000200 --extend-steps $n --decay 1-sqrt \
        --local --run-dir $out/cool-to-$n
done

# A live job planned for 2,000 steps, told at step ~200 to cool down over
# 200 steps: it ends at ~400.
"$coordinator" "${job[@]}" --set train.max_steps=2000 --run-dir $out/live \
    > $out/live.out 2>&1 &
live=$!
until [ -s $out/live/coordinator.addr ] && [ "$(grep -c '"loss"' $out/live/metrics.jsonl 2>/dev/null || true)" -ge 200 ]; do
    sleep 0.2
done
"$coordinator" decay --connect "$(cat $out/live/coordinator.addr)" --token-file $out/live/token --over 200 --shape 1-sqrt
wait $live

"$coordinator" report $out/phase1 $out/cool-to-300 $out/cool-to-400 $out/live --out $out/compare.png
"$coordinator" report $out/phase1 $out/cool-to-300 $out/cool-to-400 $out/live --json
