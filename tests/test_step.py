"""One optimizer step (mmtune.step): accumulation and reductions give the exact mean, a non-finite step stops the run."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import final_weights, losses
from mmtune.cli import main
from mmtune.train import NonFiniteError, train


@pytest.mark.parametrize("overrides", [["scope.lr_blocks=1e30", "scope.lr_projector=1e30"],
                                       ["method.name=nrca", "method.nrca.lam=1e38"]])
def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(tiny_config, overrides):
    import re

    with pytest.raises(NonFiniteError, match=r"step \d+: (loss term|gradient norm)") as error:
        train(tiny_config(*overrides, "train.max_steps=30", "train.save_every=1", "train.max_grad_norm=null",
                          out="nan"))
    failed_at = int(re.search(r"step (\d+)", str(error.value)).group(1))
    run = Path(tiny_config(out="nan").train.output_dir)
    assert not (run / "final").exists()
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert len(checkpoints) == failed_at - 1  # every step before the failure was checkpointed, none after
    for checkpoint in checkpoints:
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())


def test_cli_exits_non_zero_on_nan(tiny_config, tmp_path, capsys):
    from mmtune.config import save_config

    config_file = tmp_path / "nan.yaml"
    save_config(tiny_config("scope.lr_blocks=1e30", "scope.lr_projector=1e30", "train.max_steps=30",
                            "train.max_grad_norm=null", out="clinan"), config_file)
    assert main(["train", "--config", str(config_file)]) != 0
    assert "not finite" in capsys.readouterr().err


@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_gradient_accumulation_2x4_matches_8x1(tiny_config, reduction):
    # The micro-batches hold different numbers of target tokens: the token mean must count the whole step's.
    a = train(tiny_config("train.batch_size=4", "train.grad_accum=2", "train.max_steps=2",
                          f"train.loss_reduction={reduction}", out="accum"))
    b = train(tiny_config("train.batch_size=8", "train.grad_accum=1", "train.max_steps=2",
                          f"train.loss_reduction={reduction}", out="batch"))
    wa, wb = final_weights(a), final_weights(b)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)
    assert losses(a) == pytest.approx(losses(b), rel=1e-5)


def test_the_two_loss_reductions_differ_by_hand():
    """token: Σ token losses / #tokens; sample: mean over samples of each sample's token mean."""
    from types import SimpleNamespace

    from mmtune.losses import compute_losses

    logits = torch.zeros(2, 4, 3)  # uniform over 3 tokens: every target token costs log 3
    logits[0, 0, 1] = 5.0  # sample 0's first target is easy
    labels = torch.tensor([[-100, 1, 2, 0], [-100, 2, -100, -100]])  # 3 target tokens, then 1
    model = lambda **_: SimpleNamespace(logits=logits)  # noqa: E731
    ctx = SimpleNamespace(model=model)
    batch = {"labels": labels, "input_ids": labels}
    easy = -torch.log_softmax(logits[0, 0], -1)[1]
    log3 = torch.log(torch.tensor(3.0))
    token = compute_losses(ctx, [], batch, "token")[0]["ce"]
    sample = compute_losses(ctx, [], batch, "sample")[0]["ce"]
    torch.testing.assert_close(token, (easy + 3 * log3) / 4)
    torch.testing.assert_close(sample, ((easy + 2 * log3) / 3 + log3) / 2)


class _Processes:
    """An accelerator's reduce over processes whose other members hold ``others`` (one flag per micro-batch each)."""

    device = torch.device("cpu")

    def __init__(self, others: list[list[float]]):
        self.others = others

    def reduce(self, tensor, reduction="sum"):
        return tensor + torch.tensor(self.others).sum(0)


@pytest.mark.parametrize("kind", ["zero3", "fsdp2"])
def test_a_text_only_micro_batch_beside_images_runs_the_vision_tower_on_a_blank_image(kind):
    """On sharded weights every process must run the vision tower or none (its gathers are collectives; a ZeRO-3
    launch with text-only records hung at step 2 before this): a text-only micro-batch beside another process's
    images gets a blank image (BLANK_IMAGE); a host with no collator to make one stops on every process, naming why.
    (The forward it drives: tests/test_deepspeed.py, ZeRO-3 with text-only records = DDP.)"""
    from types import SimpleNamespace

    from mmtune.data.collate import BLANK_IMAGE
    from mmtune.engine import Engine
    from mmtune.methods.base import TrainContext
    from mmtune.step import vision_tower_everywhere

    def micro():
        return [{"labels": torch.zeros(1, 3), "pixel_values": torch.zeros(1), "tasks": ["caption"]},
                {"labels": torch.zeros(1, 3), "tasks": ["text_qa"]}]

    blank = {"pixel_values": torch.ones(1, 3, 4, 4)}
    collator = SimpleNamespace(blank_image_inputs=lambda: blank)

    def ctx(others, collator=collator, engine=None):
        return TrainContext(model=None, unwrapped=None, trainable={}, generator=torch.Generator(),
                            accelerator=_Processes(others), engine=engine or Engine(kind, 2), collator=collator)

    batches = micro()
    vision_tower_everywhere(ctx([[1.0, 0.0]]), batches)  # the same kind of micro-batch on both: nothing to do
    assert not any(BLANK_IMAGE in b for b in batches)
    vision_tower_everywhere(ctx([[1.0, 1.0]]), batches)  # the other process has images in micro-batch 2
    assert BLANK_IMAGE not in batches[0] and torch.equal(batches[1][BLANK_IMAGE]["pixel_values"], blank["pixel_values"])
    with pytest.raises(ValueError, match=r"micro-batch 2: .* holds only text-only records \(tasks: text_qa\) while "
                                         r"1 of 2 have images"):
        vision_tower_everywhere(ctx([[1.0, 1.0]], collator=None), micro())
    with pytest.raises(ValueError, match=r"micro-batch 1: .* has images \(tasks: caption\)"):
        vision_tower_everywhere(ctx([[0.0, 0.0]], collator=None), micro())
    batches = micro()
    vision_tower_everywhere(ctx([[0.0, 1.0]], engine=Engine("zero2", 2)), batches)  # whole weights: the tie's job
    assert not any(BLANK_IMAGE in b for b in batches)
