"""The GPU check: what mmtune costs on a real accelerator, in one script (``make gpu-check``, ≤ 8 minutes on one GPU).

A ~1B-parameter LLaVA-architecture model built from config (random weights: nothing is downloaded), bf16 weights with
fp32 masters of what trains (projector + last 2 blocks), the synthetic world's downstream mix. Measured:

- step time, tokens/s and peak memory of mmtune's loop with ``vanilla``, ``nrca`` and ``spider``;
- vanilla with the head at every position (``train.target_logits=false``) and with ``data.padding_free`` (through
  flash-attention's variable-length kernels when flash-attn is installed);
- a plain Hugging Face ``Trainer`` step on the same model, batches and scope (autocast over an fp32 model: its
  fp32 masters), the reference mmtune's vanilla step is held to;
- DeepSpeed ZeRO-2 in bf16 in one process (NCCL on a GPU), through ``accelerate launch`` as users run it;
- batched evaluation throughput (greedy generation, batch 16).

Writes a JSON (``--out``). Without a CUDA GPU it says so and exits 2; ``--cpu-smoke`` runs the same code on a tiny
model on the CPU (the test suite does, so the script can't rot) and is not a measurement.

Run: ``python benchmarks/gpu_check.py --out gpu_check.json`` (or ``make gpu-check``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# ~1B parameters: a 20-block Llama of width 2048 (MLP 4096) behind a 24-layer CLIP-L-sized vision tower.
FULL = {"hidden": 2048, "layers": 20, "vision_hidden": 1024, "vision_layers": 24, "image_size": 336,
        "patch_size": 14, "batch_size": 8, "steps": 20, "warm": 5, "records": 400, "max_length": 1024}
SMOKE = {"hidden": 64, "layers": 4, "vision_hidden": 32, "vision_layers": 2, "image_size": 32, "patch_size": 8,
         "batch_size": 4, "steps": 4, "warm": 1, "records": 32, "max_length": 256}
METHODS = ["vanilla", "nrca", "spider"]


def overrides(size: dict, world: Path, out: Path, method: str) -> list[str]:
    n, precision = size["records"] // 2, size.get("precision", "bf16")
    return [f"model.tiny_hidden_size={size['hidden']}", f"model.tiny_layers={size['layers']}",
            f"model.tiny_vision_hidden_size={size['vision_hidden']}", f"model.tiny_image_size={size['image_size']}",
            f"model.tiny_patch_size={size['patch_size']}", f"model.tiny_vision_layers={size['vision_layers']}",
            f"data.max_length={size['max_length']}",
            f"model.dtype={precision}", f"train.mixed_precision={'no' if precision == 'fp32' else precision}",
            f"train.batch_size={size['batch_size']}",
            f"train.max_steps={size['steps']}", "train.progress=false", "train.report_to=[]", "eval.before=false",
            "eval.downstream=[]", "eval.heldout=[]", f"method.name={method}", f"train.output_dir={out}",
            f"data.synthetic.dir={world}", f"data.synthetic.image_size={size['image_size']}",
            f"data.synthetic.n_train={size['records']}", "data.synthetic.n_test=64",
            f"data.tasks=[{{path: 'synthetic:detailed_caption', n: {n}}}, {{path: 'synthetic:count_mc', n: {n}}}]"]


def step_seconds(run: Path, warm: int) -> list[float]:
    elapsed = [json.loads(line)["elapsed_s"] for line in (run / "metrics.jsonl").read_text().splitlines()
               if "elapsed_s" in line]
    return [b - a for a, b in zip(elapsed[warm - 1:], elapsed[warm:], strict=False)]


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # CPU smoke: the process's peak RSS


def tokens_per_sample(config) -> float:
    """Mean tokens (prompt, image tokens, answer) of a training sample, from the run's own collator."""
    from mmtune.data.collate import RecordDataset, TrainCollator
    from mmtune.data.mixture import build_mixture
    from mmtune.data.synthetic import resolve_task_path
    from mmtune.train import load_base
    from mmtune.train_data import world_dir

    _, processor = load_base(config)
    records = build_mixture(config.data.tasks, 0, resolve=lambda p: resolve_task_path(p, world_dir(config), "train"))
    batch = TrainCollator(processor, config.data.max_length)([RecordDataset(records)[i] for i in range(16)])
    return float(batch["attention_mask"].sum()) / 16


