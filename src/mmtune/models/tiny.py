"""Tiny random vision-language models built from config, with an offline tokenizer and processor.

Tests and the demo cannot download weights, so they build small models of the real architectures
(LLaVA, Qwen2-VL, Idefics3 = SmolVLM; Qwen3-VL, Gemma 3, InternVL, LLaVA-OneVision) here, save them with ``save_pretrained`` and load them back through
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
    text = LlamaConfig(**text_sizes)  # the language model of LLaVA and Idefics3
    token_id = tokenizer.convert_tokens_to_ids
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
    elif architecture in ("qwen2_vl", "qwen3_vl"):
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(hidden_size // heads)}
        vision = {"depth": vision_layers, "hidden_size": hidden_size, "num_heads": max(1, vision_hidden_size // 16),
                  "patch_size": patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2}
        qwen_ids = {"image_token_id": token_id("<|image_pad|>"), "video_token_id": token_id("<|video_pad|>"),
                    "vision_start_token_id": token_id("<|vision_start|>"),
                    "vision_end_token_id": token_id("<|vision_end|>")}
        if architecture == "qwen2_vl":
            config = Qwen2VLConfig(vision_config={**vision, "embed_dim": vision_hidden_size},
                                   text_config={**text_sizes, "rope_parameters": rope}, **qwen_ids)
        else:  # Qwen3-VL: its vision tower's own width, learned position embeddings, DeepStack mergers
            vision = {**vision, "hidden_size": vision_hidden_size, "intermediate_size": vision_hidden_size * 2,
                      "out_hidden_size": hidden_size, "num_position_embeddings": (image_size // patch_size) ** 2,
                      "deepstack_visual_indexes": [0]}
            config = Qwen3VLConfig(vision_config=vision, **qwen_ids, text_config={
                **text_sizes, "head_dim": hidden_size // heads, "rope_parameters": {**rope, "mrope_interleaved": True}})
        pixels = image_size * image_size
        image_processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=patch_size,
            merge_size=2, temporal_patch_size=2,
        )
        processor_class = Qwen2VLProcessor if architecture == "qwen2_vl" else Qwen3VLProcessor
        processor = image_only(processor_class)(image_processor=image_processor, tokenizer=tokenizer,
                                                chat_template=QWEN2_VL_CHAT_TEMPLATE)
    elif architecture == "gemma3":
        tokens_per_image = (image_size // patch_size // 2) ** 2  # Gemma 3 pools the patches 2 × 2
        config = Gemma3Config(
            text_config=Gemma3TextConfig(**text_sizes, head_dim=hidden_size // heads, sliding_window=64),
            vision_config=SiglipVisionConfig(**vision_sizes), mm_tokens_per_image=tokens_per_image,
            boi_token_index=token_id("<start_of_image>"), eoi_token_index=token_id("<end_of_image>"),
            image_token_index=token_id("<image_soft_token>"),
        )
        image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size},
                                                  do_pan_and_scan=False)
        processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=tokens_per_image)
    elif architecture == "internvl":
        tokens_per_tile = (image_size // patch_size // 2) ** 2  # pixel shuffle with downsample_ratio 0.5
        vision = InternVLVisionConfig(hidden_size=vision_hidden_size, intermediate_size=vision_hidden_size * 2,
                                      num_hidden_layers=vision_layers,
                                      num_attention_heads=max(1, vision_hidden_size // 16),
                                      image_size=[image_size, image_size], patch_size=[patch_size, patch_size])
        config = InternVLConfig(text_config=Qwen2Config(**text_sizes), vision_config=vision,
                                image_token_id=token_id("<IMG_CONTEXT>"), image_seq_length=tokens_per_tile,
                                downsample_ratio=0.5)
        # Dynamic tiling as InternVL's: a wide image becomes up to 4 tiles plus a thumbnail, a square one 1 tile.
        image_processor = GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size},
                                                   crop_to_patches=True, max_patches=4)
        processor = image_only(InternVLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                                  chat_template=INTERNVL_CHAT_TEMPLATE,
                                                  image_seq_length=tokens_per_tile)
    else:  # llava_onevision: SigLIP, anyres tiles of the image beside its base view
        pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
        config = LlavaOnevisionConfig(
            text_config=Qwen2Config(**text_sizes), vision_config=SiglipVisionConfig(**vision_sizes),
            image_token_index=token_id("<image>"), video_token_index=token_id("<video>"),
            image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full",
        )
        image_processor = LlavaOnevisionImageProcessorPil(size={"height": image_size, "width": image_size},
                                                          image_grid_pinpoints=pinpoints)
        processor = image_only(LlavaOnevisionProcessor)(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=ONEVISION_CHAT_TEMPLATE,
            num_image_tokens=(image_size // patch_size) ** 2, vision_feature_select_strategy="full")
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
