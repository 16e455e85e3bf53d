"""ModelConfig: one dataclass for the DeepSeek-V3 and V2 families, under Hugging Face field names.

`from_hf(config.json dict)` and `to_hf()` round-trip the published config.json files (V3/R1, V2, V2-Lite),
including `rope_scaling` (DeepSeek's name) and `rope_parameters` (transformers >= 5), `quantization_config`
(FP8 checkpoints) and keys we do not interpret (kept in `extra`). Presets are named constructors:
`ModelConfig.from_name("tiny" | "small" | "v2-lite" | "v3")`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from nanoseek.errors import ConfigError

MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}
SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")

# Defaults that differ between the families when a config.json leaves a field out (HF's and DeepSeek's defaults).
_V2_DEFAULTS = dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
                    n_shared_experts=2, n_routed_experts=64, first_k_dense_replace=0, n_group=1, topk_group=1,
                    num_nextn_predict_layers=0, bos_token_id=100000, eos_token_id=100001)

# Keys that are derived or written by other tools; dropped on import so they never go stale in `extra`.
_DERIVED_KEYS = {"qk_head_dim", "head_dim", "transformers_version", "rope_parameters", "num_mtp_layers", "dtype",
                 "model_type", "architectures", "auto_map", "torch_dtype", "_name_or_path"}


@dataclass
class ModelConfig:
    # --- sizes (defaults: DeepSeek-V3 671B) ---
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432          # dense SwiGLU width (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048       # width of one routed or shared expert
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1       # MTP depth D
    num_attention_heads: int = 128
    num_key_value_heads: int = 128          # MLA: every head has its own K/V (decompressed from the latent)
    # --- MLA ---
    q_lora_rank: int | None = 1536          # None: plain q_proj (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # --- DeepSeekMoE ---
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    ep_size: int = 1
    aux_loss_alpha: float = 0.0001          # sequence-wise balance loss weight (V3 report: 1e-4)
    seq_aux: bool = True
    # --- positions ---
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default_factory=lambda: {
        "type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    rope_interleave: bool = True
    # --- the rest of config.json ---
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pretraining_tp: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    model_type: str = "deepseek_v3"
    quantization_config: dict | None = None
    extra: dict = field(default_factory=dict)   # unknown config.json keys, written back unchanged

    def __post_init__(self):
        self.validate()

    # ----- derived sizes -----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values per token per layer in the absorbed-MLA cache: kv_lora_rank + qk_rope_head_dim (576 for V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule; MTP layers (index >= num_hidden_layers) follow it too."""
        return (self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return rs.get("type", rs.get("rope_type", "default"))

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 under YaRN (mscale = 0.1*mscale_all_dim*ln(factor)+1)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_type == "yarn":
            rs = self.rope_scaling
            mscale_all_dim = rs.get("mscale_all_dim", 0) or 0
            if mscale_all_dim:
                m = yarn_mscale(rs["factor"], mscale_all_dim)
                scale *= m * m
        return scale

    # ----- validation -----
    def validate(self) -> None:
        def bad(name: str, why: str):
            raise ConfigError(f"config field {name!r} = {getattr(self, name, None)!r}: {why}")

        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"config field 'model_type' = {self.model_type!r}: unknown model type; "
                              f"nanoseek reads {', '.join(MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, "must be a positive integer")
        for name in ("num_nextn_predict_layers", "n_routed_experts", "n_shared_experts", "first_k_dense_replace"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(name, "must be a non-negative integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            bad("q_lora_rank", "must be a positive integer, or null for a plain q_proj")
        if self.num_key_value_heads != self.num_attention_heads:
            bad("num_key_value_heads", f"MLA decompresses one K/V per query head, so it must equal "
                                       f"num_attention_heads ({self.num_attention_heads})")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "RoPE rotates pairs of dimensions, so it must be even")
        if self.hidden_act != "silu":
            bad("hidden_act", "DeepSeek's SwiGLU uses 'silu'")
        if self.first_k_dense_replace > self.num_hidden_layers:
            bad("first_k_dense_replace", f"is more than num_hidden_layers ({self.num_hidden_layers})")
        if self.moe_layer_freq < 1:
            bad("moe_layer_freq", "must be >= 1")
        if self.n_routed_experts > 0:
            if self.moe_intermediate_size is None or self.moe_intermediate_size <= 0:
                bad("moe_intermediate_size", "must be a positive integer when n_routed_experts > 0")
            if self.scoring_func not in SCORING_FUNCS:
                bad("scoring_func", f"must be one of {SCORING_FUNCS}")
            if self.topk_method not in TOPK_METHODS:
                bad("topk_method", f"must be one of {TOPK_METHODS}")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                bad("num_experts_per_tok", f"must be between 1 and n_routed_experts ({self.n_routed_experts})")
            if self.topk_method != "greedy":
                if not self.n_group or self.n_group < 1 or self.n_routed_experts % self.n_group:
                    bad("n_group", f"must divide n_routed_experts ({self.n_routed_experts})")
                if not self.topk_group or not 1 <= self.topk_group <= self.n_group:
                    bad("topk_group", f"must be between 1 and n_group ({self.n_group})")
                per_group = self.n_routed_experts // self.n_group
                if self.num_experts_per_tok > self.topk_group * per_group:
                    bad("num_experts_per_tok", f"exceeds the experts in the kept groups "
                                               f"(topk_group {self.topk_group} x {per_group} per group)")
                if self.topk_method == "noaux_tc" and per_group < 2:
                    bad("n_group", "noaux_tc scores a group by its top-2 experts, so each group needs >= 2")
        if self.rope_scaling is not None:
            if self.rope_type not in ("yarn", "default"):
                bad("rope_scaling", f"type {self.rope_type!r} is not supported (use 'yarn' or none)")
            if self.rope_type == "yarn":
                for k in ("factor", "original_max_position_embeddings"):
                    if k not in self.rope_scaling:
                        bad("rope_scaling", f"yarn needs {k!r}")
        qc = self.quantization_config
        if qc is not None:
            if qc.get("quant_method") != "fp8":
                bad("quantization_config", "only quant_method 'fp8' (DeepSeek block FP8) is supported")
            bs = qc.get("weight_block_size", [128, 128])
            if not (isinstance(bs, (list, tuple)) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs)):
                bad("quantization_config", "weight_block_size must be two positive integers, e.g. [128, 128]")

    # ----- HF config.json -----
    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"config field 'model_type' = {model_type!r}: unknown model type; "
                              f"nanoseek reads {', '.join(MODEL_TYPES)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = dict(_V2_DEFAULTS) if model_type == "deepseek_v2" else {}
        if model_type == "deepseek_v2":
            kwargs["rope_scaling"] = None
        extra = {}
        for k, v in d.items():
            if k in names:
                kwargs[k] = v
            elif k not in _DERIVED_KEYS:
                extra[k] = v
        # transformers >= 5 writes rope_parameters (with rope_theta inside) instead of rope_scaling.
        rp = d.get("rope_parameters")
        if isinstance(rp, dict) and "rope_scaling" not in d:
            if "rope_theta" in rp:
                kwargs.setdefault("rope_theta", rp["rope_theta"])
            rtype = rp.get("rope_type", rp.get("type", "default"))
            if rtype == "default":
                kwargs["rope_scaling"] = None
            else:
                kwargs["rope_scaling"] = {k: v for k, v in rp.items() if k not in ("rope_theta", "rope_type", "type")}
                kwargs["rope_scaling"]["type"] = rtype
        elif "rope_scaling" in d and isinstance(d["rope_scaling"], dict):
            rs = dict(d["rope_scaling"])
            rtype = rs.pop("type", None) or rs.pop("rope_type", "default")
            rs.pop("rope_type", None)
            if "rope_theta" in rs:                      # transformers >= 5 folds rope_theta in
                kwargs.setdefault("rope_theta", rs.pop("rope_theta"))
            kwargs["rope_scaling"] = None if rtype == "default" else {**rs, "type": rtype}
        if model_type == "deepseek_v2" and "rope_interleave" not in d:
            kwargs["rope_interleave"] = True
        for k in ("n_group", "topk_group"):   # V2 configs write null when routing is not grouped
            if kwargs.get(k) is None:
                kwargs[k] = 1
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", cls.num_attention_heads)
        if kwargs.get("moe_intermediate_size") is None:
            kwargs["moe_intermediate_size"] = 0
        if kwargs.get("n_routed_experts") is None:
            kwargs["n_routed_experts"] = 0
        return cls(**kwargs, extra=extra)

    def to_hf(self) -> dict[str, Any]:
        """config.json dict that both DeepSeek's and transformers' loaders read."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d = copy.deepcopy({**self.extra, **d})        # callers (transformers) mutate what they are given
        if d["quantization_config"] is None:
            del d["quantization_config"]
        d["architectures"] = [ARCHITECTURES[self.model_type]]
        # transformers >= 5 reads rope_parameters; DeepSeek's own code reads rope_scaling + rope_theta.
        rp = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rp.update({k: v for k, v in self.rope_scaling.items() if k != "type"})
            rp["rope_type"] = self.rope_type
        d["rope_parameters"] = rp
        return d

    # ----- presets -----
    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**copy.deepcopy({**PRESETS[name], **overrides}))

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature m = 0.1*mscale*ln(factor)+1 (1 when not extending)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


_TINY_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
              "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

PRESETS: dict[str, dict[str, Any]] = {
    # CPU unit tests: every V3 feature (q_lora, YaRN, group-limited noaux_tc routing, dense-first, MTP), ~0.3M params.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                 q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                 n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                 num_nextn_predict_layers=1, max_position_embeddings=512, rope_scaling=dict(_TINY_YARN)),
    # The demo model (~18M params with a 8K vocab): trains in minutes on a laptop CPU.
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                  num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                  q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                  n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                  num_nextn_predict_layers=1, max_position_embeddings=2048, rope_scaling=None),
    # DeepSeek-V2-Lite (15.7B total, 2.4B activated), as its config.json.
    "v2-lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                    moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1,
                    num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
                    n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, topk_method="greedy",
                    scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
                    num_nextn_predict_layers=0, aux_loss_alpha=0.001, max_position_embeddings=163840,
                    bos_token_id=100000, eos_token_id=100001,
                    rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
    # DeepSeek-V3 / R1 (671B total, 37B activated, +MTP): the dataclass defaults.
    "v3": dict(),
}
