import pytest
import torch

from mmtune.data.collate import GenerationCollator, RecordDataset, TrainCollator, model_inputs
from mmtune.data.records import read_records
from mmtune.data.synthetic import vocabulary
from mmtune.models.load import load_model, save_processor
from mmtune.models.scope import apply_scope, parameter_groups, part_of, scope_summary
from mmtune.models.tiny import save_tiny


@pytest.mark.parametrize("architecture", ["llava", "qwen2_vl"])
def test_forward_backward_generate_and_round_trip(tmp_path, world, architecture):
    folder = save_tiny(tmp_path / architecture, architecture, words=vocabulary())
    model, processor = load_model(folder)
    records = read_records(world / "count_mc_test.jsonl")[:3]
    samples = [RecordDataset(records)[i] for i in range(3)]

    batch = TrainCollator(processor)(samples)
    out = model(**model_inputs(batch), labels=batch["labels"])
    out.loss.backward()
    assert any(p.grad is not None for p in model.parameters())

    generation = GenerationCollator(processor)(samples)
    generation.pop("records")
    tokens = model.generate(**generation, max_new_tokens=3, do_sample=False)
    assert tokens.shape[1] <= generation["input_ids"].shape[1] + 3

    model.save_pretrained(tmp_path / "again")
    save_processor(processor, tmp_path / "again")
    again, _ = load_model(tmp_path / "again")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("architecture", ["llava", "qwen2_vl"])
def test_scope_freezes_vision_and_trains_projector_and_last_blocks(tmp_path, architecture):
    model, _ = load_model(save_tiny(tmp_path / architecture, architecture))
    layout = apply_scope(model, train_projector=True, last_n_blocks=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    parts = {part_of(n, layout) for n in trainable}
    assert parts == {"projector", "llm_blocks"}
    assert all(".layers.2." in n or ".layers.3." in n for n in trainable if part_of(n, layout) == "llm_blocks")
    groups = {g["name"]: g for g in parameter_groups(model, layout, 2e-4, 2e-5)}
    assert groups["projector"]["lr"] == 2e-5 and groups["llm_blocks"]["lr"] == 2e-4
    assert "trainable" in scope_summary(model, layout)


def test_not_a_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def _image_tokens(processor, image) -> int:
    batch = processor(text=["<|vision_start|><|image_pad|><|vision_end|>how many?"], images=[image], return_tensors="pt")
    return int(batch["image_grid_thw"].prod()) // processor.image_processor.merge_size ** 2


def test_a_pixel_budget_caps_image_tokens_and_is_saved_with_the_model(tiny_config):
    """model.max_pixels reaches Qwen2-VL's processor: fewer image tokens per image, in training and in final/."""
    from PIL import Image

    from mmtune.train import load_base, train

    image = Image.new("RGB", (64, 64), "red")  # 4,096 pixels: above both budgets
    _, default = load_base(tiny_config("model.tiny=qwen2_vl"))
    _, capped = load_base(tiny_config("model.tiny=qwen2_vl", "model.max_pixels=256"))
    assert _image_tokens(default, image) == 4 and _image_tokens(capped, image) == 1
    run = train(tiny_config("model.tiny=qwen2_vl", "model.max_pixels=256", "train.max_steps=1"))
    _, reloaded = load_model(run / "final")
    assert _image_tokens(reloaded, image) == 1


@pytest.mark.parametrize("overrides, message", [
    (["model.tiny=llava", "model.max_pixels=256"], "resizes every image to a fixed size"),
    (["model.tiny=qwen2_vl", "model.min_pixels=512", "model.max_pixels=256"], "is above model.max_pixels"),
])
def test_a_pixel_budget_where_it_cannot_apply_is_refused(tiny_config, overrides, message):
    from mmtune.train import load_base

    with pytest.raises(ValueError, match=message):
        load_base(tiny_config(*overrides))


def test_a_tiny_model_takes_the_attention_implementation_asked_for(tiny_config):
    """model.attn_implementation reaches a tiny model as it reaches a checkpoint (it was silently not read)."""
    import importlib.util

    from mmtune.models.base_model import load_base

    assert load_base(tiny_config("model.attn_implementation=eager"))[0].config._attn_implementation == "eager"
    if importlib.util.find_spec("flash_attn") is not None:
        return
    with pytest.raises(ImportError, match="FlashAttention2"):  # no flash-attn here: transformers says so
        load_base(tiny_config("model.attn_implementation=flash_attention_2"))
