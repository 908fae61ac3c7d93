"""Evaluate a sample batch: Frechet distances in the features of any registered extractor (the small-data classifier
with class accuracy, DINOv2, CLIP), the ADM protocol with Inception (FID, sFID, Inception Score, precision, recall)
when asked for, and a CLIP score against captions.

    python jobs/evaluate.py --samples runs/digits/samples/samples.npz --extractor classifier:dataset=digits \\
        --out runs/digits/eval/final.json

    python jobs/evaluate.py --samples s3://bucket/run/samples.npz --reference VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights /weights/pt_inception-2015-12-05-6726825d.pth \\
        --out s3://bucket/run/eval/step-0400000.json --tensorboard /runs/xl3t/tb --step 400000 \\
        --extractor dinov2:model=/weights/dinov2-large

    python jobs/evaluate.py --config eval.yaml --set batch_size=250 --set clip.captions=s3://runs/c/captions.txt

``--inception-weights`` without a value (``inception: auto``) finds the weights: $DEEPFLOW_INCEPTION_WEIGHTS, else
pt_inception-2015-12-05-6726825d.pth in $DEEPFLOW_CACHE (default ~/.cache/deepflow) or in torch's hub cache
(~/.cache/torch/hub/checkpoints, where pytorch-fid / torch-fidelity keep it); when none exists one error line says
where to download it. Reference batches from a dataset: ``deepflow.platform.eval.reference_job``.

Text-to-image samples (jobs/sample.py writes <out>/captions.txt beside samples.npz) also get a CLIP score against
their captions with --clip-model (open_clip; sample i is paired with caption i).

Every flag is sugar for a field of :class:`~deepflow.platform.eval.config.EvaluateConfig` (a YAML file given with
--config, dotted --set overrides win over flags, flags over the file); --extractor appends to ``extractors``.
Samples and reference are ADM .npz files (arr_0: uint8 NHWC; samples may carry arr_1 labels, -1 for none; the
reference may hold mu/sigma/mu_s/sigma_s) on any storage URL. Results go to a JSON file (any storage URL, atomic)
and, with --tensorboard, to scalars ``eval/<metric>`` at --step.

A mistake in the inputs prints one line ``error: <field or URL>: <what is wrong>`` and exits with status 2
(DEEPFLOW_DEBUG=1 re-raises it with its traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from deepflow.artifacts import SampleSetLayout
from deepflow.errors import JobArgumentParser, UsageError, UserError, one_line, report_user_errors
from deepflow.configuration import ConfigError, flag_overrides, load_tree, load_validated
from deepflow.platform.eval.config import AUTO_INCEPTION, RANDOM_INCEPTION, ClipSection, EvaluateConfig
from deepflow.platform.eval.evaluator import (
    ReferenceBatch,
    check_image_batch,
    clip_score_samples,
    evaluate_batch,
    read_sample_labels,
)
from deepflow.platform.eval.extractors import FeatureExtractor, build_extractor
from deepflow.platform.eval.inception import INCEPTION_WEIGHTS_ENV, INCEPTION_WEIGHTS_FILE
from deepflow.storage import Storage, write_url_text

log = logging.getLogger(__name__)

__all__ = [
    "EvaluateError", "add_inception_flags", "build_parser", "check_device", "field_errors", "inception_flag",
    "load_config", "main", "parse_extractor_spec", "parse_kind_spec", "run",
]

#: errors that are the user's mistakes (bad inputs, missing or unreadable files, models that cannot be built)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError)
#: building models from user-given names also fails with RuntimeError (open_clip: unknown model name)
BUILD_ERRORS: tuple[type[BaseException], ...] = (*USER_ERRORS, RuntimeError)


class EvaluateError(UserError):
    """A mistake in the inputs of a run; ``str(error)`` is ``<field or URL>: <what is wrong>``."""


# ------------------------------------------------------------------------------------------------ command line
def parse_kind_spec(spec: str, flag: str = "--extractor") -> tuple[str, dict[str, Any]]:
    """``kind[:key=value,key=value]`` -> (kind, options). E.g. ``clip:model_name=ViT-L-14,pretrained=/w/clip.pt``.

    Values are parsed as YAML scalars (``image_size=224`` -> int, ``x=true`` -> bool); anything else stays a string.
    Mistakes raise ``ConfigError`` naming ``flag``.
    """
    import yaml

    kind, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {spec!r}: option {item!r} is not key=value (kind:key=value,key=value)")
        try:
            parsed = yaml.safe_load(value) if value else value
        except yaml.YAMLError:
            parsed = value
        options[key] = parsed if isinstance(parsed, (int, float, bool)) else value
    if not kind:
        raise ConfigError(f"{flag} {spec!r}: missing kind (kind:key=value,key=value)")
    return kind, options


def parse_extractor_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``--extractor kind[:key=value,...]`` -> (kind, options) (see :func:`parse_kind_spec`)."""
    return parse_kind_spec(spec, "--extractor")


