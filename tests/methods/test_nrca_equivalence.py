"""NRCA's cheap path (noisy forward on open-response rows only) equals the reference's two full passes."""

import torch

from mmtune.data.collate import RecordDataset, TrainCollator, model_inputs
from mmtune.data.records import read_records
from mmtune.data.synthetic import vocabulary
from mmtune.losses import sample_cross_entropy
from mmtune.methods.base import TrainContext
from mmtune.methods.nrca import NRCA, NRCAConfig, confidence_gap_loss, noisy_view, token_confidence
from mmtune.models.scope import apply_scope
from mmtune.models.tiny import build_tiny


def _batch(world, processor):
    records = read_records(world / "detailed_caption_train.jsonl")[:3] + read_records(world / "count_mc_train.jsonl")[:3]
    records = [records[i] for i in (0, 3, 1, 4, 2, 5)]  # interleave open and choice rows
    dataset = RecordDataset(records)
    return TrainCollator(processor)([dataset[i] for i in range(len(records))])


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_open_only_noisy_pass_equals_two_full_passes(world):
    model, processor = build_tiny("llava", words=vocabulary())
    apply_scope(model)
    batch = _batch(world, processor)
    lam, delta = 2.0, 0.5

    # reference: noisy forward of the whole batch, gap over all rows weighted by the open mask
    outputs = model(**model_inputs(batch))
    loss_i = sample_cross_entropy(outputs.logits, batch["labels"])
    _, clean_conf = token_confidence(outputs.logits, batch["labels"])
    noisy = noisy_view(batch["pixel_values"], delta, torch.Generator().manual_seed(0))
    noisy_logits = model(**model_inputs({**batch, "pixel_values": noisy})).logits
    _, noisy_conf = token_confidence(noisy_logits, batch["labels"])
    reference = loss_i.mean() + lam * confidence_gap_loss(loss_i, clean_conf, noisy_conf, batch["open_mask"])
    reference.backward()
    reference_grads = _grads(model)
    model.zero_grad()

    # mmtune: the method's extra loss, noisy forward on the open rows only
    ctx = TrainContext(model=model, unwrapped=model, trainable={}, generator=torch.Generator().manual_seed(0))
    outputs = model(**model_inputs(batch))
    loss_i = sample_cross_entropy(outputs.logits, batch["labels"])
    terms = NRCA(NRCAConfig(lam=lam, delta=delta)).extra_losses(ctx, batch, outputs, loss_i)
    ours = loss_i.mean() + terms["nrca_gap"]
    ours.backward()

    torch.testing.assert_close(ours, reference)
    assert terms["nrca_gap"].item() > 0
    grads = _grads(model)
    assert grads.keys() == reference_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-4, atol=1e-6)


def test_no_noisy_forward_without_open_samples(world):
    model, processor = build_tiny("llava", words=vocabulary())
    records = read_records(world / "count_mc_train.jsonl")[:2]
    batch = TrainCollator(processor)([RecordDataset(records)[i] for i in range(2)])
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    outputs = model(**model_inputs(batch))
    ctx = TrainContext(model=model, unwrapped=model, trainable={}, generator=torch.Generator().manual_seed(0))
    terms = NRCA().extra_losses(ctx, batch, outputs, sample_cross_entropy(outputs.logits, batch["labels"]))
    assert len(calls) == 1 and terms["nrca_gap"].item() == 0.0
