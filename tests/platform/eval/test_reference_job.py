"""The reference job (reference batches from a dataset source or a shard set, ADM .npz with per-extractor
statistics), the evaluator using those statistics, and finding the Inception weights (path, env var, caches; one
error line when there are none)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deepflow.configuration import ConfigError
from deepflow.platform.eval import job, reference_job
from deepflow.platform.eval.config import AUTO_INCEPTION, EvaluateConfig
from deepflow.platform.eval.evaluator import ReferenceBatch, evaluate_batch, extract_features, read_npz_array
from deepflow.platform.eval.extractors import build_extractor
from deepflow.platform.eval.inception import (
    INCEPTION_WEIGHTS_FILE,
    PYTORCH_FID_WEIGHTS_URL,
    TORCH_FIDELITY_WEIGHTS_FILE,
    InceptionWeightsNotFoundError,
    find_inception_weights,
)
from deepflow.platform.eval.metrics import feature_statistics
from deepflow.platform.eval.reference_job import StreamingMoments
from tests.integration.test_train_support import make_digits_dataset
from tests.platform.eval.conftest import write_npz

ROOT = Path(__file__).resolve().parents[3]
EVALUATE = ROOT / "jobs" / "evaluate.py"


def _environment(cache: Path, **extra: str) -> dict[str, str]:
    environment = {**os.environ, "DEEPFLOW_CACHE": str(cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                   "DS_ACCELERATOR": "cpu", **extra}
    environment.pop("DEEPFLOW_DEBUG", None)
    return environment


def _python(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def _digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as the digits source gives them: uint8 [1797, 8, 8], labels [1797]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8), digits.target


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A committed pixel shard set of the 1797 digits (8 shards of 225, uint8 [1, 8, 8])."""
    url = tmp_path_factory.mktemp("digits-shards") / "data"
    make_digits_dataset(str(url))
    return url


@pytest.fixture
def no_inception_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME and DEEPFLOW_CACHE in an empty folder, no $DEEPFLOW_INCEPTION_WEIGHTS / TORCH_HOME: nothing to find."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DEEPFLOW_CACHE", str(home / "deepflow-cache"))
    for name in ("DEEPFLOW_INCEPTION_WEIGHTS", "TORCH_HOME", "XDG_CACHE_HOME", "DEEPFLOW_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    return home


# ------------------------------------------------------------------------------------------------ statistics
def test_streaming_moments_equal_feature_statistics() -> None:
    """Batches of rows with a large common offset: the same mean and (unbiased) covariance as np.cov of all rows."""
    rng = np.random.default_rng(0)
    feats = 50.0 + rng.normal(size=(103, 7)) @ rng.normal(size=(7, 7))
    moments = StreamingMoments()
    for start in range(0, len(feats), 10):
        moments.update(torch.from_numpy(feats[start : start + 10]))
    mu, sigma = moments.result()
    expected_mu, expected_sigma = feature_statistics(feats)
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        StreamingMoments().result()


# ------------------------------------------------------------------------------------------------ source path
def test_reference_from_the_digits_source_then_evaluate_with_it(
    digits_cache: Path, digits_batches: dict[str, Path], tmp_path: Path
) -> None:
    """Real processes: the reference job on the digits source (a shuffled subset), then jobs/evaluate.py --reference
    uses its classifier statistics (mu_classifier / sigma_classifier)."""
    out = tmp_path / "refs" / "digits-reference.npz"
    env = _environment(digits_cache)
    built = _python(["-m", "deepflow.platform.eval.reference_job", "--source", "digits", "--resolution", "8",
                     "--num-images", "600", "--shuffle-seed", "3", "--extractor", "classifier:dataset=digits",
                     "--out", str(out), "--no-progress"], env)
    assert built.returncode == 0, built.stderr
    summary = json.loads(built.stdout)
    assert summary["num_images"] == 600 and summary["arrays"]["arr_0"] == [600, 8, 8, 1]
    with np.load(out) as reference:
        assert set(reference.files) == {"arr_0", "mu_classifier", "sigma_classifier", "meta"}
        images, mu, sigma = reference["arr_0"], reference["mu_classifier"], reference["sigma_classifier"]
        meta = json.loads(str(reference["meta"]))
    digits, _ = _digits_uint8()
    order = np.random.default_rng(3).permutation(len(digits))[:600]
    np.testing.assert_array_equal(images[..., 0], digits[order])  # the seeded subset, in that order
    assert meta["input"]["source"] == {"kind": "digits"} and meta["statistics"]["classifier"]["options"] == {
        "dataset": "digits"}

    classifier = build_extractor("classifier", dataset="digits", cache_dir=str(digits_cache))
    expected_mu, expected_sigma = feature_statistics(extract_features(images, classifier, progress=False)["feats"])
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-5, atol=1e-6)

    results_path = tmp_path / "eval.json"
    evaluated = _python([str(EVALUATE), "--samples", str(digits_batches["real"]), "--reference", str(out),
                         "--extractor", "classifier:dataset=digits", "--fd-method", "eigh", "--out",
                         str(results_path), "--no-progress"], env)
    assert evaluated.returncode == 0, evaluated.stderr
    results = json.loads(results_path.read_text())
    assert results["reference_classifier"] == f"{out} (mu_classifier, sigma_classifier)"
    # the statistics give the FD the reference's own images give
    from_images = evaluate_batch(str(digits_batches["real"]), [classifier], ReferenceBatch(images=images),
                                 fd_method="eigh", progress=False)
    assert results["fd_classifier"] == pytest.approx(from_images["fd_classifier"], rel=1e-4)
    noise = evaluate_batch(str(digits_batches["noise"]), [classifier], ReferenceBatch.load(str(out)),
                           fd_method="eigh", progress=False)
    assert math.isfinite(results["fd_classifier"]) and results["fd_classifier"] < 0.25 * noise["fd_classifier"]


