"""What this machine's CPU runs fast, for defaults and for one-line warnings about slow choices.

bf16 on a CPU without hardware support is the trap here: on a 2-core AVX2-only EPYC, bf16 matmuls measured
1-12 GFLOP/s by shape against 60-110 in fp32, and a bf16 autocast training step of the benchmark model ran
13-20x slower than fp32 (benchmarks/RESULTS.md, 2026-12-01).
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU's matmul libraries run bf16 on hardware support: oneDNN's own check (AVX512 core or
    AVX512-BF16, AMX, Arm's BF16 extension), else torch.cpu's AVX512-BF16 / AMX probes."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is not None and torch.backends.mkldnn.is_available():
        return bool(check())
    cpu = getattr(torch, "cpu", None)
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


@torch.compiler.assume_constant_result
def _cpu_bf16_is_fast() -> bool:
    """cpu_has_fast_bf16() as a constant under torch.compile (dynamo would trace into its cache wrapper)."""
    return cpu_has_fast_bf16()


def cpu_dtype_is_fast(dtype: torch.dtype) -> bool:
    """Whether this CPU's matmuls run `dtype` at hardware speed: fp32 and wider always, bf16 with hardware
    support, fp16 never counted (emulated bf16/fp16 matmuls ran 1-12 GFLOP/s against 60-110 in fp32)."""
    if dtype.itemsize >= 4:
        return True
    return dtype == torch.bfloat16 and _cpu_bf16_is_fast()


def onednn_fp32_linear(*tensors: torch.Tensor) -> bool:
    """Whether to run fp32 matmuls through oneDNN's linear op (the one inductor's CPU linear fusion calls): all
    tensors fp32 on CPU, on an x86 build that has the op. The fused head uses it: for 256 rows x 256 -> 8192
    outputs it measured 202 GFLOP/s against MKL's 149 (and 215 vs 179 for dL/dh = g @ W); a chunk loop of the
    benchmark head 82 -> 72 ms. Square 512-2048 fp32 matmuls on an AVX-512 EPYC: 161-195 vs MKL's 128-153."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.backends.cpu.get_cpu_capability().startswith("AVX"))    # measured on x86 only


def onednn_fp32_head() -> bool:
    """Whether the fused head's fp32 matmuls (train.linear_ce._cpu_fp32_grads) run on oneDNN rather than MKL on
    this CPU: on AVX-512 (EPYC, stop 19) oneDNN ran its logits at 202 GFLOP/s against MKL's 149, dL/dh = g @ W
    (1024 x 8192 by 8192 x 256) at ~180 against ~120, and dL/dW likewise. On AVX2 (Zen 3 EPYC) MKL wins: dL/dh
    136 vs 103 GFLOP/s (stop 20), and the whole head + loss with MKL logits in 512-column blocks and MKL's dL/dW
    ran 1.09-1.17x faster than on oneDNN (stop 24, interleaved A/Bs). Decided by the CPU, not timed at run time:
    the same machine always takes the same path, so a resumed run stays bitwise identical."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def fast_autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype nanoseek's own ops (the routed experts, the fused head + loss) compute in under autocast, or None
    for their inputs' dtype: autocast's dtype where this device runs it fast. On a CPU without hardware bf16 they
    stay fp32 (`cpu_dtype_is_fast`), as transformers' experts do under autocast: more exact, and there many times
    faster; under CPU fp16 autocast too. nn.Linear layers still follow autocast."""
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return None if device_type == "cpu" and not cpu_dtype_is_fast(dtype) else dtype


SLOW_BF16 = ("this CPU has no hardware bf16 matmuls (AVX512-BF16, AMX or Arm BF16): bf16 runs many times slower "
             "than fp32 here")
