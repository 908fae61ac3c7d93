"""Registry, parameter counts, forwards, compile, checkpointing and FLOP counting of DeepFlowDiT."""

from __future__ import annotations

import pytest
import torch

from deepflow.models import create_model, list_models
from deepflow.models.layers import sincos_pos_embed_2d
from deepflow.models.registry import even_key_layers

from .helpers import (
    check_compile_fullgraph,
    check_flops_match_measured,
    check_gradient_checkpointing,
    check_inference_equals_last_branch,
    check_time_shape_errors,
    check_zero_initialised_outputs,
    inputs,
    materialize_and_check_pos_embed,
    randomize_,
    tiny_model,
)

# REFERENCE.md's table: (name, depth, input_size, exact parameter count, key layers or None)
PARAM_TABLE = [
    ("SiT-S/2", 12, 32, 32_957_200, [12]),
    ("SiT-B/2", 12, 32, 130_500_112, [12]),
    ("SiT-L/2", 24, 32, 458_086_416, [24]),
    ("SiT-XL/2", 28, 32, 675_111_184, [28]),
    ("DeepFlow-B/2-2T", 10, 32, 144_944_688, [5, 10]),
    ("DeepFlow-B/2-2T", 12, 32, 166_201_392, [6, 12]),
    ("DeepFlow-L/2-2T", 20, 32, 431_349_808, None),
    ("DeepFlow-L/2-2T", 22, 32, 469_129_264, None),
    ("DeepFlow-L/2-2T", 24, 32, 506_908_720, None),
    ("DeepFlow-XL/2-2T", 22, 32, 588_341_040, None),
    ("DeepFlow-XL/2-2T", 24, 32, 636_151_344, None),
    ("DeepFlow-XL/2-2T", 26, 32, 683_961_648, None),
    ("DeepFlow-XL/2-2T", 28, 32, 731_771_952, None),
    ("DeepFlow-L/2-3T", 18, 32, 433_438_768, [6, 12, 18]),
    ("DeepFlow-L/2-3T", 21, 32, 490_107_952, None),
    ("DeepFlow-L/2-3T", 24, 32, 546_777_136, None),
    ("DeepFlow-XL/2-3T", 18, 32, 538_128_432, None),
    ("DeepFlow-XL/2-3T", 21, 32, 609_843_888, None),
    ("DeepFlow-XL/2-3T", 24, 32, 681_559_344, [8, 16, 24]),
    ("DeepFlow-XL/2-3T", 27, 32, 753_274_800, None),
    ("DeepFlow-XL/2-4T", 28, 32, 822_587_952, [7, 14, 21, 28]),
    ("DeepFlow-XL/2-3T", 24, 64, 682_444_080, [8, 16, 24]),
    ("SiT-XL/2", 28, 64, 675_995_920, [28]),
]


@pytest.mark.parametrize("name,depth,input_size,count,key_layers", PARAM_TABLE)
def test_parameter_counts_match_reference_table(name, depth, input_size, count, key_layers):
    with torch.device("meta"):
        model = create_model(name, depth=depth, input_size=input_size)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == count
    if key_layers is not None:
        assert model.key_layers == key_layers


def test_paper_default_depths():
    with torch.device("meta"):
        assert create_model("DeepFlow-B/2-2T").key_layers == [6, 12]
        assert create_model("DeepFlow-L/2-3T").key_layers == [6, 12, 18]
        assert create_model("DeepFlow-XL/2-3T").key_layers == [8, 16, 24]
        assert create_model("DeepFlow-XL/2-4T").key_layers == [7, 14, 21, 28]
        assert create_model("SiT-XL/2").depth == 28
        ssl = create_model("DeepFlow-B/2-2T", ssl_align=True)
    assert ssl.projectors[0][4].out_features == 768
    assert len(list_models()) == 4 * 3 + 4 * 3 * 3
    assert even_key_layers(10, 3) == [3, 7, 10]


@pytest.mark.parametrize(
    "name,match",
    [("DiT-XL/2", "unknown model name"), ("SiT-XL/3", "patch size"), ("DeepFlow-XL/2", "branch count"),
     ("SiT-XL/2-2T", "SiT has one branch"), ("DeepFlow-XL/2-9T", "branch count")],
)
def test_bad_names_raise_clear_errors(name, match):
    with pytest.raises(ValueError, match=match):
        create_model(name)


