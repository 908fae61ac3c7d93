"""Sources, preprocessing, shard format, storage (local + moto S3) and configuration errors."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import webdataset
from PIL import Image

from deepflow.data_pipeline.config import (
    CocoSourceConfig,
    ConfigError,
    EmojiSourceConfig,
    WebDatasetSourceConfig,
    load_config,
)
from deepflow.data_pipeline.precompute import resolve_rank
from deepflow.data_pipeline.preprocess import adm_center_crop, preprocess_image
from deepflow.data_pipeline.shards import Block, ShardError, build_shard, decode_shard, encode_npy
from deepflow.data_pipeline.sources import CocoSource, CorruptImageError, EmojiSource, WebDatasetSource
from deepflow.storage import RetryPolicy, Storage, register_webdataset_gopen, resolve_storage_options, with_retries

from .conftest import REPO


def png_bytes(width: int, height: int, value: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_adm_center_crop_halves_then_crops_the_centre() -> None:
    gradient = np.tile(np.arange(1200, dtype=np.float64) * 255 / 1199, (900, 1)).astype(np.uint8)
    image = Image.fromarray(np.stack([gradient] * 3, axis=-1))
    cropped = adm_center_crop(image, 256)
    assert cropped.size == (256, 256)
    row = np.asarray(cropped)[128, :, 0].astype(int)
    assert abs(row[128] - 128) <= 3  # the centre column of the source stays in the centre
    # 1200x900 -> box-halved to 600x450 -> bicubic to 341x256 -> centre 256 columns: 1/8 cut on each side
    assert abs(row[0] - 32) <= 3 and abs(row[-1] - 222) <= 3
    assert preprocess_image(image, 64, "adm_center_crop", None).shape == (3, 64, 64)
    gray = Image.fromarray(np.zeros((28, 28), dtype=np.uint8))
    assert preprocess_image(gray, 32, "pad", None).shape == (1, 32, 32)
    assert preprocess_image(gray, 32, "resize", 3).shape == (3, 32, 32)


def test_coco_source_keeps_all_captions_and_flags_corrupt_images(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images/a.jpg").write_bytes(png_bytes(64, 48))
    (tmp_path / "images/b.jpg").write_bytes(b"broken")
    (tmp_path / "images/c.jpg").write_bytes(png_bytes(20, 20))
    annotations = {
        "images": [{"id": 3, "file_name": "c.jpg"}, {"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 1, "caption": "a grey square "}, {"image_id": 2, "caption": "broken"},
                        {"image_id": 1, "caption": "nothing to see"}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    source = CocoSource(CocoSourceConfig(kind="coco", annotations=str(tmp_path / "captions.json"),
                                         images=str(tmp_path / "images")))
    assert len(source) == 2 and source.has_captions  # c.jpg has no caption
    sample = source.load(0)
    assert sample.key == "a.jpg" and sample.captions == ["a grey square", "nothing to see"] and sample.label == -1
    assert sample.image.size == (64, 48)
    with pytest.raises(CorruptImageError, match="b.jpg"):
        source.load(1)
    assert [s.key for s in source] == ["a.jpg"]


def write_tar(path: Path, samples: list[dict]) -> None:
    with webdataset.TarWriter(str(path), encoder=False) as writer:
        for sample in samples:
            writer.write(sample)


def test_webdataset_source_labels_and_captions_local_and_s3(tmp_path: Path, s3_server) -> None:  # noqa: ANN001
    write_tar(tmp_path / "part-0.tar", [
        {"__key__": "x0", "png": png_bytes(10, 10, 10), "cls": b"2"},
        {"__key__": "x1", "cls": b"1"},  # no image: ignored
        {"__key__": "x2", "jpg": png_bytes(12, 8, 200), "cls": b"0"},
    ])
    write_tar(tmp_path / "part-1.tar", [{"__key__": "y0", "png": png_bytes(5, 5), "cls": b"1"}])
    source = WebDatasetSource(WebDatasetSourceConfig(kind="webdataset", urls=str(tmp_path / "part-{0..1}.tar")))
    assert len(source) == 3 and source.num_classes == 3 and not source.has_captions
    assert [source.key(i) for i in range(3)] == ["part-0.tar/x0", "part-0.tar/x2", "part-1.tar/y0"]
    second = source.load(1)
    assert second.label == 0 and second.image.size == (12, 8) and np.asarray(second.image)[0, 0, 0] == 200

    bucket = s3_server.make_bucket("wds-source")
    write_tar(tmp_path / "caps.tar", [{"__key__": "c0", "png": png_bytes(6, 6), "json": b'{"caption": "a cat"}'},
                                      {"__key__": "c1", "png": png_bytes(6, 6), "txt": b"one\ntwo\n"}])
    storage = Storage(bucket, s3_server.storage_options)
    storage.write_bytes("caps.tar", (tmp_path / "caps.tar").read_bytes())
    captioned = WebDatasetSource(WebDatasetSourceConfig(kind="webdataset", urls=[f"{bucket}/caps.tar"],
                                                        storage_options=s3_server.storage_options))
    assert captioned.has_captions and [captioned.load(i).captions for i in range(2)] == [["a cat"], ["one", "two"]]

    register_webdataset_gopen(s3_server.storage_options)  # plain webdataset pipelines can read s3:// too
    keys = [sample["__key__"] for sample in webdataset.WebDataset(f"{bucket}/caps.tar", shardshuffle=False)]
    assert keys == ["c0", "c1"]


def test_emoji_source_renders_named_glyphs() -> None:
    source = EmojiSource(EmojiSourceConfig(kind="emoji"))
    assert len(source) > 1000
    index = next(i for i in range(len(source)) if source.key(i) == "emoji-u1f600")
    sample = source.load(index)
    assert sample.captions == ["grinning face", "a grinning face emoji"]
    pixels = preprocess_image(sample.image, 32, "resize", 3)
    assert pixels.shape == (3, 32, 32) and pixels[:, 16, 16].min() < 250  # a coloured glyph on white
    assert pixels[:, 0, 0].tolist() == [255, 255, 255]


def test_shards_refuse_pickled_arrays_and_round_trip() -> None:
    block = Block(["a", "b"], {"labels": np.array([1, 2]), "pixels": np.zeros((2, 1, 2, 2), np.uint8)})
    data = build_shard(block, samples_per_block=1)
    decoded = decode_shard(data, "mem://shard")
    assert decoded.keys == ["a", "b"] and decoded.arrays["labels"].tolist() == [1, 2]
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    tar = io.BytesIO()
    with webdataset.TarWriter(tar, encoder=False) as writer:
        writer.write({"__key__": "b000000", "keys.json": b'["a"]', "labels.npy": buffer.getvalue()})
    with pytest.raises(ShardError, match="pickle"):
        decode_shard(tar.getvalue(), "mem://evil")
    assert encode_npy(np.arange(3))[:6] == b"\x93NUMPY"


def test_storage_atomic_writes_retries_and_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = Storage(str(tmp_path / "out"))
    storage.write_bytes("x.bin", b"1234")
    storage.write_json("y.json", {"a": 1})
    assert sorted(os.listdir(tmp_path / "out")) == ["x.bin", "y.json"]  # no temporaries left
    assert storage.read_bytes("x.bin") == b"1234" and storage.list(suffix=".json") == ["y.json"]

    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    fast = RetryPolicy(budget_s=5.0, base_delay_s=0.001)
    assert with_retries(flaky, "s3://b/k", fast) == "ok" and len(calls) == 3
    with pytest.raises(FileNotFoundError, match="missing"):
        with_retries(lambda: storage.read_bytes("missing"), "missing", fast)

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert resolve_storage_options("s3://b/x")["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9"
    explicit = resolve_storage_options("s3://b/x", {"client_kwargs": {"endpoint_url": "http://h:1"}})
    assert explicit["client_kwargs"]["endpoint_url"] == "http://h:1"
    assert resolve_storage_options("s3://b/x", None, "http://cfg:2")["client_kwargs"]["endpoint_url"] == "http://cfg:2"
    assert resolve_storage_options("/local/dir") == {}


def test_config_errors_name_the_field_path(tmp_path: Path) -> None:
    digits = REPO / "configs/demo/precompute-digits.yaml"
    with pytest.raises(ConfigError, match=r"^encoder\.flip_copy: unknown field \(allowed: kind, dtype\)"):
        load_config(digits, ["encoder.flip_copy=true"])
    with pytest.raises(ConfigError, match=r"output\.samples_per_shard: Input should be greater than or equal to 1"):
        load_config(digits, ["output.samples_per_shard=0"])
    with pytest.raises(ConfigError, match="expected dotted.path=value"):
        load_config(digits, ["output.url"])
    with pytest.raises(ConfigError, match=r"preprocess\.channels: the vae encoder needs 3 channels"):
        load_config(tree={"source": {"kind": "digits"}, "encoder": {"kind": "vae"}, "output": {"url": "x"},
                          "preprocess": {"channels": 1}})
    config = load_config(digits, ["output.url=s3://b/d", "batch_size=7"])
    assert config.output.url == "s3://b/d" and config.batch_size == 7
    for path in sorted((REPO / "configs").glob("**/precompute*.yaml")):
        load_config(path)  # every shipped config validates

    assert resolve_rank(config, environ={"RANK": "3", "WORLD_SIZE": "4"}).rank == 3
    with pytest.raises(ValueError, match="slices"):
        resolve_rank(config, environ={"JOB_COMPLETION_INDEX": "2"})
    config.slices = 5
    info = resolve_rank(config, environ={"JOB_COMPLETION_INDEX": "2"})
    assert (info.rank, info.world_size) == (2, 5)
    with pytest.raises(ValueError, match="outside"):
        resolve_rank(config, rank=5, world_size=5)
