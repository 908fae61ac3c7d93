"""fsspec-backed storage for datasets: any URL (local path, ``file://``, ``s3://``, ``gs://``, ``memory://``).

One :class:`Storage` is a directory URL plus its filesystem.  Every remote call goes through
:func:`with_retries` (exponential backoff on transient errors: connection resets, timeouts, throttling,
5xx), writes are atomic per object (a reader never sees a half-written shard), and S3 endpoints are
configurable for MinIO-style stores, either with ``endpoint_url`` / ``storage_options`` or with the
standard ``AWS_ENDPOINT_URL`` (``AWS_ENDPOINT_URL_S3``) environment variables.  Credentials come only from
the environment or the caller's ``storage_options``; they are never logged.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

T = TypeVar("T")

#: errors that are never worth retrying (the object is absent, access is denied, the input is wrong)
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    ValueError,
    TypeError,
    KeyError,
)


def is_transient_error(error: BaseException) -> bool:
    """True for errors of an object store that a retry may cure (timeouts, resets, throttling, 5xx)."""
    if isinstance(error, PERMANENT_ERRORS):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    name = type(error).__name__
    transient_names = (
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ServerDisconnectedError",
        "ClientPayloadError",
        "ClientOSError",
        "IncompleteRead",
        "ResponseParserError",
        "HTTPClientError",
        "FSTimeoutError",
    )
    if name in transient_names:
        return True
    text = str(error)
    markers = ("SlowDown", "Throttl", "RequestTimeout", "InternalError", "ServiceUnavailable", "503", "500")
    if isinstance(error, OSError) and any(marker in text for marker in markers):
        return True
    return False


def with_retries(
    operation: Callable[[], T],
    what: str,
    attempts: int = 5,
    base_delay_s: float = 0.2,
    max_delay_s: float = 10.0,
) -> T:
    """Run ``operation``; on a transient error wait (exponential backoff with jitter) and try again.

    ``what`` names the object for the log line and the final error (e.g. the shard URL).
    """
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except Exception as error:  # noqa: BLE001 - classified just below
            if attempt == attempts or not is_transient_error(error):
                raise
            delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("transient error on %s (attempt %d/%d, retrying in %.2fs): %s: %s",
                        what, attempt, attempts, delay, type(error).__name__, error)
            time.sleep(delay)
    raise AssertionError("unreachable")


def resolve_storage_options(
    url: str, storage_options: dict[str, Any] | None = None, endpoint_url: str | None = None
) -> dict[str, Any]:
    """Storage options for ``url``: the caller's options, plus an S3 endpoint if one is configured.

    For ``s3://`` URLs the endpoint comes from, in order: ``endpoint_url`` (a config field), an endpoint
    already in ``storage_options`` (top level or ``client_kwargs``), then ``AWS_ENDPOINT_URL_S3`` /
    ``AWS_ENDPOINT_URL`` from the environment.
    """
    options = dict(storage_options or {})
    if not url.startswith(("s3://", "s3a://")):
        return options
    client_kwargs = dict(options.get("client_kwargs") or {})
    current = options.get("endpoint_url") or client_kwargs.get("endpoint_url")
    chosen = endpoint_url or current or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if chosen:
        options.pop("endpoint_url", None)
        client_kwargs["endpoint_url"] = chosen
        options["client_kwargs"] = client_kwargs
    return options


def join_url(base: str, name: str) -> str:
    """``base`` directory URL joined with a relative object name."""
    return base.rstrip("/") + "/" + name.lstrip("/")


class Storage:
    """A directory URL on any fsspec filesystem, with retried, atomic object operations.

    Args:
        url: directory URL, e.g. ``/data/ds``, ``file:///data/ds``, ``s3://bucket/ds``, ``gs://b/ds``.
        storage_options: fsspec filesystem kwargs (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``).
        endpoint_url: S3 endpoint override (MinIO, moto, Ceph ...).
        attempts: tries per operation for transient errors.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        endpoint_url: str | None = None,
        attempts: int = 5,
    ) -> None:
        self.url = url.rstrip("/") if url not in ("/",) else url
        self.storage_options = resolve_storage_options(url, storage_options, endpoint_url)
        self.attempts = attempts
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = self.root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Filesystem objects (event loops, sockets) do not cross process boundaries: rebuild them.
        return {"url": self.url, "storage_options": self.storage_options, "attempts": self.attempts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"], None, state["attempts"])  # type: ignore[misc]

    def reopen(self) -> Storage:
        """A fresh instance with its own filesystem client (use one per process after a fork)."""
        options = dict(self.storage_options)
        if not self.is_local:
            options["skip_instance_cache"] = True
        return Storage(self.url, options, None, self.attempts)

    # -- names ---------------------------------------------------------------------------------------
    def path(self, name: str) -> str:
        """Filesystem path of object ``name`` (relative to the directory)."""
        return f"{self.root}/{name}" if name else self.root

    def url_of(self, name: str) -> str:
        """Full URL of object ``name``, for messages."""
        return join_url(self.url, name)

    def _retry(self, operation: Callable[[], T], name: str) -> T:
        return with_retries(operation, self.url_of(name), attempts=self.attempts)

    # -- reads ---------------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return self._retry(lambda: self.fs.exists(self.path(name)), name)

    def read_bytes(self, name: str) -> bytes:
        """The whole object ``name`` (FileNotFoundError if it is absent)."""
        return self._retry(lambda: self.fs.cat_file(self.path(name)), name)

    def read_json(self, name: str) -> Any:
        data = self.read_bytes(name)
        try:
            return json.loads(data)
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.url_of(name)}: not valid JSON ({error})") from error

    def list(self, prefix: str = "", suffix: str = "") -> list[str]:
        """Sorted names (relative to the directory) of the objects whose name has ``prefix``/``suffix``."""

        def listing() -> list[str]:
            try:
                self.fs.invalidate_cache(self.root)
                entries = self.fs.ls(self.root, detail=False)
            except FileNotFoundError:
                return []
            names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries]
            return sorted(n for n in names if n.startswith(prefix) and n.endswith(suffix))

        return self._retry(listing, "")

    # -- writes --------------------------------------------------------------------------------------
    def makedirs(self) -> None:
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write object ``name`` atomically: it appears complete or not at all.

        Local filesystems: write a temporary file next to it, fsync, then ``os.replace``.  Object stores
        (S3, GCS): a single upload (one PUT, or a multipart upload that the store publishes only on
        completion), so the object appears only once complete.
        """
        path = self.path(name)
        if self.is_local:
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
            try:
                with open(temporary, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temporary, path)
            finally:
                if os.path.exists(temporary):
                    os.remove(temporary)
            return
        self._retry(lambda: self.fs.pipe_file(path, data), name)

    def write_json(self, name: str, value: Any) -> None:
        self.write_bytes(name, json.dumps(value, indent=1, sort_keys=True).encode("utf-8"))

    def remove(self, name: str) -> None:
        try:
            self._retry(lambda: self.fs.rm_file(self.path(name)), name)
        except FileNotFoundError:
            pass


def open_url_bytes(url: str, storage_options: dict[str, Any] | None = None, attempts: int = 5) -> bytes:
    """The whole object at ``url`` (any fsspec URL), read with retries."""
    options = resolve_storage_options(url, storage_options)
    fs, path = fsspec.core.url_to_fs(url, **options)
    return with_retries(lambda: fs.cat_file(path), url, attempts=attempts)


def register_webdataset_gopen(storage_options: dict[str, Any] | None = None) -> None:
    """Let ``webdataset.WebDataset`` open ``s3://``, ``gs://`` and ``memory://`` URLs through fsspec.

    webdataset's own handlers shell out to ``curl``/``gsutil``; this registers an fsspec opener instead
    (reading the whole object with retries), which honours ``storage_options`` and the S3 endpoint.
    """
    import webdataset

    def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> io.BytesIO:
        if mode != "rb":
            raise ValueError(f"{url}: the fsspec gopen handler only reads (mode 'rb'), got {mode!r}")
        return io.BytesIO(open_url_bytes(url, storage_options))

    for scheme in ("s3", "gs", "gcs", "memory"):
        webdataset.gopen_schemes[scheme] = gopen_fsspec
