"""The pipeline DAG: stages, their cache keys and output dirs, the workdir lock, running one stage.

A **stage** is a function from (typed config, upstream output dirs) to one output dir
(DESIGN.md, "Stage output dir"). Its dir is `<workdir>/<kind>/<key>/`, where `key` hashes the
stage kind, its code version, the config fields it reads and the keys of its upstream stages,
so a key names an output, not a run: equal keys mean equal inputs.

Life of a stage output:

    <kind>/.<key>.tmp-<random>/   the stage writes here (a killed stage leaves only this)
    <kind>/<key>.work/            stable scratch for resumable stages (pretraining checkpoints);
                                  a re-run after a kill finds it and resumes
    <kind>/<key>/                 renamed into place when the stage returns, `_manifest.json`
                                  (written last, inside the temporary dir) marking it done
    <kind>/<key>.running|.failed  markers for `bertflow status`

A dir without `_manifest.json` is never taken as done. The runner holds an exclusive
`fcntl.flock` on `<workdir>/.lock` for the whole run, so two runs of one workdir never
interleave; under the lock it removes temporary dirs that killed runs left behind.

**A workdir on an object store** (`workdir: s3://bucket/run`, DESIGN.md principle 11): the same layout,
as prefixes. The workdir's lock is its lease (`<workdir>/_lease.json`, `pipelines/lease.py`: a conditional
PUT, renewed while the run lasts; a second run is refused). A stage writes into a local temporary dir
(`$BERTFLOW_CACHE/stages/...`), reads its upstream outputs from local copies (downloaded once per
machine, `storage.local_copy`; `StageContext.sources` names them as published, for the Ray tasks a stage starts
on other nodes), and is published by uploading that dir to `<kind>/<key>/` and then
`_manifest.json`, last and behind the lease's fence: a prefix without a manifest (a killed upload) is never
taken as done and is removed by the next run under the lease. Outputs a stage's job already wrote to the
store (a pretraining's checkpoint under `<key>.work/`) are copied into place on the server
(`StageContext.adopt`), not downloaded and uploaded again. `<key>.work/` is a prefix too, so a killed
pretraining or fine-tune resumes from its checkpoints there, from any machine. Markers are objects.

`pipelines/dag/runner.py` runs a graph on Ray. The DAG core knows nothing about BERT:
`pipelines/dag/stages.py` builds the stage table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bert import storage
from bert.errors import BertflowError, InputError
from bert.fsutil import write_json_atomic
from pipelines import outdir

Location = Path | str  # a local path, or the URI of a prefix on an object store

MANIFEST = "_manifest.json"
LOCK_FILE = outdir.LOCK_FILE
KEY_LENGTH = 16


class PipelineError(BertflowError):
    """One or more stages failed; the message lists them, their errors and the stages skipped."""


# ----------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class StageContext:
    """What a stage function gets: where to write, where its upstream outputs are, who it is."""

    name: str  # node name in the DAG, e.g. "finetune.sst2.seed1"
    kind: str
    key: str
    config: Any  # the stage's typed config (a frozen dataclass)
    inputs: Mapping[str, Path]  # input role -> upstream output dir (a local copy, for a workdir on a store)
    out: Path  # temporary local dir, renamed to (or uploaded as) the final dir when the function returns
    work: Location  # stable scratch `<key>.work/` (a prefix on a store; removed after success)
    final: Location  # the dir `out` becomes
    tracking: Mapping[str, str] | None = None  # {"tracking_uri", "run_id"}: the stage's MLflow run, if any
    adopted: list = field(default_factory=list)  # (location, path in the output): copied in at publish time
    # input role -> upstream output as published: its URI for a workdir on a store (readable from any node: what
    # a stage hands to the Ray tasks it starts), else the same dir as `inputs`
    sources: Mapping[str, Location] = field(default_factory=dict)

    def log(self, message: str) -> None:
        print(f"[{self.name}] {message}", flush=True)

    def adopt(self, source: Location, relative: str) -> None:
        """Make `source` (a file or dir the stage's job wrote, e.g. under `work`) part of the output at `relative`:
        hard-linked into `out` now on a local disk, copied on the server when the output is published on a store."""
        if storage.is_remote(source):
            self.adopted.append((str(source), relative))
        else:
            target = self.out / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            link_tree(Path(source), target)

    def job_tracking(self) -> dict[str, Any]:
        """The tracking settings of the job a stage runs: the stage's MLflow run as the job run's parent."""
        if not self.tracking:
            return {"tracking_uri": None, "parent_run_id": None}
        return {"tracking_uri": self.tracking["tracking_uri"], "parent_run_id": self.tracking["run_id"],
                "experiment": self.tracking["experiment"]}


# ----------------------------------------------------------------------------- what stage functions share


def path_fingerprint(paths: tuple[str, ...] | list[str]) -> list[list[Any]]:
    """[(path, size, mtime_ns)] of every file under the paths: changes when an input file does.

    A path may be a URI: then every object under it (or the object itself) with its size and Last-Modified,
    read through `bert/storage.py` (names starting with "." skipped, as on disk). Local entries are what
    they always were, so the keys of local inputs do not change.
    """
    out: list[list[Any]] = []
    for p in paths:
        if storage.is_remote(p):
            found = storage.info(p)
            if found.type == storage.pafs.FileType.File:
                out.append([str(p), found.size, found.mtime_ns])
            else:
                out.extend([str(storage.join(p, rel)), size, mtime] for rel, size, mtime in storage.walk_file_infos(p)
                           if not rel.rsplit("/", 1)[-1].startswith("."))
            continue
        root = Path(p)
        files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file() and not f.name.startswith("."))
        for f in files:
            st = f.stat()
            out.append([str(f), st.st_size, st.st_mtime_ns])
    return out


def require_paths(paths: tuple[str, ...] | list[str], where: str) -> None:
    """Refuse, naming `where`, a path or URI that names nothing (a store that cannot be asked: its one line)."""
    for p in paths:
        try:
            found = storage.exists(p) if storage.is_remote(p) else Path(p).exists()
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        if not found:
            raise InputError(f"{where}: path {p} does not exist")


def link_tree(src: Path, dst: Path) -> None:
    """Copy a file or dir by hard links (no extra space, instant); plain copies across file systems."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link)
    else:
        link(str(src), str(dst))


def task_seed_section(section: Mapping[str, Any], parts: Sequence[type], where: str,
                      excluded: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A stage section that fans out over `tasks` x `seeds` (finetune, evaluate_checkpoints): (its own values,
    seeds parsed; the fine-tune settings its tasks share), each checked once."""
    from pipelines.config_args import split_section
    from pipelines.jobs.configs import parse_seeds

    own, shared = split_section(section, parts, where, excluded=excluded)
    if not own.get("tasks"):
        raise InputError(f"{where}: tasks is missing or empty: name at least one task, e.g. tasks: {{sst2: {{}}}}")
    try:
        own["seeds"] = parse_seeds(own.get("seeds", (1,)), 1)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    return own, shared


StageFunction = Callable[[StageContext], Mapping[str, Any] | None]


@dataclass(frozen=True)
class Stage:
    """One node of the DAG.

    `config_fields` is what enters the key: the fields the stage reads, JSON-able. `inputs`
    maps the function's input roles to upstream node names. `resources` are the Ray resources
    of the stage's task (a stage that only drives Ray Train workers can ask for none).
    """

    name: str
    kind: str
    version: int
    fn: StageFunction
    config: Any = None
    config_fields: Mapping[str, Any] = field(default_factory=dict)
    inputs: Mapping[str, str] = field(default_factory=dict)
    resources: Mapping[str, float] = field(default_factory=lambda: {"num_cpus": 1})
    max_retries: int = 0

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ "):
            raise InputError(f"stage name {self.name!r}: expected a non-empty name without '/', '\\' or spaces")
        if self.max_retries < 0:
            raise InputError(f"stage {self.name}: max_retries must be >= 0, got {self.max_retries}")


def _canonical(value: Any) -> Any:
    """JSON-able form of a config value (dataclasses, tuples, paths) for hashing."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"config value {value!r} of type {type(value).__name__} cannot enter a stage key")


def stage_key(kind: str, version: int, config_fields: Mapping[str, Any], upstream: Mapping[str, str]) -> str:
    """sha256 over (kind, code version, config fields read, upstream keys by input role)."""
    payload = json.dumps(
        {"kind": kind, "version": version, "config": _canonical(config_fields), "upstream": dict(sorted(upstream.items()))},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]


# ----------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class Node:
    """A stage with its resolved key and dirs."""

    stage: Stage
    key: str
    final: Location  # a Path, or the URI of a prefix for a workdir on an object store
    upstream: tuple[str, ...]  # node names (deduplicated, in input order)

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def work(self) -> Location:
        return sibling(self.final, self.key + ".work")

    @property
    def running_marker(self) -> Location:
        return sibling(self.final, self.key + ".running")

    @property
    def failed_marker(self) -> Location:
        return sibling(self.final, self.key + ".failed")

    def is_done(self) -> bool:
        if isinstance(self.final, Path):
            return (self.final / MANIFEST).is_file()
        return storage.is_file(storage.join(self.final, MANIFEST))


def sibling(location: Location, name: str) -> Location:
    """`name` next to `location` (a Path beside a Path, a URI beside a URI)."""
    if isinstance(location, Path):
        return location.with_name(name)
    return f"{str(location).rstrip('/').rsplit('/', 1)[0]}/{name}"


def write_marker(location: Location, text: str) -> None:
    if isinstance(location, Path):
        location.parent.mkdir(parents=True, exist_ok=True)
        location.write_text(text)
    else:
        storage.write_text(location, text)


def remove_marker(location: Location) -> None:
    if isinstance(location, Path):
        location.unlink(missing_ok=True)
    else:
        storage.remove(location)


def topological_order(stages: Sequence[Stage]) -> list[Stage]:
    """Stages sorted so each comes after its inputs; InputError on unknown inputs or a cycle."""
    by_name: dict[str, Stage] = {}
    for s in stages:
        if s.name in by_name:
            raise InputError(f"two stages are named {s.name!r}")
        by_name[s.name] = s
    for s in stages:
        for role, upstream in s.inputs.items():
            if upstream not in by_name:
                raise InputError(
                    f"stage {s.name}: input {role!r} names stage {upstream!r}, which does not exist; "
                    f"stages: {', '.join(by_name)}"
                )
    order: list[Stage] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = (path[path.index(name):] + [name])[::-1]  # in data-flow order
            raise InputError(f"the stages form a cycle (output -> input): {' -> '.join(cycle)}")
        state[name] = 1
        for upstream in by_name[name].inputs.values():
            visit(upstream, path + [name])
        state[name] = 2
        order.append(by_name[name])

    for s in stages:
        visit(s.name, [])
    return order


@dataclass(frozen=True)
class Graph:
    """Stages in topological order with their keys and output dirs under `workdir`."""

    workdir: Location
    nodes: Mapping[str, Node]  # in topological order

    @classmethod
    def build(cls, stages: Sequence[Stage], workdir: str | Path) -> Graph:
        workdir = str(workdir).rstrip("/") if storage.is_remote(workdir) else Path(workdir).resolve()
        nodes: dict[str, Node] = {}
        for s in topological_order(stages):
            upstream_keys = {role: nodes[name].key for role, name in s.inputs.items()}
            key = stage_key(s.kind, s.version, s.config_fields, upstream_keys)
            nodes[s.name] = Node(s, key, storage.join(workdir, s.kind, key), tuple(dict.fromkeys(s.inputs.values())))
        return cls(workdir, nodes)

    def descendants(self, name: str) -> list[str]:
        out: list[str] = []
        frontier = {name}
        for n, node in self.nodes.items():  # topological order: one pass suffices
            if frontier.intersection(node.upstream):
                frontier.add(n)
                out.append(n)
        return out

    def ancestors(self, name: str) -> set[str]:
        out: set[str] = set()
        stack = list(self.nodes[name].upstream)
        while stack:
            n = stack.pop()
            if n not in out:
                out.add(n)
                stack.extend(self.nodes[n].upstream)
        return out

    def select(self, pattern: str) -> list[str]:
        """Node names matching a name, a kind, or a dotted prefix ("finetune.sst2")."""
        hits = [n for n, node in self.nodes.items()
                if n == pattern or node.stage.kind == pattern or n.startswith(pattern + ".")]
        if not hits:
            raise InputError(f"no stage matches {pattern!r}; stages: {', '.join(self.nodes)}")
        return hits

    def forced(self, patterns: Sequence[str]) -> set[str]:
        """The stages `--force PATTERN` runs again: the matches and everything downstream of them."""
        out: set[str] = set()
        for pattern in patterns:
            for n in self.select(pattern):
                out.update([n, *self.descendants(n)])
        return out

    def wanted(self, patterns: Sequence[str]) -> set[str]:
        """The stages `--until PATTERN` runs: the matches and what they need (every stage without patterns)."""
        if not patterns:
            return set(self.nodes)
        out: set[str] = set()
        for pattern in patterns:
            for n in self.select(pattern):
                out.update([n, *self.ancestors(n)])
        return out

    def run_key(self) -> str:
        """A name for this set of outputs: a hash of every node's key."""
        payload = json.dumps({n: node.key for n, node in self.nodes.items()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]

    def status(self) -> dict[str, str]:
        """node -> cached | running | failed | missing (running only while a run holds the lock)."""
        locked = lock_holder(self.workdir) is not None
        result = {}
        for n, node in self.nodes.items():
            if node.is_done():
                result[n] = "cached"
            elif storage.exists(node.running_marker) and locked:
                result[n] = "running"
            elif storage.exists(node.failed_marker):
                result[n] = "failed"
            else:
                result[n] = "missing"
        return result


# ----------------------------------------------------------------------------- the workdir lock


def lock_holder(workdir: Location) -> str | None:
    """Who holds `<workdir>/.lock` ("pid 123 on host since ..."), or the workdir's live lease on a store; None if
    nobody does."""
    if storage.is_remote(workdir):
        from pipelines.lease import holder

        return holder(str(workdir))
    return outdir.lock_holder(Path(workdir) / LOCK_FILE)


@contextlib.contextmanager
def workdir_lock(workdir: Location, wait: bool = False) -> Iterator[Any]:
    """Hold an exclusive lock on the workdir; refuse (or wait, with `wait`) if another run holds it.

    Yields None for a local workdir (its flock needs no fence), or the workdir's `S3Lease` on an object store,
    whose `fence()` the stages get, to check before they publish a manifest."""
    if not storage.is_remote(workdir):
        with outdir.lock(Path(workdir) / LOCK_FILE, str(workdir), wait=wait, user="pipeline run",
                         hint="; wait for it to finish (or pass --wait-lock), or choose another --workdir"):
            yield None
        return
    from pipelines.lease import acquire

    while True:
        stack = contextlib.ExitStack()
        try:
            held = stack.enter_context(acquire(str(workdir), job="bertflow run"))
        except InputError as exc:
            if not wait or "in use by another writer" not in str(exc):
                raise
            time.sleep(5.0)  # the holder renews its lease until it ends, then releases it
            continue
        with stack:
            yield held
        return


def remove_leftovers(graph: Graph) -> list[Location]:
    """Under the lock: temporary dirs and `.running` markers of killed runs, and final dirs
    without a manifest (never taken as done). Returns what was removed."""
    if storage.is_remote(graph.workdir):
        return _remove_remote_leftovers(graph)
    removed = []
    for kind_dir in {node.final.parent for node in graph.nodes.values()}:
        if not kind_dir.is_dir():
            continue
        for item in kind_dir.iterdir():
            stale_tmp = item.name.startswith(".") and (".tmp-" in item.name or ".old-" in item.name)
            if stale_tmp or item.name.endswith(".running"):
                (shutil.rmtree if item.is_dir() else Path.unlink)(item)
                removed.append(item)
    for node in graph.nodes.values():
        if node.final.exists() and not node.is_done():
            shutil.rmtree(node.final)
            removed.append(node.final)
    return removed


def _remove_remote_leftovers(graph: Graph) -> list[Location]:
    """`remove_leftovers` for a workdir on a store: `.running` markers, and output prefixes without a manifest (a
    killed upload); this machine's local temporaries of the workdir's stages (no other run holds the lease)."""
    removed: list[Location] = []
    for node in graph.nodes.values():
        if storage.exists(node.running_marker):
            storage.remove(node.running_marker)
            removed.append(node.running_marker)
        if storage.is_dir(node.final) and not node.is_done():
            storage.remove(node.final)
            removed.append(node.final)
    spool = storage.cache_dir("stages", graph.workdir)
    for item in spool.glob(".*.tmp-*") if spool.is_dir() else ():
        shutil.rmtree(item, ignore_errors=True)
        removed.append(item)
    return removed


# ----------------------------------------------------------------------------- executing one stage


def execute_stage(stage: Stage, key: str, final: str, inputs: Mapping[str, str], tracking: Mapping[str, str] | None,
                  attempt: int, fence: Any = None) -> dict[str, Any]:
    """Run one stage (inside a Ray task): write to a temporary dir, add `_manifest.json`, rename.

    Returns the manifest. A stage found done (another attempt got there) is not run again. A `final` on an
    object store: `_execute_remote` (published by upload, the manifest last behind the workdir lease's `fence`).
    """
    if storage.is_remote(final):
        return _execute_remote(stage, key, final, inputs, tracking, attempt, fence)
    final_path = Path(final)
    if (final_path / MANIFEST).is_file():
        return json.loads((final_path / MANIFEST).read_text())
    work = final_path.with_name(key + ".work")
    work.mkdir(parents=True, exist_ok=True)
    tmp = final_path.with_name(f".{key}.tmp-{os.getpid()}-{attempt}-{time.time_ns() % 10**9:09d}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    local = {role: Path(p) for role, p in inputs.items()}  # on a local workdir, read and handed on as they are
    ctx = StageContext(name=stage.name, kind=stage.kind, key=key, config=stage.config, inputs=local, out=tmp,
                       work=work, final=final_path, tracking=tracking, sources=local)
    started = time.time()
    try:
        result = stage.fn(ctx) or {}
        manifest = _manifest(stage, key, inputs, result, started, attempt)
        write_json_atomic(tmp / MANIFEST, manifest)  # last file written: marks the dir complete
        if final_path.exists():  # a dir without manifest (killed publish): never taken as done
            shutil.rmtree(final_path)
        os.replace(tmp, final_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _manifest(stage: Stage, key: str, inputs: Mapping[str, str], result: Mapping[str, Any], started: float,
              attempt: int) -> dict[str, Any]:
    return {
        "stage": stage.kind,
        "name": stage.name,
        "key": key,
        "version": stage.version,
        "config": _canonical(stage.config_fields),
        "inputs": dict(inputs),
        "result": _canonical(dict(result)),
        "started": started,
        "finished": time.time(),
        "seconds": time.time() - started,
        "host": socket.gethostname(),
        "attempt": attempt,
    }


def _execute_remote(stage: Stage, key: str, final: str, inputs: Mapping[str, str],
                    tracking: Mapping[str, str] | None, attempt: int, fence: Any) -> dict[str, Any]:
    """`execute_stage` for a workdir on an object store (see the module docstring)."""
    manifest_uri = storage.join(final, MANIFEST)
    if storage.is_file(manifest_uri):
        return storage.read_json(manifest_uri)
    workdir = final.rsplit("/", 2)[0]
    local_inputs = {role: storage.local_copy(p, "stages") for role, p in inputs.items()}  # once per machine
    spool = storage.cache_dir("stages", workdir)
    spool.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=spool))
    ctx = StageContext(name=stage.name, kind=stage.kind, key=key, config=stage.config, inputs=local_inputs, out=tmp,
                       work=sibling(final, key + ".work"), final=final, tracking=tracking, sources=dict(inputs))
    started = time.time()
    try:
        result = stage.fn(ctx) or {}
        manifest = _manifest(stage, key, inputs, result, started, attempt)
        if fence is not None:
            fence.check()  # a run that lost the workdir's lease publishes nothing
        if storage.exists(final):  # a killed upload's objects (no manifest): never taken as done
            storage.remove(final)
        if any(tmp.iterdir()):
            storage.upload_dir(tmp, final)
        for source, relative in ctx.adopted:
            storage.copy(source, storage.join(final, relative))  # server-side, inside one store
        if fence is not None:
            fence.commit(manifest_uri, manifest)  # written last: the output now exists
        else:
            storage.write_json(manifest_uri, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    storage.remove(ctx.work)
    return manifest


# ----------------------------------------------------------------------------- the runner
