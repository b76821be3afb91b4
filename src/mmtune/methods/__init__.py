"""Built-in methods; importing this package registers them all — every module in it, so a new method is one new
file (with ``@register``) and nothing else to edit.

    from mmtune.methods import NRCA, NRCAConfig, Spider
    trainer = MethodTrainer(..., methods=[NRCA(NRCAConfig(lam=0.5)), Spider()])
"""

import pkgutil
from importlib import import_module

from mmtune.methods.balancing import FAMO, FAMOConfig, UncertaintyConfig, UncertaintyWeighting
from mmtune.methods.base import METHODS, Method, MethodConfig, TrainContext, build_methods, register
from mmtune.methods.dare import Dare, DareConfig
from mmtune.methods.grafting import Grafting, GraftingConfig
from mmtune.methods.half_ft import HalfFT, HalfFTConfig
from mmtune.methods.l1_reg import L1Reg, L1RegConfig
from mmtune.methods.l2_reg import L2Reg, L2RegConfig
from mmtune.methods.lora import Lora, LoraMethodConfig
from mmtune.methods.magnitude_mask import MagnitudeMask
from mmtune.methods.multitask import CAGrad, CAGradConfig, PCGrad, PCGradConfig
from mmtune.methods.nrca import NRCA, NRCAConfig
from mmtune.methods.random_mask import MaskConfig, RandomMask
from mmtune.methods.sam import SAM, SAMConfig, TaskSAM, TaskSAMConfig
from mmtune.methods.spider import Spider, SpiderConfig
from mmtune.methods.vanilla import Vanilla
from mmtune.methods.wise_ft import WiseFT, WiseFTConfig

__all__ = [
    "METHODS", "Method", "MethodConfig", "TrainContext", "build_methods", "register", "CAGrad", "CAGradConfig",
    "PCGrad", "PCGradConfig", "SAM", "SAMConfig", "TaskSAM", "TaskSAMConfig", "FAMO", "FAMOConfig",
    "UncertaintyConfig", "UncertaintyWeighting",
    "Dare", "DareConfig", "Grafting", "GraftingConfig", "HalfFT", "HalfFTConfig", "L1Reg", "L1RegConfig",
    "L2Reg", "L2RegConfig", "Lora", "LoraMethodConfig", "MagnitudeMask", "MaskConfig", "NRCA", "NRCAConfig",
    "RandomMask", "Spider", "SpiderConfig", "Vanilla", "WiseFT", "WiseFTConfig",
]

for _module in pkgutil.iter_modules(__path__):  # a method file added beside these registers itself
    import_module(f"{__name__}.{_module.name}")
