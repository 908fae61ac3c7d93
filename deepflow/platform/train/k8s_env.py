"""Map a Kubernetes pod's environment to a multi-node launch: node rank, world size, master address.

In an Indexed Job (``completionMode: Indexed``) every pod gets ``JOB_COMPLETION_INDEX`` (0..N-1) and the stable
hostname ``<job-name>-<index>``; with ``subdomain: <headless service>`` it resolves as
``<job-name>-<index>.<service>.<namespace>.svc.cluster.local``. So:

    node_rank   = JOB_COMPLETION_INDEX
    num_nodes   = NNODES                      (= the Job's completions / parallelism)
    nproc       = GPUS_PER_NODE               (default: the visible CUDA devices, at least 1)
    world_size  = num_nodes * nproc;  rank of local process l = node_rank * nproc + l
    master_addr = MASTER_ADDR if set, else <JOB_NAME>-0.<HEADLESS_SERVICE>[.<POD_NAMESPACE>.svc.<CLUSTER_DOMAIN>]
    master_port = MASTER_PORT (default 29500)

A Kubeflow PyTorchJob sets the torchrun variables itself (PET_NODE_RANK, PET_NNODES, PET_NPROC_PER_NODE,
PET_MASTER_ADDR, PET_MASTER_PORT); they are read when JOB_COMPLETION_INDEX is absent.

``python -m deepflow.platform.train.k8s_env --launcher torchrun|deepspeed -- jobs/train.py --config run.yaml`` prints the
topology and execs the launcher (DeepSpeed gets ``--no_ssh`` and a hostfile naming every pod).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_MASTER_PORT = 29500


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
            raise ValueError("pod DNS names need JOB_NAME and HEADLESS_SERVICE in the environment")
        return _pod_dns(self.job_name, index, self.service, self.namespace)


def _pod_dns(job_name: str, index: int, service: str, namespace: str | None, domain: str = "cluster.local") -> str:
    host = f"{job_name}-{index}.{service}"
    return f"{host}.{namespace}.svc.{domain}" if namespace else host


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"environment variable {name} is required")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _visible_gpus() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no torch / no driver: one process per pod
        return 1


def pod_topology(env: Mapping[str, str] | None = None) -> PodTopology:
    """Read the pod's environment (default ``os.environ``); see the module doc for the mapping."""
    env = os.environ if env is None else env
    port = _int(env, "MASTER_PORT", DEFAULT_MASTER_PORT)
    if env.get("JOB_COMPLETION_INDEX", "") != "":
        node_rank = _int(env, "JOB_COMPLETION_INDEX")
        num_nodes = _int(env, "NNODES")
        nproc = _int(env, "GPUS_PER_NODE", 0) or _visible_gpus()
        job_name, service = env.get("JOB_NAME") or None, env.get("HEADLESS_SERVICE") or None
        namespace = env.get("POD_NAMESPACE") or None
        master = env.get("MASTER_ADDR") or ""
        if not master:
            if not job_name or not service:
                raise ValueError(
                    "set MASTER_ADDR, or JOB_NAME and HEADLESS_SERVICE (the Indexed Job's name and the headless "
                    "Service named in the pod's subdomain) so that pod 0's DNS name can be built"
                )
            master = _pod_dns(job_name, 0, service, namespace, env.get("CLUSTER_DOMAIN") or "cluster.local")
        topology = PodTopology(node_rank, num_nodes, nproc, master, port, job_name, service, namespace)
    elif env.get("PET_NODE_RANK", "") != "":  # Kubeflow PyTorchJob
        nproc_raw = env.get("PET_NPROC_PER_NODE", "")
        nproc = int(nproc_raw) if nproc_raw.isdigit() else _visible_gpus()
        topology = PodTopology(
            _int(env, "PET_NODE_RANK"), _int(env, "PET_NNODES"), nproc,
            env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR") or "",
            _int(env, "PET_MASTER_PORT", port),
        )
        if not topology.master_addr:
            raise ValueError("PET_MASTER_ADDR (or MASTER_ADDR) is required in a PyTorchJob pod")
    else:
        raise ValueError(
            "not in a multi-node pod: neither JOB_COMPLETION_INDEX (Indexed Job) nor PET_NODE_RANK (PyTorchJob) is set"
        )
    if topology.num_nodes < 1 or not 0 <= topology.node_rank < topology.num_nodes:
        raise ValueError(f"node rank {topology.node_rank} is outside [0, NNODES={topology.num_nodes})")
    if topology.nproc_per_node < 1:
        raise ValueError(f"GPUS_PER_NODE must be >= 1, got {topology.nproc_per_node}")
    return topology


def hostfile_text(topology: PodTopology) -> str:
    """DeepSpeed hostfile: one ``<pod dns> slots=<gpus>`` line per pod (``--no_ssh`` still needs the pool)."""
    return "".join(f"{topology.pod_hostname(i)} slots={topology.nproc_per_node}\n" for i in range(topology.num_nodes))


def launcher_command(topology: PodTopology, launcher: str, script_and_args: list[str], hostfile: str) -> list[str]:
    """The command that starts ``nproc_per_node`` processes on this pod."""
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
    raise ValueError(f"launcher must be 'torchrun' or 'deepspeed', got {launcher!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Launch one pod's share of a multi-node job.")
    parser.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun")
    parser.add_argument("--hostfile", default="/tmp/deepflow-hostfile", help="where to write DeepSpeed's hostfile")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- script.py [args...]")
    args = parser.parse_args(argv)
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        parser.error("give the training script after --")
    topology = pod_topology()
    print(
        f"[k8s_env] node {topology.node_rank}/{topology.num_nodes} x {topology.nproc_per_node} procs, "
        f"world {topology.world_size}, master {topology.master_addr}:{topology.master_port}",
        flush=True,
    )
    if args.launcher == "deepspeed":
        with open(args.hostfile, "w") as handle:
            handle.write(hostfile_text(topology))
    command = launcher_command(topology, args.launcher, script, args.hostfile)
    print("[k8s_env] " + " ".join(command), flush=True)
    if not args.dry_run:
        os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
