"""Verifiable tasks: references score 1, near misses score 0, generators are seeded and get harder."""
import json
import statistics
import sys
import types

import pytest

from nanoseek.data.tasks import (DIFFICULTIES, TASKS, FileTask, eval_expression, get_task, load_problems,
                                 parse_number, verify)
from nanoseek.data.tasks.chemistry import REACTIONS, atoms, balance
from nanoseek.data.tasks.python_code import run_tests
from nanoseek.errors import ConfigError, DataError

GENERATED = ["arithmetic", "countdown", "linear_equations", "chemistry", "python_code"]


def _assert_all_zero(task, item, wrong):
    assert len(wrong) >= 5
    for w in wrong:
        assert task.verify(w, item) == 0.0, f"{task.name}: {w!r} scored for reference {item.answer!r}"


@pytest.mark.parametrize("name", GENERATED)
def test_references_score_one_at_every_difficulty(name):
    task = get_task(name)
    n = 2 if name == "python_code" else 6  # python_code verification runs the sandbox
    for d in DIFFICULTIES:
        for item in task.generate(n, seed=3, difficulty=d):
            assert item.task == name and item.question
            assert task.verify(item.answer, item) == 1.0, item
            assert verify(item.answer, item) == 1.0


@pytest.mark.parametrize("name", GENERATED)
def test_generators_are_deterministic_by_seed(name):
    task = get_task(name)
    a, b, c = (task.generate(8, seed=s, difficulty=2) for s in (7, 7, 8))
    assert a == b
    assert [i.question for i in a] != [i.question for i in c]


def _mean(items, f):
    return statistics.mean(f(i) for i in items)


@pytest.mark.parametrize("name,measure", [
    ("arithmetic", lambda i: i.meta["num_terms"] + i.meta["num_digits"]),
    ("countdown", lambda i: len(i.meta["numbers"]) + max(i.meta["numbers"]) / 100),
    ("linear_equations", lambda i: len(i.meta["equation"])),
    ("chemistry", lambda i: sum(i.meta["coefficients"])),
    ("python_code", lambda i: i.meta["level"]),
])
def test_harder_with_difficulty(name, measure):
    task = get_task(name)
    means = [_mean(task.generate(30, seed=0, difficulty=d), measure) for d in (1, 3, 5)]
    assert means[0] < means[1] < means[2], means


def test_arithmetic_near_misses():
    task = get_task("arithmetic")
    item = next(i for i in task.generate(20, seed=1, difficulty=3) if abs(int(i.answer)) > 10)
    a = int(item.answer)
    assert task.verify(f" {a}. ", item) == task.verify(f"$\\boxed{{{a}}}$", item) == 1.0
    assert task.verify(f"{a}.0", item) == 1.0  # the same number, not a near miss
    _assert_all_zero(task, item, [str(a + 1), str(a - 1), str(-a), str(a) + "0", f"{a}.5", f"{a} apples",
                                  f"{a} or {a + 1}", str(a)[:-1] or "0", ""])


def test_countdown_near_misses():
    task = get_task("countdown")
    item = task.generate(1, seed=0, difficulty=3)[0]
    ref, nums, target = item.answer, item.meta["numbers"], item.meta["target"]
    assert task.verify(f"{ref} = {target}", item) == 1.0
    assert task.verify(f"({ref}) * {nums[0]} / {nums[0]}", item) == 0.0  # right value, but reuses a number
    flipped = ref.replace("+", "-", 1) if "+" in ref else ref.replace("-", "+", 1)
    assert eval_expression(flipped)[0] != target
    unused = next(k for k in range(100, 200) if k not in nums)
    _assert_all_zero(task, item, [
        flipped,                              # wrong operator: wrong value
        f"{ref} + {unused} - {unused}",       # right value, uses a number it was not given (twice)
        f"{ref} + 0",                         # right value, 0 was not given
        str(target) if target not in nums else f"{target} + 1",
        f"{ref} = {target + 1}",              # claims the wrong target
        f"({ref}) ** 1", f"abs({ref})", "__import__('os').system('true')", ""])


def test_linear_equation_near_misses():
    task = get_task("linear_equations")
    item = task.generate(1, seed=0, difficulty=2)[0]
    a, var = int(item.answer), item.meta["variable"]
    other = "q" if var != "q" else "z"
    assert task.verify(f"{var} = {a}", item) == 1.0
    _assert_all_zero(task, item, [str(a + 1), str(-a), f"{a}/2", f"{a}.1", f"{other} = {a}", f"{var} = {a + 1}",
                                  f"{a * 10}"])


