"""LLMEngine: the step loop over token ids (requests in, per-step outputs out), built to be driven by a server.

One `step()` = schedule -> run the prefill chunks (expanded MLA) and the decodes (absorbed MLA) -> sample or
verify drafts -> stop checks -> draft the next tokens (MTP) -> per-request outputs with deltas for streaming.
`add_request` and `abort_request` may be called from another thread (an asyncio server's event loop while a
worker thread runs `step()`): they validate at once, raising RequestError (a ValueError) before any work, and
queue the change, which the next step applies. Aborting frees the request's cache blocks.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass

import torch

from nanoseek.errors import ConfigError
from nanoseek.inference.block_manager import BlockManager, PagedLatentCache
from nanoseek.inference.params import RequestError, SamplingParams
from nanoseek.inference.runner import ModelRunner
from nanoseek.inference.sampler import Row, Sampler
from nanoseek.inference.scheduler import Scheduler
from nanoseek.inference.sequence import CompletionOutput, Request, RequestOutput, Sequence, Status
from nanoseek.inference.speculative import MTPDrafter, accept_drafts


@dataclass
class EngineConfig:
    block_size: int = 16                    # tokens per cache block
    num_blocks: int | None = None           # None: max_num_seqs full contexts, capped by kv_cache_memory_gb
    kv_cache_memory_gb: float = 0.25        # cap on the cache when num_blocks is None
    kv_cache_dtype: torch.dtype | None = None   # None: the model's dtype
    max_num_seqs: int = 64                  # sequences running at once
    max_num_batched_tokens: int = 1024      # token budget of one step (prefill chunks + decodes)
    max_model_len: int | None = None        # context length; None: the config's max_position_embeddings
    enable_prefix_caching: bool = True
    num_speculative_tokens: int = 0         # MTP drafts per step; 0 = off
    compile: bool = False                   # torch.compile the decode step
    seed: int = 0                           # generator for requests without their own seed

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"engine option {name} = {getattr(self, name)!r}: must be a positive integer")
        if self.num_speculative_tokens < 0:
            raise ConfigError(f"num_speculative_tokens = {self.num_speculative_tokens}: must be >= 0")
        if self.max_num_batched_tokens <= self.num_speculative_tokens:
            raise ConfigError("max_num_batched_tokens must exceed num_speculative_tokens")


class Detokenizer:
    """Incremental detokenization: text grows only by whole characters (a byte-level token may end mid-UTF-8).
    It runs when text is needed: every token for requests with stop strings, else when an output is built (each
    step while streaming, once at the end for LLM.generate)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def update(self, seq: Sequence, end: int | None = None) -> None:
        """Decode the tokens up to `end` (default: all) not yet in seq.text."""
        ids, skip = seq.token_ids[:end] if end is not None else seq.token_ids, seq.params.skip_special_tokens
        if seq.read_offset >= len(ids):
            return
        prefix = self.tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=skip)
        full = self.tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            seq.text += full[len(prefix):]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)


