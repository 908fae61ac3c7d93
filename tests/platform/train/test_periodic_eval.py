"""Periodic evaluation's reference statistics follow the reference-file convention of the evaluator: Inception's
ADM ``mu``/``sigma``, ``mu_<extractor>``/``sigma_<extractor>`` for the others, checked against the feature size."""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from deepflow.platform.train.periodic_eval import Evaluator


class _ThreeFeatures:
    name, dim = "classifier", 3


def _evaluator(reference: Path) -> Evaluator:
    evaluator = Evaluator.__new__(Evaluator)  # only the reference path is exercised: no model, no process group
    evaluator.extractor = _ThreeFeatures()
    evaluator.reference_storage_options = {}
    evaluator.cfg = types.SimpleNamespace(eval=types.SimpleNamespace(reference=str(reference), reference_samples=8))
    return evaluator


def test_reference_statistics_are_those_of_the_configured_extractor(tmp_path: Path) -> None:
    np.savez(tmp_path / "both.npz", mu=np.zeros(2048), sigma=np.eye(2048), mu_classifier=np.ones(3),
             sigma_classifier=2 * np.eye(3))
    mu, sigma = _evaluator(tmp_path / "both.npz")._reference_stats()
    assert mu.tolist() == [1.0, 1.0, 1.0] and np.array_equal(sigma, 2 * np.eye(3))

    np.savez(tmp_path / "inception-only.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="no images and no mu_classifier/sigma_classifier for the classifier"):
        _evaluator(tmp_path / "inception-only.npz")._reference_stats()

    np.savez(tmp_path / "wrong-size.npz", mu_classifier=np.ones(5), sigma_classifier=np.eye(5))
    with pytest.raises(ValueError, match="do not fit the classifier extractor's 3 features"):
        _evaluator(tmp_path / "wrong-size.npz")._reference_stats()
