"""Importer of reference checkpoints: key coverage, round trip, and equivalence with an independent
re-implementation of the reference forward (written here from REFERENCE.md, plain torch ops, reference keys).
The command that reads and writes files is tested in tests/platform/inference/test_convert_job.py."""

from __future__ import annotations

import argparse
import importlib
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deepflow.models.convert import (
    REFERENCE_LEGACY_SCALING_DEFAULT,
    ReferenceCheckpointError,
    infer_reference_config,
    load_reference_state_dict,
    reference_legacy_scaling,
    to_reference_state_dict,
)

H, HEADS, P, C, GRID, CLASSES, ACC, PROJ, Z = 32, 4, 2, 4, 4, 10, (24, 40, 24), 20, 12


def reference_shapes(depth: int, num_vera: int, ssl: bool, hidden: int = H, grid: int = GRID, acc=ACC,
                     proj: int = PROJ, z: int = Z, classes: int = CLASSES) -> dict[str, tuple[int, ...]]:
    """Reference key names and shapes (REFERENCE.md's layout)."""
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, grid * grid, hidden),
        "x_embedder.proj.weight": (hidden, C, P, P), "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256), "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden), "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (classes + 1, hidden),
    }

    def linear(name: str, out_f: int, in_f: int) -> None:
        shapes[f"{name}.weight"] = (out_f, in_f)
        shapes[f"{name}.bias"] = (out_f,)

    for n in range(depth):
        linear(f"blocks.{n}.attn.qkv", 3 * hidden, hidden)
        linear(f"blocks.{n}.attn.proj", hidden, hidden)
        linear(f"blocks.{n}.mlp.fc1", 4 * hidden, hidden)
        linear(f"blocks.{n}.mlp.fc2", hidden, 4 * hidden)
        linear(f"blocks.{n}.adaLN_modulation.1", 6 * hidden, hidden)
    heads = ["final_layer.0", "final_layer.1", "final_acc_layer"] if num_vera else ["final_layer"]
    for head in heads:
        linear(f"{head}.linear", P * P * C, hidden)
        linear(f"{head}.adaLN_modulation.1", 2 * hidden, hidden)
    if num_vera:
        linear("dt_embedder.mlp.0", 2 * hidden, 256)
        linear("dt_embedder.mlp.2", 2 * hidden, 2 * hidden)
    for n in range(num_vera):
        b = f"df_blocks.{n}"
        dims = (hidden, *acc, hidden)
        for j in range(4):
            linear(f"{b}.acc_mlp.{2 * j}", dims[j + 1], dims[j])
        linear(f"{b}.acc_norm.mlp.fc1", 2 * hidden, 2 * hidden)
        linear(f"{b}.acc_norm.mlp.fc2", hidden, 2 * hidden)
        linear(f"{b}.acc_norm.adaLN_modulation.1", 4 * hidden, 2 * hidden)
        shapes[f"{b}.cross_attention.multihead_attn.in_proj_weight"] = (3 * hidden, hidden)
        shapes[f"{b}.cross_attention.multihead_attn.in_proj_bias"] = (3 * hidden,)
        linear(f"{b}.cross_attention.multihead_attn.out_proj", hidden, hidden)
        shapes[f"{b}.cross_attention.layer_norm.weight"] = (hidden,)
        shapes[f"{b}.cross_attention.layer_norm.bias"] = (hidden,)
        if ssl:
            linear(f"projectors.{n}.0", proj, hidden)
            linear(f"projectors.{n}.2", proj, proj)
            linear(f"projectors.{n}.4", z, proj)
    return shapes


