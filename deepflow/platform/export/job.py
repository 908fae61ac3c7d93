"""``deepflow export``: a trained model as a self-contained diffusers pipeline folder.

    deepflow export --format diffusers --checkpoint runs/demo/export --out models/demo-diffusers
    deepflow export --checkpoint runs/x/checkpoints --out s3://bucket/models/x --method euler --steps 50 \\
        --cfg-scale 1.5 --vae stabilityai/sd-vae-ft-ema

``--checkpoint``: anything ``artifacts.load_weights`` reads (an export folder or ``.safetensors``, a ``deepflow
convert`` output, a checkpoint step folder, a checkpoints folder: its newest committed step). The folder loads with
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` wherever torch, diffusers and safetensors (and
transformers, for text-to-image models) are installed, without this package. ``--method``, ``--steps``,
``--cfg-scale``, ``--guidance-interval`` and ``--sampler-option`` set the pipeline's sampling defaults.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import pydantic

from deepflow.errors import JobArgumentParser, report_user_errors
from deepflow.platform.export.diffusers_export import export_diffusers, sampler_option_names
from deepflow.platform.inference.generate import SamplerConfig
from deepflow.storage import resolve_storage_options

__all__ = ["FORMATS", "build_parser", "main", "parse_sampler"]

FORMATS = ("diffusers",)


def build_parser() -> argparse.ArgumentParser:
    p = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=FORMATS, default="diffusers", help="what to write (default diffusers)")
    p.add_argument("--checkpoint", required=True,
                   help="export folder / .safetensors, converted model, checkpoint step folder or checkpoints folder")
    p.add_argument("--out", required=True, help="the pipeline folder to write (a local path or an object-store URL)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export in --out")
    p.add_argument("--preset", help="a named sampler setting (deepflow.models.sampling.PRESETS) filling in the "
                   "sampler flags not given")
    p.add_argument("--method", help="default sampler of the pipeline (sde, euler, heun, ...; default sde)")
    p.add_argument("--steps", type=int, help="default num_inference_steps (default 250)")
    p.add_argument("--cfg-scale", type=float, help="default guidance_scale (default 1.0: no guidance)")
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="default guidance interval in t (default 0 1)")
    p.add_argument("--sampler-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a further argument of deepflow.models.sampling.sample, JSON value (repeatable)")
    p.add_argument("--vae", help="latent models: the AutoencoderKL (hub id or local folder; default: recorded)")
    p.add_argument("--dataset", help="text models: the caption dataset (default: the one the model card records)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// URLs")
    return p


def parse_sampler(args: argparse.Namespace) -> tuple[SamplerConfig, dict[str, Any]]:
    """The sampler defaults and options from the flags; one-line errors naming the flag. A ``--sampler-option``
    naming a sampler config field (grid, shift, ...) is validated as that field; any other must be an argument of
    ``deepflow.models.sampling.sample``."""
    fields: dict[str, Any] = {"preset": args.preset, "method": args.method, "steps": args.steps,
                              "cfg_scale": args.cfg_scale,
                              "guidance_interval": tuple(args.guidance_interval) if args.guidance_interval else None}
    fields = {key: value for key, value in fields.items() if value is not None}
    extra: dict[str, Any] = {}
    for item in args.sampler_option:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--sampler-option: expected KEY=VALUE, got {item!r}")
        if key not in SamplerConfig.model_fields and key not in sampler_option_names():
            allowed = ", ".join(sampler_option_names()) or "none"
            raise ValueError(f"--sampler-option: unknown option {key!r} (deepflow's sampler takes: {allowed})")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        (fields if key in SamplerConfig.model_fields else extra)[key] = value
    unknown = sorted(set(fields) - set(SamplerConfig.model_fields))
    if unknown:
        raise ValueError(f"--{unknown[0]}: not a setting of this version's sampler")
    try:
        sampler = SamplerConfig.model_validate(fields)
    except pydantic.ValidationError as error:
        problem = error.errors()[0]
        field = str(problem["loc"][0]) if problem["loc"] else "method"
        flag = f"--{field.replace('_', '-')}" if field in ("preset", "method", "steps", "cfg_scale",
                                                            "guidance_interval") else f"--sampler-option {field}"
        raise ValueError(f"{flag}: {problem['msg']}") from None
    return sampler, extra


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 written, 2 a user mistake (one ``error:`` line)."""

    def body() -> int:
        args = build_parser().parse_args(argv)
        sampler, options = parse_sampler(args)
        result = export_diffusers(
            args.checkpoint, args.out, sampler=sampler, sampler_options=options, vae=args.vae, dataset=args.dataset,
            overwrite=args.overwrite,
            storage_options=lambda url: resolve_storage_options(url, None, args.endpoint_url) if url else None,
        )
        print(f"wrote {result.url}: {result.model}, {result.parameters:,} parameters, components "
              f"{', '.join(result.components)}", flush=True)
        for note in result.notes:
            print(f"note: {note}", flush=True)
        print(f'load it with: DiffusionPipeline.from_pretrained("{args.out}", trust_remote_code=True)', flush=True)
        return 0

    return report_user_errors(body)


if __name__ == "__main__":
    sys.exit(main())
