"""Arithmetic, countdown and linear-equation tasks: reasoning_gym generators, strict verifiers of our own.

reasoning_gym's default `score_answer` gives partial credit when the reference is a substring of the answer
("12" scores 2/3 against "123"), and its countdown scorer runs sympy's `parse_expr` (an eval) on model text
and pays 0.01-0.05 for wrong answers. We keep its generators and verify exactly: numbers as Fractions, and
expressions through a whitelist AST evaluator (+ - * /, parentheses, unary minus, non-negative integer literals).
"""
from __future__ import annotations

import ast
from collections import Counter
from fractions import Fraction

from nanoseek.data.tasks.base import Task, TaskItem, base_seed, check_difficulty, parse_number
from nanoseek.errors import ConfigError

_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}
MAX_EXPRESSION_CHARS = 300  # a longer "expression" is not an answer; also bounds the evaluator's work


def eval_expression(text: str) -> tuple[Fraction, list[int]] | None:
    """Exact value and integer literals (in order) of an arithmetic expression, or None if it is anything else
    (names, calls, powers, floats, division by zero, ...)."""
    text = text.replace("×", "*").replace("÷", "/").replace("−", "-").replace("\\times", "*").replace("\\div", "/")
    if len(text) > MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        return None
    literals: list[int] = []

    def ev(node) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        raise ValueError(f"not allowed: {type(node).__name__}")

    try:
        return ev(tree.body), literals
    except (ValueError, ZeroDivisionError):
        return None


def _rg_items(dataset, n: int, keep) -> list[dict]:
    """The first n reasoning_gym items that pass `keep`, scanning indices in order (deterministic)."""
    out, idx = [], 0
    while len(out) < n:
        if idx > 50 * n + 200:
            raise RuntimeError(f"{type(dataset).__name__}: too few valid items ({len(out)} of {n})")
        try:
            entry = dataset[idx]
        except ValueError:  # generator gave up on this index (e.g. no expression hits the target range)
            entry = None
        idx += 1
        if entry is not None and keep(entry):
            out.append(entry)
    return out


def require_reasoning_gym() -> None:
    """One clear line instead of an ImportError traceback when the `tasks` extra is missing."""
    import importlib.util

    if importlib.util.find_spec("reasoning_gym") is None:
        raise ConfigError("the generated tasks need reasoning-gym: pip install 'nanoseek[tasks]'")


class ArithmeticTask(Task):
    """Evaluate an integer expression (+ - * / with exact divisions, parentheses, negation)."""

    name = "arithmetic"
    answer_kind = "number"
    # difficulty -> (min_terms, max_terms, min_digits, max_digits)
    LEVELS = {1: (2, 2, 1, 1), 2: (2, 3, 1, 2), 3: (3, 4, 2, 2), 4: (4, 5, 2, 3), 5: (5, 6, 3, 4)}

    def generate(self, n, seed=0, difficulty=1):
        require_reasoning_gym()
        from reasoning_gym.arithmetic.basic_arithmetic import BasicArithmeticDataset, BasicArithmeticDatasetConfig

        t0, t1, d0, d1 = self.LEVELS[check_difficulty(difficulty)]
        ds = BasicArithmeticDataset(BasicArithmeticDatasetConfig(
            min_terms=t0, max_terms=t1, min_digits=d0, max_digits=d1, seed=base_seed(self.name, seed, difficulty),
            size=10**9))

        def exact(e):  # reasoning_gym computes with floor division; keep only items where that is exact
            res = eval_expression(e["metadata"]["expression"])
            return res is not None and res[0] == int(e["answer"])

        return [TaskItem(question=e["question"] + " Give the exact integer result.", answer=e["answer"],
                         task=self.name, meta={"expression": e["metadata"]["expression"], "difficulty": difficulty,
                                               "num_terms": e["metadata"]["num_terms"],
                                               "num_digits": e["metadata"]["num_digits"]})
                for e in _rg_items(ds, n, exact)]

    def verify(self, answer, item):
        value = parse_number(answer)
        return float(value is not None and value == int(item.answer))


class CountdownTask(Task):
    """Reach a target from given numbers with + - * / and parentheses, each number at most once."""

    name = "countdown"
    answer_kind = "expression"
    # difficulty -> (min_numbers, max_numbers, max_value, min_target, max_target)
    LEVELS = {1: (3, 3, 10, 10, 100), 2: (3, 4, 25, 20, 200), 3: (4, 4, 50, 50, 500), 4: (4, 5, 100, 100, 999),
              5: (5, 6, 100, 100, 999)}

    def generate(self, n, seed=0, difficulty=1):
        require_reasoning_gym()
        from reasoning_gym.games.countdown import CountdownConfig, CountdownDataset

        n0, n1, vmax, tmin, tmax = self.LEVELS[check_difficulty(difficulty)]
        ds = CountdownDataset(CountdownConfig(min_numbers=n0, max_numbers=n1, min_value=1, max_value=vmax,
                                              min_target=tmin, max_target=tmax,
                                              seed=base_seed(self.name, seed, difficulty), size=10**9))
        items = []
        for e in _rg_items(ds, n, lambda e: True):
            numbers, target = e["metadata"]["numbers"], e["metadata"]["target"]
            item = TaskItem(
                question=(f"Using the numbers {', '.join(map(str, numbers))}, write an arithmetic expression that "
                          f"equals {target}. You may use +, -, *, / and parentheses; each number may be used at "
                          f"most once. Give only the expression."),
                answer=e["answer"], task=self.name,
                meta={"numbers": numbers, "target": target, "difficulty": difficulty})
            if self.verify(item.answer, item) != 1.0:  # never hand out an item whose reference fails our verifier
                raise RuntimeError(f"countdown reference {item.answer!r} fails verification for {numbers} -> {target}")
            items.append(item)
        return items

    def verify(self, answer, item):
        text = answer.strip().strip("$").strip()
        if "=" in text:  # "25*4 = 100" is fine when the right side is the target
            text, _, rhs = text.rpartition("=")
            if parse_number(rhs) != item.meta["target"]:
                return 0.0
        res = eval_expression(text)
        if res is None:
            return 0.0
        value, literals = res
        if Counter(literals) - Counter(item.meta["numbers"]):  # some number used more often than it was given
            return 0.0
        return float(value == item.meta["target"])


class LinearEquationsTask(Task):
    """Solve a linear equation in one variable with an integer solution."""

    name = "linear_equations"
    answer_kind = "number"
    # difficulty -> (min_terms, max_terms, max_value)
    LEVELS = {1: (2, 2, 10), 2: (2, 3, 20), 3: (3, 4, 50), 4: (3, 5, 100), 5: (4, 6, 1000)}

    def generate(self, n, seed=0, difficulty=1):
        require_reasoning_gym()
        from reasoning_gym.algebra.simple_equations import SimpleEquationsConfig, SimpleEquationsDataset

        t0, t1, vmax = self.LEVELS[check_difficulty(difficulty)]
        ds = SimpleEquationsDataset(SimpleEquationsConfig(min_terms=t0, max_terms=t1, min_value=1, max_value=vmax,
                                                          seed=base_seed(self.name, seed, difficulty), size=10**9))
        return [TaskItem(question=e["question"] + f". Give the value of {e['metadata']['variable']}.",
                         answer=e["answer"], task=self.name,
                         meta={"equation": e["metadata"]["equation"], "variable": e["metadata"]["variable"],
                               "difficulty": difficulty})
                for e in _rg_items(ds, n, lambda e: True)]

    def verify(self, answer, item):
        value = parse_number(answer, var=item.meta["variable"])
        return float(value is not None and value == int(item.answer))
