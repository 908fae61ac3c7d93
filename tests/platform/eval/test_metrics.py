"""Metric math against closed forms and constructed cases; feature extractors with random weights."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import linalg

from deepflow.platform.eval import extractors, metrics
from deepflow.platform.eval.inception import FIDInceptionExtractor, resize_bilinear_tf1
from deepflow.platform.eval.extractors import build_extractor, register_extractor
from deepflow.platform.eval.metrics import (
    feature_statistics,
    frechet_distance,
    frechet_distance_details,
    inception_score,
    precision_recall,
)


def _random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def _wasserstein2_closed_form(mu1, s1, mu2, s2) -> float:
    """W2^2 between Gaussians via the symmetric form tr(s1 + s2 - 2 (s1^1/2 s2 s1^1/2)^1/2), square roots by eigh."""

    def psd_sqrt(m: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    root1 = psd_sqrt(s1)
    cross = psd_sqrt(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross))


# ---------------------------------------------------------------------------------------------------- Frechet
def test_frechet_distance_diagonal_gaussians_closed_form() -> None:
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)  # 5 + 1 + 1 + 4
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)
    assert expected == pytest.approx(11.0)


def test_frechet_distance_general_gaussians_matches_symmetric_closed_form() -> None:
    rng = np.random.default_rng(0)
    dim = 16
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim)
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert fd == pytest.approx(_wasserstein2_closed_form(mu1, s1, mu2, s2), rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    # symmetric and accepts torch tensors
    assert frechet_distance(torch.tensor(mu2), torch.tensor(s2), mu1, s1) == pytest.approx(fd, rel=1e-8)


def test_frechet_distance_of_sample_statistics_converges_to_closed_form() -> None:
    rng = np.random.default_rng(1)
    dim, n = 4, 200_000
    mu1, mu2 = np.zeros(dim), np.full(dim, 0.5)
    s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim)
    x1 = rng.multivariate_normal(mu1, s1, size=n)
    x2 = rng.multivariate_normal(mu2, s2, size=n)
    m1, c1 = feature_statistics(x1)
    m2, c2 = feature_statistics(torch.from_numpy(x2).float())
    assert c1.shape == (dim, dim) and m1.dtype == np.float64
    np.testing.assert_allclose(c1, np.cov(x1, rowvar=False))
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(_wasserstein2_closed_form(mu1, s1, mu2, s2), rel=0.02)


def test_frechet_distance_rank_deficient_covariances_stay_finite() -> None:
    rng = np.random.default_rng(2)
    x1, x2 = rng.normal(size=(5, 32)), rng.normal(size=(5, 32)) + 1.0  # N < D: singular covariances
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SciPy's "Matrix is singular" LinAlgWarning must not reach a user's console
        details = frechet_distance_details(*feature_statistics(x1), *feature_statistics(x2))
    assert np.isfinite(details.value) and details.value > 0 and details.diagonal_offset == 0.0
    # the same value as pytorch-fid, the reference implementation of this handling
    from pytorch_fid.fid_score import calculate_frechet_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = calculate_frechet_distance(*feature_statistics(x1), *feature_statistics(x2))
    assert details.value == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(*feature_statistics(x1), *feature_statistics(x1)) == pytest.approx(0.0, abs=1e-4)


def test_frechet_distance_eigh_method_equals_sqrtm() -> None:
    rng = np.random.default_rng(3)
    for n in (400, 20):  # full-rank and rank-deficient sample covariances (D = 128)
        a, b = feature_statistics(rng.normal(size=(n, 128))), feature_statistics(rng.normal(size=(n, 128)) * 1.5 + 0.2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = frechet_distance(*a, *b)
        assert frechet_distance(*a, *b, method="eigh") == pytest.approx(reference, rel=1e-6)
    with pytest.raises(ValueError, match="method"):
        frechet_distance(*a, *b, method="svd")


def test_frechet_distance_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan]), np.eye(1), np.zeros(1), np.eye(1))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(np.zeros((1, 3)))


# ---------------------------------------------------------------------------------------------- Inception Score
def test_inception_score_constructed_cases() -> None:
    classes = 10
    confident_uniform = np.eye(classes)[np.arange(1000) % classes]  # one-hot, classes uniform -> IS = #classes
    assert inception_score(confident_uniform) == pytest.approx(classes, rel=1e-6)
    assert inception_score(np.full((100, classes), 1.0 / classes)) == pytest.approx(1.0)  # uninformative -> 1
    collapsed = np.eye(classes)[np.zeros(100, dtype=int)]  # one class only -> 1
    assert inception_score(collapsed) == pytest.approx(1.0)
    # logits give the same as their softmax
    logits = np.random.default_rng(0).normal(size=(300, classes)) * 3
    probs = torch.softmax(torch.tensor(logits), 1).numpy()
    assert inception_score(logits) == pytest.approx(inception_score(probs, is_probs=True), rel=1e-6)
    # ADM splits by chunks of 5000; 2 equal splits of a half/half batch see one class each -> IS = 1
    halves = np.eye(2)[np.repeat([0, 1], 50)]
    assert inception_score(halves, splits=2) == pytest.approx(1.0)
    assert inception_score(halves, split_size=5000) == pytest.approx(2.0)


# --------------------------------------------------------------------------------------------- precision/recall
def test_precision_recall_constructed_cases() -> None:
    rng = np.random.default_rng(0)
    real = np.concatenate([rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 50.0])  # two far modes
    one_mode = rng.normal(size=(200, 8))  # fake covers only the first mode
    precision, recall = precision_recall(real, one_mode, k=3)
    assert precision > 0.8  # same distribution as the first mode: most points inside its k-NN balls
    assert 0.35 < recall <= 0.5  # the second mode is missed entirely
    far = rng.normal(size=(100, 8)) - 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    assert precision_recall(real, real) == (1.0, 1.0)


def test_manifold_radii_is_kth_neighbour_excluding_self() -> None:
    points = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    radii = metrics.manifold_radii(points, k=2, block=2)
    # squared distance to 2nd nearest other point: 0->3 (9), 1->3 (4), 3->0 (9), 6->10 (16), 10->3 (49)
    torch.testing.assert_close(radii, torch.tensor([9.0, 4.0, 9.0, 16.0, 49.0]))
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


# ---------------------------------------------------------------------------------------------------- extractors
def test_tf1_bilinear_resize_has_no_half_pixel_offset() -> None:
    image = torch.tensor([[[[0.0, 10.0]]]])  # [1, 1, 1, 2]
    out = resize_bilinear_tf1(image, 4)  # source x = 0, .5, 1, 1.5 (clamped) -> 0, 5, 10, 10
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    same = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(resize_bilinear_tf1(same, 8), same)


@pytest.fixture(scope="module")
def inception() -> FIDInceptionExtractor:
    with pytest.warns(UserWarning, match="RANDOM"):
        return build_extractor("inception", weights=None)


def test_inception_random_weights_shapes_and_grayscale(inception: FIDInceptionExtractor) -> None:
    rgb = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8)
    out = inception.forward_all(rgb)
    assert out.pool.shape == (2, 2048) and out.spatial.shape == (2, 2023) and out.logits.shape == (2, 1008)
    assert inception.name == "inception" and inception.dim == 2048
    assert torch.isfinite(out.pool).all() and out.pool.std() > 0
    torch.testing.assert_close(inception(rgb), out.pool)
    gray = rgb[:, :1]
    torch.testing.assert_close(inception(gray), inception(gray.expand(-1, 3, -1, -1)))
    with pytest.raises(ValueError, match="uint8"):
        inception(rgb.float())
    with pytest.raises(ValueError, match="NCHW"):
        inception(rgb.permute(0, 2, 3, 1))


def test_inception_stages_match_the_network_forward(inception: FIDInceptionExtractor) -> None:
    """forward_all walks the stages by hand: its pool features must give the network's own logits."""
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = inception.forward_all(images)
    with torch.no_grad():
        reference_logits = inception.net(inception.preprocess(images))
    torch.testing.assert_close(out.logits + inception.net.fc.bias, reference_logits, rtol=1e-4, atol=1e-4)


