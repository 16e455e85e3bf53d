"""Hugging Face-format checkpoints: config.json + safetensors under DeepSeek's tensor names.

One name table maps nanoseek's state dict to checkpoint names; load, save and `nanoseek convert` all use it:
- routed experts: nanoseek stacks them, `mlp.experts.gate_up_proj` (E, 2I, H) and `mlp.experts.down_proj` (E, H, I);
  checkpoints store `mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight` (gate = rows [:I], up = rows [I:]).
- MTP module k: nanoseek `mtp.{k}.*` is checkpoint `model.layers.{num_hidden_layers + k}.*`. DeepSeek also stores
  `model.layers.{L+k}.embed_tokens.weight` and `.shared_head.head.weight`, copies of the main embedding and
  lm_head, which nanoseek shares (the V3 report: MTP shares both with the main model). Save writes the copies so
  files match DeepSeek's layout; load skips them, because a shared parameter can hold only one value.
- everything else has the same name on both sides.

Loading builds the model on the meta device and allocates it once with `to_empty`, then streams tensors one at
a time from memory-mapped safetensors (single file or sharded with model.safetensors.index.json), dequantizing
block-FP8 weights, so peak memory is about one copy of the weights plus the largest tensor. Names and shapes are
checked from the file headers before any data is read; every mismatch is one line naming the file and tensor.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from nanoseek.checkpoint.fp8 import FP8_DTYPE, SCALE_SUFFIX, block_size, check_scale_shape, dequantize_fp8_blocks
from nanoseek.config import ModelConfig
from nanoseek.errors import CheckpointError, ConfigError

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
FP32_ALWAYS = ("e_score_correction_bias",)   # the balancing bias moves in 1e-3 steps bf16 cannot hold near 1


# ----------------------------------------------------------------------------------------------- name table
@dataclass(frozen=True)
class Slot:
    """Where one checkpoint tensor lives in nanoseek's state dict: `state[param][index]`, of `shape`."""
    param: str
    index: tuple
    shape: tuple


_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")


def checkpoint_names(param: str, shape: tuple, cfg: ModelConfig) -> list[tuple[str, tuple, tuple]]:
    """nanoseek state-dict entry -> [(checkpoint name, index into the nanoseek tensor, checkpoint shape)]."""
    m = _MTP.match(param)
    name = f"model.layers.{cfg.num_hidden_layers + int(m[1])}.{m[2]}" if m else param
    m = _EXPERTS.match(name)
    if not m:
        return [(name, (), tuple(shape))]
    prefix, kind = m[1], m[2]
    E, rows, cols = shape
    out = []
    for e in range(E):
        if kind == "gate_up_proj":                    # (E, 2I, H): gate rows then up rows
            I = rows // 2
            out.append((f"{prefix}.{e}.gate_proj.weight", (e, slice(0, I)), (I, cols)))
            out.append((f"{prefix}.{e}.up_proj.weight", (e, slice(I, rows)), (I, cols)))
        else:                                         # (E, H, I)
            out.append((f"{prefix}.{e}.down_proj.weight", (e,), (rows, cols)))
    return out


def shared_copies(cfg: ModelConfig, num_mtp: int) -> dict[str, str]:
    """DeepSeek's per-MTP-layer copies of shared tensors: checkpoint name -> nanoseek parameter it copies."""
    out = {}
    for k in range(num_mtp):
        layer = f"model.layers.{cfg.num_hidden_layers + k}"
        out[f"{layer}.embed_tokens.weight"] = "model.embed_tokens.weight"
        out[f"{layer}.shared_head.head.weight"] = "lm_head.weight"
    return out


def name_table(shapes: dict[str, tuple], cfg: ModelConfig) -> dict[str, Slot]:
    """Every checkpoint tensor a model with these state-dict shapes reads and writes (shared copies excluded)."""
    table = {}
    for param, shape in shapes.items():
        if param == "lm_head.weight" and cfg.tie_word_embeddings:
            continue                                  # tied: HF stores only the embedding
        for name, index, ckpt_shape in checkpoint_names(param, shape, cfg):
            table[name] = Slot(param, index, ckpt_shape)
    return table


