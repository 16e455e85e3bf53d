"""Which expert path makes the fastest training step on this machine: nanoseek's whole fp32 forward+backward
(bench_model's step and config) with its routed experts forced through each CPU path in turn, interleaved in one
process on the same batches, with transformers' step beside them for the ratio.

Paths: `grouped` (F.grouped_mm, the CPU fp32 default), `loop` (ExpertLoop, expert by expert), `batched`
(ExpertBatched, padded bmm, the CPU bf16 default). Isolated-op timings did not predict whole-step ones on this
project's machines (cache state differs), so a path is chosen on this script's numbers.

    python benchmarks/bench_experts_ab.py                     # grouped,loop,batched, 12 steps each
    python benchmarks/bench_experts_ab.py --paths grouped,loop --steps 20
"""
from __future__ import annotations

import argparse
import statistics

import torch

import nanoseek
from nanoseek.model import expert_ops, moe

from bench_model import step  # noqa: E402  (benchmarks/ holds scripts)
from common import bench_config, hf_twin  # noqa: E402

_default_use_grouped = moe._use_grouped_mm


def use_path(name: str) -> None:
    """Route CPU fp32 experts through `name` (module-level switch: each step reads it afresh)."""
    moe._use_grouped_mm = _default_use_grouped if name == "grouped" else (lambda *a: False)
    moe.ExpertLoop = expert_ops.ExpertBatched if name == "batched" else expert_ops.ExpertLoop


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paths", default="grouped,loop,batched", help="comma-separated: grouped, loop, batched")
    p.add_argument("--steps", type=int, default=12, help="timed steps per side (after 2 warm-up)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args()
    paths = args.paths.split(",")
    if not set(paths) <= {"grouped", "loop", "batched"}:
        raise SystemExit(f"--paths {args.paths!r}: choose from grouped, loop, batched")
    cfg = bench_config()
    with hf_twin(cfg) as (hf, d):
        ours = nanoseek.load_model(d)
    hf.train(), ours.train()
    sides = [*paths, "transformers"]
    times = {s: [] for s in sides}
    g = torch.Generator().manual_seed(0)
    for i in range(args.steps + 2):
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
        losses = {}
        for side in sides[i % len(sides):] + sides[:i % len(sides)]:   # each side in each position in turn
            if side != "transformers":
                use_path(side)
            t, losses[side] = step(hf if side == "transformers" else ours, ids, None)   # fp32
            if i >= 2:
                times[side].append(t)
        if max(losses.values()) - min(losses.values()) > 1e-4 * abs(losses["transformers"]):
            raise SystemExit(f"losses differ: {losses}")
    use_path("grouped")
    hf_ms = statistics.median(times["transformers"]) * 1e3
    print(f"fp32 fwd+bwd, batch {args.batch}x{args.seq}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for side in sides:
        ms = statistics.median(times[side]) * 1e3
        print(f"{side:<14}{ms:>9.1f} ms{hf_ms / ms:>8.2f}x transformers")


if __name__ == "__main__":
    main()
