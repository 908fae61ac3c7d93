"""DeepFlowTransformer2DModel: a DeepFlow / SiT / DeepFlow-MMDiT network as a diffusers ``ModelMixin``.

Written into ``transformer/`` by ``deepflow export --format diffusers`` (the deepflow package's
``deepflow/platform/export/remote/deepflow_transformer.py``). The network itself is built by the deepflow model
modules copied next to this file (``deepflow_<tag>_*.py``: the package's ``deepflow/models`` modules, their imports
rewritten to relative ones by the export), so this folder needs torch, diffusers and safetensors only.

Time convention: t = 0 is data, t = 1 is noise, x_t = (1 - t) x0 + t eps; the network predicts the velocity
eps - x0.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

from .deepflow_export_common import EXPORT_VERSION, check_export_version, copy_code, tidy_config

# diffusers copies into its module cache only the modules that this file imports directly, so every copied deepflow
# module is imported here (the export writes this block).
# <deepflow-export:imports>
from .deepflow_models_registry import create_model

CODE_MODULES: tuple[str, ...] = ("deepflow_models_registry",)
# </deepflow-export:imports>

CONFIG_FILE = "transformer/config.json"


class DeepFlowTransformer2DModel(ModelMixin, ConfigMixin):
    """The velocity network v(x_t, t, condition) of a DeepFlow model (``net``: the deepflow package's own class).

    Config: ``model_name`` + ``model_kwargs`` (``create_model(model_name, **model_kwargs)``), ``condition``
    ("class" or "text"), ``sample_kind`` ("pixel": samples are images in [-1, 1]; "vae": latents decoded by the VAE
    after division by ``latent_scale``), ``vae`` (which AutoencoderKL decodes them), ``export_version``.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        model_name: str = "",
        model_kwargs: Optional[dict[str, Any]] = None,
        condition: str = "class",
        sample_kind: str = "pixel",
        latent_scale: Optional[float] = None,
        vae: Optional[str] = None,
        export_version: int = EXPORT_VERSION,
    ) -> None:
        super().__init__()
        check_export_version(export_version, CONFIG_FILE)
        if condition not in ("class", "text"):
            raise ValueError(f"{CONFIG_FILE}: condition must be 'class' or 'text', got {condition!r}")
        if sample_kind not in ("pixel", "vae"):
            raise ValueError(f"{CONFIG_FILE}: sample_kind must be 'pixel' or 'vae', got {sample_kind!r}")
        try:
            self.net = create_model(model_name, **(model_kwargs or {}))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{CONFIG_FILE}: cannot build {model_name!r}: {error}") from None

    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """The config as read from ``config.json``: its export version is checked before anything is built."""
        check_export_version(config_dict.get("export_version"), CONFIG_FILE)
        return super().extract_init_dict(config_dict, **kwargs)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def in_channels(self) -> int:
        return int(self.net.in_channels)

    @property
    def sample_size(self) -> int:
        """Height = width of the model's samples (pixels, or latents for ``sample_kind`` "vae")."""
        return int(self.net.input_size)

    @property
    def num_classes(self) -> Optional[int]:
        """Number of classes of a class-conditional model (its null class for guidance is ``num_classes``)."""
        return None if self.config.condition == "text" else int(self.net.num_classes)

    # ---------------------------------------------------------------------------------------------- forward
    def velocity(self, sample: torch.Tensor, timestep: torch.Tensor, condition: Any, **kwargs: Any) -> Any:
        """v [B,C,H,W] of ``sample`` x_t [B,C,H,W] at times ``timestep`` [B] in [0, 1] under ``condition``: class
        labels [B] long, or {"text_emb" [B,L,D], "text_mask" [B,L] bool, "text_pooled" [B,P]}. ``kwargs`` go to
        the network (e.g. ``return_acceleration=True``: (v, a) for the samplers that use DeepFlow's acceleration)."""
        return self.net(sample, timestep, condition, **kwargs)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        pooled_projections: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Velocity [B,C,H,W] of ``sample`` [B,C,H,W] at ``timestep`` (t in [0, 1], 1 = noise; [B] or a scalar).

        Class models take ``class_labels`` [B] long (``num_classes`` = the null class); text models take
        ``encoder_hidden_states`` [B,L,D], ``encoder_attention_mask`` [B,L] (True = real token) and
        ``pooled_projections`` [B,P].
        """
        t = torch.as_tensor(timestep, device=sample.device, dtype=sample.dtype)
        if t.ndim == 0:
            t = t.expand(sample.shape[0])
        if self.config.condition == "text":
            if encoder_hidden_states is None or encoder_attention_mask is None or pooled_projections is None:
                raise ValueError("a text-to-image DeepFlow needs encoder_hidden_states, encoder_attention_mask and "
                                 "pooled_projections")
            condition: Any = {"text_emb": encoder_hidden_states, "text_mask": encoder_attention_mask.bool(),
                              "text_pooled": pooled_projections}
        else:
            if class_labels is None:
                raise ValueError("a class-conditional DeepFlow needs class_labels")
            condition = class_labels.long()
        out = self.velocity(sample, t, condition)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    # ------------------------------------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
        """diffusers' save (config.json + weights), plus this file and the deepflow modules it imports, so that
        the saved folder loads with ``trust_remote_code=True`` like the exported one."""
        super().save_pretrained(save_directory, *args, **kwargs)
        copy_code(CODE_MODULES, __file__, save_directory)
        tidy_config(Path(save_directory) / self.config_name)
