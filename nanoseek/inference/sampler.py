"""Token sampling for a batch of rows, each with its own SamplingParams and (optionally seeded) generator.

Order, as in vLLM: penalties (repetition on prompt + output, presence/frequency on output) and min_tokens masking
on the logits; then greedy rows take the argmax, the others go through temperature -> min_p -> top_k -> top_p to
a probability vector. `probs()` returns that processed distribution (one-hot for greedy rows) because speculative
decoding's rejection sampler needs it explicitly; `sample()` draws from it.

Drawing uses the exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. is an exact draw from p, and each seeded
row draws its E from its own torch.Generator, so a seeded request's output does not depend on what else is batched.
Logprobs are the raw model distribution (log_softmax of the logits before any processing), vLLM's default.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanoseek.inference.params import SamplingParams
from nanoseek.inference.sequence import Logprob, Sequence


@dataclass
class Row:
    """One distribution to sample: the next token of `seq` after its tokens plus `extra` (accepted-so-far drafts
    in a verification window)."""
    seq: Sequence
    extra: list[int] = field(default_factory=list)

    @property
    def params(self) -> SamplingParams:
        return self.seq.params

    def num_output_tokens(self) -> int:
        return self.seq.num_output_tokens + len(self.extra)


class Sampler:
    def __init__(self, eos_token_ids: set[int], device: torch.device | str, seed: int = 0):
        self.eos_token_ids = eos_token_ids
        self.generator = torch.Generator(device=device).manual_seed(seed)    # rows without their own seed

    # ----- logits -> processed distribution -----
    def adjust_logits(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        """Penalties and min_tokens masking. logits (R,V) fp32 -> (R,V)."""
        if any(r.params.has_penalties for r in rows):
            logits = self._penalize(logits, rows)
        for i, r in enumerate(rows):
            p = r.params
            if p.min_tokens and r.num_output_tokens() < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
                if banned:
                    logits[i, list(banned)] = float("-inf")
        return logits

    def _penalize(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        R, V = logits.shape
        dev = logits.device
        outputs = [r.seq.output_token_ids + r.extra for r in rows]
        counts = torch.zeros(R, V, device=dev)                                          # (R,V) output counts
        seen = torch.zeros(R, V, dtype=torch.bool, device=dev)                          # in prompt or output
        for i, (r, out) in enumerate(zip(rows, outputs)):
            if out:
                counts[i].index_add_(0, torch.tensor(out, device=dev), torch.ones(len(out), device=dev))
            if r.params.repetition_penalty != 1.0:
                seen[i, r.seq.token_ids[: r.seq.num_prompt_tokens]] = True
        seen |= counts > 0
        rep = torch.tensor([r.params.repetition_penalty for r in rows], device=dev)[:, None]
        freq = torch.tensor([r.params.frequency_penalty for r in rows], device=dev)[:, None]
        pres = torch.tensor([r.params.presence_penalty for r in rows], device=dev)[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        return logits - freq * counts - pres * (counts > 0).float()

    def probs(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        """logits (R,V) -> processed probabilities (R,V) fp32; one-hot argmax for greedy rows."""
        if all(r.params.greedy and not r.params.has_penalties and not r.params.min_tokens for r in rows):
            return torch.zeros_like(logits, dtype=torch.float32).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
        logits = self.adjust_logits(logits.float().clone(), rows)
        R, V = logits.shape
        greedy = torch.tensor([r.params.greedy for r in rows], device=logits.device)
        temp = torch.tensor([1.0 if r.params.greedy else r.params.temperature for r in rows],
                            device=logits.device)[:, None]
        logits = logits / temp
        if any(r.params.min_p > 0 for r in rows):
            min_p = torch.tensor([r.params.min_p for r in rows], device=logits.device)[:, None]
            p = logits.softmax(-1)
            logits = logits.masked_fill(p < min_p * p.amax(-1, keepdim=True), float("-inf"))
        need_k = any(r.params.top_k_enabled for r in rows)
        need_p = any(r.params.top_p < 1.0 for r in rows)
        if need_k or need_p:
            sorted_logits, order = logits.sort(dim=-1, descending=True)                  # (R,V)
            remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
            if need_k:
                k = torch.tensor([r.params.top_k if r.params.top_k_enabled else V for r in rows],
                                 device=logits.device)
                remove |= torch.arange(V, device=logits.device)[None, :] >= k[:, None]
            if need_p:
                top_p = torch.tensor([r.params.top_p for r in rows], device=logits.device)[:, None]
                p_sorted = sorted_logits.masked_fill(remove, float("-inf")).softmax(-1)
                # keep a token while the mass strictly before it is < top_p (the first token is always kept)
                remove |= (p_sorted.cumsum(-1) - p_sorted) >= top_p
            logits = logits.scatter(1, order, sorted_logits.masked_fill(remove, float("-inf")))
        probs = logits.softmax(-1)
        if greedy.any():
            onehot = torch.zeros_like(probs).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
            probs = torch.where(greedy[:, None], onehot, probs)
        return probs

    # ----- drawing -----
    def exponentials(self, rows: list[Row], V: int, device) -> torch.Tensor:
        """E ~ Exp(1) of shape (R,V): seeded rows from their own generator, the rest from the engine's."""
        own = [r.seq.generator is not None and not r.params.greedy for r in rows]
        if not any(own):
            return torch.empty(len(rows), V, device=device).exponential_(generator=self.generator)
        E = torch.empty(len(rows), V, device=device)
        rest = [i for i, o in enumerate(own) if not o]
        if rest:
            E[rest] = torch.empty(len(rest), V, device=device).exponential_(generator=self.generator)
        for i in (i for i, o in enumerate(own) if o):
            E[i].exponential_(generator=rows[i].seq.generator)
        return E

    def sample(self, probs: torch.Tensor, rows: list[Row]) -> list[int]:
        """Draw one token per row from probs (R,V)."""
        if all(r.params.greedy for r in rows):
            return probs.argmax(-1).tolist()
        E = self.exponentials(rows, probs.shape[1], probs.device)
        return (probs / E).argmax(-1).tolist()

    def uniform(self, row: Row) -> float:
        g = row.seq.generator if row.seq.generator is not None else self.generator
        return float(torch.rand(1, generator=g, device=g.device))

    # ----- logprobs -----
    @staticmethod
    def logprobs(logits: torch.Tensor, rows: list[Row], tokens: list[int]) -> list[dict[int, Logprob] | None]:
        """Raw log_softmax of each row's logits: the sampled token plus the row's top-n alternatives."""
        out: list[dict[int, Logprob] | None] = [None] * len(rows)
        idx = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not idx:
            return out
        lp = torch.log_softmax(logits[idx].float(), dim=-1)                             # (R',V)
        n = max(rows[i].params.logprobs for i in idx)
        top_v, top_i = lp.topk(min(max(n, 1), lp.shape[-1]), dim=-1)
        chosen = torch.tensor([tokens[i] for i in idx], device=lp.device)
        chosen_lp = lp.gather(1, chosen[:, None])[:, 0]
        ranks = (lp > chosen_lp[:, None]).sum(-1) + 1
        chosen_lp, ranks, top_v, top_i = chosen_lp.tolist(), ranks.tolist(), top_v.tolist(), top_i.tolist()
        for j, i in enumerate(idx):                   # plain Python numbers: one copy out, not 2 per row
            d = {tokens[i]: Logprob(chosen_lp[j], ranks[j])}
            for rank in range(rows[i].params.logprobs):
                d.setdefault(top_i[j][rank], Logprob(top_v[j][rank], rank + 1))
            out[i] = d
        return out
