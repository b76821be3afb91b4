"""Preemption, provoked: SIGTERM to a training process (or to `accelerate launch`, as a scheduler sends it) finishes
the step in flight, writes a verified checkpoint, exits 75; `train.resume_from=latest` then ends where an
uninterrupted run ends, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import final_weights, free_port, losses
from mmtune.checkpoint import complete_checkpoints
from mmtune.config import save_config
from mmtune.preemption import PREEMPTED_EXIT, PreemptionWatch
from mmtune.train import train

pytestmark = pytest.mark.multiprocess

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
WORKER = Path(__file__).with_name("train_many_worker.py")


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _start(command: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env={**ENV, "PYTHONPATH": str(WORKER.parent)}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _signal_when(process: subprocess.Popen, ready, signal_number=signal.SIGTERM, timeout: float = 300) -> str:
    """Send ``signal_number`` to ``process`` once ``ready()`` holds; return its output after it exits."""
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None, f"the run ended before the signal: {process.stdout.read()[-3000:]}"
        assert time.time() < deadline, "the run never got ready for the signal"
        time.sleep(0.05)
    process.send_signal(signal_number)
    output, _ = process.communicate(timeout=timeout)
    return output


def _cli(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "mmtune.cli", "train", "--config", str(config_path)]


def test_sigterm_saves_the_step_in_flight_and_resume_matches_the_uninterrupted_run(tiny_config, tmp_path):
    settings = ["train.max_steps=100", "train.batch_size=2", "train.save_every=1000"]
    whole = train(tiny_config(*settings, out="whole"))
    path = tmp_path / "cut.yaml"
    save_config(tiny_config(*settings, out="cut"), path)
    cut = tmp_path / "cut"
    process = _start(_cli(path), tmp_path)
    output = _signal_when(process, lambda: len(_rows(cut)) >= 3)
    assert process.returncode == PREEMPTED_EXIT, output[-3000:]
    step = len(_rows(cut))
    assert 3 <= step < 100 and f"preempted (SIGTERM) at step {step}" in output
    assert [p.name for p in complete_checkpoints(cut / "checkpoints")] == [f"step-{step:06d}"]  # verified, whole
    assert not (cut / "final").exists()
    resumed = train(tiny_config(*settings, "train.resume_from=latest", out="cut"))
    assert losses(resumed) == losses(whole)
    one, two = final_weights(whole), final_weights(resumed)
    assert all(torch.equal(one[n], two[n]) for n in one)


def test_an_evaluation_in_progress_is_cut_short_and_redone_on_resume(tiny_config, tmp_path):
    settings = ["train.max_steps=4", "eval.every_steps=2", "eval.during_limit=32", "eval.max_new_tokens=24",
                "eval.downstream=['synthetic:detailed_caption', 'synthetic:count_mc']", "eval.before=false",
                "eval.heldout=['synthetic:color_vqa', 'synthetic:position_vqa']", "eval.limit=2"]
    path = tmp_path / "cut.yaml"
    save_config(tiny_config(*settings, out="cut"), path)
    cut = tmp_path / "cut"
    process = _start(_cli(path), tmp_path)
    # the step-2 row is written just before its evaluation starts
    output = _signal_when(process, lambda: any(r.get("step") == 2 and "loss" in r for r in _rows(cut)))
    assert process.returncode == PREEMPTED_EXIT, output[-3000:]
    assert "evaluation step-000002 cut short by SIGTERM" in output
    assert not (cut / "eval" / "during" / "step-000002" / "scores.json").exists()
    assert [p.name for p in complete_checkpoints(cut / "checkpoints")] == ["step-000002"]
    train(tiny_config(*settings, "train.resume_from=latest", out="cut"))
    evaluated = [r["step"] for r in _rows(cut) if "eval" in r]
    assert evaluated == [2, 4] and (cut / "eval" / "during" / "step-000002" / "scores.json").is_file()


def test_a_second_signal_while_saving_changes_nothing(tiny_config, monkeypatch):
    """A scheduler's SIGTERM during step 2, then two more while the checkpoint is being written: they only set the flag
    again — the checkpoint is whole, nothing partial is left, the run stops at step 2 all the same."""
    import mmtune.train as train_module
    from mmtune.errors import Preempted

    real_save, real_agreed = train_module.save_checkpoint, PreemptionWatch.agreed
    calls = {"agreed": 0, "saves": 0}

    def save_under_fire(run, position):
        calls["saves"] += 1
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(run, position)

    def agreed(self, accelerator):
        calls["agreed"] += 1
        if calls["agreed"] == 2:  # arrives at the end of step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real_agreed(self, accelerator)

    monkeypatch.setattr(train_module, "save_checkpoint", save_under_fire)
    monkeypatch.setattr(PreemptionWatch, "agreed", agreed)
    config = tiny_config("train.max_steps=6")
    with pytest.raises(Preempted, match="preempted \\(SIGTERM\\) at step 2"):
        train(config)
    run = Path(config.train.output_dir)
    assert calls["saves"] == 1
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step-000002"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name != "step-000002"]


def test_the_signal_handlers_are_restored_after_training(tiny_config):
    before = signal.getsignal(signal.SIGTERM)
    train(tiny_config("train.max_steps=1"))
    assert signal.getsignal(signal.SIGTERM) is before


def _launch(engine: list[str], config_paths: list[Path], cwd: Path) -> subprocess.Popen:
    """One `accelerate launch` training ``config_paths`` one after another (tests/train_many_worker.py)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *engine, "--num_machines", "1",
               "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
               str(WORKER), *map(str, config_paths)]
    return _start(command, cwd)