def meta_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32):
    """The model with no storage (meta device): its state-dict shapes cost nothing to compute."""
    from nanoseek.model import DeepseekForCausalLM

    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    return model.to(dtype)                            # the router keeps fp32 (Gate._apply)


def expected_tensors(cfg: ModelConfig) -> tuple[dict[str, Slot], set[str]]:
    """(required checkpoint tensors, tensors allowed but not needed) for a config."""
    shapes = {n: tuple(t.shape) for n, t in meta_model(cfg).state_dict().items()}
    optional = set(shared_copies(cfg, cfg.num_nextn_predict_layers))
    if cfg.tie_word_embeddings:
        optional.add("lm_head.weight")
    return name_table(shapes, cfg), optional


def has_mtp_weights(keys, cfg: ModelConfig) -> bool:
    prefixes = tuple(f"model.layers.{cfg.num_hidden_layers + k}." for k in range(cfg.num_nextn_predict_layers))
    return any(k.startswith(prefixes) for k in keys)


# ----------------------------------------------------------------------------------------------- reading
def read_config(path: str | os.PathLike) -> dict:
    """config.json of a checkpoint directory, as a dict."""
    path = Path(path)
    f = path / CONFIG_NAME
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if not f.is_file():
        raise CheckpointError(f"{f}: not found; a HF-format checkpoint dir needs config.json and *.safetensors")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def config_from_dir(path: Path) -> tuple[dict, ModelConfig]:
    """(config.json as written, ModelConfig); a ConfigError names the file."""
    d = read_config(path)
    try:
        return d, ModelConfig.from_hf(d)
    except ConfigError as e:
        raise ConfigError(f"{Path(path) / CONFIG_NAME}: {e}") from None


class SafetensorsReader:
    """Tensors of a checkpoint directory, by name, memory-mapped: single-file or sharded with an index.

    One shard is mapped at a time: pages read through a mapping count in the process's RSS until it is unmapped,
    so keeping every shard open would show a second copy of the model. `keys()` is in file order, so walking it
    maps each shard once. Measured loading a 0.93 GB fp32 model from 200 MB shards: peak RSS +1.86 GB with every
    shard kept mapped (half of it file pages), +1.11 GB one shard at a time (the model plus about one shard).
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        self.path, self._safe_open, self._error = Path(path), safe_open, SafetensorError
        self._open: tuple[str, object] | None = None
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
            self.source = index
            for file in sorted(set(weight_map.values())):
                if not (self.path / file).is_file():
                    raise CheckpointError(f"{index}: lists shard {file!r}, which is missing")
            # File order, then the index's order: reads walk each shard front to back.
            self.file_of = {k: weight_map[k] for k in sorted(weight_map, key=lambda k: weight_map[k])}
        elif (self.path / SINGLE_FILE).is_file():
            self.source = self.path / SINGLE_FILE
            self.file_of = {k: SINGLE_FILE for k in self._handle(SINGLE_FILE).keys()}
        else:
            raise CheckpointError(f"{self.path}: no {SINGLE_FILE} or {INDEX_NAME}")

    def _handle(self, file: str):
        if self._open is None or self._open[0] != file:
            self.close()
            try:
                handle = self._safe_open(str(self.path / file), "pt")
            except (self._error, OSError) as e:
                raise CheckpointError(f"{self.path / file}: not a readable safetensors file ({e})") from None
            self._open = (file, handle.__enter__())
        return self._open[1]

    def where(self, key: str) -> Path:
        return self.path / self.file_of[key] if key in self.file_of else self.source

    def keys(self) -> list[str]:
        return list(self.file_of)

    def _slice(self, key: str):
        try:
            return self._handle(self.file_of[key]).get_slice(key)
        except self._error as e:
            raise CheckpointError(f"{self.where(key)}: tensor {key!r} listed in the index is not there ({e})") from None

    def shape(self, key: str) -> tuple:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype, from the header (no data read)."""
        return _SAFETENSORS_DTYPES[self._slice(key).get_dtype()]

    def is_fp8(self, key: str) -> bool:
        return self.dtype(key) == FP8_DTYPE

    def get(self, key: str) -> torch.Tensor:
        self._slice(key)                              # turns a stale index entry into a CheckpointError
        return self._handle(self.file_of[key]).get_tensor(key)

    def close(self) -> None:
        if self._open is not None:
            self._open[1].__exit__(None, None, None)      # unmaps the shard
            self._open = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def validate(reader: SafetensorsReader, table: dict[str, Slot], optional: set[str], block) -> None:
    """Check names and shapes from the headers (no tensor data read); raise on the first problem."""
    keys = set(reader.keys())
    for key in reader.keys():
        where = reader.where(key)
        if key.endswith(SCALE_SUFFIX):
            base = key[: -len(SCALE_SUFFIX)]
            if base not in table or base not in keys:
                raise CheckpointError(f"{where}: unexpected tensor {key!r} (no FP8 weight {base!r} to scale)")
            try:
                check_scale_shape(base, reader.shape(base), reader.shape(key), block)
            except CheckpointError as e:
                raise CheckpointError(f"{where}: {e}") from None
        elif key in table:
            shape, want = reader.shape(key), table[key].shape
            if shape != want:
                raise CheckpointError(f"{where}: tensor {key!r} has shape {shape}; config.json implies {want}")
            if reader.is_fp8(key) and key + SCALE_SUFFIX not in keys:
                raise CheckpointError(f"{where}: FP8 tensor {key!r} has no {key + SCALE_SUFFIX!r} to dequantize it")
        elif key not in optional:
            raise CheckpointError(f"{where}: unexpected tensor {key!r} (not part of the model config.json describes)")
    for key in table:
        if key not in keys:
            raise CheckpointError(f"{reader.source}: tensor {key!r} is missing (config.json's model needs it)")


