"""Image preprocessing: source PIL image -> ``uint8 [C, R, R]`` at the training resolution R.

``adm_center_crop`` follows the ADM / DiT / SiT / REPA preprocessing of ImageNet: halve the image with a
box filter while its short side is at least twice the target, resize the short side to the target with
bicubic filtering, then take the centre square.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")


def to_channels(image: Image.Image, channels: int | None) -> Image.Image:
    """``image`` as ``L`` (1 channel) or ``RGB`` (3 channels); ``None`` keeps grayscale sources grayscale.

    Transparent images are composited on white (emoji, logos) instead of showing black backgrounds.
    """
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("L" if image.mode == "LA" else "RGB")
    wanted = channels if channels is not None else (1 if image.mode in GRAYSCALE_MODES else 3)
    target_mode = "L" if wanted == 1 else "RGB"
    return image if image.mode == target_mode else image.convert(target_mode)


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop to ``size x size`` (box-halving, bicubic short-side resize, centre square)."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.Resampling.BICUBIC)
    left = (image.width - size) // 2
    top = (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize of the short side to ``size``, then the centre square."""
    scale = size / min(image.size)
    if scale != 1.0:
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                             resample=Image.Resampling.BICUBIC)
    left = (image.width - size) // 2
    top = (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def pad_to_square(image: Image.Image, size: int) -> Image.Image:
    """Centre ``image`` on a black ``size x size`` canvas (downscaled first if it does not fit)."""
    if image.width > size or image.height > size:
        scale = size / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             resample=Image.Resampling.BICUBIC)
    canvas = Image.new(image.mode, (size, size), 0)
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return canvas


def preprocess_image(image: Image.Image, resolution: int, resize: str, channels: int | None) -> np.ndarray:
    """Source image -> ``uint8 [C, resolution, resolution]`` (C = 1 or 3)."""
    image = to_channels(image, channels)
    if resize == "adm_center_crop":
        image = adm_center_crop(image, resolution)
    elif resize == "center_crop":
        image = center_crop(image, resolution)
    elif resize == "resize":
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), resample=Image.Resampling.BICUBIC)
    elif resize == "pad":
        image = pad_to_square(image, resolution)
    else:
        raise ValueError(f"preprocess.resize: unknown mode {resize!r}")
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return np.ascontiguousarray(array)


def encode_image_bytes(pixels: np.ndarray, image_format: str, jpeg_quality: int = 95) -> bytes:
    """``uint8 [C, H, W]`` -> PNG or JPEG bytes."""
    array = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    elif image_format == "jpg":
        Image.fromarray(array).save(buffer, format="JPEG", quality=jpeg_quality)
    else:
        raise ValueError(f"output.keep_image: unknown image format {image_format!r}")
    return buffer.getvalue()


def decode_image_bytes(data: bytes, where: str) -> np.ndarray:
    """PNG/JPEG bytes -> ``uint8 [3, H, W]`` (grayscale is repeated to 3 channels)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Exception as error:  # PIL raises many types for bad data
        raise ValueError(f"{where}: cannot decode image: {error}") from error
    return array.transpose(2, 0, 1)
