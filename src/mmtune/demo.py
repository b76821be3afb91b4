"""``mmtune demo``: the papers' experiment in miniature — the tiny base fine-tuned with each method and seed on the
synthetic world's downstream mix (``configs/demo.yaml``; ``--world 3``: ``configs/demo_v3.yaml``), optionally the
per-task runs merged by each rule (``--merge``), and one specialization-vs-generalization report over all of them.
Finished runs are reused, so an interrupted sweep resumes."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def quiet_when_logged() -> list[str]:
    """Progress bars redraw dozens of times a second: in a log file (not a terminal) they flood it, so they
    are off there unless an override turns them on."""
    return [] if sys.stderr.isatty() else ["train.progress=false"]


def _shipped(name: str) -> Path:
    """A folder shipped with mmtune: at the top of the repository (editable install) or inside the installed
    package (wheel)."""
    in_repo = Path(__file__).resolve().parents[2] / name
    return in_repo if in_repo.is_dir() else Path(__file__).resolve().parent / name


ASSETS = _shipped("assets")
CONFIGS = _shipped("configs")
SHIPPED_BASE = ASSETS / "tiny-llava-base"


# `mmtune demo --world N`: the fine-tuning recipe of each synthetic world version (docs/results.md)
WORLD_RECIPES = {2: "demo.yaml", 3: "demo_v3.yaml"}


def run_demo(args) -> int:
    """``mmtune demo``: fine-tune the tiny base with each method and seed, report S vs G.

    ``mmtune demo pretrain``: regenerate the tiny base from scratch (stage 1) into OUT/base.
    """
    from mmtune.config import load_config
    from mmtune.methods import METHODS
    from mmtune.report import to_markdown, write_report
    from mmtune.train import train

    overrides = list(args.overrides)
    pretrain_only = bool(overrides) and overrides[0] == "pretrain"
    if pretrain_only:
        overrides = overrides[1:]
    out = Path(args.out)
    common = [*quiet_when_logged(), f"data.synthetic.dir={out / 'synthetic'}", *overrides]
    if args.quick:
        common += ["data.synthetic.n_train=200", "data.synthetic.n_test=20", "eval.limit=20"]
    reuse = not pretrain_only and (out / "base" / "final" / "config.json").exists()
    if pretrain_only or (not args.base and not SHIPPED_BASE.exists() and not reuse):
        print(f"== stage 1: pre-training the tiny base into {out / 'base'}")
        pre = ["train.max_steps=20"] if args.quick else []
        train(load_config(CONFIGS / "demo_pretrain.yaml", [*common, f"train.output_dir={out / 'base'}", *pre]))
        base = out / "base" / "final"
        if pretrain_only:
            return 0
    else:
        base = Path(args.base) if args.base else (out / "base" / "final" if reuse else SHIPPED_BASE)
    print(f"== base model: {base}")
    recipe = CONFIGS / WORLD_RECIPES[args.world]
    methods = sorted(m for m in METHODS if not m.startswith("test_")) if args.methods == "all" \
        else args.methods.split(",")
    runs: list[Path] = []
    # The base is evaluated once per OUT folder (by the first run that needs it); later runs, in this call or
    # in another one over the same OUT, get a copy of its scores.
    base_scores = base_scores_in(out, base)
    for method in methods:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            run = out / f"{method.replace('+', '_')}-seed{seed}"
            if (run / "eval" / "final" / "scores.json").exists():
                print(f"== {run.name}: already done, reusing")
            else:
                print(f"== stage 2: {method}, seed {seed}")
                extra = ["train.max_steps=6"] if args.quick else []
                if base_scores is not None:
                    extra.append("eval.before=false")
                train(load_config(recipe, [*common, f"model.path={base}", f"method.name={method}",
                                                          f"train.seed={seed}", f"train.output_dir={run}",
                                                          "train.overwrite=true", *extra]))
                if base_scores is not None:
                    (run / "eval" / "base").mkdir(parents=True, exist_ok=True)
                    shutil.copy(base_scores, run / "eval" / "base" / "scores.json")
            if base_scores is None and (run / "eval" / "base" / "scores.json").exists():
                base_scores = run / "eval" / "base" / "scores.json"
            runs.append(run)
    if args.merge:
        runs += demo_merges(out, base, common, args)
    report = write_report(runs, out / "report")
    print(to_markdown(report))
    print(f"report: {out / 'report' / 'report.md'} (+ tasks.png, s_vs_g.png)")
    return 0


def demo_merges(out: Path, base: Path, common: list[str], args) -> list[Path]:
    """``mmtune demo --merge``: per seed, one vanilla run per downstream task of the demo's mix (same recipe), merged
    onto the base with each rule of ``DEMO_MERGES`` and evaluated like the joint runs; returns the evaluation folders
    (rows of the same report). Finished pieces are reused, so an interrupted call picks up where it stopped."""
    import dataclasses
    import json

    from mmtune.config import load_config
    from mmtune.data.synthetic import ensure_world
    from mmtune.evaluate import run_evaluation
    from mmtune.files import atomic_write
    from mmtune.merging import DEMO_MERGES, merge_folders
    from mmtune.models.load import load_model
    from mmtune.train import train

    recipe = CONFIGS / WORLD_RECIPES[args.world]
    demo = load_config(recipe, [*common, f"model.path={base}"])
    world = Path(demo.data.synthetic.dir)
    ensure_world(world, seed=demo.data.synthetic.seed, n_train=demo.data.synthetic.n_train,
                 n_test=demo.data.synthetic.n_test, image_size=demo.data.synthetic.image_size, progress=False,
                 version=demo.data.synthetic.version, caption_errors=demo.data.synthetic.caption_errors)
    base_scores = base_scores_in(out, base)
    folder, evaluations = out / "merge", []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        single_runs = []
        for task in demo.data.tasks:
            name = task.path.split(":")[-1]
            run = folder / f"{name}-seed{seed}"
            single_runs.append(run)
            if (run / "final" / "config.json").exists():
                print(f"== {run.name}: already trained, reusing")
                continue
            print(f"== merge, stage 1: {name} alone, seed {seed}")
            extra = ["train.max_steps=6"] if args.quick else []
            train(load_config(recipe, [
                *common, f"model.path={base}", f"data.tasks=[{{path: '{task.path}', n: {task.n}}}]",
                f"train.seed={seed}", f"train.output_dir={run}", "train.overwrite=true", "eval.downstream=[]",
                "eval.heldout=[]", *extra]))
        if base_scores is None:  # no joint run evaluated the base in OUT: evaluate it once here
            model, processor = load_model(base)
            run_evaluation(model, processor, demo, world, folder / "base-eval")
            base_scores = folder / "base-eval" / "scores.json"
        for rule, recipe in DEMO_MERGES.items():
            merged, evaluation = folder / f"{rule}-seed{seed}", folder / f"{rule}-seed{seed}-eval"
            evaluations.append(evaluation)
            if (evaluation / "eval_info.json").exists():
                print(f"== {evaluation.name}: already done, reusing")
                continue
            print(f"== merge, stage 2: {rule}, seed {seed}")
            if merged.exists():  # a merge left by an interrupted call (the merge itself writes atomically)
                shutil.rmtree(merged)
            merge_folders(base, [r / "final" for r in single_runs], merged, dataclasses.replace(recipe, seed=seed))
            model, processor = load_model(merged)
            run_evaluation(model, processor, demo, world, evaluation)
            info = {"label": f"merge: {rule}", "model": str(merged.resolve()), "base_scores": str(base_scores.resolve()),
                    "eval": {"max_new_tokens": demo.eval.max_new_tokens, "limit": demo.eval.limit}}
            atomic_write(evaluation / "eval_info.json", json.dumps(info, indent=2) + "\n")
    return evaluations


def base_scores_in(out: Path, base: Path) -> Path | None:
    """The base model's evaluation made by a demo run in ``out`` fine-tuned from ``base``, if any (the base is evaluated
    once per OUT folder; later runs and merges reuse it)."""
    return next((found for found in sorted(out.glob("*/eval/base/scores.json")) if same_base(found.parents[2], base)),
                None)


def same_base(run: Path, base: Path) -> bool:
    """Whether ``run`` (a demo run folder) was fine-tuned from ``base``."""
    import yaml

    config = run / "config.yaml"
    if not config.is_file():
        return False
    path = (yaml.safe_load(config.read_text()) or {}).get("model", {}).get("path", "")
    return bool(path) and Path(path).resolve() == Path(base).resolve()
