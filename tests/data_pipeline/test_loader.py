"""ShardLoader: stream/rank/worker splits, exact resume on any world size, unreadable (corrupt, missing) shards,
latent sampling and flips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from deepflow.data_pipeline.arrays import write_array_dataset
from deepflow.data_pipeline.loader import ShardLoader
from deepflow.data_pipeline.shards import ShardError, decode_shard
from deepflow.data_pipeline.stream import NoReadableShardError
from deepflow.errors import UserError


def take_keys(loader: ShardLoader, count: int) -> list[str]:
    keys: list[str] = []
    for batch in loader:
        keys += batch["key"]
        if len(keys) >= count:
            break
    return keys[:count]


def test_two_ranks_read_disjoint_complete_epochs(digits_dataset: str) -> None:
    seen: list[set[str]] = []
    for rank in (0, 1):
        loader = ShardLoader(digits_dataset, batch_size=50, rank=rank, world_size=2, with_keys=True)
        epoch = loader.epoch_samples(0)
        keys = take_keys(loader, epoch)
        assert len(set(keys)) == epoch  # no repeats inside an epoch
        seen.append(set(keys))
        loader.close()
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 1797


def test_workers_split_shards_and_epochs_reshuffle(digits_dataset: str) -> None:
    loader = ShardLoader(digits_dataset, batch_size=64, num_workers=2, with_keys=True, shuffle_buffer=300)
    epoch = loader.epoch_samples(0)
    assert epoch == 1797
    iterator = iter(loader)
    keys: list[str] = []
    while len(keys) < 2 * 64 * 8:
        keys += next(iterator)["key"]
    loader.close()
    worker_keys = [keys[i * 64 : (i + 1) * 64] for i in range(0, 16, 2)], [keys[i * 64 : (i + 1) * 64] for i in range(1, 16, 2)]
    from_worker = [{k for batch in batches for k in batch} for batches in worker_keys]
    assert not from_worker[0] & from_worker[1]  # workers read disjoint shards within their first epoch
    single = ShardLoader(digits_dataset, batch_size=1797, with_keys=True, shuffle_buffer=300)
    iterator = iter(single)
    first, second = next(iterator)["key"], next(iterator)["key"]
    assert sorted(first) == sorted(second) and first != second  # every epoch complete, freshly shuffled
    single.close()


@pytest.mark.parametrize(("num_workers", "worker_mode"), [(0, "thread"), (2, "thread"), (2, "process")])
def test_resume_mid_epoch_gives_exactly_the_rest(digits_dataset: str, num_workers: int, worker_mode: str) -> None:
    def make() -> ShardLoader:
        return ShardLoader(digits_dataset, batch_size=40, rank=1, world_size=2, num_workers=num_workers,
                           shuffle_buffer=200, seed=7, with_keys=True, worker_mode=worker_mode, streams=4)

    reference = make()
    iterator = iter(reference)
    batches = [next(iterator) for _ in range(30)]  # crosses an epoch boundary (~900 samples per epoch)
    reference.close()

    first = make()
    iterator = iter(first)
    for _ in range(13):
        next(iterator)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able
    first.close()

    resumed = make()
    resumed.load_state_dict(state)
    iterator = iter(resumed)
    for expected in batches[13:]:
        batch = next(iterator)
        assert batch["key"] == expected["key"]
        assert torch.equal(batch["x"], expected["x"])  # same flips
        assert torch.equal(batch["y"], expected["y"])
    resumed.close()
    with pytest.raises(ValueError, match="seed"):
        other = ShardLoader(digits_dataset, batch_size=40, rank=1, world_size=2, streams=4, seed=8)
        other.load_state_dict(state)


def _chunks_by_stream(batch: dict, chunk: int) -> dict[int, tuple]:
    """stream -> (keys, x, y) of that stream's chunk in a batch."""
    return {stream: (batch["key"][i * chunk:(i + 1) * chunk], batch["x"][i * chunk:(i + 1) * chunk],
                     batch["y"][i * chunk:(i + 1) * chunk]) for i, stream in enumerate(batch["streams"])}


