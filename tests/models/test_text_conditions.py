"""Text conditions through the condition helpers, the objective (text dropout) and the samplers (text CFG)."""

from __future__ import annotations

import pytest
import torch

from deepflow.models import BranchOutputs
from deepflow.models.conditions import (
    concat_conditions,
    condition_from_batch,
    drop_conditions,
    null_condition_batch,
    slice_condition,
    where_condition,
)
from deepflow.models.flow import FlowObjective, branch_times, drop_labels
from deepflow.models.sampling import sample

from .helpers import randomize_, text_inputs, tiny_mmdit

L, D, P = 5, 6, 4


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def text_cond(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    return {
        "text_emb": torch.randn(batch, L, D, generator=g),
        "text_mask": torch.rand(batch, L, generator=g) < 0.7,
        "text_pooled": torch.randn(batch, P, generator=g),
    }


def null_text() -> dict[str, torch.Tensor]:
    """An 'empty caption' as ShardLoader.null_text() returns it: unbatched, two real tokens."""
    return {
        "text_emb": torch.full((L, D), -3.0),
        "text_mask": torch.arange(L) < 2,
        "text_pooled": torch.full((P,), 7.0),
    }


def _rows_equal(cond: dict, other: dict, rows: torch.Tensor) -> bool:
    return all(torch.equal(cond[k][rows], other[k][rows]) for k in cond)


def test_null_condition_batch_accepts_unbatched_and_batched_nulls():
    like = text_cond(3)
    like["text_emb"] = like["text_emb"].double()
    for null in (null_text(), {k: v.unsqueeze(0) for k, v in null_text().items()}):
        out = null_condition_batch(null, 3, like)
        assert out["text_emb"].shape == (3, L, D) and out["text_emb"].dtype == torch.float64
        assert out["text_mask"].dtype == torch.bool
        assert out["text_mask"][:, :2].all() and not out["text_mask"][:, 2:].any()
        assert (out["text_pooled"] == 7.0).all()
    assert torch.equal(null_condition_batch(9, 2, torch.tensor([1, 2])), torch.tensor([9, 9]))
    bad = dict(null_text(), text_emb=torch.zeros(L + 1, D))
    with pytest.raises(ValueError, match="text_emb.*to match"):
        null_condition_batch(bad, 3, like)
    with pytest.raises(TypeError, match="text null condition"):
        null_condition_batch(10, 3, like)
    with pytest.raises(TypeError, match="int null label"):
        null_condition_batch(null_text(), 3, torch.tensor([1, 2, 3]))


def test_concat_slice_where():
    a, b = text_cond(2, 0), text_cond(3, 1)
    both = concat_conditions(a, b)
    assert both["text_emb"].shape == (5, L, D)
    assert _rows_equal(slice_condition(both, slice(2, None)), b, slice(None))
    mask = torch.tensor([True, False, True])
    mixed = where_condition(mask, null_condition_batch(null_text(), 3, b), b)
    assert _rows_equal(mixed, b, ~mask) and (mixed["text_pooled"][mask] == 7.0).all()


def test_condition_from_batch():
    text = text_cond(2)
    batch = {"x": torch.zeros(2, 1, 2, 2), "y": torch.tensor([0, 0]), **text}
    cond = condition_from_batch(batch, "cpu")
    assert set(cond) == set(text) and _rows_equal(cond, text, slice(None))
    assert torch.equal(condition_from_batch({"x": batch["x"], "y": batch["y"]}), batch["y"])
    with pytest.raises(KeyError, match="neither"):
        condition_from_batch({"x": batch["x"]})


def test_drop_conditions_for_labels_is_drop_labels_with_the_same_draws():
    y = torch.arange(500) % 10
    g1, g2 = _gen(4), _gen(4)
    dropped, mask = drop_conditions(y, 0.3, 10, g1)
    assert torch.equal(dropped, drop_labels(y, 0.3, 10, g2))
    assert torch.equal(mask, dropped == 10)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))  # same generator consumption
    assert drop_conditions(y, 0.0, 10, g1) == (y, None)


class Recorder:
    def __init__(self, shape, k=1):
        self.shape, self.k, self.calls = shape, k, []

    def __call__(self, x, times, cond):
        self.calls.append((x, times, cond))
        zeros = torch.zeros(self.shape)
        return BranchOutputs([zeros] * self.k, [zeros] * (self.k - 1))


def test_objective_text_dropout_uses_the_null_condition_exactly_on_dropped_rows():
    b, shape = 64, (64, 2, 4, 4)
    x0 = torch.randn(shape, generator=_gen(1))
    cond = text_cond(b)
    fn_text, fn_label = Recorder(shape, k=2), Recorder(shape, k=2)
    obj = FlowObjective(time_sampling="uniform", label_dropout=0.3)
    obj.loss(fn_text, x0, cond, _gen(9), num_branches=2, null_condition=null_text())
    obj.loss(fn_label, x0, torch.zeros(b, dtype=torch.long), _gen(9), num_branches=2, num_classes=10)
    x_text, times_text, seen = fn_text.calls[0]
    x_label, times_label, y_seen = fn_label.calls[0]
    # the same draws in the same order as for class labels: t1, gaps, eps, then the drop mask
    assert torch.equal(x_text, x_label) and torch.equal(times_text, times_label)
    g = _gen(9)
    t1 = torch.rand(b, generator=g)
    branch_times(t1, 2, obj.alpha, g)
    torch.randn(shape, generator=g)
    drop = torch.rand(b, generator=g) < 0.3
    assert torch.equal(y_seen == 10, drop) and 5 < int(drop.sum()) < 30
    null = null_condition_batch(null_text(), b, cond)
    assert _rows_equal(seen, null, drop) and _rows_equal(seen, cond, ~drop)
    with pytest.raises(ValueError, match="need null_condition"):
        obj.loss(fn_text, x0, cond, _gen(9), num_branches=2)
    FlowObjective(label_dropout=0.0).loss(fn_text, x0, cond, _gen(9), num_branches=2)  # no null needed
    assert fn_text.calls[-1][2] is cond


