"""The DeepSeek-V3/V2 decoder: embedding, blocks of MLA + (dense SwiGLU | DeepSeekMoE), final norm, head, and the
Multi-Token Prediction modules. Single-device PyTorch only: no optimizer, I/O or distributed code here.

Parameter names are the Hugging Face / DeepSeek checkpoint names, except that routed experts are stacked
(`mlp.experts.gate_up_proj` (E,2I,H), `mlp.experts.down_proj` (E,H,I)) and MTP module k lives at `mtp.{k}`
(checkpoint `model.layers.{num_hidden_layers + k}`), sharing the main embedding and head.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.mla import MLA
from nanoseek.model.moe import MLP, Experts, Gate, MoE
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    """h += MLA(RMSNorm(h)); h += FFN(RMSNorm(h)), FFN dense for the first k layers and MoE after."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(cfg, layer_idx)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, cache=None, absorb=False, attn_mask=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, absorb, attn_mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class SharedHead(nn.Module):
    """MTP's output norm; the projection is the main lm_head (shared, as in the V3 report)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(DecoderLayer):
    """Depth-k MTP: x = eh_proj([enorm(embed(t_{i+k})); hnorm(h^{k-1}_i)]) -> a full decoder layer -> h^k_i;
    logits = lm_head(shared_head.norm(h^k_i)) predict t_{i+k+1}."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)   # embedding half first
        self.shared_head = SharedHead(cfg)

    def forward(self, h_prev, emb, cos, sin, cache=None, absorb=False, attn_mask=None):
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return super().forward(x, cos, sin, cache, absorb, attn_mask)


class DeepseekModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)

    def forward(self, input_ids, positions, cache=None, absorb=False, attn_mask=None):
        """input_ids (B,T), positions (B,T) or (T,) -> final-normed hidden states (B,T,H)."""
        cos, sin = self.rotary(positions)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, cache, absorb, attn_mask)
        return self.norm(h)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None                             # (B,T,V) main head; None when compute_logits=False
    hidden: torch.Tensor                                    # (B,T,H) final-normed hidden states
    mtp_logits: list[torch.Tensor] = field(default_factory=list)   # depth k: (B,T,V), position i predicts t_{i+k+1}
    mtp_hidden: list[torch.Tensor] = field(default_factory=list)   # depth k: (B,T,H), the input of lm_head


class DeepseekForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DeepseekModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        L = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(MTPModule(cfg, L + k) for k in range(cfg.num_nextn_predict_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                absorb: bool = False, attn_mask: torch.Tensor | None = None, return_mtp: bool = False,
                return_hidden: bool = False, compute_logits: bool = True):
        """input_ids (B,T) -> logits (B,T,V); or a ModelOutput when return_mtp / return_hidden / not
        compute_logits.

        cache: a LatentCache; positions default to continuing it. absorb: use the absorbed MLA path.
        compute_logits=False skips the vocabulary projection: the output holds the head's inputs (`hidden`,
        `mtp_hidden`) for a loss that applies lm_head itself, chunk by chunk (train.losses with head_weight).
        """
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        hidden = self.model(input_ids, positions, cache, absorb, attn_mask)
        if compute_logits and not (return_mtp or return_hidden):
            return self.lm_head(hidden)
        out = ModelOutput(logits=self.lm_head(hidden) if compute_logits else None, hidden=hidden)
        if return_mtp:
            out.mtp_hidden = self.mtp_hidden(hidden, input_ids, positions)
            if compute_logits:
                out.mtp_logits = [self.lm_head(h) for h in out.mtp_hidden]
        return out

    def mtp_hidden(self, hidden: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor) -> list:
        """Training-time MTP over a whole sequence: depth k sees t_{i+k} (ids shifted left by k; the last k
        positions see padding and have no target) and predicts t_{i+k+1}. Returns each depth's normed hidden
        states, the input of the shared lm_head."""
        cos, sin = self.model.rotary(positions)
        out, h = [], hidden
        for k, module in enumerate(self.mtp, start=1):
            ids_k = F.pad(input_ids[:, k:], (0, k), value=0)                          # (B,T)
            h = module(h, self.model.embed_tokens(ids_k), cos, sin)
            out.append(module.shared_head.norm(h))
        return out

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Normal(0, initializer_range) for matrices and embeddings, ones for norms, zero balancing bias."""
        std = self.config.initializer_range
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, Gate):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                if hasattr(module, "e_score_correction_bias"):
                    module.e_score_correction_bias.zero_()
            elif isinstance(module, Experts):
                for p in (module.gate_up_proj, module.down_proj):
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]


def build_model(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> DeepseekForCausalLM:
    """A freshly initialized model (MTP modules included when cfg.num_nextn_predict_layers > 0)."""
    model = DeepseekForCausalLM(cfg)
    model.init_weights(seed)
    return model.to(device=device, dtype=dtype)