def _steps(group: list[ShardLoader], count: int, rows: int) -> list[dict[int, tuple]]:
    """``count`` global batches of the ranks' loaders ``group``: per step, stream -> its chunk of ``rows`` rows."""
    iterators = [iter(loader) for loader in group]
    out = []
    for _ in range(count):
        merged: dict[int, tuple] = {}
        for iterator in iterators:
            merged.update(_chunks_by_stream(next(iterator), rows))
        out.append(merged)
    return out


def _assert_same_chunks(got: dict[int, tuple], expected: dict[int, tuple]) -> None:
    assert got.keys() == expected.keys()
    for stream, (keys, x, y) in got.items():
        assert keys == expected[stream][0]
        assert torch.equal(x, expected[stream][1]) and torch.equal(y, expected[stream][2])


def test_the_global_batch_does_not_depend_on_ranks_or_workers_and_resumes_on_another_world_size(
    digits_dataset: str,
) -> None:
    """4 streams, global batch 48: one rank (0 or 3 readers) and two ranks of 24 (2 readers each) see the same
    samples with the same flips in every step; a 2-rank state (merged) continues on 1 rank and back."""
    def loaders(world: int, workers: int) -> list[ShardLoader]:
        return [ShardLoader(digits_dataset, batch_size=48 // world, rank=r, world_size=world, num_workers=workers,
                            streams=4, shuffle_buffer=150, seed=3, with_keys=True) for r in range(world)]

    single = loaders(1, 0)
    reference = _steps(single, 50, 12)  # > 1 epoch of every stream (1797 / 48 = 37 steps)
    for group in (loaders(1, 3), loaders(2, 2)):
        for got, expected in zip(_steps(group, 50, 12), reference):
            _assert_same_chunks(got, expected)
        for loader in group:
            loader.close()
    two = loaders(2, 1)
    _steps(two, 20, 12)
    state = json.loads(json.dumps(ShardLoader.merge_states([loader.state_dict() for loader in two])))
    one = loaders(1, 2)
    one[0].load_state_dict(state)
    after = _steps(one, 10, 12)
    for got, expected in zip(after, reference[20:30]):
        _assert_same_chunks(got, expected)
    back = loaders(2, 0)
    for loader in back:
        loader.load_state_dict(one[0].state_dict())
    for got, expected in zip(_steps(back, 10, 12), reference[30:40]):
        _assert_same_chunks(got, expected)
    for loader in [*single, *two, *one, *back]:
        loader.close()
    with pytest.raises(ValueError, match="cannot be split evenly over 3 ranks"):
        ShardLoader(digits_dataset, batch_size=16, rank=0, world_size=3, streams=4)


def damage(path: Path, how: str) -> None:
    """Make a shard unreadable: ``truncate`` (first half kept), ``garble`` (64 bytes overwritten) or ``delete``."""
    if how == "delete":
        path.unlink()
        return
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))


def corrupt_copy(source: str, destination: Path, how: str) -> tuple[str, str, set[str]]:
    """Copy the dataset and damage its fourth shard; returns (url, shard name, keys the shard held)."""
    shutil.copytree(source, destination)
    manifest = json.loads((destination / "manifest.json").read_text())
    victim = manifest["shards"][3]["name"]
    victim_keys = set(decode_shard((destination / victim).read_bytes(), victim).keys)
    damage(destination / victim, how)
    return str(destination), victim, victim_keys


def skip_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "skipping" in r.getMessage() and "shard" in r.getMessage()]


