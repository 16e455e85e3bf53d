"""Data loaders: packing keeps every token in order, ranks see disjoint documents, resume gives exactly the next
batch, SFT masks and batching, and bad input fails with one line naming the file and line or column."""
import json

import pytest
import torch

from nanoseek.chat import render
from nanoseek.data import pretrain
from nanoseek.data.pretrain import Batch, PretrainLoader, synthetic_corpus
from nanoseek.data.sft import SFTLoader, load_conversations
from nanoseek.errors import DataError
from nanoseek.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(texts=synthetic_corpus(600, seed=0), vocab_size=512, show_progress=False)


def docs_with_ids(n, seed=0):
    """Documents that say which one they are, so a decoded stream can be mapped back to indices."""
    return [f"doc{i:04d} {text}" for i, text in enumerate(synthetic_corpus(n, seed))]


def stream_of(batches):
    """All real (non-padding) tokens of a list of batches, in order."""
    return [t for b in batches for t in b.tokens[b.doc_ids >= 0].tolist()]


def doc_indices(tok, batches):
    """Indices of the documents in a stream, read from each BOS...EOS span."""
    stream, found, start = stream_of(batches), [], None
    for i, t in enumerate(stream):
        if t == tok.bos_id:
            start = i
        elif t == tok.eos_id:
            found.append(int(tok.decode(stream[start + 1:i])[3:7]))
    return found


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "meta": 1}, ensure_ascii=False) + "\n")
    return path


def test_synthetic_corpus_is_deterministic():
    assert synthetic_corpus(50, seed=1) == synthetic_corpus(50, seed=1)
    assert synthetic_corpus(50, seed=1) != synthetic_corpus(50, seed=2)
    assert all(d.strip() for d in synthetic_corpus(200, seed=3))


def test_packing_loses_no_tokens(tok, tmp_path):
    docs = docs_with_ids(120)
    loader = PretrainLoader(tok, [write_jsonl(tmp_path / "a.jsonl", docs[:70])], texts=docs[70:], batch_size=3,
                            seq_len=64, epochs=1, docs_per_read=16)
    batches = list(loader)
    expected = [t for d in docs for t in [tok.bos_id, *tok.encode(d), tok.eos_id]]
    assert stream_of(batches) == expected                                  # same tokens, same order
    assert sum(b.n_tokens for b in batches) == len(expected)
    assert all(b.tokens.shape == (3, 65) for b in batches[:-1])
    assert all((b.loss_mask == (b.doc_ids >= 0)).all() for b in batches)
    last = batches[-1]
    assert (last.tokens[last.doc_ids < 0] == tok.pad_id).all() and (last.loss_mask[last.doc_ids < 0] == 0).all()


def test_doc_ids_and_positions_restart_at_each_document(tok):
    loader = PretrainLoader(tok, texts=docs_with_ids(40), batch_size=2, seq_len=48, epochs=1)
    b = next(loader)
    for row_tok, row_doc, row_pos in zip(b.tokens, b.doc_ids, b.position_ids):
        starts = (row_doc[1:] != row_doc[:-1]).nonzero().flatten() + 1
        assert row_doc[0] == 0 and (row_tok[starts] == tok.bos_id).all()       # a new document begins at BOS
        assert (torch.diff(row_doc) >= 0).all()
        for s in starts.tolist():
            if s < len(row_pos):
                assert row_pos[s] == 0 and (s == 0 or row_pos[s - 1] > 0)
    assert b.inputs.shape == b.targets.shape == b.position_ids.shape == (2, 48)
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1])


def test_two_ranks_see_disjoint_data(tok, tmp_path):
    docs = docs_with_ids(90)
    files = [write_jsonl(tmp_path / "a.jsonl", docs[:45]), write_jsonl(tmp_path / "b.jsonl", docs[45:])]
    seen = [doc_indices(tok, list(PretrainLoader(tok, files, batch_size=2, seq_len=32, rank=r, world_size=2,
                                                 epochs=1))) for r in (0, 1)]
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(90))
    assert abs(len(seen[0]) - len(seen[1])) <= 1


