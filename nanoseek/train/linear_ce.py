"""Fused vocabulary projection + cross-entropy, chunked over rows: the (N, V) logits never exist whole.

    loss = sum_n row_weight[n] * (logsumexp(h_n W^T) - (h_n W^T)[target_n])

An unfused head materializes N x V logits, then a log-softmax, its gradient and a zero-filled one-hot buffer of
the same size: at 1024 tokens x 8192 vocabulary that is 32 MB per tensor, streamed through memory five times.
Here each chunk of rows computes its logits, the loss, and (when a gradient is wanted) its gradient
softmax - onehot in place, then multiplies it straight into dL/dh and dL/dW while it is still in cache. The
gradients are computed in the forward pass (as Liger-Kernel's fused linear cross-entropy does), so backward
only scales them by the incoming scalar gradient.
"""
from __future__ import annotations

import torch

from nanoseek.hardware import fast_autocast_dtype, onednn_fp32_head, onednn_fp32_linear
from nanoseek.scratch import scratch

CHUNK_ELEMENTS = 2 ** 21   # logits per chunk: 256 rows x 8192 vocab = 8 MiB fp32 fits the L3 share and keeps the
CHUNK_ROWS = 256           # matmuls near peak (CPU); never fewer rows than this, whatever the vocabulary
WORKSPACE_BYTES = 2 ** 26  # the CPU fp32 path's reused gradient buffer: 64 MiB, or one chunk if larger
VOCAB_BLOCK = 512          # logits columns per MKL matmul in the CPU fp32 path (`_mkl_logits`)


