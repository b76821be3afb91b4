"""Train several run configs one after another in one process (launched by accelerate in the engine tests, so one
launch — process start, process group, DeepSpeed's setup — serves every method)."""

import sys
from pathlib import Path

from mmtune.config import load_config
from mmtune.train import train

if __name__ == "__main__":
    for path in sys.argv[1:]:
        train(load_config(Path(path)))
