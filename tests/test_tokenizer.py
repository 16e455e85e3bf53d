"""Tokenizer: unicode round trips, DeepSeek special tokens as single ids, and transformers loading our files
with identical ids (transformers is the independent reference here, used in tests only)."""
import argparse
import json

import pytest

from nanoseek import tokenizer_cli
from nanoseek.data.pretrain import synthetic_corpus
from nanoseek.errors import ConfigError, DataError
from nanoseek.tokenizer import (ASSISTANT, BASE_SPECIAL, BOS, EOS, EXTRA_SPECIAL, PAD, REASONING_TOKENS, THINK,
                                USER, Tokenizer, train_tokenizer)

UNICODE_TEXTS = [
    "Héllo wörld, café naïve façade Ångström",
    "你好，世界！这是一个测试。日本語のテキストとカタカナ",
    "emoji 😀🎉 family 👨‍👩‍👧 flag 🇫🇷 skin 👍🏽",
    "combining e\u0301 and o\u0308, Ελληνικά, Русский, العربية, עברית, हिन्दी",
    "unseen scripts: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ ᚠᚢᚦ \u200b zero-width",
    "def f(x):\n\treturn x ** 2  # comment\r\n\n\n   trailing   ",
    "numbers 1234567890 3.14159 -42 1e-6",
    "",
    " ",
]
TRAIN_EXTRA = ["Héllo wörld café", "你好，世界！日本語", "emoji 😀🎉 test", "def f(x):\n    return x + 1\n"] * 10


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts=synthetic_corpus(1500, seed=0) + TRAIN_EXTRA, vocab_size=700, out_dir=out,
                    show_progress=False)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_round_trip_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_learned_merges_compress_training_text(tok):
    # A tokenizer that fell back to bytes would pass the round trip; this catches training that did nothing.
    text = synthetic_corpus(20, seed=99)[0]
    assert len(tok.encode(text)) < 0.5 * len(text.encode("utf-8"))


def test_special_tokens_are_single_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)   # DeepSeek's ids for these three
    for t in BASE_SPECIAL + EXTRA_SPECIAL + REASONING_TOKENS:
        ids = tok.encode(t)
        assert len(ids) == 1 and tok.id_to_token(ids[0]) == t
        # also inside running text, without spaces around
        mixed = tok.encode(f"a{t}b")
        assert tok.token_to_id(t) in mixed
    # ASCII bars are ordinary text: only the fullwidth spelling is the special token.
    assert tok.token_to_id(USER) not in tok.encode("<|User|>")


def test_skip_special_tokens_keeps_reasoning_markers(tok):
    ids = tok.encode(f"{BOS}{USER}hi{ASSISTANT}{THINK}\nhmm</think>ok{EOS}")
    assert tok.decode(ids, skip_special_tokens=True) == "hi<think>\nhmm</think>ok"


def test_encode_batch_matches_encode(tok):
    texts = UNICODE_TEXTS + synthetic_corpus(30, seed=5)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, add_bos=True) == [[tok.bos_id] + tok.encode(t) for t in texts]


def test_vocab_size_counts_every_id(tok):
    assert tok.vocab_size == 700
    assert max(tok.token_to_id(t) for t in EXTRA_SPECIAL + REASONING_TOKENS) == 699


def test_transformers_loads_identical_ids(tok_dir, tok):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    for hf in (AutoTokenizer.from_pretrained(tok_dir), PreTrainedTokenizerFast.from_pretrained(tok_dir)):
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
        assert len(hf) == tok.vocab_size
        texts = UNICODE_TEXTS + synthetic_corpus(20, seed=3) + [f"{USER}2+2?{ASSISTANT}{THINK}\n4</think>4{EOS}"]
        for text in texts:
            assert hf(text, add_special_tokens=False).input_ids == tok.encode(text)
            assert hf(text).input_ids == tok.encode(text, add_bos=True)   # add_bos_token, as DeepSeek's config
            assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text))
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "<think>\nadd</think>4"}, {"role": "user", "content": "3+3?"}]
        hf_ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        from nanoseek.chat import render
        assert list(hf_ids) == render(tok, messages, add_generation_prompt=True)[0]


def test_from_dir_reads_deepseek_published_config(tok_dir, tmp_path):
    # tokenizer_config.json as DeepSeek-V3/R1 publish it: AddedToken dicts, LlamaTokenizerFast, pad = EOS.
    def added(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": added(BOS), "eos_token": added(EOS),
           "pad_token": added(EOS), "clean_up_tokenization_spaces": False, "legacy": True,
           "model_max_length": 16384, "sp_model_kwargs": {}, "unk_token": None,
           "tokenizer_class": "LlamaTokenizerFast", "chat_template": "{{ bos_token }}custom"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    t = Tokenizer.from_dir(tmp_path)
    assert (t.bos_id, t.eos_id, t.pad_id) == (0, 1, 1)
    assert t.chat_template == "{{ bos_token }}custom"
    saved = t.save(tmp_path / "resaved")
    back = json.loads((saved / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert back["model_max_length"] == 16384 and back["pad_token"] == EOS and back["chat_template"] == cfg["chat_template"]
    again = Tokenizer.from_dir(saved)
    assert again.encode(UNICODE_TEXTS[1]) == t.encode(UNICODE_TEXTS[1]) and again.pad_id == 1


def test_from_dir_without_tokenizer_json_is_a_clear_error(tmp_path):
    from nanoseek.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_train_from_files_and_bad_files(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(synthetic_corpus(200, seed=1)), encoding="utf-8")
    with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as f:
        for doc in synthetic_corpus(200, seed=2):
            f.write(json.dumps({"text": doc}) + "\n")
    t = train_tokenizer([tmp_path / "a.txt", tmp_path / "b.jsonl"], vocab_size=400, show_progress=False)
    assert t.vocab_size == 400 and t.decode(t.encode("Once upon a time")) == "Once upon a time"

    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        train_tokenizer([tmp_path / "bad.jsonl"], vocab_size=400, show_progress=False)
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty corpus"):
        train_tokenizer([tmp_path / "empty.jsonl"], vocab_size=400, show_progress=False)
    with pytest.raises(ConfigError, match="too small"):
        train_tokenizer(texts=["abc"], vocab_size=100, show_progress=False)


def _cli(argv):
    parser = argparse.ArgumentParser()
    tokenizer_cli.add_arguments(parser)
    return tokenizer_cli.run(parser.parse_args(argv))


def test_cli_train_encode_decode(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("\n".join(synthetic_corpus(300, seed=4)), encoding="utf-8")
    out = tmp_path / "tok"
    assert _cli(["train", str(tmp_path / "c.txt"), "--vocab-size", "400", "--out", str(out),
                 "--synthetic-docs", "100"]) == 0
    t = Tokenizer.from_dir(out)
    assert t.vocab_size == 400 and t.pad_token == PAD
    capsys.readouterr()
    assert _cli(["encode", str(out), "--text", "Count by 3", "--bos"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert ids == t.encode("Count by 3", add_bos=True)
    assert _cli(["decode", str(out), "--ids", json.dumps(ids), "--skip-special"]) == 0
    assert capsys.readouterr().out == "Count by 3\n"


def test_add_bos_token_false_is_kept(tok, tmp_path):
    from transformers import AutoTokenizer

    no_bos = Tokenizer(tok.tok, add_bos_token=False, chat_template=tok.chat_template)
    no_bos.save(tmp_path)
    assert Tokenizer.from_dir(tmp_path).add_bos_token is False
    text = "Once upon a time"
    assert AutoTokenizer.from_pretrained(tmp_path)(text).input_ids == tok.encode(text)
