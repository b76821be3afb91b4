"""The ``mmtune`` command: train | eval | score | report | data | demo | merge | ls."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mmtune.config import DTYPES
from mmtune.demo import CONFIGS, WORLD_RECIPES, quiet_when_logged  # noqa: F401 — public here too

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_train(args) -> int:
    from mmtune.config import load_config
    from mmtune.train import train

    config = load_config(args.config, [*quiet_when_logged(), *args.overrides])
    train(config)
    return 0


def cmd_estimate(args) -> int:
    from mmtune.config import load_config
    from mmtune.estimate import describe, estimate, fits

    config = load_config(args.config, args.overrides)
    result = estimate(config, args.engine, args.gpus, args.seq_len, args.architecture, args.target_tokens)
    print(describe(result, args.gpu_memory))
    return 0 if args.gpu_memory is None or fits(result, args.gpu_memory) else 1


def cmd_eval(args) -> int:
    import json
    from pathlib import Path

    from mmtune.config import TaskSpec
    from mmtune.data.registry import load_registry
    from mmtune.data.synthetic import SYNTHETIC_PREFIX, resolve_task_path
    from mmtune.evaluate import evaluate
    from mmtune.files import atomic_write
    from mmtune.models.load import load_model

    synthetic = [p for p in [*args.tasks, *args.heldout] if p.startswith(SYNTHETIC_PREFIX)]
    if synthetic and not args.world:
        raise ValueError(f"{synthetic[0]}: synthetic tasks need --world DIR (a generated world, e.g. runs/demo/"
                         "synthetic, or `mmtune data synth --out DIR`)")
    world = Path(args.world) if args.world else None
    if world is not None and not (world / "world.json").exists():
        raise FileNotFoundError(f"--world {world}: no world.json (generate one with `mmtune data synth --out {world}`)")
    metrics = source_metrics(args.metric, [*args.tasks, *args.heldout])
    sides = {"downstream": [TaskSpec(path=p, metric=metrics.get(p)) for p in args.tasks],
             "heldout": [TaskSpec(path=p, metric=metrics.get(p)) for p in args.heldout]}
    out = Path(args.out or Path(args.model) / "eval")
    if args.sample_temperature is not None and args.sample_temperature <= 0:
        raise ValueError(f"--sample-temperature {args.sample_temperature} must be > 0")
    model, processor = load_model(args.model, args.dtype)
    sources = {"resolve": lambda p: resolve_task_path(p, world, "test"),
               "registry": load_registry(args.registry) if args.registry else None}
    results = evaluate(model, processor, sides, out, args.batch_size, args.max_new_tokens, args.limit,
                       overwrite=args.overwrite, sample_temperature=args.sample_temperature,
                       sample_seed=args.sample_seed, sources=sources, say=print)
    # What `mmtune report` needs to put this evaluation in a table (a row labelled --label).
    info = {"label": args.label or Path(args.model).resolve().name, "model": str(Path(args.model).resolve()),
            "eval": {"max_new_tokens": args.max_new_tokens, "limit": args.limit,
                     "sample_temperature": args.sample_temperature, "sample_seed": args.sample_seed}}
    if args.base_scores:  # the base model's evaluation (same tasks, same settings): normalised columns in reports
        info["base_scores"] = str(Path(args.base_scores).resolve())
    atomic_write(out / "eval_info.json", json.dumps(info, indent=2) + "\n")
    for task, result in results["tasks"].items():
        sampled = f", sampled {result['sampled_score']:.2f}" if "sampled_score" in result else ""
        print(f"{task:<24} {result['metric']:<6} {result['score']:7.2f}  (n={result['n']}, {result['side']}{sampled})")
    print(f"wrote {out / 'scores.json'} and {out / 'predictions'}/")
    return 0


def source_metrics(pairs: list[str], sources: list[str]) -> dict[str, str]:
    """``--metric SOURCE=METRIC`` pairs as ``{source: metric}``; each source must be one of the evaluated ones."""
    from mmtune.config import METRICS

    metrics = {}
    for pair in pairs:
        source, _, metric = pair.rpartition("=")
        if not source or metric not in METRICS:
            raise ValueError(f"--metric {pair!r}: expected SOURCE=METRIC with METRIC one of {', '.join(METRICS)}")
        if source not in sources:
            raise ValueError(f"--metric {pair!r}: {source} is not among --tasks / --heldout ({', '.join(sources)})")
        metrics[source] = metric
    return metrics


def cmd_infer(args) -> int:
    """``mmtune infer``: answer one prompt about one image, or every record of a task file (→ JSONL)."""
    import json

    import torch

    from mmtune.data.records import Record, check_image, read_records
    from mmtune.evaluate import generate
    from mmtune.files import atomic_write
    from mmtune.models.load import load_model

    if bool(args.tasks) == bool(args.image or args.prompt):
        raise ValueError("give --image and --prompt, or --tasks FILE (not both)")
    if args.image and not args.prompt or args.prompt and not args.image:
        raise ValueError("--image and --prompt go together")
    if args.image:
        check_image(args.image)
        records = [Record(id="prompt", task="infer", kind="open", image=args.image, prompt=args.prompt,
                          answers=["-"])]
    else:
        records = read_records(args.tasks)
        if args.limit:
            records = records[:args.limit]
    sampling = None
    if args.sample:
        torch.manual_seed(args.seed)
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    model, processor = load_model(args.model, args.dtype)
    answers = generate(model, processor, records, args.batch_size, args.max_new_tokens,
                       progress=args.tasks is not None and sys.stderr.isatty(), desc="infer", sampling=sampling)
    if args.image:
        print(answers[0])
        return 0
    out = Path(args.out or Path(args.tasks).with_suffix(".predictions.jsonl"))
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite")
    lines = [json.dumps({"id": r.id, "task": r.task, "prompt": r.prompt, "prediction": a, "answers": r.answers,
                         "choices": r.choices, "answer_index": r.answer_index}) + "\n"
             for r, a in zip(records, answers, strict=True)]
    atomic_write(out, "".join(lines))
    print(f"wrote {len(lines)} predictions to {out} (score them with: mmtune score --predictions {out} --metric …)")
    return 0


def read_predictions(path: str, metric: str | None) -> tuple[list[dict], str]:
    """Predictions JSONL for ``mmtune score`` and the metric to score them with (``metric``, or else the one
    ``mmtune eval`` wrote into every line): every problem names the line; nothing is silently dropped."""
    import json

    from mmtune.metrics import check_item

    lines, seen = [], set()
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{where}: not UTF-8 text ({error})") from None
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: malformed JSON ({error})") from None
            if not isinstance(item, dict) or "id" not in item:
                raise ValueError(f"{where}: each line needs an 'id'")
            if str(item["id"]) in seen:
                raise ValueError(f"{where}: duplicate id {item['id']!r}")
            seen.add(str(item["id"]))
            lines.append((where, item))
    if metric is None:
        metrics = {item.get("metric") for _, item in lines}
        if len(metrics) != 1 or None in metrics:
            raise ValueError(f"{path}: its lines name no single metric ({sorted(map(str, metrics))}); pass --metric")
        metric = metrics.pop()
    for where, item in lines:
        if metric == "mc":
            item.setdefault("answers", [])
        try:
            check_item(item, metric)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        item["id"] = str(item["id"])
    return [item for _, item in lines], metric


def cmd_score(args) -> int:
    import json

    from mmtune.metrics import score

    items, metric = read_predictions(args.predictions, args.metric)
    result = score(metric, items, meteor=args.meteor)
    summary = result.as_dict()
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def cmd_report(args) -> int:
    from pathlib import Path

    from mmtune.report import to_markdown, write_report

    out = Path(args.out or "report")
    report = write_report(args.runs, out, allow_mixed=args.allow_mixed, lmms_eval=args.lmms_eval,
                          reference_step=args.reference_step)
    print(to_markdown(report))
    print(f"wrote {out}/report.md, report.json, tasks.png, s_vs_g.png")
    return 0


def cmd_demo(args) -> int:
    """``mmtune demo`` (``mmtune.demo``): every method and seed on the synthetic world, then the report."""
    from mmtune.demo import run_demo

    return run_demo(args)


def cmd_data(args) -> int:
    from collections import Counter
    from pathlib import Path

    from mmtune.data.records import read_records, write_records

    if args.data_command == "prepare":
        from mmtune.data.formats import prepare

        options = {k: v for k, v in {"images": args.images, "questions": args.questions,
                                     "annotations": args.annotations, "file": args.file,
                                     "restval": not args.no_restval}.items() if v is not None}
        records, skipped = prepare(args.format, args.root, args.split, args.limit, args.seed,
                                   args.skip_bad_records, args.prompt, **options)
        count = write_records(records, args.out, overwrite=args.overwrite)
        print(f"wrote {count} records to {args.out}" + (f"; skipped {len(skipped)} bad records" if skipped else ""))
        for problem in skipped[:10]:
            print(f"  skipped: {problem}")
        return 0
    if args.data_command == "export-llava":
        from mmtune.data.formats.llava import export

        records = [r for path in args.files for r in read_records(path)]
        count = export(records, args.out, args.image_root, args.overwrite)
        print(f"wrote {count} conversations to {args.out}")
        return 0
    if args.data_command == "preview":
        from mmtune.config import load_config
        from mmtune.preview import preview

        if args.count < 1:
            raise ValueError(f"--count {args.count} must be ≥ 1")
        print(preview(load_config(args.config, args.overrides), args.count))
        return 0
    if args.data_command == "stats":
        for path in args.files:
            records = read_records(path, check_images=False)
            print(f"{path}: {len(records)} records")
            for (task, kind), n in sorted(Counter((r.task, r.kind) for r in records).items()):
                lengths = sorted(len(r.target.split()) for r in records if r.task == task)
                refs = sum(len(r.answers) for r in records if r.task == task) / n
                print(f"  {task:<20} {kind:<7} {n:>8} records  answer words: min {lengths[0]}, "
                      f"median {lengths[len(lengths) // 2]}, max {lengths[-1]}; {refs:.1f} references/record")
        return 0
    if args.data_command == "synth":
        from mmtune.data.synthetic import generate_world

        files = generate_world(Path(args.out), args.seed, args.n_train, args.n_test, args.image_size,
                               overwrite=args.overwrite, version=args.version)
        print(f"wrote {len(files)} families x (train, test) to {args.out}")
        return 0
    raise AssertionError(args.data_command)


def cmd_merge(args) -> int:
    """``mmtune merge RUN --alpha A``: WiSE-FT of one run with its base. ``mmtune merge RUN... --rule R --out DIR``:
    several runs (or model folders) of one base merged by task arithmetic / TIES / Breadcrumbs (± DARE)."""
    if args.rule:
        return merge_runs(args)
    if len(args.run) != 1 or args.alpha is None:
        raise ValueError("WiSE-FT merges one run with --alpha A; several runs need --rule "
                         "(task_arithmetic | ties | breadcrumbs)")
    args.run = args.run[0]
    from mmtune.config import load_config
    from mmtune.methods.wise_ft import interpolate
    from mmtune.models.base_model import load_base
    from mmtune.models.load import load_model
    from mmtune.models.save import write_model_folder

    run = Path(args.run)
    if not (run / "final" / "config.json").exists() or not (run / "config.yaml").exists():
        raise FileNotFoundError(f"{run} is not a finished mmtune run (needs config.yaml and final/)")
    out = Path(args.out) if args.out else run / f"merged-alpha{args.alpha:g}"
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    run_config = load_config(run / "config.yaml")
    base, _ = load_base(run_config)
    final, processor = load_model(run / "final")
    base_state = base.state_dict()
    merged = {k: interpolate(base_state[k], v, args.alpha) if v.is_floating_point() else v
              for k, v in final.state_dict().items()}
    final.load_state_dict(merged)
    write_model_folder(final, processor, out, run_config=run_config, overwrite=args.overwrite)
    print(f"wrote {out} (alpha={args.alpha})")
    return 0


def merge_runs(args) -> int:
    from tqdm import tqdm

    from mmtune.config import load_config
    from mmtune.merging import MergeRecipe, merge_folders

    models = [Path(r) / "final" if (Path(r) / "final" / "config.json").exists() else Path(r) for r in args.run]
    for folder in models:
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder}: neither a finished run (RUN/final) nor a model folder")
    base = Path(args.base) if args.base else None
    if base is None:
        run_config = Path(args.run[0]) / "config.yaml"
        path = load_config(run_config).model.path if run_config.exists() else ""
        if not path:
            raise ValueError(f"{args.run[0]}: can't tell its base model (no config.yaml with model.path); pass --base")
        base = Path(path)
    if not args.out:
        raise ValueError("--out names the merged model's folder")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    recipe = MergeRecipe(rule=args.rule, lam=args.lam, density=args.density, beta=args.beta, gamma=args.gamma,
                         dare_p=args.dare_p, seed=args.seed)
    with tqdm(desc=f"merge ({args.rule})", unit="tensor", disable=not sys.stderr.isatty()) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        merge_folders(base, models, out, recipe, progress=progress)
    print(f"wrote {out} ({args.rule} of {len(models)} models on {base}; recipe in {out / 'merge_recipe.json'})")
    return 0


def cmd_config(args) -> int:
    """``mmtune config show CONFIG [overrides]`` (the resolved config) | ``mmtune config keys`` (every key)."""
    from mmtune.config import describe_keys, load_config, to_dict

    if args.config_command == "show":
        import yaml

        print(yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
        return 0
    rows = describe_keys()
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for key, kind, default, meaning in rows:
        print(f"{key:<{widths[0]}}  {kind:<{widths[1]}}  {default:<{widths[2]}}  {meaning}")
    return 0


def cmd_ls(args) -> int:
    if args.what == "methods":
        from mmtune.methods import METHODS
        from mmtune.methods.base import describe_config

        width = max(len(n) for n in METHODS)
        for name in sorted(METHODS):
            cls = METHODS[name]
            print(f"{name:<{width}}  {cls.description}")
            print(f"{'':<{width}}  options: {describe_config(cls)}")
    elif args.what == "families":
        from mmtune.data.synthetic import (
            DOWNSTREAM_CHOICE,
            DOWNSTREAM_OPEN,
            HELDOUT_FAMILIES,
            PRETRAIN_ONLY,
            WORLD_VERSION,
            WORLD_VERSIONS,
        )

        print(f"synthetic world, version {WORLD_VERSION} by default (data.synthetic.version: "
              f"{' | '.join(map(str, WORLD_VERSIONS))}; v3 changes only detailed_caption)")
        print("pre-training and held-out:", ", ".join(HELDOUT_FAMILIES))
        print("pre-training only (a small share):", ", ".join(PRETRAIN_ONLY), "(+ a little detailed_caption)")
        print("downstream open-response:", ", ".join(DOWNSTREAM_OPEN))
        print("downstream fixed-choice:", ", ".join(DOWNSTREAM_CHOICE))
    elif args.what == "architectures":
        from mmtune.models.scope import reference_scopes

        print("architecture     layout      parameters  trainable (projector + last 2 blocks)  vision / projector / "
              "blocks (reference config: transformers' default of the type, built on the meta device)")
        for row in reference_scopes():
            layout = row["layout"]
            print(f"{row['name']:<16} {row['source']:<10} {row['parameters'] / 1e9:>8.2f}B  "
                  f"{row['trainable'] / 1e6:>9.1f}M  {layout.vision} / {' + '.join(layout.projectors)} / {layout.blocks} "
                  f"({row['blocks']})")
    return 0


def _add_training_commands(sub) -> None:
    """``mmtune train``, ``mmtune estimate``."""
    train = sub.add_parser("train", help="fine-tune a model from a YAML config (+ key=value overrides)")
    train.add_argument("--config", required=True, help="YAML run config, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.name=nrca train.seed=1")
    train.set_defaults(func=cmd_train)

    est = sub.add_parser("estimate", help="memory per device of a run (model built on the meta device: no GPU, no "
                                          "weights); exit 1 when it does not fit --gpu-memory")
    est.add_argument("--config", required=True, help="YAML run config, e.g. configs/papers/spider_llava15_coco_iconqa.yaml")
    est.add_argument("--gpus", type=int, default=1, help="devices the run is spread over (default 1)")
    est.add_argument("--gpu-memory", type=float, help="memory of one device in GB: say whether the run fits")
    est.add_argument("--engine", default="ddp", help="ddp (default) | fsdp2 | zero2 | zero3")
    est.add_argument("--seq-len", type=int, help="tokens per sample (default data.max_length, the worst case)")
    est.add_argument("--target-tokens", type=int, help="answer tokens per sample, where train.target_logits computes "
                                                       "the logits (default 64)")
    est.add_argument("--architecture", help="when model.path is not here: the architecture's reference shape "
                                            "(llava = LLaVA-1.5-7B; qwen2_vl-2b, qwen2_vl-7b: the released sizes; "
                                            "qwen2_vl, idefics3: transformers' default shapes)")
    est.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.batch_size=1")
    est.set_defaults(func=cmd_estimate)


def _add_evaluation_commands(sub) -> None:
    """``mmtune eval``, ``infer``, ``score``, ``report``."""
    ev = sub.add_parser("eval", help="batched greedy generation + metrics on task files")
    ev.add_argument("--model", required=True, help="a local Hugging Face model folder (e.g. RUN/final)")
    ev.add_argument("--tasks", nargs="+", required=True,
                    help="task sources to evaluate: task files, conversation files, saved HF datasets, "
                         "synthetic:<family> (with --world) or dataset:<name> (with --registry)")
    ev.add_argument("--heldout", nargs="*", default=[], help="task sources counted as held-out (generalization)")
    ev.add_argument("--metric", nargs="*", default=[], metavar="SOURCE=METRIC",
                    help="how a source is scored (cider | vqa | mc | exact), e.g. data/chart.jsonl=exact; "
                         "default: its records' own, else the rule printed for each task")
    ev.add_argument("--registry", help="a dataset registry (dataset_info.json style) for dataset:<name> sources")
    ev.add_argument("--out", help="output folder (default: MODEL/eval)")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--max-new-tokens", type=int, default=128)
    ev.add_argument("--limit", type=int, help="at most this many records per task")
    ev.add_argument("--dtype", default="fp32", choices=DTYPES)
    ev.add_argument("--overwrite", action="store_true", help="replace an existing scores.json in --out")
    ev.add_argument("--sample-temperature", type=float,
                    help="also score open-response (CIDEr) tasks on answers sampled at this temperature "
                         "(sampled_score): confidence in wrong words shows there, not in greedy answers")
    ev.add_argument("--sample-seed", type=int, default=0, help="the sampling's seed (same seed, same draws)")
    ev.add_argument("--label", help="the row's name in `mmtune report` (default: the model folder's name)")
    ev.add_argument("--world", help="the synthetic world folder, for synthetic:<family> tasks")
    ev.add_argument("--base-scores", help="the base model's scores.json on the same tasks (e.g. RUN/eval/base/"
                                          "scores.json): `mmtune report` then normalises this row to it")
    ev.set_defaults(func=cmd_eval)

    inf = sub.add_parser("infer", help="answer a prompt about an image, or every record of a task file")
    inf.add_argument("--model", required=True, help="a local Hugging Face model folder (e.g. RUN/final)")
    inf.add_argument("--image", help="an image file (with --prompt)")
    inf.add_argument("--prompt", help="the question or instruction (with --image)")
    inf.add_argument("--tasks", help="a task file (JSONL records): predictions for every record")
    inf.add_argument("--out", help="predictions JSONL (default: TASKS with .predictions.jsonl)")
    inf.add_argument("--limit", type=int, help="at most this many records")
    inf.add_argument("--max-new-tokens", type=int, default=128)
    inf.add_argument("--batch-size", type=int, default=16)
    inf.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    inf.add_argument("--temperature", type=float, default=0.7)
    inf.add_argument("--top-p", type=float, default=0.9)
    inf.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    inf.add_argument("--dtype", default="fp32", choices=DTYPES)
    inf.add_argument("--overwrite", action="store_true")
    inf.set_defaults(func=cmd_infer)

    sc = sub.add_parser("score", help="score predictions produced anywhere (JSONL: id, prediction, answers)")
    sc.add_argument("--metric", choices=["cider", "vqa", "mc", "exact"],
                    help="default: the metric `mmtune eval` wrote into the prediction lines")
    sc.add_argument("--predictions", required=True, help="JSONL lines {id, prediction, answers[, choices, answer_index]}")
    sc.add_argument("--json", action="store_true", help="print the result as one JSON object (last line)")
    sc.add_argument("--meteor", action="store_true", help="also compute METEOR for cider (needs Java)")
    sc.set_defaults(func=cmd_score)

    rp = sub.add_parser("report", help="one S/G/H table (+ plots) for several runs")
    rp.add_argument("runs", nargs="+", help="run folders (each with eval/final/scores.json)")
    rp.add_argument("--out", help="output folder (default: ./report)")
    rp.add_argument("--allow-mixed", action="store_true",
                    help="put runs with different bases, tasks or evaluation settings in one table anyway")
    rp.add_argument("--lmms-eval", nargs="+", metavar="RESULTS_JSON",
                    help="lmms-eval results files of the runs' final/ models and of their base model: each metric "
                         "becomes a held-out column (docs/eval.md)")
    rp.add_argument("--reference-step", type=int, metavar="STEP",
                    help="the overfitting test compares this evaluation step, fixed in advance (e.g. the end of the "
                         "first epoch), with the end (default: the runs' eval.overfit_reference_step, else the largest "
                         "fall over all steps, which needs ≥ 5 seeds)")
    rp.set_defaults(func=cmd_report)


def _add_demo_command(sub) -> None:
    """``mmtune demo``."""
    demo = sub.add_parser("demo", help="the papers' experiment in miniature on the synthetic world (CPU, minutes)")
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--methods", default="vanilla,nrca,spider", help="comma-separated methods, or 'all'")
    demo.add_argument("--merge", action="store_true",
                      help="also train one run per downstream task, merge them with each rule (task arithmetic, "
                           "TIES, Breadcrumbs, DARE) and report the merged models beside the joint runs")
    demo.add_argument("--seeds", type=int, default=1, help="repeats per method (report shows mean ± std)")
    demo.add_argument("--first-seed", type=int, default=0,
                      help="seeds run are FIRST_SEED … FIRST_SEED+SEEDS-1 (split one sweep over several processes)")
    demo.add_argument("--world", type=int, choices=sorted(WORLD_RECIPES), default=2,
                      help="synthetic world version: 2 (configs/demo.yaml) or 3 (configs/demo_v3.yaml: a small, "
                           "partly wrong caption set repeated; its calibration: docs/results.md)")
    demo.add_argument("--base", help="start from this model folder (default: the shipped assets/tiny-llava-base)")
    demo.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tests)")
    demo.add_argument("overrides", nargs="*",
                      help="key=value overrides for every run; 'mmtune demo pretrain' regenerates the base instead")
    demo.set_defaults(func=cmd_demo)


def _add_data_command(sub) -> None:
    """``mmtune data prepare | export-llava | stats | synth``."""
    data = sub.add_parser("data", help="prepare task files from public datasets, export, stats, synthetic world")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    from mmtune.data.formats import FORMAT_NAMES, get_format

    layouts = "\n\n".join(f"{name} (splits: {get_format(name).splits}):\n{get_format(name).layout}"
                           for name in FORMAT_NAMES)
    prep = data_sub.add_parser("prepare", help="convert a public dataset's native layout to a task file",
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog="Formats and the layout each expects under --root:\n\n" + layouts)
    prep.add_argument("format", choices=FORMAT_NAMES)
    prep.add_argument("--root", required=True, help="the dataset's folder as downloaded")
    prep.add_argument("--split", default="train")
    prep.add_argument("--out", required=True, help="task file to write (JSONL)")
    prep.add_argument("--limit", type=int, help="draw this many records at random (the papers: 10000)")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--prompt", help="replace every record's prompt (default: the LLaVA-1.5 conventions)")
    prep.add_argument("--images", help="image folder, when not where the layout expects it")
    prep.add_argument("--questions", help="okvqa: questions file")
    prep.add_argument("--annotations", help="okvqa: annotations file")
    prep.add_argument("--file", help="llava: the conversation JSON file name under --root")
    prep.add_argument("--no-restval", action="store_true", help="coco/flickr30k: train without restval")
    prep.add_argument("--skip-bad-records", action="store_true", help="skip (and count) missing images, duplicate ids")
    prep.add_argument("--overwrite", action="store_true")
    export = data_sub.add_parser("export-llava", help="write task files (a mix) as LLaVA conversation JSON")
    export.add_argument("files", nargs="+")
    export.add_argument("--out", required=True)
    export.add_argument("--image-root", help="image paths are written relative to this (default: the JSON's folder)")
    export.add_argument("--overwrite", action="store_true")
    preview = data_sub.add_parser("preview", help="training examples as the model sees them: chat template, image "
                                                  "tokens, which tokens are learned (no training)")
    preview.add_argument("--config", required=True, help="the run's YAML config")
    preview.add_argument("--count", type=int, default=1, help="examples per training task")
    preview.add_argument("overrides", nargs="*", help="key=value overrides, as for mmtune train")
    stats = data_sub.add_parser("stats", help="counts per task/kind and answer-length statistics")
    stats.add_argument("files", nargs="+")
    synth = data_sub.add_parser("synth", help="generate the synthetic world (task files + images)")
    synth.add_argument("--out", required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--n-train", type=int, default=1000)
    synth.add_argument("--n-test", type=int, default=200)
    synth.add_argument("--image-size", type=int, default=48)
    synth.add_argument("--version", type=int, default=2, help="world version: 2 (the demo's) or 3 (one partly "
                                                               "wrong caption per training image; docs/results.md)")
    synth.add_argument("--overwrite", action="store_true")
    data.set_defaults(func=cmd_data)


def _add_model_and_lookup_commands(sub) -> None:
    """``mmtune merge``, ``config``, ``ls``."""
    merge = sub.add_parser("merge", help="WiSE-FT of a run with its base (--alpha), or several runs of one base "
                                         "merged (--rule task_arithmetic | ties | breadcrumbs)")
    merge.add_argument("run", nargs="+", help="run folders (with config.yaml and final/) or model folders")
    merge.add_argument("--alpha", type=float, help="WiSE-FT: weight of the fine-tuned model (1 = unchanged)")
    merge.add_argument("--rule", help="merge several runs: task_arithmetic | ties | breadcrumbs (mmtune.merging.RULES)")
    merge.add_argument("--base", help="the base model folder (default: the first run's model.path)")
    merge.add_argument("--lam", type=float, default=1.0, help="scale of the merged task vector (default 1.0)")
    merge.add_argument("--density", type=float, default=0.2, help="TIES: fraction of each task vector kept")
    merge.add_argument("--beta", type=float, default=0.01, help="Breadcrumbs: largest fraction dropped")
    merge.add_argument("--gamma", type=float, default=0.85, help="Breadcrumbs: smallest fraction dropped")
    merge.add_argument("--dare-p", type=float, default=0.0, help="DARE pre-processing: drop rate (0: off)")
    merge.add_argument("--seed", type=int, default=0, help="DARE's randomness")
    merge.add_argument("--out", help="output model folder (WiSE-FT default: RUN/merged-alpha<A>; required otherwise)")
    merge.add_argument("--overwrite", action="store_true")
    merge.set_defaults(func=cmd_merge)

    config = sub.add_parser("config", help="show a resolved run config, or list every config key")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print CONFIG with its overrides applied and every default filled in")
    show.add_argument("config", help="YAML run config")
    show.add_argument("overrides", nargs="*", help="key=value overrides")
    config_sub.add_parser("keys", help="every key with its type, default and meaning")
    config.set_defaults(func=cmd_config)

    ls = sub.add_parser("ls", help="list registered methods, synthetic task families or architectures")
    ls.add_argument("what", choices=["methods", "families", "architectures"])
    ls.set_defaults(func=cmd_ls)


def build_parser() -> argparse.ArgumentParser:
    from mmtune import __version__

    parser = argparse.ArgumentParser(prog="mmtune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mmtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_training_commands, _add_evaluation_commands, _add_demo_command, _add_data_command,
                _add_model_and_lookup_commands):
        add(sub)
    return parser


def described(error: BaseException) -> str:
    """An error as the user reads it: a full disk that no writer named says so and where to look."""
    import errno

    from mmtune.errors import DiskFullError

    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT) and \
            not isinstance(error, DiskFullError):
        where = f" while writing {error.filename}" if error.filename else ""
        return (f"no space left on device{where} — free space where mmtune writes (train.output_dir, "
                "data.synthetic.dir, $MMTUNE_CACHE, the --out folder) and run the command again")
    if isinstance(error, DiskFullError) and error.strerror:
        return error.strerror  # it names what was being written; "[Errno 28]" adds nothing
    return str(error)


def main(argv: list[str] | None = None) -> int:
    from mmtune.config import ConfigError
    from mmtune.data.record import RecordError
    from mmtune.errors import (  # torch-free: a usage error is printed before torch is imported
        PREEMPTED_EXIT,
        CheckpointError,
        NonFiniteError,
        PeerLostError,
        Preempted,
        RunInUseError,
    )

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, RecordError, ValueError, OSError, CheckpointError, RunInUseError) as error:
        print(f"mmtune: error: {described(error)}", file=sys.stderr)
        return 2
    except NonFiniteError as error:
        print(f"mmtune: error: {error}", file=sys.stderr)
        return 3
    except Preempted as error:  # not an error: the run stopped where it can continue from
        print(f"mmtune: {error}", file=sys.stderr)
        return PREEMPTED_EXIT
    except PeerLostError as error:
        print(f"mmtune: error: {error}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:  # a second Ctrl-C in training, or one outside it: one line, not a traceback
        print("\nmmtune: aborted (Ctrl-C); a run continues from its last checkpoint with train.resume_from=latest",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