@pytest.mark.parametrize("kind", ["jsonl", "txt", "parquet", "texts"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_gives_exactly_the_next_batch(tok, tmp_path, monkeypatch, kind, world_size):
    docs = docs_with_ids(60)
    if kind == "jsonl":
        src = dict(files=[write_jsonl(tmp_path / "a.jsonl", docs[:30]), write_jsonl(tmp_path / "b.jsonl", docs[30:])])
    elif kind == "txt":
        monkeypatch.setattr(pretrain, "TXT_PIECE_BYTES", 200)   # many pieces per file
        for i in range(3):
            (tmp_path / f"{i}.txt").write_text("\n".join(docs[i * 20:(i + 1) * 20]), encoding="utf-8")
        src = dict(files=[tmp_path])
    elif kind == "parquet":
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.table({"id": list(range(60)), "text": docs}), tmp_path / "d.parquet", row_group_size=7)
        src = dict(files=[tmp_path / "d.parquet"])
    else:
        src = dict(texts=docs)

    def make():   # epochs=None: the run crosses epoch boundaries, which resume must handle too
        return PretrainLoader(tok, **src, batch_size=2, seq_len=40, rank=world_size - 1, world_size=world_size,
                              docs_per_read=3)

    per_epoch = sum(1 for _ in PretrainLoader(tok, **src, batch_size=2, seq_len=40, rank=world_size - 1,
                                              world_size=world_size, epochs=1))
    for k in (3, per_epoch - 1):   # mid-file, and just before the epoch ends
        a = make()
        for _ in range(k):
            next(a)
        state = json.loads(json.dumps(a.state_dict()))   # survives a trip through a checkpoint file
        want = [next(a) for _ in range(4)]
        b = make()
        b.load_state_dict(state)
        got = [next(b) for _ in range(4)]
        for w, g in zip(want, got):
            assert torch.equal(w.tokens, g.tokens) and torch.equal(w.doc_ids, g.doc_ids)
        assert not torch.equal(want[0].tokens, next(make()).tokens)   # the resumed batch is not just batch 0
    with pytest.raises(DataError, match="seq_len"):
        PretrainLoader(tok, **src, batch_size=2, seq_len=41, rank=world_size - 1,
                       world_size=world_size).load_state_dict(state)


def test_txt_pieces_reassemble_the_file(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "TXT_PIECE_BYTES", 100)
    text = "\n".join(synthetic_corpus(30, seed=7)) + "\nend: 你好 😀"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    pieces = list(pretrain.read_pieces(tmp_path / "t.txt"))
    assert len(pieces) > 5 and "".join(p.text for p in pieces) == text
    assert [p.first for p in pieces] == [True] + [False] * (len(pieces) - 1)
    assert [p.last for p in pieces] == [False] * (len(pieces) - 1) + [True]
    stream = stream_of(list(PretrainLoader(tok, [tmp_path / "t.txt"], batch_size=1, seq_len=64, epochs=1)))
    assert stream[0] == tok.bos_id and stream[-1] == tok.eos_id and stream.count(tok.bos_id) == 1


def test_bad_pretraining_input(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        list(PretrainLoader(tok, [bad], epochs=1))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "ok"}\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"nofield\.jsonl:2: no 'text' field \(keys: body\)"):
        list(PretrainLoader(tok, [nofield], epochs=1))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n   \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty corpus.*empty.jsonl"):
        next(PretrainLoader(tok, [empty]))
    with pytest.raises(DataError, match="empty corpus"):
        next(PretrainLoader(tok, texts=["", ""]))
    with pytest.raises(DataError, match="only 1 documents for 2 ranks"):
        next(PretrainLoader(tok, texts=["one"], rank=1, world_size=2))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        PretrainLoader(tok, [tmp_path / "x.csv"])
    with pytest.raises(DataError, match="no such file"):
        PretrainLoader(tok, [tmp_path / "missing.jsonl"])


