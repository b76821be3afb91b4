import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from mmtune.config import load_config  # noqa: E402
from mmtune.data.synthetic import ensure_world  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"

# `make test` runs two pytest-xdist workers, one per core: each computes on one thread (2 alone).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


# The files that launch minutes of runs go first, longest first (measured with --durations): with `make test`'s two
# workers taking whole files, the long ones start at once and the short ones fill in around them, instead of one
# long file ending the suite alone.
LONGEST_FIRST = ("test_deepspeed.py", "test_preemption.py", "test_methods_sharded.py", "test_demo.py",
                 "test_liveness.py", "test_gpu_check.py", "test_distributed.py", "test_resume.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """The synthetic world of configs/tiny.yaml, generated once per test session."""
    directory = tmp_path_factory.mktemp("world")
    return ensure_world(directory, seed=0, n_train=128, n_test=32, image_size=32, progress=False)


@pytest.fixture
def tiny_config(world, tmp_path):
    """Build a RunConfig from configs/tiny.yaml writing into tmp_path, sharing the session's world."""

    def make(*overrides: str, out: str = "run"):
        base = [f"data.synthetic.dir={world}", f"train.output_dir={tmp_path / out}", "train.progress=false",
                "data.tasks=[{path: 'synthetic:detailed_caption', n: 16}, {path: 'synthetic:count_mc', n: 16}]",
                "train.batch_size=4", "train.max_steps=4", "train.warmup_ratio=0.0",
                "eval.downstream=[]", "eval.heldout=[]"]  # training tests skip evaluation unless they ask
        return load_config(TINY_CONFIG, [*base, *overrides])

    return make
