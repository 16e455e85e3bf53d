"""Verifiable tasks for RL and eval: seeded generators with a difficulty knob, and strict verifiers.

    task = get_task("countdown")                     # or a data file: get_task("gsm8k_test.jsonl")
    items = task.generate(n=64, seed=0, difficulty=2)  # list[TaskItem]; a pure function of its arguments
    task.verify(extract_answer(completion, task.answer_kind), items[0])  # 1.0 or 0.0
    verify(answer, item)                             # the same, dispatched on item.task

Tasks: arithmetic, countdown, linear_equations (reasoning_gym generators, our verifiers), chemistry (balance
an equation), python_code (unit tests in the sandbox), file (jsonl/json/parquet problems, math-verify).
"""
from __future__ import annotations

from nanoseek.data.tasks.arithmetic import ArithmeticTask, CountdownTask, LinearEquationsTask, eval_expression
from nanoseek.data.tasks.base import (DIFFICULTIES, Task, TaskItem, extract_answer, last_boxed, last_code_block,
                                      parse_number)
from nanoseek.data.tasks.chemistry import ChemistryTask
from nanoseek.data.tasks.files import SUFFIXES, FileTask, load_problems, math_verify_score
from nanoseek.data.tasks.python_code import PythonCodeTask
from nanoseek.errors import ConfigError

TASKS: dict[str, Task] = {t.name: t for t in (ArithmeticTask(), CountdownTask(), LinearEquationsTask(),
                                                ChemistryTask(), PythonCodeTask(), FileTask())}


def get_task(name: str, **kwargs) -> Task:
    """A registered task by name, or a FileTask for a path ending in .jsonl/.json/.parquet (kwargs:
    question_key, answer_key); `get_task("file", path=...)` is the same."""
    if name == "file" and "path" in kwargs:
        return FileTask(**kwargs)
    if name.endswith(SUFFIXES):
        return FileTask(name, **kwargs)
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}, or a "
                          f"{'/'.join(SUFFIXES)} file")
    if kwargs:
        raise ConfigError(f"task {name!r} takes no options (got {', '.join(kwargs)})")
    return TASKS[name]


def verify(answer: str | None, item: TaskItem) -> float:
    """Score an extracted answer against an item with its task's verifier (0.0 for no answer)."""
    return 0.0 if answer is None else get_task(item.task).verify(answer, item)


__all__ = ["TASKS", "DIFFICULTIES", "Task", "TaskItem", "get_task", "verify", "extract_answer", "parse_number",
           "last_boxed", "last_code_block", "eval_expression", "load_problems", "math_verify_score",
           "ArithmeticTask", "CountdownTask", "LinearEquationsTask", "ChemistryTask", "PythonCodeTask", "FileTask"]
