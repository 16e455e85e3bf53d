"""Training throughput of nanoseek vs transformers' DeepseekV3ForCausalLM: same config, weights, data, optimizer
and precision, in one process.

Each side runs full optimizer steps on the same packed batches of the generated corpus: forward, next-token CE
(common.next_token_loss: nanoseek's lm_head fused into it, as its pretrain recipe does; transformers' logits
into the same CE), backward, gradient clipping at 1.0, AdamW (0.9, 0.95, wd 0.1 on matrices). nanoseek's step
also does its aux-loss-free bias update and sequence-wise balance loss (the pretrain recipe's step), which
transformers' model does not have: the comparison charges nanoseek for extra work. Each side clips the way its
library trains: nanoseek inside the fused AdamW's pass (optim.clipped_step, as its recipes do), transformers'
Trainer with a clip, then the step. Steps alternate between the sides so machine noise hits both alike; the script
prints the median tokens/s, their ratio, the quartiles and median of the per-step ratios (the median: the speedup
with the host's drift paired out; the quartiles: the noise within the run), and each side's MFU against the matmul
peak of that precision measured in the same run (MTP off: transformers has no MTP).

    python benchmarks/bench_train.py                  # ~18M-param MoE (hidden 256, 8 layers, 16 experts top-4)
    python benchmarks/bench_train.py --batch 8 --seq 256 --steps 10
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from nanoseek.accounting import count_params, flops_per_token
from nanoseek.data.pretrain import PretrainLoader, synthetic_corpus
from nanoseek.tokenizer import train_tokenizer
from nanoseek.train.balance import LoadBalancer
from nanoseek.train.loop import autocast, matmul_peak_flops
from nanoseek.train.optim import build_optimizer, clip_grad_norm, clipped_step

from common import add_run_arguments, next_token_loss, pair_ratios, twin_models  # noqa: E402  (scripts)

CPU = torch.device("cpu")


class Side:
    """One model with its optimizer (and, for nanoseek, its load balancer)."""

    def __init__(self, model, lr: float, balancer: LoadBalancer | None = None):
        self.model, self.balancer = model.train(), balancer
        self.opt = build_optimizer(model, lr)
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, batch, precision: str) -> None:
        t = time.perf_counter()
        with autocast(CPU, precision):
            loss = next_token_loss(self.model, batch.inputs, batch.targets, batch.target_mask)
            if self.balancer is not None:
                loss = loss + self.balancer.collect(batch.target_mask, alpha=1e-4)
        loss.backward()
        if self.balancer is not None:       # nanoseek's recipe step: the clip inside the fused AdamW's pass
            clipped_step(self.opt, self.model.parameters(), 1.0)
        else:                               # transformers' Trainer: clip_grad_norm_, then optimizer.step()
            clip_grad_norm(list(self.model.parameters()), 1.0)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.balancer is not None:
            self.balancer.step(gamma=0.001)
        self.times.append(time.perf_counter() - t)
        self.losses.append(loss.item())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=16, help="timed steps per side and precision (after --warmup)")
    p.add_argument("--lr", type=float, default=1e-3)
    add_run_arguments(p)
    args = p.parse_args()
    import transformers

    cfg, hf, ours = twin_models(args)               # same weights on both sides, through the real converter
    sides = {"ours": Side(ours, args.lr, LoadBalancer(ours)), "hf": Side(hf, args.lr)}

    tok = train_tokenizer(texts=synthetic_corpus(4000, seed=0), vocab_size=args.vocab, show_progress=False)
    loader = PretrainLoader(tok, texts=synthetic_corpus(20_000, seed=1), batch_size=args.batch, seq_len=args.seq)
    n = 2 * (args.steps + args.warmup)
    batches = [next(loader) for _ in range(n)]     # read up front: data loading is timed on neither side

    pc = count_params(cfg)
    fpt = flops_per_token(cfg, args.seq, training=True).total
    tokens = args.batch * args.seq
    print(f"config: {pc.total / 1e6:.1f}M params ({pc.activated / 1e6:.1f}M activated), {fpt / 1e6:.0f} MFLOP per "
          f"training token, batch {args.batch} x {args.seq}, AdamW + clip, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {torch.get_num_threads()} threads, "
          f"attn_implementation={hf.config._attn_implementation}")
    print(f"{'precision':<15}{'nanoseek tok/s':>15}{'transformers tok/s':>19}{'speedup':>9}"
          f"{'step ratios q1 med q3':>23}{'peak GF/s':>11}{'MFU ours':>10}{'MFU hf':>8}")
    precisions = [("fp32", "fp32"), ("bf16 autocast", "bf16")]
    for k, (name, precision) in enumerate([p for p in precisions if args.precision in ("both", p[1])]):
        peak = matmul_peak_flops(CPU, torch.bfloat16 if precision == "bf16" else torch.float32, seconds=1.0)
        for side in sides.values():
            side.times.clear()
        for i, batch in enumerate(batches[k * n // 2:(k + 1) * n // 2]):
            order = ("ours", "hf") if i % 2 else ("hf", "ours")
            for s in order:
                sides[s].step(batch, precision)
        tps = {s: tokens / statistics.median(side.times[args.warmup:]) for s, side in sides.items()}
        mfu = {s: v * fpt / peak for s, v in tps.items()}
        spread = pair_ratios(sides["ours"].times[args.warmup:], sides["hf"].times[args.warmup:])
        print(f"{name:<15}{tps['ours']:>15,.0f}{tps['hf']:>19,.0f}{tps['ours'] / tps['hf']:>8.2f}x{spread:>23}"
              f"{peak / 1e9:>11.0f}{mfu['ours']:>10.1%}{mfu['hf']:>8.1%}")
    first = {s: side.losses[0] for s, side in sides.items()}
    print(f"first-step loss (same weights and batch): nanoseek {first['ours']:.5f} (CE + balance loss), "
          f"transformers {first['hf']:.5f}; after {len(sides['ours'].losses)} steps: "
          f"nanoseek {sides['ours'].losses[-1]:.4f}, transformers {sides['hf'].losses[-1]:.4f}")


if __name__ == "__main__":
    main()
