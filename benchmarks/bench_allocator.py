"""What `tune_allocator()` (the training recipes call it) does to one fp32 forward+backward of the ~18M benchmark
MoE: the same step in two fresh processes, glibc's default allocator settings and tuned, alternating; prints the
median step time of each and the ratio. (A process-wide setting cannot be A/B-tested inside one process.)

    python benchmarks/bench_allocator.py [--rounds 2] [--steps 8]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def child(tuned: bool, steps: int) -> None:
    import torch

    from common import bench_config  # noqa: E402  (benchmarks/ holds scripts)
    from nanoseek.model import build_model
    from nanoseek.train.loop import tune_allocator

    if tuned and not tune_allocator():
        sys.exit("tune_allocator() did not apply here (glibc on Linux only)")
    model = build_model(bench_config(8192), seed=0).train()
    ids = torch.randint(0, 8192, (4, 256), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    print(statistics.median(times[2:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="pairs of (default, tuned) processes")
    p.add_argument("--steps", type=int, default=8, help="timed steps per process (after 2 warm-up steps)")
    p.add_argument("--child", choices=["default", "tuned"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child == "tuned", args.steps)
    results = {"default": [], "tuned": []}
    for r in range(args.rounds):
        for mode in (("default", "tuned") if r % 2 == 0 else ("tuned", "default")):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True)
            results[mode].append(float(out.stdout.strip().splitlines()[-1]))
    d, t = statistics.median(results["default"]), statistics.median(results["tuned"])
    print("fp32 forward+backward, ~18M MoE, batch 4x256 (median step of each process, median over processes)")
    print(f"glibc default {d * 1e3:7.1f} ms | tuned {t * 1e3:7.1f} ms | speedup {d / t:.2f}x")


if __name__ == "__main__":
    main()
