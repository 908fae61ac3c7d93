"""Batch sampling job: tiny random models, real exports/checkpoint layouts, restart and world-size invariance."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from deepflow.models import create_model
from deepflow.platform.train.checkpoint import export_weights
from deepflow.platform.train.config import RunConfig, config_to_yaml
from deepflow.platform.inference.batch_sampling import SampleSettings, initial_noise, label_plan, resolve_weights, run_sampling

ROOT = Path(__file__).resolve().parents[2]
PIXEL_KWARGS = dict(depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=3, num_classes=10,
                    acc_widths=(16, 32, 16), class_dropout=0.1)


def _randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # zero-initialised heads too, so the samples depend on the weights
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


@pytest.fixture(scope="module")
def pixel_export(tmp_path_factory) -> str:
    """A real export (checkpoint.export_weights) of a tiny pixel-space DeepFlow-S/2-2T."""
    model = _randomized(create_model("DeepFlow-S/2-2T", **PIXEL_KWARGS))
    url = str(tmp_path_factory.mktemp("export") / "export")
    export_weights(model.state_dict(), url, {"model": "DeepFlow-S/2-2T", "kwargs": PIXEL_KWARGS, "step": 5,
                                             "manifest": {"kind": "pixel", "latent_scale": None}})
    return url


def _settings(checkpoint: str, out: Path, **overrides) -> SampleSettings:
    base = dict(checkpoint=checkpoint, out=str(out), num_samples=10, chunk_size=4, batch_size=2, method="sde",
                steps=3, cfg_scale=2.0)
    return SampleSettings(**{**base, **overrides})


def _arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return data["arr_0"], data["arr_1"]


@pytest.mark.slow
def test_restart_skips_finished_chunks_and_world_size_does_not_change_images(pixel_export, tmp_path) -> None:
    single = tmp_path / "single"
    result = run_sampling(_settings(pixel_export, single), progress=False)
    assert (result.chunks_done, result.chunks_skipped, result.images) == (3, 0, 10)
    images, labels = _arrays(single / "samples.npz")
    assert images.shape == (10, 8, 8, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(10) % 10)
    assert len({images[i].tobytes() for i in range(10)}) == 10  # distinct noise per sample

    # "crash": chunk 1 is lost; a restart redoes only that chunk, leaves the others alone, same images
    chunks = single / "chunks"
    kept = {name: (chunks / name).stat().st_mtime_ns for name in ("chunk-000000.npz", "chunk-000002.npz")}
    (chunks / "chunk-000001.npz").unlink()
    (single / "samples.npz").unlink()
    again = run_sampling(_settings(pixel_export, single), progress=False)
    assert (again.chunks_done, again.chunks_skipped, again.images) == (1, 2, 4)
    assert {name: (chunks / name).stat().st_mtime_ns for name in kept} == kept
    np.testing.assert_array_equal(_arrays(single / "samples.npz")[0], images)

    # two ranks (rank 1 first, then rank 0 assembles): identical images
    split = tmp_path / "split"
    rank1 = run_sampling(_settings(pixel_export, split), rank=1, world_size=2, progress=False)
    assert rank1.npz_url is None and rank1.chunks_done == 1  # chunk 1 only
    run_sampling(_settings(pixel_export, split), rank=0, world_size=2, progress=False)
    np.testing.assert_array_equal(_arrays(split / "samples.npz")[0], images)

    # other settings in the same folder are refused
    with pytest.raises(ValueError, match="other settings"):
        run_sampling(_settings(pixel_export, single, seed=1), progress=False)


def test_noise_and_labels_are_per_sample_deterministic(tmp_path) -> None:
    a = initial_noise(np.array([3, 4, 5]), (2, 4, 4), seed=0)
    b = initial_noise(np.array([5, 9]), (2, 4, 4), seed=0)
    torch.testing.assert_close(a[2], b[0])  # sample 5 gets the same noise whatever its batch
    assert not torch.allclose(a[0], a[1])
    assert not torch.allclose(initial_noise(np.array([3]), (2, 4, 4), seed=1)[0], a[0])

    shuffled = label_plan("shuffled", 30, 10, seed=0)
    assert np.bincount(shuffled, minlength=10).tolist() == [3] * 10
    assert not np.array_equal(shuffled, label_plan("cyclic", 30, 10, seed=0))
    np.testing.assert_array_equal(shuffled, label_plan("shuffled", 30, 10, seed=0))
    np.save(tmp_path / "labels.npy", np.array([1, 2, 3, 4]))
    np.testing.assert_array_equal(label_plan(str(tmp_path / "labels.npy"), 3, 10, 0), [1, 2, 3])
    with pytest.raises(ValueError, match="fewer than"):
        label_plan(str(tmp_path / "labels.npy"), 5, 10, 0)
    (tmp_path / "bad.txt").write_text("1 2 12")
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        label_plan(str(tmp_path / "bad.txt"), 3, 10, 0)
    with pytest.raises(ValueError, match="multiple of batch_size"):
        _settings("x", tmp_path, chunk_size=5, batch_size=2).validate()


def test_training_checkpoint_resolves_newest_committed_ema(tmp_path) -> None:
    """Layout of checkpoint.CheckpointManager: step-NNNNNNN/{ema/full.safetensors, config.yaml, COMMIT}."""
    config = RunConfig.model_validate({"model": {"name": "DeepFlow-S/2-2T", "depth": 2, "hidden_size": 32,
                                                 "num_heads": 2, "input_size": 8, "in_channels": 3,
                                                 "num_classes": 10, "extra": {"acc_widths": [16, 32, 16]}}})
    weights = {}
    for step, committed in ((10, True), (20, True), (30, False)):
        model = _randomized(create_model("DeepFlow-S/2-2T", **PIXEL_KWARGS), seed=step)
        folder = tmp_path / "checkpoints" / f"step-{step:07d}"
        (folder / "ema").mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.named_parameters()}, str(folder / "ema" / "full.safetensors"))
        (folder / "config.yaml").write_text(config_to_yaml(config))
        if committed:
            (folder / "COMMIT").write_text("{}")
        weights[step] = dict(model.named_parameters())
    state, meta = resolve_weights(str(tmp_path / "checkpoints"))
    assert meta["model"] == "DeepFlow-S/2-2T" and meta["kwargs"]["in_channels"] == 3
    torch.testing.assert_close(state["pos_embed"], weights[20]["pos_embed"])
    torch.testing.assert_close(state["velocity_heads.1.linear.weight"], weights[20]["velocity_heads.1.linear.weight"])
    sharded = tmp_path / "sharded" / "step-0000001"
    (sharded / "ema").mkdir(parents=True)
    (sharded / "config.yaml").write_text(config_to_yaml(config))
    save_file({"a": torch.zeros(1)}, str(sharded / "ema" / "rank-00000.safetensors"))
    with pytest.raises(ValueError, match="sharded"):
        resolve_weights(str(sharded))
    with pytest.raises(FileNotFoundError, match="neither an export"):
        resolve_weights(str(tmp_path / "nothing-here"))


def _tiny_vae(path: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1, sample_size=16).save_pretrained(path)


@pytest.mark.slow
def test_sample_cli_latent_model_vae_decode_pngs(tmp_path) -> None:
    kwargs = {**PIXEL_KWARGS, "in_channels": 4, "input_size": 4}
    model = _randomized(create_model("SiT-S/2", **{k: v for k, v in kwargs.items() if k != "acc_widths"}))
    _tiny_vae(tmp_path / "vae")
    export_weights(model.state_dict(), str(tmp_path / "export"), {
        "model": "SiT-S/2", "kwargs": {k: v for k, v in kwargs.items() if k != "acc_widths"},
        "manifest": {"kind": "vae", "latent_scale": 0.18215, "encoder": {"model": str(tmp_path / "vae")}},
    })
    spec = importlib.util.spec_from_file_location("sample_job", ROOT / "jobs" / "sample.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "samples"
    code = job.main(["--checkpoint", str(tmp_path / "export" / "export.safetensors"), "--out", str(out),
                     "--num-samples", "3", "--chunk-size", "2", "--batch-size", "2", "--method", "euler",
                     "--steps", "2", "--png", "--no-progress", "--labels", "shuffled"])
    assert code == 0
    images, labels = _arrays(out / "samples.npz")
    assert images.shape == (3, 8, 8, 3)  # 4x4 latents, 2x VAE upsampling
    for index in range(3):
        np.testing.assert_array_equal(np.asarray(Image.open(out / "png" / f"{index:06d}.png")), images[index])
    record = json.loads((out / "sampling.json").read_text())
    assert record["settings"]["method"] == "euler" and record["settings"]["labels"] == "shuffled"
    assert job.main(["--checkpoint", "x", "--out", str(out), "--chunk-size", "3", "--batch-size", "2"]) == 2


@pytest.mark.slow
def test_torchrun_two_ranks_split_the_chunks(pixel_export, tmp_path) -> None:
    out = tmp_path / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={port}",
               str(ROOT / "jobs" / "sample.py"), "--checkpoint", pixel_export, "--out", str(out),
               "--num-samples", "6", "--chunk-size", "2", "--batch-size", "2", "--steps", "2", "--no-progress"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0/2: sampled 2 chunks" in done.stdout and "rank 1/2: sampled 1 chunks" in done.stdout
    reference = run_sampling(_settings(pixel_export, tmp_path / "one", num_samples=6, chunk_size=2, steps=2,
                                       cfg_scale=1.0), progress=False)
    assert reference.chunks_done == 3
    np.testing.assert_array_equal(_arrays(out / "samples.npz")[0], _arrays(tmp_path / "one" / "samples.npz")[0])
    assert yaml.safe_load((out / "sampling.json").read_text())["settings"]["num_samples"] == 6


@pytest.mark.slow
def test_sampling_to_an_object_store_restarts_from_its_chunks(pixel_export, s3_server) -> None:
    """Output on a real S3-compatible server (moto): chunks are single PUTs, samples.npz is uploaded."""
    import fsspec

    bucket = s3_server.make_bucket("sample-job-restart")
    settings = _settings(pixel_export, Path("unused"), num_samples=6, chunk_size=2, steps=2)
    settings.out, settings.storage_options = f"{bucket}/run/samples", s3_server.storage_options
    first = run_sampling(settings, progress=False)
    assert (first.chunks_done, first.npz_url) == (3, f"{bucket}/run/samples/samples.npz")
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    with fs.open(first.npz_url, "rb") as handle, np.load(handle, allow_pickle=False) as data:
        images = data["arr_0"]
    assert images.shape == (6, 8, 8, 3)
    fs.rm(f"{bucket}/run/samples/chunks/chunk-000002.npz")
    again = run_sampling(settings, progress=False)
    assert (again.chunks_done, again.chunks_skipped) == (1, 2)
    with fs.open(again.npz_url, "rb") as handle, np.load(handle, allow_pickle=False) as data:
        np.testing.assert_array_equal(data["arr_0"], images)
