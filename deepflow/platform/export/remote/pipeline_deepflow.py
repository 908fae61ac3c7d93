"""DeepFlowPipeline: class-conditional or text-to-image generation with a DeepFlow model, as a diffusers pipeline.

Written by ``deepflow export --format diffusers`` (the deepflow package's
``deepflow/platform/export/remote/pipeline_deepflow.py``); loads without the deepflow package:

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    images = pipe(class_labels=[207, 360], num_inference_steps=250, guidance_scale=1.5,
                  generator=torch.Generator().manual_seed(0)).images          # class-conditional
    images = pipe(prompt=["a red apple"], guidance_scale=2.0).images          # text-to-image

Noise: ``generator`` (diffusers' convention: the initial noise and the SDE's step noise come from it), ``latents``
(the initial noise itself, [B,C,H,W]) or ``seed``: the noise of ``deepflow sample --seed <seed>`` (row k = sample k
of that job; the SDE's step noise as its first batch), so the same seed gives the same images.

Images: ``output_type`` "pil" (uint8 by the rule of ``deepflow sample``: clamp(127.5 x + 128, 0, 255) truncated),
"np" (float [B,H,W,C] in [0, 1]), "pt" (float [B,C,H,W] in [0, 1]) or "latent" (the model's samples, before the VAE).
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .deepflow_export_common import EXPORT_VERSION, check_export_version, copy_code, tidy_config

PIPELINE_FILE = "pipeline_deepflow.py"
#: model_index.json entries of the components whose code lives in their folder
CUSTOM_COMPONENTS = {"transformer": ("deepflow_transformer", "DeepFlowTransformer2DModel"),
                     "scheduler": ("deepflow_scheduler", "DeepFlowFlowScheduler")}
#: files a component folder must hold (the first existing of each tuple)
COMPONENT_FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "transformer": (("config.json",), ("diffusion_pytorch_model.safetensors",), ("deepflow_transformer.py",)),
    "scheduler": (("scheduler_config.json",), ("deepflow_scheduler.py",)),
    "vae": (("config.json",), ("diffusion_pytorch_model.safetensors",)),
    "text_encoder": (("config.json",), ("model.safetensors", "model.safetensors.index.json")),
    "tokenizer": (("tokenizer_config.json",),),
}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


# <deepflow-export:functions>
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [B,C,H,W] in [-1, 1] -> uint8 [B,C,H,W] (replaced by the export with the deepflow package's own)."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)


def seed_for(*parts: int) -> int:
    """A seed that is a function of ``parts`` (replaced by the export with the deepflow package's own)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def initial_noise(indices: np.ndarray, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """float32 [len(indices), *shape] (replaced by the export with the deepflow package's own)."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(seed_for(seed, 0, int(i)))) for i in indices]
    return torch.stack(rows) if rows else torch.zeros((0, *shape))
# </deepflow-export:functions>


def _loading_context() -> tuple[Optional[str], dict[str, Any]]:
    """(folder, components passed by the caller) when called from ``DiffusionPipeline.from_pretrained`` on a local
    folder (read from its frame: diffusers offers no hook that sees the folder before loading the components)."""
    frame = inspect.currentframe()
    for _ in range(6):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            break
        if frame.f_code.co_name == "from_pretrained" and "cached_folder" in frame.f_locals:
            folder = frame.f_locals.get("cached_folder")
            passed = {**(frame.f_locals.get("passed_pipe_kwargs") or {}),
                      **(frame.f_locals.get("passed_class_obj") or {})}
            return (str(folder) if folder and os.path.isdir(str(folder)) else None), passed
    return None, {}


def _vae_hint(folder: str) -> str:
    try:
        config = json.loads(Path(folder, "transformer", "config.json").read_text())
    except (OSError, ValueError):
        return "the AutoencoderKL the model was trained with"
    return f"the AutoencoderKL {config.get('vae') or 'the model was trained with'!r}"


