"""`nanoseek sample`: rejection sampling (R1's second SFT stage): N completions per problem, keep only the
verified, well-formed ones, write them as SFT-ready conversations.

    nanoseek sample --model runs/grpo/final --task arithmetic --n-prompts 1000 --num-samples 8 --out rs.jsonl
    nanoseek sft --model runs/grpo/final --data rs.jsonl ...

Each kept line is {"messages": [user, assistant], "task", "answer", "index"}; the assistant content is the full
trace "<think>\\n...\\n</think>\\nANSWER", which `nanoseek sft` trains on as the model writes it. A completion is
kept when every `--require` reward is 1 (default: the verifier and the strict format), duplicates dropped.

Resume: problems go in chunks; OUT.progress.json records the chunks finished, and is written only after their
lines are flushed to OUT. A killed run is continued with --resume: lines of an unfinished chunk are cut off and
the chunk is redone, so the file never holds a problem twice.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nanoseek.data.tasks import TaskItem
from nanoseek.errors import ConfigError
from nanoseek.train.config import add_config_arguments, config_from_args, option

HELP = "rejection sampling: N completions per problem, keep the verified, well-formed ones as SFT jsonl"
CHUNK = 32         # problems per resumable chunk


@dataclass
class SampleConfig:
    model: str = option("runs/grpo/final", "checkpoint dir (with its tokenizer) to sample from")
    out: str = option("samples.jsonl", "output jsonl of kept conversations (OUT.progress.json beside it)")
    task: str = option("arithmetic", "task name or a .jsonl/.json/.parquet problems file")
    difficulty: int = option(1, "task difficulty 1-5")
    n_prompts: int = option(100, "problems to sample")
    num_samples: int = option(8, "completions per problem (N)")
    max_new_tokens: int = option(512, "completion length cap")
    temperature: float = option(0.7, "sampling temperature")
    require: str = option("accuracy,format_strict", "rewards that must all be 1 for a completion to be kept")
    keep_per_prompt: int = option(0, "keep at most this many completions per problem; 0: all distinct ones")
    system_prompt: str | None = option(None, "system message before each problem")
    seed: int = option(0, "seed of the problems and of sampling")
    resume: bool = option(False, "continue a killed run writing OUT")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self):
        for name in ("n_prompts", "num_samples", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name!r} = {getattr(self, name)!r}: must be >= 1")
        if self.keep_per_prompt < 0 or self.temperature < 0:
            raise ConfigError("keep_per_prompt and temperature must be >= 0")

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, SampleConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(SampleConfig, args)
    stats = sample(cfg)
    print(f"sample: kept {stats['kept']} of {stats['sampled']} completions ({stats['prompts_with_any']} of "
          f"{stats['prompts']} problems have one) in {cfg.out}", flush=True)
    return 0


def full_trace(text: str) -> str:
    """A completion sampled after R1's generation prompt starts inside the think block; write it whole."""
    return "<think>\n" + text if "</think>" in text and not text.lstrip().startswith("<think>") else text


def write_traces(generate: Callable[[list[TaskItem], int], list[list[str]]], items: list[TaskItem], out: str | Path,
                 require: list[str], keep_per_prompt: int = 0, resume: bool = False, progress: bool = True) -> dict:
    """Generate completions for `items` chunk by chunk (generate(chunk, offset) -> N texts per item), keep those
    whose `require` rewards are all 1, append them to `out`. Returns counts."""
    from tqdm import tqdm

    from nanoseek.train.rollout import parse_reward_spec, score

    terms = parse_reward_spec({name: 1.0 for name in require})
    out = Path(out)
    marker = out.with_name(out.name + ".progress.json")
    done, stats = 0, {"prompts": len(items), "sampled": 0, "kept": 0, "prompts_with_any": 0, "reward_errors": 0}
    if out.exists() and not resume:
        raise ConfigError(f"{out} exists; pass --resume to continue it or choose another --out")
    if resume and marker.is_file():
        saved = json.loads(marker.read_text())
        done, stats = saved["done"], saved["stats"]
    # keep only the lines of finished chunks (a killed run may have written part of the next one)
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True) if out.exists() else []
    lines = [ln for ln in lines if ln.endswith("\n") and json.loads(ln)["index"] < done]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(lines), encoding="utf-8")
    bar = tqdm(total=len(items), initial=done, disable=not progress, unit="problem", dynamic_ncols=True)
    with open(out, "a", encoding="utf-8") as f:
        for c0 in range(done, len(items), CHUNK):
            chunk = items[c0:c0 + CHUNK]
            texts = generate(chunk, c0)                                            # (P_chunk, N)
            for i, (item, comps) in enumerate(zip(chunk, texts)):
                traces = [full_trace(t) for t in comps]
                _, parts, ok, errors = score(traces, [item] * len(traces), terms)
                stats["sampled"] += len(traces)
                stats["reward_errors"] += len(errors)
                kept, seen = 0, set()
                for j, trace in enumerate(traces):
                    if not ok[j] or trace in seen or not all(parts[n][j] == 1.0 for n in require):
                        continue
                    if keep_per_prompt and kept >= keep_per_prompt:
                        break
                    seen.add(trace)
                    kept += 1
                    f.write(json.dumps({"messages": [{"role": "user", "content": item.question},
                                                     {"role": "assistant", "content": trace}],
                                        "task": item.task, "answer": item.answer, "index": c0 + i}) + "\n")
                stats["kept"] += kept
                stats["prompts_with_any"] += kept > 0
            f.flush()
            os.fsync(f.fileno())
            done = c0 + len(chunk)
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"done": done, "stats": stats}))
            os.replace(tmp, marker)                  # the marker moves only after the chunk is on disk
            bar.update(len(chunk))
    bar.close()
    return stats


def engine_generator(llm, tokenizer, num_samples: int, max_new_tokens: int, temperature: float, seed: int,
                     system_prompt: str | None = None) -> Callable[[list[TaskItem], int], list[list[str]]]:
    """generate(items, offset) -> N texts per item from a local nanoseek engine (over-long prompts give none).
    Seeds depend on (seed, offset) only, so a resumed run redoes a chunk exactly."""
    from nanoseek.train.rollout import generate_groups

    def generate(items: list[TaskItem], offset: int) -> list[list[str]]:
        kept, _, outs, skipped = generate_groups(llm, tokenizer, items, num_samples, max_new_tokens, temperature,
                                                 seed * 1_000_003 + offset, system_prompt)
        for msg in skipped:
            print(f"warning: {msg}", flush=True)
        by_id = {id(it): [c.text for c in o.outputs] for it, o in zip(kept, outs)}
        return [by_id.get(id(it), []) for it in items]

    return generate


def sample(cfg: SampleConfig) -> dict:
    from nanoseek.data.tasks import get_task
    from nanoseek.inference.llm import LLM

    require = [r.strip() for r in cfg.require.split(",") if r.strip()]
    items = get_task(cfg.task).generate(cfg.n_prompts, seed=cfg.seed, difficulty=cfg.difficulty)
    llm = LLM(cfg.model)
    if llm.tokenizer is None:
        raise ConfigError(f"{cfg.model}: no tokenizer.json; sampling needs the checkpoint's tokenizer")
    gen = engine_generator(llm, llm.tokenizer, cfg.num_samples, cfg.max_new_tokens, cfg.temperature, cfg.seed,
                           cfg.system_prompt)
    return write_traces(gen, items, cfg.out, require, cfg.keep_per_prompt, cfg.resume, cfg.progress)
