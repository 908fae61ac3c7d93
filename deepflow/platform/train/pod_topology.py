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

Elastic mode (``--launcher torchrun`` only): ``k8s_env --nnodes MIN:MAX``, ``NNODES=MIN:MAX`` (Indexed Job, JobSet)
or a PyTorchJob with ``elasticPolicy`` (the operator sets PET_NNODES=MIN:MAX, PET_RDZV_ENDPOINT, PET_RDZV_BACKEND,
PET_MAX_RESTARTS, PET_RDZV_ID; no PET_NODE_RANK) runs torchrun's elastic agent (:class:`ElasticLaunch`): c10d
rendezvous at PET_RDZV_ENDPOINT, or at MASTER_ADDR:MASTER_PORT hosted by pod 0 (``is_host``); bounded waits
(``--rdzv-conf join_timeout=..,last_call_timeout=..,close_timeout=..,keep_alive_*,read_timeout``); ``--local-addr``
(the pod's IP: pod hostnames do not resolve); TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 set by the supervisor. Node ranks
are then assigned by the rendezvous, not by the pod's index.

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

__all__ = ["DEFAULT_MASTER_PORT", "LAUNCHERS", "ElasticLaunch", "K8sEnvError", "PodTopology", "elastic_command",
           "elastic_launch", "hostfile_text", "launcher_command", "pod_topology", "rank_env"]

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


def _nnodes(raw: str, name: str) -> tuple[int, int]:
    low, sep, high = raw.partition(":")
    try:
        nodes = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise K8sEnvError(f"{name}: must be N or MIN:MAX, got {raw!r}") from None
    if not 1 <= nodes[0] <= nodes[1]:
        raise K8sEnvError(f"{name}: need 1 <= MIN <= MAX, got {raw!r}")
    return nodes


def pod_topology(env: Mapping[str, str] | None = None, nnodes: str | None = None) -> PodTopology:
    """Read the pod's environment (default ``os.environ``); see the module doc for the mapping. A variable that is
    missing or wrong raises a :class:`~deepflow.errors.UserError` naming it."""
    env = os.environ if env is None else env
    port = _int(env, "MASTER_PORT", DEFAULT_MASTER_PORT)
    elastic = nnodes or (env.get("NNODES", "") if ":" in env.get("NNODES", "") else "")
    if env.get("JOB_COMPLETION_INDEX", "") != "" and elastic:
        low, high = _nnodes(elastic, "--nnodes" if nnodes else "NNODES")
        topology = _indexed_job_topology({**env, "NNODES": str(high)}, port)
    elif env.get("JOB_COMPLETION_INDEX", "") != "":
        topology = _indexed_job_topology(env, port)
    elif env.get("PET_RDZV_ENDPOINT", "") != "" and env.get("PET_NODE_RANK", "") == "":  # PyTorchJob elasticPolicy
        low, high = _nnodes(nnodes or env.get("PET_NNODES", "1"), "--nnodes" if nnodes else "PET_NNODES")
        host, _, rdzv_port = env["PET_RDZV_ENDPOINT"].rpartition(":")
        nproc_raw = env.get("PET_NPROC_PER_NODE", "") or env.get("PET_N_PROC_PER_NODE", "")
        topology = PodTopology(0, high, int(nproc_raw) if nproc_raw.isdigit() else _visible_gpus(), host or rdzv_port,
                               int(rdzv_port) if host and rdzv_port.isdigit() else port)
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


# -------------------------------------------------------------------------------------------------- elastic
@dataclass(frozen=True)
class ElasticLaunch:
    """torchrun's elastic agent for this pod: ``--nnodes MIN:MAX`` with the c10d rendezvous and bounded waits."""

    min_nodes: int
    max_nodes: int
    endpoint: str  # HOST:PORT of the rendezvous store
    rdzv_id: str
    max_restarts: int
    join_timeout_s: int = 600
    last_call_timeout_s: int = 30
    close_timeout_s: int = 60
    is_host: bool | None = None  # None: torchrun decides from the endpoint's host name
    local_addr: str | None = None

    def rdzv_conf(self) -> str:
        """``--rdzv-conf``: every wait of the rendezvous bounded; a lost node noticed within 3 keep-alives."""
        conf = [f"join_timeout={self.join_timeout_s}", f"last_call_timeout={self.last_call_timeout_s}",
                f"close_timeout={self.close_timeout_s}", "keep_alive_interval=1", "keep_alive_max_attempt=3",
                "read_timeout=30"]
        if self.is_host is not None:
            conf.append(f"is_host={str(self.is_host).lower()}")
        return ",".join(conf)


def elastic_launch(topology: PodTopology, env: Mapping[str, str] | None = None, nnodes: str | None = None,
                   **timeouts: int) -> ElasticLaunch | None:
    """The elastic agent's settings when the pod runs elastic (``nnodes`` MIN:MAX from ``k8s_env --nnodes``,
    NNODES=MIN:MAX, or a PyTorchJob's elasticPolicy; see the module doc); None for a fixed-size pod."""
    env = os.environ if env is None else env
    local_addr = env.get("POD_IP") or None
    if env.get("PET_RDZV_ENDPOINT", "") != "" and env.get("PET_NODE_RANK", "") == "":
        low, high = _nnodes(nnodes or env.get("PET_NNODES", "1"), "--nnodes" if nnodes else "PET_NNODES")
        return ElasticLaunch(low, high, env["PET_RDZV_ENDPOINT"], env.get("PET_RDZV_ID") or "deepflow",
                             _int(env, "PET_MAX_RESTARTS", 100), local_addr=local_addr, **timeouts)
    raw = nnodes or (env.get("NNODES", "") if ":" in env.get("NNODES", "") else "")
    if not raw:
        return None
    low, high = _nnodes(raw, "--nnodes" if nnodes else "NNODES")
    return ElasticLaunch(low, high, f"{topology.master_addr}:{topology.master_port}",
                         env.get("RDZV_ID") or topology.job_name or "deepflow", _int(env, "MAX_RESTARTS", 100),
                         is_host=topology.node_rank == 0 if env.get("JOB_COMPLETION_INDEX", "") != "" else None,
                         local_addr=local_addr, **timeouts)


def elastic_command(topology: PodTopology, elastic: ElasticLaunch, script_and_args: list[str]) -> list[str]:
    """``torchrun --nnodes MIN:MAX ... --rdzv-backend c10d`` for this pod (node ranks come from the rendezvous)."""
    command = [
        "torchrun", f"--nnodes={elastic.min_nodes}:{elastic.max_nodes}",
        f"--nproc-per-node={topology.nproc_per_node}", "--rdzv-backend=c10d", f"--rdzv-endpoint={elastic.endpoint}",
        f"--rdzv-id={elastic.rdzv_id}", f"--max-restarts={elastic.max_restarts}", f"--rdzv-conf={elastic.rdzv_conf()}",
    ]
    if elastic.local_addr:
        command.append(f"--local-addr={elastic.local_addr}")
    return [*command, *script_and_args]


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
