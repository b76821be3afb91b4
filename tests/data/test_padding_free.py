"""Padding-free batches (data.padding_free, issue 37): the model sees a batch's records concatenated without padding,
and every loss and gradient equals the padded batch's."""

import pytest
import torch

from helpers import step_gradients_on_and_off
from mmtune.data.collate import KEEP, RecordDataset, TrainCollator, model_inputs, subset_batch
from mmtune.data.padding_free import PADDING_FREE, pack, padding_free_refusal, rope_index_of, unpack
from mmtune.data.synthetic import vocabulary
from mmtune.losses import forward, sample_cross_entropy
from mmtune.models.tiny import build_tiny
from test_losses import ARCHITECTURES, _records


def _loss_and_gradient(model, batch):
    seen = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs), with_kwargs=True)
    model.zero_grad()
    logits = forward(model, batch).logits
    loss = sample_cross_entropy(logits, batch["labels"], batch.get(KEEP))
    loss.sum().backward()
    hook.remove()
    if batch.get(PADDING_FREE):  # the model was given one row without padding
        assert seen[0]["input_ids"].shape[0] == 1 and "attention_mask" not in seen[0]
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("architecture", [a for a in ARCHITECTURES if a != "gemma3"])
def test_a_padding_free_batch_gives_the_padded_loss_and_gradient(world, architecture):
    """Captions, a letter, a conversation, a text-only and a two-image record in one batch, fp32: one forward over
    the records concatenated (positions restarting per record, attention inside each) gives the padded batch's
    per-sample cross-entropy and gradient to 1e-5 — with whole-sequence and target-only logits, for the batch and
    for a sub-batch (NRCA's noised rows, EWC's one record)."""
    torch.manual_seed(0)
    model, processor = build_tiny(architecture, words=vocabulary())
    samples = [RecordDataset(_records(world))[i] for i in range(5)]
    for target_logits in (False, True):
        padded = TrainCollator(processor, target_logits=target_logits)(samples)
        free = TrainCollator(processor, target_logits=target_logits, padding_free=True)(samples)
        assert free[PADDING_FREE] and PADDING_FREE not in model_inputs(free)
        assert (padded["attention_mask"] == 0).any()  # the batch has padding to drop
        for rows in (None, torch.tensor([2, 4]), torch.tensor([3])):
            a, b = (batch if rows is None else subset_batch(batch, rows) for batch in (padded, free))
            loss_padded, grads = _loss_and_gradient(model, a)
            loss_free, free_grads = _loss_and_gradient(model, b)
            torch.testing.assert_close(loss_free, loss_padded, rtol=1e-5, atol=1e-5)
            assert free_grads.keys() == grads.keys()
            for name, grad in grads.items():
                torch.testing.assert_close(free_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_gemma3_is_refused_with_the_reason_and_would_be_wrong(world):
    """Gemma 3's image tokens attend both ways; transformers' packed mask misplaces that on its sliding-window layers.
    The refusal names it — and the packed loss is indeed off the padded one (if transformers fixes it, this fails and
    Gemma 3 joins the exact ones)."""
    torch.manual_seed(0)
    model, processor = build_tiny("gemma3", words=vocabulary())
    assert "Gemma 3" in padding_free_refusal(model) and padding_free_refusal(build_tiny("llava")[0]) is None
    samples = [RecordDataset(_records(world))[i] for i in range(5)]
    padded = TrainCollator(processor)(samples)
    free = TrainCollator(processor, padding_free=True)(samples)
    assert not torch.allclose(_loss_and_gradient(model, free)[0], _loss_and_gradient(model, padded)[0], atol=1e-4)


def test_a_model_mmtune_has_not_checked_is_refused(tiny_config):
    from mmtune.train import train

    with pytest.raises(ValueError, match="data.padding_free: Gemma 3"):
        train(tiny_config("model.tiny=gemma3", "data.padding_free=true", out="gemma"))
    unknown = torch.nn.Linear(2, 2)
    unknown.config = type("Config", (), {"model_type": "mllama"})()
    assert "has not checked that a packed mllama forward" in padding_free_refusal(unknown)


def test_the_packed_row_holds_every_token_once_with_positions_restarting(world):
    """What the model is given: one row of the records' tokens (no padding), positions 0… per record, no attention
    mask; with target logits, the head runs at each record's own targets (fewer than the padded union)."""
    model, processor = build_tiny("llava", words=vocabulary())
    samples = [RecordDataset(_records(world))[i] for i in range(5)]
    batch = TrainCollator(processor, target_logits=True, padding_free=True)(samples)
    inputs = model_inputs(batch)
    packed, packing = pack(inputs, batch["labels"])
    lengths = batch["attention_mask"].sum(dim=1)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, int(lengths.sum()))
    assert packed["input_ids"][0].tolist() == [t for row, n in zip(batch["input_ids"].tolist(), lengths.tolist(),
                                                                   strict=True) for t in row[:n]]
    assert packed["position_ids"][0].tolist() == [p for n in lengths.tolist() for p in range(n)]
    targets = int((batch["labels"][:, 1:] != -100).sum())
    assert packed[KEEP].numel() == targets < batch["labels"].shape[0] * batch[KEEP].numel()
    logits = torch.randn(1, targets, 7)
    back = unpack(logits, packing)
    assert back.shape == (5, batch[KEEP].numel(), 7)
    assert torch.equal(back[(batch["labels"][:, 1:][:, batch[KEEP]] != -100)], logits[0])


def test_qwen_vl_rows_get_their_multimodal_positions(world):
    """Qwen2-VL: the packed positions are the model's own 3-D positions of each record (its get_rope_index), after
    the text positions that mark where each record starts — the form transformers reads as packed."""
    model, processor = build_tiny("qwen2_vl", words=vocabulary())
    samples = [RecordDataset(_records(world))[i] for i in range(5)]
    batch = TrainCollator(processor, padding_free=True)(samples)
    inputs = model_inputs(batch)
    packed, _ = pack(inputs, batch["labels"], rope_index_of(model))
    real = batch["attention_mask"].bool()
    three, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                          attention_mask=batch["attention_mask"])
    assert packed["position_ids"].shape == (4, 1, int(real.sum()))
    assert torch.equal(packed["position_ids"][1:, 0], three[:, real])
    assert rope_index_of(build_tiny("llava", words=vocabulary())[0]) is None


def test_left_padded_rows_are_refused():
    inputs = {"input_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])}
    with pytest.raises(ValueError, match="right-padded"):
        pack(inputs, torch.full((2, 3), -100))


# The methods whose loss reads the logits or forwards again (NRCA's noised rows, DFT's base model, EWC's records).
LOGIT_METHODS = ["vanilla", "nrca", "dft", "asft", "eaft", "ewc", "famo"]


@pytest.mark.parametrize("method", LOGIT_METHODS)
def test_every_method_that_reads_logits_takes_the_padded_step(tiny_config, method):
    """One step of each method from the same state on the same micro-batch: terms and gradient with
    data.padding_free on equal the padded batch's (fp32)."""
    free, padded = step_gradients_on_and_off(tiny_config, method, "data.padding_free",
                                             lambda batch: batch.get(PADDING_FREE))
    for name, grad in padded.items():
        torch.testing.assert_close(free[name], grad, rtol=1e-4, atol=1e-5, msg=f"{method}: {name}")
