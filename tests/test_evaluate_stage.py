"""The `evaluate_checkpoints` stage: a tiny pretraining run's checkpoints fine-tuned along the run, cached per checkpoint.

One spec (task text -> shards -> 6 steps of a tiny BERT keeping a checkpoint every 2 steps ->
evaluate) runs twice: with `every: 2` (steps 4 and 6, and the random init), then with `every: 1`,
a new stage key whose run fine-tunes only step 2 and takes the other three from the cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.cli import main as cli
from pipelines.dag.evaluate_stage import select

pytestmark = pytest.mark.integration


def write_spec(tmp_path: Path, datasets_dir: Path, vocab_txt: Path, every: int) -> Path:
    finetune = {"max_train_examples": 64, "max_eval_examples": 64, "epochs": 1}
    stages = {
        "tokenizer": {"config": {"vocab": str(vocab_txt)}},
        "text": {"kind": "task_text", "config": {"task": "sst2", "data": str(datasets_dir), "max_examples": 1500}},
        "shards": {"inputs": {"corpus": "text", "tokenizer": "tokenizer"},
                   "config": {"max_seq_length": 64, "max_predictions_per_seq": 10, "dupe_factor": 1, "num_shards": 1,
                              "next_sentence_prediction": False}},
        "pretrain": {"inputs": {"shards": "shards"},
                     "config": {"model": "tiny", "global_batch_size": 8, "micro_batch_size": 8, "max_steps": 6,
                                "warmup_steps": 1, "learning_rate": 1.0e-3, "checkpoint_every": 2,
                                "keep_checkpoints": 10, "log_every": 2, "precision": "fp32"}},
        "curves": {"kind": "evaluate_checkpoints", "inputs": {"pretrain": "pretrain"},
                   "config": {"every": every, "seeds": [1], "data": str(datasets_dir), "tasks": {"sst2": finetune},
                              "batch_size": 16, "max_seq_length": 32, "learning_rate": 1.0e-3, "precision": "fp32",
                              "max_concurrent": 2}},
    }
    path = tmp_path / f"spec-every{every}.yaml"
    path.write_text(yaml.safe_dump({"name": "curves", "workdir": str(tmp_path / "work"), "max_concurrent": 2,
                                    "stages": stages}))
    return path


def stage_dir(work: Path, kind: str) -> Path:
    (done,) = [d for d in (work / kind).iterdir() if (d / "_manifest.json").is_file()]
    return done


def test_select_takes_every_kth_and_the_last():
    assert select(list(range(1, 8)), 3) == [3, 6, 7]
    assert select([1, 2], 5) == [2]
    assert select([1, 2, 3, 4], 2) == [2, 4]


@pytest.mark.slow  # the default run's 30-minute budget; run with -m slow
def test_curves_along_a_run_are_cached_per_checkpoint(ray_local, datasets_dir, vocab_txt, tmp_path):
    assert cli(["run", str(write_spec(tmp_path, datasets_dir, vocab_txt, every=2))]) == 0
    work = tmp_path / "work"
    published = sorted(p.name for p in (stage_dir(work, "pretrain") / "checkpoints").iterdir())
    assert published == ["step-00000002", "step-00000004", "step-00000006"]
    first = stage_dir(work, "evaluate_checkpoints")
    curves = json.loads((first / "curves.json").read_text())["tasks"]["sst2"]
    assert [p["step"] for p in curves["points"]] == [4, 6] and curves["random_init"] is not None
    assert all(0.0 <= p["mean"] <= 1.0 and not p["cached"] for p in curves["points"])
    assert [p["tokens"] for p in curves["points"]][0] < [p["tokens"] for p in curves["points"]][1]
    assert (first / "curves.png").stat().st_size > 10_000
    cache = work / "evaluate_checkpoints" / "_cache"
    assert len(list(cache.glob("*/sst2-*/metrics.json"))) == 3  # two checkpoints and the random init
    before = {p: p.stat().st_mtime_ns for p in cache.glob("*/sst2-*/metrics.json")}
    manifest = json.loads((first / "_manifest.json").read_text())["result"]
    client = MlflowClient(manifest["mlflow"]["tracking_uri"])
    children = client.search_runs([client.get_run(manifest["mlflow"]["run_id"]).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{manifest['mlflow']['run_id']}'")
    assert len(children) == 3  # one fine-tune run per job, nested under the stage's run
    assert len(client.get_metric_history(manifest["mlflow"]["run_id"], "sst2/dev/accuracy")) == 2

    # every checkpoint now: a new stage, which fine-tunes step 2 only and takes the rest from the cache
    assert cli(["run", str(write_spec(tmp_path, datasets_dir, vocab_txt, every=1))]) == 0
    (second,) = [d for d in (work / "evaluate_checkpoints").iterdir()
                 if (d / "_manifest.json").is_file() and d != first]
    result = json.loads((second / "_manifest.json").read_text())["result"]
    assert result["jobs"] == 4 and result["cached_jobs"] == 3
    points = json.loads((second / "curves.json").read_text())["tasks"]["sst2"]["points"]
    assert [(p["step"], p["cached"]) for p in points] == [(2, False), (4, True), (6, True)]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # cached fine-tunes were not run again
    old = {p["step"]: p["per_seed"] for p in curves["points"]}
    assert all(p["per_seed"] == old[p["step"]] for p in points if p["step"] in old)