def mmtune_step(method: str, size: dict, world: Path, tmp: Path, device: str, extra: tuple = (),
                name: str | None = None) -> dict:
    from mmtune.config import load_config
    from mmtune.train import train

    config = load_config(ROOT / "configs" / "tiny.yaml",
                         [*overrides(size, world, tmp / (name or method), method), *extra])
    reset_peak(device)
    run = train(config)
    seconds = step_seconds(run, size["warm"])
    return {"step_s": statistics.median(seconds), "peak_mb": peak_mb(device),
            "tokens_per_s": size["batch_size"] * tokens_per_sample(config) / statistics.median(seconds)}


def tokens_that_count(size: dict, world: Path, tmp: Path, device: str, default: dict) -> dict:
    """Issue 37 on the accelerator: vanilla's step with the head at every position (``train.target_logits=false``)
    against the default (targets only), and with ``data.padding_free`` — through flash-attention's variable-length
    kernels where flash-attn is installed (else SDPA with the block-diagonal mask)."""
    import importlib.util

    parts = {"target_logits (default)": default,
             "every_position_logits": mmtune_step("vanilla", size, world, tmp, device, ("train.target_logits=false",),
                                                  "every-position"),
             "padding_free": mmtune_step("vanilla", size, world, tmp, device, ("data.padding_free=true",),
                                         "padding-free")}
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        parts["padding_free_flash_attention_2"] = mmtune_step(
            "vanilla", size, world, tmp, device,
            ("data.padding_free=true", "model.attn_implementation=flash_attention_2"), "padding-free-flash")
    else:
        parts["padding_free_flash_attention_2"] = {"skipped": "flash-attn is not installed (pip install flash-attn)"
                                                   if device == "cuda" else "no GPU"}
    for name, part in parts.items():
        print(f"{name}: {part}", flush=True)
    return parts


def grpo_step(size: dict, world: Path, tmp: Path, device: str) -> dict:
    """Issue 38: one GRPO configuration (counting MC by GRPO, 4 answers of ≤ 16 tokens sampled per question, β = 0.04;
    captions by the cross-entropy): its step time — sampling included — and the answers it generated per step."""
    part = mmtune_step("grpo", size, world, tmp, device, ("method.grpo.max_new_tokens=16",))
    rows = [json.loads(line) for line in (tmp / "grpo" / "metrics.jsonl").read_text().splitlines()]
    lengths = [row["answer_length"] for row in rows if "answer_length" in row]
    part["answer_tokens_mean"] = statistics.mean(lengths) if lengths else 0.0
    print(f"grpo: {part}", flush=True)
    return part


