"""CLIP score: the math on known embeddings, the preprocessing, and the end-to-end path with a tiny random CLIP."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch

from deepflow.platform.eval.clip_score import (
    ClipScorer,
    clip_preprocess,
    clip_score,
    clip_score_from_features,
    load_clip,
)

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP).eval().requires_grad_(False)
    return model, open_clip.SimpleTokenizer(context_length=16)


def test_score_math_identical_orthogonal_opposite_and_angle():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [3.0, 4.0, 0.0], [1.0, 0.0, 0.0]])
    same = a * torch.tensor([[2.0], [0.5], [7.0], [1.0]])  # norms do not matter
    torch.testing.assert_close(clip_score_from_features(a, same), torch.full((4,), 100.0))
    ortho = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [-4.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(clip_score_from_features(a, ortho), torch.zeros(4))
    assert (clip_score_from_features(a, -a) == 0).all()  # negative cosine clipped at 0
    angle = torch.tensor([[0.5, 3**0.5 / 2, 0.0]])  # 60 degrees from [1, 0, 0]
    torch.testing.assert_close(clip_score_from_features(a[:1], angle), torch.tensor([50.0]))
    with pytest.raises(ValueError, match=r"\[B, E\]"):
        clip_score_from_features(a, a[:2])


def test_preprocess_crops_the_centre_square_and_normalises():
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    img = torch.zeros(2, 3, 8, 12, dtype=torch.uint8)
    img[..., 2:10] = 255  # the centre 8x8 square is white, the side strips black
    out = clip_preprocess(img, 4, mean, std)
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    expect = torch.tensor([(1 - m) / s for m, s in zip(mean, std)]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    torch.testing.assert_close(out, expect)
    gray = clip_preprocess(torch.full((1, 1, 4, 4), 255, dtype=torch.uint8), 4, mean, std)
    torch.testing.assert_close(gray, expect[:1])
    with pytest.raises(ValueError, match="uint8"):
        clip_preprocess(img.float(), 4, mean, std)


def test_end_to_end_with_a_tiny_random_clip(tiny_clip):
    model, tokenizer = tiny_clip
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 40, 48), dtype=torch.uint8, generator=g)
    captions = ["a red circle", "two cats", "", "a very long caption " * 10, "blue"]
    score = clip_score(images, captions, model, tokenizer)
    assert isinstance(score, float) and 0.0 <= score <= 100.0
    # equals the formula applied to the towers' outputs, and does not depend on the chunking
    pixels = clip_preprocess(images, 32, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    cos = torch.nn.functional.cosine_similarity(model.encode_image(pixels), model.encode_text(tokenizer(captions)))
    expect = (100 * cos).clamp_min(0)
    per_pair = ClipScorer(model, tokenizer, batch_size=2)(images.numpy(), captions)
    torch.testing.assert_close(per_pair, expect, rtol=1e-4, atol=1e-4)
    assert abs(score - float(expect.mean())) < 1e-3
    # a caption scored against its own text embedding as the "image" side gives 100 (sanity of the pairing)
    text = model.encode_text(tokenizer(captions))
    torch.testing.assert_close(clip_score_from_features(text, text), torch.full((5,), 100.0))
    with pytest.raises(ValueError, match="2 captions"):
        clip_score(images, captions[:2], model, tokenizer)


def test_load_clip_from_a_local_checkpoint(tmp_path, tiny_clip):
    model, _ = tiny_clip
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "deepflow-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config_dir)
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    loaded, tokenizer = load_clip("deepflow-tiny-clip", str(weights))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)
    assert tokenizer(["a cat"]).shape == (1, 16)
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    assert clip_score(images, ["a", "b"], loaded, tokenizer) == pytest.approx(
        clip_score(images, ["a", "b"], model, tokenizer), abs=1e-4
    )


def test_read_captions_from_storage(tmp_path):
    from deepflow.artifacts import SampleSetLayout

    read_captions = SampleSetLayout.read_captions
    from deepflow.storage import write_url_text

    write_url_text("memory://captions-test/c.txt", "red apple\n\nblue heart\n")
    assert read_captions("memory://captions-test/c.txt") == ["red apple", "blue heart"]
    (tmp_path / "c.json").write_text(json.dumps({"captions": ["rocket"]}))
    assert read_captions(str(tmp_path / "c.json")) == ["rocket"]
    (tmp_path / "bad.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="list of caption strings"):
        read_captions(str(tmp_path / "bad.json"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no captions"):
        read_captions(str(tmp_path / "empty.txt"))


def test_job_clip_score_alone_with_the_captions_beside_the_samples(capsys):
    """CLIP score needs no extractor and no reference: captions.txt beside samples.npz (as jobs/sample.py writes)."""
    import io

    from deepflow.platform.eval import job
    from deepflow.storage import read_url_json, write_url_bytes, write_url_text

    buffer = io.BytesIO()
    np.savez(buffer, arr_0=np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8),
             arr_1=np.full(3, -1))
    write_url_bytes("memory://clip-job/run/samples.npz", buffer.getvalue())
    write_url_text("memory://clip-job/run/captions.txt", "a cat\na dog\na bird\n")
    argv = ["--samples", "memory://clip-job/run/samples.npz", "--clip-model", "ViT-B-32",
            "--clip-model-kwargs", json.dumps(TINY_CLIP), "--out", "memory://clip-job/eval.json", "--no-progress",
            "--batch-size", "2", "--device", "cpu"]
    with pytest.warns(UserWarning, match="RANDOM"):
        assert job.main(argv) == 0
    results = read_url_json("memory://clip-job/eval.json")
    assert 0.0 <= results["clip_score"] <= 100.0 and results["captions"] == "memory://clip-job/run/captions.txt"
    assert results["clip_pretrained"] == "RANDOM (tests only)" and "num_samples" not in results
