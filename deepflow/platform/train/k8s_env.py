"""``python -m deepflow.platform.train.k8s_env --launcher deepspeed|torchrun|python -- jobs/train.py --config
run.yaml``: the entrypoint of a training pod (under tini, PID 1). It reads the pod's place in the job from its
environment (:mod:`deepflow.platform.train.pod_topology`), writes DeepSpeed's hostfile, and runs the pod's ranks
under :class:`deepflow.platform.train.pod_supervisor.Supervisor`, which forwards a preemption to the ranks, stops
them when one fails and decides the pod's exit status (0 done, 75 preempted with a committed checkpoint, the failed
rank's status otherwise).

Elastic (``--launcher torchrun`` with ``--nnodes MIN:MAX``, NNODES=MIN:MAX, or a PyTorchJob's elasticPolicy): the
pod runs torchrun's elastic agent with the c10d rendezvous, bounded rendezvous waits (``--join-timeout-s`` etc.),
``--local-addr`` ($POD_IP by default) and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; a lost node shrinks the job, a
returning one grows it (see :mod:`deepflow.platform.train.pod_supervisor`). Fewer than MIN nodes within the join
timeout: one ``error: elastic: ...`` line and exit 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from deepflow.errors import JobArgumentParser, report_user_errors
from deepflow.platform.train.pod_supervisor import PREEMPTED_EXIT_CODE, Supervisor, log
from deepflow.platform.train.pod_topology import (
    LAUNCHERS,
    ElasticLaunch,
    K8sEnvError,
    PodTopology,
    elastic_command,
    elastic_launch,
    hostfile_text,
    launcher_command,
    pod_topology,
)
from deepflow.platform.train.rank_status import STATUS_DIR_ENV

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = JobArgumentParser(
        prog="python -m deepflow.platform.train.k8s_env",
        description="Launch and supervise one pod's share of a multi-node job (see the module doc).",
    )
    parser.add_argument("--launcher", choices=LAUNCHERS, default="torchrun")
    parser.add_argument("--hostfile", default="/tmp/deepflow-hostfile", help="where to write DeepSpeed's hostfile")
    parser.add_argument("--preempted-exit-code", type=int, default=PREEMPTED_EXIT_CODE,
                        help="the pod's exit status when every rank stopped for a preemption with a committed "
                        "checkpoint (default %(default)s, EX_TEMPFAIL; the podFailurePolicy must ignore it)")
    parser.add_argument("--status-dir", default=None,
                        help=f"the ranks' report folder (${STATUS_DIR_ENV}); default: a fresh one under $TMPDIR")
    parser.add_argument("--launcher-grace-s", type=float, default=30.0,
                        help="how long the launcher may linger after every rank ended before it is killed")
    parser.add_argument("--nnodes", default=None, metavar="MIN:MAX",
                        help="elastic range (torchrun only; default: NNODES or PET_NNODES when it holds MIN:MAX)")
    parser.add_argument("--join-timeout-s", type=int, default=600,
                        help="elastic: how long a rendezvous round waits for MIN nodes before the job fails")
    parser.add_argument("--last-call-timeout-s", type=int, default=30,
                        help="elastic: how long a round waits for more nodes once MIN joined")
    parser.add_argument("--close-timeout-s", type=int, default=60,
                        help="elastic: how long a closed round waits for the others to notice")
    parser.add_argument("--local-addr", default=None,
                        help="elastic: the address the other nodes reach this one at (default: $POD_IP)")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- script.py [args...]")
    return parser


def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    args = build_parser().parse_args(argv)
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not script:
        raise K8sEnvError("script: give the training script after -- (e.g. -- jobs/train.py --config run.yaml)")
    if not 1 <= args.preempted_exit_code <= 255 or args.preempted_exit_code in (2, 3):
        raise K8sEnvError(f"--preempted-exit-code: must be in 1..255 and not 2 or 3, got {args.preempted_exit_code}")
    return args, script


def _elastic(args: argparse.Namespace, topology: PodTopology) -> ElasticLaunch | None:
    """The elastic agent's settings, or None for a fixed-size pod; elastic needs ``--launcher torchrun``."""
    timeouts = {"join_timeout_s": args.join_timeout_s, "last_call_timeout_s": args.last_call_timeout_s,
                "close_timeout_s": args.close_timeout_s}
    if min(timeouts.values()) < 1:
        raise K8sEnvError("--join-timeout-s: the rendezvous timeouts must be >= 1 s")
    elastic = elastic_launch(topology, nnodes=args.nnodes, **timeouts)
    if elastic is None:
        return None
    if args.launcher != "torchrun":
        raise K8sEnvError(f"--launcher: elastic training (--nnodes {elastic.min_nodes}:{elastic.max_nodes}) needs "
                          f"torchrun, got {args.launcher}")
    if args.local_addr:
        elastic = dataclasses.replace(elastic, local_addr=args.local_addr)
    return elastic


def _supervise(argv: Sequence[str] | None) -> int:
    args, script = _parse(argv)
    topology = pod_topology(nnodes=args.nnodes)
    elastic = _elastic(args, topology)
    if elastic is None:
        log(f"node {topology.node_rank}/{topology.num_nodes} x {topology.nproc_per_node} procs, "
            f"world {topology.world_size}, master {topology.master_addr}:{topology.master_port}, "
            f"launcher {args.launcher}")
    else:
        log(f"elastic: {elastic.min_nodes}..{elastic.max_nodes} nodes x {topology.nproc_per_node} procs, "
            f"rendezvous {elastic.endpoint} (id {elastic.rdzv_id}), launcher torchrun")
    if args.launcher == "deepspeed":
        Path(args.hostfile).write_text(hostfile_text(topology))
    if elastic is None:
        command = launcher_command(topology, args.launcher, script, args.hostfile)
    else:
        command = elastic_command(topology, elastic, script)
    log(" ".join(command))
    if args.dry_run:
        return 0
    status_dir = args.status_dir or tempfile.mkdtemp(prefix="deepflow-status-")
    Path(status_dir).mkdir(parents=True, exist_ok=True)
    for stale in Path(status_dir).glob("local-rank-*.json"):
        stale.unlink()
    try:
        supervisor = Supervisor(args.launcher, command, topology, status_dir, args.preempted_exit_code,
                                args.launcher_grace_s, elastic=elastic)
        return supervisor.run()
    finally:
        if args.status_dir is None:
            shutil.rmtree(status_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: the pod's (see the module doc); 2 for a bad flag or pod environment (one ``error:`` line)."""
    return report_user_errors(lambda: _supervise(argv))


if __name__ == "__main__":
    sys.exit(main())
