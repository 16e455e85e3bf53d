"""Rollouts for RL and rejection sampling: prompts -> G completions each from the nanoseek engine -> rewards.
(The trainer-side recomputation of the sampled tokens' log-probabilities is in `nanoseek.train.logprobs`.)

Shapes: P prompts, G completions per prompt, S = P*G sequences (group by group), L padded prompt+completion
length, T padded completion length, V vocabulary.

The engine and the trainer share one model object (`LLM(model)` keeps a reference, it copies nothing), so an
optimizer step is seen by the next rollout with no weight transfer. The engine caches no derived weights, but its
prefix cache holds KV computed by *old* weights: RL engines are built with `enable_prefix_caching=False`
(`rollout_engine`), so every rollout prefills with the current policy. Completions of one prompt still share the
prompt's blocks (forking), which is where the group's prefill savings come from.

Reward functions are user code: a call that raises or returns NaN/inf is caught, counted and reported, and the
whole group is dropped from the batch (its advantages would be meaningless); `RolloutError` stops the run only
when no group survives.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from nanoseek.data.tasks import TaskItem
from nanoseek.errors import ConfigError, NanoseekError

RewardFn = Callable[[str, TaskItem], float]


class RolloutError(NanoseekError):
    """A rollout batch has no usable group (every reward call failed, or no prompt fits the context)."""


def parse_reward_spec(spec: str | dict) -> list[tuple[str, RewardFn, float]]:
    """'accuracy=1,format_strict=0.1' (names from nanoseek.rewards.REWARDS) or {name or fn: weight} ->
    [(name, fn, weight)]."""
    from nanoseek.rewards import REWARDS

    if isinstance(spec, str):
        pairs = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, w = part.partition("=")
            try:
                pairs[name.strip()] = float(w) if w else 1.0
            except ValueError:
                raise ConfigError(f"reward spec {spec!r}: weight {w!r} of {name!r} is not a number") from None
        spec = pairs
    if not spec:
        raise ConfigError("no reward: give e.g. --reward accuracy=1,format_strict=0.1")
    terms = []
    for key, w in spec.items():
        if isinstance(key, str):
            if key not in REWARDS:
                raise ConfigError(f"unknown reward {key!r}: choose from {', '.join(REWARDS)}")
            terms.append((key, REWARDS[key], float(w)))
        else:
            terms.append((getattr(key, "__name__", repr(key)), key, float(w)))
    return terms


def rollout_engine(model, tokenizer, max_model_len: int, max_num_seqs: int = 256, compile: bool = False):
    """An LLM over the training model itself (no copy; see the module docstring for why no prefix cache).
    compile: torch.compile its decode step; the graph reads the parameters at every call, so optimizer steps
    (in place) reach it too."""
    from nanoseek.inference.llm import LLM

    return LLM(model, tokenizer, max_model_len=max_model_len, enable_prefix_caching=False,
               max_num_seqs=max_num_seqs, max_num_batched_tokens=max(1024, max_num_seqs * 8), compile=compile)


def prompt_ids(tokenizer, item: TaskItem, system_prompt: str | None = None) -> list[int]:
    """The chat prompt of a task item, ending in R1's generation prompt `<｜Assistant｜><think>\\n`."""
    from nanoseek.chat import render

    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
               [{"role": "user", "content": item.question}]
    return render(tokenizer, messages, add_generation_prompt=True)[0]


@dataclass
class Rollout:
    """G completions for each of P prompts, scored. Lists of length S are ordered group by group."""
    items: list[TaskItem]                       # (P,)
    prompts: list[list[int]]                    # (P,) token ids
    completions: list[list[int]]                # (S,) token ids, EOS included when the model stopped
    texts: list[str]                            # (S,) decoded, special tokens skipped
    truncated: list[bool]                       # (S,) hit max_new_tokens / the context
    rewards: torch.Tensor                       # (S,) weighted sum of the terms
    parts: dict[str, torch.Tensor]              # name -> (S,) each term, unweighted
    group_size: int
    seconds: float = 0.0                        # generation time
    errors: list[str] = field(default_factory=list)

    @property
    def num_groups(self) -> int:
        return len(self.items)

    def select(self, groups: list[int]) -> "Rollout":
        """The rollout restricted to the given prompt indices (whole groups)."""
        G = self.group_size
        seqs = [g * G + j for g in groups for j in range(G)]
        idx = torch.tensor(seqs, dtype=torch.long)
        return Rollout([self.items[g] for g in groups], [self.prompts[g] for g in groups],
                       [self.completions[s] for s in seqs], [self.texts[s] for s in seqs],
                       [self.truncated[s] for s in seqs],
                       self.rewards[idx], {k: v[idx] for k, v in self.parts.items()}, G, self.seconds,
                       list(self.errors))

    @staticmethod
    def concat(parts: list["Rollout"]) -> "Rollout":
        first = parts[0]
        cat = lambda name: [x for p in parts for x in getattr(p, name)]   # noqa: E731
        return Rollout(cat("items"), cat("prompts"), cat("completions"), cat("texts"), cat("truncated"),
                       torch.cat([p.rewards for p in parts]),
                       {k: torch.cat([p.parts[k] for p in parts]) for k in first.parts}, first.group_size,
                       sum(p.seconds for p in parts), cat("errors"))


