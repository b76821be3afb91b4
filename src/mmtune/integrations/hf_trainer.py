"""The same Method objects inside a Hugging Face ``Trainer`` (bring your own Trainer / TRL setup).

``MethodTrainer`` computes mmtune's loss (per-sample cross-entropy + the methods' named extra terms) and
registers ``MethodCallback``, which maps the method hooks onto the Trainer's events:
``setup`` → ``on_train_begin``; ``before_optimizer_step`` → ``on_pre_optimizer_step`` (gradients
accumulated and clipped); ``after_optimizer_step`` → ``on_optimizer_step``; ``on_train_end``.

    model, processor = load_model(path); apply_scope(model)
    trainer = MethodTrainer(model=model, args=TrainingArguments(..., remove_unused_columns=False),
                            train_dataset=RecordDataset(records), data_collator=TrainCollator(processor),
                            methods=[NRCA(), Spider()])
    trainer.train()

Resuming a Trainer run restores the Trainer's own state; method state (e.g. SPIDER's W0 and G) is in
``trainer.method_state_dict()`` for you to save with your checkpoints.
"""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback

from mmtune.losses import compute_losses
from mmtune.methods.base import Method, TrainContext


class MethodCallback(TrainerCallback):
    def __init__(self, methods: list[Method], trainer: MethodTrainer):
        self.methods, self.trainer = methods, trainer

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
        self.trainer.ctx = TrainContext(model=self.trainer.model_wrapped, unwrapped=model, trainable=trainable,
                                        generator=generator, accelerator=self.trainer.accelerator,
                                        optimizer=optimizer, total_steps=state.max_steps)
        for method in self.methods:
            method.setup(self.trainer.ctx)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for method in self.methods:
            method.before_optimizer_step(self.trainer.ctx)

    def on_optimizer_step(self, args, state, control, **kwargs):
        for method in self.methods:
            method.after_optimizer_step(self.trainer.ctx)
        self.trainer.ctx.step += 1

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.trainer.ctx.final_model = model
        for method in self.methods:
            method.on_train_end(self.trainer.ctx)


class MethodTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss and update rules come from mmtune methods."""

    def __init__(self, *args, methods: list[Method] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.methods = methods or []
        self.ctx: TrainContext | None = None
        self.add_callback(MethodCallback(self.methods, self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        terms, outputs = compute_losses(self.ctx, self.methods, inputs)
        loss = sum(terms.values())
        return (loss, outputs) if return_outputs else loss

    def method_state_dict(self) -> dict:
        return {m.name: m.state_dict() for m in self.methods}
