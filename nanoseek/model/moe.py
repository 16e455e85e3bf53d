"""DeepSeekMoE: the V3/V2 gate, routed experts run grouped by expert, and shared experts.

Shapes: N tokens (B*T flattened), H hidden, E routed experts, K experts per token, I expert width, G groups.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Router. V3 (noaux_tc): sigmoid scores; a bias (updated by aux-loss-free balancing, never by gradients)
    shifts selection only; groups scored by the sum of their top-2; weights renormalized then scaled.
    V2: softmax scores; greedy or group-limited (group score = max) top-k."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.topk_method, self.scoring_func = cfg.topk_method, cfg.scoring_func
        self.norm_topk_prob, self.routed_scaling_factor = cfg.norm_topk_prob, cfg.routed_scaling_factor
        # V2 scales only when it does not renormalize; V3 always scales (both as DeepSeek's reference code).
        self.scale_after_norm = cfg.model_type != "deepseek_v2"
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # The router weight and the balancing bias stay fp32 whatever the model dtype (as transformers keeps
        # them): the bias moves in steps of 1e-3 that bf16 cannot represent near 1, and bf16 flips routing.
        # snapshot the data (not the Parameter objects: `_apply` may swap their .data in place)
        old = {n: t.data for n, t in [*self._parameters.items(), *self._buffers.items()] if t is not None}
        super()._apply(fn, recurse)
        for name, t in old.items():
            new = getattr(self, name)
            if new.is_floating_point() and new.dtype != torch.float32 and t.dtype == torch.float32:
                new.data = t.to(device=new.device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor):
        """x (N,H) -> weights (N,K) fp32, indices (N,K), scores (N,E) fp32 (for balance losses)."""
        # fp32 router: bf16 logits flip near-tied expert choices (transformers and DeepSeek do the same).
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())                          # (N,E)
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach()
        if self.topk_method == "noaux_tc":
            choice = choice + self.e_score_correction_bias
        if self.topk_method != "greedy":
            N, E = choice.shape
            grouped = choice.view(N, self.n_group, E // self.n_group)                  # (N,G,E/G)
            group_score = (grouped.topk(2, dim=-1).values.sum(-1) if self.topk_method == "noaux_tc"
                           else grouped.amax(dim=-1))                                   # (N,G)
            keep = group_score.topk(self.topk_group, dim=-1).indices                   # (N,topk_group)
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~group_mask.repeat_interleave(E // self.n_group, dim=1), float("-inf"))
        indices = choice.topk(self.top_k, dim=-1).indices                               # (N,K)
        weights = scores.gather(1, indices)                                             # selection bias not used
        if self.norm_topk_prob and (self.scale_after_norm or self.top_k > 1):
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            if self.scale_after_norm:
                weights = weights * self.routed_scaling_factor
        else:
            weights = weights * self.routed_scaling_factor
        return weights, indices, scores


def _use_grouped_mm(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    # torch's grouped GEMM kernels target CUDA (bf16, SM80+) and need 16-byte aligned strides. On CPU a loop over
    # experts on contiguous slices measured 1.9x faster than F.grouped_mm (16 experts, H=256, I=128, 16K tokens).
    if not (x.is_cuda and hasattr(F, "grouped_mm")) or x.dtype != torch.bfloat16:
        return False
    return all(w.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0 for w in weights)


def _swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One expert: x (n,H), w_gate_up (2I,H), w_down (H,I) -> (n,H)."""
    gate, up = (x @ w_gate_up.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_down.t()


def _padded_bmm(xs, expert, counts, w_gu, w_down):
    """All experts in two batched matmuls over a (E, C, H) buffer padded to the busiest expert's count C.
    xs (S,H) slots sorted by expert, expert (S,) their expert ids. On CPU in bf16 this measured 1.4x faster
    fwd+bwd than a loop of per-expert matmuls at balanced loads (16 experts, ~256 tokens each)."""
    E, C = counts.numel(), int(counts.max())
    start = counts.cumsum(0) - counts                                                    # (E,) first slot
    row = expert * C + (torch.arange(expert.numel(), device=xs.device) - start[expert])  # slot -> padded row
    buf = xs.new_zeros(E * C, xs.shape[-1]).index_copy(0, row, xs).view(E, C, -1)       # (E,C,H)
    gate, up = torch.bmm(buf, w_gu.transpose(1, 2)).chunk(2, dim=-1)                    # (E,C,I) each
    out = torch.bmm(F.silu(gate) * up, w_down.transpose(1, 2))                           # (E,C,H)
    return out.view(E * C, -1).index_select(0, row)                                      # (S,H)


def _hybrid(xs, expert, counts, w_gu, w_down):
    """Skewed loads in bf16: experts above 1.5x the mean load run one by one, the rest in one padded bmm.
    Same arguments and result as `_padded_bmm`. Measured on the bench_train setup (real text, skewed routing):
    bf16 step 1.01x -> 1.09x transformers; in fp32 the plain per-expert loop stays faster (1.09x vs 0.85x)."""
    mean = counts.sum() / counts.numel()
    heavy = counts > 1.5 * mean                                                          # (E,)
    slot_heavy = heavy[expert]                                                           # (S,)
    pieces, rows = [], []                                                                # outputs, their slots
    light_idx = (~slot_heavy).nonzero().squeeze(1)
    if light_idx.numel():
        light = (~heavy).nonzero().squeeze(1)                                            # (E_l,)
        remap = torch.cumsum(~heavy, 0) - 1                                              # expert -> light index
        pieces.append(_padded_bmm(xs.index_select(0, light_idx), remap[expert.index_select(0, light_idx)],
                                  counts[light], w_gu[light], w_down[light]))
        rows.append(light_idx)
    starts = (counts.cumsum(0) - counts).tolist()
    cl = counts.tolist()
    gus, downs = w_gu.unbind(0), w_down.unbind(0)
    for e in heavy.nonzero().squeeze(1).tolist():
        pieces.append(_swiglu(xs[starts[e]:starts[e] + cl[e]], gus[e], downs[e]))
        rows.append(torch.arange(starts[e], starts[e] + cl[e], device=xs.device))
    # one gather back to slot order (an out-of-place index_copy per piece copied the whole (S,H) output each time)
    rows = torch.cat(rows)
    back = torch.empty_like(rows)
    back[rows] = torch.arange(rows.numel(), device=rows.device)
    return torch.cat(pieces).index_select(0, back)                                        # (S,H)


class Experts(nn.Module):
    """E routed SwiGLU experts stored stacked: gate_up_proj (E, 2I, H) = [gate; up], down_proj (E, H, I)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.intermediate = E, I
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N,H), indices/weights (N,K) -> (N,H). Token slots are sorted by expert and run as grouped
        (CUDA), padded-batched or per-expert matmuls on contiguous slices: never a Python loop over tokens."""
        N, K = indices.shape
        flat = indices.reshape(-1)                                                       # (N*K,)
        order = flat.argsort(stable=True)                                                # slots grouped by expert
        token = order // K                                                               # source token per slot
        counts = torch.bincount(flat, minlength=self.num_experts)                        # (E,)
        w_gu, w_down = self.gate_up_proj, self.down_proj
        autocast = torch.is_autocast_enabled(x.device.type)
        low = autocast or x.element_size() < 4                                           # bf16 / fp16 math
        if autocast:
            dt = torch.get_autocast_dtype(x.device.type)
            x, w_gu, w_down = x.to(dt), w_gu.to(dt), w_down.to(dt)    # cast the N tokens, not their N*K copies
        xs = x.index_select(0, token)                                                    # (N*K,H) grouped by expert
        if _use_grouped_mm(xs, w_gu, w_down):
            offs = counts.cumsum(0).to(torch.int32)
            gate, up = F.grouped_mm(xs, w_gu.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
            out = F.grouped_mm(F.silu(gate) * up, w_down.transpose(-2, -1), offs=offs)  # (N*K,H)
        elif low and counts.numel() * int(counts.max()) <= 1.6 * flat.numel():
            # bf16: padding pays while the busiest expert has < ~1.6x the mean load (measured crossover on CPU,
            # 16 experts x 256 tokens); in fp32 the per-expert loop below measured faster at every load
            out = _padded_bmm(xs, flat[order], counts, w_gu, w_down)
        elif low:
            out = _hybrid(xs, flat[order], counts, w_gu, w_down)
        else:
            # full precision: loop over experts on their contiguous slices. On CPU (16 experts x ~256 tokens, max
            # load 1.4x the mean) this measured 1.3x faster fwd+bwd than the padded bmm, and as fast as a fused op
            # with a hand-written backward (tried, not kept). unbind once: indexing w[e] per expert would make
            # autograd allocate a zero (E,...) gradient per expert (SelectBackward): 150 ms of a 470 ms step.
            pairs = zip(w_gu.unbind(0), w_down.unbind(0), xs.split(counts.tolist()))
            out = torch.cat([_swiglu(chunk, gu, down) for gu, down, chunk in pairs if chunk.shape[0]])
        # back to (token, k) order, then the weighted sum over each token's K experts (a gather instead of a
        # scatter-add; and mul+sum, as a (N,1,K)@(N,K,H) bmm runs N tiny matmuls in its CPU backward)
        slot = torch.empty_like(order)
        slot[order] = torch.arange(order.numel(), device=order.device)
        out = out.index_select(0, slot).view(N, K, -1)                                   # (N,K,H)
        return (out * weights.to(out.dtype)[..., None]).sum(dim=1)                       # (N,H)

    def forward_reference(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Slow, obviously-right path: every token through each of its K experts, one at a time."""
        out = torch.zeros_like(x)
        for n in range(x.shape[0]):
            for k in range(indices.shape[1]):
                e = int(indices[n, k])
                out[n] += weights[n, k].to(x.dtype) * _swiglu(x[n:n + 1], self.gate_up_proj[e],
                                                               self.down_proj[e])[0]
        return out


class MoE(nn.Module):
    """y = sum_k w_k * expert_k(x) + shared(x). Set `record_routing = True` to keep (scores, indices) of the last
    forward in `self.routing` for balance losses and load statistics (computed by the trainer, not here)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.record_routing = False
        self.routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])                                                  # (N,H)
        weights, indices, scores = self.gate(flat)
        if self.record_routing:
            self.routing = (scores.view(*shape[:-1], -1), indices.view(*shape[:-1], -1))
        y = self.experts(flat, indices, weights).view(shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y
