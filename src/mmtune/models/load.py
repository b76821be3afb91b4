"""Load a local Hugging Face VLM checkpoint (model + processor) through the Auto classes.

mmtune never downloads: ``path`` must be a local folder, the way a user with a GPU keeps
LLaVA-1.5, Qwen2-VL or SmolVLM checkpoints. Tiny test models take exactly the same path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2VLProcessor,
)

from mmtune.config import DTYPES as DTYPE_NAMES

# model.dtype's names (mmtune.config.DTYPES, the one list) → torch dtypes
DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16), strict=True))


def image_only(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """``processor_class`` without its video processor.

    Qwen2-VL, Qwen3-VL, InternVL and LLaVA-OneVision processors insist on a video processor, which needs
    torchvision; mmtune tunes on images, so where torchvision is missing it builds them from their image processor and
    tokenizer alone (``from_pretrained`` included). They save themselves as the upstream class, so other tools load
    the folder normally.
    """

    class ImageOnly(processor_class):
        upstream_class = processor_class.__name__
        video_processor = None

        @classmethod
        def get_attributes(cls) -> list[str]:  # what ProcessorMixin builds, checks, saves and loads
            return [name for name in super().get_attributes() if name != "video_processor"]

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"ImageOnly{processor_class.__name__}"
    return ImageOnly


# Deprecated name (mmtune ≤ 0.8): the Qwen2-VL stand-in, now one of image_only's.
ImageOnlyQwen2VLProcessor = image_only(Qwen2VLProcessor)


def save_processor(processor: ProcessorMixin, out_dir: str | Path) -> None:
    """``save_pretrained`` that records the upstream class name for mmtune's stand-in processors, and also writes what
    tools on transformers 4 read (lmms-eval, VLMEvalKit, vLLM): the image processor's ``preprocessor_config.json`` and
    the chat template inside ``tokenizer_config.json`` (transformers 5 keeps both in other files)."""
    out_dir = Path(out_dir)
    processor.save_pretrained(out_dir)
    upstream = getattr(processor, "upstream_class", None)
    config_file = out_dir / "processor_config.json"
    if upstream and config_file.exists():
        config = json.loads(config_file.read_text())
        config["processor_class"] = upstream
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None and not (out_dir / "preprocessor_config.json").exists():
        image_processor.save_pretrained(out_dir)
    template = getattr(processor, "chat_template", None)
    tokenizer_config = out_dir / "tokenizer_config.json"
    if isinstance(template, str) and tokenizer_config.exists():
        config = json.loads(tokenizer_config.read_text())
        if not config.get("chat_template"):
            config["chat_template"] = template
            tokenizer_config.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def load_processor(path: str | Path) -> ProcessorMixin:
    """AutoProcessor, or the image-only stand-in (``image_only``) when its video processor cannot be built."""
    path = Path(path)
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        error = None
    except (ImportError, AttributeError, ValueError, OSError, TypeError) as raised:
        processor, error = None, raised  # e.g. torchvision missing: the video processor cannot be built
    if getattr(processor, "image_processor", None) is None:
        processor_class = _processor_class(path)
        if processor_class is not None and "video_processor" in processor_class.get_attributes():
            processor = image_only(processor_class).from_pretrained(path, local_files_only=True)
        elif error is not None:
            raise error
    if not isinstance(processor, ProcessorMixin) or getattr(processor, "image_processor", None) is None:
        raise ValueError(f"{path}: no image-text processor could be loaded (got {type(processor).__name__})")
    return processor


def _processor_class(path: Path) -> type[ProcessorMixin] | None:
    """The processor class a model folder names (``processor_config.json``), else its model type's."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = None
    config_file = path / "processor_config.json"
    if config_file.is_file():
        name = json.loads(config_file.read_text()).get("processor_class")
    if name is None:
        name = PROCESSOR_MAPPING_NAMES.get(json.loads((path / "config.json").read_text()).get("model_type"))
    found = getattr(transformers, name, None) if isinstance(name, str) else None
    return found if isinstance(found, type) and issubclass(found, ProcessorMixin) else None


def set_pixel_budget(processor: ProcessorMixin, min_pixels: int | None, max_pixels: int | None) -> None:
    """``model.min_pixels`` / ``model.max_pixels`` into a variable-resolution image processor (Qwen2-VL's: its
    ``size`` holds the bounds as ``shortest_edge`` / ``longest_edge``, in pixels); a fixed-resolution processor has no
    such budget, and says so."""
    if min_pixels is None and max_pixels is None:
        return
    image_processor = processor.image_processor
    size = getattr(image_processor, "size", None)
    if size is None or getattr(size, "longest_edge", None) is None or not hasattr(image_processor, "merge_size"):
        raise ValueError(f"model.min_pixels / model.max_pixels: {type(image_processor).__name__} resizes every image to "
                         "a fixed size, so there is no pixel budget to set; they apply to variable-resolution "
                         "processors (Qwen2-VL, Qwen2.5-VL)")
    if max_pixels is not None:
        size.longest_edge = max_pixels
        size.shortest_edge = min(size.shortest_edge or max_pixels, max_pixels)
    if min_pixels is not None:
        size.shortest_edge = min_pixels


def check_model_folder(path: str | Path) -> Path:
    """Fail fast, with what to do, when ``path`` is not a local Hugging Face model folder."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: not a Hugging Face model folder (no config.json). mmtune loads local checkpoints only; "
            "download the model once (e.g. `huggingface-cli download llava-hf/llava-1.5-7b-hf --local-dir DIR`) "
            "and point model.path at DIR."
        )
    return path


def quantization_config(path: Path, quantization: str, dtype: str):
    """QLoRA's storage (bitsandbytes): the language model's frozen weights in NF4 4-bit or 8-bit; the vision tower,
    the projector (trained fully) and the output layer stay in ``dtype``."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"model.quantization={quantization} needs bitsandbytes: pip install bitsandbytes "
                         "(or model.quantization=null)")
    from transformers import AutoConfig, BitsAndBytesConfig

    from mmtune.models.scope import LAYOUTS

    model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    # As LLaVA's own QLoRA: only the language model is quantized; vision tower and projector stay in ``dtype``.
    layout = LAYOUTS.get(model_type)
    keep = [layout.vision, *layout.projectors, "lm_head"] if layout else ["lm_head"]
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=DTYPES[dtype], llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)


def load_model(
    path: str | Path,
    dtype: str = "fp32",
    attn_implementation: str | None = None,
    quantization: str | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Return ``(model, processor)`` from a local checkpoint folder (``quantization``: 4bit | 8bit, for QLoRA)."""
    path = check_model_folder(path)
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r}; choose one of {sorted(DTYPES)}")
    kwargs = {"dtype": DTYPES[dtype], "local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization:
        kwargs["quantization_config"] = quantization_config(path, quantization, dtype)
        kwargs["device_map"] = {"": "cuda" if torch.cuda.is_available() else "cpu"}
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    return model, load_processor(path)
