"""Built-in methods; importing this package registers them all."""

from mmtune.methods import vanilla  # noqa: F401
from mmtune.methods.base import METHODS, Method, MethodConfig, TrainContext, build_methods, register

__all__ = ["METHODS", "Method", "MethodConfig", "TrainContext", "build_methods", "register"]
