"""Issue 26, item 1: every job runs through the one skeleton, `pipelines/jobs/skeleton.run_job`.

A rule added once to the skeleton reaches all seven commands (eight handlers: `tokenizer` has two), and
the skeleton's steps by output kind: a NEW output built in a temporary and renamed whole, an existing one
refused; a RESUMABLE one refused once finished; Ray and the tracking store only for the jobs that use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import assert_refused, cli, tree_hash

from bert.errors import InputError
from pipelines.jobs import skeleton
from pipelines.jobs.skeleton import NEW, RESUMABLE, Claimed, Job, run_job

RULE = "refused by a rule written once, in the skeleton"


def commands(inputs: Path, sst2: Path) -> dict[str, list[object]]:
    """Each command's handler with its inputs (none of which needs to exist: the rule comes first) but --out."""
    return {
        "convert": ["convert", "--from-hf", inputs / "hf"],
        "tokenizer train": ["tokenizer", "train", "--corpus", inputs / "corpus.txt", "--vocab-size", "500"],
        "tokenizer from-vocab": ["tokenizer", "from-vocab", "--vocab", inputs / "vocab.txt"],
        "shards build": ["shards", "build", "--corpus", inputs / "corpus.txt", "--tokenizer", inputs / "vocab.txt"],
        "predict": ["predict", "--checkpoint", inputs / "checkpoint", "--input", inputs / "texts.jsonl"],
        "pretrain": ["pretrain", "--shards", inputs / "shards"],
        # what only the command line checks comes first (`pipelines/preflight.py`): --data a task's folder
        "finetune": ["finetune", "--task", "sst2", "--data", sst2, "--checkpoint", inputs / "checkpoint"],
        "sweep": ["sweep", "--task", "sst2", "--data", sst2, "--checkpoint", inputs / "checkpoint", "--grid", "paper"],
    }


def test_a_rule_added_once_to_the_skeleton_applies_to_every_command(monkeypatch, datasets_dir, tmp_path, capsys):
    seen: list[tuple[str, list[str]]] = []

    def rule(out, inputs, flag="--out"):  # stands in for the skeleton's output-vs-inputs rule
        seen.append((str(out), [str(i) for i in inputs if i is not None]))
        raise InputError(f"{flag} {out}: {RULE}")

    monkeypatch.setattr(skeleton, "check_disjoint", rule)
    before = tree_hash(tmp_path)
    for command, args in commands(tmp_path / "inputs", datasets_dir / "glue" / "SST-2").items():
        out = tmp_path / command.replace(" ", "-")
        assert_refused(cli(capsys, *args, "--out", out), command.split()[0], RULE)
        assert seen[-1][0] == str(out), (command, seen)  # this command's own output, resolved once
        assert seen[-1][1], (command, seen)  # and the inputs it reads
    assert len(seen) == 8
    assert tree_hash(tmp_path) == before  # refused before anything was written


@dataclass(frozen=True)
class ToyConfig:
    out: str
    source: str | None = None
    fail: bool = False


class ToyJob(Job[ToyConfig]):
    name = "toy"
    required = ("out",)
    paths = ("out", "source")
    output = NEW
    uses_ray = False
    logs = False

    def inputs(self, config: ToyConfig) -> list[object]:
        return [config.source]

    def preflight(self, config: ToyConfig) -> str:
        return "checked"

    def run(self, claimed: Claimed[ToyConfig], checked: str) -> dict[str, object]:
        assert claimed.into is not None and claimed.into != Path(claimed.out) and claimed.tracking_uri is None
        (claimed.into / "result.txt").write_text(checked)
        if claimed.config.fail:
            raise RuntimeError("the work failed")
        return {"into": claimed.into}


def nowhere(*args, **kwargs):
    raise AssertionError("called for a job that does not use it")


def test_a_new_output_is_built_in_a_temporary_without_ray_or_tracking(monkeypatch, tmp_path):
    import pipelines.ray_runtime

    monkeypatch.setattr(pipelines.ray_runtime, "ensure_ray", nowhere)
    monkeypatch.setattr(skeleton, "check_tracking_store", nowhere)
    monkeypatch.setattr(skeleton, "open_job_run", nowhere)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="the work failed"):
        run_job(ToyJob(), ToyConfig(str(out), fail=True))
    assert list(tmp_path.iterdir()) == []  # no output, no temporary, no lock
    result = run_job(ToyJob(), ToyConfig(str(out)))
    assert (out / "result.txt").read_text() == "checked" and not Path(result["into"]).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(InputError, match="already exists and holds 1 entry .*`bertflow toy` writes only a new output"):
        run_job(ToyJob(), ToyConfig(str(out)))
    with pytest.raises(InputError, match="lies inside the input"):
        run_job(ToyJob(), ToyConfig(str(tmp_path / "elsewhere" / "out"), source=str(tmp_path / "elsewhere")))
    with pytest.raises(InputError, match="toy: --out is required"):
        run_job(ToyJob(), ToyConfig(""))


class ResumableToyJob(ToyJob):
    output = RESUMABLE

    def identity(self, config: ToyConfig) -> dict[str, object]:
        return {"source": config.source}

    def run(self, claimed: Claimed[ToyConfig], checked: str) -> dict[str, object]:
        assert claimed.into is None and claimed.lease is not None
        (Path(claimed.out) / "_manifest.json").write_text("{}")
        return {"resuming": claimed.resuming}


def test_a_resumable_output_is_claimed_and_refused_once_finished(monkeypatch, tmp_path):
    import pipelines.ray_runtime

    monkeypatch.setattr(pipelines.ray_runtime, "ensure_ray", nowhere)
    out = tmp_path / "out"
    out.mkdir()
    (out / "_job.json").write_text('{"job": "toy"}')
    with pytest.raises(InputError, match="other settings"):  # not this job's identity: refused by the claim
        run_job(ResumableToyJob(), ToyConfig(str(out)))
    (out / "_job.json").unlink()
    assert run_job(ResumableToyJob(), ToyConfig(str(out))) == {"resuming": False}
    with pytest.raises(InputError, match="a finished `bertflow toy` output .*resumes its own unfinished run"):
        run_job(ResumableToyJob(), ToyConfig(str(out)))
