"""Jobs whose inputs and outputs live on an object store: a real S3 API (moto on loopback, tests/s3server.py),
real Ray, real MLflow. Nothing mocked: the jobs reach the server through bert/storage.py (pyarrow's S3
client), pipelines/lease.py (boto3) and MLflow's S3 artifact repository (boto3), as they would reach AWS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from bert import storage
from bert.errors import InputError
from bert.pretrain import TrainState
from cli_helpers import wait_for
from pipelines.jobs.configs import PretrainConfig
from pipelines.jobs.pretrain import latest_checkpoint, run_pretraining

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]

TINY = dict(model="tiny", num_workers=1, global_batch_size=16, micro_batch_size=4, warmup_steps=2,
            learning_rate=1e-3, log_every=2, checkpoint_every=100, max_steps=4, precision="fp32")


@pytest.fixture(scope="module")
def tiny_checkpoint(minilm_dir, tmp_path_factory) -> Path:
    """A BERT-tiny (L2/H128) with MiniLM's vocabulary, as bertflow saves a checkpoint: a sixth of MiniLM's bytes,
    for the tests where each trial's checkpoint upload to the store, not the model, is what is under test."""
    from bert.checkpoint import save_pretrained
    from bert.config import preset
    from bert.model import BertForPreTraining
    from bert.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(minilm_dir)
    torch.manual_seed(0)
    model = BertForPreTraining(preset("tiny", vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id))
    return save_pretrained(model, tmp_path_factory.mktemp("ck") / "tiny", tokenizer_dir=minilm_dir)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """The local side of remote outputs (tracking store, downloaded checkpoints) in the test's tmp dir."""
    monkeypatch.setenv("BERTFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def s3_shards(small_shards, s3_server) -> str:
    """The session's small shards, uploaded: pretraining reads them from the store."""
    uri = s3_server.uri("inputs", "shards")
    storage.upload_dir(small_shards, uri)
    return uri


def s3_weights(uri: str) -> dict[str, torch.Tensor]:
    return load_safetensors(storage.read_bytes(storage.join(uri, "checkpoint", "model.safetensors")))


def test_pretraining_killed_and_resumed_on_s3_ends_bit_identical_to_an_uninterrupted_run_on_disk(
        ray_local, small_shards, s3_shards, s3_uri, s3_server, tmp_path):
    """A driver SIGKILLed mid-run (shards and --out on the store), re-run: it takes its own dead lease over at once,
    removes the torn save, resumes from the newest complete checkpoint and ends with the weights of a run on disk."""
    steps = dict(TINY, max_steps=12, checkpoint_every=4, log_every=2)
    full = run_pretraining(PretrainConfig(**steps, shards=str(small_shards), out=str(tmp_path / "full")))
    assert full["complete"] and full["step"] == 12

    out = f"{s3_uri}/resumed"
    args = ["pretrain", "--shards", s3_shards, "--out", out, *(f"--{k.replace('_', '-')}={v}" for k, v in steps.items())]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "killed.log"
    with open(log, "w") as f:
        driver = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], env=env, stdout=f,
                                  stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: latest_checkpoint(out) is not None or driver.poll() is not None, 600, "a checkpoint on S3")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    killed_at = TrainState.read(latest_checkpoint(out)).step
    assert 4 <= killed_at < 12, log.read_text()[-3000:]
    assert not storage.exists(f"{out}/checkpoint") and not storage.exists(f"{out}/_manifest.json")
    # a save killed half-way: weights uploaded (cut short), the run-state record never
    torn = f"{out}/_ray/train/step-00000011"
    storage.write_bytes(f"{torn}/model.safetensors", b"\0" * 1000)
    assert latest_checkpoint(out) != torn  # never taken for a checkpoint

    resumed = run_pretraining(PretrainConfig(**steps, shards=s3_shards, out=out))
    assert resumed["complete"] and resumed["step"] == 12
    assert not storage.exists(torn)  # removed by the run that resumed
    a, b = load_file(tmp_path / "full" / "checkpoint" / "model.safetensors"), s3_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    manifest = storage.read_json(f"{out}/_manifest.json")  # written last
    assert manifest["checkpoint"] == f"{out}/checkpoint" and manifest["step"] == 12
    keys = _tree(s3_server, out)
    assert f"{out.split('/', 3)[3]}/checkpoint/train_state.json" in keys
    assert any("/mlartifacts/" in k and k.endswith("model.safetensors") for k in keys)  # MLflow's copy, on the store
    assert run_pretraining(PretrainConfig(**steps, shards=s3_shards, out=out))["step"] == 12  # finished: nothing done


