"""The ``mmtune`` command: train | eval | score | report | data | demo | merge | ls."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_train(args) -> int:
    from mmtune.config import load_config
    from mmtune.train import train

    config = load_config(args.config, args.overrides)
    train(config)
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
        from mmtune.data.synthetic import DOWNSTREAM_CHOICE, DOWNSTREAM_OPEN, PRETRAIN_FAMILIES

        print("pre-training / held-out:", ", ".join(PRETRAIN_FAMILIES))
        print("downstream open-response:", ", ".join(DOWNSTREAM_OPEN))
        print("downstream fixed-choice:", ", ".join(DOWNSTREAM_CHOICE))
    elif args.what == "architectures":
        from mmtune.models.scope import LAYOUTS

        for name, layout in LAYOUTS.items():
            print(f"{name:<12} vision={layout.vision}  projector={layout.projector}  blocks={layout.blocks}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune a model from a YAML config (+ key=value overrides)")
    train.add_argument("--config", required=True, help="YAML run config, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.name=nrca train.seed=1")
    train.set_defaults(func=cmd_train)

    ls = sub.add_parser("ls", help="list registered methods, synthetic task families or architectures")
    ls.add_argument("what", choices=["methods", "families", "architectures"])
    ls.set_defaults(func=cmd_ls)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mmtune.config import ConfigError
    from mmtune.data.records import RecordError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, RecordError, FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"mmtune: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
