"""Two CPU processes (gloo, through Accelerate) train the same model as one process with the same global batch.

One launch trains every configuration below (tests/train_many_worker.py), so the process start and the process
group are paid once; vanilla and spider are compared the same way from the engine runs of tests/test_deepspeed.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import base_weights, final_weights, free_port, losses, text_only_records
from mmtune.config import save_config
from mmtune.data.records import write_records
from mmtune.train import train

pytestmark = pytest.mark.multiprocess

WORKER = Path(__file__).with_name("train_many_worker.py")
# pcgrad all-reduces one gradient per task by hand (DDP's own reduction is not used): it must match one process.
# sam's second gradient and task_sam's per-task second pass run the same forwards on every process, whichever tasks
# each one holds. (NRCA's gap term is normalised per device, as in the reference code under DeepSpeed, so it is not
# expected to match a single process exactly.)
# grpo samples each record's answers from a seed of the step and the record, so two processes sample what one does,
# and with loss_reduction=token (the default) every sampled token weighs the same on any number of processes.
METHODS = ["pcgrad", "sam", "task_sam", "grpo"]
# DDP over fp32 masters beside bf16 frozen weights (DDP buckets the two dtypes apart): SPIDER, whose state follows
# the masters.
BF16_SPIDER = ["method.name=spider", "model.dtype=bf16", "train.mixed_precision=bf16", "train.save_every=2"]

# GRPO where one process's batch holds the one record of its task (1 counting MC record among 32): a process
# whose step has no GRPO term logs as many numbers as one that has (metrics.jsonl's reduction; it once hung a DDP run
# at the first such step), and the two processes still train what one does.
SPARSE_GRPO = ["method.name=grpo",
               "data.tasks=[{path: 'synthetic:detailed_caption', n: 31}, {path: 'synthetic:count_mc', n: 1}]",
               "train.max_steps=4"]  # the whole epoch: the record is drawn

# Text-only records beside captions (as the LLaVA-1.5 mix holds conversations without an image): a process whose
# batch is text-only gives the trainable projector no gradient of its own, which DDP refuses ("Expected to have
# finished reduction"); the loss ties every trainable weight in with a 0 (mmtune.losses.unused_weights_tie).
TEXT_ONLY = ["method.name=vanilla", "train.max_steps=4"]  # the whole epoch: both captions drawn

# Padding-free batches under DDP (issue 37): each process packs its own records; the same training as one process
# with padded batches.
PADDING_FREE = ["method.name=vanilla", "data.padding_free=true"]


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """Each configuration trained 3 steps in this process (batch 8) and by 2 DDP processes (batch 4 each)."""
    from conftest import TINY_CONFIG
    from mmtune.config import load_config

    root = tmp_path_factory.mktemp("ddp")

    def config(name, way, *extra):
        overrides = [f"data.synthetic.dir={world}", f"train.output_dir={root / way / name}", "train.progress=false",
                     "data.tasks=[{path: 'synthetic:detailed_caption', n: 16}, {path: 'synthetic:count_mc', n: 16}]",
                     "train.max_steps=3", "train.warmup_ratio=0.0", "eval.downstream=[]", "eval.heldout=[]", *extra]
        return load_config(TINY_CONFIG, overrides)

    texts = root / "text_qa.jsonl"
    write_records(text_only_records(30), texts)
    launched = []
    settings = {name: [f"method.name={name}"] for name in METHODS} | {"spider-bf16": BF16_SPIDER,
                                                                       "padding-free": PADDING_FREE,
                                                                       "grpo-sparse": SPARSE_GRPO,
                                                                       "text-only": [*TEXT_ONLY, f"data.tasks=[{{path: "
                                                                                     f"'synthetic:detailed_caption', n: 2}}, "
                                                                                     f"{{path: '{texts}'}}]"]}
    for name, extra in settings.items():
        single = [e for e in extra if e != "data.padding_free=true"]  # padding-free: the padded run is the reference
        train(config(name, "single", *single, "train.batch_size=8"))
        path = root / f"ddp-{name}.yaml"
        save_config(config(name, "ddp", *extra, "train.batch_size=4"), path)
        launched.append(path)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", str(WORKER),
               *map(str, launched)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(WORKER.parent)}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return root


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_match_one(runs, method):
    single, ddp = runs / "single" / method, runs / "ddp" / method
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-4)
    one, two = final_weights(single), final_weights(ddp)
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-5, msg=name)


def test_grpo_where_one_process_has_no_grpo_record_matches_one(runs):
    """The step that drew the one counting MC record: one process has a GRPO term, the other none. (Before the log
    reduced the union of every process's keys, the DDP run died there: gloo's "Received data size doesn't match".)"""
    single, ddp = runs / "single" / "grpo-sparse", runs / "ddp" / "grpo-sparse"
    rows = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert any("grpo" in row for row in rows if "loss" in row), "the MC record was not drawn: the test says nothing"
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-4)
    one, two = final_weights(single), final_weights(ddp)
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-5, msg=name)


def test_text_only_batches_on_one_process_match_one_process(runs):
    """2 captions among 32 records: in the steps that draw one, the other process's batch is text-only (without the
    tie to the weights the DDP launch dies there)."""
    single, ddp = runs / "single" / "text-only", runs / "ddp" / "text-only"
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-4)
    one, two = final_weights(single), final_weights(ddp)
    from conftest import TINY_CONFIG
    from mmtune.config import load_config

    start = base_weights(load_config(TINY_CONFIG))
    assert any(not torch.equal(one[k], start[k]) for k in one if "multi_modal_projector" in k)  # the projector trains
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-5, msg=name)


def test_two_processes_in_bf16_with_fp32_masters_match_one(runs):
    """SPIDER over fp32 masters under DDP trains the same model as one process, to bf16 rounding."""
    single, ddp = runs / "single" / "spider-bf16", runs / "ddp" / "spider-bf16"
    assert losses(ddp) == pytest.approx(losses(single), rel=2e-2)
    one, two = final_weights(single), final_weights(ddp)
    for name in one:
        assert one[name].dtype == two[name].dtype
        torch.testing.assert_close(one[name].float(), two[name].float(), rtol=2e-2, atol=2e-3, msg=name)
    masters = torch.load(ddp / "checkpoints" / "step-000002" / "mmtune_methods.pt", weights_only=True)["spider"]
    assert {w.dtype for w in masters["pretrained"].values()} == {torch.float32}


def test_padding_free_batches_on_two_processes_match_padded_ones_on_one(runs):
    single, ddp = runs / "single" / "padding-free", runs / "ddp" / "padding-free"
    assert "padding_free: true" in (ddp / "config.yaml").read_text()
    assert "padding_free: false" in (single / "config.yaml").read_text()
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-4)
    one, two = final_weights(single), final_weights(ddp)
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-5, msg=name)
