"""benchmarks/gpu_check.py can't rot: its --cpu-smoke mode runs the same code tiny on the CPU (not a measurement)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.multiprocess

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would measure instead")
def test_without_a_gpu_it_says_so_and_exits_non_zero(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no CUDA GPU here" in result.stderr
    assert not (tmp_path / "x.json").exists()


def test_cpu_smoke_runs_every_part_and_writes_the_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)], capture_output=True,
                            text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["mode"] == "cpu-smoke" and set(data["methods"]) == {"vanilla", "nrca", "spider"}
    for part in [*data["methods"].values(), data["hf_trainer"]]:
        assert part["step_s"] > 0 and part["tokens_per_s"] > 0 and part["peak_mb"] > 0
    counted = data["tokens_that_count"]
    for part in ("every_position_logits", "padding_free"):
        assert counted[part]["step_s"] > 0 and counted[part]["tokens_per_s"] > 0
    assert counted["padding_free_flash_attention_2"] == {"skipped": "no GPU"}
    assert data["grpo"]["step_s"] > 0 and 1 <= data["grpo"]["answer_tokens_mean"] <= 16
    assert data["vanilla_vs_hf_trainer"] > 0 and data["evaluation"]["samples_per_s"] > 0
    zero2 = data["deepspeed_zero2_bf16"]
    assert "skipped" in zero2 or (zero2["engine"], zero2["zero_stage"], zero2["zero_precision"]) == \
        ("DEEPSPEED", 2, "bf16")
