"""HF-format checkpoints: nanoseek <-> transformers parity through the real files, MTP round trips, sharding,
and the one-line errors (library and `nanoseek convert`) for broken checkpoint dirs, with nothing written."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek import cli
from nanoseek.checkpoint import load_model, save_model
from nanoseek.checkpoint.hf import Slot, expected_tensors, parse_size
from nanoseek.errors import CheckpointError, ConfigError

V2_TINY = dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
               routed_scaling_factor=1.0, num_nextn_predict_layers=0, q_lora_rank=None, n_group=1, topk_group=1)


def tiny(**overrides):
    return nanoseek.ModelConfig.from_name("tiny", **overrides)


def ids_for(cfg, seed=0):
    return torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def hf_model(path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()        # the MTP keys it ignores are expected
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def run_cli(monkeypatch, *argv):
    # Only convert's module: this test must not depend on the imports of other subcommands.
    monkeypatch.setattr(cli, "COMMANDS", {"convert": "nanoseek.checkpoint.convert"})
    return cli.main(["convert", *map(str, argv), "--no-progress"])


def keys_of(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


# ----------------------------------------------------------------------------------------------- name table
def test_name_table_unstacks_experts_and_moves_mtp():
    cfg = tiny()                                      # 3 layers (layer 0 dense), 8 experts of width I=32, MTP 1
    table, optional = expected_tensors(cfg)
    assert table["model.layers.1.mlp.experts.3.gate_proj.weight"] == Slot(
        "model.layers.1.mlp.experts.gate_up_proj", (3, slice(0, 32)), (32, 64))
    assert table["model.layers.1.mlp.experts.3.up_proj.weight"] == Slot(
        "model.layers.1.mlp.experts.gate_up_proj", (3, slice(32, 64)), (32, 64))
    assert table["model.layers.2.mlp.experts.7.down_proj.weight"] == Slot(
        "model.layers.2.mlp.experts.down_proj", (7,), (64, 32))
    assert table["model.layers.3.eh_proj.weight"] == Slot("mtp.0.eh_proj.weight", (), (64, 128))
    assert table["model.layers.3.mlp.experts.0.up_proj.weight"].param == "mtp.0.mlp.experts.gate_up_proj"
    assert optional == {"model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight"}
    assert not any("gate_up_proj" in k or k.startswith("mtp.") for k in table)
    assert len([k for k in table if ".experts." in k]) == 3 * 3 * 8      # 2 MoE layers + MTP, 3 matrices each


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(CheckpointError, match="max shard size"):
        parse_size("big")


# ----------------------------------------------------------------------------------------------- parity with HF
@pytest.mark.parametrize("overrides", [{}, V2_TINY, dict(tie_word_embeddings=True)], ids=["v3", "v2", "tied"])
def test_save_then_transformers_loads_same_logits(tmp_path, overrides):
    cfg = tiny(**overrides)
    model = nanoseek.build_model(cfg, seed=1).eval()
    ids = ids_for(cfg)
    save_model(model, tmp_path / "ck")
    hf = hf_model(tmp_path / "ck")
    assert type(hf).__name__ == {"deepseek_v3": "DeepseekV3ForCausalLM",
                                 "deepseek_v2": "DeepseekV2ForCausalLM"}[cfg.model_type]
    torch.testing.assert_close(logits(hf, ids), logits(model, ids), atol=1e-4, rtol=0)
    loaded = load_model(tmp_path / "ck")
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == cfg.tie_word_embeddings
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and "quantization_config" not in config


def test_transformers_save_then_load_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = tiny()
    # Independent weights: a transformers model initialized by transformers, saved by transformers.
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg.to_hf())).eval()
    with torch.no_grad():                             # a non-zero balancing bias, so its mapping is tested too
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="no MTP weights"):   # transformers drops MTP; so does the loaded model
        model = load_model(tmp_path / "hf")
    assert model.config.num_nextn_predict_layers == 0 and len(model.mtp) == 0
    ids = ids_for(cfg, seed=1)
    torch.testing.assert_close(logits(model, ids), logits(hf, ids), atol=1e-4, rtol=0)
    assert not model.training


# ----------------------------------------------------------------------------------------------- round trips
def test_round_trip_is_bit_exact_including_mtp(tmp_path):
    model = nanoseek.build_model(tiny(), seed=2)
    save_model(model, tmp_path / "ck")
    loaded = load_model(tmp_path / "ck")
    want, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(want) and any(k.startswith("mtp.0.") for k in got)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # DeepSeek's layout: MTP at layer L with copies of the shared embedding and head.
    files = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert torch.equal(files["model.layers.3.embed_tokens.weight"], want["model.embed_tokens.weight"])
    assert torch.equal(files["model.layers.3.shared_head.head.weight"], want["lm_head.weight"])
    assert torch.equal(files["model.layers.3.enorm.weight"], want["mtp.0.enorm.weight"])


def test_bf16_load_keeps_router_fp32(tmp_path):
    save_model(nanoseek.build_model(tiny(), seed=0), tmp_path / "ck", dtype=torch.bfloat16)
    files = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert files["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert files["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == torch.bfloat16
    model = load_model(tmp_path / "ck", dtype=torch.bfloat16)
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert model(ids_for(model.config)).dtype == torch.bfloat16
    # dtype=None saves each tensor as it is in memory: bf16 weights, fp32 router, and loads back bit-exactly.
    save_model(model, tmp_path / "again")
    files = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert files["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == torch.bfloat16
    assert files["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert json.loads((tmp_path / "again" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = load_model(tmp_path / "again", dtype=torch.bfloat16).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(again[k], v), k


def test_sharded_save_writes_index_and_loads(tmp_path):
    model = nanoseek.build_model(tiny(), seed=4).eval()
    save_model(model, tmp_path / "ck", max_shard_size="100KB")
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "ck" / "model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "ck").glob("*.safetensors")) == shards
    on_disk = set().union(*(keys_of(tmp_path / "ck" / s) for s in shards))
    assert on_disk == set(index["weight_map"])
    ids = ids_for(model.config)
    torch.testing.assert_close(logits(load_model(tmp_path / "ck"), ids), logits(model, ids), atol=0, rtol=0)
    torch.testing.assert_close(logits(hf_model(tmp_path / "ck"), ids), logits(model, ids), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def good_ckpt(tmp_path):
    save_model(nanoseek.build_model(tiny(), seed=0), tmp_path / "good")
    return tmp_path / "good"


def _broken(good, tmp_path, name, edit):
    path = tmp_path / name
    shutil.copytree(good, path)
    edit(path)
    return path


def _edit_tensors(fn):
    def edit(path):
        tensors = load_file(str(path / "model.safetensors"))
        fn(tensors)
        save_file(tensors, str(path / "model.safetensors"))
    return edit


def _set_model_type(path):
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(config))


BROKEN = {
    "missing_config": (lambda p: os.remove(p / "config.json"), CheckpointError, r"config\.json.*not found"),
    "missing_tensor": (_edit_tensors(lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight")),
                       CheckpointError, r"model\.safetensors: tensor 'model\.layers\.2\.mlp\.experts\.5\.up_proj"
                                        r"\.weight' is missing"),
    "misshapen_tensor": (_edit_tensors(lambda t: t.update(
                             {"model.layers.0.self_attn.o_proj.weight": torch.zeros(8, 8)})),
                         CheckpointError, r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.o_proj\.weight' "
                                          r"has shape \(8, 8\); config\.json implies \(64, 64\)"),
    "unexpected_tensor": (_edit_tensors(lambda t: t.update({"model.layers.7.mlp.gate.weight": torch.zeros(8, 64)})),
                          CheckpointError, r"unexpected tensor 'model\.layers\.7\.mlp\.gate\.weight'"),
    "unknown_model_type": (_set_model_type, ConfigError, r"config\.json: config field 'model_type' = 'llama'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoint_fails_with_one_line(good_ckpt, tmp_path, monkeypatch, capsys, case):
    edit, error, pattern = BROKEN[case]
    path = _broken(good_ckpt, tmp_path, case, edit)
    with pytest.raises(error, match=pattern) as info:
        load_model(path)
    assert "\n" not in str(info.value)
    # The CLI: exit 2, one line on stderr, and no output directory.
    capsys.readouterr()
    assert run_cli(monkeypatch, path, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("nanoseek convert: error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["good", case])     # no temp dirs left


def test_stale_index_entry_names_the_shard(tmp_path):
    save_model(nanoseek.build_model(tiny(), seed=0), tmp_path / "ck", max_shard_size="100KB")
    index_path = tmp_path / "ck" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["lm_head.weight"] = next(s for s in shards if s != index["weight_map"]["lm_head.weight"])
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-\d+-of-\d+\.safetensors: tensor 'lm_head\.weight'"):
        load_model(tmp_path / "ck")


def test_failed_save_leaves_existing_dir_unchanged(tmp_path, monkeypatch):
    import safetensors.torch

    save_model(nanoseek.build_model(tiny(), seed=0), tmp_path / "ck", max_shard_size="100KB")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    real, calls = safetensors.torch.save_file, []

    def flaky(*args, **kwargs):                       # the third shard write fails (disk full, say)
        calls.append(1)
        if len(calls) == 3:
            raise OSError("No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky)
    with pytest.raises(OSError, match="No space"):
        save_model(nanoseek.build_model(tiny(), seed=9), tmp_path / "ck", max_shard_size="100KB")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    # A successful save replaces the old dir entirely (no stale shards from the sharded save).
    model = nanoseek.build_model(tiny(), seed=9)
    save_model(model, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(load_model(tmp_path / "ck").lm_head.weight, model.lm_head.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
