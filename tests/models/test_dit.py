"""Registry, parameter counts, forwards, compile, checkpointing and FLOP counting of DeepFlowDiT."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from deepflow.models import BranchOutputs, create_model, list_models
from deepflow.models.layers import sincos_pos_embed_2d
from deepflow.models.registry import even_key_layers

from .helpers import inputs, randomize_, tiny_model

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
    model.to_empty(device="cpu")
    model.init_weights()
    grid = model.grid_size
    assert torch.equal(model.pos_embed[0], sincos_pos_embed_2d(model.hidden_size, grid))
    assert not model.pos_embed.requires_grad
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
    x, t, y = inputs(model)
    k = model.num_branches
    assert torch.count_nonzero(model(x, t, y)) == 0
    out = model.forward_train(x, t[:, None].expand(-1, k), y)
    assert len(out.velocities) == k and len(out.accelerations) == k - 1
    for tensor in out.velocities + out.accelerations:
        assert tensor.shape == x.shape and torch.count_nonzero(tensor) == 0
    if k > 1:
        assert len(out.projections) == k - 1 and out.projections[0].shape == (x.shape[0], model.num_tokens, 16)


@pytest.mark.parametrize("name", ["SiT-S/2", "DeepFlow-S/2-2T", "DeepFlow-S/4-3T"])
def test_inference_equals_last_branch_of_training_forward(name):
    model = randomize_(tiny_model(name, depth=3 if "3T" in name else 4)).eval()
    x, t, y = inputs(model)
    k = model.num_branches
    v = model(x, t, y)
    out = model.forward_train(x, t[:, None].expand(-1, k), y)
    assert isinstance(out, BranchOutputs)
    torch.testing.assert_close(v, out.velocities[-1], rtol=1e-4, atol=1e-5)
    assert v.abs().mean() > 1e-3  # non-trivial output after randomisation
    if k > 1:
        # different branch times change the output: the gap embedding and per-branch conditions are used
        times = torch.stack([t] + [(t + 0.3 * (i + 1)).clamp(0, 1) for i in range(k - 1)], dim=1)
        assert not torch.allclose(model.forward_train(x, times, y).velocities[-1], v)


def test_forward_rejects_wrong_time_shapes():
    model = tiny_model()
    x, t, y = inputs(model)
    with pytest.raises(ValueError, match=r"times must be \[B, 2\]"):
        model(x, torch.rand(3, 3), y)
    with pytest.raises(ValueError, match="return_all=True needs times"):
        model(x, t, y, return_all=True)


def test_gradient_checkpointing_matches_plain_backward():
    model = randomize_(tiny_model("DeepFlow-S/2-2T"))
    x, t, y = inputs(model)
    times = torch.stack([t, (t - 0.01).clamp(0, 1)], dim=1)

    def grads():
        model.zero_grad()
        out = model.forward_train(x, times, y)
        sum(o.square().mean() for o in out.velocities + out.accelerations).backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain = grads()
    model.gradient_checkpointing = True
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)
    assert len(model.shard_units()) == model.depth + model.num_branches - 1


def test_compile_fullgraph_both_forwards():
    torch._dynamo.reset()
    model = randomize_(tiny_model("DeepFlow-S/2-2T", depth=2)).eval()
    x, t, y = inputs(model)
    times = torch.stack([t, (t + 0.01).clamp(0, 1)], dim=1)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, t, y), model(x, t, y))
    out = compiled(x, times, y, return_all=True)
    ref = model.forward_train(x, times, y)
    assert isinstance(out, BranchOutputs)
    for a, b in zip(out.velocities + out.accelerations, ref.velocities + ref.accelerations):
        torch.testing.assert_close(a, b)
    sum(v.mean() for v in out.velocities).backward()  # the compiled training graph differentiates
    assert model.blocks[0].attn.qkv.weight.grad is not None


def _counted_macs(model, fn) -> int:
    """Multiply-accumulates of matmuls and convolutions (no attention kernels) measured by FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    counts = counter.get_flop_counts()["Global"]
    ops = {"mm", "addmm", "bmm", "baddbmm", "convolution"}
    return sum(v for op, v in counts.items() if op.__name__.split(".")[0] in ops) // 2


@pytest.mark.parametrize("name,ssl", [("SiT-S/2", False), ("DeepFlow-S/2-3T", True)])
def test_flops_per_image_matches_measured_count(name, ssl):
    model = tiny_model(name, depth=3, ssl_align=ssl)
    batch = 2
    x, t, y = inputs(model, batch=batch)
    k = model.num_branches
    assert _counted_macs(model, lambda: model(x, t, y)) == batch * model.flops_per_image()
    times = t[:, None].expand(-1, k)
    assert _counted_macs(model, lambda: model.forward_train(x, times, y)) == batch * model.flops_per_image(train=True)


def test_flops_close_to_paper():
    with torch.device("meta"):
        sit_xl = create_model("SiT-XL/2").flops_per_image() / 1e9
        df_b = create_model("DeepFlow-B/2-2T").flops_per_image() / 1e9
        sit_xl_attn = create_model("SiT-XL/2").flops_per_image(attention=True) / 1e9
    assert abs(sit_xl - 114) < 1.0  # paper: 114
    assert abs(df_b - 28) < 1.0  # paper: 28
    assert abs(sit_xl_attn - 118.6) < 0.1  # DiT paper's DiT-XL/2 count, which includes attention matmuls
