"""Model execution for the engine: batches of (sequence, start position, new tokens) through the unchanged model.

A step's sequences are padded into one (B,T) batch. The model's MLA layers get a CacheView as their `cache`: it
writes the new latents into each sequence's blocks and hands back its whole context gathered into a padded
(B,S,...) view, with an attention mask (B,1,T,S) that lets query position p see keys 0..p of its own sequence.
Prefill chunks run the expanded MLA path (one big kv_b_proj matmul, SDPA); decode and speculative verification
(T = 1 + k) run the absorbed path straight on the latent cache.

Decode writes DecoderLayer.forward out so the MoE can take a decode path (`moe_decode`): on CPU, one token runs
its K experts directly; on CUDA and under torch.compile (`compile=True`), `moe_static` runs with no host sync,
so the step is one static graph. On the CPU measured here (2 cores, torch 2.13, inductor C++ backend) the
compiled step is ~2x faster than eager at batch 1 (benchmarks/RESULTS.md), but each of its (at most three)
graphs takes ~20 s to compile on first use, so compile is opt-in: worth it for serving and long generations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoseek.errors import ConfigError
from nanoseek.inference.block_manager import CacheView, PagedLatentCache
from nanoseek.inference.sequence import Sequence
from nanoseek.model.moe import MoE, _swiglu


@dataclass
class Batch:
    ids: torch.Tensor           # (B,T) token ids, 0 in padding
    positions: torch.Tensor     # (B,T) absolute positions, 0 in padding
    slots: torch.Tensor         # (B,T) cache slot to write; scratch slot 0 in padding
    gather: torch.Tensor        # (B,S) cache slot of key position j
    mask: torch.Tensor          # (B,1,T,S) bool: query may attend key
    lens: list[int]             # valid new tokens per row


def moe_static(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """MoE forward without host syncs, for decode-sized batches. x (B,T,H) -> (B,T,H); same math as MoE.forward
    (held equal by tests/test_engine.py)."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])                                                     # (N,H)
    weights, indices, _ = moe.gate(flat)                                                # (N,K) fp32, (N,K)
    ex = moe.experts
    N, K = indices.shape
    E = ex.num_experts
    w_gu, w_down = ex.gate_up_proj, ex.down_proj                                        # (E,2I,H), (E,H,I)
    if x.is_cuda and N * K >= E:           # (device first: a test of N alone would split the compiled graph)
        # CUDA, most experts hit: run all of them on every token (reads each expert's weights once; the gather
        # below would copy N*K experts' weights). On CPU inductor fuses the gather into the matmuls, and that
        # measured 2.2x faster than this dense form at 16 tokens (7 MoE layers of the bench model: 3.6 vs 7.8 ms),
        # 1.9x at 256
        gate, up = torch.einsum("nh,eih->nei", flat, w_gu).chunk(2, dim=-1)             # (N,E,I) x2
        y = torch.einsum("nei,ehi->neh", F.silu(gate) * up, w_down)                     # (N,E,H)
        route = torch.zeros(N, E, dtype=weights.dtype, device=x.device).scatter_(1, indices, weights)
        out = torch.einsum("ne,neh->nh", route.to(y.dtype), y)
    elif N == 1:                           # (a size-1 dim is specialized: a static test, no guard)
        gate, up = torch.einsum("nh,nkih->nki", flat, w_gu[indices]).chunk(2, dim=-1)   # (N,K,I) x2
        y = torch.einsum("nki,nkhi->nkh", F.silu(gate) * up, w_down[indices])           # (N,K,H)
        out = torch.einsum("nk,nkh->nh", weights.to(y.dtype), y)
    else:
        # CPU, several tokens: the same gather over the N*K slots sorted by expert, so consecutive slots read
        # the same expert's weights while they are in cache (batch-16 decode step 8.83 -> 8.37 ms, A/B in one
        # process); the weighted outputs are summed back per token by index_add
        slots = indices.reshape(-1)                                                     # (N*K,)
        order = slots.argsort()
        expert, token = slots[order], order // K
        gate, up = torch.einsum("sh,sih->si", flat[token], w_gu[expert]).chunk(2, dim=-1)   # (N*K,I) x2
        h = F.silu(gate) * up * weights.reshape(-1)[order, None].to(gate.dtype)
        out = torch.zeros_like(flat).index_add_(0, token, torch.einsum("si,shi->sh", h, w_down[expert]))
    out = out.view(shape)
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x)
    return out