def test_parquet_without_the_column(tok, tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["a", "b"], "id": [1, 2]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet: no column 'text' \(columns: body, id\)"):
        next(PretrainLoader(tok, [tmp_path / "p.parquet"]))


# ----------------------------------------------------------------------------- SFT
def conversations(n, seed=0):
    import random

    rng = random.Random(seed)
    convs = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        conv = [{"role": "user", "content": f"conv{i:03d}: what is {a} + {b}?" + " please" * rng.randint(0, 12)},
                {"role": "assistant", "content": f"<think>\n{a} plus {b}\n</think>\n\n{a + b}"}]
        if i % 3 == 0:
            conv = [{"role": "system", "content": "Be brief."}] + conv + [
                {"role": "user", "content": "and doubled?"}, {"role": "assistant", "content": str(2 * (a + b))}]
        convs.append(conv)
    return convs


def conv_ids_of(tok, batch: Batch):
    """Conversation numbers in a batch, one per (row, doc)."""
    out = []
    for row_tok, row_doc in zip(batch.tokens, batch.doc_ids):
        for d in row_doc.unique().tolist():
            if d >= 0:
                text = tok.decode(row_tok[row_doc == d].tolist())
                out.append(int(text.split("conv")[1][:3]))
    return out


@pytest.mark.parametrize("pack", [False, True])
def test_sft_batches_hold_rendered_conversations(tok, pack):
    convs = conversations(40)
    loader = SFTLoader(tok, convs, batch_size=4, seq_len=128, pack=pack, epochs=1, seed=3)
    assert loader.n_dropped == loader.n_truncated == 0
    batches = list(loader)
    seen = [c for b in batches for c in conv_ids_of(tok, b)]
    assert sorted(seen) == list(range(40))                       # each conversation exactly once per epoch
    for b in batches:
        assert (b.tokens[b.doc_ids < 0] == tok.pad_id).all() and (b.loss_mask[b.doc_ids < 0] == 0).all()
        if pack:
            assert b.tokens.shape[1] == 129
        for row in range(b.tokens.shape[0]):
            for d in b.doc_ids[row].unique().tolist():
                if d < 0:
                    continue
                sel = b.doc_ids[row] == d
                ids, mask = render(tok, convs[conv_ids_of(tok, Batch(b.tokens[row:row + 1], b.doc_ids[row:row + 1],
                                                                     b.loss_mask[row:row + 1]))[d]],
                                   keep_final_reasoning=True)
                assert b.tokens[row][sel].tolist() == ids and b.loss_mask[row][sel].tolist() == mask
    if pack:   # packing fills rows: fewer rows than conversations
        assert sum(b.tokens.shape[0] for b in batches) < 40


def test_sft_truncates_long_and_drops_unlearnable(tok):
    long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once upon a time " * 40}]
    late = [{"role": "user", "content": "Once upon a time " * 40}, {"role": "assistant", "content": "ok"}]
    loader = SFTLoader(tok, [long, late], batch_size=2, seq_len=40, epochs=1)
    assert (loader.n_truncated, loader.n_dropped) == (2, 1)
    (b,) = list(loader)
    assert b.tokens.shape == (1, 41) and b.loss_mask[0, -1] == 1


def test_sft_shuffle_is_seeded_and_bucketing_cuts_padding(tok):
    convs = conversations(64)

    def order(seed, **kw):
        return [c for b in SFTLoader(tok, convs, batch_size=4, seq_len=128, seed=seed, epochs=1, **kw)
                for c in conv_ids_of(tok, b)]
    assert order(1) == order(1) and order(1) != order(2)

    def padding(bucket_batches):
        batches = list(SFTLoader(tok, convs, batch_size=4, seq_len=128, seed=0, epochs=1,
                                 bucket_batches=bucket_batches))
        return sum(int((b.doc_ids < 0).sum()) for b in batches)
    assert padding(16) < padding(1)


def test_sft_ranks_disjoint_and_resume_exact(tok, tmp_path):
    path = tmp_path / "chat.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for c in conversations(48):
            f.write(json.dumps({"messages": c}, ensure_ascii=False) + "\n")
    ranks = [[c for b in SFTLoader(tok, path, batch_size=3, seq_len=128, rank=r, world_size=2, epochs=1)
              for c in conv_ids_of(tok, b)] for r in (0, 1)]
    assert set(ranks[0]).isdisjoint(ranks[1]) and sorted(ranks[0] + ranks[1]) == list(range(48))

    a = SFTLoader(tok, path, batch_size=3, seq_len=128, pack=True, seed=5)
    steps = len(a) + 1   # cross an epoch boundary
    for _ in range(steps):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    want = [next(a) for _ in range(3)]
    b = SFTLoader(tok, path, batch_size=3, seq_len=128, pack=True, seed=5)
    b.load_state_dict(state)
    for w in want:
        g = next(b)
        assert torch.equal(w.tokens, g.tokens) and torch.equal(w.loss_mask, g.loss_mask)


def test_bad_sft_input(tok, tmp_path):
    bad = tmp_path / "chat.jsonl"
    bad.write_text(json.dumps({"messages": conversations(1)[0]}) + "\nnot json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"chat\.jsonl:2: not valid JSON"):
        load_conversations(bad)
    bad.write_text(json.dumps({"conversation": []}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"chat\.jsonl:1: no 'messages' field"):
        SFTLoader(tok, bad)
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"chat\.jsonl:1: message 0 needs a 'role'"):
        SFTLoader(tok, bad)
    bad.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty corpus"):
        SFTLoader(tok, bad)
    with pytest.raises(DataError, match="no conversation has assistant tokens"):
        SFTLoader(tok, [[{"role": "user", "content": "hi"}]])
