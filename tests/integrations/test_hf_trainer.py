import shutil

import pytest
import torch
from transformers import TrainingArguments

from helpers import text_only_records
from mmtune.data.collate import RecordDataset, TrainCollator
from mmtune.data.records import read_records
from mmtune.data.synthetic import vocabulary
from mmtune.integrations.hf_trainer import MethodTrainer
from mmtune.methods.ewc import EWC, EWCConfig
from mmtune.methods.nrca import NRCA
from mmtune.methods.spider import Spider, allocation_coefficients, importance
from mmtune.models.scope import apply_scope
from mmtune.models.tiny import build_tiny


def test_methods_run_inside_the_hf_trainer(world, tmp_path):
    model, processor = build_tiny("llava", words=vocabulary())
    apply_scope(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    records = read_records(world / "detailed_caption_train.jsonl")[:8] + read_records(world / "count_mc_train.jsonl")[:8]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], use_cpu=True, remove_unused_columns=False,
                             save_strategy="no", logging_strategy="no", disable_tqdm=True)
    spider = Spider()
    trainer = MethodTrainer(model=model, args=args, train_dataset=RecordDataset(records),
                            data_collator=TrainCollator(processor), methods=[NRCA(), spider])
    trainer.train()
    assert trainer.ctx.step == 2
    state = trainer.method_state_dict()["spider"]
    moved = pulled_back = 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            w0, grad_sum = state["pretrained"][name], state["grad_sum"][name]
            assert grad_sum.abs().sum() > 0
            c = allocation_coefficients(importance(w0), importance(grad_sum))
            delta = param.detach() - w0
            pulled_back += int((delta[c == 0] == 0).sum())
            moved += int((c > 0).sum())
        else:
            assert torch.equal(param, before[name]), name
    assert moved > 0 and pulled_back > 0


def test_trainer_checkpoints_carry_method_state_and_resume_exactly(world, tmp_path):
    records = read_records(world / "detailed_caption_train.jsonl")[:8] + read_records(world / "count_mc_train.jsonl")[:8]

    def run(out: str, resume: str | bool | None = None):
        model, processor = build_tiny("llava", words=vocabulary())
        apply_scope(model)
        args = TrainingArguments(output_dir=str(tmp_path / out), max_steps=4, per_device_train_batch_size=4,
                                 learning_rate=1e-3, report_to=[], use_cpu=True, remove_unused_columns=False,
                                 save_strategy="steps", save_steps=2, logging_strategy="no", disable_tqdm=True,
                                 seed=0, data_seed=0)
        trainer = MethodTrainer(model=model, args=args, train_dataset=RecordDataset(records),
                                data_collator=TrainCollator(processor), methods=[Spider()])
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    full, _ = run("full")
    assert (tmp_path / "full" / "checkpoint-2" / "mmtune_methods.pt").is_file()
    # resume a copy of the interrupted run: W0 must be the original weights, not those at step 2
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed, trainer = run("resumed", resume=True)
    assert trainer.ctx.step == 4
    for (name, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_methods_inside_trl_sft_trainer_log_every_loss_term(world, tmp_path):
    """TRL's SFTTrainer with mmtune's methods (with_methods): the methods act, and each loss term is logged."""
    trl = pytest.importorskip("trl")
    from mmtune import with_methods

    model, processor = build_tiny("llava", words=vocabulary())
    apply_scope(model)
    records = read_records(world / "detailed_caption_train.jsonl")[:8] + read_records(world / "count_mc_train.jsonl")[:8]
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                         report_to=[], use_cpu=True, remove_unused_columns=False, save_strategy="no",
                         logging_steps=1, disable_tqdm=True, dataset_kwargs={"skip_prepare_dataset": True})
    from mmtune.data.hf_datasets import to_hf_dataset

    # TRL wants a datasets.Dataset: the records as one (TrainCollator turns its rows back into records)
    trainer = with_methods(trl.SFTTrainer)(model=model, args=args, train_dataset=to_hf_dataset(records),
                                           data_collator=TrainCollator(processor), processing_class=processor,
                                           methods=[NRCA(), Spider()])
    trainer.train()
    assert type(trainer).__name__ == "MethodSFTTrainer" and trainer.ctx.step == 2
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 2 and all({"ce", "nrca_gap"} <= set(row) for row in logged)
    assert all(row["loss"] == pytest.approx(row["ce"] + row["nrca_gap"], rel=1e-4) for row in logged)
    assert trainer.method_state_dict()["spider"]["grad_sum"]