def chunk_rows(vocab: int) -> int:
    """Rows per chunk: ~CHUNK_ELEMENTS logits, at least CHUNK_ROWS rows. A small vocabulary gets large chunks
    (the 640-token demo model: 3276 rows), where per-chunk overhead would otherwise cost more than fusion saves."""
    return max(CHUNK_ROWS, CHUNK_ELEMENTS // vocab)


def _mm_nt(a: torch.Tensor, b: torch.Tensor, onednn: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b^T, into `out` when given: through oneDNN (its op makes a new tensor, copied into `out`), else
    MKL/cuBLAS."""
    if not onednn:
        return torch.mm(a, b.t(), out=out)
    result = torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return result if out is None else out.copy_(result)


def _loss_and_grad_(logits, t, rw, want_grad: bool = True):
    """logits (c,V) fp32, overwritten; t (c,1) targets; rw (c,1) row weights -> (sum of the rows' weighted CE,
    gradient (softmax - onehot) * rw (c,V) in logits' memory, or None without want_grad)."""
    target_logit = logits.gather(1, t)                                              # (c,1)
    peak = logits.amax(dim=-1, keepdim=True)
    e = logits.sub_(peak).exp_()                                                    # in place: exp(z - max)
    total = e.sum(dim=-1, keepdim=True)
    loss = ((peak + total.log() - target_logit) * rw).sum()                         # logsumexp - z_target
    if not want_grad:                                                               # no two more (c,V) passes
        return loss, None
    return loss, e.mul_(rw / total).scatter_add_(1, t, -rw)                         # (softmax - onehot) * w


_TINY_P = 2.0 ** -100     # far above fp32's subnormals (2^-126): log of a normal p is exact to ~1e-7 relative


def _softmax_grad_(logits, t, out, logits_of=None):
    """logits (c,V) fp32, t (c,1) targets -> (per-row CE (c,1), softmax - onehot (c,V) in `out`). `out` may be
    logits itself (in place) when `logits_of(rows)` recomputes those rows' logits; otherwise logits are kept.
    torch.softmax works row by row (one 32 KiB row of an 8192 vocabulary stays in L1 across its max, exp-sum and
    scale), where _loss_and_grad_'s whole-chunk amax, sub, exp, sum and scale stream the chunk through memory
    five times: 4.1 -> 2.0 ms a 256 x 8192 chunk, the whole bench_model step 1.5% faster (AVX2, interleaved).
    The loss is -log p[target]; a row whose p[target] is too small for fp32 to hold precisely takes
    logsumexp - logit from its logits instead, so the value stays exact (CPU only: that check syncs)."""
    p = torch.softmax(logits, -1, out=out)
    p_target = p.gather(1, t)                                                       # (c,1)
    loss = p_target.log().neg_()
    tiny = p_target < _TINY_P
    if tiny.any():
        rows = tiny[:, 0].nonzero()[:, 0]
        z = logits[rows] if logits_of is None else logits_of(rows)                  # (rows,V)
        loss[rows] = z.logsumexp(-1, keepdim=True) - z.gather(1, t[rows])
    return loss, p.scatter_add_(1, t, torch.full_like(p_target, -1.0))


def _mkl_logits(hidden, weight, out):
    """hidden (n,H) @ weight (V,H)^T into out (n,V), VOCAB_BLOCK columns per matmul. MKL runs the (n, 512)
    blocks faster than the whole (n, V) product: 1024 x 256 -> 8192 at 156 GFLOP/s against 128 whole and 115 for
    oneDNN's linear over 256-row chunks (AVX2 EPYC, stop 24)."""
    for j in range(0, weight.shape[0], VOCAB_BLOCK):
        torch.mm(hidden, weight[j:j + VOCAB_BLOCK].t(), out=out[:, j:j + VOCAB_BLOCK])
    return out


def _cpu_fp32_grads(hidden, weight, targets, row_weight, chunk):
    """(loss, dL/dhidden, dL/dweight) for fp32 on an x86 CPU. The gradient softmax - onehot of up to
    WORKSPACE_BYTES rows x V (a fill) goes into one reused workspace; per fill, dL/dh = (g @ W) * w and
    dL/dW = g^T @ (h * w) are one matmul each (w the row weights, applied to the (rows, H) sides rather than to
    the (rows, V) gradient), with the fill's rows as dL/dW's inner dimension. Which library runs the matmuls is
    decided by the CPU (`hardware.onednn_fp32_head`):
    - AVX2 (MKL): the fill's logits are written straight into the workspace (`_mkl_logits`) and the softmax
      gradient overwrites them in place; dL/dW is MKL's g^T @ (h * w). The head + loss fwd+bwd 1.09-1.17x
      faster than the oneDNN path below (Zen 3 EPYC, stop 24, interleaved A/Bs): that path's logits ran
      ~106 GFLOP/s and its dL/dW needed a transposing copy.
    - AVX-512 (oneDNN): each chunk's logits through oneDNN's linear (202 GFLOP/s against MKL's 149 for 256 x 256
      -> 8192), dL/dW as oneDNN's (H,V) = h^T @ g, transposed at the end (~180 GFLOP/s against MKL's ~120 for
      g^T @ h: the bench_model head 110 -> 96 ms, interleaved, caches flushed between)."""
    N, V = hidden.shape[0], weight.shape[0]
    span = min(N, max(chunk, WORKSPACE_BYTES // (4 * V) // chunk * chunk))          # rows per fill: whole chunks
    onednn = onednn_fp32_head()
    loss = torch.zeros((), dtype=hidden.dtype)
    grad_h, grad_w = torch.empty_like(hidden), None
    for f in range(0, N, span):
        rows = min(span, N - f)
        # a reused buffer: a fresh 32 MiB one page-faulted away the gain of the one-matmul dL/dW (107 vs 106 ms)
        g = scratch("head_grad", (rows, V), hidden.dtype)                           # (rows,V)
        if not onednn:
            _mkl_logits(hidden[f:f + rows], weight, out=g)
        for s in range(0, rows, chunk):
            c = min(chunk, rows - s)
            r = slice(f + s, f + s + c)
            if onednn:
                part, _ = _softmax_grad_(_mm_nt(hidden[r], weight, onednn=True), targets[r, None], out=g[s:s + c])
            else:
                part, _ = _softmax_grad_(g[s:s + c], targets[r, None], out=g[s:s + c],
                                         logits_of=lambda rows, h=hidden[r]: h[rows] @ weight.t())
            loss += (part * row_weight[r, None]).sum()
        w = row_weight[f:f + rows, None]                                            # (rows,1)
        _mm_nt(g, weight.t(), onednn=onednn, out=grad_h[f:f + rows]).mul_(w)        # dL/dh = (g @ W) * w
        if onednn:
            h_t = torch.mul(hidden[f:f + rows].t(), w.t(), out=hidden.new_empty(hidden.shape[1], rows))  # (H,rows)
            part_w = _mm_nt(h_t, g.t(), onednn=True)                                # (H,V) = (h * w)^T @ g
            grad_w = part_w if grad_w is None else grad_w.add_(part_w)
        elif grad_w is None:
            grad_w = torch.mm(g.t(), hidden[f:f + rows] * w)                        # (V,H) = g^T @ (h * w)
        else:
            grad_w.addmm_(g.t(), hidden[f:f + rows] * w)
    return loss, grad_h, grad_w.t().contiguous() if onednn else grad_w


def _chunks(hidden, weight, targets, row_weight, chunk, want_grad):
    """(loss, dL/dhidden or None, dL/dweight or None): the work of both passes. hidden (N,H) and weight (V,H)
    already in the compute dtype; targets (N,) valid ids; row_weight (N,) fp32."""
    N, V = hidden.shape[0], weight.shape[0]
    low = hidden.element_size() < 4                                                     # bf16 / fp16 matmuls
    acc = torch.promote_types(hidden.dtype, torch.float32)                              # softmax dtype
    row_weight = row_weight.to(acc)
    onednn = onednn_fp32_linear(hidden, weight)
    if onednn and want_grad and chunk <= 2 * CHUNK_ROWS:
        # few rows a chunk (vocabularies of 4096 and up): MKL's per-chunk dL/dW has too short a K to run fast.
        # Head + loss fwd+bwd: 125.7 -> 107.6 ms at V 8192, 130.2 -> 120.9 at V 32000; with the demo's 640-token
        # vocabulary (3276-row chunks) the chunk loop below stays faster (15.0 vs 15.9 ms).
        return _cpu_fp32_grads(hidden, weight, targets, row_weight, chunk)
    # no gradient, on AVX2: the logits in MKL's vocabulary blocks, as _cpu_fp32_grads takes them there (the fp32
    # loss alone of the bench_model head, 1024 x 256 -> 8192: 39.3-41.7 -> 37.3-38.9 ms, interleaved, stop 24)
    vocab_blocks = onednn and not want_grad and not onednn_fp32_head()
    onednn = onednn and not vocab_blocks
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    grad_h = torch.empty_like(hidden) if want_grad else None
    # fp32: dL/dW accumulates chunk by chunk in place. Low precision: every chunk's gradient is kept (N x V in
    # bf16, half the fp32 logits an unfused head holds) for one dL/dW matmul at the end, which rounds once, as
    # autograd's bf16 linear does, instead of once per chunk.
    grad_w = None                                           # fp32: the first chunk's matmul creates it
    # One logits buffer for every chunk: a fresh multi-MiB tensor per chunk costs page faults on CPU (glibc hands
    # large blocks back to the OS), which measured as much as the matmul that fills it. (oneDNN's op has no `out`:
    # its speed measured worth more than the buffer.)
    logits_buf = None if onednn else torch.empty(min(chunk, N), V, dtype=acc, device=hidden.device)
    low_buf = (None if not low else torch.empty(N if want_grad else min(chunk, N), V, dtype=hidden.dtype,
                                                device=hidden.device))
    for s in range(0, N, chunk):
        h, t, rw = hidden[s:s + chunk], targets[s:s + chunk, None], row_weight[s:s + chunk, None]
        c = h.shape[0]
        if low:
            low_c = low_buf[s:s + c] if want_grad else low_buf[:c]
            logits = logits_buf[:c].copy_(torch.mm(h, weight.t(), out=low_c))          # (c,V) fp32
        else:
            logits = (_mkl_logits(h, weight, out=logits_buf[:c]) if vocab_blocks                  # (c,V) fp32
                      else _mm_nt(h, weight, onednn, out=None if onednn else logits_buf[:c]))    # (or fp64)
        part, g = _loss_and_grad_(logits, t, rw, want_grad=want_grad)
        loss += part
        if want_grad:
            if low:
                g = low_c.copy_(g)
            _mm_nt(g, weight.t(), onednn, out=grad_h[s:s + c])                          # dL/dh = g @ W
            if not low:
                grad_w = torch.mm(g.t(), h) if grad_w is None else grad_w.addmm_(g.t(), h)
    if want_grad and low:
        grad_w = low_buf.t() @ hidden                                                   # (V,H)
    return loss, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, row_weight, chunk, compute_dtype):
        loss, grad_h, grad_w = _chunks(hidden.to(compute_dtype), weight.to(compute_dtype), targets, row_weight,
                                       chunk, want_grad=True)
        ctx.save_for_backward(grad_h.to(hidden.dtype), grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors                   # computed for grad_loss = 1
        if grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
            # the usual case (the loss is already the mean): no rescaling pass over the (V,H) gradient. On GPU
            # the check would cost a host sync, so it always scales there. Returning the saved tensors is safe
            # under retain_graph: autograd only reuses a gradient buffer in place when nothing else holds it.
            return grad_h, grad_w, None, None, None, None
        return (grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype),   # out of place: the
                None, None, None, None)                      # saved ones must survive a retained graph's 2nd pass


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         row_weight: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """hidden (N,H), weight (V,H) the lm_head's, targets (N,), row_weight (N,) -> sum_n row_weight[n] * CE_n.

    The same value and gradients as `F.cross_entropy(hidden @ weight.T, targets, reduction="none") @ row_weight`
    (the log-softmax in fp32). Rows of weight 0 may hold any target (it is clamped into range). Under autocast
    the matmuls run in the autocast dtype, as nn.Linear's would, except on a CPU without hardware bf16
    (`hardware.fast_autocast_dtype`): there they stay in the inputs' dtype."""
    device, chunk = hidden.device.type, chunk or chunk_rows(weight.shape[0])
    compute = fast_autocast_dtype(device) or hidden.dtype             # fp32 under autocast on a slow-bf16 CPU
    targets = targets.clamp(0, weight.shape[0] - 1)
    row_weight = row_weight.float()
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(hidden, weight, targets, row_weight, chunk, compute)
        return _chunks(hidden.to(compute), weight.to(compute), targets, row_weight, chunk, want_grad=False)[0]
