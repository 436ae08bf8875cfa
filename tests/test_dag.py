"""The DAG core with small pure-Python stages on the shared local Ray runtime.

Stages count their executions in files under the test's tmp dir (they run in Ray workers,
so the count has to live outside the process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bert.errors import InputError
from pipelines.dag.graph import MANIFEST, Graph, PipelineError, Stage, StageContext, lock_holder, workdir_lock
from pipelines.dag.runner import run_graph

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _stages_by_value(ray_local):
    # The stage functions below live in a test module the Ray workers cannot import by name.
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield


def _count(ctx: StageContext) -> int:
    """Record one execution of this stage; return how many there have been."""
    log = Path(ctx.config["log"]) / f"{ctx.name}.count"
    n = int(log.read_text()) + 1 if log.exists() else 1
    log.write_text(str(n))
    return n


def text_stage(ctx: StageContext) -> dict:
    """Concatenate the upstream `value.txt` files and this stage's `text`."""
    _count(ctx)
    parts = [(ctx.inputs[role] / "value.txt").read_text() for role in sorted(ctx.inputs)]
    value = "+".join(parts + [ctx.config["text"]])
    (ctx.out / "value.txt").write_text(value)
    return {"value": value}


def failing_stage(ctx: StageContext) -> None:
    _count(ctx)
    raise ValueError(f"stage {ctx.name} fails on purpose")


def flaky_stage(ctx: StageContext) -> dict:
    """Fails on its first attempt only."""
    if _count(ctx) == 1:
        raise RuntimeError("first attempt fails")
    (ctx.out / "value.txt").write_text(ctx.config["text"])
    return {}


def stage(name: str, log: Path, inputs: dict[str, str] | None = None, text: str | None = None, fn=text_stage,
          max_retries: int = 0) -> Stage:
    config = {"text": text or name, "log": str(log)}
    return Stage(name=name, kind=name.split(".")[0], version=1, fn=fn, config=config,
                 config_fields={"text": config["text"]}, inputs=inputs or {}, max_retries=max_retries,
                 resources={"num_cpus": 0})


def diamond(log: Path, **texts: str) -> list[Stage]:
    """a -> b, a -> c, (b, c) -> d."""
    return [
        stage("a", log, text=texts.get("a")),
        stage("b", log, {"x": "a"}, text=texts.get("b")),
        stage("c", log, {"x": "a"}, text=texts.get("c")),
        stage("d", log, {"left": "b", "right": "c"}, text=texts.get("d")),
    ]


def counts(log: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in log.glob("*.count")}


