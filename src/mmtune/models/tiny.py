"""Tiny random vision-language models built from config, with an offline tokenizer and processor.

Tests and the demo cannot download weights, so they build small models of the real architectures
(LLaVA, Qwen2-VL, Idefics3 = SmolVLM) here, save them with ``save_pretrained`` and load them back through
:func:`mmtune.models.load.load_model` — the same public path a real checkpoint takes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
)

from mmtune.config import TINY_ARCHITECTURES
from mmtune.models.load import ImageOnlyQwen2VLProcessor, save_processor

# Words every tiny tokenizer knows, so prompts of the converters and metrics tests tokenize too.
BASE_WORDS = (
    "a an the is are of in on at to and or with what which where how many color shape size "
    "provide one sentence caption for provided image answer question using single word phrase "
    "option's letter from given choices directly context hint yes no there this that it image "
    "left right top bottom center middle small large big object objects character written "
    "user assistant"
).split()
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
DIGITS = [str(d) for d in range(10)]
PUNCTUATION = list(".,:;?!'\"()-/")

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDEFICS3_CHAT_TEMPLATE = (  # SmolVLM's layout: "User:<image>question<end_of_utterance>\nAssistant: answer..."
    "{% for message in messages %}{{ 'User:' if message['role'] == 'user' else 'Assistant:' }}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %} {{ item['text'] }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
SPECIAL_TOKENS = {
    "llava": ["<pad>", "<unk>", "<s>", "</s>", "<image>"],
    "idefics3": ["<pad>", "<unk>", "<s>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                 "<global-img>"],
    "qwen2_vl": [
        "<pad>", "<unk>", "<s>", "<|im_end|>", "<|im_start|>", "<|image_pad|>", "<|video_pad|>",
        "<|vision_start|>", "<|vision_end|>",
    ],
}
WORD_PATTERN = re.compile(r"\w+|[^\w\s]")


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL splits half the head dim into (temporal, height, width) rotary sections in ratio 2:3:3."""
    half = head_dim // 2
    return [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]


def build_tokenizer(architecture: str, words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer over ``words`` plus a base vocabulary, built offline."""
    specials = SPECIAL_TOKENS[architecture]
    vocab: dict[str, int] = {}
    for token in [*specials, *BASE_WORDS, *LETTERS, *DIGITS, *PUNCTUATION]:
        vocab.setdefault(token, len(vocab))
    for text in words:
        for token in WORD_PATTERN.findall(text.lower()):
            vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    eos = {"llava": "</s>", "qwen2_vl": "<|im_end|>", "idefics3": "<end_of_utterance>"}[architecture]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token=eos,
        extra_special_tokens={},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in
                                                                ("<pad>", "<unk>", "<s>", eos)]})
    return tokenizer


def build_tiny(
    architecture: str = "llava",
    words: Iterable[str] = (),
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 4,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    seed: int = 0,
):
    """Return ``(model, processor)``: a random-init tiny VLM of ``architecture`` and its processor."""
    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {architecture!r}; choose one of {TINY_ARCHITECTURES}")
    tokenizer = build_tokenizer(architecture, words)
    vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    heads = max(1, hidden_size // 32)
    vision_sizes = {"hidden_size": vision_hidden_size, "intermediate_size": vision_hidden_size * 2,
                    "num_hidden_layers": vision_layers, "num_attention_heads": max(1, vision_hidden_size // 16),
                    "image_size": image_size, "patch_size": patch_size}
    text = LlamaConfig(  # the language model of LLaVA and Idefics3 (Qwen2-VL brings its own)
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    if architecture == "llava":
        vision = CLIPVisionConfig(**vision_sizes, projection_dim=vision_hidden_size)
        config = LlavaConfig(
            vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_select_strategy="default", vision_feature_layer=-1,
        )
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        )
        processor = LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=LLAVA_CHAT_TEMPLATE,
        )
    elif architecture == "idefics3":
        scale_factor = 2  # the connector's pixel shuffle: (image/patch)² patches → that / scale² image tokens
        vision = Idefics3VisionConfig(**vision_sizes)
        config = Idefics3Config(
            vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=scale_factor,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
        )
        image_processor = Idefics3ImageProcessorPil(
            do_image_splitting=False, size={"longest_edge": image_size},
            max_image_size={"longest_edge": image_size},
        )
        processor = Idefics3Processor(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=IDEFICS3_CHAT_TEMPLATE,
            image_seq_len=(image_size // patch_size) ** 2 // scale_factor**2,
        )
    else:
        token_id = tokenizer.convert_tokens_to_ids
        config = Qwen2VLConfig(
            vision_config={
                "depth": vision_layers, "embed_dim": vision_hidden_size, "hidden_size": hidden_size,
                "num_heads": max(1, vision_hidden_size // 16), "patch_size": patch_size,
                "spatial_merge_size": 2, "temporal_patch_size": 2,
            },
            text_config={
                "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": hidden_size * 2,
                "num_hidden_layers": num_layers, "num_attention_heads": heads, "num_key_value_heads": heads,
                "max_position_embeddings": 512, "rope_parameters": {
                    "rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(hidden_size // heads)},
                "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                "bos_token_id": tokenizer.bos_token_id,
            },
            image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
            vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"),
        )
        pixels = image_size * image_size
        image_processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=patch_size,
            merge_size=2, temporal_patch_size=2,
        )
        processor = ImageOnlyQwen2VLProcessor(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE,
        )
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


def save_tiny(out_dir: str | Path, architecture: str = "llava", **kwargs) -> Path:
    """Build a tiny model and save model + processor to ``out_dir`` as a Hugging Face folder."""
    out = Path(out_dir)
    model, processor = build_tiny(architecture, **kwargs)
    model.save_pretrained(out)
    save_processor(processor, out)
    return out
