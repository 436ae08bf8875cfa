"""Ray clusters of several nodes on this machine, for the tests that lose a node: every node a `ray start
--block` process on 127.0.0.1 in a process group of its own, so a test loses a node by killing that group
(its raylet and every worker on it), as a preempted machine goes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    """`ray start` nodes on 127.0.0.1, each with `--block` in a process group of its own that the test alone
    stops (or kills, to lose the node); a temp dir of its own (short: Ray's socket paths have a length limit),
    so the head is not recorded in /tmp/ray where it would outlive the test."""

    def __init__(self, name: str):
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # Ray's token authentication off, as in the e2e cluster: a `ray start` head otherwise writes a token
        # that the drivers here must read from a shared file, which the other clusters a test session
        # starts overwrite (the node probe then never connects). Loopback only: nothing else can reach it.
        self.env["RAY_AUTH_MODE"] = "disabled"
        # Ray Train gives a worker group 60 s to start before it fails the attempt; on 2 cores shared with
        # other Ray clusters, starting the actors alone can take longer (seen: 16 timeouts in a row).
        self.env.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
        self.temp_dir = Path("/tmp") / f"{name}-{os.getpid()}"
        self.nodes: list[subprocess.Popen] = []

    def start(self, *args: str, nodes: int, attempts: int = 8) -> subprocess.Popen:
        """Start a node (the head first), and wait until the cluster has `nodes` alive.

        A `ray start` that gives up (Ray waits a fixed 30 s for its raylet to register, which a loaded
        machine can miss) is cleaned up (its process group killed) and started again after a pause, up to
        `attempts` times; a node that does not join is reported with its state and its log's end."""
        for attempt in range(1, attempts + 1):
            if not self.nodes:  # a head tried again gets a fresh port: the failed one may still be bound
                self.port = self.port if attempt == 1 else _free_port()
                self.address = f"127.0.0.1:{self.port}"
            # The head runs the dashboard (on a port of its own): Ray Train's PlacementGroupCleaner asks the State
            # API, which it serves, whether a run's controller still lives; without it a lost node's placement
            # groups were never removed and held the new node's CPUs (a sweep's retried trial waited for ever).
            head = ["--head", f"--port={self.port}", "--include-dashboard=true", f"--dashboard-port={_free_port()}",
                    f"--dashboard-agent-listen-port={_free_port()}"] if not self.nodes else [f"--address={self.address}"]
            log = Path(f"{self.temp_dir}-node{len(self.nodes)}.log")
            proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", *head, *args, "--block",
                                     "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                                     f"--temp-dir={self.temp_dir}"],
                                    # RAY_ADDRESS for the processes the node starts: Ray Train's cleaner resolves
                                    # "auto" otherwise, and finds every other cluster on this machine too
                                    env={**self.env, "RAY_ADDRESS": self.address}, start_new_session=True, stdout=open(log, "w"),
                                    stderr=subprocess.STDOUT)
            try:
                wait_for_nodes(self.address, nodes, self.env, node=proc)
            except AssertionError as exc:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if "startup" in (text := log.read_text()) and attempt < attempts:
                    time.sleep(min(15 * attempt, 60))  # Ray's own start-up timeout: let the machine settle, try again
                    continue
                raise AssertionError(f"{exc}; the new node's `ray start` exited {proc.returncode} "
                                     f"(attempt {attempt} of {attempts}), its log ends:\n{text[-3000:]}") from None
            self.nodes.append(proc)
            return proc
        raise AssertionError("unreachable")

    def bertflow(self, *args: str, **popen) -> subprocess.Popen:
        return subprocess.Popen([str(Path(sys.executable).parent / "bertflow"), *args],
                                env={**self.env, "RAY_ADDRESS": self.address}, **popen)

    def __enter__(self) -> LoopbackCluster:
        return self

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.nodes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        for n in range(len(self.nodes) + 1):  # and the log of a node that did not start
            Path(f"{self.temp_dir}-node{n}.log").unlink(missing_ok=True)


def wait_for_nodes(address: str, count: int, env: dict, timeout: float = 180,
                   node: subprocess.Popen | None = None) -> None:
    """Block until the cluster at `address` has `count` alive nodes (asked from a separate process); fail
    at once if `node` (the `ray start --block` just launched) has exited."""
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        if node is not None and node.poll() is not None:
            raise AssertionError(f"a node of the Ray cluster at {address} did not start")
        try:
            done = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True,
                                  timeout=max(5.0, min(60.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            continue
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise AssertionError(f"Ray cluster at {address} did not reach {count} nodes in {timeout:.0f} s")
