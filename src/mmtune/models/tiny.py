"""Tiny random vision-language models built from config, with an offline tokenizer and processor.

Tests and the demo cannot download weights, so they build small models of the real architectures
(LLaVA, Qwen2-VL, Idefics3 = SmolVLM; Qwen3-VL, Gemma 3, InternVL, LLaVA-OneVision) here, save them with ``save_pretrained`` and load them back through
:func:`mmtune.models.load.load_model` — the same public path a real checkpoint takes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    GotOcr2ImageProcessorPil,
    Idefics3Config,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    InternVLConfig,
    InternVLProcessor,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    SiglipVisionConfig,
)

from mmtune.config import TINY_ARCHITECTURES
from mmtune.models.load import image_only, save_processor

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
GEMMA3_CHAT_TEMPLATE = (  # Gemma 3's turns; the processor expands <start_of_image> into the image's soft tokens
    "{% for message in messages %}<start_of_turn>{{ 'user' if message['role'] == 'user' else 'model' }}\n"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
INTERNVL_CHAT_TEMPLATE = (  # InternVL 3's: ChatML with <IMG_CONTEXT> per image (expanded to <img>…</img> per tile)
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<IMG_CONTEXT>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ONEVISION_CHAT_TEMPLATE = (  # LLaVA-OneVision's (Qwen2 ChatML, <image> before the text)
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML = ["<pad>", "<unk>", "<s>", "<|im_end|>", "<|im_start|>"]
QWEN_VISION = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
SPECIAL_TOKENS = {
    "llava": ["<pad>", "<unk>", "<s>", "</s>", "<image>"],
    "idefics3": ["<pad>", "<unk>", "<s>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                 "<global-img>"],
    "qwen2_vl": [*CHATML, *QWEN_VISION],
    "qwen3_vl": [*CHATML, *QWEN_VISION],
    "gemma3": ["<pad>", "<unk>", "<s>", "<end_of_turn>", "<start_of_turn>", "<start_of_image>", "<end_of_image>",
               "<image_soft_token>"],
    "internvl": [*CHATML, "<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
    "llava_onevision": [*CHATML, "<image>", "<video>"],
}
EOS = {"llava": "</s>", "idefics3": "<end_of_utterance>", "gemma3": "<end_of_turn>"}  # the others: <|im_end|>
# Tokens processors read as tokenizer attributes (transformers' extra_special_tokens)
NAMED_TOKENS = {
    "gemma3": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    "internvl": {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"},
    "llava_onevision": {"image_token": "<image>", "video_token": "<video>"},
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
    eos = EOS.get(architecture, "<|im_end|>")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token=eos,
        extra_special_tokens=NAMED_TOKENS.get(architecture, {}),
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in
                                                                ("<pad>", "<unk>", "<s>", eos)]})
    return tokenizer


@dataclass
class _Shape:
    """What every tiny architecture is built from: the tokenizer and the sizes (``build_tiny``'s arguments)."""

    tokenizer: object
    image_size: int
    patch_size: int
    hidden_size: int
    heads: int
    vision_hidden_size: int
    vision_layers: int
    text_sizes: dict
    vision_sizes: dict

    def token_id(self, token: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(token)

    @property
    def text(self) -> LlamaConfig:
        return LlamaConfig(**self.text_sizes)  # the language model of LLaVA and Idefics3


def _llava(shape: _Shape) -> tuple:
    """LLaVA-1.5's shape: CLIP, a projector, Llama."""
    vision = CLIPVisionConfig(**shape.vision_sizes, projection_dim=shape.vision_hidden_size)
    config = LlavaConfig(
        vision_config=vision, text_config=shape.text, image_token_id=shape.tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": shape.image_size}, crop_size={"height": shape.image_size, "width": shape.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=shape.tokenizer, patch_size=shape.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return config, processor


def _idefics3(shape: _Shape) -> tuple:
    """SmolVLM's (Idefics3): a pixel-shuffle connector."""
    scale_factor = 2  # the connector's pixel shuffle: (image/patch)² patches → that / scale² image tokens
    vision = Idefics3VisionConfig(**shape.vision_sizes)
    config = Idefics3Config(
        vision_config=vision.to_dict(), text_config=shape.text.to_dict(), scale_factor=scale_factor,
        image_token_id=shape.tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=shape.tokenizer.pad_token_id,
    )
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": shape.image_size},
        max_image_size={"longest_edge": shape.image_size},
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=shape.tokenizer, chat_template=IDEFICS3_CHAT_TEMPLATE,
        image_seq_len=(shape.image_size // shape.patch_size) ** 2 // scale_factor**2,
    )
    return config, processor


def _qwen_vl(shape: _Shape, architecture: str) -> tuple:
    """Qwen2-VL / Qwen3-VL: M-RoPE, merged patches (Qwen3-VL: DeepStack mergers)."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(shape.hidden_size // shape.heads)}
    vision = {"depth": shape.vision_layers, "hidden_size": shape.hidden_size, "num_heads": max(1, shape.vision_hidden_size // 16),
              "patch_size": shape.patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2}
    qwen_ids = {"image_token_id": shape.token_id("<|image_pad|>"), "video_token_id": shape.token_id("<|video_pad|>"),
                "vision_start_token_id": shape.token_id("<|vision_start|>"),
                "vision_end_token_id": shape.token_id("<|vision_end|>")}
    if architecture == "qwen2_vl":
        config = Qwen2VLConfig(vision_config={**vision, "embed_dim": shape.vision_hidden_size},
                               text_config={**shape.text_sizes, "rope_parameters": rope}, **qwen_ids)
    else:  # Qwen3-VL: its vision tower's own width, learned position embeddings, DeepStack mergers
        vision = {**vision, "hidden_size": shape.vision_hidden_size, "intermediate_size": shape.vision_hidden_size * 2,
                  "out_hidden_size": shape.hidden_size, "num_position_embeddings": (shape.image_size // shape.patch_size) ** 2,
                  "deepstack_visual_indexes": [0]}
        config = Qwen3VLConfig(vision_config=vision, **qwen_ids, text_config={
            **shape.text_sizes, "head_dim": shape.hidden_size // shape.heads, "rope_parameters": {**rope, "mrope_interleaved": True}})
    pixels = shape.image_size * shape.image_size
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=shape.patch_size,
        merge_size=2, temporal_patch_size=2,
    )
    processor_class = Qwen2VLProcessor if architecture == "qwen2_vl" else Qwen3VLProcessor
    processor = image_only(processor_class)(image_processor=image_processor, tokenizer=shape.tokenizer,
                                            chat_template=QWEN2_VL_CHAT_TEMPLATE)
    return config, processor


def _gemma3(shape: _Shape) -> tuple:
    """Gemma 3: SigLIP, 2 × 2 pooled patches."""
    tokens_per_image = (shape.image_size // shape.patch_size // 2) ** 2  # Gemma 3 pools the patches 2 × 2
    config = Gemma3Config(
        text_config=Gemma3TextConfig(**shape.text_sizes, head_dim=shape.hidden_size // shape.heads, sliding_window=64),
        vision_config=SiglipVisionConfig(**shape.vision_sizes), mm_tokens_per_image=tokens_per_image,
        boi_token_index=shape.token_id("<start_of_image>"), eoi_token_index=shape.token_id("<end_of_image>"),
        image_token_index=shape.token_id("<image_soft_token>"),
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": shape.image_size, "width": shape.image_size},
                                              do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=shape.tokenizer,
                                chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=tokens_per_image)
    return config, processor


def _internvl(shape: _Shape) -> tuple:
    """InternVL: dynamic tiling, pixel shuffle."""
    tokens_per_tile = (shape.image_size // shape.patch_size // 2) ** 2  # pixel shuffle with downsample_ratio 0.5
    vision = InternVLVisionConfig(hidden_size=shape.vision_hidden_size, intermediate_size=shape.vision_hidden_size * 2,
                                  num_hidden_layers=shape.vision_layers,
                                  num_attention_heads=max(1, shape.vision_hidden_size // 16),
                                  image_size=[shape.image_size, shape.image_size], patch_size=[shape.patch_size, shape.patch_size])
    config = InternVLConfig(text_config=Qwen2Config(**shape.text_sizes), vision_config=vision,
                            image_token_id=shape.token_id("<IMG_CONTEXT>"), image_seq_length=tokens_per_tile,
                            downsample_ratio=0.5)
    # Dynamic tiling as InternVL's: a wide image becomes up to 4 tiles plus a thumbnail, a square one 1 tile.
    image_processor = GotOcr2ImageProcessorPil(size={"height": shape.image_size, "width": shape.image_size},
                                               crop_to_patches=True, max_patches=4)
    processor = image_only(InternVLProcessor)(image_processor=image_processor, tokenizer=shape.tokenizer,
                                              chat_template=INTERNVL_CHAT_TEMPLATE,
                                              image_seq_length=tokens_per_tile)
    return config, processor


def _llava_onevision(shape: _Shape) -> tuple:
    """LLaVA-OneVision: SigLIP, anyres tiles beside the base view."""
    pinpoints = [[shape.image_size, shape.image_size], [shape.image_size, 2 * shape.image_size], [2 * shape.image_size, shape.image_size]]
    config = LlavaOnevisionConfig(
        text_config=Qwen2Config(**shape.text_sizes), vision_config=SiglipVisionConfig(**shape.vision_sizes),
        image_token_index=shape.token_id("<image>"), video_token_index=shape.token_id("<video>"),
        image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full",
    )
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": shape.image_size, "width": shape.image_size},
                                                      image_grid_pinpoints=pinpoints)
    processor = image_only(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=shape.tokenizer, chat_template=ONEVISION_CHAT_TEMPLATE,
        num_image_tokens=(shape.image_size // shape.patch_size) ** 2, vision_feature_select_strategy="full")
    return config, processor


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
    text_sizes = {"vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": hidden_size * 2,
                  "num_hidden_layers": num_layers, "num_attention_heads": heads, "num_key_value_heads": heads,
                  "max_position_embeddings": 512, "pad_token_id": tokenizer.pad_token_id,
                  "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    shape = _Shape(tokenizer, image_size, patch_size, hidden_size, heads, vision_hidden_size, vision_layers,
                   text_sizes, vision_sizes)
    builders = {"llava": _llava, "idefics3": _idefics3, "gemma3": _gemma3, "internvl": _internvl,
                "llava_onevision": _llava_onevision,
                "qwen2_vl": lambda s: _qwen_vl(s, "qwen2_vl"), "qwen3_vl": lambda s: _qwen_vl(s, "qwen3_vl")}
    config, processor = builders[architecture](shape)
    model = AutoModelForImageTextToText.from_config(config)
    if architecture == "gemma3":  # transformers starts Gemma 3's projection at zero: a model blind to its images
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.02)
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
