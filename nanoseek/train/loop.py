"""Helpers every training loop shares: device and precision, seeding and RNG state for exact resume, the
machine's measured matmul peak and a throughput meter for MFU, and the run's provenance (git revision).
"""
from __future__ import annotations

import contextlib
import random
import subprocess
import time
from pathlib import Path

import torch

from nanoseek.errors import ConfigError
from nanoseek.hardware import SLOW_BF16, cpu_dtype_is_fast, cpu_has_fast_bf16, onednn_fp32_linear

PRECISIONS = ("auto", "fp32", "bf16")


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> this process's GPU when there is one, else CPU; 'cpu' / 'cuda' as asked."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda': no CUDA GPU is visible; use --device cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ConfigError(f"device {name!r}: choose auto, cpu or cuda")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device, warn: bool = True) -> str:
    """'auto' -> bf16 on GPUs with bf16 support, fp32 on CPU (fp32 is the exact-resume and reference setting;
    ask for bf16 explicitly on CPUs with AVX512-BF16/AMX). An explicit bf16 on a CPU without fast bf16 matmuls
    is kept (the user asked) but said to be slow, in one line when `warn` (rank 0 under torchrun, so the line
    is printed once, not once per process)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if warn and precision == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        print(f"warning: {SLOW_BF16}; use --precision fp32 (or auto)", flush=True)
    return precision


def autocast(device: torch.device, precision: str):
    """Compute in bf16 under autocast with fp32 master weights; a no-op context for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- seeds and RNG state
def tune_allocator() -> bool:
    """Keep freed large blocks in the process (glibc only). By default glibc hands every block above its mmap
    threshold back to the OS on free and the next step page-faults it in again: a training step of the ~18M
    benchmark model measured 536 -> 460 ms on CPU with these settings (the same as setting MALLOC_MMAP_THRESHOLD_,
    MALLOC_TRIM_THRESHOLD_ and MALLOC_TOP_PAD_). Returns whether it applied; a no-op elsewhere."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    return all(libc.mallopt(opt, val) == 1 for opt, val in (
        (M_MMAP_THRESHOLD, 32 * 2 ** 20),        # glibc's maximum; blocks below it come from the heap
        (M_TRIM_THRESHOLD, 2 ** 31 - 1),         # (an int: 2 GiB) do not return freed heap to the OS
        (M_TOP_PAD, 1 * 2 ** 30)))               # grow the heap in large steps


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)   # seeds every CUDA device too


def rng_state() -> dict:
    """Python and torch (CPU and CUDA) generator states; restored on resume so any sampling continues exactly."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- speed
def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.25) -> float:
    """Sustained FLOP/s of a large square matmul on `device` at `dtype`, measured now: the practical peak that
    MFU is reported against (a datasheet number would flatter nothing: CPUs rarely reach theirs). On CPU in fp32
    the faster of torch's matmul (MKL) and oneDNN's, which the fused head uses: on an AVX-512 AMD EPYC oneDNN ran
    161-195 GFLOP/s where MKL ran 128-153, and a peak from the slower library would flatter every MFU. On a CPU
    without hardware bf16, a low-precision peak is the fp32 one."""
    if device.type == "cpu" and not cpu_dtype_is_fast(dtype):
        # emulated bf16 matmuls (1-12 GFLOP/s, seconds per 1024^3 matmul): nanoseek's experts and head run fp32
        # there, so the practical peak is fp32's (MFU against the emulation would read above 100%)
        return matmul_peak_flops(device, torch.float32, seconds)
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    kernels = [lambda: a @ b]
    if onednn_fp32_linear(a, b):
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))   # a @ b^T
    return max(_sustained_flops(k, 2 * n ** 3, device, seconds / len(kernels)) for k in kernels)


def _sustained_flops(matmul, flops: int, device: torch.device, seconds: float) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        matmul()
    sync()
    iters, start = 0, time.perf_counter()
    while True:
        matmul()
        iters += 1
        if iters % 4 == 0:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return flops * iters / elapsed


class Throughput:
    """Tokens/s and MFU of the last step and a smoothed value for the progress bar.

    flops_per_token: model FLOPs of one training token (accounting.flops_per_token); peak_flops: the measured
    peak of all processes together."""

    def __init__(self, flops_per_token: float, peak_flops: float, smoothing: float = 0.9):
        self.flops_per_token, self.peak_flops, self.smoothing = flops_per_token, peak_flops, smoothing
        self.ema: float | None = None

    def update(self, tokens: int, seconds: float) -> tuple[float, float]:
        """-> (tokens_per_s, mfu) of this step."""
        tps = tokens / max(seconds, 1e-9)
        self.ema = tps if self.ema is None else self.smoothing * self.ema + (1 - self.smoothing) * tps
        return tps, self.mfu(tps)

    def mfu(self, tokens_per_s: float) -> float:
        return tokens_per_s * self.flops_per_token / self.peak_flops


# ----------------------------------------------------------------------------- provenance
def git_revision(path: str | Path | None = None) -> dict:
    """{'revision': commit or None, 'dirty': bool or None} of the repository holding `path` (default: nanoseek)."""
    where = Path(path) if path else Path(__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10)

    try:
        rev = git("rev-parse", "HEAD")
        if rev.returncode != 0:
            return {"revision": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}
