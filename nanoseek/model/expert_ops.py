"""Routed experts as single autograd ops with hand-written backwards: each takes the tokens, each slot's source
token and routing weight (slots sorted by expert) and returns the tokens' summed expert outputs, computing what
`moe._swiglu` per expert computes.

`ExpertLoop` (fp64, fp32 on CUDA, and CPU fp32 where `F.grouped_mm` is missing or the shapes are not 16-byte
aligned) runs expert by expert: gather its tokens, two matmuls, scatter-add its outputs back,
with each expert's rows still in cache, and writes every gradient straight into its buffer (autograd over the same
loop would also cat the slot gradients, stack the per-expert weight gradients and zero-fill per slice: the MoE
block fp32 38.4 -> 35.7 ms fwd+bwd, A/B in one process).

`ExpertBatched` (bf16/fp16) gives each busy expert one block of rows, gathered straight from the tokens and
zero-weighted where padded to the busiest load of its group of experts (`batch_groups`), and runs each group as
batched matmuls. CPU bmm splits the batch across cores (no per-matmul thread sync): it measured 1.3-1.5x the
GFLOP/s of a per-expert loop in bf16 (16 experts x 256 rows, H 256, I 128); in fp32 the padding and repeated
weights cost more than that gains.

`ExpertGrouped` (CUDA bf16, CPU fp32 where `F.grouped_mm` exists) gathers the slots and runs two grouped GEMMs
with `scaled_swiglu` (silu(gate) * up * routing weight) between them, as one op: autograd over the same calls
also kept every MoE layer's (S, H) expert outputs alive until backward (index_add holds its source for the
source's shape alone), 28 of the 209 MB saved for backward in a bench_model step. Recomputing the gathered slots
and the activation in backward instead of saving them (139 MB) measured within noise of saving them in whole-step
A/Bs (-4% to +5%, five runs): they are saved.

Shapes: N tokens, S slots sorted by expert, H hidden, I expert width, E experts, M blocks, R padded rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from nanoseek.scratch import scratch


def scaled_swiglu(gate_up: torch.Tensor, scale: torch.Tensor, keep_sigmoid: bool = False):
    """gate_up (S, 2I) = [gate | up], scale (S,) -> (silu(gate) * up * scale (S, I) in one fresh buffer,
    sigmoid(gate) (S, I) for scaled_swiglu_backward's `sigmoid=` with keep_sigmoid, else None)."""
    I = gate_up.shape[-1] // 2
    gate, up = gate_up[:, :I], gate_up[:, I:]
    if not keep_sigmoid:
        return F.silu(gate).mul_(up).mul_(scale[:, None]), None
    sigmoid = torch.sigmoid(gate)
    return torch.mul(gate, sigmoid).mul_(up).mul_(scale[:, None]), sigmoid


def scaled_swiglu_backward(grad, gate_up, scale=None, want_scale: bool = False, out: torch.Tensor | None = None,
                           silu: torch.Tensor | None = None, sigmoid: torch.Tensor | None = None):
    """grad (S, I) of scaled_swiglu's output -> (d gate_up (S, 2I), in `out` when given; d scale (S,) or None).
    scale None: the gradient of the unscaled silu(gate) * up (callers that fold the routing weight into grad).
    silu: silu(gate) where the caller kept it, else recomputed. Both halves are built in place in the one output
    buffer (autograd would cat them): fresh multi-MiB buffers page-fault on CPU (a backward with fresh
    temporaries made the whole step 2-3% slower, A/B).
    sigmoid: sigmoid(gate) kept by the forward (scaled_swiglu's keep_sigmoid). Then no exp runs here: silu =
    gate * s and silu' = s + silu * (1 - s) are products, where silu's recompute and silu_backward each take an
    exp per element, the slowest elementwise passes on CPU (an exp pass costs ~5 multiplies' time)."""
    I = gate_up.shape[-1] // 2
    gate, up = gate_up[:, :I], gate_up[:, I:]
    d_gate_up = torch.empty_like(gate_up) if out is None else out
    d_gate, d_up = d_gate_up[:, :I], d_gate_up[:, I:]
    if sigmoid is not None:
        silu = torch.mul(gate, sigmoid, out=d_up)                                   # d_up's memory, scaled below
        slope = torch.addcmul(silu, silu, sigmoid, value=-1, out=(                   # silu'(gate) = s + silu(1-s)
            scratch("swiglu_slope", sigmoid.shape, sigmoid.dtype) if sigmoid.device.type == "cpu" else None)
        ).add_(sigmoid)
        torch.mul(grad, up, out=d_gate).mul_(slope)
        d_up.mul_(grad)                                                             # d(h)/d(up) * grad
    else:
        silu = F.silu(gate) if silu is None else silu
        torch.mul(grad, silu, out=d_up)                                             # d(h)/d(up) * grad
        torch.mul(grad, up, out=d_gate)
    # grad . silu * up per slot; vecdot reads both once (81 vs 137 us for mul + sum at (4096, 128))
    grad_scale = torch.linalg.vecdot(d_up, up) if want_scale else None
    if scale is not None:
        d_up.mul_(scale[:, None])
        d_gate.mul_(scale[:, None])
    if sigmoid is None:
        torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)    # in place: elementwise
    return d_gate_up, grad_scale


