#!/usr/bin/env python3
"""torch.distributed all-reduce with the gloo backend, 2 processes on
loopback: the reference for Stride's TCP ring (`bench --pytorch PYTHON`).

    python3 bench/gloo_allreduce.py [--mib 64] [--reps 10] [--world 2]

Prints `gloo all-reduce, N ranks, M MiB: T ms  algorithm bandwidth B GB/s`.
Runs only where torch is installed; nothing in CI calls it.
"""
import argparse
import os
import sys
import time

try:
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
except ImportError:
    print("gloo_allreduce: torch is not installed; nothing to measure", file=sys.stderr)
    sys.exit(0)


def run(rank, world, mib, reps, port, out):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    buf = torch.ones(mib * (1 << 20) // 4)
    dist.all_reduce(buf)  # warm-up
    dist.barrier()
    start = time.perf_counter()
    for _ in range(reps):
        dist.all_reduce(buf)
    elapsed = (time.perf_counter() - start) / reps
    out[rank] = elapsed
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--port", type=int, default=29533)
    a = ap.parse_args()
    with mp.Manager() as m:
        out = m.dict()
        mp.spawn(run, args=(a.world, a.mib, a.reps, a.port, out), nprocs=a.world)
        t = max(out.values())
    gbs = a.mib * (1 << 20) / t / 1e9
    print(f"gloo all-reduce, {a.world} ranks, {a.mib:3d} MiB: {1e3 * t:7.1f} ms  algorithm bandwidth {gbs:6.2f} GB/s")


if __name__ == "__main__":
    main()
