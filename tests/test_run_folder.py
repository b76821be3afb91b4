"""The run folder (mmtune.run_folder): locked while a run lives, never written over by accident."""

import json
import subprocess
import sys

import pytest

from mmtune.train import RunInUseError, train


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


def test_overwrite_clears_the_old_runs_evaluations(tiny_config):
    evaluated = ["eval.downstream=['synthetic:count_mc']", "eval.limit=2", "eval.max_new_tokens=2"]
    run = train(tiny_config(*evaluated, out="ow"))
    (run / "eval" / "base" / "scores.json").write_text("{}")  # stale: must not be reused as this run's base
    train(tiny_config(*evaluated, "train.overwrite=true", out="ow"))
    assert json.loads((run / "eval" / "base" / "scores.json").read_text())["tasks"]


def test_output_dir_under_a_file_is_a_clear_error(tiny_config, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="can't create the run folder"):
        train(tiny_config(out="file/run"))


def test_refuses_to_write_over_another_run(tiny_config):
    train(tiny_config())
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(tiny_config())
    train(tiny_config("train.overwrite=true"))  # explicit consent