def test_inception_weights_load_from_file_in_the_fid_layout(inception: FIDInceptionExtractor, tmp_path) -> None:
    state = {k: v for k, v in inception.net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["Mixed_6d.branch1x1.conv.weight"] = state["Mixed_6d.branch1x1.conv.weight"] * 0.5
    path = tmp_path / "pt_inception.pth"
    torch.save(state, path)
    loaded = FIDInceptionExtractor(weights=str(path))
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    assert not torch.allclose(loaded.forward_all(images).spatial, inception.forward_all(images).spatial)
    torch.testing.assert_close(loaded.net.state_dict()["Mixed_6d.branch1x1.conv.weight"],
                               state["Mixed_6d.branch1x1.conv.weight"])
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="layout"):
        FIDInceptionExtractor(weights=str(bad))
    with pytest.raises(FileNotFoundError):
        FIDInceptionExtractor(weights=str(tmp_path / "missing.pth"))


def test_dinov2_extractor_from_local_directory(tmp_path) -> None:
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    Dinov2Model(config).save_pretrained(tmp_path / "dino")
    extractor = build_extractor("dinov2", model=str(tmp_path / "dino"), image_size=28)
    images = torch.randint(0, 256, (3, 1, 20, 20), dtype=torch.uint8)
    feats = extractor(images)
    assert extractor.name == "dinov2" and extractor.dim == 32 and feats.shape == (3, 32)
    assert not torch.allclose(feats[0], feats[1])


