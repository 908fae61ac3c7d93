"""jobs/evaluate.py with any extractor alone (the small-data classifier here), run as a real process; one-line
errors with exit status 2; sample batches and results on S3."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepflow.platform.eval import job
from deepflow.platform.eval.evaluator import evaluate_batch, read_sample_labels
from deepflow.platform.eval.quality import ClassifierQuality
from deepflow.storage import read_url_json
from tests.platform.eval.conftest import write_npz

ROOT = Path(__file__).resolve().parents[3]
EVALUATE = ROOT / "jobs" / "evaluate.py"


def _run(args: list[str], cache: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python jobs/evaluate.py *args`` with the digits classifier cache; stdout/stderr captured."""
    environment = {**os.environ, "DEEPFLOW_CACHE": str(cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    environment.pop("DEEPFLOW_DEBUG", None)
    environment.update(env)
    return subprocess.run([sys.executable, str(EVALUATE), *args], capture_output=True, text=True, timeout=300,
                          env=environment, cwd=ROOT)


@pytest.fixture(scope="module")
def digits_quality(digits_cache: Path) -> ClassifierQuality:
    return ClassifierQuality.for_dataset("digits", cache_dir=digits_cache)


# ------------------------------------------------------------------------------------------- the real process
def test_classifier_alone_gives_fd_and_class_accuracy(digits_cache: Path, digits_batches: dict[str, Path],
                                                       tmp_path: Path) -> None:
    out = tmp_path / "eval" / "results.json"
    done = _run(["--samples", str(digits_batches["real"]), "--extractor", "classifier:dataset=digits",
                 "--out", str(out), "--no-progress"], digits_cache)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert results == json.loads(done.stdout)
    assert math.isfinite(results["fd_classifier"]) and results["fd_classifier"] >= 0
    assert results["class_accuracy"] > 0.85  # real held-out digits, their own labels
    assert results["num_samples"] == len(read_sample_labels(str(digits_batches["real"])))
    assert "digits held-out split" in results["reference_classifier"] and results["reference"] is None
    assert "fid" not in results and "inception_weights" not in results  # no Inception unless asked for
    assert "Traceback" not in done.stderr


def test_the_same_run_from_a_config_file_with_overrides(digits_cache: Path, digits_batches: dict[str, Path],
                                                        tmp_path: Path) -> None:
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"samples: {digits_batches['noise']}\n"
        "extractors:\n  - kind: classifier\n    options: {dataset: digits}\n"
        "batch_size: 7\nprogress: false\n"
    )
    out = tmp_path / "results.json"
    done = _run(["--config", str(config), "--set", f"samples={digits_batches['real']}", "--set", f"out={out}",
                 "--set", "step=12", "--set", "fd_method=eigh"], digits_cache)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert results["step"] == 12 and results["samples"] == str(digits_batches["real"])
    assert results["class_accuracy"] > 0.85 and math.isfinite(results["fd_classifier"])


def test_unknown_extractor_kind_is_one_error_line_and_status_2(digits_cache: Path,
                                                                 digits_batches: dict[str, Path]) -> None:
    done = _run(["--samples", str(digits_batches["real"]), "--extractor", "clasifier:dataset=digits"], digits_cache)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: extractors.0.kind: unknown feature extractor 'clasifier'")
    assert "registered: classifier" in lines[0]
    debug = _run(["--samples", str(digits_batches["real"]), "--extractor", "clasifier"], digits_cache,
                 DEEPFLOW_DEBUG="1")
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # DEEPFLOW_DEBUG=1: the traceback


# ------------------------------------------------------------------------------------------- mistakes, in process
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--samples", "{tmp}/missing.npz"], "error: samples: {tmp}/missing.npz: not found"),
        (["--samples", "{tmp}/not-an.npz"], "error: samples: {tmp}/not-an.npz: not a readable .npz file"),
        (["--samples", "{tmp}/floats.npz"], "error: samples: {tmp}/floats.npz: arr_0 must be uint8 NHWC images"),
        (["--samples", "{tmp}/objects.npz"], "error: samples: {tmp}/objects.npz:arr_0: object arrays are not"),
        (["--samples", "{real}", "--reference", "{tmp}/missing.npz"], "error: reference: {tmp}/missing.npz: not found"),
        (["--samples", "{real}", "--set", "extractors=[{{kind: classifier, options: {{dataset: cifar10}}}}]"],
         "error: extractors.0: no quality classifier recipe for dataset 'cifar10'"),
        (["--samples", "{real}", "--extractor", "classifier:datset=digits"],
         "error: extractors.0: feature extractor 'classifier': unknown option(s) 'datset'"),
        (["--samples", "{real}", "--clip-model", "ViT-B-32"],
         "error: clip.captions: {tmp}/samples/captions.txt: not found (the default: captions.txt beside the samples)"),
    ],
)
def test_mistakes_are_one_line_naming_the_field_or_url(
    args: list[str], expected: str, digits_cache: Path, digits_batches: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DEEPFLOW_CACHE", str(digits_cache))
    monkeypatch.delenv("DEEPFLOW_DEBUG", raising=False)
    (tmp_path / "not-an.npz").write_text("hello")
    write_npz(str(tmp_path / "floats.npz"), arr_0=np.zeros((4, 8, 8, 1), np.float32))
    np.savez(tmp_path / "objects.npz", arr_0=np.array([{"a": 1}, None], dtype=object))
    names = {"tmp": str(tmp_path), "real": str(digits_batches["real"])}
    argv = [arg.format(**names) for arg in args]
    if not {"--set", "--extractor", "--clip-model"} & set(argv):
        argv += ["--extractor", "classifier:dataset=digits"]
    if "--clip-model" in argv:
        (tmp_path / "samples").mkdir()
        write_npz(str(tmp_path / "samples" / "samples.npz"), arr_0=np.zeros((2, 8, 8, 3), np.uint8))
        argv[argv.index("--samples") + 1] = str(tmp_path / "samples" / "samples.npz")
    assert job.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected.format(**names)), err


