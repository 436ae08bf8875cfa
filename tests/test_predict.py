"""`bertflow predict` (streamed through Ray Data) and the `Predictor` behind it and the MLflow pyfunc model.

Checkpoints here are the real MiniLM encoder with a freshly initialised task head, saved as a
fine-tuned checkpoint dir: what matters is that the streamed run gives the same predictions, in input
order across several blocks and actors, as running the model in-process; that the output is published
whole or not at all, locally and on a real S3 API (moto's server); that bad input is named by file and
line; and the output formats per task kind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bert.checkpoint import from_pretrained, save_pretrained
from bert.errors import InputError
from bert.inference import Predictor, write_task_file
from pipelines.jobs.predict import PredictConfig, read_predictions, run_predict


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


def run(checkpoint: Path, source, out, **settings) -> dict:
    return run_predict(PredictConfig(checkpoint=str(checkpoint), input=str(source), out=str(out), **settings))


MRPC_COLUMNS = {"text_column": "#1 String", "pair_column": "#2 String", "id_column": "#1 ID"}


def leftovers(out: Path) -> list[str]:
    """What a run left beside its output: temporaries, locks."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.integration
def test_predict_streams_blocks_through_actors_in_input_order(ray_local, mrpc_checkpoint, datasets_dir, tmp_path):
    """120 rows in blocks of 25 through 2 model actors: 5 parts, every row in its place, each prediction the
    one `Predictor` gives in-process, the output published whole (manifest, no temporaries)."""
    rows = mrpc_input(datasets_dir, tmp_path / "in.tsv", 120)
    header, rows = rows[0], rows[1:]
    out = tmp_path / "out"
    summary = run(mrpc_checkpoint, tmp_path / "in.tsv", out, batch_size=16, block_rows=25, concurrency=2,
                  **MRPC_COLUMNS)
    assert summary["rows"] == 120 and summary["parts"] == 5
    manifest = json.loads((out / "_manifest.json").read_text())
    assert [(p["name"], p["first_row"], p["rows"]) for p in manifest["parts"]] == \
        [(f"part-{i:012d}.jsonl", i, min(25, 120 - i)) for i in range(0, 120, 25)]
    assert sorted(p.name for p in out.iterdir()) == sorted(["_manifest.json", *(p["name"] for p in manifest["parts"])])
    assert leftovers(out) == []
    lines = [json.loads(line) for name in sorted(out.glob("part-*.jsonl")) for line in name.read_text().splitlines()]
    assert list(read_predictions(str(out))) == lines
    assert [line["row"] for line in lines] == list(range(120))
    assert [line["id"] for line in lines] == [r[header.index("#1 ID")] for r in rows]
    records = [{"text": r[header.index("#1 String")], "text_pair": r[header.index("#2 String")]} for r in rows]
    expected = Predictor(mrpc_checkpoint).predict_records(records)
    assert [set(line) - {"row", "id"} for line in lines] == [{"label", "probabilities"}] * 120
    assert [line["label"] for line in lines] == [e["label"] for e in expected]
    for line, e in zip(lines, expected):  # other batch-mates, other padding: equal up to float rounding
        assert line["probabilities"] == pytest.approx(e["probabilities"], abs=1e-5)
    assert [e["label"] for e in expected[:8]] == Predictor(mrpc_checkpoint).predict(records[:8])
    assert {e["label"] for e in expected} <= {"0", "1"}
    for e in expected:  # the label is the most probable class; probabilities over every label sum to 1
        assert set(e["probabilities"]) == {"0", "1"} and sum(e["probabilities"].values()) == pytest.approx(1.0)
        assert e["label"] == max(e["probabilities"], key=e["probabilities"].get)
    with pytest.raises(InputError, match=r"out already exists and holds a finished bertflow output"):
        run(mrpc_checkpoint, tmp_path / "in.tsv", out, **MRPC_COLUMNS)