def moe_decode(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The decode-step MoE. CUDA, and inside a compiled step: `moe_static` (no host sync, so the step is one
    graph; on CPU it always gathers, so the batch size picks no branch: the compiled step has batch 1's graph and
    inductor's, at most three). Eager CPU, where a host sync is free: one token runs its K experts
    straight from the stacked weights (no gather copy, no sort); more tokens take the model's own sort-by-expert
    dispatch, which reads each active expert once."""
    if x.is_cuda or torch.compiler.is_compiling():
        return moe_static(moe, x)
    if x.shape[0] * x.shape[1] > 1:
        return moe(x)
    flat = x.reshape(1, -1)                                                             # (1,H)
    weights, indices, _ = moe.gate(flat)                                                # (1,K)
    ex = moe.experts
    out = sum(w * _swiglu(flat, ex.gate_up_proj[e], ex.down_proj[e])
              for w, e in zip(weights[0].to(x.dtype).unbind(), indices[0].tolist()))
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(flat)
    return out.view(x.shape)


def _decode_mm(fallback, a: torch.Tensor, b: torch.Tensor):
    """aten.mm in the compiled CPU decode step: a single-row product (batch 1: every linear, and the head) as
    multiply + sum. BLAS (MKL here) runs (1,K) x (K,N) on one thread, and with the step's ~28 MB of weights out of
    cache it read the 8192 x 256 head at ~8 GB/s: 1.0 ms of a 4.1 ms step. Inductor turns the multiply + sum into
    a reduction kernel split over the cores and fused with its neighbours: 0.28 ms for that head, measured cold."""
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    if a.device.type == "cpu" and a.dtype == b.dtype and guard_or_false(a.shape[0] == 1):
        return (a.squeeze(0)[:, None] * b).sum(0, keepdim=True)                           # (1,N)
    return fallback(a, b) if fallback is not None else NotImplemented


def _compile_decode_step(gm, example_inputs):
    """torch.compile backend of the decode step: inductor, with its C++ wrapper (kernel launches run from C++
    rather than a Python wrapper) and its linears rewritten for few rows (_decode_mm)."""
    import functools

    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = dict(select_decomp_table())
    mm = torch.ops.aten.mm.default
    table[mm] = functools.partial(_decode_mm, table.get(mm))
    return compile_fx(gm, example_inputs, config_patches={"cpp_wrapper": True}, decompositions=table)


class ModelRunner:
    def __init__(self, model, cache: PagedLatentCache, pending_copies: list[tuple[int, int]],
                 compile: bool = False):
        self.model = model
        self.pending_copies = pending_copies        # the block manager's copy-on-write queue (src, dst)
        self.cfg = model.config
        self.cache = cache
        self.device = next(model.parameters()).device
        self._step_logits: torch.Tensor | None = None   # (B,T,V) of the last decode step
        self.block_size = cache.block_size
        self._decode = self._decode_eager
        if compile:
            if not torch._dynamo.is_dynamo_supported():
                raise ConfigError("compile=True: torch.compile is not supported on this platform; drop the option")
            # dynamic=True: batch size and context length change every step; one graph serves them all
            # cpp_wrapper (see _compile_decode_step) and the guard filter, which drops per-call checks of ~300
            # parameters (weights are updated in place, as GRPO's optimizer does,
            # never swapped for tensors of another shape). Both measured: 2.46x -> 2.81x transformers at batch 1.
            self._decode = torch.compile(self._decode_eager, dynamic=True, backend=_compile_decode_step, options={
                "guard_filter_fn": torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe})

    # ----- batch layout -----
    def make_batch(self, chunks: list[tuple[Sequence, int, list[int]]]) -> Batch:
        """chunks: (seq, start position, token ids at start, start+1, ...) -> padded Batch. Built from Python lists
        with one tensor per field (a tensor per row cost ~30 us each: 1 ms a step at batch 32)."""
        lens = [len(toks) for _, _, toks in chunks]
        starts = [start for _, start, _ in chunks]
        T = max(lens)
        S = max(st + n for st, n in zip(starts, lens))
        bs = self.block_size
        nb = -(-S // bs)
        ids = torch.tensor([toks + [0] * (T - n) for (_, _, toks), n in zip(chunks, lens)], dtype=torch.long)
        table = torch.tensor([(seq.block_table + [0] * nb)[:nb] for seq, _, _ in chunks],   # scratch block 0
                             dtype=torch.long)                                                  # (B,nb)
        B = len(chunks)
        steps = torch.arange(T)
        valid = steps[None, :] < torch.tensor(lens)[:, None]                                    # (B,T)
        pos = torch.where(valid, torch.tensor(starts)[:, None] + steps[None, :], 0)             # (B,T)
        gather = (table[:, :, None] * bs + torch.arange(bs)).reshape(B, nb * bs)[:, :S].contiguous()   # (B,S)
        slots = torch.where(valid, gather.gather(1, pos), 0)
        mask = torch.arange(S)[None, None, :] <= pos[:, :, None]                                # (B,T,S)
        dev = self.device
        return Batch(ids.to(dev), pos.to(dev), slots.to(dev), gather.to(dev), mask[:, None].to(dev), lens)

    # ----- forwards -----
    @torch.no_grad()
    def forward(self, batch: Batch, absorb: bool) -> torch.Tensor:
        """Main model -> final-normed hidden states (B,T,H). A decode step also computes every position's logits
        inside the (possibly compiled) step; `logits_at` then picks rows from them."""
        self._copy_pending()
        self._step_logits = None
        if absorb:
            hidden, self._step_logits = self._decode(batch.ids, batch.positions, batch.slots, batch.gather,
                                                     batch.mask, self.cache.kv)
            return hidden
        view = self.cache.view(batch.slots, batch.gather)
        return self.model.model(batch.ids, batch.positions, view, False, batch.mask)

    @torch.no_grad()
    def logits_at(self, hidden: torch.Tensor, b: list[int], t: list[int]) -> torch.Tensor:
        """fp32 logits (R,V) of positions (b[i], t[i]) of the last forward's hidden states (B,T,H)."""
        if self._step_logits is not None:
            if t.count(0) == len(t) == self._step_logits.shape[0] and b == list(range(len(b))):
                return self._step_logits[:, 0]                 # a plain decode step: every row, in order
            return self._step_logits[torch.tensor(b), torch.tensor(t)]
        return self.logits(hidden[torch.tensor(b), torch.tensor(t)])

    def _decode_eager(self, ids, positions, slots, gather, mask, kv):
        """The decode step: DecoderLayer.forward written out so the MoE can take its static path, and the head
        inside it (a separate head call after a compiled step measured 1 ms at batch 1, ~4x its cost in the graph).
        -> (final-normed hidden (B,T,H), fp32 logits (B,T,V))."""
        m = self.model.model
        cos, sin = m.rotary(positions)
        view = CacheView(kv, self.cache.r, slots, gather)
        h = m.embed_tokens(ids)
        for layer in m.layers:
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, view, True, mask)
            x = layer.post_attention_layernorm(h)
            h = h + (moe_decode(layer.mlp, x) if isinstance(layer.mlp, MoE) else layer.mlp(x))
        h = m.norm(h)
        B, T, H = h.shape
        if T == 1 and B > 1:
            # (W @ h.T).T: a few rows times the transposed head runs far below bandwidth in BLAS (MKL) with the
            # weights out of cache; the big operand first measured 1.6 -> 0.86 ms at 16 rows (8192 x 256, cold)
            logits = (self.model.lm_head.weight @ h.view(B, H).t()).t().reshape(B, 1, -1)
        else:
            logits = self.model.lm_head(h)
        return h, logits.float()

    @torch.no_grad()
    def forward_mtp(self, depth: int, h_prev: torch.Tensor, batch: Batch, absorb: bool) -> torch.Tensor:
        """MTP module `depth` (0-based) at batch.positions: h_prev (B,T,H) from the main model (or the previous
        draft step), batch.ids the next tokens -> h (B,T,H) before the shared head's norm."""
        self._copy_pending()
        module = self.model.mtp[depth]
        cos, sin = self.model.model.rotary(batch.positions)
        emb = self.model.model.embed_tokens(batch.ids)
        view = self.cache.view(batch.slots, batch.gather)
        return module(h_prev, emb, cos, sin, view, absorb, batch.mask)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) final-normed -> (..., V) fp32."""
        return self.model.lm_head(hidden).float()

    @torch.no_grad()
    def mtp_logits(self, depth: int, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.mtp[depth].shared_head.norm(h)).float()

    def _copy_pending(self) -> None:
        if self.pending_copies:
            self.cache.copy_blocks(self.pending_copies)
            self.pending_copies.clear()
