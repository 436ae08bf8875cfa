"""Running a graph on Ray: every stage whose inputs are done is a Ray task; retries; failures isolated.

The runner submits each pending stage whose upstream stages are done (so independent stages and
the fine-tune fan-out run concurrently, as far as Ray's resources and `max_concurrent` allow),
retries a failing stage up to its `max_retries`, and on a final failure skips the stage's
descendants while the other branches finish. An `Observer` hears every event (progress lines;
the pipeline's MLflow runs, `PipelineObserver` below).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bert import storage
from pipelines.dag.graph import (MANIFEST, Graph, Node, PipelineError, execute_stage, remove_leftovers, remove_marker,
                                 workdir_lock, write_marker)


@dataclass(frozen=True)
class StageEvent:
    """What the runner reports to its observer (progress lines, MLflow)."""

    node: str
    event: str  # cached | started | retry | done | failed | skipped
    seconds: float = 0.0
    attempt: int = 0
    error: str = ""
    manifest: Mapping[str, Any] | None = None


class Observer:
    """Hooks for progress and tracking; the default prints one line per event."""

    def stage_tracking(self, node: Node) -> Mapping[str, str] | None:
        """The MLflow run a stage may log into (None: no tracking)."""
        return None

    def on_event(self, node: Node, event: StageEvent) -> None:
        detail = {
            "cached": f"cached {node.final}",
            "started": f"started (key {node.key}, attempt {event.attempt + 1}/{node.stage.max_retries + 1})",
            "retry": f"failed after {event.seconds:.1f}s, retrying: {error_summary(event.error)}",
            "done": f"done in {event.seconds:.1f}s -> {node.final}",
            "failed": f"FAILED after {event.seconds:.1f}s: {error_summary(event.error)}",
            "skipped": f"skipped: {event.error}",
        }[event.event]
        print(f"[{time.strftime('%H:%M:%S')}] {node.name:<28} {detail}", flush=True)


class PipelineObserver:
    """The runner's observer for a tracked pipeline run: progress lines, plus the MLflow stage runs."""

    def __init__(self, tracker):  # pipelines.tracking.PipelineTracker
        self.printer = Observer()
        self.tracker = tracker

    def stage_tracking(self, node) -> dict[str, str]:
        return {"tracking_uri": self.tracker.uri, "run_id": self.tracker.stage_run(node),
                "experiment": self.tracker.spec.experiment}

    def on_event(self, node, event) -> None:
        self.printer.on_event(node, event)
        if event.event == "cached" and node.name not in self.tracker.stage_runs:
            self.tracker.stage_run(node, cached=True)
            self.tracker.finish_stage(node, "FINISHED", 0.0, event.manifest)
        elif event.event == "done":
            self.tracker.finish_stage(node, "FINISHED", event.seconds, dict(event.manifest or {}))
        elif event.event == "failed":
            self.tracker.finish_stage(node, "FAILED", event.seconds, None, event.error)


@dataclass
class RunResult:
    done: list[str] = field(default_factory=list)  # ran in this invocation
    cached: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # node -> error text
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.skipped


def run_graph(graph: Graph, *, force: Sequence[str] = (), until: Sequence[str] = (), max_concurrent: int = 8,
              observer: Observer | None = None, wait_lock: bool = False, lock: bool = True,
              raise_on_failure: bool = True, lease: Any = None) -> RunResult:
    """Run every stage of `graph` that is not done, on Ray (which must be initialised).

    `force` names stages (names, kinds or prefixes) to run again together with their
    descendants, even if done. `until` limits the run to the named stages and what they need.
    Holds the workdir lock throughout (`lock=False`: the caller holds it, and passes the workdir's `lease` when
    the workdir is on an object store).
    """
    with workdir_lock(graph.workdir, wait=wait_lock) if lock else contextlib.nullcontext(lease) as held:
        remove_leftovers(graph)
        fence = held.fence() if held is not None else None
        run = _Run(graph, graph.forced(force), observer or Observer(), max_concurrent, fence)
        run.plan(graph.wanted(until))
        run.loop()
    if raise_on_failure and not run.result.ok:
        raise PipelineError(describe_failure(run.result))
    return run.result