def test_bad_overrides_raise():
    with pytest.raises(TypeError, match="unknown overrides.*'dpth'"):
        create_model("SiT-S/2", dpth=3)
    with pytest.raises(ValueError, match="must end with depth"):
        create_model("DeepFlow-S/2-2T", depth=4, key_layers=[2, 3])
    with pytest.raises(ValueError, match="ssl_align needs at least 2 branches"):
        create_model("SiT-S/2", ssl_align=True)


def test_meta_build_then_materialize():
    with torch.device("meta"):
        model = tiny_model()
    materialize_and_check_pos_embed(model)
    x, t, y = inputs(model)
    assert torch.isfinite(model(x, t, y)).all()


def test_pos_embed_matches_mae_layout():
    pe = sincos_pos_embed_2d(8, 3)  # token n = row * 3 + col; first half encodes the column
    col, row = 2, 1
    n = row * 3 + col
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2)
    expect = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)])
    torch.testing.assert_close(pe[n], expect.float())


@pytest.mark.parametrize("name", ["SiT-S/2", "DeepFlow-S/2-3T"])
def test_zero_initialised_heads_give_zero_output(name):
    torch.manual_seed(0)
    model = tiny_model(name, depth=3, ssl_align=name.startswith("DeepFlow"))
    check_zero_initialised_outputs(model, *inputs(model))


@pytest.mark.parametrize("name", ["SiT-S/2", "DeepFlow-S/2-2T", "DeepFlow-S/4-3T"])
def test_inference_equals_last_branch_of_training_forward(name):
    model = randomize_(tiny_model(name, depth=3 if "3T" in name else 4)).eval()
    check_inference_equals_last_branch(model, *inputs(model))


def test_forward_rejects_wrong_time_shapes():
    model = tiny_model()
    check_time_shape_errors(model, *inputs(model))


def test_gradient_checkpointing_matches_plain_backward():
    model = randomize_(tiny_model("DeepFlow-S/2-2T"))
    x, t, y = inputs(model)
    check_gradient_checkpointing(model, x, torch.stack([t, (t - 0.01).clamp(0, 1)], dim=1), y)


def test_compile_fullgraph_both_forwards():
    model = randomize_(tiny_model("DeepFlow-S/2-2T", depth=2)).eval()
    x, t, y = inputs(model)
    check_compile_fullgraph(model, x, t, torch.stack([t, (t + 0.01).clamp(0, 1)], dim=1), y)
    assert model.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("name,ssl", [("SiT-S/2", False), ("DeepFlow-S/2-3T", True)])
def test_flops_per_image_matches_measured_count(name, ssl):
    model = tiny_model(name, depth=3, ssl_align=ssl)
    check_flops_match_measured(model, *inputs(model, batch=2))


def test_flops_close_to_paper():
    with torch.device("meta"):
        sit_xl = create_model("SiT-XL/2").flops_per_image() / 1e9
        df_b = create_model("DeepFlow-B/2-2T").flops_per_image() / 1e9
        sit_xl_attn = create_model("SiT-XL/2").flops_per_image(attention=True) / 1e9
    assert abs(sit_xl - 114) < 1.0  # paper: 114
    assert abs(df_b - 28) < 1.0  # paper: 28
    assert abs(sit_xl_attn - 118.6) < 0.1  # DiT paper's DiT-XL/2 count, which includes attention matmuls


def _scale_gap_modulation_(model, bound: float = 8.0) -> torch.Tensor:
    """Push the gap-modulation scale of VeRA block 0 past [-5, 5] on alternate channels (+-bound on even ones);
    returns the scale rows' bias."""
    hd2 = 2 * model.hidden_size
    with torch.no_grad():
        bias = model.vera_blocks[0].acc_norm.adaLN_modulation[1].bias
        bias[hd2:] = 0.0
        bias[hd2::4] = bound
        bias[hd2 + 2::4] = -bound
    return bias[hd2:]


