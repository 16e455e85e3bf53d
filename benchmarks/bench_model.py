"""Forward+backward speed of nanoseek vs transformers' DeepseekV3ForCausalLM on the same config and weights.

Both models run in one process, interleaved, on the same batches, at equal precision (fp32, then bf16
autocast); the script prints both median times, their ratio, the quartiles and median of the per-step ratios
(each step's two sides ran on the same batch, back to back: their median is the speedup with the shared
machine's drift paired out, their spread the noise within the run), and each side's model FLOPs utilization
against this machine's matmul peak measured in the same run at that precision (train.loop.matmul_peak_flops).
A step is forward, next-token cross-entropy (log-softmax in fp32) and backward, each side the way its library
trains (common.next_token_loss: transformers' logits into the CE its `labels=` loss runs, nanoseek's hidden
states into its fused head + loss). The two losses are checked equal.

    python benchmarks/bench_model.py                 # ~18M-param MoE (hidden 256, 8 layers, 16 experts top-4)
    python benchmarks/bench_model.py --batch 8 --seq 256 --iters 10
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from nanoseek.accounting import count_params
from nanoseek.train.loop import matmul_peak_flops

from common import add_run_arguments, next_token_loss, pair_ratios, twin_models  # noqa: E402  (scripts)


def step(model, ids, autocast_dtype) -> tuple[float, float]:
    """(seconds, loss) of one forward + loss + backward; targets are the next tokens."""
    inputs, targets = ids[:, :-1], ids[:, 1:]
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = next_token_loss(model, inputs, targets)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t, loss.item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--iters", type=int, default=16, help="timed steps per side and precision (after --warmup)")
    add_run_arguments(p)
    args = p.parse_args()
    import transformers

    cfg, hf, ours = twin_models(args)               # same weights on both sides, through the real converter
    hf.train(), ours.train()
    pc = count_params(cfg)
    tokens = args.batch * args.seq
    # training FLOPs per token: 6 x activated non-embedding params + causal attention (3 x 2 x 2 x T/2 x heads x dims)
    attn = 3 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * args.seq / 2
    flops_per_token = 6 * pc.activated + attn
    print(f"config: {pc.total / 1e6:.1f}M params ({pc.activated / 1e6:.1f}M activated), batch {args.batch}x"
          f"{args.seq}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, attn_implementation={hf.config._attn_implementation}")
    print(f"{'precision':<16}{'nanoseek ms':>12}{'transformers ms':>17}{'speedup':>9}{'step ratios q1 med q3':>23}"
          f"{'peak GF/s':>11}{'MFU ours':>10}{'MFU hf':>8}")
    g = torch.Generator().manual_seed(0)
    precisions = [("fp32", None), ("bf16 autocast", torch.bfloat16)]
    for name, dt in [pr for pr in precisions if args.precision in ("both", pr[0].split()[0])]:
        peak = matmul_peak_flops(torch.device("cpu"), dt or torch.float32, seconds=1.0) / 1e9
        times = {"ours": [], "hf": []}
        for i in range(args.iters + args.warmup):
            ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
            losses = {}
            for side, model in (("ours", ours), ("hf", hf)) if i % 2 else (("hf", hf), ("ours", ours)):
                t, losses[side] = step(model, ids, dt)
                if i >= args.warmup:
                    times[side].append(t)
            if abs(losses["ours"] - losses["hf"]) > (1e-4 if dt is None else 2e-2) * abs(losses["hf"]):
                raise SystemExit(f"losses differ: nanoseek {losses['ours']:.6f}, transformers {losses['hf']:.6f}")
        ours_t, hf_t = statistics.median(times["ours"]), statistics.median(times["hf"])
        mfu = lambda t: flops_per_token * tokens / t / (peak * 1e9)  # noqa: E731
        print(f"{name:<16}{ours_t * 1e3:>12.1f}{hf_t * 1e3:>17.1f}{hf_t / ours_t:>8.2f}x"
              f"{pair_ratios(times['ours'], times['hf']):>23}{peak:>11.0f}"
              f"{mfu(ours_t):>9.1%}{mfu(hf_t):>8.1%}")


if __name__ == "__main__":
    main()