@pytest.mark.parametrize(("how", "kind"), [("truncate", "corrupt"), ("garble", "corrupt"), ("delete", "missing")])
def test_an_unreadable_shard_is_replaced_counted_and_named_once(
    digits_dataset: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str, kind: str,
) -> None:
    """16 streams of one shard each: the stream whose shard is unreadable reads a readable one in its place (the
    run goes on); every readable sample is read, the shard is logged once and counted once over three epochs,
    and the state names it."""
    url, victim, victim_keys = corrupt_copy(digits_dataset, tmp_path / "ds", how)
    loader = ShardLoader(url, batch_size=96, streams=16, shuffle_buffer=0, with_keys=True)
    with caplog.at_level("WARNING", logger="deepflow.data_pipeline"):
        keys = take_keys(loader, 3 * 1797)
    assert not set(keys) & victim_keys
    assert len(set(keys)) == 1797 - len(victim_keys)  # every readable sample, no other
    messages = skip_messages(caplog)
    assert len(messages) == 1 and victim in messages[0] and kind in messages[0], messages
    assert loader.stats["num_unreadable_shards"] == 1 and loader.stats["unreadable_shards"][0].endswith(victim)
    recorded = [record for entry in loader.state_dict()["streams"].values() for record in entry["unreadable"]]
    assert [(r["name"], r["kind"]) for r in recorded] == [(victim, kind)]
    loader.close()


def _with_a_missing_shard(source: str, destination: Path) -> str:
    shutil.copytree(source, destination)
    names = [s["name"] for s in json.loads((destination / "manifest.json").read_text())["shards"]]
    (destination / names[5]).unlink()
    return str(destination)


def test_order_with_an_unreadable_shard_does_not_depend_on_ranks_workers_or_resume(
    digits_dataset: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """8 streams of 2 shards, one missing: 1 rank, 2 ranks, 3 reader threads and 2 worker processes give the same
    chunks over 2+ epochs; a 2-rank state after 20 steps continues on 1 rank with the shard known (not read
    again, not logged again) and the same chunks."""
    url = _with_a_missing_shard(digits_dataset, tmp_path / "ds")

    def loaders(world: int, workers: int, mode: str = "thread") -> list[ShardLoader]:
        return [ShardLoader(url, batch_size=48 // world, rank=r, world_size=world, num_workers=workers, streams=8,
                            shuffle_buffer=150, seed=5, with_keys=True, worker_mode=mode) for r in range(world)]

    reference_group = loaders(1, 0)
    reference = _steps(reference_group, 80, 6)  # > 2 epochs (about 35 steps each)
    assert reference_group[0].stats["num_unreadable_shards"] == 1
    for group in (loaders(2, 0), loaders(1, 3), loaders(2, 2, "process")):
        for got, expected in zip(_steps(group, 80, 6), reference):
            _assert_same_chunks(got, expected)
        assert len({name for loader in group for name in loader.unreadable}) == 1
        for loader in group:
            loader.close()
    two = loaders(2, 1)
    _steps(two, 20, 6)
    state = json.loads(json.dumps(ShardLoader.merge_states([loader.state_dict() for loader in two])))
    one = loaders(1, 2)
    one[0].load_state_dict(state)
    assert len(one[0].unreadable) == 1  # known from the state: not read again
    caplog.clear()
    with caplog.at_level("WARNING", logger="deepflow.data_pipeline"):
        after = _steps(one, 40, 6)
    assert not skip_messages(caplog)
    for got, expected in zip(after, reference[20:60]):
        _assert_same_chunks(got, expected)
    for loader in [*reference_group, *two, *one]:
        loader.close()


@pytest.mark.parametrize(("num_workers", "worker_mode"), [(0, "thread"), (2, "thread"), (2, "process")])
def test_no_readable_shard_is_one_user_error_from_any_reader(
    digits_dataset: str, tmp_path: Path, num_workers: int, worker_mode: str,
) -> None:
    shutil.copytree(digits_dataset, tmp_path / "ds")
    names = [s["name"] for s in json.loads((tmp_path / "ds" / "manifest.json").read_text())["shards"]]
    for index, name in enumerate(names):
        damage(tmp_path / "ds" / name, ("delete", "truncate", "garble")[index % 3])
    missing = len(names[::3])
    loader = ShardLoader(str(tmp_path / "ds"), batch_size=16, streams=4, num_workers=num_workers,
                         worker_mode=worker_mode)
    with pytest.raises(NoReadableShardError) as raised:
        next(iter(loader))
    loader.close()
    assert isinstance(raised.value, UserError)
    assert str(raised.value) == (f"data.url: {tmp_path / 'ds'}: no readable shard "
                                 f"({len(names) - missing} corrupt, {missing} missing)")


@pytest.mark.parametrize(("how", "error", "worker_mode"), [("garble", ShardError, "process"),
                                                           ("delete", FileNotFoundError, "thread")])
def test_on_error_raise_stops_at_the_first_unreadable_shard(
    digits_dataset: str, tmp_path: Path, how: str, error: type[Exception], worker_mode: str,
) -> None:
    url, victim, _ = corrupt_copy(digits_dataset, tmp_path / "ds", how)
    strict = ShardLoader(url, batch_size=64, streams=16, on_error="raise", num_workers=2, worker_mode=worker_mode)
    with pytest.raises(error, match=victim):  # type and message intact across the reader boundary
        next(iter(strict))
    strict.close()


def test_vae_latent_sampling_and_exact_flip_copy(tmp_path: Path) -> None:
    count = 64
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((count, 4, 4, 4)).astype(np.float16)
    std = np.full((count, 4, 4, 4), 0.5, dtype=np.float16)
    mean_flip = (mean + 100).astype(np.float16)  # recognisable "flipped" posterior
    write_array_dataset(str(tmp_path / "vae"), {"mean": mean, "std": std, "mean_flip": mean_flip, "std_flip": std},
                        np.arange(count) % 10, samples_per_shard=16, samples_per_block=8)
    loader = ShardLoader(str(tmp_path / "vae"), batch_size=count, with_keys=True, seed=3)
    assert loader.manifest.kind == "vae" and loader.manifest.has_flip
    batch = next(iter(loader))
    loader.close()
    rows = [int(key.split("-")[1]) for key in batch["key"]]
    latents = batch["x"] / 0.18215
    flipped = latents.mean(dim=(1, 2, 3)) > 50
    assert 10 < int(flipped.sum()) < 54  # about half are flipped
    base = torch.from_numpy(np.where(flipped.numpy()[:, None, None, None], mean_flip[rows], mean[rows]).astype(np.float32))
    noise = (latents - base) / 0.5
    assert abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1.0) < 0.1  # x = (mean + std * eps) * scale
    assert torch.equal(batch["y"], torch.tensor(rows) % 10)

    no_flip = ShardLoader(str(tmp_path / "vae"), batch_size=count, flip=False, seed=3)
    assert float((next(iter(no_flip))["x"] / 0.18215).mean(dim=(1, 2, 3)).max()) < 50
    no_flip.close()


