"""Every bad input gets one clear line: a table of malformed configs, flags, URLs and input files for the commands a
user types (``python jobs/{train,precompute,sample,evaluate}.py ...``), each run as a real process. Each must exit
with status 2, print exactly one line on stderr starting with ``error: `` that names the field or URL, and no
traceback. Also: resuming a run with changed settings (applied with one warning, or refused naming the fields).

The cases fail before heavy work (no training step, no encoder); they share one small digits dataset and run two
processes at a time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save as save_safetensors_bytes

from tests.integration.test_train_support import base_overrides, make_digits_dataset, write_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # 32 processes (each imports torch): about a minute on 2 idle cores

TINY_KWARGS = dict(depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=1, num_classes=10,
                   acc_widths=[32, 32, 32], projector_dim=32)


@dataclass(frozen=True)
class Case:
    """One bad input: the job, its arguments (``{name}`` placeholders: paths of the workspace) and the text the
    error line must contain (it names the field or URL)."""

    job: str
    args: tuple[str, ...]
    names: str


def _sets(*overrides: str) -> tuple[str, ...]:
    return tuple(arg for override in overrides for arg in ("--set", override))


TRAIN = ("--config", "{train_yaml}")
PRECOMPUTE = ("--config", "{precompute_yaml}")
SAMPLE = ("--checkpoint", "{export}", "--out", "{tmp}/samples", "--num-samples", "4", "--no-progress")
EVALUATE = ("--samples", "{samples_npz}")

CASES: dict[str, Case] = {
    # --------------------------------------------------------------------------------------------- train
    "train: unknown model name": Case("train", TRAIN + _sets("model.name=DeepFlow-S/2-2X"),
                                      "model.name: unknown model name 'DeepFlow-S/2-2X'"),
    "train: key_layers do not fit the depth": Case(
        "train", TRAIN + _sets('model.extra={"acc_widths":[32,32,32],"projector_dim":32,"key_layers":[1,5]}'),
        "model.extra.key_layers: [1, 5]"),
    "train: hidden_size not divisible by num_heads": Case(
        "train", TRAIN + _sets("model.hidden_size=30", "model.num_heads=4"),
        "model.hidden_size: 30 is not divisible by model.num_heads"),
    "train: unknown model.extra key": Case(
        "train", TRAIN + _sets('model.extra={"acc_widths":[32,32,32],"projector_dim":32,"bogus":1}'),
        "model.extra.bogus"),
    "train: depth below the branch count": Case("train", TRAIN + _sets("model.depth=1"), "model.depth: depth 1"),
    "train: empty config file": Case("train", ("--config", "{empty_yaml}"), "data.url: required"),
    "train: folder without manifest": Case("train", TRAIN + _sets("data.url={no_manifest}"),
                                           "data.url: {no_manifest}/manifest.json: no manifest"),
    "train: unknown URL scheme": Case("train", TRAIN + _sets("data.url=ftp2://x"),
                                      "data.url: ftp2://x: unsupported storage URL"),
    "train: in_channels vs dataset": Case("train", TRAIN + _sets("model.in_channels=3"),
                                          "model.in_channels: 3 does not match the dataset"),
    "train: input_size vs dataset": Case("train", TRAIN + _sets("model.input_size=16"),
                                         "model.input_size: 16 does not match the dataset"),
    "train: num_classes below the dataset's": Case("train", TRAIN + _sets("model.num_classes=5"),
                                                   "model.num_classes: 5 is smaller than the 10 classes"),
    "train: text model on a class dataset": Case(
        "train", TRAIN + _sets("model.name=DeepFlow-MMDiT-2-2T", "model.extra={}"),
        "model.name: DeepFlow-MMDiT-2-2T is a text-to-image model"),
    "train: unknown field": Case("train", TRAIN + _sets("optim.lrr=1"), "optim.lrr: unknown field; did you mean optim.lr?"),
    "train: unknown engine": Case("train", TRAIN + _sets("distributed.engine=dpp"),
                                  "distributed.engine: unknown engine 'dpp'"),
    "train: batch split": Case("train", TRAIN + _sets("schedule.grad_accumulation=3"),
                               "data.global_batch_size: 32 is not divisible"),
    "train: missing --config": Case("train", (), "--config: required"),
    "train: invalid YAML": Case("train", ("--config", "{bad_yaml}"), "{bad_yaml}: not valid YAML"),
    # ----------------------------------------------------------------------------------------- precompute
    "precompute: unknown URL scheme": Case("precompute", PRECOMPUTE + _sets("output.url=ftp2://x"),
                                           "output.url: ftp2://x: unsupported storage URL"),
    "precompute: missing source.root": Case("precompute", PRECOMPUTE + _sets('source={"kind":"image_folder"}'),
                                            "source.root: Field required"),
    "precompute: source.root not found": Case(
        "precompute", PRECOMPUTE + _sets('source={"kind":"image_folder","root":"{tmp}/no-images"}'),
        "source.root: {tmp}/no-images: no such folder"),
    "precompute: unknown source kind": Case("precompute", PRECOMPUTE + _sets("source.kind=digitz"),
                                            "source.kind: unknown kind 'digitz'; did you mean 'digits'?"),
    "precompute: unknown field": Case("precompute", PRECOMPUTE + _sets("batchsize=8"),
                                      "batchsize: unknown field; did you mean batch_size?"),
    "precompute: vae on one channel": Case("precompute", PRECOMPUTE + _sets('encoder={"kind":"vae"}'),
                                           "preprocess.channels: the vae encoder needs 3 channels"),
    # ---------------------------------------------------------------------------------------------- sample
    "sample: missing checkpoint": Case("sample", ("--checkpoint", "{tmp}/no-export", "--out", "{tmp}/s1"),
                                       "checkpoint: {tmp}/no-export: neither an export"),
    "sample: uncommitted checkpoint": Case("sample", ("--checkpoint", "{uncommitted}", "--out", "{tmp}/s2"),
                                           "checkpoint: {uncommitted}: not committed"),
    "sample: bad choice": Case("sample", SAMPLE + ("--method", "ddim"), "--method: invalid choice: 'ddim'"),
    "sample: unknown URL scheme": Case("sample", ("--checkpoint", "{export}", "--out", "ftp2://x/samples"),
                                       "out: ftp2://x/samples: unsupported storage URL"),
    "sample: missing label file": Case("sample", SAMPLE + ("--labels", "{tmp}/labels.npy"), "labels: "),
    # -------------------------------------------------------------------------------------------- evaluate
    "evaluate: missing samples": Case("evaluate", ("--samples", "{tmp}/none.npz", "--extractor", "classifier"),
                                      "samples: {tmp}/none.npz: not found"),
    "evaluate: unknown extractor": Case("evaluate", EVALUATE + ("--extractor", "clasifier"),
                                        "extractors.0.kind: unknown feature extractor 'clasifier'"),
    "evaluate: nothing to evaluate": Case("evaluate", EVALUATE, "extractors: nothing to evaluate"),
    "evaluate: unknown flag": Case("evaluate", EVALUATE + ("--extractor", "classifier", "--bogus"),
                                   "--bogus: unrecognized"),
}


# ------------------------------------------------------------------------------------------------ workspace
def _job_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("DEEPFLOW_DEBUG", None)
    return env


def _write_export_and_uncommitted_step(root: Path, manifest_url: str) -> tuple[str, str]:
    """A tiny export of a model fitting the digits, and a checkpoint step folder of it without COMMIT."""
    from deepflow.artifacts import MODEL_CARD_NAME, ModelCard, ema_file_name, read_manifest, step_dir_name, write_export
    from deepflow.models import create_model
    from deepflow.storage import Storage

    model = create_model("DeepFlow-S/2-2T", **TINY_KWARGS)
    card = ModelCard.for_dataset("DeepFlow-S/2-2T", TINY_KWARGS, read_manifest(manifest_url), step=4)
    export = str(root / "export")
    write_export(export, model.state_dict(), card)
    step = Storage(str(root / "checkpoints")).child(step_dir_name(4))
    step.write_bytes(ema_file_name(None), save_safetensors_bytes(model.state_dict()))
    step.write_json(MODEL_CARD_NAME, card.model_dump(mode="json", exclude_none=True))
    return export, step.url


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths the cases refer to: one digits dataset, configs (good, empty, broken), an export, an uncommitted step."""
    root = tmp_path_factory.mktemp("user-errors")
    digits = str(root / "digits")
    make_digits_dataset(digits)
    train_yaml = write_config(root / "train.yaml", base_overrides(digits, str(root / "run"), steps=4))
    precompute_yaml = root / "precompute.yaml"
    precompute_yaml.write_text((REPO / "configs/demo/precompute-digits.yaml").read_text()
                               .replace("data/digits-pixel8", str(root / "shards")))
    (root / "empty.yaml").write_text("")
    (root / "bad.yaml").write_text("model: [\n")
    (root / "no-manifest").mkdir()
    export, uncommitted = _write_export_and_uncommitted_step(root, digits)
    np.savez(root / "samples.npz", arr_0=np.zeros((4, 8, 8, 1), dtype=np.uint8))
    return {"tmp": str(root), "digits": digits, "train_yaml": str(train_yaml), "precompute_yaml": str(precompute_yaml),
            "empty_yaml": str(root / "empty.yaml"), "bad_yaml": str(root / "bad.yaml"),
            "no_manifest": str(root / "no-manifest"), "export": export, "uncommitted": uncommitted,
            "samples_npz": str(root / "samples.npz")}