class LLMEngine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None):
        self.config = c = config or EngineConfig()
        self.model = model.eval()
        self.cfg = model.config
        self.tokenizer = tokenizer
        self.detok = Detokenizer(tokenizer) if tokenizer is not None else None
        device = next(model.parameters()).device
        k = c.num_speculative_tokens
        if k and len(model.mtp) == 0:
            raise ConfigError("num_speculative_tokens > 0 needs an MTP module, and this checkpoint has none "
                              "(num_nextn_predict_layers = 0); drop the option")
        self.max_model_len = c.max_model_len or self.cfg.max_position_embeddings
        n_layers = self.cfg.num_hidden_layers + (1 if k else 0)          # MTP drafts use the first module's slot
        dtype = c.kv_cache_dtype or next(model.parameters()).dtype
        lookahead = max(k - 1, 0)                                        # chained draft positions past the step
        per_seq = -(-(self.max_model_len + 2 * k) // c.block_size)
        per_block = n_layers * c.block_size * self.cfg.latent_dim * torch.finfo(dtype).bits // 8
        num_blocks = c.num_blocks or 1 + min(c.max_num_seqs * per_seq,
                                             max(per_seq, int(c.kv_cache_memory_gb * 2 ** 30) // per_block))
        if num_blocks - 1 < per_seq:
            raise ConfigError(f"num_blocks = {num_blocks} holds less than one full context ({per_seq} blocks of "
                              f"{c.block_size} for max_model_len {self.max_model_len}); raise it or lower "
                              f"max_model_len")
        self.cache = PagedLatentCache(n_layers, num_blocks, c.block_size, self.cfg.kv_lora_rank,
                                      self.cfg.qk_rope_head_dim, dtype, device)
        self.block_manager = BlockManager(num_blocks, c.block_size, c.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, c.max_num_seqs, c.max_num_batched_tokens, lookahead)
        self.runner = ModelRunner(model, self.cache, self.block_manager.pending_copies, compile=c.compile)
        eos = self.cfg.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if tokenizer is not None and tokenizer.eos_id is not None:
            self.eos_token_ids.add(tokenizer.eos_id)
        self.sampler = Sampler(self.eos_token_ids, device, c.seed)
        self.drafter = MTPDrafter(self.runner, self.sampler, k) if k else None
        self.requests: dict[str, Request] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ids_lock = threading.Lock()
        self._live_ids: set[str] = set()
        self._seq_ids = itertools.count()
        self.stats = {"steps": 0, "draft_tokens": 0, "accepted_tokens": 0, "generated_tokens": 0}

    # ----- requests -----
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("text prompts need a tokenizer: pass token ids, or load a checkpoint directory "
                                   "that has tokenizer.json")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                              for t in prompt):
            raise RequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return list(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if not prompt_ids:
            raise RequestError("the prompt is empty; give at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens but the context holds "
                               f"{self.max_model_len} (max_model_len); shorten the prompt")
        V = self.cfg.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= V:
            raise RequestError(f"prompt token ids must be in [0, {V}); got {min(prompt_ids)}..{max(prompt_ids)}")
        if params.stop_list and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; use stop_token_ids with token-id prompts")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None) -> None:
        """Validate now (RequestError before any work), then queue the request for the next step."""
        params = params if params is not None else SamplingParams()
        ids = list(prompt_token_ids) if prompt_token_ids is not None else self.encode_prompt(prompt)
        self.validate(ids, params)
        with self._ids_lock:
            if request_id in self._live_ids:
                raise RequestError(f"request id {request_id!r} is already running; ids must be unique")
            self._live_ids.add(request_id)
        text = prompt if isinstance(prompt, str) else None
        self._inbox.put(("add", Request(request_id, text, ids, params, pending_forks=params.n - 1)))

    def abort_request(self, request_id: str) -> None:
        """Stop a request (queued or running) at the next step and free its cache blocks."""
        self._inbox.put(("abort", request_id))

    abort = abort_request

    def has_unfinished_requests(self) -> bool:
        return not self._inbox.empty() or self.scheduler.has_unfinished

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self.requests[item.request_id] = item
                self.scheduler.add(self._new_seq(item, 0, item.prompt_token_ids))
            else:
                req = self.requests.pop(item, None)
                if req is not None:
                    req.pending_forks = 0
                    for seq in req.seqs:
                        if not seq.is_finished:
                            self.scheduler.finish(seq)
                            seq.status, seq.finish_reason = Status.FINISHED, "abort"
                self._forget(item)

    def _forget(self, request_id: str) -> None:
        with self._ids_lock:
            self._live_ids.discard(request_id)

    def _new_seq(self, req: Request, index: int, token_ids: list[int]) -> Sequence:
        seq = Sequence(next(self._seq_ids), req, index, token_ids)
        self._seed(seq)
        req.seqs.append(seq)
        return seq

    # ----- the step -----
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """One engine step -> outputs of the requests it advanced (finished_only: of those that finished; what
        LLM.generate asks for, so nothing is built or detokenized for the steps in between)."""
        self._drain_inbox()
        scheduled = self.scheduler.schedule()
        touched: dict[str, Request] = {}
        prefill = [(s, n) for s, n in scheduled if n > 1 and not s.draft_tokens]
        decode = [(s, n) for s, n in scheduled if n == 1 or s.draft_tokens]
        for group, absorb in ((prefill, False), (decode, True)):
            if group:
                self._run(group, absorb, touched)
        for seq, _ in scheduled:
            if not seq.is_finished:
                self.block_manager.commit(seq)
        self.stats["steps"] += 1
        # a request whose prompt is still being prefilled in chunks has nothing to report yet
        outputs = [self._output(req) for req in touched.values()
                   if req.finished or not finished_only and any(s.num_output_tokens > s.emitted_token_len
                                                                  for s in req.seqs)]
        for req in touched.values():
            if req.finished:
                self.requests.pop(req.request_id, None)
                self._forget(req.request_id)
        return outputs

    def _run(self, group: list[tuple[Sequence, int]], absorb: bool, touched: dict[str, Request]) -> None:
        chunks = []
        for seq, n in group:
            start = seq.num_computed
            toks = [seq.token_ids[-1], *seq.draft_tokens] if seq.draft_tokens else seq.token_ids[start:start + n]
            chunks.append((seq, start, toks))
        batch = self.runner.make_batch(chunks)
        hidden = self.runner.forward(batch, absorb)                                     # (B,T,H)
        # Rows to sample: the last position of a sequence that reached its newest token (shared with its forked
        # siblings), or every position of a verification window. A prefill chunk short of the end samples nothing.
        rows: list[Row] = []
        where: list[tuple[int, int]] = []                                               # (b, t) of each row
        plan: list[tuple[Sequence, int, int, list[int]]] = []                           # seq, b, start, row ids
        for b, (seq, start, toks) in enumerate(chunks):
            end = start + len(toks)
            if seq.draft_tokens:
                plan.append((seq, b, start, list(range(len(rows), len(rows) + len(toks)))))
                rows += [Row(seq, seq.draft_tokens[:j]) for j in range(len(toks))]
                where += [(b, j) for j in range(len(toks))]
            elif end == seq.num_tokens:
                for s in [seq, *self._fork(seq, end)]:
                    plan.append((s, b, start, [len(rows)]))
                    rows.append(Row(s))
                    where.append((b, len(toks) - 1))
            else:
                seq.num_computed = end
                plan.append((seq, b, start, []))
        chosen: dict[int, int] = {}                                                     # row -> emitted token
        lp_of: dict[int, dict | None] = {}
        if rows:
            logits = self.runner.logits_at(hidden, [w[0] for w in where], [w[1] for w in where])   # (R,V) fp32
            plain = [p[3][0] for p in plan if p[3] and not p[0].draft_tokens]
            if len(plain) == len(rows) and self.sampler.plain_greedy(rows):            # argmax of the raw logits
                chosen.update(zip(plain, logits.argmax(-1).tolist()))
            else:
                probs = self.sampler.probs(logits, rows)                                # (R,V)
                if len(plain) == len(rows):                                             # no verification window
                    chosen.update(zip(plain, self.sampler.sample(probs, rows)))
                elif plain:
                    chosen.update(zip(plain, self.sampler.sample(probs[plain], [rows[i] for i in plain])))
            for seq, _, _, ids in plan:
                if seq.draft_tokens:
                    toks = accept_drafts(self.sampler, rows[ids[0]], seq.draft_tokens, probs[ids], seq.draft_probs)
                    self.stats["draft_tokens"] += len(seq.draft_tokens)
                    self.stats["accepted_tokens"] += len(toks) - 1
                    chosen.update(zip(ids, toks))
            order = sorted(chosen)
            if any(rows[i].params.logprobs is not None for i in order):
                lp_of = dict(zip(order, self.sampler.logprobs(logits[order], [rows[i] for i in order],
                                                              [chosen[i] for i in order])))
        drafting = []
        for seq, b, start, ids in plan:
            touched[seq.request.request_id] = seq.request
            if not ids:
                drafting.append((seq, b, start, 0))
                continue
            seq.draft_tokens, seq.draft_probs = [], None
            for i in ids:
                if i not in chosen or self._append(seq, chosen[i], lp_of.get(i)):
                    break
            if not seq.is_finished:
                seq.num_computed = seq.num_tokens - 1                                   # newest token: no KV yet
                if self.drafter is not None:
                    drafting.append((seq, b, start, self._draft_budget(seq)))
        if self.drafter is not None:
            self.drafter.propose(drafting, hidden, absorb)

    def _seed(self, seq: Sequence) -> None:
        seed = seq.params.seed
        if seed is not None:
            # one stream per completion, fixed by (seed, index): independent of batch and arrival order
            seq.generator = torch.Generator(device=self.cache.kv[0].device)
            seq.generator.manual_seed((seed + seq.index * 0x9E3779B97F4A7C15) % 2 ** 63)

    def _fork(self, seq: Sequence, num_computed: int) -> list[Sequence]:
        """At the end of completion 0's prefill, fork completions 1..n-1 sharing its blocks."""
        req = seq.request
        if seq.index != 0 or not req.pending_forks:
            return []
        children = []
        for index in range(1, 1 + req.pending_forks):
            child = seq.fork(next(self._seq_ids), index)
            child.num_computed = num_computed
            self._seed(child)
            self.block_manager.fork(child)
            self.scheduler.add_running(child)
            req.seqs.append(child)
            children.append(child)
        req.pending_forks = 0
        return children

    def _remaining(self, seq: Sequence) -> int:
        """Tokens seq may still emit (max_tokens and the context length)."""
        cap = self.max_model_len - seq.num_tokens
        if seq.params.max_tokens is not None:
            cap = min(cap, seq.params.max_tokens - seq.num_output_tokens)
        return cap

    def _draft_budget(self, seq: Sequence) -> int:
        return max(0, min(self.config.num_speculative_tokens, self._remaining(seq) - 1))

    def _append(self, seq: Sequence, tok: int, logprobs) -> bool:
        """Add one sampled token and apply the stop rules; True if seq finished."""
        p = seq.params
        seq.token_ids.append(tok)
        self.stats["generated_tokens"] += 1
        if seq.request.first_token_time is None:
            seq.request.first_token_time = time.monotonic()
        if logprobs is not None and seq.logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[tok].logprob
        reason, stop_reason = None, None
        if tok in p.stop_token_ids:
            reason, stop_reason = "stop", tok
        elif not p.ignore_eos and tok in self.eos_token_ids:
            reason = "stop"
        in_text = reason is None or p.include_stop_str_in_output and stop_reason is not None
        if not in_text:
            seq.text_end = len(seq.token_ids) - 1          # the EOS / stop id is not part of the text
        if self.detok is not None and p.stop_list and in_text:   # stop strings are matched on the text as it grows
            before = len(seq.text)
            self.detok.update(seq)
            if reason is None and seq.num_output_tokens >= p.min_tokens:
                hit = self._find_stop(seq.text, before, p.stop_list)
                if hit is not None:
                    i, s = hit
                    seq.text = seq.text[:i + (len(s) if p.include_stop_str_in_output else 0)]
                    reason, stop_reason = "stop", s
        if reason is None and self._remaining(seq) <= 0:
            reason = "length"
        if reason is None:
            return False
        seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, reason, stop_reason
        self.scheduler.finish(seq)
        return True

    @staticmethod
    def _find_stop(text: str, new_from: int, stops: list[str]) -> tuple[int, str] | None:
        """Earliest stop string that ends in the text added since new_from."""
        best = None
        for s in stops:
            i = text.find(s, max(0, new_from - len(s) + 1))
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        return best

    # ----- outputs -----
    def _output(self, req: Request) -> RequestOutput:
        outs = []
        hold = max((len(s) for s in req.params.stop_list), default=1) - 1
        for seq in sorted(req.seqs, key=lambda s: s.index):
            if self.detok is not None and not req.params.stop_list:
                self.detok.update(seq, seq.text_end)
            # hold back text that may be the start of a stop string until it is known not to be
            shown = len(seq.text) if seq.is_finished else max(seq.emitted_text_len, len(seq.text) - hold)
            out_ids = seq.output_token_ids
            outs.append(CompletionOutput(
                index=seq.index, text=seq.text[:shown], token_ids=out_ids,
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                logprobs=seq.logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                delta_text=seq.text[seq.emitted_text_len:shown], delta_token_ids=out_ids[seq.emitted_token_len:]))
            seq.emitted_text_len, seq.emitted_token_len = shown, len(out_ids)
        metrics = {"arrival_time": req.arrival_time, "first_token_time": req.first_token_time}
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished,
                             num_cached_tokens=req.seqs[0].num_cached_prompt if req.seqs else 0, metrics=metrics)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / proposed MTP draft tokens so far (None before any draft)."""
        d = self.stats["draft_tokens"]
        return self.stats["accepted_tokens"] / d if d else None

    def kv_cache_bytes_per_token(self) -> int:
        return self.cache.nbytes_per_token()