def trainer_step(size: dict, world: Path, tmp: Path, device: str) -> dict:
    """A plain Hugging Face Trainer on the same model, scope and batches: fp32 model, bf16 autocast (or none, with
    ``size["precision"] = "fp32"``)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from mmtune.config import load_config
    from mmtune.data.collate import RecordDataset, TrainCollator
    from mmtune.data.mixture import build_mixture
    from mmtune.data.synthetic import resolve_task_path
    from mmtune.models.scope import apply_scope
    from mmtune.train import load_base
    from mmtune.train_data import world_dir

    config = load_config(ROOT / "configs" / "tiny.yaml", [*overrides(size, world, tmp / "trainer", "vanilla"),
                                                          "model.dtype=fp32"])
    model, processor = load_base(config)
    apply_scope(model, config.scope.train_projector, config.scope.last_n_blocks)
    records = build_mixture(config.data.tasks, 0, resolve=lambda p: resolve_task_path(p, world_dir(config), "train"))
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    args = TrainingArguments(output_dir=str(tmp / "trainer"), per_device_train_batch_size=size["batch_size"],
                             max_steps=size["steps"], learning_rate=2e-4, lr_scheduler_type="cosine",
                             warmup_steps=0.03, max_grad_norm=1.0, bf16=size.get("precision", "bf16") == "bf16",
                             use_cpu=device == "cpu",
                             remove_unused_columns=False, report_to=[], save_strategy="no", logging_strategy="no",
                             dataloader_num_workers=0, disable_tqdm=True, seed=0)
    reset_peak(device)
    Trainer(model=model, args=args, train_dataset=RecordDataset(records),
            data_collator=TrainCollator(processor, config.data.max_length), callbacks=[Clock()]).train()
    seconds = [b - a for a, b in zip(stamps[size["warm"] - 1:], stamps[size["warm"]:], strict=False)]
    return {"step_s": statistics.median(seconds), "peak_mb": peak_mb(device),
            "tokens_per_s": size["batch_size"] * tokens_per_sample(config) / statistics.median(seconds)}


def deepspeed_step(size: dict, world: Path, tmp: Path) -> dict:
    """DeepSpeed ZeRO-2 in bf16, one process, launched as users launch it (NCCL on a GPU, gloo on the CPU)."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return {"skipped": "deepspeed is not installed (pip install 'mmtune[deepspeed]')"}
    from mmtune.config import load_config, save_config

    config = load_config(ROOT / "configs" / "tiny.yaml", overrides(size, world, tmp / "zero2", "vanilla"))
    path = tmp / "zero2.yaml"
    save_config(config, path)
    with socket.socket() as probe:  # a free port: not accelerate's default 29500, which a running job may hold
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "2",
               "--num_processes", "1", "--num_machines", "1", "--main_process_port", str(port),
               "--mixed_precision", "bf16", "--dynamo_backend", "no",
               "-m", "mmtune.cli", "train", "--config", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"DeepSpeed ZeRO-2 run failed:\n{result.stderr[-3000:]}")
    summary = json.loads((tmp / "zero2" / "train_summary.json").read_text())
    return {"step_s": statistics.median(step_seconds(tmp / "zero2", size["warm"])),
            "engine": summary["engine"], "zero_stage": summary["zero_stage"],
            "zero_precision": summary["zero_precision"]}


def eval_throughput(size: dict, world: Path, device: str) -> dict:
    from mmtune.data.records import read_records
    from mmtune.data.synthetic import vocabulary
    from mmtune.evaluate import generate
    from mmtune.models.tiny import build_tiny

    model, processor = build_tiny("llava", words=vocabulary(), hidden_size=size["hidden"], num_layers=size["layers"],
                                  vision_hidden_size=size["vision_hidden"], vision_layers=size["vision_layers"],
                                  image_size=size["image_size"], patch_size=size["patch_size"])
    model = model.to(device=device, dtype=torch.bfloat16)
    records = read_records(world / "detailed_caption_test.jsonl")[:64]
    generate(model, processor, records[:16], 16, 16, progress=False)  # warm-up
    start = time.perf_counter()
    generate(model, processor, records, 16, 16, progress=False)
    return {"batch_size": 16, "new_tokens": 16, "samples_per_s": len(records) / (time.perf_counter() - start)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same code, tiny, on the CPU (not a measurement)")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); run it on a machine with one, or "
              "pass --cpu-smoke to check that the script runs", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu_smoke else "cuda"
    size = SMOKE if args.cpu_smoke else FULL
    from mmtune.data.synthetic import ensure_world

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="mmtune-gpu-check-") as tmp:
        tmp = Path(tmp)
        world = ensure_world(tmp / "world", 0, size["records"], 64, size["image_size"], progress=False)
        results = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                   "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "torch": torch.__version__, "size": size,
                   "methods": {}}
        for method in METHODS:
            results["methods"][method] = mmtune_step(method, size, world, tmp, device)
            print(f"{method}: {results['methods'][method]}", flush=True)
        results["tokens_that_count"] = tokens_that_count(size, world, tmp, device, results["methods"]["vanilla"])
        results["grpo"] = grpo_step(size, world, tmp, device)
        results["hf_trainer"] = trainer_step(size, world, tmp, device)
        results["vanilla_vs_hf_trainer"] = results["methods"]["vanilla"]["step_s"] / results["hf_trainer"]["step_s"]
        results["deepspeed_zero2_bf16"] = deepspeed_step(size, world, tmp)
        results["evaluation"] = eval_throughput(size, world, device)
    results["seconds"] = round(time.time() - started, 1)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
