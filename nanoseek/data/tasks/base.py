"""What every verifiable task shares: the TaskItem record, the Task interface, seeding, answer extraction.

Extraction lives here, in one place, so rewards, eval and the tasks' own tests agree on what "the answer" of a
completion is: the text after `</think>`, narrowed to the last `<answer>...</answer>` if present, else (for
code) the last fenced block, else the last `\\boxed{...}`, else the last non-empty line (for numeric tasks, the
last number on it). Numbers are then parsed strictly: "42", "-3/4", "\\frac{3}{4}", "x = 5", "$1,234$" parse;
"42 apples" or "about 42" do not.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from fractions import Fraction

from nanoseek.errors import ConfigError

DIFFICULTIES = (1, 2, 3, 4, 5)  # 1 = easiest; each task maps a level to its own generator knobs
ANSWER_KINDS = ("number", "expression", "equation", "code", "math")


@dataclass
class TaskItem:
    question: str              # prompt text shown to the model (no chat template applied)
    answer: str                # a reference answer: task.verify(item.answer, item) == 1.0
    task: str                  # registry name, so rewards can find the verifier from the item alone
    meta: dict = field(default_factory=dict)  # what the verifier needs (numbers, tests, ...) and the knobs used


class Task:
    """A verifiable task: a seeded generator with a difficulty knob, and a strict verifier."""

    name: str = ""
    answer_kind: str = "number"  # how extract_answer narrows a completion for this task

    def generate(self, n: int, seed: int = 0, difficulty: int = 1) -> list[TaskItem]:
        """n items, a pure function of (n, seed, difficulty)."""
        raise NotImplementedError

    def verify(self, answer: str, item: TaskItem) -> float:
        """1.0 if `answer` (already extracted from the completion) solves `item`, else 0.0."""
        raise NotImplementedError


def check_difficulty(difficulty: int) -> int:
    if difficulty not in DIFFICULTIES:
        raise ConfigError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    return difficulty


def base_seed(task: str, seed: int, difficulty: int) -> int:
    """A 32-bit seed that is stable across processes (unlike hash()) and far apart for nearby user seeds:
    reasoning_gym seeds item i with `seed + i`, so seeds 0 and 1 would otherwise share all but one item."""
    digest = hashlib.sha256(f"{task}:{seed}:{difficulty}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# ----------------------------------------------------------------------------------------- extraction

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)
_NUMBER_RE = re.compile(r"[+-]?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?")


def after_think(completion: str) -> str | None:
    """Text after the last `</think>`; None if a think block was opened and never closed (no answer yet)."""
    if "</think>" in completion:
        return completion.rsplit("</think>", 1)[1]
    return None if "<think>" in completion else completion


def last_boxed(text: str) -> str | None:
    r"""Content of the last \boxed{...} (or \fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1] if depth == 0 else None


def last_code_block(text: str) -> str | None:
    blocks = _FENCE_RE.findall(text)
    return blocks[-1][1] if blocks else None


def extract_answer(completion: str, kind: str = "number") -> str | None:
    """The answer part of a model completion (see the module docstring), or None when there is none."""
    post = after_think(completion)
    if post is None:
        return None
    tagged = _ANSWER_RE.findall(post)
    if tagged:
        ans = tagged[-1]
        if kind == "code":
            ans = last_code_block(ans) or ans
    elif kind == "code":
        ans = last_code_block(post) or post
    elif (boxed := last_boxed(post)) is not None:
        ans = boxed
    else:
        lines = [ln for ln in post.splitlines() if ln.strip()]
        ans = lines[-1] if lines else ""
        if kind == "number":
            nums = _NUMBER_RE.findall(ans)
            ans = nums[-1].rstrip(",") if nums else ""
    return ans.strip() or None


# ----------------------------------------------------------------------------------------- numbers

_FRAC_RE = re.compile(r"^([+-]?)\\d?frac\{([+-]?\d+)\}\{([+-]?\d+)\}$")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
_DECIMAL_RE = re.compile(r"^[+-]?\d+(\.\d+)?$")
_RATIO_RE = re.compile(r"^([+-]?\d+)\s*/\s*(\d+)$")


def parse_number(text: str, var: str | None = None) -> Fraction | None:
    """Exact value of a number written alone (int, decimal, a/b, \\frac{a}{b}), or None.

    Accepts light wrapping ($...$, \\boxed{}, a trailing period, `var =` when var is given) and nothing else."""
    s = text.strip()
    for _ in range(3):  # peel wrappers in any order: "$\boxed{42}$.", "\(x = 5\)"
        s = s.rstrip(".").strip()
        if len(s) >= 2 and s[0] == s[-1] == "$":
            s = s.strip("$").strip()
        if s.startswith(("\\(", "\\[")) and s.endswith(("\\)", "\\]")):
            s = s[2:-2].strip()
        if s.startswith("\\boxed{") and s.endswith("}") and last_boxed(s) == s[7:-1]:
            s = s[7:-1].strip()
        if var is not None and (m := re.match(rf"^{re.escape(var)}\s*=\s*", s)):
            s = s[m.end():]
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    if _DECIMAL_RE.match(s):
        return Fraction(s)
    if (m := _RATIO_RE.match(s)) or (m := _FRAC_RE.match(s)):
        groups = m.groups()
        sign = -1 if len(groups) == 3 and groups[0] == "-" else 1
        num, den = int(groups[-2]), int(groups[-1])
        return None if den == 0 else sign * Fraction(num, den)
    return None
