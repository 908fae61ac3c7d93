"""Batch sampling job: tiny random models, real export / checkpoint layouts (artifacts), restart and world-size
invariance, the config (YAML + --set + flags), and one-line user errors."""
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
from safetensors.torch import save as save_safetensors_bytes

from deepflow.artifacts import (
    MODEL_CARD_NAME,
    CheckpointLayout,
    ModelCard,
    ema_file_name,
    step_dir_name,
    write_export,
)
from deepflow.configuration import ConfigError, load_validated
from deepflow.errors import UserError
from deepflow.models import create_model
from deepflow.platform.inference.conditions import label_plan
from deepflow.platform.inference.generate import SamplerConfig, initial_noise
from deepflow.platform.inference.sample_job import SampleConfig, build_parser, load_config, main, run_sampling
from deepflow.storage import Storage

ROOT = Path(__file__).resolve().parents[3]
PIXEL_KWARGS = dict(depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=3, num_classes=10,
                    acc_widths=(16, 32, 16), class_dropout=0.1)


def _randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # zero-initialised heads too, so the samples depend on the weights
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def _pixel_card(**fields) -> ModelCard:
    return ModelCard(model="DeepFlow-S/2-2T", kwargs=PIXEL_KWARGS, kind="pixel", **fields)


@pytest.fixture(scope="module")
def pixel_export(tmp_path_factory) -> str:
    """An export (artifacts.write_export) of a tiny pixel-space DeepFlow-S/2-2T."""
    model = _randomized(create_model("DeepFlow-S/2-2T", **PIXEL_KWARGS))
    url = str(tmp_path_factory.mktemp("export") / "export")
    write_export(url, model.state_dict(), _pixel_card(step=5))
    return url


def _config(checkpoint: str, out: Path | str, **overrides) -> SampleConfig:
    base = dict(checkpoint=checkpoint, out=str(out), num_samples=10, chunk_size=4, batch_size=2,
                sampler={"method": "sde", "steps": 3, "cfg_scale": 2.0}, progress=False)
    return SampleConfig.model_validate({**base, **overrides})


def _arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return data["arr_0"], data["arr_1"]


def test_restart_skips_finished_chunks_and_world_size_does_not_change_images(pixel_export, tmp_path) -> None:
    single = tmp_path / "single"
    result = run_sampling(_config(pixel_export, single))
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
    again = run_sampling(_config(pixel_export, single))
    assert (again.chunks_done, again.chunks_skipped, again.images) == (1, 2, 4)
    assert {name: (chunks / name).stat().st_mtime_ns for name in kept} == kept
    np.testing.assert_array_equal(_arrays(single / "samples.npz")[0], images)

    # two ranks (rank 1 first, then rank 0 assembles): identical images
    split = tmp_path / "split"
    rank1 = run_sampling(_config(pixel_export, split), rank=1, world_size=2)
    assert rank1.npz_url is None and rank1.chunks_done == 1  # chunk 1 only
    run_sampling(_config(pixel_export, split), rank=0, world_size=2)
    np.testing.assert_array_equal(_arrays(split / "samples.npz")[0], images)

    # other settings in the same folder are refused
    with pytest.raises(ValueError, match="other settings"):
        run_sampling(_config(pixel_export, single, seed=1))


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


