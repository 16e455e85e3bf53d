"""Packed pretraining data: stream local text files, tokenize in batches, cut fixed-length rows, resume exactly.

Sources are .txt files (one document each, read in ~1 MiB line-aligned pieces), .jsonl (one document per line,
field "text"), .parquet (column "text"), directories of those, or in-memory texts (`synthetic_corpus` gives a
deterministic one, so pretraining runs with no data files). Each document becomes `BOS ids EOS` and documents
are concatenated into one stream, cut into rows of seq_len+1 tokens with nothing dropped or repeated (a
document may continue on the next row). `Batch.doc_ids` numbers the documents within each row, so a trainer can
restart positions (`Batch.position_ids`) and block attention across documents.

Data parallelism: pieces are dealt round-robin, piece g to rank g % world_size, so ranks see disjoint documents
and only tokenize their own. `state_dict()` holds the read position and the tokens read but not yet batched,
so `load_state_dict()` continues with exactly the next batch.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NamedTuple, Sequence

import torch

from nanoseek.errors import DataError

if TYPE_CHECKING:
    from nanoseek.tokenizer import Tokenizer

SUFFIXES = (".txt", ".jsonl", ".parquet")
TXT_PIECE_BYTES = 1 << 20   # bounds memory on big .txt files; line-aligned so UTF-8 characters never split


# ----------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """B rows of T+1 tokens; inputs are tokens[:, :-1], targets tokens[:, 1:]."""
    tokens: torch.Tensor      # (B, T+1) int64
    doc_ids: torch.Tensor     # (B, T+1) int64: 0, 1, 2... for the documents in each row; -1 on padding
    loss_mask: torch.Tensor   # (B, T+1) int64: 1 where the token is a training target (never on padding)

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :-1]

    @property
    def targets(self) -> torch.Tensor:
        return self.tokens[:, 1:]

    @property
    def target_mask(self) -> torch.Tensor:
        """(B, T): 1 where targets[b, t] counts in the loss."""
        return self.loss_mask[:, 1:]

    @property
    def position_ids(self) -> torch.Tensor:
        """(B, T) positions of the inputs, restarting at 0 where each document starts."""
        doc = self.doc_ids[:, :-1]
        idx = torch.arange(doc.shape[1]).expand_as(doc)
        starts = torch.ones_like(doc, dtype=torch.bool)
        starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
        return idx - torch.cummax(torch.where(starts, idx, 0), dim=1).values

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int((self.doc_ids >= 0).sum())


# ----------------------------------------------------------------------------- synthetic corpus
_NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena"]
_ANIMALS = ["cat", "dog", "fox", "owl", "bear", "frog", "duck", "horse", "mouse", "whale"]
_ADJ = ["small", "quiet", "bright", "old", "clever", "happy", "brave", "sleepy", "green", "tall"]
_PLACES = ["the river", "the old mill", "the garden", "the market", "the hill", "the forest", "the school"]
_VERBS = ["found", "watched", "followed", "painted", "helped", "called", "carried", "visited"]
_THINGS = ["a red ball", "three apples", "a map", "a small boat", "a blue kite", "a warm loaf of bread"]


def synthetic_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Deterministic English-like stories and arithmetic, for pretraining and tokenizer training without files."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        kind = rng.random()
        if kind < 0.5:
            who, pet, adj = rng.choice(_NAMES), rng.choice(_ANIMALS), rng.choice(_ADJ)
            lines = [f"Once upon a time, {who} had a {adj} {pet}."]
            for _ in range(rng.randint(2, 6)):
                lines.append(f"One day the {pet} {rng.choice(_VERBS)} {rng.choice(_THINGS)} near "
                             f"{rng.choice(_PLACES)}, and {who} was {rng.choice(_ADJ)}.")
            lines.append(f"In the end, {who} and the {pet} went home.")
            docs.append(" ".join(lines))
        elif kind < 0.85:
            lines = []
            for _ in range(rng.randint(3, 8)):
                a, b = rng.randint(0, 999), rng.randint(0, 999)
                op = rng.choice("+-*")
                val = a + b if op == "+" else a - b if op == "-" else a * b
                lines.append(f"Q: What is {a} {op} {b}? A: {val}.")
            docs.append("\n".join(lines))
        else:
            start, step = rng.randint(0, 50), rng.randint(1, 9)
            seq = ", ".join(str(start + i * step) for i in range(rng.randint(5, 12)))
            docs.append(f"Count by {step} from {start}: {seq}.")
    return docs


# ----------------------------------------------------------------------------- reading documents
class Piece(NamedTuple):
    """A document or (for big .txt files) part of one, and the read position just after it."""
    text: str
    first: bool         # starts a document: gets BOS
    last: bool          # ends a document: gets EOS
    next_offset: int    # byte offset (txt/jsonl), row (parquet) or index (in-memory texts) to resume from
    next_line: int      # 1-based line number of the next line (jsonl), for error messages after a resume


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files and directories -> the sorted list of data files they name."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES and f.is_file())
            if not found:
                raise DataError(f"{p}: no {'/'.join(SUFFIXES)} files in this directory")
            files += found
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise DataError(f"{p}: unsupported file type {p.suffix!r}; use {', '.join(SUFFIXES)}")
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    return files


def iter_jsonl(path: Path, offset: int = 0, line: int = 1) -> Iterator[tuple[dict, int, int, int]]:
    """(object, its line number, next byte offset, next line) for each non-blank line of a .jsonl file."""
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            offset += len(raw)
            lineno, line = line, line + 1
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                raise DataError(f"{path}:{lineno}: not valid JSON ({msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield obj, lineno, offset, line


def _read_jsonl(path: Path, field: str, offset: int, line: int) -> Iterator[Piece]:
    for obj, lineno, next_offset, next_line in iter_jsonl(path, offset, line):
        if field not in obj:
            raise DataError(f"{path}:{lineno}: no {field!r} field (keys: {', '.join(list(obj)[:8])})")
        text = obj[field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, not a string")
        if text:
            yield Piece(text, True, True, next_offset, next_line)


def _read_txt(path: Path, offset: int) -> Iterator[Piece]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(offset)
        while offset < size:
            chunk = f.read(TXT_PIECE_BYTES)
            if not chunk.endswith(b"\n"):
                chunk += f.readline()   # finish the line
            try:
                text = chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: byte {offset + e.start} is not UTF-8") from None
            start, offset = offset, offset + len(chunk)
            yield Piece(text, start == 0, offset >= size, offset, 0)


def _read_parquet(path: Path, column: str, row: int) -> Iterator[Piece]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if column not in names:
        raise DataError(f"{path}: no column {column!r} (columns: {', '.join(names)})")
    first_row = 0
    for g in range(pf.num_row_groups):   # row groups are the unit pyarrow reads; skip whole ones on resume
        n = pf.metadata.row_group(g).num_rows
        if first_row + n > row:
            values = pf.read_row_group(g, columns=[column]).column(0).to_pylist()
            for i in range(row - first_row, n):
                text = values[i]
                if text is not None and not isinstance(text, str):
                    raise DataError(f"{path}: row {first_row + i} of column {column!r} is "
                                    f"{type(text).__name__}, not a string")
                if text:
                    yield Piece(text, True, True, first_row + i + 1, 0)
            row = first_row + n
        first_row += n


def read_pieces(source: Path | Sequence[str], field: str = "text", offset: int = 0,
                line: int = 1) -> Iterator[Piece]:
    """The pieces of one source from a saved position; a source is a data file or a list of texts."""
    if not isinstance(source, Path):
        return (Piece(t, True, True, i + 1, 0) for i, t in enumerate(source) if i >= offset and t)
    if source.suffix == ".jsonl":
        return _read_jsonl(source, field, offset, line)
    if source.suffix == ".parquet":
        return _read_parquet(source, field, offset)
    return _read_txt(source, offset)


def iter_texts(paths: Sequence[str | Path], field: str = "text") -> Iterator[str]:
    """Every document (or .txt piece) of the files, in order; for tokenizer training."""
    for path in expand_paths(paths):
        for piece in read_pieces(path, field):
            yield piece.text


# ----------------------------------------------------------------------------- the loader
class PretrainLoader:
    """Iterator of packed `Batch`es for one data-parallel rank.

    epochs=None repeats the data forever (what step-based training wants); with a number, the last batch holds
    the leftover rows, the final one padded (doc_ids -1, loss_mask 0), so no token is dropped.
    """

    def __init__(self, tokenizer: "Tokenizer", files: Sequence[str | Path] | None = None, *,
                 texts: Sequence[str] | None = None, batch_size: int = 8, seq_len: int = 256, rank: int = 0,
                 world_size: int = 1, epochs: int | None = None, field: str = "text", docs_per_read: int = 64):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1 or seq_len < 1:
            raise ValueError("batch_size and seq_len must be positive")
        if tokenizer.bos_id is None or tokenizer.eos_id is None or tokenizer.pad_id is None:
            raise DataError("packing documents needs a tokenizer with BOS, EOS and pad tokens")
        self.tokenizer = tokenizer
        self.sources: list[Path | Sequence[str]] = expand_paths(files) if files else []
        if texts is not None:
            self.sources.append(list(texts))
        if not self.sources:
            raise DataError("empty corpus: give data files or texts")
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.epochs, self.field, self.docs_per_read = epochs, field, docs_per_read
        self._reset_position(epoch=0)
        self.buffer: list[int] = []        # tokens read but not yet batched
        self.buffer_docs: list[int] = []   # document number of each buffered token
        self.next_doc = 0                  # running document number for this rank
        self.done = False

    @property
    def row_len(self) -> int:
        return self.seq_len + 1

    def _reset_position(self, epoch: int) -> None:
        self.epoch, self.source_index, self.offset, self.line = epoch, 0, 0, 1
        self.seen = 0              # pieces dealt this epoch, over all ranks (round-robin index)
        self.epoch_tokens = 0      # tokens this rank got this epoch (0 at the end means an empty corpus)
        self._pieces: Iterator[Piece] | None = None

    def _source_name(self, i: int) -> str:
        s = self.sources[i]
        return str(s) if isinstance(s, Path) else f"<{len(s)} texts>"

    def _next_piece(self) -> Piece | None:
        """Next piece of the whole stream (every rank's), advancing the saved position; None at epoch end."""
        while self.source_index < len(self.sources):
            if self._pieces is None:
                self._pieces = read_pieces(self.sources[self.source_index], self.field, self.offset, self.line)
            piece = next(self._pieces, None)
            if piece is not None:
                self.offset, self.line = piece.next_offset, piece.next_line
                return piece
            self.source_index, self.offset, self.line, self._pieces = self.source_index + 1, 0, 1, None
        return None

    def _read_more(self) -> bool:
        """Tokenize up to docs_per_read of this rank's pieces into the buffer; False once the data is over."""
        mine: list[Piece] = []
        while len(mine) < self.docs_per_read:
            piece = self._next_piece()
            if piece is None:
                break
            if self.seen % self.world_size == self.rank:
                mine.append(piece)
            self.seen += 1
        if mine:
            bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
            for piece, ids in zip(mine, self.tokenizer.encode_batch([p.text for p in mine])):
                ids = [bos] * piece.first + ids + [eos] * piece.last
                self.buffer += ids
                self.buffer_docs += [self.next_doc] * len(ids)
                self.next_doc += 1
                self.epoch_tokens += len(ids)
            return True
        # End of an epoch.
        if self.epoch_tokens == 0:
            names = ", ".join(self._source_name(i) for i in range(len(self.sources)))
            why = (f"only {self.seen} documents for {self.world_size} ranks" if self.seen else "no documents")
            raise DataError(f"empty corpus for rank {self.rank}: {why} in {names}")
        if self.epochs is not None and self.epoch + 1 >= self.epochs:
            return False
        self._reset_position(self.epoch + 1)
        return True

    def __iter__(self) -> "PretrainLoader":
        return self

    def __next__(self) -> Batch:
        need = self.batch_size * self.row_len
        while len(self.buffer) < need and not self.done:
            if not self._read_more():
                self.done = True
        if not self.buffer:
            raise StopIteration
        n = min(need, len(self.buffer))
        tokens, docs = self.buffer[:n], self.buffer_docs[:n]
        del self.buffer[:n], self.buffer_docs[:n]
        return self._make_batch(tokens, docs)

    def _make_batch(self, tokens: list[int], docs: list[int]) -> Batch:
        rows = -(-len(tokens) // self.row_len)
        pad = rows * self.row_len - len(tokens)   # nonzero only for the last batch of a finite run
        tok = torch.tensor(tokens + [self.tokenizer.pad_id] * pad, dtype=torch.long).view(rows, self.row_len)
        doc = torch.tensor(docs + [-1] * pad, dtype=torch.long).view(rows, self.row_len)
        real = doc >= 0
        # Number documents from 0 in each row: the running numbers are consecutive, so subtract the row's first.
        doc = torch.where(real, doc - doc[:, :1], -1)
        return Batch(tok, doc, real.long())

    # ----- exact resume -----
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "source_index": self.source_index, "offset": self.offset, "line": self.line,
                "seen": self.seen, "epoch_tokens": self.epoch_tokens, "next_doc": self.next_doc,
                "buffer": list(self.buffer), "buffer_docs": list(self.buffer_docs), "done": self.done,
                "rank": self.rank, "world_size": self.world_size, "seq_len": self.seq_len,
                "batch_size": self.batch_size,
                "sources": [self._source_name(i) for i in range(len(self.sources))]}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("rank", "world_size", "seq_len", "batch_size", "sources"):
            if state[key] != mine[key]:
                raise DataError(f"cannot resume the data loader exactly: it was saved with {key}={state[key]!r}, "
                                f"this run has {mine[key]!r}")
        self.epoch, self.source_index = state["epoch"], state["source_index"]
        self.offset, self.line, self.seen = state["offset"], state["line"], state["seen"]
        self.epoch_tokens, self.next_doc, self.done = state["epoch_tokens"], state["next_doc"], state["done"]
        self.buffer, self.buffer_docs = list(state["buffer"]), list(state["buffer_docs"])
        self._pieces = None   # reopened at the saved offset on the next read
