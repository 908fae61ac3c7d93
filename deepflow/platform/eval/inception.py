"""The FID Inception-v3 network (the TensorFlow ``inception-2015-12-05`` graph of the ADM / TTUR evaluators).

The network is torchvision's ``Inception3`` with the blocks that differ in the TensorFlow graph replaced by
pytorch-fid's patched blocks (average pools that exclude padding, a max pool in the last block) and a 1008-way
classifier: exactly the module layout of the pytorch-fid weights file ``pt_inception-2015-12-05-6726825d.pth`` and of
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (both use the same parameter names).

Preprocessing follows the TensorFlow graph as the ADM evaluator feeds it: uint8 images of any size are resized to
299x299 with TensorFlow 1.x bilinear resampling (no half-pixel centres) and mapped with ``(x - 128) / 128``.

Outputs used by the ADM protocol:
- ``pool``    [B, 2048]: ``pool_3`` (FID, precision/recall);
- ``spatial`` [B, 2023]: the first 7 channels of ``mixed_6/conv`` (= ``Mixed_6d.branch1x1``, 17x17), flattened in
  NHWC order as the ADM evaluator does (sFID; the order matters for reference statistics computed by ADM);
- ``logits``  [B, 1008]: ``pool @ fc.weight.T`` without the bias (ADM's ``softmax/logits/MatMul``; Inception Score).

The weights are found by :func:`find_inception_weights`: an explicit path or URL, else ``$DEEPFLOW_INCEPTION_WEIGHTS``,
else the file in the DeepFlow cache (``$DEEPFLOW_CACHE``, default ``~/.cache/deepflow``), else the copies pytorch-fid
and torch-fidelity keep in torch's hub cache; with none of them, one error line says where to get the file.
"""
from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepflow.storage import read_url_bytes, url_exists, write_url_bytes

log = logging.getLogger(__name__)

INCEPTION_INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023
NUM_LOGITS = 1008
#: the pytorch-fid weights file name (the one to download)
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
#: torch-fidelity's name for the same network (same parameter names), also accepted in the caches
TORCH_FIDELITY_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
PYTORCH_FID_WEIGHTS_URL = (
    f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_WEIGHTS_FILE}"
)
#: environment variable naming the weights (a path or any storage / http URL)
INCEPTION_WEIGHTS_ENV = "DEEPFLOW_INCEPTION_WEIGHTS"
#: the ``weights`` value that means "find them" (:func:`find_inception_weights`)
AUTO_WEIGHTS = "auto"


@dataclass
class InceptionOutputs:
    """Features of one batch. pool [B, 2048], spatial [B, 2023], logits [B, 1008] (unbiased), all float32."""

    pool: Tensor
    spatial: Tensor
    logits: Tensor


def resize_bilinear_tf1(images: Tensor, size: int) -> Tensor:
    """Bilinear resize as TensorFlow 1.x ``ResizeBilinear`` (align_corners=False, half_pixel_centers=False).

    Source coordinate of output pixel ``o`` is ``o * in / out`` (no half-pixel offset), neighbours are clamped at
    the border. images: float [B, C, H, W] -> [B, C, size, size].
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"resize_bilinear_tf1 expects float [B,C,H,W], got {images.dtype} {tuple(images.shape)}")

    def axis(in_size: int) -> tuple[Tensor, Tensor, Tensor]:
        src = torch.arange(size, device=images.device, dtype=torch.float32) * (in_size / size)
        low = src.floor().long().clamp_max(in_size - 1)
        high = (low + 1).clamp_max(in_size - 1)
        return low, high, (src - low.float()).to(images.dtype)

    y_lo, y_hi, wy = axis(images.shape[2])
    x_lo, x_hi, wx = axis(images.shape[3])
    top = images[:, :, y_lo, :]
    bottom = images[:, :, y_hi, :]
    rows = top + (bottom - top) * wy.view(1, 1, -1, 1)
    left = rows[:, :, :, x_lo]
    right = rows[:, :, :, x_hi]
    return left + (right - left) * wx.view(1, 1, 1, -1)


def build_fid_inception_network() -> nn.Module:
    """torchvision Inception3 patched to the FID graph (1008 classes, no aux head), randomly initialised."""
    import torchvision  # here, not at the top: finding the weights (configs, jobs) does not need the network
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=NUM_LOGITS, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


class InceptionWeightsNotFoundError(FileNotFoundError):
    """No FID Inception-v3 weights where they were asked for or looked for; the message (one line) says where to get
    them and where to put them."""


def inception_cache_candidates() -> list[str]:
    """The files looked at when no location is given, in order: the DeepFlow cache (``$DEEPFLOW_CACHE``, default
    ``~/.cache/deepflow``), then torch's hub cache (``$TORCH_HOME/hub/checkpoints``, default
    ``~/.cache/torch/hub/checkpoints``, where pytorch-fid and torch-fidelity download them); the pytorch-fid name
    first, then torch-fidelity's name in each folder."""
    from deepflow.platform.eval.quality import default_cache_dir

    folders = [str(default_cache_dir()), os.path.join(torch.hub.get_dir(), "checkpoints")]
    return [os.path.join(folder, name) for folder in folders
            for name in (INCEPTION_WEIGHTS_FILE, TORCH_FIDELITY_WEIGHTS_FILE)]


