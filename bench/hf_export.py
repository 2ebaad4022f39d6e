#!/usr/bin/env python3
"""Checks `coordinator export --format hf` against Stride's own forward pass.

For a checkpoint, it exports the Hugging Face folder, asks Stride for the
next-token logits of a prompt (`worker sample --logits`, the fused engine
the workers train with), and compares them with

  1. an independent NumPy forward pass of GPT-2 over the EXPORTED tensors
     (HF layout: Conv1D weights are (in, out)) — needs numpy + safetensors;
  2. `transformers.GPT2LMHeadModel.from_pretrained(export)` — when torch and
     transformers are installed (skipped, and said so, otherwise).

    cargo build --release
    python3 bench/hf_export.py --checkpoint runs/tiny/checkpoints/latest

Not part of .ci/run (it needs Python packages CI does not install); the
Rust test `export::tests` checks names, shapes and transposes without them.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numpy_logits(folder, ids):
    import numpy as np
    from safetensors.numpy import load_file

    w = load_file(os.path.join(folder, "model.safetensors"))
    cfg = json.load(open(os.path.join(folder, "config.json")))
    n_layer, n_head, eps = cfg["n_layer"], cfg["n_head"], cfg["layer_norm_epsilon"]
    t = len(ids)
    x = (w["transformer.wte.weight"][ids] + w["transformer.wpe.weight"][:t]).astype(np.float64)

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[p + ".weight"] + w[p + ".bias"]

    def conv1d(x, p):  # HF's Conv1D: x @ W + b, W (in, out)
        return x @ w[p + ".weight"] + w[p + ".bias"]

    def gelu(x):  # tanh form ("gelu_new")
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    c = x.shape[1]
    hs = c // n_head
    mask = np.triu(np.ones((t, t), dtype=bool), 1)
    for i in range(n_layer):
        p = f"transformer.h.{i}"
        qkv = conv1d(ln(x, p + ".ln_1"), p + ".attn.c_attn")
        q, k, v = np.split(qkv, 3, axis=-1)
        out = np.zeros_like(q)
        for h in range(n_head):
            s = slice(h * hs, (h + 1) * hs)
            att = q[:, s] @ k[:, s].T / math.sqrt(hs)
            att[mask] = -np.inf
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            out[:, s] = att @ v[:, s]
        x = x + conv1d(out, p + ".attn.c_proj")
        x = x + conv1d(gelu(conv1d(ln(x, p + ".ln_2"), p + ".mlp.c_fc")), p + ".mlp.c_proj")
    x = ln(x, "transformer.ln_f")
    return x[-1] @ w["transformer.wte.weight"].T


def torch_logits(folder, ids):
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].double().numpy()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--bin", default=os.path.join(ROOT, "target", "release"))
    p.add_argument("--prompt-ids", default="1,2,3,5,8,13,21,34")
    a = p.parse_args()
    ids = [int(i) for i in a.prompt_ids.split(",")]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "hf")
        subprocess.run([os.path.join(a.bin, "coordinator"), "export", "--checkpoint", a.checkpoint,
                        "--format", "hf", "--out", out], check=True)
        r = subprocess.run([os.path.join(a.bin, "worker"), "sample", "--checkpoint", a.checkpoint,
                            "--prompt-ids", a.prompt_ids, "--logits"],
                           check=True, capture_output=True, text=True)
        stride = json.loads(r.stdout)
        vocab = json.load(open(os.path.join(out, "config.json")))["vocab_size"]
        stride = stride[:vocab]
        scale = max(abs(v) for v in stride)
        failed = False
        for name, fn in (("numpy", numpy_logits), ("transformers", torch_logits)):
            try:
                theirs = fn(out, ids)
            except ImportError as e:
                print(f"{name}: skipped ({e.name} is not installed)")
                continue
            diff = max(abs(x - y) for x, y in zip(stride, theirs))
            same_top = max(range(vocab), key=lambda i: stride[i]) == max(range(vocab), key=lambda i: theirs[i])
            ok = diff <= 1e-4 * max(1.0, scale) and same_top
            failed |= not ok
            print(f"{name}: max |logit difference| {diff:.2e} (logits up to {scale:.2f}); "
                  f"same most likely token: {same_top} -> {'ok' if ok else 'FAILED'}")
        sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
