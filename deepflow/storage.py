"""The one door to storage: every read and write of the platform goes through this module.

Any fsspec URL works (a local path, ``file://``, ``s3://``, ``gs://``, ``memory://``). One :class:`Storage` is a
directory URL plus its filesystem; :func:`read_url_bytes` / :func:`write_url_bytes` and friends address single
objects by full URL.

**One retry policy** (:class:`RetryPolicy`, configured in :func:`retry_policy` and nowhere else): every remote call
is retried on transient errors (refused or reset connections, timeouts, throttling, 5xx) with exponential backoff
and jitter until a total time budget is spent (default 180 s: enough to ride out a minute-long outage of the object
store); then :class:`StorageUnavailableError` names the URL. Permanent errors (404 / missing bucket ->
``FileNotFoundError``, 403 -> ``PermissionError``, bad arguments) are raised at once, with the URL in the message.
The libraries underneath do not retry on their own (s3fs one attempt, botocore ``total_max_attempts=1``), so a
failure costs one attempt per backoff step, not three nested retry loops. Environment overrides:
``DEEPFLOW_STORAGE_RETRY_BUDGET_S``, ``DEEPFLOW_STORAGE_RETRY_BASE_DELAY_S``, ``DEEPFLOW_STORAGE_RETRY_MAX_DELAY_S``.

**Atomic writes**: an object appears complete or not at all (a temporary file renamed on local disks; a single
PUT, or a multipart upload the store publishes only on completion, on object stores).

S3 endpoints (MinIO, moto, Ceph) come from ``endpoint_url`` / ``storage_options`` or the standard
``AWS_ENDPOINT_URL`` (``AWS_ENDPOINT_URL_S3``) environment variables. Credentials come only from the environment
or the caller's ``storage_options``; they are never logged.
"""

from __future__ import annotations

import difflib
import io
import json
import logging
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = [
    "PERMANENT_ERRORS",
    "RetryPolicy",
    "Storage",
    "StorageUnavailableError",
    "default_file_mode",
    "is_remote_url",
    "is_transient_error",
    "join_url",
    "read_url_bytes",
    "read_url_json",
    "read_url_text",
    "register_webdataset_gopen",
    "resolve_storage_options",
    "retry_policy",
    "set_default_mode",
    "set_retry_policy",
    "check_storage_url",
    "filesystem",
    "split_url",
    "url_exists",
    "with_retries",
    "write_url_bytes",
    "write_url_json",
    "write_url_text",
]


# --------------------------------------------------------------------------------------------- retry policy
class StorageUnavailableError(ConnectionError):
    """The object store stayed unreachable for the whole retry budget; the message names the URL."""


#: errors that are never worth retrying (the object is absent, access is denied, the input is wrong)
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    ValueError,
    TypeError,
    KeyError,
)

_TRANSIENT_NAMES = (
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "ClientOSError",
    "ClientConnectorError",
    "IncompleteRead",
    "ResponseParserError",
    "HTTPClientError",
    "FSTimeoutError",
    "ProtocolError",
)
_TRANSIENT_MARKERS = ("SlowDown", "Throttl", "RequestTimeout", "InternalError", "ServiceUnavailable", "503", "500")


