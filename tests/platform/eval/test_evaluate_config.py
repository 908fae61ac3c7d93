"""EvaluateConfig: flags are sugar for fields, --config files and --set overrides; errors name the field."""
from __future__ import annotations

from pathlib import Path

import pytest

from deepflow.configuration import ConfigError, load_validated
from deepflow.platform.eval.config import RANDOM_INCEPTION, EvaluateConfig
from deepflow.platform.eval.job import load_config


def test_every_flag_sets_its_field() -> None:
    cfg = load_config([
        "--samples", "s3://b/s.npz", "--reference", "ref.npz", "--inception-weights", "/w/inc.pth",
        "--extractor", "dinov2:model=/w/d,image_size=224", "--extractor", "classifier:dataset=digits",
        "--clip-model", "ViT-B-32", "--clip-pretrained", "openai", "--clip-model-kwargs", '{"embed_dim": 16}',
        "--captions", "c.txt", "--out", "o.json", "--tensorboard", "tb", "--step", "7", "--batch-size", "3",
        "--device", "cpu", "--k", "5", "--fd-method", "eigh", "--no-progress",
    ])
    assert cfg.samples == "s3://b/s.npz" and cfg.reference == "ref.npz" and cfg.inception == "/w/inc.pth"
    assert [(e.kind, e.options) for e in cfg.extractors] == [
        ("dinov2", {"model": "/w/d", "image_size": 224}), ("classifier", {"dataset": "digits"})
    ]
    assert cfg.clip.model == "ViT-B-32" and cfg.clip.pretrained == "openai" and cfg.clip.captions == "c.txt"
    assert cfg.clip.model_kwargs == {"embed_dim": 16}
    assert (cfg.out, cfg.tensorboard, cfg.step, cfg.batch_size, cfg.device, cfg.k, cfg.fd_method, cfg.progress) == (
        "o.json", "tb", 7, 3, "cpu", 5, "eigh", False
    )
    random = load_config(["--samples", "s.npz", "--reference", "r.npz", "--random-inception-for-tests"])
    assert random.inception == RANDOM_INCEPTION and random.inception_weights() is None


def test_file_then_flags_then_set_and_extractor_flags_append(tmp_path: Path) -> None:
    config = tmp_path / "eval.yaml"
    config.write_text(
        "samples: from-file.npz\nbatch_size: 16\nstep: 3\n"
        "extractors:\n  - kind: classifier\n    options: {dataset: digits}\n"
    )
    cfg = load_config(["--config", str(config), "--batch-size", "8", "--set", "batch_size=4", "--set", "k=2",
                       "--extractor", "dinov2:model=/w/d"])
    assert cfg.samples == "from-file.npz" and cfg.step == 3  # file values the flags do not touch stay
    assert cfg.batch_size == 4 and cfg.k == 2  # --set wins over a flag, a flag over the file
    assert [e.kind for e in cfg.extractors] == ["classifier", "dinov2"]
    assert load_config(["--config", str(config), "--batch-size", "8"]).batch_size == 8
    replaced = load_config(["--config", str(config), "--set", "extractors=[{kind: clip}]"])
    assert [e.kind for e in replaced.extractors] == ["clip"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--samples", "s.npz", "--extractor", "nope"], r"^extractors\.0\.kind: unknown feature extractor 'nope'"),
        (["--samples", "s.npz"], r"^extractors: nothing to evaluate"),
        (["--extractor", "clip"], r"^samples: Field required"),
        (["--samples", "s.npz", "--random-inception-for-tests"], r"^reference: Inception metrics"),
        (["--samples", "s.npz", "--extractor", "clip", "--fd-method", "svd"], r"^fd_method: Input should be"),
        (["--samples", "s.npz", "--extractor", "clip", "--set", "bogus=1"], r"^bogus: unknown field \(allowed: samples"),
        (["--samples", "s.npz", "--extractor", "clip", "--device", "gpu0"], r"^device: 'gpu0' is not a torch device"),
        (["--samples", "s.npz", "--extractor", "clip", "--batch-size", "0"], r"^batch_size: Input should be greater"),
        (["--samples", "s.npz", "--extractor", "dinov2:model"], r"^--extractor 'dinov2:model': option 'model' is not"),
        (["--samples", "s.npz", "--clip-model", "x", "--clip-model-kwargs", "{x"], r"^--clip-model-kwargs: not valid"),
        (["--samples", "s.npz", "--config", "/nonexistent/eval.yaml"], r"^/nonexistent/eval.yaml: config file not"),
        (["--samples", "s.npz", "--bogus"], r"^--bogus: unrecognized argument"),
    ],
)
def test_mistakes_name_the_field(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


def test_the_model_is_usable_without_the_command_line() -> None:
    cfg = load_validated(EvaluateConfig, tree={"samples": "s.npz", "extractors": [{"kind": "classifier",
                                                                                   "options": {"dataset": "digits"}}]})
    assert cfg.reference is None and cfg.inception is None and cfg.clip.model is None
    assert cfg.resolved_device() in ("cpu", "cuda") and cfg.batch_size == 64 and cfg.fd_method == "sqrtm"
