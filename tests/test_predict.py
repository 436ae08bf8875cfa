"""`bertflow predict` (Ray Data) and the `Predictor` behind it and the MLflow pyfunc model.

Checkpoints here are the real MiniLM encoder with a freshly initialised task head, saved as a
fine-tuned checkpoint dir: what matters is that Ray Data gives the same predictions, in input
order, as running the model in-process, and the output formats per task kind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bert.checkpoint import from_pretrained, save_pretrained
from bert.errors import InputError
from bert.inference import Predictor, write_task_file
from pipelines.jobs.predict import PredictConfig, run_predict


def make_checkpoint(minilm_dir: Path, out: Path, task: str, head: str, labels=None, max_seq_length: int = 128) -> Path:
    torch.manual_seed(0)
    kwargs = {"labels": labels} if labels else {}
    model = from_pretrained(minilm_dir, head=head, **kwargs)
    save_pretrained(model, out, tokenizer_dir=minilm_dir)
    write_task_file(out, task, max_seq_length)
    return out


@pytest.fixture(scope="module")
def mrpc_checkpoint(minilm_dir, tmp_path_factory) -> Path:
    return make_checkpoint(minilm_dir, tmp_path_factory.mktemp("ck") / "mrpc", "mrpc", "sequence_classification",
                           labels=["0", "1"])


def mrpc_input(datasets_dir: Path, path: Path, n: int) -> list[list[str]]:
    lines = (datasets_dir / "glue" / "MRPC" / "dev.tsv").read_text(encoding="utf-8-sig").splitlines()[: n + 1]
    path.write_text("\n".join(lines) + "\n")
    return [line.split("\t") for line in lines]


@pytest.mark.integration
def test_predict_tsv_through_ray_data_matches_in_process(ray_local, mrpc_checkpoint, datasets_dir, tmp_path):
    rows = mrpc_input(datasets_dir, tmp_path / "in.tsv", 150)
    header, rows = rows[0], rows[1:]
    summary = run_predict(PredictConfig(checkpoint=str(mrpc_checkpoint), input=str(tmp_path / "in.tsv"),
                                        output=str(tmp_path / "out.jsonl"), text_column="#1 String",
                                        pair_column="#2 String", id_column="#1 ID", batch_size=32, concurrency=2))
    assert summary["rows"] == 150
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["row"] for line in lines] == list(range(150))
    assert [line["id"] for line in lines] == [r[header.index("#1 ID")] for r in rows]
    records = [{"text": r[header.index("#1 String")], "text_pair": r[header.index("#2 String")]} for r in rows]
    expected = Predictor(mrpc_checkpoint).predict_records(records)
    assert [set(line) - {"row", "id"} for line in lines] == [{"label", "probabilities"}] * 150
    assert [line["label"] for line in lines] == [e["label"] for e in expected]
    for line, e in zip(lines, expected):  # other batch-mates, other padding: equal up to float rounding
        assert line["probabilities"] == pytest.approx(e["probabilities"], abs=1e-5)
    assert [e["label"] for e in expected] == Predictor(mrpc_checkpoint).predict(records)
    assert {e["label"] for e in expected} <= {"0", "1"}
    for e in expected:  # the label is the most probable class; probabilities over every label sum to 1
        assert set(e["probabilities"]) == {"0", "1"} and sum(e["probabilities"].values()) == pytest.approx(1.0)
        assert e["label"] == max(e["probabilities"], key=e["probabilities"].get)


def test_predict_missing_column_and_ragged_row_name_file_and_line(mrpc_checkpoint, datasets_dir, tmp_path):
    mrpc_input(datasets_dir, tmp_path / "in.tsv", 5)
    out = str(tmp_path / "out.jsonl")
    with pytest.raises(InputError, match=r"in.tsv:2: no 'text' column"):
        run_predict(PredictConfig(checkpoint=str(mrpc_checkpoint), input=str(tmp_path / "in.tsv"), output=out))
    text = (tmp_path / "in.tsv").read_text().splitlines()
    (tmp_path / "in.tsv").write_text("\n".join(text[:3] + ["a\tb"] + text[3:]) + "\n")
    with pytest.raises(InputError, match=r"in.tsv:4: expected 5 tab-separated fields"):
        run_predict(PredictConfig(checkpoint=str(mrpc_checkpoint), input=str(tmp_path / "in.tsv"), output=out,
                                  text_column="#1 String", pair_column="#2 String"))
    (tmp_path / "in.jsonl").write_text('{"text": "a", "text_pair": "b"}\n{"text": "a"}\n')
    with pytest.raises(InputError, match=r"in.jsonl:2: no 'text_pair' column"):
        run_predict(PredictConfig(checkpoint=str(mrpc_checkpoint), input=str(tmp_path / "in.jsonl"), output=out))
    assert not Path(out).exists()


def test_ner_predictions_are_entities_with_offsets(minilm_dir, datasets_dir, tmp_path):
    from bert.tasks.readers import read_conll

    labels = sorted({t for ex in read_conll(datasets_dir / "conll2003" / "valid.txt") for t in ex.tags})
    checkpoint = make_checkpoint(minilm_dir, tmp_path / "ner", "conll2003", "token_classification", labels=labels)
    predictor = Predictor(checkpoint)
    text = "EU rejects German call to boycott British lamb. Peter Blackburn reports from Brussels."
    records = [{"text": text}, {"tokens": text.replace(".", " .").split()}]
    by_text, by_tokens = predictor.predict(records)
    detailed = predictor.predict_records(records)
    assert [[{k: e[k] for k in ("type", "start", "end", "text")} for e in d["entities"]] for d in detailed] == \
        [by_text, by_tokens]
    assert all(0 < e["score"] <= 1 for d in detailed for e in d["entities"])
    for entity in by_text:
        assert set(entity) == {"type", "start", "end", "text"} and entity["type"] in {"PER", "ORG", "LOC", "MISC"}
        assert text[entity["start"] : entity["end"]] == entity["text"]
    words = text.replace(".", " .").split()
    for entity in by_tokens:
        assert entity["text"] == " ".join(words[entity["start"] : entity["end"]])


def test_qa_predictions_are_spans_of_the_context(minilm_dir, tmp_path):
    checkpoint = make_checkpoint(minilm_dir, tmp_path / "qa", "squad_v1_dev_split", "question_answering",
                                 max_seq_length=384)
    context = "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy."
    predictor = Predictor(checkpoint)
    records = [{"question": "Who gave their name to Normandy?", "context": context},
               {"question": "When?", "context": " ".join([context] * 60)}]  # several windows
    answers = predictor.predict(records)
    detailed = predictor.predict_records(records)
    for record, answer, d in zip(records, answers, detailed):
        assert isinstance(answer, str) and answer in record["context"] and d["answer"] == answer
        assert record["context"][d["start"] : d["end"]] == answer and 0 < d["score"] <= 1


def test_not_a_finetuned_checkpoint(minilm_dir, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(InputError, match="bertflow_task.json is missing"):
        run_predict(PredictConfig(checkpoint=str(minilm_dir), input=str(tmp_path / "in.jsonl"),
                                  output=str(tmp_path / "out.jsonl")))
