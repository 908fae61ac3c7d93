"""The ``deepflow`` command and its launcher: the subcommands and their help, every entry path (console script,
``python -m deepflow``, ``python -m deepflow.<job>``, ``jobs/<job>.py``), --debug, clean messages for a missing job or
optional dependency, the thread policy, the console format, packaged config names, and the modes of the files
a job writes."""
from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deepflow import cli, runtime
from deepflow.cli import JOBS, Job, run_job

REPO = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).parent / "deepflow"
#: an option each job's own parser has
OWN_OPTION = {"train": "--config", "precompute": "--finalize", "sample": "--checkpoint", "evaluate": "--samples",
              "reference": "--out", "convert": "--reference", "demo": "--steps", "study": "--report-only",
              "export": "--format"}


def _env(**changes: str | None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _run(command: list[str], timeout: float = 120, **env: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------- the command
def test_help_lists_every_job_on_one_line_without_importing_torch() -> None:
    done = _run([str(CONSOLE_SCRIPT), "--help"])
    assert done.returncode == 0, done.stderr
    for job, spec in JOBS.items():
        (line,) = [line for line in done.stdout.splitlines() if line.split()[:1] == [job]]
        assert spec.summary in line
    assert set(JOBS) == set(OWN_OPTION)
    probe = _run([sys.executable, "-c", "import sys; from deepflow.cli import main; main(['--help']); "
                                        "print('torch' in sys.modules)"])
    assert probe.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("job", list(OWN_OPTION))
def test_python_m_deepflow_job_help_is_the_jobs_own(job: str) -> None:
    done = _run([sys.executable, "-m", f"deepflow.{job}", "--help"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: ") and OWN_OPTION[job] in done.stdout


def test_every_entry_path_runs_the_same_job() -> None:
    outputs = {
        "deepflow train": _run([str(CONSOLE_SCRIPT), "train", "--help"]),
        "python -m deepflow train": _run([sys.executable, "-m", "deepflow", "train", "--help"]),
        "train.py": _run([sys.executable, "jobs/train.py", "--help"]),
    }
    options = set()
    for prog, done in outputs.items():
        assert done.returncode == 0 and done.stdout.startswith("usage: "), (prog, done.stderr[-2000:])
        options.add(done.stdout.split("\n\n", 1)[1])  # the help after the usage paragraph
    assert len(options) == 1


def test_unknown_job_and_no_job(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["trian"]) == 2
    assert capsys.readouterr().err.strip() == "error: deepflow: unknown job 'trian' (did you mean train?)"
    assert cli.main([]) == 2 and "jobs:" in capsys.readouterr().err
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.strip() == cli.__version__


# ------------------------------------------------------------------------------------------------ launcher
@pytest.fixture()
def fake_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Job modules in ``tmp_path`` registered as jobs "echo" (records argv and DEEPFLOW_DEBUG), "needs_s3"
    (an optional package missing), "bad_input" (a user error) and "ghost" (a module that does not exist)."""
    (tmp_path / "fake_jobs.py").write_text(textwrap.dedent("""
        import os
        from deepflow.errors import report_user_errors
        seen = []
        def echo(argv):
            seen.append((list(argv), os.environ.get("DEEPFLOW_DEBUG")))
            return 0
        def needs_s3(argv):
            raise ModuleNotFoundError("No module named 's3fs'", name="s3fs")
        def bad_input(argv):
            def body():
                raise ValueError("data.url: no dataset at /nowhere")
            return report_user_errors(body)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("echo", "needs_s3", "bad_input"):
        monkeypatch.setitem(JOBS, name, Job(f"fake_jobs:{name}", name))
    monkeypatch.setitem(JOBS, "ghost", Job("deepflow.platform.no_such_job:main", "not written yet"))
    monkeypatch.delenv("DEEPFLOW_DEBUG", raising=False)
    return tmp_path


def test_debug_flag_reaches_the_job_as_the_environment_and_is_restored(fake_jobs: Path) -> None:
    import fake_jobs as module  # type: ignore[import-not-found]

    assert run_job("echo", ["--config", "x.yaml", "--debug"]) == 0
    assert cli.main(["--debug", "echo", "-v"]) == 0
    assert run_job("echo", ["--set", "a=1"]) == 0
    assert module.seen == [(["--config", "x.yaml"], "1"), (["-v"], "1"), (["--set", "a=1"], None)]
    assert "DEEPFLOW_DEBUG" not in os.environ


def test_user_errors_are_one_line_and_debug_shows_the_traceback(fake_jobs: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert run_job("bad_input", []) == 2
    assert capsys.readouterr().err.strip() == "error: data.url: no dataset at /nowhere"
    with pytest.raises(ValueError, match="no dataset"):
        run_job("bad_input", ["--debug"])


def test_missing_module_says_what_to_install(fake_jobs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_job("needs_s3", []) == 2
    assert capsys.readouterr().err.strip() == (
        "error: deepflow needs_s3: needs the optional package 's3fs': pip install 'deepflow-platform[s3]'")
    assert cli.main(["ghost"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: deepflow ghost: not available in this installation (deepflow.platform.no_such_job is missing)")


# ------------------------------------------------------------------------------------------------- threads
@pytest.mark.parametrize(("environ", "expected"), [
    ({}, (8, "auto")),
    ({"LOCAL_WORLD_SIZE": "2"}, (4, "auto")),  # torchrun
    ({"LOCAL_SIZE": "3"}, (2, "auto")),  # the deepspeed launcher
    ({"LOCAL_WORLD_SIZE": "16"}, (1, "auto")),
    ({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}, (3, "OMP_NUM_THREADS")),  # the user's choice wins
    ({"OMP_NUM_THREADS": "8", runtime.AUTO_THREADS_ENV: "8", "LOCAL_WORLD_SIZE": "4"}, (2, "auto")),  # a parent's
])
def test_thread_policy(environ: dict[str, str], expected: tuple[int, str]) -> None:
    choice = runtime.choose_threads(environ, cores=8)
    assert (choice.threads, choice.source) == expected


def test_a_job_process_sets_its_threads_from_its_cores_and_local_ranks() -> None:
    """Without OMP_NUM_THREADS: cores // local ranks, in torch and exported to children; with it: the user's."""
    script = ("from deepflow.runtime import available_cores, configure_threads; import os, subprocess, sys; "
              "c = configure_threads(); import torch; "
              "child = subprocess.run([sys.executable, '-c', 'from deepflow.runtime import choose_threads; import os; "
              "print(choose_threads(os.environ, 1).source)'], capture_output=True, text=True).stdout.strip(); "
              "print(available_cores(), c.threads, torch.get_num_threads(), os.environ['OMP_NUM_THREADS'], child)")
    cores = runtime.available_cores()
    single = _run([sys.executable, "-c", script], OMP_NUM_THREADS=None, LOCAL_WORLD_SIZE=None, LOCAL_SIZE=None)
    assert single.stdout.split() == [str(cores), str(cores), str(cores), str(cores), "auto"], single.stderr
    two = _run([sys.executable, "-c", script], OMP_NUM_THREADS=None, LOCAL_WORLD_SIZE="2")
    per_rank = str(max(1, cores // 2))
    assert two.stdout.split() == [str(cores), per_rank, per_rank, per_rank, "auto"], two.stderr
    user = _run([sys.executable, "-c", script], OMP_NUM_THREADS="1")
    assert user.stdout.split()[1:] == ["1", "1", "1", "OMP_NUM_THREADS"], user.stderr


def test_the_launcher_logs_its_thread_choice_with_debug() -> None:
    done = _run([str(CONSOLE_SCRIPT), "--debug", "convert", "--help"], OMP_NUM_THREADS=None, LOCAL_WORLD_SIZE="2")
    cores = runtime.available_cores()
    expected = f"[rank0] deepflow convert {cli.__version__}: {max(1, cores // 2)} threads ({cores} cores / 2 local"
    assert expected in done.stderr, done.stderr[:2000]


# ------------------------------------------------------------------------------------------------- console
def test_one_console_format_on_stderr(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(key, raising=False)
    root = logging.getLogger()
    before = list(root.handlers)
    with runtime.job_logging():
        runtime.configure_logging()  # idempotent: one handler
        assert len(root.handlers) == len(before) + 1
        logging.getLogger("deepflow.anything").info("hello")
        logging.getLogger("some.library").warning("careful")
        print("a result")
        captured = capsys.readouterr()
        err = captured.err.splitlines()
        assert re.fullmatch(r"\d\d:\d\d:\d\d \[rank0\] hello", err[0]), err
        assert re.fullmatch(r"\d\d:\d\d:\d\d \[rank0\] WARNING: careful", err[1]), err
        assert captured.out == "a result\n"  # stdout: what the job produces
    with runtime.job_logging(environ={"RANK": "1", "WORLD_SIZE": "2"}):  # other ranks: warnings and errors only
        logging.getLogger("deepflow.anything").info("not shown")
        logging.getLogger("deepflow.anything").error("shown")
        assert re.fullmatch(r"\d\d:\d\d:\d\d \[rank1\] ERROR: shown\n", capsys.readouterr().err)
    assert root.handlers == before  # restored: a job run in-process leaves nothing behind


# ------------------------------------------------------------------------------------------------- configs
def test_config_names_resolve_to_the_packaged_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    packaged = runtime.packaged_configs_dir() / "demo" / "train-digits.yaml"
    assert packaged.is_file()
    monkeypatch.chdir(tmp_path)  # not the repository: as an installed package is used
    assert runtime.resolve_config_path("demo/train-digits.yaml") == str(packaged)
    assert runtime.resolve_config_path("configs/demo/train-digits.yaml") == str(packaged)
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "train-digits.yaml").write_text("run: {name: mine}\n")
    assert runtime.resolve_config_path("demo/train-digits.yaml") == "demo/train-digits.yaml"  # a file wins
    for untouched in ("s3://bucket/run.yaml", "demo/nope.yaml", "/abs/demo/train-digits.yaml", "configs"):
        assert runtime.resolve_config_path(untouched) == untouched


# ---------------------------------------------------------------------------------------------------- demo
def test_demo_steps_scale_the_intervals(capsys: pytest.CaptureFixture[str]) -> None:
    from deepflow.demo import scaled_interval, steps_overrides

    assert scaled_interval(500, 1000, 200) == 100 and scaled_interval(500, 2000, 30) == 8
    assert scaled_interval(500, 1000, 1) == 1 and scaled_interval(0, 1000, 200) == 0  # 0: off stays off
    digits = runtime.packaged_configs_dir() / "demo" / "train-digits.yaml"  # 2000 steps, eval/checkpoint every 500
    assert steps_overrides(digits, 30) == ["schedule.total_steps=30", "eval.every=8", "checkpoint.every=8"]
    assert cli.main(["demo", "--steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --steps: must be at least 1, got 0"


# ----------------------------------------------------------------------------------------------- file modes
def _modes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): oct(stat.S_IMODE(p.stat().st_mode))
            for p in folder.rglob("*") if p.is_file()}


def test_sample_outputs_are_readable_like_any_file_under_umask_022(tmp_path: Path) -> None:
    """``deepflow sample`` (chunks, PNGs, sampling.json, the npz assembled from a temporary file): 0644."""
    import torch

    from deepflow.artifacts import ModelCard, write_export
    from deepflow.models import create_model

    kwargs = dict(depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=3, num_classes=10,
                  acc_widths=(16, 32, 16))
    torch.manual_seed(0)
    model = create_model("DeepFlow-S/2-2T", **kwargs)
    write_export(str(tmp_path / "export"), model.state_dict(),
                 ModelCard(model="DeepFlow-S/2-2T", kwargs=kwargs, kind="pixel"))
    out = tmp_path / "samples"
    done = subprocess.run(
        [str(CONSOLE_SCRIPT), "sample", "--checkpoint", str(tmp_path / "export"), "--out", str(out),
         "--num-samples", "4", "--chunk-size", "2", "--batch-size", "2", "--steps", "1", "--method", "euler",
         "--png", "--no-progress"],
        env=_env(), capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.umask(0o022))
    assert done.returncode == 0, done.stderr[-3000:]
    modes = _modes(out)
    assert "samples.npz" in modes and any(name.startswith("png/") for name in modes)
    assert set(modes.values()) == {"0o644"}, modes


def test_default_file_mode_follows_the_umask() -> None:
    from deepflow.storage import default_file_mode

    script = ("import os; os.umask(0o027); from deepflow.storage import default_file_mode; "
              "print(oct(default_file_mode()))")
    assert _run([sys.executable, "-c", script]).stdout.strip() == "0o640"
    previous = os.umask(0o022)
    os.umask(previous)
    assert default_file_mode() == 0o666 & ~previous


# ------------------------------------------------------------------------------------------- a training run
@pytest.fixture(scope="module")
def train_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``deepflow train`` for 10 steps on digits with one periodic evaluation (classifier FD + accuracy), under
    umask 022; (the finished process, the run folder)."""
    from tests.integration.test_train_support import base_overrides, make_digits_dataset, write_config

    root = tmp_path_factory.mktemp("train-run")
    make_digits_dataset(str(root / "data"))
    overrides = base_overrides(str(root / "data"), str(root / "run"), steps=10, **{
        "eval.every": 10, "eval.num_samples": 20, "eval.batch_size": 20, "eval.sampler.steps": 2,
        "eval.extractor": "classifier", "eval.extractor_options.dataset": "digits", "checkpoint.every": 5})
    config = write_config(root / "run.yaml", overrides)
    done = subprocess.run([str(CONSOLE_SCRIPT), "train", "--config", str(config)], cwd=root,
                          env=_env(DEEPFLOW_CACHE=str(root / "cache")), capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.umask(0o022))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, root / "run"


def test_training_prints_the_periodic_evaluation(train_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, _ = train_run
    (line,) = [line for line in (done.stdout + done.stderr).splitlines() if "eval step 10:" in line]
    assert re.search(r"\[rank0\] eval step 10: class_accuracy [\d.]+, fd_classifier [\d.]+ \(20 samples, [\d.]+ s\)",
                     line), line


def test_training_starts_with_a_summary(train_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, run = train_run
    for start in ("model       DeepFlow-S/2-2T", "engine      ddp", "world       1 rank", "data        ",
                  "batch       32 global", f"checkpoints {run}/checkpoints", f"tensorboard {run}/tensorboard"):
        assert f"[rank0] {start}" in done.stdout + done.stderr, start


def test_training_outputs_are_readable_like_any_file(train_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, run = train_run
    modes = _modes(run)
    assert any(name.endswith(".safetensors") for name in modes)
    assert set(modes.values()) == {"0o644"}, {name: mode for name, mode in modes.items() if mode != "0o644"}
