"""The training pod of k8s/train-xl3t.yaml as Kubernetes runs it, on CPU: the container command read from the
manifest (only the launcher, the config path and the hostfile path changed) with the manifest's environment (one
node, 2 ranks, a local master) runs as PID 1 of its own PID namespace (``unshare --fork --pid --mount-proc``,
as a container entrypoint), on a tiny real training run.

* preemption, under each launcher the manifests offer (deepspeed, torchrun, python): SIGTERM to the namespace's PID 1
  (tini) -> every rank writes a committed checkpoint at the step it stopped at, no traceback, the pod exits 75
  (what the podFailurePolicy ignores), and the pod run again (python launcher) resumes from that checkpoint;
* a lost peer: two pods (NNODES=2, one rank each); pod 1's rank is SIGKILLed (or frozen with SIGSTOP, a hung node)
  -> pod 0 exits non-zero within distributed.collective_timeout_s (plus start-up slack);
* one of two pods preempted: both stop at the same step with a committed checkpoint and exit 75;
* a lost local rank: one pod with 2 ranks under the python launcher, one rank SIGKILLed -> the pod exits at once;
* an invalid config under torchrun: the pod exits 2 (the ranks' status), not torchrun's 1.

Skipped only where unshare is not permitted; tini must be installed (the image has it; .ci/run installs it).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_train_support import base_overrides, make_digits_dataset, write_config  # noqa: E402

from deepflow.platform.train.pod_supervisor import PREEMPTED_EXIT_CODE  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "k8s" / "train-xl3t.yaml"
UNSHARE = ["unshare", "--fork", "--pid", "--mount-proc"]


def _unshare_works() -> bool:
    try:
        return subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _unshare_works(), reason="unshare --pid is not permitted here"),
]


@pytest.fixture(scope="module")
def digits_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    assert shutil.which("tini"), "tini is required (apt-get install tini; .ci/run installs it)"
    url = str(tmp_path_factory.mktemp("pod-faults") / "digits")
    make_digits_dataset(url)
    return url


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _manifest_container() -> dict[str, Any]:
    (job,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d and d["kind"] == "Job"]
    return job["spec"]["template"]["spec"]["containers"][0]


def _pod_command(launcher: str, config: Path, hostfile: Path) -> list[str]:
    """The manifest's container command with only the launcher, config path and hostfile path changed."""
    command = list(_manifest_container()["command"])
    for flag, value in (("--launcher", launcher), ("--config", str(config)), ("--hostfile", str(hostfile))):
        command[command.index(flag) + 1] = value
    return command


def _pod_env(
    tmp_path: Path, index: int = 0, nnodes: int = 1, nproc: int = 2, port: int | None = None
) -> dict[str, str]:
    """The manifest's env (fieldRefs resolved as Kubernetes would), with one local node, and the test settings."""
    (job,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d and d["kind"] == "Job"]
    resolved = {"metadata.labels['batch.kubernetes.io/job-name']": job["metadata"]["name"],
                "metadata.namespace": "default"}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    for item in _manifest_container()["env"]:
        env[item["name"]] = item["value"] if "value" in item else resolved[item["valueFrom"]["fieldRef"]["fieldPath"]]
    env.update({
        "JOB_COMPLETION_INDEX": str(index), "NNODES": str(nnodes), "GPUS_PER_NODE": str(nproc),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port or _free_port()),
        "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
    })
    return env