def score(texts: list[str], items: list[TaskItem], terms: list[tuple[str, RewardFn, float]],
          completion_lengths: list[int] | None = None, overlong: tuple[int, int] | None = None
          ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, list[str]]:
    """Score S completions (items already repeated per completion) -> (rewards (S,), parts {name: (S,)},
    ok (S,) bool, error messages). overlong = (max_len, buffer): add DAPO's soft overlong penalty as a term."""
    from nanoseek.rewards import overlong_penalty

    S = len(texts)
    parts = {name: torch.zeros(S) for name, _, _ in terms}
    ok = torch.ones(S, dtype=torch.bool)
    errors: list[str] = []
    for s, (text, item) in enumerate(zip(texts, items)):
        for name, fn, _ in terms:
            try:
                v = float(fn(text, item))
                if not math.isfinite(v):
                    raise ValueError(f"returned {v}")
            except Exception as e:       # user code: report and drop the group, never crash the run mid-step
                errors.append(f"reward {name!r} failed ({type(e).__name__}: {e})")
                ok[s] = False
                v = 0.0
            parts[name][s] = v
    rewards = sum(w * parts[name] for name, _, w in terms)
    if overlong is not None and overlong[1] > 0 and completion_lengths is not None:
        pen = torch.tensor([overlong_penalty(n, overlong[0], overlong[1]) for n in completion_lengths])
        parts["overlong"] = pen
        rewards = rewards + pen
    return rewards, parts, ok, errors


def generate_groups(llm, tokenizer, items: list[TaskItem], group_size: int, max_new_tokens: int,
                    temperature: float = 1.0, seed: int = 0, system_prompt: str | None = None,
                    max_model_len: int | None = None, logprobs: bool = False
                    ) -> tuple[list[TaskItem], list[list[int]], list, list[str]]:
    """Sample G completions per item with the engine -> (kept items, their prompts, their outputs, skipped);
    logprobs: the outputs carry the engine's log p of each sampled token.
    Prompts that leave no room for max_new_tokens in the context are skipped and reported, not sent."""
    from nanoseek.inference.params import SamplingParams

    limit = max_model_len or llm.engine.max_model_len
    kept, prompts, skipped = [], [], []
    for item in items:
        ids = prompt_ids(tokenizer, item, system_prompt)
        if len(ids) + max_new_tokens > limit:
            skipped.append(f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the context "
                           f"({limit}); skipped: {item.question[:40]!r}")
            continue
        kept.append(item)
        prompts.append(ids)
    if not prompts:
        return [], [], [], skipped
    # one seed per prompt: the engine seeds completion j of a request with (seed, j), so a rollout is a pure
    # function of (weights, seed), whatever the batch composition. GRPO asks for no logprobs: the trainer
    # recomputes them (and mu == 1 needs none); the engine's cost ~0.25 ms a step
    params = [SamplingParams(n=group_size, temperature=temperature, max_tokens=max_new_tokens,
                             logprobs=0 if logprobs else None,
                             seed=seed * 1_000_003 + i) for i in range(len(prompts))]
    outs = llm.generate(prompts, params)
    return kept, prompts, outs, skipped


def rollout(llm, tokenizer, items: list[TaskItem], terms, group_size: int, max_new_tokens: int,
            temperature: float = 1.0, seed: int = 0, system_prompt: str | None = None,
            overlong_buffer: int = 0) -> Rollout:
    """Generate and score. Groups with a failed reward are dropped (their messages kept in .errors)."""
    t0 = time.perf_counter()
    kept, prompts, outs, errors = generate_groups(llm, tokenizer, items, group_size, max_new_tokens, temperature,
                                                  seed, system_prompt)
    seconds = time.perf_counter() - t0
    comps = [c for o in outs for c in o.outputs]
    completions = [list(c.token_ids) for c in comps]
    texts = [c.text for c in comps]
    rep = [it for it in kept for _ in range(group_size)]
    rewards, parts, ok, errs = score(texts, rep, terms, [len(c) for c in completions],
                                     (max_new_tokens, overlong_buffer))
    r = Rollout(kept, prompts, completions, texts, [c.finish_reason == "length" for c in comps], rewards,
                parts, group_size, seconds, errors + errs)
    if not kept:
        return r
    good = ok.view(-1, group_size).all(dim=1)
    if not good.all():
        r = r.select([g for g in range(len(kept)) if good[g]])
    return r
