"""The one writer of a model folder (mmtune.models.save): final/, best/ and merged models are written whole or not at
all, never over a folder the user did not ask to replace, in the dtype the caller chose."""

import pytest
import torch

from mmtune.data.synthetic import vocabulary
from mmtune.models.load import load_model
from mmtune.models.save import write_model_folder
from mmtune.models.tiny import build_tiny


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("llava", words=vocabulary(), seed=0)


def test_a_model_folder_is_written_whole_and_replaced_only_when_asked(tmp_path, tiny):
    model, processor = tiny
    folder = write_model_folder(model, processor, tmp_path / "final")
    loaded, _ = load_model(folder)
    first = next(iter(model.state_dict()))
    assert torch.equal(loaded.state_dict()[first], model.state_dict()[first])
    with pytest.raises(FileExistsError, match="final exists; pass --overwrite"):
        write_model_folder(model, processor, folder)
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    write_model_folder(model, processor, folder, state_dict=half, overwrite=True)
    assert load_model(folder, "bf16")[0].state_dict()[first].dtype == torch.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no .partial, no .old left


def test_a_failed_write_keeps_the_folder_that_was_there(tmp_path, tiny, monkeypatch):
    model, processor = tiny
    folder = write_model_folder(model, processor, tmp_path / "best")
    before = sorted(p.name for p in folder.iterdir())

    def broken(*args, **kwargs):
        raise OSError("the disk went away")

    monkeypatch.setattr("mmtune.models.save.save_processor", broken)
    with pytest.raises(OSError, match="the disk went away"):
        write_model_folder(model, processor, folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
