"""Write a Python function; verified by running unit tests on it in the sandbox (`nanoseek.sandbox`).

Problems come from templates with random parameters (so an item cannot be answered from memory of another),
one difficulty level per template group. Expected outputs are computed here by running the reference solution
in-process (trusted code). The sandboxed harness only receives the test *inputs* and prints the candidate's
outputs as one JSON line; this process compares them with the expected outputs. So a candidate that prints a
fake "all passed" and exits early gains nothing: it would have to print the right outputs, i.e. solve the task.
"""
from __future__ import annotations

import json
import random

from nanoseek.data.tasks.base import Task, TaskItem, base_seed, check_difficulty, last_code_block
from nanoseek.sandbox import run_python

RESULT_MARK = "@@NANOSEEK_RESULTS@@"


def _ints(rng, n, lo, hi):
    return [rng.randint(lo, hi) for _ in range(n)]


def _word(rng, alphabet="abc", lo=0, hi=8):
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


# Each template: level, signature, description and reference source (both str.format-ed with the params, so
# literal braces are doubled), params(rng), inputs(rng, params) -> list of argument lists (JSON-able).
TEMPLATES = [
    dict(level=1, sig="add_k(x)", desc="returns x + {k}",
         ref="def add_k(x):\n    return x + {k}\n",
         params=lambda r: {"k": r.randint(2, 99)},
         inputs=lambda r, p: [[0], [-1], [1]] + [[x] for x in _ints(r, 5, -1000, 1000)]),
    dict(level=1, sig="count_multiples(xs)", desc="returns how many integers in the list xs are divisible by {k}",
         ref="def count_multiples(xs):\n    return sum(1 for x in xs if x % {k} == 0)\n",
         params=lambda r: {"k": r.randint(2, 9)},
         inputs=lambda r, p: [[[]], [[0]]] + [[_ints(r, r.randint(1, 12), -50, 50)] for _ in range(6)]),
    dict(level=2, sig="clamp_all(xs)", desc="returns a new list with each element of xs clamped to [{lo}, {hi}]",
         ref="def clamp_all(xs):\n    return [min(max(x, {lo}), {hi}) for x in xs]\n",
         params=lambda r: {"lo": r.randint(-20, 0), "hi": r.randint(1, 20)},
         inputs=lambda r, p: [[[]]] + [[_ints(r, r.randint(1, 10), -40, 40)] for _ in range(7)]),
    dict(level=2, sig="reverse_words(s)", desc="returns the words of s (separated by single spaces) in reverse "
         "order, joined by single spaces",
         ref="def reverse_words(s):\n    return ' '.join(reversed(s.split(' ')))\n",
         params=lambda r: {},
         inputs=lambda r, p: [["a"], ["hello world"]] + [[" ".join(_word(r, "xyzw", 1, 5) for _ in
                                                                range(r.randint(1, 6)))] for _ in range(6)]),
    dict(level=2, sig="digit_power_sum(n)", desc="returns, for a non-negative integer n, the sum of its decimal "
         "digits each raised to the power {p}",
         ref="def digit_power_sum(n):\n    return sum(int(d) ** {p} for d in str(n))\n",
         params=lambda r: {"p": r.randint(2, 5)},
         inputs=lambda r, p: [[0], [9], [10]] + [[x] for x in _ints(r, 5, 0, 10**9)]),
    dict(level=3, sig="is_palindrome(s)", desc="returns True if s reads the same forwards and backwards when only "
         "its letters and digits are kept and case is ignored, else False",
         ref="def is_palindrome(s):\n    t = [c.lower() for c in s if c.isalnum()]\n    return t == t[::-1]\n",
         params=lambda r: {},
         inputs=lambda r, p: [[""], ["A man, a plan, a canal: Panama"], ["ab"], ["Ab,a"]]
         + [[w + w[::-1] if r.random() < 0.5 else w + "x"] for w in (_word(r, "aB1", 1, 5) for _ in range(5))]),
    dict(level=3, sig="running_max(xs)", desc="returns a list whose i-th element is the maximum of xs[0], ..., "
         "xs[i] (an empty list for an empty input)",
         ref="def running_max(xs):\n    out = []\n    for x in xs:\n        out.append(x if not out else "
             "max(out[-1], x))\n    return out\n",
         params=lambda r: {},
         inputs=lambda r, p: [[[]], [[5]]] + [[_ints(r, r.randint(2, 10), -30, 30)] for _ in range(6)]),
    dict(level=3, sig="fib_mod(n)", desc="returns the n-th Fibonacci number modulo {m}, where fib_mod(0) == 0 and "
         "fib_mod(1) == 1",
         ref="def fib_mod(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, (a + b) % {m}\n"
             "    return a\n",
         params=lambda r: {"m": r.randint(10, 10**6)},
         inputs=lambda r, p: [[0], [1], [2]] + [[x] for x in _ints(r, 5, 3, 20000)]),
    dict(level=4, sig="run_length(s)", desc="returns the run-length encoding of s as a list of [character, count] "
         "pairs, e.g. run_length('aab') == [['a', 2], ['b', 1]]",
         ref="def run_length(s):\n    out = []\n    for c in s:\n        if out and out[-1][0] == c:\n"
             "            out[-1][1] += 1\n        else:\n            out.append([c, 1])\n    return out\n",
         params=lambda r: {},
         inputs=lambda r, p: [[""], ["a"]] + [[_word(r, "ab", 1, 12)] for _ in range(6)]),
    dict(level=4, sig="longest_increasing_run(xs)", desc="returns the length of the longest strictly increasing "
         "run of adjacent elements in xs (0 for an empty list)",
         ref="def longest_increasing_run(xs):\n    best = cur = 0\n    for i, x in enumerate(xs):\n"
             "        cur = cur + 1 if i and x > xs[i - 1] else 1\n        best = max(best, cur)\n    return best\n",
         params=lambda r: {},
         inputs=lambda r, p: [[[]], [[3, 3, 3]], [[1, 2, 3]]] + [[_ints(r, r.randint(1, 12), 0, 9)]
                                                                 for _ in range(5)]),
    dict(level=4, sig="count_primes(n)", desc="returns how many prime numbers are strictly less than n",
         ref="def count_primes(n):\n    if n < 3:\n        return 0\n    sieve = [True] * n\n"
             "    sieve[0] = sieve[1] = False\n    for i in range(2, int(n ** 0.5) + 1):\n        if sieve[i]:\n"
             "            sieve[i * i::i] = [False] * len(range(i * i, n, i))\n    return sum(sieve)\n",
         params=lambda r: {},
         inputs=lambda r, p: [[0], [2], [3], [10]] + [[x] for x in _ints(r, 4, 11, 50000)]),
    dict(level=5, sig="balanced(s)", desc="returns True if the brackets ()[]{{}} in s are properly matched and "
         "nested (other characters are ignored), else False",
         ref="def balanced(s):\n    pairs, stack = {{')': '(', ']': '[', '}}': '{{'}}, []\n    for c in s:\n"
             "        if c in '([{{':\n            stack.append(c)\n        elif c in pairs:\n"
             "            if not stack or stack.pop() != pairs[c]:\n                return False\n"
             "    return not stack\n",
         params=lambda r: {},
         inputs=lambda r, p: [[""], ["([]{})"], ["([)]"], ["(("], ["a(b)c"]] + [[_word(r, "()[]{}", 1, 8)]
                                                                                for _ in range(4)]),
    dict(level=5, sig="edit_distance(a, b)", desc="returns the Levenshtein distance between strings a and b "
         "(insertions, deletions and substitutions of one character, each costing 1)",
         ref="def edit_distance(a, b):\n    prev = list(range(len(b) + 1))\n    for i, ca in enumerate(a, 1):\n"
             "        cur = [i]\n        for j, cb in enumerate(b, 1):\n"
             "            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))\n"
             "        prev = cur\n    return prev[-1]\n",
         params=lambda r: {},
         inputs=lambda r, p: [["", ""], ["abc", ""], ["kitten", "sitting"]] + [[_word(r, "abc", 0, 7),
                                                                                _word(r, "abc", 0, 7)]
                                                                               for _ in range(5)]),
    dict(level=5, sig="max_subarray(xs)", desc="returns the largest sum of a non-empty run of adjacent elements "
         "of the non-empty list xs",
         ref="def max_subarray(xs):\n    best = cur = xs[0]\n    for x in xs[1:]:\n        cur = max(x, cur + x)\n"
             "        best = max(best, cur)\n    return best\n",
         params=lambda r: {},
         inputs=lambda r, p: [[[-3]], [[-2, -1]], [[1, 2, 3]]] + [[_ints(r, r.randint(1, 12), -20, 20)]
                                                                  for _ in range(5)]),
]


