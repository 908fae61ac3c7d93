"""Train a DeepFlow / SiT model.

    python jobs/train.py --config configs/demo/train-digits.yaml [--set optim.lr=2e-4 ...]
    torchrun --nproc_per_node 8 jobs/train.py --config configs/imagenet256/deepflow-xl2-3t.yaml
    deepspeed jobs/train.py --config configs/imagenet256/deepflow-xl2-3t.yaml --set distributed.engine=deepspeed

The config is validated (with the overrides) and the model checked against the dataset's manifest (channels,
size, classes, captions) before any process group starts; a mistake prints one line ``error: <field or URL>:
<what is wrong>`` and exits with status 2 (``DEEPFLOW_DEBUG=1`` shows the traceback instead). Resuming with a
changed model shape, engine, ZeRO stage, global batch size, gradient accumulation or precision is refused the same
way; other changes are applied with one warning line. A run stopped by non-finite losses exits with status 3.
SIGTERM saves a checkpoint and exits 0 (under the pod supervisor the pod then exits 75, see below); rerunning
resumes from the newest one.

Under the Kubernetes supervisor (``deepflow.platform.train.k8s_env``, which sets ``$DEEPFLOW_STATUS_DIR``) every
rank also reports how it ended (running / completed / preempted at step N / failed with status S), from which the
supervisor decides the pod's exit status.

Elastic runs: ``torchrun --nnodes MIN:MAX --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST:PORT
--rdzv-id JOB --max-restarts R jobs/train.py --config ...`` with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in every
agent's environment (refused otherwise, one ``error:`` line). Before anything starts, every world size n * G for n
in [MIN, MAX] must divide ``data.global_batch_size`` and ``data.streams`` (an automatic stream count is chosen so
that they all do). Every (re)start resumes from the newest committed checkpoint at the current world size. When
the agent restarts its workers for a membership change (a node joins) it SIGTERMs them: they commit a checkpoint
first, so no step is redone. Under the elastic agent (TORCHELASTIC_RUN_ID set, and MIN < MAX or R > 0) a run
stopped by SIGTERM exits 75 (EX_TEMPFAIL, the pod supervisor's preempted status) instead of 0: a worker that
exits 0 tells the other agents that the job is finished, 75 makes them continue without this node. A completed
run exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from deepflow.errors import USER_ERRORS, JobArgumentParser, UserError, describe, report_user_errors
from deepflow.platform.train.config import ConfigError, RunConfig, load_config, resolve_model_for_dataset
from deepflow.platform.train.pod_supervisor import PREEMPTED_EXIT_CODE
from deepflow.platform.train.preemption import PreemptionHandler
from deepflow.platform.train.rank_status import RankStatusFile

if TYPE_CHECKING:
    from deepflow.platform.train.distributed import ElasticRange

__all__ = ["build_parser", "check_dataset", "main", "parse_args", "stopped_exit_status"]


def build_parser() -> argparse.ArgumentParser:
    """The job's flags (usage errors raise :class:`~deepflow.errors.UsageError`)."""
    parser = JobArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML (local path or fsspec URL)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
        help="dotted override, value parsed as YAML (repeatable): --set optim.lr=2e-4",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_dataset(cfg: RunConfig, elastic: ElasticRange | None = None) -> RunConfig:
    """``cfg`` resolved against the manifest of ``data.url`` (see ``resolve_model_for_dataset``), read before any
    process group exists; a missing dataset or manifest is a :class:`UserError` naming ``data.url``. A restartable
    ``elastic`` range adds its world sizes to the checks."""
    from deepflow.artifacts import read_manifest

    if not cfg.data.url:
        raise ConfigError("data.url: required: the URL of a precomputed dataset (a folder with manifest.json)")
    try:
        manifest = read_manifest(cfg.data.url, cfg.data.resolved_storage_options())
    except USER_ERRORS as error:
        raise UserError(f"data.url: {describe(error)}") from error
    world_sizes = elastic.world_sizes if elastic is not None and elastic.restartable else []
    return resolve_model_for_dataset(cfg, manifest, world_sizes)


def stopped_exit_status(elastic: ElasticRange | None) -> int:
    """The exit status of a run stopped by SIGTERM with its committed checkpoint: 75 under a restartable elastic
    agent (so that the other agents continue without this node), 0 otherwise."""
    return PREEMPTED_EXIT_CODE if elastic is not None and elastic.restartable else 0


def _train(argv: list[str] | None, preempt: PreemptionHandler, report: RankStatusFile | None = None) -> int:
    args = parse_args(argv)
    from deepflow.platform.train.distributed import check_elastic_launch

    elastic = check_elastic_launch()
    cfg = check_dataset(load_config(args.config, args.overrides), elastic)
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    from deepflow.platform.train.trainer import NonFiniteLossError, train

    try:
        result = train(cfg, local_rank_arg=args.local_rank, preempt=preempt)
    except NonFiniteLossError as error:
        print(f"training stopped: {error}", file=sys.stderr)
        return 3
    if report is not None:
        report.write(result.status, step=result.final_step)
    print(f"training {result.status} at step {result.final_step}", flush=True)
    return stopped_exit_status(elastic) if result.status == "preempted" else 0


def _exit_status_of(error: BaseException) -> int:
    """The status the process will end with for an exception leaving ``main`` (cli.run_job's conventions)."""
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
    if isinstance(error, ImportError):
        return 2  # a missing optional package
    if isinstance(error, KeyboardInterrupt):
        return 130
    return 1


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done (or preempted and checkpointed), 2 a user mistake (one ``error:`` line), 3 stopped by
    non-finite losses, 75 preempted and checkpointed under a restartable elastic torchrun agent."""
    preempt = PreemptionHandler()  # first: a SIGTERM during the slow start-up is kept, not fatal
    report = RankStatusFile.from_environ()
    if report is not None:
        report.write("running")
    try:
        code = report_user_errors(lambda: _train(argv, preempt, report))
    except BaseException as error:
        if report is not None:
            status = _exit_status_of(error)
            report.write("failed" if status else "completed", exit_code=status)  # sys.exit(0): --help
        raise
    finally:
        preempt.restore()
    if code not in (0, PREEMPTED_EXIT_CODE) and report is not None:  # 75: preempted, reported by _train
        report.write("failed", exit_code=code)
    if code == 2 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _leave_now(code)
    return code


def _leave_now(code: int) -> None:
    """End a rank of a multi-rank run that stopped on a user error (its ``error:`` line printed, its process group
    destroyed, its loader closed) without the interpreter's teardown: tearing down the engine's native objects (the
    DDP reducer and gloo's threads of a destroyed group) while the peer ranks exit at the same moment sometimes
    ends in ``terminate called without an active exception`` (SIGABRT), and the launcher then reports a crash
    instead of status 2 (seen under load in 2 of 4 runs of the two-rank ``on_error: raise`` test)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
