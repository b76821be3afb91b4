"""Target-only logits (train.target_logits, issue 37): the model's head runs only where a loss reads it, and every
loss and gradient equals the full-logits one."""

import functools

import pytest
import torch

from helpers import step_gradients_on_and_off, text_only_records
from mmtune.data.collate import KEEP, RecordDataset, TrainCollator, model_inputs, subset_batch
from mmtune.data.records import Record, read_records
from mmtune.data.synthetic import vocabulary
from mmtune.losses import sample_cross_entropy, shifted, target_log_probs
from mmtune.models.tiny import build_tiny

ARCHITECTURES = ["llava", "qwen2_vl", "idefics3", "qwen3_vl", "gemma3", "internvl", "llava_onevision"]


def _records(world):
    caption, count = read_records(world / "detailed_caption_train.jsonl")[0], read_records(world / "count_mc_train.jsonl")[0]
    other = read_records(world / "detailed_caption_train.jsonl")[1]
    return [caption, count,
            Record(id="talk", task="chat", kind="open", image=caption.image, prompt="<image>" + count.prompt,
                   answers=count.answers, history=[{"prompt": caption.prompt, "answer": caption.target}]),
            Record(id="text", task="chat", kind="open", image=None, prompt=caption.prompt, answers=[caption.target]),
            Record(id="pair", task="chat", kind="open", image=[caption.image, other.image], prompt=caption.prompt,
                   answers=[other.target])]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_target_logits_give_the_full_logits_loss_and_gradient(world, architecture):
    """Captions, a letter, a conversation, a text-only and a two-image record in one batch, fp32: the head on the
    target positions only (the union over the batch's rows) gives the same per-sample cross-entropy and the same
    gradient to 1e-6 — for the batch and for a sub-batch (NRCA's, EWC's), which keeps the batch's positions."""
    model, processor = build_tiny(architecture, words=vocabulary())
    samples = [RecordDataset(_records(world))[i] for i in range(5)]
    full = TrainCollator(processor)(samples)
    kept = TrainCollator(processor, target_logits=True)(samples)
    assert KEEP not in full and torch.equal(kept["input_ids"], full["input_ids"])
    positions = kept[KEEP]  # every position that predicts some row's target, and no other
    targets = (full["labels"][:, 1:] != -100).any(dim=0).nonzero().squeeze(1)
    assert torch.equal(positions, targets) and positions.numel() < full["input_ids"].shape[1] - 1
    for rows in (None, torch.tensor([2, 4])):
        a, b = (batch if rows is None else subset_batch(batch, rows) for batch in (full, kept))
        model.zero_grad()
        logits = model(**model_inputs(a)).logits
        loss_full = sample_cross_entropy(logits, a["labels"])
        loss_full.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        small = model(**model_inputs(b)).logits
        assert small.shape[1] == positions.numel()  # the head ran on the kept positions only
        loss_kept = sample_cross_entropy(small, b["labels"], b[KEEP])
        loss_kept.sum().backward()
        torch.testing.assert_close(loss_kept, loss_full, rtol=1e-6, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-6,
                                       msg=name)


def test_kept_logits_without_their_positions_are_refused_not_misread():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100]])
    logits = torch.randn(2, 3, 10)  # positions 0, 1, 2 all predict a target
    log_probs, index = target_log_probs(logits, labels)  # the positions follow from the labels
    assert index.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="pass the batch's logits_to_keep"):
        shifted(logits[:1], labels[:1])  # a sub-batch's labels name fewer positions than its logits cover


# The methods whose loss reads the logits (beyond the cross-entropy): each must give the full-logits step.
LOGIT_METHODS = ["vanilla", "nrca", "dft", "asft", "eaft", "ewc", "uncertainty", "famo", "nrca+spider"]


@pytest.mark.parametrize("method", LOGIT_METHODS)
def test_every_method_that_reads_logits_takes_the_same_step(tiny_config, method):
    """One step of each method from the same state on the same micro-batch: terms and gradient with
    train.target_logits on equal those with it off (fp32, 1e-6)."""
    on, off = step_gradients_on_and_off(tiny_config, method, "train.target_logits", lambda batch: KEEP in batch)
    for name, grad in off.items():
        torch.testing.assert_close(on[name], grad, rtol=1e-5, atol=1e-6, msg=f"{method}: {name}")


@pytest.mark.parametrize("architecture", ["llava", "qwen2_vl", "idefics3"])
def test_a_blank_image_runs_the_vision_tower_and_leaves_a_text_only_batch_unchanged(architecture):
    """BLANK_IMAGE (what a text-only micro-batch gets beside another process's images on sharded weights): the vision
    tower and projector run once per forward, the loss is the same to the bit, and the projector's gradient is there
    and zero (without it: None — what DDP and ZeRO's reductions trip on)."""
    from mmtune.data.collate import BLANK_IMAGE
    from mmtune.losses import forward

    torch.manual_seed(0)
    model, processor = build_tiny(architecture, words=vocabulary())
    collator = TrainCollator(processor)
    records = text_only_records(2)
    batch = collator([RecordDataset(records)[i] for i in range(2)])
    assert "pixel_values" not in batch
    projector = [p for n, p in model.named_parameters() if "projector" in n or "merger" in n or "connector" in n]
    calls, original = [], model.get_image_features

    @functools.wraps(original)
    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.get_image_features = counted

    def loss_and_grads(with_blank: bool):
        model.zero_grad()
        given = {**batch, BLANK_IMAGE: collator.blank_image_inputs()} if with_blank else batch
        outputs = forward(model, given)
        log_probs, index = target_log_probs(outputs.logits, batch["labels"])
        loss = -log_probs.mean()
        loss.backward()
        return loss.detach(), [p.grad for p in projector]

    plain, plain_grads = loss_and_grads(False)
    assert not calls and all(g is None for g in plain_grads)
    blank, blank_grads = loss_and_grads(True)
    assert len(calls) == 1 and torch.equal(plain, blank)
    assert projector and all(g is not None and not g.any() for g in blank_grads)