def _gap_mlp_inputs(model, x, times, y):
    """VeRA block 0's gap modulation: (its input concat(h, a*) [B,N,2H], gap embedding [B,2H], the modulated
    input of its MLP [B,N,2H]) and the model's training outputs."""
    seen = {}
    gap = model.vera_blocks[0].acc_norm
    handles = [gap.register_forward_pre_hook(lambda m, a: seen.update(z=a[0], emb=a[1])),
               gap.mlp.register_forward_pre_hook(lambda m, a: seen.update(modulated=a[0]))]
    try:
        with torch.no_grad():
            out = model.forward_train(x, times, y)
    finally:
        for handle in handles:
            handle.remove()
    return (seen["z"], seen["emb"], seen["modulated"]), out


def test_gap_scale_clamp_option_clamps_only_where_the_scale_leaves_the_bound():
    """clamp_gap_scale=True (the default) clamps the VeRA gap-modulation scale to [-5, 5]; False leaves it: the
    modulated features differ exactly in the channels where |scale| > 5, each as computed by hand."""
    clamped = randomize_(tiny_model("DeepFlow-S/2-2T", depth=2), std=0.1).eval()
    assert clamped.clamp_gap_scale and clamped.vera_blocks[0].acc_norm.clamp_scale
    _scale_gap_modulation_(clamped)
    free = tiny_model("DeepFlow-S/2-2T", depth=2, clamp_gap_scale=False).eval()
    free.load_state_dict(clamped.state_dict())
    assert not free.clamp_gap_scale and not free.vera_blocks[0].acc_norm.clamp_scale
    x, t, y = inputs(clamped)
    times = torch.stack([t, (t + 0.05).clamp(0, 1)], dim=1)
    (z, emb, mod_clamped), out_clamped = _gap_mlp_inputs(clamped, x, times, y)
    (z_free, emb_free, mod_free), out_free = _gap_mlp_inputs(free, x, times, y)
    torch.testing.assert_close((z, emb), (z_free, emb_free))  # the same up to the modulation

    # by hand: shift, scale from SiLU+Linear of the gap embedding; LayerNorm(concat(h, a*)) * (1 + scale) + shift
    linear = clamped.vera_blocks[0].acc_norm.adaLN_modulation[1]
    shift, scale = (torch.nn.functional.silu(emb) @ linear.weight.T + linear.bias).chunk(2, dim=-1)
    normed = torch.nn.functional.layer_norm(z, (z.shape[-1],), eps=1e-6)
    bites = scale.abs() > 5.0  # [B, 2H]
    assert bites.any(dim=1).all() and (~bites).any()
    torch.testing.assert_close(mod_clamped, normed * (1 + scale.clamp(-5, 5)[:, None]) + shift[:, None])
    torch.testing.assert_close(mod_free, normed * (1 + scale[:, None]) + shift[:, None])
    differs = (mod_clamped - mod_free).abs().amax(dim=1) > 1e-4  # [B, 2H]
    assert torch.equal(differs, bites)
    assert not torch.allclose(out_clamped.velocities[-1], out_free.velocities[-1])
    torch.testing.assert_close(out_clamped.velocities[0], out_free.velocities[0])  # before the VeRA block

    # within the bound the two settings are the same network
    _scale_gap_modulation_(clamped, bound=0.0)
    free.load_state_dict(clamped.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(clamped(x, t, y), free(x, t, y))


def test_gap_scale_clamp_option_is_a_registered_override():
    from deepflow.models.registry import model_spec

    for name in ("DeepFlow-S/2-2T", "SiT-S/2", "DeepFlow-MMDiT-4-2T"):
        assert "clamp_gap_scale" in model_spec(name).accepted_overrides
    with torch.device("meta"):
        mmdit = create_model("DeepFlow-MMDiT-4-2T", hidden_size=64, num_heads=4, clamp_gap_scale=False)
        assert not mmdit.clamp_gap_scale and not mmdit.vera_blocks[0].acc_norm.clamp_scale
        assert create_model("DeepFlow-MMDiT-4-2T", hidden_size=64, num_heads=4).vera_blocks[0].acc_norm.clamp_scale
        with pytest.raises(ValueError, match="clamp_gap_scale must be true or false"):
            create_model("DeepFlow-S/2-2T", clamp_gap_scale="no")
