"""fp32 master weights under a low-precision ``model.dtype``: what trains is held and updated in fp32, the rest stays
bf16, compute runs under autocast — so a bf16 run's update agrees with the fp32 run's (without masters, AdamW's
small updates vanish in bf16 rounding: the projector barely moves)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from helpers import final_weights
from mmtune.precision import keep_fp32_masters, low_precision_dtype, to_saved_dtype
from mmtune.train import train

PAPERS_LR = ["scope.lr_blocks=2e-4", "scope.lr_projector=2e-5"]


@pytest.fixture(scope="module")
def bf16_grid_base(tmp_path_factory):
    """A tiny LLaVA whose weights lie on the bf16 grid, saved in fp32: loaded as fp32 or bf16 it is the same model."""
    from mmtune.data.synthetic import vocabulary
    from mmtune.models.load import save_processor
    from mmtune.models.tiny import build_tiny

    model, processor = build_tiny("llava", words=vocabulary(), hidden_size=64, num_layers=4, seed=0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    out = tmp_path_factory.mktemp("bf16_grid_base")
    model.save_pretrained(out)
    save_processor(processor, out)
    return out


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _update_cosines(tiny_config, base, *overrides: str) -> dict[str, float]:
    common = ["model.tiny=null", f"model.path={base}", "train.max_steps=20", *PAPERS_LR]
    fp32 = train(tiny_config(*common, out="fp32"))
    bf16 = train(tiny_config(*common, "model.dtype=bf16", "train.mixed_precision=bf16", *overrides, out="bf16"))
    start, reference, low = _weights(base), _weights(fp32 / "final"), _weights(bf16 / "final")
    trained = [n for n in low if n in start and reference[n].ndim == 2 and not torch.equal(reference[n], start[n])]
    assert any("multi_modal_projector" in n for n in trained) and len(trained) >= 8
    # compared on the grid final/ is saved in: the fp32 run's result rounded to bf16
    return {n: _cosine(reference[n].to(low[n].dtype).float() - start[n], low[n].float() - start[n]) for n in trained}


def test_bf16_run_with_fp32_masters_moves_like_the_fp32_run(tiny_config, bf16_grid_base):
    cosines = _update_cosines(tiny_config, bf16_grid_base)
    worst = min(cosines, key=cosines.get)
    assert cosines[worst] >= 0.9, f"{worst}: cosine {cosines[worst]:.3f} with the fp32 run's update"


def test_without_masters_the_bf16_update_is_lost(tiny_config, bf16_grid_base):
    """The opt-out (train.fp32_masters=false) is the old behaviour: what the test above guards against."""
    cosines = _update_cosines(tiny_config, bf16_grid_base, "train.fp32_masters=false")
    projector = [c for n, c in cosines.items() if "multi_modal_projector" in n]
    assert max(projector) < 0.9


def test_masters_are_fp32_and_frozen_weights_stay_bf16(tiny_config):
    from mmtune.models.scope import apply_scope
    from mmtune.models.tiny import build_tiny

    model, _ = build_tiny("llava", hidden_size=64, num_layers=4)
    model.to(torch.bfloat16)
    apply_scope(model, last_n_blocks=1)
    added = keep_fp32_masters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable) and all(p.dtype == torch.bfloat16 for p in frozen)
    assert added == 2 * sum(p.numel() for p in trainable)  # bytes: 4 instead of 2 per trainable element
    assert keep_fp32_masters(model) == 0  # already fp32: nothing more


def test_run_state_follows_the_masters_and_final_is_saved_in_model_dtype(tiny_config, bf16_grid_base):
    run = train(tiny_config("model.tiny=null", f"model.path={bf16_grid_base}", "model.dtype=bf16",
                            "train.mixed_precision=bf16", "method.name=spider+l2_reg", "train.max_steps=2",
                            "train.save_every=1"))
    state = torch.load(run / "checkpoints" / "step-000001" / "mmtune_methods.pt", weights_only=True)
    assert all(w0.dtype == torch.float32 for w0 in state["spider"]["pretrained"].values())
    base = AutoModelForImageTextToText.from_pretrained(bf16_grid_base).state_dict()
    assert all(torch.equal(w0, base[n]) for n, w0 in state["spider"]["pretrained"].items())  # the loaded weights
    checkpoint = _weights(run / "checkpoints" / "step-000001")
    dtypes = {n: t.dtype for n, t in checkpoint.items()}
    assert {d for n, d in dtypes.items() if "multi_modal_projector" in n} == {torch.float32}  # masters: exact resume
    assert {d for n, d in dtypes.items() if "vision_tower" in n} == {torch.bfloat16}
    final = _weights(run / "final")
    assert all(t.dtype == torch.bfloat16 for t in final.values() if t.is_floating_point())
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["precision"]["masters"] == "fp32" and summary["precision"]["saved"] == "bf16"


def test_resume_with_masters_equals_the_uninterrupted_run(tiny_config, bf16_grid_base):
    common = ["model.tiny=null", f"model.path={bf16_grid_base}", "model.dtype=bf16", "train.mixed_precision=bf16",
              "train.max_steps=4", "train.save_every=2"]
    whole = train(tiny_config(*common, out="whole"))
    checkpoint = whole / "checkpoints" / "step-000002"
    resumed = train(tiny_config(*common, f"train.resume_from={checkpoint}", out="resumed"))
    a, b = _weights(whole / "final"), _weights(resumed / "final")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_helpers():
    assert low_precision_dtype("bf16") == torch.bfloat16 and low_precision_dtype("fp32") is None
    state = {"w": torch.ones(2), "i": torch.ones(2, dtype=torch.long)}
    saved = to_saved_dtype(state, torch.bfloat16)
    assert saved["w"].dtype == torch.bfloat16 and saved["i"].dtype == torch.long


def test_tiny_model_honours_model_dtype(tiny_config):
    run = train(tiny_config("model.dtype=bf16"))
    assert all(t.dtype == torch.bfloat16 for t in final_weights(run).values() if t.is_floating_point())