def make_reference_state_dict(depth: int, num_vera: int, ssl: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the reference key names and shapes."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in reference_shapes(depth, num_vera, ssl).items():
        fan_in = shape[-1] if len(shape) > 1 else 4
        sd[name] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        if name.endswith("layer_norm.weight"):
            sd[name] += 1.0
    return sd


def test_full_size_xl_3t_has_the_reference_layout():
    """The released model's architecture: every reference key and shape, nothing else (meta device)."""
    expected = reference_shapes(24, 2, True, hidden=1152, grid=16, acc=(2048, 4096, 2048), proj=2048, z=768,
                                classes=1000)
    with torch.device("meta"):
        sd = {k: torch.empty(s) for k, s in expected.items()}
        model = load_reference_state_dict({"ema": sd, "args": argparse.Namespace(depth=24, df_idxs=[8, 16])},
                                          "DeepFlow-XL/2-3T")
    assert model.key_layers == [8, 16, 24] and model.ssl_align and model.z_dim == 768
    got = {k: tuple(v.shape) for k, v in to_reference_state_dict(model).items()}
    assert got == expected


# ----------------------------------------------------------------------------- independent reference forward
def _lin(sd, name, x):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _freq(t):
    k = torch.arange(128, dtype=torch.float32)
    f = torch.exp(-math.log(10000.0) * k / 128)
    return torch.cat([torch.cos(t[:, None] * f), torch.sin(t[:, None] * f)], dim=1)


def _embed_time(sd, prefix, t):
    return _lin(sd, f"{prefix}.mlp.2", F.silu(_lin(sd, f"{prefix}.mlp.0", _freq(t))))


def _ln(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def _attend(q, k, v):
    b, nq, _ = q.shape
    split = lambda z: z.reshape(b, z.shape[1], HEADS, H // HEADS).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(H // HEADS), dim=-1)
    return (w @ v).permute(0, 2, 1, 3).reshape(b, nq, H)


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _head(sd, name, h, c):
    shift, scale = _lin(sd, f"{name}.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    out = _lin(sd, f"{name}.linear", _ln(h) * (1 + scale[:, None]) + shift[:, None])
    b = out.shape[0]
    img = out.reshape(b, GRID, GRID, P, P, C).permute(0, 5, 1, 3, 2, 4)
    return img.reshape(b, C, GRID * P, GRID * P)


def reference_forward(sd, x, times, y, depth, df_idxs, legacy_scaling=False):
    """times: list of k tensors [B]. Returns (velocities, accelerations) in image space. ``legacy_scaling``: the
    gap-modulation scale is clamped to [-5, 5] (the reference's --legacy-scaling), else used as is."""
    b = x.shape[0]
    tokens = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=P)
    tokens = tokens.reshape(b, H, -1).transpose(1, 2) + sd["pos_embed"]
    y_emb = sd["y_embedder.embedding_table.weight"][y]
    c = _embed_time(sd, "t_embedder", times[0]) + y_emb
    h = tokens
    vels, accs = [], []
    branch = 0
    for n in range(depth):
        pre = f"blocks.{n}"
        mods = _lin(sd, f"{pre}.adaLN_modulation.1", F.silu(c)).chunk(6, dim=1)
        a_in = _ln(h) * (1 + mods[1][:, None]) + mods[0][:, None]
        q, k, v = _lin(sd, f"{pre}.attn.qkv", a_in).chunk(3, dim=-1)
        h = h + mods[2][:, None] * _lin(sd, f"{pre}.attn.proj", _attend(q, k, v))
        m_in = _ln(h) * (1 + mods[4][:, None]) + mods[3][:, None]
        h = h + mods[5][:, None] * _lin(sd, f"{pre}.mlp.fc2", _gelu_tanh(_lin(sd, f"{pre}.mlp.fc1", m_in)))
        if n + 1 in df_idxs:
            d = f"df_blocks.{branch}"
            vels.append(_head(sd, "final_layer.0", h, c))
            a = h
            for j in range(4):
                a = _lin(sd, f"{d}.acc_mlp.{2 * j}", a)
                a = F.silu(a) if j < 3 else a
            accs.append(_head(sd, "final_acc_layer", a, c))
            gap = _embed_time(sd, "dt_embedder", times[branch + 1] - times[branch])
            shift, scale = _lin(sd, f"{d}.acc_norm.adaLN_modulation.1", F.silu(gap)).chunk(2, dim=1)
            scale = scale.clamp(-5, 5) if legacy_scaling else scale
            z = _ln(torch.cat([h, a], dim=-1)) * (1 + scale[:, None]) + shift[:, None]
            refined = _lin(sd, f"{d}.acc_norm.mlp.fc2", _gelu_tanh(_lin(sd, f"{d}.acc_norm.mlp.fc1", z)))
            w, bias = sd[f"{d}.cross_attention.layer_norm.weight"], sd[f"{d}.cross_attention.layer_norm.bias"]
            qn = _ln(tokens, 1e-5) * w + bias
            kvn = _ln(refined, 1e-5) * w + bias
            wq, wk, wv = sd[f"{d}.cross_attention.multihead_attn.in_proj_weight"].chunk(3)
            bq, bk, bv = sd[f"{d}.cross_attention.multihead_attn.in_proj_bias"].chunk(3)
            att = _attend(qn @ wq.T + bq, kvn @ wk.T + bk, kvn @ wv.T + bv)
            h = qn + _lin(sd, f"{d}.cross_attention.multihead_attn.out_proj", att)
            branch += 1
            c = _embed_time(sd, "t_embedder", times[branch]) + y_emb
    vels.append(_head(sd, "final_layer.1" if df_idxs else "final_layer", h, c))
    return vels, accs


def _inputs(k, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, C, GRID * P, GRID * P, generator=g)
    t1 = torch.rand(2, generator=g)
    times = torch.stack([(t1 + 0.07 * i).clamp(0, 1) for i in range(k)], dim=1)
    y = torch.tensor([3, CLASSES])
    return x, times, y


@pytest.mark.parametrize("name,depth,df_idxs,ssl", [("DeepFlow-S/2-3T", 6, [2, 4], True),
                                                    ("DeepFlow-S/2-2T", 3, [1], False),
                                                    ("SiT-S/2", 2, [], False)])
def test_converted_model_reproduces_reference_forward(name, depth, df_idxs, ssl):
    sd = make_reference_state_dict(depth, len(df_idxs), ssl)
    checkpoint = {"ema": sd, "args": argparse.Namespace(depth=depth, df_idxs=df_idxs, qk_norm=False)}
    model = load_reference_state_dict(checkpoint, name, hidden_size=H, num_heads=HEADS).eval()
    k = len(df_idxs) + 1
    assert model.key_layers == df_idxs + [depth] and model.ssl_align == ssl
    assert not model.clamp_gap_scale  # args without legacy_scaling: the reference scripts' default
    assert model.acc_widths == (ACC if df_idxs else (2048, 4096, 2048))
    x, times, y = _inputs(k)
    with torch.no_grad():
        out = model.forward_train(x, times, y)
        ref_v, ref_a = reference_forward(sd, x, list(times.unbind(1)), y, depth, df_idxs)
    assert len(out.velocities) == len(ref_v) == k and len(out.accelerations) == len(ref_a) == k - 1
    for ours, ref in zip(out.velocities + out.accelerations, ref_v + ref_a):
        assert ref.abs().mean() > 1e-2
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=2e-5)
    if ssl:
        assert out.projections[0].shape == (2, GRID * GRID, Z)
    # round trip back to the reference layout: same keys, same tensors
    back = to_reference_state_dict(model)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert torch.equal(back[key], value), key
    assert not model.pos_embed.requires_grad and model.blocks[0].attn.qkv.weight.requires_grad


def test_prefers_ema_and_infers_even_key_layers_without_args():
    sd = make_reference_state_dict(4, 1, False)
    other = {key: torch.zeros_like(v) for key, v in sd.items()}
    model = load_reference_state_dict({"model": other, "ema": sd}, "DeepFlow-S/2-2T", hidden_size=H, num_heads=HEADS)
    assert model.key_layers == [2, 4]
    assert torch.equal(model.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
    model = load_reference_state_dict({"model": other, "ema": sd}, "DeepFlow-S/2-2T", prefer="model",
                                      hidden_size=H, num_heads=HEADS)
    assert model.blocks[0].attn.qkv.weight.abs().sum() == 0


def test_unknown_missing_and_mismatched_keys_are_listed():
    sd = make_reference_state_dict(2, 1, False)
    bad = dict(sd)
    bad["df_blocks.0.extra.weight"] = torch.zeros(1)
    del bad["final_acc_layer.linear.bias"]
    with pytest.raises(ReferenceCheckpointError) as err:
        load_reference_state_dict(bad, "DeepFlow-S/2-2T", hidden_size=H, num_heads=HEADS)
    msg = str(err.value)
    assert "unknown keys (1): ['df_blocks.0.extra.weight']" in msg
    assert "missing keys (1): ['final_acc_layer.linear.bias']" in msg
    with pytest.raises(ReferenceCheckpointError, match="has 3 branches but the checkpoint has 2"):
        load_reference_state_dict({"ema": sd, "args": {"depth": 2, "df_idxs": [1]}}, "DeepFlow-S/2-3T",
                                  hidden_size=H)
    with pytest.raises(ReferenceCheckpointError, match=r"hidden_size 32 does not match 'DeepFlow-S/2-2T' \(384\)"):
        load_reference_state_dict(sd, "DeepFlow-S/2-2T")
    with pytest.raises(ReferenceCheckpointError, match="qk_norm"):
        load_reference_state_dict({"ema": sd, "args": {"qk_norm": True}}, "DeepFlow-S/2-2T")
    with pytest.raises(ReferenceCheckpointError, match="shape mismatches"):
        load_reference_state_dict(sd, "DeepFlow-S/2-2T", hidden_size=H, num_heads=HEADS, acc_widths=(8, 8, 8))


# ----------------------------------------------------------------------------- the VeRA gap-scale clamp
def with_large_gap_scale(sd: dict[str, torch.Tensor], num_vera: int, bound: float = 8.0) -> dict[str, torch.Tensor]:
    """A copy of ``sd`` whose gap-modulation scale (the second half of acc_norm.adaLN_modulation.1) leaves [-5, 5]
    on alternate channels (+-bound on even ones), so that the reference's --legacy-scaling clamp bites."""
    sd = dict(sd)
    for n in range(num_vera):
        key = f"df_blocks.{n}.acc_norm.adaLN_modulation.1.bias"
        bias = sd[key].clone()
        half = bias.shape[0] // 2
        bias[half:] = 0.0
        bias[half::4] = bound
        bias[half + 2::4] = -bound
        sd[key] = bias
    return sd


def reference_args(depth: int, df_idxs: list[int], **fields) -> argparse.Namespace:
    """The fields of the reference train.py's args that describe the network (df_idxs as the JSON text it stores)."""
    base = dict(model="DeepFlow-S/2", trans_depth=depth, df_idxs=str(df_idxs).replace(" ", ""), num_classes=CLASSES,
                resolution=GRID * P * 8, ssl_align=False, qk_norm=False, fused_attn=True, legacy_scaling=False)
    return argparse.Namespace(**{**base, **fields})


DEPTH_3T, IDXS_3T = 3, [1, 2]


def _forward_both(model, sd):
    """(ours, reference with the clamp, reference without) last velocities and accelerations."""
    x, times, y = _inputs(len(IDXS_3T) + 1)
    with torch.no_grad():
        out = model.eval().forward_train(x, times, y)
    refs = [reference_forward(sd, x, list(times.unbind(1)), y, DEPTH_3T, IDXS_3T, legacy_scaling=legacy)
            for legacy in (True, False)]
    return out.velocities + out.accelerations, [v + a for v, a in refs]


@pytest.mark.parametrize("legacy", [True, False])
def test_args_legacy_scaling_decides_the_gap_scale_clamp(legacy):
    """A reference checkpoint trained with --legacy-scaling imports as clamping, one trained without as not; each
    reproduces the reference forward with its own setting and not the other's (the clamp bites here)."""
    sd = with_large_gap_scale(make_reference_state_dict(DEPTH_3T, 2, False), 2)
    checkpoint = {"ema": sd, "args": reference_args(DEPTH_3T, IDXS_3T, legacy_scaling=legacy)}
    model = load_reference_state_dict(checkpoint, "DeepFlow-S/2-3T", hidden_size=H, num_heads=HEADS)
    assert model.clamp_gap_scale is legacy and model.key_layers == IDXS_3T + [DEPTH_3T]
    assert all(vera.acc_norm.clamp_scale is legacy for vera in model.vera_blocks)
    ours, (ref_clamped, ref_free) = _forward_both(model, sd)
    assert (ref_clamped[-1] - ref_free[-1]).abs().max() > 1e-2  # the two settings are different networks here
    for got, want in zip(ours, ref_clamped if legacy else ref_free):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
    # the inferred config carries it too (what a config or model card would hold)
    assert infer_reference_config(sd, checkpoint["args"])["clamp_gap_scale"] is legacy
    assert infer_reference_config(sd, {"legacy_scaling": int(legacy)})["clamp_gap_scale"] is legacy


def test_missing_legacy_scaling_is_the_reference_default_unless_overridden():
    """Without args.legacy_scaling (a bare state dict, or args that predate the flag): no clamp, the reference
    scripts' default; ``clamp_gap_scale=`` overrides that and the checkpoint's args alike."""
    sd = with_large_gap_scale(make_reference_state_dict(DEPTH_3T, 2, False), 2)
    assert REFERENCE_LEGACY_SCALING_DEFAULT is False
    old_args = {"depth": DEPTH_3T, "df_idxs": IDXS_3T}
    for checkpoint in (sd, {"ema": sd, "args": old_args}, {"ema": sd}):
        model = load_reference_state_dict(checkpoint, "DeepFlow-S/2-3T", hidden_size=H, num_heads=HEADS)
        assert model.clamp_gap_scale is False
    assert reference_legacy_scaling(None) is None and reference_legacy_scaling(old_args) is None
    model = load_reference_state_dict(sd, "DeepFlow-S/2-3T", hidden_size=H, num_heads=HEADS, clamp_gap_scale=True)
    ours, (ref_clamped, _) = _forward_both(model, sd)
    for got, want in zip(ours, ref_clamped):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
    checkpoint = {"ema": sd, "args": reference_args(DEPTH_3T, IDXS_3T, legacy_scaling=True)}
    model = load_reference_state_dict(checkpoint, "DeepFlow-S/2-3T", hidden_size=H, num_heads=HEADS,
                                      clamp_gap_scale=False)
    assert model.clamp_gap_scale is False


def test_reference_args_that_contradict_the_weights_are_refused():
    sd = make_reference_state_dict(DEPTH_3T, 2, False)

    def load(**fields):
        args = argparse.Namespace(**{**vars(reference_args(DEPTH_3T, IDXS_3T)), **fields})
        return load_reference_state_dict({"ema": sd, "args": args}, "DeepFlow-S/2-3T", hidden_size=H,
                                         num_heads=HEADS)

    assert load().key_layers == [1, 2, 3]  # df_idxs as the reference stores it: the JSON text "[1,2]"
    for fields, match in [
        (dict(trans_depth=4), r"args.trans_depth=4 but the state dict holds 3 blocks"),
        (dict(df_idxs="[1]"), r"args.df_idxs=\[1\] names 1 VeRA blocks, state dict holds 2"),
        (dict(df_idxs="1,2"), r"args.df_idxs must be a list"),
        (dict(num_classes=1000), r"args.num_classes=1000 but the label table holds 10 classes"),
        (dict(resolution=256), r"args.resolution=256 means 32x32 latents but pos_embed holds 8x8"),
        (dict(ssl_align=True), r"args.ssl_align=True but the state dict lacks the SSL projectors"),
        (dict(model="DeepFlow-XL/2"), r"args.model='DeepFlow-XL/2' does not match 'DeepFlow-S/2-3T'"),
        (dict(legacy_scaling="yes"), r"args.legacy_scaling must be true or false"),
        (dict(qk_norm=True), r"qk_norm=True"),
    ]:
        with pytest.raises(ReferenceCheckpointError, match=match):
            load(**fields)


# ----------------------------------------------------------------------------- the convert job keeps the setting
@pytest.mark.parametrize("args_legacy,flag,expect,why", [
    (True, None, True, "from the checkpoint's args.legacy_scaling=True"),
    (False, None, False, "from the checkpoint's args.legacy_scaling=False"),
    (None, None, False, "the checkpoint's args do not record legacy_scaling: the reference scripts' default, off"),
    (None, "--legacy-scaling", True, "from --legacy-scaling)"),
    (False, "--legacy-scaling", True, "from --legacy-scaling; the checkpoint's args.legacy_scaling is False"),
    (True, "--no-legacy-scaling", False, "from --no-legacy-scaling; the checkpoint's args.legacy_scaling is True"),
])
def test_convert_job_records_the_gap_scale_setting_for_sampling(tmp_path, capsys, args_legacy, flag, expect, why):
    """``deepflow convert`` prints the setting it used (one line), writes it into the model card, and the model that
    ``deepflow sample`` builds from the export (generate.build_model) is the same network."""
    from deepflow.artifacts import load_weights
    from deepflow.platform.inference.convert import main
    from deepflow.platform.inference.generate import build_model

    sd = with_large_gap_scale(make_reference_state_dict(DEPTH_3T, 2, False), 2)
    if args_legacy is None:
        checkpoint: dict = sd  # a bare state dict: no args
    else:
        checkpoint = {"ema": sd, "steps": 3, "args": reference_args(DEPTH_3T, IDXS_3T, legacy_scaling=args_legacy)}
    path = tmp_path / "ref.pt"
    torch.save(checkpoint, path)
    argv = ["--reference", str(path), "--name", "DeepFlow-S/2-3T", "--out", str(tmp_path / "out"),
            "--num-heads", str(HEADS), "--hidden-size", str(H)] + ([flag] if flag else [])
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "gap-modulation scale clamp" in line]
    assert len(lines) == 1 and lines[0].split(": ")[1].startswith("on" if expect else "off"), lines
    assert why in lines[0]
    weights, card = load_weights(str(tmp_path / "out"))
    assert card.kwargs["clamp_gap_scale"] is expect
    model = build_model(weights, card, "cpu")
    assert model.clamp_gap_scale is expect
    if args_legacy is None:  # even keys layers without args: 3 blocks -> [1, 2, 3]
        assert model.key_layers == IDXS_3T + [DEPTH_3T]
    ours, (ref_clamped, ref_free) = _forward_both(model, sd)
    for got, want in zip(ours, ref_clamped if expect else ref_free):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


def test_old_model_cards_without_the_setting_still_clamp():
    """Exports written before the option existed (no clamp_gap_scale in their card) rebuild as before: clamped."""
    from deepflow.artifacts import ModelCard
    from deepflow.platform.inference.generate import build_model

    sd = with_large_gap_scale(make_reference_state_dict(DEPTH_3T, 2, False), 2)
    model = load_reference_state_dict(sd, "DeepFlow-S/2-3T", hidden_size=H, num_heads=HEADS, clamp_gap_scale=True)
    kwargs = dict(depth=DEPTH_3T, key_layers=[1, 2, 3], hidden_size=H, num_heads=HEADS, num_classes=CLASSES,
                  input_size=GRID * P, acc_widths=list(ACC))
    card = ModelCard(model="DeepFlow-S/2-3T", kwargs=kwargs, kind="pixel")
    rebuilt = build_model({k: v.clone() for k, v in model.state_dict().items()}, card, "cpu")
    assert rebuilt.clamp_gap_scale is True
    ours, (ref_clamped, _) = _forward_both(rebuilt, sd)
    for got, want in zip(ours, ref_clamped):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


# ----------------------------------------------------------------------------- against the reference's own code
REFERENCE_REPO = Path("/work/.mirror/ByteDance-Seed+DeepFlow/repo")


def _reference_model_class(tmp_path: Path):
    """The reference's DeepFlow class, read from its checkout (a bare git directory) into tmp_path and imported;
    skips when the checkout, git or timm is missing. Its modules are removed from sys.modules afterwards."""
    if not REFERENCE_REPO.is_dir() or shutil.which("git") is None:
        pytest.skip("no checkout of ByteDance-Seed/DeepFlow")
    pytest.importorskip("timm")
    for rel in ("models/blocks.py", "models/deepflow.py", "utils/utils.py"):
        try:
            text = subprocess.run(["git", "-C", str(REFERENCE_REPO), "show", f"HEAD:{rel}"], check=True,
                                  capture_output=True, text=True).stdout
        except (subprocess.CalledProcessError, OSError):
            pytest.skip(f"cannot read {rel} from the reference checkout")
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    saved = {name: sys.modules.pop(name) for name in list(sys.modules)
             if name in ("models", "utils") or name.startswith(("models.", "utils."))}
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module("models.deepflow")
        return module.DeepFlow
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n in ("models", "utils") or n.startswith(("models.", "utils."))]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.mark.parametrize("legacy", [True, False])
def test_matches_the_reference_velocity_modulation(tmp_path, legacy):
    """Optional: the reference network itself (built with legacy_scaling=legacy, random weights, a gap scale past
    the bound), saved with its args, imports to a model with the same outputs."""
    reference_class = _reference_model_class(tmp_path)
    torch.manual_seed(0)
    reference = reference_class(
        path_type="linear", input_size=GRID * P, patch_size=P, in_channels=C, hidden_size=H, decoder_hidden_size=H,
        depth=DEPTH_3T, num_heads=HEADS, num_classes=CLASSES, df_idxs=IDXS_3T, projector_dim=ACC[0],
        legacy_scaling=legacy, fused_attn=False, qk_norm=False,
    ).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in reference.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=g) / math.sqrt(param.shape[-1]))
    sd = with_large_gap_scale({k: v.detach().clone() for k, v in reference.state_dict().items()}, len(IDXS_3T))
    reference.load_state_dict(sd)
    checkpoint = {"ema": sd, "args": reference_args(DEPTH_3T, IDXS_3T, legacy_scaling=legacy)}
    model = load_reference_state_dict(checkpoint, "DeepFlow-S/2-3T", hidden_size=H, num_heads=HEADS).eval()
    assert model.acc_widths == (ACC[0], 2 * ACC[0], ACC[0])
    x, times, y = _inputs(len(IDXS_3T) + 1)
    with torch.no_grad():
        ref_v, ref_a, _ = reference(x, list(times.unbind(1)), y)
        out = model.forward_train(x, times, y)
        other = load_reference_state_dict(checkpoint, "DeepFlow-S/2-3T", hidden_size=H, num_heads=HEADS,
                                          clamp_gap_scale=not legacy).eval().forward_train(x, times, y)
    for got, want in zip(out.velocities + out.accelerations, ref_v + ref_a):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
    assert (other.velocities[-1] - ref_v[-1]).abs().max() > 1e-2  # the other setting is a different network
