"""Training run configs: one dataclass per recipe, whose fields are the CLI options and the YAML keys.

`TrainConfig` holds what every training recipe shares (model, data, batch, optimizer, schedule, precision,
parallelism, checkpointing); a recipe subclasses it with its own fields. Each field carries its help text, so
`add_config_arguments` writes the argparse options (`--micro-batch-size` for `micro_batch_size`) and
`config_from_args` layers the sources: field defaults < saved run config (on --resume) < --config FILE.yaml <
flags given on the command line. Unknown YAML keys and ill-typed values are a ConfigError naming the key.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.errors import ConfigError


def option(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A config field with its help text (and allowed values)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- what to train, on what, where ---
    model: str = option("tiny", "model preset (tiny, small, v2-lite, v3), a HF-format checkpoint dir to continue "
                                "training, or a config.json file for a fresh model of that shape")
    data: list[str] = option([], "training files or dirs (.txt, .jsonl, .parquet); none: the generated corpus")
    data_field: str = option("text", "the text field of .jsonl records / column of .parquet files")
    tokenizer: str | None = option(None, "tokenizer dir; default: the --model checkpoint's, else a byte-level BPE of "
                                         "the model's vocab_size trained on the data (kept in OUT/tokenizer)")
    out: str = option("runs/pretrain", "run dir: metrics.jsonl, plots, config, checkpoints/, final/ (HF format)")
    resume: bool = option(False, "continue from the latest checkpoint in --out (its saved config is the base)")
    steps: int = option(1000, "optimizer steps to train")
    save_every: int = option(500, "save a resumable checkpoint every N steps (and at the end); 0: only at the end")
    keep_last: int = option(3, "keep the newest K checkpoints, delete older ones")
    seed: int = option(0, "seed for the model init and every random generator")
    # --- batch ---
    batch_size: int = option(8, "GLOBAL sequences per optimizer step, whatever the number of processes")
    micro_batch_size: int | None = option(None, "sequences per forward pass on one process (gradient accumulation "
                                                "fills the rest); default: batch_size / processes")
    seq_len: int = option(256, "tokens per training sequence")
    # --- optimizer and schedule (V3: AdamW 0.9/0.95, wd 0.1, clip 1.0) ---
    lr: float = option(1e-3, "peak learning rate")
    lr_schedule: str = option("cosine", "warmup then cosine decay, or warmup-stable-decay", ("cosine", "wsd"))
    warmup_steps: int = option(100, "linear warmup steps")
    min_lr_ratio: float = option(0.1, "final lr as a fraction of the peak (V3: 2.2e-5 / 2.2e-4)")
    decay_frac: float = option(0.2, "wsd: fraction of the steps spent decaying at the end")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices (not on norms and biases)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0: no clipping")
    # --- precision, speed, parallelism ---
    device: str = option("auto", "where to train: auto (GPU when there is one), cpu, cuda", ("auto", "cpu", "cuda"))
    precision: str = option("auto", "fp32, or bf16 autocast with fp32 weights; auto: bf16 on GPU, fp32 on CPU",
                            ("auto", "fp32", "bf16"))
    compile: bool = option(False, "torch.compile each decoder block")
    activation_checkpointing: bool = option(False, "recompute each block's activations in backward (less memory)")
    fp8: bool = option(False, "FP8 matmuls in the linear layers via torchao float8 (CUDA, compute capability 8.9+)")
    fsdp: bool = option(False, "under torchrun: shard parameters, gradients and optimizer state with FSDP2 "
                               "(fully_shard per block) instead of DDP")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str):
            raise ConfigError(f"config field {name!r} = {getattr(self, name)!r}: {why}")

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                bad(f.name, f"choose one of {', '.join(choices)}")
        for name in ("steps", "batch_size", "seq_len", "keep_last"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("save_every", "warmup_steps", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            bad("micro_batch_size", "must be >= 1")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            bad("batch_size", f"must be a multiple of micro_batch_size ({self.micro_batch_size})")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must be in [0, 1]")
        if not 0 <= self.decay_frac <= 1:
            bad("decay_frac", "must be in [0, 1]")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                bad(name, "must be in [0, 1)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- types
def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(hint) -> tuple[Any, bool]:
    """int | None -> (int, True); list[str] -> (list, False)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return (typing.get_origin(hint) or hint), False


def _coerce(cls, name: str, value: Any, source: str) -> Any:
    """Check a YAML value against the field's type; ints are accepted where floats are expected."""
    base, optional = _base_type(_field_types(cls)[name])

    def bad():
        want = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
                list: "a list of strings"}[base]
        raise ConfigError(f"{source}: key {name!r} = {value!r}: expected {want}{' or null' if optional else ''}")

    if value is None:
        if optional:
            return None
        bad()
    if base is bool:
        if not isinstance(value, bool):
            bad()
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            bad()
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad()
        value = float(value)
    elif base is list:
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            bad()
    elif base is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            bad()
        value = str(value)
    return value


def from_dict(cls, values: dict, source: str = "config") -> dict:
    """Validate a mapping of overrides for `cls` (keys may use - or _) -> {field name: value}."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ConfigError(f"{source}: unknown key {key!r}; known keys: {', '.join(sorted(names))}")
        out[name] = _coerce(cls, name, value, source)
    return out


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def save_yaml(values: dict, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")


# ----------------------------------------------------------------------------- argparse
def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """--config FILE.yaml plus one option per field of `cls`, with its help and default."""
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML file of option: value (any option below, - or _ in names); flags override it")
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        base, _ = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = " ".join(default) if isinstance(default, list) else default
        # SUPPRESS: a flag that was not given is absent from args, so it cannot override the YAML file.
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {shown})")
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif base is list:
            kw.update(nargs="+", metavar="PATH")
        else:
            kw.update(type=base, metavar=f.name.upper())
            if f.metadata.get("choices"):
                kw.update(choices=f.metadata["choices"], metavar=None)
        parser.add_argument(flag, **kw)


def given_flags(cls, args: argparse.Namespace) -> dict:
    """The options given on the command line, as {field name: value}."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def config_from_args(cls, args: argparse.Namespace, base: dict | None = None):
    """Build `cls` from: defaults < `base` (e.g. a resumed run's saved config) < args.config YAML < flags."""
    values = dict(base or {})
    if getattr(args, "config", None):
        values.update(from_dict(cls, load_yaml(args.config), source=str(args.config)))
    values.update(given_flags(cls, args))
    return cls(**values)
