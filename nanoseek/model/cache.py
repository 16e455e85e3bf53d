"""A contiguous latent KV cache for single-stream decoding (the model's own generate loop and tests).

Per layer slot it holds only the normalized latent c (kv_lora_rank) and the rotated k_pe (qk_rope_head_dim):
cfg.latent_dim values per token. MTP layers have their own slots after the main layers. The inference engine
keeps a paged version of the same layout.
"""
from __future__ import annotations

import torch

from nanoseek.config import ModelConfig


class LatentCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device="cpu",
                 num_layers: int | None = None):
        n = num_layers if num_layers is not None else cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        self.r = cfg.kv_lora_rank
        self.max_len = max_len
        self.data = torch.zeros(n, batch_size, max_len, cfg.latent_dim, dtype=dtype, device=device)  # (L,B,S,r+dr)
        self.lengths = [0] * n                          # tokens written per layer slot

    @property
    def length(self) -> int:
        """Tokens cached by the main model (slot 0)."""
        return self.lengths[0]

    def update(self, layer: int, c: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append c (B,T,r) and k_pe (B,T,dr) to `layer`'s slot; return all cached (B,S,r), (B,S,dr)."""
        start, T = self.lengths[layer], c.shape[1]
        if start + T > self.max_len:
            raise ValueError(f"latent cache full: {start} + {T} tokens > max_len {self.max_len}")
        slot = self.data[layer]
        slot[:, start:start + T, : self.r] = c
        slot[:, start:start + T, self.r:] = k_pe
        self.lengths[layer] = start + T
        return slot[:, : start + T, : self.r], slot[:, : start + T, self.r:]

    def nbytes_per_token(self) -> int:
        return self.data.shape[0] * self.data.shape[-1] * self.data.element_size()
