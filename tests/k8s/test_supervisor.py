"""The k8s_env supervisor with stand-in processes (tests/k8s/fake_processes.py, no torch): SIGTERM goes to the
ranks and never to the launcher, the pod's exit status (75 after a committed preemption, the failed rank's own
status, 143 before any rank could report), the pod's other ranks stopped when one fails, one-line errors.
The same with real training runs under the real launchers: tests/k8s/test_pod_faults.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepflow.platform.train.k8s_env import main
from deepflow.platform.train.pod_supervisor import PREEMPTED_EXIT_CODE, pod_exit_code
from deepflow.platform.train.pod_topology import PodTopology, rank_env
from deepflow.platform.train.rank_status import STATUS_DIR_ENV, RankReport, RankStatusFile, read_rank_reports
from deepflow.ranks import read_dist_env

REPO = Path(__file__).resolve().parents[2]
FAKE = Path(__file__).resolve().parent / "fake_processes.py"


def _report(status: str, exit_code: int = 0, step: int | None = 7, at: float = 0.0) -> RankReport:
    return RankReport(status, step, exit_code, at)


@pytest.mark.parametrize(
    ("reports", "kwargs", "expected"),
    [
        ([_report("completed"), _report("completed")], {}, 0),
        ([_report("preempted"), _report("preempted")], {"terminated": True}, PREEMPTED_EXIT_CODE),
        # a peer's SIGTERM stopped every rank (the flag is all-reduced): this pod must not count as succeeded
        ([_report("preempted"), _report("preempted")], {}, PREEMPTED_EXIT_CODE),
        ([_report("preempted"), _report("completed")], {"terminated": True}, PREEMPTED_EXIT_CODE),
        ([_report("preempted"), _report("preempted")], {"preempted_exit_code": 99}, 99),
        # failures: the first failed rank's own status; 2 and 3 pass through unchanged
        ([_report("failed", 1, at=2.0), _report("failed", 3, at=1.0)], {"launcher_code": 1}, 3),
        ([_report("failed", 2), _report("running")], {"terminated": True, "launcher_code": 1}, 2),
        ([_report("running"), _report("preempted")], {"failure": -9}, 137),  # killed by SIGKILL
        ([_report("failed", PREEMPTED_EXIT_CODE), None], {}, 1),  # never mistaken for a preemption
        # SIGTERM before the ranks could report; a rank that ended without a word; a script without reports
        ([_report("running"), None], {"terminated": True}, 143),
        ([_report("running"), _report("completed")], {"launcher_code": 247}, 247),
        ([_report("running"), _report("completed")], {"launcher_code": 0}, 1),
        ([None, None], {"launcher_code": 0}, 0),
        ([None, None], {"launcher_code": 5}, 5),
    ],
)
def test_pod_exit_code(reports: list[RankReport | None], kwargs: dict[str, int], expected: int) -> None:
    assert pod_exit_code(reports, **kwargs) == expected


def test_rank_reports_round_trip(tmp_path: Path) -> None:
    assert RankStatusFile.from_environ({}) is None
    writer = RankStatusFile.from_environ({STATUS_DIR_ENV: str(tmp_path), "LOCAL_RANK": "1"})
    assert writer is not None and writer.path == tmp_path / "local-rank-1.json"
    writer.write("running")
    assert read_rank_reports(tmp_path, 2)[1].status == "running"
    writer.write("preempted", step=12)
    (tmp_path / "local-rank-0.json").write_text("{not json")
    zero, one = read_rank_reports(tmp_path, 2)
    assert zero is None and (one.status, one.step, one.pid) == ("preempted", 12, os.getpid())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local-rank-0.json", "local-rank-1.json"]  # no staging


def test_python_launcher_rank_environment_is_what_the_trainer_reads() -> None:
    topology = PodTopology(node_rank=1, num_nodes=2, nproc_per_node=4, master_addr="pod-0.svc", master_port=29511)
    env = rank_env(topology, 3, {"JOB_COMPLETION_INDEX": "1", "PATH": "/bin"})
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")} == {
        "RANK": "7", "LOCAL_RANK": "3", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}
    dist = read_dist_env(environ=env)
    assert (dist.rank, dist.world_size, dist.local_rank, dist.master_addr, dist.master_port) == (
        7, 8, 3, "pod-0.svc", 29511)


# ------------------------------------------------------------------------------------------- live supervisor
def _pod_env(tmp_path: Path, nproc: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update({"JOB_COMPLETION_INDEX": "0", "NNODES": "1", "GPUS_PER_NODE": str(nproc),
                "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)})
    return env


def _start_python_launcher(tmp_path: Path, behaviours: list[str]) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "deepflow.platform.train.k8s_env", "--launcher", "python",
               "--status-dir", str(tmp_path / "status"), "--", str(FAKE), "rank", *behaviours]
    return subprocess.Popen(command, env=_pod_env(tmp_path, len(behaviours)), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _start_fake_launcher(tmp_path: Path, behaviours: list[str], delay: float = 0.0) -> subprocess.Popen[str]:
    """The supervisor in launcher mode, over fake_processes.py's launcher (what deepspeed/torchrun are)."""
    nproc = len(behaviours)
    launcher = [sys.executable, str(FAKE), "launcher", str(nproc), str(tmp_path / "launcher-signalled"), str(delay),
                "--", sys.executable, str(FAKE), "rank", *behaviours]
    driver = (
        "import sys; from deepflow.platform.train.pod_supervisor import Supervisor\n"
        "from deepflow.platform.train.pod_topology import PodTopology\n"
        f"topology = PodTopology(0, 1, {nproc}, '127.0.0.1', 29500)\n"
        f"supervisor = Supervisor('fake', {launcher!r}, topology, {str(tmp_path / 'status')!r}, launcher_grace_s=5)\n"
        "sys.exit(supervisor.run())\n"
    )
    (tmp_path / "status").mkdir()
    return subprocess.Popen([sys.executable, "-c", driver], env=_pod_env(tmp_path, nproc), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_running(tmp_path: Path, nproc: int, proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reports = read_rank_reports(tmp_path / "status", nproc)
        if all(r is not None for r in reports):
            time.sleep(0.5)  # a poll of the supervisor (it finds the launcher's ranks in /proc)
            return
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    raise AssertionError("the ranks did not start")


def _finish(proc: subprocess.Popen[str], timeout: float = 30.0) -> tuple[int, str, float]:
    start = time.monotonic()
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output, time.monotonic() - start


def test_python_launcher_sigterm_reaches_every_rank_and_the_pod_exits_75(tmp_path: Path) -> None:
    proc = _start_python_launcher(tmp_path, ["train", "train"])
    _wait_running(tmp_path, 2, proc)
    proc.send_signal(signal.SIGTERM)
    code, output, _ = _finish(proc)
    assert code == PREEMPTED_EXIT_CODE, output
    assert [r.status for r in read_rank_reports(tmp_path / "status", 2)] == ["preempted", "preempted"]
    assert "every rank preempted" in output and "Traceback" not in output


def test_python_launcher_failed_rank_stops_the_others_and_passes_its_status(tmp_path: Path) -> None:
    proc = _start_python_launcher(tmp_path, ["train", "fail=3"])
    code, output, seconds = _finish(proc)
    assert code == 3, output
    assert "local rank 1" in output and "exited with status 3: stopping the pod's other 1 rank(s)" in output
    assert read_rank_reports(tmp_path / "status", 2)[0].status == "running"  # rank 0 was killed, not preempted
    assert seconds < 10


def test_launcher_mode_signals_the_ranks_never_the_launcher(tmp_path: Path) -> None:
    proc = _start_fake_launcher(tmp_path, ["train", "train"])
    _wait_running(tmp_path, 2, proc)
    proc.send_signal(signal.SIGTERM)
    code, output, _ = _finish(proc)
    assert code == PREEMPTED_EXIT_CODE, output
    assert not (tmp_path / "launcher-signalled").exists(), "the launcher itself got the signal"
    assert "SIGTERM: asking 2 rank(s) to checkpoint and stop" in output


def test_launcher_mode_rank_killed_stops_the_others_at_once(tmp_path: Path) -> None:
    proc = _start_fake_launcher(tmp_path, ["train", "train"])
    _wait_running(tmp_path, 2, proc)
    victim = read_rank_reports(tmp_path / "status", 2)[1].pid
    os.kill(victim, signal.SIGKILL)
    code, output, seconds = _finish(proc)
    assert code not in (0, PREEMPTED_EXIT_CODE), output
    assert "local rank 1" in output and "ended without a final report (killed?)" in output
    assert seconds < 10  # the fake launcher alone would wait for rank 0 forever


def test_launcher_mode_passes_the_rank_status_not_the_launchers(tmp_path: Path) -> None:
    proc = _start_fake_launcher(tmp_path, ["train", "fail=2"])  # the fake launcher exits 1, like torchrun
    code, output, seconds = _finish(proc)
    assert code == 2, output
    assert seconds < 10


def test_sigterm_before_any_rank_started_stops_the_launcher_quietly(tmp_path: Path) -> None:
    proc = _start_fake_launcher(tmp_path, ["train", "train"], delay=30.0)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    code, output, seconds = _finish(proc)
    assert code == 143, output
    assert "before any rank started" in output and "Traceback" not in output
    assert seconds < 5


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--launcher", "python", "--", "x.py"], {}, "error: JOB_COMPLETION_INDEX: not in a multi-node pod"),
        (["--launcher", "python", "--", "x.py"], {"JOB_COMPLETION_INDEX": "0", "NNODES": "1", "GPUS_PER_NODE": "1",
                                                  "MASTER_ADDR": "m", "MASTER_PORT": "70000"},
         "error: MASTER_PORT: must be a TCP port"),
        (["--launcher", "python"], {}, "error: script: give the training script after --"),
        (["--launcher", "mpirun", "--", "x.py"], {}, "error: --launcher: invalid choice"),
        (["--preempted-exit-code", "3", "--", "x.py"], {},
         "error: --preempted-exit-code: must be in 1..255 and not 2 or 3"),
    ],
)
def test_bad_flags_and_environments_are_one_line_errors(
    argv: list[str], env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("JOB_COMPLETION_INDEX", "PET_NODE_RANK", "NNODES", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_dry_run_of_the_python_launcher(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in {"JOB_COMPLETION_INDEX": "1", "NNODES": "2", "GPUS_PER_NODE": "4", "MASTER_ADDR": "m"}.items():
        monkeypatch.setenv(name, value)
    assert main(["--launcher", "python", "--dry-run", "--", "jobs/train.py", "--config", "c.yaml"]) == 0
    out = capsys.readouterr().out
    assert "node 1/2 x 4 procs, world 8, master m:29500, launcher python" in out
    assert f"{sys.executable} jobs/train.py --config c.yaml" in out


def test_the_training_job_reports_its_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """jobs/train.py's side: a report while it runs, and how it ended (here a user error: failed with status 2)."""
    from deepflow.platform.train import job

    monkeypatch.setenv(STATUS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert job.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    (report,) = read_rank_reports(tmp_path, 1)
    assert (report.status, report.exit_code, report.pid) == ("failed", 2, os.getpid())
    assert capsys.readouterr().err.startswith("error: ")
    monkeypatch.delenv(STATUS_DIR_ENV)
    assert RankStatusFile.from_environ() is None  # outside a supervisor, nothing is written


def test_elastic_traceback_filter_turns_a_rendezvous_timeout_into_nothing_and_keeps_the_rest() -> None:
    import io

    from deepflow.platform.train.pod_supervisor import TracebackFilter

    out = io.StringIO()
    lines = ["step 3 loss 1.0\n", "Traceback (most recent call last):\n", '  File "run.py", line 1, in <module>\n',
             "    raise RendezvousTimeoutError\n", "torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError\n"]
    other = ["Traceback (most recent call last):\n", '  File "x.py", line 2, in f\n', "RuntimeError: boom\n", "next\n"]
    filtered = TracebackFilter(out)
    for line in lines + other:
        filtered.feed(line)
    filtered.flush()
    assert filtered.timed_out
    assert out.getvalue() == "step 3 loss 1.0\n" + "".join(other)


def test_a_preempted_rank_exits_75_under_a_restartable_elastic_agent_only() -> None:
    """Exit 0 would tell the other agents that the job is finished; 75 makes them continue without this node."""
    from deepflow.platform.train.distributed import ElasticRange
    from deepflow.platform.train.job import stopped_exit_status

    assert stopped_exit_status(ElasticRange(2, 3, 1, 0)) == PREEMPTED_EXIT_CODE == 75
    assert stopped_exit_status(ElasticRange(2, 2, 8, 3)) == 75  # fixed size, but restartable
    assert stopped_exit_status(ElasticRange(1, 1, 2, 0)) == 0  # torchrun --standalone / --nnodes N
    assert stopped_exit_status(None) == 0  # python, deepspeed, the pod supervisor's python launcher
