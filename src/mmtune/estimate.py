"""Fit before you rent: the memory one device needs for a run, from its config, without a GPU and without weights.

The model is built from its real config on the meta device (shapes and dtypes only, no memory), the run's scope and
methods' model changes are applied (so LoRA adapters are counted), and then, per device:

* **weights**: frozen ones in ``model.dtype``; trainable ones as fp32 masters where the run keeps them;
* **gradients** of what trains (their parameters' dtype), and DDP's bucket copy of them;
* **optimizer state**: AdamW's two moments in fp32 (8 B per trainable parameter; SGD's momentum 4 B);
* **method state**: measured by running each method's ``setup`` on a small tensor (SPIDER keeps W0 and G: 8 B per
  trainable parameter; L2 / DARE / WiSE-FT keep W0; masks keep a bool);
* **logits**: the head's output (``model.dtype``) and the fp32 log-softmax the loss keeps, at the target positions
  (``train.target_logits``; ``--target-tokens`` per record, default 64) or at every position — the largest part with
  a 150k vocabulary and long sequences;
* **activations**: what autograd saves in one forward of the language model over a ``batch × sequence`` of
  embeddings that need a gradient (as the trainable projector's output does), counted exactly by a saved-tensor hook
  on the meta device — with activation checkpointing, what is kept outside the checkpointed blocks plus one block
  recomputed. The frozen vision tower saves nothing. Attention on the meta device takes PyTorch's math path, which
  keeps the ``s × s`` attention weights a flash kernel would not: the activations are an upper bound on a GPU.

Engines split these differently (``ENGINES``): DDP keeps everything on every device; DeepSpeed ZeRO-2 partitions the
fp32 masters, gradients and optimizer state over the devices; ZeRO-3 and FSDP2 also the weights. Not counted: the
CUDA context and allocator fragmentation (``HEADROOM`` is kept free for them), DeepSpeed's communication buckets,
evaluation's generation cache.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ENGINES = ("ddp", "fsdp2", "zero2", "zero3")
HEADROOM = 0.10  # of the device memory, kept free for the CUDA context, fragmentation, buffers
GB = 1e9
# Reference shapes for an architecture without a local folder: transformers' default config of each model type is
# the model it was written for (LlavaConfig() is LLaVA-1.5-7B: CLIP-L/336 + Llama-2-7B shape).
REFERENCE = {"llava": "LlavaConfig (LLaVA-1.5-7B)", "qwen2_vl": "Qwen2VLConfig (a 73B shape)",
             "qwen2_vl-2b": "Qwen2-VL-2B-Instruct's shape", "qwen2_vl-7b": "Qwen2-VL-7B-Instruct's shape",
             "idefics3": "Idefics3Config (6.9B)"}
# The released sizes' shapes (their config.json: language model; the vision tower is the same 675M ViT in both)
SIZES = {
    "qwen2_vl-2b": ("qwen2_vl", {"text_config": {"hidden_size": 1536, "intermediate_size": 8960,
                                                 "num_hidden_layers": 28, "num_attention_heads": 12,
                                                 "num_key_value_heads": 2, "vocab_size": 151936,
                                                 "tie_word_embeddings": True},
                                 "vision_config": {"hidden_size": 1536}}),
    "qwen2_vl-7b": ("qwen2_vl", {"text_config": {"hidden_size": 3584, "intermediate_size": 18944,
                                                 "num_hidden_layers": 28, "num_attention_heads": 28,
                                                 "num_key_value_heads": 4, "vocab_size": 152064},
                                 "vision_config": {"hidden_size": 3584}}),
}


@dataclass
class Estimate:
    engine: str
    devices: int
    parameters: int
    trainable: int
    parts: dict[str, float] = field(default_factory=dict)  # bytes per device
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(v for k, v in self.parts.items() if k != "activations without checkpointing")


def model_config(config, architecture: str | None = None):
    """The transformers config of the run's model: ``model.path``'s ``config.json``, the tiny model's, or (with
    ``architecture``, when the folder is not here) the architecture's reference shape."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if config.model.tiny:
        from mmtune.models.base_model import load_base

        return load_base(config)[0].config
    folder = Path(config.model.path or "")
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    if architecture is None:
        raise FileNotFoundError(f"{folder / 'config.json'} is not here: estimate needs the model's config. Point "
                                "model.path at the downloaded folder, or pass --architecture "
                                f"({', '.join(f'{k}: {v}' for k, v in REFERENCE.items())})")
    if architecture not in REFERENCE:
        raise ValueError(f"--architecture {architecture!r}: choose one of {', '.join(REFERENCE)}")
    if architecture in SIZES:
        model_type, shape = SIZES[architecture]
        return CONFIG_MAPPING[model_type](**shape)
    return CONFIG_MAPPING[architecture]()


