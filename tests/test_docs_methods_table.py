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
         "sam", "task_sam", "grpo"]
HEADER = ("| method | 1 process fp32 · bf16 | DDP 2 proc. | ZeRO-2 fp32: 1 · 2 proc. | ZeRO-2 bf16: 1 · 2 proc. "
          "| ZeRO-3 fp32: 1 · 2 proc. | ZeRO-3 bf16 | FSDP2 shards: fp32 · bf16 |")


def table() -> str:
    accepted = set(deepspeed_tests.METHOD_NAMES)
    zero2_ddp, bf16_path = set(deepspeed_tests.ZERO2_DDP), set(deepspeed_tests.BF16_PATH)
    one_bf16 = bf16_path | set(deepspeed_tests.ZERO3_BF16)  # one process in bf16: the reference of both
    ddp = zero2_ddp | set(deepspeed_tests.ZERO3_DDP) | set(ddp_tests.METHODS) | {"vanilla", "spider"}
    zero2_one = set(deepspeed_tests.ZERO2_ONE_PROCESS)
    zero3, zero3_names = set(deepspeed_tests.ZERO3_PATH), set(deepspeed_tests.ZERO3_NAMES)

    def tested(name: str, where: set[str], note: str = "", twins: dict = TWIN) -> str:
        return f"✓{note}" if name in where else f"≡ {twins[name]}" if twins.get(name) in where else "–"

    rows = [HEADER, "|---|---|---|---|---|---|---|---|"]
    for name in ORDER:
        refused = "✗ own gradient"
        zero2 = f"{tested(name, zero2_one)} · {tested(name, zero2_ddp)}" if name in accepted else refused
        whole_model = " (whole model)" if name in deepspeed_tests.SELECTS_OVER_NEAR_TIES else ""
        zero2_bf16 = (f"{tested(name, bf16_path, whole_model)} · {tested(name, set(deepspeed_tests.BF16_DDP))}"
                      if name in accepted else refused)
        if name in zero3_names:
            twins = deepspeed_tests.ZERO3_SAME_CODE
            zero3_fp32 = (f"{tested(name, zero3, twins=twins)} · "
                          f"{tested(name, set(deepspeed_tests.ZERO3_DDP), twins=twins)}")
            zero3_bf16 = tested(name, set(deepspeed_tests.ZERO3_BF16), twins=twins)
        else:
            zero3_fp32 = zero3_bf16 = "✗ own gradient" if name not in accepted else "✗ whole gradients" \
                if METHODS[name].partitioned_refusal else "✗ reads weights"
        fsdp2 = "✗" if not METHODS[name].supports_sharding else \
            f"{tested(name, set(fsdp2_tests.RUN), twins=fsdp2_tests.SAME_CODE_AS_ANOTHER)} · " \
            f"{tested(name, set(fsdp2_tests.BF16), twins=fsdp2_tests.SAME_CODE_AS_ANOTHER)}"
        rows.append(f"| {name} | ✓ · {tested(name, one_bf16)} | {tested(name, ddp)} | {zero2} | {zero2_bf16} "
                    f"| {zero3_fp32} | {zero3_bf16} | {fsdp2} |")
    return "\n".join(rows)


def test_every_method_is_in_the_table():
    assert sorted(ORDER) == sorted(METHODS)


def test_the_doc_table_is_what_the_tests_run():
    assert table() in DOC.read_text(), "docs/methods.md's method × engine table is stale; paste:\n" + table()
