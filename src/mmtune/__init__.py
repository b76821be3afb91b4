"""mmtune: multi-task fine-tuning of multimodal LLMs, measured as specialization vs generalization.

The public API (imported on first use, so ``import mmtune`` stays light)::

    from mmtune import load_config, train, evaluate, write_report, NRCA, Spider, MethodTrainer, with_methods
"""

import logging
from importlib import import_module

__version__ = "0.2.0"

# bitsandbytes (imported by peft when installed) logs at import, on CPUs with AVX512-BF16, that an optional kernel could
# not be fetched ("Failed to load CPU gemm_4bit_forward from kernels-community"); its built-in fallback is what runs,
# so the line is noise for every command and every `import mmtune.train`. Only that logger is quietened.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_API = {
    "load_config": "mmtune.config", "RunConfig": "mmtune.config",
    "train": "mmtune.train",
    "evaluate": "mmtune.evaluate",
    "score": "mmtune.metrics",
    "build_report": "mmtune.report", "write_report": "mmtune.report",
    "load_model": "mmtune.models.load",
    "read_records": "mmtune.data.records", "write_records": "mmtune.data.records", "Record": "mmtune.data.records",
    "generate_world": "mmtune.data.synthetic",
    "Method": "mmtune.methods", "MethodConfig": "mmtune.methods", "register": "mmtune.methods",
    "NRCA": "mmtune.methods", "NRCAConfig": "mmtune.methods", "Spider": "mmtune.methods",
    "SpiderConfig": "mmtune.methods",
    "MethodTrainer": "mmtune.integrations.hf_trainer", "MethodCallback": "mmtune.integrations.hf_trainer",
    "MethodTrainerMixin": "mmtune.integrations.hf_trainer", "with_methods": "mmtune.integrations.hf_trainer",
    "RecordDataset": "mmtune.data.collate", "TrainCollator": "mmtune.data.collate", "apply_scope": "mmtune.models.scope",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'mmtune' has no attribute {name!r}")