class ExpertGrouped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token, w_gate_up, w_down, scale, offs):
        """x (N,H) tokens, token (S,) the source token of each slot (slots sorted by expert), w_gate_up (E,2I,H),
        w_down (E,H,I), scale (S,) routing weights, offs (E,) int32 cumulative slot counts -> (N,H), as
        ExpertLoop. Two `F.grouped_mm` calls with scaled_swiglu between them."""
        xs = x.index_select(0, token)                                                  # (S,H) grouped by expert
        gate_up = F.grouped_mm(xs, w_gate_up.transpose(-2, -1), offs=offs)             # (S,2I)
        # fp32 keeps sigmoid(gate) (S,I) so backward runs no exp: the MoE block's fwd+bwd 1.2% faster (44.0 -> 43.2
        # ms, AVX2 EPYC, interleaved, twice). bf16/fp16 recompute: their products would round several times.
        h, sigmoid = scaled_swiglu(gate_up, scale, keep_sigmoid=gate_up.dtype == torch.float32)   # (S,I) each
        out = F.grouped_mm(h, w_down.transpose(-2, -1), offs=offs)                     # (S,H)
        ctx.save_for_backward(xs, token, w_gate_up, w_down, scale, offs, gate_up, h, sigmoid)
        ctx.num_tokens = x.shape[0]
        return out.new_zeros(x.shape).index_add_(0, token, out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        xs, token, w_gate_up, w_down, scale, offs, gate_up, h, sigmoid = ctx.saved_tensors
        want_x, _, want_gu, want_down, want_scale = ctx.needs_input_grad[:5]
        # go and d_gate_up live only inside this call: on CPU they reuse per-thread buffers (nanoseek.scratch)
        # instead of page-faulting 2 x (S, H) fresh memory per layer. bench_model's fp32 step, interleaved A/Bs
        # of 28 steps: 743.2 -> 728.6 and 872.2 -> 859.1 ms (AVX2 EPYC, a noisy host)
        cpu = grad_out.device.type == "cpu"
        go = torch.index_select(grad_out, 0, token, out=scratch("expert_go", (token.shape[0], grad_out.shape[1]),
                                                              grad_out.dtype) if cpu else None)   # (S,H)
        # the weight gradients as torch's own grouped_mm backward computes them: (2D)^T x 2D with groups along K
        grad_down = F.grouped_mm(go.t(), h, offs=offs) if want_down else None          # (E,H,I)
        d_h = F.grouped_mm(go, w_down, offs=offs)                                      # d(h) (S,I)
        del go
        d_gate_up, grad_scale = scaled_swiglu_backward(                                # (S,2I), (S,)
            d_h, gate_up, scale, want_scale, out=scratch("expert_d_gate_up", gate_up.shape, gate_up.dtype) if cpu
            else None, sigmoid=sigmoid)
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
            d_gate_up = scaled_swiglu_backward(d_h.mul_(sc), gu, silu=silu)[0]         # (n,2I)
            if want_gu:
                torch.mm(d_gate_up.t(), x.index_select(0, tok), out=grad_gu[e])        # (2I,H)
            if want_x:
                grad_x.index_add_(0, tok, d_gate_up @ w_gate_up[e])
        return grad_x, None, grad_gu, grad_down, grad_scale, None


def _padded(rows: int, granule: int = 32) -> int:
    """Rows per block, rounded up to a power of two up to `granule` and to a multiple of it above: oneDNN builds a
    kernel for every new matmul shape it sees (2-3 ms for a bf16 bmm here, against ~2.5 ms to run it), and routing
    changes the loads every step, so unrounded block sizes made nearly every step build its kernels anew. Powers of
    two keep the few-token loads of batched decoding from being padded to 32 rows."""
    return 1 << (rows - 1).bit_length() if rows <= granule else -(-rows // granule) * granule


def batch_groups(sizes: list[int], copy_rows: int = 24, group_rows: int = 64) -> list[list[int]]:
    """The busy experts, busiest first, cut into groups for padded batched matmuls: each group's experts are padded
    to its busiest one's load, one block each, and run as one bmm per projection.

    One group padded to the busiest expert wasted 29% of the rows at bench_model's loads (busiest 1.5-1.7x the
    mean); more groups waste less but each costs four more bmm calls (about `group_rows` rows' worth of compute),
    and every block copies its expert's weights (`copy_rows`). The cut minimizing
    sum_g |g| * (max_g + copy_rows) + group_rows per group is found by dynamic programming over the sorted loads,
    cutting only where the padded load changes (a cut between equal padded loads never lowers the cost), so a
    256-expert layer plans in a few runs of equal padded loads rather than 256 experts."""
    order = sorted((e for e, n in enumerate(sizes) if n), key=lambda e: -sizes[e])
    padded = [_padded(sizes[e]) for e in order]
    starts = [i for i in range(len(order)) if i == 0 or padded[i] != padded[i - 1]] + [len(order)]
    best, cut = [0], [0]                   # best[k]: cheapest plan for the experts before starts[k]
    for k in range(1, len(starts)):
        cost, m = min((best[m] + (starts[k] - starts[m]) * (padded[starts[m]] + copy_rows) + group_rows, m)
                      for m in range(k))
        best.append(cost)
        cut.append(m)
    groups, k = [], len(starts) - 1
    while k:
        groups.append(order[starts[cut[k]]:starts[k]])
        k = cut[k]
    return groups[::-1]


class ExpertBatched(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token, w_gate_up, w_down, scale, sizes):
        """x (N,H) tokens, token (S,) the source token of each slot (slots sorted by expert), w_gate_up (E,2I,H) =
        [gate; up], w_down (E,H,I), scale (S,) routing weights, sizes: the slots of each expert (python ints,
        summing to S) -> (N,H): each token's slots' (silu(gate) * up * scale) @ w_down^T, summed.

        Each busy expert gets one block of rows, padded to the load of the busiest expert in its group
        (`batch_groups`); the blocks are gathered straight from x into one (R,H) buffer and summed straight back
        into (N,H) (no (S,H) copies in between); only the matmuls run group by group. A padding row reads token 0
        with routing weight 0, so its output and its gradients into the weights and x are exactly zero (for finite
        values: a NaN at token 0 reaches every block, where the per-slot path would keep it to token 0's experts;
        either way the step's gradient norm is NaN)."""
        groups = [sorted(g) for g in batch_groups(sizes)]        # by expert id: one group needs no weight copies
        E, S, N, dev = len(sizes), token.shape[0], x.shape[0], x.device
        block_expert = [e for g in groups for e in g]                                   # (M,)
        spans, blocks, rows, first_row = [], 0, 0, [0] * E      # per group: (first block, blocks, first row, C)
        for g in groups:
            C = _padded(max(sizes[e] for e in g))
            spans.append((blocks, len(g), rows, C))
            for k, e in enumerate(g):
                first_row[e] = rows + k * C
            blocks, rows = blocks + len(g), rows + len(g) * C
        counts = torch.tensor(sizes, device=dev)
        expert = torch.repeat_interleave(torch.arange(E, device=dev), counts)                  # (S,)
        rank = torch.arange(S, device=dev) - (counts.cumsum(0) - counts)[expert]               # slot within expert
        row = torch.tensor(first_row, device=dev)[expert] + rank                                # slot -> padded row
        if block_expert == list(range(E)):
            block_expert = None                               # every expert busy, in one group: weights as they are
        else:
            block_expert = torch.tensor(block_expert, device=dev)
            w_gate_up, w_down = w_gate_up.index_select(0, block_expert), w_down.index_select(0, block_expert)
        row_token = token.new_zeros(rows).index_copy_(0, row, token)                            # (R,) source token
        x_pad = x.index_select(0, row_token)                                                    # (R,H)
        scale_pad = scale.new_zeros(rows).index_copy_(0, row, scale)[:, None]                  # (R,1)
        I = w_down.shape[-1]
        gate_up = x.new_empty(rows, 2 * I)
        _grouped_bmm(spans, x_pad, w_gate_up.transpose(1, 2), gate_up)                         # (R,2I)
        silu = F.silu(gate_up[:, :I])
        h = silu * gate_up[:, I:]                                                               # (R,I)
        h_scaled = h * scale_pad
        out = _grouped_bmm(spans, h_scaled, w_down.transpose(1, 2), x.new_empty(rows, x.shape[1]))   # (R,H)
        # silu, h and h * scale are kept, not recomputed: three (R,I) passes fewer in backward
        ctx.save_for_backward(x_pad, w_gate_up, w_down, scale_pad, gate_up, silu, h, h_scaled, row, row_token,
                              block_expert)
        ctx.spans, ctx.num_experts, ctx.num_tokens = spans, E, N
        return out.new_zeros(N, out.shape[-1]).index_add_(0, row_token, out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x_pad, w_gate_up, w_down, scale_pad, gate_up, silu, h, h_scaled, row, row_token, block_expert = \
            ctx.saved_tensors
        want_x, _, want_gu, want_down, want_scale = ctx.needs_input_grad[:5]
        spans, (R, H) = ctx.spans, x_pad.shape
        go = grad_out.index_select(0, row_token)                                                # (R,H)
        grad_down = grad_gu = grad_x = None
        if want_down:                                                                           # (M,H,I) per block
            grad_down = _grouped_bmm(spans, go, h_scaled, w_down.new_empty(w_down.shape), transpose_a=True)
        d_h = _grouped_bmm(spans, go, w_down, h.new_empty(h.shape))                             # (R,I)
        grad_scale = (d_h * h).sum(-1).index_select(0, row) if want_scale else None            # (S,)
        d_gate_up = scaled_swiglu_backward(d_h.mul_(scale_pad), gate_up, silu=silu)[0]          # (R,2I)
        if want_gu:
            grad_gu = _grouped_bmm(spans, d_gate_up, x_pad, w_gate_up.new_empty(w_gate_up.shape), transpose_a=True)
        if want_x:                                                    # padding rows carry zero d_gate_up
            grad_x = grad_out.new_zeros(ctx.num_tokens, H).index_add_(
                0, row_token, _grouped_bmm(spans, d_gate_up, w_gate_up, x_pad.new_empty(R, H)))   # (N,H)

        # blocks -> experts: every expert busy makes block_expert a permutation (one gather by its inverse, no
        # zero fill); otherwise idle experts get zeros
        inverse = (block_expert.argsort() if block_expert is not None and block_expert.shape[0] == ctx.num_experts
                   else None)

        def per_expert(grad):
            if grad is None or block_expert is None:
                return grad
            if inverse is not None:
                return grad.index_select(0, inverse)
            return grad.new_zeros(ctx.num_experts, *grad.shape[1:]).index_copy_(0, block_expert, grad)
        return grad_x, None, per_expert(grad_gu), per_expert(grad_down), grad_scale, None


def _grouped_bmm(spans, a, b, out, transpose_a: bool = False):
    """Per group (first block, blocks m, first row, rows per block C): a's rows (m*C, K) as (m,C,K) @ b's blocks
    (m,K,P) into out's rows (m*C, P), or with transpose_a a's blocks^T (m,K,C) @ b's rows (m*C, P) as (m,C,P)
    into out's blocks (m,K,P)."""
    for b0, m, r0, C in spans:
        rows = slice(r0, r0 + m * C)
        if transpose_a:
            torch.bmm(a[rows].view(m, C, -1).transpose(1, 2), b[rows].view(m, C, -1), out=out[b0:b0 + m])
        else:
            torch.bmm(a[rows].view(m, C, -1), b[b0:b0 + m], out=out[rows].view(m, C, -1))
    return out
