"""DeepSeek's block-wise FP8 weight format: dequantize for loading and converting, quantize for export.

A quantized weight W (M, N) is stored as float8_e4m3fn with a float32 sibling `<name>_scale_inv` of shape
(ceil(M/b0), ceil(N/b1)), one scale per b0 x b1 block (b = quantization_config.weight_block_size = [128, 128]):
    W_real[i, j] = W[i, j] * scale_inv[i // b0, j // b1]          (edge blocks may be partial)
Quantizing picks per block s = amax / 448 (448 = largest finite e4m3fn value) and stores q = W / s, scale_inv = s.

Error bound (what tests/test_fp8.py checks): e4m3 keeps 3 mantissa bits, so round-to-nearest moves a normal q
by at most half a unit in the last place, 2^-4 * 2^floor(log2|q|) <= 2^-4 |q|; below the smallest normal 2^-6
the spacing is the subnormal step 2^-9, so the error is at most 2^-10. In real units, per element:
    |W - deq(quant(W))| <= 2^-4 |W| + 2^-10 * s,   s = block amax / 448
and so never more than 2^-4 * block amax (+ a 2^-10/448 sliver), whatever the block's dynamic range.

In DeepSeek's FP8 checkpoints only the 2-D linear weights inside the decoder layers (`*_proj.weight`: attention
projections, dense/shared/routed expert SwiGLU) are FP8. The router `gate.weight`, its fp32
`e_score_correction_bias`, norms, embeddings, `lm_head` and MTP's `eh_proj`/`shared_head.head` stay bf16.
"""
from __future__ import annotations

import math
import re

import torch

from nanoseek.errors import CheckpointError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0                      # torch.finfo(torch.float8_e4m3fn).max
SCALE_SUFFIX = "_scale_inv"          # "...q_a_proj.weight" -> "...q_a_proj.weight_scale_inv"
DEFAULT_BLOCK = (128, 128)


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


# Every nn.Linear of DeepSeek's reference model.py that is not the head: attention and SwiGLU projections.
_FP8_LINEAR = re.compile(r"^model\.layers\.\d+\..*\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj"
                         r"|gate_proj|up_proj|down_proj)\.weight$")


def is_quantized_in_deepseek_fp8(name: str, shape) -> bool:
    """Whether DeepSeek's FP8 release stores this checkpoint tensor as FP8 (see the module docstring)."""
    return len(shape) == 2 and _FP8_LINEAR.match(name) is not None


def block_size(quantization_config: dict | None) -> tuple[int, int]:
    bs = (quantization_config or {}).get("weight_block_size") or DEFAULT_BLOCK
    return int(bs[0]), int(bs[1])


def check_scale_shape(name: str, weight_shape, scale_shape, block=DEFAULT_BLOCK) -> None:
    """Raise CheckpointError naming the tensor when scale_inv does not have one entry per block."""
    M, N = weight_shape
    want = (math.ceil(M / block[0]), math.ceil(N / block[1]))
    if tuple(scale_shape) != want:
        raise CheckpointError(f"tensor {scale_name(name)!r} has shape {tuple(scale_shape)}; a {(M, N)} weight in "
                              f"{block[0]}x{block[1]} blocks needs {want}")


def dequantize_fp8_blocks(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block=DEFAULT_BLOCK,
                          dtype: torch.dtype = torch.bfloat16, name: str = "weight") -> torch.Tensor:
    """W (M, N) float8_e4m3fn, scale_inv (ceil(M/b0), ceil(N/b1)) -> W_real (M, N) in `dtype`.

    The product is taken in fp32 (as DeepSeek's weight_dequant kernel does) and rounded once to `dtype`.
    `name` only labels the error when the scale's shape is wrong.
    """
    if w_fp8.dim() != 2:
        raise CheckpointError(f"tensor {name!r} is FP8 with shape {tuple(w_fp8.shape)}; block FP8 needs 2-D weights")
    check_scale_shape(name, w_fp8.shape, scale_inv.shape, block)
    M, N = w_fp8.shape
    # Broadcast each block's scale over its b0 x b1 entries, then crop the partial edge blocks.
    scale = scale_inv.float().repeat_interleave(block[0], dim=0)[:M].repeat_interleave(block[1], dim=1)[:, :N]
    return (w_fp8.float() * scale).to(dtype)


def quantize_fp8_blocks(w: torch.Tensor, block=DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """W (M, N) any float dtype -> (q (M, N) float8_e4m3fn, scale_inv (ceil(M/b0), ceil(N/b1)) float32)."""
    if w.dim() != 2:
        raise ValueError(f"block FP8 quantizes 2-D weights, got shape {tuple(w.shape)}")
    M, N = w.shape
    b0, b1 = block
    m, n = math.ceil(M / b0), math.ceil(N / b1)
    # Zero-pad to whole blocks so every block is a (b0, b1) tile of one view; padding never raises an amax.
    padded = torch.nn.functional.pad(w.float(), (0, n * b1 - N, 0, m * b0 - M))
    tiles = padded.view(m, b0, n, b1)                                                 # (m, b0, n, b1)
    amax = tiles.abs().amax(dim=(1, 3))                                               # (m, n)
    # An all-zero block would give s = 0 and 0/0; any positive scale stores its zeros exactly, so use 1.
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    # Clamp: amax / (amax / 448) rounds a hair above 448 for ~8% of amax values, and e4m3fn has no inf; torch
    # releases differ on out-of-range casts (NaN in older ones, saturation now), so do not rely on either.
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(m * b0, n * b1)[:M, :N].to(FP8_DTYPE)
    return q.contiguous(), scale.contiguous()
