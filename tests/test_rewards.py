"""Rewards: hand-computed format and overlong values, answer extraction, accuracy and code rewards."""
import pytest

from nanoseek.data.tasks import TaskItem, extract_answer, get_task
from nanoseek.errors import ConfigError
from nanoseek.rewards import (accuracy_reward, code_reward, combine_rewards, format_reward_soft,
                              format_reward_strict, overlong_penalty)

ITEM = TaskItem(question="Calculate 6 * 7.", answer="42", task="arithmetic", meta={})


@pytest.mark.parametrize("completion,strict,soft", [
    ("<think>\nsix sevens\n</think>\n<answer>42</answer>", 1.0, 1.0),
    ("six sevens\n</think>\n<answer>42</answer>", 1.0, 1.0),      # prompt ended with "<think>\n"
    ("six sevens\n</think>\nThe answer is 42.", 1.0, 1.0),        # no tags needed after the think block
    ("<think>six sevens</think><answer>42</answer>", 0.0, 1.0),   # newlines missing
    ("<think>\nsix sevens\n</think> <answer>42</answer>", 0.0, 1.0),
    ("<think>\n\n</think>\n<answer>42</answer>", 0.0, 1.0),       # empty reasoning
    ("<think>\nsix sevens\n</think>\n", 0.0, 0.0),                # no answer
    ("<think>\nsix sevens\n</think>\n<answer></answer>", 0.0, 1.0),
    ("<think>\na\n</think>\n<think>\nb\n</think>\n42", 0.0, 0.0),  # two think blocks
    ("<think>\nstill thinking about 42", 0.0, 0.0),               # never closed
    ("<answer>42</answer>", 0.0, 0.0),                            # no think block
    ("Sure. <think> six sevens </think> 42", 0.0, 1.0),            # preamble and loose spacing: soft only
    ("<think>\nx\n</think>\n<answer>4</answer><answer>2</answer>", 0.0, 1.0),
])
def test_format_rewards_hand_computed(completion, strict, soft):
    assert format_reward_strict(completion, ITEM) == strict
    assert format_reward_soft(completion, ITEM) == soft


def test_overlong_penalty_hand_computed():
    # DAPO: max_len 100, cache 20 -> 0 through 80 tokens, then (80 - L) / 20 down to -1 at 100, -1 beyond.
    assert [overlong_penalty(n, 100, 20) for n in (0, 80, 81, 90, 99, 100, 101, 500)] == \
        [0.0, 0.0, -0.05, -0.5, -0.95, -1.0, -1.0, -1.0]
    assert overlong_penalty(4096, 4096, 0) == 0.0 and overlong_penalty(4097, 4096, 0) == -1.0
    with pytest.raises(ConfigError):
        overlong_penalty(10, 100, 200)


@pytest.mark.parametrize("completion,kind,expected", [
    ("I think 41.\n</think>\n<answer> 42 </answer>", "number", "42"),
    ("</think>\nSo \\boxed{\\frac{1}{2}} is it.", "math", "\\frac{1}{2}"),
    ("</think>\n<answer>7</answer> and later \\boxed{8}", "number", "7"),   # the answer tag wins
    ("</think>\nWe get 3 apples.\nThe answer is 1,234.", "number", "1,234"),  # last line, last number
    ("</think>\nx = 4 - 1 = 3", "expression", "x = 4 - 1 = 3"),
    ("</think>\ntext\n```python\ndef f():\n    return 1\n```\nok", "code", "def f():\n    return 1"),
    ("<think>\nthe answer is 42", "number", None),                     # unfinished thinking: no answer yet
    ("no tags at all, 42", "number", "42"),
    ("</think>\n   \n", "number", None),
])
def test_extract_answer(completion, kind, expected):
    assert extract_answer(completion, kind) == expected


@pytest.mark.parametrize("completion,expected", [
    ("6*7 is 42\n</think>\n<answer>42</answer>", 1.0),
    ("6*7 is 42\n</think>\nThe answer is 42.", 1.0),
    ("6*7\n</think>\n<answer>42</answer> (not 43)", 1.0),   # the tagged answer counts, not the last number
    ("It is 42.\n</think>\n<answer>41</answer>", 0.0),      # right number, but only in the reasoning
    ("<think>\nIt is 42, surely", 0.0),                     # never left the think block
    ("6*7\n</think>\nThe answer is 42 or maybe 43", 0.0),   # hedging: the last number is wrong
    ("x\n</think>\n<answer>4 2</answer>", 0.0),
    ("x\n</think>\n<answer>42 or 43</answer>", 0.0),
])
def test_accuracy_reward_uses_only_the_answer_part(completion, expected):
    assert accuracy_reward(completion, ITEM) == expected


def test_accuracy_reward_on_generated_tasks():
    for name in ("countdown", "linear_equations", "chemistry"):
        item = get_task(name).generate(1, seed=5, difficulty=2)[0]
        assert accuracy_reward(f"work\n</think>\n<answer>{item.answer}</answer>", item) == 1.0
        assert accuracy_reward(f"<answer>{item.answer}</answer>\n</think>\nno idea", item) == 0.0


def test_accuracy_reward_with_math_verify_file_problems(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text('{"problem": "Half of 1?", "solution": "$\\\\boxed{\\\\frac{1}{2}}$"}\n')
    item = get_task(str(path)).generate(1)[0]
    assert accuracy_reward("So it is a half.\n</think>\nThe answer is $\\boxed{0.5}$.", item) == 1.0
    assert accuracy_reward("</think>\n<answer>1/2</answer>", item) == 1.0
    assert accuracy_reward("</think>\n<answer>1/3</answer>", item) == 0.0
    assert accuracy_reward("It is \\boxed{0.5}\n</think>\n\\boxed{2}", item) == 0.0


def test_code_reward_runs_the_tests_in_the_sandbox():
    item = get_task("python_code").generate(1, seed=0, difficulty=1)[0]
    name = item.meta["entry_point"]
    good = f"Plan.\n</think>\n```python\n{item.answer}```"
    assert code_reward(good, item) == 1.0 and accuracy_reward(good, item) == 1.0
    assert code_reward(f"</think>\n```python\ndef {name}(*a):\n    return -1\n```", item) == 0.0
    assert code_reward(f"</think>\n```python\n{item.answer}\nopen('/etc/passwd').read()\n```", item) == 0.0
    assert code_reward(f"```python\n{item.answer}```\n</think>\nsorry", item) == 0.0  # code only in reasoning
    assert code_reward("</think>\n<answer>42</answer>", ITEM) == 0.0  # not a code item


def test_combine_rewards():
    reward = combine_rewards({"accuracy": 1.0, "format_strict": 0.5, "format_soft": 0.25})
    c = "six sevens\n</think>\n<answer>42</answer>"
    assert reward(c, ITEM) == 1.75
    assert reward.parts(c, ITEM) == {"accuracy": 1.0, "format_strict": 1.0, "format_soft": 1.0}
    assert reward("<think>six sevens</think><answer>41</answer>", ITEM) == 0.25
    length = combine_rewards({lambda comp, item: len(comp) / 10: 2.0})
    assert length("abcde", ITEM) == 1.0
    with pytest.raises(ConfigError, match="unknown reward"):
        combine_rewards({"accuracy_typo": 1.0})
