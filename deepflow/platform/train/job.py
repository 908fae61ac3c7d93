"""Train a DeepFlow / SiT model.

    python jobs/train.py --config configs/demo/train-digits.yaml [--set optim.lr=2e-4 ...]
    torchrun --nproc_per_node 8 jobs/train.py --config configs/imagenet256/deepflow-xl2-3t.yaml
    deepspeed jobs/train.py --config configs/imagenet256/deepflow-xl2-3t.yaml --set distributed.engine=deepspeed

The config is validated (with the overrides) before any process group starts; a bad field exits with status 2
and a message naming its path. SIGTERM saves a checkpoint and exits 0; rerunning resumes from the newest one.
"""

from __future__ import annotations

import argparse
import os
import sys

from deepflow.platform.train.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML (local path or fsspec URL)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
        help="dotted override, value parsed as YAML (repeatable): --set optim.lr=2e-4",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"invalid config {args.config}:\n{error}", file=sys.stderr)
        return 2
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    from deepflow.platform.train.trainer import NonFiniteLossError, train

    try:
        result = train(cfg, local_rank_arg=args.local_rank)
    except NonFiniteLossError as error:
        print(f"training stopped: {error}", file=sys.stderr)
        return 3
    except ConfigError as error:
        print(f"invalid config {args.config}:\n{error}", file=sys.stderr)
        return 2
    print(f"training {result.status} at step {result.final_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
