"""Rewards for RL on verifiable tasks: pure functions of (completion text, TaskItem) -> float.

R1's chat template ends the generation prompt with "<think>\\n", so a sampled completion usually starts *inside*
the think block ("...reasoning...\\n</think>\\n answer"); a completion that repeats the opening tag is also
accepted. Both format rewards handle the two shapes.

    format_reward_strict   1.0 for exactly "<think>\\n" (optional, see above) + reasoning + "\\n</think>\\n" + answer
    format_reward_soft     1.0 for one closed think block followed by a non-empty answer, spacing free
    accuracy_reward        the item's task verifier on the extracted answer (math-verify for file problems)
    code_reward            the item's unit tests run on the extracted code in the sandbox
    overlong_penalty       DAPO's soft overlong punishment, a function of the length in tokens
    combine_rewards        weighted sum of named rewards, e.g. {"accuracy": 1.0, "format_strict": 0.1}
"""
from __future__ import annotations

import re
from typing import Callable

from nanoseek.data.tasks import TaskItem, extract_answer, get_task
from nanoseek.data.tasks.python_code import run_tests
from nanoseek.errors import ConfigError

Reward = Callable[[str, TaskItem], float]

_STRICT_RE = re.compile(r"(?:<think>\n)?(?P<think>.*?)\n</think>\n(?P<answer>.*)", re.DOTALL)


def _answer_ok(answer: str) -> bool:
    """A non-empty answer section with no stray think tags and at most one well-formed <answer> block."""
    if not answer.strip() or "<think>" in answer or "</think>" in answer:
        return False
    n_open, n_close = answer.count("<answer>"), answer.count("</answer>")
    if n_open != n_close or n_open > 1:
        return False
    return n_open == 0 or bool(re.search(r"<answer>\s*\S.*?</answer>", answer, re.DOTALL))


def format_reward_strict(completion: str, item: TaskItem | None = None) -> float:
    """1.0 for `[<think>\\n]REASONING\\n</think>\\nANSWER`: non-empty reasoning without think tags, newlines exactly
    there, and an answer as in `_answer_ok`; else 0.0."""
    m = _STRICT_RE.fullmatch(completion)
    if not m:
        return 0.0
    think = m.group("think")
    if not think.strip() or "<think>" in think or "</think>" in think:
        return 0.0
    return float(_answer_ok(m.group("answer")))


def format_reward_soft(completion: str, item: TaskItem | None = None) -> float:
    """1.0 when one think block (opening tag optional, as above; spacing and preamble free) closes once and a
    non-empty answer without think tags follows."""
    if completion.count("</think>") != 1 or completion.count("<think>") > 1:
        return 0.0
    before, after = completion.split("</think>")
    return float("<think>" not in after and bool(after.strip()))


def accuracy_reward(completion: str, item: TaskItem) -> float:
    """The task's verifier on the answer extracted from the completion (0.0 when there is none)."""
    task = get_task(item.task)
    answer = extract_answer(completion, task.answer_kind)
    return 0.0 if answer is None else task.verify(answer, item)


def code_reward(completion: str, item: TaskItem, timeout_s: float = 5.0) -> float:
    """Run the item's unit tests (meta "tests"/"expected", as python_code items carry) on the completion's code
    in the sandbox: 1.0 if all pass. 0.0 for items without tests."""
    if "tests" not in item.meta or "entry_point" not in item.meta:
        return 0.0
    code = extract_answer(completion, "code")  # already the last fenced block, when there is one
    return 0.0 if code is None else run_tests(code, item, timeout_s=timeout_s)


def overlong_penalty(length: int, max_len: int, cache_len: int) -> float:
    """DAPO soft overlong punishment (arXiv 2503.14476, eq. 13): 0 up to max_len - cache_len tokens, then
    linear down to -1 at max_len, and -1 beyond."""
    if not 0 <= cache_len <= max_len:
        raise ConfigError(f"cache_len must be in [0, max_len={max_len}], got {cache_len}")
    start = max_len - cache_len
    if length <= start:
        return 0.0
    if length > max_len:
        return -1.0
    return (start - length) / cache_len


REWARDS: dict[str, Reward] = {"format_strict": format_reward_strict, "format_soft": format_reward_soft,
                              "accuracy": accuracy_reward, "code": code_reward}


class CombinedReward:
    """sum_i w_i * r_i(completion, item); `parts` returns each named term (unweighted) for logging."""

    def __init__(self, weights: dict[str | Reward, float]):
        if not weights:
            raise ConfigError("combine_rewards needs at least one reward, e.g. {'accuracy': 1.0}")
        self.terms: list[tuple[str, Reward, float]] = []
        for key, w in weights.items():
            if isinstance(key, str):
                if key not in REWARDS:
                    raise ConfigError(f"unknown reward {key!r}: choose from {', '.join(REWARDS)}")
                self.terms.append((key, REWARDS[key], float(w)))
            else:
                self.terms.append((getattr(key, "__name__", repr(key)), key, float(w)))

    def parts(self, completion: str, item: TaskItem) -> dict[str, float]:
        return {name: fn(completion, item) for name, fn, _ in self.terms}

    def __call__(self, completion: str, item: TaskItem) -> float:
        return sum(w * fn(completion, item) for _, fn, w in self.terms if w != 0.0)


def combine_rewards(weights: dict[str | Reward, float]) -> CombinedReward:
    """A reward that is the weighted sum of rewards named in REWARDS (or given as functions)."""
    return CombinedReward(weights)