def check_folder(folder: str, model_index: dict[str, Any], passed: dict[str, Any]) -> None:
    """ValueError (one line naming the missing file and what to do) for a component folder that is missing or
    incomplete; components given to ``from_pretrained`` need no folder."""
    for name, entry in model_index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None or name in passed:
            continue
        if name in CUSTOM_COMPONENTS and tuple(entry) != CUSTOM_COMPONENTS[name]:
            raise ValueError(f"{folder}/model_index.json: {name} is {entry}, expected {list(CUSTOM_COMPONENTS[name])}")
        for candidates in COMPONENT_FILES.get(name, ()):
            if any(os.path.isfile(os.path.join(folder, name, file)) for file in candidates):
                continue
            missing = f"{folder}/{name}/{candidates[0]}"
            if name == "vae":
                hint = _vae_hint(folder)
                raise ValueError(f"{missing}: missing: this latent model decodes with {hint}: put its files in "
                                 f"{folder}/vae/, or pass vae=AutoencoderKL.from_pretrained(...) to from_pretrained")
            raise ValueError(f"{missing}: missing ({name} is a component of this DeepFlow pipeline); export the "
                             "folder again with `deepflow export --format diffusers`")


class DeepFlowPipeline(DiffusionPipeline):
    """Sampling of a DeepFlow model: noise -> flow sampler (``scheduler``) with classifier-free guidance ->
    VAE decoding for latent models -> images.

    Components: ``transformer`` (DeepFlowTransformer2DModel), ``scheduler`` (DeepFlowFlowScheduler), ``vae``
    (AutoencoderKL; latent models only), ``text_encoder`` + ``tokenizer`` (text-to-image models only: the encoder
    the training captions were encoded with; None where the model has none: they are diffusers' optional
    components, and passing one to ``from_pretrained`` replaces the folder's). Config: ``export_version``, ``text_encoding`` (``max_length``,
    ``pooling`` "mean" | "first" | "pooler", ``dynamic_padding``: how captions become the model's text condition).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]

    def __init__(
        self,
        transformer: ModelMixin,
        scheduler: SchedulerMixin,
        vae: Optional[ModelMixin],
        text_encoder: Any,
        tokenizer: Any,
        export_version: int = EXPORT_VERSION,
        text_encoding: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        check_export_version(export_version, "model_index.json")
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer)
        self.register_to_config(export_version=export_version, text_encoding=text_encoding)

    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """``model_index.json`` as read by ``from_pretrained``, before any component loads: its export version, and
        (for a local folder) that every component's files are there, each checked with a one-line error."""
        folder, passed = _loading_context()
        where = "model_index.json" if folder is None else os.path.join(folder, "model_index.json")
        check_export_version(config_dict.get("export_version"), where)
        if folder is not None:
            check_folder(folder, config_dict, passed)
        return super().extract_init_dict(config_dict, **kwargs)

    # --------------------------------------------------------------------------------------------- conditions
    def _class_condition(self, class_labels: Any, device: torch.device) -> torch.Tensor:
        """int64 [B] labels in [0, num_classes)."""
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).to(device)
        num_classes = int(self.transformer.num_classes)
        if labels.numel() == 0:
            raise ValueError("class_labels: give at least one label")
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f"class_labels: must lie in [0, {num_classes}), got {labels.tolist()}")
        return labels

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """n captions -> the text condition the model was trained on: ``text_emb`` float32 [n,L,D], ``text_mask``
        bool [n,L], ``text_pooled`` float32 [n,P] (rounded through float16 as the training shards store them)."""
        if self.text_encoder is None or self.tokenizer is None or not self.config.text_encoding:
            raise ValueError("this pipeline has no text encoder: it is class-conditional (pass class_labels)")
        settings = dict(self.config.text_encoding)
        length, dynamic = int(settings["max_length"]), bool(settings.get("dynamic_padding", False))
        tokens = self.tokenizer(list(prompts), padding="longest" if dynamic else "max_length", truncation=True,
                                max_length=length, return_tensors="pt")
        encoder_device = self.text_encoder.device
        input_ids, attention = tokens["input_ids"].to(encoder_device), tokens["attention_mask"].to(encoder_device)
        outputs = self.text_encoder(input_ids=input_ids, attention_mask=attention)
        hidden = outputs.last_hidden_state.float()
        mask = attention.bool()
        if hidden.shape[1] < length:  # dynamic padding: zeros at the positions that were not run
            hidden = torch.nn.functional.pad(hidden, (0, 0, 0, length - hidden.shape[1]))
            mask = torch.nn.functional.pad(mask, (0, length - mask.shape[1]))
        if dynamic:
            hidden = hidden * mask.unsqueeze(-1)
        pooling = settings.get("pooling", "mean")
        if pooling == "pooler":
            pooled = getattr(outputs, "text_embeds", None)
            pooled = getattr(outputs, "pooler_output", None) if pooled is None else pooled
            if pooled is None:
                raise ValueError("text_encoding.pooling 'pooler': the text encoder has no pooled output")
            pooled = pooled.float()
        elif pooling == "first":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).float()
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return {"text_emb": hidden.half().float().to(device), "text_mask": mask.to(device),
                "text_pooled": pooled.half().float().to(device)}

    def _text_condition(self, prompt: Union[str, list[str]], negative_prompt: Union[str, list[str], None],
                        device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(condition of the prompts, null condition: the negative prompt's encoding, by default the empty
        caption's, as in training; one null condition for every row)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt: give a caption string or a list of them")
        negatives = [negative_prompt or ""] if not isinstance(negative_prompt, list) else list(negative_prompt)
        if len(set(negatives)) != 1:
            raise ValueError("negative_prompt: one negative prompt for all rows (guidance pushes away from one null "
                             "condition)")
        condition = self.encode_prompt(prompts, device)
        null = {key: value[0] for key, value in self.encode_prompt(negatives[:1], device).items()}
        return condition, null

    # ---------------------------------------------------------------------------------------------- sampling
    def _noise(self, batch: int, generator: Any, latents: Optional[torch.Tensor], seed: Optional[int],
               device: torch.device) -> tuple[torch.Tensor, Optional[torch.Generator]]:
        """(initial noise float32 [B,C,H,W] on ``device``, the generator of the SDE's step noise)."""
        shape = (self.transformer.in_channels, self.transformer.sample_size, self.transformer.sample_size)
        if seed is not None and (generator is not None or latents is not None):
            raise ValueError("seed: give either seed (the noise of deepflow sample) or generator/latents, not both")
        if latents is not None:
            if tuple(latents.shape) != (batch, *shape):
                raise ValueError(f"latents: expected shape {(batch, *shape)}, got {tuple(latents.shape)}")
            noise = latents.to(device=device, dtype=torch.float32)
        elif seed is not None:
            noise = initial_noise(np.arange(batch, dtype=np.int64), shape, int(seed)).to(device)
            generator = torch.Generator(device=device).manual_seed(seed_for(int(seed), 1, 0))
        else:
            noise = randn_tensor((batch, *shape), generator=generator, device=device, dtype=torch.float32)
        if isinstance(generator, list):
            generator = generator[0]
        return noise, generator

    def _decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model samples [B,C,h,w] -> float images [B,C',H,W] (about [-1, 1])."""
        if self.transformer.config.sample_kind == "pixel":
            return x0
        if self.vae is None:
            raise ValueError(f"this latent model needs its VAE ({self.transformer.config.vae!r}) to decode: load the "
                             "pipeline with vae=AutoencoderKL.from_pretrained(...) or put the VAE in vae/")
        scale = float(self.transformer.config.latent_scale)
        z = (x0 / scale).to(device=self.vae.device, dtype=self.vae.dtype)
        return self.vae.decode(z).sample.float()

    @staticmethod
    def _images(decoded: torch.Tensor, output_type: str) -> Any:
        if output_type == "pil":
            pixels = to_uint8(decoded).permute(0, 2, 3, 1).cpu().numpy()
            return [PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image) for image in pixels]
        images = (decoded.float() / 2 + 0.5).clamp(0, 1)
        return images.cpu().permute(0, 2, 3, 1).numpy() if output_type == "np" else images

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, list[int], torch.Tensor, None] = None,
        prompt: Union[str, list[str], None] = None,
        negative_prompt: Union[str, list[str], None] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        guidance_interval: Optional[tuple[float, float]] = None,
        generator: Union[torch.Generator, list[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        seed: Optional[int] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        **sampler_options: Any,
    ) -> Union[ImagePipelineOutput, tuple[Any]]:
        """Generate one image per class label (class models) or per prompt (text models).

        ``num_inference_steps``, ``guidance_scale`` (1 = no guidance) and ``guidance_interval`` ((low, high): the
        times t in [0, 1] where guidance applies) default to the scheduler's config; further keyword arguments are
        options of the scheduler's sampling method. Noise: see the module docstring (``generator``, ``latents`` or
        ``seed``). Returns ``ImagePipelineOutput(images)`` (or a 1-tuple without ``return_dict``).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")
        device = self._execution_device
        null_label: Optional[int] = None
        null_condition: Any = None
        if self.transformer.config.condition == "text":
            if prompt is None or class_labels is not None:
                raise ValueError("this DeepFlow is text-to-image: pass prompt=... (not class_labels)")
            condition: Any
            condition, null_condition = self._text_condition(prompt, negative_prompt, device)
            batch = int(condition["text_emb"].shape[0])
        else:
            if class_labels is None or prompt is not None or negative_prompt is not None:
                raise ValueError("this DeepFlow is class-conditional: pass class_labels=... (not prompt)")
            condition = self._class_condition(class_labels, device)
            null_label, batch = int(self.transformer.num_classes), int(condition.shape[0])
        noise, step_generator = self._noise(batch, generator, latents, seed, device)
        steps = int(num_inference_steps or self.scheduler.config.num_inference_steps)
        dtype = self.transformer.dtype
        with self.progress_bar(total=self.scheduler.evaluations(steps, **sampler_options)) as bar:

            def velocity(x: torch.Tensor, t: torch.Tensor, y: Any, **kwargs: Any) -> Any:
                """The network in its dtype, float32 in and out (the sampler integrates in float32)."""
                if isinstance(y, dict):
                    y = {k: v.to(dtype) if v.is_floating_point() else v for k, v in y.items()}
                out = self.transformer.velocity(x.to(dtype), t.to(dtype), y, **kwargs)
                bar.update(1)
                return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

            x0 = self.scheduler.sample(velocity, noise, condition, num_inference_steps=steps,
                                       guidance_scale=guidance_scale, guidance_interval=guidance_interval,
                                       null_label=null_label, null_condition=null_condition,
                                       generator=step_generator, **sampler_options)
        images = x0.float() if output_type == "latent" else self._images(self._decode(x0), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # ------------------------------------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: Union[str, os.PathLike[str]], *args: Any, **kwargs: Any) -> None:
        """diffusers' save, plus the code: this file and the shared module it imports at the root, each custom
        component's modules in its folder (they copy their own); ``model_index.json`` names them so that the folder
        loads like the exported one."""
        super().save_pretrained(save_directory, *args, **kwargs)
        copy_code((), __file__, save_directory, PIPELINE_FILE)
        tidy_config(Path(save_directory) / "model_index.json", lambda index: {
            "_class_name": [PIPELINE_FILE[: -len(".py")], type(self).__name__],
            **{name: list(entry) for name, entry in CUSTOM_COMPONENTS.items() if name in index}})

