"""The evaluate job end to end (in process) on small ADM .npz batches with a randomly initialised FID Inception-v3."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from deepflow.configuration import ConfigError
from deepflow.platform.eval import job
from deepflow.platform.eval.evaluator import ReferenceBatch, evaluate_batch, extract_features, iter_npz_batches
from deepflow.storage import write_url_bytes


def _images(seed: int, n: int, size: int = 32) -> np.ndarray:
    """uint8 NHWC: smooth random colour fields (different seeds -> different distributions)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, 4, 4, 3)).astype(np.float32)
    return np.repeat(np.repeat(base, size // 4, axis=1), size // 4, axis=2).astype(np.uint8)


def _write_npz(url: str, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_url_bytes(url, buffer.getvalue())


def test_iter_npz_batches_streams_every_row(tmp_path) -> None:
    array = np.arange(8 * 2 * 3, dtype=np.uint8).reshape(8, 2, 3)
    _write_npz(str(tmp_path / "a.npz"), arr_0=array)
    batches = list(iter_npz_batches(str(tmp_path / "a.npz"), batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 2]
    np.testing.assert_array_equal(np.concatenate(batches), array)
    with pytest.raises(ValueError, match="no array 'mu'"):
        next(iter_npz_batches(str(tmp_path / "a.npz"), key="mu"))


@pytest.fixture(scope="module")
def job_run(tmp_path_factory):
    """Run the job once: samples on an fsspec memory:// URL, reference on disk; JSON + TensorBoard outputs."""
    tmp = tmp_path_factory.mktemp("evaluate")
    samples_url = "memory://eval-test/samples.npz"
    _write_npz(samples_url, arr_0=_images(0, 5))
    _write_npz(str(tmp / "ref.npz"), arr_0=_images(1, 5))
    from transformers import Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(tmp / "dino")
    argv = [
        "--samples", samples_url, "--reference", str(tmp / "ref.npz"), "--random-inception-for-tests",
        "--out", str(tmp / "out" / "metrics.json"), "--tensorboard", str(tmp / "tb"), "--step", "7",
        "--batch-size", "3", "--fd-method", "eigh", "--extractor", f"dinov2:model={tmp / 'dino'},image_size=28",
    ]
    with pytest.warns(UserWarning, match="RANDOM"):
        assert job.main(argv) == 0
    results = json.loads((tmp / "out" / "metrics.json").read_text())
    return tmp, samples_url, results


@pytest.mark.slow
def test_evaluate_job_writes_all_adm_metrics(job_run) -> None:
    tmp, _, results = job_run
    written = json.loads((tmp / "out" / "metrics.json").read_text())
    assert written == results
    for key in ("fid", "sfid", "inception_score", "precision", "recall", "fd_dinov2"):
        assert math.isfinite(written[key]), key
    assert written["num_samples"] == 5 and written["step"] == 7
    assert written["fid"] > 0 and written["sfid"] > 0 and written["fd_dinov2"] > 0
    assert 1.0 <= written["inception_score"] <= 1008
    assert 0.0 <= written["precision"] <= 1.0 and 0.0 <= written["recall"] <= 1.0
    assert "RANDOM" in written["inception_weights"]

    events = EventAccumulator(str(tmp / "tb"))
    events.Reload()
    assert {"eval/fid", "eval/sfid", "eval/inception_score", "eval/precision", "eval/recall"} <= set(
        events.Tags()["scalars"]
    )
    (fid_event,) = events.Scalars("eval/fid")
    assert fid_event.step == 7 and fid_event.value == pytest.approx(written["fid"], rel=1e-5)


@pytest.mark.slow
def test_statistics_only_reference_and_identical_batches(job_run, tmp_path) -> None:
    """A reference holding only mu/sigma/mu_s/sigma_s is used as is: identical statistics -> FID = sFID = 0."""
    from deepflow.platform.eval.extractors import build_extractor
    from deepflow.platform.eval.metrics import feature_statistics

    _, samples_url, _ = job_run
    with pytest.warns(UserWarning, match="RANDOM"):
        inception = build_extractor("inception", weights=None)
    feats = extract_features(samples_url, inception, batch_size=5)
    mu, sigma = feature_statistics(feats["feats"])
    mu_s, sigma_s = feature_statistics(feats["spatial"])
    _write_npz(str(tmp_path / "stats.npz"), mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    reference = ReferenceBatch.load(str(tmp_path / "stats.npz"))
    assert reference.images is None
    results = evaluate_batch(samples_url, [inception], reference, fd_method="eigh", precision_recall_for=("inception",))
    assert results["fid"] == pytest.approx(0.0, abs=1e-3)
    assert results["sfid"] == pytest.approx(0.0, abs=1e-3)
    assert "precision" not in results and "recall" not in results  # no reference images

    with pytest.raises(ValueError, match="neither images"):
        _write_npz(str(tmp_path / "empty.npz"), labels=np.zeros(3))
        ReferenceBatch.load(str(tmp_path / "empty.npz"))


def test_evaluate_job_rejects_float_samples_and_bad_extractor_spec(tmp_path) -> None:
    from deepflow.platform.eval.evaluator import nhwc_uint8_to_nchw

    with pytest.raises(ValueError, match="uint8"):
        nhwc_uint8_to_nchw(np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="NHWC"):
        nhwc_uint8_to_nchw(np.zeros((2, 3, 8, 8), dtype=np.uint8))
    assert job.parse_extractor_spec("clip:model_name=ViT-L-14,pretrained=/w/c.pt") == (
        "clip", {"model_name": "ViT-L-14", "pretrained": "/w/c.pt"}
    )
    assert job.parse_extractor_spec("dinov2:model=/w/d,image_size=224") == ("dinov2", {"model": "/w/d", "image_size": 224})
    with pytest.raises(ConfigError, match="key=value"):
        job.parse_extractor_spec("dinov2:model")
