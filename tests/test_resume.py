"""Save and resume (mmtune.resume, mmtune.checkpoint): a checkpoint is whole or skipped, a resume continues the same run."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import final_weights, losses
from mmtune.checkpoint import CheckpointError
from mmtune.config import load_config
from mmtune.train import train


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


def test_resume_equals_uninterrupted_run(tiny_config, tmp_path):
    full = train(tiny_config("train.max_steps=6", "train.save_every=3", out="full"))
    checkpoint = full / "checkpoints" / "step-000003"
    assert checkpoint.is_dir()
    resumed = train(tiny_config("train.max_steps=6", f"train.resume_from={checkpoint}", out="resumed"))
    wf, wr = final_weights(full), final_weights(resumed)
    for name in wf:
        assert torch.equal(wf[name], wr[name]), name
    assert losses(resumed) == losses(full)[3:]


def test_resume_latest_in_the_same_folder(tiny_config):
    import shutil

    run = train(tiny_config("train.max_steps=4", "train.save_every=2", out="same"))
    before, rows = final_weights(run), metric_rows(run)
    shutil.rmtree(run / "final")  # as if killed after the step-2 checkpoint, with steps 3-4 logged
    (run / "train_summary.json").unlink()
    train(tiny_config("train.max_steps=4", "train.resume_from=latest", out="same"))
    after = final_weights(run)
    for name in before:
        assert torch.equal(before[name], after[name])
    assert metric_rows(run) == rows  # redone steps replace their rows: no duplicates


def _killed_after_checkpoint(run):
    """What a run killed between checkpoints leaves: checkpoints, no final/."""
    shutil.rmtree(run / "final")
    (run / "train_summary.json").unlink()


def metric_rows(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


class Planted:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mmtune-pwned",))