def add_inception_flags(parser: argparse.ArgumentParser) -> None:
    """``--inception-weights [PATH|URL]`` (alone: find them) and ``--random-inception-for-tests``: the ``inception``
    field (shared by the evaluate and reference jobs)."""
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--inception-weights", nargs="?", const=AUTO_INCEPTION, metavar="PATH|URL",
                         help="inception: path or URL of the FID Inception-v3 weights file; without a value: find it "
                         f"(${INCEPTION_WEIGHTS_ENV}, then {INCEPTION_WEIGHTS_FILE} in $DEEPFLOW_CACHE "
                         "(~/.cache/deepflow) or ~/.cache/torch/hub/checkpoints)")
    weights.add_argument("--random-inception-for-tests", action="store_true",
                         help=f"inception={RANDOM_INCEPTION}: random Inception weights, meaningless numbers")


def inception_flag(args: argparse.Namespace) -> str | None:
    """The ``inception`` field given by :func:`add_inception_flags`' flags (None: not given)."""
    return args.inception_weights or (RANDOM_INCEPTION if args.random_inception_for_tests else None)


def build_parser() -> argparse.ArgumentParser:
    """Flags; every one defaults to None (unset) so that it overrides a --config file only when given."""
    parser = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of EvaluateConfig fields (any storage URL)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field, e.g. --set batch_size=32 --set clip.model=ViT-L-14")
    parser.add_argument("--samples", help="samples: sample batch .npz (arr_0 uint8 NHWC, arr_1 labels), any URL")
    parser.add_argument("--reference", help="reference: reference batch .npz (arr_0 and/or mu, sigma, mu_s, sigma_s)")
    add_inception_flags(parser)
    parser.add_argument("--extractor", action="append", default=[], metavar="KIND[:K=V,...]",
                        help="append to extractors: classifier:dataset=digits, dinov2:model=..., "
                        "clip:model_name=...,pretrained=...")
    parser.add_argument("--clip-model", help="clip.model: open_clip model name (e.g. ViT-L-14): CLIP score")
    parser.add_argument("--clip-pretrained", help="clip.pretrained: open_clip tag or local weights; omitted: RANDOM")
    parser.add_argument("--clip-model-kwargs", help="clip.model_kwargs: JSON architecture overrides (tiny test models)")
    parser.add_argument("--captions", help="clip.captions: caption file (.txt / .json), caption i for sample i; "
                        "default: captions.txt beside --samples")
    parser.add_argument("--out", help="out: where to write the JSON results (any storage URL)")
    parser.add_argument("--tensorboard", help="tensorboard: log dir (any storage URL) for eval/<metric> scalars")
    parser.add_argument("--step", type=int, help="step: global step of the evaluated checkpoint (default 0)")
    parser.add_argument("--batch-size", type=int, help="batch_size (default 64)")
    parser.add_argument("--device", help="device (default: cuda when available, else cpu)")
    parser.add_argument("--k", type=int, help="k: neighbourhood size of precision/recall (default 3)")
    parser.add_argument("--fd-method", help="fd_method: sqrtm (ADM, default) or eigh (same value, ~5x faster on CPU)")
    parser.add_argument("--no-progress", action="store_true", help="progress=false: no progress bars")
    return parser


