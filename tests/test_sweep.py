"""`bertflow sweep`: bad space files refused before any work; a small real sweep (MiniLM, MRPC, ASHA) end to
end with its MLflow structure; a sweep killed (SIGKILL) after a trial finished resumes without training it
again; the sweep stage in specs.

The runs are tiny (16-32 examples, 1-2 epochs, fp32): what they check is the plumbing, not the scores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bert.errors import InputError
from pipelines.jobs.configs import FinetuneConfig
from pipelines.jobs.sweep_space import (
    PAPER_GRID,
    SweepOptions,
    expand,
    load_space_file,
    parse_space,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = {"max_train_examples": 32, "max_eval_examples": 32, "batch_size": 16, "precision": "fp32", "log_every": 1}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "sweep", *args]


# ----------------------------------------------------------------------------- spaces (no Ray)


@pytest.mark.parametrize("body, message", [
    ("lrate: {choice: [1.0e-5]}", "lrate: unknown setting; sweepable settings: adam_eps"),
    ("out: {choice: [x]}", "out: cannot be swept"),
    ("batch_size: {choice: []}", "batch_size.choice: empty choice"),
    ("learning_rate: {uniform: [1.0e-4, 1.0e-5]}", "learning_rate.uniform: low 0.0001 is above high 1e-05"),
    ("learning_rate: {loguniform: [0, 1.0e-4]}", "learning_rate.loguniform: loguniform needs low > 0"),
    ("batch_size: {choice: [16, big]}", "batch_size.choice[1]: expected an integer, got 'big'"),
    ("batch_size: {uniform: [16, 32]}", "batch_size.uniform: uniform needs a real-valued setting"),
    ("warmup_ratio: {grid: [0.1, 1.5]}", "warmup_ratio.grid: 1.5: finetune: warmup_ratio must be in [0, 1)"),
    ("epochs: {normal: [2, 3]}", "epochs: unknown domain 'normal'"),
    ("learning_rate: [1.0e-5, 2.0e-5]", "learning_rate: expected one domain"),
    ("[1, 2]", "expected a mapping of fine-tune settings to domains"),
    ("learning_rate: {choice: [1.0e-5}", "not valid YAML"),
])
def test_bad_space_files_are_one_line_errors_naming_file_and_key(tmp_path, datasets_dir, minilm_dir, body, message):
    space = tmp_path / "space.yaml"
    space.write_text(body + "\n")
    out = tmp_path / "out"
    done = subprocess.run(cli("--task", "mrpc", "--data", str(datasets_dir / "glue" / "MRPC"), "--checkpoint",
                              str(minilm_dir), "--out", str(out), "--space", str(space)),
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bertflow sweep: error: {space}: {message}"), done.stderr
    assert not out.exists()  # refused before anything was written


def test_sweep_options_are_checked():
    with pytest.raises(InputError, match="exactly one of --grid paper or --space FILE"):
        SweepOptions()
    with pytest.raises(InputError, match="exactly one"):
        SweepOptions(grid="paper", space="s.yaml")
    with pytest.raises(InputError, match="unknown --grid 'bert'"):
        SweepOptions(grid="bert")
    with pytest.raises(InputError, match="--scheduler must be none or asha"):
        SweepOptions(grid="paper", scheduler="hyperband")
    with pytest.raises(InputError, match="seeds must list distinct integers"):
        SweepOptions(grid="paper", seeds="1,1")
    assert SweepOptions(grid="paper", seeds="none").rerun_seeds == ()
    assert SweepOptions(grid="paper").rerun_seeds == (1, 2, 3)


def test_paper_grid_and_sampled_spaces_expand_deterministically(tmp_path):
    trials = expand(PAPER_GRID, 1, 0)
    assert len(trials) == 18 and [t["name"] for t in trials][:2] == ["trial-000", "trial-001"]
    assert {(t["settings"]["batch_size"], t["settings"]["learning_rate"], t["settings"]["epochs"]) for t in trials} == {
        (b, lr, e) for b in (16, 32) for lr in (5e-5, 3e-5, 2e-5) for e in (2.0, 3.0, 4.0)}
    space_file = tmp_path / "space.yaml"
    space_file.write_text("learning_rate: {loguniform: [1.0e-5, 1.0e-4]}\nbatch_size: {choice: [16, 32]}\n"
                          "epochs: {grid: [2, 3]}\n")
    space = load_space_file(space_file, FinetuneConfig(task="mrpc"))
    first, again, other = expand(space, 4, 7), expand(space, 4, 7), expand(space, 4, 8)
    assert first == again and first != other and len(first) == 8
    assert [t["settings"]["epochs"] for t in first] == [2.0, 3.0] * 4
    assert all(1e-5 <= t["settings"]["learning_rate"] <= 1e-4 and t["settings"]["batch_size"] in (16, 32)
               for t in first)
    assert parse_space({"seed": {"grid": [1, 2]}}, "x", FinetuneConfig(task="mrpc"))["seed"].values == (1, 2)


# ----------------------------------------------------------------------------- a real sweep


@pytest.fixture(scope="module")
def asha_sweep(ray_local, datasets_dir, minilm_dir, tmp_path_factory):
    """Two trials: the first learns the majority class within its first epoch (8 steps at lr 1e-4), the second's
    learning rate is too small to move off the random head, so ASHA stops it after its first epoch. The best
    settings are re-run over two seeds."""
    from pipelines.jobs.sweep import run_sweep

    out = tmp_path_factory.mktemp("sweep") / "out"
    space = tmp_path_factory.mktemp("space") / "space.yaml"
    space.write_text("learning_rate: {grid: [1.0e-4, 1.0e-7]}\n")
    base = FinetuneConfig(task="mrpc", data=str(datasets_dir / "glue" / "MRPC"), checkpoint=str(minilm_dir),
                          out=str(out), epochs=2, **(TINY | {"max_train_examples": 64, "batch_size": 8}))
    options = SweepOptions(space=str(space), scheduler="asha", reduction_factor=2, seeds="1,2")
    return base, options, run_sweep(base, options)


@pytest.mark.integration
def test_sweep_outputs_table_best_and_reruns(asha_sweep):
    import csv

    base, _, result = asha_sweep
    out = Path(base.out)
    assert json.loads((out / "sweep.json").read_text()) == result
    rows = {r["trial"]: r for r in result["trials"]}
    assert rows["trial-000"]["status"] == "finished" and rows["trial-000"]["epochs_run"] == 2
    assert rows["trial-001"]["stopped_early"] and rows["trial-001"]["epochs_run"] == 1
    assert result["compute"] == result["compute"] | {"trials": 2, "stopped_early": 1, "trial_epochs": 3,
                                                     "planned_trial_epochs": 4}
    finished = json.loads((out / "trials" / "trial-000" / "metrics.json").read_text())
    assert rows["trial-000"]["metric"] == finished["metrics"]["dev/f1"]
    assert not (out / "trials" / "trial-000" / "checkpoint").exists()  # trials keep metrics, not weights
    assert not (out / "trials" / "trial-001" / "_ray").exists()  # a stopped trial's working state is gone
    assert result["best"]["trial"] == max(rows.values(), key=lambda r: r["metric"])["trial"]
    with open(out / "trials.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["trial"] for r in table] == ["trial-000", "trial-001"]
    assert set(table[0]) >= {"learning_rate", "dev/f1", "epochs_run", "stopped_early", "seconds"}
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    rerun = json.loads((out / "best" / "metrics.json").read_text())
    assert rerun["seeds"] == [1, 2] and result["rerun"]["mean"] == rerun["metrics"]
    assert result["rerun"]["settings"] == result["best"]["settings"]
    assert not (out / "_tune").exists()


@pytest.mark.integration
def test_sweep_mlflow_parent_trials_and_reruns_nested(asha_sweep):
    from mlflow.tracking import MlflowClient

    _, _, result = asha_sweep
    client = MlflowClient(result["mlflow"]["tracking_uri"])
    parent = client.get_run(result["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["bertflow.stage"] == "sweep"
    assert parent.data.metrics["best/dev/f1"] == result["best"]["metric"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep.json", "trials.csv", "sweep.png"}

    def children(run_id):
        return client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")

    nested = {r.info.run_name: r for r in children(parent.info.run_id)}
    assert set(nested) == {"trial-000", "trial-001", "finetune-mrpc"}
    assert nested["trial-000"].info.status == "FINISHED" and nested["trial-001"].info.status == "KILLED"
    assert nested["trial-001"].data.tags["bertflow.sweep.status"] == "stopped"
    assert float(nested["trial-001"].data.tags["bertflow.sweep.learning_rate"]) == 1e-7
    seeds = children(nested["finetune-mrpc"].info.run_id)
    assert sorted(r.data.tags["bertflow.seed"] for r in seeds) == ["1", "2"]


@pytest.mark.integration
def test_finished_sweep_does_nothing_and_another_sweep_is_refused(asha_sweep, capsys):
    from pipelines.jobs.sweep import run_sweep

    base, options, result = asha_sweep
    before = (Path(base.out) / "sweep.json").stat().st_mtime_ns
    assert run_sweep(base, options) == result
    assert "is complete; nothing to do" in capsys.readouterr().out
    assert (Path(base.out) / "sweep.json").stat().st_mtime_ns == before
    with pytest.raises(InputError, match="with other settings .*scheduler"):
        run_sweep(base, SweepOptions(space=options.space, seeds="1,2"))


# ----------------------------------------------------------------------------- resume after a kill


def mlflow_trial_runs(out: Path) -> dict[str, int]:
    """Trial name -> how many MLflow runs were made for its dir."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    names = [Path(r.data.tags["bertflow.out"]).name for r in runs if "/trials/" in r.data.tags.get("bertflow.out", "")]
    return {n: names.count(n) for n in sorted(set(names))}


