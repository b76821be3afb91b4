"""GRPO as a way to train (mmtune.methods.grpo, issue 38): the loss of a fixed rollout is GRPO's (mmtune.grpo's
policy_loss, itself TRL's to 1e-6 in tests/test_grpo.py) on the tiny architectures; sampling follows the record,
not the batch; rewards by the task's metric, a user's function and a format; a run logs what GRPO users watch.
(Every method's contract — frozen weights, exact resume — in test_contract.py; DDP in tests/test_distributed.py.)"""

import dataclasses
import json

import pytest
import torch
from torch.func import functional_call

from helpers import final_weights
from mmtune.data.collate import (
    ADVANTAGES,
    GenerationCollator,
    RecordDataset,
    TrainCollator,
    image_token_ids,
    model_inputs,
)
from mmtune.data.records import read_records
from mmtune.data.synthetic import vocabulary
from mmtune.engine import Engine
from mmtune.grpo import group_advantages, policy_loss
from mmtune.losses import compute_losses
from mmtune.methods.base import TrainContext
from mmtune.methods.grpo import GRPO, GRPOConfig, rollout_batch
from mmtune.models.tiny import build_tiny
from mmtune.train import train

ARCHITECTURES = ["llava", "qwen2_vl", "idefics3"]


def _setup(world, architecture, records=None, engine=None, **options):
    torch.manual_seed(0)
    model, processor = build_tiny(architecture, words=vocabulary())
    if records is None:
        records = read_records(world / "count_mc_train.jsonl")[:2] + read_records(world / "detailed_caption_train.jsonl")[:1]
    collator = TrainCollator(processor, keep_samples=True)
    ctx = TrainContext(model=model, unwrapped=model, generator=torch.Generator().manual_seed(0), records=records,
                       trainable={n: p for n, p in model.named_parameters() if p.requires_grad}, collator=collator,
                       engine=engine)
    method = GRPO(GRPOConfig(**options))
    method.setup(ctx)
    return model, processor, collator, ctx, method, records


def _fixed_rollout(processor, collator, records, per_record: int):
    """Two mc records, ``per_record`` fixed answers each (random tokens, lengths 2–6), with fixed rewards."""
    generator = torch.Generator().manual_seed(1)
    banned = image_token_ids(processor) | {collator.tokenizer.pad_token_id}
    vocab = [t for t in range(len(collator.tokenizer)) if t not in banned]
    rows, answers = [], []
    for record in records:
        for _ in range(per_record):
            length = int(torch.randint(2, 7, (1,), generator=generator))
            answers.append([vocab[int(i)] for i in torch.randint(len(vocab), (length,), generator=generator)])
            rows.append(RecordDataset([record])[0])
    prompts = GenerationCollator(processor)(rows)
    prompts.pop("records")
    batch = rollout_batch(collator, prompts, answers, [r["record"] for r in rows])
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0], dtype=torch.float64)[:len(rows)]
    batch[ADVANTAGES] = group_advantages(rewards, per_record).float()
    return batch


