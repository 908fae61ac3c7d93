#!/usr/bin/env python
"""Side by side with the reference implementation's own code, same weights, one process, alternating runs.

    python bench/bench_reference.py --reference-repo /path/to/DeepFlow [--repeats 7] [--threads 2]

``--reference-repo`` is a checkout of github.com/ByteDance-Seed/DeepFlow (CC-BY-NC; it is imported, never
copied; it needs ``timm``). Both networks are DeepFlow-B/2-2T widths (hidden 768, 12 heads, ACC-MLP
2048-4096-2048) at depth 4 (key layers 2, 4) on 16x16x4 latents, fp32, with identical weights (ours are imported
from the reference's state dict by :func:`deepflow.models.convert.load_reference_state_dict`, and the two
forwards are checked to agree before timing).

- train: one optimizer step, batch 16: the reference's ``DFLoss`` + backward + grad clip + AdamW, against the
  platform's step (``FlowObjective`` + the ddp engine's backward and step: clip, AdamW) eager and with
  ``distributed.compile`` (compile build time reported separately, amortised over the stated number of steps);
- sample: the reference's generate path (its ``generate.py`` batch doubling around its SDE sampler
  ``deepflow_euler_maruyama_sampler``; cfg 1.5, 20 steps, batch 4) against
  :func:`deepflow.platform.inference.generate.sample_latents` (the path of ``deepflow sample`` and periodic eval)
  eager and with ``SamplerConfig.compile``.

Each ratio is the median over ``--repeats`` rounds of (our time / the reference's time) for training (goal <= 0.8)
and (reference / ours) for sampling (goal >= 3).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepflow.models.convert import load_reference_state_dict  # noqa: E402
from deepflow.models.flow import FlowObjective  # noqa: E402

DEPTH, KEY_LAYERS, LATENT, CHANNELS, CLASSES = 4, [2], 16, 4, 1000
TRAIN_BATCH, SAMPLE_BATCH, SAMPLE_STEPS, CFG = 16, 4, 20, 1.5


def import_reference(repo: Path) -> dict[str, Any]:
    """The reference's model class, loss and sampler, imported from its checkout."""
    if not (repo / "models" / "deepflow.py").is_file():
        raise SystemExit(f"error: --reference-repo: {repo} is not a checkout of ByteDance-Seed/DeepFlow "
                         "(models/deepflow.py missing)")
    sys.path.insert(0, str(repo))
    from loss import DFLoss  # type: ignore[import-not-found]
    from models.deepflow import DeepFlow  # type: ignore[import-not-found]
    from samplers import deepflow_euler_maruyama_sampler  # type: ignore[import-not-found]

    return {"DeepFlow": DeepFlow, "DFLoss": DFLoss, "sampler": deepflow_euler_maruyama_sampler}


