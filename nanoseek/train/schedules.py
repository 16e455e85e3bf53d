"""Schedules as pure functions of the step: learning rate (warmup + cosine, or warmup-stable-decay) and piecewise
constants for the other coefficients (the MTP weight lambda, the balancing speed gamma).

The V3 report's schedules, in these terms (14.8T tokens):
  lr:     linear warmup over 2K steps, constant 2.2e-4, cosine decay to 2.2e-5 (min_lr_ratio 0.1): a WSD shape
  lambda: 0.3 for the first 10T tokens, then 0.1           -> "0.3,0.1@0.676"
  gamma:  0.001, then 0 for the last 500B tokens            -> "0.001,0@0.966"
Being functions of the step, they need no saved state: resuming at step s gives the same values.
"""
from __future__ import annotations

import math

from nanoseek.errors import ConfigError

LR_SCHEDULES = ("cosine", "wsd")


def lr_at(step: int, total_steps: int, peak: float, warmup_steps: int = 0, schedule: str = "cosine",
          min_lr_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    warmup: linear from peak/warmup_steps to peak over the first warmup_steps steps.
    cosine: then a half cosine from peak down to peak*min_lr_ratio at the last step.
    wsd:    then constant (stable) until the last decay_frac of the steps, which decay linearly to
            peak*min_lr_ratio (Hu et al. 2024, MiniCPM): a run can be extended from any stable-phase checkpoint.
    """
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"lr_schedule {schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    floor = peak * min_lr_ratio
    if schedule == "cosine":
        span = max(total_steps - 1 - warmup_steps, 1)
        progress = min((step - warmup_steps) / span, 1.0)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_steps = int(round(decay_frac * total_steps))
    decay_start = max(total_steps - decay_steps, warmup_steps)
    if step < decay_start or decay_steps == 0:
        return peak
    progress = min((step - decay_start + 1) / max(total_steps - decay_start, 1), 1.0)
    return peak + (floor - peak) * progress


def parse_piecewise(spec: str | float | int, name: str = "schedule") -> list[tuple[float, float]]:
    """'v0' or 'v0,v1@f1,v2@f2,...' -> [(0, v0), (f1, v1), ...]: value v_j from fraction f_j of training on.

    Fractions must be in (0, 1] and increasing. A bare number is a constant.
    """
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return [(0.0, float(spec))]
    parts = [p.strip() for p in str(spec).split(",")]
    out: list[tuple[float, float]] = []
    try:
        for i, part in enumerate(parts):
            if i == 0:
                if "@" in part:
                    raise ValueError("the first value starts at 0: write it without @")
                out.append((0.0, float(part)))
                continue
            value, _, frac = part.partition("@")
            if not frac:
                raise ValueError(f"{part!r} needs @FRACTION")
            f = float(frac)
            if not out[-1][0] < f <= 1.0:
                raise ValueError(f"fraction {f} must be in (previous fraction, 1]")
            out.append((f, float(value)))
    except ValueError as e:
        raise ConfigError(f"{name} {spec!r}: {e}; write 'VALUE' or 'VALUE,VALUE@FRACTION,...' "
                          f"(e.g. '0.3,0.1@0.676')") from None
    return out


def piecewise_at(pieces: list[tuple[float, float]], step: int, total_steps: int) -> float:
    """Value of a parsed piecewise schedule at step `step` (0-based) of `total_steps`."""
    progress = step / max(total_steps, 1)
    value = pieces[0][1]
    for start, v in pieces:
        if progress >= start:
            value = v
    return value
