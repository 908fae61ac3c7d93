"""Raw datasets as random-access sources of (key, PIL image, label or captions).

Every source has a fixed, deterministic item order, ``len(source)`` items, ``source.key(i)`` and
``source.load(i) -> SourceSample``.  ``load`` raises :class:`CorruptImageError` for an image that cannot
be read, so the precompute job can skip, count and list it.  Random access lets every rank take a disjoint
slice and lets a re-run after a crash re-create exactly the shards that are missing.
"""

from __future__ import annotations

import gzip
import io
import json
import posixpath
import struct
import tarfile
import unicodedata
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from .config import (
    CocoSourceConfig,
    DigitsSourceConfig,
    EmojiSourceConfig,
    FashionMnistSourceConfig,
    ImageFolderSourceConfig,
    WebDatasetSourceConfig,
)
from deepflow.errors import USER_ERRORS, UserError, describe
from deepflow.storage import filesystem, resolve_storage_options, with_retries

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


class CorruptImageError(ValueError):
    """An item whose image cannot be read; ``key`` names it."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass
class SourceSample:
    """One raw item: ``label`` is -1 for caption datasets, ``captions`` is None for labelled ones."""

    key: str
    image: Image.Image
    label: int = -1
    captions: list[str] | None = None


class Source:
    """Base class: subclasses set ``num_classes``/``class_names``/``has_captions`` and implement the rest."""

    num_classes: int = 0
    class_names: list[str] | None = None
    has_captions: bool = False
    #: True/False when every image is known to be grayscale/colour; None: look at the images
    grayscale: bool | None = None
    description: dict[str, Any]

    def __len__(self) -> int:
        raise NotImplementedError

    def key(self, index: int) -> str:
        raise NotImplementedError

    def load(self, index: int) -> SourceSample:
        raise NotImplementedError

    def __iter__(self) -> Iterator[SourceSample]:
        """All readable items in order (corrupt ones are skipped)."""
        for index in range(len(self)):
            try:
                yield self.load(index)
            except CorruptImageError:
                continue


def decode_image(data: bytes, key: str) -> Image.Image:
    """Fully decoded PIL image from file bytes, or :class:`CorruptImageError` naming ``key``."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        raise CorruptImageError(key, f"unreadable image ({type(error).__name__}: {error})") from error


# -- array datasets ------------------------------------------------------------------------------------
def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format; ``.gz`` allowed) as a uint8 array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4]!r})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: IDX header says {shape} but holds {array.size} values (truncated?)")
    return array.reshape(shape)


