"""deepflow.storage: the one retry policy (transient vs permanent, time budget), atomic writes, trees, and that the
libraries underneath do not retry on their own. Against the local disk and a real S3-compatible server (moto)."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from deepflow.storage import (
    RetryPolicy,
    Storage,
    StorageUnavailableError,
    is_transient_error,
    join_url,
    read_url_bytes,
    set_retry_policy,
    split_url,
    with_retries,
    write_url_bytes,
)

FAST = RetryPolicy(budget_s=1.0, base_delay_s=0.01, max_delay_s=0.05)


@pytest.fixture(autouse=True)
def _default_policy():
    yield
    set_retry_policy(None)


def _closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_transient_errors_are_retried_until_the_budget_then_name_the_url() -> None:
    calls = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 4:
            raise ConnectionRefusedError("connection refused")
        return "ok"

    assert with_retries(flaky, "s3://b/k", FAST) == "ok" and len(calls) == 4
    assert all(later > earlier for earlier, later in zip(calls, calls[1:]))

    def down() -> None:
        raise TimeoutError("timed out")

    start = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=r"^s3://b/down: storage unreachable for .*retry budget 1s"):
        with_retries(down, "s3://b/down", FAST)
    assert time.monotonic() - start <= FAST.budget_s + 0.2


def test_permanent_errors_are_raised_at_once_with_the_url(tmp_path: Path) -> None:
    calls = []

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("NoSuchKey")

    with pytest.raises(FileNotFoundError, match=r"^s3://b/gone: not found \(NoSuchKey\)"):
        with_retries(missing, "s3://b/gone", FAST)
    assert calls == [1]
    with pytest.raises(PermissionError, match="s3://b/secret: access denied"):
        with_retries(lambda: (_ for _ in ()).throw(PermissionError("403 Forbidden")), "s3://b/secret", FAST)
    assert not is_transient_error(ValueError("bad")) and is_transient_error(ConnectionResetError())
    wrapped = RuntimeError("wrapper")
    wrapped.__cause__ = ConnectionResetError("reset")
    assert is_transient_error(wrapped)  # a library wrapping a connection error is still transient
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        Storage(str(tmp_path)).read_bytes("nope")


def test_local_writes_are_atomic_and_trees_round_trip(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "out"))
    storage.write_bytes("a/b.bin", b"1234")
    storage.write_json("c.json", {"x": 1})
    assert sorted(os.listdir(tmp_path / "out")) == ["a", "c.json"]  # no temporaries left
    local = tmp_path / "local"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "f.txt").write_text("f")
    (local / "g.txt").write_text("g")
    assert sorted(storage.put_tree(str(local), "tree")) == ["g.txt", "sub/f.txt"]
    assert sorted(storage.put_tree(str(local), "")) == ["g.txt", "sub/f.txt"]  # into the folder itself
    back = tmp_path / "back"
    assert sorted(storage.get_tree("tree", str(back))) == ["g.txt", "sub/f.txt"]
    assert (back / "sub" / "f.txt").read_text() == "f"
    assert storage.list(prefix="tr") == ["tree"] and storage.child("tree").list() == ["g.txt", "sub"]
    storage.remove_tree("tree")
    assert not storage.exists("tree")
    assert join_url("", "a/b") == "a/b" and join_url("s3://b/x/", "/y") == "s3://b/x/y"
    assert split_url("s3://b/x/y.npz") == ("s3://b/x", "y.npz")


def test_s3_objects_and_errors_on_a_real_server(s3_server) -> None:  # noqa: ANN001
    url = s3_server.make_bucket("storage-unit")
    options = s3_server.storage_options
    write_url_bytes(f"{url}/dir/x.bin", b"abc", options)
    assert read_url_bytes(f"{url}/dir/x.bin", options) == b"abc"
    storage = Storage(f"{url}/dir", options)
    assert storage.fs.retries == 1  # s3fs tries once: with_retries is the only retry loop
    assert storage.storage_options["config_kwargs"]["retries"]["total_max_attempts"] == 1
    set_retry_policy(RetryPolicy(budget_s=30.0, base_delay_s=0.5))
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=f"{url}/dir/missing.bin"):
        storage.read_bytes("missing.bin")
    with pytest.raises(FileNotFoundError):
        Storage("s3://no-such-bucket-here", options).read_bytes("k")
    assert time.monotonic() - start < 5.0  # permanent: no backoff


def test_refused_connections_exhaust_the_budget_with_the_url() -> None:
    set_retry_policy(RetryPolicy(budget_s=1.5, base_delay_s=0.05, max_delay_s=0.2))
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
               "skip_instance_cache": True}
    start = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=r"^s3://bucket/x/y.bin: storage unreachable"):
        write_url_bytes("s3://bucket/x/y.bin", b"1", options)
    assert 1.0 <= time.monotonic() - start <= 15.0
