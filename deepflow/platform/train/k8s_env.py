"""``python -m deepflow.platform.train.k8s_env --launcher deepspeed|torchrun|python -- jobs/train.py --config
run.yaml``: the entrypoint of a training pod (under tini, PID 1). It reads the pod's place in the job from its
environment (:mod:`deepflow.platform.train.pod_topology`), writes DeepSpeed's hostfile, and runs the pod's ranks
under :class:`deepflow.platform.train.pod_supervisor.Supervisor`, which forwards a preemption to the ranks, stops
them when one fails and decides the pod's exit status (0 done, 75 preempted with a committed checkpoint, the failed
rank's status otherwise).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from deepflow.errors import JobArgumentParser, report_user_errors
from deepflow.platform.train.pod_supervisor import PREEMPTED_EXIT_CODE, Supervisor, log
from deepflow.platform.train.pod_topology import LAUNCHERS, K8sEnvError, hostfile_text, launcher_command, pod_topology
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


def _supervise(argv: Sequence[str] | None) -> int:
    args, script = _parse(argv)
    topology = pod_topology()
    log(f"node {topology.node_rank}/{topology.num_nodes} x {topology.nproc_per_node} procs, "
         f"world {topology.world_size}, master {topology.master_addr}:{topology.master_port}, "
         f"launcher {args.launcher}")
    if args.launcher == "deepspeed":
        Path(args.hostfile).write_text(hostfile_text(topology))
    command = launcher_command(topology, args.launcher, script, args.hostfile)
    log(" ".join(command))
    if args.dry_run:
        return 0
    status_dir = args.status_dir or tempfile.mkdtemp(prefix="deepflow-status-")
    Path(status_dir).mkdir(parents=True, exist_ok=True)
    for stale in Path(status_dir).glob("local-rank-*.json"):
        stale.unlink()
    try:
        supervisor = Supervisor(args.launcher, command, topology, status_dir, args.preempted_exit_code,
                                args.launcher_grace_s)
        return supervisor.run()
    finally:
        if args.status_dir is None:
            shutil.rmtree(status_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: the pod's (see the module doc); 2 for a bad flag or pod environment (one ``error:`` line)."""
    return report_user_errors(lambda: _supervise(argv))


if __name__ == "__main__":
    sys.exit(main())
