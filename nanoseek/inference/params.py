"""SamplingParams: how one request is decoded, with vLLM's field names and meanings, validated on construction.

Every check runs in `__post_init__`, so a bad request fails with one clear line before the engine does any work.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from nanoseek.errors import NanoseekError

# Below this temperature sampling is greedy (argmax), as in vLLM: dividing logits by ~0 overflows.
GREEDY_EPS = 1e-5


class RequestError(NanoseekError):
    """A request (prompt or sampling parameters) is invalid; the message names the field and the fix."""


@dataclass
class SamplingParams:
    n: int = 1                                   # completions per prompt; they share the prompt's cache blocks
    temperature: float = 1.0                     # 0: greedy
    top_p: float = 1.0                           # nucleus: smallest set of tokens with mass >= top_p, in (0, 1]
    top_k: int = -1                              # keep the k most likely tokens; -1 or 0: all
    min_p: float = 0.0                           # drop tokens with prob < min_p * max prob, in [0, 1]
    presence_penalty: float = 0.0                # subtract once from tokens already generated, in [-2, 2]
    frequency_penalty: float = 0.0               # subtract per occurrence in the generated tokens, in [-2, 2]
    repetition_penalty: float = 1.0              # CTRL-style: divide positive / multiply negative logits of
                                                 # tokens seen in prompt or output; > 0, 1 = off
    seed: int | None = None                      # per-request generator: same seed, same output, any batch
    stop: str | list[str] | None = None          # stop strings; excluded from the text unless asked
    stop_token_ids: list[int] | None = None      # extra ids that end the completion (kept in token_ids)
    ignore_eos: bool = False
    max_tokens: int | None = 16                  # None: up to the context length
    min_tokens: int = 0                          # EOS and stop ids are masked until this many tokens exist
    logprobs: int | None = None                  # log-probs of each sampled token plus this many top alternatives
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stop_list: list[str] = field(init=False, repr=False)   # `stop` normalized to a list

    def __post_init__(self):
        def bad(name: str, why: str):
            raise RequestError(f"SamplingParams.{name} = {getattr(self, name)!r}: {why}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.n) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            bad("temperature", "must be >= 0 (0 means greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not is_int(self.top_k) or self.top_k < -1:
            bad("top_k", "must be -1 or 0 (disabled) or a positive integer")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not -2 <= v <= 2:
                bad(name, "must be in [-2, 2]")
        if not isinstance(self.repetition_penalty, (int, float)) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0 (1 disables it)")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "must be an integer or None")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens <= 0):
            bad("max_tokens", "must be a positive integer (or None for up to the context length)")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            bad("min_tokens", "must be a non-negative integer")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must not exceed max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not is_int(self.logprobs) or self.logprobs < 0):
            bad("logprobs", "must be None or a non-negative integer (number of top alternatives)")
        if self.stop is None:
            self.stop_list = []
        elif isinstance(self.stop, str):
            self.stop_list = [self.stop]
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            self.stop_list = list(self.stop)
        else:
            bad("stop", "must be a string, a list of strings, or None")
        if any(s == "" for s in self.stop_list):
            bad("stop", "stop strings must not be empty")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif not isinstance(self.stop_token_ids, (list, tuple)) or not all(is_int(t) for t in self.stop_token_ids):
            bad("stop_token_ids", "must be a list of integer token ids")
        self.stop_token_ids = list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0
