"""The model a run starts from (``load_base``): a local checkpoint or a tiny random model, built or loaded the same way
on every engine (``whole_init``: DeepSpeed ZeRO-3's partitioned build switched off where a whole model is wanted)."""

from __future__ import annotations

import contextlib

from accelerate.state import AcceleratorState

from mmtune.config import TINY_ARCHITECTURES, RunConfig
from mmtune.data.synthetic import vocabulary
from mmtune.models.load import DTYPES, check_model_folder, load_model, set_pixel_budget
from mmtune.models.tiny import build_tiny


def load_base(config: RunConfig):
    """The model a run starts from: a local checkpoint, or a tiny random model (tests, demos); its processor with
    the run's pixel budget (``model.min_pixels`` / ``model.max_pixels``)."""
    if config.model.tiny:
        with whole_init():
            model, processor = build_tiny(config.model.tiny, words=vocabulary(), image_size=config.model.tiny_image_size,
                                          hidden_size=config.model.tiny_hidden_size,
                                          num_layers=config.model.tiny_layers,
                                          vision_hidden_size=config.model.tiny_vision_hidden_size,
                                          vision_layers=config.model.tiny_vision_layers,
                                          patch_size=config.model.tiny_patch_size, seed=config.train.seed)
        model = model.to(DTYPES[config.model.dtype])
        if config.model.attn_implementation:  # as a checkpoint would load it (transformers says when it can't)
            model.set_attn_implementation(config.model.attn_implementation)
    else:
        check_model_source(config)
        model, processor = load_model(config.model.path, config.model.dtype, config.model.attn_implementation,
                                      config.model.quantization)
    set_pixel_budget(processor, config.model.min_pixels, config.model.max_pixels)
    return model, processor


@contextlib.contextmanager
def whole_init():
    """Transformers as if DeepSpeed ZeRO-3 were off, inside. Under ZeRO-3 it builds a model partitioned
    (``deepspeed.zero.Init``), which draws other random weights than a whole build — a tiny random model is built
    whole so that it is the same model on every engine (a checkpoint loads the same either way, and is loaded
    partitioned, as a large model must be) — and its ``generate`` waits for the other processes at every token,
    which one process evaluating alone must not."""
    plugin = AcceleratorState().deepspeed_plugin if AcceleratorState._shared_state else None
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # what transformers reads to build under zero.Init
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def check_model_source(config: RunConfig) -> None:
    """Fail fast when the run names no model, or a folder that is not a model."""
    if config.model.tiny:
        return
    if not config.model.path:
        raise ValueError("set model.path (a local checkpoint folder) or model.tiny (one of "
                         f"{', '.join(TINY_ARCHITECTURES)})")
    check_model_folder(config.model.path)
