"""Multi-head Latent Attention (DeepSeek-V2/V3), with two paths that check each other.

Shapes: B batch, T new tokens, S keys (cached + new), nh heads, dn = qk_nope_head_dim, dr = qk_rope_head_dim,
dv = v_head_dim, r = kv_lora_rank.

- expanded (`absorb=False`): decompress the latent into per-head K/V with kv_b_proj and run SDPA. The readable
  path, and the fast one for training and prefill (one big matmul per layer).
- absorbed (`absorb=True`): fold kv_b_proj's K rows into the query and its V rows after attention, so attention
  runs directly on the cached latent c (r) and rotated k_pe (dr): 576 values per token per layer for V3.
  The fast path for decoding (T small, S large).
Both read and write the same latent cache, so a prefill through one and decode through the other is exact.
CPU fp32 training (no cache, no mask) runs the expanded path as one autograd op with a hand-written backward
(model.mla_fused): the same values, fewer passes over memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.mla_fused import fused_mla, fused_mla_supported
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import apply_rope

FUSED_TRAINING = True   # CPU fp32 training through model.mla_fused (False: autograd over the modules, the reference)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.nh, self.dn, self.dr, self.dv = (cfg.num_attention_heads, cfg.qk_nope_head_dim,
                                              cfg.qk_rope_head_dim, cfg.v_head_dim)
        self.r = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        self.softmax_scale = cfg.softmax_scale
        qk = self.dn + self.dr
        H = cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(H, self.nh * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.nh * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.r + self.dr, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.r, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.r, self.nh * (self.dn + self.dv), bias=False)  # rows head-major: dn then dv
        self.o_proj = nn.Linear(self.nh * self.dv, H, bias=cfg.attention_bias)

    def _fusable_down_projections(self) -> bool:
        """q_a and kv_a are plain bias-free linears (not swapped for float8 or other modules, whose forward a
        concatenated weight would bypass)."""
        return (self.q_lora_rank is not None and type(self.q_a_proj) is nn.Linear
                and type(self.kv_a_proj_with_mqa) is nn.Linear
                and self.q_a_proj.bias is None and self.kv_a_proj_with_mqa.bias is None)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B,T,H) -> q_nope (B,T,nh,dn), q_pe (B,T,nh,dr) rotated, latent c (B,T,r) normed, k_pe (B,T,dr) rotated."""
        B, T, _ = x.shape
        if torch.is_grad_enabled() and self._fusable_down_projections():
            # training: both down-projections of x as one matmul (one read and one autocast cast of x, one
            # matmul for dL/dx instead of two plus an add; attention block fwd+bwd 2-4% faster, A/B). Inference
            # keeps two: concatenating the weights at every decode step would cost more than it saves there.
            w = torch.cat([self.q_a_proj.weight, self.kv_a_proj_with_mqa.weight])
            q_a, c, k_pe = F.linear(x, w).split([self.q_lora_rank, self.r, self.dr], dim=-1)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        else:
            q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
            c, k_pe = self.kv_a_proj_with_mqa(x).split([self.r, self.dr], dim=-1)
        q = q.view(B, T, self.nh, self.dn + self.dr)
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin), self.kv_a_layernorm(c), apply_rope(k_pe, cos, sin)

    def forward(self, x, cos, sin, cache=None, absorb: bool = False, attn_mask: torch.Tensor | None = None):
        """x (B,T,H); cache: a LatentCache (this layer's slot is written and read); attn_mask (B,1,T,S) bool or None.

        Without a mask, attention is causal with the T new queries at the end of the S keys.
        """
        if (FUSED_TRAINING and cache is None and attn_mask is None and not absorb and torch.is_grad_enabled()
                and fused_mla_supported(self, x)):
            return fused_mla(self, x, cos, sin)                       # the same values, one autograd op
        q_nope, q_pe, c, k_pe = self.project(x, cos, sin)
        if cache is not None:
            c, k_pe = cache.update(self.layer_idx, c, k_pe)          # (B,S,r), (B,S,dr): prefix + new
        if absorb:
            out = self._absorbed(q_nope, q_pe, c, k_pe, attn_mask)
        else:
            out = self._expanded(q_nope, q_pe, c, k_pe, attn_mask)
        return self.o_proj(out.flatten(2))                            # (B,T,nh*dv) -> (B,T,H)

    def _expanded(self, q_nope, q_pe, c, k_pe, attn_mask):
        B, T, nh, _ = q_nope.shape
        S = c.shape[1]
        kv = self.kv_b_proj(c).view(B, S, nh, self.dn + self.dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        # the concatenations write q and k head-major, (B,nh,T,d) contiguous, at no extra cost: SDPA's CPU flash
        # kernel runs faster on that layout than on (B,T,nh,d) transposed views (the whole bench_model step
        # 1.7-3.1% faster, three interleaved A/Bs; the same gradients bit for bit)
        q = torch.cat([q_nope.transpose(1, 2), q_pe.transpose(1, 2)], dim=-1)            # (B,nh,T,dn+dr)
        k = torch.cat([k_nope.transpose(1, 2), k_pe[:, None].expand(B, nh, S, self.dr)], dim=-1)
        v = v.transpose(1, 2)                                                           # (B,nh,S,dv)
        dtype = q.dtype
        if not q.is_cuda:
            # CPU: SDPA's flash kernel needs equal q/k and v widths and is fastest in fp32; the math fallback
            # for dv < dn+dr was 2.7x slower fwd+bwd (fp32) and bf16 flash 1.7x slower than fp32 flash here.
            q, k, v = q.float(), k.float(), v.float()
        dv = v.shape[-1]
        if dv < q.shape[-1]:
            v = F.pad(v, (0, q.shape[-1] - dv))        # zero columns: the extra outputs are sliced off below
        mask = None if attn_mask is None and T == S else (
            attn_mask if attn_mask is not None else causal_mask(T, S, q.device))
        # autocast would cast q/k/v back to bf16 inside SDPA; the dtype was chosen above
        with torch.autocast(q.device.type, enabled=q.is_cuda and torch.is_autocast_enabled(q.device.type)):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               scale=self.softmax_scale)
        return o[..., :dv].transpose(1, 2).to(dtype)                                    # (B,T,nh,dv)

    def _absorbed(self, q_nope, q_pe, c, k_pe, attn_mask):
        B, T, nh, _ = q_nope.shape
        S = c.shape[1]
        w = self.kv_b_proj.weight.view(nh, self.dn + self.dv, self.r)
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn:]                                    # (nh,dn,r), (nh,dv,r)
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)                            # (B,T,nh,r)
        scores = (torch.einsum("bthc,bsc->bhts", q_lat.float(), c.float())
                  + torch.einsum("bthd,bsd->bhts", q_pe.float(), k_pe.float())) * self.softmax_scale
        mask = attn_mask if attn_mask is not None else causal_mask(T, S, scores.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        p = scores.softmax(dim=-1)                                                      # fp32 softmax
        o_lat = torch.einsum("bhts,bsc->bthc", p, c.float()).to(q_nope.dtype)           # (B,T,nh,r)
        return torch.einsum("bthc,hdc->bthd", o_lat, w_uv)                              # (B,T,nh,dv)


def causal_mask(T: int, S: int, device) -> torch.Tensor:
    """(T,S) bool: new query i (absolute position S-T+i) sees keys 0..S-T+i."""
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    return torch.arange(S, device=device)[None, :] <= q_pos
