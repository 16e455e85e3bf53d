"""`nanoseek cost`: FLOPs -> GPU-hours -> dollars, the "$5.6M" question.

GPU-hours = tokens * training FLOPs per token / (MFU * dense peak FLOP/s * 3600), FLOPs per token from
`nanoseek.accounting.flops_per_token` (matmuls, fwd + bwd, MTP included when the model has it). Give either an
MFU or a measured throughput in GPU-hours per trillion tokens; the other is derived and printed.

The V3 report (section 1, table 1) states 180K H800 GPU-hours per trillion tokens, 2.664M GPU-hours for the
14.8T pretraining tokens, and $5.576M in all at $2 per GPU-hour (2.788M GPU-hours: pretraining + 119K context
extension + 5K post-training). `nanoseek cost --model v3 --tokens 14.8T --gpu-hours-per-trillion 180000`
reproduces the pretraining line and says which MFU that throughput implies (about 40% of H800's dense bf16 peak,
20% of its fp8 peak).
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from nanoseek.errors import CheckpointError, ConfigError

HELP = "estimate training FLOPs, GPU-hours, days and dollars for a model and a token budget"

# Dense (no 2:4 sparsity) tensor-core peaks per GPU, TFLOP/s: vendors' datasheets list the sparse numbers with an
# asterisk; the dense ones are half of those.
#   H100 SXM5: datasheet "BF16 1,979* / FP8 3,958* TFLOPS, *with sparsity" (NVIDIA H100 Tensor Core GPU datasheet).
#   H800 SXM5: the same GH100 compute as H100 SXM, with NVLink cut to 400 GB/s (NVIDIA H800 datasheet: 1,979* /
#              3,958*). DeepSeek-V3 was trained on 2048 of these.
#   H200 SXM:  same compute as H100 SXM, more and faster memory (NVIDIA H200 datasheet: 1,979* / 3,958*).
#   A100 SXM:  "BF16 312 / 624* TFLOPS" (NVIDIA A100 datasheet); Ampere has no FP8 tensor cores.
#   H20:       BF16 148, FP8 296 TFLOPS (NVIDIA's H20 product brief; export-limited Hopper).
#   B200:      HGX B200 (1000 W) "FP16/BF16 4.5 / FP8 9 PFLOPS" per GPU with sparsity -> 2,250 / 4,500 dense
#              (NVIDIA HGX B200 datasheet).
GPUS: dict[str, dict[str, float | None]] = {
    "H800": {"bf16": 989.5, "fp8": 1979.0},
    "H100": {"bf16": 989.5, "fp8": 1979.0},
    "H200": {"bf16": 989.5, "fp8": 1979.0},
    "A100": {"bf16": 312.0, "fp8": None},
    "H20": {"bf16": 148.0, "fp8": 296.0},
    "B200": {"bf16": 2250.0, "fp8": 4500.0},
}
PRECISIONS = ("bf16", "fp8")
# Used when neither --mfu nor --gpu-hours-per-trillion is given: the bf16 MFU implied by the V3 report (180K H800
# GPU-hours per trillion tokens for the v3 preset at seq 4096 with MTP), so the defaults reproduce 2.664M GPU-hours.
DEFAULT_MFU = 0.4065
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_TOKENS_RE = re.compile(r"^\s*((?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([KMBGT]?)\s*$", re.IGNORECASE)


def parse_tokens(text: str | int | float) -> int:
    """'14.8T' -> 14_800_000_000_000. Suffixes K, M, B (or G), T (powers of 1000); plain and 1e12 forms too."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _TOKENS_RE.match(str(text))
        if not m:
            raise ConfigError(f"token count {text!r} is not a number with an optional K/M/B/T suffix "
                              f"(e.g. 14.8T, 500B, 2e9)")
        value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if not value >= 1:
        raise ConfigError(f"token count {text!r} must be at least 1 token")
    return round(value)


