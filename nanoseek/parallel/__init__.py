"""Parallel training from outside the model: process groups from torchrun (distributed.py) and the wrappers,
FP8 -> activation checkpointing -> compile -> FSDP2 / DDP (wrap.py)."""
from nanoseek.parallel.distributed import DistInfo, init_distributed
from nanoseek.parallel.wrap import grad_sync, parallelize

__all__ = ["DistInfo", "grad_sync", "init_distributed", "parallelize"]
