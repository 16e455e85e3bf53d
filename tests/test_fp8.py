"""DeepSeek block FP8: quantize/dequantize against hand-derived bounds and a loop reference, and FP8 checkpoints
through `nanoseek convert` and `load_model`."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

import nanoseek
from nanoseek import cli
from nanoseek.checkpoint import dequantize_fp8_blocks, load_model, quantize_fp8_blocks, save_model
from nanoseek.checkpoint.convert import convert
from nanoseek.checkpoint.fp8 import FP8_MAX, is_quantized_in_deepseek_fp8
from nanoseek.errors import CheckpointError


def test_quantize_dequantize_within_e4m3_bound():
    gen = torch.Generator().manual_seed(0)
    M, N, b = 300, 200, 128                            # 3 x 2 blocks, the last row and column partial
    # Magnitudes spanning 1e-3..1e3 across rows, so blocks have very different scales and wide dynamic range.
    w = torch.randn(M, N, generator=gen) * torch.logspace(-3, 3, M)[:, None]
    w[128:256, 128:] = 0.0                             # an all-zero (partial) block
    q, scale_inv = quantize_fp8_blocks(w, (b, b))
    assert q.dtype == torch.float8_e4m3fn and q.shape == (M, N)
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (math.ceil(M / b), math.ceil(N / b))
    assert torch.isfinite(q.float()).all() and q.float().abs().max() <= FP8_MAX
    assert scale_inv[1, 1] == 1.0                      # all-zero block: any scale stores zeros; no 0/0
    back = dequantize_fp8_blocks(q, scale_inv, (b, b), dtype=torch.float32)
    assert (back[128:256, 128:] == 0).all()
    # Per block s = amax/448. Round-to-nearest with 3 mantissa bits: a normal |q| >= 2^-6 moves by at most
    # 2^-4 |q|; a subnormal by at most half its 2^-9 step, 2^-10. So |W - W'| <= 2^-4 |W| + 2^-10 s
    # (+ fp32 rounding of W/s and q*s, a few 2^-24 relative).
    s = scale_inv.repeat_interleave(b, 0)[:M].repeat_interleave(b, 1)[:, :N]
    err = (back - w).abs()
    bound = 2.0**-4 * w.abs() + 2.0**-10 * s
    assert (err <= bound * (1 + 1e-5)).all()
    # Block-level consequence: error <= 2^-4 * block amax (what matters for a matmul).
    assert (err <= 2.0**-4 * s * FP8_MAX * (1 + 1e-5)).all()
    # Not vacuous: the format really loses precision, close to the worst case somewhere.
    rel = err[w.abs() > 2.0**-6 * s] / w.abs()[w.abs() > 2.0**-6 * s]
    assert rel.max() > 2.0**-5


def test_dequantize_matches_block_loop():
    gen = torch.Generator().manual_seed(1)
    M, N, block = 130, 257, (64, 128)                  # non-square blocks, partial edges on both axes
    w8 = (torch.randn(M, N, generator=gen) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(3, 3, generator=gen) + 0.1
    fast = dequantize_fp8_blocks(w8, scale_inv, block, dtype=torch.float32)
    slow = torch.empty(M, N)                           # the obviously-right path: one block at a time
    for bi in range(3):
        for bj in range(3):
            rows, cols = slice(bi * 64, (bi + 1) * 64), slice(bj * 128, (bj + 1) * 128)
            slow[rows, cols] = w8[rows, cols].float() * scale_inv[bi, bj]
    assert torch.equal(fast, slow)
    assert dequantize_fp8_blocks(w8, scale_inv, block).dtype == torch.bfloat16


def test_scale_shape_mismatch_names_tensor():
    w8 = torch.zeros(300, 200, dtype=torch.float8_e4m3fn)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.4\.mlp\.down_proj\.weight_scale_inv' has shape "
                                              r"\(2, 2\); a \(300, 200\) weight in 128x128 blocks needs \(3, 2\)"):
        dequantize_fp8_blocks(w8, torch.ones(2, 2), name="model.layers.4.mlp.down_proj.weight")


def test_which_tensors_deepseek_quantizes():
    yes = ["model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
           "model.layers.5.mlp.experts.17.up_proj.weight", "model.layers.61.mlp.shared_experts.down_proj.weight",
           "model.layers.61.self_attn.o_proj.weight"]
    no = ["model.layers.5.mlp.gate.weight", "model.embed_tokens.weight", "lm_head.weight",
          "model.layers.61.eh_proj.weight", "model.layers.61.shared_head.head.weight",
          "model.layers.0.input_layernorm.weight"]
    assert all(is_quantized_in_deepseek_fp8(n, (8, 8)) for n in yes)
    assert not any(is_quantized_in_deepseek_fp8(n, (8, 8)) for n in no)


# ----------------------------------------------------------------------------------------------- checkpoints
# Every expert active: routing cannot flip under weight noise, so logits move continuously with the FP8 error
# (with top-2 of 8, near-tied random-init routers flip and bf16 rounding alone moves logits by ~30%).
# Sizes above one 128-block so scales are per block, with partial edge blocks (192 = 128 + 64, 160 = 128 + 32).
FP8_TINY = dict(hidden_size=192, intermediate_size=320, moe_intermediate_size=160, n_routed_experts=4,
                num_experts_per_tok=4, n_group=1, topk_group=1)


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    cfg = nanoseek.ModelConfig.from_name("tiny", **FP8_TINY)
    model = nanoseek.build_model(cfg, seed=0).eval()
    save_model(model, root / "bf16", dtype=torch.bfloat16)
    (root / "bf16" / "tokenizer.json").write_text("{}")     # stands in for the tokenizer files convert copies
    mp = pytest.MonkeyPatch()
    mp.setattr(cli, "COMMANDS", {"convert": "nanoseek.checkpoint.convert"})
    rc = cli.main(["convert", str(root / "bf16"), str(root / "fp8"), "--quantize", "fp8", "--no-progress"])
    mp.undo()
    assert rc == 0
    return model, root


def test_fp8_checkpoint_layout(fp8_dirs):
    _, root = fp8_dirs
    config = json.loads((root / "fp8" / "config.json").read_text())
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}
    assert (root / "fp8" / "tokenizer.json").read_text() == "{}"
    with safe_open(str(root / "fp8" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        assert f.get_slice("model.layers.1.mlp.experts.2.down_proj.weight_scale_inv").get_shape() == [2, 2]
    assert dtypes["model.layers.1.mlp.experts.2.down_proj.weight"] == "F8_E4M3"      # (192, 160)
    assert dtypes["model.layers.3.self_attn.kv_a_proj_with_mqa.weight"] == "F8_E4M3"   # MTP's layer too
    assert dtypes["model.layers.1.mlp.gate.weight"] == "BF16"
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"
    assert dtypes["model.layers.3.eh_proj.weight"] == "BF16" and dtypes["lm_head.weight"] == "BF16"
    fp8_keys = {k for k, d in dtypes.items() if d == "F8_E4M3"}
    assert {k + "_scale_inv" for k in fp8_keys} == {k for k in dtypes if k.endswith("_scale_inv")}


def test_fp8_checkpoint_loads_close_to_original(fp8_dirs):
    model, root = fp8_dirs
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        bf16 = load_model(root / "bf16")(ids)
        fp8 = load_model(root / "fp8")(ids)
    rel = lambda x: ((x - ref).norm() / ref.norm()).item()
    # Weights carry <= 2^-4 relative error per element (~2^-6 rms); through 4 residual blocks the logits'
    # relative error measured ~2-3%: 0.08 leaves margin, while a wrong scale or layout gives O(1).
    assert rel(fp8) < 0.08
    assert rel(bf16) < 0.01 and rel(fp8) > rel(bf16)   # FP8 really was applied (coarser than bf16)
    loaded = load_model(root / "fp8")
    assert loaded.config.quantization_config is None    # in memory the weights are dequantized


def test_fp8_to_bf16_convert_drops_scales_and_matches(fp8_dirs):
    _, root = fp8_dirs
    convert(root / "fp8", root / "deq", progress=False)
    config = json.loads((root / "deq" / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    with safe_open(str(root / "deq" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith("e_score_correction_bias")}
        assert not any(k.endswith("_scale_inv") for k in f.keys())
    assert dtypes == {"BF16"}
    # Dequantizing at convert time or at load time rounds the same fp32 product once to bf16: identical.
    a = load_model(root / "deq", dtype=torch.bfloat16).state_dict()
    b = load_model(root / "fp8", dtype=torch.bfloat16).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fp8_requantize_is_bit_exact(fp8_dirs):
    _, root = fp8_dirs
    convert(root / "fp8", root / "fp8b", quantize="fp8", max_shard_size="200KB", progress=False)
    assert (root / "fp8b" / "model.safetensors.index.json").exists()
    a = load_model(root / "fp8b").state_dict()
    b = load_model(root / "fp8").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