def _how_to_get_weights() -> str:
    """Where to download the weights and where to put them (the tail of every not-found message)."""
    from deepflow.platform.eval.quality import default_cache_dir

    target = os.path.join(str(default_cache_dir()), INCEPTION_WEIGHTS_FILE)
    return (f"download {PYTORCH_FID_WEIGHTS_URL} to {target} (or put it anywhere and pass --inception-weights PATH or "
            f"set ${INCEPTION_WEIGHTS_ENV}=PATH; --inception-weights URL downloads it into torch's hub cache once)")


def _check_location(location: str, given_as: str) -> str:
    """``location`` when it exists (http(s) URLs are taken as given: fetched and cached on first use)."""
    if location.startswith(("http://", "https://")) or url_exists(location):
        return location
    raise InceptionWeightsNotFoundError(f"{given_as}{location}: not found; {_how_to_get_weights()}")


def find_inception_weights(explicit: str | None = None) -> str:
    """The location (path or URL) of the FID Inception-v3 weights file.

    Order: ``explicit`` (a path or any storage / http URL; ``None`` or ``"auto"``: look further), else
    ``$DEEPFLOW_INCEPTION_WEIGHTS``, else the first existing file of :func:`inception_cache_candidates`. A given
    location that does not exist, or nothing found, raises :class:`InceptionWeightsNotFoundError` with one line
    saying where to download the file and where to put it.
    """
    if explicit is not None and explicit != AUTO_WEIGHTS:
        return _check_location(explicit, "Inception weights ")
    from_env = os.environ.get(INCEPTION_WEIGHTS_ENV, "").strip()
    if from_env:
        return _check_location(from_env, f"${INCEPTION_WEIGHTS_ENV}=")
    candidates = inception_cache_candidates()
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    folders = ", ".join(dict.fromkeys(os.path.dirname(c) for c in candidates))
    raise InceptionWeightsNotFoundError(
        f"no FID Inception-v3 weights found (${INCEPTION_WEIGHTS_ENV} is not set, no {INCEPTION_WEIGHTS_FILE} in "
        f"{folders}): {_how_to_get_weights()}"
    )


def load_state_dict_from_location(location: str, cache_dir: str | None = None) -> dict[str, Tensor]:
    """Read a state dict from a local path or any storage URL (s3://, gs://, file://, http(s)://, memory://).

    Bytes are read through :mod:`deepflow.storage` (its retry policy); ``.safetensors`` files are parsed with
    safetensors, anything else with ``torch.load(weights_only=True)`` (never unpickling arbitrary objects).
    http(s) downloads are cached under ``cache_dir`` (default ``$TORCH_HOME/hub/checkpoints``, where torch.hub keeps
    them) and read from there afterwards.
    """
    payload = _read_weights(location, cache_dir)
    if location.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        return load_safetensors(payload)
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling errors of many types: one message naming the file
        raise ValueError(f"{location}: not a torch weights file ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{location}: does not hold a state dict (got {type(state).__name__})")
    return state


