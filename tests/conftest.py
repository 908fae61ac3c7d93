"""Shared pytest fixtures.

``s3_server`` (session scope): a real S3-compatible server for object-storage tests.

    def test_upload(s3_server):
        url = s3_server.make_bucket("my-bucket")            # -> "s3://my-bucket" (created with boto3)
        fs = s3fs.S3FileSystem(**s3_server.storage_options)  # or fsspec.open(url, **s3_server.storage_options)
        s3_server.endpoint_url                               # "http://127.0.0.1:<port>"

It starts ``moto_server`` (the console script installed next to ``sys.executable``) on a free port of
127.0.0.1, waits until it answers, and sets ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` to ``testing``
and ``AWS_DEFAULT_REGION`` to ``us-east-1`` for the whole session (so subprocesses started by tests inherit
them; pass ``AWS_ENDPOINT_URL=s3_server.endpoint_url`` to a subprocess that should use the server without
``storage_options``).  ``storage_options`` are the fsspec/s3fs keyword arguments
(``{"client_kwargs": {"endpoint_url": ...}, "key": ..., "secret": ..., "skip_instance_cache": True}``).
The server is killed at the end of the session.  Bucket names must be unique within the session: use a
name derived from the test (``make_bucket`` returns the existing bucket if it already exists).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class S3Server:
    """A running moto S3 server (see the module docstring)."""

    endpoint_url: str
    process: subprocess.Popen[bytes]
    buckets: set[str] = field(default_factory=set)

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec / s3fs keyword arguments for this server."""
        return {
            "key": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": S3_CREDENTIALS["AWS_DEFAULT_REGION"]},
            "skip_instance_cache": True,
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
                            aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (if new) and return ``"s3://name"``."""
        if name not in self.buckets:
            client = self.client()
            existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            if name not in existing:
                client.create_bucket(Bucket=name)
            self.buckets.add(name)
        return f"s3://{name}"


def _moto_server_executable() -> str:
    candidate = Path(sys.executable).with_name("moto_server")
    if not candidate.exists():
        pytest.skip(f"moto_server not installed next to {sys.executable}")
    return str(candidate)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 for the test session (see the module docstring)."""
    previous = {name: os.environ.get(name) for name in S3_CREDENTIALS}
    os.environ.update(S3_CREDENTIALS)
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([_moto_server_executable(), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto_server exited with code {process.returncode} before answering on {endpoint}")
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer on {endpoint} within 60 s") from None
                time.sleep(0.1)
        yield S3Server(endpoint, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
