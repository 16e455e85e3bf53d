"""Rejection sampling (`nanoseek sample`) and distillation (`nanoseek distill`): kept traces re-verify at 100%,
filtering and resume of the trace writer, the student's loss on teacher traces falls (trace SFT + forward-KL
logit distillation), and an endpoint that refuses stops the run with one clear error and no checkpoint.

Held-out accuracy of a distilled student is not tested: a CPU-sized student does not generalize arithmetic
within a test's time budget; the teacher here memorizes a fixed problem set so that it writes verifiable traces.
"""
import json

import pytest
import torch

from nanoseek.checkpoint.native import list_checkpoints
from nanoseek.data.pretrain import synthetic_corpus
from nanoseek.data.tasks import get_task
from nanoseek.recipes.distill import DistillConfig, TeacherError, distill, endpoint_generator
from nanoseek.recipes.sample import SampleConfig, sample, write_traces
from nanoseek.recipes.sft import SFTConfig, sft
from nanoseek.rewards import accuracy_reward, format_reward_strict
from nanoseek.tokenizer import train_tokenizer
from nanoseek.train.kd import forward_kl
from nanoseek.train.metrics import read_metrics

N_PROBLEMS = 8


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny model fine-tuned until it writes correct, well-formed traces for a fixed set of problems."""
    d = tmp_path_factory.mktemp("teacher")
    train_tokenizer(texts=synthetic_corpus(600, seed=0), vocab_size=512, out_dir=d / "tok", show_progress=False)
    with open(d / "convs.jsonl", "w") as f:
        for it in get_task("arithmetic").generate(N_PROBLEMS, seed=0):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": it.question},
                {"role": "assistant", "content": f"<think>\n{it.meta['expression']} = {it.answer}\n</think>\n"
                                                 f"{it.answer}"}]}) + "\n")
    sft(SFTConfig(model="tiny", tokenizer=str(d / "tok"), data=[str(d / "convs.jsonl")], out=str(d / "run"),
                  steps=60, save_every=0, lr=3e-3, batch_size=4, seq_len=256, progress=False, warmup_steps=5))
    return d


def test_rejection_sampling_output_reverifies(teacher, tmp_path):
    out = tmp_path / "rs.jsonl"
    stats = sample(SampleConfig(model=str(teacher / "run" / "final"), out=str(out), n_prompts=N_PROBLEMS,
                                num_samples=4, max_new_tokens=48, temperature=0.7, seed=0, progress=False))
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert stats["kept"] == len(lines) > 0
    items = {it.question: it for it in get_task("arithmetic").generate(N_PROBLEMS, seed=0)}
    for rec in lines:
        user, assistant = rec["messages"]
        item = items[user["content"]]
        assert accuracy_reward(assistant["content"], item) == 1.0
        assert format_reward_strict(assistant["content"], item) == 1.0


def test_write_traces_filters_dedups_and_resumes(tmp_path):
    items = get_task("arithmetic").generate(40, seed=3)        # two chunks of 32 + 8

    def gen(chunk, offset):
        return [[f"<think>\nok\n</think>\n{it.answer}", f"<think>\nok\n</think>\n{it.answer}",    # a duplicate
                 f"<think>\nno\n</think>\n{int(it.answer) + 1}",                                 # wrong
                 f"{it.answer}"] for it in chunk]                                                 # malformed

    out = tmp_path / "t.jsonl"
    stats = write_traces(gen, items, out, ["accuracy", "format_strict"], progress=False)
    assert stats["kept"] == 40 and stats["sampled"] == 160
    full = out.read_text()
    # a run killed inside the second chunk: a half-written line and a finished chunk marker for chunk one only
    marker = out.with_name(out.name + ".progress.json")
    saved = json.loads(marker.read_text())
    marker.write_text(json.dumps({"done": 32, "stats": {**saved["stats"], "kept": 32}}))
    out.write_text("".join(full.splitlines(keepends=True)[:35]) + '{"messages": [')
    with pytest.raises(Exception, match="exists"):
        write_traces(gen, items, out, ["accuracy"], progress=False)
    write_traces(gen, items, out, ["accuracy", "format_strict"], resume=True, progress=False)
    assert out.read_text() == full


def test_forward_kl_matches_definition():
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    p = t.softmax(-1)
    ref = (p * (p.log() - s.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(forward_kl(s, t), ref)
    assert forward_kl(t, t).abs() < 1e-6
    with pytest.raises(ValueError, match="shared vocabulary"):
        forward_kl(s, torch.randn(2, 3, 8))


def test_distill_lowers_student_loss_on_teacher_traces(teacher, tmp_path):
    cfg = DistillConfig(teacher=str(teacher / "run" / "final"), model="tiny", tokenizer=str(teacher / "tok"),
                        out=str(tmp_path / "d"), n_prompts=N_PROBLEMS, num_samples=4, max_new_tokens=48,
                        temperature=0.7, steps=15, save_every=0, lr=3e-3, batch_size=4, seq_len=256,
                        kd_weight=0.5, progress=False)
    result = distill(cfg)
    recs = read_metrics(tmp_path / "d")
    assert recs[-1]["ce"] < recs[0]["ce"] - 1.0 and recs[-1]["kd"] < recs[0]["kd"]
    for line in open(result["traces"]):
        rec = json.loads(line)
        assert format_reward_strict(rec["messages"][1]["content"]) == 1.0


def test_refusing_endpoint_is_one_clear_error(tmp_path):
    gen = endpoint_generator("http://127.0.0.1:9", "m", 1, 8, 0.0, timeout_s=5)
    with pytest.raises(TeacherError, match="refused"):
        gen(get_task("arithmetic").generate(1, seed=0), 0)
    cfg = DistillConfig(teacher="http://127.0.0.1:9", model="tiny", out=str(tmp_path / "d"), n_prompts=2,
                        tokenizer=None, progress=False)
    with pytest.raises(TeacherError, match="is the server running"):
        distill(cfg)
    assert not list_checkpoints(tmp_path / "d")
