"""`nanoseek demo --quick`: the whole pipeline end to end in seconds (the full-size claim is measured, not run here)."""
import json

import pytest

from nanoseek.cli import main

KEYS = {"pass_at_1_before", "pass_at_1_after", "n_eval", "wall_seconds", "task", "checkpoint_before",
        "checkpoint_after"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--seed", "3", "--quick", "--no-progress"]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_report_and_files(quick_run):
    out, rep = quick_run
    assert KEYS <= rep.keys()
    assert rep["n_eval"] == 16 and rep["task"] == "arithmetic"
    assert 0.0 <= rep["pass_at_1_before"] <= 1.0 and 0.0 <= rep["pass_at_1_after"] <= 1.0
    md = (out / "report.md").read_text()
    for name in ("loss", "reward", "accuracy", "response_length"):
        path = rep["plots"][name]
        assert (out / path).is_file() and path.endswith(".png") and f"({path})" in md
    for key in ("checkpoint_before", "checkpoint_after"):
        ckpt = out / rep[key]
        assert (ckpt / "config.json").is_file() and (ckpt / "tokenizer.json").is_file()


def test_checkpoints_load_and_chat(quick_run):
    from nanoseek.inference import LLM, SamplingParams

    out, rep = quick_run
    for key in ("checkpoint_before", "checkpoint_after"):
        llm = LLM(str(out / rep[key]), device="cpu")
        prompt = llm.render_chat([{"role": "user", "content": "Calculate 2 + 3."}])
        res = llm.generate([prompt], [SamplingParams(max_tokens=4, temperature=0.0)])
        assert len(res[0].outputs[0].token_ids) >= 1


def test_eval_cli_reproduces_after(quick_run, capsys):
    out, rep = quick_run
    capsys.readouterr()
    assert main(["eval", "--model", str(out / rep["checkpoint_after"]), "--task", rep["task"], "--n",
                 str(rep["n_eval"]), "--seed", "3", "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["pass_at_1"] == pytest.approx(rep["pass_at_1_after"])
    assert res["n"] == rep["n_eval"]