def meta_model(config, model_config) -> tuple[nn.Module, object]:
    """The run's model on the meta device, scoped, with the methods' model changes (no memory is used)."""
    from transformers import AutoModelForImageTextToText

    from mmtune.methods.base import build_methods
    from mmtune.models.load import DTYPES
    from mmtune.models.scope import apply_scope_config

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(model_config, dtype=DTYPES[config.model.dtype])
    layout = apply_scope_config(model, config.scope)
    for method in build_methods(config.method):
        model = method.prepare_model(model, layout)
    return model, layout


def base_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (its adapters are injected in place), where the layout's paths
    are."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def saved_tensor_bytes(model: nn.Module):
    """Count the bytes autograd saves for the backward (each tensor once, parameters excluded) while inside."""
    params = {id(p) for p in model.parameters()}
    seen: dict[object, int] = {}

    def pack(tensor: torch.Tensor):
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in params:
            key = id(base) if base.device.type == "meta" else base.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), base.untyped_storage().nbytes() if base.device.type != "meta"
                            else base.numel() * base.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield seen


def language_model_of(model: nn.Module, layout) -> nn.Module:
    return model.get_submodule(layout.blocks.rsplit(".", 1)[0])


def activation_bytes(model: nn.Module, layout, batch: int, sequence: int, dtype: torch.dtype,
                     device: str = "meta") -> int:
    """What autograd keeps from one forward of the language model (and the LM head) over ``batch × sequence``
    embeddings that need a gradient — the projector's output, trainable in every mmtune scope."""
    import transformers.masking_utils as masking

    model = base_of(model)
    language = language_model_of(model, layout)
    hidden = language.config.hidden_size
    embeddings = torch.zeros(batch, sequence, hidden, device=device, dtype=dtype, requires_grad=True)
    real = masking.find_packed_sequence_indices
    masking.find_packed_sequence_indices = lambda *args, **kwargs: None  # reads values, which meta tensors lack
    try:
        with saved_tensor_bytes(model) as seen:
            out = language(inputs_embeds=embeddings, use_cache=False)
            head = model.get_output_embeddings()
            if head is not None:
                head(out.last_hidden_state)
    finally:
        masking.find_packed_sequence_indices = real
    return sum(seen.values())


def method_state_ratio(config) -> tuple[float, list[str]]:
    """Bytes of method state per trainable parameter, measured by running each method's ``setup`` on a small fp32
    tensor (the state follows the masters' dtype); and the methods whose ``setup`` needs more than that (their state
    is then not counted, and the estimate says so)."""
    from mmtune.methods.base import TrainContext, build_methods

    weight = nn.Parameter(torch.randn(64, 64))
    total, unmeasured = 0, []
    for method in build_methods(config.method):
        ctx = TrainContext(model=None, unwrapped=None, trainable={"w": weight}, generator=torch.Generator(),
                           total_steps=100, tasks=[t.path for t in config.data.tasks] or ["task"])
        try:
            method.setup(ctx)
        except Exception:  # noqa: BLE001  (reported in the estimate's notes)
            unmeasured.append(method.name)
            continue
        total += sum(t.numel() * t.element_size() for t in tensors_in(method.state_dict()) if t.dim() > 1)
    return total / weight.numel(), unmeasured


