"""Time PyTorch's training step of nanoGPT's baby model beside ours, round by round.

Not part of scratchlm, and never run by CI: it needs PyTorch, which this book does not
install (``.venv/bin/pip install torch==2.13.0`` for the CPU build). Chapter 5 compares
its GPT with PyTorch's eager CPU implementation of the same model. A number measured
once, elsewhere, compares badly with a shared machine whose speed drifts by a quarter
within an hour, so this script times both in the same minutes. Each round times
PyTorch's step in this process with two threads, and ours in a child process for each
two-core setting (two workers of one BLAS thread, one model on two BLAS threads), all
back to back after a warm-up; the record keeps every round.

    python book/_ext/pytorch_reference.py --rounds 40 \\
        --record book/_runs/pytorch_reference.json

The PyTorch model is nanoGPT's ``model.py`` (Karpathy, MIT licence), cut to what a
training step of the baby configuration runs: no dropout, no biases, its
``scaled_dot_product_attention``, its exact ``nn.GELU`` and its tied head.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from scratchlm.attention import median_seconds
from scratchlm.runs import write_record
from scratchlm.transformer import BENCH_BATCH, BENCH_CONFIG

OURS = [(1, 2), (2, 1)]  # (BLAS threads, workers): our settings that use two cores


class LayerNorm(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, width, n_head):
        super().__init__()
        self.c_attn = nn.Linear(width, 3 * width, bias=False)
        self.c_proj = nn.Linear(width, width, bias=False)
        self.n_head = n_head

    def forward(self, x):
        batch, n_tokens, width = x.size()
        q, k, v = self.c_attn(x).split(width, dim=2)
        shape = (batch, n_tokens, self.n_head, width // self.n_head)
        q, k, v = (part.view(shape).transpose(1, 2) for part in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(batch, n_tokens, width))


class Block(nn.Module):
    def __init__(self, width, n_head):
        super().__init__()
        self.ln_1, self.ln_2 = LayerNorm(width), LayerNorm(width)
        self.attn = CausalSelfAttention(width, n_head)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width, bias=False), nn.GELU(),
                                 nn.Linear(4 * width, width, bias=False))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        width = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, width)
        self.wpe = nn.Embedding(config.block_size, width)
        self.h = nn.ModuleList(Block(width, config.n_head) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(width)
        self.lm_head = nn.Linear(width, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied, as nanoGPT and ours

    def forward(self, ids, targets):
        x = self.wte(ids) + self.wpe(torch.arange(ids.size(1)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def pytorch_step_ms(repeat: int, threads: int = 2, seed: int = 0) -> float:
    """Median milliseconds of a forward and backward pass, as ``gpt bench`` times ours."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = GPT(BENCH_CONFIG)
    shape = (BENCH_BATCH, BENCH_CONFIG.block_size)
    ids, targets = (torch.randint(0, BENCH_CONFIG.vocab_size, shape) for _ in range(2))

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, targets).backward()

    for _ in range(2):  # warm-up, as ours (median_seconds makes one more call first)
        step()
    return median_seconds(step, repeat) * 1e3


OUR_STEP = """
import sys
from scratchlm.attention import median_seconds
from scratchlm.transformer import (BENCH_BATCH, BENCH_CONFIG, DataParallel, bench_batch,
                                   training_step)
workers, repeat = int(sys.argv[1]), int(sys.argv[2])
model, ids, targets = bench_batch(BENCH_CONFIG, BENCH_BATCH, 0)
parallel = DataParallel(model, workers) if workers > 1 else None
for _ in range(2):  # warm-up, as PyTorch's
    training_step(model, ids, targets, parallel)
print(median_seconds(lambda: training_step(model, ids, targets, parallel), repeat))
"""


def ours_step_ms(threads: int, workers: int, repeat: int) -> float:
    """Median milliseconds of our step, timed back to back as PyTorch's is (``gpt
    bench`` alternates its steps with matrix products), in a process of its own: OpenBLAS
    reads its thread count once."""
    command = [sys.executable, "-c", OUR_STEP, str(workers), str(repeat)]
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads),
               OMP_NUM_THREADS=str(threads))
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return float(done.stdout) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--record", required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    rounds = []
    for i in range(args.rounds):
        row = {}
        # PyTorch first in one round, last in the next: no side gets the same moment
        if i % 2 == 0:
            row["pytorch"] = pytorch_step_ms(args.repeat)
        for threads, workers in OURS:
            key = f"{threads}_threads_{workers}_workers"
            row[key] = ours_step_ms(threads, workers, args.repeat)
        if i % 2 == 1:
            row["pytorch"] = pytorch_step_ms(args.repeat)
        rounds.append(row)
        print(f"round {i + 1}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in row.items()))
    metrics = {"torch": torch.__version__}
    for key in ["pytorch"] + [f"{t}_threads_{w}_workers" for t, w in OURS]:
        metrics[f"median_{key}_ms"] = round(float(np.median([r[key] for r in rounds])), 2)
        if key != "pytorch":
            ratios = [r[key] / r["pytorch"] for r in rounds]
            metrics[f"median_ratio_{key}"] = round(float(np.median(ratios)), 3)
    write_record(
        args.record, command=" ".join(["python", "book/_ext/pytorch_reference.py",
                                         *sys.argv[1:]]),
        config={"model": BENCH_CONFIG.to_dict(), "batch": BENCH_BATCH,
                "repeat": args.repeat, "rounds": args.rounds, "pytorch_threads": 2},
        metrics=metrics, curves={"rounds": rounds},
        elapsed_seconds=time.perf_counter() - start,
    )
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
