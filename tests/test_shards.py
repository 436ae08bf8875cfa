"""The shards stage on Ray Data: determinism across workers and blocks, local and on S3 (the moto server),
the output contract (resume after a kill), bad input.

CI builds from 6 of the 100 Wikipedia files; the full-extract build is marked `slow`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bert.corpus import CorpusConfig, ReadStats, expand_inputs, read_documents
from bert.errors import InputError
from bert.pretraining_data import PretrainingDataConfig
from bert.pretraining_masking import SpecialTokens
from bert.shards import ShardsManifest, example_schema
from bert.tokenizer import Tokenizer
from pipelines.cli import main
from pipelines.jobs.shard_tasks import shard_of
from pipelines.jobs.shards import build_shards


def read_manifest(path):
    return ShardsManifest.read(path).raw

pytestmark = pytest.mark.integration

SUBSET = [f"wiki_{i:02d}.gz" for i in range(20, 26)]
CONFIG = PretrainingDataConfig(dupe_factor=2, num_shards=3)


@pytest.fixture(scope="module")
def wiki_dir(datasets_dir: Path) -> Path:
    return datasets_dir / "wikipedia_en_extract" / "AA"


@pytest.fixture(scope="module")
def subset(wiki_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = tmp_path_factory.mktemp("corpus") / "wiki"
    corpus.mkdir()
    for name in SUBSET:
        (corpus / name).symlink_to(wiki_dir / name)
    return corpus


@pytest.fixture(scope="module")
def built(ray_local, subset: Path, vocab_txt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("build") / "shards"
    build_shards([subset], vocab_txt, out, CONFIG, num_workers=1)
    return out


def part_hashes(shards_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(shards_dir.glob("part-*.parquet"))}


def read_rows(shards_dir: Path) -> list[dict]:
    return [row for p in sorted(shards_dir.glob("part-*.parquet")) for row in pq.read_table(p).to_pylist()]


def test_same_bytes_whatever_the_workers_and_blocks(built: Path, subset: Path, vocab_txt: Path, tmp_path: Path) -> None:
    """`built`: 1 worker, default blocks (one of 6 files); here 4 workers, a file per block."""
    again = tmp_path / "shards"
    build_shards([subset], vocab_txt, again, CONFIG, num_workers=4, files_per_task=1)
    first = part_hashes(built)
    assert list(first) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert part_hashes(again) == first
    assert [p["sha256"] for p in read_manifest(again)["parts"]] == list(first.values())


def test_layout_and_manifest(built: Path, subset: Path, vocab_txt: Path) -> None:
    assert sorted(p.name for p in built.iterdir() if not p.name.startswith(".")) == [  # .lock, .writers: the claim's
        "_job.json", "_manifest.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet", "tokenizer",
    ]
    manifest = read_manifest(built)
    assert manifest["config"] == dataclasses.asdict(CONFIG)
    assert [i["name"] for i in manifest["inputs"]] == [f"wiki/{n}" for n in SUBSET]
    for entry in manifest["inputs"]:
        assert entry["sha256"] == hashlib.sha256((subset / Path(entry["name"]).name).read_bytes()).hexdigest()
    counts = manifest["counts"]
    assert counts["files"] == 6 and counts["documents"] == 367  # articles in wiki_20..25 (datasets MANIFEST.md)
    assert counts["examples"] == sum(p["examples"] for p in manifest["parts"])
    assert not any(manifest["skipped"].values())
    tok = Tokenizer.load(built / "tokenizer")
    assert manifest["tokenizer"]["vocab_size"] == tok.vocab_size == 30522
    assert manifest["tokenizer"]["vocab_sha256"] == Tokenizer.from_vocab_file(vocab_txt).fingerprint()
    for part in manifest["parts"]:  # balanced parts: documents are spread by a hash of their id
        assert abs(part["examples"] / (counts["examples"] / 3) - 1) < 0.35
    hist = manifest["statistics"]["length_histogram"]
    assert sum(hist["counts"]) == counts["examples"] and len(hist["edges"]) == len(hist["counts"]) + 1


def test_examples_meet_the_acceptance_statistics(built: Path) -> None:
    manifest = read_manifest(built)
    tok = Tokenizer.load(built / "tokenizer")
    special = SpecialTokens.of(tok)
    assert pq.read_schema(built / "part-00000.parquet").remove_metadata() == example_schema(False)
    rows = read_rows(built)
    masked = maskable = random_next = 0
    kinds = {"mask": 0, "random": 0, "keep": 0}
    for k, part in enumerate(sorted(built.glob("part-*.parquet"))):
        for doc_id in set(pq.read_table(part, columns=["a_doc_id"]).column(0).to_pylist()):
            assert shard_of(doc_id, 3) == k  # a document's examples live in the shard its id hashes to
    for row in rows:
        ids = np.array(row["input_ids"])
        positions = np.array(row["masked_lm_positions"], dtype=np.int64)
        labels = np.array(row["masked_lm_ids"])
        assert row["length"] == len(ids) <= CONFIG.max_seq_length
        assert not special.is_special[labels].any()
        shown = ids[positions]
        kinds["mask"] += int((shown == tok.mask_id).sum())
        kinds["keep"] += int((shown == labels).sum())
        kinds["random"] += int(((shown != tok.mask_id) & (shown != labels)).sum())
        masked += len(positions)
        maskable += int((~special.is_special[ids]).sum()) + int((shown == tok.mask_id).sum())
        random_next += row["next_sentence_label"]
        if row["next_sentence_label"] == 1:
            assert row["a_doc_id"] != row["b_doc_id"]
        else:
            assert row["a_doc_id"] == row["b_doc_id"] and row["b_sentence_start"] == row["a_sentence_end"]
    stats = manifest["statistics"]
    assert abs(masked / maskable - 0.15) < 0.005
    assert stats["masked_fraction"] == pytest.approx(masked / maskable)
    for kind, share in (("mask", 0.8), ("random", 0.1), ("keep", 0.1)):
        assert abs(kinds[kind] / masked - share) < 0.01
        assert stats["masked_split"][kind] == pytest.approx(kinds[kind] / masked)
    assert abs(random_next / len(rows) - 0.5) < 0.01
    assert stats["next_sentence_random_fraction"] == pytest.approx(random_next / len(rows))


def test_provenance_names_the_sentences_of_each_segment(built: Path, subset: Path) -> None:
    """The audit columns point at the very text of A and B: re-read and re-tokenize it."""
    tok = Tokenizer.load(built / "tokenizer")
    stats = ReadStats()
    docs = {d.doc_id: d for f in expand_inputs([subset]) for d in read_documents(f, stats)}
    rows = pq.read_table(built / "part-00001.parquet").slice(0, 60).to_pylist()
    for row in rows:
        ids = np.array(row["input_ids"])
        ids[row["masked_lm_positions"]] = row["masked_lm_ids"]
        sep = int(np.flatnonzero(ids == tok.sep_id)[0])
        for seg, side in ((ids[1:sep], "a"), (ids[sep + 1 : -1], "b")):
            sentences = docs[row[f"{side}_doc_id"]].sentences[row[f"{side}_sentence_start"] : row[f"{side}_sentence_end"]]
            run = [i for e in tok.encode_batch(list(sentences), add_special_tokens=False) for i in e.ids]
            assert any(run[k : k + len(seg)] == seg.tolist() for k in range(len(run) - len(seg) + 1))


def test_whole_word_and_dynamic_masking(ray_local, wiki_dir: Path, vocab_txt: Path, tmp_path: Path) -> None:
    config = PretrainingDataConfig(dupe_factor=1, num_shards=2, whole_word_masking=True, dynamic_masking=True)
    out = tmp_path / "shards"
    build_shards([wiki_dir / "wiki_30.gz"], vocab_txt, out, config)
    table = pq.read_table(out / "part-00000.parquet")
    assert table.schema.remove_metadata() == example_schema(True)
    rows = table.to_pylist()
    assert rows and all(not r["masked_lm_positions"] and not r["masked_lm_ids"] for r in rows)
    assert all(len(r["word_starts"]) == len(r["input_ids"]) for r in rows)
    tok = Tokenizer.load(out / "tokenizer")
    tokens = tok.convert_ids_to_tokens(rows[0]["input_ids"])
    assert [not t.startswith("##") for t in tokens[1:-1]] == rows[0]["word_starts"][1:-1]


def test_bad_inputs_are_counted_in_the_manifest(
    ray_local, wiki_dir: Path, vocab_txt: Path, tmp_path: Path
) -> None:
    corpus = tmp_path / "mixed"
    corpus.mkdir()
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (corpus / "bad-utf8.txt").write_bytes(b"Caf\xe9 au lait.\nSecond line.\n\nOne sentence only.\n")
    (corpus / "long.txt").write_text("word " * 1_000_000 + "\nAnd a normal sentence.\n")  # a 5 MB line
    (corpus / "docs.jsonl").write_text(
        "\n".join([json.dumps({"text": "A first sentence. And a second."}), json.dumps({"text": ""}), "oops"]) + "\n"
    )
    (corpus / "cut.gz").write_bytes((wiki_dir / "wiki_40.gz").read_bytes()[:60_000])
    shutil.copy(wiki_dir / "wiki_41.gz", corpus / "wiki_41.gz")
    out = tmp_path / "shards"
    manifest = build_shards([corpus], vocab_txt, out, PretrainingDataConfig(dupe_factor=1, num_shards=2),
                            CorpusConfig(skip_unreadable=True))
    assert manifest["skipped"] == {
        "empty_files": 1,
        "binary_files": 1,
        "unreadable_files": 1,
        "empty_documents": 1,
        "undecodable_lines": 1,
        "bad_records": 1,
        "long_sentences_cut": 1,
        "documents_without_tokens": 0,
    }
    rows = read_rows(out)
    doc_ids = {r["a_doc_id"] for r in rows} | {r["b_doc_id"] for r in rows}
    assert {"mixed/long.txt:0", "mixed/docs.jsonl:0"} <= doc_ids
    assert any(d.startswith("mixed/cut.gz:") for d in doc_ids)  # the part before the cut is kept
    assert manifest["counts"]["files"] == 7


def test_missing_path_fails_before_any_work(ray_local, subset: Path, vocab_txt: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    with pytest.raises(InputError, match="does not exist: .*nowhere"):
        build_shards([subset, tmp_path / "nowhere"], vocab_txt, out, CONFIG)
    with pytest.raises(InputError, match="tokenizer path does not exist: .*no-vocab.txt"):
        build_shards([subset], tmp_path / "no-vocab.txt", out, CONFIG)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary dir


def test_an_existing_output_is_never_overwritten(built: Path, subset: Path, vocab_txt: Path) -> None:
    before = tree_digest(built)
    with pytest.raises(InputError, match="already exists and holds a finished `bertflow shards build` output"):
        build_shards([subset], vocab_txt, built, CONFIG)  # a finished build of the very same settings, too
    assert tree_digest(built) == before


def test_cli_build_and_inspect(ray_local, wiki_dir: Path, vocab_txt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "shards"
    rc = main(["shards", "build", "--corpus", str(wiki_dir / "wiki_50.gz"), "--tokenizer", str(vocab_txt),
               "--out", str(out), "--dupe-factor", "1", "--num-shards", "2", "--max-seq-length", "64"])
    assert rc == 0
    assert read_manifest(out)["config"]["max_seq_length"] == 64
    assert main(["shards", "inspect", str(out), "--examples", "2"]) == 0
    shown = capsys.readouterr().out
    assert "length histogram" in shown and "[CLS]" in shown and "→" in shown and "random next" in shown
    rc = main(["shards", "build", "--corpus", str(tmp_path / "missing"), "--tokenizer", str(vocab_txt),
               "--out", str(tmp_path / "x")])
    assert rc == 2 and "missing" in capsys.readouterr().err


@pytest.mark.slow
def test_full_extract(ray_local, wiki_dir: Path, vocab_txt: Path, tmp_path: Path) -> None:
    """The whole extract with the default config (dupe factor 5, shards from the corpus size)."""
    manifest = build_shards([wiki_dir], vocab_txt, tmp_path / "shards")
    stats = manifest["statistics"]
    assert manifest["counts"]["documents"] == 6510  # 6514 articles, 4 with only a title
    assert abs(stats["masked_fraction"] - 0.15) < 0.005
    assert abs(stats["next_sentence_random_fraction"] - 0.5) < 0.01
    for kind, share in (("mask", 0.8), ("random", 0.1), ("keep", 0.1)):
        assert abs(stats["masked_split"][kind] - share) < 0.01


# ----------------------------------------------------------------------------- the CLI as a user meets it


def tree_digest(root: Path) -> str:
    """A hash of every path and file content under `root`."""
    digest = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        digest.update(p.relative_to(root).as_posix().encode() + b"\0")
        if p.is_file():
            digest.update(p.read_bytes())
    return digest.hexdigest()


def cli_build(corpus: Path, vocab_txt: Path, out: Path, *extra: str) -> int:
    return main(["shards", "build", "--corpus", str(corpus), "--tokenizer", str(vocab_txt), "--out", str(out),
                 "--dupe-factor", "1", "--num-shards", "2", "--max-seq-length", "64", *extra])


def one_line_error(capsys) -> str:
    """The error line the CLI printed: one line, the last on stderr (Ray Data may log above it)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("bertflow shards: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


def test_cli_truncated_gz_is_refused_naming_it(ray_local, wiki_dir: Path, vocab_txt: Path, tmp_path: Path,
                                                capsys) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(wiki_dir / "wiki_51.gz", corpus / "wiki_51.gz")
    (corpus / "cut.gz").write_bytes((wiki_dir / "wiki_52.gz").read_bytes()[:60_000])
    work = tmp_path / "work"
    work.mkdir()
    assert cli_build(corpus, vocab_txt, work / "shards") == 2
    err = one_line_error(capsys)
    assert "cut.gz" in err and "truncated" in err and "--skip-unreadable" in err
    assert list(work.iterdir()) == []  # nothing written: no output, no temporary, no lock


def test_cli_skip_unreadable_warns_with_count_and_names(ray_local, wiki_dir: Path, vocab_txt: Path, tmp_path: Path,
                                                        capsys) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(wiki_dir / "wiki_51.gz", corpus / "wiki_51.gz")
    (corpus / "cut.gz").write_bytes((wiki_dir / "wiki_52.gz").read_bytes()[:60_000])
    out = tmp_path / "shards"
    assert cli_build(corpus, vocab_txt, out, "--skip-unreadable") == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and "1 corrupt or truncated file(s)" in captured.err
    assert "corpus/cut.gz" in captured.err
    manifest = read_manifest(out)
    assert manifest["skipped"]["unreadable_files"] == 1
    assert manifest["skipped_files"]["unreadable"] == ["corpus/cut.gz"]


def test_cli_empty_or_binary_corpus_gives_the_real_error(vocab_txt: Path, tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (corpus / "blank.txt.gz").write_bytes(gzip_bytes(b"\n  \n"))
    assert cli_build(corpus, vocab_txt, tmp_path / "shards") == 2  # refused before Ray starts
    err = one_line_error(capsys)
    assert "no text in the corpus: 3 file(s), all empty or binary" in err
    assert "binary.bin (binary: " in err and "empty.txt (empty)" in err and "blank.txt.gz (empty)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_cli_corpus_without_any_token_names_its_files(ray_local, vocab_txt: Path, tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "blanks.txt").write_text("\n" * 20_000)  # too long for the look at its head: found by reading
    (corpus / "titles.txt").write_text('<doc id="1" title="T">\nT\n</doc>\n' + "\n" * 10_000)
    assert cli_build(corpus, vocab_txt, tmp_path / "shards") == 2
    err = one_line_error(capsys)
    assert "no text in the corpus: 2 file(s) gave no token" in err and "blanks.txt (empty)" in err
    assert "titles.txt" in err and "_buckets" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_cli_existing_out_is_refused_and_left_as_it_was(subset: Path, vocab_txt: Path, tmp_path: Path,
                                                        capsys) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    before = tree_digest(tmp_path)
    assert cli_build(subset, vocab_txt, out) == 2
    err = one_line_error(capsys)
    assert str(out) in err and "already holds" in err and "notes.txt" in err and "not written by" in err
    assert tree_digest(tmp_path) == before


def test_cli_output_inside_the_corpus_is_refused(wiki_dir: Path, vocab_txt: Path, tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(wiki_dir / "wiki_51.gz", corpus / "wiki_51.gz")
    before = tree_digest(tmp_path)
    assert cli_build(corpus, vocab_txt, corpus / "shards") == 2
    assert "lies inside the input" in one_line_error(capsys)
    assert tree_digest(tmp_path) == before


def kill_when(run: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    """SIGKILL the build once `ready()` holds (the process must still be running then)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert run.poll() is None, f"the build ended (rc {run.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)
    run.kill()
    run.wait()


def test_a_killed_build_is_restarted_then_resumed_to_the_same_bytes(ray_local, built: Path, subset: Path,
                                                                     vocab_txt: Path, tmp_path: Path) -> None:
    """SIGKILL in pass 1 (restarted: its buckets are not reused), then in pass 2 (resumed: the parts
    already built are kept); the output ends byte-identical to an uninterrupted build."""
    out = tmp_path / "shards"
    command = [sys.executable, "-m", "pipelines.cli", "shards", "build", "--corpus", str(subset), "--tokenizer",
               str(vocab_txt), "--out", str(out), "--dupe-factor", "2", "--num-shards", "3", "--num-workers", "1"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(run, lambda: any((out / "_work" / "buckets").rglob("*.parquet")), "a bucket file")
    assert (out / "_job.json").is_file() and not (out / "_work" / "tokenized.json").exists()
    run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(run, lambda: any((out / "_work" / "parts").glob("*.json")), "a finished part")
    assert not (out / "_manifest.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert kept, "the kill came after a part was built"
    with pytest.raises(InputError, match="holds a `bertflow shards build` run with other settings"):
        build_shards([subset], vocab_txt, out, dataclasses.replace(CONFIG, dupe_factor=3))
    manifest = build_shards([subset], vocab_txt, out, CONFIG)  # resumes
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in kept} == kept  # reused
    assert part_hashes(out) == part_hashes(built)
    assert manifest == read_manifest(built) | {"inputs": manifest["inputs"]}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in built.iterdir())


def test_s3_corpus_to_s3_output_same_bytes_as_local(built: Path, subset: Path, vocab_txt: Path, s3_server,
                                                    s3_uri: str) -> None:
    """The corpus read from and the shards written to the moto S3 server, as Ray Data reads and writes them."""
    from bert import storage

    prefix = s3_uri.removeprefix(f"s3://{s3_server.bucket}/")
    for name in SUBSET:  # the stored bytes as they are (pyarrow's output streams would gzip a .gz name again)
        s3_server.client().put_object(Bucket=s3_server.bucket, Key=f"{prefix}/wiki/{name}",
                                      Body=(subset / name).read_bytes())
    out = f"{s3_uri}/shards"
    manifest = build_shards([f"{s3_uri}/wiki"], vocab_txt, out, CONFIG, num_workers=2, files_per_task=4)
    remote = {p["part"]: p["sha256"] for p in manifest["parts"]}
    assert remote == part_hashes(built)
    for name, digest in remote.items():
        assert hashlib.sha256(storage.read_bytes(f"{out}/{name}")).hexdigest() == digest
    local = read_manifest(built)
    assert [i["name"] for i in manifest["inputs"]] == [i["name"] for i in local["inputs"]]
    assert manifest["counts"] == local["counts"] and manifest["statistics"] == local["statistics"]
    names = set(storage.list_dir(out))
    assert {"_manifest.json", "_job.json", "tokenizer", *remote} <= names and "_work" not in names
    with pytest.raises(InputError, match="already exists and holds"):
        build_shards([f"{s3_uri}/wiki"], vocab_txt, out, CONFIG)


def test_cli_inspect_refuses_a_truncated_part(built: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(built, copy)
    part = copy / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:1000])
    assert main(["shards", "inspect", str(copy)]) == 2
    err = one_line_error(capsys)
    assert "part-00001.parquet" in err and "truncated" in err


def gzip_bytes(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


def test_default_files_per_task_keeps_every_worker_busy_and_tasks_below_a_shard() -> None:
    from pipelines.jobs.shards import SHARD_TEXT_BYTES, default_files_per_task

    assert default_files_per_task([1 << 20] * 100, 2) == 13  # 8 tasks for 2 workers
    assert default_files_per_task([1 << 20] * 3, 4) == 1
    assert default_files_per_task([SHARD_TEXT_BYTES] * 1000, 2) == 1  # a shard's worth of text a task at most