def test_pixel_flip_mirrors_images(tmp_path: Path) -> None:
    pixels = np.zeros((32, 1, 4, 4), dtype=np.uint8)
    pixels[..., 0] = 255  # a white left column
    write_array_dataset(str(tmp_path / "px"), {"pixels": pixels}, np.zeros(32, dtype=np.int64), kind="pixel",
                        samples_per_shard=8)
    batch = next(iter(ShardLoader(str(tmp_path / "px"), batch_size=32, seed=1)))
    left, right = batch["x"][:, 0, :, 0], batch["x"][:, 0, :, 3]
    flipped = (right == 1.0).all(dim=1)
    assert 5 < int(flipped.sum()) < 27
    assert torch.all(left[~flipped] == 1.0) and torch.all(right[~flipped] == -1.0)
    assert batch["x"].dtype == torch.float32 and batch["y"].dtype == torch.int64


def test_pattern_url_selects_shards_and_too_few_shards_is_a_clear_error(digits_dataset: str) -> None:
    subset = ShardLoader(f"{digits_dataset}/shard-0000-*.tar", batch_size=10, with_keys=True)
    assert subset.num_samples == 899
    with pytest.raises(ValueError, match="non-empty shards cannot feed"):
        ShardLoader(f"{digits_dataset}/shard-0000-00000{{0..1}}.tar", batch_size=10, world_size=2, num_workers=2)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        ShardLoader(str(Path(digits_dataset).parent / "missing"), batch_size=10)
