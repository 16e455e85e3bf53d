"""Speed and parallelism applied to a single-device model from outside, in torchtitan's order:
FP8 linears -> activation checkpointing -> torch.compile -> FSDP2 or DDP.

The model code never changes: each step swaps or wraps modules of DeepseekForCausalLM. A "block" is a decoder
layer of the main model or an MTP module (a full decoder layer too); activation checkpointing, compile and
FSDP2's `fully_shard` all work per block, the natural unit (one all-gather and one recompute per block).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from nanoseek.errors import ConfigError
from nanoseek.parallel.distributed import DistInfo


def blocks(model: nn.Module) -> list[tuple[nn.ModuleList, int]]:
    """(container, index) of every block, so a block can be replaced in place."""
    return ([(model.model.layers, i) for i in range(len(model.model.layers))]
            + [(model.mtp, i) for i in range(len(model.mtp))])


def apply_fp8(model: nn.Module, device: torch.device) -> None:
    """Swap nn.Linear layers for torchao's float8 training linears (dynamic tensorwise scaling).

    Left in high precision: the lm_head (its logits feed the loss directly; torchtitan keeps it too), the router
    (fp32 by design, and not an nn.Linear), the stacked routed experts (not nn.Linear), and layers whose sizes
    are not multiples of 16 (a float8 GEMM requirement)."""
    check_options(DistInfo(0, 1, 0, device), fp8=True)
    from torchao.float8 import convert_to_float8_training

    def keep(module: nn.Module, fqn: str) -> bool:
        return (isinstance(module, nn.Linear) and fqn != "lm_head"
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    convert_to_float8_training(model, module_filter_fn=keep)


def check_options(dist_info: DistInfo, *, fsdp: bool = False, fp8: bool = False) -> None:
    """ConfigError, before any work, for options this machine or launch cannot honour."""
    device = dist_info.device
    if fp8:
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise ConfigError("--fp8 needs a CUDA GPU with compute capability 8.9 or newer (H100, L40S, RTX 4090); "
                              "leave it off on this machine")
        try:
            import torchao.float8  # noqa: F401
        except ImportError:
            raise ConfigError("--fp8 needs torchao: pip install torchao") from None
    if fsdp and not dist_info.distributed:
        raise ConfigError("--fsdp shards over processes: launch with torchrun --nproc_per_node N, or pass "
                          "--no-fsdp (a resumed run keeps the fsdp setting it saved)")


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward instead of keeping its activations (non-reentrant checkpointing).
    The wrapper's state-dict hooks strip its name, so checkpoints keep the plain parameter names."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for container, i in blocks(model):
        container[i] = checkpoint_wrapper(container[i], preserve_rng_state=False)   # no dropout: nothing random


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (names unchanged). The MoE's data-dependent expert split is a graph
    break; attention, norms and the dense parts fuse."""
    for container, i in blocks(model):
        container[i].compile()


def apply_fsdp(model: nn.Module, dist_info: DistInfo) -> None:
    """FSDP2: shard every block, then the root (embedding, final norm, head). Parameters become DTensors sharded
    over ranks; each block's are all-gathered just before it runs and freed after."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
    for mtp in model.mtp:
        # The model calls each MTP module's output norm itself, after the module's forward (which reshards its
        # parameters): as its own unit, the norm is all-gathered when it is called.
        fully_shard(getattr(mtp, "_checkpoint_wrapped_module", mtp).shared_head.norm, mesh=mesh)
    for container, i in blocks(model):
        fully_shard(container[i], mesh=mesh)
    fully_shard(model, mesh=mesh)


def parallelize(model: nn.Module, dist_info: DistInfo, *, fsdp: bool = False, compile: bool = False,
                activation_checkpointing: bool = False, fp8: bool = False) -> nn.Module:
    """Apply the requested wrappers; returns the module to call for training (a DDP wrapper under torchrun
    without fsdp, else `model` itself). `model` stays the underlying DeepseekForCausalLM either way."""
    check_options(dist_info, fsdp=fsdp, fp8=fp8)
    if fp8:
        apply_fp8(model, dist_info.device)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if not dist_info.distributed:
        return model
    if fsdp:
        apply_fsdp(model, dist_info)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # The balancing biases (buffers) get the same all-reduced update on every rank, so DDP's default broadcast of
    # rank 0's buffers before each forward changes nothing (and costs E floats per MoE layer).
    return DDP(model, device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None)


def grad_sync(model: nn.Module, sync: bool):
    """Context for one micro-batch's backward: gradients are reduced over ranks only when `sync` (the last
    micro-batch of a step); earlier ones accumulate locally."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP):
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):           # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()