class _Run:
    """The state of one `run_graph` call: each node pending | running | done | failed | skipped | unwanted."""

    def __init__(self, graph: Graph, forced: set[str], observer: Observer, max_concurrent: int, fence: Any = None):
        import ray

        self.graph, self.forced, self.observer, self.max_concurrent = graph, forced, observer, max_concurrent
        self.fence = fence  # the workdir lease's fencing token (a workdir on an object store), else None
        self.result = RunResult()
        self.state: dict[str, str] = {}
        self.running: dict[Any, tuple[str, int, float]] = {}  # ObjectRef -> (node, attempt, started)
        self.remote = ray.remote(execute_stage)

    def plan(self, wanted: set[str]) -> None:
        for n, node in self.graph.nodes.items():
            if n not in wanted:
                self.state[n] = "unwanted"
            elif n not in self.forced and node.is_done():
                self.state[n] = "done"
                self.result.cached.append(n)
                self.observer.on_event(node, StageEvent(n, "cached", manifest=_read_manifest(node)))
            else:
                self.state[n] = "pending"
                remove_marker(node.failed_marker)

    def loop(self) -> None:
        import ray

        last_heartbeat = time.time()
        while True:
            for n, node in self.graph.nodes.items():
                if len(self.running) >= self.max_concurrent:
                    break
                if self.state[n] == "pending" and all(self.state[u] == "done" for u in node.upstream):
                    self.submit(n, 0)
            if not self.running:
                return
            ready, _ = ray.wait(list(self.running), num_returns=1, timeout=10.0)
            if ready:
                self.collect(ready[0])
            elif time.time() - last_heartbeat >= 60:  # a heartbeat for long stages
                last_heartbeat = time.time()
                print(f"[{time.strftime('%H:%M:%S')}] running: " + ", ".join(
                    f"{n} ({time.time() - t0:.0f}s)" for n, _, t0 in self.running.values()), flush=True)

    def submit(self, n: str, attempt: int) -> None:
        node = self.graph.nodes[n]
        if n in self.forced and attempt == 0 and storage.exists(node.final):
            storage.remove(node.final)
        inputs = {role: str(self.graph.nodes[u].final) for role, u in node.stage.inputs.items()}
        options = {**node.stage.resources, "max_retries": 0}
        if env := storage.environment():  # the store and credentials this driver uses, in the stage's worker too:
            options["runtime_env"] = {"env_vars": env}  # its output or any of its inputs may be a URI
        ref = self.remote.options(**options).remote(
            node.stage, node.key, str(node.final), inputs, self.observer.stage_tracking(node), attempt, self.fence)
        self.running[ref] = (n, attempt, time.time())
        self.state[n] = "running"
        write_marker(node.running_marker, f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.observer.on_event(node, StageEvent(n, "started", attempt=attempt))

    def collect(self, ref) -> None:
        import ray

        n, attempt, started = self.running.pop(ref)
        node, seconds = self.graph.nodes[n], time.time() - started
        remove_marker(node.running_marker)
        try:
            manifest = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a stage's failure is reported, not raised here
            self.failed(n, attempt, seconds, _error_text(exc))
            return
        self.state[n] = "done"
        self.result.done.append(n)
        self.result.seconds[n] = seconds
        self.observer.on_event(node, StageEvent(n, "done", seconds, attempt, manifest=manifest))

    def failed(self, n: str, attempt: int, seconds: float, error: str) -> None:
        node = self.graph.nodes[n]
        if attempt < node.stage.max_retries:
            self.observer.on_event(node, StageEvent(n, "retry", seconds, attempt, error))
            self.submit(n, attempt + 1)
            return
        self.state[n] = "failed"
        self.result.failed[n] = error
        self.result.seconds[n] = seconds
        write_marker(node.failed_marker, error)
        self.observer.on_event(node, StageEvent(n, "failed", seconds, attempt, error))
        for d in self.graph.descendants(n):
            if self.state[d] == "pending":
                self.state[d] = "skipped"
                self.result.skipped.append(d)
                self.observer.on_event(self.graph.nodes[d], StageEvent(d, "skipped", error=f"upstream stage {n} failed"))


def describe_failure(result: RunResult) -> str:
    lines = [f"{len(result.failed)} stage(s) failed"]
    for n, error in result.failed.items():
        lines.append(f"  {n}: {error_summary(error)}")
    if result.skipped:
        lines.append(f"  not run (downstream of a failure): {', '.join(result.skipped)}")
    if result.done or result.cached:
        lines.append(f"  finished: {len(result.done)} ran, {len(result.cached)} cached; re-run to retry the rest")
    return "\n".join(lines)


def _read_manifest(node: Node) -> dict[str, Any] | None:
    try:
        return storage.read_json(storage.join(node.final, MANIFEST))
    except (OSError, ValueError):  # missing or unreadable (InputError is a ValueError)
        return None


def _error_text(exc: BaseException) -> str:
    """First line: the stage's own exception (unwrapped from Ray's task error); then the full report."""
    cause = getattr(exc, "cause", None)
    inner = cause if isinstance(cause, BaseException) else exc
    summary = f"{type(inner).__name__}: {inner}".strip().splitlines()[0]
    return f"{summary}\n\n{exc}"


def error_summary(error: str) -> str:
    return error.strip().splitlines()[0] if error.strip() else "unknown error"