def test_method_trainer_logs_loss_terms(world, tmp_path):
    model, processor = build_tiny("llava", words=vocabulary())
    apply_scope(model)
    records = read_records(world / "detailed_caption_train.jsonl")[:8]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], use_cpu=True, remove_unused_columns=False, save_strategy="no",
                             logging_steps=1, disable_tqdm=True)
    ewc = EWC(EWCConfig(lam=100.0, samples=4))  # its Fisher from the Trainer's own data loader (ctx.batches)
    trainer = MethodTrainer(model=model, args=args, train_dataset=RecordDataset(records),
                            data_collator=TrainCollator(processor), methods=[NRCA(), ewc])
    trainer.train()
    assert all("nrca_gap" in row and "ewc" in row for row in trainer.state.log_history if "loss" in row)
    assert sum(float(v.sum()) for v in ewc.fisher.values()) > 0


def test_lora_inside_the_trainer_trains_adapters_and_merges(world, tmp_path):
    """The Trainer runs the methods' prepare_model: LoRA's adapters exist before its optimizer, train, and
    trainer.final_model is the merged plain model (it used to train without adapters and crash at the end)."""
    from mmtune.methods import Lora

    model, processor = build_tiny("llava", words=vocabulary())
    apply_scope(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    records = read_records(world / "detailed_caption_train.jsonl")[:8] + read_records(world / "count_mc_train.jsonl")[:8]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, remove_unused_columns=False,
                             save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = MethodTrainer(model=model, args=args, train_dataset=RecordDataset(records),
                            data_collator=TrainCollator(processor), methods=[Lora()])
    adapters = [n for n, p in trainer.model.named_parameters() if "lora_B" in n and p.requires_grad]
    assert adapters  # wrapped before the Trainer built its optimizer
    trainer.train()
    final = trainer.final_model
    assert not hasattr(final, "peft_config")  # merged: a plain model any tool loads
    weights = dict(final.named_parameters())
    moved = [n for n in before if not torch.equal(weights[n], before[n])]
    assert any(".layers.3.self_attn.q_proj" in n for n in moved)  # the adapters' update, merged into the block
    assert all("vision_tower" not in n for n in moved)


def test_a_trainer_under_zero3_refuses_a_loss_that_reads_the_weights():
    """mmtune's loop adds L1/L2's penalty on ZeRO-3's full masters; a Trainer's step would see empty partitions (and
    L2's loss term steps aside there), so the Trainer refuses instead of training as vanilla."""
    from types import SimpleNamespace

    from mmtune.integrations.hf_trainer import MethodTrainerMixin
    from mmtune.methods.l2_reg import L2Reg
    from mmtune.methods.nrca import NRCA

    class ZeRO3Trainer:  # what the mixin reads of a Trainer built with a ZeRO-3 DeepSpeed config
        def __init__(self, *args, **kwargs):
            self.accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))

        def add_callback(self, callback):
            pass

    class Trainer(MethodTrainerMixin, ZeRO3Trainer):
        pass

    with pytest.raises(ValueError, match="l2_reg: the loss term reads the trainable weights.*ZeRO-3"):
        Trainer(methods=[NRCA(), L2Reg()])
    Trainer(methods=[NRCA()])  # a loss of the outputs alone runs
    from mmtune.data.synthetic import vocabulary
    from mmtune.methods.lora import Lora
    from mmtune.models.tiny import build_tiny

    with pytest.raises(ValueError, match="lora: merging the adapters into ZeRO-3's partitioned weights"):
        Trainer(model=build_tiny("llava", words=vocabulary(), seed=0)[0], methods=[Lora()])


def test_a_trainers_text_only_batch_beside_another_processs_images_runs_the_vision_tower(world, tmp_path):
    """In a Trainer too (its compute_loss, train and eval): on FSDP2 / ZeRO-3 a text-only batch while another process's
    has images gets the blank image of the Trainer's TrainCollator (tests/test_step.py, tests/test_losses.py: what it
    does); the loss is the plain one."""
    from types import SimpleNamespace

    from mmtune.data.collate import BLANK_IMAGE
    from mmtune.engine import Engine
    from mmtune.methods.base import TrainContext

    model, processor = build_tiny("llava", words=vocabulary())
    apply_scope(model)
    collator = TrainCollator(processor)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                             remove_unused_columns=False, save_strategy="no", disable_tqdm=True)
    records = text_only_records(2)
    trainer = MethodTrainer(model=model, args=args, train_dataset=RecordDataset(records), data_collator=collator,
                            methods=[NRCA()])
    other_has_images = SimpleNamespace(device=torch.device("cpu"), reduce=lambda tensor, reduction: tensor + 1)

    def ctx(engine):
        return TrainContext(model=model, unwrapped=model, trainable={}, generator=torch.Generator(),
                            accelerator=other_has_images, engine=engine, collator=collator)

    inputs = collator([RecordDataset(records)[i] for i in range(2)])
    trainer.ctx = ctx(Engine("single"))
    plain = trainer.compute_loss(model, dict(inputs))
    trainer.ctx = ctx(Engine("zero3", 2))
    loss = trainer.compute_loss(model, inputs)
    assert BLANK_IMAGE in inputs and torch.equal(loss, plain)
