"""nanoseek: the DeepSeek-V3/R1 system in miniature.

Public API (names fixed by DESIGN.md): ModelConfig, build_model, load_model, save_model, count_params.
Attributes are imported lazily so that `import nanoseek` and `nanoseek --help` stay fast.
"""
from nanoseek.config import ModelConfig

__version__ = "0.1.0"

_LAZY = {
    "build_model": "nanoseek.model",
    "DeepseekForCausalLM": "nanoseek.model",
    "load_model": "nanoseek.checkpoint",
    "save_model": "nanoseek.checkpoint",
    "count_params": "nanoseek.accounting",
    "LLM": "nanoseek.inference",
    "SamplingParams": "nanoseek.inference",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")


__all__ = ["ModelConfig", *_LAZY]
