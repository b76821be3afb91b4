"""Where the weights live: the engine a run trains on, as one value, and the tensor helpers every method uses.

This is the page a method author reads to write a method that runs on every engine. A run trains on one of

==========  =========================================================================================================
``single``  one process: every trainable tensor is whole, ``param.grad`` holds its gradient
``ddp``     several processes, each with the whole model; gradients are all-reduced before the step hooks run
``fsdp2``   several processes, each parameter a DTensor of which each process holds a slice (``sharded``)
``zero1``   DeepSpeed ZeRO-1/2: whole weights, the optimizer (and ZeRO-2's gradients) partitioned in the engine —
``zero2``   the hooks see whole fp32 tensors (``mmtune.engines`` assembles them), as on one process
``zero3``   DeepSpeed ZeRO-3: each parameter's own tensor is empty outside the engine's gather (``partitioned``);
            the hooks see whole fp32 masters, and what they write reaches each process's partition
==========  =========================================================================================================

``Engine.of(accelerator)`` names it once; hooks read it as ``ctx.engine``. What a tensor is on each engine:
``whole`` (gathered when sliced: a top-k or a random draw needs the whole tensor), ``local_shard`` / ``local_slice``
(this process's piece, a view), ``laid_out_as`` (a whole value laid out as a parameter), ``sum_over_shards`` (a sum
whose gradient reaches each shard once). This module imports only torch, Accelerate and (lazily) DeepSpeed: everything
else in mmtune may import it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

try:  # FSDP2's sharded parameters are DTensors
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = ()

KINDS = ("single", "ddp", "fsdp2", "zero0", "zero1", "zero2", "zero3")


@dataclass(frozen=True)
class Engine:
    """The engine a run trains on (one of ``KINDS``) and its number of processes."""

    kind: str = "single"
    processes: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"engine {self.kind!r}: one of {', '.join(KINDS)}")

    @classmethod
    def of(cls, accelerator) -> Engine:
        """The engine an Accelerate ``Accelerator`` (or a Trainer's) drives; no accelerator: one process."""
        if accelerator is None:
            return cls()
        processes = getattr(accelerator, "num_processes", 1)
        distributed = str(getattr(accelerator, "distributed_type", ""))
        plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
        if plugin is not None:  # DeepSpeed (Accelerate's state names its plugin only then; a Trainer's too)
            if plugin.zero_stage not in (0, 1, 2, 3):
                raise ValueError(f"DeepSpeed ZeRO-{plugin.zero_stage}: mmtune takes ZeRO stages 1, 2 and 3")
            return cls(f"zero{plugin.zero_stage}", processes)
        if distributed.endswith("FSDP"):
            return cls("fsdp2", processes)
        return cls("ddp" if processes > 1 else "single", processes)

    @property
    def deepspeed(self) -> bool:
        """DeepSpeed drives the step: gradients live in its buffers, the optimizer updates its fp32 masters."""
        return self.kind.startswith("zero")

    @property
    def zero_stage(self) -> int | None:
        return int(self.kind[4:]) if self.deepspeed else None

    @property
    def fsdp(self) -> bool:
        return self.kind == "fsdp2"

    @property
    def shards_parameters(self) -> bool:
        """Each process holds a slice of every parameter (FSDP2, ZeRO-3): state that follows the parameters (W0, masks)
        is per process, and a whole tensor must be gathered."""
        return self.kind in ("fsdp2", "zero3")

    @property
    def tensors(self) -> str:
        """What a trainable parameter is here: ``"sliced"`` (FSDP2 DTensors), ``"partitioned"`` (ZeRO-3) or
        ``"whole"``."""
        return {"fsdp2": "sliced", "zero3": "partitioned"}.get(self.kind, "whole")

    def __str__(self) -> str:
        return self.kind if self.processes == 1 else f"{self.kind} × {self.processes} processes"


def is_deepspeed(accelerator) -> bool:
    return Engine.of(accelerator).deepspeed


def is_fsdp(accelerator) -> bool:
    return Engine.of(accelerator).fsdp


def shards_parameters(accelerator) -> bool:
    """Whether the engine splits parameters over processes (FSDP, DeepSpeed ZeRO-3): method state that follows the
    parameters is then per process."""
    return Engine.of(accelerator).shards_parameters


def sharded(trainable: dict[str, torch.Tensor]) -> bool:
    """Whether the trainable weights are FSDP2 shards (DTensors: each process holds its slice of every tensor)."""
    return any(isinstance(p, DTensor) for p in trainable.values())


def partitioned(trainable: dict[str, torch.Tensor]) -> bool:
    """Whether the trainable weights are DeepSpeed ZeRO-3 partitions (a parameter's own tensor is empty outside the
    engine's gather)."""
    return any(hasattr(p, "ds_tensor") for p in trainable.values())


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's (FSDP2's) local shard — a view, so in-place updates reach the parameter; else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_slice(param: nn.Parameter) -> torch.Tensor:
    """This process's slice of a trainable weight, a view (in-place writes reach the parameter): an FSDP2 shard's local
    tensor, a ZeRO-3 partition (flat, padding included), else the whole weight."""
    partition = getattr(param, "ds_tensor", None)
    return partition.data if partition is not None else local_shard(param).data


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's (an FSDP2 shard's) value gathered from every process, else the tensor itself.
    For what needs the whole tensor (a top-k selection, a random draw over its shape), one tensor at a time."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def laid_out_as(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor, the same on every process) laid out as ``param``: for a sharded parameter, this
    process's piece of it as a DTensor (no communication), else ``value`` itself."""
    if not isinstance(param, DTensor):
        return value
    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)


