"""DeepSeekMoE: the V3/V2 gate, routed experts run grouped by expert, and shared experts.

Shapes: N tokens (B*T flattened), H hidden, E routed experts, K experts per token, I expert width, G groups.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.hardware import fast_autocast_dtype
from nanoseek.model.expert_ops import ExpertBatched, ExpertGrouped, ExpertLoop


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
            if self.topk_method == "noaux_tc":        # the sum of each group's top two: the sorted group's last
                top = grouped.sort(dim=-1).values           # two, added as topk's [first, second] (sort: 75 vs
                group_score = top[..., -1] + top[..., -2]   # topk's 169 us on bench_model's (1024, 4, 4))
            else:
                group_score = grouped.amax(dim=-1)                                      # (N,G)
            keep = group_score.topk(self.topk_group, dim=-1).indices                   # (N,topk_group)
            dropped = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)   # (N,G)
            choice = grouped.masked_fill(dropped[..., None], float("-inf")).view(N, E)  # broadcast over members
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
    """torch's grouped GEMM (`F.grouped_mm`) for CUDA bf16 (SM80+ kernels) and CPU fp32, where torch runs the
    groups' matmuls from C++. On a 2-core AVX2 EPYC the whole bench_model fp32 training step measured 3-11% faster
    than ExpertLoop's Python loop (six interleaved A/B runs, torch 2.13 and 2.14; RESULTS.md 2026-12-01), and 6%
    on a 2-core AVX512-BF16 EPYC (546.5 vs 582.6 ms). CPU bf16 keeps the padded batched matmuls (on that machine
    the bf16 step took 510.9 ms with them, 681.1 with grouped_mm), and fp64 (which grouped_mm does not take) and
    compiled CPU code the loop.
    Strides must be multiples of 16 bytes."""
    if not hasattr(F, "grouped_mm"):
        return False
    if not ((x.is_cuda and x.dtype == torch.bfloat16) or (x.device.type == "cpu" and x.dtype == torch.float32)):
        return False
    if not x.is_cuda and torch.compiler.is_compiling():
        return False        # torch 2.14's meta kernel for grouped_mm takes bf16/fp16 only: fp32 fails to trace
    align = 16 // x.element_size()
    return all(w.shape[-1] % align == 0 and w.shape[-2] % align == 0 for w in weights)


def _swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, scale: torch.Tensor | None = None):
    """One expert: x (n,H), w_gate_up (2I,H), w_down (H,I), scale (n,) routing weights or None -> (n,H).
    The routing weight scales the (n,I) activation, not the (n,H) output: half the elements, fwd and bwd."""
    gate, up = (x @ w_gate_up.t()).chunk(2, dim=-1)
    h = F.silu(gate) * up
    return (h if scale is None else h * scale[:, None]) @ w_down.t()


class Experts(nn.Module):
    """E routed SwiGLU experts stored stacked: gate_up_proj (E, 2I, H) = [gate; up], down_proj (E, H, I)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.intermediate = E, I
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N,H), indices/weights (N,K) -> (N,H). Token slots are sorted by expert and run as grouped (CUDA
        bf16, CPU fp32), padded-batched or per-expert matmuls on contiguous slices (model.expert_ops): never a
        Python loop over tokens. The routing weight scales each slot's (I,) activation before the down projection."""
        K = indices.shape[1]
        flat = indices.reshape(-1)                                                       # (N*K,)
        order = flat.argsort(stable=True)                                                # slots grouped by expert
        token = order // K                                                               # source token per slot
        counts = torch.bincount(flat, minlength=self.num_experts)                        # (E,)
        w_gu, w_down = self.gate_up_proj, self.down_proj
        dt = fast_autocast_dtype(x.device.type)             # None: no autocast, or a CPU without hardware bf16
        if dt is not None:
            x, w_gu, w_down = x.to(dt), w_gu.to(dt), w_down.to(dt)    # cast the N tokens, not their N*K copies
        low = x.element_size() < 4                                                       # bf16 / fp16 math
        scale = weights.reshape(-1).index_select(0, order).to(x.dtype)                   # (N*K,) routing weights
        if not _use_grouped_mm(x, w_gu, w_down):
            # bf16 on CPU: batched matmuls over padded blocks (bmm ran 1.3-1.5x the loop's GFLOP/s; bench_model bf16
            # 1.32x -> 1.40x transformers). fp64, fp32 on CUDA and unaligned shapes: expert by expert (padding
            # measured 1.07-1.09x against the loop's 1.15x in fp32). Both gather and sum back themselves.
            op = ExpertBatched if low else ExpertLoop
            return op.apply(x, token, w_gu, w_down, scale, counts.tolist())             # (N,H)
        # CUDA bf16 and CPU fp32: grouped GEMMs over the slots, SwiGLU and the routing weight between them, each
        # token's K weighted expert outputs summed back in token order by an index_add (backward: one gather).
        return ExpertGrouped.apply(x, token, w_gu, w_down, scale, counts.cumsum(0).to(torch.int32))   # (N,H)

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
