"""Issue 32, item 1: labels outside a task's label set are refused before any work, through the CLI.

The probe: a copy of SST-2 whose train file holds two stray labels (`2`, `positive`) trained a
4-class model and exited 0. Each refusal is exit code 2 with one line naming the file, the lines
and the offending values, and nothing on disk changes (tree hashes before and after).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import assert_refused, cli, tree_hash

from bert.errors import InputError
from bert.tasks import get_task
from bert.tasks.labels import check_task_labels


def glue_copy(datasets_dir: Path, task_dir: str, into: Path, rows: int = 40, train_extra: str = "",
              dev_extra: str = "") -> Path:
    """The first `rows` rows of a real GLUE task's train and dev files, with extra raw lines appended."""
    into.mkdir(parents=True)
    for name, extra in (("train.tsv", train_extra), ("dev.tsv", dev_extra)):
        lines = (datasets_dir / "glue" / task_dir / name).read_text(encoding="utf-8").splitlines(keepends=True)
        (into / name).write_text("".join(lines[: rows + 1]) + extra, encoding="utf-8")
    return into


def finetune(data: Path, checkpoint: Path, out: Path, task: str = "sst2", *extra: object) -> list[object]:
    return ["finetune", "--task", task, "--data", data, "--checkpoint", checkpoint, "--out", out, *extra]


def test_stray_labels_in_a_glue_train_file_are_refused(datasets_dir, minilm_dir, tmp_path, capsys):
    data = glue_copy(datasets_dir, "SST-2", tmp_path / "SST-2", train_extra="a stray row\t2\nanother one\tpositive\n")
    out = tmp_path / "out"
    before = tree_hash(tmp_path)
    assert_refused(cli(capsys, *finetune(data, minilm_dir, out)), "finetune",
                   f"{data / 'train.tsv'}: 2 row(s) with labels outside sst2's label set ['0', '1']",
                   "'2' (line 42), 'positive' (line 43)")
    assert_refused(cli(capsys, "sweep", "--task", "sst2", "--data", data, "--checkpoint", minilm_dir, "--out", out,
                       "--grid", "paper"), "sweep", "'2' (line 42), 'positive' (line 43)")
    assert tree_hash(tmp_path) == before and not out.exists()


def test_stray_labels_in_a_glue_eval_file_are_refused(datasets_dir, minilm_dir, tmp_path, capsys):
    data = glue_copy(datasets_dir, "SST-2", tmp_path / "SST-2", dev_extra="".join(f"row {i}\t3\n" for i in range(7)))
    before = tree_hash(tmp_path)
    assert_refused(cli(capsys, *finetune(data, minilm_dir, tmp_path / "out")), "finetune",
                   f"{data / 'dev.tsv'}: 7 row(s) with labels outside sst2's label set",
                   "'3' (lines 42, 43, 44, 45, 46, ... (7 in all))")
    assert tree_hash(tmp_path) == before


def test_a_tsv_task_infers_its_label_set_from_the_eval_files(datasets_dir, minilm_dir, tmp_path, capsys):
    data = glue_copy(datasets_dir, "SST-2", tmp_path / "reviews", train_extra="a stray row\tpositive\n")
    task = "tsv:text=sentence,label=label"
    before = tree_hash(tmp_path)
    line = assert_refused(cli(capsys, *finetune(data, minilm_dir, tmp_path / "out", task)), "finetune",
                          f"{data / 'train.tsv'}: 1 row(s) with labels outside the label set of the eval file(s) "
                          "dev.tsv ['0', '1']: 'positive' (line 42)", "--allow-new-labels")
    assert "cannot be scored" in line
    # --allow-new-labels: the label check lets the class through; the next check refuses the missing checkpoint
    assert_refused(cli(capsys, *finetune(data, tmp_path / "no-checkpoint", tmp_path / "out", task,
                                         "--allow-new-labels")), "finetune", "no-checkpoint")
    # ... but GLUE's label sets are fixed: the flag does not let a stray SST-2 label through
    assert_refused(cli(capsys, *finetune(data, minilm_dir, tmp_path / "out", "sst2", "--allow-new-labels")),
                   "finetune", "outside sst2's label set")
    assert tree_hash(tmp_path) == before


def test_stsb_scores_outside_zero_to_five_are_refused(datasets_dir, minilm_dir, tmp_path, capsys):
    source = (datasets_dir / "glue" / "STS-B" / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    bad = source[1].rsplit("\t", 1)[0] + "\t7.5\n"
    data = glue_copy(datasets_dir, "STS-B", tmp_path / "STS-B", train_extra=bad)
    before = tree_hash(tmp_path)
    assert_refused(cli(capsys, *finetune(data, minilm_dir, tmp_path / "out", "stsb")), "finetune",
                   f"{data / 'train.tsv'}: 1 row(s) with scores outside stsb's range [0, 5]: '7.5' (line 42)")
    assert tree_hash(tmp_path) == before


def test_conll_tags_outside_the_conll2003_set_are_refused(datasets_dir, minilm_dir, tmp_path, capsys):
    data = tmp_path / "conll2003"
    data.mkdir()
    for name in ("train.txt", "valid.txt", "test.txt"):
        lines = (datasets_dir / "conll2003" / name).read_text(encoding="utf-8").splitlines(keepends=True)[:60]
        (data / name).write_text("".join(lines), encoding="utf-8")
    with open(data / "train.txt", "a", encoding="utf-8") as f:
        f.write("\nBerlin NNP B-NP B-CITY\n")
    before = tree_hash(tmp_path)
    assert_refused(cli(capsys, *finetune(data, minilm_dir, tmp_path / "out", "conll2003")), "finetune",
                   f"{data / 'train.txt'}: 1 row(s) with labels outside conll2003's tag set",
                   "'B-CITY' (line 62)")
    assert tree_hash(tmp_path) == before


def test_the_real_datasets_pass_and_mnli_has_its_own_set(datasets_dir, tmp_path):
    for task, folder in (("sst2", "glue/SST-2"), ("mrpc", "glue/MRPC"), ("stsb", "glue/STS-B"),
                         ("conll2003", "conll2003"), ("squad_v1_dev_split", "squad_v1.1")):
        check_task_labels(get_task(task), datasets_dir / folder)
    mnli = tmp_path / "MNLI"
    mnli.mkdir()
    rows = "".join(f"{i}\ta\tb\t{label}\n" for i, label in enumerate(["entailment", "neutral", "1"]))
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        (mnli / name).write_text("index\tsentence1\tsentence2\tgold_label\n" + rows)
    with pytest.raises(InputError, match=r"train.tsv: 1 row\(s\) with labels outside mnli's label set "
                                         r"\['contradiction', 'entailment', 'neutral'\]: '1' \(line 4\)"):
        check_task_labels(get_task("mnli"), mnli)
