"""Command-line options generated from a frozen config dataclass, so defaults live in one place."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
import types
import typing
from typing import Any


def _base_type(annotation: Any) -> type:
    """`int | None` -> int; `str` -> str (annotations arrive as strings under `from __future__`)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {}, {})  # noqa: S307 - our own dataclass annotations
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return args[0]
    return annotation


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, required: tuple[str, ...] = (),
                            skip: tuple[str, ...] = (), help: dict[str, str] | None = None) -> None:
    """One `--field-name` option per field of `cls`; booleans become `--flag/--no-flag`."""
    help = help or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(f.type)
        default = None if f.default is dataclasses.MISSING else f.default
        text = help.get(f.name, "") + (f" (default: {default})" if default is not None else "")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=default, required=f.name in required,
                                help=text, metavar=f.name.upper())


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def resolve_paths(config, fields: tuple[str, ...]):
    """`config` with its path fields made absolute: Ray workers run in other directories and on other nodes."""
    changes = {name: str(Path(getattr(config, name)).resolve()) for name in fields if getattr(config, name) is not None}
    return dataclasses.replace(config, **changes)
