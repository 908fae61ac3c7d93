"""Parity with torch-fidelity: the SAME random-weight FID Inception-v3 (one weights file in the pytorch-fid
``pt_inception-2015-12-05`` key layout, loaded by our ``FIDInceptionExtractor`` and by torch-fidelity's
``FeatureExtractorInceptionV3(feature_extractor_weights_path=...)``) gives the same pool features and unbiased logits,
and our evaluator gives torch-fidelity's FID, Inception Score and precision/recall on a small uint8 batch.

The feature tolerance is checked to be discriminative: the common preprocessing mistakes (half-pixel-centre bilinear
resize instead of TensorFlow 1.x's, ``x / 127.5 - 1`` instead of ``(x - 128) / 128``) move the features by more than
a thousand times the tolerance. sFID has no torch-fidelity counterpart (it has no ``mixed_6/conv`` output).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torch_fidelity", reason="torch-fidelity is not installed (pip install torch-fidelity): "
                    "no parity check against it")

from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: E402
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric  # noqa: E402
from torch_fidelity.metric_isc import isc_features_to_metric  # noqa: E402
from torch_fidelity.metric_prc import prc_features_to_metric  # noqa: E402

from deepflow.platform.eval.evaluator import ReferenceBatch, evaluate_batch, extract_features  # noqa: E402
from deepflow.platform.eval.extractors import build_extractor  # noqa: E402
from deepflow.platform.eval.inception import FIDInceptionExtractor, build_fid_inception_network  # noqa: E402

#: max abs difference of the pool features [N, 2048] and unbiased logits [N, 1008] (values up to ~35 and ~16; observed
#: ~6e-6 and ~7e-5: float32 rounding, amplified by the 2048-wide classifier for the logits)
FEATURE_ATOL = {"feats": 1e-4, "logits": 1e-3}
#: relative FID difference (ours: the eigh form of the Frechet distance; torch-fidelity: eigvals of the product)
FID_RTOL = 1e-4
NUM_IMAGES = 12


def _images(seed: int, n: int, height: int, width: int) -> torch.Tensor:
    """uint8 [n, 3, height, width]: smooth random colour fields plus noise (seed -> a distribution)."""
    rng = np.random.default_rng(seed)
    base = torch.from_numpy(rng.integers(0, 256, (n, 3, 4, 4)).astype(np.float32))
    smooth = F.interpolate(base, size=(height, width), mode="bicubic", align_corners=False)
    noise = torch.from_numpy(rng.normal(0.0, 20.0, (n, 3, height, width)).astype(np.float32))
    return (smooth + noise).clamp(0, 255).round().to(torch.uint8)


def _generated(n: int) -> torch.Tensor:
    """uint8 [3 * (n // 3), 3, 32, 32] "samples": a third like the real images (another seed), a third uniform noise,
    a third flat colours, so that precision and recall are both strictly between 0 and 1."""
    rng = np.random.default_rng(4)
    third = n // 3
    noise = torch.from_numpy(rng.integers(0, 256, (third, 3, 32, 32), dtype=np.uint8))
    flat = torch.from_numpy(rng.integers(0, 256, (third, 3, 1, 1), dtype=np.uint8)).expand(-1, -1, 32, 32)
    return torch.cat([_images(2, third, 32, 32), noise, flat.contiguous()])


def _nhwc(images: torch.Tensor) -> np.ndarray:
    """uint8 [N, C, H, W] tensor -> uint8 [N, H, W, C] array (the ADM batch layout)."""
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def _random_fid_state(calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """A random state dict in the pytorch-fid layout: He-scaled convolutions, non-trivial batch-norm statistics, and a
    classifier whose rows are orthogonal to the mean pool feature of ``calibration`` images (uint8 [n, 3, H, W]), so
    the predictions differ between images and the Inception Score is well above 1."""
    generator = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for key, value in build_fid_inception_network().state_dict().items():
        if key.endswith("num_batches_tracked") or not value.is_floating_point():
            state[key] = value
        elif value.ndim >= 2:
            state[key] = torch.randn(value.shape, generator=generator) * (2.0 / value[0].numel()) ** 0.5
        elif key.endswith(("running_var", "bn.weight")):
            state[key] = 0.5 + torch.rand(value.shape, generator=generator)
        else:
            state[key] = 0.1 * torch.randn(value.shape, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "RANDOM weights": replaced right away
        probe = FIDInceptionExtractor(weights=None)
    probe.net.load_state_dict(state)
    mean = probe.forward_all(calibration).pool.double().mean(0)
    weight = torch.randn(state["fc.weight"].shape, generator=generator, dtype=torch.float64)
    weight -= (weight @ mean)[:, None] * mean[None, :] / (mean @ mean)
    state["fc.weight"] = (0.3 * weight).float()
    return state


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both extractors from one weights file, the images, and every feature and metric the tests compare."""
    weights = Path(tmp_path_factory.mktemp("fid-weights")) / "pt_inception-2015-12-05-random.pth"
    torch.save(_random_fid_state(_images(9, 2, 32, 32)), weights)
    ours = build_extractor("inception", weights=str(weights))
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                         feature_extractor_weights_path=str(weights))
    real, fake, large = _images(1, NUM_IMAGES, 32, 32), _generated(NUM_IMAGES), _images(3, 2, 320, 400)
    reference = ReferenceBatch(images=_nhwc(real), progress=False)
    results = evaluate_batch(_nhwc(fake), [ours], reference, k=3, fd_method="eigh", progress=False)
    ours_feats = {"real": reference.features(ours, 16, "cpu"),
                  "fake": extract_features(_nhwc(fake), ours, 16, progress=False),
                  "large": extract_features(_nhwc(large), ours, 16, progress=False)}
    with torch.no_grad():
        theirs_feats = {name: dict(zip(("feats", "logits"), theirs(images)))
                        for name, images in (("real", real), ("fake", fake), ("large", large))}
    return {"ours": ours, "results": results, "ours_feats": ours_feats, "theirs_feats": theirs_feats, "real": real}


@pytest.mark.parametrize("images", ["real", "fake", "large"])
@pytest.mark.parametrize("part", ["feats", "logits"])
def test_pool_features_and_unbiased_logits_match(parity: dict[str, Any], images: str, part: str) -> None:
    """32x32 (upsampled) and 320x400 (downsampled, not square) uint8 images: pool_3 [N, 2048], logits [N, 1008]."""
    ours = torch.from_numpy(parity["ours_feats"][images][part])
    theirs = parity["theirs_feats"][images][part].float()
    assert ours.shape == theirs.shape
    difference = (ours - theirs).abs().max().item()
    print(f"{images} {part}: max |ours - torch-fidelity| = {difference:.3g} (max |value| {theirs.abs().max():.3g})")
    assert difference < FEATURE_ATOL[part]


def test_the_feature_tolerance_catches_preprocessing_mistakes(parity: dict[str, Any]) -> None:
    """Half-pixel bilinear resizing, or x / 127.5 - 1 scaling, move the pool features far beyond the tolerance."""
    ours: FIDInceptionExtractor = parity["ours"]
    images = parity["real"][:2]
    net = ours.net

    def pool(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.adaptive_avg_pool2d(_trunk(net, x), 1).flatten(1)

    right = torch.from_numpy(parity["theirs_feats"]["real"]["feats"][:2].numpy())
    half_pixel = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
    wrong_resize = pool((half_pixel - 128.0) / 128.0)
    wrong_scale = pool(ours.preprocess(images) * (128.0 / 127.5) + (0.5 / 127.5))
    assert (pool(ours.preprocess(images)) - right).abs().max() < FEATURE_ATOL["feats"]
    for wrong in (wrong_resize, wrong_scale):
        assert (wrong - right).abs().max() > 1000 * FEATURE_ATOL["feats"]


def _trunk(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The FID Inception-v3 up to Mixed_7c: float [B, 3, 299, 299] -> [B, 2048, 8, 8]."""
    for stage in (net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.maxpool1, net.Conv2d_3b_1x1,
                  net.Conv2d_4a_3x3, net.maxpool2, net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a,
                  net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c):
        x = stage(x)
    return x


def test_fid_matches(parity: dict[str, Any]) -> None:
    theirs = parity["theirs_feats"]
    fid = fid_statistics_to_metric(fid_features_to_statistics(theirs["fake"]["feats"]),
                                   fid_features_to_statistics(theirs["real"]["feats"]), False)
    ours = parity["results"]["fid"]
    print(f"FID ours {ours:.6f} torch-fidelity {fid['frechet_inception_distance']:.6f}")
    assert ours == pytest.approx(fid["frechet_inception_distance"], rel=FID_RTOL)
    assert ours > 1.0  # two different distributions: a real distance, not a degenerate 0


def test_inception_score_matches(parity: dict[str, Any]) -> None:
    """ADM's protocol (chunks of 5000: one split here) = torch-fidelity with one split, unshuffled."""
    theirs = isc_features_to_metric(parity["theirs_feats"]["fake"]["logits"], splits=1, shuffle=False)
    ours = parity["results"]["inception_score"]
    print(f"IS ours {ours:.8f} torch-fidelity {theirs['inception_score_mean']:.8f}")
    assert ours == pytest.approx(theirs["inception_score_mean"], rel=1e-5)  # logits differ by ~1e-5
    assert ours > 1.5  # predictions differ between images: the score is sensitive to the logits


def test_precision_recall_match(parity: dict[str, Any]) -> None:
    """torch-fidelity's prc: features_1 = generated, features_2 = real, k = 3 (both use <= the k-th NN radius)."""
    theirs_feats = parity["theirs_feats"]
    theirs = prc_features_to_metric(theirs_feats["fake"]["feats"], theirs_feats["real"]["feats"], prc_neighborhood=3,
                                    prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    results = parity["results"]
    print(f"precision/recall ours {results['precision']}/{results['recall']} "
          f"torch-fidelity {theirs['precision']}/{theirs['recall']}")
    # the same counts of points inside the manifolds (torch-fidelity averages in float32: 1/3 -> 0.33333334)
    assert results["precision"] == pytest.approx(theirs["precision"], abs=1e-6)
    assert results["recall"] == pytest.approx(theirs["recall"], abs=1e-6)
    assert 0.0 < results["precision"] < 1.0 and 0.0 < results["recall"] < 1.0  # informative values, not 0 or 1
