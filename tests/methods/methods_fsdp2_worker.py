"""Run by test_methods_sharded.py under `torch.distributed.run --nproc-per-node 2` (gloo, CPU).

For each method named on the command line: 3 optimizer steps of mmtune's own step (``mmtune.step.train_step``, the
method's hooks, its ``on_train_end``) on a tiny LLaVA, once with whole tensors and once with the model sharded by
FSDP2 — there with the method's state saved after step 2 and a fresh instance resumed from the file — (``fully_shard`` per decoder block and at the root, as Accelerate's FSDP2 does: every parameter a DTensor, the
methods' state built from them). Both ranks see the same batch, so FSDP's averaged gradient is the whole batch's:
what differs is only where each number lives. (What a method reads from the training data before training —
``ctx.batches``, EWC's Fisher — differs per process: ``run``'s ``own``.) Rank 0 writes, per method, the largest difference per trainable tensor
between the two runs' final weights, and how far each moved, to the JSON file named first.

An entry ``uneven:<name>`` gives each process a batch of its own (GRPO: 3 records of its task on one, none on the other,
which then generates for a stand-in in lockstep) and the whole-tensor run both batches in one, as DDP's tests do;
``text:<name>`` gives one process captions and the other text-only records (which run the vision tower on a blank
image, as every process must on shards).

An entry ``bf16:<name>`` runs both in bf16 with fp32 masters of what trains (whole: autocast; sharded: FSDP2's
MixedPrecisionPolicy computing in bf16 and reducing in fp32, on fp32 shards — what Accelerate's FSDP2 sets up).

Accelerate enables FSDP on GPUs only, so this drives the step with a stand-in for the accelerator (what the step
calls: backward, no_sync, autocast, clip_grad_norm_, reduce) — the loop around it is tested on one process elsewhere.
"""

import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from mmtune.config import TrainConfig
from mmtune.data.collate import RecordDataset, TrainCollator
from mmtune.data.records import read_records
from mmtune.data.synthetic import vocabulary
from mmtune.methods import METHODS
from mmtune.methods.base import TrainContext, load_method_states, save_method_states
from mmtune.models.scope import apply_scope
from mmtune.models.tiny import build_tiny
from mmtune.precision import keep_fp32_masters
from mmtune.step import train_step

# What makes each method act within 3 tiny steps (as tests/test_deepspeed.py's ACTIVE).
OPTIONS = {"half_ft": {"round_steps": 2},
           # short answers; a format reward that some answers of the random-init model earn (a group whose rewards
           # are all equal has no advantage, and then only the KL and the captions' cross-entropy would train)
           "grpo": {"num_generations": 3, "max_new_tokens": 4, "format_pattern": ".*[aeiou]", "format_weight": 1.0}, "l2_reg": {"lam": 1e3}, "l1_reg": {"lam": 1.0},
           "wise_ft": {"alpha": 0.5}, "ewc": {"lam": 1e6}, "lora_sculpt": {"sculpt_step": 2, "cmr_lam": 1.0}}
# LoRA's B starts at zero, so its update starts in B; a larger rate moves A too within 3 steps.
LEARNING_RATE = {"lora": 5e-2, "lora_sculpt": 5e-2}


class Stand_inAccelerator:
    """The accelerator calls mmtune's step makes, for a model sharded by hand (or not at all)."""

    def __init__(self, sharded: bool, bf16: bool = False):
        self.bf16 = bf16
        self.num_processes = dist.get_world_size() if sharded else 1
        self.process_index = dist.get_rank() if sharded else 0
        self.is_main_process = self.process_index == 0
        self.distributed_type = "DistributedType.FSDP" if sharded else "DistributedType.NO"
        self.mixed_precision = "bf16" if bf16 else "no"
        self.device = torch.device("cpu")
        self.state = SimpleNamespace(deepspeed_plugin=None)

    def backward(self, loss):
        loss.backward()

    def no_sync(self, model):
        return contextlib.nullcontext()

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def clip_grad_norm_(self, params, limit):
        return torch.nn.utils.clip_grad_norm_(params, limit)

    def reduce(self, tensor, reduction="sum"):
        tensor = tensor.clone()
        if self.num_processes > 1:
            dist.all_reduce(tensor)
        return tensor

    def gather(self, tensor):
        if self.num_processes == 1:
            return tensor
        pieces = [torch.empty_like(tensor) for _ in range(self.num_processes)]
        dist.all_gather(pieces, tensor.contiguous())
        return torch.cat(pieces) if tensor.dim() else torch.stack(pieces)

    def unwrap_model(self, model):
        return model

    def print(self, *args):
        if self.is_main_process:
            print(*args)


def build(sharded: bool, bf16: bool = False, method=None):
    model, processor = build_tiny("llava", words=vocabulary(), seed=0)
    if bf16:  # the weights in bf16, fp32 masters of what trains (mmtune.precision; Accelerate's FSDP2 does the same)
        model.to(torch.bfloat16)
    layout = apply_scope(model, train_projector=True, last_n_blocks=2)
    if method is not None and method.overrides("prepare_model"):  # LoRA: PEFT's adapters before sharding, as the loop
        model = method.prepare_model(model, layout)
    if bf16:
        keep_fp32_masters(model)
    if sharded:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        for block in inner.model.language_model.layers:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    return model, processor