def load_config(argv: Sequence[str] | None = None) -> EvaluateConfig:
    """The run's config: --config file, then the flags, then --set overrides (ConfigError naming the fields)."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        raise ConfigError(str(error)) from None
    tree = load_tree(args.config)
    if args.extractor:
        listed = tree.setdefault("extractors", [])
        if not isinstance(listed, list):
            raise ConfigError(f"extractors: must be a list of {{kind, options}} to append --extractor to")
        listed.extend({"kind": kind, "options": options} for kind, options in map(parse_extractor_spec, args.extractor))
    flags = {
        "samples": args.samples, "reference": args.reference, "inception": inception_flag(args),
        "clip.model": args.clip_model, "clip.pretrained": args.clip_pretrained,
        "clip.model_kwargs": _json_flag("--clip-model-kwargs", args.clip_model_kwargs), "clip.captions": args.captions,
        "out": args.out, "tensorboard": args.tensorboard, "step": args.step, "batch_size": args.batch_size,
        "device": args.device, "k": args.k, "fd_method": args.fd_method,
        "progress": False if args.no_progress else None,
    }
    return load_validated(EvaluateConfig, tree=tree, overrides=flag_overrides(flags) + list(args.set))


def _json_flag(flag: str, text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{flag}: not valid JSON ({error})") from None


# ------------------------------------------------------------------------------------------------ errors
#: the config's field paths: a message that starts with one of them already names its field
FIELD_NAMES = (*EvaluateConfig.model_fields, *(f"clip.{name}" for name in ClipSection.model_fields), "extractors")


@contextmanager
def field_errors(
    name: str, errors: tuple[type[BaseException], ...] = USER_ERRORS, field_names: Sequence[str] = ()
) -> Iterator[None]:
    """Turn the user errors raised inside into :class:`EvaluateError` ``<name>: <message>`` (the field is not repeated
    when the message already starts with one of ``field_names``; a URL still gets the field in front)."""
    try:
        yield
    except EvaluateError:
        raise
    except errors as error:
        message = one_line(_describe(error))
        if not any(message.startswith(f"{prefix}:") for prefix in field_names):
            message = f"{name}: {message}"
        raise EvaluateError(message) from error


def _field(name: str, errors: tuple[type[BaseException], ...] = USER_ERRORS) -> Any:
    """:func:`field_errors` with the evaluate config's field names."""
    return field_errors(name, errors, FIELD_NAMES)


def _describe(error: BaseException) -> str:
    """The message of a user error, without the noise of its type (``[Errno 2] ...``, KeyError quotes)."""
    if isinstance(error, FileNotFoundError) and error.filename:
        return f"{error.filename}: not found"
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return str(error) or type(error).__name__


# ------------------------------------------------------------------------------------------------ the run
def check_device(device: str) -> None:
    """EvaluateError when ``device`` asks for CUDA on a machine without it."""
    import torch

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise EvaluateError(f"device: {device!r} requested but CUDA is not available on this machine (use cpu)")


def inception_weights_of(cfg: EvaluateConfig) -> str | None:
    """The Inception weights location of the run (None: random weights or no Inception), found now: an ``inception``
    path or URL that does not exist, or ``auto`` finding nothing, is one ``inception: ...`` error saying where to
    get the file."""
    with _field("inception"):
        return cfg.inception_weights()


def build_extractors(cfg: EvaluateConfig, device: str, inception_weights: str | None = None) -> list[FeatureExtractor]:
    """The Inception extractor (when ``inception`` is set; ``inception_weights``: its weights location, None for
    random ones) and every one of ``extractors``, on ``device``."""
    built: list[FeatureExtractor] = []
    if cfg.inception is not None:
        with _field("inception", BUILD_ERRORS):
            built.append(build_extractor("inception", device=device, weights=inception_weights))
    for index, spec in enumerate(cfg.extractors):
        with _field(f"extractors.{index}", BUILD_ERRORS):
            built.append(build_extractor(spec.kind, device=device, **spec.options))
    return built


def _check_inputs(cfg: EvaluateConfig) -> tuple[ReferenceBatch | None, np.ndarray | None]:
    """(reference batch or None, sample labels [N] or None), after checking both batches' headers."""
    options = cfg.storage_options or None
    with _field("samples"):
        check_image_batch(cfg.samples, options)
        labels = read_sample_labels(cfg.samples, options)
    reference = None
    if cfg.reference is not None:
        with _field("reference"):
            reference = ReferenceBatch.load(cfg.reference, options, cfg.progress)
            if isinstance(reference.images, str):
                check_image_batch(reference.images, options)
    return reference, labels


