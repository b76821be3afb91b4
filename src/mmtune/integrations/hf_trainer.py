"""The same Method objects inside a Hugging Face ``Trainer`` (bring your own Trainer / TRL setup).

``MethodTrainer`` runs the methods' ``prepare_model`` on the model it is given (LoRA wraps it here, before the
Trainer builds its optimizer), computes mmtune's loss (cross-entropy + the methods' named extra terms) and registers
``MethodCallback``, which maps the method hooks onto the Trainer's events:
``setup`` → ``on_train_begin``; ``before_optimizer_step`` → ``on_pre_optimizer_step`` (gradients
accumulated and clipped); ``after_optimizer_step`` → ``on_optimizer_step``; ``on_train_end`` (after which
``trainer.final_model`` is the model to save: LoRA's merged model, for instance). A method overriding a hook a
Trainer's step can't run (``build_step``, ``balance_task_losses``) is refused up front, naming the hook.

    model, processor = load_model(path); apply_scope(model)
    trainer = MethodTrainer(model=model, args=TrainingArguments(..., remove_unused_columns=False),
                            train_dataset=RecordDataset(records), data_collator=TrainCollator(processor),
                            methods=[NRCA(), Spider()])
    trainer.train()

Method state (e.g. SPIDER's W0 and G) is saved into every Trainer checkpoint folder
(``mmtune_methods.pt``) and restored by ``trainer.train(resume_from_checkpoint=...)``, so a resumed run is
the uninterrupted one; ``trainer.method_state_dict()`` returns it too.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from mmtune.engine import Engine
from mmtune.losses import compute_losses
from mmtune.methods.base import Method, TrainContext, load_method_states, refusal, save_method_states
from mmtune.step import vision_tower_everywhere


class MethodCallback(TrainerCallback):
    def __init__(self, methods: list[Method], trainer: MethodTrainer):
        self.methods, self.trainer = methods, trainer

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
        self.trainer.ctx = TrainContext(model=self.trainer.model_wrapped, unwrapped=model, trainable=trainable,
                                        generator=generator, accelerator=self.trainer.accelerator,
                                        optimizer=optimizer, total_steps=state.max_steps,
                                        output_dir=Path(args.output_dir) if args.output_dir else None,
                                        batches=(lambda: train_dataloader) if train_dataloader is not None else None,
                                        collator=getattr(self.trainer, "data_collator", None))
        for method in self.methods:
            method.setup(self.trainer.ctx)
        if self.trainer.resumed_from:  # the Trainer restored weights and its state; the methods follow
            load_method_states(self.methods, self.trainer.resumed_from, self.trainer.accelerator)
            self.trainer.ctx.step = state.global_step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for method in self.methods:
            method.before_optimizer_step(self.trainer.ctx)

    def on_optimizer_step(self, args, state, control, **kwargs):
        for method in self.methods:
            method.after_optimizer_step(self.trainer.ctx)
        self.trainer.ctx.step += 1

    def on_save(self, args, state, control, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        save_method_states(self.methods, checkpoint, self.trainer.accelerator)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.trainer.ctx.final_model = model
        for method in self.methods:
            method.on_train_end(self.trainer.ctx)


class MethodTrainerMixin:
    """What makes any ``transformers.Trainer`` subclass take its loss and update rules from mmtune methods: put it
    first in the bases (``class MyTrainer(MethodTrainerMixin, SFTTrainer)``, or ``with_methods(SFTTrainer)``).
    Each loss term is logged by name (``ce``, ``nrca_gap``, …) beside the Trainer's ``loss``."""

    def __init__(self, *args, methods: list[Method] | None = None, loss_reduction: str = "token", **kwargs):
        refused = refusal(methods or [], "trainer")
        if refused:  # it would silently train as vanilla here
            raise ValueError(refused)
        if methods:
            args, kwargs = _prepared(methods, args, kwargs)
        super().__init__(*args, **kwargs)
        # the one compatibility rule again, now that the Trainer's engine is known (ZeRO-3's partitions)
        refused = refusal(methods or [], "trainer", Engine.of(getattr(self, "accelerator", None)))
        if refused:
            raise ValueError(refused)
        self._term_sums: dict[str, float] = {}
        self._term_count = 0
        self.methods = methods or []
        self.loss_reduction = loss_reduction  # token (the Hugging Face convention) | sample (NRCA's released code)
        # Our loss is a mean over each micro-batch, not a sum over the step's tokens: let the Trainer divide by
        # the accumulation steps (it skips that for models whose forward takes loss kwargs).
        self.model_accepts_loss_kwargs = False
        self.ctx: TrainContext | None = None
        self.resumed_from: str | None = None
        self.add_callback(MethodCallback(self.methods, self))

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True, but {self.args.output_dir} holds no checkpoint")
        self.resumed_from = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # The Trainer loads its checkpoint's weights without the key conversion ``from_pretrained`` applies, and
        # vision-language models (LLaVA, Qwen2-VL, ...) save under their original key names: the weights would
        # silently stay as they were (huggingface/transformers#43701). Reload them the way from_pretrained does.
        model = model if model is not None else self.model
        weights = os.path.join(resume_from_checkpoint, "model.safetensors")
        if not os.path.isfile(weights):
            return
        with safe_open(weights, framework="pt") as saved:
            saved_keys = set(saved.keys())
        if saved_keys <= set(model.state_dict()):
            return
        reloaded = type(model).from_pretrained(resume_from_checkpoint, dtype=next(model.parameters()).dtype)
        model.load_state_dict(reloaded.state_dict())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Per micro-batch means; the Trainer divides by the accumulation steps (model_accepts_loss_kwargs=False).
        vision_tower_everywhere(self.ctx, [inputs])  # FSDP2 / ZeRO-3: a text-only batch beside another's images
        terms, outputs = compute_losses(self.ctx, self.methods, inputs, self.loss_reduction)
        if model.training:
            for key, value in terms.items():
                self._term_sums[key] = self._term_sums.get(key, 0.0) + float(value.detach())
            self._term_count += 1
        loss = sum(terms.values())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Add each loss term's mean since the last log to the Trainer's training logs (and so its trackers)."""
        if "loss" in logs and self._term_count:
            logs.update({key: total / self._term_count for key, total in self._term_sums.items()})
            self._term_sums, self._term_count = {}, 0
        super().log(logs, *args, **kwargs)

    def method_state_dict(self) -> dict:
        return {m.name: m.state_dict() for m in self.methods}

    @property
    def final_model(self):
        """The trained model after the methods' ``on_train_end`` (LoRA: merged into a plain model)."""
        return self.ctx.final_model if self.ctx is not None and self.ctx.final_model is not None else self.model


