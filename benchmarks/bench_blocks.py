"""Where a training step's time goes: forward+backward of each block of nanoseek and of transformers'
DeepseekV3ForCausalLM, side by side, on the bench_model config and weights.

Blocks: the attention block (input norm + MLA, layer 1), the MoE block (post-attention norm + gate, routed and
shared experts, layer 1), the dense MLP (layer 0), and the head + next-token loss (nanoseek's fused
`cross_entropy(..., head_weight=)`, transformers' lm_head then the same fp32 CE). Each block runs on the same
(batch, seq, hidden) input; the sides alternate, and each time is the median of --iters runs, the reported
number the median over --rounds rounds. Multiply the attention and MoE rows by their layer counts (8 and 7) to
compare with bench_model's whole step.

    python benchmarks/bench_blocks.py                 # fp32
    python benchmarks/bench_blocks.py --bf16          # under bf16 autocast
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import nanoseek
from nanoseek.train.losses import cross_entropy

from common import bench_config, hf_twin  # noqa: E402  (benchmarks/ holds scripts)


def fwd_bwd_ms(block, x: torch.Tensor, dtype, iters: int) -> float:
    """Median ms of forward + backward (of the output's sum, or of the loss) of `block` on a fresh copy of x."""
    times = []
    for _ in range(iters):
        xx = x.clone().requires_grad_()
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            y = block(xx)
        (y if y.dim() == 0 else y.float().sum()).backward()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bf16", action="store_true", help="run under bf16 autocast")
    args = p.parse_args()
    dtype = torch.bfloat16 if args.bf16 else None
    cfg = bench_config()
    with hf_twin(cfg) as (hf, d):
        ours = nanoseek.load_model(d)
    ours.train(), hf.train()
    B, T, H = args.batch, args.seq, cfg.hidden_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, H, generator=g)
    targets = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    positions = torch.arange(T)
    cos, sin = ours.model.rotary(positions)
    hf_rope = hf.model.rotary_emb(x, positions[None].expand(B, T))
    o0, o1 = ours.model.layers[0], ours.model.layers[1]
    h0, h1 = hf.model.layers[0], hf.model.layers[1]
    blocks = {
        "attention (norm + MLA)": (
            lambda v: o1.self_attn(o1.input_layernorm(v), cos, sin),
            lambda v: h1.self_attn(h1.input_layernorm(v), position_embeddings=hf_rope, attention_mask=None)[0]),
        "MoE (norm + experts)": (lambda v: o1.mlp(o1.post_attention_layernorm(v)),
                                 lambda v: h1.mlp(h1.post_attention_layernorm(v))),
        "dense MLP": (o0.mlp, h0.mlp),
        "head + loss": (lambda v: cross_entropy(v, targets, head_weight=ours.lm_head.weight),
                        lambda v: cross_entropy(hf.lm_head(v), targets)),
    }
    results = {name: {"ours": [], "hf": []} for name in blocks}
    for r in range(args.rounds):
        for name, (ours_block, hf_block) in blocks.items():
            for side, block in (("ours", ours_block), ("hf", hf_block)) if r % 2 else (("hf", hf_block),
                                                                                          ("ours", ours_block)):
                results[name][side].append(fwd_bwd_ms(block, x, dtype, args.iters))
    print(f"fwd+bwd per block, batch {B}x{T}, {'bf16 autocast' if dtype else 'fp32'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'block':<26}{'nanoseek ms':>12}{'transformers ms':>17}{'speedup':>9}")
    for name, res in results.items():
        ours_ms, hf_ms = statistics.median(res["ours"]), statistics.median(res["hf"])
        print(f"{name:<26}{ours_ms:>12.2f}{hf_ms:>17.2f}{hf_ms / ours_ms:>8.2f}x")


if __name__ == "__main__":
    main()
