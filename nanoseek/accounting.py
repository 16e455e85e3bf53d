"""Parameters, activated parameters, FLOPs per token and KV-cache bytes per token: pure functions of a ModelConfig.

Counts follow the module shapes under their HF / DeepSeek checkpoint names (see DESIGN.md section 3), so
`count_params(cfg).total + .mtp` equals the numel of nanoseek's own model (which shares the embedding and head
between the main model and MTP) and the published sizes come out:
  V3 / R1:  671.0B total, 36.6B activated ("37B"), MTP 11.6B unique, 13.5B with its embedding/head copies
            (the checkpoint's 685B = 671.0 + 13.5).
  V2-Lite:  15.7B total, 2.45B activated ("2.4B").

Conventions (the papers'): "activated" is per token and leaves out the input-embedding lookup (a gather, no
FLOPs) but keeps the output head; MTP is reported apart from the main model. The noaux_tc balancing bias
`e_score_correction_bias` is a buffer (moved by the aux-loss-free update, never by gradients) and nanoseek
registers it as one, so it is not a parameter here either; `ParamCount.buffers` reports it (15K for V3).
"""
from __future__ import annotations

from dataclasses import dataclass

from nanoseek.config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts. Breakdown fields cover the main model (MTP excluded) and sum to `total`."""

    embedding: int          # embed_tokens (V x H)
    attention: int          # MLA projections and their q_a/kv_a norms, all layers
    norms: int              # input/post-attention layernorms of every layer + the final norm
    dense_mlp: int          # SwiGLU of the first_k_dense_replace layers
    router: int             # MoE gate weights (E x H per MoE layer)
    routed_experts: int     # all E routed experts of every MoE layer
    shared_experts: int     # shared expert SwiGLUs
    head: int               # lm_head (0 when tied to the embedding)
    total: int              # main model: embedding + layers + final norm + head
    activated: int          # per token: total - embedding - the routed experts a token does not visit
    routed_activated: int   # num_experts_per_tok experts of every MoE layer (part of `activated`)
    mtp: int                # unique MTP params, all depths: enorm, hnorm, eh_proj, decoder layer, shared_head.norm
    mtp_with_copies: int    # mtp + each depth's copies of embed_tokens and shared_head.head, as the checkpoint stores
    mtp_activated: int      # per token per pass through all depths, embedding lookup excluded, head included
    buffers: int            # e_score_correction_bias elements (main + MTP), not counted above


def _attention(cfg: ModelConfig) -> int:
    """One MLA block. Biases only where the model has them (q_a, kv_a, o when attention_bias), as HF does."""
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    bias = cfg.attention_bias
    if cfg.q_lora_rank:
        r_q = cfg.q_lora_rank
        n = r_q * H + bias * r_q            # q_a_proj
        n += r_q                            # q_a_layernorm
        n += nh * cfg.qk_head_dim * r_q     # q_b_proj
    else:
        n = nh * cfg.qk_head_dim * H        # q_proj
    n += cfg.latent_dim * H + bias * cfg.latent_dim                     # kv_a_proj_with_mqa
    n += cfg.kv_lora_rank                                               # kv_a_layernorm
    n += nh * (cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank  # kv_b_proj
    n += H * nh * cfg.v_head_dim + bias * H                             # o_proj
    return n


def _swiglu(hidden: int, inner: int) -> int:
    return 3 * hidden * inner                 # gate_proj, up_proj, down_proj


def _layer(cfg: ModelConfig, idx: int) -> dict[str, int]:
    """Parameters of decoder layer `idx` by kind; MTP layers (idx >= num_hidden_layers) use the same rule."""
    H = cfg.hidden_size
    d = dict(attention=_attention(cfg), norms=2 * H, dense_mlp=0, router=0, routed_experts=0,
             routed_activated=0, shared_experts=0, buffers=0)
    if cfg.is_moe_layer(idx):
        E, one = cfg.n_routed_experts, _swiglu(H, cfg.moe_intermediate_size)
        d["router"] = E * H
        d["routed_experts"] = E * one
        d["routed_activated"] = cfg.num_experts_per_tok * one
        d["shared_experts"] = _swiglu(H, cfg.n_shared_experts * cfg.moe_intermediate_size)
        d["buffers"] = E if cfg.topk_method == "noaux_tc" else 0
    else:
        d["dense_mlp"] = _swiglu(H, cfg.intermediate_size)
    return d


def _mtp_depth(cfg: ModelConfig, k: int) -> tuple[dict[str, int], int]:
    """(decoder-layer breakdown, extra params: enorm + hnorm + eh_proj + shared_head.norm) of MTP depth k (0-based)."""
    H = cfg.hidden_size
    return _layer(cfg, cfg.num_hidden_layers + k), 2 * H + 2 * H * H + H


def count_params(cfg: ModelConfig) -> ParamCount:
    """Exact parameter counts of `cfg` (see the module docstring for the conventions)."""
    H, V = cfg.hidden_size, cfg.vocab_size
    sums = dict(attention=0, norms=H, dense_mlp=0, router=0, routed_experts=0, routed_activated=0,
                shared_experts=0, buffers=0)          # norms starts with the final norm
    for i in range(cfg.num_hidden_layers):
        for key, n in _layer(cfg, i).items():
            sums[key] += n
    embedding = V * H
    head = 0 if cfg.tie_word_embeddings else V * H
    layers = sum(sums[k] for k in ("attention", "norms", "dense_mlp", "router", "routed_experts", "shared_experts"))
    total = embedding + layers + head
    activated = total - embedding - sums["routed_experts"] + sums["routed_activated"]
    if cfg.tie_word_embeddings:
        activated += V * H      # the tied matrix still does the head's matmul for every token

    mtp = mtp_activated = 0
    buffers = sums["buffers"]
    for k in range(cfg.num_nextn_predict_layers):
        lay, extra = _mtp_depth(cfg, k)
        unique = extra + sum(lay[key] for key in ("attention", "norms", "dense_mlp", "router", "routed_experts",
                                                  "shared_experts"))
        mtp += unique
        mtp_activated += unique - lay["routed_experts"] + lay["routed_activated"] + V * H   # + its head matmul
        buffers += lay["buffers"]
    # DeepSeek's checkpoint stores an embed_tokens and a shared_head.head copy inside every MTP layer.
    mtp_with_copies = mtp + cfg.num_nextn_predict_layers * 2 * V * H
    return ParamCount(embedding=embedding, attention=sums["attention"], norms=sums["norms"],
                      dense_mlp=sums["dense_mlp"], router=sums["router"], routed_experts=sums["routed_experts"],
                      shared_experts=sums["shared_experts"], head=head, total=total, activated=activated,
                      routed_activated=sums["routed_activated"], mtp=mtp, mtp_with_copies=mtp_with_copies,
                      mtp_activated=mtp_activated, buffers=buffers)


@dataclass(frozen=True)
class FlopCount:
    """Matmul FLOPs per token, by part; each field already includes the training multiplier, and they sum to total."""

    attention_proj: int     # MLA projections (q, kv_a, kv_b, o)
    attention_scores: int   # QK^T and softmax(.)V against the causal context
    dense_mlp: int
    moe: int                # router + the num_experts_per_tok routed experts + shared experts
    head: int               # lm_head
    mtp: int                # all MTP depths (eh_proj, layer, scores, head); 0 unless mtp=True
    total: int
    multiplier: int         # 3 for training (forward + backward = 2x forward), 1 for a forward pass


def _matmul_weights(lay: dict[str, int], cfg: ModelConfig) -> tuple[int, int, int]:
    """(attention, dense, moe) matmul weights per token of one layer. The RMSNorm weights inside MLA
    (q_a_layernorm, kv_a_layernorm) are elementwise, not matmuls, so they are left out."""
    attn_norms = (cfg.q_lora_rank or 0) + cfg.kv_lora_rank
    moe = lay["router"] + lay["routed_activated"] + lay["shared_experts"]
    return lay["attention"] - attn_norms, lay["dense_mlp"], moe


def _score_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Forward attention FLOPs per token per layer: 2*nh*(qk_head_dim + v_head_dim) * seq_len/2."""
    return cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True, mtp: bool = False) -> FlopCount:
    """Matmul FLOPs per token for sequences of `seq_len` tokens (causal), the count MFU is measured in.

    forward = 2 * W + L * nh * (qk_head_dim + v_head_dim) * seq_len, where
      W = matmul weights a token passes through: activated params minus the RMSNorm weights (elementwise);
          2 FLOPs (multiply + add) per weight; the input embedding is a lookup and costs nothing.
      the second term is attention over the causal context: QK^T costs 2*nh*qk_head_dim per (query, key) pair
          and softmax(.)V 2*nh*v_head_dim; a causal query sees seq_len/2 keys on average, so per token and layer
          2*nh*(qk_head_dim + v_head_dim)*seq_len/2 (FlashAttention's causal count: half of 4*T^2*nh*d per
          sequence when qk_head_dim = v_head_dim = d). This is the expanded (training) form of MLA with
          qk_head_dim = 192, v_head_dim = 128 for V3; absorbed decoding trades it for other matmuls.
    training: x3 (the backward pass costs twice the forward: grads of activations and of weights).
    mtp: add the MTP depths (eh_proj, their decoder layer and attention scores, and the shared head's matmul),
        which V3 runs on every training token; they are not used by ordinary inference.
    Softmax, norms, RoPE, SwiGLU's elementwise product and routing top-k are not matmuls and are left out
    (< 1% for V3).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    mult = 3 if training else 1
    attn_proj = dense = moe = scores = 0
    for i in range(cfg.num_hidden_layers):
        a, d, m = _matmul_weights(_layer(cfg, i), cfg)
        attn_proj, dense, moe = attn_proj + 2 * a, dense + 2 * d, moe + 2 * m
        scores += _score_flops(cfg, seq_len)
    head = 2 * cfg.vocab_size * cfg.hidden_size
    mtp_flops = 0
    if mtp:
        for k in range(cfg.num_nextn_predict_layers):
            lay, _ = _mtp_depth(cfg, k)
            a, d, m = _matmul_weights(lay, cfg)
            eh_proj = 2 * cfg.hidden_size * cfg.hidden_size
            mtp_flops += 2 * (a + d + m + eh_proj) + _score_flops(cfg, seq_len) + head
    parts = [mult * x for x in (attn_proj, scores, dense, moe, head, mtp_flops)]
    return FlopCount(*parts, total=sum(parts), multiplier=mult)


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2, absorbed: bool = True) -> int:
    """Bytes of KV cache one token occupies across all main-model layers.

    absorbed (MLA as DeepSeek serves it): the normalized latent c (kv_lora_rank) plus the rotated shared k_pe
        (qk_rope_head_dim) per layer: 61 * 576 * 2 B = 70,272 B for V3 in bf16.
    not absorbed: the decompressed per-head K (qk_head_dim) and V (v_head_dim), as multi-head attention caches:
        61 * 128 * (192 + 128) * 2 B = 4,997,120 B for V3, 71x more.
    """
    L = cfg.num_hidden_layers
    if absorbed:
        return L * cfg.latent_dim * dtype_bytes
    return L * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * dtype_bytes