def run(name: str, sharded: bool, batch: dict, resume_dir: Path | None = None, bf16: bool = False,
        own: list[dict] = (), records: list | None = None, collator=None) -> dict[str, torch.Tensor]:
    """3 steps of ``name``; with ``resume_dir``, the method is saved after step 2 (one file per process, as the loop
    does on a sharding engine), replaced by a fresh instance set up and loaded from the file, as a resumed run's.
    ``own``: one batch per process, what ``ctx.batches`` gives (EWC's Fisher): each process its own when sharded, all
    of them on whole tensors — so a statistic that mixes the processes' records wrongly (a squared averaged
    gradient) shows."""
    method = METHODS[name](METHODS[name].config_class(**OPTIONS.get(name, {})))
    model, _ = build(sharded, bf16, method)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # bf16: the papers' projector rate, where an update is below half a bf16 step of most weights (what fp32 masters
    # exist for: without them such updates vanish)
    optimizer = torch.optim.AdamW(trainable.values(), lr=2e-5 if bf16 else LEARNING_RATE.get(name, 1e-2),
                                  weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    accelerator = Stand_inAccelerator(sharded, bf16)
    ctx = TrainContext(model=model, unwrapped=model, trainable=trainable, generator=torch.Generator().manual_seed(0),
                       accelerator=accelerator, optimizer=optimizer, total_steps=3, tasks=sorted(set(batch["tasks"])),
                       batches=lambda: [own[dist.get_rank()]] if sharded else list(own), final_model=model,
                       records=records, collator=collator)
    method.setup(ctx)
    for step in range(3):
        if resume_dir is not None and step == 2:
            resume_dir.mkdir(parents=True, exist_ok=True)
            save_method_states([method], resume_dir, accelerator)
            dist.barrier()
            method = METHODS[name](METHODS[name].config_class(**OPTIONS.get(name, {})))
            method.setup(ctx)
            load_method_states([method], resume_dir, accelerator)
        train_step(ctx, [method], [batch], optimizer, scheduler, TrainConfig(max_grad_norm=1.0))
    method.on_train_end(ctx)
    if ctx.final_model is not model:  # LoRA: the adapters merged into the scope's weights — compare those
        trainable = {n: p for n, p in ctx.final_model.named_parameters() if n in SCOPE}
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in trainable.items()}


# What the scope trains (projector + last 2 blocks), by name: where LoRA's merged update lands.
SCOPE = {n for n, p in build(False)[0].named_parameters() if p.requires_grad} if __name__ == "__main__" else set()


def main() -> None:
    dist.init_process_group("gloo")
    out, world, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    torch.manual_seed(0)
    records = read_records(world / "detailed_caption_train.jsonl")[:4] + read_records(world / "count_mc_train.jsonl")[:4]
    _, processor = build_tiny("llava", words=vocabulary(), seed=0)
    collate = TrainCollator(processor, keep_samples=True)  # the records in the batch: what GRPO samples for
    batch = collate([RecordDataset(records)[i] for i in range(len(records))])
    others = read_records(world / "detailed_caption_train.jsonl")[4:8] + read_records(world / "count_mc_train.jsonl")[4:8]
    own = [batch, collate([RecordDataset(others)[i] for i in range(len(others))])]  # what each process trains on
    everything = records + others
    # uneven: 3 counting MC records and a caption on one process, 4 captions on the other; text: the 4 captions on
    # one process, 4 text-only records on the other (whose forward runs the vision tower on a blank image)
    texts = [dataclasses.replace(r, id=f"text-{i}", image=None) for i, r in enumerate(others[:4])]
    split = {"uneven": [records[4:7] + records[:1], records[1:4] + others[:1]], "text": [records[:4], texts]}
    per_process = {k: [collate([RecordDataset(p)[i] for i in range(len(p))]) for p in pieces]
                   for k, pieces in split.items()}
    together = {k: collate([RecordDataset(pieces[0] + pieces[1])[i] for i in range(8)]) for k, pieces in split.items()}
    result, wholes = {}, {}
    for entry in names:
        bf16, spread = entry.startswith("bf16:"), entry.split(":")[0] if entry.split(":")[0] in split else None
        name = entry.split(":")[-1]
        start = {n: p.detach().clone() for n, p in build(False, bf16)[0].named_parameters() if n in SCOPE}
        data = {"records": everything, "collator": collate}
        whole = wholes[entry] = run(name, False, together[spread] if spread else batch, bf16=bf16, own=own, **data)
        try:
            sharded = run(name, True, per_process[spread][dist.get_rank()] if spread else batch,
                          out.parent / f"resume-{entry.replace(':', '-')}", bf16, own, **data)
        except Exception as error:  # a refusal, or a method that breaks on shards: the test says which
            result[entry] = {"error": f"{type(error).__name__}: {error}"}
            continue
        updates = {n: ((sharded[n] - start[n]).flatten().float(), (whole[n] - start[n]).flatten().float())
                   for n in whole}
        result[entry] = {"difference": {n: (sharded[n] - whole[n]).abs().max().item() for n in whole},
                         "cosine": {n: torch.nn.functional.cosine_similarity(a, b, dim=0).item()
                                    for n, (a, b) in updates.items()},
                         "size": {n: whole[n].numel() for n in whole},
                         "moved": {n: (whole[n] - start[n]).abs().max().item() for n in whole}}
    for entry, whole in wholes.items():  # how far each method's own step took it from vanilla's (whole tensors)
        if "vanilla" in wholes and ":" not in entry and "error" not in result[entry]:
            result[entry]["from_vanilla"] = max((whole[n] - wholes["vanilla"][n]).abs().max().item() for n in whole)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as spider_fsdp2_worker.py: skip finalization, where gloo's threads can abort the process


if __name__ == "__main__":
    main()
