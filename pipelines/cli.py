"""`bertflow` command line.

Each command group lives in its own module under `pipelines/commands/` and exposes
`register(subparsers)`; the module is imported only to build the parser, and heavy
dependencies (torch, ray, mlflow) are imported inside the handlers, so `bertflow --help`
stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bert.errors import BertflowError

# command name -> module that registers it (in the order `--help` lists them)
COMMAND_MODULES = (
    "pipelines.commands.convert",
    "pipelines.commands.tokenizer",
    "pipelines.commands.shards",
    "pipelines.commands.pretrain",
    "pipelines.commands.finetune",
    "pipelines.commands.sweep",
    "pipelines.commands.predict",
    "pipelines.commands.pipeline",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bertflow",
        description="BERT pretraining and fine-tuning as a distributed pipeline on Ray.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command group not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.handler(args)
    except BertflowError as exc:
        # Errors from bad input carry a message written for people; show it without a traceback.
        print(f"bertflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: outputs are written under temporary names or resumable checkpoints, so nothing
        # half-written is left under a final name; a re-run resumes or starts clean.
        print(f"bertflow {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
