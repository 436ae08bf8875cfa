"""No writer outlives its lock: a job dir cannot be claimed again while a process of the run before still writes.

The case from the reliability probes: the driver of `finetune --seeds 1,2` is SIGKILLed; its Ray
worker goes on and writes `seed-2/metrics.json` a moment later, when the driver's lock is already
gone. Here the driver and its worker are real processes: the "driver" claims the dir and starts
the "worker", which marks itself a writer (`hold_writer`, what every Ray Train worker does first)
and writes its file a little after the driver is killed. The next claim must not return before
the worker is gone, so the late write lands before the next run starts, never inside it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bert.errors import InputError
from pipelines.outdir import own_dir, wait_for_earlier_writers

ROOT = Path(__file__).resolve().parents[1]

DRIVER = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    from pipelines.outdir import own_dir
    out, delay = Path(sys.argv[1]), sys.argv[2]
    with own_dir(out, "finetune", {"task": "mrpc"}):
        worker = subprocess.Popen([sys.executable, "-c", sys.argv[3], str(out), delay])
        (out / "worker.pid").write_text(str(worker.pid))
        time.sleep(600)
""")
WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipelines.outdir import hold_writer
    out, delay = Path(sys.argv[1]), float(sys.argv[2])
    hold_writer(out)
    (out / "worker.ready").write_text("")
    time.sleep(delay)
    (out / "seed-2").mkdir(exist_ok=True)
    (out / "seed-2" / "metrics.json").write_text("{}")
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) holds no locks and writes nothing
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _start_driver(out: Path, delay: float) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(out), str(delay), WORKER], env=env,
                              start_new_session=True)
    deadline = time.time() + 60
    while not (out / "worker.ready").exists():
        assert driver.poll() is None and time.time() < deadline, "the driver or its worker did not start"
        time.sleep(0.05)
    return driver, int((out / "worker.pid").read_text())


def test_a_killed_drivers_worker_cannot_write_into_the_next_run(tmp_path):
    out = tmp_path / "job"
    driver, worker = _start_driver(out, delay=3.0)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert _alive(worker), "the worker should outlive its driver (as a Ray worker does for a moment)"
    started = time.time()
    with own_dir(out, "finetune", {"task": "mrpc"}) as resuming:
        waited = time.time() - started
        assert resuming
        assert not _alive(worker), "the next run was let in while a writer of the killed run still lived"
        assert (out / "seed-2" / "metrics.json").is_file()  # the late write landed before the claim, not after
    assert waited > 1.0  # it had to wait for the worker (the worker wrote ~3 s after starting)


def test_a_writer_that_never_exits_is_named_and_the_claim_refused(tmp_path):
    out = tmp_path / "job"
    driver, worker = _start_driver(out, delay=600.0)
    try:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        (out / "_workers").mkdir()
        (out / "_workers" / "rank0.json").write_text(f'{{"pid": {worker}}}')
        with pytest.raises(InputError, match=rf"still write into it.*rank0 pid {worker}"):
            wait_for_earlier_writers(out, timeout=1.0)
    finally:
        os.kill(worker, signal.SIGKILL)
    deadline = time.time() + 10
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.05)
    wait_for_earlier_writers(out, timeout=5.0)  # gone: the claim goes through
