"""Importer of reference checkpoints: key coverage, round trip, and equivalence with an independent
re-implementation of the reference forward (written here from REFERENCE.md, plain torch ops, reference keys).
The command that reads and writes files is tested in tests/platform/inference/test_convert_job.py."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from deepflow.models.convert import ReferenceCheckpointError, load_reference_state_dict, to_reference_state_dict

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


def reference_forward(sd, x, times, y, depth, df_idxs):
    """times: list of k tensors [B]. Returns (velocities, accelerations) in image space."""
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
            z = _ln(torch.cat([h, a], dim=-1)) * (1 + scale.clamp(-5, 5)[:, None]) + shift[:, None]
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