# ------------------------------------------------------------------------------------------- the evaluator
def test_classifier_metrics_separate_real_from_noise_and_skip_text_labels(
    digits_quality: ClassifierQuality, digits_batches: dict[str, Path]
) -> None:
    def evaluate(name: str, **kwargs: object) -> dict:
        url = str(digits_batches[name])
        return evaluate_batch(url, [digits_quality], labels=read_sample_labels(url), progress=False, **kwargs)

    real, noise, text = evaluate("real"), evaluate("noise"), evaluate("text")
    assert real["class_accuracy"] > 0.85 and noise["class_accuracy"] < 0.3
    assert real["fd_classifier"] < 0.25 * noise["fd_classifier"]
    assert "class_accuracy" not in text and text["fd_classifier"] == pytest.approx(real["fd_classifier"])
    # against an explicit reference batch of the same images as the classifier's own reference: the same FD
    against = evaluate("real", reference=str(digits_batches["reference"]), fd_method="eigh")
    assert against["reference_classifier"] == str(digits_batches["reference"])
    assert against["fd_classifier"] == pytest.approx(real["fd_classifier"], rel=1e-4)
    with pytest.raises(ValueError, match="label 12 is outside the classifier extractor's 10 classes"):
        evaluate_batch(str(digits_batches["real"]), [digits_quality], progress=False,
                       labels=np.full(len(read_sample_labels(str(digits_batches["real"]))), 12))


def test_extractor_without_a_reference_of_its_own_needs_a_reference(digits_batches: dict[str, Path]) -> None:
    import torch

    class MeanColour:
        name, dim = "mean_colour", 1

        def __call__(self, images: torch.Tensor) -> torch.Tensor:
            return images.float().mean(dim=(1, 2, 3))[:, None]

        def to(self, device: str) -> "MeanColour":
            return self

    with pytest.raises(ValueError, match="^reference: the 'mean_colour' extractor has no reference of its own"):
        evaluate_batch(str(digits_batches["real"]), [MeanColour()], progress=False)
    with pytest.raises(ValueError, match="^extractors: more than one extractor named"):
        evaluate_batch(str(digits_batches["real"]), [MeanColour(), MeanColour()], progress=False)


def test_samples_and_results_on_s3(s3_server, digits_cache: Path, digits_batches: dict[str, Path],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3_server.make_bucket("eval-cli-samples")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)  # before any storage call (it resolves the endpoint)
    with np.load(digits_batches["real"]) as real:
        write_npz(f"{bucket}/run/samples/samples.npz", arr_0=real["arr_0"], arr_1=real["arr_1"])
    monkeypatch.setenv("DEEPFLOW_CACHE", str(digits_cache))
    status = job.main(["--samples", f"{bucket}/run/samples/samples.npz", "--extractor", "classifier:dataset=digits",
                       "--out", f"{bucket}/run/eval/results.json", "--tensorboard", f"{bucket}/run/tb", "--step", "3",
                       "--no-progress"])
    assert status == 0
    results = read_url_json(f"{bucket}/run/eval/results.json")
    assert results["class_accuracy"] > 0.85 and results["step"] == 3
    listed = s3_server.client().list_objects_v2(Bucket="eval-cli-samples", Prefix="run/tb/")
    keys = [item["Key"] for item in listed.get("Contents", [])]
    assert len(keys) == 1 and keys[0].startswith("run/tb/events.out.tfevents."), keys
