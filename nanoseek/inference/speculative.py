"""MTP speculative decoding: the checkpoint's MTP module drafts k tokens, the main model verifies them in one pass,
and rejection sampling keeps the output distribution exactly the main model's.

Drafting. MTP depth 1 at position i reads (main hidden h_i, embedding of t_{i+1}) and predicts t_{i+2}, with its
own attention layer (cache slot num_hidden_layers). After a step commits tokens up to position L (the
newest sampled token t_L has no KV yet), the MTP module runs over the step's committed positions with the true
hidden states (writing its cache), and its output at L-1 gives draft d_1 for position L+1. Further drafts
chain the first MTP module: draft j at position L+j-2 reads the previous draft step's output and draft token
(V3 ships one module; reusing it for k > 1 is what vLLM and SGLang do). Chained positions are overwritten by the
next step's pass with true hidden states.

Verification. The main model runs [t_L, d_1..d_k] at positions L..L+k (absorbed path, T = 1+k) and gives target
distributions p_0..p_k. Draft d_j is accepted with probability min(1, p_{j-1}(d_j) / q_j(d_j)); at the first
rejection a token is drawn from norm(max(0, p_{j-1} - q_j)) and the rest is dropped; if all k pass, a bonus
token is drawn from p_k (Leviathan et al. 2023; Chen et al. 2023): each emitted token then follows p exactly.
Greedy is the special case where p and q are one-hot: drafts are kept while they equal the argmax.

Draft quality (never correctness) is approximate in two places: a prefix-cache hit reuses an MTP latent at a
block's last position computed with the next token of the sequence that filled the block, and n > 1 siblings
share their parent's MTP latent at the last prompt position.
"""
from __future__ import annotations

import torch

from nanoseek.inference.runner import ModelRunner
from nanoseek.inference.sampler import Row, Sampler
from nanoseek.inference.sequence import Sequence


def accept_drafts(sampler: Sampler, row: Row, drafts: list[int], p: torch.Tensor,
                  q: torch.Tensor | None) -> list[int]:
    """p (k+1,V) target probs, q (k,V) draft probs (None: greedy one-hot drafts) -> the emitted tokens: the
    accepted drafts plus one corrected or bonus token."""
    out: list[int] = []
    for j, d in enumerate(drafts):
        pj = p[j]
        if q is None:
            ok = bool(pj[d] > 0) if row.params.greedy else bool(sampler.uniform(row) < float(pj[d]))
        else:
            qd = float(q[j, d])
            ok = sampler.uniform(row) * qd < float(pj[d])              # u < p/q without dividing by q = 0
        if ok:
            out.append(d)
            continue
        residual = (pj - q[j]).clamp_min(0) if q is not None else pj.clone()
        if q is None:
            residual[d] = 0.0                                           # q one-hot at d
        if residual.sum() <= 0:                                         # p == q: any draw from p is exact
            residual = pj
        out.append(_draw(sampler, row, residual / residual.sum()))
        return out
    out.append(_draw(sampler, row, p[len(drafts)]))
    return out


def _draw(sampler: Sampler, row: Row, probs: torch.Tensor) -> int:
    if row.params.greedy:
        return int(probs.argmax())
    return sampler.sample(probs[None], [row])[0]


class MTPDrafter:
    def __init__(self, runner: ModelRunner, sampler: Sampler, num_speculative_tokens: int):
        self.runner, self.sampler, self.k = runner, sampler, num_speculative_tokens

    @torch.no_grad()
    def propose(self, items: list[tuple[Sequence, int, int, int]], hidden: torch.Tensor, absorb: bool) -> None:
        """After a main pass: run MTP over each sequence's newly committed positions and draft its next tokens.

        items: (seq, its row in `hidden`, the step's start position, drafts wanted: 0 for a prefill chunk that
        stopped short of the newest token). hidden (B,T,H): the main pass's final-normed hidden states.
        """
        items = [it for it in items if it[0].num_computed > it[2]]
        if not items:
            return
        # position i reads t_{i+1}: the committed tokens shifted left by one (the newest sampled token last)
        chunks = [(s, start, s.token_ids[start + 1:s.num_computed + 1]) for s, _, start, _ in items]
        batch = self.runner.make_batch(chunks)
        T = batch.ids.shape[1]
        h = self.runner.forward_mtp(0, hidden[[b for _, b, _, _ in items], :T], batch, absorb)   # (B',T,H)
        live = [i for i, it in enumerate(items) if it[3] > 0]
        for s, *_ in items:
            s.draft_tokens, s.draft_probs = [], None
        if not live:
            return
        seqs = [items[i][0] for i in live]
        wanted = [items[i][3] for i in live]
        h_j = h[live, torch.tensor([batch.lens[i] - 1 for i in live])]                      # (B'',H)
        drafts: list[list[int]] = [[] for _ in seqs]
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]
        for j in range(max(wanted)):
            if j > 0:
                # chain: draft j+1 at position L+j-1 reads the previous step's output and draft token
                step = self.runner.make_batch([(s, s.num_tokens + j - 2, [d[-1]]) for s, d in zip(seqs, drafts)])
                h_j = self.runner.forward_mtp(0, h_j[:, None], step, True)[:, 0]
            rows = [Row(s, list(d)) for s, d in zip(seqs, drafts)]
            q = self.sampler.probs(self.runner.mtp_logits(0, h_j), rows)                     # (B'',V)
            for d, qd, qi, t in zip(drafts, qs, q, self.sampler.sample(q, rows)):
                d.append(t)
                qd.append(qi)
        for s, d, qd, w in zip(seqs, drafts, qs, wanted):
            s.draft_tokens = d[:w]
            s.draft_probs = None if s.params.greedy else torch.stack(qd[:w])
