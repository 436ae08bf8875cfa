"""A real S3 API for the tests: moto in server mode on 127.0.0.1, started and stopped inside the session.

Nothing is mocked: bertflow's storage layer (pyarrow's S3 client) and its lease (boto3) talk
HTTP to this server exactly as they would to AWS, MinIO or R2, configured by the same
environment variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), which the `s3_server`
fixture sets for the session and restores at its end.
"""

from __future__ import annotations

import contextlib
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

BUCKET = "bertflow-test"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>
    bucket: str

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION)

    def keys(self, prefix: str) -> dict[str, str]:
        """{key: ETag} of every object under `prefix` (a key prefix, no bucket)."""
        found: dict[str, str] = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            found.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
        return found

    @contextlib.contextmanager
    def checking_credentials(self) -> Iterator[None]:
        """Make the server check every request's credentials (moto's own `/moto-api/reset-auth`).

        No access key exists on the server, so every request is refused while this is active.
        """
        self._set_auth("0")
        try:
            yield
        finally:
            self._set_auth("inf")

    def _set_auth(self, count: str) -> None:
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port, one bucket, AWS_* variables pointing at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with pytest.MonkeyPatch.context() as env:
            for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONFIG_FILE",
                         "AWS_SHARED_CREDENTIALS_FILE"):
                env.delenv(name, raising=False)
            env.setenv("AWS_ENDPOINT_URL", endpoint)
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            env.setenv("AWS_REGION", REGION)
            env.setenv("AWS_DEFAULT_REGION", REGION)
            env.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-profile probing on a test machine
            s3 = S3Server(endpoint, BUCKET)
            s3.client().create_bucket(Bucket=BUCKET)
            yield s3
    finally:
        server.stop()


@pytest.fixture
def s3_uri(s3_server, request) -> str:
    """A fresh prefix for one test: s3://bertflow-test/<test name>-<random>."""
    return s3_server.uri(f"{request.node.name.replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:8]}")