def _fill(text: str, paths: dict[str, str]) -> str:
    for key, value in paths.items():
        text = text.replace("{" + key + "}", value)
    return text


def _run_case(case: Case, paths: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(REPO / "jobs" / f"{case.job}.py"), *(_fill(arg, paths) for arg in case.args)]
    return subprocess.run(command, cwd=REPO, env=_job_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def outcomes(workspace: dict[str, str]) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every case's finished process (two at a time: the table stays near a minute on 2 cores)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(lambda case: _run_case(case, workspace), CASES.values())
        return dict(zip(CASES, done))


# ---------------------------------------------------------------------------------------------------- tests
def test_the_table_covers_every_job_with_at_least_30_cases() -> None:
    assert len(CASES) >= 30
    assert {case.job for case in CASES.values()} == {"train", "precompute", "sample", "evaluate"}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_gets_one_line_naming_it(name: str, outcomes: dict, workspace: dict[str, str]) -> None:
    proc = outcomes[name]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    report = f"exit {proc.returncode}\nSTDERR:\n{proc.stderr[-3000:]}\nSTDOUT:\n{proc.stdout[-1000:]}"
    assert proc.returncode == 2, report
    assert "Traceback" not in proc.stderr + proc.stdout, report
    assert len(lines) == 1 and lines[0].startswith("error: "), report
    assert _fill(CASES[name].names, workspace) in lines[0], report


# --------------------------------------------------------------------------------------------------- resume
def _train(workspace: dict[str, str], *overrides: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(REPO / "jobs" / "train.py"), "--config", workspace["train_yaml"],
               "--set", f"run.output_dir={workspace['tmp']}/resume-run", *_sets(*overrides)]
    return subprocess.run(command, cwd=REPO, env=_job_env(), capture_output=True, text=True, timeout=300)


def test_resume_applies_free_changes_with_a_warning_and_refuses_shape_changes(workspace: dict[str, str]) -> None:
    first = _train(workspace)
    assert first.returncode == 0, first.stderr[-3000:]

    changed = _train(workspace, "optim.lr=1e-3", "schedule.total_steps=6")
    assert changed.returncode == 0, changed.stderr[-3000:]
    warnings = [line for line in changed.stdout.splitlines() if "changed settings" in line]
    assert len(warnings) == 1 and "optim.lr (0.002 -> 0.001)" in warnings[0], changed.stdout[-3000:]
    assert "schedule.total_steps (4 -> 6)" in warnings[0] and "step-0000004" in warnings[0]
    assert "training completed at step 6" in changed.stdout

    refused = _train(workspace, "model.hidden_size=64", "schedule.total_steps=8")
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr + refused.stdout
    assert len(lines) == 1 and lines[0].startswith("error: model.hidden_size (32 -> 64): cannot change"), lines
    assert "step-0000006" in lines[0]
    meta = json.loads((Path(workspace["tmp"]) / "resume-run" / "checkpoints" / "step-0000006" / "COMMIT").read_text())
    assert meta["step"] == 6  # nothing was written by the refused run