def test_objective_with_a_real_mmdit_trains_and_is_deterministic():
    model = randomize_(tiny_mmdit("DeepFlow-MMDiT-2-2T"), std=0.05)
    x, _, cond = text_inputs(model, batch=4)
    null = {k: v[0] for k, v in text_inputs(model, batch=1, seed=5)[2].items()}
    obj = FlowObjective(label_dropout=0.5)
    a = obj.loss(model.forward_train, x, cond, _gen(3), num_branches=2, null_condition=null)
    b = obj.loss(model.forward_train, x, cond, _gen(3), num_branches=2, null_condition=null)
    assert set(a) == {"deep_0", "deep_1", "acc", "total"} and torch.equal(a["total"], b["total"])
    a["total"].backward()
    assert model.pooled_embedder.mlp[0].weight.grad.abs().sum() > 0
    assert model.context_embedder.weight.grad.abs().sum() > 0


MUS = torch.tensor([-2.0, 2.0])


class TextCountingFn:
    """Gaussian velocity whose mean is the pooled text's first entry; records batch sizes and conditions."""

    def __init__(self):
        self.calls: list[tuple[int, float, dict]] = []

    def __call__(self, x, t, cond):
        self.calls.append((x.shape[0], float(t[0]), cond))
        mu = cond["text_pooled"][:, :1].view(-1, 1, 1, 1)
        tt = t.view(-1, 1, 1, 1)
        var = (1 - tt) ** 2 * 0.25 + tt**2
        return (tt - (1 - tt) * 0.25) * (x - (1 - tt) * mu) / var - mu


def _pooled_cond(values: list[float]) -> dict[str, torch.Tensor]:
    cond = text_cond(len(values))
    cond["text_pooled"][:, 0] = torch.tensor(values)
    return cond


@pytest.mark.parametrize("method", ["sde", "euler", "heun"])
def test_text_cfg_scale_one_equals_conditional_sample(method):
    noise = torch.randn(4, 1, 2, 2)
    cond = _pooled_cond([-2.0, 2.0, -2.0, 2.0])
    fn_cfg, fn_plain = TextCountingFn(), TextCountingFn()
    a = sample(fn_cfg, noise, cond, method=method, steps=6, cfg_scale=1.0, null_condition=null_text(),
               generator=_gen(0))
    b = sample(fn_plain, noise, cond, method=method, steps=6, generator=_gen(0))
    assert torch.equal(a, b)
    assert all(n == 4 for n, _, _ in fn_cfg.calls)


def test_text_cfg_one_batched_forward_per_step_with_the_null_half():
    noise = torch.randn(3, 1, 2, 2)
    cond = _pooled_cond([-2.0, 2.0, 1.0])
    fn = TextCountingFn()
    sample(fn, noise, cond, method="euler", steps=6, cfg_scale=4.0, guidance_interval=(0.0, 0.5),
           null_condition=null_text())
    assert len(fn.calls) == 6
    for n, t, seen in fn.calls:
        assert n == (6 if t <= 0.5 else 3)
        if n == 6:
            assert _rows_equal(seen, cond, slice(0, 3))
            uncond = slice_condition(seen, slice(3, 6))
            assert _rows_equal(uncond, null_condition_batch(null_text(), 3, cond), slice(None))

    # guided velocity = v_u + s (v_c - v_u): one Euler step checked by hand
    fn2 = TextCountingFn()
    x1 = sample(fn2, noise, cond, method="euler", steps=1, cfg_scale=3.0, null_condition=null_text())
    t1 = torch.ones(3)
    v_c = fn2(noise, t1, cond)
    v_u = fn2(noise, t1, null_condition_batch(null_text(), 3, cond))
    torch.testing.assert_close(x1, noise - (v_u + 3.0 * (v_c - v_u)))
    with pytest.raises(ValueError, match="needs null_condition"):
        sample(fn2, noise, cond, method="euler", steps=1, cfg_scale=3.0)


def test_class_labels_accept_null_condition_as_an_int():
    def fn(x, t, y):
        return x * 0 + y.view(-1, 1, 1, 1).float()

    noise, y = torch.zeros(2, 1, 2, 2), torch.tensor([1, 3])
    a = sample(fn, noise, y, method="euler", steps=1, cfg_scale=2.0, null_label=5)
    b = sample(fn, noise, y, method="euler", steps=1, cfg_scale=2.0, null_condition=5)
    assert torch.equal(a, b) and torch.equal(a[:, 0, 0, 0], -(5 + 2.0 * (y - 5)).float())


def test_sample_a_real_mmdit_with_text_cfg():
    model = randomize_(tiny_mmdit("DeepFlow-MMDiT-2-2T"), std=0.05).eval()
    _, _, cond = text_inputs(model, batch=2)
    null = {k: v[0] for k, v in text_inputs(model, batch=1, seed=7)[2].items()}
    noise = torch.randn(2, 4, 8, 8, generator=_gen(2))
    x = sample(model, noise, cond, method="heun", steps=2, cfg_scale=2.0, null_condition=null)
    assert x.shape == noise.shape and torch.isfinite(x).all()
    plain = sample(model, noise, cond, method="heun", steps=2)
    assert not torch.allclose(x, plain)
