"""Logit distillation: the forward KL from a teacher's next-token distribution to the student's, per token.

Forward KL(p_teacher || p_student) = sum_v p_t(v) (log p_t(v) - log p_s(v)) is mode-covering: the student is
pushed to put mass everywhere the teacher does (Hinton et al. 2015; the "KD" term of MiniLLM's comparison).
Both distributions are softened by the same temperature tau, and the loss is scaled by tau^2 so its gradient
stays comparable to the CE term as tau changes (Hinton et al.). It needs the teacher's full logits over the
*same* vocabulary, so it applies only when teacher and student share a tokenizer and the teacher runs locally.
"""
from __future__ import annotations

import torch


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
               temperature: float = 1.0, normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """student/teacher logits (B,T,V), mask (B,T) -> sum over masked tokens of tau^2 KL(p_t || p_s) / normalizer
    (default: the masked token count). fp32 throughout (log-softmax of bf16 logits drifts by ~1e-2)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: logit distillation needs a shared vocabulary")
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1) * temperature ** 2                 # (B,T)
    if mask is not None:
        kl = kl * mask.to(kl.dtype)
    n = (mask.sum() if mask is not None else kl.numel()) if normalizer is None else normalizer
    return kl.sum() / n
