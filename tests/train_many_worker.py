"""Train several run configs one after another in one process (launched by accelerate in the engine tests, so one
launch — process start, process group, DeepSpeed's setup — serves every method).

An argument ``resume:SAVED:CONFIG`` trains CONFIG (whose ``train.resume_from`` is ``latest``) in a copy of the run
folder SAVED as a run killed after its last checkpoint: ``final/`` and the summary removed (by the main process, the
others waiting)."""

import shutil
import sys
import time
from pathlib import Path

from accelerate import PartialState

from mmtune.config import load_config
from mmtune.train import train

if __name__ == "__main__":
    for argument in sys.argv[1:]:
        started = time.perf_counter()
        if argument.startswith("resume:"):
            _, saved, argument = argument.split(":", 2)
            config = load_config(Path(argument))
            state = PartialState()
            if state.is_main_process:
                target = Path(config.train.output_dir)
                shutil.copytree(saved, target)
                shutil.rmtree(target / "final")
                (target / "train_summary.json").unlink()
            state.wait_for_everyone()
            train(config)
        else:
            train(load_config(Path(argument)))
        print(f"worker: {argument} took {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
