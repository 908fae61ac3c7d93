"""The DeepFlow objective: time sampling, gaps, label drop, loss terms and gradient paths."""

from __future__ import annotations

import pytest
import torch

from deepflow.models import BranchOutputs
from deepflow.models.flow import FlowObjective, branch_times, drop_labels, sample_times

from .helpers import randomize_, tiny_model


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Recorder:
    """A model_fn returning fixed outputs and recording its inputs."""

    def __init__(self, velocities, accelerations=(), projections=()):
        self.out = BranchOutputs(list(velocities), list(accelerations), list(projections))
        self.calls = []

    def __call__(self, x, times, y):
        self.calls.append((x, times, y))
        return self.out


def test_time_samplers():
    t_u = sample_times(20000, "uniform", _gen())
    t_l = sample_times(20000, "lognormal", _gen())
    assert 0 <= t_u.min() and t_u.max() <= 1 and abs(t_u.mean() - 0.5) < 0.01
    # logit-normal: logit(t) ~ N(0, 1)
    logit = torch.log(t_l / (1 - t_l))
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03
    with pytest.raises(ValueError, match="time_sampling"):
        sample_times(4, "cosine", _gen())


def test_branch_times_signed_accumulating_gaps():
    signs = set()
    for seed in range(8):
        t1 = torch.rand(256, generator=_gen(100 + seed))
        times = branch_times(t1, 4, 0.05, _gen(seed))
        assert times.shape == (256, 4) and torch.equal(times[:, 0], t1)
        gaps = times[:, 1:] - times[:, :-1]
        assert gaps.abs().max() <= 0.05 + 1e-7
        assert (times >= 0).all() and (times <= 1).all()
        inner = gaps[(times[:, 1:] > 0) & (times[:, 1:] < 1)]  # away from the clamp
        sign = torch.sign(inner[inner != 0])
        assert (sign == sign[0]).all()  # one sign for the whole batch
        signs.add(int(sign[0]))
    assert signs == {-1, 1}


def test_drop_labels():
    y = torch.arange(1000) % 10
    assert torch.equal(drop_labels(y, 0.0, 10, _gen()), y)
    assert (drop_labels(y, 1.0, 10, _gen()) == 10).all()
    dropped = (drop_labels(y, 0.1, 10, _gen()) == 10).float().mean()
    assert 0.06 < dropped < 0.14


def test_loss_terms_match_manual_computation():
    b, k = 4, 3
    shape = (b, 2, 4, 4)
    g = _gen(5)
    x0 = torch.randn(shape, generator=g)
    y = torch.randint(0, 10, (b,), generator=g)
    vs = [torch.randn(shape, generator=g) for _ in range(k)]
    accs = [torch.randn(shape, generator=g) for _ in range(k - 1)]
    projs = [torch.randn(b, 16, 8, generator=g) for _ in range(k - 1)]
    target_z = torch.randn(b, 16, 8, generator=g)
    fn = Recorder(vs, accs, projs)
    obj = FlowObjective(time_sampling="uniform", alpha=0.2, label_dropout=0.0)
    terms = obj.loss(fn, x0, y, _gen(7), ssl_targets=target_z, num_branches=k, num_classes=10)
    assert set(terms) == {"deep_0", "deep_1", "deep_2", "acc", "proj", "total"}

    # replay the generator: t1, sign + gaps, eps, (no label drop)
    g = _gen(7)
    t1 = torch.rand(b, generator=g)
    times = branch_times(t1, k, 0.2, g)
    eps = torch.randn(shape, generator=g)
    x_t1, times_seen, y_seen = fn.calls[0]
    torch.testing.assert_close(times_seen, times)
    assert torch.equal(y_seen, y)
    tt = times[:, 0].view(b, 1, 1, 1)
    torch.testing.assert_close(x_t1, (1 - tt) * x0 + tt * eps)
    target = eps - x0
    deep = [((v - target) ** 2).mean() for v in vs]
    acc = 0.0
    for i in range(k - 1):
        ti = times[:, i].view(b, 1, 1, 1)
        x_ti = (1 - ti) * x0 + ti * eps
        acc = acc + ((x_ti - vs[i] * ti + 0.5 * accs[i] * ti**2 - x0) ** 2).mean()
    cos = [torch.nn.functional.cosine_similarity(p, target_z, dim=-1).mean() for p in projs]
    proj = -sum(cos) / len(cos)
    for i in range(k):
        torch.testing.assert_close(terms[f"deep_{i}"], deep[i])
    torch.testing.assert_close(terms["acc"], acc)
    torch.testing.assert_close(terms["proj"], proj)
    torch.testing.assert_close(terms["total"], 0.2 * deep[0] + 0.2 * deep[1] + deep[2] + acc + 0.5 * proj)


def test_loss_is_deterministic_in_the_generator_and_sit_has_no_acc():
    model = randomize_(tiny_model("SiT-S/2", depth=2))
    x0 = torch.randn(3, 4, 8, 8)
    y = torch.tensor([1, 2, 3])
    obj = FlowObjective()
    a = obj.loss(model.forward_train, x0, y, _gen(3), num_branches=1, num_classes=10)
    b = obj.loss(model.forward_train, x0, y, _gen(3), num_branches=1, num_classes=10)
    assert set(a) == {"deep_0", "total"}
    assert torch.equal(a["total"], b["total"])
    torch.testing.assert_close(a["total"], a["deep_0"])


def test_label_dropout_goes_to_null_class():
    fn = Recorder([torch.zeros(8, 1, 2, 2)])
    FlowObjective(label_dropout=1.0).loss(fn, torch.zeros(8, 1, 2, 2), torch.zeros(8, dtype=torch.long), _gen(),
                                          num_branches=1, num_classes=7)
    assert (fn.calls[0][2] == 7).all()


def test_acc_loss_gradient_reaches_acc_mlp_but_not_the_stop_grad_velocity():
    model = randomize_(tiny_model("DeepFlow-S/2-2T", depth=2))
    x0 = torch.randn(3, 4, 8, 8)
    y = torch.tensor([1, 2, 3])
    terms = FlowObjective().loss(model.forward_train, x0, y, _gen(), num_branches=2, num_classes=10)
    terms["acc"].backward()
    vera = model.vera_blocks[0]
    assert vera.acc_mlp[0].weight.grad.abs().sum() > 0
    assert model.acc_head.linear.weight.grad.abs().sum() > 0
    # the ACC_MLP input is not detached: the trunk gets gradient through a*
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # the intermediate velocity enters only through sg(v): its head gets no gradient
    head = model.velocity_heads[0]
    assert head.linear.weight.grad is None or head.linear.weight.grad.abs().sum() == 0
    # and the deep-supervision loss does reach it
    model.zero_grad()
    terms = FlowObjective().loss(model.forward_train, x0, y, _gen(), num_branches=2, num_classes=10)
    terms["deep_0"].backward()
    assert head.linear.weight.grad.abs().sum() > 0


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="betas"):
        FlowObjective(betas=[1.0]).branch_betas(2)
    with pytest.raises(ValueError, match="alpha"):
        FlowObjective(alpha=2.0)
    fn = Recorder([torch.zeros(2, 1, 2, 2)])
    with pytest.raises(ValueError, match="1 velocities for num_branches=2"):
        FlowObjective().loss(fn, torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), _gen(), num_branches=2)
