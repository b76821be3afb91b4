"""A full disk, provoked: on a size-limited tmpfs (where this machine lets the test mount one) and by injecting ENOSPC
into the writers. The run stops with "no space left on device while writing …; the newest complete checkpoint is
step-N", exits non-zero, leaves nothing partial that could be taken for complete, and keeps its metrics readable."""

import errno
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from mmtune.checkpoint import complete_checkpoints, disk_is_full
from mmtune.config import save_config
from mmtune.errors import DiskFullError
from mmtune.step_log import append_row
from mmtune.train import train


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted under tmp_path, resized by the test; unmounted afterwards."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()}); the injected-ENOSPC tests cover "
                    "the same code paths")

    def resize(size: int) -> None:
        pages = -(-size // 4096) * 4096
        subprocess.run(["mount", "-o", f"remount,size={pages}", str(mount)], check=True)

    yield mount, resize
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_checkpoint_is_a_clear_error_and_the_run_resumes_after(tiny_config, tmp_path, small_disk):
    mount, resize = small_disk
    settings = ["train.max_steps=6", "train.save_every=2", "train.report_to=[]"]
    probe = train(tiny_config(*settings, "train.max_steps=3", out="probe"))  # sizes on a normal disk
    checkpoint = _folder_size(probe / "checkpoints" / "step-000002")
    run = mount / "run"
    path = tmp_path / "run.yaml"
    save_config(tiny_config(*settings, out=str(run)), path)
    # room for the run folder with its first checkpoint and half of a second one
    before_first = _folder_size(probe) - _folder_size(probe / "final") - checkpoint
    resize(before_first + checkpoint + checkpoint // 2)
    result = subprocess.run([sys.executable, "-m", "mmtune.cli", "train", "--config", str(path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "no space left on device while writing the checkpoint of step 4" in result.stderr
    assert "the newest complete checkpoint is step-000002" in result.stderr.lower()
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step-000002"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]  # no partial left
    assert not (run / "final").exists() and not (run / "final.partial").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    resize(256 << 20)  # the user frees space
    train(tiny_config(*settings, "train.resume_from=latest", out=str(run)))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and (run / "final" / "config.json").is_file()


def test_a_full_disk_while_writing_final_leaves_no_final(tiny_config, monkeypatch):
    import mmtune.models.save as writer  # the one writer of a model folder (final/, best/, merges)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "save_processor", no_space)
    config = tiny_config("train.max_steps=4", "train.save_every=2")
    with pytest.raises(DiskFullError, match=r"while writing the final model .*newest complete checkpoint is "
                                            r"step-000002"):
        train(config)
    run = Path(config.train.output_dir)
    assert not (run / "final").exists() and not (run / "final.partial").exists()
    assert not (run / "train_summary.json").exists()


def test_a_checkpoint_that_fails_otherwise_is_removed_and_the_error_kept(tiny_config, monkeypatch):
    """Not every failed write is a full disk: the original error surfaces, and the partial folder is gone all the
    same."""
    import mmtune.resume

    def broken(*args, **kwargs):
        raise RuntimeError("the method state could not be serialised")

    monkeypatch.setattr(mmtune.resume, "save_method_states", broken)
    config = tiny_config("train.max_steps=4", "train.save_every=2")
    with pytest.raises(RuntimeError, match="could not be serialised"):
        train(config)
    assert not list((Path(config.train.output_dir) / "checkpoints").iterdir())


class _FillingFile:
    """An unbuffered file on a disk that fills after ``room`` more bytes: a short write, then ENOSPC."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def fileno(self) -> int:
        return self.handle.fileno()

    def write(self, data: bytes) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = self.handle.write(data[: self.room])
        self.room -= written
        return written


def test_a_metrics_row_cut_by_a_full_disk_is_removed_again(tmp_path):
    from mmtune.run_folder import RunPaths

    paths = RunPaths(tmp_path)
    with paths.metrics.open("ab", buffering=0) as handle:
        append_row(handle, {"step": 1, "loss": 1.0}, paths)
        with pytest.raises(DiskFullError, match=r"metrics.jsonl \(step 2\).*newest complete checkpoint is none"):
            append_row(_FillingFile(handle, room=10), {"step": 2, "loss": 0.5}, paths)
    assert [json.loads(line) for line in paths.metrics.read_text().splitlines()] == [{"step": 1, "loss": 1.0}]


def test_disk_full_is_recognised_through_the_writers_own_errors(tmp_path):
    assert disk_is_full(OSError(errno.ENOSPC, "x"), tmp_path)
    assert disk_is_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
                        tmp_path)
    assert not disk_is_full(RuntimeError("something else"), tmp_path)  # with free space on tmp_path
    assert shutil.disk_usage(tmp_path).free > 16 << 20


@pytest.mark.parametrize("where", ["world", "report", "scores", "unnamed"])
def test_a_full_disk_anywhere_names_what_was_being_written(tmp_path, monkeypatch, capsys, where):
    """Not only checkpoints: the synthetic world, the report's plots, an evaluation's files — and a write no writer
    named still says it is the disk and where to look (it was `[Errno 28] No space left on device`, naming nothing)."""
    from mmtune.cli import described
    from mmtune.data.synthetic import ensure_world
    from mmtune.files import atomic_write

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "world":
        monkeypatch.setattr("mmtune.data.synthetic.generate_world", full)
        with pytest.raises(DiskFullError, match=f"while writing the synthetic world into {tmp_path / 'w'}"):
            ensure_world(tmp_path / "w", 0, 4, 4, 16)
    elif where == "report":
        import matplotlib.pyplot as plt

        from mmtune.report import _save

        fig = plt.figure()
        monkeypatch.setattr(fig, "savefig", full)
        with pytest.raises(DiskFullError, match="while writing .*s_vs_g.png"):
            _save(fig, tmp_path / "s_vs_g.png")
    elif where == "scores":
        monkeypatch.setattr("os.fdopen", full)
        with pytest.raises(DiskFullError, match="while writing .*scores.json") as caught:
            atomic_write(tmp_path / "scores.json", "{}")
        assert described(caught.value).startswith(f"no space left on device while writing {tmp_path}")
        assert not list(tmp_path.iterdir())  # nothing half-written left
    else:
        message = described(OSError(errno.ENOSPC, "No space left on device"))
        assert message.startswith("no space left on device — free space where mmtune writes (train.output_dir")
