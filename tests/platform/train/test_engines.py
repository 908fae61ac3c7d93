"""The engine registry and interface: names, process-group needs, precisions, asynchronous saving, the slice
layouts of the EMA (cut and joined again for any world size), and the run config accepting exactly the registered
engines (with close matches for a typo)."""
from __future__ import annotations

import pytest
import torch

from deepflow.configuration import ConfigError
from deepflow.models import create_model
from deepflow.platform.train.config import load_config
from deepflow.platform.train.distributed import DistContext
from deepflow.platform.train.engines import ENGINES, Engine, build_engine, engine_class
from deepflow.platform.train.engines.base import DIM0_CHUNKS, FLAT_PARTITIONS, FULL, join_slices, slice_full
from deepflow.platform.train.engines.ddp import DDPEngine

CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


def test_registry_and_interface() -> None:
    assert set(ENGINES) == {"ddp", "fsdp", "deepspeed"}
    assert all(engine_class(name).name == name for name in ENGINES)
    assert {name: cls.requires_process_group for name, cls in ENGINES.items()} == {
        "ddp": False, "fsdp": True, "deepspeed": True}
    assert ENGINES["deepspeed"].async_save is Engine.async_save  # DeepSpeed saves synchronously only
    assert ENGINES["ddp"].async_save is not Engine.async_save and ENGINES["fsdp"].async_save is not Engine.async_save
    assert "fp16" not in ENGINES["fsdp"].precisions and "fp16" in ENGINES["deepspeed"].precisions
    with pytest.raises(ValueError, match="distributed.engine: unknown engine 'megatron'"):
        engine_class("megatron")


def test_single_process_ddp_engine_steps_and_snapshots(tmp_path) -> None:  # noqa: ANN001
    cfg = load_config(None, ["data.global_batch_size=4", "optim.lr=1e-2"])
    torch.manual_seed(0)
    model = create_model("SiT-S/2", depth=1, hidden_size=32, num_heads=2, input_size=4, in_channels=1, num_classes=3)
    engine = build_engine(cfg, model, CTX)
    assert isinstance(engine, DDPEngine) and not engine.sharded_params
    before = {k: v.clone() for k, v in engine.named_local_params().items()}
    with engine.micro_step(boundary=True):
        out = engine.forward_train(torch.randn(4, 1, 4, 4), torch.rand(4, 1), torch.tensor([0, 1, 2, 0]))
        engine.backward((out.velocities[-1] - 1.0).square().mean())  # zero-init heads: v = 0
    grad_norm = engine.step()
    assert grad_norm > 0 and any(not torch.equal(before[k], v) for k, v in engine.named_local_params().items())
    handle = engine.async_save(str(tmp_path / "engine"))
    assert handle is not None
    handle.finish()
    assert any((tmp_path / "engine").iterdir())


@pytest.mark.parametrize("layout", [FULL, DIM0_CHUNKS, FLAT_PARTITIONS])
@pytest.mark.parametrize("shape", [(11, 3), (1, 4), (5,), (2, 3, 2)])
def test_slices_of_any_world_size_join_into_the_full_tensor(layout: str, shape: tuple[int, ...]) -> None:
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape) + 1
    for world in (1, 2, 3, 4):
        pieces = [slice_full(full, layout, rank, world) for rank in range(world)]
        assert torch.equal(join_slices(pieces, layout, full.shape), full)
        if layout == DIM0_CHUNKS:  # torch.chunk sizes, as FSDP2 Shard(0); ranks past the last chunk hold none
            sizes = [len(chunk) for chunk in full.chunk(world)]
            assert [len(p) for p in pieces] == sizes + [0] * (world - len(sizes))
        if layout == FLAT_PARTITIONS:  # equal flat partitions, zero-padded at the end (ZeRO-3 ds_tensor)
            size = -(-full.numel() // world)
            assert all(p.shape == (size,) for p in pieces)
            assert int((torch.cat(pieces) == 0).sum()) == size * world - full.numel()


def test_engine_cuts_and_joins_its_own_slices() -> None:
    cfg = load_config(None, ["data.global_batch_size=4"])
    torch.manual_seed(0)
    model = create_model("SiT-S/2", depth=1, hidden_size=32, num_heads=2, input_size=4, in_channels=1, num_classes=3)
    engine = build_engine(cfg, model, CTX)
    full = {name: torch.randn(p.shape) for name, p in model.named_parameters()}
    assert engine.slice_layout == FULL and engine.full_shapes() == {k: v.shape for k, v in full.items()}
    assert all(engine.local_slice(full)[k] is v for k, v in full.items())
    assert all(engine.assemble_full([full])[k] is v for k, v in full.items())
    with pytest.raises(ValueError, match="this rank holds"):
        engine.local_slice({name: torch.zeros(3) for name in full})


@pytest.mark.parametrize(("overrides", "message"), [
    (["distributed.engine=fdsp"], "distributed.engine: unknown engine 'fdsp' (registered: ddp, deepspeed, fsdp); "
                                  "did you mean 'fsdp'?"),
    (["precision=fp16", "distributed.engine=fsdp"], "precision: fp16 is not supported with distributed.engine=fsdp"),
])
def test_config_accepts_exactly_the_registered_engines(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)
    assert load_config(None, ["distributed.engine=deepspeed", "precision=fp16"]).distributed.engine == "deepspeed"


def _clip_case(fused: bool, max_norm: float, grad_fill: float | None = None) -> tuple[list[torch.Tensor], dict]:
    """Two AdamW steps of a small model on (optionally overwritten) gradients: (parameters, optimizer state)."""
    from deepflow.platform.train.engines.base import clipped_step

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused, foreach=None if fused else True)
    params = list(model.parameters())
    for step in range(2):
        model(torch.randn(32, 8) * 10).square().mean().backward()
        if grad_fill is not None and step == 1:
            params[0].grad.view(-1)[0] = grad_fill
        clipped_step(optimizer, params, max_norm)
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in params], optimizer.state_dict()


@pytest.mark.parametrize("max_norm", [0.05, float("inf")])
def test_clip_folded_into_the_fused_adamw_matches_clip_then_step(max_norm: float) -> None:
    """The fused path (clip factor passed as the kernel's grad_scale) = torch's clip then a foreach AdamW step."""
    fused, fused_state = _clip_case(True, max_norm)
    plain, plain_state = _clip_case(False, max_norm)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert float(fused_state["state"][0]["step"]) == float(plain_state["state"][0]["step"]) == 2.0


@pytest.mark.parametrize("fused", [True, False])
def test_clipped_step_leaves_everything_as_it_was_when_the_norm_is_not_finite(fused: bool) -> None:
    one_step, one_state = _clip_case(fused, 1.0, grad_fill=float("nan"))  # step 2 has a NaN gradient
    assert float(one_state["state"][0]["step"]) == 1.0  # the NaN step did not count
    assert all(torch.isfinite(p).all() for p in one_step)
    assert torch.isfinite(one_state["state"][0]["exp_avg"]).all()
