"""Test helpers: the tiny random model with sharpened logits, a BPE tokenizer on the synthetic corpus, a tiny
checkpoint dir made of both, and the plain full-forward greedy loop that the engine is checked against."""
import torch

import nanoseek
from nanoseek.data.pretrain import synthetic_corpus
from nanoseek.tokenizer import train_tokenizer


def tiny_model(head_scale: float | None = 10.0, **overrides):
    """The "tiny" preset (with config `overrides`), seed 0, in eval mode, its lm_head multiplied by `head_scale`
    (None: left as initialised).

    A random init gives nearly flat logits; sharpening them means fp32 rounding (absorbed vs expanded MLA, batched vs
    single) cannot flip an argmax on a near-tie and make a greedy comparison flaky."""
    model = nanoseek.build_model(nanoseek.ModelConfig.from_name("tiny", **overrides), seed=0).eval()
    if head_scale is not None:
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
    return model


def corpus_tokenizer(out_dir=None, n_docs: int = 300, seed: int = 0, vocab_size: int = 512):
    """A byte-level BPE trained on `synthetic_corpus(n_docs, seed)`, written to `out_dir` when given."""
    return train_tokenizer(texts=synthetic_corpus(n_docs, seed=seed), vocab_size=vocab_size, out_dir=out_dir,
                           show_progress=False)


def write_tokenizer(path, **kw):
    """Write `corpus_tokenizer(**kw)` into the dir `path`; returns `path`."""
    corpus_tokenizer(path, **kw)
    return path


def tiny_checkpoint(path, **overrides):
    """Write `tiny_model(**overrides)` and `corpus_tokenizer()` into the checkpoint dir `path`; returns `path`."""
    nanoseek.save_model(tiny_model(**overrides), path)
    return write_tokenizer(path)


@torch.no_grad()
def reference(model, prompt, n):
    """Greedy by re-running the whole sequence each step: no cache, expanded MLA, no engine."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]
