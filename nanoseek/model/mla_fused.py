"""MLA's training forward+backward on CPU as one autograd op, computing what `MLA.forward` computes (no cache, no
mask, causal; q through its LoRA), with a hand-written backward.

Autograd over MLA's modules records ~30 nodes a layer and materializes what only its bookkeeping needs: the
zero-filled (B,nh,T,dn+dr) gradient of the output's slice, the gradient of the padded V, the concatenations of
split gradients (q's nope and rope halves, kv's K and V halves, the fused down-projection's three parts). Here
each gradient is written once into the buffer its matmul reads. The values are the module path's, value for
value: the same matmuls, norms (model.norm) and rotations (model.rope) in the same order; tests/test_model.py
holds the gradients equal. bench_model's attention block fwd+bwd 1.04-1.05x, the whole fp32 step 1.01x (paired,
interleaved, AVX2 EPYC, stop 24).

Shapes: B batch, T tokens, N = B*T, H hidden, nh heads, dn/dr/dv = qk_nope/qk_rope/v head dims, d = dn + dr,
rq = q_lora_rank, r = kv_lora_rank.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from nanoseek.model.norm import RMSNorm, rms_norm_backward, rms_norm_forward
from nanoseek.model.rope import rope_rotation, rotate_backward_into, rotate_into


def fused_mla_supported(attn: nn.Module, x: torch.Tensor) -> bool:
    """Whether `fused_mla` computes this MLA's training forward: fp32 on CPU (SDPA's CPU flash kernel, called
    directly; v no wider than q and k), no autocast, q through its LoRA, and every projection a plain bias-free
    nn.Linear (not swapped for float8 or other modules, whose forward the fused op would bypass). Compiled code
    takes the module path: inductor fuses its elementwise work, and has no complex arithmetic for the rotation."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()                # inductor fuses the module path itself
            and attn.dv <= attn.dn + attn.dr
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
            and attn._fusable_down_projections()                 # q LoRA; q_a and kv_a plain bias-free linears
            and all(type(m) is nn.Linear and m.bias is None for m in (attn.q_b_proj, attn.kv_b_proj, attn.o_proj))
            and type(attn.q_a_layernorm) is RMSNorm and type(attn.kv_a_layernorm) is RMSNorm
            and all(p.dtype == torch.float32 for p in attn.parameters()))