def _prepared(methods: list[Method], args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The Trainer's arguments with the model passed through every method's ``prepare_model`` (as mmtune's loop
    does after the scope is set), so LoRA's adapters exist before the Trainer builds its optimizer."""
    from mmtune.models.scope import layout_of

    model = kwargs.get("model", args[0] if args else None)
    if model is None:
        if any(m.overrides("prepare_model") for m in methods):
            raise ValueError(f"{', '.join(m.name for m in methods if m.overrides('prepare_model'))}: prepares the "
                             "model (prepare_model), so pass model= (a Trainer's model_init is not supported)")
        return args, kwargs
    layout = layout_of(model) if any(m.overrides("prepare_model") for m in methods) else None
    for method in methods:
        model = method.prepare_model(model, layout)
    if "model" in kwargs or not args:
        return args, {**kwargs, "model": model}
    return (model, *args[1:]), kwargs


class MethodTrainer(MethodTrainerMixin, Trainer):
    """A ``transformers.Trainer`` whose loss and update rules come from mmtune methods."""


def with_methods(trainer_class: type[Trainer]) -> type[Trainer]:
    """``trainer_class`` (e.g. TRL's ``SFTTrainer``) with mmtune methods: ``with_methods(SFTTrainer)(...,
    methods=[NRCA(), Spider()])``."""
    return type(f"Method{trainer_class.__name__}", (MethodTrainerMixin, trainer_class), {})