# ------------------------------------------------------------------------------------------------ shard path
@pytest.mark.filterwarnings("ignore:FID Inception-v3 built with RANDOM weights")
def test_reference_from_pixel_shards_with_classifier_and_random_inception(
    digits_cache: Path, digits_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEEPFLOW_CACHE", str(digits_cache))
    out = tmp_path / "shard-reference.npz"
    status = reference_job.main(["--shards", str(digits_shards), "--num-images", "10", "--batch-size", "4",
                                 "--extractor", "classifier:dataset=digits", "--random-inception-for-tests",
                                 "--out", str(out), "--no-progress"])
    assert status == 0
    digits, _ = _digits_uint8()
    with np.load(out) as reference:
        assert set(reference.files) == {"arr_0", "mu", "sigma", "mu_s", "sigma_s", "mu_classifier", "sigma_classifier",
                                        "meta"}
        np.testing.assert_array_equal(reference["arr_0"][..., 0], digits[:10])  # shards in manifest order
        assert reference["mu"].shape == (2048,) and reference["sigma_s"].shape == (2023, 2023)
        assert reference["sigma"].dtype == np.float64 and reference["mu_classifier"].shape == (128,)
        assert json.loads(str(reference["meta"]))["input"]["kind"] == "pixel"
    inception = build_extractor("inception", weights=None)

    # the evaluator takes mu/sigma/mu_s/sigma_s (Inception) and mu_classifier (classifier) from it: the same images
    # give FD ~ 0 (the statistics are those of the images)
    classifier = build_extractor("classifier", dataset="digits", cache_dir=str(digits_cache))
    loaded = ReferenceBatch.load(str(out), progress=False)
    statistics_only = ReferenceBatch(stats=loaded.stats, url=loaded.url)  # not the images: no Inception pass on them
    results = evaluate_batch(digits[:10, :, :, None], [inception, classifier], statistics_only, fd_method="eigh",
                             progress=False)
    assert results["fid"] == pytest.approx(0.0, abs=1e-3) and results["sfid"] == pytest.approx(0.0, abs=1e-3)
    assert results["fd_classifier"] == pytest.approx(0.0, abs=1e-3)
    assert results["reference_classifier"] == f"{out} (mu_classifier, sigma_classifier)"


def test_float16_pixel_shards_pattern_and_images_only(tmp_path: Path) -> None:
    """float16 [-1, 1] pixels come back as the exact uint8 values; a shard pattern picks its shards."""
    from deepflow.data_pipeline.arrays import write_array_dataset
    from deepflow.data_pipeline.encoders import to_unit_range

    digits, labels = _digits_uint8()
    pixels = to_unit_range(torch.from_numpy(digits[:300, None])).to(torch.float16).numpy()
    write_array_dataset(str(tmp_path / "f16"), {"pixels": pixels}, labels[:300], kind="pixel", num_classes=10,
                        samples_per_shard=100)
    out = tmp_path / "images-only.npz"
    assert reference_job.main(["--shards", str(tmp_path / "f16" / "shard-0000-00000{1..2}.tar"), "--out", str(out),
                               "--no-progress"]) == 0
    with np.load(out) as reference:
        assert set(reference.files) == {"arr_0", "meta"}
        np.testing.assert_array_equal(reference["arr_0"][..., 0], digits[100:300])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--shards", "{vae}"], "error: shards: {vae}: a vae (latent) shard set without kept images cannot give "
                                "reference images"),
        (["--shards", "{tmp}/missing"], "error: shards: "),
        (["--shards", "{digits}/shard-9999-*.tar"], "error: shards: {digits}/shard-9999-*.tar: the pattern matches no "
                                                   "shard"),
        (["--source", "fashion_mnist:root={tmp}/nowhere"], "error: source: "),
        (["--shards", "{digits}", "--extractor", "classifier:dataset=cifar10"],
         "error: extractors.0: no quality classifier recipe for dataset 'cifar10'"),
        (["--out", "{tmp}/x.npz"], "error: source: give exactly one input"),
        (["--source", "digits", "--shards", "{digits}"], "error: source: give exactly one input"),
        (["--source", "digits", "--no-images"], "error: images: nothing to write"),
        (["--source", "digits:bogus=1"], "error: source.bogus: "),
    ],
)
def test_mistakes_are_one_line(
    argv: list[str], expected: str, digits_shards: Path, digits_cache: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from deepflow.data_pipeline.arrays import write_array_dataset

    monkeypatch.setenv("DEEPFLOW_CACHE", str(digits_cache))
    monkeypatch.delenv("DEEPFLOW_DEBUG", raising=False)
    latent = np.zeros((4, 4, 2, 2), np.float16)
    write_array_dataset(str(tmp_path / "vae"), {"mean": latent, "std": latent}, np.zeros(4, np.int64), kind="vae")
    names = {"tmp": str(tmp_path), "vae": str(tmp_path / "vae"), "digits": str(digits_shards)}
    argv = [arg.format(**names) for arg in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "ref.npz")]
    assert reference_job.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected.format(**names)), err
    assert not (tmp_path / "ref.npz").exists()