def is_transient_error(error: BaseException) -> bool:
    """True for errors of an object store that a retry may cure (refused connections, timeouts, throttling, 5xx)."""
    if isinstance(error, StorageUnavailableError):
        return False  # already retried for a whole budget
    if isinstance(error, PERMANENT_ERRORS):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    if type(error).__name__ in _TRANSIENT_NAMES:
        return True
    if isinstance(error, OSError) and any(marker in str(error) for marker in _TRANSIENT_MARKERS):
        return True
    cause = error.__cause__ or error.__context__
    return cause is not None and cause is not error and is_transient_error(cause)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by a total time budget per operation.

    Attempt ``n`` (from 1) that fails transiently waits ``min(max_delay_s, base_delay_s * 2**(n-1))`` times a
    jitter in [0.5, 1.5), unless that would pass ``budget_s`` seconds since the first attempt.
    """

    budget_s: float = 180.0
    base_delay_s: float = 0.5
    max_delay_s: float = 10.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        default = cls()
        return cls(
            budget_s=float(os.environ.get("DEEPFLOW_STORAGE_RETRY_BUDGET_S", default.budget_s)),
            base_delay_s=float(os.environ.get("DEEPFLOW_STORAGE_RETRY_BASE_DELAY_S", default.base_delay_s)),
            max_delay_s=float(os.environ.get("DEEPFLOW_STORAGE_RETRY_MAX_DELAY_S", default.max_delay_s)),
        )

    def delay(self, attempt: int) -> float:
        return min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)) * (0.5 + random.random())


_POLICY: RetryPolicy | None = None


def retry_policy() -> RetryPolicy:
    """The process-wide retry policy: :func:`set_retry_policy`'s, else the environment's, else the defaults."""
    global _POLICY
    if _POLICY is None:
        _POLICY = RetryPolicy.from_env()
    return _POLICY


def set_retry_policy(policy: RetryPolicy | None) -> None:
    """Replace the process-wide policy (None: back to the environment/defaults)."""
    global _POLICY
    _POLICY = policy


def with_retries(operation: Callable[[], T], what: str, policy: RetryPolicy | None = None) -> T:
    """Run ``operation``; retry transient errors per the policy. ``what`` names the URL in logs and errors.

    Permanent errors propagate at once (``FileNotFoundError`` / ``PermissionError`` keep their type and gain the
    URL); a transient error that outlasts the budget becomes :class:`StorageUnavailableError`.
    """
    policy = policy or retry_policy()
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return operation()
        except Exception as error:  # noqa: BLE001 - classified just below
            if not is_transient_error(error):
                raise _with_url(error, what) from error
            elapsed = time.monotonic() - start
            delay = policy.delay(attempt)
            if elapsed + delay > policy.budget_s:
                raise StorageUnavailableError(
                    f"{what}: storage unreachable for {elapsed:.0f}s ({attempt} attempts, retry budget "
                    f"{policy.budget_s:.0f}s): {type(error).__name__}: {error}"
                ) from error
            log.warning("transient error on %s (attempt %d, %.0fs of %.0fs, retrying in %.1fs): %s: %s",
                        what, attempt, elapsed, policy.budget_s, delay, type(error).__name__, error)
            time.sleep(delay)


def _with_url(error: Exception, what: str) -> Exception:
    """The same permanent error with the URL in its message (once)."""
    if isinstance(error, (FileNotFoundError, PermissionError, FileExistsError)) and what not in str(error):
        kind = {FileNotFoundError: "not found", PermissionError: "access denied", FileExistsError: "exists"}
        reason = next(text for cls, text in kind.items() if isinstance(error, cls))
        detail = str(error) or type(error).__name__
        return type(error)(f"{what}: {reason} ({detail})")
    return error


# ------------------------------------------------------------------------------------------------ URLs
def is_remote_url(url: str) -> bool:
    """True for URLs of a non-local filesystem (s3://, gs://, memory:// ...)."""
    return "://" in url and not url.startswith("file://")


def join_url(base: str, name: str) -> str:
    """``base`` directory URL joined with a relative object name (an empty ``base``: the name itself)."""
    if not name:
        return base
    if not base:
        return name
    return base.rstrip("/") + "/" + name.lstrip("/")


def split_url(url: str) -> tuple[str, str]:
    """(parent directory URL, object name) of a file URL."""
    stripped = url.rstrip("/")
    if "/" not in stripped:
        return ".", stripped
    parent, name = stripped.rsplit("/", 1)
    if parent.endswith(":/"):  # "s3://bucket" has no parent folder
        raise ValueError(f"{url}: not an object URL (no folder part)")
    return parent or "/", name


def resolve_storage_options(
    url: str, storage_options: dict[str, Any] | None = None, endpoint_url: str | None = None
) -> dict[str, Any]:
    """Storage options for ``url``: the caller's options, an S3 endpoint if one is configured, no library retries.

    For ``s3://`` URLs the endpoint comes from, in order: ``endpoint_url`` (a config field), an endpoint
    already in ``storage_options`` (top level or ``client_kwargs``), then ``AWS_ENDPOINT_URL_S3`` /
    ``AWS_ENDPOINT_URL`` from the environment. s3fs and botocore are told to try once (this module retries) and
    to give up connecting after 10 s, unless the caller set those options (see also :func:`filesystem`).
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
    config_kwargs = dict(options.get("config_kwargs") or {})
    config_kwargs.setdefault("retries", {"mode": "standard", "total_max_attempts": 1})
    config_kwargs.setdefault("connect_timeout", 10)
    config_kwargs.setdefault("read_timeout", 120)
    options["config_kwargs"] = config_kwargs
    return options


def check_storage_url(url: str) -> str:
    """``url`` unchanged when it is a local path or its protocol is one fsspec knows; ValueError ``<url>: unsupported
    storage URL (...)`` naming the close matches otherwise (a config's validation puts the field path in front).
    Nothing is imported or contacted: a known protocol whose package is missing fails when it is opened."""
    if "://" not in url and "::" not in url:
        return url
    from fsspec.utils import get_protocol

    protocol = get_protocol(url)
    known = fsspec.available_protocols()
    if protocol in known:
        return url
    close = difflib.get_close_matches(protocol, known, n=2, cutoff=0.6)
    hint = f", did you mean {' or '.join(f'{name}://' for name in close)}?" if close else "."
    raise ValueError(f"{url}: unsupported storage URL (protocol {protocol!r} is not known{hint} Use a local path "
                     "or an fsspec URL such as file://, s3://, gs://, az://)")


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path) of ``url`` with resolved options; the filesystem's own retry loop is switched
    off (s3fs ``retries`` = 1 attempt) so that :func:`with_retries` is the only one."""
    options = resolve_storage_options(check_storage_url(url), storage_options)
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ValueError, ImportError) as error:  # e.g. "Protocol not known: ftp2"
        raise ValueError(f"{url}: unsupported storage URL ({error})") from None
    if hasattr(fs, "retries"):
        fs.retries = 1
    return fs, path


# ------------------------------------------------------------------------------------------------ Storage
class Storage:
    """A directory URL on any fsspec filesystem, with retried, atomic object operations.

    Args:
        url: directory URL, e.g. ``/data/ds``, ``file:///data/ds``, ``s3://bucket/ds``, ``gs://b/ds``.
        storage_options: fsspec filesystem kwargs (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``).
        endpoint_url: S3 endpoint override (MinIO, moto, Ceph ...).
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        endpoint_url: str | None = None,
    ) -> None:
        self.url = url.rstrip("/") if url not in ("/",) else url
        self.storage_options = resolve_storage_options(url, storage_options, endpoint_url)
        self.fs, self.root = filesystem(self.url, self.storage_options)
        self.root = self.root.rstrip("/") if self.root not in ("/",) else self.root
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Filesystem objects (event loops, sockets) do not cross process boundaries: rebuild them.
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])  # type: ignore[misc]

    def reopen(self) -> Storage:
        """A fresh instance with its own filesystem client (use one per process after a fork)."""
        options = dict(self.storage_options)
        if not self.is_local:
            options["skip_instance_cache"] = True
        return Storage(self.url, options)

    def child(self, name: str) -> Storage:
        """The sub-directory ``name`` with the same options."""
        return Storage(join_url(self.url, name), self.storage_options)

    # -- names ---------------------------------------------------------------------------------------
    def path(self, name: str) -> str:
        """Filesystem path of object ``name`` (relative to the directory)."""
        return f"{self.root.rstrip('/')}/{name}" if name else self.root

    def url_of(self, name: str) -> str:
        """Full URL of object ``name``, for messages."""
        return join_url(self.url, name)

    def _retry(self, operation: Callable[[], T], name: str) -> T:
        return with_retries(operation, self.url_of(name))

    # -- reads ---------------------------------------------------------------------------------------
    def exists(self, name: str = "") -> bool:
        def check() -> bool:
            self.fs.invalidate_cache(self.path(name))
            return bool(self.fs.exists(self.path(name)))

        return self._retry(check, name)

    def read_bytes(self, name: str) -> bytes:
        """The whole object ``name`` (FileNotFoundError naming the URL if it is absent)."""
        return self._retry(lambda: self.fs.cat_file(self.path(name)), name)

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def read_json(self, name: str) -> Any:
        data = self.read_bytes(name)
        try:
            return json.loads(data)
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.url_of(name)}: not valid JSON ({error})") from error

    def list(self, prefix: str = "", suffix: str = "", subdir: str = "") -> list[str]:
        """Sorted names (relative to ``subdir``) of the entries (objects and folders) with ``prefix``/``suffix``."""
        directory = self.path(subdir)

        def listing() -> list[str]:
            try:
                self.fs.invalidate_cache(directory)
                entries = self.fs.ls(directory, detail=False)
            except FileNotFoundError:
                return []
            names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries]
            return sorted(n for n in names if n.startswith(prefix) and n.endswith(suffix))

        return self._retry(listing, subdir)

    def get_file(self, name: str, local_path: str) -> None:
        """Download object ``name`` to ``local_path``."""
        os.makedirs(os.path.dirname(local_path) or ".", exist_ok=True)
        self._retry(lambda: self.fs.get_file(self.path(name), local_path), name)

    def get_tree(self, name: str, local_dir: str) -> list[str]:
        """Download every object under folder ``name`` into ``local_dir``; returns the relative names."""

        def listing() -> list[str]:
            self.fs.invalidate_cache(self.path(name))
            return [p for p in self.fs.find(self.path(name)) if not p.endswith("/")]

        base = self.path(name).rstrip("/") + "/"
        found = self._retry(listing, name)
        relatives = [path[len(base):] if path.startswith(base) else path.rsplit("/", 1)[-1] for path in found]
        for relative in relatives:
            self.get_file(join_url(name, relative), os.path.join(local_dir, *relative.split("/")))
        return relatives

    @contextmanager
    def open_read(self, name: str) -> Iterator[IO[bytes]]:
        """A seekable read handle for large objects read in parts (zip members); opening is retried, the reads
        themselves are not (use :meth:`read_bytes` where the object fits in memory)."""
        handle = self._retry(lambda: self.fs.open(self.path(name), "rb"), name)
        try:
            yield handle
        finally:
            handle.close()

    # -- writes --------------------------------------------------------------------------------------
    def makedirs(self, name: str = "") -> None:
        """Create folder ``name`` on local disks (object stores have no folders)."""
        if self.is_local:
            os.makedirs(self.path(name), exist_ok=True)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write object ``name`` atomically: it appears complete or not at all."""
        if self.is_local:
            self._local_atomic(name, lambda handle: handle.write(data))
            return
        self._retry(lambda: self.fs.pipe_file(self.path(name), data), name)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, value: Any) -> None:
        self.write_bytes(name, json.dumps(value, indent=1, sort_keys=True).encode("utf-8"))

    def put_file(self, local_path: str, name: str) -> None:
        """Upload a local file as object ``name`` atomically (large files stream from disk)."""
        if self.is_local:
            with open(local_path, "rb") as source:
                self._local_atomic(name, lambda handle: shutil.copyfileobj(source, handle, 1 << 22))
            return
        self._retry(lambda: self.fs.put_file(local_path, self.path(name)), name)

    def write_file(self, name: str, write: Callable[[IO[bytes]], Any]) -> None:
        """Write object ``name`` atomically through ``write(handle)``, which fills a seekable local binary file (for
        objects too large to hold as bytes: a file written piece by piece). Local disks: a temporary file beside the
        target, renamed; object stores: a temporary file under TMPDIR, uploaded (retried) and removed."""
        if self.is_local:
            self._local_atomic(name, write)
            return
        handle = tempfile.NamedTemporaryFile(prefix="deepflow-upload-", delete=False)
        try:
            with handle:
                write(handle)
            self._retry(lambda: self.fs.put_file(handle.name, self.path(name)), name)
        finally:
            os.remove(handle.name)

    def put_tree(self, local_dir: str, name: str) -> list[str]:
        """Upload every file under ``local_dir`` into folder ``name``; returns the relative names."""
        relatives = []
        for dirpath, _, filenames in os.walk(local_dir):
            for filename in sorted(filenames):
                source = os.path.join(dirpath, filename)
                relative = os.path.relpath(source, local_dir).replace(os.sep, "/")
                self.put_file(source, join_url(name, relative))
                relatives.append(relative)
        return relatives

    def remove(self, name: str) -> None:
        """Remove object ``name`` (absent: nothing to do)."""
        try:
            self._retry(lambda: self.fs.rm_file(self.path(name)), name)
        except FileNotFoundError:
            pass

    def remove_tree(self, name: str) -> None:
        """Remove folder ``name`` and everything under it (absent: nothing to do)."""

        def remove() -> None:
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name), recursive=True)

        try:
            self._retry(remove, name)
        except FileNotFoundError:
            pass

    def _local_atomic(self, name: str, write: Callable[[IO[bytes]], Any]) -> None:
        path = self.path(name)
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(temporary, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)


