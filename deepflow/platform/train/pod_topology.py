"""One pod's share of a multi-node training job: the topology from the pod's environment and the launch command.

Topology. In an Indexed Job (``completionMode: Indexed``) every pod gets ``JOB_COMPLETION_INDEX`` (0..N-1) and the
stable hostname ``<job-name>-<index>``; with ``subdomain: <headless service>`` it resolves as
``<job-name>-<index>.<service>.<namespace>.svc.cluster.local``. A JobSet's pods are Indexed-Job pods too: their
Job is ``<jobset>-<replicatedJob>-<jobIndex>`` and their hostname ``<that job>-<podIndex>.<network.subdomain>``, so
with one replica of the replicated Job the same mapping holds (JOB_NAME from the pod's
``batch.kubernetes.io/job-name`` label, HEADLESS_SERVICE = the JobSet's subdomain; k8s/train-xl3t-jobset.yaml
sets MASTER_ADDR from the ``jobset.sigs.k8s.io/coordinator`` annotation instead). So:

    node_rank   = JOB_COMPLETION_INDEX
    num_nodes   = NNODES                      (= the Job's completions / parallelism)
    nproc       = GPUS_PER_NODE               (default: the visible CUDA devices, at least 1)
    world_size  = num_nodes * nproc;  rank of local process l = node_rank * nproc + l
    master_addr = MASTER_ADDR if set, else <JOB_NAME>-0.<HEADLESS_SERVICE>[.<POD_NAMESPACE>.svc.<CLUSTER_DOMAIN>]
    master_port = MASTER_PORT (default 29500)

A Kubeflow PyTorchJob sets the torchrun variables itself (PET_NODE_RANK, PET_NNODES, PET_NPROC_PER_NODE,
PET_MASTER_ADDR, PET_MASTER_PORT); they are read when JOB_COMPLETION_INDEX is absent.

``python -m deepflow.platform.train.k8s_env --launcher deepspeed|torchrun|python -- jobs/train.py --config run.yaml``
prints the topology and runs the pod's ranks under :class:`deepflow.platform.train.pod_supervisor.Supervisor`
(signal forwarding, fail-fast, the pod's exit status: see that module).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from deepflow.errors import UserError

__all__ = ["DEFAULT_MASTER_PORT", "LAUNCHERS", "K8sEnvError", "PodTopology", "hostfile_text", "launcher_command",
           "pod_topology", "rank_env"]

DEFAULT_MASTER_PORT = 29500
LAUNCHERS = ("deepspeed", "torchrun", "python")


class K8sEnvError(UserError):
    """A pod environment or flag k8s_env cannot use (``error: <variable>: <what is wrong>``, exit 2)."""


# ------------------------------------------------------------------------------------------------- topology
@dataclass(frozen=True)
class PodTopology:
    """Where this pod sits in a multi-node job."""

    node_rank: int
    num_nodes: int
    nproc_per_node: int
    master_addr: str
    master_port: int
    job_name: str | None = None
    service: str | None = None
    namespace: str | None = None

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.nproc_per_node

    def global_rank(self, local_rank: int) -> int:
        if not 0 <= local_rank < self.nproc_per_node:
            raise ValueError(f"local rank {local_rank} outside [0, {self.nproc_per_node})")
        return self.node_rank * self.nproc_per_node + local_rank

    def pod_hostname(self, index: int) -> str:
        """Stable DNS name of pod ``index`` of the Indexed Job (needs JOB_NAME and HEADLESS_SERVICE)."""
        if not self.job_name or not self.service:
            raise K8sEnvError("JOB_NAME, HEADLESS_SERVICE: pod DNS names need both in the environment")
        return _pod_dns(self.job_name, index, self.service, self.namespace)


def _pod_dns(job_name: str, index: int, service: str, namespace: str | None, domain: str = "cluster.local") -> str:
    host = f"{job_name}-{index}.{service}"
    return f"{host}.{namespace}.svc.{domain}" if namespace else host


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise K8sEnvError(f"{name}: environment variable {name} is required")
        return default
    try:
        return int(raw)
    except ValueError:
        raise K8sEnvError(f"{name}: environment variable {name}={raw!r} is not an integer") from None


def _visible_gpus() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no torch / no driver: one process per pod
        return 1


def _indexed_job_topology(env: Mapping[str, str], port: int) -> PodTopology:
    node_rank = _int(env, "JOB_COMPLETION_INDEX")
    num_nodes = _int(env, "NNODES")
    nproc = _int(env, "GPUS_PER_NODE", 0) or _visible_gpus()
    job_name, service = env.get("JOB_NAME") or None, env.get("HEADLESS_SERVICE") or None
    namespace = env.get("POD_NAMESPACE") or None
    master = env.get("MASTER_ADDR") or ""
    if not master:
        if not job_name or not service:
            raise K8sEnvError(
                "MASTER_ADDR: set MASTER_ADDR, or JOB_NAME and HEADLESS_SERVICE (the Indexed Job's name and the "
                "headless Service named in the pod's subdomain) so that pod 0's DNS name can be built"
            )
        master = _pod_dns(job_name, 0, service, namespace, env.get("CLUSTER_DOMAIN") or "cluster.local")
    return PodTopology(node_rank, num_nodes, nproc, master, port, job_name, service, namespace)


def _pytorchjob_topology(env: Mapping[str, str], port: int) -> PodTopology:
    nproc_raw = env.get("PET_NPROC_PER_NODE", "")
    nproc = int(nproc_raw) if nproc_raw.isdigit() else _visible_gpus()
    topology = PodTopology(
        _int(env, "PET_NODE_RANK"), _int(env, "PET_NNODES"), nproc,
        env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR") or "",
        _int(env, "PET_MASTER_PORT", port),
    )
    if not topology.master_addr:
        raise K8sEnvError("PET_MASTER_ADDR: required (or MASTER_ADDR) in a PyTorchJob pod")
    return topology


def pod_topology(env: Mapping[str, str] | None = None) -> PodTopology:
    """Read the pod's environment (default ``os.environ``); see the module doc for the mapping. A variable that is
    missing or wrong raises a :class:`~deepflow.errors.UserError` naming it."""
    env = os.environ if env is None else env
    port = _int(env, "MASTER_PORT", DEFAULT_MASTER_PORT)
    if env.get("JOB_COMPLETION_INDEX", "") != "":
        topology = _indexed_job_topology(env, port)
    elif env.get("PET_NODE_RANK", "") != "":  # Kubeflow PyTorchJob
        topology = _pytorchjob_topology(env, port)
    else:
        raise K8sEnvError(
            "JOB_COMPLETION_INDEX: not in a multi-node pod: neither JOB_COMPLETION_INDEX (Indexed Job, JobSet) nor "
            "PET_NODE_RANK (PyTorchJob) is set"
        )
    if topology.num_nodes < 1 or not 0 <= topology.node_rank < topology.num_nodes:
        raise K8sEnvError(
            f"JOB_COMPLETION_INDEX: node rank {topology.node_rank} is outside [0, NNODES={topology.num_nodes})"
        )
    if not 0 < topology.master_port < 65536:
        raise K8sEnvError(f"MASTER_PORT: must be a TCP port (1..65535), got {topology.master_port}")
    if topology.nproc_per_node < 1:
        raise K8sEnvError(f"GPUS_PER_NODE: must be >= 1, got {topology.nproc_per_node}")
    return topology


# ------------------------------------------------------------------------------------------------- commands
def hostfile_text(topology: PodTopology) -> str:
    """DeepSpeed hostfile: one ``<pod> slots=<gpus>`` line per pod (``--no_ssh`` still needs the pool). The names
    are the pods' DNS names when JOB_NAME and HEADLESS_SERVICE are known; with ``--no_ssh`` DeepSpeed only uses
    them as keys (the master address is given), so otherwise ``node-<i>`` stands in."""
    def host(index: int) -> str:
        return topology.pod_hostname(index) if topology.job_name and topology.service else f"node-{index}"

    return "".join(f"{host(i)} slots={topology.nproc_per_node}\n" for i in range(topology.num_nodes))


def launcher_command(topology: PodTopology, launcher: str, script_and_args: list[str], hostfile: str) -> list[str]:
    """The command that starts ``nproc_per_node`` processes on this pod; for ``python``, the command of one rank
    (the supervisor starts it ``nproc_per_node`` times with :func:`rank_env`)."""
    if launcher == "torchrun":
        return [
            "torchrun", f"--nnodes={topology.num_nodes}", f"--node-rank={topology.node_rank}",
            f"--nproc-per-node={topology.nproc_per_node}", f"--master-addr={topology.master_addr}",
            f"--master-port={topology.master_port}", *script_and_args,
        ]
    if launcher == "deepspeed":
        return [
            "deepspeed", "--no_ssh", f"--hostfile={hostfile}", f"--node_rank={topology.node_rank}",
            f"--num_nodes={topology.num_nodes}", f"--num_gpus={topology.nproc_per_node}",
            f"--master_addr={topology.master_addr}", f"--master_port={topology.master_port}", *script_and_args,
        ]
    if launcher == "python":
        return [sys.executable, *script_and_args]
    raise K8sEnvError(f"--launcher: must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")


def rank_env(topology: PodTopology, local_rank: int, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of local rank ``local_rank`` under the ``python`` launcher (what torchrun would set)."""
    env = dict(base)
    env.update({
        "RANK": str(topology.global_rank(local_rank)), "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(topology.world_size), "LOCAL_WORLD_SIZE": str(topology.nproc_per_node),
        "GROUP_RANK": str(topology.node_rank), "MASTER_ADDR": topology.master_addr,
        "MASTER_PORT": str(topology.master_port),
    })
    return env