# ------------------------------------------------------------------------------------------------ ReferenceBatch
def test_reference_statistics_per_extractor(tmp_path: Path) -> None:
    """mu_<name>/sigma_<name> serve that extractor without images; a wrong size is refused; no images and no
    statistics is refused when loading."""

    class MeanColour:
        name, dim = "mean_colour", 1

        def __call__(self, images: torch.Tensor) -> torch.Tensor:
            return images.float().mean(dim=(1, 2, 3))[:, None]

        def to(self, device: str) -> "MeanColour":
            return self

    samples = np.random.default_rng(0).integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
    mu, sigma = feature_statistics(samples.reshape(20, -1).astype(np.float64).mean(1, keepdims=True))
    write_npz(str(tmp_path / "stats.npz"), mu_mean_colour=mu, sigma_mean_colour=sigma)
    reference = ReferenceBatch.load(str(tmp_path / "stats.npz"))
    assert reference.images is None and reference.statistics("mean_colour", 1) is not None
    assert reference.statistics("other") is None
    results = evaluate_batch(samples, [MeanColour()], reference, progress=False)
    assert results["fd_mean_colour"] == pytest.approx(0.0, abs=1e-6)
    assert results["reference_mean_colour"] == f"{tmp_path / 'stats.npz'} (mu_mean_colour, sigma_mean_colour)"

    write_npz(str(tmp_path / "wrong.npz"), mu_mean_colour=np.zeros(3), sigma_mean_colour=np.eye(3))
    with pytest.raises(ValueError, match=r"mu_mean_colour \(3,\) / sigma_mean_colour \(3, 3\) do not fit"):
        evaluate_batch(samples, [MeanColour()], str(tmp_path / "wrong.npz"), progress=False)
    write_npz(str(tmp_path / "half.npz"), mu_mean_colour=mu)  # no sigma: not statistics
    with pytest.raises(ValueError, match="neither images nor statistics"):
        ReferenceBatch.load(str(tmp_path / "half.npz"))
    assert read_npz_array(str(tmp_path / "stats.npz"), "mu_mean_colour").shape == (1,)


