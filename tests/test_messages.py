"""Issue 32, item 5: each message names the real cause, through the CLI (tree hashes compared on refusals).

The probes: a spec with a stage key given twice was accepted (the last won); a file given as --data was
said "not to exist"; SQuAD with no usable questions did not say why; a text file with a few NUL bytes
was dropped whole as "binary"; an output name of 250 characters or a symlink loop gave a traceback;
`--config huge` did not list the presets; output = input was refused as "another run's output"; a
file-size limit (`ulimit -f`) gave a traceback or Ray's start-up error.
"""

from __future__ import annotations

import json
import resource

import pytest
from cli_helpers import ROOT, assert_refused, bertflow, cli, tree_hash


def test_a_stage_key_given_twice_is_refused_naming_file_and_line(tmp_path, capsys):
    spec = tmp_path / "twice.yaml"
    text = (ROOT / "pipelines" / "quickstart.yaml").read_text()
    tokenizer_stage = "  tokenizer:\n    inputs: {corpus: corpus}\n    config: {vocab_size: 2000}\n"
    spec.write_text(text + "\n" + tokenizer_stage)  # `tokenizer` again, at the end of `stages:`
    first = text.splitlines().index("  tokenizer:") + 1
    again = len(text.splitlines()) + 2
    before = tree_hash(tmp_path)
    for command in ("run", "status"):
        assert_refused(cli(capsys, command, spec, "--workdir", tmp_path / "work"), command,
                       f"{spec}:{again}: key 'tokenizer' is given twice in the same mapping (first on line {first})")
    assert tree_hash(tmp_path) == before


def test_a_file_given_as_data_is_called_a_file(datasets_dir, minilm_dir, tmp_path, capsys):
    before = tree_hash(tmp_path)
    assert_refused(cli(capsys, "finetune", "--task", "sst2", "--data", datasets_dir / "glue" / "SST-2" / "train.tsv",
                       "--checkpoint", minilm_dir, "--out", tmp_path / "out"), "finetune",
                   f"--data {datasets_dir / 'glue' / 'SST-2' / 'train.tsv'} is a file; give the task's folder")
    assert tree_hash(tmp_path) == before


def test_squad_without_usable_questions_says_why(datasets_dir, minilm_dir, tmp_path, capsys):
    squad = json.loads((datasets_dir / "squad_v1.1" / "dev-v1.1.json").read_text())
    squad["data"] = squad["data"][:1]
    for paragraph in squad["data"][0]["paragraphs"]:
        for qa in paragraph["qas"]:
            for answer in qa["answers"]:
                answer["answer_start"] += 1  # every offset one character off, as a broken converter writes them
    data = tmp_path / "squad"
    data.mkdir()
    for name in ("train-v1.1.json", "dev-v1.1.json"):
        (data / name).write_text(json.dumps(squad))
    qa = squad["data"][0]["paragraphs"][0]["qas"][0]
    before = tree_hash(tmp_path)
    assert_refused(cli(capsys, "finetune", "--task", "squad_v1", "--data", data, "--checkpoint", minilm_dir, "--out",
                       tmp_path / "out"), "finetune", f"{data / 'train-v1.1.json'}: no usable questions",
                   "has an answer whose text is not at its answer_start",
                   f"question {qa['id']}: answer {qa['answers'][0]['text']!r} at answer_start "
                   f"{qa['answers'][0]['answer_start']}", f"the text is at offset {qa['answers'][0]['answer_start'] - 1}")
    assert tree_hash(tmp_path) == before


def test_binary_input_says_why_and_a_few_nul_bytes_do_not_drop_the_file(wiki_dir, vocab_txt, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "image.bin").write_bytes(bytes(range(256)) * 64)
    before = tree_hash(tmp_path)
    assert_refused(cli(capsys, "shards", "build", "--corpus", corpus, "--tokenizer", vocab_txt, "--out",
                       tmp_path / "shards"), "shards",
                   f"{corpus / 'image.bin'} (binary: 11% of its first 8,192 bytes are NUL or other control bytes")
    assert tree_hash(tmp_path) == before
    (corpus / "image.bin").unlink()
    (corpus / "damaged.txt").write_bytes(b"A damaged line\x00 here.\nA whole sentence.\n")
    (corpus / "wiki_00.gz").write_bytes((wiki_dir / "wiki_00.gz").read_bytes())
    code, _, err = cli(capsys, "tokenizer", "train", "--corpus", corpus, "--vocab-size", "500", "--sample-sentences",
                       "3000", "--out", tmp_path / "tok")
    assert code == 0, err
    read = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["training"]["read"]
    assert (read["undecodable_lines"], read["binary_files"], read["files"]) == (1, 0, 2)  # read, its line counted


def test_output_names_too_long_or_in_a_symlink_loop_are_one_line(minilm_dir, tmp_path, capsys):
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    long_name = tmp_path / ("a" * 250)
    before = tree_hash(tmp_path)
    assert_refused(cli(capsys, "convert", "--from-hf", minilm_dir, "--out", long_name), "convert",
                   f"{long_name}: the name (250 bytes) is too long for the file system", "use at most 237 bytes")
    assert_refused(cli(capsys, "convert", "--from-hf", minilm_dir, "--out", tmp_path / "loop-a" / "ours"), "convert",
                   "the path goes round a loop of symbolic links")
    assert tree_hash(tmp_path) == before


def test_an_unknown_model_lists_the_presets_and_output_equal_to_input_says_so(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "part-00000.parquet").write_bytes(b"PAR1" + b"\2" * 200 + b"PAR1")
    (shards / "_manifest.json").write_text('{"counts": {"examples": 1}}\n')
    before = tree_hash(tmp_path)
    assert_refused(cli(capsys, "pretrain", "--shards", shards, "--out", tmp_path / "run", "--config", "huge"),
                   "pretrain", "model 'huge' is neither a model preset (known presets: tiny, mini, small, medium, base, "
                   "large) nor an existing checkpoint dir")
    assert_refused(cli(capsys, "pretrain", "--shards", shards, "--out", shards), "pretrain",
                   f"--out {shards} is also an input")
    assert tree_hash(tmp_path) == before


def limited(megabytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (megabytes * 2**20, megabytes * 2**20))
    return apply


@pytest.mark.integration
def test_a_file_size_limit_is_named_and_leaves_nothing_half_written(minilm_dir, wiki_dir, vocab_txt, tmp_path):
    """`ulimit -f` in the command's process: writing past it, or starting Ray under it, is one line naming it."""
    before = tree_hash(tmp_path)
    convert = bertflow("convert", "--from-hf", minilm_dir, "--out", tmp_path / "ours", preexec_fn=limited(2))
    _, err = convert.communicate(timeout=300)
    assert convert.returncode == 2, err
    assert err.strip().splitlines() == [
        (f"bertflow convert: error: writing {tmp_path / 'ours'} went past the file-size limit (ulimit -f: 2,097,152 "
         "bytes); nothing half-written is kept under a final name: raise the limit and re-run")]
    build = bertflow("shards", "build", "--corpus", wiki_dir / "wiki_00.gz", "--tokenizer", vocab_txt, "--out",
                     tmp_path / "shards", env={"RAY_ADDRESS": ""}, preexec_fn=limited(64))
    _, err = build.communicate(timeout=300)
    assert build.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bertflow shards: error: Ray cannot start: the file-size limit "
                                                   "(ulimit -f) is 67,108,864 bytes"), err
    assert tree_hash(tmp_path) == before  # no output, no temporary, no lock