def sum_over_shards(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A sum computed on this process's shard of ``param`` (``local``, with its gradient) plus the other shards'
    sums (their values only): the whole tensor's sum on every process, whose gradient reaches this process's shard
    once — an all-reduce inside autograd would count it once per process."""
    if not isinstance(param, DTensor):
        return local
    import torch.distributed as dist

    total = local.detach().clone()
    for dim, placement in enumerate(param.placements):
        if placement.is_shard():
            dist.all_reduce(total, group=param.device_mesh.get_group(dim))
    return local + (total - local.detach())


def partition_span(param: nn.Parameter) -> tuple[int, int]:
    """Where this process's ZeRO-3 partition of ``param`` starts in the flattened weight, and how many of its elements
    are the weight's (the last partitions are padded with elements that belong to no weight)."""
    import deepspeed.comm as ds_comm

    size = param.ds_tensor.numel()
    start = size * ds_comm.get_rank(group=param.ds_process_group)
    return start, max(0, min(size, param.ds_numel - start))


def write_weight(param: nn.Parameter, value: torch.Tensor) -> None:
    """The model's copy of a weight ← ``value`` (the whole tensor): all of it, or under ZeRO-3 this process's
    partition (DeepSpeed copies the masters into the partitions only at its next step)."""
    partition = getattr(param, "ds_tensor", None)
    if partition is None:
        param.data.copy_(value.to(param.dtype))
        return
    start, _ = partition_span(param)
    piece = value.flatten()[start:start + partition.numel()].to(partition.dtype)
    partition.data.view(-1)[:piece.numel()].copy_(piece)
    if param.data.numel() == value.numel():  # gathered now (a small parameter DeepSpeed keeps whole: ds_persist)
        param.data.copy_(value.view_as(param.data).to(param.dtype))


def innermost(model: nn.Module) -> nn.Module:
    """The model inside DDP, DeepSpeed, PEFT and ``torch.compile`` wrappers (the transformers model)."""
    inner = model
    for _ in range(8):
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif isinstance(getattr(inner, "module", None), nn.Module):
            inner = inner.module
        elif isinstance(getattr(inner, "_orig_mod", None), nn.Module):
            inner = inner._orig_mod
        else:
            break
    return inner


@contextlib.contextmanager
def root_gathered(model: nn.Module) -> Iterator[None]:
    """An FSDP2 model's root parameters (those of no inner ``fully_shard`` unit: embeddings, a VLM's vision tower and
    projector unless wrapped apart) gathered for code that calls them outside the root's forward — transformers'
    ``generate`` computes a VLM's image features before its first forward — and sharded again after. The inner units
    gather their own in their forward, as always. Elsewhere nothing. Every process must enter it (a collective)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        FSDPModule = ()
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def engine_of(accelerator):
    """DeepSpeed's engine behind an Accelerate accelerator."""
    return accelerator.deepspeed_engine_wrapped.engine


def release_gathered(accelerator) -> None:
    """Drop every weight ZeRO-3 holds gathered (it keeps some for their reuse, small ones for good), so that the
    next forward gathers them anew from the partitions — after the partitions were written."""
    engine = engine_of(accelerator)
    getattr(engine.optimizer, "empty_partition_cache", engine.empty_partition_cache)()