@pytest.mark.integration
def test_a_bad_line_after_parts_were_written_publishes_nothing(ray_local, mrpc_checkpoint, datasets_dir, tmp_path):
    """A malformed line, or a row without the model's column, far into the input (the driver checked only the
    first row): one error naming file and line from the read task, and no output, not even a temporary."""
    records = [{"id": str(i), "text": f"sentence {i}", "text_pair": f"another sentence {i}"} for i in range(150)]
    lines = [json.dumps(r) for r in records]
    out = tmp_path / "out"
    for line_no, bad, message in ((141, "{not json", r"in.jsonl:141: not valid JSON"),
                                  (130, json.dumps({"text": "only one"}), r"in.jsonl:130: no 'text_pair' column")):
        (tmp_path / "in.jsonl").write_text("\n".join(lines[: line_no - 1] + [bad] + lines[line_no - 1 :]) + "\n")
        with pytest.raises(InputError, match=message):
            run(mrpc_checkpoint, tmp_path / "in.jsonl", out, block_rows=32, concurrency=2)
        assert not out.exists() and leftovers(out) == []


def test_bad_inputs_are_named_before_any_work(mrpc_checkpoint, datasets_dir, tmp_path):
    """Missing file, missing column, ragged row, malformed first line, bytes that are not UTF-8, a parquet file
    without the column, no rows, an --out that exists or is the input:
    one line naming file and line, before Ray starts or anything is written."""
    mrpc_input(datasets_dir, tmp_path / "in.tsv", 5)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"nowhere.jsonl: file not found"):
        run(mrpc_checkpoint, tmp_path / "nowhere.jsonl", out)
    with pytest.raises(InputError, match=r"in.tsv:2: no 'text' column"):
        run(mrpc_checkpoint, tmp_path / "in.tsv", out)
    text = (tmp_path / "in.tsv").read_text().splitlines()
    (tmp_path / "in.tsv").write_text("\n".join(text[:1] + ["a\tb"] + text[1:]) + "\n")
    with pytest.raises(InputError, match=r"in.tsv:2: expected 5 tab-separated fields"):
        run(mrpc_checkpoint, tmp_path / "in.tsv", out, **MRPC_COLUMNS)
    (tmp_path / "in.jsonl").write_text('\n{"text": "a", "text_pair": "b"\n')
    with pytest.raises(InputError, match=r"in.jsonl:2: not valid JSON"):
        run(mrpc_checkpoint, tmp_path / "in.jsonl", out)
    (tmp_path / "in.csv").write_text("text,other\n\"a, quoted\",b\n")
    with pytest.raises(InputError, match=r"in.csv:2: no 'text_pair' column .*columns found: \['other', 'text'\]"):
        run(mrpc_checkpoint, tmp_path / "in.csv", out)
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "in.parquet")
    with pytest.raises(InputError, match=r"in.parquet: row 1: no 'text_pair' column"):
        run(mrpc_checkpoint, tmp_path / "in.parquet", out)
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\u00e9", "text_pair": "b"}\n'.encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.jsonl:1: not UTF-8 text"):
        run(mrpc_checkpoint, tmp_path / "latin1.jsonl", out)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match=r"empty.jsonl: no rows to predict"):
        run(mrpc_checkpoint, tmp_path / "empty.jsonl", out)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"out already exists and holds 1 entry \(notes.txt\)"):
        run(mrpc_checkpoint, tmp_path / "in.jsonl", out)
    with pytest.raises(InputError, match=r"--out .*in.tsv is also an input"):
        run(mrpc_checkpoint, tmp_path / "in.tsv", tmp_path / "in.tsv")
    inputs = ["empty.jsonl", "in.csv", "in.jsonl", "in.parquet", "in.tsv", "latin1.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [*inputs, "out"]
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.integration
def test_predict_from_s3_to_s3_manifest_last_and_unfinished_run_redone(ray_local, mrpc_checkpoint, s3_server,
                                                                         s3_uri, tmp_path):
    """Parquet input and output on a real S3 API: the parts, then the manifest, written last; a run that
    failed (its `_job.json`, no manifest) is this job's unfinished run, which the next run with the same
    settings redoes; a prefix holding anything else is refused before any work. The redone run reads its
    checkpoint from the store too (a fine-tune output dir's `checkpoint/`, as `bertflow finetune --out s3://`
    leaves it); a URI holding no checkpoint is refused, naming it, with nothing written."""
    from bert import storage

    records = [{"text": f"the {i}th sentence", "text_pair": f"and its {i}th pair", "id": i} for i in range(90)]
    good = pa.Table.from_pylist(records)
    bad = pa.Table.from_pylist(records[:70] + [{"text": None, "text_pair": "x", "id": 70}] + records[71:])
    source, out, model = f"{s3_uri}/in.parquet", f"{s3_uri}/out", f"{s3_uri}/finetune"
    prefix = out.split("/", 3)[3]
    storage.upload_dir(mrpc_checkpoint, f"{model}/checkpoint")
    with pytest.raises(InputError, match=r"/nothing: not a fine-tuned bertflow checkpoint"):
        run(f"{s3_uri}/nothing", source, out)
    assert not storage.exists(out)
    storage.write_bytes(source, parquet_bytes(bad))
    with pytest.raises(InputError, match=r"in.parquet: row 71: no 'text' column"):
        run(model, source, out, block_rows=20, concurrency=2)
    assert {k.rsplit("/", 1)[1] for k in s3_server.keys(prefix)} == {"_job.json", "_lease.json"}  # no manifest
    with pytest.raises(InputError, match=r"_manifest.json: does not exist"):
        list(read_predictions(out))
    storage.write_bytes(source, parquet_bytes(good))  # the same input, now readable: the same settings
    summary = run(model, source, out, block_rows=20, concurrency=2)
    assert summary["rows"] == 90 and summary["parts"] == 5
    parts = [f"part-{i:012d}.jsonl" for i in range(0, 90, 20)]
    assert {k.rsplit("/", 1)[1] for k in s3_server.keys(prefix)} == {"_job.json", "_lease.json", "_manifest.json",
                                                                       *parts}
    written = {o["Key"].rsplit("/", 1)[1]: o["LastModified"]
               for o in s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix)["Contents"]}
    assert all(written["_manifest.json"] >= written[p] for p in parts)
    lines = list(read_predictions(out))
    assert [line["row"] for line in lines] == list(range(90))
    assert [line["id"] for line in lines] == [str(i) for i in range(90)]
    expected = Predictor(mrpc_checkpoint).predict_records([{k: r[k] for k in ("text", "text_pair")} for r in records])
    assert [line["label"] for line in lines] == [e["label"] for e in expected]
    for line, e in zip(lines, expected):
        assert line["probabilities"] == pytest.approx(e["probabilities"], abs=1e-5)
    with pytest.raises(InputError, match=r"already holds a finished output"):
        run(mrpc_checkpoint, source, out)
    other = f"{s3_uri}/other"
    storage.write_text(f"{other}/notes.txt", "mine")
    with pytest.raises(InputError, match=r"other already holds 1 entry \(notes.txt\), not written by"):
        run(mrpc_checkpoint, source, other)
    assert list(s3_server.keys(other.split("/", 3)[3])) == [f"{other.split('/', 3)[3]}/notes.txt"]


@pytest.mark.integration
def test_a_killed_run_leaves_no_output_and_the_next_run_completes(ray_local, mrpc_checkpoint, tmp_path):
    """`bertflow predict` killed (SIGKILL) once parts were written: nothing at --out, only its temporary,
    which the next run removes before writing the whole output."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": f"sentence number {i}", "text_pair": "a pair"})
                                               + "\n" for i in range(600)))
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(root)}
    process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "predict", "--checkpoint", str(mrpc_checkpoint),
                                "--input", str(tmp_path / "in.jsonl"), "--out", str(out), "--block-rows", "10"],
                               env=env, cwd=root, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".out.tmp-*/part-*.jsonl")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists() and len(list(tmp_path.glob(".out.tmp-*/part-*.jsonl"))) >= 1
    summary = run(mrpc_checkpoint, tmp_path / "in.jsonl", out, block_rows=200)
    assert summary == {"rows": 600, "parts": 3, "output": str(out), "task": "mrpc"}
    assert [line["row"] for line in read_predictions(str(out))] == list(range(600))
    assert leftovers(out) == []


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


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
        run(minilm_dir, tmp_path / "in.jsonl", tmp_path / "out")