def test_config_validation_and_fingerprint() -> None:
    base = {"checkpoint": "x", "out": "o"}
    with pytest.raises(ConfigError, match=r"^chunk_size: must be a multiple of batch_size \(2\), got 5$"):
        load_validated(SampleConfig, tree={**base, "chunk_size": 5, "batch_size": 2})
    with pytest.raises(ConfigError, match=r"^sampler\.guidance_interval: .*0 <= low <= high <= 1"):
        load_validated(SampleConfig, tree=base, overrides=["sampler.guidance_interval=[0.5, 0.2]"])
    with pytest.raises(ConfigError, match=r"^sampler\.stepz: unknown field; did you mean sampler\.steps\?"):
        load_validated(SampleConfig, tree=base, overrides=["sampler.stepz=3"])
    with pytest.raises(ConfigError, match=r"^npz: nothing to write"):
        load_validated(SampleConfig, tree={**base, "npz": False})
    with pytest.raises(ConfigError, match=r"^checkpoint: Field required"):
        load_validated(SampleConfig, tree={"out": "o"})
    # the fingerprints of the former SampleSettings dataclass (an output folder survives the upgrade)
    # (run_sampling fingerprints the resolved precision: "auto" on a CPU without native bf16 hashes as fp32)
    assert SampleConfig(checkpoint="s3://runs/x/export", out="o", precision="fp32").fingerprint() == "c2b39fe246aa6ec5"
    config = load_validated(SampleConfig, tree={
        "checkpoint": "runs/x", "out": "o", "num_samples": 10, "chunk_size": 4, "batch_size": 2, "seed": 3,
        "sampler": {"method": "euler", "steps": 3, "cfg_scale": 2, "guidance_interval": [0.1, 0.9]},
        "labels": "shuffled", "decode": {"mode": "vae", "vae": "v", "latent_scale": 0.2}, "precision": "bf16"})
    assert config.fingerprint() == "03dd84825b5df386"
    assert SampleConfig(checkpoint="runs/x", out="o", captions="p.txt", dataset="d",
                        precision="fp32").fingerprint() == "bdc1625ca860c4b7"
    # where the images go and how they are written do not change them
    same = config.model_copy(update={"out": "elsewhere", "png": True, "progress": False, "endpoint_url": "http://e"})
    assert same.fingerprint() == config.fingerprint()


def test_every_flag_is_sugar_for_a_field(tmp_path) -> None:
    (tmp_path / "sample.yaml").write_text(yaml.safe_dump({
        "checkpoint": "from-file", "out": "o", "num_samples": 7, "sampler": {"steps": 5, "cfg_scale": 1.5},
        "decode": {"batch_size": 4},
    }))
    args = build_parser().parse_args([
        "--config", str(tmp_path / "sample.yaml"), "--set", "sampler.steps=9", "--set", "seed=4", "--steps", "11",
        "--checkpoint", "from-flag", "--chunk-size", "6", "--batch-size", "3", "--method", "heun",
        "--guidance-interval", "0.1", "0.8", "--labels", "shuffled", "--decode", "pixel", "--vae", "v",
        "--latent-scale", "0.5", "--vae-batch-size", "2", "--precision", "bf16", "--png", "--no-npz",
        "--endpoint-url", "http://e", "--device", "cpu", "--no-progress", "--text-batch-size", "8",
    ])
    config = load_config(args)
    assert config.checkpoint == "from-flag" and config.out == "o" and config.num_samples == 7  # file, flag wins
    assert config.seed == 4 and config.sampler.steps == 11 and config.sampler.cfg_scale == 1.5  # --set < flag
    assert (config.chunk_size, config.batch_size, config.sampler.method) == (6, 3, "heun")
    assert config.sampler.guidance_interval == (0.1, 0.8) and config.labels == "shuffled"
    assert config.decode.model_dump() == {"mode": "pixel", "vae": "v", "latent_scale": 0.5, "batch_size": 2}
    assert (config.precision, config.png, config.npz, config.progress) == ("bf16", True, False, False)
    assert (config.endpoint_url, config.device, config.text_batch_size) == ("http://e", "cpu", 8)
    plain = load_config(build_parser().parse_args(["--checkpoint", "c", "--out", "o"]))
    assert plain == SampleConfig(checkpoint="c", out="o")  # no flag given: the defaults