def test_finetune_from_an_s3_checkpoint_writes_its_outputs_and_mlflow_artifacts_to_s3_and_they_load_back(
        datasets_dir, minilm_dir, s3_server, s3_uri, ray_local):
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from bert.checkpoint import from_pretrained
    from pipelines.jobs.configs import FinetuneConfig
    from pipelines.jobs.finetune import run_finetune
    from pipelines.tracking import fluent_tracking_uri

    checkpoint = f"{s3_uri}/minilm"  # the Hugging Face layout, as published
    storage.upload_dir(minilm_dir, checkpoint)
    data = f"{s3_uri}/data"  # the task's data dir, on the store too
    storage.upload_dir(datasets_dir / "glue" / "SST-2", f"{data}/glue/SST-2")
    out = f"{s3_uri}/sst2"
    config = FinetuneConfig(task="sst2", data=data, checkpoint=checkpoint, out=out, epochs=1,
                            max_train_examples=48, max_eval_examples=32, batch_size=16, learning_rate=5e-5)
    result = run_finetune(config)

    names = {rel for rel, _ in storage.walk_files(out)}
    assert {"metrics.json", "predictions.jsonl", "checkpoint/model.safetensors", "checkpoint/config.json",
            "checkpoint/vocab.txt", "_job.json", "mlflow_run.json"} <= names
    assert not any(n.startswith(("_ray/", "_best/")) for n in names)  # working state removed at the end
    assert storage.read_json(f"{out}/metrics.json") == result
    predictions = storage.read_text(f"{out}/predictions.jsonl").splitlines()
    assert len(predictions) == result["num_eval_examples"]["dev"] == 32
    # the fine-tuned checkpoint loads back from the store and predicts what predictions.jsonl says
    model = from_pretrained(storage.local_copy(f"{out}/checkpoint"))
    assert model.config.hidden_size == 384
    # MLflow: artifacts and the pyfunc model live on the store (boto3, AWS_ENDPOINT_URL), and load back
    run = result["mlflow"]
    client = MlflowClient(run["tracking_uri"])
    artifact_uri = client.get_run(run["run_id"]).info.artifact_uri
    assert artifact_uri.startswith(f"{out}/mlartifacts/"), artifact_uri
    assert {"metrics.json", "predictions.jsonl"} <= {a.path for a in client.list_artifacts(run["run_id"])}
    key_prefix = artifact_uri.split("/", 3)[3]
    assert any(k.endswith("predictions.jsonl") for k in s3_server.keys(key_prefix))
    with fluent_tracking_uri(run["tracking_uri"]):
        pyfunc = mlflow.pyfunc.load_model(run["model_uri"])
    first = [json.loads(line) for line in predictions[:8]]
    sentences = _sst2_dev_sentences(datasets_dir, {r["id"] for r in first})
    predicted = list(pyfunc.predict(pd.DataFrame({"text": [sentences[r["id"]] for r in first]}))["label"])
    assert predicted == [r["prediction"] for r in first]
    assert run_finetune(config) == result  # finished: found on the store, nothing done


def _sst2_dev_sentences(datasets_dir: Path, ids: set) -> dict:
    import csv

    path = next(p for p in (datasets_dir / "glue" / "SST-2" / "dev.tsv", datasets_dir / "SST-2" / "dev.tsv")
                if p.is_file())
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return {str(i): row["sentence"] for i, row in enumerate(rows) if str(i) in ids}


# ----------------------------------------------------------------------------- a sweep on the store


