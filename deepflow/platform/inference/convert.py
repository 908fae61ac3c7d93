"""``deepflow convert``: a reference DeepFlow checkpoint (ByteDance-Seed/DeepFlow layout) -> an export that the
sampling job, the demo and ``artifacts.load_weights`` read.

    python -m deepflow.platform.inference.convert --reference ckpt.pt --name "DeepFlow-XL/2-3T" --out converted/
    python jobs/sample.py --checkpoint converted/ --out samples/ --num-samples 50000

``--out``: a folder (``export.safetensors`` + ``export.json`` inside, created if new) or a ``.safetensors`` path
(its ``.json`` beside it), on any storage. The ``.json`` is a full ``artifacts.ModelCard``: the model name and
every architecture argument ``create_model`` needs to rebuild it exactly, class conditioning, and the decoder of
its samples: the reference trains on SD-VAE latents, so ``kind`` "vae", ``vae`` stabilityai/sd-vae-ft-ema and the
SD latent scale unless flags say otherwise. The reference file is read with ``torch.load(weights_only=True)``.

The VeRA gap-modulation scale is clamped to [-5, 5] only if the reference model was trained with
``--legacy-scaling``: the checkpoint's ``args.legacy_scaling`` says so; without it (a bare state dict) the
reference scripts' default (no clamp) is used; ``--legacy-scaling`` / ``--no-legacy-scaling`` override both. The
job prints the setting it used, and the card records it (``clamp_gap_scale``) so that sampling rebuilds the same
network.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from deepflow.artifacts import ModelCard, write_export
from deepflow.models import create_model
from deepflow.models.convert import (
    REFERENCE_LEGACY_SCALING_DEFAULT,
    load_reference_state_dict,
    reference_legacy_scaling,
    select_reference_weights,
)
from deepflow.errors import JobArgumentParser, report_user_errors
from deepflow.platform.inference.generate import DEFAULT_LATENT_SCALE
from deepflow.storage import resolve_storage_options

__all__ = ["DEFAULT_VAE", "architecture_kwargs", "build_parser", "convert", "gap_scale_note",
           "load_reference_checkpoint", "main"]

#: The VAE whose latents the reference models are trained on.
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
#: Constructor arguments of a DeepFlowDiT that ``create_model`` takes; recorded so the card rebuilds it exactly.
_ARCHITECTURE = ("depth", "key_layers", "input_size", "patch_size", "in_channels", "num_classes", "hidden_size",
                 "num_heads", "mlp_ratio", "class_dropout", "ssl_align", "z_dim", "projector_dim", "acc_widths",
                 "vera_mode", "clamp_gap_scale")


def load_reference_checkpoint(path: str) -> Mapping[str, Any]:
    """``torch.load(path, weights_only=True)`` of a local file; the reference ``args`` (an argparse.Namespace) is
    allow-listed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference: {path}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling errors of many kinds; the first line says which
        raise ValueError(f"reference: {path}: not a weights-only torch checkpoint "
                         f"({str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__})")
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"reference: {path}: expected a state dict or {{ema, model, args}}, got {type(checkpoint)}")
    return checkpoint


def architecture_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """``create_model(name, **kwargs)`` arguments that rebuild ``model`` (a DeepFlowDiT) with the same tensors."""
    kwargs = {name: getattr(model, name) for name in _ARCHITECTURE}
    kwargs["key_layers"], kwargs["acc_widths"] = list(kwargs["key_layers"]), list(kwargs["acc_widths"])
    return kwargs


def _check_rebuilds(name: str, kwargs: dict[str, Any], model: torch.nn.Module) -> None:
    with torch.device("meta"):
        rebuilt = create_model(name, **kwargs)
    want = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    got = {key: tuple(t.shape) for key, t in rebuilt.state_dict().items()}
    if want != got:
        raise RuntimeError(f"create_model({name!r}, **{kwargs}) does not rebuild the converted model")


def _chosen_weights(checkpoint: Mapping[str, Any], prefer: str) -> str | None:
    """Which weights ``load_reference_state_dict`` takes: 'ema' / 'model', or None for a bare state dict."""
    for key in (prefer, "model" if prefer == "ema" else "ema"):
        if isinstance(checkpoint.get(key), Mapping):
            return key
    return None


