"""--fsdp: shard parameters, gradients and optimizer state across ranks with torch's `fully_shard` (FSDP2).

Each decoder layer is one unit: its weights are all-gathered just before it runs and freed after, so a rank holds
one layer in full plus 1/world_size of everything else. The root unit holds the rest (embeddings, the tied LM head,
the final norm). Under DDP every rank holds the whole model, its gradients and both AdamW moments (16 bytes per
parameter in fp32); under FSDP each rank holds 16 / world_size bytes per parameter plus one layer.

Checkpoints: train_state/step_N/sharded/ is written with torch.distributed.checkpoint, every rank its own shard,
and loads under any world size (or in one process without --fsdp). The exported model is gathered onto rank 0 into
an ordinary copy of the model, which writes the usual transformers directory and generates the samples.
"""

import copy

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor


def shard_model(model: nn.Module) -> None:
    """Shard `model` in place: each decoder layer, then the root (the model must already be on its device)."""
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def local(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (e.g. the gradient norm clip_grad_norm_ returns under FSDP)."""
    return value.full_tensor() if isinstance(value, DTensor) else value


class FullModel:
    """An ordinary copy of a sharded model on rank 0's CPU, refreshed from the shards on demand.

    `refresh()` is collective (every rank must call it); it returns the copy on rank 0 and None elsewhere.
    """

    def __init__(self, model: nn.Module, is_main: bool):
        self.model = model
        self.copy = copy.deepcopy(model).cpu() if is_main else None  # taken before sharding

    def refresh(self) -> nn.Module | None:
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.copy is not None:
            self.copy.load_state_dict(state)
        return self.copy


def save_sharded(path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: every rank writes its shard of the model and optimizer state under `path`."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path))


def load_sharded(path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective under FSDP; also works for an unsharded model in one process (any world size wrote it)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except CheckpointException as err:  # a BaseException: make it an error like any unreadable checkpoint file
        reasons = "; ".join(f"rank {rank}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                            for rank, (exc, _) in sorted(err.failures.items()))
        raise OSError(f"a shard does not load ({reasons})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
