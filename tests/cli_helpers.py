"""What the issue-32 CLI tests share: a tree hash, an in-process CLI call, a refusal check, a `bertflow` process."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]


def tree_hash(*roots: Path) -> str:
    """sha256 over every entry under `roots` (hidden ones too): relative name, kind, size, bytes."""
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted([root, *root.rglob("*")]) if root.exists() else []:
            digest.update(f"{path.relative_to(root.parent)}\0".encode())
            if path.is_symlink():
                digest.update(b"link\0" + str(path.readlink()).encode())
            elif path.is_dir():
                digest.update(b"dir\0")
            elif path.is_file():
                digest.update(f"file\0{path.stat().st_size}\0".encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def cli(capsys, *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(result: tuple[int, str, str], command: str, *needles: str) -> str:
    """Exit code 2 and one line `bertflow <command>: error: ...` on stderr holding every needle."""
    code, _, err = result
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bertflow {command}: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def bertflow(*args: object, env: dict[str, str] | None = None, cwd: Path = ROOT, **popen) -> subprocess.Popen:
    """`bertflow ARGS` as its own process (and process group, as a shell runs it), output unbuffered."""
    script = Path(sys.executable).parent / "bertflow"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "pipelines.cli"]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([*command, *map(str, args)], cwd=cwd, env=environment, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def catches_signals(pid: int) -> bool:
    """Whether the process has installed handlers for both SIGINT and SIGTERM (bertflow's signal policy)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return all(caught & (1 << (s - 1)) for s in (signal.SIGINT, signal.SIGTERM))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
