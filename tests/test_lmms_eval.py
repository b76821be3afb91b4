"""final/ loads the way lmms-eval's Hugging Face model class (``llava_hf``) loads a checkpoint, with what tools on
transformers 4 read beside the weights (lmms-eval #661)."""

import json

import torch
from PIL import Image
from transformers import AutoProcessor, CLIPImageProcessor, LlavaForConditionalGeneration

from mmtune.models.tiny import save_tiny


def test_final_folder_loads_and_generates_like_lmms_evals_llava_hf(tmp_path):
    folder = save_tiny(tmp_path / "final", "llava", hidden_size=32, num_layers=2)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == (folder / "chat_template.jinja").read_text()
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    assert preprocessor["image_processor_type"] == "CLIPImageProcessor"
    assert CLIPImageProcessor.from_pretrained(folder).size == {"shortest_edge": 32}  # what transformers 4 reads

    # lmms_eval/models/llava_hf.py: the model class, AutoProcessor, its tokenizer's chat template, generate.
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder)
    assert processor.tokenizer.chat_template is not None
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.new("RGB", (32, 32), "red")], text=[text], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 3