@pytest.mark.slow  # the default run's 30-minute budget; run with -m slow
@pytest.mark.integration
def test_sweep_killed_after_a_finished_trial_resumes_without_training_it_again(tmp_path, datasets_dir, minilm_dir):
    out = tmp_path / "out"
    space = tmp_path / "space.yaml"
    space.write_text("learning_rate: {grid: [5.0e-5, 3.0e-5]}\n")
    args = cli("--task", "mrpc", "--data", str(datasets_dir / "glue" / "MRPC"), "--checkpoint", str(minilm_dir),
               "--out", str(out), "--space", str(space), "--epochs", "1", "--seeds", "none",
               *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    finished = out / "trials" / "trial-000" / "metrics.json"
    deadline = time.time() + 600
    while not finished.is_file() and first.poll() is None and time.time() < deadline:
        time.sleep(1)
    assert finished.is_file(), "trial-000 did not finish"
    os.kill(first.pid, signal.SIGKILL)  # the sweep's driver: its local Ray runtime goes with it
    first.wait(timeout=60)
    stamp = finished.stat().st_mtime_ns
    assert not (out / "sweep.json").exists()
    assert mlflow_trial_runs(out).get("trial-000") == 1

    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 trials (1 done before)" in again.stdout
    assert finished.stat().st_mtime_ns == stamp  # not trained again
    assert mlflow_trial_runs(out) == {"trial-000": 1, "trial-001": 1}
    result = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in result["trials"]] == ["finished", "finished"]
    assert result["trials"][0]["metric"] == json.loads(finished.read_text())["metrics"]["dev/f1"]
    # the killed run's Ray processes are gone (its runtime died with its driver); zombies do not count: a
    # container whose PID 1 does not reap keeps exited processes in the table
    leftovers = live_processes_in_group(first.pid)
    for proc in leftovers:
        proc.kill()
    assert not leftovers, [" ".join(proc.cmdline()[:3]) for proc in leftovers]


