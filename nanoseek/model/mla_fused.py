"""MLA's training forward+backward on CPU as one autograd op, computing what `MLA.forward` computes (no cache, no
mask, causal; q through its LoRA), with a hand-written backward.

Autograd over MLA's modules records ~30 nodes a layer and materializes what only its bookkeeping needs: the
zero-filled (B,nh,T,dn+dr) gradient of the output's slice, the gradient of the padded V, the concatenations of
split gradients (q's nope and rope halves, kv's K and V halves, the fused down-projection's three parts). Here
each gradient is written once into the buffer its matmul reads. The matmuls and norms (model.norm) are the
module path's, in the same order. Two things differ inside the attention, where only the order of a sum
changes: q's and k's rope pairs stay interleaved (both sides of q.k in the same order: the same dot product
without the de-interleaving copies), and where the sequence is short enough the softmax is kept for backward
(`causal_attention_forward`) instead of run through SDPA's flash kernel. tests/test_model.py holds the output
and gradients to the module path's within 1e-5 (1e-6 with the flash kernel) and the attention to float64.
bench_model's attention block fwd+bwd 1.04-1.05x (stop 24); the kept softmax 1.01x the whole fp32 step (paired,
interleaved, AVX2 EPYC, stop 25).

Shapes: B batch, T tokens, N = B*T, H hidden, nh heads, dn/dr/dv = qk_nope/qk_rope/v head dims, d = dn + dr,
rq = q_lora_rank, r = kv_lora_rank.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from nanoseek.model.norm import RMSNorm, rms_norm_backward, rms_norm_forward
from nanoseek.model.rope import rope_rotation, rotate_pairs_backward_into, rotate_pairs_into
from nanoseek.scratch import scratch


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


def materialize_scores(nh: int, T: int, H: int) -> bool:
    """Whether the causal attention keeps its softmax for backward (`causal_attention_forward`) rather than run
    SDPA's flash kernel: while the kept probabilities, ~nh * T / 2 floats a token, stay within ~4x the layer's
    input (H floats a token). Faster at every length measured (below), but the memory grows with T."""
    return nh * T <= 8 * H


def _query_blocks(T: int) -> list[tuple[int, int]]:
    """The causal triangle cut into row blocks [start, end): each block attends to keys [0, end), so ~(1 - 1/n)/2
    of the full square's work is skipped. 64-row blocks at T <= 256, 128 above (measured best at 256, 512, 1024)."""
    rows = 64 if T <= 256 else 128
    return [(r0, min(r0 + rows, T)) for r0 in range(0, T, rows)]


def causal_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                             out: torch.Tensor) -> list[torch.Tensor]:
    """q, k (B,nh,T,d), v (B,nh,T,dv) contiguous; writes softmax(scale q k^T, causal) v into out (B,nh,T,dv), any
    strides (the fused op passes a head-major view of its (B,T,nh,dv) output: no copy after). Returns each query
    block's softmax (B*nh, rows, keys to its end), kept for backward.

    Batched matmuls over the B*nh heads (MKL splits the batch across cores) and torch's softmax in place. Every
    matmul writes a contiguous buffer: torch runs bmm/baddbmm into a strided output as one MKL call per head
    (bench_model's step made 1,900 such calls, 20.6 ms, stop 25). Against SDPA's CPU flash kernel (which
    recomputes the probabilities in backward, one thread per head tile, and needs v padded to d), at bench_model's
    (16, 256, 48) heads with v 32: fwd 1.71 vs 1.58 ms, bwd 2.44 vs 3.90; at (8, 512): 2.75 + 3.85 vs 3.09 + 8.29;
    at (4, 1024): 4.67 + 7.09 vs 4.52 + 12.00 (AVX2 EPYC, before the contiguous outputs)."""
    B, nh, T, d = q.shape
    q, k, v = q.view(B * nh, T, d), k.view(B * nh, T, d), v.view(B * nh, T, -1)
    blocks = _query_blocks(T)
    future = torch.ones(blocks[0][1], blocks[0][1], dtype=torch.bool, device=q.device).triu(1)   # j > i
    probs = []
    for r0, e in blocks:
        s = q.new_empty(B * nh, e - r0, e)
        torch.baddbmm(s, q[:, r0:e], k[:, :e].transpose(1, 2), beta=0, alpha=scale, out=s)   # scale * q k^T
        s[:, :, r0:].masked_fill_(future[:e - r0, :e - r0], float("-inf"))                      # the diagonal tile
        p = torch.ops.aten._softmax.out(s, -1, False, out=s)                                   # in place
        o = torch.bmm(p, v[:, :e], out=scratch("attention_o", (B * nh, e - r0, v.shape[-1]), v.dtype))
        out[:, :, r0:e].copy_(o.view(B, nh, e - r0, -1))
        probs.append(p)
    return probs


