"""`nanoseek sft`: packing is exact (block-diagonal mask, restarted positions), the loss falls on a small set of
conversations, and a resumed run continues exactly."""
import json
import shutil

import pytest
import torch

from nanoseek.checkpoint.native import step_dir
from nanoseek.config import ModelConfig
from nanoseek.data.pretrain import synthetic_corpus
from nanoseek.data.sft import SFTLoader
from nanoseek.data.tasks import get_task
from nanoseek.model import build_model
from nanoseek.recipes.sft import SFTConfig, packed_layout, sft
from nanoseek.tokenizer import Tokenizer, train_tokenizer
from nanoseek.train.metrics import read_metrics


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    train_tokenizer(texts=synthetic_corpus(600, seed=0), vocab_size=512, out_dir=d / "tok", show_progress=False)
    with open(d / "convs.jsonl", "w") as f:
        for it in get_task("arithmetic").generate(32, seed=1):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": it.question},
                {"role": "assistant", "content": f"<think>\n{it.meta['expression']} = {it.answer}\n</think>\n"
                                                 f"{it.answer}"}]}) + "\n")
    return d


def test_packed_rows_give_the_same_loss_as_separate_conversations(setup):
    tok = Tokenizer.from_dir(setup / "tok")
    model = build_model(ModelConfig.from_name("tiny").replace(vocab_size=tok.vocab_size), seed=0)
    packed = next(SFTLoader(tok, setup / "convs.jsonl", batch_size=1, seq_len=256, pack=True, shuffle=False))
    d = packed.doc_ids[:, :-1]
    assert d.max() >= 2                                               # several conversations share the row
    pos, mask = packed_layout(d)
    with torch.no_grad():
        logits = model(packed.inputs, positions=pos, attn_mask=mask)
        per_tok = torch.nn.functional.cross_entropy(logits[0], packed.targets[0], reduction="none")
        for k in range(int(d.max()) + 1):
            cols = (d[0] == k).nonzero().flatten()
            alone = model(packed.inputs[:, cols])                     # the conversation by itself, positions 0..
            ref = torch.nn.functional.cross_entropy(alone[0], packed.targets[0, cols], reduction="none")
            m = packed.loss_mask[0, 1:][cols].bool()
            torch.testing.assert_close(per_tok[cols][m], ref[m], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(logits).all()                           # padding rows attend to padding, not nothing


def test_sft_lowers_loss_and_resumes_exactly(setup, tmp_path):
    base = dict(model="tiny", tokenizer=str(setup / "tok"), data=[str(setup / "convs.jsonl")], lr=3e-3, batch_size=4,
                micro_batch_size=2, seq_len=128, progress=False, warmup_steps=2)
    sft(SFTConfig(out=str(tmp_path / "a"), steps=12, save_every=6, **base))
    a = read_metrics(tmp_path / "a")
    shutil.rmtree(step_dir(tmp_path / "a", 12))                       # as if killed after the step-6 checkpoint
    sft(SFTConfig(out=str(tmp_path / "a"), steps=12, save_every=6, resume=True, **base))
    b = read_metrics(tmp_path / "a")
    assert a[-1]["loss"] < a[0]["loss"] - 1.0, (a[0]["loss"], a[-1]["loss"])
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-5)
    assert (tmp_path / "a" / "final" / "tokenizer.json").is_file() and (tmp_path / "a" / "loss.png").is_file()


def test_cli_sft_without_data_is_one_line(setup, capsys):
    from nanoseek.cli import main

    assert main(["sft", "--model", "tiny", "--tokenizer", str(setup / "tok")]) == 2
    assert "needs --data" in capsys.readouterr().err
