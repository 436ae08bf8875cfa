"""Reliability issue #18 as a new user meets it, through the CLI: `convert`, `predict`, `tokenizer`.

Each test reproduces a probe of the issue and asserts the new behaviour: a refusal is exit code 2
with one line `bertflow <cmd>: error: ...` on stderr that names the folder or file and what it
holds, and nothing on disk changes (a hash of every name, size and byte of the tree, before and
after); an output appears under its final name only when complete, with no lock or temporary
left beside it.
"""

from __future__ import annotations

import json
import queue
import random
import signal
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from bert.checkpoint import from_pretrained, save_pretrained
from bert.corpus import CorpusConfig, InputFile, ReadStats, read_documents
from bert.inference import write_task_file
from cli_helpers import assert_refused, cli, tree_hash
from pipelines.cli import main
from pipelines.outdir import lock

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def no_leftovers(directory: Path) -> None:
    """No lock file or temporary of a one-piece output left in `directory`."""
    stray = [p.name for p in directory.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or
                                                                               p.name.endswith(".lock"))]
    assert stray == []


def finetune_output(path: Path) -> Path:
    """What a finished `bertflow finetune` leaves (contents are not read by the commands under test)."""
    (path / "checkpoint").mkdir(parents=True)
    (path / "metrics.json").write_text('{"dev/accuracy": 0.84}\n')
    (path / "predictions.jsonl").write_text('{"row": 0, "prediction": "1"}\n')
    (path / "checkpoint" / "config.json").write_text("{}\n")
    (path / "checkpoint" / "model.safetensors").write_bytes(b"\0" * 64)
    (path / "mlflow.db").write_bytes(b"SQLite format 3\0" + b"\1" * 100)
    return path


def shards_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "part-00000.parquet").write_bytes(b"PAR1" + b"\2" * 200 + b"PAR1")
    (path / "_manifest.json").write_text('{"counts": {"examples": 1}}\n')
    return path


def pretrain_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "_job.json").write_text(json.dumps({"job": "pretrain", "identity": {}, "identity_sha256": "x"}) + "\n")
    (path / "checkpoints").mkdir()
    (path / "checkpoints" / "step-100.txt").write_text("weights\n")
    return path


@pytest.fixture(scope="module")
def finetuned_checkpoint(minilm_dir, tmp_path_factory) -> Path:
    """A fine-tuned bertflow checkpoint dir (MiniLM encoder, fresh MRPC head), as predict and --to-hf read it."""
    out = tmp_path_factory.mktemp("ck") / "mrpc"
    torch.manual_seed(0)
    save_pretrained(from_pretrained(minilm_dir, head="sequence_classification", labels=["0", "1"]), out,
                    tokenizer_dir=minilm_dir)
    write_task_file(out, "mrpc", 128)
    return out


@pytest.fixture
def texts(tmp_path) -> Path:
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "text": f"sentence number {i}", "text_pair": "another one"})
                            + "\n" for i in range(5)))
    return path


# ----------------------------------------------------------------------------- 1. convert


def test_convert_from_hf_refuses_an_existing_finetune_output(minilm_dir, tmp_path, capsys):
    out = finetune_output(tmp_path / "run")
    before = tree_hash(tmp_path, minilm_dir)
    line = assert_refused(cli(capsys, "convert", "--from-hf", minilm_dir, "--out", out), "convert",
                          str(out), "fine-tune output (metrics.json)", "nothing was changed")
    assert "already exists" in line
    assert tree_hash(tmp_path, minilm_dir) == before


def test_convert_to_hf_refuses_an_existing_shards_dir(finetuned_checkpoint, tmp_path, capsys):
    out = shards_dir(tmp_path / "shards")
    before = tree_hash(tmp_path, finetuned_checkpoint)
    assert_refused(cli(capsys, "convert", "--to-hf", finetuned_checkpoint, "--out", out), "convert",
                   str(out), "_manifest.json")
    assert tree_hash(tmp_path, finetuned_checkpoint) == before


def test_convert_input_and_output_may_not_coincide_or_nest(finetuned_checkpoint, tmp_path, capsys):
    work = tmp_path / "work"
    src = work / "ck"
    save_pretrained(from_pretrained(finetuned_checkpoint), src)  # a bertflow checkpoint of our own to nest into
    before = tree_hash(tmp_path)
    assert_refused(cli(capsys, "convert", "--to-hf", src, "--out", src), "convert", "is also an input")
    assert_refused(cli(capsys, "convert", "--to-hf", src, "--out", src / "hf"), "convert", "lies inside the input")
    assert_refused(cli(capsys, "convert", "--to-hf", src, "--out", work), "convert", "contains the input")
    assert tree_hash(tmp_path) == before


