"""Built-in methods; importing this package registers them all."""

from mmtune.methods import (  # noqa: F401
    dare,
    grafting,
    half_ft,
    l1_reg,
    l2_reg,
    lora,
    magnitude_mask,
    nrca,
    random_mask,
    spider,
    vanilla,
    wise_ft,
)
from mmtune.methods.base import METHODS, Method, MethodConfig, TrainContext, build_methods, register

__all__ = ["METHODS", "Method", "MethodConfig", "TrainContext", "build_methods", "register"]
