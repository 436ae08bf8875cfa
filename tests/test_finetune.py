"""`bertflow finetune`: real MiniLM checkpoint, real GLUE / CoNLL / SQuAD data, metrics re-checked with sklearn/scipy.

Runs are short (a few hundred examples, one epoch); each starts a Ray Train job on the shared
session runtime (`ray_local`). Bad-input tests never reach Ray: the driver rejects them first.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bert.errors import InputError
from bert.finetune import layerwise_groups
from bert.tasks.featurize import MEGA_BATCH_FACTOR
from pipelines.jobs.finetune import FinetuneConfig, preflight, run_finetune
from pipelines.tracking import fluent_tracking_uri

pytestmark = pytest.mark.integration


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def gold_tsv(path: Path, id_column: str | None, label_column: str) -> dict[str, str]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return {(row[id_column] if id_column else str(i)): row[label_column] for i, row in enumerate(rows)}


def encoder_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from bert.checkpoint import from_pretrained

    model = from_pretrained(model_dir, head=None)
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("pooler.")}


# ----------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def mrpc_run(ray_local, datasets_dir, minilm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mrpc")
    config = FinetuneConfig(task="mrpc", data=str(datasets_dir / "glue" / "MRPC"), checkpoint=str(minilm_dir),
                            out=str(out), max_train_examples=192, max_eval_examples=160, epochs=1,
                            learning_rate=5e-5, layer_lr_decay=0.9)
    return out, run_finetune(config)


def test_mrpc_metrics_equal_sklearn_on_predictions(mrpc_run, datasets_dir):
    from sklearn.metrics import accuracy_score, f1_score

    out, result = mrpc_run
    records = read_jsonl(out / "predictions.jsonl")
    gold = gold_tsv(datasets_dir / "glue" / "MRPC" / "dev.tsv", None, "Quality")
    assert len(records) == 160 and [r["id"] for r in records] == [str(i) for i in range(160)]
    assert all(r["label"] == gold[r["id"]] for r in records)
    y_true = [gold[r["id"]] for r in records]
    y_pred = [r["prediction"] for r in records]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result
    assert metrics["metrics"]["dev/f1"] == pytest.approx(f1_score(y_true, y_pred, pos_label="1"), abs=1e-12)
    assert metrics["metrics"]["dev/accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    assert metrics["num_train_examples"] == 192 and metrics["best_epoch"] == 1
    assert len(metrics["history"]) == 1


def test_mrpc_checkpoint_loads_in_transformers_and_pyfunc(mrpc_run, datasets_dir, tmp_path):
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from bert.checkpoint import convert

    out, result = mrpc_run
    checkpoint = out / "checkpoint"
    info = json.loads((checkpoint / "config.json").read_text())
    assert info["bertflow"]["head"] == "sequence_classification" and info["bertflow"]["labels"] == ["0", "1"]
    assert (checkpoint / "vocab.txt").is_file()

    # exportable to the Hugging Face layout
    from transformers import BertForSequenceClassification

    hf_dir = convert(checkpoint, tmp_path / "hf", to_hf=True)
    hf = BertForSequenceClassification.from_pretrained(hf_dir)
    assert hf.config.id2label == {0: "0", 1: "1"}

    # MLflow: the run has per-epoch metrics, the artifacts and a pyfunc model that predicts labels
    run = result["mlflow"]
    client = MlflowClient(run["tracking_uri"])
    assert client.get_metric_history(run["run_id"], "dev/f1")
    artifacts = {a.path for a in client.list_artifacts(run["run_id"])}
    assert {"metrics.json", "predictions.jsonl"} <= artifacts
    with fluent_tracking_uri(run["tracking_uri"]):
        model = mlflow.pyfunc.load_model(run["model_uri"])
    rows = []
    with open(datasets_dir / "glue" / "MRPC" / "dev.tsv", encoding="utf-8-sig", newline="") as f:
        for i, row in enumerate(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)):
            if i == 12:
                break
            rows.append(row)
    frame = pd.DataFrame({"text": [r["#1 String"] for r in rows], "text_pair": [r["#2 String"] for r in rows]})
    predicted = list(model.predict(frame)["label"])  # with "probabilities" (tests/test_serving.py)
    expected = [r["prediction"] for r in read_jsonl(out / "predictions.jsonl")[:12]]
    assert predicted == expected


def test_rerun_of_a_finished_job_does_nothing(mrpc_run, datasets_dir, minilm_dir):
    out, result = mrpc_run
    stamp = (out / "metrics.json").stat().st_mtime_ns
    config = FinetuneConfig(task="mrpc", data=str(datasets_dir / "glue" / "MRPC"), checkpoint=str(minilm_dir),
                            out=str(out), max_train_examples=192, max_eval_examples=160, epochs=1,
                            learning_rate=5e-5, layer_lr_decay=0.9)
    assert run_finetune(config) == result
    assert run_finetune(dataclasses.replace(config, length_grouping=MEGA_BATCH_FACTOR)) == result  # the default spelled out
    assert (out / "metrics.json").stat().st_mtime_ns == stamp


def test_stsb_feature_extraction_keeps_encoder_bit_identical(ray_local, datasets_dir, minilm_dir, tmp_path):
    from scipy.stats import pearsonr, spearmanr

    out = tmp_path / "stsb"
    config = FinetuneConfig(task="stsb", data=str(datasets_dir), checkpoint=str(minilm_dir), out=str(out),
                            max_train_examples=128, max_eval_examples=128, epochs=1, freeze_encoder=True,
                            learning_rate=1e-3, batch_size=16)
    result = run_finetune(config)
    before, after = encoder_state(minilm_dir), encoder_state(out / "checkpoint")
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    records = read_jsonl(out / "predictions.jsonl")
    gold = gold_tsv(datasets_dir / "glue" / "STS-B" / "dev.tsv", "index", "score")
    assert len(records) == 128
    predictions = [r["prediction"] for r in records]
    labels = [float(gold[r["id"]]) for r in records]
    assert isinstance(predictions[0], float)
    assert result["metrics"]["dev/pearson"] == pytest.approx(pearsonr(predictions, labels)[0], abs=1e-9)
    assert result["metrics"]["dev/spearman"] == pytest.approx(spearmanr(predictions, labels)[0], abs=1e-9)


def test_several_seeds_report_mean_and_std_with_nested_runs(ray_local, datasets_dir, minilm_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "seeds"
    config = FinetuneConfig(task="sst2", data=str(datasets_dir), checkpoint=str(minilm_dir), out=str(out),
                            max_train_examples=64, max_eval_examples=64, epochs=1, seeds="1,2", batch_size=16,
                            log_model=False, length_grouping=1)
    result = run_finetune(config)
    per_seed = [json.loads((out / f"seed-{s}" / "metrics.json").read_text()) for s in (1, 2)]
    values = [m["metrics"]["dev/accuracy"] for m in per_seed]
    assert result["metrics"]["dev/accuracy"] == pytest.approx(np.mean(values))
    assert result["std"]["dev/accuracy"] == pytest.approx(np.std(values, ddof=1))
    best = result["best_seed"]
    assert (out / "predictions.jsonl").read_text() == (out / f"seed-{best}" / "predictions.jsonl").read_text()
    for s in (1, 2):
        assert {"metrics.json", "predictions.jsonl", "checkpoint"} <= {p.name for p in (out / f"seed-{s}").iterdir()}
    client = MlflowClient(result["mlflow"]["tracking_uri"])
    for m in per_seed:
        run = client.get_run(m["mlflow"]["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == result["mlflow"]["run_id"]
        assert run.info.status == "FINISHED"
        assert run.data.params["length_grouping"] == "1"  # the option, not the default (4), reached the workers
    # the seeds share one Ray Train run: seed 2 takes the precision seed 1's probe measured, with no probe of its own
    reasons = [client.get_run(m["mlflow"]["run_id"]).data.params["precision_reason"] for m in per_seed]
    assert reasons[1] == f"{reasons[0]} (this job's first seed)" and per_seed[1]["precision"] == per_seed[0]["precision"]
    assert not (out / "_ray").exists() and not any((out / f"seed-{s}" / "_best").exists() for s in (1, 2))


@pytest.mark.slow  # the default run's 30-minute budget; run with -m slow
def test_a_seed_trained_after_another_in_one_job_matches_it_trained_alone(ray_local, datasets_dir, minilm_dir,
                                                                           tmp_path):
    """Sharing a worker with an earlier seed changes nothing in a seed's numerics: same dev metrics, predictions."""
    common = dict(task="mrpc", data=str(datasets_dir / "glue" / "MRPC"), checkpoint=str(minilm_dir),
                  max_train_examples=48, max_eval_examples=48, epochs=1, batch_size=16, log_model=False,
                  precision="fp32")
    run_finetune(FinetuneConfig(out=str(tmp_path / "both"), seeds="1,2", **common))
    alone = run_finetune(FinetuneConfig(out=str(tmp_path / "alone"), seeds="2", **common))
    shared = json.loads((tmp_path / "both" / "seed-2" / "metrics.json").read_text())
    assert shared["metrics"] == alone["metrics"] and shared["history"][0]["train_loss"] == alone["history"][0]["train_loss"]
    assert ((tmp_path / "both" / "seed-2" / "predictions.jsonl").read_text()
            == (tmp_path / "alone" / "predictions.jsonl").read_text())