def test_run_then_cache_hit(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    graph = Graph.build(diamond(log), tmp_path / "work")
    first = run_graph(graph)
    assert sorted(first.done) == ["a", "b", "c", "d"]
    d = graph.nodes["d"]
    assert (d.final / "value.txt").read_text() == "a+b+a+c+d"
    manifest = json.loads((d.final / MANIFEST).read_text())
    assert manifest["key"] == d.key and d.final == tmp_path / "work" / "d" / d.key
    assert graph.status() == dict.fromkeys("abcd", "cached")

    again = run_graph(Graph.build(diamond(log), tmp_path / "work"))
    assert again.done == [] and sorted(again.cached) == ["a", "b", "c", "d"]
    assert counts(log) == dict.fromkeys("abcd", 1)
    assert not list((tmp_path / "work").glob("*/*.work")), "work dirs are removed after success"


def test_changing_one_setting_reruns_exactly_downstream(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    before = Graph.build(diamond(log), tmp_path / "work")
    run_graph(before)
    after = Graph.build(diamond(log, c="c2"), tmp_path / "work")
    assert {n for n in "abcd" if before.nodes[n].key != after.nodes[n].key} == {"c", "d"}
    result = run_graph(after)
    assert sorted(result.done) == ["c", "d"] and sorted(result.cached) == ["a", "b"]
    assert (after.nodes["d"].final / "value.txt").read_text() == "a+b+a+c2+d"
    assert counts(log) == {"a": 1, "b": 1, "c": 2, "d": 2}
    # the old outputs stay (a key names an output): switching back is all cache hits
    assert run_graph(before).done == []


def test_force_reruns_stage_and_descendants(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    graph = Graph.build(diamond(log), tmp_path / "work")
    run_graph(graph)
    result = run_graph(graph, force=["b"])
    assert sorted(result.done) == ["b", "d"]
    assert counts(log) == {"a": 1, "b": 2, "c": 1, "d": 2}


def test_failure_stops_descendants_while_siblings_finish(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    stages = [
        stage("a", log),
        stage("b", log, {"x": "a"}, fn=failing_stage, max_retries=1),
        stage("e", log, {"x": "b"}),
        stage("c", log, {"x": "a"}),
        stage("c2", log, {"x": "c"}),
    ]
    graph = Graph.build(stages, tmp_path / "work")
    with pytest.raises(PipelineError) as info:
        run_graph(graph)
    message = str(info.value)
    assert "b: ValueError: stage b fails on purpose" in message and "e" in message
    assert counts(log) == {"a": 1, "b": 2, "c": 1, "c2": 1}  # b tried twice (1 retry), e never
    status = graph.status()
    assert status == {"a": "cached", "b": "failed", "e": "missing", "c": "cached", "c2": "cached"}
    assert not graph.nodes["b"].final.exists()
    assert not [p for p in (tmp_path / "work" / "b").iterdir() if ".tmp-" in p.name]


def test_retry_succeeds(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    graph = Graph.build([stage("flaky", log, fn=flaky_stage, max_retries=2)], tmp_path / "work")
    result = run_graph(graph)
    assert result.done == ["flaky"] and counts(log) == {"flaky": 2}


def test_cycle_and_unknown_input_are_input_errors(tmp_path):
    log = tmp_path / "log"
    with pytest.raises(InputError, match="cycle \\(output -> input\\): (a -> b -> c -> a|b -> c -> a -> b|c -> a -> b -> c)"):
        Graph.build([stage("a", log, {"x": "c"}), stage("b", log, {"x": "a"}), stage("c", log, {"x": "b"})], tmp_path)
    with pytest.raises(InputError, match="names stage 'nope', which does not exist"):
        Graph.build([stage("a", log, {"x": "nope"})], tmp_path)
    with pytest.raises(InputError, match="two stages are named 'a'"):
        Graph.build([stage("a", log), stage("a", log)], tmp_path)


def test_killed_stage_leftovers_are_ignored(tmp_path):
    """What a kill leaves (a temporary dir with a manifest, a final dir without one) is never taken as done."""
    log = tmp_path / "log"
    log.mkdir()
    graph = Graph.build(diamond(log), tmp_path / "work")
    a = graph.nodes["a"]
    a.final.parent.mkdir(parents=True)
    tmp = a.final.with_name(f".{a.key}.tmp-999")
    tmp.mkdir()
    (tmp / MANIFEST).write_text("{}")
    (tmp / "value.txt").write_text("half")
    a.final.mkdir()
    (a.final / "value.txt").write_text("half")  # no manifest: a publish that never finished
    a.running_marker.write_text("pid 1")
    assert graph.status()["a"] == "missing"
    result = run_graph(graph)
    assert "a" in result.done
    assert (a.final / "value.txt").read_text() == "a"
    assert not tmp.exists() and not a.running_marker.exists()


def test_second_run_of_a_workdir_is_refused(tmp_path):
    """A real second process holds the lock; the run refuses, and touches nothing."""
    work = tmp_path / "work"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(ROOT)!r})
            from pathlib import Path
            from pipelines.dag.graph import workdir_lock
            with workdir_lock(Path({str(work)!r})):
                print("locked", flush=True)
                time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert f"pid {holder.pid}" in lock_holder(work)
        log = tmp_path / "log"
        log.mkdir()
        graph = Graph.build(diamond(log), work)
        with pytest.raises(InputError, match=f"in use by another pipeline run \\(pid {holder.pid}"):
            run_graph(graph)
        assert counts(log) == {} and sorted(p.name for p in work.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    assert lock_holder(work) is None
    with workdir_lock(work):  # free again once the holder is gone
        pass


def test_concurrent_stages_overlap(tmp_path):
    """Independent stages run at the same time (a worker process may take a while to start, so
    only ask that some two of them overlapped)."""
    log = tmp_path / "log"
    log.mkdir()
    stages = [Stage(name=f"s{i}", kind="sleep", version=1, fn=sleep_stage, config={"i": i},
                    config_fields={"i": i}, resources={"num_cpus": 0}) for i in range(3)]
    graph = Graph.build(stages, tmp_path / "work")
    run_graph(graph)
    spans = [json.loads((n.final / MANIFEST).read_text()) for n in graph.nodes.values()]
    overlapping = [(x["name"], y["name"]) for i, x in enumerate(spans) for y in spans[i + 1:]
                   if x["started"] < y["finished"] and y["started"] < x["finished"]]
    assert overlapping, "no two independent stages ran at the same time"


def sleep_stage(ctx: StageContext) -> dict:
    time.sleep(3.0)
    return {"pid": os.getpid()}