def gap_scale_note(checkpoint: Mapping[str, Any], prefer: str, legacy_scaling: bool | None,
                   model: torch.nn.Module) -> str:
    """One line: whether the converted ``model`` clamps the VeRA gap-modulation scale, and why (the
    ``--legacy-scaling`` flag, the checkpoint's args, or the reference scripts' default)."""
    used = "on" if model.clamp_gap_scale else "off"
    head = f"VeRA gap-modulation scale clamp to [-5, 5] (reference --legacy-scaling): {used}"
    recorded = reference_legacy_scaling(select_reference_weights(checkpoint, prefer)[1])
    if legacy_scaling is not None:
        flag = "--legacy-scaling" if legacy_scaling else "--no-legacy-scaling"
        also = "" if recorded is None else f"; the checkpoint's args.legacy_scaling is {recorded}"
        return f"{head} (from {flag}{also})"
    if recorded is not None:
        return f"{head} (from the checkpoint's args.legacy_scaling={recorded})"
    default = "on" if REFERENCE_LEGACY_SCALING_DEFAULT else "off"
    hint = "; the reference README trains SSL-aligned models with it" if getattr(model, "ssl_align", False) else ""
    return (f"{head} (the checkpoint's args do not record legacy_scaling: the reference scripts' default, "
            f"{default}{hint}; choose with --legacy-scaling / --no-legacy-scaling)")


def convert(
    reference: str,
    name: str,
    out: str,
    *,
    prefer: str = "ema",
    overrides: dict[str, Any] | None = None,
    legacy_scaling: bool | None = None,
    report: Callable[[str], None] | None = None,
    kind: str = "vae",
    vae: str | None = DEFAULT_VAE,
    latent_scale: float | None = None,
    storage_options: dict[str, Any] | None = None,
) -> tuple[str, torch.nn.Module, ModelCard]:
    """Convert ``reference`` into an export at ``out``; returns (weights URL, model, card).

    ``legacy_scaling``: clamp the VeRA gap-modulation scale (True) or not (False) whatever the checkpoint's
    args say; None: args.legacy_scaling, else the reference scripts' default (no clamp). ``report`` receives
    the one-line ``gap_scale_note`` (models with VeRA blocks only).
    """
    checkpoint = load_reference_checkpoint(reference)
    overrides = dict(overrides or {})
    if legacy_scaling is not None:
        overrides["clamp_gap_scale"] = bool(legacy_scaling)
    model = load_reference_state_dict(checkpoint, name, prefer=prefer, **overrides)
    if report is not None and model.has_vera:
        report(gap_scale_note(checkpoint, prefer, legacy_scaling, model))
    kwargs = architecture_kwargs(model)
    _check_rebuilds(name, kwargs, model)
    chosen = _chosen_weights(checkpoint, prefer)
    step = checkpoint.get("steps", checkpoint.get("step"))
    latent = kind == "vae"
    card = ModelCard(
        model=name, kwargs=kwargs, condition="class", kind=kind,
        latent_scale=(latent_scale or DEFAULT_LATENT_SCALE) if latent else None, vae=vae if latent else None,
        step=step if isinstance(step, int) else None, ema=None if chosen is None else chosen == "ema",
        source=reference,
    )
    url = write_export(out, model.state_dict(), card, storage_options)
    return url, model, card


def build_parser() -> argparse.ArgumentParser:
    p = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, help="reference checkpoint (.pt: a state dict or {ema, model, args})")
    p.add_argument("--name", required=True, help='architecture, e.g. "DeepFlow-XL/2-3T"')
    p.add_argument("--out", required=True, help="export folder, or a .safetensors path (its .json beside it)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights to prefer")
    p.add_argument("--num-heads", type=int, help="override the size's head count")
    p.add_argument("--hidden-size", type=int, help="override the size's hidden width")
    p.add_argument("--legacy-scaling", action=argparse.BooleanOptionalAction, default=None,
                   help="clamp the VeRA gap-modulation scale to [-5, 5] as the reference does when trained with "
                        "--legacy-scaling (default: the checkpoint's args.legacy_scaling; without args, no clamp, "
                        "the reference scripts' default)")
    p.add_argument("--kind", choices=("vae", "pixel"), default="vae", help="what the model's samples are")
    p.add_argument("--vae", default=DEFAULT_VAE, help="AutoencoderKL that decodes the samples (kind vae)")
    p.add_argument("--latent-scale", type=float, help=f"latent scale (kind vae; default {DEFAULT_LATENT_SCALE})")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint for an s3:// --out")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a user mistake (one ``error:`` line)."""

    def body() -> int:
        args = build_parser().parse_args(argv)
        if args.latent_scale is not None and args.latent_scale <= 0:
            raise ValueError(f"latent_scale: must be > 0, got {args.latent_scale}")
        overrides = {k: v for k, v in (("num_heads", args.num_heads), ("hidden_size", args.hidden_size)) if v}
        url, model, _ = convert(
            args.reference, args.name, args.out, prefer=args.weights, overrides=overrides,
            legacy_scaling=args.legacy_scaling, report=lambda line: print(line, flush=True), kind=args.kind,
            vae=args.vae, latent_scale=args.latent_scale,
            storage_options=resolve_storage_options(args.out, None, args.endpoint_url),
        )
        count = sum(t.numel() for t in model.state_dict().values())
        print(f"wrote {url} (+ model card): {args.name} depth {model.depth} key layers {model.key_layers}, "
              f"{count:,} parameters", flush=True)
        return 0

    return report_user_errors(body)


if __name__ == "__main__":
    sys.exit(main())
