"""Checkpoints: HF-format load/save (hf.py), DeepSeek's block FP8 (fp8.py), `nanoseek convert` (convert.py)."""
from nanoseek.checkpoint.fp8 import dequantize_fp8_blocks, quantize_fp8_blocks
from nanoseek.checkpoint.hf import load_model, save_model

__all__ = ["dequantize_fp8_blocks", "load_model", "quantize_fp8_blocks", "save_model"]
