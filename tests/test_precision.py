"""``precision: auto`` (deepflow.precision): bf16 only where the device computes it natively, one warning line when
bf16 is forced on a CPU that emulates it; through ``deepflow sample`` as a user runs it."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from deepflow.precision import EMULATED_BF16_SLOWDOWN, choose_precision, native_bf16
from tests.test_cli import CONSOLE_SCRIPT, _env

CPU = torch.device("cpu")
#: this machine's CPU, from torch's own capability queries (the tests hold on either kind of CPU)
NATIVE = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_native_bf16_agrees_with_the_cpu_flags() -> None:
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this platform")
    assert native_bf16(CPU)[0] == bool({"avx512_bf16", "amx_bf16", "amx_tile"} & flags)


def test_auto_is_bf16_only_with_native_support_and_says_why() -> None:
    choice = choose_precision("auto", CPU)
    assert choice.precision == ("bf16" if NATIVE else "fp32")
    assert choice.warning is None
    assert choice.describe().startswith(f"{choice.precision} (auto: this CPU has ")
    assert choose_precision("auto", torch.device("meta")).precision == "fp32"


def test_forced_bf16_is_kept_and_warns_only_where_emulated() -> None:
    choice = choose_precision("bf16", CPU)
    assert choice.precision == "bf16" and choice.describe() == "bf16"
    if NATIVE:
        assert choice.warning is None
    else:
        assert choice.warning is not None and f"{EMULATED_BF16_SLOWDOWN:g}x slower than fp32 in training" in choice.warning
    assert choose_precision("fp32", CPU).warning is None
    with pytest.raises(ValueError, match=r"^precision: must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        choose_precision("fp8", CPU)


def _sample(tmp_path: Path, name: str, *flags: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    from deepflow.artifacts import ModelCard, write_export
    from deepflow.models import create_model

    export = tmp_path / "export"
    if not export.exists():
        kwargs = dict(depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=3, num_classes=10,
                      acc_widths=(16, 32, 16))
        torch.manual_seed(0)
        write_export(str(export), create_model("DeepFlow-S/2-2T", **kwargs).state_dict(),
                     ModelCard(model="DeepFlow-S/2-2T", kwargs=kwargs, kind="pixel"))
    out = tmp_path / name
    done = subprocess.run(
        [str(CONSOLE_SCRIPT), "sample", "--checkpoint", str(export), "--out", str(out), "--num-samples", "2",
         "--chunk-size", "2", "--batch-size", "2", "--steps", "1", "--method", "euler", "--no-progress", *flags],
        env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, json.loads((out / "sampling.json").read_text())["settings"]


def test_deepflow_sample_resolves_auto_and_warns_once_for_emulated_bf16(tmp_path: Path) -> None:
    done, recorded = _sample(tmp_path, "auto")  # the default
    assert recorded["precision"] == ("bf16" if NATIVE else "fp32")  # the resolved value is what is recorded
    assert f"precision {choose_precision('auto', CPU).describe()}" in done.stderr
    done, recorded = _sample(tmp_path, "bf16", "--precision", "bf16")
    assert recorded["precision"] == "bf16"
    assert done.stderr.count("without native bf16 instructions is emulated") == (0 if NATIVE else 1)
