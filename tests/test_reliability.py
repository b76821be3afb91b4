"""No silent wrong result from training: each fault class of docs/reliability.md, provoked on a tiny run."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import final_weights, losses
from mmtune.checkpoint import CheckpointError
from mmtune.config import ConfigError, load_config
from mmtune.train import NonFiniteError, RunInUseError, train


def _killed_after_checkpoint(run):
    """What a run killed between checkpoints leaves: checkpoints, no final/."""
    shutil.rmtree(run / "final")
    (run / "train_summary.json").unlink()


# --- checkpoints ---------------------------------------------------------------------------------------------

def test_a_checkpoint_killed_mid_write_is_never_latest(tiny_config, monkeypatch):
    import mmtune.checkpoint

    reference = train(tiny_config("train.max_steps=6", "train.save_every=2", out="reference"))
    real = mmtune.checkpoint.write_manifest

    def die_at_step_4(directory, step):
        if step == 4:
            raise KeyboardInterrupt("killed while writing the checkpoint")
        real(directory, step)

    monkeypatch.setattr(mmtune.checkpoint, "write_manifest", die_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config("train.max_steps=6", "train.save_every=2", out="killed"))
    monkeypatch.setattr(mmtune.checkpoint, "write_manifest", real)
    run = reference.parent / "killed"
    assert (run / "checkpoints" / ".step-000004.partial").is_dir()
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-000002"]
    train(tiny_config("train.max_steps=6", "train.save_every=2", "train.resume_from=latest", out="killed"))
    assert not (run / "checkpoints" / ".step-000004.partial").exists()  # cleaned up
    for name, tensor in final_weights(reference).items():
        assert torch.equal(tensor, final_weights(run)[name]), name
    assert losses(run) == losses(reference)


def test_kill_9_during_training_then_resume(tiny_config, tmp_path):
    """A real SIGKILL at an arbitrary moment (often mid-checkpoint: one is written every step)."""
    from mmtune.config import save_config

    config_file = tmp_path / "c.yaml"
    save_config(tiny_config("train.max_steps=40", "train.save_every=1", "train.keep_checkpoints=2", out="k9"),
                config_file)
    child = subprocess.Popen([sys.executable, "-m", "mmtune.cli", "train", "--config", str(config_file)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    checkpoints = tmp_path / "k9" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(checkpoints.glob("step-*"))) < 1:
        time.sleep(0.05)
    time.sleep(0.7)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (tmp_path / "k9" / "final").exists(), "the run finished before it could be killed"
    run = train(load_config(config_file, ["train.resume_from=latest"]))
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, 41))


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.bin", "mmtune_methods.pt", "mmtune_state.json"])
def test_a_corrupted_checkpoint_is_skipped_with_a_message(tiny_config, capsys, victim):
    run = train(tiny_config("method.name=spider", "train.max_steps=6", "train.save_every=2", out="corrupt"))
    _killed_after_checkpoint(run)
    path = run / "checkpoints" / "step-000004" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one scribbled byte
    path.write_bytes(bytes(data))
    train(tiny_config("method.name=spider", "train.max_steps=6", "train.save_every=2", "train.resume_from=latest",
                      out="corrupt"))
    out = capsys.readouterr().out
    assert f"skipping checkpoint {run / 'checkpoints' / 'step-000004'}: {victim} does not match its checksum" in out
    assert "resumed from" in out and "step-000002 at step 2" in out


def test_an_explicitly_named_corrupted_checkpoint_is_refused(tiny_config):
    run = train(tiny_config("train.max_steps=4", "train.save_every=2", out="named"))
    checkpoint = run / "checkpoints" / "step-000002"
    (checkpoint / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors has 7 bytes"):
        train(tiny_config("train.max_steps=4", f"train.resume_from={checkpoint}", out="other"))


class Planted:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mmtune-pwned",))


@pytest.mark.parametrize("victim", ["mmtune_methods.pt", "optimizer.bin"])
def test_nothing_is_unpickled_on_resume(tiny_config, victim):
    """A planted pickle is refused (weights_only) even with a manifest forged to match it."""
    from mmtune.checkpoint import write_manifest

    marker = "/tmp/mmtune-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    run = train(tiny_config("method.name=spider", "train.max_steps=4", "train.save_every=2", out="pickle"))
    _killed_after_checkpoint(run)
    checkpoint = run / "checkpoints" / "step-000002"
    with open(checkpoint / victim, "wb") as handle:
        pickle.dump({"spider": Planted()}, handle)
    write_manifest(checkpoint, 2)
    with pytest.raises(Exception, match="(?i)weights_only|refused|unsupported global"):
        train(tiny_config("method.name=spider", "train.max_steps=4", "train.resume_from=latest", out="pickle"))
    assert not os.path.exists(marker)
    assert not list(checkpoint.glob("*.pkl")) or all(p.name.startswith("random_states") for p in checkpoint.glob("*.pkl"))


# --- non-finite values ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [["scope.lr_blocks=1e30", "scope.lr_projector=1e30"],
                                       ["method.name=nrca", "method.nrca.lam=1e38"]])
def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(tiny_config, overrides):
    import re

    with pytest.raises(NonFiniteError, match=r"step \d+: (loss term|gradient norm)") as error:
        train(tiny_config(*overrides, "train.max_steps=30", "train.save_every=1", "train.max_grad_norm=null",
                          out="nan"))
    failed_at = int(re.search(r"step (\d+)", str(error.value)).group(1))
    run = Path(tiny_config(out="nan").train.output_dir)
    assert not (run / "final").exists()
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert len(checkpoints) == failed_at - 1  # every step before the failure was checkpointed, none after
    for checkpoint in checkpoints:
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())


def test_cli_exits_non_zero_on_nan(tiny_config, tmp_path, capsys):
    from mmtune.cli import main
    from mmtune.config import save_config

    config_file = tmp_path / "nan.yaml"
    save_config(tiny_config("scope.lr_blocks=1e30", "scope.lr_projector=1e30", "train.max_steps=30",
                            "train.max_grad_norm=null", out="clinan"), config_file)
    assert main(["train", "--config", str(config_file)]) != 0
    assert "not finite" in capsys.readouterr().err


# --- the output folder ---------------------------------------------------------------------------------------

def test_a_folder_in_use_by_a_live_run_is_refused(tiny_config, tmp_path):
    (tmp_path / "busy").mkdir()
    code = ("import sys, time; from pathlib import Path; from mmtune.run_folder import lock_output_dir; "
            "lock_output_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "busy")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUseError, match=f"in use by a live run \\(pid {holder.pid}\\)"):
            train(tiny_config(out="busy"))
    finally:
        holder.kill()
        holder.wait()
    train(tiny_config(out="busy"))  # the lock dies with its process


def test_resume_refuses_another_training_config_and_a_finished_run(tiny_config):
    run = train(tiny_config("train.max_steps=4", "train.save_every=2", out="cfg"))
    with pytest.raises(FileExistsError, match="finished run"):
        train(tiny_config("train.max_steps=4", "train.resume_from=latest", out="cfg"))
    _killed_after_checkpoint(run)
    with pytest.raises(ValueError, match=r"method.name: 'vanilla' → 'spider'.*train.batch_size: 4 → 8"):
        train(tiny_config("train.max_steps=4", "train.resume_from=latest", "method.name=spider",
                          "train.batch_size=8", out="cfg"))
    # what only changes where things go or how they are shown may differ
    train(tiny_config("train.max_steps=4", "train.resume_from=latest", "train.log_every=2", out="cfg"))


def test_overwrite_clears_the_old_runs_evaluations(tiny_config):
    evaluated = ["eval.downstream=['synthetic:count_mc']", "eval.limit=2", "eval.max_new_tokens=2"]
    run = train(tiny_config(*evaluated, out="ow"))
    (run / "eval" / "base" / "scores.json").write_text("{}")  # stale: must not be reused as this run's base
    train(tiny_config(*evaluated, "train.overwrite=true", out="ow"))
    assert json.loads((run / "eval" / "base" / "scores.json").read_text())["tasks"]


# --- configuration values ------------------------------------------------------------------------------------

BAD_VALUES = [
    ("scope.lr_blocks=-1e-4", "scope.lr_blocks=-0.0001 must be > 0"),
    ("train.max_grad_norm=-1", "train.max_grad_norm=-1.0 must be > 0"),
    ("train.epochs=0", "train.epochs=0.0 must be > 0"),
    ("train.epochs=-1", "train.epochs=-1.0 must be > 0"),
    ("train.max_steps=-5", "train.max_steps=-5 must be ≥ 1"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0 must be ≥ 1"),
    ("method.name=+", "each '+'-joined part must name a method"),
    ("method.name=nrca++spider", "each '+'-joined part must name a method"),
    ("train.warmup_ratio=5", "train.warmup_ratio=5.0 must be in \\[0, 1\\]"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1 must be ≥ 0"),
    ("train.output_dir=''", "train.output_dir is empty"),
    ("train.grad_accum=0", "train.grad_accum=0 must be ≥ 1"),
    ("train.log_every=0", "train.log_every=0 must be ≥ 1"),
    ("train.batch_size=0", "train.batch_size=0 must be ≥ 1"),
    ("train.mixed_precision=fp8", "train.mixed_precision='fp8'"),
    ("model.path=/models/x", "model.path='/models/x' and model.tiny='llava' are both set"),
    ("model.dtype=fp64", "model.dtype='fp64'"),
    ("data.max_length=0", "data.max_length=0 must be ≥ 1"),
    ("eval.limit=0", "eval.limit=0 must be ≥ 1"),
    ("train.lr=.nan", "unknown key train.lr"),
    ("scope.lr_blocks=.nan", "scope.lr_blocks=nan must be > 0"),
    ("data.tasks=[{path: x, n: 0}]", "n=0 must be ≥ 1"),
    ("data.tasks=[{path: x, weight: -1}]", "weight=-1.0 must be > 0"),
    ("train.seed=!!python/object:os.system x", "not valid YAML"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES)
def test_bad_config_values_are_refused_naming_the_key(tiny_config, override, message):
    with pytest.raises(ConfigError, match=message.replace("'+'", "'\\+'")):
        tiny_config(override)


@pytest.mark.parametrize("override,message", [
    ("method.nrca.lam=-1", "method.nrca: .*lam=-1.0 must be ≥ 0"),
    ("method.nrca.lam=.nan", "lam=nan must be ≥ 0"),
    ("method.l2_reg.lam=-1", "lam=-1.0 must be ≥ 0"),
    ("method.lora.r=0", "r=0 must be ≥ 1"),
    ("method.wise_ft.alpha=2", "alpha=2.0 must be in"),
    ("method.grafting.keep_ratio=1.5", "keep_ratio=1.5 must be in"),
])
def test_bad_method_options_are_refused_before_any_work(tiny_config, override, message):
    name = override.split(".")[1]
    with pytest.raises(ConfigError, match=message):
        train(tiny_config(f"method.name={name}", override, out="never"))


def test_fp16_on_cpu_is_refused(tiny_config):
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        train(tiny_config("train.mixed_precision=fp16"))


def test_output_dir_under_a_file_is_a_clear_error(tiny_config, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="can't create the run folder"):
        train(tiny_config(out="file/run"))


def test_tiny_model_honours_model_dtype(tiny_config):
    run = train(tiny_config("model.dtype=bf16"))
    assert all(t.dtype == torch.bfloat16 for t in final_weights(run).values() if t.is_floating_point())


def test_an_over_length_record_names_its_file_and_line(tiny_config, world):
    with pytest.raises(Exception, match=r"detailed_caption_train.jsonl:\d+: record .* longer than data.max_length=20"):
        train(tiny_config("data.max_length=20", out="long"))


def test_export_llava_replaces_a_planted_link(tmp_path, world):
    from mmtune.data.formats.llava import export
    from mmtune.data.records import read_records

    victim = tmp_path / "victim.json"
    victim.write_text("precious")
    out = tmp_path / "mix.json"
    out.symlink_to(victim)
    export(read_records(world / "count_mc_test.jsonl")[:2], out, overwrite=True)
    assert victim.read_text() == "precious" and not out.is_symlink() and json.loads(out.read_text())
