"""Typed settings from untyped values: command-line options generated from a frozen config dataclass (so
defaults live in one place), and a spec's mapping checked against the same dataclasses' annotations.

    add_dataclass_arguments / dataclass_from_args   the CLI side
    check_value / split_section / construct         the YAML side (pipeline specs, sweep spaces)
    resolve_paths                                   path fields made absolute
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from bert.errors import InputError


def _base_type(annotation: Any) -> tuple[type, tuple[Any, ...] | None]:
    """(type, choices): `int | None` -> (int, None); `Literal["a", "b"]` -> (str, ("a", "b"))."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = [a for a in typing.get_args(annotation) if a is not type(None)][0]
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices
    return annotation, None


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, required: tuple[str, ...] = (),
                            skip: tuple[str, ...] = (), help: dict[str, str] | None = None) -> None:
    """One `--field-name` option per field of `cls`; booleans become `--flag/--no-flag`."""
    help = help or {}
    hints = type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind, choices = _base_type(hints[f.name])
        default = None if f.default is dataclasses.MISSING else f.default
        text = help.get(f.name, "") + (f" (default: {default})" if default is not None else "")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=default, required=f.name in required,
                                help=text, metavar=f.name.upper() if choices is None else None, choices=choices)


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def resolve_paths(config, fields: tuple[str, ...]):
    """`config` with its local path fields made absolute (Ray workers run in other directories and on other
    nodes); object-store URIs (`s3://...`, `bert.storage`) are left as they are."""
    from bert import storage

    changes = {name: str(storage.local_path(value).resolve()) for name in fields
               if (value := getattr(config, name)) is not None and not storage.is_remote(value)}
    return dataclasses.replace(config, **changes)


# ----------------------------------------------------------------------------- typed config sections


def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_value(value: Any, annotation: Any, where: str) -> Any:
    """Check (and lightly coerce: int -> float, list -> tuple) `value` against a type annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return check_value(value, option, where)
            except InputError as exc:
                errors.append(str(exc))
        raise InputError(f"{where}: expected {_type_name(annotation)}, got {value!r}")
    if origin in (tuple, list, Sequence, typing.Sequence) or annotation in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where}: expected a list ({_type_name(annotation)}), got {value!r}")
        item = args[0] if args else Any
        return tuple(check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping, typing.Mapping) or annotation is dict:
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a mapping, got {value!r}")
        value_type = args[1] if len(args) == 2 else Any
        return {str(k): check_value(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
            return float(value)  # YAML 1.1 reads 3e-5 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if origin is typing.Literal:
        if value not in args:
            raise InputError(f"{where}: expected one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise InputError(f"{where}: expected a string, got {value!r}")
        return value
    raise InputError(f"{where}: unsupported setting type {annotation!r}")


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def split_section(section: Mapping[str, Any], parts: Sequence[type], where: str,
                  allowed_extra: Mapping[str, Any] | None = None, excluded: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Route a flat config mapping to several dataclasses by field name, checking types.

    Returns one dict of checked values per dataclass (in `parts` order); a field two of them
    have goes to the first. `excluded` fields of the wrapped dataclasses (all but the first of
    several parts, or the only one) are ones the stage sets itself (upstream dirs, tracking);
    naming them is an error unless the first part owns them.
    """
    owners: dict[str, int] = {}
    hints = []
    for i, cls in enumerate(parts):
        h = type_hints(cls)
        hints.append(h)
        wrapped = i > 0 or len(parts) == 1
        for f in dataclasses.fields(cls):
            if not (wrapped and f.name in excluded):
                owners.setdefault(f.name, i)
    values: list[dict[str, Any]] = [{} for _ in parts]
    for key, value in section.items():
        if key in excluded and key not in owners:
            raise InputError(f"{where}: {key!r} is set by the pipeline (from the stage's inputs), not in the spec")
        if key not in owners:
            known = sorted(owners)
            raise InputError(f"{where}: unknown setting {key!r}; known settings: {', '.join(known)}")
        i = owners[key]
        values[i][key] = check_value(value, hints[i][key], f"{where}.{key}")
    return values


def check_choices(config: Any, where: str) -> None:
    """Every field of `config` annotated `Literal[...]` (or `Literal[...] | None`) holds one of its values."""
    for name, hint in type_hints(type(config)).items():
        options = [hint] if typing.get_origin(hint) is typing.Literal else [
            a for a in typing.get_args(hint) if typing.get_origin(a) is typing.Literal]
        value = getattr(config, name, None)
        if options and value is not None and value not in typing.get_args(options[0]):
            known = ", ".join(map(str, typing.get_args(options[0])))
            raise InputError(f"{where}: unknown {name} {value!r}; known: {known}")


def construct(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """`cls(**values)`, its own checks' errors prefixed with where the values came from."""
    try:
        return cls(**values)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