class ArraySource(Source):
    """Images from a ``uint8 [N, H, W]`` array with integer labels."""

    grayscale = True

    def __init__(self, images: np.ndarray, labels: np.ndarray, prefix: str, class_names: list[str]) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{prefix}: {len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.astype(np.int64)
        self.prefix = prefix
        self.class_names = class_names
        self.num_classes = len(class_names)

    def __len__(self) -> int:
        return len(self.images)

    def key(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}"

    def load(self, index: int) -> SourceSample:
        return SourceSample(self.key(index), Image.fromarray(self.images[index], mode="L"), int(self.labels[index]))


def fashion_mnist_source(config: FashionMnistSourceConfig) -> ArraySource:
    prefix = "train" if config.split == "train" else "t10k"
    images = read_idx(posixpath.join(config.root, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(posixpath.join(config.root, f"{prefix}-labels-idx1-ubyte.gz"))
    source = ArraySource(images, labels, f"fmnist-{config.split}", FASHION_MNIST_CLASSES)
    source.description = {"kind": "fashion_mnist", "root": config.root, "split": config.split}
    return source


def digits_source(config: DigitsSourceConfig) -> ArraySource:
    """scikit-learn digits: 8x8 values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    source = ArraySource(images, digits.target, "digits", [str(d) for d in range(10)])
    source.description = {"kind": "digits"}
    return source


# -- file datasets -------------------------------------------------------------------------------------
class FileSource(Source):
    """Items are image files under a root URL (local or any fsspec store)."""

    def __init__(self, root: str, storage_options: dict[str, Any]) -> None:
        self.root_url = root
        self.storage_options = resolve_storage_options(root, storage_options)
        self.fs, self.root = filesystem(root, self.storage_options)
        self.root = self.root.rstrip("/")
        self.paths: list[str] = []  # relative to root

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("fs")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.fs, _ = filesystem(self.root_url, self.storage_options)

    def __len__(self) -> int:
        return len(self.paths)

    def key(self, index: int) -> str:
        return self.paths[index]

    def read_image(self, index: int) -> Image.Image:
        key = self.paths[index]
        path = f"{self.root}/{key}"
        try:
            data = with_retries(lambda: self.fs.cat_file(path), f"{self.root_url}/{key}")
        except (FileNotFoundError, PermissionError, IsADirectoryError) as error:
            raise CorruptImageError(key, f"cannot read file ({type(error).__name__}: {error})") from error
        return decode_image(data, key)


class ImageFolderSource(FileSource):
    """``root/<class>/<file>``: classes sorted by name are labels 0..K-1 (the ImageNet train layout)."""

    def __init__(self, config: ImageFolderSourceConfig) -> None:
        super().__init__(config.root, config.storage_options)
        extensions = tuple(e.lower() for e in config.extensions)
        if not with_retries(lambda: self.fs.isdir(self.root), config.root):
            raise UserError(f"source.root: {config.root}: no such folder (expected <root>/<class name>/<image>)")
        files = with_retries(lambda: self.fs.find(self.root), config.root)
        relative = sorted(f[len(self.root) + 1 :] for f in files if f.lower().endswith(extensions))
        self.paths = [p for p in relative if "/" in p]
        if not self.paths:
            raise ValueError(f"source.root: no images with extensions {list(extensions)} in class folders of {config.root}")
        self.class_names = sorted({p.split("/", 1)[0] for p in self.paths})
        self.num_classes = len(self.class_names)
        index_of = {name: i for i, name in enumerate(self.class_names)}
        self.labels = [index_of[p.split("/", 1)[0]] for p in self.paths]
        self.description = {"kind": "image_folder", "root": config.root}

    def load(self, index: int) -> SourceSample:
        return SourceSample(self.paths[index], self.read_image(index), self.labels[index])


class CocoSource(FileSource):
    """MS-COCO captions: every image with at least one caption, all its captions kept (sorted by image id)."""

    has_captions = True

    def __init__(self, config: CocoSourceConfig) -> None:
        super().__init__(config.images, config.storage_options)
        fs, path = filesystem(config.annotations, config.storage_options)
        try:
            annotations = json.loads(with_retries(lambda: fs.cat_file(path), config.annotations))
            images = {int(image["id"]): image["file_name"] for image in annotations["images"]}
            captions: dict[int, list[str]] = defaultdict(list)
            for item in annotations["annotations"]:
                captions[int(item["image_id"])].append(str(item["caption"]).strip())
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"source.annotations: {config.annotations} is not a COCO captions file ({error})") from error
        ids = sorted(i for i in images if captions.get(i))
        self.paths = [images[i] for i in ids]
        self.captions = [captions[i] for i in ids]
        self.description = {"kind": "coco", "annotations": config.annotations, "images": config.images}

    def load(self, index: int) -> SourceSample:
        return SourceSample(self.paths[index], self.read_image(index), -1, list(self.captions[index]))


def parse_captions(data: bytes, extension: str, where: str) -> list[str]:
    """Captions from a ``.txt`` (one per non-empty line) or ``.json`` member (str, list, or dict field)."""
    text = data.decode("utf-8")
    if extension == "txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    value = json.loads(text)
    if isinstance(value, dict):
        for name in ("captions", "caption", "text", "txt"):
            if name in value:
                value = value[name]
                break
        else:
            raise ValueError(f"{where}: JSON has none of the fields captions/caption/text")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: captions must be a string or a list of strings")
    return [v.strip() for v in value]


class WebDatasetSource(Source):
    """Tar shards (webdataset layout ``key.jpg`` + ``key.cls`` or ``key.json``/``key.txt``), random access.

    The tars are indexed once: image member offsets are kept, and the small label/caption members are
    read during that same pass; ``load`` then reads just one image member.
    """

    def __init__(self, config: WebDatasetSourceConfig) -> None:
        import braceexpand

        patterns = [config.urls] if isinstance(config.urls, str) else list(config.urls)
        self.urls = [url for pattern in patterns for url in braceexpand.braceexpand(pattern)]
        if not self.urls:
            raise ValueError("source.urls: no tar URLs given")
        self.storage_options = config.storage_options
        self.image_extensions = [e.lower() for e in config.image_extensions]
        self.label_extension = config.label_extension.lower()
        self.caption_extensions = [e.lower() for e in config.caption_extensions]
        # per item: url index, key, image (offset, size), label, captions
        self.items: list[tuple[int, str, tuple[int, int], int, list[str] | None]] = []
        for url_index, url in enumerate(self.urls):
            self._index_tar(url_index, url)
        if not self.items:
            raise ValueError(f"source.urls: no images with extensions {self.image_extensions} in {self.urls[:3]}")
        captioned = sum(item[4] is not None for item in self.items)
        self.has_captions = captioned > 0
        if self.has_captions and captioned != len(self.items):
            raise ValueError(f"source.urls: {len(self.items) - captioned} items have no caption member "
                             f"({'/'.join(self.caption_extensions)})")
        labels = [item[3] for item in self.items]
        if not self.has_captions and min(labels) < 0:
            missing = next(item[1] for item in self.items if item[3] < 0)
            raise ValueError(f"source.urls: item {missing} has no .{self.label_extension} label")
        self.num_classes = 0 if self.has_captions else 1 + max(labels)
        self.description = {"kind": "webdataset", "urls": patterns}

    def _fs(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        return filesystem(url, self.storage_options)

    def _index_tar(self, url_index: int, url: str) -> None:
        fs, path = self._fs(url)
        images: dict[str, tuple[str, int, int]] = {}
        labels: dict[str, int] = {}
        captions: dict[str, list[str]] = {}
        order: dict[str, None] = {}  # keys in tar order (a dict: O(1) membership)

        def scan() -> None:
            for table in (images, labels, captions):
                table.clear()
            order.clear()
            with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
                for info in archive:
                    if not info.isreg():
                        continue
                    directory, base = posixpath.split(info.name)
                    if "." not in base:
                        continue
                    stem, extension = base.split(".", 1)
                    key, extension = posixpath.join(directory, stem), extension.lower()
                    order.setdefault(key, None)
                    where = f"{url}: {info.name}"
                    if extension in self.image_extensions:
                        images[key] = (extension, info.offset_data, info.size)
                    elif extension == self.label_extension:
                        text = archive.extractfile(info).read().decode("utf-8").strip()  # type: ignore[union-attr]
                        try:
                            labels[key] = int(text)
                        except ValueError as error:
                            raise ValueError(f"{where} is not an integer label: {text!r}") from error
                    elif extension in self.caption_extensions:
                        data = archive.extractfile(info).read()  # type: ignore[union-attr]
                        captions[key] = parse_captions(data, extension, where)

        try:
            with_retries(scan, url)
        except tarfile.TarError as error:
            raise ValueError(f"source.urls: {url} is not a readable tar ({error})") from error
        name = posixpath.basename(url)
        for key in order:
            if key in images:
                _, offset, size = images[key]
                self.items.append((url_index, f"{name}/{key}", (offset, size), labels.get(key, -1), captions.get(key)))

    def _read(self, url_index: int, offset: int, size: int) -> bytes:
        url = self.urls[url_index]
        fs, path = self._fs(url)

        def read() -> bytes:
            with fs.open(path, "rb", block_size=max(size, 1 << 16)) as handle:
                handle.seek(offset)
                return handle.read(size)

        return with_retries(read, url)

    def __len__(self) -> int:
        return len(self.items)

    def key(self, index: int) -> str:
        return self.items[index][1]

    def load(self, index: int) -> SourceSample:
        url_index, key, (offset, size), label, captions = self.items[index]
        image = decode_image(self._read(url_index, offset, size), key)
        return SourceSample(key, image, label if captions is None else -1, None if captions is None else list(captions))


class EmojiSource(Source):
    """Noto Color Emoji glyphs (single code points with a Unicode name) on a white square canvas.

    Captions: ``["grinning face", "a grinning face emoji"]``.  The bitmap font only renders at size 109
    (136x128 glyphs); preprocessing resizes to the training resolution.
    """

    has_captions = True
    grayscale = False
    RENDER_SIZE = 109

    def __init__(self, config: EmojiSourceConfig) -> None:
        from fontTools.ttLib import TTFont

        self.font_path = config.font
        self.canvas = config.canvas
        try:
            cmap = TTFont(config.font, lazy=True).getBestCmap()
        except OSError as error:
            raise ValueError(f"source.font: cannot read {config.font}: {error}") from error
        self.codepoints = [
            c for c in sorted(cmap)
            if c > 0xFF and unicodedata.category(chr(c)) == "So" and unicodedata.name(chr(c), "")
            and not 0x1F3FB <= c <= 0x1F3FF and not 0x1F1E6 <= c <= 0x1F1FF
        ]
        self._font: Any = None
        self.description = {"kind": "emoji", "font": config.font, "canvas": config.canvas}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_font": None}

    def __len__(self) -> int:
        return len(self.codepoints)

    def key(self, index: int) -> str:
        return f"emoji-u{self.codepoints[index]:05x}"

    def load(self, index: int) -> SourceSample:
        from PIL import ImageDraw, ImageFont

        if self._font is None:
            self._font = ImageFont.truetype(self.font_path, self.RENDER_SIZE)
        character = chr(self.codepoints[index])
        image = Image.new("RGBA", (self.canvas, self.canvas), (255, 255, 255, 0))
        ImageDraw.Draw(image).text((self.canvas // 2, self.canvas // 2), character, font=self._font,
                                   embedded_color=True, anchor="mm")
        name = unicodedata.name(character).lower()
        return SourceSample(self.key(index), image, -1, [name, f"a {name} emoji"])


#: the config field of each source kind that says where its data are (named by its errors)
SOURCE_FIELDS = {"fashion_mnist": "source.root", "image_folder": "source.root", "coco": "source.annotations",
                 "webdataset": "source.urls", "emoji": "source.font", "digits": "source"}


def build_source(config: Any) -> Source:
    """The source described by a ``source:`` config section; a missing or unreadable input raises
    :class:`~deepflow.errors.UserError` ``source.<field>: <url>: <what is wrong>``."""
    builders = {
        "fashion_mnist": fashion_mnist_source,
        "digits": digits_source,
        "image_folder": ImageFolderSource,
        "coco": CocoSource,
        "webdataset": WebDatasetSource,
        "emoji": EmojiSource,
    }
    try:
        return builders[config.kind](config)
    except USER_ERRORS as error:
        message = describe(error)
        if not message.startswith("source"):
            message = f"{SOURCE_FIELDS[config.kind]}: {message}"
        raise UserError(message) from error
