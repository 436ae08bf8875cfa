"""Pipeline specs: YAML files naming stages, their inputs and their typed settings.

    name: quickstart
    workdir: out/quickstart          # relative to the current directory, or s3://bucket/prefix; --workdir overrides
    experiment: bertflow-quickstart  # MLflow experiment of the parent run and every stage run
    max_concurrent: 4                # stages running at once (Ray resources limit them too)
    max_retries: 1                   # default for every stage
    ray: {num_cpus: 4}               # only for a local Ray runtime (no RAY_ADDRESS)
    stages:
      tokenizer:                     # a stage name; its kind defaults to the name
        kind: tokenizer
        inputs: {corpus: corpus}     # input role -> upstream stage (a list: roles are the names)
        config: {vocab_size: 2048}   # typed by the kind's config dataclasses (pipelines/stages.py)
        max_retries: 2
        resources: {num_cpus: 1}

Everything is checked before anything runs: unknown top-level keys, stage keys, kinds, input
roles and config fields; value types against the dataclass annotations; the dataclasses' own
`__post_init__` checks; paths that must exist; unknown upstream stages and cycles.

`--set` overrides: `STAGE.FIELD=VALUE` (STAGE a stage name, or a kind for every stage of
that kind), `STAGE.max_retries=2`, `STAGE.inputs.ROLE=OTHER`, or a top-level key
(`workdir=/data/run`). Values are parsed as YAML (`3`, `1e-4`, `[1, 2]`, `true`, `null`).
Dotted paths go into nested mappings (`finetune.tasks.sst2.learning_rate=3e-5`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bert import storage
from bert.errors import InputError

TOP_LEVEL_KEYS = {
    "name": str,
    "description": str,
    "workdir": str,
    "experiment": str,
    "max_concurrent": int,
    "max_retries": int,
    "ray": dict,
    "stages": dict,
}
STAGE_KEYS = ("kind", "inputs", "config", "max_retries", "resources")


@dataclass(frozen=True)
class StageSpec:
    name: str
    kind: str
    inputs: Mapping[str, str]
    config: Mapping[str, Any]
    max_retries: int
    resources: Mapping[str, float] | None


@dataclass(frozen=True)
class Spec:
    path: Path
    name: str
    workdir: Path | str  # a local dir, or the URI of a prefix on an object store (s3://...)
    experiment: str
    max_concurrent: int
    ray: Mapping[str, Any]
    stages: Mapping[str, StageSpec]
    raw: Mapping[str, Any] = field(repr=False)  # the spec after overrides: the record of the run
    overrides: tuple[str, ...] = ()
    description: str = ""


# ----------------------------------------------------------------------------- loading


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice (PyYAML would silently keep the last)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (a stage defined twice, say)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise DuplicateKeyError(f"{line}: key {key!r} is given twice in the same mapping (first on line "
                                        f"{seen[key]}); YAML keeps only one of them: remove or rename one")
            seen.setdefault(key, line)
        return super().construct_mapping(node, deep=deep)


def load_spec(path: str | Path, overrides: Sequence[str] = (), workdir: str | None = None) -> Spec:
    """Read a spec file, apply `--set` overrides and `--workdir`, check its shape and types."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"spec file {path} does not exist")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # a SafeLoader
    except DuplicateKeyError as exc:
        raise InputError(f"{path}:{exc}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    for item in overrides:
        apply_override(raw, item, path)
    if workdir is not None:
        raw["workdir"] = workdir
    return _parse(raw, path, tuple(overrides))


def _parse(raw: dict[str, Any], path: Path, overrides: tuple[str, ...]) -> Spec:
    for key, value in raw.items():
        if key not in TOP_LEVEL_KEYS:
            raise InputError(f"{path}: unknown top-level key {key!r}; known keys: {', '.join(TOP_LEVEL_KEYS)}")
        if not isinstance(value, TOP_LEVEL_KEYS[key]) or isinstance(value, bool):
            raise InputError(f"{path}: {key} must be a {TOP_LEVEL_KEYS[key].__name__}, got {value!r}")
    for key in ("name", "workdir", "stages"):
        if key not in raw:
            raise InputError(f"{path}: missing top-level key {key!r}")
    default_retries = raw.get("max_retries", 0)
    stages: dict[str, StageSpec] = {}
    for name, entry in raw["stages"].items():
        where = f"{path}: stage {name}"
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected a mapping, got {entry!r}")
        for key in entry:
            if key not in STAGE_KEYS:
                raise InputError(f"{where}: unknown key {key!r}; a stage has {', '.join(STAGE_KEYS)}")
        inputs = entry.get("inputs") or {}
        if isinstance(inputs, list):
            inputs = {str(n): str(n) for n in inputs}
        if not isinstance(inputs, dict) or not all(isinstance(v, str) for v in inputs.values()):
            raise InputError(f"{where}: inputs must map input roles to stage names (or list stage names), got {inputs!r}")
        config = entry.get("config") or {}
        if not isinstance(config, dict):
            raise InputError(f"{where}: config must be a mapping, got {config!r}")
        retries = entry.get("max_retries", default_retries)
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise InputError(f"{where}: max_retries must be a non-negative integer, got {retries!r}")
        resources = entry.get("resources")
        if resources is not None and (not isinstance(resources, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in resources.values())):
            raise InputError(f"{where}: resources must map Ray resource names to non-negative numbers, got {resources!r}")
        stages[str(name)] = StageSpec(str(name), str(entry.get("kind", name)), dict(inputs), dict(config), retries,
                                      resources)
    max_concurrent = raw.get("max_concurrent", 4)
    if max_concurrent < 1:
        raise InputError(f"{path}: max_concurrent must be at least 1, got {max_concurrent}")
    workdir: Path | str = os.path.expandvars(os.path.expanduser(raw["workdir"]))
    if storage.is_remote(workdir):  # a prefix on an object store (pipelines/dag/graph.py): its lease is its lock
        if storage.scheme(workdir) not in ("s3", "s3a"):
            raise InputError(f"{path}: workdir {workdir}: a pipeline's workdir may be a local path or s3://... (its "
                             "one-writer lease needs S3's conditional PUT); nothing was written")
        workdir = workdir.rstrip("/")
        storage.resolve(workdir)  # a URI without a bucket: one line now
    else:
        workdir = storage.local_path(workdir).resolve()
    return Spec(
        path=path.resolve(),
        name=raw["name"],
        workdir=workdir,
        experiment=raw.get("experiment", f"bertflow-{raw['name']}"),
        max_concurrent=max_concurrent,
        ray=dict(raw.get("ray") or {}),
        stages=stages,
        raw=raw,
        overrides=overrides,
        description=raw.get("description", ""),
    )


def apply_override(raw: dict[str, Any], item: str, path: Path) -> None:
    """Apply one `KEY.PATH=VALUE` to the raw spec (see the module docstring)."""
    if "=" not in item:
        raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. pretrain.max_steps=100")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise InputError(f"--set {item!r}: empty key")
    if parts[0] in TOP_LEVEL_KEYS and parts[0] != "stages":
        if len(parts) == 1:
            raw[parts[0]] = value
        else:
            _set_path(raw.setdefault(parts[0], {}), parts[1:], value, item)
        return
    if parts[0] == "stages":
        parts = parts[1:]
    stages = raw.get("stages") or {}
    target = parts[0]
    names = [n for n, entry in stages.items()
             if n == target or (isinstance(entry, dict) and entry.get("kind", n) == target)]
    if not names:
        raise InputError(f"--set {item!r}: {path} has no stage or stage kind named {target!r}; "
                         f"stages: {', '.join(stages)}")
    rest = parts[1:]
    if not rest:
        raise InputError(f"--set {item!r}: name a setting of stage {target}, e.g. {target}.seed=1")
    for name in names:
        entry = stages[name] if isinstance(stages[name], dict) else {}
        stages[name] = entry
        if rest[0] in STAGE_KEYS and rest[0] != "config":
            if len(rest) == 1:
                entry[rest[0]] = value
            else:
                _set_path(entry.setdefault(rest[0], {}), rest[1:], value, item)
        else:
            if rest[0] == "config":
                rest = rest[1:]
            _set_path(entry.setdefault("config", {}), rest, value, item)


def _set_path(target: Any, parts: list[str], value: Any, item: str) -> None:
    for p in parts[:-1]:
        if not isinstance(target, dict):
            raise InputError(f"--set {item!r}: {p!r} is not inside a mapping")
        target = target.setdefault(p, {})
        if target is None:
            target = {}
    if not isinstance(target, dict):
        raise InputError(f"--set {item!r}: cannot set {parts[-1]!r} inside a non-mapping value")
    target[parts[-1]] = value


def expand_path(text: str) -> str:
    return os.path.expandvars(os.path.expanduser(text))