# ----------------------------------------------------------------------------------------------- file modes
def default_file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the process umask (``0o644`` under umask 022)."""
    try:
        with open("/proc/self/status") as status:  # Linux: read without changing the umask (thread-safe)
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def set_default_mode(path: str) -> None:
    """Give ``path`` the mode of a file made by ``open()`` (:func:`default_file_mode`): for files that libraries
    or ``tempfile.mkstemp`` create private (0600) and that become outputs others read."""
    os.chmod(path, default_file_mode())


# ------------------------------------------------------------------------------------- single objects by URL
def _object(url: str, storage_options: dict[str, Any] | None) -> tuple[Storage, str]:
    parent, name = split_url(url)
    return Storage(parent, storage_options), name


def url_exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    storage, name = _object(url, storage_options)
    return storage.exists(name)


def read_url_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The whole object at ``url`` (any fsspec URL), read with retries."""
    storage, name = _object(url, storage_options)
    return storage.read_bytes(name)


def read_url_text(url: str, storage_options: dict[str, Any] | None = None) -> str:
    return read_url_bytes(url, storage_options).decode("utf-8")


def read_url_json(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    storage, name = _object(url, storage_options)
    return storage.read_json(name)


def write_url_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write the object at ``url`` atomically, with retries."""
    storage, name = _object(url, storage_options)
    storage.write_bytes(name, data)


def write_url_text(url: str, text: str, storage_options: dict[str, Any] | None = None) -> None:
    write_url_bytes(url, text.encode("utf-8"), storage_options)


def write_url_json(url: str, value: Any, storage_options: dict[str, Any] | None = None) -> None:
    storage, name = _object(url, storage_options)
    storage.write_json(name, value)


def register_webdataset_gopen(storage_options: dict[str, Any] | None = None) -> None:
    """Let ``webdataset.WebDataset`` open ``s3://``, ``gs://`` and ``memory://`` URLs through this module.

    webdataset's own handlers shell out to ``curl``/``gsutil``; this registers an opener that reads the whole
    object with the retry policy and honours ``storage_options`` and the S3 endpoint.
    """
    import webdataset

    def gopen_storage(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> io.BytesIO:
        if mode != "rb":
            raise ValueError(f"{url}: the storage gopen handler only reads (mode 'rb'), got {mode!r}")
        return io.BytesIO(read_url_bytes(url, storage_options))

    for scheme in ("s3", "gs", "gcs", "memory"):
        webdataset.gopen_schemes[scheme] = gopen_storage