def fused_mla(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B,T,H) normed hidden states, cos/sin (T,dr/2) or (B,T,dr/2) -> (B,T,H), as attn(x, cos, sin)."""
    w_a = torch.cat([attn.q_a_proj.weight, attn.kv_a_proj_with_mqa.weight])     # one matmul for both down-projections
    dims = (attn.nh, attn.dn, attn.dr, attn.dv, attn.q_lora_rank, attn.r)
    return _FusedMLA.apply(x, w_a, attn.q_a_layernorm.weight, attn.q_b_proj.weight, attn.kv_a_layernorm.weight,
                           attn.kv_b_proj.weight, attn.o_proj.weight, rope_rotation(cos, sin), dims,
                           (attn.q_a_layernorm.eps, attn.kv_a_layernorm.eps), attn.softmax_scale)


class _FusedMLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_a, w_q_norm, w_qb, w_kv_norm, w_kvb, w_o, rotation, dims, eps, scale):
        nh, dn, dr, dv, rq, r = dims
        B, T, H = x.shape
        N, d = B * T, dn + dr
        x2 = x.reshape(N, H)
        a = x2 @ w_a.t()                                                              # (N, rq + r + dr)
        q_lora, q_normed, q_rstd = rms_norm_forward(a[:, :rq], w_q_norm, eps[0])
        q = (q_lora @ w_qb.t()).view(B, T, nh, d)
        c, c_normed, c_rstd = rms_norm_forward(a[:, rq:rq + r], w_kv_norm, eps[1])
        kv = (c @ w_kvb.t()).view(B, T, nh, dn + dv)
        # SDPA's inputs written head-major in place (its CPU flash kernel runs fastest on (B,nh,T,d) contiguous),
        # v zero-padded to q/k's width (the kernel needs equal widths; the extra outputs are never read)
        head_rotation = rotation.unsqueeze(-2)                                        # broadcast over heads
        Q = x.new_empty(B, nh, T, d)
        Q[..., :dn].copy_(q[..., :dn].transpose(1, 2))
        rotate_into(Q[..., dn:].transpose(1, 2), q[..., dn:], head_rotation)
        K = x.new_empty(B, nh, T, d)
        K[..., :dn].copy_(kv[..., :dn].transpose(1, 2))
        k_pe = x.new_empty(B, T, dr)
        rotate_into(k_pe, a[:, rq + r:].reshape(B, T, dr), rotation)                 # one rope key for all heads
        K[..., dn:].copy_(k_pe[:, None])
        V = x.new_zeros(B, nh, T, d)
        V[..., :dv].copy_(kv[..., dn:].transpose(1, 2))
        O, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(Q, K, V, 0.0, True, scale=scale)
        o = O[..., :dv].transpose(1, 2).reshape(N, nh * dv)                           # (N, nh*dv)
        ctx.save_for_backward(x2, w_a, w_q_norm, w_qb, w_kv_norm, w_kvb, w_o, rotation, q_lora, q_normed, q_rstd,
                              c, c_normed, c_rstd, Q, K, V, O, lse, o)
        ctx.dims, ctx.scale = dims, scale
        return (o @ w_o.t()).view(B, T, H)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x2, w_a, w_q_norm, w_qb, w_kv_norm, w_kvb, w_o, rotation, q_lora, q_normed, q_rstd, c, c_normed, c_rstd,
         Q, K, V, O, lse, o) = ctx.saved_tensors
        nh, dn, dr, dv, rq, r = ctx.dims
        B, T, H = grad.shape
        N, d = B * T, dn + dr
        grad = grad.reshape(N, H)
        grad_w_o = grad.t() @ o                                                       # (H, nh*dv)
        dO = grad.new_empty(B, nh, T, d)                                              # d(output), zero on the pad
        dO[..., dv:].zero_()
        dO[..., :dv].copy_((grad @ w_o).view(B, T, nh, dv).transpose(1, 2))
        dQ, dK, dV = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dO, Q, K, V, O, lse, 0.0, True, scale=ctx.scale)
        d_kv = grad.new_empty(B, T, nh, dn + dv)                                      # kv_b_proj's output grad
        d_kv[..., :dn].copy_(dK[..., :dn].transpose(1, 2))
        d_kv[..., dn:].copy_(dV[..., :dv].transpose(1, 2))
        d_q = grad.new_empty(B, T, nh, d)                                             # q_b_proj's output grad
        d_q[..., :dn].copy_(dQ[..., :dn].transpose(1, 2))
        rotate_backward_into(d_q[..., dn:], dQ[..., dn:].transpose(1, 2), rotation.unsqueeze(-2))
        d_kv, d_q = d_kv.view(N, -1), d_q.view(N, -1)
        grad_w_kvb, grad_w_qb = d_kv.t() @ c, d_q.t() @ q_lora
        d_a = grad.new_empty(N, rq + r + dr)                                          # the down-projection's grad
        d_a[:, :rq], grad_w_q_norm = rms_norm_backward(d_q @ w_qb, q_normed, w_q_norm, q_rstd)
        d_a[:, rq:rq + r], grad_w_kv_norm = rms_norm_backward(d_kv @ w_kvb, c_normed, w_kv_norm, c_rstd)
        rotate_backward_into(d_a[:, rq + r:].view(B, T, dr), dK[..., dn:].sum(1), rotation)   # summed over heads
        grad_x = (d_a @ w_a).view(B, T, H)
        return (grad_x, d_a.t() @ x2, grad_w_q_norm, grad_w_qb, grad_w_kv_norm, grad_w_kvb, grad_w_o,
                None, None, None, None)
