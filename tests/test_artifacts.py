"""deepflow.artifacts: the typed manifest, checkpoint step folders and COMMIT, exports and their model cards, and
load_weights accepting every kind of weights folder a user has."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deepflow.artifacts import (
    COMMIT_NAME,
    MODEL_CARD_NAME,
    CheckpointLayout,
    Manifest,
    ModelCard,
    SampleSetLayout,
    ema_file_name,
    load_weights,
    parse_step_dir,
    read_manifest,
    step_dir_name,
    write_export,
)
from deepflow.storage import Storage

WEIGHTS = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}
CARD = ModelCard(model="DeepFlow-S/2-2T", kwargs={"depth": 2, "input_size": 8}, kind="pixel", step=7)


def _manifest(**fields) -> dict:
    return {"format": "deepflow-shards", "kind": "pixel", "shape": [1, 8, 8], "num_classes": 10,
            "shards": [{"name": "shard-0000-000000.tar", "num_samples": 3, "sha256": "x"}], "future_field": 1,
            **fields}


def test_manifest_is_typed_keeps_unknown_fields_and_names_bad_files(tmp_path: Path) -> None:
    Storage(str(tmp_path / "ds")).write_json("manifest.json", _manifest())
    manifest = read_manifest(str(tmp_path / "ds"))
    assert manifest.kind == "pixel" and manifest.shape == [1, 8, 8] and manifest.condition == "class"
    assert manifest.shards[0].num_samples == 3 and manifest.to_json()["future_field"] == 1
    assert manifest.vae_id is None
    text = Manifest.model_validate(_manifest(kind="vae", encoder={"model": "sd-vae"},
                                             text={"dim": 4, "pooled_dim": 4, "max_length": 2}))
    assert text.condition == "text" and text.vae_id == "sd-vae" and text.text.null == "text_null.safetensors"
    with pytest.raises(FileNotFoundError, match=r"ds2/manifest.json: no manifest"):
        read_manifest(str(tmp_path / "ds2"))
    Storage(str(tmp_path / "ds3")).write_json("manifest.json", {"format": "other"})
    with pytest.raises(ValueError, match="not a deepflow-shards manifest"):
        read_manifest(str(tmp_path / "ds3"))


def test_checkpoint_layout_trusts_only_committed_step_folders(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "ckpt"))
    layout = CheckpointLayout(storage)
    assert layout.newest_committed() is None and step_dir_name(12) == "step-0000012"
    assert parse_step_dir("s3://b/run/step-0000012/") == 12 and parse_step_dir("step-12") is None
    for step in (5, 10, 15):
        storage.write_bytes(f"{step_dir_name(step)}/meta.json", b"{}")
    layout.commit(5, {"step": 5})
    layout.commit(10, {"step": 10})  # 15 was never committed (a crashed save)
    assert layout.steps() == [(5, True), (10, True), (15, False)]
    assert layout.committed_steps() == [5, 10] and layout.newest_committed() == 10
    assert json.loads((tmp_path / "ckpt" / "step-0000010" / COMMIT_NAME).read_text()) == {"step": 10}
    layout.remove(5)
    assert layout.committed_steps() == [10]
    assert ema_file_name(None) == "ema/full.safetensors" and ema_file_name(3) == "ema/rank-00003.safetensors"


def _checkpoint(storage: Storage, step: int, committed: bool = True, sharded: bool = False) -> None:
    from safetensors.torch import save

    folder = step_dir_name(step)
    storage.write_json(f"{folder}/{MODEL_CARD_NAME}", CARD.model_copy(update={"step": step}).model_dump(mode="json"))
    ema = ema_file_name(0 if sharded else None)
    storage.write_bytes(f"{folder}/{ema}", save({k: v * step for k, v in WEIGHTS.items()}))
    if committed:
        CheckpointLayout(storage).commit(step, {"step": step})


def test_load_weights_accepts_exports_files_step_folders_and_checkpoint_roots(tmp_path: Path) -> None:
    folder_url = write_export(str(tmp_path / "new" / "export"), WEIGHTS, CARD)
    assert folder_url.endswith("new/export/export.safetensors")
    file_url = write_export(str(tmp_path / "files" / "model.safetensors"), WEIGHTS, CARD)
    assert (tmp_path / "files" / "model.json").exists()
    for url in (str(tmp_path / "new" / "export"), file_url):
        state, card = load_weights(url)
        assert torch.equal(state["w"], WEIGHTS["w"]) and card == CARD

    root = Storage(str(tmp_path / "checkpoints"))
    _checkpoint(root, 10)
    _checkpoint(root, 20)
    _checkpoint(root, 30, committed=False)
    state, card = load_weights(str(tmp_path / "checkpoints"))  # newest COMMITTED step
    assert card.step == 20 and torch.equal(state["b"], WEIGHTS["b"] * 20)
    state, card = load_weights(str(tmp_path / "checkpoints" / step_dir_name(10)))
    assert card.step == 10

    _checkpoint(Storage(str(tmp_path / "sharded")), 5, sharded=True)
    with pytest.raises(ValueError, match="sharded over ranks"):
        load_weights(str(tmp_path / "sharded"))
    with pytest.raises(FileNotFoundError, match="neither an export"):
        load_weights(str(tmp_path / "empty"))
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "lonely.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no lonely.json beside it"):
        load_weights(str(tmp_path / "bare" / "lonely.safetensors"))


def test_model_card_from_the_training_manifest() -> None:
    manifest = Manifest.model_validate(_manifest(kind="vae", latent_scale=0.18215, encoder={"model": "sd-vae"}))
    card = ModelCard.for_dataset("SiT-B/2", {"depth": 2}, manifest, step=3)
    assert (card.kind, card.latent_scale, card.vae, card.condition, card.step) == ("vae", 0.18215, "sd-vae", "class", 3)
    assert ModelCard.model_validate(json.loads(card.model_dump_json())) == card


def test_sample_set_names_and_caption_files(tmp_path: Path) -> None:
    assert SampleSetLayout.chunk(12) == "chunks/chunk-000012.npz" and SampleSetLayout.png(3) == "png/000003.png"
    assert SampleSetLayout.captions_url_for("s3://b/run/samples.npz") == "s3://b/run/captions.txt"
    (tmp_path / "c.txt").write_text("red apple\n\n  blue heart \n")
    assert SampleSetLayout.read_captions(str(tmp_path / "c.txt")) == ["red apple", "blue heart"]
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list of caption strings"):
        SampleSetLayout.read_captions(str(tmp_path / "bad.json"))


def test_streamed_safetensors_are_safetensors_own_bytes_and_read_back_tensor_by_tensor(tmp_path: Path) -> None:
    """write_safetensors (header from specs, tensors in any order) == safetensors.torch.save; read back exactly."""
    import io

    from safetensors.torch import save

    from deepflow.artifacts import TensorSpec, iter_safetensors, write_safetensors

    tensors = {"w": torch.randn(3, 5), "a.b": torch.ones(4), "half": torch.zeros(2, dtype=torch.bfloat16),
               "steps": torch.arange(3), "scalar": torch.tensor(2.0), "empty": torch.zeros(0, 4),
               "mask": torch.tensor([True, False])}
    handle = io.BytesIO()
    specs = {name: TensorSpec.of(t) for name, t in tensors.items()}
    write_safetensors(handle, specs, reversed(list(tensors.items())), {"format": "pt"})
    assert handle.getvalue() == save(tensors, metadata={"format": "pt"})
    (tmp_path / "t.safetensors").write_bytes(handle.getvalue())
    back = dict(iter_safetensors(Storage(str(tmp_path)), "t.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="never given"):
        write_safetensors(io.BytesIO(), specs, [("w", tensors["w"])])
    with pytest.raises(ValueError, match="announced as"):
        write_safetensors(io.BytesIO(), specs, [("w", torch.zeros(5, 3))])


def test_sharded_checkpoints_load_and_export_joined(tmp_path: Path) -> None:
    """A sharded EMA (every layout, 2 or 3 ranks) is joined by load_weights and export_checkpoint exactly as
    saved; without meta.json recording the layout it is refused with one clear error."""
    from safetensors.torch import save

    from deepflow.artifacts import (
        CHECKPOINT_META_NAME, DIM0_CHUNKS, FLAT_PARTITIONS, FULL, export_checkpoint, slice_full)

    full = {"w": torch.randn(5, 3), "b": torch.randn(7), "one": torch.randn(1, 2)}
    for layout in (FULL, DIM0_CHUNKS, FLAT_PARTITIONS):
        for world in (2, 3):
            storage = Storage(str(tmp_path / f"{layout}-{world}"))
            folder = step_dir_name(4)
            storage.write_json(f"{folder}/{MODEL_CARD_NAME}", CARD.model_dump(mode="json"))
            for rank in range(world):
                pieces = {k: slice_full(v, layout, rank, world).contiguous() for k, v in full.items()}
                storage.write_bytes(f"{folder}/{ema_file_name(rank)}", save(pieces))
            meta = {"step": 4, "world_size": world, "sharded_ema": True, "ema_layout": layout,
                    "ema_shapes": {k: list(v.shape) for k, v in full.items()}}
            storage.write_json(f"{folder}/{CHECKPOINT_META_NAME}", meta)
            CheckpointLayout(storage).commit(4, meta)
            state, card = load_weights(storage.url)
            assert card == CARD and state.keys() == full.keys()
            assert all(torch.equal(state[k], v) for k, v in full.items()), (layout, world)
            url = export_checkpoint(storage.url, str(tmp_path / f"export-{layout}-{world}"))
            exported, exported_card = load_weights(url.rsplit("/", 1)[0])
            assert exported_card == CARD and all(torch.equal(exported[k], v) for k, v in full.items())
