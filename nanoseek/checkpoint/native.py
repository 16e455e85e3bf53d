"""Resumable training checkpoints: RUN/checkpoints/step_NNNNNNNN/state.pt, written atomically, newest K kept.

A checkpoint holds everything a run needs to continue exactly as if it had never stopped: the model (weights and
the balancing biases, which are buffers), the optimizer state, the step (every schedule is a function of it),
each data stream's position and unread tokens, and every rank's RNG states. Model and optimizer state are saved
"full" (unsharded, by parameter name) through torch.distributed.checkpoint's state-dict API, so one file serves a
single process, DDP and FSDP2 alike, and exports to HF format without the run.

Atomicity: the state is written into a temp dir beside the target, fsynced, then renamed into place (a rename
within one filesystem is atomic). A process killed mid-write leaves only a hidden temp dir, which the next save
removes; `latest_checkpoint` sees complete checkpoints only. Only rank 0 writes.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from nanoseek.checkpoint.hf import atomic_dir
from nanoseek.errors import CheckpointError

CHECKPOINTS = "checkpoints"
STATE_NAME = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_STALE = re.compile(r"^\.step_\d+\.(tmp|old)-")   # atomic_dir's temp names, left behind by a killed writer


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, dir)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_NAME).is_file()]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict, keep_last: int | None = None) -> Path:
    """Write `state` as checkpoint `step` of the run (atomically), then keep only the newest `keep_last`."""
    target = step_dir(run_dir, step)
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    for p in root.iterdir():                # a previous writer killed mid-save left its temp dir
        if _STALE.match(p.name):
            shutil.rmtree(p, ignore_errors=True)
    with atomic_dir(target) as tmp:
        with open(tmp / STATE_NAME, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())            # the bytes are on disk before the rename makes them visible
        _fsync_dir(tmp)
    _fsync_dir(root)
    if keep_last:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The state dict of a checkpoint dir (or of its state.pt), on CPU."""
    path = Path(path)
    file = path / STATE_NAME if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{path}: no {STATE_NAME}; not a nanoseek training checkpoint")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:   # a truncated or foreign file: say which, in one line
        raise CheckpointError(f"{file}: cannot read the checkpoint ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- model + optimizer state
def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state dicts keyed by parameter name. A collective: every rank
    calls it; under FSDP2 only rank 0 receives the tensors (the others get empty dicts)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def restore_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Load full state dicts into a plain, DDP or FSDP2 model (each rank keeps its own shard)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    # The saved param groups carry the saving run's kernel choice (fused for plain tensors, foreach for FSDP2's
    # DTensors): keep this run's, which build_optimizer chose for these parameters.
    kernels = [{k: group[k] for k in ("fused", "foreach") if k in group} for group in optimizer.param_groups]
    # strict=False: a parameter that never had a gradient has no AdamW state yet (it gets one at its first step).
    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True,
                                                                                     strict=False))
    for group, kernel in zip(optimizer.param_groups, kernels):
        group.update(kernel)


def export_hf(model_config, model_state: dict, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write a model state dict (from a checkpoint's "model") as a HF-format dir, with the tokenizer if given:
    what `nanoseek.load_model`, `nanoseek generate` and transformers read."""
    from nanoseek.checkpoint.hf import meta_model, save_model
    from nanoseek.model.rope import RotaryEmbedding

    model = meta_model(model_config).to_empty(device="cpu")
    model.model.rotary = RotaryEmbedding(model_config)     # meta construction left the RoPE table empty
    if model_config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.load_state_dict(model_state, strict=True)
    save_model(model, out_dir)
    if tokenizer is not None:
        tokenizer.save(out_dir)
    return Path(out_dir)
