"""Serving throughput and latency of `nanoseek serve` under 1, 8 and 32 concurrent streaming clients.

The server is the real command (`python -m nanoseek serve CKPT`, uvicorn on loopback) in its own process, over
a ~18M-param MoE checkpoint built here with random weights (benchmarks/bench_model.py's config) and a BPE
tokenizer of the same vocab trained on pseudo-words (the server streams text, so without a tokenizer it has no
text to send before the end and time to first token would be the whole request). Clients are
`openai.AsyncOpenAI` streaming /v1/completions with random token-id prompts, greedy, with `ignore_eos` so every
request generates exactly --max-tokens tokens. There is no transformers server to set
against it, so the peer is the same server fed one request at a time: the ratio is what continuous batching
buys. Reported per level: completion tokens/s and requests/s over the level's wall time, and p50/p99 time to
first token (request sent -> first streamed chunk).

    python benchmarks/bench_server.py                          # 1 (sequential), 8, 32 clients, 64+64 tokens
    python benchmarks/bench_server.py --clients 1 8 32 64 --prompt-len 128 --max-tokens 128
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch

import nanoseek
from nanoseek.accounting import count_params
from nanoseek.tokenizer import train_tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_config  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

MODEL = "bench"


def pseudo_words(n_docs: int = 3000, seed: int = 0) -> list[str]:
    """Random consonant-vowel words: enough distinct pairs that BPE fills an 8192-id vocab (the generated
    stories of nanoseek.data.pretrain run out of merges near 1.5K)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("bcdfghjklmnprstvwz") + rng.choice("aeiou") for _ in range(rng.randint(1, 4)))
             for _ in range(20000)]
    return [" ".join(rng.choice(words) for _ in range(100)) for _ in range(n_docs)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: str, port: int, max_num_seqs: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", ckpt, "--port", str(port), "--no-ui",
                             "--served-model-name", MODEL, "--max-num-seqs", str(max_num_seqs),
                             "--log-level", "warning"], env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.25)
    proc.kill()
    raise SystemExit("server did not come up in 300 s")


async def one_request(client, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    """-> (time to first chunk, total time, completion tokens) of one streamed greedy completion."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        if ttft is None and chunk.choices:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return ttft, time.perf_counter() - t0, tokens


async def run_level(client, prompts: list[list[int]], clients: int, max_tokens: int) -> dict:
    """`clients` workers each take the next prompt from a shared queue until all are served."""
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results = []

    async def worker():
        while not queue.empty():
            results.append(await one_request(client, queue.get_nowait(), max_tokens))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall": wall,
            "tok_s": tokens / wall, "req_s": len(results) / wall,
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99)}


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile of sorted xs (numpy's default method)."""
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


async def bench(port: int, args) -> list[dict]:
    import openai

    rng = random.Random(0)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                timeout=600)
    prompts = [[rng.randrange(args.vocab) for _ in range(args.prompt_len)] for _ in range(max(args.clients) * 2)]
    await one_request(client, prompts[0], 4)            # warm up: first-call allocations, lazy imports
    rows = []
    for c in args.clients:
        # enough requests that every client is busy for two rounds; one at a time, a fixed handful suffices
        n = args.sequential_requests if c == 1 else 2 * c
        rows.append(await run_level(client, prompts[:n], c, args.max_tokens))
        r = rows[-1]
        print(f"  {c:>3} clients: {r['requests']} requests in {r['wall']:.1f} s", file=sys.stderr, flush=True)
    await client.close()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels (1 = sequential)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request")
    p.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request (EOS ignored)")
    p.add_argument("--sequential-requests", type=int, default=8, help="requests served at 1 client")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--threads", type=int, default=0, help="server torch threads (0: torch's default)")
    args = p.parse_args()
    if 1 not in args.clients:
        args.clients = [1, *args.clients]              # the sequential baseline the ratios are against
    args.clients = sorted(set(args.clients))

    cfg = bench_config(args.vocab)
    counts = count_params(cfg)
    with tempfile.TemporaryDirectory() as ckpt:
        nanoseek.save_model(nanoseek.build_model(cfg, seed=0), ckpt)
        tok = train_tokenizer(texts=pseudo_words(), vocab_size=args.vocab, out_dir=ckpt, show_progress=False)
        if len(tok) != args.vocab:
            raise SystemExit(f"the tokenizer has {len(tok)} ids for a {args.vocab}-id model: choose --vocab <= 8192")
        port = free_port()
        server = start_server(ckpt, port, max_num_seqs=max(64, max(args.clients)), threads=args.threads)
        try:
            rows = asyncio.run(bench(port, args))
        finally:
            server.terminate()
            server.wait(timeout=30)

    base = rows[0]
    print(f"config: {counts.total / 1e6:.1f}M params ({counts.activated / 1e6:.1f}M activated), prompt "
          f"{args.prompt_len} + {args.max_tokens} completion tokens, greedy, streaming /v1/completions, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"{'clients':>7} {'requests':>8} {'tok/s':>8} {'req/s':>7} {'TTFT p50 ms':>11} {'TTFT p99 ms':>11} "
          f"{'tok/s vs sequential':>19}")
    for r in rows:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['tok_s']:>8.1f} {r['req_s']:>7.2f} "
              f"{1000 * r['ttft_p50']:>11.0f} {1000 * r['ttft_p99']:>11.0f} {r['tok_s'] / base['tok_s']:>18.2f}x")


if __name__ == "__main__":
    main()