def _normalize(value):
    """What survives a JSON round trip: tuples become lists, so both sides are compared the same way."""
    return json.loads(json.dumps(value, default=repr))


def run_tests(code: str, item: TaskItem, timeout_s: float = 5.0) -> float:
    """1.0 if the function `item.meta['entry_point']` defined by `code` returns the expected output on every
    test input, else 0.0. The candidate runs in the sandbox; the comparison happens here."""
    name, tests = item.meta["entry_point"], item.meta["tests"]
    harness = (f"{code}\n\n"
               f"import json as _nanoseek_json\n"
               f"_nanoseek_out = []\n"
               f"for _nanoseek_args in _nanoseek_json.loads({json.dumps(tests)!r}):\n"
               f"    try:\n"
               f"        _nanoseek_out.append(['ok', {name}(*_nanoseek_args)])\n"
               f"    except Exception as _nanoseek_e:\n"
               f"        _nanoseek_out.append(['error', type(_nanoseek_e).__name__])\n"
               f"print('\\n{RESULT_MARK}' + _nanoseek_json.dumps(_nanoseek_out, default=repr))\n")
    res = run_python(harness, timeout_s=timeout_s)
    if not res.ok:
        return 0.0
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if not lines:
        return 0.0
    try:
        got = json.loads(lines[-1][len(RESULT_MARK):])
    except json.JSONDecodeError:
        return 0.0
    want = [["ok", e] for e in item.meta["expected"]]
    return float(got == want)


class PythonCodeTask(Task):
    name = "python_code"
    answer_kind = "code"

    def generate(self, n, seed=0, difficulty=1):
        pool = [t for t in TEMPLATES if t["level"] == check_difficulty(difficulty)]
        rng = random.Random(base_seed(self.name, seed, difficulty))
        items = []
        for _ in range(n):
            t = rng.choice(pool)
            params = t["params"](rng)
            ref = t["ref"].format(**params)
            tests = t["inputs"](rng, params)
            namespace: dict = {}
            exec(ref, namespace)  # our own reference solution, not model output
            entry = t["sig"].split("(")[0]
            expected = [_normalize(namespace[entry](*args)) for args in tests]
            items.append(TaskItem(
                question=(f"Write a Python function `{t['sig']}` that {t['desc'].format(**params)}. Reply with the "
                          f"function in a ```python code block; it must not read input or print."),
                answer=ref, task=self.name,
                meta={"entry_point": entry, "tests": tests, "expected": expected, "difficulty": difficulty,
                      "level": t["level"]}))
        return items

    def verify(self, answer, item):
        return run_tests(last_code_block(answer) or answer, item)
