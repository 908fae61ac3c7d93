"""A sample output folder on any storage (names: ``artifacts.SampleSetLayout``).

``sampling.json`` (settings + fingerprint) guards the folder: a job with other settings is refused. Each chunk
``chunks/chunk-NNNNNN.npz`` (images uint8 [n,H,W,C], labels int64 [n], indices int64 [n], fingerprint, and for
text models captions) is one atomic write, after its PNGs, so a restarted job skips the chunks that exist.
``samples.npz`` (ADM: arr_0 uint8 [N,H,W,C], arr_1 int64 [N]) is streamed chunk by chunk into a local temporary
file and put in one atomic upload.
"""
from __future__ import annotations

import io
import os
import tempfile
import time
import zipfile
from collections.abc import Iterable
from typing import Any

import numpy as np

from deepflow.artifacts import SampleSetLayout
from deepflow.platform.inference.prompts import normalize_caption
from deepflow.storage import Storage, set_default_mode

__all__ = ["SampleSet"]


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H,W,C] (C = 1 or 3) -> PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_npy_member(archive: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: Any,
                      parts: Iterable[np.ndarray]) -> None:
    """An ``.npy`` member of ``shape`` written part by part (the parts fill it in order)."""
    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(member, header)
        for part in parts:
            member.write(np.ascontiguousarray(part, dtype=dtype).tobytes())


class SampleSet:
    """The output folder ``url`` of one sampling job with settings ``fingerprint``."""

    def __init__(self, url: str, fingerprint: str, storage_options: dict[str, Any] | None = None) -> None:
        self.storage = Storage(url, storage_options)
        self.fingerprint = fingerprint

    @property
    def url(self) -> str:
        return self.storage.url

    # --------------------------------------------------------------------------------------------- settings
    def check_settings(self) -> bool:
        """True if ``sampling.json`` exists with this fingerprint, False if absent; ValueError if it differs."""
        if not self.storage.exists(SampleSetLayout.SETTINGS):
            return False
        previous = self.storage.read_json(SampleSetLayout.SETTINGS)
        if previous.get("fingerprint") != self.fingerprint:
            raise ValueError(f"out: {self.url} holds samples made with other settings (see its "
                             f"{SampleSetLayout.SETTINGS}); use another output folder")
        return True

    def write_settings(self, settings: dict[str, Any]) -> None:
        self.storage.write_json(SampleSetLayout.SETTINGS, {"fingerprint": self.fingerprint, "settings": settings})

    def write_captions(self, captions: list[str]) -> None:
        """``captions.txt``: the caption of sample i on line i + 1 (each on one line)."""
        self.storage.write_text(SampleSetLayout.CAPTIONS, "".join(normalize_caption(c) + "\n" for c in captions))

    # ------------------------------------------------------------------------------------------------ chunks
    def finished_chunks(self) -> set[int]:
        """Indices of the chunk files present."""
        found = set()
        for name in self.storage.list(prefix="chunk-", suffix=".npz", subdir=SampleSetLayout.CHUNKS):
            digits = name[len("chunk-") : -len(".npz")]
            if digits.isdigit():
                found.add(int(digits))
        return found

    def write_chunk(self, chunk: int, images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                    captions: list[str] | None = None, png: bool = False) -> None:
        """PNGs first (optional), then the chunk file in one atomic write. ``images`` uint8 [n,H,W,C]."""
        if png:
            for image, index in zip(images, indices):
                self.storage.write_bytes(SampleSetLayout.png(int(index)), _png_bytes(image))
        extra = {} if captions is None else {"captions": np.array(captions)}
        payload = _npz_bytes(images=images, labels=labels, indices=indices, fingerprint=np.array(self.fingerprint),
                             **extra)
        self.storage.write_bytes(SampleSetLayout.chunk(chunk), payload)

    def read_chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 [n,H,W,C], labels int64 [n]) of a chunk made with these settings."""
        name = SampleSetLayout.chunk(chunk)
        with np.load(io.BytesIO(self.storage.read_bytes(name)), allow_pickle=False) as data:
            if str(data["fingerprint"]) != self.fingerprint:
                raise ValueError(f"{self.storage.url_of(name)} was sampled with other settings (fingerprint mismatch)")
            return data["images"], data["labels"]

    def wait_for_chunks(self, num_chunks: int, timeout_s: float, poll_s: float = 5.0) -> None:
        """Block until chunks 0 .. num_chunks - 1 all exist (other ranks write theirs)."""
        deadline = time.monotonic() + timeout_s
        while missing := sorted(set(range(num_chunks)) - self.finished_chunks()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url}: chunks still missing after {timeout_s:.0f}s: {missing[:5]}")
            time.sleep(poll_s)

    # --------------------------------------------------------------------------------------------------- npz
    def assemble_npz(self, num_samples: int, num_chunks: int) -> str:
        """Stream every chunk into ``samples.npz`` (arr_0 uint8 [N,H,W,C], arr_1 int64 [N]); returns its URL."""
        labels: list[np.ndarray] = []

        def images() -> Iterable[np.ndarray]:
            for chunk in range(num_chunks):
                chunk_images, chunk_labels = self.read_chunk(chunk)
                labels.append(chunk_labels)
                yield chunk_images

        first, _ = self.read_chunk(0)
        local_dir = self.storage.path("") if self.storage.is_local else None  # the space where the file will be
        fd, tmp = tempfile.mkstemp(suffix=".npz", prefix=".samples-", dir=local_dir)
        try:
            with os.fdopen(fd, "wb") as handle:
                with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                    _write_npy_member(archive, "arr_0", (num_samples, *first.shape[1:]), np.uint8, images())
                    _write_npy_member(archive, "arr_1", (num_samples,), np.int64, labels)
                handle.flush()
                os.fsync(handle.fileno())
            if self.storage.is_local:  # already beside its place: rename (atomic, no copy of a multi-GB file)
                set_default_mode(tmp)  # mkstemp made it 0600; an output is readable like any other file
                os.replace(tmp, self.storage.path(SampleSetLayout.NPZ))
            else:
                self.storage.put_file(tmp, SampleSetLayout.NPZ)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return self.storage.url_of(SampleSetLayout.NPZ)