def build_pair(ref: dict[str, Any]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(reference network, ours with the same weights); random non-zero weights so every head matters."""
    torch.manual_seed(0)
    reference = ref["DeepFlow"](
        path_type="linear", input_size=LATENT, patch_size=2, in_channels=CHANNELS, hidden_size=768,
        decoder_hidden_size=768, depth=DEPTH, num_heads=12, num_classes=CLASSES, df_idxs=KEY_LAYERS,
        legacy_scaling=True, fused_attn=True, qk_norm=False,
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in reference.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    state = {key: value.detach().clone() for key, value in reference.state_dict().items()}
    ours = load_reference_state_dict({"ema": state, "args": {"depth": DEPTH, "df_idxs": KEY_LAYERS,
                                                            "legacy_scaling": True}}, "DeepFlow-B/2-2T")
    return reference, ours


@torch.no_grad()
def check_same_network(reference: torch.nn.Module, ours: torch.nn.Module) -> float:
    """Max |difference| of the last velocity for the same input (eval mode: no label dropout)."""
    reference.eval(), ours.eval()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(4, CHANNELS, LATENT, LATENT, generator=generator)
    t = torch.rand(4, generator=generator)
    y = torch.randint(0, CLASSES, (4,), generator=generator)
    ref_out = reference(x, [t, t], y)[0][-1]
    our_out = ours(x, torch.stack([t, t], dim=1), y)
    return float((ref_out - our_out).abs().max())


def alternate(first: Callable[[], Any], second: Callable[[], Any], repeats: int) -> tuple[float, float, float]:
    """Medians of each one's time and of the per-round ratio second / first (warm-up round excluded)."""
    first(), second()
    t_first, t_second, ratios = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        first()
        middle = time.perf_counter()
        second()
        end = time.perf_counter()
        t_first.append(middle - start)
        t_second.append(end - middle)
        ratios.append((end - middle) / (middle - start))
    return statistics.median(t_first), statistics.median(t_second), statistics.median(ratios)


def reference_train_step(ref: dict[str, Any], model: torch.nn.Module) -> Callable[[], None]:
    loss_fn = ref["DFLoss"](prediction="v", path_type="linear", weighting="lognormal", num_scales=2,
                            scale_weight=[0.2, 1.0], tg_upper_bound=0.01)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    x = torch.randn(TRAIN_BATCH, CHANNELS, LATENT, LATENT)
    y = torch.randint(0, CLASSES, (TRAIN_BATCH,))
    model.train()

    def step() -> None:
        loss, acc_loss, _ = loss_fn(model, x, {"y": y}, zs=[])
        total = loss.mean() + acc_loss.mean()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def our_train_step(model: torch.nn.Module, compile_model: bool) -> Callable[[], None]:
    from deepflow.platform.train.distributed import DistContext
    from deepflow.platform.train.engines import ENGINES
    from deepflow.platform.train.engines.base import OptimizerSettings

    settings = OptimizerSettings(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, grad_clip=1.0,
                                 grad_accumulation=1, precision="fp32", compile=compile_model,
                                 per_rank_batch_size=TRAIN_BATCH)
    engine = ENGINES["ddp"](model, settings, DistContext(0, 1, 0, torch.device("cpu"), None))
    engine.train(True)
    objective = FlowObjective(time_sampling="lognormal", alpha=0.01)
    x = torch.randn(TRAIN_BATCH, CHANNELS, LATENT, LATENT)
    y = torch.randint(0, CLASSES, (TRAIN_BATCH,))
    counter = iter(range(10**9))

    def step() -> None:
        generator = torch.Generator().manual_seed(next(counter))
        with engine.micro_step(boundary=True):
            terms = objective.loss(engine.forward_train, x, y, generator, num_branches=2, num_classes=CLASSES)
            engine.backward(terms["total"])
        engine.step()

    return step


def timed_build(step: Callable[[], None]) -> float:
    """Seconds of the first call (compilation happens there)."""
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def bench_train(ref: dict[str, Any], repeats: int) -> dict[str, float]:
    results: dict[str, float] = {}
    for label, compile_model in (("eager", False), ("compiled", True)):
        reference, ours = build_pair(ref)
        step = our_train_step(ours, compile_model)
        build_s = timed_build(step)
        t_ref, t_ours, ratio = alternate(reference_train_step(ref, reference), step, repeats)
        results[f"train_{label}_ratio"] = ratio
        amortise = ""
        if compile_model:
            steps = 1000
            amortised = (t_ours * steps + build_s) / (t_ref * steps)
            amortise = f"; build {build_s:.1f} s, over {steps} steps {amortised:.2f}x"
            results["train_compile_build_s"] = build_s
        print(f"train step  ours {label:<8} {t_ours * 1e3:7.1f} ms  reference {t_ref * 1e3:7.1f} ms  "
              f"ours/reference {ratio:.2f}x{amortise}", flush=True)
    return results


def bench_sample(ref: dict[str, Any], repeats: int) -> dict[str, float]:
    from deepflow.platform.inference.generate import SamplerConfig, sample_latents

    results: dict[str, float] = {}
    reference, ours = build_pair(ref)
    reference.eval(), ours.eval()
    noise = torch.randn(SAMPLE_BATCH, CHANNELS, LATENT, LATENT)
    y = torch.randint(0, CLASSES, (SAMPLE_BATCH,))

    def reference_sample() -> torch.Tensor:
        """What the reference's generate.py does with cfg > 1: it doubles the batch ([z; z], [y; null]) before its
        sampler doubles it again, then keeps the first half of the result."""
        z2, y2 = torch.cat([noise, noise]), torch.cat([y, torch.full_like(y, CLASSES)])
        out = ref["sampler"](reference, z2, y2, num_steps=SAMPLE_STEPS, cfg_scale=CFG, path_type="linear")
        return out.chunk(2)[0]

    for label, compile_model in (("eager", False), ("compiled", True)):
        sampler = SamplerConfig(method="sde", steps=SAMPLE_STEPS, cfg_scale=CFG, compile=compile_model)

        def our_sample() -> torch.Tensor:
            return sample_latents(ours, noise, y, sampler, generator=torch.Generator().manual_seed(0))

        build_s = timed_build(our_sample)
        t_ours, t_ref, ratio = alternate(our_sample, reference_sample, repeats)
        results[f"sample_{label}_speedup"] = ratio
        print(f"sampling    ours {label:<8} {SAMPLE_BATCH / t_ours:7.2f} img/s  reference "
              f"{SAMPLE_BATCH / t_ref:7.2f} img/s  reference/ours {ratio:.2f}x (first call {build_s:.1f} s)",
              flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-repo", type=Path, required=True, help="checkout of ByteDance-Seed/DeepFlow")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("train", "sample"), default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = import_reference(args.reference_repo.resolve())
    reference, ours = build_pair(ref)
    print(f"torch {torch.__version__}, CPU fp32, {args.threads} threads, median of {args.repeats} alternating "
          f"rounds; same network: max |v_ref - v_ours| = {check_same_network(reference, ours):.1e}", flush=True)
    results: dict[str, float] = {}
    if args.only in (None, "train"):
        results.update(bench_train(ref, args.repeats))
    if args.only in (None, "sample"):
        results.update(bench_sample(ref, args.repeats))
    for key, value in results.items():
        print(f"{key}: {value:.3f}")


if __name__ == "__main__":
    main()
