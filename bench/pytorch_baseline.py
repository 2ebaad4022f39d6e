#!/usr/bin/env python3
"""PyTorch eager baseline for Stride's `bench`: nanoGPT's GPT with the same
shape, batch, AdamW and clipping, on the CPU with a fixed number of threads.

    python3 bench/pytorch_baseline.py [--threads 2] [--steps 5] [--shape main|attention]

Prints one line per shape in the format `bench` prints (tokens/s, step time,
peak RSS of this process) so the two can be compared side by side. Runs only
where torch is installed; nothing in CI calls it. The model follows nanoGPT's
`model.py` (pre-LayerNorm blocks with biases, causal self-attention through
`scaled_dot_product_attention`, GELU(tanh) MLP ×4, tied LM head, GPT-2
initialisation) and its `train.py` step (AdamW β=(0.9, 0.95), weight decay 0.1
on matrices only, clipping at 1.0), in eager mode (no torch.compile).
"""
import argparse
import math
import resource
import sys
import time

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    print("pytorch_baseline: torch is not installed; nothing to measure", file=sys.stderr)
    sys.exit(0)


class Block(nn.Module):
    def __init__(self, c, nh):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c)
        self.c_attn = nn.Linear(c, 3 * c)
        self.attn_proj = nn.Linear(c, c)
        self.ln_2 = nn.LayerNorm(c)
        self.c_fc = nn.Linear(c, 4 * c)
        self.mlp_proj = nn.Linear(4 * c, c)
        self.nh = nh

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.nh, c // self.nh).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, n_layer, n_head, n_embd, vocab, context):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(context, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as nanoGPT
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


SHAPES = {
    # name: (n_layer, n_head, n_embd, vocab, context, micro_batch)
    "tiny": (2, 2, 64, 128, 64, 16),
    "main": (4, 4, 256, 50304, 256, 8),
    "attention": (2, 4, 256, 50304, 1024, 2),
}


def bench(name, steps):
    n_layer, n_head, n_embd, vocab, context, batch = SHAPES[name]
    torch.manual_seed(1)
    model = GPT(n_layer, n_head, n_embd, vocab, context)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
    )
    ids = (torch.arange(batch * (context + 1)) * 7919 % vocab).view(batch, context + 1)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    total = 0.0
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if i > 0:
            total += time.perf_counter() - t0
    tokens = steps * batch * context
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"pytorch {torch.__version__} {name:<10} {params:5.1f}M params  batch {batch}x{context}  "
        f"{tokens / total:8.0f} tokens/s  step {1e3 * total / steps:7.1f} ms  peak RSS {rss_mb:6.0f} MB",
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="main")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    bench(a.shape, a.steps)


if __name__ == "__main__":
    main()
