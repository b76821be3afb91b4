"""docs/methods.md's method × engine × precision table is what the tests run: rebuilt here from the engine tests'
own lists (tests/test_deepspeed.py, tests/test_distributed.py) and the methods' declarations, and compared."""

from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

import test_deepspeed as deepspeed_tests  # noqa: E402
import test_distributed as ddp_tests  # noqa: E402
from methods import test_methods_sharded as fsdp2_tests  # noqa: E402
from mmtune.methods import METHODS  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
# The methods whose code another tested method runs (test_deepspeed.SAME_CODE_AS_ANOTHER), and that other method.
TWIN = {"l1_reg": "l2_reg", "magnitude_mask": "random_mask", "wise_ft": "dare", "dft": "asft", "eaft": "asft",
        "lora": "lora_sculpt", "cagrad": "pcgrad"}
ORDER = ["vanilla", "nrca", "spider", "l2_reg", "l1_reg", "dft", "eaft", "asft", "ewc", "random_mask", "magnitude_mask",
         "half_ft", "grafting", "dare", "wise_ft", "lora", "lora_sculpt", "uncertainty", "famo", "pcgrad", "cagrad",
         "sam", "task_sam"]
HEADER = ("| method | 1 process fp32 · bf16 | DDP 2 proc. | ZeRO-2 fp32: 1 · 2 proc. | ZeRO-2 bf16: 1 · 2 proc. "
          "| FSDP2 shards (fp32) | ZeRO-3 |")


def table() -> str:
    every_path, accepted = set(deepspeed_tests.EVERY_PATH), set(deepspeed_tests.METHOD_NAMES)
    ddp = every_path | set(ddp_tests.METHODS) | {"vanilla", "spider"}

    def tested(name: str, where: set[str], note: str = "") -> str:
        return f"✓{note}" if name in where else f"≡ {TWIN[name]}" if TWIN.get(name) in where else "–"

    rows = [HEADER, "|---|---|---|---|---|---|---|"]
    for name in ORDER:
        refused = "✗ own gradient"
        zero2 = f"{tested(name, accepted)} · {tested(name, every_path)}" if name in accepted else refused
        whole_model = " (whole model)" if name == "grafting" else ""
        zero2_bf16 = (f"{tested(name, every_path, whole_model)} · {tested(name, set(deepspeed_tests.BF16_DDP))}"
                      if name in accepted else refused)
        fsdp2 = "✗" if not METHODS[name].supports_sharding else "✓" if name in fsdp2_tests.RUN else \
            f"≡ {fsdp2_tests.SAME_CODE_AS_ANOTHER[name]}"
        rows.append(f"| {name} | ✓ · {tested(name, every_path)} | {tested(name, ddp)} | {zero2} | {zero2_bf16} "
                    f"| {fsdp2} | ✗ |")
    return "\n".join(rows)


def test_every_method_is_in_the_table():
    assert sorted(ORDER) == sorted(METHODS)


def test_the_doc_table_is_what_the_tests_run():
    assert table() in DOC.read_text(), "docs/methods.md's method × engine table is stale; paste:\n" + table()