def load_config(spec: str):
    """A ModelConfig from a preset name, a config.json path, or a checkpoint dir holding config.json."""
    from nanoseek.config import PRESETS, ModelConfig

    if spec in PRESETS:
        return ModelConfig.from_name(spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: not found; --model DIR needs a config.json in it")
    elif not path.is_file():
        raise ConfigError(f"--model {spec!r}: not a preset ({', '.join(PRESETS)}), a config.json file or a "
                          f"checkpoint dir")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    try:
        return ModelConfig.from_hf(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except TypeError as e:      # a key with the wrong kind of value reaches the dataclass constructor
        raise ConfigError(f"{path}: not a DeepSeek config ({e})") from None


def peak_tflops(gpu: str, precision: str) -> tuple[str, float]:
    """(canonical GPU name, dense peak TFLOP/s at `precision`); a ConfigError for unknown GPUs or precisions."""
    name = {k.upper(): k for k in GPUS}.get(gpu.strip().upper())
    if name is None:
        raise ConfigError(f"unknown GPU {gpu!r}; choose one of {', '.join(GPUS)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    peak = GPUS[name][precision]
    if peak is None:
        raise ConfigError(f"{name} has no {precision} tensor cores; use --precision bf16")
    return name, peak


@dataclass
class CostEstimate:
    model: str
    total_params: int
    activated_params: int
    mtp_params: int               # unique MTP params (0 when the model has none or mtp is off)
    mtp: bool
    seq_len: int
    flops_per_token: int          # training FLOPs per token (fwd + bwd)
    flops_breakdown: dict
    tokens: int
    total_flops: float
    gpu: str
    precision: str
    peak_tflops: float            # dense, per GPU
    mfu: float
    achieved_tflops: float        # per GPU
    gpu_hours_per_trillion: float
    gpu_hours: float
    num_gpus: int
    days: float
    price_per_gpu_hour: float
    cost_usd: float


def estimate(cfg, tokens: int, seq_len: int = 4096, gpu: str = "H800", precision: str = "bf16",
             mfu: float | None = None, gpu_hours_per_trillion: float | None = None, num_gpus: int = 2048,
             price: float = 2.0, mtp: bool | None = None, model_name: str = "") -> CostEstimate:
    """Training cost of `tokens` tokens of `cfg`. Give mfu or gpu_hours_per_trillion (neither: DEFAULT_MFU).
    mtp None: include the MTP modules when the config has them (V3 trains them on every token)."""
    from nanoseek.accounting import count_params, flops_per_token

    if mfu is not None and gpu_hours_per_trillion is not None:
        raise ConfigError("give --mfu or --gpu-hours-per-trillion, not both")
    if mfu is not None and not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu}: must be a fraction in (0, 1], e.g. 0.4")
    if gpu_hours_per_trillion is not None and not gpu_hours_per_trillion > 0:
        raise ConfigError(f"--gpu-hours-per-trillion {gpu_hours_per_trillion}: must be positive")
    if seq_len < 1:
        raise ConfigError(f"--seq-len {seq_len}: must be at least 1")
    if num_gpus < 1:
        raise ConfigError(f"--num-gpus {num_gpus}: must be at least 1")
    if not price >= 0:
        raise ConfigError(f"--price {price}: must be non-negative")
    gpu, peak = peak_tflops(gpu, precision)
    if mtp is None:
        mtp = cfg.num_nextn_predict_layers > 0
    params = count_params(cfg)
    flops = flops_per_token(cfg, seq_len, training=True, mtp=mtp)
    total_flops = float(tokens) * flops.total
    if gpu_hours_per_trillion is not None:
        gpu_hours = gpu_hours_per_trillion * tokens / 1e12
        achieved = total_flops / (gpu_hours * 3600) / 1e12
        mfu = achieved / peak
    else:
        mfu = DEFAULT_MFU if mfu is None else mfu
        achieved = mfu * peak
        gpu_hours = total_flops / (achieved * 1e12 * 3600)
        gpu_hours_per_trillion = gpu_hours * 1e12 / tokens
    breakdown = {k: v for k, v in asdict(flops).items() if k not in ("total", "multiplier")}
    return CostEstimate(
        model=model_name, total_params=params.total, activated_params=params.activated,
        mtp_params=params.mtp if mtp else 0, mtp=mtp, seq_len=seq_len, flops_per_token=flops.total,
        flops_breakdown=breakdown, tokens=tokens, total_flops=total_flops, gpu=gpu, precision=precision,
        peak_tflops=peak, mfu=mfu, achieved_tflops=achieved, gpu_hours_per_trillion=gpu_hours_per_trillion,
        gpu_hours=gpu_hours, num_gpus=num_gpus, days=gpu_hours / num_gpus / 24, price_per_gpu_hour=price,
        cost_usd=gpu_hours * price)


def _si(x: float, unit: str = "") -> str:
    """1.2345e12 -> '1.23T'. Thousand-based, like the papers' 671B / 14.8T."""
    for div, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.4g}{suffix}{unit}"
    return f"{x:.4g}{unit}"


def format_table(e: CostEstimate, measured: bool) -> str:
    """The human-readable report: one aligned `label  value` row per quantity."""
    mtp = f" (+{_si(e.mtp_params)} MTP)" if e.mtp else ""
    how = ("implied by the throughput given" if measured else "assumed")
    rows = [
        ("model", e.model),
        ("total params", f"{_si(e.total_params)}{mtp}"),
        ("activated params", f"{_si(e.activated_params)} per token"),
        ("training FLOPs/token", f"{e.flops_per_token / 1e9:.1f} GFLOP (seq {e.seq_len}, fwd+bwd, "
                                 f"MTP {'on' if e.mtp else 'off'})"),
        ("tokens", _si(e.tokens)),
        ("total FLOPs", f"{e.total_flops:.3e}"),
        ("GPU", f"{e.gpu}, dense {e.precision} peak {e.peak_tflops:g} TFLOP/s"),
        ("achieved", f"{e.achieved_tflops:.1f} TFLOP/s per GPU"),
        ("MFU", f"{e.mfu:.4f} ({100 * e.mfu:.1f}% of {e.precision} peak, {how})"),
        ("GPU-hours / 1T tokens", f"{e.gpu_hours_per_trillion:,.0f}"),
        ("GPU-hours", f"{e.gpu_hours / 1e6:.3f}M"),
        ("wall clock", f"{e.days:.1f} days on {e.num_gpus} GPUs"),
        ("cost", f"${e.cost_usd / 1e6:.3f}M at ${e.price_per_gpu_hour:.2f}/GPU-hour"),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--preset", dest="model", default="v3",
                   help="preset name (tiny, small, v2-lite, v3), a config.json, "
                        "or a checkpoint dir containing config.json")
    p.add_argument("--tokens", default="14.8T", help="training tokens, with an optional K/M/B/T suffix")
    p.add_argument("--seq-len", type=int, default=4096, help="training sequence length (attention FLOPs)")
    p.add_argument("--gpu", default="H800", help=f"GPU type: {', '.join(GPUS)}")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16",
                   help="which dense peak MFU is measured against (V3 ran its GEMMs in fp8)")
    rate = p.add_mutually_exclusive_group()
    # SUPPRESS: no "(default: None)" in --help; run() reads these with getattr.
    rate.add_argument("--mfu", type=float, default=argparse.SUPPRESS,
                      help=f"model FLOPs utilization, a fraction of the peak ({DEFAULT_MFU} when neither this "
                           f"nor --gpu-hours-per-trillion is given)")
    rate.add_argument("--gpu-hours-per-trillion", type=float, default=argparse.SUPPRESS,
                      help="measured GPU-hours per trillion tokens (V3: 180000); prints the implied MFU")
    p.add_argument("--num-gpus", type=int, default=2048, help="GPUs in the cluster (for the wall-clock days)")
    p.add_argument("--price", type=float, default=2.0, help="dollars per GPU-hour")
    p.add_argument("--mtp", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                   help="count the MTP modules' FLOPs (default: when the model has MTP layers)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.model)
    measured = getattr(args, "gpu_hours_per_trillion", None)
    e = estimate(cfg, parse_tokens(args.tokens), seq_len=args.seq_len, gpu=args.gpu, precision=args.precision,
                 mfu=getattr(args, "mfu", None), gpu_hours_per_trillion=measured, num_gpus=args.num_gpus,
                 price=args.price, mtp=getattr(args, "mtp", None), model_name=args.model)
    if args.json:
        print(json.dumps(asdict(e), indent=2))
    else:
        print(format_table(e, measured=measured is not None))
    return 0