def causal_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              probs: list[torch.Tensor], scale: float, dq_out: torch.Tensor):
    """d(o) (B,nh,T,dv) and causal_attention_forward's inputs (contiguous) and probabilities -> dq written into
    dq_out (B,nh,T,d), any strides; returns (dk, dv) (B,nh,T,d), (B,nh,T,dv). The blocks run last to first: the
    last reaches every key and writes dk and dv whole, the others add into their prefix (from a contiguous
    product, for the reason in causal_attention_forward)."""
    B, nh, T, d = q.shape
    BH, dv_ = B * nh, v.shape[-1]
    q, k, v, do = q.view(BH, T, d), k.view(BH, T, d), v.view(BH, T, dv_), do.view(BH, T, dv_)
    dk, dv = torch.empty_like(k), torch.empty_like(v)

    def into_prefix(grad, e, a, b, alpha):          # grad[:, :e] (+)= alpha * a @ b
        if e == T:
            torch.baddbmm(grad, a, b, beta=0, alpha=alpha, out=grad)
        else:
            grad[:, :e].add_(torch.bmm(a, b, out=scratch("attention_prefix", (BH, e, b.shape[-1]), b.dtype)),
                             alpha=alpha)

    for (r0, e), p in reversed(list(zip(_query_blocks(T), probs))):
        rows = e - r0
        into_prefix(dv, e, p.transpose(1, 2), do[:, r0:e], 1)                                      # p^T do
        dp = torch.bmm(do[:, r0:e], v[:, :e].transpose(1, 2), out=scratch("attention_dp", p.shape, p.dtype))
        ds = torch.ops.aten._softmax_backward_data.out(dp, p, -1, p.dtype, grad_input=dp)     # p * (dp - <dp, p>)
        dq = scratch("attention_dq", (BH, rows, d), q.dtype)
        torch.baddbmm(dq, ds, k[:, :e], beta=0, alpha=scale, out=dq)
        dq_out[:, :, r0:e].copy_(dq.view(B, nh, rows, d))
        into_prefix(dk, e, ds.transpose(1, 2), q[:, r0:e], scale)
    return dk.view(B, nh, T, d), dv.view(B, nh, T, dv_)


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
        rotate_pairs_into(Q[..., dn:].transpose(1, 2), q[..., dn:], head_rotation)
        K = x.new_empty(B, nh, T, d)
        K[..., :dn].copy_(kv[..., :dn].transpose(1, 2))
        k_pe = x.new_empty(B, T, dr)
        rotate_pairs_into(k_pe, a[:, rq + r:].reshape(B, T, dr), rotation)               # one rope key for all heads
        K[..., dn:].copy_(k_pe[:, None])
        flash = not materialize_scores(nh, T, H)
        if not flash:
            V = x.new_empty(B, nh, T, dv).copy_(kv[..., dn:].transpose(1, 2))
            o = x.new_empty(N, nh * dv)                                               # written head by head
            probs = causal_attention_forward(Q, K, V, scale, out=o.view(B, T, nh, dv).transpose(1, 2))
        else:   # SDPA's flash kernel: v zero-padded to q/k's width (it needs equal widths; the pad is never read)
            V = x.new_zeros(B, nh, T, d)
            V[..., :dv].copy_(kv[..., dn:].transpose(1, 2))
            O, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(Q, K, V, 0.0, True, scale=scale)
            probs = (O, lse)
            o = O[..., :dv].transpose(1, 2).reshape(N, nh * dv)                       # (N, nh*dv)
        ctx.save_for_backward(x2, w_a, w_q_norm, w_qb, w_kv_norm, w_kvb, w_o, rotation, q_lora, q_normed, q_rstd,
                              c, c_normed, c_rstd, Q, K, V, o, *probs)
        ctx.dims, ctx.scale, ctx.flash = dims, scale, flash
        return (o @ w_o.t()).view(B, T, H)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x2, w_a, w_q_norm, w_qb, w_kv_norm, w_kvb, w_o, rotation, q_lora, q_normed, q_rstd, c, c_normed, c_rstd,
         Q, K, V, o, *probs) = ctx.saved_tensors
        nh, dn, dr, dv, rq, r = ctx.dims
        B, T, H = grad.shape
        N, d = B * T, dn + dr
        grad = grad.reshape(N, H)
        grad_w_o = grad.t() @ o                                                       # (H, nh*dv)
        dO = grad.new_empty(B, nh, T, V.shape[-1])                                    # d(output), zero on a pad
        dO[..., dv:].zero_()
        dO[..., :dv].copy_((grad @ w_o).view(B, T, nh, dv).transpose(1, 2))
        d_q = grad.new_empty(B, T, nh, d)                                             # q_b_proj's output grad
        if ctx.flash:
            dQ, dK, dV = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dO, Q, K, V, *probs, 0.0, True, scale=ctx.scale)
            d_q[..., :dn].copy_(dQ[..., :dn].transpose(1, 2))
            rotate_pairs_backward_into(d_q[..., dn:], dQ[..., dn:].transpose(1, 2), rotation.unsqueeze(-2))
        else:                                                                         # dq written into d_q
            dK, dV = causal_attention_backward(dO, Q, K, V, probs, ctx.scale, dq_out=d_q.transpose(1, 2))
            rotate_pairs_backward_into(d_q[..., dn:], d_q[..., dn:], rotation.unsqueeze(-2))   # in place
        d_kv = grad.new_empty(B, T, nh, dn + dv)                                      # kv_b_proj's output grad
        d_kv[..., :dn].copy_(dK[..., :dn].transpose(1, 2))
        d_kv[..., dn:].copy_(dV[..., :dv].transpose(1, 2))
        d_kv, d_q = d_kv.view(N, -1), d_q.view(N, -1)
        grad_w_kvb, grad_w_qb = d_kv.t() @ c, d_q.t() @ q_lora
        d_a = grad.new_empty(N, rq + r + dr)                                          # the down-projection's grad
        d_a[:, :rq], grad_w_q_norm = rms_norm_backward(d_q @ w_qb, q_normed, w_q_norm, q_rstd)
        d_a[:, rq:rq + r], grad_w_kv_norm = rms_norm_backward(d_kv @ w_kvb, c_normed, w_kv_norm, c_rstd)
        rotate_pairs_backward_into(d_a[:, rq + r:].view(B, T, dr), dK[..., dn:].sum(1), rotation)   # over heads
        grad_x = (d_a @ w_a).view(B, T, H)
        return (grad_x, d_a.t() @ x2, grad_w_q_norm, grad_w_qb, grad_w_kv_norm, grad_w_kvb, grad_w_o,
                None, None, None, None)
