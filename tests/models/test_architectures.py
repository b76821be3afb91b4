"""Today's architectures end to end: tiny random Qwen3-VL, Gemma 3, InternVL and LLaVA-OneVision models train (NRCA's
noised open-response subset and SPIDER), evaluate by generation, and reload from final/ through mmtune's loader.

Each brings a layout the older three don't: Qwen3-VL's DeepStack mergers (connector parts beside its merger),
Gemma 3's token_type_ids and per-record image lists, InternVL's tiles (a varying number of pixel_values rows per
image), LLaVA-OneVision's anyres views and batch_num_images."""

import json

import pytest
import torch

from mmtune.models.load import load_model
from mmtune.models.scope import layout_of, part_of
from mmtune.train import load_base, train

NEW = ["qwen3_vl", "gemma3", "internvl", "llava_onevision"]
PROCESSORS = {"qwen3_vl": "Qwen3VLProcessor", "gemma3": "Gemma3Processor", "internvl": "InternVLProcessor",
              "llava_onevision": "LlavaOnevisionProcessor"}


@pytest.mark.parametrize("architecture", NEW)
def test_new_architecture_trains_evaluates_and_reloads(tiny_config, architecture):
    run = train(tiny_config(f"model.tiny={architecture}", "method.name=nrca+spider", "train.max_steps=2",
                            "eval.downstream=['synthetic:detailed_caption']", "eval.limit=4", "eval.max_new_tokens=4"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and any(r["nrca_gap"] > 0 for r in rows)  # NRCA's noised pass reached the images
    assert (run / "eval" / "final" / "scores.json").is_file()

    model, processor = load_model(run / "final")
    assert model.config.model_type == architecture
    assert json.loads((run / "final" / "processor_config.json").read_text())["processor_class"] == \
        PROCESSORS[architecture]  # what other tools load, not mmtune's image-only stand-in
    assert PROCESSORS[architecture] in type(processor).__name__
    # What trained is the connector and the last 2 blocks; the vision tower stayed at its initial weights.
    base, final = load_base(tiny_config(f"model.tiny={architecture}"))[0].state_dict(), model.state_dict()
    layout = layout_of(model)
    moved = {part_of(name, layout) for name in final if not torch.equal(final[name], base[name])}
    assert moved == {"projector", "llm_blocks"}, moved
