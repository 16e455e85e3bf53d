"""Problems from a file (jsonl, json array, or parquet) with a question and an answer, checked by math-verify.

Reference answers are normalized at load time: GSM8K's "... #### 72" keeps "72" (commas dropped), a MATH
solution keeps the content of its last \\boxed{}, anything else is used as written. Checking is math-verify's
`verify(parse(gold), parse(answer))`, so "0.5" matches "\\frac{1}{2}" while "72.5" and "720" do not match "72".
Bad input raises DataError naming the file and the line (jsonl), item (json) or column (parquet).
"""
from __future__ import annotations

import json
import random
import threading
from pathlib import Path

from nanoseek.data.tasks.base import Task, TaskItem, check_difficulty, last_boxed
from nanoseek.errors import ConfigError, DataError
from nanoseek.data.pretrain import iter_jsonl

QUESTION_KEYS = ("question", "problem", "prompt", "input")
ANSWER_KEYS = ("answer", "solution", "final_answer", "output")
SUFFIXES = (".jsonl", ".json", ".parquet")


def gold_answer(raw) -> tuple[str, str]:
    """(normalized reference answer, format name) from a GSM8K/MATH/plain answer field."""
    text = str(raw).strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", ""), "gsm8k"
    if (boxed := last_boxed(text)) is not None:
        return boxed.strip(), "math"
    return text, "plain"


def _pick(keys, wanted: str | None, defaults: tuple[str, ...], path, what: str) -> str:
    if wanted is not None:
        return wanted
    for k in defaults:
        if k in keys:
            return k
    raise DataError(f"{path}: no {what} field (looked for {', '.join(defaults)}; found {', '.join(map(str, keys))});"
                    f" pass {what}_key=")


def _rows_jsonl(path: Path):
    for obj, lineno, _, _ in iter_jsonl(path):
        yield f"{path}:{lineno}", obj


def _rows_json(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise DataError(f"{path}{where}: not valid JSON ({getattr(e, 'msg', 'not UTF-8')})") from None
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise DataError(f"{path}: expected a JSON array of objects")
    for i, obj in enumerate(data):
        yield f"{path}: item {i}", obj


def _rows_parquet(path: Path, question_key, answer_key):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError family for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    names = list(table.column_names)
    q = _pick(names, question_key, QUESTION_KEYS, path, "question")
    a = _pick(names, answer_key, ANSWER_KEYS, path, "answer")
    for col in (q, a):
        if col not in names:
            raise DataError(f"{path}: no column {col!r} (columns: {', '.join(names)})")
    columns = table.select([q, a]).to_pydict()
    for i, (qv, av) in enumerate(zip(columns[q], columns[a])):
        yield f"{path}: row {i}", {q: qv, a: av}


def load_problems(path, question_key: str | None = None, answer_key: str | None = None) -> list[TaskItem]:
    """Every row of the file as a TaskItem of task "file"."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(SUFFIXES)}")
    if path.suffix == ".parquet":
        rows = _rows_parquet(path, question_key, answer_key)
    else:
        rows = _rows_jsonl(path) if path.suffix == ".jsonl" else _rows_json(path)
    items, q, a = [], question_key, answer_key
    for where, obj in rows:
        q = q or _pick(list(obj), None, QUESTION_KEYS, where, "question")
        a = a or _pick(list(obj), None, ANSWER_KEYS, where, "answer")
        for key in (q, a):
            if key not in obj or obj[key] is None:
                raise DataError(f"{where}: no {key!r} field (keys: {', '.join(list(obj)[:8])})")
        gold, fmt = gold_answer(obj[a])
        if not isinstance(obj[q], str) or not gold:
            raise DataError(f"{where}: {q!r} must be a string and {a!r} non-empty")
        items.append(TaskItem(question=obj[q], answer=gold, task="file",
                              meta={"source": str(path), "where": where, "format": fmt}))
    if not items:
        raise DataError(f"{path}: no problems in this file")
    return items


def math_verify_score(answer: str, gold: str) -> float:
    """1.0 if math-verify finds `answer` equal to `gold`. Both are parsed as \\boxed{...} content first (the
    extracted answer *is* the content); the answer is also tried as free text ("The answer is 72")."""
    from math_verify import parse, verify

    # math-verify times out with signal.alarm, which only works on the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    if not gold_parsed:
        return 0.0
    for text in (f"\\boxed{{{answer}}}", answer):
        pred = parse(text, parsing_timeout=timeout)
        if pred and verify(gold_parsed, pred, timeout_seconds=timeout):
            return 1.0
    return 0.0


class FileTask(Task):
    """Problems from a file; `generate` draws a seeded permutation (repeated past one epoch). Registered
    without a path as "file", which can still verify any item loaded from a file."""

    name = "file"
    answer_kind = "math"

    def __init__(self, path=None, question_key: str | None = None, answer_key: str | None = None):
        self.path = path
        self.items = load_problems(path, question_key, answer_key) if path is not None else None

    def generate(self, n, seed=0, difficulty=1):
        check_difficulty(difficulty)  # files have no difficulty knob; accept the default range only
        if self.items is None:
            raise ConfigError("task 'file' needs a data file: pass --task PATH.jsonl (or .json/.parquet)")
        rng, out = random.Random(seed), []
        while len(out) < n:
            order = list(range(len(self.items)))
            rng.shuffle(order)
            out += [self.items[i] for i in order[:n - len(out)]]
        return out

    def verify(self, answer, item):
        return math_verify_score(answer, item.answer)
