"""Two CPU processes (gloo, through Accelerate) train the same model as one process with the same global batch."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import final_weights, losses
from mmtune.config import save_config
from mmtune.train import train

pytestmark = pytest.mark.multiprocess


def _launch(config_path, cwd):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "mmtune.cli", "train", "--config", str(config_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


# spider reads the all-reduced gradient, so it must match too. (NRCA's gap term is normalised per device,
# as in the reference code under DeepSpeed, so it is not expected to match a single process exactly.)
# pcgrad all-reduces one gradient per task by hand (DDP's own reduction is not used): it must match too.
# task_sam's per-task second pass runs the same forwards on every process, whichever tasks each one holds.
@pytest.mark.parametrize("method", ["vanilla", "spider", "pcgrad", "sam", "task_sam"])
def test_two_processes_match_one(tiny_config, tmp_path, method):
    single = train(tiny_config(f"method.name={method}", "train.batch_size=8", "train.max_steps=3", out="single"))
    config = tiny_config(f"method.name={method}", "train.batch_size=4", "train.max_steps=3", out="ddp")
    path = tmp_path / "ddp.yaml"
    save_config(config, path)
    _launch(path, tmp_path)
    ddp = tmp_path / "ddp"
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-4)
    one, two = final_weights(single), final_weights(ddp)
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-5, msg=name)


def test_two_processes_in_bf16_with_fp32_masters_match_one(tiny_config, tmp_path):
    """DDP over fp32 masters beside bf16 frozen weights (DDP buckets the two dtypes apart): SPIDER, whose state
    follows the masters, trains the same model as one process, to bf16 rounding."""
    settings = ["method.name=spider", "model.dtype=bf16", "train.mixed_precision=bf16", "train.max_steps=3",
                "train.save_every=2"]
    single = train(tiny_config(*settings, "train.batch_size=8", out="single"))
    path = tmp_path / "ddp.yaml"
    save_config(tiny_config(*settings, "train.batch_size=4", out="ddp"), path)
    _launch(path, tmp_path)
    ddp = tmp_path / "ddp"
    assert losses(ddp) == pytest.approx(losses(single), rel=2e-2)
    one, two = final_weights(single), final_weights(ddp)
    for name in one:
        assert one[name].dtype == two[name].dtype
        torch.testing.assert_close(one[name].float(), two[name].float(), rtol=2e-2, atol=2e-3, msg=name)
    masters = torch.load(ddp / "checkpoints" / "step-000002" / "mmtune_methods.pt", weights_only=True)["spider"]
    assert {w.dtype for w in masters["pretrained"].values()} == {torch.float32}