def test_config_file_with_set_samples(pixel_export, tmp_path) -> None:
    (tmp_path / "sample.yaml").write_text(yaml.safe_dump({
        "checkpoint": pixel_export, "out": str(tmp_path / "out"), "num_samples": 3, "chunk_size": 2,
        "batch_size": 2, "sampler": {"method": "euler", "steps": 2}, "progress": False,
    }))
    assert main(["--config", str(tmp_path / "sample.yaml"), "--set", "sampler.cfg_scale=1.5", "--png"]) == 0
    record = json.loads((tmp_path / "out" / "sampling.json").read_text())
    assert record["settings"]["sampler"] == {**SamplerConfig().model_dump(mode="json"), "method": "euler", "steps": 2,
                                             "cfg_scale": 1.5}
    assert "storage_options" not in record["settings"]
    images, labels = _arrays(tmp_path / "out" / "samples.npz")
    assert images.shape == (3, 8, 8, 3) and labels.tolist() == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "out" / "png").iterdir()) == ["000000.png", "000001.png", "000002.png"]


def test_user_mistakes_are_one_line_and_write_nothing(pixel_export, tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    typo = str(tmp_path / "exprot")
    assert main(["--checkpoint", typo, "--out", str(out), "--num-samples", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: checkpoint: {typo}: neither an export"), err
    assert not (out / "sampling.json").exists()  # a typo does not block the output folder
    # the same folder then works with the right checkpoint
    assert main(["--checkpoint", pixel_export, "--out", str(out), "--num-samples", "2", "--chunk-size", "2",
                 "--batch-size", "2", "--steps", "1", "--method", "euler", "--no-progress"]) == 0
    capsys.readouterr()
    for argv, expected in (
        (["--checkpoint", pixel_export, "--out", str(out), "--chunk-size", "3", "--batch-size", "2"],
         "error: chunk_size: must be a multiple of batch_size (2), got 3"),
        (["--checkpoint", pixel_export, "--out", str(tmp_path / "o2"), "--captions", "p.txt"],
         "error: captions: applies to text-to-image models"),
        (["--checkpoint", pixel_export, "--out", str(tmp_path / "o2"), "--labels", str(tmp_path / "none.npy")],
         f"error: labels: {tmp_path / 'none.npy'}"),
        (["--checkpoint", pixel_export, "--out", str(out), "--num-samples", "3"],
         f"error: out: {out} holds samples made with other settings"),
        (["--out", str(out)], "error: checkpoint: Field required"),
        (["--checkpoint", pixel_export, "--out", str(tmp_path / "o2"), "--decode", "vae"],
         "error: decode.vae: a latent model needs a VAE"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(expected), (argv, err)
    assert not (tmp_path / "o2").exists()
    monkeypatch.setenv("DEEPFLOW_DEBUG", "1")
    with pytest.raises(UserError, match="^checkpoint: .*neither an export") as info:  # the traceback, with its cause
        main(["--checkpoint", typo, "--out", str(tmp_path / "o3")])
    assert isinstance(info.value.__cause__, FileNotFoundError)


def _write_checkpoint_step(root: Path, step: int, weights: dict[str, torch.Tensor], committed: bool) -> None:
    """A checkpoint step folder as the trainer lays it out (artifacts names): model.json, ema/full, COMMIT."""
    storage = Storage(str(root)).child(step_dir_name(step))
    storage.write_bytes(ema_file_name(None), save_safetensors_bytes({k: v.contiguous() for k, v in weights.items()}))
    storage.write_json(MODEL_CARD_NAME, _pixel_card(step=step, ema=True).model_dump(mode="json", exclude_none=True))
    if committed:
        CheckpointLayout(Storage(str(root))).commit(step, {"step": step})


def test_samples_from_a_checkpoint_folder_equal_those_of_its_export(tmp_path) -> None:
    weights = {}
    for step, committed in ((10, True), (20, True), (30, False)):
        model = _randomized(create_model("DeepFlow-S/2-2T", **PIXEL_KWARGS), seed=step)
        weights[step] = dict(model.named_parameters())
        _write_checkpoint_step(tmp_path / "checkpoints", step, weights[step], committed)
    write_export(str(tmp_path / "export-20"), weights[20], _pixel_card(step=20))
    small = dict(num_samples=4, chunk_size=2, sampler={"method": "euler", "steps": 2, "cfg_scale": 1.5})
    run_sampling(_config(str(tmp_path / "checkpoints"), tmp_path / "from-root", **small))  # newest committed: 20
    run_sampling(_config(str(tmp_path / "checkpoints" / "step-0000010"), tmp_path / "from-step", **small))
    run_sampling(_config(str(tmp_path / "export-20"), tmp_path / "from-export", **small))
    from_root = _arrays(tmp_path / "from-root" / "samples.npz")[0]
    np.testing.assert_array_equal(from_root, _arrays(tmp_path / "from-export" / "samples.npz")[0])
    assert not np.array_equal(from_root, _arrays(tmp_path / "from-step" / "samples.npz")[0])
    sharded = Storage(str(tmp_path / "sharded")).child(step_dir_name(1))
    sharded.write_json(MODEL_CARD_NAME, _pixel_card().model_dump(mode="json", exclude_none=True))
    sharded.write_bytes(ema_file_name(0), save_safetensors_bytes({"a": torch.zeros(1)}))
    with pytest.raises(ValueError, match="sharded"):
        run_sampling(_config(sharded.url, tmp_path / "from-sharded", **small))
    assert not (tmp_path / "from-sharded" / "sampling.json").exists()


def _tiny_vae(path: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1, sample_size=16).save_pretrained(path)


def test_sample_cli_latent_model_vae_decode_pngs(tmp_path) -> None:
    kwargs = {k: v for k, v in {**PIXEL_KWARGS, "in_channels": 4, "input_size": 4}.items() if k != "acc_widths"}
    model = _randomized(create_model("SiT-S/2", **kwargs))
    _tiny_vae(tmp_path / "vae")
    write_export(str(tmp_path / "export" / "export.safetensors"), model.state_dict(),
                 ModelCard(model="SiT-S/2", kwargs=kwargs, kind="vae", latent_scale=0.18215, vae=str(tmp_path / "vae")))
    spec = importlib.util.spec_from_file_location("sample_job_shim", ROOT / "jobs" / "sample.py")
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
    assert record["settings"]["sampler"]["method"] == "euler" and record["settings"]["labels"] == "shuffled"
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
    reference = run_sampling(_config(pixel_export, tmp_path / "one", num_samples=6, chunk_size=2,
                                     sampler={"steps": 2}))
    assert reference.chunks_done == 3
    np.testing.assert_array_equal(_arrays(out / "samples.npz")[0], _arrays(tmp_path / "one" / "samples.npz")[0])
    assert yaml.safe_load((out / "sampling.json").read_text())["settings"]["num_samples"] == 6


@pytest.mark.slow
def test_sampling_to_an_object_store_restarts_from_its_chunks(pixel_export, s3_server) -> None:
    """Output on a real S3-compatible server (moto): chunks are single PUTs, samples.npz is uploaded."""
    import fsspec

    bucket = s3_server.make_bucket("sample-job-restart")
    config = _config(pixel_export, f"{bucket}/run/samples", num_samples=6, chunk_size=2, sampler={"steps": 2},
                     storage_options=s3_server.storage_options)
    first = run_sampling(config)
    assert (first.chunks_done, first.npz_url) == (3, f"{bucket}/run/samples/samples.npz")
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    with fs.open(first.npz_url, "rb") as handle, np.load(handle, allow_pickle=False) as data:
        images = data["arr_0"]
    assert images.shape == (6, 8, 8, 3)
    fs.rm(f"{bucket}/run/samples/chunks/chunk-000002.npz")
    again = run_sampling(config)
    assert (again.chunks_done, again.chunks_skipped) == (1, 2)
    with fs.open(again.npz_url, "rb") as handle, np.load(handle, allow_pickle=False) as data:
        np.testing.assert_array_equal(data["arr_0"], images)
