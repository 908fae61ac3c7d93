"""Text encoders with tiny randomly initialised open_clip towers (nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import torch

from deepflow.data_pipeline.config import OpenClipTextConfig
from deepflow.data_pipeline.text_encoders import build_text_encoder

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_open_clip_tokens_mask_pooled_and_null() -> None:
    config = OpenClipTextConfig(kind="open_clip", model="ViT-B-32", pretrained=None, model_kwargs=TINY_CLIP,
                                batch_size=2)
    torch.manual_seed(0)
    encoder = build_text_encoder(config, torch.device("cpu"))
    out = encoder.encode(["a cat", "two dogs on a sofa", ""])
    assert out["text_emb"].shape == (3, 77, 32) and out["text_emb"].dtype == np.float16
    assert out["text_pooled"].shape == (3, 16) and out["text_mask"].dtype == np.bool_
    # start token + words + end token; the mask covers exactly those positions
    assert out["text_mask"].sum(axis=1).tolist() == [4, 7, 2]
    assert out["text_mask"][0, :4].all() and not out["text_mask"][0, 4:].any()
    tokens = encoder.tokenizer(["a cat", "two dogs on a sofa", ""])
    with torch.no_grad():
        pooled = encoder.model.encode_text(tokens)
    np.testing.assert_allclose(out["text_pooled"], pooled.numpy(), atol=2e-3, rtol=2e-3)
    null = encoder.null()
    np.testing.assert_array_equal(null["text_emb"], out["text_emb"][2])
    assert encoder.describe()["name"] == "open_clip" and encoder.max_length == 77
