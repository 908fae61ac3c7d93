"""Sample quality for small labelled datasets (Fashion-MNIST, scikit-learn digits).

A small CNN classifier, trained once on the dataset's training split with a fixed seed, gives two figures for a set
of class-conditional samples:

- ``fd``: the Frechet distance between its penultimate-layer features of the samples and of held-out real images;
- ``accuracy``: how often it recognises the class each sample was asked to be.

The trained weights are cached on disk under a key built from the dataset, the recipe and the seed; the SHA-256 of the
weights is reported with every score (``classifier_sha256``) so that figures from different machines can be checked
for comparability.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from deepflow.data_pipeline.encoders import to_unit_range
from deepflow.platform.eval.metrics import feature_statistics, frechet_distance_details
from deepflow.storage import join_url, read_url_bytes, url_exists, write_url_bytes

log = logging.getLogger(__name__)

RECIPE_VERSION = 1


class SmallClassifier(nn.Module):
    """Three conv blocks and two linear layers; ``features`` is the 128-d penultimate activation.

    Input: float images [B, C, S, S] in [-1, 1], S = ``image_size``.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, feature_dim: int = 128) -> None:
        super().__init__()
        self.image_size = image_size
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = 64 * (image_size // 8) ** 2
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(flat, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, S, S] in [-1, 1] -> features [B, feature_dim]."""
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, S, S] in [-1, 1] -> logits [B, num_classes]."""
        return self.head(self.features(x))


def _to_input(images: torch.Tensor | np.ndarray, channels: int, size: int) -> torch.Tensor:
    """uint8 images [B, C, H, W] (or [B, H, W]) -> float [B, channels, size, size] in [-1, 1]."""
    x = torch.from_numpy(np.array(images)) if isinstance(images, np.ndarray) else images
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
    x = to_unit_range(x)
    if x.shape[1] != channels:
        if x.shape[1] == 3 and channels == 1:
            x = x.mean(dim=1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        else:
            raise ValueError(f"cannot map {x.shape[1]} image channels to the classifier's {channels}")
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


@dataclass
class ClassifierRecipe:
    """Everything that determines the trained weights (part of the cache key)."""

    dataset: str
    seed: int = 0
    epochs: int = 2
    batch_size: int = 128
    lr: float = 2e-3
    image_size: int = 32
    pad: int = 0  # black border added around the (resized) raw images
    resize_to: int | None = None  # bicubic resize of the raw images first, as the data pipeline's "resize" mode

    def cache_key(self) -> str:
        return (f"{self.dataset}-s{self.image_size}-r{self.resize_to}-p{self.pad}-e{self.epochs}-b{self.batch_size}"
                f"-lr{self.lr}-seed{self.seed}-v{RECIPE_VERSION}")


# Per-dataset recipes: digits is tiny (1500 training images), so it needs many more epochs.
RECIPES = {
    # the main job's data: Fashion-MNIST resized to 16x16 (configs/demo/precompute-fmnist16.yaml)
    "fashion_mnist": ClassifierRecipe(dataset="fashion_mnist", epochs=3, image_size=16, resize_to=16),
    "digits": ClassifierRecipe(dataset="digits", epochs=40, batch_size=64, image_size=8),
}


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, recipe: ClassifierRecipe) -> SmallClassifier:
    """Train the classifier deterministically (single-threaded, fixed seed).

    images: uint8 [N, H, W] or [N, C, H, W]; labels: int [N].
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-reproducible CPU training
    try:
        gen = torch.Generator().manual_seed(recipe.seed)
        torch.manual_seed(recipe.seed)
        channels = 1 if images.ndim == 3 else images.shape[1]
        x_all = _to_input(images, channels, recipe.image_size)
        y_all = torch.as_tensor(labels, dtype=torch.long)
        model = SmallClassifier(channels, num_classes, recipe.image_size)
        opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
        model.train()
        for _ in range(recipe.epochs):
            order = torch.randperm(len(x_all), generator=gen)
            for start in range(0, len(order), recipe.batch_size):
                idx = order[start : start + recipe.batch_size]
                loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return model.eval()
    finally:
        torch.set_num_threads(threads)


def _weights_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


ASSETS = Path(__file__).resolve().parent / "assets"
#: SHA-256 (see ``_weights_sha256``) of the classifiers shipped in ``assets/``, trained by ``train_classifier`` with
#: the recipe named in the file name (seed 0, torch 2.14.1, single thread). Training again reproduces them.
PACKAGED_SHA256: dict[str, str] = {
    "fashion_mnist-s16-r16-p0-e3-b128-lr0.002-seed0-v1": "1ffbf6f07f9f4ade0a222b4ee5d96dd1cf7994cfcdfb547815a8bdf43f1e4da9",
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("DEEPFLOW_CACHE", Path.home() / ".cache" / "deepflow"))


class ClassifierQuality:
    """FD in classifier features against held-out real images, and class accuracy, for uint8 samples.

    Built with :meth:`for_dataset`, which trains (or loads from cache) the classifier and embeds the reference set.
    """

    def __init__(
        self,
        classifier: SmallClassifier,
        reference_images: np.ndarray,
        batch_size: int = 500,
        unseen_real: tuple[np.ndarray, np.ndarray] | None = None,
        reference_id: str | None = None,
    ) -> None:
        self.classifier = classifier.eval()
        self.channels = classifier.conv[0].in_channels
        self.batch_size = batch_size
        self.sha256 = _weights_sha256(classifier)
        self.name = "classifier"
        self.dim = classifier.head.in_features
        self.num_classes = classifier.head.out_features
        #: held-out real images [M, H, W] + labels NOT in the reference statistics: the "real data" baseline
        self.unseen_real = unseen_real
        ref = self(reference_images)
        #: (mu [dim], sigma [dim, dim]) float64 of the reference images' features (extractors.SelfReferencedExtractor)
        self.reference_stats = feature_statistics(ref.cpu().numpy())
        self.reference_id = reference_id or (
            f"{len(reference_images)} held-out real images, classifier sha256 {self.sha256[:16]}"
        )

    @property
    def device(self) -> torch.device:
        """Where the classifier's weights are."""
        return next(self.classifier.parameters()).device

    def to(self, device: str | torch.device) -> "ClassifierQuality":
        """Move the classifier to ``device`` (features are then computed there); returns ``self``."""
        self.classifier.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images [B, C, H, W] (or [B, H, W]) -> penultimate features [B, dim] float32 on :attr:`device`."""
        device = self.device
        feats = []
        for start in range(0, len(images), self.batch_size):
            x = _to_input(images[start : start + self.batch_size], self.channels, self.classifier.image_size)
            feats.append(self.classifier.features(x.to(device)))
        return torch.cat(feats)

    @torch.no_grad()
    def class_accuracy(self, features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
        """Accuracy of the classifier head on features [N, dim] (from ``__call__``) against requested labels [N]."""
        device = self.device
        feats = torch.as_tensor(np.asarray(features.cpu() if isinstance(features, torch.Tensor) else features),
                                dtype=torch.float32, device=device)
        wanted = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels),
                                 dtype=torch.long, device=device)
        if feats.shape[0] != wanted.shape[0]:
            raise ValueError(f"class accuracy: {wanted.shape[0]} labels for {feats.shape[0]} feature rows")
        return float((self.classifier.head(feats).argmax(dim=1) == wanted).float().mean())

    def score(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> dict[str, float | str]:
        """uint8 samples [N, C, H, W] with requested labels [N] -> {"fd", "accuracy", "classifier_sha256"}, plus
        "fd_diagonal_offset" when the Frechet distance needed one (a singular covariance product)."""
        feats = self(images).cpu()
        mu, sigma = feature_statistics(feats.numpy())
        fd = frechet_distance_details(mu, sigma, *self.reference_stats)
        result: dict[str, float | str] = {
            "fd": fd.value,
            "accuracy": self.class_accuracy(feats, labels),
            "classifier_sha256": self.sha256,
        }
        if fd.diagonal_offset:
            result["fd_diagonal_offset"] = fd.diagonal_offset
        return result

    @classmethod
    def for_dataset(
        cls, dataset: str, seed: int = 0, cache_dir: str | Path | None = None, num_reference: int | None = None
    ) -> "ClassifierQuality":
        """Train/load the classifier of ``dataset`` ("fashion_mnist" or "digits") and embed its held-out split.

        ``num_reference``: the first N held-out images form the reference set (default: half of them); the rest
        stay unseen (``unseen_real``), to score real images against it as a baseline.
        """
        from deepflow.platform.eval.quality_data import load_labelled_split

        if dataset not in RECIPES:
            raise ValueError(f"no quality classifier recipe for dataset {dataset!r}; known: {sorted(RECIPES)}")
        recipe = dataclasses.replace(RECIPES[dataset], seed=seed)
        test_x, test_y, num_classes = load_labelled_split(dataset, "test", recipe.pad, recipe.resize_to)
        num_reference = num_reference or len(test_x) // 2
        unseen = (test_x[num_reference:], test_y[num_reference:])
        key = recipe.cache_key()
        channels = 1 if test_x.ndim == 3 else test_x.shape[1]
        model = _load_or_train(key, recipe, channels, num_classes, cache_dir)
        reference_id = (f"{dataset} held-out split ({num_reference} images), classifier seed {seed} "
                        f"sha256 {_weights_sha256(model)[:16]}")
        return cls(model.eval(), test_x[:num_reference], unseen_real=unseen, reference_id=reference_id)


def _load_or_train(
    key: str, recipe: ClassifierRecipe, channels: int, num_classes: int, cache_dir: str | Path | None
) -> SmallClassifier:
    """The classifier of ``recipe``: the packaged weights, else the cached ones (``cache_dir``: a local folder or any
    storage URL), else trained now and written there atomically (all through deepflow.storage)."""
    from deepflow.platform.eval.quality_data import load_labelled_split

    packaged = ASSETS / f"classifier-{key}.safetensors"
    name = f"classifier-{key}.safetensors"
    url = str(packaged) if packaged.exists() else join_url(str(cache_dir or default_cache_dir()), name)
    model = SmallClassifier(channels, num_classes, recipe.image_size)
    if url_exists(url):
        model.load_state_dict(load_safetensors(read_url_bytes(url)))
        expected = PACKAGED_SHA256.get(key)
        if expected is not None and _weights_sha256(model) != expected:
            raise ValueError(f"{url}: classifier weights do not match the recorded SHA-256 {expected[:12]}...")
        return model.eval()
    log.info("training the %s quality classifier (seed %d), cached at %s", recipe.dataset, recipe.seed, url)
    train_x, train_y, _ = load_labelled_split(recipe.dataset, "train", recipe.pad, recipe.resize_to)
    model = train_classifier(train_x, train_y, num_classes, recipe)
    write_url_bytes(url, save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}))
    return model.eval()