@pytest.mark.slow
def test_two_workers_ddp_conll(ray_local, datasets_dir, minilm_dir, tmp_path):
    from seqeval.metrics import f1_score

    out = tmp_path / "conll"
    config = FinetuneConfig(task="conll2003", data=str(datasets_dir), checkpoint=str(minilm_dir), out=str(out),
                            max_train_examples=256, max_eval_examples=200, epochs=1, num_workers=2,
                            learning_rate=1e-4, log_model=False)
    result = run_finetune(config)
    records = [r for r in read_jsonl(out / "predictions.jsonl") if r["split"] == "valid"]
    assert len(records) == 200
    f1 = f1_score([r["label"] for r in records], [r["prediction"] for r in records], mode="strict",
                  scheme=__import__("seqeval.scheme", fromlist=["IOB2"]).IOB2)
    assert result["metrics"]["valid/f1"] == pytest.approx(f1, abs=1e-9)


# ----------------------------------------------------------------------------- optimiser groups (no Ray)


def test_layer_lr_decay_and_freezing(minilm_dir):
    from bert.checkpoint import from_pretrained
    from bert.finetune import freeze

    model = from_pretrained(minilm_dir, head="sequence_classification", num_labels=2)
    groups = layerwise_groups(model, 0.01, 0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    L = model.config.num_hidden_layers
    assert scale[id(model.classifier.weight)] == 1.0 and scale[id(model.bert.pooler.dense.weight)] == 1.0
    assert scale[id(model.bert.encoder.layer[L - 1].output.dense.weight)] == 0.5
    assert scale[id(model.bert.encoder.layer[0].output.dense.weight)] == 0.5**L
    assert scale[id(model.bert.embeddings.word_embeddings.weight)] == 0.5 ** (L + 1)
    assert decay[id(model.classifier.weight)] == 0.01 and decay[id(model.classifier.bias)] == 0.0
    assert len(scale) == sum(1 for _ in model.parameters())

    freeze(model, encoder=False, layers=2)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("bert.embeddings.") for n in frozen)
    assert all(n.startswith(("bert.embeddings.", "bert.encoder.layer.0.", "bert.encoder.layer.1.")) for n in frozen)
    assert not any(n.startswith("bert.encoder.layer.2.") for n in frozen)
    trainable = {id(p) for g in layerwise_groups(model, 0.01, 1.0) for p in g["params"]}
    assert id(model.bert.embeddings.word_embeddings.weight) not in trainable


