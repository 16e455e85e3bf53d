"""Decode throughput: nanoseek.LLM against transformers' generate on the same checkpoint, prompts and precision.

One ~18M-parameter MoE checkpoint (hidden 256, 8 layers, 16 experts top-4, vocab 8192) is written by transformers
and loaded by nanoseek through the real converter. Both sides decode greedily from the same random 32-token prompts
to exactly 128 new tokens (EOS ignored), at batch 1 and batch 16; runs are interleaved and the best of --repeats
is kept. Printed: tokens/s for both, the ratio, whether the greedy tokens agree (random weights give near-tied
logits, so an fp32 rounding difference may flip one), and KV-cache bytes per token measured from each side's
cache tensors (transformers 5.x also caches MLA's latent for DeepSeek-V3, decompressing it every step).

    python benchmarks/bench_decode.py                      # fp32, batch 1 and 16
    python benchmarks/bench_decode.py --dtype bf16 --compile --threads 1
"""
from __future__ import annotations

import argparse
import time

import torch

import nanoseek

from common import bench_config, hf_twin  # noqa: E402  (benchmarks/ holds scripts)


def hf_cache_bytes_per_token(hf, vocab: int) -> int:
    """Bytes per token of transformers' KV cache, from its tensors after a 16-token forward."""
    with torch.no_grad():
        cache = hf(torch.randint(0, vocab, (1, 16)), use_cache=True).past_key_values
    tensors = []
    for layer in getattr(cache, "layers", []):
        tensors += [layer.keys, layer.values]
    if not tensors:
        tensors = list(cache.key_cache) + list(cache.value_cache)
    return sum(t.numel() * t.element_size() for t in tensors) // 16


def time_hf(hf, ids: torch.Tensor, new: int) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        t = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0)
        return time.perf_counter() - t, out[:, ids.shape[1]:]


def time_ours(llm, ids: torch.Tensor, new: int) -> tuple[float, torch.Tensor]:
    params = nanoseek.SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(ids.tolist(), params)
    return time.perf_counter() - t, torch.tensor([o.outputs[0].token_ids for o in outs])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile nanoseek's decode step")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    cfg = bench_config(args.vocab)
    with hf_twin(cfg) as (hf, d):                   # same weights on both sides, through the real converter
        llm = nanoseek.LLM(d, dtype=dtype, max_model_len=args.prompt_len + args.new_tokens + 8, compile=args.compile)
    hf = hf.to(dtype).eval()
    n_params = sum(p.numel() for p in llm.model.parameters())
    print(f"config: {n_params / 1e6:.1f}M params, {args.dtype}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {torch.get_num_threads()} threads, compile={args.compile}, "
          f"{args.prompt_len}-token prompts, {args.new_tokens} new tokens (greedy, EOS ignored)")
    ours_bpt, hf_bpt = llm.engine.kv_cache_bytes_per_token(), hf_cache_bytes_per_token(hf, args.vocab)
    full = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (
        4 if args.dtype == "fp32" else 2)
    print(f"KV cache bytes/token (measured from the cache tensors): nanoseek {ours_bpt}, transformers {hf_bpt}; "
          f"full per-head K/V would be {full} ({full / ours_bpt:.1f}x the latent)")
    print(f"{'batch':>5}{'nanoseek tok/s':>16}{'transformers tok/s':>20}{'speedup':>9}{'same tokens':>13}")
    g = torch.Generator().manual_seed(0)
    for B in args.batches:
        ids = torch.randint(3, args.vocab, (B, args.prompt_len), generator=g)
        time_ours(llm, ids, 4)                         # warm-up (and compilation, when asked)
        time_hf(hf, ids, 4)
        best = {"ours": float("inf"), "hf": float("inf")}
        for i in range(args.repeats):
            for side in (("ours", "hf") if i % 2 == 0 else ("hf", "ours")):
                t, toks = (time_ours(llm, ids, args.new_tokens) if side == "ours"
                           else time_hf(hf, ids, args.new_tokens))
                best[side] = min(best[side], t)
                if side == "ours":
                    ours_toks = toks
                else:
                    hf_toks = toks
        same = (ours_toks == hf_toks).all(dim=1).sum().item()
        n = B * args.new_tokens
        print(f"{B:>5}{n / best['ours']:>16.1f}{n / best['hf']:>20.1f}{best['hf'] / best['ours']:>8.2f}x"
              f"{f'{same}/{B}':>13}")


if __name__ == "__main__":
    main()