def tensors_in(state) -> list[torch.Tensor]:
    """Every tensor in a (nested) state dict: a method's or an optimizer's."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in tensors_in(v)]
    if isinstance(state, list | tuple):
        return [t for v in state for t in tensors_in(v)]
    return []


TARGET_TOKENS = 64  # the target positions per record assumed with train.target_logits (--target-tokens)


def logits_bytes(batch: int, positions: int, vocabulary: int, width: int) -> int:
    """The logits of one forward: the head's output in the model's dtype and the fp32 log-softmax the loss keeps for
    the backward, at ``positions`` per record."""
    return batch * positions * vocabulary * (width + 4)


def add_logits(result: Estimate, config, model: nn.Module, batch: int, sequence: int, width: int, forwards: int,
               target_tokens: int | None) -> None:
    """The logits' part of ``result``: at the target positions (``train.target_logits``) or at every one, with a note
    giving the other setting's size."""
    parts = result.parts
    head = base_of(model).get_output_embeddings()
    vocabulary = head.out_features if head is not None else 0
    targets = min(sequence, target_tokens or TARGET_TOKENS)
    every = logits_bytes(batch, sequence, vocabulary, width) * forwards
    if config.train.target_logits:
        parts["logits (target positions)"] = logits_bytes(batch, targets, vocabulary, width) * forwards
        result.notes.append(f"logits at {targets} target positions per record (train.target_logits; --target-tokens "
                            f"sets the answers' mean length); at all {sequence} positions the {vocabulary:,}-word "
                            f"head's logits would take {_size(every).strip()}")
    else:
        parts["logits (every position)"] = every
        result.notes.append(f"logits at all {sequence} positions (train.target_logits=false): "
                            f"{_size(logits_bytes(batch, targets, vocabulary, width) * forwards).strip()} at "
                            f"{targets} target positions per record with train.target_logits=true")


def estimate(config, engine: str = "ddp", devices: int = 1, sequence: int | None = None,
             architecture: str | None = None, target_tokens: int | None = None) -> Estimate:
    """Per-device memory of ``config`` on ``devices`` devices under ``engine`` (``target_tokens``: answer tokens per
    record, where ``train.target_logits`` computes the logits)."""
    from mmtune.methods.base import build_methods
    from mmtune.models.load import DTYPES
    from mmtune.precision import uses_masters

    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    model, layout = meta_model(config, model_config(config, architecture))
    dtype = DTYPES[config.model.dtype]
    width = torch.finfo(dtype).bits // 8
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = total - trainable
    masters = 4 if uses_masters(config.model.dtype, config.train.fp32_masters) or engine.startswith("zero") else width
    optimizer = {"adamw": 8, "sgd": 4, "adafactor": 0}[config.train.optimizer]
    sequence = sequence or config.data.max_length
    n = devices
    result = Estimate(engine, devices, total, trainable)
    parts = result.parts
    if engine == "ddp":
        parts["frozen weights"] = frozen * width
        parts["trainable weights (masters)"] = trainable * masters
        parts["gradients"] = trainable * masters
        parts["DDP gradient buckets"] = trainable * masters
        parts["optimizer state"] = trainable * optimizer
    elif engine == "zero2":  # DeepSpeed casts the model to model.dtype and keeps partitioned fp32 masters
        parts["weights (model.dtype)"] = total * width
        parts["fp32 masters (partitioned)"] = trainable * 4 / n
        parts["gradients (partitioned)"] = trainable * 4 / n
        parts["optimizer state (partitioned)"] = trainable * optimizer / n
    else:  # zero3, fsdp2: the weights are partitioned too; one block is gathered at a time
        blocks = base_of(model).get_submodule(layout.blocks)
        largest = max(sum(p.numel() for p in block.parameters()) for block in blocks)
        parts["weights (partitioned)"] = frozen * width / n + trainable * masters / n
        parts["one gathered block"] = largest * width
        parts["gradients (partitioned)"] = trainable * masters / n
        parts["optimizer state (partitioned)"] = trainable * optimizer / n
    ratio, unmeasured = method_state_ratio(config)
    if unmeasured:
        result.notes.append(f"method state of {', '.join(unmeasured)} not counted: its setup could not run on a "
                            "stand-alone tensor")
    parts["method state"] = trainable * ratio / (n if engine == "fsdp2" else 1)
    methods = build_methods(config.method)
    rows = max(m.rows_per_record for m in methods)
    batch = config.train.batch_size * rows
    forwards = 1 + sum(m.extra_forwards for m in methods)
    full = activation_bytes(model, layout, batch, sequence, dtype) * forwards
    if config.model.gradient_checkpointing:
        blocks = len(base_of(model).get_submodule(layout.blocks))
        kept = batch * sequence * language_model_of(base_of(model), layout).config.hidden_size * width * (blocks + 1)
        parts["activations (checkpointed)"] = kept + full / blocks
        parts["activations without checkpointing"] = full
    else:
        parts["activations"] = full
    add_logits(result, config, model, batch, sequence, width, forwards, target_tokens)
    result.notes.append(f"activations for batch {batch} × sequence {sequence} per device (data.max_length unless "
                        "--seq-len), an upper bound: attention's s×s weights counted as PyTorch's math path keeps them"
                        + (f"; × {forwards} forwards kept per micro-batch (NRCA's noised view)" if forwards > 1 else "")
                        + (f"; batch {config.train.batch_size} × {rows} rows per record (grpo's sampled answers: an "
                           "upper bound, as if every record were of a GRPO task)" if rows > 1 else ""))
    from mmtune.engine import Engine
    from mmtune.methods.base import METHODS, refusal

    where = {"ddp": "DDP", "fsdp2": "FSDP2", "zero2": "DeepSpeed", "zero3": "ZeRO-3"}[engine]
    for name in config.method.names or ["vanilla"]:  # the one compatibility rule, as mmtune train applies it
        why = refusal([METHODS[name]()], Engine(engine, devices))
        if why:
            result.notes.append(f"{name}: refused under {where} ({why})")
    return result


