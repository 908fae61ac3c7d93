"""The pod environment -> node rank, world size and master address mapping (deepflow.platform.train.k8s_env)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deepflow.platform.train.pod_topology import hostfile_text, launcher_command, pod_topology

ROOT = Path(__file__).resolve().parents[2]


def _indexed_env(index: int, **extra: str) -> dict[str, str]:
    return {"JOB_COMPLETION_INDEX": str(index), "NNODES": "4", "GPUS_PER_NODE": "8", "JOB_NAME": "deepflow-xl3t",
            "HEADLESS_SERVICE": "deepflow-xl3t", "POD_NAMESPACE": "ml", **extra}


def test_indexed_job_mapping() -> None:
    topology = pod_topology(_indexed_env(2))
    assert (topology.node_rank, topology.num_nodes, topology.nproc_per_node) == (2, 4, 8)
    assert topology.world_size == 32
    assert [topology.global_rank(local) for local in (0, 7)] == [16, 23]
    assert topology.master_addr == "deepflow-xl3t-0.deepflow-xl3t.ml.svc.cluster.local"
    assert topology.master_port == 29500
    assert pod_topology(_indexed_env(0, MASTER_PORT="12345", MASTER_ADDR="10.0.0.7")).master_addr == "10.0.0.7"
    no_namespace = {k: v for k, v in _indexed_env(1).items() if k != "POD_NAMESPACE"}
    assert pod_topology(no_namespace).master_addr == "deepflow-xl3t-0.deepflow-xl3t"
    with pytest.raises(ValueError):
        topology.global_rank(8)


def test_every_global_rank_is_assigned_exactly_once() -> None:
    ranks = [pod_topology(_indexed_env(node)).global_rank(local) for node in range(4) for local in range(8)]
    assert sorted(ranks) == list(range(32))


def test_kubeflow_pytorchjob_mapping() -> None:
    env = {"PET_NODE_RANK": "3", "PET_NNODES": "4", "PET_NPROC_PER_NODE": "8",
           "PET_MASTER_ADDR": "deepflow-xl3t-pj-master-0", "PET_MASTER_PORT": "23456",
           "RANK": "3", "WORLD_SIZE": "4"}
    topology = pod_topology(env)
    assert (topology.node_rank, topology.world_size, topology.master_addr, topology.master_port) == (
        3, 32, "deepflow-xl3t-pj-master-0", 23456)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "neither JOB_COMPLETION_INDEX"),
        ({"JOB_COMPLETION_INDEX": "0", "GPUS_PER_NODE": "8"}, "NNODES is required"),
        ({"JOB_COMPLETION_INDEX": "4", "NNODES": "4", "GPUS_PER_NODE": "8", "MASTER_ADDR": "m"}, "outside"),
        ({"JOB_COMPLETION_INDEX": "x", "NNODES": "4"}, "not an integer"),
        ({"JOB_COMPLETION_INDEX": "0", "NNODES": "2", "GPUS_PER_NODE": "8"}, "HEADLESS_SERVICE"),
    ],
)
def test_bad_environments_name_the_problem(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pod_topology(env)


def test_launcher_commands_and_hostfile() -> None:
    topology = pod_topology(_indexed_env(1))
    torchrun = launcher_command(topology, "torchrun", ["jobs/train.py", "--config", "c.yaml"], "/tmp/h")
    assert torchrun[:6] == ["torchrun", "--nnodes=4", "--node-rank=1", "--nproc-per-node=8",
                            "--master-addr=deepflow-xl3t-0.deepflow-xl3t.ml.svc.cluster.local", "--master-port=29500"]
    assert torchrun[-3:] == ["jobs/train.py", "--config", "c.yaml"]
    deepspeed = launcher_command(topology, "deepspeed", ["jobs/train.py"], "/tmp/h")
    assert deepspeed[:4] == ["deepspeed", "--no_ssh", "--hostfile=/tmp/h", "--node_rank=1"]
    assert "--num_nodes=4" in deepspeed and "--num_gpus=8" in deepspeed
    lines = hostfile_text(topology).splitlines()
    assert lines == [f"deepflow-xl3t-{i}.deepflow-xl3t.ml.svc.cluster.local slots=8" for i in range(4)]
    python = launcher_command(topology, "python", ["jobs/train.py", "--config", "c.yaml"], "/tmp/h")
    assert python == [sys.executable, "jobs/train.py", "--config", "c.yaml"]  # one rank's; started 8 times
    with pytest.raises(ValueError, match="launcher"):
        launcher_command(topology, "mpirun", [], "/tmp/h")


def test_hostfile_without_pod_names_uses_placeholders() -> None:
    """With MASTER_ADDR given, DeepSpeed's --no_ssh path only needs the hostfile's slots, not resolvable names."""
    topology = pod_topology({"JOB_COMPLETION_INDEX": "1", "NNODES": "2", "GPUS_PER_NODE": "2", "MASTER_ADDR": "m"})
    assert hostfile_text(topology) == "node-0 slots=2\nnode-1 slots=2\n"


def _manifest_pod_env(index: int, namespace: str) -> dict[str, str]:
    """What Kubernetes gives pod ``index`` of k8s/train-xl3t.yaml: its literal env, the fieldRefs resolved, and the
    JOB_COMPLETION_INDEX the Job controller injects."""
    docs = list(yaml.safe_load_all((ROOT / "k8s" / "train-xl3t.yaml").read_text()))
    (job,) = [d for d in docs if d["kind"] == "Job"]
    resolved = {
        "metadata.labels['batch.kubernetes.io/job-name']": job["metadata"]["name"],
        "metadata.namespace": namespace,
    }
    env = {"JOB_COMPLETION_INDEX": str(index)}
    for item in job["spec"]["template"]["spec"]["containers"][0]["env"]:
        env[item["name"]] = item["value"] if "value" in item else resolved[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def test_the_manifest_environment_maps_to_pod_zero_as_master(tmp_path: Path) -> None:
    topology = pod_topology(_manifest_pod_env(3, "research"))
    assert topology.master_addr == "deepflow-xl3t-0.deepflow-xl3t.research.svc.cluster.local"
    assert (topology.node_rank, topology.world_size) == (3, 32)
    env = {**os.environ, **_manifest_pod_env(3, "research")}
    hostfile = tmp_path / "hostfile"
    done = subprocess.run(
        [sys.executable, "-m", "deepflow.platform.train.k8s_env", "--launcher", "deepspeed", "--hostfile", str(hostfile),
         "--dry-run", "--", "jobs/train.py", "--config", "/etc/deepflow/run.yaml"],
        env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "node 3/4 x 8 procs, world 32" in done.stdout
    assert "deepspeed --no_ssh" in done.stdout and "--node_rank=3" in done.stdout
    assert hostfile.read_text().startswith("deepflow-xl3t-0.deepflow-xl3t.research.svc.cluster.local slots=8\n")


# ------------------------------------------------------------------------------------------------- elastic
def test_elastic_indexed_job_runs_the_c10d_agent_hosted_by_pod_zero() -> None:
    from deepflow.platform.train.pod_topology import elastic_command, elastic_launch

    env = _indexed_env(0, NNODES="2:4", POD_IP="10.1.2.3")
    topology = pod_topology(env)
    assert (topology.node_rank, topology.num_nodes) == (0, 4)  # MAX nodes
    elastic = elastic_launch(topology, env, join_timeout_s=120)
    assert elastic is not None and (elastic.min_nodes, elastic.max_nodes, elastic.is_host) == (2, 4, True)
    command = elastic_command(topology, elastic, ["jobs/train.py", "--config", "c.yaml"])
    assert command[:7] == [
        "torchrun", "--nnodes=2:4", "--nproc-per-node=8", "--rdzv-backend=c10d",
        "--rdzv-endpoint=deepflow-xl3t-0.deepflow-xl3t.ml.svc.cluster.local:29500", "--rdzv-id=deepflow-xl3t",
        "--max-restarts=100"]
    assert command[7] == ("--rdzv-conf=join_timeout=120,last_call_timeout=30,close_timeout=60,keep_alive_interval=1,"
                          "keep_alive_max_attempt=3,read_timeout=30,is_host=true")
    assert command[8:] == ["--local-addr=10.1.2.3", "jobs/train.py", "--config", "c.yaml"]
    other = _indexed_env(3, NNODES="2:4")
    launch = elastic_launch(pod_topology(other), other)
    assert launch is not None and launch.is_host is False
    assert elastic_launch(pod_topology(_indexed_env(1)), _indexed_env(1)) is None  # a fixed size: not elastic


def test_elastic_pytorchjob_reads_the_operators_variables() -> None:
    from deepflow.platform.train.pod_topology import elastic_command, elastic_launch

    env = {"PET_NNODES": "2:4", "PET_RDZV_ENDPOINT": "deepflow-xl3t-el-worker-0:29400", "PET_RDZV_BACKEND": "c10d",
           "PET_MAX_RESTARTS": "20", "PET_NPROC_PER_NODE": "8", "PET_RDZV_ID": "xl3t"}
    topology = pod_topology(env)
    elastic = elastic_launch(topology, env)
    assert elastic is not None
    assert (elastic.min_nodes, elastic.max_nodes, elastic.max_restarts, elastic.is_host) == (2, 4, 20, None)
    command = elastic_command(topology, elastic, ["jobs/train.py"])
    assert "--rdzv-endpoint=deepflow-xl3t-el-worker-0:29400" in command and "--nproc-per-node=8" in command
    assert "--rdzv-id=xl3t" in command and not any(part.startswith("--local-addr") for part in command)


@pytest.mark.parametrize("nnodes", ["3:2", "0:2", "a:b", "1:2:3"])
def test_bad_elastic_ranges_name_the_field(nnodes: str) -> None:
    with pytest.raises(ValueError, match="NNODES: "):
        pod_topology(_indexed_env(0, NNODES=nnodes))


def test_elastic_dry_run_and_python_launcher_refused(tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if k not in ("NNODES", "PET_NODE_RANK", "PET_RDZV_ENDPOINT")},
           **_indexed_env(1, MASTER_ADDR="10.0.0.1", POD_IP="10.0.0.2"), "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "deepflow.platform.train.k8s_env"]
    run = subprocess.run([*base, "--launcher", "torchrun", "--nnodes", "2:4", "--join-timeout-s", "60", "--dry-run",
                          "--", "jobs/train.py"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "elastic: 2..4 nodes x 8 procs, rendezvous 10.0.0.1:29500" in run.stdout
    assert "--nnodes=2:4" in run.stdout and "join_timeout=60" in run.stdout and "is_host=false" in run.stdout
    refused = subprocess.run([*base, "--launcher", "python", "--nnodes", "2:4", "--", "jobs/train.py"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr == "error: --launcher: elastic training (--nnodes 2:4) needs torchrun, got python\n"