def _read_weights(location: str, cache_dir: str | None) -> bytes:
    """The bytes of ``location``; http(s) objects go through a local cache file (written atomically)."""
    if not location.startswith(("http://", "https://")):
        return read_url_bytes(location)
    folder = cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
    cached = os.path.join(folder, location.rstrip("/").rsplit("/", 1)[-1])
    if url_exists(cached):
        return read_url_bytes(cached)
    log.info("downloading %s to %s", location, cached)
    payload = read_url_bytes(location)
    write_url_bytes(cached, payload)
    return payload


class FIDInceptionExtractor(nn.Module):
    """FID Inception-v3 feature extractor. Call: uint8 [B, 3|1, H, W] -> pool features float32 [B, 2048].

    ``weights``: local path or URL of the pytorch-fid / torch-fidelity weights file, or ``"auto"`` to find them
    (:func:`find_inception_weights`); ``None`` keeps random weights (tests only: the numbers mean nothing, a warning
    says so).
    """

    name = "inception"
    dim = POOL_DIM

    def __init__(self, weights: str | None = None, cache_dir: str | None = None) -> None:
        super().__init__()
        self.net = build_fid_inception_network()
        if weights is None:
            message = (
                "FID Inception-v3 built with RANDOM weights: FID/sFID/IS/precision/recall computed with it are "
                "meaningless (tests only). Pass weights=<path or URL of pt_inception-2015-12-05-6726825d.pth>."
            )
            warnings.warn(message, stacklevel=2)
            log.warning(message)
            self._init_random()
        else:
            location = find_inception_weights() if weights == AUTO_WEIGHTS else weights
            self._load(load_state_dict_from_location(location, cache_dir))
        self.eval().requires_grad_(False)

    def _init_random(self) -> None:
        """Deterministic small-variance init (seeded) so that random-weight features are finite and reproducible."""
        generator = torch.Generator().manual_seed(0)
        for module in self.net.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                with torch.no_grad():
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                    if module.bias is not None:
                        module.bias.zero_()

    def _load(self, state: dict[str, Tensor]) -> None:
        expected = self.net.state_dict()
        missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise ValueError(
                "Inception weights do not match the FID Inception-v3 layout: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for key, value in state.items():
            if expected[key].shape != value.shape:
                raise ValueError(f"Inception weight {key}: shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
        self.net.load_state_dict(state, strict=False)

    @staticmethod
    def preprocess(images: Tensor) -> Tensor:
        """uint8 [B, 3|1, H, W] -> float32 [B, 3, 299, 299] in [-1, 1) as the TensorFlow graph does."""
        images = as_rgb_uint8(images)
        x = resize_bilinear_tf1(images.float(), INCEPTION_INPUT_SIZE)
        return (x - 128.0) / 128.0

    @torch.no_grad()
    def forward_all(self, images: Tensor) -> InceptionOutputs:
        """uint8 [B, 3|1, H, W] -> InceptionOutputs(pool [B,2048], spatial [B,2023], logits [B,1008])."""
        net = self.net
        x = self.preprocess(images).to(next(net.parameters()).device)
        for stage in (
            net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.maxpool1, net.Conv2d_3b_1x1,
            net.Conv2d_4a_3x3, net.maxpool2, net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a,
            net.Mixed_6b, net.Mixed_6c,
        ):
            x = stage(x)
        # mixed_6/conv in the TF graph = the 1x1 branch of Mixed_6d: [B, 192, 17, 17]
        spatial = net.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]
        spatial = spatial.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        for stage in (net.Mixed_6d, net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c):
            x = stage(x)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        logits = pool @ net.fc.weight.T
        return InceptionOutputs(pool=pool.float(), spatial=spatial.float(), logits=logits.float())

    def forward(self, images: Tensor) -> Tensor:
        """uint8 [B, 3|1, H, W] -> pool_3 features float32 [B, 2048]."""
        return self.forward_all(images).pool


def as_rgb_uint8(images: Tensor) -> Tensor:
    """Check uint8 [B, C, H, W] with C in {1, 3}; grayscale is repeated to 3 channels. Returns [B, 3, H, W]."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 in [0, 255], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, 3|1, H, W] (NCHW), got shape {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