def test_clip_extractor_random_image_tower() -> None:
    extractor = build_extractor("clip", model_name="ViT-S-32", pretrained=None)
    feats = extractor(torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8))
    assert feats.shape == (2, extractor.dim) and torch.isfinite(feats).all()


def test_register_extractor_hook() -> None:
    class MeanColour:
        name, dim = "mean_colour", 3

        def __call__(self, images: torch.Tensor) -> torch.Tensor:
            return images.float().mean(dim=(2, 3))

        def to(self, device: str | torch.device) -> "MeanColour":
            return self

    register_extractor("test_mean_colour", lambda **_: MeanColour(), overwrite=True)
    assert "test_mean_colour" in extractors.available_extractors()
    extractor = build_extractor("test_mean_colour", device="cpu")
    assert isinstance(extractor, extractors.FeatureExtractor)
    with pytest.raises(ValueError, match="already registered"):
        register_extractor("test_mean_colour", lambda **_: MeanColour())
    with pytest.raises(ValueError, match="unknown feature extractor 'nope'"):
        build_extractor("nope")


def test_inception_weights_load_through_storage_urls(inception: FIDInceptionExtractor) -> None:
    """Any storage URL (memory:// here) in the torch or safetensors format; anything else is refused clearly."""
    import io

    from safetensors.torch import save as save_safetensors

    from deepflow.platform.eval.inception import load_state_dict_from_location
    from deepflow.storage import write_url_bytes

    state = {k: v.contiguous() for k, v in inception.net.state_dict().items() if not k.endswith("num_batches_tracked")}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_url_bytes("memory://inception-weights/pt_inception.pth", buffer.getvalue())
    write_url_bytes("memory://inception-weights/inception.safetensors", save_safetensors(state))
    for url in ("memory://inception-weights/pt_inception.pth", "memory://inception-weights/inception.safetensors"):
        loaded = load_state_dict_from_location(url)
        assert loaded.keys() == state.keys()
        torch.testing.assert_close(loaded["fc.weight"], state["fc.weight"])
    write_url_bytes("memory://inception-weights/junk.pth", b"not a pickle")
    with pytest.raises(ValueError, match="junk.pth: not a torch weights file"):
        load_state_dict_from_location("memory://inception-weights/junk.pth")
    with pytest.raises(FileNotFoundError):
        load_state_dict_from_location("memory://inception-weights/missing.pth")
