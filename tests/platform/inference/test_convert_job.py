"""``deepflow convert``: a reference-format checkpoint -> an export with a full model card, into a new folder or a
``.safetensors`` path, that the sampling job reads (through its command line, as a separate process)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deepflow.artifacts import load_weights
from deepflow.models import create_model
from deepflow.platform.inference.convert import main
from deepflow.platform.inference.sample_job import main as sample_main
from tests.models.test_convert import HEADS, H, make_reference_state_dict

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture()
def reference(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = make_reference_state_dict(2, 1, False)
    path = tmp_path / "ref.pt"
    torch.save({"ema": state, "model": state, "steps": 7,
                "args": argparse.Namespace(depth=2, df_idxs=[1], qk_norm=False, model="DeepFlow-S/2")}, path)
    return path, state


def _convert(reference: Path, out: Path, *extra: str) -> int:
    return main(["--reference", str(reference), "--name", "DeepFlow-S/2-2T", "--out", str(out),
                 "--num-heads", str(HEADS), "--hidden-size", str(H), *extra])


def test_convert_into_a_new_folder_writes_a_full_model_card(reference, tmp_path, capsys) -> None:
    path, state = reference
    out = tmp_path / "new" / "converted"  # its parent does not exist either
    assert _convert(path, out) == 0
    assert "key layers [1, 2]" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "export.safetensors"]
    weights, card = load_weights(str(out))
    assert torch.equal(weights["velocity_heads.1.linear.weight"], state["final_layer.1.linear.weight"])
    assert torch.equal(weights["vera_blocks.0.cross_attention.in_proj_weight"],
                       state["df_blocks.0.cross_attention.multihead_attn.in_proj_weight"])
    assert (card.model, card.condition, card.kind, card.vae) == ("DeepFlow-S/2-2T", "class", "vae",
                                                                 "stabilityai/sd-vae-ft-ema")
    assert card.latent_scale == pytest.approx(0.18215) and card.source == str(path)
    assert (card.step, card.ema) == (7, True)
    assert card.kwargs["depth"] == 2 and card.kwargs["key_layers"] == [1, 2] and card.kwargs["hidden_size"] == H
    rebuilt = create_model(card.model, **card.kwargs)  # the card rebuilds the model exactly
    rebuilt.load_state_dict(weights, strict=True)
    _tiny_vae(tmp_path / "vae")  # the card names the SD VAE; no download in tests: --vae overrides it
    assert sample_main(["--checkpoint", str(out), "--out", str(tmp_path / "samples"), "--vae", str(tmp_path / "vae"),
                        "--num-samples", "2", "--chunk-size", "2", "--batch-size", "2", "--method", "euler",
                        "--steps", "1", "--no-progress"]) == 0
    with np.load(tmp_path / "samples" / "samples.npz") as data:
        assert data["arr_0"].shape == (2, 16, 16, 3)  # 8x8 latents, 2x VAE upsampling


def test_convert_to_a_safetensors_path_and_flags(reference, tmp_path) -> None:
    path, _ = reference
    out = tmp_path / "dir" / "model.safetensors"
    assert _convert(path, out, "--kind", "pixel", "--weights", "model") == 0
    card = json.loads((tmp_path / "dir" / "model.json").read_text())
    assert card["kind"] == "pixel" and "vae" not in card and "latent_scale" not in card and card["ema"] is False
    assert _convert(path, tmp_path / "other", "--vae", "my/vae", "--latent-scale", "0.13") == 0
    _, other = load_weights(str(tmp_path / "other"))
    assert (other.vae, other.latent_scale) == ("my/vae", 0.13)


def test_convert_mistakes_are_one_line(reference, tmp_path, capsys) -> None:
    path, _ = reference
    assert _convert(tmp_path / "missing.pt", tmp_path / "out") == 2
    assert capsys.readouterr().err.strip() == f"error: reference: {tmp_path / 'missing.pt'}: no such file"
    assert main(["--reference", str(path), "--name", "DeepFlow-S/2-2T", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hidden_size 32 does not match 'DeepFlow-S/2-2T' (384)" in err[0]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert _convert(tmp_path / "junk.pt", tmp_path / "out") == 2
    assert capsys.readouterr().err.startswith(f"error: reference: {tmp_path / 'junk.pt'}: not a weights-only")
    assert not (tmp_path / "out").exists()


def _tiny_vae(path: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1, sample_size=16).save_pretrained(path)


@pytest.mark.slow
def test_sample_job_command_samples_a_converted_model(reference, tmp_path) -> None:
    path, _ = reference
    converted = tmp_path / "converted.safetensors"
    assert _convert(path, converted) == 0
    _tiny_vae(tmp_path / "vae")  # the card names the SD VAE; no download in tests: --vae overrides it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "deepflow.platform.inference.sample_job", "--checkpoint", str(converted),
               "--out", str(tmp_path / "samples"), "--vae", str(tmp_path / "vae"), "--num-samples", "4",
               "--chunk-size", "2", "--batch-size", "2", "--method", "euler", "--steps", "2", "--cfg-scale", "1.5",
               "--no-progress"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0/1: sampled 2 chunks" in done.stdout and "Traceback" not in done.stderr
    with np.load(tmp_path / "samples" / "samples.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (4, 16, 16, 3) and labels.tolist() == [0, 1, 2, 3]  # 8x8 latents, 2x VAE upsampling
    bad = subprocess.run([*command[:4], str(tmp_path / "typo.safetensors"), "--out", str(tmp_path / "s2")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith(f"error: checkpoint: {tmp_path / 'typo.safetensors'}: no ")
    assert "Traceback" not in bad.stderr and not (tmp_path / "s2" / "sampling.json").exists()