def fits(result: Estimate, gpu_memory_gb: float) -> bool:
    return result.total / GB <= gpu_memory_gb * (1 - HEADROOM)


def describe(result: Estimate, gpu_memory_gb: float | None) -> str:
    """The table ``mmtune estimate`` prints, with a verdict when the device's memory is given."""
    lines = [f"{_count(result.parameters)} parameters, {_count(result.trainable)} trainable; engine "
             f"{result.engine} on {result.devices} device(s); per device:", ""]
    for name, value in result.parts.items():
        aside = "  (not counted: checkpointing is on)" if name == "activations without checkpointing" else ""
        lines.append(f"  {name:<34}{_size(value)}{aside}")
    lines.append(f"  {'total':<34}{_size(result.total)}")
    if gpu_memory_gb:
        usable = gpu_memory_gb * (1 - HEADROOM)
        verdict = "fits" if fits(result, gpu_memory_gb) else "does not fit"
        lines += ["", f"{verdict} on {gpu_memory_gb:g} GB devices ({usable:.1f} GB usable after "
                      f"{HEADROOM:.0%} headroom)"]
        if verdict == "does not fit":
            lines.append("  to change: " + "; ".join(suggestions(result)))
    lines += [""] + [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _size(n: float) -> str:
    return f"{n / GB:>9.2f} GB" if n >= 0.1 * GB else f"{n / 2**20:>9.1f} MB"


def suggestions(result: Estimate) -> list[str]:
    """What to change when a run does not fit, largest part first."""
    ideas = []
    parts = result.parts
    activations = parts.get("activations", 0)
    if activations and activations >= 0.3 * result.total:
        ideas.append("model.gradient_checkpointing=true (activations are the largest part)")
    if parts.get("activations (checkpointed)", 0) >= 0.3 * result.total or activations >= 0.3 * result.total:
        ideas.append("a smaller train.batch_size with a larger train.grad_accum (same global batch)")
    if result.engine == "ddp":
        ideas.append("--engine zero2 (partitions masters, gradients and optimizer state over the devices)")
    if result.engine in ("ddp", "zero2"):
        # (which methods an engine takes is the one compatibility rule's to say: the estimate under that engine
        # names any it refuses, as mmtune train would)
        ideas.append("--engine fsdp2 or --engine zero3 (partition the weights too; the estimate under either names "
                     "any of the run's methods it refuses)")
    ideas.append("method.name=lora (adapters instead of full blocks) or fewer scope.last_n_blocks")
    return ideas
