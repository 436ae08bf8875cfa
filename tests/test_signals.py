"""Issue 32, item 2: one signal policy for every command, through `bertflow` processes.

SIGINT (Ctrl-C: sent to the whole process group, as a terminal does) and SIGTERM (`kill`, a scheduler:
sent to the process) stop the work, release Ray, print one line and exit 130 / 143: no segfault
(Ctrl-C in `shards build` and `predict` exited 139), no C++ stack dump (SIGTERM on `pretrain` exited
134), no traceback. Outputs stay as they were (nothing half-written; a job dir resumes).

Default run: `convert`, `shards build`, `predict`, `pretrain` and `finetune` at start-up (cheap: before
Ray), Ctrl-C in the middle of `shards build` (its own Ray runtime, whose processes must all be gone),
Ctrl-C in the middle of `predict` and SIGTERM in the middle of `pretrain` then its resume. Marked slow:
`tokenizer`, `sweep` and `run` at start-up (`tokenizer train` mid-work is in test_reliability_cli.py),
`finetune` mid-epoch and its resume, and a signal while a command shuts Ray down after its result line.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import ROOT, bertflow, catches_signals, tree_hash, wait_for

from bert.checkpoint import from_pretrained, save_pretrained
from bert.inference import write_task_file

pytestmark = pytest.mark.integration
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
NAME = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
CRASH_MARKS = ("Traceback", "Segmentation fault", "Fatal Python error", "SIGTERM received", "PC: @", "core dumped")


class Run:
    """A `bertflow` process with its output read as it comes (stdout and stderr, each line once)."""

    def __init__(self, *args: object, env: dict[str, str] | None = None):
        self.process = bertflow(*args, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        self.pumps = [threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
                      for stream, sink in ((self.process.stdout, self.out), (self.process.stderr, self.err))]
        for pump in self.pumps:
            pump.start()

    def _pump(self, stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))
            self.lines.put(line)

    def wait_for_line(self, needle: str, timeout: float = 600) -> None:
        seen = []
        while not any(needle in line for line in seen):
            if self.process.poll() is not None and self.lines.empty():
                raise AssertionError(f"exited {self.process.returncode} before {needle!r}: {self.text()[-3000:]}")
            try:
                seen.append(self.lines.get(timeout=timeout))
            except queue.Empty:
                raise TimeoutError(f"no {needle!r} within {timeout}s") from None

    def signal(self, signum: int) -> None:
        """SIGINT to the process group (a terminal's Ctrl-C), SIGTERM to the process (kill, a scheduler)."""
        if signum == signal.SIGINT:
            os.killpg(self.process.pid, signum)
        else:
            self.process.send_signal(signum)

    def finish(self, timeout: float = 300) -> int:
        try:
            self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
        for pump in self.pumps:  # every line read
            pump.join(timeout=30)
        return self.process.returncode

    def text(self) -> str:
        return "\n".join(self.out + self.err)

    def driver_lines(self) -> list[str]:
        """The lines this process printed itself (not those Ray forwards from its workers: `(Worker pid=...)`)."""
        return [line for line in self.out + self.err if not line.lstrip("\x1b[0123456789;m").startswith("(")]


def crash_lines(run: Run) -> list[str]:
    """The lines the process printed itself that look like a crash (a traceback, a segfault, a C++ stack)."""
    return [line for line in run.driver_lines() if any(mark in line for mark in CRASH_MARKS)]


def assert_stopped(run: Run, signum: int, command: str, after: str) -> None:
    """Exit 130/143, the policy's one line last on stderr, nothing that looks like a crash."""
    code = run.finish()
    assert code == EXIT[signum], (code, run.text()[-4000:])
    last = [line for line in run.err if line.strip()][-1]
    assert last.startswith(("bertflow: interrupted", f"bertflow {command}: interrupted")), run.text()[-3000:]
    assert after in last, last
    if command != "tokenizer":  # `tokenizer train` words its own line ("training stopped, nothing was written")
        assert f"interrupted ({NAME[signum]})" in last, last
    assert crash_lines(run) == [], run.text()[-4000:]


def joined(ray_local) -> dict[str, str]:
    """Environment of a driver that joins the test session's Ray runtime (killing it leaves Ray up)."""
    return {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}


@pytest.fixture(scope="module")
def classifier(minilm_dir, tmp_path_factory) -> Path:
    """A fine-tuned-layout checkpoint (MiniLM encoder, fresh SST-2 head), as predict reads it."""
    out = tmp_path_factory.mktemp("ck") / "sst2"
    torch.manual_seed(0)
    save_pretrained(from_pretrained(minilm_dir, head="sequence_classification", labels=["0", "1"]), out,
                    tokenizer_dir=minilm_dir)
    write_task_file(out, "sst2", 128)
    return out


@pytest.fixture
def sst2(datasets_dir, tmp_path) -> Path:
    data = tmp_path / "SST-2"
    data.mkdir()
    for name, rows in (("train.tsv", 96), ("dev.tsv", 64)):
        lines = (datasets_dir / "glue" / "SST-2" / name).read_text(encoding="utf-8").splitlines(keepends=True)
        (data / name).write_text("".join(lines[: rows + 1]), encoding="utf-8")
    return data


def sentences(path: Path, rows: int) -> Path:
    path.write_text("".join(json.dumps({"id": str(i), "text": f"sentence number {i} is a fine one"}) + "\n"
                            for i in range(rows)))
    return path


# ----------------------------------------------------------------------------- start-up, every command


def commands(tmp: Path, wiki_dir: Path, vocab_txt: Path, minilm_dir: Path, classifier: Path, sst2: Path,
             texts: Path, shards: Path) -> dict[str, list[object]]:
    out = tmp / "out"
    return {
        "convert": ["convert", "--from-hf", minilm_dir, "--out", out],
        "tokenizer": ["tokenizer", "train", "--corpus", wiki_dir / "wiki_00.gz", "--vocab-size", "2000", "--out", out],
        "shards": ["shards", "build", "--corpus", wiki_dir / "wiki_00.gz", "--tokenizer", vocab_txt, "--out", out],
        "predict": ["predict", "--checkpoint", classifier, "--input", texts, "--out", out],
        "pretrain": ["pretrain", "--shards", shards, "--out", out, "--max-steps", "20", "--warmup-steps", "1"],
        "finetune": ["finetune", "--task", "sst2", "--data", sst2, "--checkpoint", minilm_dir, "--out", out],
        "sweep": ["sweep", "--task", "sst2", "--data", sst2, "--checkpoint", minilm_dir, "--out", out, "--grid",
                  "paper"],
        "run": ["run", ROOT / "pipelines" / "quickstart.yaml", "--workdir", out],
    }


@pytest.mark.parametrize("command", ["convert", "shards", "predict", "pretrain", "finetune",
                                     *(pytest.param(c, marks=pytest.mark.slow) for c in ("tokenizer", "sweep", "run"))])
def test_a_signal_at_start_up_stops_every_command(command, request, wiki_dir, vocab_txt, minilm_dir, classifier,
                                                  sst2, tmp_path):
    signum = signal.SIGTERM if command in ("convert", "shards", "pretrain", "sweep") else signal.SIGINT
    small_shards = request.getfixturevalue("small_shards") if command == "pretrain" else sst2
    texts = sentences(tmp_path / "texts.jsonl", 10)
    before = tree_hash(tmp_path, small_shards)
    args = commands(tmp_path, wiki_dir, vocab_txt, minilm_dir, classifier, sst2, texts, small_shards)[command]
    run = Run(*args)
    wait_for(lambda: catches_signals(run.process.pid), 120, "the signal policy to be installed")
    time.sleep(1.5)  # into the command's own start-up (imports, checks); the test holds whenever the signal lands
    run.signal(signum)
    out = tmp_path / "out"
    code = run.finish()
    done = f"bertflow {command}: interrupted ({NAME[signum]}) while shutting down; the work was done"
    if code == 0 or (code == EXIT[signum] and run.err and run.err[-1] == done):
        # a fast machine finishes a quick command (CI: `convert`) before the signal lands: the signal then leaves
        # the whole output and the command's exit code (0), or is reported as having come after the work
        assert crash_lines(run) == [], run.text()[-4000:]
        assert command == "convert", run.text()[-3000:]  # the others cannot finish in 1.5 s
        assert from_pretrained(out).config.hidden_size == 384  # the whole checkpoint
        shutil.rmtree(out)
    else:
        assert_stopped(run, signum, command.split()[0], "")
    if command in ("pretrain", "finetune", "sweep", "run") and out.exists():
        # a fast machine reaches the claim in 1.5 s: the dir then holds this job's unfinished run, which the
        # same command resumes (the mid-work tests resume one), and nothing else was touched
        if command == "run":  # a pipeline's workdir: its stages' own job dirs, resumed by the same command
            pass
        elif (out / "_job.json").is_file():
            assert json.loads((out / "_job.json").read_text())["job"] == command
        else:  # stopped while claiming: what a claim accepts as an empty dir
            assert {p.name for p in out.iterdir()} <= {".lock", ".writers"}, list(out.iterdir())
        shutil.rmtree(out)
    assert tree_hash(tmp_path, small_shards) == before  # nothing written, nothing left beside the output


# The script below stops `atomic_output` (and the lock inside it) with a SIGTERM after its Nth traced line, for
# every N: a signal landing anywhere leaves either no output and nothing beside it (stopped), or the whole
# output (the signal came at the commit: the work is done and the policy only notes it).
WHENEVER = r"""
import json, os, signal, sys
from pathlib import Path
from pipelines import outdir, signals, lease

root = Path(sys.argv[1])
def traced(n):
    count = [0]
    def tracer(frame, event, arg):
        if frame.f_code.co_filename not in (outdir.__file__, lease.__file__, signals.__file__):
            return tracer
        if event == "line":
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGTERM)
        return tracer
    return tracer, count
results = []
for n in range(1, 10_000):
    policy = signals.install()
    out = root / f"case{n}" / "out"
    out.parent.mkdir()
    tracer, count = traced(n)
    sys.settrace(tracer)
    try:
        with outdir.atomic_output(out, "convert") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 10)
        stopped = False
    except signals.Interrupted:
        stopped = True
    finally:
        sys.settrace(None)
    left = sorted(p.name for p in out.parent.iterdir())
    results.append({"n": n, "stopped": stopped, "received": policy.received, "left": left,
                    "whole": out.is_dir() and [p.name for p in out.iterdir()] == ["model.safetensors"]})
    if count[0] < n:  # the block ran to its end before the Nth line: every line has been tried
        break
print(json.dumps(results))
"""


def test_a_signal_anywhere_in_a_one_piece_output_leaves_nothing_or_the_whole_output(tmp_path):
    result = subprocess.run([sys.executable, "-c", WHENEVER, str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    cases = json.loads(result.stdout)
    assert len(cases) > 20, cases  # the lock, the temporary, the commit and the lock's release were all reached
    for case in cases[:-1]:  # the last one ran to its end unsignalled
        assert case["received"] == signal.SIGTERM, case
        if case["stopped"]:
            assert case["left"] == [], case
        else:
            assert case["left"] == ["out"] and case["whole"], case
    assert any(c["stopped"] for c in cases) and any(not c["stopped"] for c in cases[:-1]), cases


# A signal during the interpreter's own teardown, after the command returned: Python has by then put back the
# default action (for SIGTERM: die) for every signal it caught, so on a fast machine a start-up signal that came
# just after a quick command finished killed it (-15, CI, `convert`). An object the interpreter destroys last
# sends it, whenever that is, so the test holds on any machine.
AT_TEARDOWN = r"""
import os, signal, sys
from pipelines import cli

class SignalsAtTeardown:
    def __del__(self, kill=os.kill, pid=os.getpid(), signum=int(sys.argv[1])):
        kill(pid, signum)

keeper = SignalsAtTeardown()  # a global of __main__: destroyed when the interpreter clears its modules
sys.argv = ["bertflow", *sys.argv[2:]]
sys.exit(cli.main())
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_after_the_command_returned_leaves_its_exit_code(signum, tmp_path):
    spec = ROOT / "pipelines" / "quickstart.yaml"
    result = subprocess.run([sys.executable, "-c", AT_TEARDOWN, str(int(signum)), "schedule", str(spec), "--cron",
                             "0 3 * * *", "--workdir", str(tmp_path / "work")], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])  # the work was done and said so
    assert "0 3 * * *" in result.stdout
    assert not any(mark in result.stderr for mark in CRASH_MARKS), result.stderr[-3000:]


# ----------------------------------------------------------------------------- mid-work


@pytest.mark.slow  # the default run's 30-minute budget; run with -m slow
def test_ctrl_c_in_the_middle_of_shards_build_stops_its_ray_runtime(wiki_dir, vocab_txt, tmp_path):
    """The probe: "interrupted", then a segfault (exit 139), 3 of 3 tries. Its own local Ray runtime."""
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "shards"
    args = ["shards", "build", "--corpus", wiki_dir / "wiki_00.gz", wiki_dir / "wiki_01.gz", "--tokenizer", vocab_txt,
            "--out", out, "--dupe-factor", "3"]
    run = Run(*args, env={"RAY_ADDRESS": ""})
    run.wait_for_line("Started a local Ray instance")
    wait_for(lambda: (out / "_job.json").is_file(), 120, "the build's claim on its output")
    ray_processes = psutil.Process(run.process.pid).children(recursive=True)
    assert ray_processes, "a local Ray runtime runs under the command"
    run.signal(signal.SIGINT)
    assert_stopped(run, signal.SIGINT, "shards", f"nothing was written to {out}")
    # the runtime's raylet, GCS, dashboard and workers are gone (its agents notice the raylet's end within a
    # minute or two on a loaded machine)
    _, alive = psutil.wait_procs(ray_processes, timeout=300)
    assert [p.pid for p in alive] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # stopped in pass 1: no output (nothing to resume), no lock


def test_ctrl_c_in_the_middle_of_predict(ray_local, classifier, tmp_path):
    """The probe: "interrupted", then a segfault (exit 139)."""
    psutil = pytest.importorskip("psutil")
    texts = sentences(tmp_path / "texts.jsonl", 4000)
    output = tmp_path / "predictions"
    before = tree_hash(tmp_path, classifier)
    run = Run("predict", "--checkpoint", classifier, "--input", texts, "--out", output, env=joined(ray_local))
    wait_for(lambda: (tmp_path / ".predictions.lock").exists() or run.process.poll() is not None, 300,
             "predict to lock its output")
    wait_for(lambda: predicting(psutil) or run.process.poll() is not None, 300, "Ray Data's model actors")
    run.signal(signal.SIGINT)
    assert_stopped(run, signal.SIGINT, "predict", f"nothing was written to {output}")
    assert tree_hash(tmp_path, classifier) == before


def predicting(psutil) -> bool:
    """Whether a Ray Data actor of `predict` (`ray::MapWorker(MapBatches(PredictBatch))`) is running."""
    for process in psutil.process_iter(["cmdline"]):
        if any("PredictBatch" in part for part in process.info["cmdline"] or ()):
            return True
    return False


@pytest.mark.slow  # the default run's 30-minute budget; run with -m slow
def test_sigterm_in_the_middle_of_pretrain_then_resume(ray_local, small_shards, tmp_path):
    """The probe: SIGTERM (what a scheduler or `kill` sends) exited 134 with Ray's C++ stack dump."""
    out = tmp_path / "run"
    args = ["pretrain", "--shards", small_shards, "--out", out, "--model", "tiny", "--max-steps", "200",
            "--warmup-steps", "1", "--global-batch-size", "8", "--micro-batch-size", "8", "--checkpoint-every", "2",
            "--precision", "fp32"]
    run = Run(*args, env=joined(ray_local))
    wait_for(lambda: list((out / "_ray" / "train").glob("step-*/train_state.json")) or run.process.poll() is not None,
             600, "a training checkpoint")
    run.signal(signal.SIGTERM)
    assert_stopped(run, signal.SIGTERM, "pretrain", "re-run the same command to resume")
    steps = sorted(int(p.parent.name.split("-")[1]) for p in (out / "_ray" / "train").glob("step-*/train_state.json"))
    assert steps, "the checkpoint written before the signal is kept"
    again = Run(*args, "--stop-at-step", str(steps[-1] + 2), env=joined(ray_local))  # resume as before the change
    assert again.finish(600) == 0, again.text()[-3000:]
    resumed = again.text().split("resuming from", 1)
    assert len(resumed) == 2 and "(step " in resumed[1].splitlines()[0], again.text()[-3000:]


# ----------------------------------------------------------------------------- slow: finetune, shutdown


@pytest.mark.slow
def test_ctrl_c_in_the_middle_of_finetune_then_resume(ray_local, minilm_dir, sst2, tmp_path):
    """The probe: Ctrl-C during `finetune` exited 1 with only Ray's message."""
    out = tmp_path / "out"
    args = ["finetune", "--task", "sst2", "--data", sst2, "--checkpoint", minilm_dir, "--out", out, "--epochs", "3",
            "--batch-size", "16", "--precision", "fp32", "--no-log-model"]
    run = Run(*args, env=joined(ray_local))
    wait_for(lambda: (out / "_ray" / "train" / "seed-42" / "epoch-001" / "finetune_state.json").is_file()
             or run.process.poll() is not None, 900, "the first epoch checkpoint")
    run.signal(signal.SIGINT)
    assert_stopped(run, signal.SIGINT, "finetune", "re-run the same command to resume")
    assert not (out / "metrics.json").exists()
    again = Run(*args, env=joined(ray_local))
    assert again.finish(900) == 0, again.text()[-3000:]
    assert "resuming after epoch" in again.text()
    assert [h["epoch"] for h in json.loads((out / "metrics.json").read_text())["history"]] == [1, 2, 3]


@pytest.mark.slow
def test_a_signal_while_shutting_down_after_the_result(wiki_dir, vocab_txt, tmp_path):
    """The probe: Ctrl-C during Ray's shutdown after the result line printed a traceback."""
    out = tmp_path / "shards"
    run = Run("shards", "build", "--corpus", wiki_dir / "wiki_00.gz", "--tokenizer", vocab_txt, "--out", out,
              "--dupe-factor", "1", env={"RAY_ADDRESS": ""})
    run.wait_for_line(f"shards to {out}")
    run.signal(signal.SIGINT)  # its own local runtime is shutting down now
    code = run.finish()
    assert code in (0, 130), run.text()[-3000:]  # 0: the runtime was already down when the signal came
    if code == 130:
        assert run.err[-1] == "bertflow shards: interrupted (SIGINT) while shutting down; the work was done"
    assert crash_lines(run) == [], run.text()[-4000:]
    assert (out / "_manifest.json").is_file()  # the finished output is kept