def test_chemistry_near_misses():
    task = get_task("chemistry")
    item = next(i for i in task.generate(20, seed=0, difficulty=2) if max(i.meta["coefficients"]) > 1)
    r, p, c = item.meta["reactants"], item.meta["products"], item.meta["coefficients"]

    def eq(coefs, left=r, right=p, arrow="->"):
        terms = [f"{k} {s}" for k, s in zip(coefs, left + right)]
        return " + ".join(terms[:len(left)]) + f" {arrow} " + " + ".join(terms[len(left):])

    assert task.verify(eq(c, arrow="→"), item) == 1.0
    assert task.verify(eq(c[:len(r)][::-1] + c[len(r):], left=r[::-1]), item) == 1.0  # order within a side free
    assert task.verify(eq(c, left=[s + "(aq)" for s in r]), item) == 1.0  # state symbols are allowed
    bumped = list(c)
    bumped[0] += 1
    _assert_all_zero(task, item, [
        eq([2 * k for k in c]),                      # balanced but not in lowest terms
        eq(bumped),                                  # unbalanced
        eq([1] * len(c)),                            # unbalanced (some coefficient > 1)
        eq(c[len(r):] + c[:len(r)], left=p, right=r),  # sides swapped
        eq([0] + c[1:]),                             # zero coefficient
        eq(c).replace(r[0], r[0] + "2", 1),          # a different species
        eq(c[:-1], right=p[:-1]) if len(p) > 1 else eq(c[1:], left=r[1:]),  # a species missing
        eq(c).replace("->", "+"),                    # no arrow
    ])


def test_every_reaction_balances_uniquely():
    for reactants, products in REACTIONS:
        coefs = balance(reactants.split(), products.split())
        assert min(coefs) > 0
    assert atoms("Al2(SO4)3") == {"Al": 2, "S": 3, "O": 12}
    assert balance(["Fe", "O2"], ["Fe2O3"]) == [4, 3, 2]  # hand-checked
    assert balance(["C3H8", "O2"], ["CO2", "H2O"]) == [1, 5, 3, 4]
    with pytest.raises(ValueError):
        balance(["H2", "O2"], ["H2O", "H2O2"])  # two independent reactions: not unique


def test_python_code_near_misses():
    task = get_task("python_code")
    item = task.generate(1, seed=0, difficulty=3)[0]
    name, first = item.meta["entry_point"], item.meta["tests"][0]
    fenced = f"Here you go:\n```python\n{item.answer}```\n"
    assert task.verify(fenced, item) == 1.0
    cheat = "[" + ", ".join('["ok", 0]' for _ in item.meta["tests"]) + "]"
    _assert_all_zero(task, item, [
        f"def {name}(*args):\n    return None\n",
        f"def {name}(*args)\n    return 1\n",  # syntax error
        f"{item.answer}\n_ref = {name}\ndef {name}(*a):\n    return [_ref(*a)]\n",  # right value, wrong type
        f"{item.answer}\n_ref = {name}\ndef {name}(*a):\n    return 'x' if list(a) == {first!r} else _ref(*a)\n",
        f"import sys\nprint('@@NANOSEEK_RESULTS@@{cheat}')\nsys.exit(0)\n",  # fakes a result line and exits
        f"{item.answer}\nprint(open('/etc/passwd').read())\n",  # correct, but touches what it must not
    ])
    assert run_tests(f"def {name}(*a):\n    while True:\n        pass\n", item, timeout_s=1.0) == 0.0


def test_parse_number_is_strict():
    assert parse_number("42") == 42 and parse_number("-3/4") == parse_number("\\frac{-3}{4}") == -0.75
    assert parse_number("$1,234$") == 1234 and parse_number("x = 5", var="x") == 5
    for bad in ["42 apples", "4 2", "x = 5", "1,23", "0x10", "1e3", "3/0", "--4", ""]:
        assert parse_number(bad) is None, bad


# ------------------------------------------------------------------------------------------- file problems

