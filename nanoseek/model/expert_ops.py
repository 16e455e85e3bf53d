"""Routed experts as single autograd ops with hand-written backwards: each takes the tokens, each slot's source
token and routing weight (slots sorted by expert) and returns the tokens' summed expert outputs, computing what
`moe._swiglu` per expert computes.

`ExpertLoop` (fp64, fp32 on CUDA, and CPU fp32 where `F.grouped_mm` is missing or the shapes are not 16-byte
aligned) runs expert by expert: gather its tokens, two matmuls, scatter-add its outputs back,
with each expert's rows still in cache, and writes every gradient straight into its buffer (autograd over the same
loop would also cat the slot gradients, stack the per-expert weight gradients and zero-fill per slice: the MoE
block fp32 38.4 -> 35.7 ms fwd+bwd, A/B in one process).

`ExpertBatched` (bf16/fp16) packs the slots into M blocks of C rows, each block one expert's (an expert with more
than C slots gets several blocks, its weights repeated), gathered straight from the tokens, zero-weighted where
padded, and runs them as batched matmuls. CPU bmm splits the batch across cores (no per-matmul thread sync): it
measured 1.3-1.5x the GFLOP/s of a per-expert loop in bf16 (16 experts x 256 rows, H 256, I 128); in fp32 the
padding and repeated weights cost more than that gains.

`ExpertGrouped` (CUDA bf16, CPU fp32 where `F.grouped_mm` exists) gathers the slots and runs two grouped GEMMs
with `scaled_swiglu` (silu(gate) * up * routing weight) between them, as one op: autograd over the same calls
also kept every MoE layer's (S, H) expert outputs alive until backward (index_add holds its source for the
source's shape alone), 28 of the 209 MB saved for backward in a bench_model step. Recomputing the gathered slots
and the activation in backward instead of saving them (139 MB) measured within noise of saving them in whole-step
A/Bs (-4% to +5%, five runs): they are saved.

Shapes: N tokens, S slots sorted by expert, H hidden, I expert width, E experts, M blocks of C rows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _swiglu_backward(d_h, gate_up, silu):
    """d(silu(gate) * up) -> d(gate_up) (..., 2I) in one buffer (autograd would cat the gate and up halves)."""
    I = silu.shape[-1]
    d_gate_up = torch.empty_like(gate_up)
    torch.mul(d_h, silu, out=d_gate_up[..., I:])
    torch.ops.aten.silu_backward.grad_input(d_h * gate_up[..., I:], gate_up[..., :I], grad_input=d_gate_up[..., :I])
    return d_gate_up


def scaled_swiglu(gate_up: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """gate_up (S, 2I) = [gate | up], scale (S,) -> silu(gate) * up * scale (S, I), in one fresh buffer."""
    I = gate_up.shape[-1] // 2
    return F.silu(gate_up[:, :I]).mul_(gate_up[:, I:]).mul_(scale[:, None])


def scaled_swiglu_backward(grad, gate_up, scale, want_scale: bool):
    """grad (S, I) of scaled_swiglu's output -> (d gate_up (S, 2I), d scale (S,) or None). Both halves are built
    in place in the one output buffer: fresh multi-MiB buffers page-fault on CPU (a backward with fresh
    temporaries made the whole step 2-3% slower, A/B)."""
    I = gate_up.shape[-1] // 2
    gate, up, sc = gate_up[:, :I], gate_up[:, I:], scale[:, None]
    silu = F.silu(gate)
    d_gate_up = torch.empty_like(gate_up)
    d_gate, d_up = d_gate_up[:, :I], d_gate_up[:, I:]
    torch.mul(grad, silu, out=d_up)                                                 # d(h)/d(up) * grad
    grad_scale = (d_up * up).sum(-1) if want_scale else None                        # grad . silu * up
    d_up.mul_(sc)
    torch.mul(grad, up, out=d_gate).mul_(sc)
    torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
    return d_gate_up, grad_scale


class ExpertGrouped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token, w_gate_up, w_down, scale, offs):
        """x (N,H) tokens, token (S,) the source token of each slot (slots sorted by expert), w_gate_up (E,2I,H),
        w_down (E,H,I), scale (S,) routing weights, offs (E,) int32 cumulative slot counts -> (N,H), as
        ExpertLoop. Two `F.grouped_mm` calls with scaled_swiglu between them."""
        xs = x.index_select(0, token)                                                  # (S,H) grouped by expert
        gate_up = F.grouped_mm(xs, w_gate_up.transpose(-2, -1), offs=offs)             # (S,2I)
        h = scaled_swiglu(gate_up, scale)                                              # (S,I)
        out = F.grouped_mm(h, w_down.transpose(-2, -1), offs=offs)                     # (S,H)
        ctx.save_for_backward(xs, token, w_gate_up, w_down, scale, offs, gate_up, h)
        ctx.num_tokens = x.shape[0]
        return out.new_zeros(x.shape).index_add_(0, token, out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        xs, token, w_gate_up, w_down, scale, offs, gate_up, h = ctx.saved_tensors
        want_x, _, want_gu, want_down, want_scale = ctx.needs_input_grad[:5]
        go = grad_out.index_select(0, token)                                           # (S,H)
        # the weight gradients as torch's own grouped_mm backward computes them: (2D)^T x 2D with groups along K
        grad_down = F.grouped_mm(go.t(), h, offs=offs) if want_down else None          # (E,H,I)
        d_h = F.grouped_mm(go, w_down, offs=offs)                                      # d(h) (S,I)
        del go
        d_gate_up, grad_scale = scaled_swiglu_backward(d_h, gate_up, scale, want_scale)   # (S,2I), (S,)
        del d_h
        grad_gu = F.grouped_mm(d_gate_up.t(), xs, offs=offs) if want_gu else None      # (E,2I,H)
        grad_x = None
        if want_x:
            grad_x = xs.new_zeros(ctx.num_tokens, xs.shape[1]).index_add_(
                0, token, F.grouped_mm(d_gate_up, w_gate_up, offs=offs))               # (N,H)
        return grad_x, None, grad_gu, grad_down, grad_scale, None


class ExpertLoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token, w_gate_up, w_down, scale, sizes):
        """x (N,H) tokens, token (S,) the source token of each slot (slots sorted by expert), w_gate_up (E,2I,H) =
        [gate; up], w_down (E,H,I), scale (S,) routing weights, sizes: the slots of each expert (python ints,
        summing to S) -> (N,H): each token's slots' (silu(gate) * up * scale) @ w_down^T, summed."""
        I = w_down.shape[-1]
        out = x.new_zeros(x.shape)
        gate_up = x.new_empty(token.shape[0], 2 * I)                 # kept for backward (silu and h recomputed)
        start = 0
        for e, n in enumerate(sizes):
            if n:
                rows, tok = slice(start, start + n), token[start:start + n]
                gu = torch.mm(x.index_select(0, tok), w_gate_up[e].t(), out=gate_up[rows])      # (n,2I)
                h = F.silu(gu[:, :I]).mul_(gu[:, I:]).mul_(scale[rows, None])                  # (n,I)
                out.index_add_(0, tok, h @ w_down[e].t())
            start += n
        ctx.sizes = sizes
        ctx.save_for_backward(x, token, w_gate_up, w_down, scale, gate_up)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, token, w_gate_up, w_down, scale, gate_up = ctx.saved_tensors
        want_x, _, want_gu, want_down, want_scale = ctx.needs_input_grad[:5]
        I = w_down.shape[-1]
        grad_x = torch.zeros_like(x) if want_x else None
        grad_gu = torch.empty_like(w_gate_up) if want_gu else None
        grad_down = torch.empty_like(w_down) if want_down else None
        grad_scale = torch.empty_like(scale) if want_scale else None
        start = 0
        for e, n in enumerate(ctx.sizes):
            if not n:                                                                  # an idle expert
                for grad in (grad_gu, grad_down):
                    if grad is not None:
                        grad[e].zero_()
                continue
            rows, tok = slice(start, start + n), token[start:start + n]
            start += n
            gu, sc = gate_up[rows], scale[rows, None]
            silu = F.silu(gu[:, :I])
            h = silu * gu[:, I:]                                                       # (n,I) before scaling
            go = grad_out.index_select(0, tok)                                         # (n,H)
            if want_down:
                torch.mm(go.t(), h * sc, out=grad_down[e])                             # (H,I)
            d_h = go @ w_down[e]                                                       # d(h * scale) (n,I)
            if want_scale:
                torch.sum(d_h * h, dim=-1, out=grad_scale[rows])
            d_gate_up = _swiglu_backward(d_h.mul_(sc), gu, silu)                       # (n,2I)
            if want_gu:
                torch.mm(d_gate_up.t(), x.index_select(0, tok), out=grad_gu[e])        # (2I,H)
            if want_x:
                grad_x.index_add_(0, tok, d_gate_up @ w_gate_up[e])
        return grad_x, None, grad_gu, grad_down, grad_scale, None


def block_plan(sizes: list[int], row_cost_of_copy: int = 24) -> tuple[int, list[int] | None]:
    """(C, blocks per expert, or None for one block per expert with C = the busiest expert's load).

    Padding to the busiest expert wastes E * max - S rows; at skewed loads, blocks of C < max rows waste at most
    C - 1 per expert but copy each block's weights (about `row_cost_of_copy` rows' worth of compute each, fwd
    and bwd). Picks the cheaper, over a few candidate C."""
    E, S, top = len(sizes), sum(sizes), max(sizes)
    best = (E * top, top, None)                                  # (cost in rows, C, blocks)
    for c in {math.ceil(top / k) for k in (2, 3, 4)} | {math.ceil(S / E * f) for f in (1.0, 1.1, 1.25, 1.5)}:
        if 0 < c < top:
            blocks = [math.ceil(n / c) for n in sizes]
            cost = sum(blocks) * (c + row_cost_of_copy)
            if cost < best[0]:
                best = (cost, c, blocks)
    return best[1], best[2]


class ExpertBatched(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token, w_gate_up, w_down, scale, sizes):
        """x (N,H) tokens, token (S,) the source token of each slot (slots sorted by expert), w_gate_up (E,2I,H) =
        [gate; up], w_down (E,H,I), scale (S,) routing weights, sizes: the slots of each expert (python ints,
        summing to S) -> (N,H): each token's slots' (silu(gate) * up * scale) @ w_down^T, summed.

        The padded blocks are gathered straight from x and summed straight back into (N,H) (no (S,H) copies in
        between): a padding row reads token 0 with routing weight 0, so its output and its gradients into the
        weights and x are exactly zero (for finite values: a NaN at token 0 reaches every block, where the
        per-slot path would keep it to token 0's experts; either way the step's gradient norm is NaN)."""
        C, blocks = block_plan(sizes)
        E, S, N = len(sizes), token.shape[0], x.shape[0]
        counts = torch.tensor(sizes, device=x.device)
        per_expert = counts.new_ones(E) if blocks is None else torch.tensor(blocks, device=x.device)
        expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts)             # (S,)
        rank = torch.arange(S, device=x.device) - (counts.cumsum(0) - counts)[expert]          # slot within expert
        first_block = per_expert.cumsum(0) - per_expert                                         # (E,)
        row = (first_block[expert] + rank // C) * C + rank % C                                  # slot -> padded row
        M, block_expert = int(per_expert.sum()), None
        if blocks is not None:                                        # an expert's blocks repeat its weights
            block_expert = torch.repeat_interleave(torch.arange(E, device=x.device), per_expert)    # (M,)
            w_gate_up, w_down = w_gate_up.index_select(0, block_expert), w_down.index_select(0, block_expert)
        row_token = token.new_zeros(M * C).index_copy_(0, row, token)                          # (M*C,) source token
        x_pad = x.index_select(0, row_token).view(M, C, -1)                                     # (M,C,H)
        scale_pad = scale.new_zeros(M * C).index_copy_(0, row, scale).view(M, C, 1)            # (M,C,1)
        gate_up = torch.bmm(x_pad, w_gate_up.transpose(1, 2))                                   # (M,C,2I)
        I = w_down.shape[-1]
        silu = F.silu(gate_up[..., :I])
        h = silu * gate_up[..., I:]                                                             # (M,C,I)
        h_scaled = h * scale_pad
        out = torch.bmm(h_scaled, w_down.transpose(1, 2)).view(M * C, -1)                       # (M*C,H)
        # silu, h and h * scale are kept, not recomputed: three (M,C,I) passes fewer in backward
        ctx.save_for_backward(x_pad, w_gate_up, w_down, scale_pad, gate_up, silu, h, h_scaled, row, row_token,
                              block_expert)
        ctx.num_experts, ctx.num_tokens = E, N
        return out.new_zeros(N, out.shape[-1]).index_add_(0, row_token, out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x_pad, w_gate_up, w_down, scale_pad, gate_up, silu, h, h_scaled, row, row_token, block_expert = \
            ctx.saved_tensors
        want_x, _, want_gu, want_down, want_scale = ctx.needs_input_grad[:5]
        M, C, H = x_pad.shape
        go = grad_out.index_select(0, row_token).view(M, C, H)                                  # (M,C,H)
        grad_down = torch.bmm(go.transpose(1, 2), h_scaled) if want_down else None              # (M,H,I)
        d_h = torch.bmm(go, w_down)                                                             # (M,C,I)
        grad_scale = (d_h * h).sum(-1).view(-1).index_select(0, row) if want_scale else None    # (S,)
        d_gate_up = _swiglu_backward(d_h.mul_(scale_pad), gate_up, silu)                        # (M,C,2I)
        grad_gu = torch.bmm(d_gate_up.transpose(1, 2), x_pad) if want_gu else None              # (M,2I,H)
        grad_x = None
        if want_x:                                                    # padding rows carry zero d_gate_up
            grad_x = grad_out.new_zeros(ctx.num_tokens, H).index_add_(
                0, row_token, torch.bmm(d_gate_up, w_gate_up).view(M * C, H))                  # (N,H)
        if block_expert is not None:                                  # sum the repeated weights' gradients
            def per_expert(grad):
                return grad.new_zeros(ctx.num_experts, *grad.shape[1:]).index_add_(0, block_expert, grad)
            grad_gu = None if grad_gu is None else per_expert(grad_gu)
            grad_down = None if grad_down is None else per_expert(grad_down)
        return grad_x, None, grad_gu, grad_down, grad_scale, None
