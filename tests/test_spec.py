"""Pipeline specs: validation before anything runs, overrides, keys, cron, cluster.yaml, preflight errors.

Fast: no Ray runtime is started (the preflight checks refuse before that).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from bert.errors import InputError
from pipelines.cli import main
from pipelines.dag.schedule import validate_cron
from pipelines.dag.graph import Graph
from pipelines.dag.spec import load_spec
from pipelines.dag.stages import build_stages

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"


def graph_of(path: Path, *overrides: str, workdir: Path | None = None) -> Graph:
    spec = load_spec(path, overrides, str(workdir) if workdir else None)
    return Graph.build(build_stages(spec), spec.workdir)


def write_spec(tmp_path: Path, stages: dict, **top) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "workdir": str(tmp_path / "work"), "stages": stages, **top}))
    return path


def test_shipped_specs_validate(tmp_path, datasets_dir, monkeypatch):
    monkeypatch.setenv("BERTFLOW_DATASETS", str(datasets_dir))
    quick = graph_of(QUICKSTART, workdir=tmp_path)
    assert list(quick.nodes) == ["corpus", "tokenizer", "shards_128", "shards_val", "shards_256", "pretrain_phase1",
                                 "pretrain_phase2", "finetune.pydoc_kind.seed1", "finetune.pydoc_kind.seed2",
                                 "random_init", "finetune_scratch.pydoc_kind.seed1", "finetune_scratch.pydoc_kind.seed2",
                                 "report"]
    base = graph_of(ROOT / "pipelines" / "bert_base_wikipedia.yaml", workdir=tmp_path)
    assert {n.split(".")[1] for n in base.nodes if n.startswith("finetune.")} == {
        "sst2", "mrpc", "stsb", "conll2003", "squad_v1_dev_split"}
    minilm = tmp_path / "minilm"
    minilm.mkdir()
    glue = graph_of(ROOT / "pipelines" / "finetune_glue.yaml", f"finetune.checkpoint={minilm}", workdir=tmp_path)
    assert len([n for n in glue.nodes if n.startswith("finetune.")]) == 4 * 3


def test_keys_change_exactly_downstream_of_a_setting(tmp_path):
    before = graph_of(QUICKSTART, workdir=tmp_path)
    assert graph_of(QUICKSTART, workdir=tmp_path).run_key() == before.run_key()  # deterministic

    def changed(*overrides: str) -> set[str]:
        after = graph_of(QUICKSTART, *overrides, workdir=tmp_path)
        return {n for n in before.nodes if before.nodes[n].key != after.nodes[n].key}

    # `finetune` names a stage and a kind: it sets both finetune stages
    assert changed("finetune.tasks.pydoc_kind.learning_rate=3e-5") == {
        "finetune.pydoc_kind.seed1", "finetune.pydoc_kind.seed2", "finetune_scratch.pydoc_kind.seed1",
        "finetune_scratch.pydoc_kind.seed2", "report"}
    assert changed("finetune_scratch.tasks.pydoc_kind.learning_rate=3e-5") == {
        "finetune_scratch.pydoc_kind.seed1", "finetune_scratch.pydoc_kind.seed2", "report"}
    assert changed("random_init.seed=7") == {
        "random_init", "finetune_scratch.pydoc_kind.seed1", "finetune_scratch.pydoc_kind.seed2", "report"}
    assert changed("pretrain_phase2.max_steps=61") == {
        "pretrain_phase2", "finetune.pydoc_kind.seed1", "finetune.pydoc_kind.seed2", "report"}
    assert changed("shards_256.dupe_factor=2") == {
        "shards_256", "pretrain_phase2", "finetune.pydoc_kind.seed1", "finetune.pydoc_kind.seed2", "report"}
    # a kind name sets every stage of that kind
    assert changed("pretrain.learning_rate=1e-4") >= {"pretrain_phase1", "pretrain_phase2"}
    # speed / logging settings stay out of the keys
    assert changed("pretrain.log_every=5", "shards.num_workers=1", "finetune.log_every=3") == set()
    # adding a seed adds a node and changes the report only
    after = graph_of(QUICKSTART, "finetune.seeds=[1, 2, 3]", workdir=tmp_path)
    assert set(after.nodes) - set(before.nodes) == {"finetune.pydoc_kind.seed3", "finetune_scratch.pydoc_kind.seed3"}
    assert {n for n in before.nodes if before.nodes[n].key != after.nodes[n].key} == {"report"}


@pytest.mark.parametrize(
    ("stages", "top", "message"),
    [
        ({"tok": {"kind": "tokenizer_v2"}}, {}, "unknown kind 'tokenizer_v2'; known kinds: pydoc_corpus"),
        ({"corpus": {"kind": "pydoc_corpus", "config": {"topicz": True}}}, {},
         "stage corpus: unknown setting 'topicz'; known settings: dev_fraction, modules, topics"),
        ({"corpus": {"kind": "pydoc_corpus", "confg": {}}}, {}, "unknown key 'confg'"),
        ({"corpus": {"kind": "pydoc_corpus", "config": {"dev_fraction": "a lot"}}}, {},
         "stage corpus.dev_fraction: expected a number, got 'a lot'"),
        ({"corpus": {"kind": "pydoc_corpus", "config": {"topics": 1}}}, {}, "topics: expected true or false, got 1"),
        ({"corpus": {"kind": "pydoc_corpus", "config": {"dev_fraction": 1.5}}}, {}, "dev_fraction must be in (0, 1)"),
        ({"corpus": {"kind": "pydoc_corpus"}}, {"worker": 3}, "unknown top-level key 'worker'"),
        ({"tokenizer": {"inputs": {"corpus": "nowhere"}, "config": {"vocab_size": 100}}}, {},
         "input 'corpus' names stage 'nowhere', which is not in the spec"),
        ({"tokenizer": {"config": {"vocab_size": 100, "corpus": ["/no/such/corpus.txt"]}}}, {},
         "path /no/such/corpus.txt does not exist"),
        ({"tokenizer": {"config": {"vocab_size": 100}}}, {}, "a corpus (input corpus or corpus paths)"),
        ({"corpus": {"kind": "pydoc_corpus"}, "tokenizer": {"inputs": {"corpus": "corpus"}, "config": {"vocab_size": 99}},
          "shards": {"inputs": {"tokenizer": "tokenizer", "corpus": "corpus"}},
          "pretrain": {"inputs": {"shards": "shards"}, "config": {"global_batch_size": 30, "micro_batch_size": 8}}}, {},
         "stage pretrain: pretrain: global batch 30 is not divisible"),
        ({"corpus": {"kind": "pydoc_corpus"}, "tokenizer": {"inputs": {"corpus": "corpus"}, "config": {"vocab_size": 99}},
          "shards": {"inputs": {"tokenizer": "tokenizer", "corpus": "corpus"}},
          "pretrain": {"inputs": {"shards": "shards"}, "config": {"shards": "/elsewhere"}}}, {},
         "'shards' is set by the pipeline"),
        ({"finetune": {"config": {"checkpoint": "/", "data": "/", "tasks": {"glue_9000": {}}}}}, {},
         "unknown task 'glue_9000'"),
    ],
)
def test_bad_specs_are_refused_before_anything_runs(tmp_path, stages, top, message):
    path = write_spec(tmp_path, stages, **top)
    with pytest.raises(InputError) as info:
        graph_of(path)
    assert message in str(info.value)
    assert not (tmp_path / "work").exists()


def test_cycle_is_refused(tmp_path, capsys):
    path = write_spec(tmp_path, {
        "tokenizer": {"inputs": {"corpus": "shards"}, "config": {"vocab_size": 100}},
        "shards": {"inputs": {"tokenizer": "tokenizer", "corpus": "tokenizer"}},
    })
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "the stages form a cycle (output -> input):" in err and (
        "tokenizer -> shards -> tokenizer" in err or "shards -> tokenizer -> shards" in err)
    assert not (tmp_path / "work").exists()


def test_bad_overrides(tmp_path):
    with pytest.raises(InputError, match="no stage or stage kind named 'pretrian'"):
        load_spec(QUICKSTART, ["pretrian.max_steps=10"])
    with pytest.raises(InputError, match="expected KEY=VALUE"):
        load_spec(QUICKSTART, ["pretrain.max_steps"])
    with pytest.raises(InputError, match="pretrain_phase1.max_steps: expected an integer, got 'many'"):
        graph_of(QUICKSTART, "pretrain_phase1.max_steps=many")
    with pytest.raises(InputError, match="unknown setting 'max_stepz'"):
        graph_of(QUICKSTART, "pretrain.max_stepz=10")
    spec = load_spec(QUICKSTART, ["pretrain.max_steps=100", "finetune.seeds=[3]", "max_concurrent=2"], "/tmp/x")
    assert spec.stages["pretrain_phase1"].config["max_steps"] == 100
    assert spec.stages["pretrain_phase2"].config["max_steps"] == 100
    assert spec.stages["finetune"].config["seeds"] == [3] and spec.max_concurrent == 2
    assert spec.workdir == Path("/tmp/x")


def test_cron_validation():
    for good in ("0 3 * * *", "*/15 * * * 1-5", "30 2 1,15 jan-jun sun", "@daily"):
        assert validate_cron(good)
    for bad, message in [("0 3 * *", "expected 5 fields"), ("61 * * * *", "minute '61' is not in 0-59"),
                         ("0 3 * * mon-sun", "runs backwards"), ("*/0 * * * *", "step '0'"),
                         ("0 25 * * *", "hour '25'")]:
        with pytest.raises(InputError, match=message):
            validate_cron(bad)


def test_schedule_prints_crontab_and_raycronjob(tmp_path, capsys):
    assert main(["schedule", str(QUICKSTART), "--cron", "0 3 * * *", "--workdir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "\n0 3 * * * cd " in "\n" + out and "pipelines.cli run" in out
    manifest = yaml.safe_load(out.split("---\n", 1)[1])
    assert manifest["kind"] == "RayCronJob" and manifest["spec"]["schedule"] == "0 3 * * *"
    assert "pipelines/quickstart.yaml" in manifest["spec"]["jobTemplate"]["entrypoint"]
    assert main(["schedule", str(QUICKSTART), "--cron", "0 3 * *"]) == 2


def test_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    prepared = prepare_config(config)
    validate_config(prepared)
    types = prepared["available_node_types"]
    head, worker = types[prepared["head_node_type"]], types["gpu_worker"]
    assert "p4d" in worker["node_config"]["InstanceType"] and worker["max_workers"] >= 1
    assert head["max_workers"] == 0
    assert any("pip install -e ." in c for c in prepared["setup_commands"])
    broken = dict(config, available_node_types={"head_cpu": {"node_config": {}, "resources": {}, "max_workers": "x"}})
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_or_mlflow_is_refused_with_no_state(tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    port = _closed_port()
    assert main(["run", str(QUICKSTART), "--workdir", str(work), "--address", f"127.0.0.1:{port}"]) == 2
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["submit", str(QUICKSTART), "--workdir", str(work), "--address", f"http://127.0.0.1:{port}"]) == 2
    assert f"cannot reach the Ray cluster at http://127.0.0.1:{port}" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    assert main(["run", str(QUICKSTART), "--workdir", str(work)]) == 2
    assert "cannot reach MLflow tracking server" in capsys.readouterr().err
    assert not work.exists()


def test_submit_needs_an_absolute_shared_workdir(capsys):
    assert main(["submit", str(QUICKSTART), "--address", "http://127.0.0.1:1"]) == 2
    assert "workdir 'out/quickstart' is relative" in capsys.readouterr().err
