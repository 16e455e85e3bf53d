"""`nanoseek.LLM`: the vLLM-like offline facade over LLMEngine.

    llm = nanoseek.LLM("ckpt/")                          # or LLM(model) for a model in memory
    outs = llm.generate(["Hello", [1, 2, 3]], nanoseek.SamplingParams(temperature=0, max_tokens=32))
    outs[0].outputs[0].text, .token_ids, .logprobs, .finish_reason
    for out in llm.stream("Hello", params): print(out.outputs[0].delta_text, end="")

Every prompt is validated before any request is queued, so one bad prompt in a batch fails the call cleanly.
"""
from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import Iterator, Sequence as Seq

import torch

from nanoseek.errors import ConfigError
from nanoseek.inference.engine import EngineConfig, LLMEngine
from nanoseek.inference.params import RequestError, SamplingParams
from nanoseek.inference.sequence import RequestOutput

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}

Prompt = str | list[int]


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r}: choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _warn_if_slow_dtype(model) -> None:
    weight = model.lm_head.weight
    if weight.device.type == "cpu" and weight.dtype == torch.bfloat16:
        from nanoseek.hardware import SLOW_BF16, cpu_has_fast_bf16

        if not cpu_has_fast_bf16():
            warnings.warn(f"{SLOW_BF16}; load with dtype='float32'", stacklevel=3)


class LLM:
    def __init__(self, model, tokenizer=None, dtype: str | torch.dtype | None = None, device: str | None = None,
                 **engine_options):
        """model: a checkpoint directory or a DeepseekForCausalLM. tokenizer: a nanoseek Tokenizer, or None to
        load tokenizer.json from the checkpoint directory when it has one. engine_options: EngineConfig fields
        (num_speculative_tokens, max_model_len, block_size, num_blocks, enable_prefix_caching, compile, ...)."""
        if isinstance(model, (str, Path)):
            from nanoseek.checkpoint import load_model

            path = Path(model)
            model = load_model(path, dtype=resolve_dtype(dtype or "float32"),
                               device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
            if tokenizer is None and (path / "tokenizer.json").is_file():
                from nanoseek.tokenizer import Tokenizer

                tokenizer = Tokenizer.from_dir(path)
        elif dtype is not None or device is not None:
            model = model.to(dtype=resolve_dtype(dtype) if dtype is not None else None, device=device)
        _warn_if_slow_dtype(model)
        self.model = model
        self.tokenizer = tokenizer
        self.engine = LLMEngine(model, tokenizer, EngineConfig(**engine_options))
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

    def _requests(self, prompts, sampling_params) -> list[tuple[Prompt, list[int], SamplingParams]]:
        """Normalize and validate every prompt (RequestError before any work)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else \
            [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; pass one or one each")
        out = []
        for prompt, p in zip(prompts, params):
            ids = self.engine.encode_prompt(prompt)
            self.engine.validate(ids, p)
            out.append((prompt, ids, p))
        return out

    def _add(self, requests) -> list[str]:
        ids = []
        for prompt, token_ids, p in requests:
            rid = f"llm-{next(self._counter)}"
            self.engine.add_request(rid, prompt, p, prompt_token_ids=token_ids)
            ids.append(rid)
        return ids

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None
                 = None) -> list[RequestOutput]:
        """Run prompts (strings or token id lists) to completion; outputs in prompt order."""
        ids = self._add(self._requests(prompts, sampling_params))
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step(finished_only=True):
                final[out.request_id] = out
        return [final[i] for i in ids]

    def stream(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None
               = None) -> Iterator[RequestOutput]:
        """Yield RequestOutputs as the engine steps (with delta_text / delta_token_ids); closing the iterator
        early aborts the requests still running."""
        ids = self._add(self._requests(prompts, sampling_params))
        pending = set(ids)
        try:
            while pending and self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            for rid in pending:
                self.engine.abort_request(rid)
            if pending:
                self.engine.step()                  # apply the aborts now, freeing their blocks

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None) -> RequestOutput:
        """One conversation through the checkpoint's chat template (R1's when it has none)."""
        return self.generate([self.render_chat(messages)], sampling_params)[0]

    def render_chat(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("chat needs a tokenizer: load a checkpoint directory that has tokenizer.json")
        from nanoseek.chat import render

        return render(self.tokenizer, messages, add_generation_prompt=True)[0]

    def warmup(self) -> None:
        """Decode a few tokens at the batch sizes that select each compiled graph (1, 2, and E/K where the CUDA MoE
        switches to running every expert), so that a compiled engine compiles now rather than on live requests."""
        cfg = self.model.config
        sizes = {1, 2, max(2, -(-cfg.n_routed_experts // max(cfg.num_experts_per_tok, 1)))}
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        for b in sorted(n for n in sizes if n <= self.engine.config.max_num_seqs):
            self.generate([[3 + i, 4 + i] for i in range(b)], params)

    @property
    def acceptance_rate(self) -> float | None:
        """Fraction of MTP draft tokens accepted so far (None without speculation)."""
        return self.engine.acceptance_rate
