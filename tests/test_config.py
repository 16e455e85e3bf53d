"""ModelConfig: HF round trips, presets, and validation messages that name the field."""
import json

import pytest

import nanoseek
from nanoseek.errors import ConfigError


@pytest.mark.parametrize("name", ["tiny", "small", "v2-lite", "v3"])
def test_presets_round_trip_through_hf_dict(name):
    cfg = nanoseek.ModelConfig.from_name(name)
    d = json.loads(json.dumps(cfg.to_hf()))           # must be plain JSON
    assert nanoseek.ModelConfig.from_hf(d) == cfg


def test_v3_preset_has_the_published_fields():
    d = nanoseek.ModelConfig.from_name("v3").to_hf()
    assert d["model_type"] == "deepseek_v3" and d["architectures"] == ["DeepseekV3ForCausalLM"]
    expect = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                  num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128, n_routed_experts=256,
                  n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                  norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc", q_lora_rank=1536,
                  kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                  max_position_embeddings=163840, num_nextn_predict_layers=1, tie_word_embeddings=False)
    assert {k: d[k] for k in expect} == expect
    assert d["rope_scaling"]["factor"] == 40 and d["rope_scaling"]["type"] == "yarn"


@pytest.mark.parametrize("family", ["v3", "v2"])
def test_to_hf_is_read_by_transformers_and_back(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = nanoseek.ModelConfig.from_name("tiny" if family == "v3" else "v2-lite")
    hf_cls = transformers.DeepseekV3Config if family == "v3" else transformers.DeepseekV2Config
    hf = hf_cls.from_dict(cfg.to_hf())
    assert hf.kv_lora_rank == cfg.kv_lora_rank and hf.q_lora_rank == cfg.q_lora_rank
    assert hf.rope_parameters["rope_type"] == "yarn"
    assert hf.rope_parameters["factor"] == cfg.rope_scaling["factor"]
    hf.save_pretrained(tmp_path)                      # transformers' own config.json (rope_parameters style)
    back = nanoseek.ModelConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert back.rope_scaling == cfg.rope_scaling and back.rope_theta == cfg.rope_theta
    assert back.num_hidden_layers == cfg.num_hidden_layers and back.topk_method == cfg.topk_method


def test_unknown_keys_are_kept_for_the_round_trip():
    d = nanoseek.ModelConfig.from_name("tiny").to_hf()
    d["auto_map"] = {"AutoConfig": "x"}
    d["my_extra_field"] = 3
    out = nanoseek.ModelConfig.from_hf(d).to_hf()
    assert out["my_extra_field"] == 3


@pytest.mark.parametrize("change, field", [
    (dict(topk_group=5), "topk_group"),                      # more groups kept than exist (n_group=4)
    (dict(num_key_value_heads=2), "num_key_value_heads"),    # MLA needs one K/V per head
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),          # rope rotates pairs
    (dict(n_group=3), "n_group"),                            # 8 experts do not split into 3 groups
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(num_experts_per_tok=6, topk_group=2), "num_experts_per_tok"),  # only 2 groups x 2 experts allowed
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace"),
    (dict(rope_scaling={"type": "ntk", "factor": 2}), "rope_scaling"),
    (dict(quantization_config={"quant_method": "awq"}), "quantization_config"),
])
def test_validation_names_the_field(change, field):
    with pytest.raises(ConfigError) as e:
        nanoseek.ModelConfig.from_name("tiny", **change)
    msg = str(e.value)
    assert f"'{field}'" in msg and "\n" not in msg


def test_unknown_model_type_and_preset():
    with pytest.raises(ConfigError, match="model_type.*llama"):
        nanoseek.ModelConfig.from_hf({"model_type": "llama"})
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        nanoseek.ModelConfig.from_name("huge")


def test_v2_config_json_defaults():
    """A V2-Lite config.json as published: softmax/greedy, no q_lora, null n_group."""
    d = {"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
         "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
         "num_key_value_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512, "n_routed_experts": 64,
         "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "n_group": None,
         "topk_group": None, "topk_method": "greedy", "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
         "v_head_dim": 128, "max_position_embeddings": 163840, "norm_topk_prob": False,
         "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}}
    cfg = nanoseek.ModelConfig.from_hf(d)
    assert cfg.scoring_func == "softmax" and cfg.num_nextn_predict_layers == 0 and cfg.n_group == 1
    assert cfg == nanoseek.ModelConfig.from_name("v2-lite", aux_loss_alpha=cfg.aux_loss_alpha, seq_aux=cfg.seq_aux)