def _sampled_log_probs(logits, labels):
    shifted = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    mask = targets != -100
    return shifted.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1), mask


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("reduction, loss_type", [("sample", "grpo"), ("token", "bnpo")])
def test_the_loss_of_a_fixed_rollout_is_grpos(world, architecture, reduction, loss_type):
    """Fixed answers and rewards, the policy moved away from W0 (so the KL is not 0): the method's loss — the
    cross-entropy plus its term, as the step sums them — and its gradient equal policy_loss on the sampled tokens'
    log-probabilities with ρ = 1 and the base's from W0, to 1e-6 (train.loss_reduction sample = TRL's "grpo",
    token = "bnpo")."""
    model, processor, collator, ctx, method, records = _setup(world, architecture, num_generations=3, beta=0.1)
    with torch.no_grad():
        for param in ctx.trainable.values():
            param.add_(0.05 * torch.randn_like(param))
    batch = _fixed_rollout(processor, collator, records[:2], per_record=3)
    model.zero_grad()
    terms, _ = compute_losses(ctx, [method], batch, reduction)
    loss = sum(terms.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in ctx.trainable.items() if p.grad is not None}
    assert len(grads) > 10
    model.zero_grad()
    logps, mask = _sampled_log_probs(model(**model_inputs(batch)).logits, batch["labels"])
    with torch.no_grad():
        base = functional_call(model, method.pretrained, args=(), kwargs=model_inputs(batch)).logits
    ref, _ = _sampled_log_probs(base, batch["labels"])
    expected = policy_loss(logps, logps.detach(), batch[ADVANTAGES], mask, beta=0.1, ref_logps=ref,
                           loss_type=loss_type)
    expected["loss"].backward()
    torch.testing.assert_close(loss, expected["loss"], rtol=1e-6, atol=1e-6)
    assert float(expected["kl"]) > 1e-4  # the KL acts
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ctx.trainable[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    kl = torch.cat([values for key, values in method._noted if key == "kl"])
    assert float(kl.mean()) == pytest.approx(float(expected["kl"]), rel=1e-5)  # the logged KL: policy_loss's


class _Step:
    """What ``GRPO.rollout`` reads of a step: the context, and where it notes diagnostics."""

    def __init__(self, ctx):
        self.ctx, self.noted = ctx, []

    def note(self, key, values):
        self.noted.append((key, values))


@pytest.mark.parametrize("reduction", ["sample", "token"])
def test_a_mixed_batch_trains_reference_answers_by_the_cross_entropy(world, reduction):
    """Two mc records (G = 3 sampled answers each) and a caption (its reference answer) in one rollout batch. At
    ρ = 1 a group's GRPO loss is −mean(A) = 0 (β = 0), so the loss is the caption's part alone: with
    loss_reduction=sample its mean −log p over the 3 records (each record weighs the same, not each of the 7 rows);
    with token its summed −log p over all 7 rows' tokens."""
    model, processor, collator, ctx, method, records = _setup(world, "llava", num_generations=3, beta=0.0,
                                                              max_new_tokens=5)
    batch = collator([RecordDataset(records)[i] for i in range(3)])
    rollout = method.rollout(_Step(ctx), batch, seed=3, reduction=reduction)
    assert rollout["tasks"] == ["count_mc"] * 6 + ["detailed_caption"]
    assert torch.isnan(rollout[ADVANTAGES]).tolist() == [False] * 6 + [True]
    terms, outputs = compute_losses(ctx, [method], rollout, reduction)
    logps, mask = _sampled_log_probs(outputs.logits, rollout["labels"])
    caption = -(logps[6] * mask[6]).sum()
    expected = caption / mask[6].sum() / 3 if reduction == "sample" else caption / mask.sum()
    torch.testing.assert_close(sum(terms.values()), expected, rtol=1e-5, atol=1e-6)


def test_a_record_samples_the_same_answers_in_any_batch(world):
    """Seeded by the step and the record: a record's G answers are the same alone or beside another record (so a
    DDP run samples what one process samples), and another step samples others."""
    model, processor, collator, ctx, method, records = _setup(world, "llava", num_generations=3, max_new_tokens=6)
    sample = RecordDataset(records[:1])[0]
    alone = method.sample(ctx, sample, seed=7)
    assert alone == method.sample(ctx, sample, seed=7) and alone != method.sample(ctx, sample, seed=8)
    assert len(alone) == 3 and all(1 <= len(a) <= 6 for a in alone)
    assert not any(t in image_token_ids(processor) for a in alone for t in a)

    both = collator([RecordDataset(records[:2])[i] for i in range(2)])
    first = method.rollout(_Step(ctx), both, seed=5)
    swapped = method.rollout(_Step(ctx), collator([RecordDataset(records[:2])[i] for i in (1, 0)]), seed=5)
    g = 3
    assert torch.equal(first["labels"][:g], swapped["labels"][g:2 * g])  # record 0's rows, wherever it sits
    assert first["tasks"] == ["count_mc"] * 2 * g


def test_rewards_by_metric_user_function_and_format(world, tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def shorter(record, answer):\n    return 1.0 / (1 + len(answer))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    *_, method, records = _setup(world, "llava", format_pattern="[A-D]", format_weight=0.5)
    mc = records[0]
    gold = "ABCD"[mc.answer_index]
    assert method.reward(mc, gold) == 1.5 and method.reward(mc, "Z") == 0.0
    assert method.reward(mc, "the answer is " + gold) == 1.0  # the letter parsed, the format not kept
    *_, method, _ = _setup(world, "llava", reward="my_rewards:shorter", tasks=["detailed_caption"])
    assert method.grpo_tasks == ["detailed_caption"] and method.reward(records[2], "abc") == 0.25


def test_a_named_caption_task_is_rewarded_by_cider_d(world):
    """A caption task in method.grpo.tasks: each answer's CIDEr-D against its references, the document frequencies
    from the task's training references — the reference itself scores far above another record's caption."""
    captions = read_records(world / "detailed_caption_train.jsonl")[:20]
    records = read_records(world / "count_mc_train.jsonl")[:2] + captions
    *_, method, _ = _setup(world, "llava", records=records, tasks=["count_mc", "detailed_caption"])
    caption, other = captions[0], captions[5]
    assert method.metrics["detailed_caption"] == "cider" and method.grpo_tasks == ["count_mc", "detailed_caption"]
    assert method.reward(caption, caption.target) > 2 * method.reward(caption, other.target) >= 0


@pytest.mark.parametrize("options, message", [
    ({"tasks": ["nope"]}, "no training record has that task"),
    ({"reward": "no_such_module:f"}, "method.grpo.reward='no_such_module:f'"),
    ({"reward": "nocolon"}, "write it as package.module:function"),
])
def test_what_cannot_be_rewarded_is_refused_by_name(world, options, message):
    with pytest.raises(ValueError, match=message):
        _setup(world, "llava", **options)


@pytest.mark.parametrize("engine", [Engine("fsdp2", 2), Engine("zero3", 2)])
def test_sharded_weights_refuse_grpo_records_with_and_without_images(world, engine):
    """With sharded weights the processes generate in lockstep, every generate's forwards gathering the weights from
    all of them: a text-only record's generate skips the vision tower, whose gathers another process's would wait
    for. A mix is refused before training, naming a text-only record; one process, or DDP, takes it."""
    records = read_records(world / "count_mc_train.jsonl")[:3]
    records[1] = dataclasses.replace(records[1], image=None)
    with pytest.raises(ValueError, match=f"record '{records[1].id}'.*vision tower"):
        _setup(world, "llava", records=records, engine=engine)
    for whole in (Engine("ddp", 2), Engine("fsdp2", 1)):
        assert _setup(world, "llava", records=records, engine=whole)[4].lockstep is False
    assert _setup(world, "llava", engine=engine)[4].lockstep is True


def test_captions_alone_have_no_reward(world):
    captions = read_records(world / "detailed_caption_train.jsonl")[:2]
    with pytest.raises(ValueError, match="no task has a per-answer reward by default"):
        _setup(world, "llava", records=captions)


def test_a_run_logs_rewards_kl_clip_and_lengths_beside_the_sft_tasks(tiny_config):
    """configs/tiny.yaml's mix: counting MC by GRPO, captions by the cross-entropy in the same steps; the log has
    each GRPO task's reward (mean, std), the KL, the clip share and the answer length — none of them in the loss."""
    run = train(tiny_config("method.name=grpo", "method.grpo.max_new_tokens=8", "train.max_steps=2"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "ce" in r]
    assert len(rows) == 2
    for row in rows:
        for key in ("reward/count_mc", "reward/count_mc/std", "kl", "clip_fraction", "answer_length"):
            assert key in row, key
        assert row["loss"] == pytest.approx(row["ce"] + row["grpo"])
        assert 1 <= row["answer_length"] <= 8 and row["clip_fraction"] == 0.0  # ρ ≡ 1: one step per sampling
    assert any("loss/detailed_caption" in r for r in rows)  # the SFT task trained in the same steps


def test_grpo_starts_from_an_sft_runs_final_model(tiny_config):
    """SFT then GRPO: a GRPO run whose model.path is an SFT run's final/ trains from those weights (its KL anchor W0
    is the SFT model, not the random base), and the two runs are separate folders — two rows of a report."""
    sft = train(tiny_config("train.max_steps=2", out="sft"))
    grpo = train(tiny_config("model.tiny=null", f"model.path={sft / 'final'}", "method.name=grpo",
                             "method.grpo.max_new_tokens=4", "train.max_steps=2", "train.save_every=1", out="grpo"))
    start = final_weights(sft)
    anchor = torch.load(grpo / "checkpoints" / "step-000001" / "mmtune_methods.pt", weights_only=True)["grpo"]
    assert len(anchor["pretrained"]) > 5
    for name, value in anchor["pretrained"].items():
        assert torch.equal(value, start[name]), name
    assert (grpo / "final").is_dir() and (sft / "final").is_dir()
