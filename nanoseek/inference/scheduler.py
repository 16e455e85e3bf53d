"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step has a token budget (max_num_batched_tokens). Running sequences go first, in admission order: a decoding
sequence needs 1 token (1 + its draft tokens under speculation), a prefilling one gets the rest of its prompt or
whatever budget is left (chunked prefill, so a long prompt never stalls the decoders). Then waiting sequences are
admitted, oldest first, while budget, sequence slots and cache blocks last; a newly admitted sequence first takes
every leading full block of its prompt that is in the prefix cache.

When a running sequence cannot get a block, the most recently admitted running sequence is preempted by
recompute: its blocks are freed and it goes back to the front of the queue with all its tokens (prompt and
generated) to prefill again. Sequences therefore join and leave between any two steps.
"""
from __future__ import annotations

from collections import deque

from nanoseek.inference.block_manager import BlockManager
from nanoseek.inference.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 lookahead: int = 0):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.lookahead = lookahead          # extra slots past the step's tokens (MTP draft chain writes there)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked completion: it already shares its parent's blocks, so it skips the queue."""
        self.running.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """-> [(seq, number of new tokens to run)], blocks reserved for all of them."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            remaining = seq.num_tokens - seq.num_computed
            if remaining == 1 and seq.draft_tokens:
                del seq.draft_tokens[budget - 1:]               # drafts that do not fit the budget are dropped
                if not seq.draft_tokens:
                    seq.draft_probs = None
                elif seq.draft_probs is not None:
                    seq.draft_probs = seq.draft_probs[: len(seq.draft_tokens)]
                n = 1 + len(seq.draft_tokens)
            else:
                n = min(remaining, budget)
            slots = seq.num_computed + n + self.lookahead
            while not self.bm.can_grow(seq, slots):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            self.bm.ensure_slots(seq, slots)
            scheduled.append((seq, n))
            budget -= n
            i += 1
        # A preemption means blocks are short: admitting new work now would only thrash.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.bm.lookup_prefix(seq)
            computed = len(cached) * self.bm.block_size
            n = min(seq.num_tokens - computed, budget)
            if not self.bm.can_admit(cached, computed + n + self.lookahead):
                break
            self.waiting.popleft()
            self.bm.admit(seq, cached, computed + n + self.lookahead)
            if not seq.admitted:
                seq.num_cached_prompt = computed
                seq.admitted = True
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free_seq(seq)
        seq.status = Status.WAITING
        seq.draft_tokens, seq.draft_probs = [], None
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_seq(seq)
