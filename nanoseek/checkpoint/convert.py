"""`nanoseek convert SRC DST`: rewrite a HF-format DeepSeek checkpoint dir, tensor by tensor.

- FP8 -> bf16 (or --dtype): block-FP8 weights are dequantized, their `*_scale_inv` tensors dropped and
  `quantization_config` removed from config.json, so transformers and `load_model` read a plain checkpoint.
- --quantize fp8: the weights DeepSeek's FP8 release quantizes (see fp8.py) become float8_e4m3fn with a
  128x128-block `weight_scale_inv`; config.json gets DeepSeek's quantization_config.
- --dtype: casts every other floating tensor (e_score_correction_bias stays fp32, as in DeepSeek's files).

The source is validated against its config.json first (names and shapes, from the file headers), the model is
never materialized: tensors are read memory-mapped and written one output shard at a time. The output appears
atomically (built beside DST, then renamed); files other than weights and config.json (tokenizer, generation
config, license) are copied. Any HF-format DeepSeek-V3/V2 directory works as input, whoever wrote it.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

HELP = "convert a HF-format DeepSeek checkpoint: FP8 <-> bf16, dtype casts, resharding"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [128, 128]}   # as in DeepSeek-V3's config.json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="input checkpoint dir (config.json + *.safetensors)")
    p.add_argument("dst", metavar="DST", help="output dir; written atomically, replaced if it exists")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="cast the tensors not stored as FP8 to this dtype; None keeps each stored dtype, and FP8 "
                        "weights (without --quantize) dequantize to bf16")
    p.add_argument("--quantize", choices=["fp8"], default=None,
                   help="store the linear weights as DeepSeek block FP8 (e4m3, 128x128 scales)")
    p.add_argument("--max-shard-size", default="5GB", help="split the output into shards of at most this size")
    p.add_argument("--no-progress", action="store_true", help="do not show the progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    n, nbytes = convert(args.src, args.dst, dtype=dtype, quantize=args.quantize,
                        max_shard_size=args.max_shard_size, progress=not args.no_progress)
    print(f"wrote {args.dst}: {n} tensors, {nbytes / 1e9:.3f} GB")
    return 0


def convert(src, dst, dtype=None, quantize: str | None = None, max_shard_size: str | int = "5GB",
            progress: bool = True) -> tuple[int, int]:
    """Convert checkpoint dir `src` into `dst`; returns (tensors written, bytes written)."""
    import torch
    from tqdm import tqdm

    from nanoseek.checkpoint import fp8
    from nanoseek.checkpoint.hf import (CONFIG_NAME, FP32_ALWAYS, INDEX_NAME, SafetensorsReader, atomic_dir,
                                        config_from_dir, dtype_name, expected_tensors, has_mtp_weights,
                                        parse_size, read_tensor, validate, write_safetensors)
    from nanoseek.errors import CheckpointError

    src, dst = Path(src), Path(dst)
    if quantize not in (None, "fp8"):
        raise CheckpointError(f"--quantize {quantize!r}: only 'fp8' (DeepSeek block FP8) is supported")
    parse_size(max_shard_size)                         # a bad size fails before any work
    config, cfg = config_from_dir(src)                 # the dict is edited and written back, unknown keys kept
    in_block = fp8.block_size(cfg.quantization_config)
    out_block = tuple(FP8_QUANTIZATION_CONFIG["weight_block_size"])

    with SafetensorsReader(src) as reader:
        if cfg.num_nextn_predict_layers and not has_mtp_weights(reader.keys(), cfg):
            # transformers-written dirs: the config keeps MTP, the weights do not. Convert what is there.
            cfg = cfg.replace(num_nextn_predict_layers=0)
        table, optional = expected_tensors(cfg)
        validate(reader, table, optional, in_block)

        groups, any_fp8 = [], False
        for key in reader.keys():
            if key.endswith(fp8.SCALE_SUFFIX):
                continue                               # written (or dropped) together with its weight
            shape, stored = reader.shape(key), reader.dtype(key)
            numel = torch.Size(shape).numel()
            if quantize and fp8.is_quantized_in_deepseek_fp8(key, shape):
                any_fp8 = True
                groups.append(_fp8_group(reader, key, shape, stored == fp8.FP8_DTYPE and in_block == out_block,
                                         in_block, out_block))
                continue
            if key.endswith(FP32_ALWAYS):
                out = torch.float32
            elif stored == fp8.FP8_DTYPE:
                out = dtype or torch.bfloat16          # dequantized
            else:
                out = dtype or stored
            groups.append(([(key, numel * out.itemsize)],
                           lambda k=key, o=out: {k: read_tensor(reader, k, o, in_block).to(o)}))

        if any_fp8:
            config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
        else:
            config.pop("quantization_config", None)
        # The dtype of the unquantized tensors: asked for, or bf16 when dequantizing; else the source's.
        main_dtype = dtype or (torch.bfloat16 if cfg.quantization_config else None)
        if main_dtype is not None:
            config["torch_dtype"] = dtype_name(main_dtype)
            if "dtype" in config:                      # transformers >= 5 writes this spelling
                config["dtype"] = dtype_name(main_dtype)

        n_tensors = sum(len(sizes) for sizes, _ in groups)
        total = sum(b for sizes, _ in groups for _, b in sizes)
        with atomic_dir(dst) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            # disable=None: tqdm shows the bar only on a terminal.
            with tqdm(total=n_tensors, unit="tensor", desc="convert", disable=None if progress else True) as bar:
                write_safetensors(tmp, groups, max_shard_size, on_tensor=bar.update)
            for f in sorted(src.iterdir()):
                if f.is_file() and f.name != CONFIG_NAME and f.name != INDEX_NAME and f.suffix != ".safetensors":
                    shutil.copy2(f, tmp / f.name)
    return n_tensors, total


def _fp8_group(reader, key: str, shape: tuple, passthrough: bool, in_block, out_block):
    """The FP8 weight `key` and its scale, copied as stored (already FP8 in the same blocks: bit-exact) or
    quantized from its (dequantized) values."""
    import torch

    from nanoseek.checkpoint import fp8
    from nanoseek.checkpoint.hf import read_tensor

    scale = fp8.scale_name(key)
    blocks = -(-shape[0] // out_block[0]) * -(-shape[1] // out_block[1])
    sizes = [(key, torch.Size(shape).numel()), (scale, 4 * blocks)]     # 1 byte per e4m3, fp32 scales
    if passthrough:
        return sizes, lambda: {key: reader.get(key), scale: reader.get(scale)}

    def produce():
        q, scale_inv = fp8.quantize_fp8_blocks(read_tensor(reader, key, torch.float32, in_block), out_block)
        return {key: q, scale: scale_inv}

    return sizes, produce
