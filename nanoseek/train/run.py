"""A training run's directory and lifecycle, shared by the recipes: resolving `--model`, refusing to clobber a
run, saving the resolved config and provenance, and saving/restoring resumable checkpoints over all ranks.

Run dir layout:
    config.yaml         the resolved run config (the base for --resume)
    model_config.json   the model's HF config as trained (vocab_size fitted to the tokenizer)
    run.json            git revision, versions, world size, device, and one entry per launch
    metrics.jsonl       one JSON object per step; *.png plots
    tokenizer/          the tokenizer the data was encoded with
    checkpoints/step_NNNNNNNN/state.pt   resumable checkpoints (nanoseek.checkpoint.native)
    final/              the trained model in HF format, with the tokenizer
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from nanoseek.checkpoint import native
from nanoseek.config import PRESETS, ModelConfig
from nanoseek.errors import ConfigError
from nanoseek.parallel.distributed import DistInfo, all_gather_objects, barrier
from nanoseek.train.config import from_dict, load_yaml, save_yaml
from nanoseek.train.loop import git_revision, rng_state, set_rng_state

CONFIG_NAME = "config.yaml"


def resolve_model(spec: str) -> tuple[ModelConfig, Path | None]:
    """--model -> (config, checkpoint dir to load weights from, or None for a fresh init).

    A preset name, a HF-format checkpoint dir (config.json + safetensors), or a config.json / .yaml file."""
    from nanoseek.checkpoint.hf import config_from_dir

    if spec in PRESETS:
        return ModelConfig.from_name(spec), None
    path = Path(spec)
    if path.is_dir():
        return config_from_dir(path)[1], path
    if path.is_file():
        if path.suffix in (".yaml", ".yml"):
            return ModelConfig.from_hf(load_yaml(path)), None
        try:
            return ModelConfig.from_hf(json.loads(path.read_text(encoding="utf-8"))), None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    raise ConfigError(f"--model {spec!r}: not a preset ({', '.join(PRESETS)}), a checkpoint dir or a config file")


def saved_config(run_dir: str | Path, cls) -> dict:
    """The resolved config a previous launch saved in run_dir (validated against `cls`), or {}."""
    path = Path(run_dir) / CONFIG_NAME
    return from_dict(cls, load_yaml(path), source=str(path)) if path.is_file() else {}


def run_config(cls, args):
    """The config of a recipe's command line: with --resume, the run dir's saved config is the base that the
    flags given now override (so a resumed run keeps its settings without repeating them)."""
    from nanoseek.train.config import config_from_args

    cfg = config_from_args(cls, args)
    return config_from_args(cls, args, base=saved_config(cfg.out, cls)) if cfg.resume else cfg


def find_resume_point(run_dir: str | Path, resume: bool) -> Path | None:
    """The checkpoint to resume from. Without --resume an existing run is an error (never silently overwritten);
    with --resume and no checkpoint yet (killed before its first save) the run starts over at step 0."""
    latest = native.latest_checkpoint(run_dir)
    if latest is not None and not resume:
        raise ConfigError(f"{run_dir} already holds checkpoints (latest {latest.name}); pass --resume to continue "
                          f"it or choose another --out")
    return latest if resume else None


def write_run_files(run_dir: Path, config: dict, model_config: ModelConfig, dist: DistInfo, **info) -> None:
    """config.yaml, model_config.json and run.json (rank 0 only)."""
    if not dist.is_main:
        return
    import nanoseek

    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(config, run_dir / CONFIG_NAME)
    (run_dir / "model_config.json").write_text(json.dumps(model_config.to_hf(), indent=2) + "\n")
    path = run_dir / "run.json"
    launches = json.loads(path.read_text())["launches"] if path.is_file() else []
    launches.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv, "world_size": dist.world_size,
                     "device": str(dist.device), **info})
    git = git_revision()
    path.write_text(json.dumps({"git_revision": git["revision"], "git_dirty": git["dirty"],
                                "nanoseek": nanoseek.__version__, "torch": torch.__version__,
                                "launches": launches}, indent=2) + "\n")


def save_training_checkpoint(run_dir: Path, step: int, model, optimizer, dist: DistInfo, *, loaders: dict,
                             keep_last: int, **extra) -> dict | None:
    """Checkpoint `step` over all ranks: a collective (every rank calls it); rank 0 writes. loaders: this rank's
    {stream id: loader}. Returns the full model state dict on rank 0 (for export), None elsewhere."""
    model_state, optim_state = native.gather_state(model, optimizer)
    streams: dict = {}
    for part in all_gather_objects({k: v.state_dict() for k, v in loaders.items()}):
        streams.update(part)
    rngs = all_gather_objects(rng_state())
    if dist.is_main:
        native.save_checkpoint(run_dir, step, {"step": step, "model": model_state, "optimizer": optim_state,
                                               "loaders": streams, "rng": rngs, "world_size": dist.world_size,
                                               **extra}, keep_last=keep_last)
    barrier()                      # nobody races ahead (or exits) before the checkpoint is on disk
    return model_state if dist.is_main else None


def load_training_checkpoint(path: Path, model, optimizer, dist: DistInfo, *, loaders: dict,
                             model_config: ModelConfig) -> dict:
    """Restore model, optimizer, this rank's data streams and RNG states from checkpoint `path`; returns the
    checkpoint dict (its "step" is where training continues)."""
    state = native.load_checkpoint(path)
    saved = state.get("model_config")
    if saved is not None and saved != model_config.to_hf():
        diff = sorted(k for k in set(saved) | set(model_config.to_hf()) if saved.get(k) != model_config.to_hf().get(k))
        raise ConfigError(f"{path}: the checkpoint's model differs from this run's in {', '.join(diff)}; "
                          f"resume with the same --model")
    native.restore_state(model, optimizer, state["model"], state["optimizer"])
    for stream, loader in loaders.items():
        if stream not in state["loaders"]:
            raise ConfigError(f"{path}: no data stream {stream} in the checkpoint; resume with the same "
                              f"--batch-size and --micro-batch-size")
        loader.load_state_dict(state["loaders"][stream])
    if state.get("world_size") == dist.world_size:     # with another process count, RNG streams cannot line up
        set_rng_state(state["rng"][dist.rank])
    return state