class Pod:
    """One pod: the command as PID 1 of a new PID namespace, output to a file."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen([*UNSHARE, *command], cwd=REPO, env=env, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def pid1(self) -> int:
        """The namespace's PID 1 (tini), as seen from here: the unshare process's child."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            children = _children(self.proc.pid)
            if children:
                return children[0]
            time.sleep(0.05)
        raise AssertionError("unshare has no child")

    def ranks(self) -> list[int]:
        """The rank processes in the pod (environment with LOCAL_RANK, parent's without)."""
        found = []
        for pid in _descendants(self.proc.pid):
            if _has_local_rank(pid) and not _has_local_rank(_ppid(pid)):
                found.append(pid)
        return found

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def output(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # unshare and its namespace (PID 1 dying ends the rest)
            self.proc.wait()
        self._out.close()


def _ppid(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(text[text.rindex(")") + 2:].split()[1])


def _children(pid: int) -> list[int]:
    return sorted(int(name) for name in os.listdir("/proc") if name.isdigit() and _ppid(int(name)) == pid)


def _descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        children = _children(stack.pop())
        found += children
        stack += children
    return found


def _has_local_rank(pid: int) -> bool:
    try:
        return b"\0LOCAL_RANK=" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def _logged_steps(run_dir: Path) -> int:
    path = run_dir / "tensorboard" / "scalars.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait_training(pods: list[Pod], run_dir: Path, steps: int = 3, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _logged_steps(run_dir) >= steps:
            return
        for pod in pods:
            assert pod.proc.poll() is None, f"pod ended early ({pod.proc.returncode}):\n{pod.output()[-4000:]}"
        time.sleep(0.1)
    raise AssertionError(f"no {steps} training steps within {timeout}s:\n{pods[0].output()[-4000:]}")


def _config(tmp_path: Path, digits_url: str, run_dir: Path, name: str = "run.yaml", **extra: Any) -> Path:
    settings = {"debug.step_sleep_s": 0.05, "distributed.rendezvous_timeout_s": 60, **extra}
    return write_config(tmp_path / name, base_overrides(digits_url, str(run_dir), steps=10_000, **settings))


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "python"])
def test_preempted_pod_checkpoints_exits_75_and_resumes(launcher: str, digits_url: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = _config(tmp_path, digits_url, run_dir)
    env = _pod_env(tmp_path)
    pod = Pod(_pod_command(launcher, config, tmp_path / "hostfile"), env, tmp_path / "pod.log")
    try:
        _wait_training([pod], run_dir)
        sent = time.monotonic()
        os.kill(pod.pid1(), signal.SIGTERM)  # what the kubelet does to the container's PID 1
        code = pod.wait(timeout=120)
        seconds = time.monotonic() - sent
    finally:
        pod.kill()
    output = pod.output()
    assert code == PREEMPTED_EXIT_CODE, output[-5000:]
    assert "Traceback" not in output, output[-5000:]
    preempted = [line for line in output.splitlines() if line.startswith("training preempted at step ")]
    stopped = {int(line.rsplit(" ", 1)[1]) for line in preempted}
    assert len(preempted) == 2 and len(stopped) == 1, output[-5000:]  # both ranks, at the same step
    (step,) = stopped
    assert (run_dir / "checkpoints" / f"step-{step:07d}" / "COMMIT").exists()
    print(f"{launcher}: SIGTERM -> exit {code} in {seconds:.1f}s, checkpoint of step {step}")

    # the recreated pod resumes from that checkpoint and finishes (a short run: two more steps; under the python
    # launcher, which starts fastest: the checkpoint is what is tested, and the ranks are the same)
    rerun_config = _config(tmp_path, digits_url, run_dir, "rerun.yaml", **{"schedule.total_steps": step + 2})
    env["MASTER_PORT"] = str(_free_port())
    rerun = Pod(_pod_command("python", rerun_config, tmp_path / "hostfile"), env, tmp_path / "rerun.log")
    try:
        code = rerun.wait(timeout=180)
    finally:
        rerun.kill()
    output = rerun.output()
    assert code == 0, output[-5000:]
    assert "resumed from" in output, output[-5000:]
    assert output.splitlines().count(f"training completed at step {step + 2}") == 2, output[-5000:]


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_lost_peer_pod_fails_the_others_within_the_collective_timeout(
    how: str, digits_url: str, tmp_path: Path
) -> None:
    """SIGKILL: the connection drops, gloo fails at once. SIGSTOP (a hung node): the collective times out."""
    timeout_s = 10
    run_dir = tmp_path / "run"
    config = _config(tmp_path, digits_url, run_dir, **{"distributed.collective_timeout_s": timeout_s})
    port = _free_port()
    pods = [Pod(_pod_command("python", config, tmp_path / f"hostfile-{i}"),
                _pod_env(tmp_path, index=i, nnodes=2, nproc=1, port=port), tmp_path / f"pod{i}.log") for i in (0, 1)]
    try:
        _wait_training(pods, run_dir)
        (victim,) = pods[1].ranks()
        lost = time.monotonic()
        os.kill(victim, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        code = pods[0].wait(timeout=timeout_s + 30)
        seconds = time.monotonic() - lost
        other = pods[1].wait(timeout=10) if how == "kill" else None
    finally:
        if how == "stop":
            os.kill(victim, signal.SIGKILL)
        for pod in pods:
            pod.kill()
    assert code not in (None, 0, PREEMPTED_EXIT_CODE), pods[0].output()[-5000:]
    assert seconds < timeout_s + 15, seconds
    if how == "kill":
        assert other == 128 + signal.SIGKILL, pods[1].output()[-3000:]  # the killed rank's status
    print(f"peer {how}: pod 0 exit {code} after {seconds:.1f}s (collective timeout {timeout_s}s)")


def test_sigterm_to_one_pod_stops_every_pod_with_75(digits_url: str, tmp_path: Path) -> None:
    """One node preempted: its ranks' stop flag reaches every rank through the step's all-reduce, so the other pod
    (which got no SIGTERM) stops at the same step too, and must not exit 0 (its index would count as complete)."""
    run_dir = tmp_path / "run"
    config = _config(tmp_path, digits_url, run_dir)
    port = _free_port()
    pods = [Pod(_pod_command("python", config, tmp_path / f"hostfile-{i}"),
                _pod_env(tmp_path, index=i, nnodes=2, nproc=1, port=port), tmp_path / f"pod{i}.log") for i in (0, 1)]
    try:
        _wait_training(pods, run_dir)
        os.kill(pods[1].pid1(), signal.SIGTERM)
        codes = [pod.wait(timeout=60) for pod in pods]
    finally:
        for pod in pods:
            pod.kill()
    assert codes == [PREEMPTED_EXIT_CODE, PREEMPTED_EXIT_CODE], pods[0].output()[-3000:] + pods[1].output()[-3000:]
    steps = {line for pod in pods for line in pod.output().splitlines() if line.startswith("training preempted at")}
    (line,) = steps
    assert (run_dir / "checkpoints" / f"step-{int(line.rsplit(' ', 1)[1]):07d}" / "COMMIT").exists()


def test_a_lost_local_rank_ends_the_pod_at_once(digits_url: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = _config(tmp_path, digits_url, run_dir)
    pod = Pod(_pod_command("python", config, tmp_path / "hostfile"), _pod_env(tmp_path), tmp_path / "pod.log")
    try:
        _wait_training([pod], run_dir)
        ranks = pod.ranks()
        assert len(ranks) == 2
        lost = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        code = pod.wait(timeout=30)
        seconds = time.monotonic() - lost
    finally:
        pod.kill()
    assert code == 128 + signal.SIGKILL, pod.output()[-5000:]
    assert "was killed by SIGKILL: stopping the pod's other 1 rank(s)" in pod.output()
    assert seconds < 5, seconds


def test_an_invalid_config_fails_the_pod_with_status_2_under_torchrun(digits_url: str, tmp_path: Path) -> None:
    """torchrun reports any failed worker as 1; the pod passes the ranks' own 2 on (the podFailurePolicy's FailJob)."""
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"run": {"name": "bad", "output_dir": str(tmp_path / "run")},
                                      "data": {"url": digits_url}, "optim": {"lr": -1.0}}))
    pod = Pod(_pod_command("torchrun", config, tmp_path / "hostfile"), _pod_env(tmp_path), tmp_path / "pod.log")
    try:
        code = pod.wait(timeout=120)
    finally:
        pod.kill()
    output = pod.output()
    assert code == 2, output[-5000:]
    assert "error: optim.lr: Input should be greater than 0" in output
