"""Run by test_spider_sharded.py under `torch.distributed.run --nproc-per-node 2` (gloo, CPU).

Trains the same small model twice for a few steps with SPIDER: once sharded by FSDP2 (every parameter a
DTensor, SPIDER on the local shards), once whole on every process with the full batch. Rank 0 writes the
largest difference between the two per parameter to the JSON file named on the command line.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from mmtune.methods.base import TrainContext
from mmtune.methods.spider import Spider


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))  # 3 rows: uneven shards
    nn.init.zeros_(model[0].bias)  # an all-zero W0
    return model


def train(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, steps: int) -> None:
    trainable = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(trainable.values(), lr=0.05)
    ctx = TrainContext(model=model, unwrapped=model, trainable=trainable, generator=torch.Generator(),
                       accelerator=None, optimizer=optimizer, total_steps=steps)
    spider = Spider()
    spider.setup(ctx)
    for _ in range(steps):
        nn.functional.mse_loss(model(inputs), targets).backward()
        spider.before_optimizer_step(ctx)
        optimizer.step()
        spider.after_optimizer_step(ctx)
        optimizer.zero_grad(set_to_none=True)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(8, 8, generator=generator), torch.randn(8, 3, generator=generator)

    whole = build()
    train(whole, inputs, targets, steps=3)

    sharded = build()
    fully_shard(sharded, mesh=init_device_mesh("cpu", (world,)))
    assert all(type(p).__name__ == "DTensor" for p in sharded.parameters())
    half = slice(rank * 8 // world, (rank + 1) * 8 // world)  # FSDP averages the gradients of the halves
    train(sharded, inputs[half], targets[half], steps=3)

    differences = {name: (param.full_tensor() - dict(whole.named_parameters())[name]).abs().max().item()
                   for name, param in sharded.named_parameters()}
    moved = {name: (param.full_tensor() - dict(build().named_parameters())[name]).abs().max().item()
             for name, param in sharded.named_parameters()}
    if rank == 0:
        with open(sys.argv[1], "w") as handle:
            json.dump({"differences": differences, "moved": moved}, handle)
    dist.barrier()  # both ranks done with every collective before either tears the group down
    dist.destroy_process_group()
    # Skip interpreter finalization: gloo worker threads still holding work objects can abort the process
    # there (seen once in CI: "terminate called without an active exception"); the result is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
