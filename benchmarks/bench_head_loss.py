"""The vocabulary head + next-token CE alone: nanoseek's fused, chunked head (train/linear_ce.py) against the
unfused path every library without a fused loss runs (lm_head -> (N,V) logits -> fp32 cross-entropy, as
transformers' `labels=` loss does), forward + backward, in one process, interleaved, fp32 then bf16 autocast.

    python benchmarks/bench_head_loss.py                       # 1024 rows, hidden 256, vocab 8192 (bench_model)
    python benchmarks/bench_head_loss.py --rows 4096 --vocab 129280 --hidden 512
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from nanoseek.train.linear_ce import linear_cross_entropy


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1024, help="tokens (batch x sequence)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.rows, args.hidden, generator=g, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.rows,), generator=g)
    ones = torch.ones(args.rows)

    def unfused():
        return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")

    def fused():
        return linear_cross_entropy(hidden, weight, targets, ones)

    print(f"head + CE forward+backward: {args.rows} rows, hidden {args.hidden}, vocab {args.vocab}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'precision':<16}{'fused ms':>10}{'unfused ms':>12}{'speedup':>9}{'loss diff':>11}")
    for name, dt in [("fp32", None), ("bf16 autocast", torch.bfloat16)]:
        times = {"fused": [], "unfused": []}
        losses = {}
        for i in range(args.iters + 2):
            pair = (("fused", fused), ("unfused", unfused))
            for side, fn in pair if i % 2 else pair[::-1]:                 # alternate which side runs first
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=dt or torch.float32, enabled=dt is not None):
                    loss = fn()
                loss.backward()
                hidden.grad = weight.grad = None
                if i >= 2:
                    times[side].append(time.perf_counter() - t)
                losses[side] = loss.item()
        f, u = statistics.median(times["fused"]), statistics.median(times["unfused"])
        print(f"{name:<16}{f * 1e3:>10.1f}{u * 1e3:>12.1f}{u / f:>8.2f}x"
              f"{abs(losses['fused'] - losses['unfused']) / abs(losses['unfused']):>11.1e}")


if __name__ == "__main__":
    main()
