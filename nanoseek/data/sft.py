"""Chat SFT data: conversations (OpenAI `messages` jsonl) -> token ids + loss masks -> padded or packed batches.

Each conversation is rendered by `nanoseek.chat.render` (the checkpoint's chat template, R1's by default) with
the loss on assistant tokens only; a final assistant turn with `<think>...</think>` reasoning keeps it, written
as the model produces it after the generation prompt. Conversations longer than seq_len+1 tokens are cut.

Batches follow a plan that is a pure function of (seed, epoch): shuffle, then sort by length inside windows of
`bucket_batches` batches (length bucketing: little padding, still random), then shuffle the batches. Ranks take
every world_size-th batch, so they see disjoint conversations; the state is (epoch, batch index), which makes
resuming exact.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from nanoseek.chat import render
from nanoseek.data.pretrain import Batch, iter_jsonl
from nanoseek.errors import DataError

if TYPE_CHECKING:
    from nanoseek.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages, where: str) -> list[dict]:
    """One conversation's messages, or DataError naming `where` (file:line) and the message at fault."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{where}: message {i} needs a 'role' among {', '.join(ROLES)}")
        if m.get("content") is not None and not isinstance(m["content"], str):
            raise DataError(f"{where}: message {i} ({m['role']}): 'content' must be a string")
    return messages


def load_conversations(path: str | Path, field: str = "messages") -> list[list[dict]]:
    """A .jsonl file of {"messages": [{"role": ..., "content": ...}, ...]} objects, one per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    convs = []
    for obj, lineno, _, _ in iter_jsonl(path):
        if field not in obj:
            raise DataError(f"{path}:{lineno}: no {field!r} field (keys: {', '.join(list(obj)[:8])})")
        convs.append(check_messages(obj[field], f"{path}:{lineno}"))
    if not convs:
        raise DataError(f"{path}: empty corpus, no conversations")
    return convs


def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """First-fit decreasing: group item indices into rows whose lengths sum to at most row_len."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_len - lengths[i])
    return rows


class SFTLoader:
    """Iterator of `Batch`es of rendered conversations for one data-parallel rank.

    pack=False: batch_size conversations per batch, padded to the longest. pack=True: batch_size rows of exactly
    seq_len+1 tokens, each holding whole conversations (doc_ids tell them apart), the rest padding.
    """

    def __init__(self, tokenizer: "Tokenizer", conversations: str | Path | Sequence, *, batch_size: int = 8,
                 seq_len: int = 1024, pack: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 epochs: int | None = None, shuffle: bool = True, bucket_batches: int = 16,
                 keep_final_reasoning: bool = True, progress: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if tokenizer.pad_id is None:
            raise DataError("SFT batches need a tokenizer with a pad token")
        self.tokenizer, self.batch_size, self.seq_len, self.pack = tokenizer, batch_size, seq_len, pack
        self.seed, self.rank, self.world_size, self.epochs = seed, rank, world_size, epochs
        self.shuffle, self.bucket_batches = shuffle, bucket_batches
        if isinstance(conversations, (str, Path)):
            self.name, convs = str(conversations), load_conversations(conversations)
        else:
            self.name = f"<{len(conversations)} conversations>"
            convs = [check_messages(c["messages"] if isinstance(c, dict) else c, f"conversation {i}")
                     for i, c in enumerate(conversations)]
        self.ids: list[list[int]] = []
        self.masks: list[list[int]] = []
        self.n_truncated = self.n_dropped = 0
        row_len = seq_len + 1
        if progress:
            from tqdm import tqdm
            convs = tqdm(convs, desc="render", unit="conv")
        for messages in convs:
            ids, mask = render(tokenizer, messages, keep_final_reasoning=keep_final_reasoning)
            if len(ids) > row_len:
                ids, mask = ids[:row_len], mask[:row_len]
                self.n_truncated += 1
            if not any(mask[1:]):   # nothing to learn (no assistant turn, or cut off before it)
                self.n_dropped += 1
                continue
            self.ids.append(ids)
            self.masks.append(mask)
        if not self.ids:
            raise DataError(f"{self.name}: empty corpus, no conversation has assistant tokens within "
                            f"{row_len} tokens")
        self.epoch, self.index = 0, 0
        self._plan: list[list[list[int]]] | None = None   # batches -> rows -> example indices, this rank only

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """This rank's batches for an epoch; each batch is a list of rows, each row a list of examples."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.ids)))
        if self.shuffle:
            rng.shuffle(order)
        window = self.batch_size * self.bucket_batches
        batches: list[list[list[int]]] = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w:w + window], key=lambda i: len(self.ids[i]))
            if self.pack:
                rows = [[chunk[j] for j in row]
                        for row in pack_rows([len(self.ids[i]) for i in chunk], self.seq_len + 1)]
            else:
                rows = [[i] for i in chunk]
            batches += [rows[b:b + self.batch_size] for b in range(0, len(rows), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        # Every rank needs the same number of steps (DDP waits on all): wrap around to fill the last round.
        batches += batches[:(-len(batches)) % self.world_size]
        return batches[self.rank::self.world_size]

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.plan(self.epoch))

    def __iter__(self) -> "SFTLoader":
        return self

    def __next__(self) -> Batch:
        if self._plan is None:
            self._plan = self.plan(self.epoch)
        if self.index >= len(self._plan):
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                raise StopIteration
            self.epoch, self.index, self._plan = self.epoch + 1, 0, self.plan(self.epoch + 1)
        batch = self._plan[self.index]
        self.index += 1
        return self._make_batch(batch)

    def _make_batch(self, rows: list[list[int]]) -> Batch:
        length = self.seq_len + 1 if self.pack else max(len(self.ids[r[0]]) for r in rows)
        tokens = torch.full((len(rows), length), self.tokenizer.pad_id, dtype=torch.long)
        doc_ids = torch.full((len(rows), length), -1, dtype=torch.long)
        loss_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for b, row in enumerate(rows):
            t = 0
            for d, i in enumerate(row):
                n = len(self.ids[i])
                tokens[b, t:t + n] = torch.tensor(self.ids[i])
                loss_mask[b, t:t + n] = torch.tensor(self.masks[i])
                doc_ids[b, t:t + n] = d
                t += n
        return Batch(tokens, doc_ids, loss_mask)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "n_examples": len(self.ids), "batch_size": self.batch_size,
                "seq_len": self.seq_len, "pack": self.pack}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "rank", "world_size", "n_examples", "batch_size", "seq_len", "pack"):
            if state[key] != mine[key]:
                raise DataError(f"cannot resume the SFT loader exactly: it was saved with {key}={state[key]!r}, "
                                f"this run has {mine[key]!r}")
        self.epoch, self.index, self._plan = state["epoch"], state["index"], None
