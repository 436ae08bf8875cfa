"""pipelines/ray_runtime.py: the stale `ray_current_cluster` file left by a killed `ray start` head."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pipelines.ray_runtime import drop_stale_address_file


@pytest.fixture
def address_file(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # Ray's temp dir root: <RAY_TMPDIR>/ray
    (tmp_path / "ray").mkdir()
    return tmp_path / "ray" / "ray_current_cluster"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_a_dead_local_head_is_removed(address_file):
    address_file.write_text(f"127.0.0.1:{closed_port()}")
    drop_stale_address_file()
    assert not address_file.exists()


def test_a_live_head_is_kept(address_file):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address_file.write_text(f"127.0.0.1:{server.getsockname()[1]}")
        drop_stale_address_file()
    assert address_file.exists()


def test_a_head_on_another_machine_and_garbage_are_kept(address_file):
    address_file.write_text("203.0.113.7:6379")  # TEST-NET-3: never an address of this machine
    drop_stale_address_file()
    assert address_file.exists()
    address_file.write_text("not an address")
    drop_stale_address_file()
    assert address_file.read_text() == "not an address"
