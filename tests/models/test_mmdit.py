"""DeepFlowMMDiT: registry, zero-init, inference path, text masking, gradients, checkpointing, compile, FLOPs."""

from __future__ import annotations

import pytest
import torch

from deepflow.models import BranchOutputs, DeepFlowMMDiT, create_model

from .helpers import (
    TINY_MMDIT,
    check_compile_fullgraph,
    check_flops_match_measured,
    check_gradient_checkpointing,
    check_inference_equals_last_branch,
    check_time_shape_errors,
    check_zero_initialised_outputs,
    materialize_and_check_pos_embed,
    randomize_,
    text_inputs,
    tiny_mmdit,
)


def test_registry_names_defaults_and_errors():
    with torch.device("meta"):
        big = create_model("DeepFlow-MMDiT-24-3T")
        plain = create_model("MMDiT-24", context_dim=384)
    assert isinstance(big, DeepFlowMMDiT) and big.key_layers == [8, 16, 24] and big.num_branches == 3
    assert (big.hidden_size, big.num_heads, big.depth, big.patch_size) == (768, 24, 24, 2)  # REPA's COCO MMDiT
    assert big.context_dim == 768 and big.pooled_dim == 768 and big.text_dropout == 0.1
    assert plain.num_branches == 1 and plain.context_embedder.in_features == 384
    assert not hasattr(plain, "vera_blocks") and len(plain.velocity_heads) == 1
    # the last block's text stream only provides keys/values; all others are full joint blocks
    assert big.blocks[-1].context_pre_only and not any(b.context_pre_only for b in big.blocks[:-1])
    assert big.blocks[-1].text.adaLN_modulation[1].out_features == 2 * 768
    for name, match in [("MMDiT-24-3T", "MMDiT has one branch"), ("DeepFlow-MMDiT-24", "branch count"),
                        ("DeepFlow-MMDiT-24-7T", "branch count"), ("MMDiT-x", "unknown model name")]:
        with pytest.raises(ValueError, match=match):
            create_model(name)
    with pytest.raises(TypeError, match="depth is part of the name"):
        create_model("MMDiT-4", depth=6)
    with pytest.raises(TypeError, match="num_classes"):
        create_model("MMDiT-4", num_classes=10)
    assert create_model("MMDiT-2", class_dropout=0.2, **TINY_MMDIT).text_dropout == 0.2


def test_meta_build_then_materialize():
    with torch.device("meta"):
        model = tiny_mmdit(qk_norm=True)
    materialize_and_check_pos_embed(model)
    assert torch.equal(model.blocks[0].image.qk_norm.q.weight, torch.ones(16))
    x, t, cond = text_inputs(model)
    assert torch.isfinite(model(x, t, cond)).all()


@pytest.mark.parametrize("name", ["MMDiT-2", "DeepFlow-MMDiT-3-3T"])
def test_zero_initialised_heads_give_zero_output(name):
    torch.manual_seed(0)
    model = tiny_mmdit(name, ssl_align=name.startswith("DeepFlow"))
    check_zero_initialised_outputs(model, *text_inputs(model))


def test_forward_backward_shapes_and_every_parameter_gets_gradient():
    model = randomize_(tiny_mmdit("DeepFlow-MMDiT-3-3T", ssl_align=True, qk_norm=True), std=0.1)
    x, t, cond = text_inputs(model, batch=2)
    times = torch.stack([t, (t - 0.01).clamp(0, 1), (t - 0.02).clamp(0, 1)], dim=1)
    out = model.forward_train(x, times, cond)
    assert isinstance(out, BranchOutputs)
    assert [v.shape for v in out.velocities] == [x.shape] * 3
    assert [a.shape for a in out.accelerations] == [x.shape] * 2
    assert [p.shape for p in out.projections] == [(2, model.num_tokens, 16)] * 2
    sum(o.square().mean() for o in out.velocities + out.accelerations + out.projections).backward()
    # no unused parameters (DDP without find_unused_parameters): the last block's text stream is pre-only
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []


@pytest.mark.parametrize("name", ["MMDiT-2", "DeepFlow-MMDiT-4-2T", "DeepFlow-MMDiT-3-3T"])
def test_inference_equals_last_branch_of_training_forward(name):
    model = randomize_(tiny_mmdit(name)).eval()
    x, t, cond = text_inputs(model)
    check_inference_equals_last_branch(model, x, t, cond)
    torch.testing.assert_close(model(x, t[0], cond)[:1], model(x[:1], t[:1], {n: c[:1] for n, c in cond.items()}))


def test_padding_tokens_do_not_change_the_output():
    model = randomize_(tiny_mmdit("DeepFlow-MMDiT-3-3T")).eval()
    x, t, cond = text_inputs(model, batch=3, length=6)
    times = torch.stack([t, (t + 0.02).clamp(0, 1), (t + 0.04).clamp(0, 1)], dim=1)
    v = model(x, t, cond)
    ref = model.forward_train(x, times, cond)
    assert not cond["text_mask"].all()
    # 1) new values in the padded positions
    junk = 50.0 * torch.randn_like(cond["text_emb"])
    noisy = dict(cond, text_emb=torch.where(cond["text_mask"][..., None], cond["text_emb"], junk))
    torch.testing.assert_close(model(x, t, noisy), v, rtol=1e-4, atol=1e-5)
    # 2) three more padding tokens (longer L)
    pad = 3
    longer = {
        "text_emb": torch.cat([cond["text_emb"], torch.randn(3, pad, model.context_dim)], dim=1),
        "text_mask": torch.cat([cond["text_mask"], torch.zeros(3, pad, dtype=torch.bool)], dim=1),
        "text_pooled": cond["text_pooled"],
    }
    torch.testing.assert_close(model(x, t, longer), v, rtol=1e-4, atol=1e-5)
    out = model.forward_train(x, times, longer)
    for a, b in zip(out.velocities + out.accelerations, ref.velocities + ref.accelerations):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # ... while a real token does matter, and only for its own row
    changed = dict(cond, text_emb=cond["text_emb"].clone())
    changed["text_emb"][2, 0] += 1.0
    v2 = model(x, t, changed)
    assert not torch.allclose(v2[2], v[2]) and torch.equal(v2[:2], v[:2])


def test_forward_rejects_bad_inputs():
    model = tiny_mmdit()
    x, t, cond = text_inputs(model)
    check_time_shape_errors(model, x, t, cond)
    with pytest.raises(TypeError, match="text condition dict"):
        model(x, t, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="missing"):
        model(x, t, {"text_emb": cond["text_emb"]})
    with pytest.raises(ValueError, match="bool"):
        model(x, t, dict(cond, text_mask=cond["text_mask"].long()))


def test_gradient_checkpointing_matches_plain_backward():
    model = randomize_(tiny_mmdit("DeepFlow-MMDiT-4-2T"), std=0.1)
    x, t, cond = text_inputs(model)
    check_gradient_checkpointing(model, x, torch.stack([t, (t - 0.01).clamp(0, 1)], dim=1), cond)


def test_compile_fullgraph_both_forwards():
    model = randomize_(tiny_mmdit("DeepFlow-MMDiT-2-2T"), std=0.1).eval()
    x, t, cond = text_inputs(model)
    check_compile_fullgraph(model, x, t, torch.stack([t, (t + 0.01).clamp(0, 1)], dim=1), cond)
    assert model.blocks[0].text.qkv.weight.grad is not None


@pytest.mark.parametrize("name,ssl", [("MMDiT-2", False), ("DeepFlow-MMDiT-3-3T", True)])
def test_flops_per_image_matches_measured_count(name, ssl):
    model = tiny_mmdit(name, ssl_align=ssl)
    check_flops_match_measured(model, *text_inputs(model, batch=2, length=5), text_length=5)
    assert model.flops_per_image() == model.flops_per_image(text_length=6)  # max_text_length by default
