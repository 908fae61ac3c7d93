"""The one generate path: condition plans (class and text, with their null conditions), the sampler call, the
decoder choice and the uint8 rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deepflow.artifacts import Manifest, ModelCard
from deepflow.platform.inference.conditions import ClassPlan, TextPlan, dataset_plan, label_plan
from deepflow.platform.inference.generate import (
    DEFAULT_LATENT_SCALE,
    DecodeSpec,
    Decoder,
    SamplerConfig,
    generate,
    latent_scale,
    to_uint8,
)
from tests.models.helpers import randomize_, tiny_mmdit, tiny_model

PIXEL = Decoder(DecodeSpec("pixel"))


def _recorded_conditions(model: torch.nn.Module) -> list:
    seen: list = []
    model.register_forward_hook(lambda module, args, out: seen.append(args[2]))
    return seen


def test_uint8_rule_and_latent_scale_default() -> None:
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, -1)
    assert to_uint8(x).flatten().tolist() == [0, 0, 64, 128, 255, 255, 255]  # clamp(127.5 x + 128), truncated
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(to_uint8(pixels.float() / 127.5 - 1.0), pixels)  # dataset pixels come back exactly
    assert latent_scale() == latent_scale(None, None) == DEFAULT_LATENT_SCALE == 0.18215
    assert latent_scale(None, 0.13, 0.5) == 0.13


def test_decode_spec_from_settings_card_and_manifest() -> None:
    latent = Manifest(kind="vae", shape=[4, 8, 8], latent_scale=0.2, encoder={"model": "data/vae"})
    card = ModelCard(model="m", kind="vae", vae="card/vae", latent_scale=0.3, manifest=latent)
    assert DecodeSpec.resolve(card=card, in_channels=4) == DecodeSpec("vae", "card/vae", 0.3)
    assert DecodeSpec.resolve(vae="flag/vae", scale=0.4, card=card) == DecodeSpec("vae", "flag/vae", 0.4)
    assert DecodeSpec.resolve("pixel", card=card) == DecodeSpec("pixel")
    assert DecodeSpec.resolve(card=ModelCard(model="m", manifest=latent)) == DecodeSpec("vae", "data/vae", 0.2)
    assert DecodeSpec.resolve(manifest=latent) == DecodeSpec("vae", "data/vae", 0.2)
    pixels = Manifest(kind="pixel", shape=[3, 8, 8])
    assert DecodeSpec.resolve(manifest=pixels, vae="ignored") == DecodeSpec("pixel")
    assert DecodeSpec.resolve(in_channels=3) == DecodeSpec("pixel")  # nothing recorded: channels decide
    assert DecodeSpec.resolve(in_channels=4) == DecodeSpec("vae", None, DEFAULT_LATENT_SCALE)
    with pytest.raises(ValueError, match=r"^eval\.vae: a latent model needs a VAE"):
        Decoder(DecodeSpec("vae", "random_init"), field="eval.vae")


def test_class_plan_guides_against_the_null_class_and_is_batch_invariant() -> None:
    model = randomize_(tiny_model(in_channels=3), seed=1).eval()
    plan = ClassPlan(label_plan("cyclic", 6, model.num_classes, seed=0), model.num_classes)
    assert plan.null_label == 10 and plan.null is None and plan.captions_of(np.arange(2)) is None
    seen = _recorded_conditions(model)
    sampler = SamplerConfig(method="euler", steps=2, cfg_scale=2.0)
    images = generate(model, plan, np.arange(4), seed=3, sampler=sampler, decoder=PIXEL)
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.uint8
    assert seen[0].tolist() == [0, 1, 2, 3, 10, 10, 10, 10]  # cond and null rows in one forward
    again = generate(model, plan, np.array([2, 3]), seed=3, sampler=sampler, decoder=PIXEL)
    assert torch.equal(again, images[2:])  # sample i depends on (seed, i), not on its batch
    other_seed = generate(model, plan, np.array([2, 3]), seed=4, sampler=sampler, decoder=PIXEL)
    assert not torch.equal(other_seed, again)
    sde = SamplerConfig(method="sde", steps=3, cfg_scale=1.0)
    first = generate(model, plan, np.arange(2), seed=3, sampler=sde, decoder=PIXEL)
    assert torch.equal(first, generate(model, plan, np.arange(2), seed=3, sampler=sde, decoder=PIXEL))
    np.testing.assert_array_equal(plan.labels_of(np.array([4, 5])), [4, 5])


def test_text_plan_guides_against_the_null_text() -> None:
    model = randomize_(tiny_mmdit(), seed=2).eval()
    g = torch.Generator().manual_seed(0)
    n, length = 5, model.max_text_length
    table = {"text_emb": torch.randn(n, length, model.context_dim, generator=g).half(),
             "text_mask": torch.ones(n, length, dtype=torch.bool),
             "text_pooled": torch.randn(n, model.pooled_dim, generator=g).half()}
    null = {"text_emb": torch.zeros(length, model.context_dim), "text_mask": torch.zeros(length, dtype=torch.bool),
            "text_pooled": torch.zeros(model.pooled_dim)}
    null["text_mask"][0] = True
    captions = [f"caption {i}" for i in range(n)]
    plan = TextPlan(captions[2:], null, lambda positions: {k: v[positions + 2] for k, v in table.items()}, offset=2)
    assert plan.null_label is None and plan.captions_of(np.array([3, 4])) == ["caption 3", "caption 4"]
    assert plan.labels_of(np.array([3, 4])).tolist() == [-1, -1]
    seen = _recorded_conditions(model)
    images = generate(model, plan, np.array([3, 4]), seed=0, sampler=SamplerConfig(method="euler", steps=1,
                                                                                   cfg_scale=3.0), decoder=PIXEL)
    assert images.shape == (2, model.in_channels, 8, 8) and images.dtype == torch.uint8
    cond = seen[0]
    assert cond["text_emb"].dtype == torch.float32 and cond["text_emb"].shape[0] == 4  # cond + null rows
    torch.testing.assert_close(cond["text_emb"][:2], table["text_emb"][3:5].float())
    torch.testing.assert_close(cond["text_emb"][2:], null["text_emb"].expand(2, -1, -1))
    assert torch.equal(cond["text_mask"][2:], null["text_mask"].expand(2, -1))


def test_dataset_plan_of_a_class_model_cycles_over_the_global_indices() -> None:
    model = tiny_model()
    plan = dataset_plan(model, "unused://", offset=8, count=4)
    assert isinstance(plan, ClassPlan)
    assert plan.labels_of(np.arange(8, 12)).tolist() == [8, 9, 0, 1]