# ------------------------------------------------------------------------------------------------ Inception weights
def test_inception_weights_lookup_order(no_inception_weights: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """explicit path > $DEEPFLOW_INCEPTION_WEIGHTS > $DEEPFLOW_CACHE file > torch hub cache (either file name)."""
    home = no_inception_weights
    hub = home / ".cache" / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / TORCH_FIDELITY_WEIGHTS_FILE).write_bytes(b"w")
    assert find_inception_weights() == str(hub / TORCH_FIDELITY_WEIGHTS_FILE)
    (hub / INCEPTION_WEIGHTS_FILE).write_bytes(b"w")
    assert find_inception_weights(AUTO_INCEPTION) == str(hub / INCEPTION_WEIGHTS_FILE)
    cache = home / "deepflow-cache"
    cache.mkdir()
    (cache / INCEPTION_WEIGHTS_FILE).write_bytes(b"w")
    assert find_inception_weights() == str(cache / INCEPTION_WEIGHTS_FILE)
    named = tmp_path / "elsewhere.pth"
    named.write_bytes(b"w")
    monkeypatch.setenv("DEEPFLOW_INCEPTION_WEIGHTS", str(named))
    assert find_inception_weights() == str(named)
    assert find_inception_weights(str(cache / INCEPTION_WEIGHTS_FILE)) == str(cache / INCEPTION_WEIGHTS_FILE)
    assert find_inception_weights(PYTORCH_FID_WEIGHTS_URL) == PYTORCH_FID_WEIGHTS_URL  # fetched (cached) on use
    with pytest.raises(InceptionWeightsNotFoundError, match=r"^Inception weights /no/such\.pth: not found; download"):
        find_inception_weights("/no/such.pth")
    monkeypatch.setenv("DEEPFLOW_INCEPTION_WEIGHTS", "/no/such.pth")
    with pytest.raises(InceptionWeightsNotFoundError, match=r"^\$DEEPFLOW_INCEPTION_WEIGHTS=/no/such\.pth: not found"):
        find_inception_weights()


def test_inception_auto_in_the_evaluate_config(no_inception_weights: Path) -> None:
    """--inception-weights alone (or inception: auto) finds the weights; a path stays a path."""
    cfg = job.load_config(["--samples", "s.npz", "--reference", "r.npz", "--inception-weights"])
    assert cfg.inception == AUTO_INCEPTION
    assert job.load_config(["--samples", "s.npz", "--reference", "r.npz", "--inception-weights", "/w/i.pth",
                            ]).inception == "/w/i.pth"
    with pytest.raises(InceptionWeightsNotFoundError, match="no FID Inception-v3 weights found"):
        cfg.inception_weights()
    cache = no_inception_weights / "deepflow-cache"
    cache.mkdir()
    (cache / INCEPTION_WEIGHTS_FILE).write_bytes(b"w")
    assert EvaluateConfig(samples="s.npz", reference="r.npz", inception="auto").inception_weights() == str(
        cache / INCEPTION_WEIGHTS_FILE)
    with pytest.raises(ConfigError, match="^reference: Inception metrics"):
        job.load_config(["--samples", "s.npz", "--inception-weights"])


def test_missing_inception_weights_is_one_line_saying_where_to_get_them(
    no_inception_weights: Path, digits_batches: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """jobs/evaluate.py (a real process) and the reference job: ``error: inception: ...`` with the download URL and
    the file to create, exit status 2, no traceback."""
    target = no_inception_weights / "deepflow-cache" / INCEPTION_WEIGHTS_FILE
    env = _environment(no_inception_weights / "deepflow-cache", HOME=str(no_inception_weights))
    done = _python([str(EVALUATE), "--samples", str(digits_batches["real"]), "--reference",
                    str(digits_batches["reference"]), "--inception-weights", "--no-progress"], env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: inception: no FID Inception-v3 weights found")
    assert PYTORCH_FID_WEIGHTS_URL in lines[0] and f"to {target}" in lines[0]

    status = reference_job.main(["--source", "digits", "--resolution", "8", "--inception-weights",
                                 str(tmp_path / "missing.pth"), "--out", str(tmp_path / "r.npz"), "--no-progress"])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: inception: Inception weights {tmp_path / 'missing.pth'}: "
                                               "not found; download " + PYTORCH_FID_WEIGHTS_URL), err


def test_the_inception_extractor_finds_its_weights(no_inception_weights: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``inception:weights=auto`` (--extractor) loads the file the lookup finds ($DEEPFLOW_INCEPTION_WEIGHTS here)."""
    with pytest.warns(UserWarning, match="RANDOM"):
        random = build_extractor("inception", weights=None)
    state = random.net.state_dict()
    state["fc.weight"] = state["fc.weight"] + 1.0
    torch.save(state, tmp_path / "weights.pth")
    monkeypatch.setenv("DEEPFLOW_INCEPTION_WEIGHTS", str(tmp_path / "weights.pth"))
    found = build_extractor("inception", weights=AUTO_INCEPTION)
    torch.testing.assert_close(found.net.fc.weight, state["fc.weight"])
