"""Sequences, requests and the outputs the engine hands back (vLLM's RequestOutput / CompletionOutput shapes).

A Request is one prompt with its SamplingParams; it owns n Sequences (one per completion). A Sequence is a list of
token ids (prompt + generated) plus the bookkeeping the scheduler and block manager need: its block table and how
many of its tokens already have latent KV in the cache (`num_computed`). Everything here is token ids; text is
filled in by the engine's detokenizer when a tokenizer is present.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from nanoseek.inference.params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    """One candidate token's log-probability under the model's raw distribution (log_softmax of the logits)."""
    logprob: float
    rank: int                                   # 1 = most likely token
    decoded_token: str | None = None


class Sequence:
    def __init__(self, seq_id: int, request: "Request", index: int, token_ids: list[int]):
        self.seq_id = seq_id
        self.request = request
        self.index = index                      # which of the request's n completions
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = request.num_prompt_tokens
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_computed = 0                   # leading tokens whose latent KV is in the cache
        self.num_hashed_blocks = 0              # leading full blocks registered in the prefix cache
        self.num_cached_prompt = 0              # prompt tokens found in the prefix cache on first admission
        self.admitted = False
        self.finish_reason: str | None = None   # "stop" | "length" | "abort"
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict[int, Logprob]] | None = [] if request.params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.generator: torch.Generator | None = None
        self.uniforms: list[float] = []         # U[0,1) draws taken ahead from `generator`, next one last
        # speculative decoding: proposed tokens for the next step and the draft distribution they came from
        self.draft_tokens: list[int] = []
        self.draft_probs: torch.Tensor | None = None   # (k, V) fp32, None for greedy drafts
        # detokenizer state (engine.Detokenizer): text so far and offsets for incremental decoding
        self.text = ""
        self.prefix_offset = self.read_offset = self.num_prompt_tokens
        self.text_end: int | None = None        # tokens the text covers when the last one (EOS, stop id) is left out
        self.emitted_text_len = 0
        self.emitted_token_len = 0

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def fork(self, seq_id: int, index: int) -> "Sequence":
        """A sibling completion at the same point (before its first sampled token), sharing the block table."""
        child = Sequence(seq_id, self.request, index, self.token_ids[: self.num_prompt_tokens])
        child.block_table = list(self.block_table)
        child.num_computed = self.num_computed
        child.num_hashed_blocks = self.num_hashed_blocks
        child.num_cached_prompt = self.num_cached_prompt
        child.admitted = True
        child.status = Status.RUNNING
        return child

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed}, {self.status.value})")


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    pending_forks: int = 0                      # completions 1..n-1 not yet forked from completion 0
    first_token_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.pending_forks == 0 and all(s.is_finished for s in self.seqs)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None            # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None        # the stop string or stop token id that ended it (None for EOS)
    delta_text: str = ""                        # new since the previous output of this request (streaming)
    delta_token_ids: list[int] = field(default_factory=list)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0                  # prompt tokens served from the prefix cache
    metrics: dict = field(default_factory=dict)
