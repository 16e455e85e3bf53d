"""The DeepSeek tokenizer: a thin wrapper over Hugging Face `tokenizers`, and byte-level BPE training.

`Tokenizer.from_dir(path)` reads a checkpoint's tokenizer.json + tokenizer_config.json (the published
DeepSeek-V3/R1 files load as they are); `save(dir)` writes both back, with the chat template, in a form
`transformers.AutoTokenizer` loads with identical ids. `train_tokenizer(...)` trains a byte-level BPE on local
text with DeepSeek's pre-tokenizer and special tokens, so small models speak the same chat format as R1.

`encode` never adds special tokens unless asked (`add_bos=True`): chat templates write `bos_token` themselves,
and packed pretraining places BOS/EOS explicitly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _HFTokenizer

from nanoseek.errors import CheckpointError, ConfigError, DataError

# DeepSeek-V3/R1 special tokens, spelled as in the published tokenizer_config.json: fullwidth bars (U+FF5C) and
# U+2581 in place of spaces, so ordinary text can never produce them.
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
# Ids 0, 1, 2 as in DeepSeek's vocabulary; the rest follow the learned merges (DeepSeek puts them at 128000+).
BASE_SPECIAL = [BOS, EOS, PAD]
EXTRA_SPECIAL = [USER, ASSISTANT, "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>", "<|EOT|>",
                 "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
                 "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
                 "<｜tool▁output▁end｜>", "<｜tool▁sep｜>"]
# R1 marks these "special": false: they are single ids, but decode(skip_special_tokens=True) keeps them.
REASONING_TOKENS = [THINK, END_THINK]

# DeepSeek-V3's pre-tokenizer: digits in groups of at most 3, CJK runs isolated, then a GPT-style word split,
# then byte-level (every byte is a symbol, so nothing is ever unknown).
_DIGITS = r"\p{N}{1,3}"
_CJK = "[一-龥\u3040-ゟ゠-ヿ]+"
_WORDS = (r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
          r"""| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _token_content(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"__type": "AddedToken", "content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Text <-> ids for one vocabulary, plus the special tokens and chat template that go with it."""

    def __init__(self, tok: _HFTokenizer, *, bos_token: str | None = BOS, eos_token: str | None = EOS,
                 pad_token: str | None = None, chat_template: str | None = None, add_bos_token: bool = True,
                 config_extra: dict | None = None):
        self.tok = tok
        self.add_bos_token = add_bos_token   # what transformers' tok(text) does; our encode() asks explicitly
        self.bos_token, self.eos_token = bos_token, eos_token
        # A vocabulary without a pad token pads with EOS (R1's own config does that); padded positions are masked.
        self.pad_token = pad_token or (PAD if tok.token_to_id(PAD) is not None else eos_token)
        self.chat_template = chat_template
        self.config_extra = dict(config_extra or {})   # tokenizer_config.json keys we keep but do not interpret
        for name in ("bos_token", "eos_token", "pad_token"):
            token = getattr(self, name)
            if token is not None and tok.token_to_id(token) is None:
                raise CheckpointError(f"{name} {token!r} is not in the vocabulary; fix tokenizer_config.json")

    # ----- loading and saving -----
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path}: no tokenizer.json; pass a checkpoint or tokenizer directory "
                                  f"(train one with `nanoseek tokenizer train`)")
        tok = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        cfg: dict = {}
        if (path / "tokenizer_config.json").is_file():
            try:
                cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path / 'tokenizer_config.json'}: not valid JSON ({e})") from None
        template = cfg.pop("chat_template", None)
        if isinstance(template, list):  # transformers' named-template form: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if (path / "chat_template.jinja").is_file():  # transformers >= 4.50 may save the template beside it
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")

        def special(key: str, default: str | None) -> str | None:
            if key in cfg:
                return _token_content(cfg.pop(key))
            return default if default is not None and tok.token_to_id(default) is not None else None

        bos, eos, pad = special("bos_token", BOS), special("eos_token", EOS), special("pad_token", None)
        add_bos = bool(cfg.pop("add_bos_token", True))
        for key in ("tokenizer_class", "added_tokens_decoder", "add_eos_token"):
            cfg.pop(key, None)   # rewritten by save()
        return cls(tok, bos_token=bos, eos_token=eos, pad_token=pad, chat_template=template, add_bos_token=add_bos,
                   config_extra=cfg)

    def save(self, out_dir: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) into out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tok = _HFTokenizer.from_str(self.tok.to_str())
        add_bos = self.add_bos_token and self.bos_token is not None
        if add_bos:
            # Let transformers' default `tok(text)` add BOS like DeepSeek's `add_bos_token: true` does; our own
            # encode() never runs the post-processor (add_special_tokens=False), so ids match both ways.
            tok.post_processor = processors.TemplateProcessing(
                single=f"{self.bos_token} $A", pair=f"{self.bos_token} $A {self.bos_token} $B",
                special_tokens=[(self.bos_token, self.bos_id)])
        else:
            tok.post_processor = None
        tok.save(str(out / "tokenizer.json"))
        # PreTrainedTokenizerFast takes tokenizer.json as it is. DeepSeek's own "LlamaTokenizerFast" names a
        # SentencePiece-style class: transformers 5 sees the byte-level tokenizer.json, warns and falls back.
        cfg = {**self.config_extra, "tokenizer_class": "PreTrainedTokenizerFast",
               "add_bos_token": add_bos, "add_eos_token": False,
               "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
               "unk_token": None, "clean_up_tokenization_spaces": False}
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n",
                                                   encoding="utf-8")
        return out

    # ----- ids -----
    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.tok.id_to_token(idx)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's vocab_size must be at least this)."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_ids(self) -> set[int]:
        return {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    # ----- encode / decode -----
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """Many texts at once; `tokenizers` spreads the batch over threads (the fast path for data loading)."""
        encs = self.tok.encode_batch_fast(list(texts), add_special_tokens=False)
        prefix = [self.bos_id] if add_bos and self.bos_id is not None else []
        return [prefix + e.ids for e in encs]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's (start, end) character span in `text`."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return self.tok.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r}, chat_template={'yes' if self.chat_template else 'no'})")


def new_bpe_tokenizer() -> _HFTokenizer:
    """An untrained byte-level BPE with DeepSeek-V3's pre-tokenizer and decoder."""
    tok = _HFTokenizer(models.BPE())   # no unk token: byte-level covers every input
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_DIGITS), behavior="isolated"),
        pre_tokenizers.Split(Regex(_CJK), behavior="isolated"),
        pre_tokenizers.Split(Regex(_WORDS), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(files: Sequence[str | Path] | None = None, vocab_size: int = 8192,
                    out_dir: str | Path | None = None, *, texts: Iterable[str] | None = None,
                    min_frequency: int = 2, field: str = "text", show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE on local .txt/.jsonl/.parquet files (field "text") and/or in-memory texts.

    `vocab_size` counts every id, special tokens included, so a model with that vocab_size fits the result
    (a small corpus may run out of merges first and give fewer). The DeepSeek chat template (R1) is attached.
    """
    from nanoseek.chat import R1_CHAT_TEMPLATE
    from nanoseek.data.pretrain import iter_texts

    n_added = len(EXTRA_SPECIAL) + len(REASONING_TOKENS)
    n_min = len(BASE_SPECIAL) + len(pre_tokenizers.ByteLevel.alphabet()) + n_added
    if vocab_size < n_min:
        raise ConfigError(f"vocab_size {vocab_size} is too small: byte-level BPE with DeepSeek's special tokens "
                          f"needs {n_min} ids before any merge")
    n_docs = 0

    def corpus():
        nonlocal n_docs
        for src in (iter_texts(files, field) if files else (), texts or ()):
            for text in src:
                n_docs += 1
                yield text

    tok = new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_added, min_frequency=min_frequency,
                                  special_tokens=BASE_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=show_progress)
    tok.train_from_iterator(corpus(), trainer=trainer)
    if n_docs == 0:
        where = ", ".join(map(str, files or [])) or "the given texts"
        raise DataError(f"empty corpus: no text to train a tokenizer on in {where}")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in EXTRA_SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
    result = Tokenizer(tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=R1_CHAT_TEMPLATE)
    if out_dir is not None:
        result.save(out_dir)
    return result
