"""`nanoseek eval`: pass@1, maj@k (cons@k) and pass@k of a checkpoint or an OpenAI-compatible endpoint.

    nanoseek eval --model runs/demo/final --task countdown --n 300 --seed 1 --json
    nanoseek eval --model ckpt --task gsm8k_test.jsonl --n 0 --k 8 --temperature 0.6 --top-p 0.95
    nanoseek eval --endpoint http://127.0.0.1:8000/v1 --task arithmetic --n 100 --k 4 --temperature 0.6

Problems are `get_task(TASK).generate(n, seed, difficulty)`: the same N fresh problems for the same seed, so a run
reproduces a training report's held-out numbers. Defaults are greedy with one sample (a pass@1 that does not
depend on sampling); R1 reports pass@1 at temperature 0.6, top-p 0.95 over k samples, which the flags give.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

from nanoseek.train.config import add_config_arguments, config_from_args, option

HELP = "evaluate a checkpoint or an OpenAI-compatible endpoint on a task: pass@1, maj@k (cons@k), pass@k"


@dataclass
class EvalConfig:
    model: str | None = option(None, "checkpoint dir (config.json, *.safetensors, tokenizer.json), run in-process")
    endpoint: str | None = option(None, "OpenAI-compatible server URL instead of --model, e.g. "
                                        "http://127.0.0.1:8000/v1")
    api_key: str | None = option(None, "bearer key for --endpoint; None: $NANOSEEK_API_KEY or $OPENAI_API_KEY")
    served_model: str | None = option(None, "model id to request from --endpoint; None: the first of /v1/models")
    task: str = option("arithmetic", "task name (arithmetic, countdown, linear_equations, chemistry, python_code) "
                                     "or a .jsonl/.json/.parquet problem file")
    n: int = option(100, "problems to evaluate; 0: every problem of a file, in file order")
    seed: int = option(0, "seed of the problem set and of the sampling")
    difficulty: int = option(1, "task difficulty, 1 (easiest) to 5")
    k: int = option(1, "samples per problem (pass@1 averages them; maj@k and pass@k use them)")
    temperature: float = option(0.0, "sampling temperature; 0: greedy")
    top_p: float = option(1.0, "nucleus sampling mass, in (0, 1]")
    max_new_tokens: int = option(256, "tokens to generate at most per completion")
    system: str | None = option(None, "system prompt placed before each problem")
    concurrency: int = option(8, "--endpoint: requests in flight at once")
    dtype: str = option("float32", "--model: weights dtype", ("float32", "bfloat16", "float16"))
    device: str | None = option(None, "--model: cpu or cuda; None: cuda when available")
    json: bool = option(False, "print one JSON object instead of the table")
    samples_out: str | None = option(None, "write each problem's completions, answers and scores to this .jsonl")
    progress: bool = option(True, "show a progress bar (on stderr)")

    def __post_init__(self):
        from nanoseek.errors import ConfigError

        def bad(name: str, why: str):
            raise ConfigError(f"option --{name.replace('_', '-')} = {getattr(self, name)!r}: {why}")

        for name in ("k", "max_new_tokens", "concurrency"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            bad("dtype", "choose one of float32, bfloat16, float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, EvalConfig)


def load_items(task: str, n: int, seed: int, difficulty: int):
    """The problems of a run: n fresh ones from the task's generator, or (n=0) every problem of a file."""
    from nanoseek.data.tasks import get_task
    from nanoseek.errors import ConfigError

    t = get_task(task)
    if n == 0:
        if getattr(t, "items", None) is None:
            raise ConfigError(f"--n 0 (every problem) needs a problem file; task {task!r} is generated: give --n N")
        return list(t.items)
    if n < 0:
        raise ConfigError(f"--n must be >= 0, got {n}")
    return t.generate(n, seed=seed, difficulty=difficulty)


def format_table(res: dict) -> str:
    k = res["k"]
    rows = [("task", res["task"]), ("problems", res["n"]), ("samples/problem (k)", k), ("seed", res["seed"]),
            ("temperature / top-p", f"{res['temperature']} / {res['top_p']}"),
            (f"pass@1 (mean of {k})", f"{100 * res['pass_at_1']:.1f}%"),
            (f"maj@{k} (cons@{k})", f"{100 * res['maj_at_k']:.1f}%"),
            (f"pass@{k}", f"{100 * res['pass_at_k']:.1f}%"),
            ("answered", f"{100 * res['answered']:.1f}%"),
            ("mean response tokens", f"{res['mean_response_tokens']:.1f}"),
            ("wall seconds", f"{res['wall_seconds']:.1f}")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run(args: argparse.Namespace) -> int:
    from nanoseek.errors import ConfigError
    from nanoseek.eval.run import Endpoint, evaluate

    cfg = config_from_args(EvalConfig, args)
    if (cfg.model is None) == (cfg.endpoint is None):
        raise ConfigError("give exactly one of --model PATH (a checkpoint) or --endpoint URL (a server)")
    items = load_items(cfg.task, cfg.n, cfg.seed, cfg.difficulty)
    if cfg.endpoint is not None:
        key = cfg.api_key or os.environ.get("NANOSEEK_API_KEY") or os.environ.get("OPENAI_API_KEY")
        target, engine = Endpoint(cfg.endpoint, key, cfg.served_model, cfg.concurrency), {}
    else:
        target, engine = cfg.model, {"dtype": cfg.dtype, "device": cfg.device}
    res = evaluate(target, items, k=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p,
                   max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, system=cfg.system, progress=cfg.progress,
                   return_samples=cfg.samples_out is not None, **engine)
    res.update(task=cfg.task, difficulty=cfg.difficulty, model=cfg.model or cfg.endpoint)
    if cfg.samples_out is not None:
        with open(cfg.samples_out, "w") as f:
            for rec in res.pop("samples"):
                f.write(json.dumps(rec) + "\n")
    print(json.dumps(res) if cfg.json else format_table(res))
    return 0