def clip_results(cfg: EvaluateConfig, device: str) -> dict[str, Any]:
    """CLIP score of the samples against ``clip.captions`` (default: captions.txt beside the samples)."""
    from deepflow.platform.eval.clip_score import ClipScorer, load_clip

    options = cfg.storage_options or None
    captions_url = cfg.clip.captions or SampleSetLayout.captions_url_for(cfg.samples)
    with _field("clip.captions"):
        try:
            captions = SampleSetLayout.read_captions(captions_url, options)
        except FileNotFoundError:
            hint = "" if cfg.clip.captions else " (the default: captions.txt beside the samples); give --captions"
            raise ValueError(f"{captions_url}: not found{hint}") from None
    if cfg.clip.pretrained is None:
        warnings.warn("CLIP score with RANDOM open_clip weights (no clip.pretrained / --clip-pretrained): "
                      "meaningless numbers", UserWarning, stacklevel=2)
    with _field("clip.model", BUILD_ERRORS):
        model, tokenizer = load_clip(cfg.clip.model, cfg.clip.pretrained, device, **cfg.clip.model_kwargs)
    with _field("samples"):
        scores = clip_score_samples(cfg.samples, captions, ClipScorer(model, tokenizer, cfg.batch_size),
                                    cfg.batch_size, options, cfg.progress)
    return {**scores, "clip_model": cfg.clip.model, "clip_pretrained": cfg.clip.pretrained or "RANDOM (tests only)",
            "captions": captions_url}


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate ``cfg.samples``; write the results JSON / TensorBoard scalars; return the results.

    Keys: "num_samples"; with Inception "fid", "sfid", "inception_score", "precision", "recall",
    "inception_weights"; per other extractor "fd_<name>" and "reference_<name>" (the reference URL or the
    extractor's own reference); "class_accuracy" (classifier, labelled samples); with CLIP "clip_score",
    "clip_score_std", "clip_model", "clip_pretrained", "captions"; and "samples", "reference", "step".
    Raises :class:`EvaluateError` (or ``ConfigError``) for mistakes in the inputs.
    """
    device = cfg.resolved_device()
    check_device(device)
    weights = inception_weights_of(cfg)
    reference, labels = _check_inputs(cfg)
    extractors = build_extractors(cfg, device, weights)
    results: dict[str, Any] = {}
    if extractors:
        with _field("samples"):
            results.update(evaluate_batch(
                cfg.samples, extractors, reference, labels=labels, batch_size=cfg.batch_size, device=device,
                k=cfg.k, storage_options=cfg.storage_options or None, fd_method=cfg.fd_method, progress=cfg.progress,
            ))
    if cfg.inception is not None:
        results["inception_weights"] = weights or "RANDOM (tests only)"
    if cfg.clip.model is not None:
        results.update(clip_results(cfg, device))
    results.update(samples=cfg.samples, reference=cfg.reference, step=cfg.step)
    write_outputs(cfg, results)
    return results


def write_outputs(cfg: EvaluateConfig, results: dict[str, Any]) -> None:
    """Print the results; write them to ``out`` (atomic) and their floats to ``tensorboard`` as eval/<metric>."""
    text = json.dumps(results, indent=2, sort_keys=True)
    print(text)
    if cfg.out:
        with _field("out"):
            write_url_text(cfg.out, text + "\n", cfg.storage_options or None)
    if cfg.tensorboard:
        with _field("tensorboard"):
            write_tensorboard(cfg.tensorboard, results, cfg.step, cfg.storage_options or None)


def write_tensorboard(url: str, results: dict[str, Any], step: int, storage_options: dict | None = None) -> None:
    """Scalars ``eval/<key>`` of the float results at ``step``: an event file written locally, then put into the
    log dir ``url`` (any storage URL) beside the training run's own events."""
    from torch.utils.tensorboard import SummaryWriter

    with tempfile.TemporaryDirectory(prefix="deepflow-eval-tb-") as local:
        with SummaryWriter(local) as writer:
            for key, value in results.items():
                if isinstance(value, float):
                    writer.add_scalar(f"eval/{key}", value, step)
        storage = Storage(url, storage_options)
        for name in sorted(os.listdir(local)):  # one events.out.tfevents.* file (unique name: time, host, pid)
            storage.put_file(os.path.join(local, name), name)


# ------------------------------------------------------------------------------------------------ entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the job; 0 on success, 2 (one ``error: ...`` line on stderr) for a mistake in the inputs."""

    def body() -> int:
        cfg = load_config(argv)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        run(cfg)
        return 0

    return report_user_errors(body)


if __name__ == "__main__":
    sys.exit(main())
