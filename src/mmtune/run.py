"""A training run's shared state (``Run``) and its opening (``open_run``): the engine, the methods checked against it
by the one compatibility rule (``mmtune.methods.base.refusal``), the locked run folder. Below the phases that use it
(``mmtune.train``, ``mmtune.during_training``, ``mmtune.resume``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    parse_flag_from_env,
    set_seed,
)

from mmtune.best import BestState
from mmtune.config import RunConfig
from mmtune.engine import Engine
from mmtune.engines import configure_deepspeed, skip_cpu_inference_kernels
from mmtune.liveness import Peers
from mmtune.methods.base import TrainContext, build_methods, refusal
from mmtune.models.base_model import check_model_source
from mmtune.precision import compute_precision
from mmtune.preemption import PreemptionWatch
from mmtune.run_folder import RunPaths, prepare_output_dir
from mmtune.step_log import available_trackers


@dataclass
class Run:
    """What the phases of one training share; filled phase by phase."""

    config: RunConfig
    accelerator: Accelerator
    paths: RunPaths
    methods: list
    engine: Engine = field(default_factory=Engine)  # where the weights live (mmtune.engine)
    lock: int | None = None
    peers: Peers | None = None
    world: Path | None = None
    records: list = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    processor: object = None
    model: object = None
    optimizer: object = None
    loader: object = None
    plan: object = None  # a sampled mixture's MixturePlan (which records each epoch draws); None: the fixed mixture
    scheduler: object = None
    ctx: TrainContext | None = None
    steps_per_epoch: int = 0
    best: BestState | None = None
    watch: PreemptionWatch | None = None

    @property
    def sharded(self) -> bool:
        """Each process holds a slice of the parameters (FSDP2, ZeRO-3): one process can't evaluate the model."""
        return self.engine.shards_parameters

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, message: str) -> None:
        self.accelerator.print(message)


def deepspeed_launched() -> bool:
    """Whether ``accelerate launch`` was told to use DeepSpeed (``--use_deepspeed`` or a DeepSpeed config)."""
    return parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def open_run(config: RunConfig) -> Run:
    """Phase 1: the engine, the locked output folder, the methods (a bad name or option fails now)."""
    cuda = torch.cuda.is_available()
    mixed_precision = compute_precision(config.model.dtype, config.train.mixed_precision, config.train.fp32_masters)
    if mixed_precision == "fp16" and not cuda:
        raise ValueError("fp16 needs a CUDA GPU (train.mixed_precision=fp16, or model.dtype=fp16 with fp32 masters, "
                         "which autocasts in fp16); on CPU it would silently do nothing: use bf16")
    # Accelerate keeps one AcceleratorState per process; several runs in one process (the demo, notebooks)
    # may differ in mixed precision, so start each run from a fresh state (the process group is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    if deepspeed_launched() and not cuda:
        # Without a GPU, Accelerate picks no communication backend for DeepSpeed and each process would train alone
        # on the whole data set (num_processes 1): name CPU's backend.
        skip_cpu_inference_kernels()
        PartialState(backend="gloo", timeout=timedelta(seconds=config.train.ddp_timeout))
    root = Path(config.train.output_dir)
    accelerator = Accelerator(
        # cpu=True would turn a DeepSpeed launch into DDP without a word: only force the CPU otherwise.
        mixed_precision=mixed_precision, cpu=not cuda and not deepspeed_launched(),
        log_with=available_trackers(config.train.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(root), logging_dir=str(root / "tensorboard")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=False),
                         InitProcessGroupKwargs(timeout=timedelta(seconds=config.train.ddp_timeout))],
    )
    methods = build_methods(config.method)
    check_model_source(config)  # a bad model path fails now, before any data is generated or read
    engine = Engine.of(accelerator)
    if config.model.quantization and engine.kind != "single":
        raise ValueError("model.quantization (QLoRA) is tested in one process only; launch it without DDP / DeepSpeed")
    refused = refusal(methods, engine)  # the one compatibility rule (mmtune.methods.base)
    if refused:
        raise ValueError(refused)
    configure_deepspeed(accelerator, config)  # DeepSpeed's own settings against the run's (methods: checked above)
    paths, lock = prepare_output_dir(config, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    set_seed(config.train.seed)
    run = Run(config, accelerator, paths, methods, engine, lock, peers=Peers(accelerator, config.train.ddp_timeout))
    if fsdp_launched() and not engine.fsdp:  # Accelerate enables FSDP on accelerators only, without a word
        run.say(f"accelerate launch asked for FSDP, but Accelerate enables FSDP on GPUs only: this run trains with "
                f"{str(accelerator.distributed_type).split('.')[-1]} ({engine.kind}), every process holding the whole "
                "model")
    return run


def fsdp_launched() -> bool:
    """Whether ``accelerate launch`` was told to use FSDP (``--use_fsdp`` or an FSDP config)."""
    return parse_flag_from_env("ACCELERATE_USE_FSDP")