ENGINES = {"ddp2": ["--multi_gpu", "--num_processes", "2"],
           "deepspeed1": ["--use_deepspeed", "--zero_stage", "2", "--num_processes", "1"]}
STEPS = {"ddp2": 40, "deepspeed1": 16}  # a DeepSpeed step on the CPU takes ~0.3 s: 16 leave seconds for the signal


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_sigterm_to_the_launcher_under_ddp_and_deepspeed(tiny_config, tmp_path, engine):
    """As SLURM signals a job step: SIGTERM to `accelerate launch`, which forwards it to every process. Every
    process stops at the same step, the checkpoint is complete, and the resumed run equals the uninterrupted one
    (trained first, in the same launch, so one launch serves both)."""
    if engine.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    settings = [f"train.max_steps={STEPS[engine]}", "train.batch_size=2", "method.name=spider"]
    paths = {}
    for name in ("whole", "cut", "resumed"):
        extra = ["train.resume_from=latest"] if name == "resumed" else []
        paths[name] = tmp_path / f"{name}.yaml"
        save_config(tiny_config(*settings, *extra, out="cut" if name == "resumed" else name), paths[name])
    cut = tmp_path / "cut"
    launcher = _launch(ENGINES[engine], [paths["whole"], paths["cut"]], tmp_path)
    output = _signal_when(launcher, lambda: len(_rows(cut)) >= 3)
    assert (tmp_path / "whole" / "final" / "config.json").is_file(), output[-3000:]
    step = len(_rows(cut))
    assert step < STEPS[engine] and f"preempted (SIGTERM) at step {step}" in output, output[-3000:]
    assert [p.name for p in complete_checkpoints(cut / "checkpoints")] == [f"step-{step:06d}"]
    resumed = _launch(ENGINES[engine], [paths["resumed"]], tmp_path)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-3000:]
    assert losses(cut) == losses(tmp_path / "whole")
    one, two = final_weights(tmp_path / "whole"), final_weights(cut)
    assert all(torch.equal(one[n], two[n]) for n in one)


def test_the_interruption_passes_through_handlers_that_catch_exception():
    """Raised wherever the evaluation is when the signal lands — inside an image reader's `except Exception` once,
    which reported it as an unreadable image (seen in CI): it must not be an Exception."""
    from mmtune.preemption import EvaluationInterrupted

    watch = PreemptionWatch(["SIGTERM"])
    with watch, pytest.raises(EvaluationInterrupted), watch.interruptible():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except Exception:  # noqa: BLE001 — what a reader deep in the evaluation does
            pytest.fail("the interruption was caught as an ordinary error")
    assert watch.requested == "SIGTERM"


def test_ctrl_c_is_a_preemption_by_default_and_twice_aborts_at_once(tiny_config, monkeypatch, capsys, request):
    """No setting: Ctrl-C during step 2 finishes it, checkpoints it and stops (exit 75 from the command line) with one
    line saying so; a second Ctrl-C while that checkpoint is written aborts at once, the command printing one line."""
    import mmtune.train as train_module
    from mmtune.errors import Preempted

    real_agreed = PreemptionWatch.agreed
    calls = {"agreed": 0}

    def agreed(self, accelerator):
        calls["agreed"] += 1
        if calls["agreed"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_agreed(self, accelerator)

    monkeypatch.setattr(PreemptionWatch, "agreed", agreed)
    # as in a terminal (a background job of a script, CI's, starts with Ctrl-C ignored: that is kept, see below)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, outer))
    config = tiny_config("train.max_steps=6")
    with pytest.raises(Preempted, match="preempted \\(SIGINT\\) at step 2"):
        train(config)
    assert "SIGINT received: finishing the step in flight, then a checkpoint (Ctrl-C again aborts at once)" in \
        capsys.readouterr().err
    assert [p.name for p in complete_checkpoints(Path(config.train.output_dir) / "checkpoints")] == ["step-000002"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    real_save = train_module.save_checkpoint

    def save_after_a_second_ctrl_c(run, position):
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(run, position)

    calls["agreed"] = 0
    monkeypatch.setattr(train_module, "save_checkpoint", save_after_a_second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config("train.max_steps=6", out="twice"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # started with Ctrl-C ignored: the watch leaves it ignored
    with PreemptionWatch(["SIGTERM", "SIGINT"]):
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_an_abort_prints_one_line_not_a_traceback(monkeypatch, capsys):
    from mmtune import cli

    def interrupted(args):
        raise KeyboardInterrupt

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: type("Args", (), {"func": staticmethod(interrupted)})())
    assert cli.main(["train"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "mmtune: aborted (Ctrl-C); a run continues from its last checkpoint with " \
                          "train.resume_from=latest" and "Traceback" not in err