def live_processes_in_group(pgid: int, wait_s: float = 60.0) -> list:
    """Processes of process group `pgid` that have not exited, after waiting up to `wait_s` for them to go."""
    import psutil

    deadline = time.time() + wait_s
    while True:
        live = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                    live.append(proc)
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue
        if not live or time.time() > deadline:
            return live
        time.sleep(1)


# ----------------------------------------------------------------------------- the pipeline stage


def sweep_spec(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "workdir": str(tmp_path / "work"),
                                    "stages": {"sweep_mrpc": {"kind": "sweep", "config": config}}}))
    return path


def test_sweep_stage_parses_once_and_keys_what_changes_results(tmp_path, datasets_dir, minilm_dir):
    from pipelines.dag.graph import Graph
    from pipelines.dag.spec import load_spec
    from pipelines.dag.stages import build_stages

    config = {"task": "mrpc", "data": str(datasets_dir), "checkpoint": str(minilm_dir), "grid": "paper",
              "scheduler": "asha", "seeds": [1, 2, 3], "max_train_examples": 500}
    path = sweep_spec(tmp_path, config)

    def key(*overrides: str) -> str:
        spec = load_spec(path, overrides)
        return Graph.build(build_stages(spec), spec.workdir).nodes["sweep_mrpc"].key

    node = Graph.build(build_stages(load_spec(path)), tmp_path / "work").nodes["sweep_mrpc"]
    assert node.stage.config.options.rerun_seeds == (1, 2, 3) and len(node.stage.config.space) == 3
    assert key() == key("sweep_mrpc.max_concurrent=2") == key("sweep.log_every=5")
    assert len({key(), key("sweep.scheduler=none"), key("sweep_mrpc.max_train_examples=400"),
                key("sweep_mrpc.seeds=[1,2]")}) == 4
    inline = sweep_spec(tmp_path, {**{k: v for k, v in config.items() if k != "grid"},
                                   "space": {"learning_rate": {"loguniform": [1e-4, 1e-5]}}})
    with pytest.raises(InputError, match=r"stage sweep_mrpc\.space: learning_rate\.loguniform: low 0\.0001 is above"):
        build_stages(load_spec(inline))
    from_file = tmp_path / "space.yaml"
    from_file.write_text("batch_size: {choice: [16, 32]}\n")
    spec = load_spec(sweep_spec(tmp_path, {**{k: v for k, v in config.items() if k != "grid"}, "space": str(from_file)}))
    assert list(build_stages(spec)[0].config.space) == ["batch_size"]
    with pytest.raises(InputError, match="task is missing"):
        build_stages(load_spec(sweep_spec(tmp_path, {k: v for k, v in config.items() if k != "task"})))


def test_shipped_sweep_spec_validates(tmp_path, datasets_dir, monkeypatch):
    from pipelines.dag.graph import Graph
    from pipelines.dag.spec import load_spec
    from pipelines.dag.stages import build_stages

    monkeypatch.setenv("BERTFLOW_DATASETS", str(datasets_dir))
    (tmp_path / "minilm").mkdir()
    spec = load_spec(ROOT / "pipelines" / "sweep_glue.yaml", [f"sweep.checkpoint={tmp_path / 'minilm'}"], str(tmp_path))
    graph = Graph.build(build_stages(spec), spec.workdir)
    assert list(graph.nodes) == ["sweep_mrpc", "sweep_stsb"]
    assert len(expand(graph.nodes["sweep_stsb"].stage.config.space, 12, 0)) == 12
