"""mmtune: multi-task fine-tuning of multimodal LLMs, measured as specialization vs generalization."""

__version__ = "0.1.0"