def read_tensor(reader: SafetensorsReader, key: str, dtype: torch.dtype, block) -> torch.Tensor:
    """One checkpoint tensor, dequantized from block FP8 when stored so."""
    t = reader.get(key)
    if t.dtype == FP8_DTYPE:
        return dequantize_fp8_blocks(t, reader.get(key + SCALE_SUFFIX), block, dtype=dtype, name=key)
    return t


# ----------------------------------------------------------------------------------------------- writing
def parse_size(size: str | int) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2^20, as transformers' max_shard_size."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise CheckpointError(f"max shard size {size!r}: use a number of bytes or e.g. '5GB', '500MB', '1GiB'")
    unit = m[2] or "B"
    base = 1024 if "I" in unit else 1000
    return int(float(m[1]) * base ** "BKMGT".index(unit[0]))


# A group is tensors written together (an FP8 weight and its scale): ([(name, nbytes)], produce() -> {name: t}).
Group = tuple[list[tuple[str, int]], Callable[[], dict[str, torch.Tensor]]]


def write_safetensors(directory: Path, groups: list[Group], max_shard_size: str | int,
                      on_tensor: Callable[[int], None] | None = None) -> list[str]:
    """Write groups into model.safetensors, or shards + model.safetensors.index.json when over max_shard_size.

    Shards are planned from sizes first (so the "-of-N" names are known), then filled one at a time: memory
    holds at most one shard's tensors.
    """
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    shards: list[list[Group]] = [[]]
    size = 0
    for g in groups:
        n = sum(b for _, b in g[0])
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(g)
        size += n
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for file, shard in zip(names, shards):
        tensors = {}
        for _, produce in shard:
            out = produce()
            tensors.update(out)
            if on_tensor:
                on_tensor(len(out))
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        os.chmod(directory / file, _umasked(0o666))    # safetensors creates 0600 files
        for k, t in tensors.items():
            weight_map[k] = file
            total += t.numel() * t.element_size()
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp dir beside `target`; on success it becomes `target` (replacing an old one), on any
    failure it is removed and `target` is left as it was."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target}: exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, _umasked(0o777))                # mkdtemp makes 0700; give what mkdir would
        yield tmp
        if target.exists():
            # Two renames on one filesystem: the old dir is parked, never half-overwritten; put back on failure.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(old / "prev")
            try:
                tmp.rename(target)
            except BaseException:
                (old / "prev").rename(target)
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umasked(mode: int) -> int:
    mask = os.umask(0)                                # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mode & ~mask


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------- load / save
def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a HF-format DeepSeek-V3/V2 checkpoint dir (bf16/fp32, or block FP8: dequantized to `dtype`).

    When config.json asks for MTP but the files hold none (transformers drops MTP weights on save), the main
    model is loaded without MTP (model.config.num_nextn_predict_layers = 0) and a warning says so: random MTP
    weights would silently make speculative decoding useless.
    """
    path = Path(path)
    _, cfg = config_from_dir(path)
    block = block_size(cfg.quantization_config)
    with SafetensorsReader(path) as reader:
        if cfg.num_nextn_predict_layers and not has_mtp_weights(reader.keys(), cfg):
            warnings.warn(f"{path}: config.json has num_nextn_predict_layers={cfg.num_nextn_predict_layers} but "
                          f"the checkpoint has no MTP weights; loaded the main model without MTP", stacklevel=2)
            cfg = cfg.replace(num_nextn_predict_layers=0)
        # Weights are dequantized on load, so the in-memory model (and anything saved from it) is not FP8.
        cfg = cfg.replace(quantization_config=None)
        table, optional = expected_tensors(cfg)
        validate(reader, table, optional, block)

        model = meta_model(cfg, dtype).to_empty(device=device)
        # to_empty gives a tied head its own storage: tie it again. (RoPE frequencies are computed on the CPU
        # whatever the default device, so meta construction leaves them intact.)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        state = model.state_dict()
        with torch.no_grad():
            for key in reader.keys():                 # file order: each shard is mapped once
                if key not in table:
                    continue                          # a *_scale_inv (read with its weight) or a shared MTP copy
                slot = table[key]
                target = state[slot.param][slot.index]
                target.copy_(read_tensor(reader, key, target.dtype, block))
    return model.eval()


def save_model(model, path: str | os.PathLike, dtype: torch.dtype | None = None,
               max_shard_size: str | int = "5GB") -> None:
    """Write `model` as a HF-format checkpoint dir that transformers and DeepSeek's code load.

    dtype None keeps each tensor's dtype (an exact round trip; the router stays fp32 as it is in memory); a dtype
    casts every tensor to it except e_score_correction_bias, which stays fp32 as in DeepSeek's files.
    The directory appears atomically: written beside `path`, then renamed over it.
    """
    cfg: ModelConfig = model.config
    state = model.state_dict()
    num_mtp = len(getattr(model, "mtp", ()))
    if num_mtp != cfg.num_nextn_predict_layers:
        raise ValueError(f"model has {num_mtp} MTP modules but its config says {cfg.num_nextn_predict_layers}")
    table = name_table({n: tuple(t.shape) for n, t in state.items()}, cfg)
    sources = {key: (slot.param, slot.index) for key, slot in table.items()}
    sources.update({key: (param, ()) for key, param in shared_copies(cfg, num_mtp).items()})

    def out_dtype(key: str, t: torch.Tensor) -> torch.dtype:
        return torch.float32 if key.endswith(FP32_ALWAYS) else dtype or t.dtype

    def group(key: str, param: str, index: tuple) -> Group:
        t = state[param][index]
        nbytes = t.numel() * out_dtype(key, t).itemsize

        def produce() -> dict[str, torch.Tensor]:
            # Lazy, so a GPU model is copied to CPU one shard at a time. A tensor still sharing the model's
            # storage (an expert slice, a shared MTP copy) is cloned: safetensors refuses aliased tensors.
            out = t.detach().to("cpu", out_dtype(key, t))
            return {key: out.clone() if out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                    else out.contiguous()}

        return [(key, nbytes)], produce

    groups = [group(key, param, index) for key, (param, index) in sources.items()]
    config = cfg.to_hf()
    config.pop("quantization_config", None)           # nanoseek's in-memory weights are never FP8
    config["torch_dtype"] = dtype_name(dtype or state["model.embed_tokens.weight"].dtype)
    with atomic_dir(path) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        write_safetensors(tmp, groups, max_shard_size)
