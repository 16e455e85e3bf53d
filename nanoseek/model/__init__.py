"""The DeepSeek-V3/V2 model family (single-device PyTorch; parallelism and training wrap it from outside)."""
from nanoseek.model.cache import LatentCache
from nanoseek.model.transformer import DeepseekForCausalLM, ModelOutput, build_model

__all__ = ["DeepseekForCausalLM", "LatentCache", "ModelOutput", "build_model"]