def test_a_sweep_to_s3_writes_trials_table_and_mlflow_artifacts_there_and_resumes_what_is_missing(
        ray_local, datasets_dir, tiny_checkpoint, s3_server, s3_uri, tmp_path, capsys):
    """`bertflow sweep --out s3://...`: every trial's fine-tune, the records, table, plot and sweep.json (committed
    last, under the lease) on the store; the MLflow artifacts under <out>/mlartifacts; re-run finished: nothing done;
    with a trial's outputs gone (as after a kill), the re-run trains that trial only. No re-run of the best settings
    (`--seeds none`): that is a fine-tune into <out>/best, the same job as a trial's (and as
    test_finetune_from_an_s3_checkpoint_...), and two more Ray Train runs of the default suite's budget."""
    from mlflow.tracking import MlflowClient

    from pipelines.jobs.configs import FinetuneConfig
    from pipelines.jobs.sweep import run_sweep
    from pipelines.jobs.sweep_space import SweepOptions

    out = f"{s3_uri}/sweep"
    space = tmp_path / "space.yaml"
    space.write_text("learning_rate: {grid: [1.0e-4, 1.0e-7]}\n")
    base = FinetuneConfig(task="mrpc", data=str(datasets_dir / "glue" / "MRPC"), checkpoint=str(tiny_checkpoint),
                          out=out, epochs=1, max_train_examples=32, max_eval_examples=32, batch_size=16, precision="fp32",
                          log_every=1)
    options = SweepOptions(space=str(space), seeds="none")
    result = run_sweep(base, options)

    assert storage.read_json(f"{out}/sweep.json") == result
    names = {rel for rel, _ in storage.walk_files(out)}
    assert {"trials.csv", "sweep.png", "_job.json", "trials/trial-000.json", "trials/trial-001.json",
            "trials/trial-000/metrics.json", "trials/trial-001/metrics.json"} <= names
    assert not any(n.startswith(("_tune/", "trials/trial-000/checkpoint/", "trials/trial-000/_ray/", "best/"))
                   for n in names)
    assert storage.read_bytes(f"{out}/sweep.png")[:4] == b"\x89PNG"
    assert storage.read_text(f"{out}/trials.csv").splitlines()[0].startswith("trial,learning_rate,dev/f1")
    assert storage.read_json(f"{out}/_lease.json")["released"]
    rows = {r["trial"]: r for r in result["trials"]}
    assert [r["status"] for r in rows.values()] == ["finished", "finished"]
    assert result["rerun"] is None
    client = MlflowClient(result["mlflow"]["tracking_uri"])
    parent = client.get_run(result["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED" and parent.info.artifact_uri.startswith(f"{out}/mlartifacts/")
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep.json", "trials.csv", "sweep.png"}
    assert any(k.endswith("/trials.csv") for k in _tree(s3_server, f"{out}/mlartifacts/"))

    before = _tree(s3_server, out)
    capsys.readouterr()
    assert run_sweep(base, options) == result
    assert "is complete; nothing to do" in capsys.readouterr().out
    assert _tree(s3_server, out) == before

    # as a sweep killed after trial-000 finished leaves it: no sweep.json, trial-001 not done
    for gone in ("sweep.json", "trials.csv", "sweep.png", "trials/trial-001.json", "trials/trial-001"):
        storage.remove(f"{out}/{gone}")
    kept = {k: v for k, v in _tree(s3_server, f"{out}/trials/trial-000").items()}
    capsys.readouterr()
    again = run_sweep(base, options)
    assert "2 trials (1 done before)" in capsys.readouterr().out
    assert {k: v for k, v in _tree(s3_server, f"{out}/trials/trial-000").items()} == kept  # not trained again
    assert again["trials"][0] == result["trials"][0] and again["mlflow"]["run_id"] == result["mlflow"]["run_id"]
    assert storage.read_json(f"{out}/sweep.json") == again


# ----------------------------------------------------------------------------- a pipeline's workdir on the store


def test_a_graph_on_an_s3_workdir_runs_caches_cleans_a_killed_publish_and_refuses_a_second_run(
        ray_local, s3_server, s3_uri, tmp_path):
    """The DAG core with a workdir on the store: outputs and manifests are objects, the lease is the lock."""
    import sys as _sys

    import test_dag
    from pipelines import lease
    from pipelines.dag.graph import MANIFEST, Graph, lock_holder
    from pipelines.dag.runner import run_graph

    ray_local.cloudpickle.register_pickle_by_value(test_dag)  # its stage functions, in Ray workers
    assert _sys.modules["test_dag"] is test_dag
    log = tmp_path / "log"
    log.mkdir()
    work = f"{s3_uri}/work"
    graph = Graph.build(test_dag.diamond(log), work)
    d = graph.nodes["d"]
    assert d.final == f"{work}/d/{d.key}"
    assert sorted(run_graph(graph).done) == ["a", "b", "c", "d"]
    assert storage.read_text(f"{d.final}/value.txt") == "a+b+a+c+d"
    assert storage.read_json(f"{d.final}/{MANIFEST}")["key"] == d.key
    keys = _tree(s3_server, work)
    assert not any(".work/" in k or k.endswith(".running") for k in keys)  # work prefixes and markers removed
    assert storage.read_json(f"{work}/_lease.json")["released"] and lock_holder(work) is None
    assert graph.status() == dict.fromkeys("abcd", "cached")

    again = run_graph(Graph.build(test_dag.diamond(log), work))
    assert again.done == [] and sorted(again.cached) == ["a", "b", "c", "d"]
    assert test_dag.counts(log) == dict.fromkeys("abcd", 1)

    # a killed run's leftovers: an upload cut short (objects, no manifest) and a running marker
    changed = Graph.build(test_dag.diamond(log, b="B"), work)
    b = changed.nodes["b"]
    storage.write_text(f"{b.final}/value.txt", "half")
    storage.write_text(b.running_marker, "pid 1")
    assert changed.status()["b"] == "missing"
    result = run_graph(changed)
    assert sorted(result.done) == ["b", "d"] and sorted(result.cached) == ["a", "c"]
    assert storage.read_text(f"{b.final}/value.txt") == "a+B" and not storage.exists(b.running_marker)

    # a second run while another writer holds the workdir's lease: refused, nothing changed
    with lease.acquire(work, job="bertflow run"):
        assert "bertflow run" in lock_holder(work)
        before = _tree(s3_server, work)
        _refused(lambda: run_graph(Graph.build(test_dag.diamond(log, a="A"), work)), "in use by another writer")
        assert _tree(s3_server, work) == before
    assert test_dag.counts(log) == {"a": 1, "b": 2, "c": 1, "d": 2}


def test_the_random_init_of_evaluate_checkpoints_is_published_whole_on_s3_and_known_by_its_content(
        vocab_txt, s3_server, s3_uri, tmp_path):
    """Built once, uploaded, then its manifest: a second call writes nothing; objects without the manifest (a
    killed upload) are not taken for it; its content id is the same from the store, a local copy, and a local cache."""
    from bert.checkpoint import save_pretrained
    from bert.config import preset
    from bert.model import BertForPreTraining
    from bert.tokenizer import Tokenizer
    from pipelines.dag.evaluate_stage import content_id, random_init_checkpoint

    tokenizer = Tokenizer.from_vocab_file(str(vocab_txt))
    tokenizer.save(tmp_path / "tokenizer")
    like = save_pretrained(BertForPreTraining(preset("tiny", vocab_size=tokenizer.vocab_size)), tmp_path / "like",
                           tokenizer_dir=tmp_path / "tokenizer")
    cache = f"{s3_uri}/evaluate_checkpoints/_cache"
    made = random_init_checkpoint(like, 7, cache)
    home = made.rsplit("/", 1)[0]
    assert made == f"{home}/checkpoint" and home.startswith(f"{cache}/random-init-")
    manifest = storage.read_json(f"{home}/_manifest.json")
    assert dict(storage.walk_files(made)) == manifest["files"] and "vocab.txt" in manifest["files"]
    identity = content_id(made)
    assert content_id(storage.local_copy(made)) == identity
    before = _tree(s3_server, cache)
    assert random_init_checkpoint(like, 7, cache) == made and _tree(s3_server, cache) == before  # found: nothing written

    storage.remove(f"{home}/_manifest.json")  # as a killed upload leaves it: a torn object, no manifest
    storage.write_bytes(f"{made}/model.safetensors", b"\0" * 100)
    assert random_init_checkpoint(like, 7, cache) == made
    assert storage.read_json(f"{home}/_manifest.json") == manifest and content_id(made) == identity
    assert content_id(random_init_checkpoint(like, 7, tmp_path / "_cache")) == identity  # a local workdir's cache


@pytest.mark.slow  # about 3.5 minutes on this 2-core machine under load (pretraining and 4 fine-tunes); -m slow
def test_evaluate_checkpoints_on_an_s3_workdir_caches_its_fine_tunes_on_the_store_and_reruns_only_what_is_gone(
        ray_local, datasets_dir, vocab_txt, s3_server, s3_uri, tmp_path):
    """tests/test_evaluate_stage.py's spec (4 pretraining steps here, a checkpoint every 2) on an s3:// workdir:
    the pretrain stage's checkpoints reach the fine-tunes as URIs, their outputs and the random init are cached under
    the workdir's prefix, curves.json/curves.png are published with the manifest; run again (forced, and a second
    stage naming the checkpoints by URI), every fine-tune is found cached and nothing in the cache is rewritten; with
    one job's outputs gone, a forced run fine-tunes that job alone."""
    import yaml
    from mlflow.tracking import MlflowClient

    from pipelines.cli import main as cli
    from test_evaluate_stage import write_spec

    work = f"{s3_uri}/work"
    spec = yaml.safe_load(write_spec(tmp_path, datasets_dir, vocab_txt, every=1).read_text())
    spec["workdir"] = work
    spec["stages"]["pretrain"]["config"]["max_steps"] = 4  # checkpoints at steps 2 and 4
    first_spec = tmp_path / "s3.yaml"
    first_spec.write_text(yaml.safe_dump(spec))
    assert cli(["run", str(first_spec)]) == 0

    def outputs(kind: str) -> list[str]:
        return [f"{work}/{kind}/{n}" for n in storage.list_dir(f"{work}/{kind}")
                if storage.is_file(f"{work}/{kind}/{n}/_manifest.json")]

    (pretrain,) = outputs("pretrain")
    (curves_dir,) = outputs("evaluate_checkpoints")
    result = storage.read_json(f"{curves_dir}/_manifest.json")["result"]
    assert result["jobs"] == 3 and result["cached_jobs"] == 0  # steps 2 and 4, and the random init
    curves = storage.read_json(f"{curves_dir}/curves.json")["tasks"]["sst2"]
    assert [(p["step"], p["cached"]) for p in curves["points"]] == [(2, False), (4, False)]
    assert curves["random_init"] is not None and all(0.0 <= p["mean"] <= 1.0 for p in curves["points"])
    png = storage.read_bytes(f"{curves_dir}/curves.png")
    assert png[:4] == b"\x89PNG" and len(png) > 10_000
    cache = f"{work}/evaluate_checkpoints/_cache"
    files = {rel for rel, _ in storage.walk_files(cache)}
    finished = sorted(rel.rsplit("/", 1)[0] for rel in files if rel.endswith("/metrics.json") and rel.count("/") == 2)
    assert len(finished) == 3
    (random_init,) = [rel.split("/")[0] for rel in files if rel.endswith("/_manifest.json") and rel.count("/") == 1]
    assert {f"{random_init}/checkpoint/model.safetensors", f"{random_init}/checkpoint/vocab.txt"} <= files
    job_of = {storage.read_json(f"{cache}/{job}/_job.json")["identity"]["checkpoint"]: job for job in finished}
    assert set(job_of) == {f"{pretrain}/checkpoints/step-00000002", f"{pretrain}/checkpoints/step-00000004",
                           f"{cache}/{random_init}/checkpoint"}  # URIs: readable from any node
    mlflow = result["mlflow"]
    client = MlflowClient(mlflow["tracking_uri"])
    children = client.search_runs([client.get_run(mlflow["run_id"]).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{mlflow['run_id']}'")
    assert len(children) == 3 and all(c.info.artifact_uri.startswith(f"{work}/mlartifacts/") for c in children)
    assert len(client.get_metric_history(mlflow["run_id"], "sst2/dev/accuracy")) == 2
    assert any(k.endswith("/curves.png") for k in _tree(s3_server, f"{work}/mlartifacts/"))

    # forced, with a second stage that names the published checkpoints by URI: every fine-tune is in the cache
    spec["stages"]["by_uri"] = {"kind": "evaluate_checkpoints",
                                "config": dict(spec["stages"]["curves"]["config"], checkpoints=f"{pretrain}/checkpoints")}
    second_spec = tmp_path / "s3-by-uri.yaml"
    second_spec.write_text(yaml.safe_dump(spec))
    before = _tree(s3_server, cache)
    assert cli(["run", str(second_spec), "--force", "curves"]) == 0
    assert _tree(s3_server, cache) == before  # nothing in the cache fine-tuned or written again
    stages = {storage.read_json(f"{out}/_manifest.json")["name"]: out for out in outputs("evaluate_checkpoints")}
    assert set(stages) == {"curves", "by_uri"}
    for out in stages.values():
        assert storage.read_json(f"{out}/_manifest.json")["result"]["cached_jobs"] == 3
        points = storage.read_json(f"{out}/curves.json")["tasks"]["sst2"]["points"]
        assert [(p["step"], p["per_seed"]) for p in points] == [(p["step"], p["per_seed"]) for p in curves["points"]]

    # one job's outputs gone (as after a kill): a forced run fine-tunes that job alone
    gone = job_of[f"{pretrain}/checkpoints/step-00000002"]
    storage.remove(f"{cache}/{gone}")
    kept = {k: v for k, v in before.items() if f"/_cache/{gone}/" not in k}
    assert cli(["run", str(first_spec), "--force", "curves"]) == 0
    result = storage.read_json(f"{stages['curves']}/_manifest.json")["result"]
    assert result["jobs"] == 3 and result["cached_jobs"] == 2
    points = storage.read_json(f"{stages['curves']}/curves.json")["tasks"]["sst2"]
    assert [(p["step"], p["cached"]) for p in points["points"]] == [(2, False), (4, True)]
    assert points["random_init"]["cached"]
    after = _tree(s3_server, cache)
    assert {k: v for k, v in after.items() if k in kept} == kept  # the other jobs' objects untouched
    assert storage.is_file(f"{cache}/{gone}/metrics.json")


# Small but real: every stage runs; phase 1 checkpoints every 5 of its 20 steps (the test kills it at the first),
# one seed per fine-tune stage trains one epoch on 64 examples and is scored on 64.
QUICKSTART_FAST = [
    "--set", "pretrain_phase1.max_steps=20", "--set", "pretrain_phase1.warmup_steps=2",
    "--set", "pretrain_phase1.checkpoint_every=5", "--set", "pretrain_phase1.eval_examples=64",
    "--set", "pretrain_phase2.max_steps=2", "--set", "pretrain_phase2.warmup_steps=1",
    "--set", "pretrain_phase2.eval_examples=64",
    *[item for stage in ("finetune", "finetune_scratch") for item in (
        "--set", f"{stage}.seeds=[1]", "--set", f"{stage}.epochs=1", "--set", f"{stage}.max_train_examples=64",
        "--set", f"{stage}.max_eval_examples=64")],
]


def test_quickstart_pipeline_with_an_s3_workdir_end_to_end_killed_and_resumed(ray_local, s3_server, s3_uri,
                                                                               tmp_path):
    """`bertflow run pipelines/quickstart.yaml --workdir s3://...`: SIGKILLed once phase-1 pretraining has a
    checkpoint on the store, run again: it resumes that pretraining from its checkpoint into the same MLflow
    runs, finishes every stage on the store (manifests last), puts the MLflow artifacts under the workdir, and a
    third run finds every stage cached."""
    from mlflow.tracking import MlflowClient

    work = f"{s3_uri}/quickstart"
    args = [sys.executable, "-m", "pipelines.cli", "run", "pipelines/quickstart.yaml", "--workdir", work,
            *QUICKSTART_FAST]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT),
           "PYTHONUNBUFFERED": "1", "BERTFLOW_CACHE": str(tmp_path / "cache")}
    bertflow = lambda **kw: subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True, text=True, **kw)  # noqa: E731
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        first = bertflow(stdout=f, stderr=subprocess.STDOUT)
    checkpoint = lambda: [k for k in _tree(s3_server, f"{work}/pretrain/")  # noqa: E731
                          if "/_ray/train/step-" in k and k.endswith("train_state.json")]
    try:
        wait_for(lambda: checkpoint() or first.poll() is not None, 1200, "a phase-1 checkpoint on S3")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert checkpoint(), log.read_text()[-3000:]
    runs_file = next(k for k in _tree(s3_server, f"{work}/runs/"))
    parent = storage.read_json(f"s3://{s3_server.bucket}/{runs_file}")["parent_run_id"]

    second = bertflow(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = second.communicate(timeout=2400)
    assert second.returncode == 0, (out + err)[-4000:]
    assert "[pretrain] resuming from s3://" in out, out[-3000:]
    assert storage.read_json(f"s3://{s3_server.bucket}/{runs_file}")["parent_run_id"] == parent  # same MLflow run
    keys = _tree(s3_server, work)
    prefix = work.split("/", 3)[3]
    manifests = {k.split("/")[-3] for k in keys if k.endswith("/_manifest.json") and "/mlartifacts/" not in k
                 and k.count("/") == prefix.count("/") + 3}
    assert manifests == {"pydoc_corpus", "tokenizer", "shards", "pretrain", "finetune", "random_init", "report"}
    assert not any(".work/" in k for k in keys)  # every work prefix removed once its stage was published
    assert any(f"{prefix}/pretrain/" in k and k.endswith("/checkpoint/model.safetensors") for k in keys)
    assert any(f"{prefix}/report/" in k and k.endswith("/report.md") for k in keys)
    assert any(k.startswith(f"{prefix}/mlartifacts/") and k.endswith("report.md") for k in keys)  # parent's report
    assert any(k.startswith(f"{prefix}/mlartifacts/") and k.endswith("model.safetensors") for k in keys)  # a job's
    tracking = next((tmp_path / "cache" / "tracking").glob("*/mlflow.db"))
    client = MlflowClient(f"sqlite:///{tracking}")
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith(f"{work}/mlartifacts/")
    assert "report" in {a.path for a in client.list_artifacts(parent)}
    results = json.loads(storage.read_text(next(f"s3://{s3_server.bucket}/{k}" for k in keys
                                                 if f"{prefix}/report/" in k and k.endswith("/results.json"))))
    assert results  # the report read every stage's output from the store

    third = bertflow(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = third.communicate(timeout=900)
    assert third.returncode == 0, err[-3000:]
    assert "0 stage(s) ran, 11 cached" in out, out[-2000:]


# ----------------------------------------------------------------------------- refusals: one line, nothing written


def _tree(s3_server, uri: str) -> dict[str, str]:
    return s3_server.keys(uri.split("/", 3)[3])


def _refused(run, match: str, within_s: float = 20.0) -> str:
    started = time.monotonic()
    with pytest.raises(InputError, match=match) as caught:
        run()
    assert time.monotonic() - started < within_s
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_a_second_writer_to_an_s3_output_is_refused_and_changes_nothing(small_shards, s3_server, s3_uri):
    from pipelines import lease

    out = f"{s3_uri}/run"
    config = PretrainConfig(**TINY, shards=str(small_shards), out=out)
    with lease.acquire(out, job="pretrain"):  # a live writer of this output (another machine, say), just starting
        before = _tree(s3_server, out)
        message = _refused(lambda: run_pretraining(config), "in use by another writer")
        assert out in message and "_lease.json" in message
        assert _tree(s3_server, out) == before  # same objects, same ETags
    storage.write_json(f"{out}/_job.json", {"job": "finetune", "identity": {}, "identity_sha256": "y"})
    before = _tree(s3_server, out)
    _refused(lambda: run_pretraining(config), "holds a `bertflow finetune` run, not a `bertflow pretrain` run")
    assert _tree(s3_server, out) == before


def test_bad_credentials_a_missing_bucket_and_an_unreachable_endpoint_are_one_line_within_seconds(
        small_shards, s3_server, s3_uri, monkeypatch, tmp_path):
    from s3server import free_port

    out = f"{s3_uri}/run"
    run = lambda out=out: run_pretraining(PretrainConfig(**TINY, shards=str(small_shards), out=out))  # noqa: E731
    with s3_server.checking_credentials():
        _refused(run, rf"^{out}.*access denied: check the credentials")
    assert _tree(s3_server, out) == {}
    _refused(lambda: run("s3://no-such-bucket-bertflow/run"), "bucket no-such-bucket-bertflow does not exist")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    _refused(run, rf"^{out}.*cannot reach the object store at http://127\.0\.0\.1")
    monkeypatch.undo()
    assert _tree(s3_server, out) == {}
    assert not (tmp_path / "cache").exists()  # not even the local side of the output was made


def test_a_truncated_checkpoint_object_is_named_by_its_uri(datasets_dir, minilm_dir, s3_uri, tmp_path):
    from pipelines.jobs.configs import FinetuneConfig
    from pipelines.jobs.finetune import run_finetune

    checkpoint = f"{s3_uri}/minilm"
    storage.upload_dir(minilm_dir, checkpoint)
    data = (minilm_dir / "model.safetensors").read_bytes()
    storage.write_bytes(f"{checkpoint}/model.safetensors", data[: len(data) // 2])  # an upload cut short
    out = f"{s3_uri}/sst2"
    config = FinetuneConfig(task="sst2", data=str(datasets_dir), checkpoint=checkpoint, out=out, epochs=1,
                            max_train_examples=16, max_eval_examples=16)
    _refused(lambda: run_finetune(config), rf"^{checkpoint}/model\.safetensors: cannot read safetensors file \(truncated")
    assert not storage.exists(out)


# ----------------------------------------------------------------------------- one-piece outputs on the store


def test_convert_and_tokenizer_write_a_new_output_to_s3_with_its_manifest_last(minilm_dir, vocab_txt, s3_server,
                                                                               s3_uri, capsys):
    from bert.checkpoint import read_checkpoint_info
    from bert.tokenizer import Tokenizer
    from cli_helpers import assert_refused, cli

    hf = f"{s3_uri}/minilm"
    storage.upload_dir(minilm_dir, hf)
    out = f"{s3_uri}/converted"
    code, _, err = cli(capsys, "convert", "--from-hf", hf, "--out", out)
    assert code == 0, err
    manifest = storage.read_json(f"{out}/_manifest.json")
    assert manifest["job"] == "convert" and "model.safetensors" in manifest["files"]
    assert {rel: size for rel, size in storage.walk_files(out)
            if rel not in ("_manifest.json", "_lease.json")} == manifest["files"]
    assert read_checkpoint_info(storage.local_copy(out)).kind == "bertflow"
    before = _tree(s3_server, out)
    assert_refused(cli(capsys, "convert", "--from-hf", hf, "--out", out), "convert", out, "already exists")
    assert _tree(s3_server, out) == before
    # a killed upload's objects (no manifest) are removed by the next writer, which then publishes whole
    vocab = f"{s3_uri}/vocab.txt"
    storage.write_bytes(vocab, vocab_txt.read_bytes())
    tok = f"{s3_uri}/tokenizer"
    storage.write_bytes(f"{tok}/vocab.txt", b"[PAD]\n")
    code, _, err = cli(capsys, "tokenizer", "from-vocab", "--vocab", vocab, "--out", tok)
    assert code == 0, err
    assert storage.is_file(f"{tok}/_manifest.json")
    assert Tokenizer.load(storage.local_copy(tok)).vocab_size == 30522


def test_the_commands_check_inputs_on_the_store_as_on_disk(datasets_dir, minilm_dir, s3_uri, capsys):
    """`bertflow finetune --data s3://...` (and `sweep`), `bertflow pretrain --model s3://...`, `bertflow shards build
    --tokenizer s3://... --cased`: the commands' checks before any job (a file, nothing, labels outside the task's
    set, a casing flag a tokenizer dir overrides) read the store, not the URI as a local path."""
    from cli_helpers import assert_refused, cli
    from pipelines.jobs.configs import FinetuneConfig, PretrainConfig
    from pipelines.preflight import check_finetune_start, check_pretrain_start

    data = f"{s3_uri}/glue/MRPC"
    storage.upload_dir(datasets_dir / "glue" / "MRPC", data)
    config = lambda where: FinetuneConfig(task="mrpc", data=where, checkpoint=str(minilm_dir),  # noqa: E731
                                          out=f"{s3_uri}/out")
    check_finetune_start(config(data))
    check_finetune_start(config(s3_uri))  # a datasets root holding glue/MRPC
    _refused(lambda: check_finetune_start(config(f"{s3_uri}/none")), r"--data s3://\S+/none does not exist")
    _refused(lambda: check_finetune_start(config(f"{data}/dev.tsv")), r"--data s3://\S+/dev.tsv is a file")
    storage.write_text(f"{s3_uri}/bad/train.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n7\t1\t2\ta\tb\n")
    storage.write_text(f"{s3_uri}/bad/dev.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\ta\tb\n")
    _refused(lambda: check_finetune_start(config(f"{s3_uri}/bad")), r"'7'")

    storage.upload_dir(minilm_dir, f"{s3_uri}/minilm")
    pretrain = lambda model: PretrainConfig(shards=f"{s3_uri}/shards", out=f"{s3_uri}/out", model=model)  # noqa: E731
    check_pretrain_start(pretrain(f"{s3_uri}/minilm"))
    _refused(lambda: check_pretrain_start(pretrain(f"{s3_uri}/none")),
             r"model 's3://\S+/none' is neither a model preset .* nor an existing checkpoint dir")
    assert_refused(cli(capsys, "shards", "build", "--corpus", f"{data}/dev.tsv", "--tokenizer", f"{s3_uri}/minilm",
                       "--out", f"{s3_uri}/out", "--cased"), "shards", "is a dir with its own casing")
    assert not storage.exists(f"{s3_uri}/out")


def test_what_is_not_routed_yet_is_refused_in_one_line_before_anything_is_written(s3_uri, tmp_path, monkeypatch,
                                                                                  capsys):
    """A pipeline's workdir on a store other than S3 (its lease needs S3's conditional PUT); an evaluate_checkpoints
    stage (which runs on an s3:// workdir) whose `checkpoints` URI names nothing on the store."""
    from cli_helpers import assert_refused, cli

    monkeypatch.chdir(tmp_path)
    spec = ROOT / "pipelines" / "quickstart.yaml"
    assert_refused(cli(capsys, "run", spec, "--workdir", "gs://some-bucket/pipeline", "--dry-run"), "run",
                   "gs://some-bucket/pipeline", "a local path or s3://")
    curves = tmp_path / "curves.yaml"
    curves.write_text(f"name: curves\nworkdir: {s3_uri}/pipeline\nstages:\n  curves:\n    kind: evaluate_checkpoints\n"
                      f"    config: {{checkpoints: {s3_uri}/none, data: {tmp_path}, tasks: {{sst2: {{}}}}}}\n")
    assert_refused(cli(capsys, "run", curves), "run", "stage curves.checkpoints", f"path {s3_uri}/none does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.yaml"] and not storage.exists(s3_uri)


def test_a_spec_reads_its_inputs_from_uris_keyed_by_their_objects(datasets_dir, minilm_dir, vocab_txt, s3_server,
                                                                   s3_uri, ray_local, tmp_path, monkeypatch, capsys):
    """Every path a spec gives its stages may be a URI (checked, fingerprinted and read through bert/storage.py):
    a checkpoint, a task's data, a vocab.txt, a fine-tune's checkpoint. A key follows the objects: one replaced
    re-runs only the stage that reads it; a URI naming nothing is refused in one line, nothing written."""
    from cli_helpers import assert_refused, cli
    from pipelines.dag.graph import Graph
    from pipelines.dag.spec import load_spec
    from pipelines.dag.stages import build_stages

    from bert.tokenizer import Tokenizer

    monkeypatch.chdir(tmp_path)
    storage.upload_dir(minilm_dir, f"{s3_uri}/minilm")
    storage.upload_dir(datasets_dir / "glue" / "SST-2", f"{s3_uri}/data/SST-2")
    storage.write_bytes(f"{s3_uri}/vocab.txt", vocab_txt.read_bytes())
    work = tmp_path / "work"
    spec = tmp_path / "inputs.yaml"

    def write_spec(checkpoint: str) -> None:
        spec.write_text(f"""name: inputs-on-s3
workdir: {work}
stages:
  base: {{kind: checkpoint, config: {{path: {s3_uri}/minilm}}}}
  text: {{kind: task_text, config: {{task: sst2, data: {s3_uri}/data/SST-2, max_examples: 40, per_document: 10}}}}
  vocab: {{kind: tokenizer, config: {{vocab: {s3_uri}/vocab.txt}}}}
  tune:
    kind: finetune
    config: {{checkpoint: {checkpoint}, data: {s3_uri}/data/SST-2, seeds: [1], tasks: {{sst2: {{epochs: 1}}}}}}
""")

    def status() -> dict[str, str]:
        graph = Graph.build(build_stages(load_spec(spec)), str(work))
        return graph.status()

    write_spec(f"{s3_uri}/nothing")
    assert_refused(cli(capsys, "run", spec), "run", "stage tune", f"path {s3_uri}/nothing does not exist")
    assert not work.exists()
    write_spec(f"{s3_uri}/minilm")
    assert set(status().values()) == {"missing"}  # checked and keyed: the checkpoint's configs read, not its weights
    cached = {p.name: p.stat().st_size for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert cached["config.json"] > 0 and cached["vocab.txt"] > 0 and cached["model.safetensors"] == 0
    code, out, err = cli(capsys, "run", spec, "--until", "base", "--until", "text", "--until", "vocab")
    assert code == 0, err
    assert status() == {"base": "cached", "text": "cached", "vocab": "cached", "tune.sst2.seed1": "missing"}
    graph = Graph.build(build_stages(load_spec(spec)), str(work))
    text = (Path(graph.nodes["text"].final) / "corpus" / "text.txt").read_text().split("\n\n")
    assert len(text) >= 4 and sum(len(d.strip().split("\n")) for d in text if d.strip()) == 40
    assert Tokenizer.load(graph.nodes["vocab"].final).vocab_size == 30522
    assert Tokenizer.load(graph.nodes["base"].final).vocab_size == 30522
    assert (Path(graph.nodes["base"].final) / "checkpoint" / "model.safetensors").is_file()
    tune_key = graph.nodes["tune.sst2.seed1"].key

    time.sleep(1.1)  # Last-Modified has one-second resolution
    storage.write_bytes(f"{s3_uri}/vocab.txt", vocab_txt.read_bytes())  # the same bytes, written anew
    assert status() == {"base": "cached", "text": "cached", "vocab": "missing", "tune.sst2.seed1": "missing"}
    storage.write_text(f"{s3_uri}/minilm/README.md", "replaced")  # a file of the checkpoint changed
    after = Graph.build(build_stages(load_spec(spec)), str(work))
    assert after.status()["base"] == "missing" and after.nodes["tune.sst2.seed1"].key != tune_key
    assert after.status()["text"] == "cached"
