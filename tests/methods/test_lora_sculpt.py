"""LoRASculpt: CMR's weights and penalty by hand; after sculpting, the adapters keep their top entries to the end."""

import math

import pytest
import torch
from safetensors.torch import load_file

from mmtune.methods.lora_sculpt import LoraSculpt, conflict_penalty, conflict_weights
from mmtune.train import train


def test_conflict_weights_by_hand():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # ‖W‖_F = 5
    m = conflict_weights(w, omega=2.0)
    expected = [math.tanh(2.0 * abs(1 / math.log(0.6))), math.tanh(2.0 * abs(1 / math.log(0.8)))]
    torch.testing.assert_close(m[0], torch.tensor(expected))
    assert m[1].abs().max() < 0.1  # a zero weight: log(ε) is huge, M ≈ 0 — free to change
    assert m[0, 1] > m[0, 0]  # the larger weight is held harder


def test_conflict_penalty_by_hand_and_gradient():
    a = torch.tensor([[1.0, 0.0]], requires_grad=True)  # r=1, in=2
    b = torch.tensor([[2.0], [0.0]], requires_grad=True)  # out=2
    m = torch.tensor([[0.5, 1.0], [1.0, 1.0]])
    # B·A = [[2, 0], [0, 0]]; M ⊙ B·A = [[1, 0], [0, 0]]; ‖·‖_F = 1 (one module)
    penalty = conflict_penalty([(a, b, m)])
    assert penalty.item() == pytest.approx(1.0)
    penalty.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_sculpted_adapters_keep_their_top_entries_to_the_end(tiny_config):
    run = train(tiny_config("method.name=lora_sculpt", "method.lora_sculpt.sculpt_step=2",
                            "method.lora_sculpt.keep_ratio=0.25", "method.lora_sculpt.r=4",
                            "method.lora_sculpt.merge=false", "method.lora_sculpt.cmr_lam=1.0"))
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    matrices = {k: v for k, v in adapter.items() if "lora_A" in k or "lora_B" in k}
    assert matrices
    for name, value in matrices.items():  # two more optimizer steps after sculpting: still exactly the kept quarter
        assert (value != 0).sum().item() == round(0.25 * value.numel()), name
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert '"cmr"' in rows[-1]


def test_sculpting_waits_for_its_step():
    method = LoraSculpt()
    assert method.config.sculpt_step == 100 and method.config.keep_ratio == 0.1 and method.config.r == 32
    with pytest.raises(ValueError, match="keep_ratio"):
        type(method.config)(keep_ratio=0)
