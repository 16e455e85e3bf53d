"""Training losses as pure functions: next-token CE, Multi-Token Prediction, and the sequence-wise balance loss.

Shapes: B sequences, T positions, V vocabulary, E routed experts, K experts per token, D MTP depth.

Every loss takes an optional `normalizer`: the number of items it is averaged over. The default is this batch's
own count; a trainer that splits a step into micro-batches and ranks passes the *global* count instead, so the
micro-batch losses sum to exactly the loss of the whole step (a mean of means would weight short batches up).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.train.linear_ce import linear_cross_entropy


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
                  normalizer: float | torch.Tensor | None = None,
                  head_weight: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B,T,V), targets (B,T), mask (B,T) 1 where the target counts -> sum of masked CE / normalizer.

    With `head_weight` (V,H), the lm_head's weight, `logits` are the head's inputs (B,T,H) instead, and the
    projection is fused into the loss chunk by chunk (train.linear_ce): same value and gradients, without the
    (B,T,V) logits. The log-softmax runs in fp32: bf16 logits lose about 2 digits of the loss on large
    vocabularies.
    """
    n = (mask.sum() if mask is not None else targets.numel()) if normalizer is None else normalizer
    if head_weight is not None:
        # 1/n goes into the row weights, so that backward receives exactly 1 and skips a rescaling pass
        row_weight = (torch.ones_like(targets, dtype=torch.float32) if mask is None else mask.float()) / n
        loss = linear_cross_entropy(logits.flatten(0, 1), head_weight, targets.flatten(), row_weight.flatten())
        return loss.to(torch.promote_types(loss.dtype, n.dtype)) if torch.is_tensor(n) else loss  # as `/ n` would
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")   # (B*T,)
    if mask is not None:
        ce = ce * mask.flatten().to(ce.dtype)
    return ce.sum() / n


def mtp_targets(targets: torch.Tensor, mask: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The targets of MTP depth k (1-based), aligned to its logits[:, :T-k]: (B,T-k) targets and mask.

    targets[:, i] is token t_{i+1}; depth k at position i predicts t_{i+k+1} = targets[:, i+k], so depth k uses
    targets[:, k:]. The last k positions have no target inside the row and are dropped.
    """
    m = torch.ones_like(targets) if mask is None else mask
    return targets[:, k:], m[:, k:]


def mtp_loss(mtp_logits: list[torch.Tensor], targets: torch.Tensor, mask: torch.Tensor | None = None,
             normalizers: list | torch.Tensor | None = None, head_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The V3 MTP loss before its weight lambda: the mean over depths k = 1..D of the depth-k CE (V3 report,
    eq. 25: L_MTP = lambda/D * sum_k L_MTP^k). mtp_logits[k-1] (B,T,V), or the head's inputs (B,T,H) with
    `head_weight` (see cross_entropy); normalizers[k-1] counts depth k's targets (default: this batch's)."""
    if not mtp_logits:
        return targets.new_zeros((), dtype=torch.float32)
    total = 0.0
    for k, logits in enumerate(mtp_logits, start=1):
        t, m = mtp_targets(targets, mask, k)
        n = None if normalizers is None else normalizers[k - 1]
        total = total + cross_entropy(logits[:, :-k], t, m, n, head_weight)
    return total / len(mtp_logits)


def target_counts(mask: torch.Tensor, depth: int) -> torch.Tensor:
    """(depth+1,) float64: targets of the main head, then of each MTP depth k (mask[:, k:]); the normalizers of
    `lm_loss`. Sum them over micro-batches and ranks for a step's global counts."""
    return torch.stack([mask[:, k:].sum() for k in range(depth + 1)]).to(torch.float64)


def lm_loss(logits: torch.Tensor, mtp_logits: list[torch.Tensor], targets: torch.Tensor, mask: torch.Tensor,
            mtp_weight: float, counts: torch.Tensor | None = None,
            head_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE + mtp_weight * MTP, CE, MTP) with counts from `target_counts` (default: this batch's own). With
    `head_weight`, `logits` and `mtp_logits` are the head's inputs and the head is fused into the loss."""
    if counts is None:
        counts = target_counts(mask, len(mtp_logits))
    ce = cross_entropy(logits, targets, mask, counts[0], head_weight)
    mtp = mtp_loss(mtp_logits, targets, mask, counts[1:], head_weight)
    return ce + mtp_weight * mtp, ce, mtp


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None,
                          normalizer: float | None = None) -> torch.Tensor:
    """V3's complementary sequence-wise balance loss, before its weight alpha (V3 report, eqs. 17-20).

    For each sequence of T tokens:  s'_{i,t} = s_{i,t} / sum_j s_{j,t}   (affinities normalized per token)
                                    P_i = 1/T sum_t s'_{i,t}            (mean normalized affinity of expert i)
                                    f_i = E/(K T) sum_t 1[i in top-K_t] (load of i; 1 when perfectly balanced)
                                    L   = sum_i f_i P_i
    The sum over sequences is divided by `normalizer` (default B). scores (B,T,E) the gate's affinities (the
    sigmoid before the selection bias), indices (B,T,K) the chosen experts, mask (B,T) the tokens that count.
    Gradients flow through P only: f counts a discrete choice.
    """
    B, T, E = scores.shape
    K = indices.shape[-1]
    m = (torch.ones(B, T, device=scores.device) if mask is None else mask).to(scores.dtype)       # (B,T)
    n_tok = m.sum(dim=1).clamp(min=1)                                                              # (B,)
    chosen = torch.zeros(B, T, E, device=scores.device, dtype=scores.dtype).scatter_(2, indices, 1.0)
    f = (chosen * m[..., None]).sum(dim=1) * E / (K * n_tok[:, None])                              # (B,E)
    s_norm = scores / scores.sum(dim=-1, keepdim=True)                                             # (B,T,E)
    p = (s_norm * m[..., None]).sum(dim=1) / n_tok[:, None]                                        # (B,E)
    per_seq = (f.detach() * p).sum(dim=-1)                                                         # (B,)
    return per_seq.sum() / (B if normalizer is None else normalizer)