def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gsm8k_jsonl_with_math_verify(tmp_path):
    path = _write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Tom has 1,000 apples and buys 234 more. How many?", "answer": "1000 + 234 = 1234\n#### 1,234"},
        {"question": "What is 6 times 7?", "answer": "6*7=42\n#### 42"}])
    task = get_task(str(path))
    items = task.generate(5, seed=0)
    assert len(items) == 5 and {i.answer for i in items} == {"1234", "42"}  # cycles past one epoch
    item = next(i for i in items if i.answer == "1234")
    assert item.task == "file" and item.meta["format"] == "gsm8k"
    for good in ["1234", "1,234", "1234.0", "\\boxed{1234}"]:
        assert task.verify(good, item) == 1.0, good
    _assert_all_zero(task, item, ["1235", "123.4", "12340", "-1234", "1233.99", "42"])
    assert verify("1234", item) == 1.0  # the registered "file" task verifies without the file


def test_math_json_with_boxed_solutions(tmp_path):
    path = tmp_path / "math.jsonl"
    _write_jsonl(path, [{"problem": "Compute 1/2.", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
                        {"problem": "Solve x^2=4, x>0.", "solution": "So $x = \\boxed{2}$."}])
    items = load_problems(path)
    half = items[0]
    assert half.answer == "\\frac{1}{2}" and half.meta["format"] == "math"
    task = get_task("file")
    for good in ["0.5", "1/2", "\\frac{1}{2}", "\\dfrac{1}{2}"]:
        assert task.verify(good, half) == 1.0, good
    _assert_all_zero(task, half, ["\\frac{1}{3}", "2", "\\frac{2}{1}", "-\\frac{1}{2}", "0.51", "1/2 + 1"])


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n{"question": oops}\n')
    with pytest.raises(DataError) as e:
        load_problems(path)
    msg = str(e.value)
    assert f"{path}:2:" in msg and "\n" not in msg
    path.write_text('{"question": "q", "answer": "1"}\n{"question": "q2"}\n')
    with pytest.raises(DataError, match=r":2: no 'answer' field"):
        load_problems(path)


def _fake_pyarrow(monkeypatch, columns: dict):
    """A stand-in for pyarrow.parquet exposing only what the loader uses (pyarrow is optional)."""
    class Table:
        column_names = list(columns)

        def select(self, names):
            sub = Table()
            sub.column_names, sub._cols = names, {n: columns[n] for n in names}
            return sub

        def to_pydict(self):
            return getattr(self, "_cols", columns)

    pq = types.ModuleType("pyarrow.parquet")
    pq.read_table = lambda path: Table()
    pa = types.ModuleType("pyarrow")
    pa.parquet = pq
    monkeypatch.setitem(sys.modules, "pyarrow", pa)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", pq)


def test_parquet_missing_column_names_file_and_column(tmp_path, monkeypatch):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    _fake_pyarrow(monkeypatch, {"question": ["1+1?"], "answer": ["#### 2"]})
    assert load_problems(path)[0].answer == "2"
    with pytest.raises(DataError, match=r"data.parquet: no column 'target' \(columns: question, answer\)"):
        load_problems(path, answer_key="target")
    _fake_pyarrow(monkeypatch, {"question": ["1+1?"], "label": ["2"]})
    with pytest.raises(DataError, match="no answer field"):
        load_problems(path)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow.parquet` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="pip install pyarrow"):
        load_problems(path)


def test_parquet_with_real_pyarrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    path = tmp_path / "real.parquet"
    pq.write_table(pa.table({"question": ["6*7?"], "answer": ["#### 42"]}), path)
    assert load_problems(path)[0].answer == "42"
    with pytest.raises(DataError, match="no column 'solution'"):
        load_problems(path, answer_key="solution")


def test_registry_errors():
    assert set(GENERATED) | {"file"} == set(TASKS)
    with pytest.raises(ConfigError, match="unknown task"):
        get_task("nope")
    with pytest.raises(ConfigError, match="difficulty"):
        get_task("arithmetic").generate(1, difficulty=6)
    with pytest.raises(ConfigError, match="needs a data file"):
        get_task("file").generate(1)
    with pytest.raises(DataError, match="no such file"):
        FileTask("/nonexistent/x.jsonl")


def test_missing_tasks_extra_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)      # as if `pip install nanoseek` without [tasks]
    with pytest.raises(ConfigError, match=r"pip install 'nanoseek\[tasks\]'"):
        get_task("arithmetic").generate(2)
