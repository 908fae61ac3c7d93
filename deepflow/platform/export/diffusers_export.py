"""A trained DeepFlow as a self-contained diffusers pipeline folder (``deepflow export --format diffusers``).

The folder (diffusers' layout, custom components kept in their folders)::

    model_index.json               DeepFlowPipeline + components, export_version, text_encoding
    pipeline_deepflow.py           the pipeline class (DiffusionPipeline)
    README.md                      what the model is, how to load it, what is missing (a VAE without weights)
    transformer/                   config.json + diffusion_pytorch_model.safetensors (the network under ``net.``),
                                   deepflow_transformer.py (ModelMixin/ConfigMixin) + the copied deepflow/models code
    scheduler/                     scheduler_config.json, deepflow_scheduler.py (SchedulerMixin) + copied sampling code
    vae/                           latent models: the AutoencoderKL (config; weights when available locally)
    text_encoder/ tokenizer/       text-to-image models: the transformers encoder the captions were encoded with

``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads it with torch, diffusers and safetensors
(and transformers for text models), without this package. The folder is staged locally, checked (no absolute path
of this machine in any file), then moved into place (a local ``out``) or uploaded (an object-store URL).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deepflow import __version__
from deepflow.artifacts import ModelCard, TensorSpec, WeightsSource, open_weights, write_safetensors
from deepflow.models import create_model
from deepflow.models import sampling as flow_sampling
from deepflow.platform.export.codegen import EXPORT_VERSION, PIPELINE_FILE, generate_code
from deepflow.platform.inference import prompts
from deepflow.platform.inference.generate import DecodeSpec, SamplerConfig
from deepflow.storage import Storage, is_remote_url

__all__ = ["ExportResult", "SD_VAE_CONFIG", "export_diffusers", "sampler_option_names"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
NET_PREFIX = "net."
#: the AutoencoderKL config of the SD VAEs (stabilityai/sd-vae-ft-ema, -mse): written when their weights are absent
SD_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3,
    "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 256,
    "scaling_factor": 0.18215,
}
SD_VAE_IDS = ("stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse")
_SAMPLER_OWN = ("fn", "noise", "y", "method", "steps", "cfg_scale", "guidance_interval", "null_label", "generator",
                "progress", "null_condition")


@dataclass
class ExportResult:
    """What was written: the folder URL, the model, and the notes for the user (e.g. a VAE to add)."""

    url: str
    model: str
    parameters: int
    components: list[str]
    notes: list[str] = field(default_factory=list)


def sampler_option_names() -> tuple[str, ...]:
    """Keyword arguments of ``deepflow.models.sampling.sample`` besides the ones the scheduler sets itself."""
    import inspect

    return tuple(name for name in inspect.signature(flow_sampling.sample).parameters if name not in _SAMPLER_OWN)


# --------------------------------------------------------------------------------------------------- weights
def _strip_prefix(names: list[str]) -> str:
    for prefix in ("module.", "_orig_mod."):
        if names and all(name.startswith(prefix) for name in names):
            return prefix
    return ""


def _model_kwargs(card: ModelCard) -> dict[str, Any]:
    kwargs = dict(card.kwargs)
    kwargs.pop("gradient_checkpointing", None)
    return kwargs


def _check_fits(card: ModelCard, specs: dict[str, TensorSpec], prefix: str, where: str) -> int:
    """The weights' names and shapes are those of ``create_model(card.model, **kwargs)``; returns the count."""
    kwargs = _model_kwargs(card)
    try:
        with torch.device("meta"):
            model = create_model(card.model, **kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: model card: cannot build {card.model} {kwargs}: {error}") from None
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    given = {name[len(prefix):]: tuple(spec.shape) for name, spec in specs.items()}
    params = {name for name, _ in model.named_parameters()}
    missing, unexpected = sorted(params - given.keys()), sorted(given.keys() - expected.keys())
    wrong = sorted(name for name in given.keys() & expected.keys() if given[name] != expected[name])
    if missing or unexpected or wrong:
        raise ValueError(f"{where}: the weights do not fit {card.model} {kwargs}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, other shapes {wrong[:5]}")
    return sum(int(torch.Size(shape).numel()) for shape in given.values())


def _write_transformer(stage: Path, checkpoint: str, source: WeightsSource,
                       decode: DecodeSpec, vae_name: str | None) -> tuple[ModelCard, int]:
    card = source.card
    prefix = _strip_prefix(list(source.specs))
    count = _check_fits(card, source.specs, prefix, checkpoint)
    folder = stage / "transformer"
    folder.mkdir(parents=True)
    specs = {NET_PREFIX + name[len(prefix):]: spec for name, spec in source.specs.items()}
    tensors = ((NET_PREFIX + name[len(prefix):], tensor) for name, tensor in source.tensors())
    with open(folder / WEIGHTS_NAME, "wb") as handle:
        write_safetensors(handle, specs, tensors, metadata={"format": "pt"})
    config = {
        "_class_name": "DeepFlowTransformer2DModel", "_diffusers_version": _diffusers_version(),
        "model_name": card.model, "model_kwargs": _model_kwargs(card), "condition": card.condition,
        "sample_kind": decode.kind, "latent_scale": decode.scale if decode.kind == "vae" else None,
        "vae": vae_name, "export_version": EXPORT_VERSION,
    }
    _write_json(folder / "config.json", config)
    return card, count


# ------------------------------------------------------------------------------------------------- scheduler
def _write_scheduler(stage: Path, sampler: SamplerConfig, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(sampler_option_names()))
    if unknown:
        allowed = ", ".join(sampler_option_names()) or "none"
        raise ValueError(f"sampler options: unknown {', '.join(unknown)} (deepflow.models.sampling.sample takes: "
                         f"{allowed})")
    config = {
        "_class_name": "DeepFlowFlowScheduler", "_diffusers_version": _diffusers_version(),
        "method": sampler.method, "num_inference_steps": sampler.steps, "guidance_scale": sampler.cfg_scale,
        "guidance_interval": list(sampler.guidance_interval), "sampler_options": dict(options),
        "export_version": EXPORT_VERSION,
    }
    (stage / "scheduler").mkdir(parents=True)
    _write_json(stage / "scheduler" / "scheduler_config.json", config)


# ------------------------------------------------------------------------------------------------------- vae
def _write_vae(stage: Path, vae_id: str | None) -> tuple[str | None, list[str]]:
    """vae/ of a latent model: the AutoencoderKL loaded from a local folder or the local hub cache and saved
    (safetensors); else its config (known SD VAEs) and a note. Returns (the VAE's recorded name, notes)."""
    from diffusers import AutoencoderKL

    folder = stage / "vae"
    folder.mkdir(parents=True)
    if not vae_id or vae_id == "random_init":
        note = ("vae/: the model card names no VAE (a latent model trained on a randomly initialised VAE cannot be "
                "decoded); put the AutoencoderKL that encoded the training data here")
        (folder / "README.md").write_text(note + "\n")
        return None, [note]
    local = os.path.isdir(vae_id)
    name = Path(vae_id).name if local else vae_id
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # hub-client deprecation chatter on a cache miss
            vae = AutoencoderKL.from_pretrained(vae_id, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - not in the local cache (hub errors of several kinds) or not a VAE
        if local:
            raise ValueError(f"vae: {vae_id}: not a diffusers AutoencoderKL folder "
                             f"({str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__})"
                             ) from None
        vae = None
    if vae is not None:
        vae.save_pretrained(folder, safe_serialization=True)
        return name, []
    if vae_id in SD_VAE_IDS:
        _write_json(folder / "config.json", {**SD_VAE_CONFIG, "_diffusers_version": _diffusers_version()})
    note = (f"vae/: the weights of the AutoencoderKL {vae_id!r} are not on this machine: put its "
            f"diffusion_pytorch_model.safetensors{'' if vae_id in SD_VAE_IDS else ' and config.json'} in vae/ "
            f"(e.g. `hf download {vae_id} --local-dir <folder>/vae`), or pass "
            f"vae=AutoencoderKL.from_pretrained({vae_id!r}) to from_pretrained")
    (folder / "README.md").write_text(note + "\n")
    return name, [note]


# ------------------------------------------------------------------------------------------------------ text
def _text_manifest(card: ModelCard, dataset: str | None, storage_options: dict[str, Any] | None) -> Any:
    """The caption dataset's manifest: an explicit ``dataset`` first, else the card's own, else its data URL's."""
    if dataset:
        return prompts.open_dataset(dataset, storage_options).manifest
    if card.manifest is not None and card.manifest.text is not None:
        return card.manifest
    if card.data_url:
        return prompts.open_dataset(card.data_url, storage_options).manifest
    raise ValueError(f"dataset: {card.model} is a text-to-image model but its card records no caption dataset "
                     "(manifest or data_url); give the caption dataset with --dataset")


def _write_text_encoder(stage: Path, manifest: Any) -> tuple[dict[str, Any], tuple[str, str], tuple[str, str]]:
    """text_encoder/ + tokenizer/ with the encoder the dataset's captions were encoded with; returns
    (text_encoding settings, model_index entry of the encoder, of the tokenizer)."""
    from deepflow.data_pipeline.config import TransformersTextConfig
    from deepflow.data_pipeline.text_encoders import build_text_encoder, resolve_model_path

    config = prompts.text_encoder_config(manifest)
    if not isinstance(config, TransformersTextConfig):
        raise ValueError(f"text encoder: the dataset's captions were encoded with {config.kind} "
                         f"({getattr(config, 'model', '?')}); the diffusers export takes transformers text encoders")
    encoder = build_text_encoder(config, torch.device("cpu"))
    model: Any = encoder.model
    if encoder.model_type == "clip":
        from transformers import AutoModel, CLIPTextModelWithProjection

        full = AutoModel.from_pretrained(resolve_model_path(config.model), revision=config.revision)
        model = CLIPTextModelWithProjection(full.config.text_config)
        model.load_state_dict({k: v for k, v in full.state_dict().items()
                               if k.startswith(("text_model.", "text_projection."))})
    elif encoder.projection is not None or not hasattr(model, "save_pretrained"):
        raise ValueError(f"text encoder: {config.model} (model type {encoder.model_type}) cannot be exported to "
                         "diffusers yet (BERT-like encoders such as MiniLM and CLIP text towers can)")
    model.save_pretrained(stage / "text_encoder", safe_serialization=True)
    encoder.tokenizer.save_pretrained(stage / "tokenizer")
    settings = {"max_length": int(encoder.max_length), "pooling": str(encoder.pooling),
                "dynamic_padding": bool(config.dynamic_padding)}
    return settings, ("transformers", type(model).__name__), ("transformers", type(encoder.tokenizer).__name__)


# ---------------------------------------------------------------------------------------------- the folder
def _diffusers_version() -> str:
    import diffusers

    return str(diffusers.__version__)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _readme(card: ModelCard, count: int, decode: DecodeSpec, notes: list[str], sampler: SamplerConfig) -> str:
    call = ('pipe(prompt=["a red apple"], guidance_scale=2.0, output_type="pil").images' if card.condition == "text"
            else 'pipe(class_labels=[0, 1], guidance_scale=1.5, generator=torch.Generator().manual_seed(0)).images')
    lines = [
        f"# {card.model} (DeepFlow, diffusers format)", "",
        f"{'Text-to-image' if card.condition == 'text' else 'Class-conditional'} flow model, {count:,} parameters, "
        f"{'latent' if decode.kind == 'vae' else 'pixel'}-space samples; exported by deepflow {__version__} "
        f"(`deepflow export --format diffusers`, export version {EXPORT_VERSION}).", "",
        "Needs torch, diffusers, safetensors" + (", transformers" if card.condition == "text" else "")
        + "; the model and sampler code is in this folder:", "",
        "```python", "import torch", "from diffusers import DiffusionPipeline", "",
        'pipe = DiffusionPipeline.from_pretrained("<this folder>", trust_remote_code=True)',
        f"images = {call}", "```", "",
        f"Sampler defaults (scheduler/scheduler_config.json): {sampler.method}, {sampler.steps} steps, guidance "
        f"{sampler.cfg_scale} in {list(sampler.guidance_interval)}. `seed=N` instead of `generator` gives the noise "
        "of `deepflow sample --seed N`, hence the same images.",
    ]
    if notes:
        lines += ["", "## Missing", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def _forbidden_strings(paths: list[str | None]) -> list[str]:
    """Absolute local paths that must not appear in the folder (this machine's)."""
    found = {str(Path(sys.prefix).resolve()), str(Path(__file__).resolve().parents[3])}
    for path in paths:
        if path and not is_remote_url(path) and os.path.exists(path):
            found.add(str(Path(path).resolve()))
            found.add(os.path.abspath(path))
    return sorted(value for value in found if len(value) > 1)


def _scrub(stage: Path, forbidden: list[str]) -> None:
    """Drop the saved-from paths transformers / diffusers leave in configs, then refuse any local path left."""
    for path in stage.rglob("*.json"):
        value = json.loads(path.read_text())
        if isinstance(value, dict) and any(key in value for key in ("_name_or_path", "name_or_path")):
            value.pop("_name_or_path", None)
            value.pop("name_or_path", None)
            _write_json(path, value)
    forbidden = [*forbidden, str(stage.resolve())]
    for path in stage.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".py", ".md", ".txt"):
            text = path.read_text(errors="replace")
            leaked = [value for value in forbidden if value in text]
            if leaked:
                raise RuntimeError(f"export: {path.relative_to(stage)} holds the local path {leaked[0]}")


def _publish(stage: Path, out: str, overwrite: bool, storage_options: dict[str, Any] | None) -> str:
    """Move the staged folder to ``out`` (local: a rename beside it; an object store: an upload)."""
    storage = Storage(out, storage_options)
    local_files = storage.is_local and os.path.isdir(storage.root) and os.listdir(storage.root)
    if storage.exists("model_index.json") or local_files:
        if not overwrite:
            raise ValueError(f"out: {out} exists and is not empty; give --overwrite to replace a previous export")
        if not storage.exists("model_index.json"):
            raise ValueError(f"out: {out} is not empty and holds no model_index.json: not replaced")
    if not storage.is_local:
        if storage.exists("model_index.json"):
            storage.remove_tree("")
        storage.put_tree(str(stage), "")
        return storage.url
    target = Path(storage.root)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    stage.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return storage.url


def export_diffusers(
    checkpoint: str,
    out: str,
    *,
    sampler: SamplerConfig | None = None,
    sampler_options: dict[str, Any] | None = None,
    vae: str | None = None,
    dataset: str | None = None,
    overwrite: bool = False,
    storage_options: Callable[[str], dict[str, Any] | None] = lambda url: None,
) -> ExportResult:
    """Write the diffusers pipeline folder of ``checkpoint`` (anything ``artifacts.open_weights`` reads) to ``out``.

    ``sampler`` / ``sampler_options``: the scheduler's defaults (method, steps, guidance; further arguments of
    ``deepflow.models.sampling.sample``; the config's own options first, ``sampler_options`` over them). ``vae``: the AutoencoderKL of a latent model (default: the one the model
    card or its data record). ``dataset``: the caption dataset of a text model (default: the card's).
    """
    sampler = sampler or SamplerConfig()
    options = {**sampler.options(), **(sampler_options or {})}
    try:
        source = open_weights(checkpoint, storage_options(checkpoint))
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"checkpoint: {error}") from None
    decode = DecodeSpec.resolve(vae=vae, card=source.card, in_channels=int(source.card.kwargs.get("in_channels", 3)))
    out_storage = Storage(out, storage_options(out))
    local_parent = Path(out_storage.root).parent if out_storage.is_local else None
    if local_parent is not None:
        local_parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".deepflow-export-", dir=local_parent))
    try:
        notes: list[str] = []
        vae_name: str | None = None
        index: dict[str, Any] = {
            "_class_name": [PIPELINE_FILE[: -len(".py")], "DeepFlowPipeline"], "_diffusers_version": _diffusers_version(),
            "transformer": ["deepflow_transformer", "DeepFlowTransformer2DModel"],
            "scheduler": ["deepflow_scheduler", "DeepFlowFlowScheduler"],
            "vae": [None, None], "text_encoder": [None, None], "tokenizer": [None, None],
            "export_version": EXPORT_VERSION, "text_encoding": None,
        }
        if decode.kind == "vae":
            vae_name, notes = _write_vae(stage, decode.vae)
            index["vae"] = ["diffusers", "AutoencoderKL"]
        card, count = _write_transformer(stage, checkpoint, source, decode, vae_name)
        _write_scheduler(stage, sampler, options)
        text_paths: list[str | None] = []
        if card.condition == "text":
            manifest = _text_manifest(card, dataset, storage_options(dataset or card.data_url or ""))
            index["text_encoding"], index["text_encoder"], index["tokenizer"] = [
                list(x) if isinstance(x, tuple) else x for x in _write_text_encoder(stage, manifest)]
            model_name = str(manifest.text.encoder.get("model", "")) if manifest.text else ""
            if model_name:
                from deepflow.data_pipeline.text_encoders import resolve_model_path

                text_paths.append(resolve_model_path(model_name))
        for relative, text in generate_code().files.items():
            (stage / relative).parent.mkdir(parents=True, exist_ok=True)
            (stage / relative).write_text(text)
        _write_json(stage / "model_index.json", index)
        (stage / "README.md").write_text(_readme(card, count, decode, notes, sampler))
        _scrub(stage, _forbidden_strings([checkpoint, decode.vae, dataset, out, *text_paths]))
        components = sorted(k for k, v in index.items() if isinstance(v, list) and v[0] is not None
                            and not k.startswith("_"))
        url = _publish(stage, out, overwrite, storage_options(out))
        return ExportResult(url=url, model=card.model, parameters=count, components=components, notes=notes)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
