"""GRPO and its variants as pure functions: group advantages, the k3 KL, the clipped-ratio token loss and the
four aggregations people argue about. Shapes: P prompts, G completions per prompt, S = P*G sequences,
T completion tokens (padded; `mask` (S,T) marks real tokens).

References: GRPO (DeepSeekMath, Shao et al. 2024) normalizes each sequence by its own length and the group's
reward std; Dr. GRPO (Liu et al. 2025) drops both (constant normalizer, no std scaling); DAPO (Yu et al. 2025)
uses a token-level mean over the whole batch, decoupled clip ranges (clip-higher) and dynamic sampling;
BNPO normalizes by the tokens in the batch. The k3 KL estimator is Schulman's exp(r) - r - 1, r = ref - logp.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_std: bool = True, eps: float = 1e-4):
    """rewards (S,) ordered group by group -> advantages (S,): reward minus its group mean, divided by the
    group's (unbiased) std + eps when scale_std (GRPO), not divided for Dr. GRPO."""
    r = rewards.float().view(-1, group_size)                                    # (P,G)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(P,) bool: groups whose rewards are not all equal. All-correct or all-wrong groups have zero advantage
    and so no gradient; DAPO's dynamic sampling drops them and samples more prompts."""
    r = rewards.view(-1, group_size)
    return (r.max(dim=1).values - r.min(dim=1).values) > 0


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate exp(ref - logp) - (ref - logp) - 1: unbiased, always >= 0."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


@dataclass
class PolicyLoss:
    loss: torch.Tensor              # scalar to backpropagate
    kl: torch.Tensor                # mean per-token k3 KL over real tokens (0 when beta == 0)
    clip_low: torch.Tensor          # fraction of real tokens clipped below (ratio < 1-eps_low with A < 0)
    clip_high: torch.Tensor         # fraction clipped above (ratio > 1+eps_high with A > 0)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                loss_type: str = "grpo", eps_low: float = 0.2, eps_high: float | None = None, beta: float = 0.0,
                ref_logp: torch.Tensor | None = None, max_completion_length: int | None = None,
                num_tokens: float | None = None) -> PolicyLoss:
    """The clipped-ratio objective, negated for minimization, aggregated per `loss_type`.

    logp, old_logp, ref_logp, mask: (S,T); advantages (S,). eps_high defaults to eps_low (DAPO: 0.28 vs 0.2).
    grpo: mean over each sequence's tokens, then over sequences. bnpo: sum over tokens / tokens in this batch.
    dr_grpo: sum / (S * max_completion_length). dapo: sum / num_tokens (the token count of the whole global
    batch, so gradient accumulation and data parallelism give the same loss; defaults to this batch's count).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    eps_high = eps_low if eps_high is None else eps_high
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)                                           # (S,T), 1 when mu == 1
    adv = advantages[:, None].to(logp.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.min(unclipped, clipped)
    kl = torch.zeros((), dtype=logp.dtype, device=logp.device)
    n_real = mask.sum().clamp(min=1.0)
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs ref_logp from the frozen reference model")
        per_token_kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * per_token_kl
        kl = (per_token_kl * mask).sum() / n_real
    masked = per_token * mask
    if loss_type == "grpo":
        loss = (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / n_real
    elif loss_type == "dr_grpo":
        T = max_completion_length if max_completion_length is not None else logp.shape[1]
        loss = masked.sum() / (logp.shape[0] * T)
    else:
        loss = masked.sum() / (num_tokens if num_tokens is not None else n_real)
    with torch.no_grad():
        low = ((ratio < 1 - eps_low) & (adv < 0)).to(logp.dtype)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(logp.dtype)
        clip_low, clip_high = (low * mask).sum() / n_real, (high * mask).sum() / n_real
    return PolicyLoss(loss=loss, kl=kl.detach(), clip_low=clip_low, clip_high=clip_high)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens) under logits: (S,T,V), (S,T) -> (S,T), in fp32 (bf16 log-softmax drifts by ~1e-2)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens[..., None]).squeeze(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each next-token distribution: (S,T,V) -> (S,T), fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