# ----------------------------------------------------------------------------- bad input (driver only, no Ray)


def _config(tmp_path: Path, task: str, data: Path, checkpoint: Path, **kw) -> FinetuneConfig:
    return FinetuneConfig(task=task, data=str(data), checkpoint=str(checkpoint), out=str(tmp_path / "out"), **kw)


def _mrpc_copy(datasets_dir: Path, tmp_path: Path) -> Path:
    data = tmp_path / "MRPC"
    shutil.copytree(datasets_dir / "glue" / "MRPC", data, ignore=shutil.ignore_patterns("original"))
    return data


def cli(*argv: str) -> tuple[int, str]:
    import contextlib
    import io

    from pipelines.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, err.getvalue()


def test_cli_unknown_task_lists_known_tasks(tmp_path, datasets_dir, minilm_dir):
    code, err = cli("finetune", "--task", "mrpcc", "--data", str(datasets_dir), "--checkpoint", str(minilm_dir),
                    "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown task 'mrpcc'" in err and "mrpc" in err and "conll2003" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_own_tsv_dataset_by_column_mapping_end_to_end(ray_local, tmp_path, datasets_dir, minilm_dir):
    """SST-2 rows rewritten into another layout (label first, renamed columns, ids, labels pos/neg): the
    task is named by its column mapping on the command line; metrics, ids and the checkpoint follow it."""
    from sklearn.metrics import accuracy_score, f1_score

    from bert.inference import Predictor

    data = tmp_path / "reviews"
    data.mkdir()
    for name, rows in (("train.tsv", slice(1, 193)), ("dev.tsv", slice(1, 97))):
        lines = (datasets_dir / "glue" / "SST-2" / name).read_text(encoding="utf-8").splitlines()[rows]
        out = ["polarity\trid\treview"]
        for i, line in enumerate(lines):
            sentence, label = line.rsplit("\t", 1)
            out.append(f"{'pos' if label == '1' else 'neg'}\t{name[:3]}-{i}\t{sentence}")
        (data / name).write_text("\n".join(out) + "\n", encoding="utf-8")
    task = "tsv:text=review,label=polarity,id=rid,metric=f1,positive=pos"
    code, err = cli("finetune", "--task", task, "--data", str(data), "--checkpoint", str(minilm_dir),
                    "--out", str(tmp_path / "o"), "--epochs", "1", "--learning-rate", "1e-4", "--no-log-model")
    assert code == 0, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    records = read_jsonl(tmp_path / "o" / "predictions.jsonl")
    assert [r["id"] for r in records] == [f"dev-{i}" for i in range(96)]
    gold, predicted = [r["label"] for r in records], [r["prediction"] for r in records]
    assert set(gold) == {"pos", "neg"} and metrics["labels"] == ["neg", "pos"]
    assert metrics["metrics"]["dev/f1"] == pytest.approx(f1_score(gold, predicted, pos_label="pos"))
    assert metrics["metrics"]["dev/accuracy"] == pytest.approx(accuracy_score(gold, predicted))
    checkpoint = tmp_path / "o" / "checkpoint"
    assert json.loads((checkpoint / "bertflow_task.json").read_text())["task"] == task
    dev = (data / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    assert Predictor(checkpoint).predict([{"text": line.split("\t")[2]} for line in dev]) == predicted

    # the F1 class must be one of the file's labels
    code, err = cli("finetune", "--task", task.replace("positive=pos", "positive=1"), "--data", str(data),
                    "--checkpoint", str(minilm_dir), "--out", str(tmp_path / "o2"))
    assert code == 2 and "F1 is of the class '1'" in err and "['neg', 'pos']" in err


def test_cli_missing_column_and_ragged_row_name_file_and_line(tmp_path, datasets_dir, minilm_dir):
    data = _mrpc_copy(datasets_dir, tmp_path)
    lines = (data / "train.tsv").read_text(encoding="utf-8-sig").splitlines()
    (data / "train.tsv").write_text("\n".join([lines[0].replace("Quality", "Label")] + lines[1:]) + "\n")
    code, err = cli("finetune", "--task", "mrpc", "--data", str(data), "--checkpoint", str(minilm_dir),
                    "--out", str(tmp_path / "o"))
    assert code == 2 and "train.tsv" in err and "'Quality'" in err

    (data / "train.tsv").write_text("\n".join(lines[:5] + ["1\tonly three\tfields"] + lines[5:]) + "\n")
    code, err = cli("finetune", "--task", "mrpc", "--data", str(data), "--checkpoint", str(minilm_dir),
                    "--out", str(tmp_path / "o"))
    assert code == 2 and "train.tsv:6:" in err and "found 3" in err
    assert not (tmp_path / "o").exists()


def test_unseen_dev_label_and_empty_dev(tmp_path, datasets_dir, minilm_dir):
    data = _mrpc_copy(datasets_dir, tmp_path)
    dev = (data / "dev.tsv").read_text(encoding="utf-8-sig").splitlines()
    fields = dev[3].split("\t")
    fields[0] = "2"
    (data / "dev.tsv").write_text("\n".join(dev[:3] + ["\t".join(fields)] + dev[4:]) + "\n")
    with pytest.raises(InputError, match=r"dev.tsv:4: label '2' does not occur in the train file"):
        preflight(_config(tmp_path, "mrpc", data, minilm_dir))
    (data / "dev.tsv").write_text(dev[0] + "\n")
    with pytest.raises(InputError, match=r"dev.tsv: no examples"):
        preflight(_config(tmp_path, "mrpc", data, minilm_dir))
    (data / "dev.tsv").write_text("")
    with pytest.raises(InputError, match=r"dev.tsv: empty file"):
        preflight(_config(tmp_path, "mrpc", data, minilm_dir))


def test_conll_malformed_line(tmp_path, datasets_dir, minilm_dir):
    data = tmp_path / "conll2003"
    data.mkdir()
    for name in ("train.txt", "valid.txt", "test.txt"):
        lines = (datasets_dir / "conll2003" / name).read_text().splitlines()[:200]
        (data / name).write_text("\n".join(lines) + "\n")
    lines = (data / "valid.txt").read_text().splitlines()
    lines[10] = "EU NNP"
    (data / "valid.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"valid.txt:11: expected 4 space-separated fields"):
        preflight(_config(tmp_path, "conll2003", data, minilm_dir))


def test_squad_answers_off_their_offset_are_counted(tmp_path, datasets_dir, minilm_dir):
    data = tmp_path / "squad"
    data.mkdir()
    full = json.loads((datasets_dir / "squad_v1.1" / "dev-v1.1.json").read_text())
    for index in (0, 30):
        full["data"][index]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] += 3
    (data / "dev-v1.1.json").write_text(json.dumps(full))
    prepared = preflight(_config(tmp_path, "squad_v1_dev_split", data, minilm_dir, max_train_examples=8,
                               max_eval_examples=8))
    assert prepared.skipped == {"train": 1, "dev": 1}


@pytest.mark.slow
def test_squad_run_reports_skipped_in_metrics(ray_local, tmp_path, datasets_dir, minilm_dir):
    data = tmp_path / "squad"
    data.mkdir()
    full = json.loads((datasets_dir / "squad_v1.1" / "dev-v1.1.json").read_text())
    full["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] += 3
    (data / "dev-v1.1.json").write_text(json.dumps(full))
    result = run_finetune(_config(tmp_path, "squad_v1_dev_split", data, minilm_dir, max_train_examples=32,
                                  max_eval_examples=32, epochs=1, max_seq_length=192, log_model=False))
    assert result["skipped"] == {"train": 1, "dev": 0}
    records = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert len(records) == 32 and all(isinstance(r["prediction"], str) for r in records)


def squad_v2_from_v1_dev(datasets_dir: Path, out: Path, articles: slice, name: str) -> None:
    """A SQuAD 2.0 file from real v1.1 dev articles: every third question is moved to a paragraph of the
    next article, where it has no answer (is_impossible, its old answer kept as `plausible_answers`)."""
    data = json.loads((datasets_dir / "squad_v1.1" / "dev-v1.1.json").read_text())["data"]
    chosen = data[articles]
    moved = []
    for article in chosen:
        for paragraph in article["paragraphs"][:3]:
            keep = []
            for i, qa in enumerate(paragraph["qas"]):
                (moved if i % 3 == 2 else keep).append(qa)
            paragraph["qas"] = keep
        article["paragraphs"] = article["paragraphs"][:3]
    for k, qa in enumerate(moved):  # into the next article's paragraphs: a question about another text
        target = chosen[(k % len(chosen) + 1) % len(chosen)]["paragraphs"][k % 3]
        target["qas"].append({"id": qa["id"] + "_na", "question": qa["question"], "answers": [],
                              "is_impossible": True, "plausible_answers": qa["answers"]})
    (out / name).write_text(json.dumps({"version": "v2.0", "data": chosen}))


def test_squad_v2_threshold_chosen_on_dev_is_used_by_predictions_and_the_checkpoint(
        ray_local, tmp_path, datasets_dir, minilm_dir):
    from bert.tasks.metrics import squad_v2_scores
    from bert.inference import Predictor

    data = tmp_path / "squad2"
    data.mkdir()
    squad_v2_from_v1_dev(datasets_dir, data, slice(0, 4), "train-v2.0.json")
    squad_v2_from_v1_dev(datasets_dir, data, slice(4, 8), "dev-v2.0.json")
    result = run_finetune(_config(tmp_path, "squad_v2", data, minilm_dir, max_train_examples=48,
                                  max_eval_examples=40, epochs=1, max_seq_length=192, learning_rate=1e-4,
                                  log_model=False))
    metrics = result["metrics"]
    threshold = metrics["dev/threshold"]
    records = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert len(records) == 40 and sum(not r["answers"] for r in records) > 5
    # every answer is the best span, or "" where its null odds exceed the chosen threshold
    for r in records:
        assert r["prediction"] == ("" if r["null_odds"] is None or r["null_odds"] > threshold else r["best_span"])
    # the reported scores are the official v2.0 scores of those answers; the threshold is the search's best
    gold = {r["id"]: r["answers"] for r in records}
    official = squad_v2_scores({r["id"]: r["prediction"] for r in records}, gold)
    assert metrics["dev/f1"] == pytest.approx(official["f1"]) and metrics["dev/exact"] == pytest.approx(official["exact"])
    assert metrics["dev/f1"] == pytest.approx(metrics["dev/best_f1"])
    # the checkpoint carries the threshold, and predicting with it gives the same answers
    checkpoint = tmp_path / "out" / "checkpoint"
    assert json.loads((checkpoint / "bertflow_task.json").read_text())["threshold"] == pytest.approx(threshold)
    from bert.tasks import get_task

    examples = get_task("squad_v2").reader(data).evals["dev"][:40]
    answers = Predictor(checkpoint).predict([{"question": ex.question, "context": ex.context} for ex in examples])
    assert answers == [r["prediction"] for r in records]


def test_checkpoint_vocab_that_does_not_match_the_tokenizer(tmp_path, datasets_dir, minilm_dir, vocab_txt):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(minilm_dir, checkpoint)
    for name in ("tokenizer.json",):
        (checkpoint / name).unlink(missing_ok=True)
    words = vocab_txt.read_text().splitlines()
    (checkpoint / "vocab.txt").write_text("\n".join(words[:20000]) + "\n")
    with pytest.raises(InputError, match=r"vocab_size 30522 but the tokenizer .* has 20000 tokens"):
        preflight(_config(tmp_path, "mrpc", datasets_dir, checkpoint))


def test_length_grouping_default_spelled_out_is_the_same_job(tmp_path, datasets_dir, minilm_dir):
    for task in ("mrpc", "squad_v1_dev_split"):
        default = _config(tmp_path, task, datasets_dir, minilm_dir)
        spelled = dataclasses.replace(default, length_grouping=MEGA_BATCH_FACTOR)
        other = dataclasses.replace(default, length_grouping=50)
        assert default.identity() == spelled.identity() and "length_grouping" not in default.identity()
        assert other.identity() == default.identity() | {"length_grouping": 50}


def test_bad_options_are_input_errors(tmp_path, datasets_dir, minilm_dir):
    with pytest.raises(InputError, match="length_grouping must be positive, got 0"):
        _config(tmp_path, "mrpc", datasets_dir, minilm_dir, length_grouping=0)
    with pytest.raises(InputError, match="--seeds"):
        _config(tmp_path, "mrpc", datasets_dir, minilm_dir, seeds="1,x")
    with pytest.raises(InputError, match="divisible"):
        _config(tmp_path, "mrpc", datasets_dir, minilm_dir, num_workers=3)
    with pytest.raises(InputError, match="only 6 layers"):
        preflight(_config(tmp_path, "mrpc", datasets_dir, minilm_dir, freeze_layers=7))