def test_convert_reads_its_input_before_creating_anything(minilm_dir, tmp_path, capsys):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_bytes((minilm_dir / "config.json").read_bytes())
    (src / "model.safetensors").write_bytes((minilm_dir / "model.safetensors").read_bytes()[:5000])  # truncated
    before = tree_hash(tmp_path)
    assert_refused(cli(capsys, "convert", "--from-hf", src, "--out", tmp_path / "new" / "ours"), "convert",
                   "model.safetensors", "truncated or corrupt")
    assert_refused(cli(capsys, "convert", "--from-hf", tmp_path / "missing", "--out", tmp_path / "new" / "ours"),
                   "convert", "missing")
    assert tree_hash(tmp_path) == before  # not even the parent of --out was created


def test_convert_output_appears_only_when_complete(minilm_dir, tmp_path, capsys, monkeypatch):
    import bert.checkpoint

    real = bert.checkpoint.write_checkpoint

    def disk_full(model, directory, **kwargs):
        real(model, directory, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bert.checkpoint, "write_checkpoint", disk_full)
    assert_refused(cli(capsys, "convert", "--from-hf", minilm_dir, "--out", tmp_path / "ours"), "convert",
                   f"no space left on {tmp_path / 'ours'}", "nothing half-written")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no half-written dir, no lock, no temporary

    monkeypatch.setattr(bert.checkpoint, "write_checkpoint", real)
    with lock(tmp_path / ".ours.lock", "test"):  # another convert into the same --out is running
        assert_refused(cli(capsys, "convert", "--from-hf", minilm_dir, "--out", tmp_path / "ours"), "convert",
                       "is in use by another run")
    assert main(["convert", "--from-hf", str(minilm_dir), "--out", str(tmp_path / "ours")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]
    assert {"config.json", "model.safetensors", "vocab.txt"} <= {p.name for p in (tmp_path / "ours").iterdir()}


def test_convert_python_api_never_overwrites(finetuned_checkpoint, tmp_path):
    from bert.checkpoint import convert
    from bert.errors import CheckpointError

    out = finetune_output(tmp_path / "run")
    before = tree_hash(tmp_path, finetuned_checkpoint)
    with pytest.raises(CheckpointError, match="already exists"):
        convert(finetuned_checkpoint, out, to_hf=True)
    with pytest.raises(CheckpointError, match="may not be, contain or lie inside the input"):
        convert(finetuned_checkpoint, finetuned_checkpoint / "hf", to_hf=True)
    assert tree_hash(tmp_path, finetuned_checkpoint) == before


# ----------------------------------------------------------------------------- 2. predict


def test_predict_refuses_to_overwrite_its_input(finetuned_checkpoint, texts, tmp_path, capsys):
    before = tree_hash(tmp_path, finetuned_checkpoint)
    assert_refused(cli(capsys, "predict", "--checkpoint", finetuned_checkpoint, "--input", texts, "--out", texts),
                   "predict", f"--out {texts} is also an input")
    assert tree_hash(tmp_path, finetuned_checkpoint) == before
    assert "sentence number 4" in texts.read_text()


def test_predict_refuses_an_existing_output_and_one_inside_the_checkpoint(finetuned_checkpoint, texts, tmp_path,
                                                                         capsys):
    existing = tmp_path / "earlier.jsonl"
    existing.write_text('{"row": 0, "prediction": "1"}\n')
    before = tree_hash(tmp_path, finetuned_checkpoint)
    assert_refused(cli(capsys, "predict", "--checkpoint", finetuned_checkpoint, "--input", texts,
                       "--out", existing), "predict", str(existing), "already exists",
                   f"a file of {existing.stat().st_size} bytes")
    assert_refused(cli(capsys, "predict", "--checkpoint", finetuned_checkpoint, "--input", texts,
                       "--out", finetuned_checkpoint / "p"), "predict", "lies inside the input")
    assert tree_hash(tmp_path, finetuned_checkpoint) == before


def test_predict_output_is_required_and_help_names_no_default(finetuned_checkpoint, texts, tmp_path, capsys):
    before = tree_hash(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--checkpoint", str(finetuned_checkpoint), "--input", str(texts)])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err
    assert tree_hash(tmp_path) == before  # no <input>.predictions.jsonl, nor anything else, next to the input

    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--help"])
    assert exit_info.value.code == 0
    usage = " ".join(capsys.readouterr().out.split())
    assert "--out OUT" in usage and "predictions.jsonl" not in usage


@pytest.mark.integration
def test_predict_writes_a_new_dir_atomically(ray_local, finetuned_checkpoint, texts, tmp_path, capsys):
    from pipelines.jobs.predict import read_predictions

    out = tmp_path / "predictions" / "texts"
    code, stdout, err = cli(capsys, "predict", "--checkpoint", finetuned_checkpoint, "--input", texts, "--out", out)
    assert code == 0, err
    assert [row["id"] for row in read_predictions(str(out))] == ["0", "1", "2", "3", "4"]
    assert (out / "_manifest.json").is_file()
    assert f"written to {out}" in stdout
    no_leftovers(out.parent)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions", "texts.jsonl"]


# ----------------------------------------------------------------------------- 4. tokenizer train: pathological text


def random_letters(n: int, seed: int = 0) -> str:
    return "".join(random.Random(seed).choices(string.ascii_letters, k=n))


def test_tokenizer_train_drops_whitespace_free_runs_and_says_so(wiki_dir, tmp_path, capsys):
    huge = tmp_path / "corpus" / "huge.txt"
    huge.parent.mkdir()
    huge.write_text(random_letters(5_000_000) + "\n")  # one 5 MB line without a space
    out = tmp_path / "tok"
    code, stdout, err = cli(capsys, "tokenizer", "train", "--corpus", huge, wiki_dir / "wiki_00.gz",
                            "--vocab-size", "500", "--sample-sentences", "3000", "--out", out)
    assert code == 0, err
    # progress: reading, the sample with what was dropped, training start and end with sizes
    assert "[tokenizer] reading 2 corpus file(s)" in stdout
    assert "dropped 500 run(s) of more than 1,000 characters without whitespace (5,000,000 characters" in stdout
    assert "[tokenizer] training a 512-piece unigram model on 3,000 sentences (" in stdout
    assert "[tokenizer] trained 512 pieces in " in stdout
    training = json.loads((out / "tokenizer_config.json").read_text())["training"]
    assert (training["long_runs_dropped"], training["long_run_chars_dropped"]) == (500, 5_000_000)
    assert training["max_run_chars"] == 1000
    no_leftovers(tmp_path)

    # a corpus of nothing else: a clear error, no traceback, nothing written
    before = tree_hash(tmp_path)
    assert_refused(cli(capsys, "tokenizer", "train", "--corpus", huge, "--vocab-size", "500",
                       "--out", tmp_path / "tok2"), "tokenizer", "no text in the corpus", "dropped 500 run(s)")
    assert tree_hash(tmp_path) == before


def test_tokenizer_train_sentencepiece_error_is_one_line(tmp_path, capsys):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a few words only.\n")
    before = tree_hash(tmp_path)
    assert_refused(cli(capsys, "tokenizer", "train", "--corpus", tiny, "--vocab-size", "1000",
                       "--out", tmp_path / "tok"), "tokenizer", "sentencepiece could not train a 1024-piece",
                   "Vocabulary size too high")
    assert tree_hash(tmp_path) == before


def _bertflow() -> list[str]:
    script = Path(sys.executable).parent / "bertflow"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from pipelines.cli import main; sys.exit(main())"]


@pytest.mark.integration
def test_tokenizer_train_stops_within_seconds_on_sigint(tmp_path):
    psutil = pytest.importorskip("psutil")
    corpus = tmp_path / "noise.txt"
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=100)) for _ in range(20_000)]
    # 2 MB of random 100-letter words: SentencePiece needs minutes for them
    corpus.write_text("".join(" ".join(words[i : i + 20]) + "\n" for i in range(0, len(words), 20)))
    out = tmp_path / "tok"
    before = tree_hash(tmp_path)
    process = subprocess.Popen(
        [*_bertflow(), "tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "2000", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        seen = []
        while not any("[tokenizer] training a" in line for line in seen):
            seen.append(lines.get(timeout=120))
        time.sleep(2)  # SentencePiece is inside its C++ training loop by now
        trainers = psutil.Process(process.pid).children(recursive=True)
        assert trainers, "training runs in a child process"
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
    err = process.stderr.read()
    assert process.returncode == 130, err
    assert elapsed < 10, f"took {elapsed:.1f} s to stop"
    assert err.strip().splitlines()[-1] == ("bertflow tokenizer: interrupted: training stopped, "
                                            f"nothing was written to {out}")
    assert "Traceback" not in err
    _, alive = psutil.wait_procs(trainers, timeout=5)
    assert alive == []  # the SentencePiece process is gone too
    assert tree_hash(tmp_path) == before


# ----------------------------------------------------------------------------- 5. truncated .gz


def test_tokenizer_train_truncated_gz_is_an_error_unless_skip_unreadable(wiki_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    whole = (wiki_dir / "wiki_00.gz").read_bytes()
    (corpus / "truncated.gz").write_bytes(whole[: len(whole) // 2])
    (corpus / "whole.gz").write_bytes((wiki_dir / "wiki_01.gz").read_bytes())
    before = tree_hash(tmp_path)
    assert_refused(cli(capsys, "tokenizer", "train", "--corpus", corpus, "--vocab-size", "500",
                       "--sample-sentences", "3000", "--out", tmp_path / "tok"), "tokenizer",
                   str(corpus / "truncated.gz"), "corrupt or truncated", "--skip-unreadable")
    assert tree_hash(tmp_path) == before

    code, _, err = cli(capsys, "tokenizer", "train", "--corpus", corpus, "--vocab-size", "500",
                       "--sample-sentences", "3000", "--out", tmp_path / "tok", "--skip-unreadable")
    assert code == 0, err
    assert (f"bertflow tokenizer: warning: --skip-unreadable: 1 corrupt or truncated file(s) read only up to the "
            f"fault: {corpus / 'truncated.gz'}") in err
    training = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["training"]
    assert training["unreadable_files_skipped"] == [str(corpus / "truncated.gz")]
    whole_only = ReadStats()
    for _ in read_documents(InputFile(corpus / "whole.gz", "whole.gz"), whole_only, CorpusConfig()):
        pass
    assert training["read"]["unreadable_files"] == 1
    assert training["read"]["documents"] > whole_only.documents  # what truncated.gz held before the fault is kept


# ----------------------------------------------------------------------------- 11. tokenizer into a non-empty dir


def test_tokenizer_train_refuses_an_existing_out(wiki_dir, tmp_path, capsys):
    shards = shards_dir(tmp_path / "shards")
    empty = tmp_path / "empty"
    empty.mkdir()
    before = tree_hash(tmp_path)
    assert_refused(cli(capsys, "tokenizer", "train", "--corpus", wiki_dir / "wiki_00.gz", "--vocab-size", "500",
                       "--out", shards), "tokenizer", str(shards), "_manifest.json", "nothing was changed")
    assert_refused(cli(capsys, "tokenizer", "train", "--corpus", wiki_dir / "wiki_00.gz", "--vocab-size", "500",
                       "--out", empty), "tokenizer", str(empty), "0 entries")
    assert tree_hash(tmp_path) == before


def test_tokenizer_from_vocab_refuses_an_existing_out(vocab_txt, tmp_path, capsys):
    pretrain = pretrain_dir(tmp_path / "pretrain")
    before = tree_hash(tmp_path)
    assert_refused(cli(capsys, "tokenizer", "from-vocab", "--vocab", vocab_txt, "--out", pretrain), "tokenizer",
                   str(pretrain), "a bertflow pretrain run (_job.json)")
    assert tree_hash(tmp_path) == before

    assert cli(capsys, "tokenizer", "from-vocab", "--vocab", vocab_txt, "--out", tmp_path / "tok")[0] == 0
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer_config.json", "vocab.txt"]
    no_leftovers(tmp_path)


# ----------------------------------------------------------------------------- inputs and outputs disjoint


def test_tokenizer_output_may_not_be_or_nest_an_input(wiki_dir, vocab_txt, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "wiki_00.gz").write_bytes((wiki_dir / "wiki_00.gz").read_bytes())
    vocab = tmp_path / "vocab" / "vocab.txt"
    vocab.parent.mkdir()
    vocab.write_bytes(vocab_txt.read_bytes())
    before = tree_hash(tmp_path)
    train = ("tokenizer", "train", "--vocab-size", "500", "--corpus", corpus)
    assert_refused(cli(capsys, *train, "--out", corpus), "tokenizer", "is also an input")
    assert_refused(cli(capsys, *train, "--out", corpus / "tok"), "tokenizer", "lies inside the input")
    assert_refused(cli(capsys, *train, "--out", tmp_path), "tokenizer", "contains the input")
    assert_refused(cli(capsys, "tokenizer", "from-vocab", "--vocab", vocab, "--out", vocab), "tokenizer",
                   "is also an input")
    assert_refused(cli(capsys, "tokenizer", "from-vocab", "--vocab", vocab, "--out", vocab.parent), "tokenizer",
                   "contains the input")
    assert tree_hash(tmp_path) == before
