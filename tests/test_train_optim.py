"""Optimizers, schedules, Lookahead, adversarial model perturbation, EMA and clipping."""
from __future__ import annotations

import collections
import copy
import json
import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from fastcifar.errors import UserError
from fastcifar.optim import (EMA, Lookahead, LRSchedule, ModelPerturbation, Muon, build_optimizer,
                             clip_gradients, orthogonalize, set_lr)
from fastcifar.recipe import Recipe
from train_helpers import make_data, small_config


# -----------------------------------------------------------------------------
# schedules: the lr at known steps (10 steps per epoch, 10 epochs = 100 steps, peak 1.0)

def sched(**kw) -> LRSchedule:
    return LRSchedule(Recipe(epochs=10, lr=1.0, **kw), steps_per_epoch=10)


def test_onecycle_points():
    s = sched(schedule="onecycle", pct_start=0.25, final_lr_frac=0.0)
    assert s(0) == pytest.approx(1 / 25)
    assert s(25) == pytest.approx(1.0)                       # peak at pct_start
    assert s(12.5) == pytest.approx(1 / 25 + (1 - 1 / 25) / 2)
    assert s(100) == pytest.approx(0.0)
    assert s(25 + 37.5) == pytest.approx(0.5)                  # halfway down


def test_cosine_linear_constant_points():
    c = sched(schedule="cosine", final_lr_frac=0.1)
    assert c(0) == pytest.approx(1.0)
    assert c(50) == pytest.approx(0.1 + 0.9 * 0.5)
    assert c(100) == pytest.approx(0.1)
    li = sched(schedule="linear")
    assert [li(0), li(50), li(100)] == pytest.approx([1.0, 0.5, 0.0])
    assert sched(schedule="constant")(73) == 1.0


def test_warmup_then_cosine():
    s = sched(schedule="cosine", warmup_epochs=2)     # 20 warm-up steps, then 80 of cosine
    assert s(0) == pytest.approx(1 / 20)
    assert s(9) == pytest.approx(10 / 20)
    assert s(20) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5)                 # halfway through the cosine part
    assert s(100) == pytest.approx(0.0)


def test_multistep_changes_at_epoch_boundaries():
    s = sched(schedule="multistep", milestones=(3, 6), gamma=0.1)
    assert s(29) == pytest.approx(1.0)
    assert s(30) == pytest.approx(0.1)
    assert s(59) == pytest.approx(0.1)
    assert s(60) == pytest.approx(0.01)


def test_plateau_reduces_after_patience_and_resumes():
    s = sched(schedule="plateau", patience=2, gamma=0.5)
    for loss in (1.0, 0.9, 0.95, 0.95):
        s.observe(loss)
    assert s(0) == 1.0                                 # two bad evaluations: not yet
    s.observe(0.95)
    assert s(0) == 0.5                                 # the third one reduces
    t = sched(schedule="plateau", patience=2, gamma=0.5)
    t.load_state_dict(s.state_dict())
    assert t(5) == 0.5 and t.state_dict() == s.state_dict()


def test_unknown_schedule_and_optimizer():
    with pytest.raises(UserError, match="unknown schedule"):
        sched(schedule="exponential")
    with pytest.raises(UserError, match="unknown optimizer"):
        build_optimizer([nn.Parameter(torch.zeros(1))], Recipe(optimizer="lion"))


# -----------------------------------------------------------------------------
# the tricks, one at a time

def test_optimizers_are_built_as_asked():
    p = [nn.Parameter(torch.zeros(3))]
    sgd = build_optimizer(p, Recipe(optimizer="sgd", nesterov=True, momentum=0.9, weight_decay=1e-3))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["weight_decay"] == 1e-3
    assert isinstance(build_optimizer(p, Recipe(optimizer="adam", betas=(0.8, 0.99))), torch.optim.Adam)
    assert isinstance(build_optimizer(p, Recipe(optimizer="adamw")), torch.optim.AdamW)
    assert isinstance(build_optimizer(p, Recipe(optimizer="adadelta", lr=1.0)), torch.optim.Adadelta)


def test_bias_lr_scale_gives_vectors_their_own_rate_and_the_same_decay_per_step():
    """bias_lr_scale: the 1-D parameters (BN shift and scale, biases) step bias_lr_scale times
    further for the same gradient, the conv/linear weights do not, and weight decay still takes
    the same fraction of every parameter per step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 2))
    params = list(model.parameters())
    recipe = Recipe(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, bias_lr_scale=64.0)
    opt = build_optimizer(params, recipe)
    assert [g["lr_scale"] for g in opt.param_groups] == [1.0, 64.0]
    vectors = {id(p) for p in opt.param_groups[1]["params"]}
    assert vectors == {id(p) for p in params if p.ndim == 1} and len(vectors) == 4   # conv bias, BN weight and bias, fc bias
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 32.0]

    # same gradient everywhere, no decay: vectors move 64x as far
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    for p, b in zip(params, before):
        assert torch.allclose(b - p.detach(), torch.full_like(b, 32.0 if p.ndim == 1 else 0.5))

    # weight decay alone: every parameter shrinks by the same fraction lr * weight_decay
    opt = build_optimizer(params, recipe.replace(weight_decay=1e-3))
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, pytest.approx(1e-3 / 64)]
    set_lr(opt, 0.5)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(params, before):
        shrink = (b - p.detach()) / b
        assert torch.allclose(shrink, torch.full_like(b, 0.5 * 1e-3), rtol=1e-2, atol=0), p.ndim

    # the default keeps one group; a non-positive scale is refused
    assert len(build_optimizer(params, Recipe()).param_groups) == 1
    with pytest.raises(UserError, match="bias_lr_scale"):
        Recipe(bias_lr_scale=0.0).validate()


def test_orthogonalize_keeps_singular_directions_and_equalises_values():
    torch.manual_seed(0)
    for shape in [(64, 216), (40, 12)]:
        u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
        v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
        k = min(shape)
        s = torch.logspace(0, -2, k)                         # condition number 100
        g = u[:, :k] @ torch.diag(s) @ v[:, :k].T
        o = orthogonalize(g)
        assert o.shape == g.shape
        core = u[:, :k].T @ o @ v[:, :k]                     # diagonal if the directions are kept
        diag = torch.diagonal(core)
        assert (core - torch.diag(diag)).abs().max() < 1e-3
        assert diag.min() > 0.6 and diag.max() < 1.25, (diag.min(), diag.max())
    # a batch of matrices (how Muon handles filter banks of one shape) = each one on its own
    gs = torch.randn(3, 16, 40)
    assert torch.allclose(orthogonalize(gs), torch.stack([orthogonalize(g) for g in gs]), atol=1e-5)
    assert torch.allclose(orthogonalize(gs.mT), torch.stack([orthogonalize(g.T) for g in gs]), atol=1e-5)


def test_orthogonalize_matches_the_plain_iteration_in_float64():
    """The fused form (bmm, baddbmm) computes the quintic iteration as written:
    x <- a x + (b G + c G^2) x, G = x x^T, from x = g / |g|_F, on the wide side."""
    from fastcifar.optim import NS_COEFFS

    def reference(g, steps=5):
        a, b, c = NS_COEFFS
        x = g.double()
        tall = x.shape[0] > x.shape[1]
        x = x.T if tall else x
        x = x / (x.norm() + 1e-7)
        for _ in range(steps):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        return x.T if tall else x

    torch.manual_seed(1)
    for shape in [(64, 216), (256, 576), (40, 12), (9, 9)]:
        g = torch.randn(shape)
        ref = reference(g)
        got = orthogonalize(g).double()
        assert got.shape == g.shape and (got - ref).abs().max() < 1e-4 * ref.abs().max()
    # a 4-D batch keeps its shape, each matrix as on its own
    gs = torch.randn(2, 3, 16, 40)
    assert torch.allclose(orthogonalize(gs), torch.stack([torch.stack([reference(m) for m in b]) for b in gs]).float(),
                          atol=1e-5)


def test_orthogonalize_launches_three_ops_an_iteration():
    """On a GPU Muon's step runs eagerly, one kernel launch (and host dispatch) per op: each
    Newton-Schulz iteration must be 3 ops (bmm, two baddbmm), not the plain expression's 8
    plus the views of broadcast matmuls."""
    from op_log import OpLog

    g = torch.randn(3, 64, 576)
    for steps in (5, 2):
        with OpLog() as log:
            orthogonalize(g, steps)
        ops = log.counts()
        assert ops["bmm"] == steps and ops["baddbmm"] == 2 * steps, ops
        views = {"view", "_unsafe_view", "transpose", "expand", "reshape", "unsqueeze"}
        # the matmuls and the normalisation launch kernels; views (one transpose per
        # iteration, for G = x x^T) only dispatch
        assert sum(n for op, n in ops.items() if op not in views) <= 3 * steps + 3, ops
        assert sum(n for op, n in ops.items() if op in views) <= steps + 2, ops


def test_muon_turns_filters_at_fixed_norm_and_steps_the_rest_like_sgd():
    """muon: each conv filter bank keeps its norm and moves by lr of it per step, in the
    orthogonalised momentum's direction; biases, BN shifts and the linear head get exactly
    torch.optim.SGD's update; muon_lr follows the schedule through set_lr."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 36, 2))
    twin = copy.deepcopy(model)
    recipe = Recipe(optimizer="muon", lr=0.1, muon_lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    opt = build_optimizer(model.parameters(), recipe)
    assert isinstance(opt, Muon)
    filters = [g for g in opt.param_groups if g["orthogonal"]]
    assert len(filters) == 1 and filters[0]["params"] == [model[0].weight]
    assert filters[0]["weight_decay"] == 0.0
    set_lr(opt, 0.1)
    assert filters[0]["lr"] == pytest.approx(0.05)
    rest = [p for p in twin.parameters() if p.ndim != 4]
    sgd = torch.optim.SGD(rest, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 2, (16,))
    for _ in range(3):
        w0 = model[0].weight.detach().clone()
        with torch.no_grad():       # the twin's filters follow muon's, so the gradients match
            twin[0].weight.copy_(w0)
        for net, o in ((model, opt), (twin, sgd)):
            o.zero_grad()
            F.cross_entropy(net(x), y).backward()
        grad = model[0].weight.grad.reshape(8, -1).clone()
        opt.step()
        sgd.step()
        w1 = model[0].weight.detach()
        assert float(w1.norm()) == pytest.approx(float(w0.norm()), rel=1e-5)
        step = (w1 - w0).reshape(8, -1)
        assert float(step.norm() / w0.norm()) == pytest.approx(0.05, rel=0.05)
        assert (step * grad).sum() < 0                      # downhill
    for p, q in zip([p for p in model.parameters() if p.ndim != 4], rest):
        assert torch.allclose(p, q, atol=1e-6)
    with pytest.raises(UserError, match="muon_lr"):
        Recipe(optimizer="muon", muon_lr=1.5).validate()


def test_lookahead_pulls_fast_weights_towards_slow():
    w = nn.Parameter(torch.zeros(2))
    la = Lookahead([w], k=2, alpha=0.5)
    with torch.no_grad():
        w.add_(1.0)
    la.step()                                          # step 1 of 2: nothing happens
    assert torch.equal(w.detach(), torch.ones(2))
    with torch.no_grad():
        w.add_(1.0)                                    # fast weights at 2
    la.step()                                          # slow = 0 + 0.5 * (2 - 0) = 1; fast <- slow
    assert torch.equal(w.detach(), torch.ones(2)) and torch.equal(la.slow[0], torch.ones(2))


def test_lookahead_ramp_follows_airbench_schedule_averages_statistics_and_finishes_on_slow():
    w = nn.Parameter(torch.zeros(2))
    stats, count = torch.zeros(2), torch.zeros((), dtype=torch.long)
    la = Lookahead([w], k=1, alpha=0.25, ramp=True, buffers=[stats, count])
    assert la.alpha_at(0.0) == 1.0 and la.alpha_at(1.0) == 0.25
    assert la.alpha_at(0.5) == pytest.approx(1 - 0.75 * 0.125)      # cubic in the progress
    assert Lookahead([w], k=1, alpha=0.25).alpha_at(0.5) == 0.25    # no ramp: constant
    assert len(la.slow) == 2                    # the float buffer travels with the weights, the count not
    with torch.no_grad():
        w.add_(4.0)
        stats.add_(8.0)
    la.step(progress=0.0)                       # alpha 1: the slow copy jumps to the fast one
    assert torch.equal(la.slow[0], torch.full((2,), 4.0)) and torch.equal(la.slow[1], torch.full((2,), 8.0))
    with torch.no_grad():
        w.add_(4.0)                             # fast at 8
        stats.add_(8.0)                         # statistics at 16
    la.step(progress=1.0)                       # alpha 0.25: slow = 4 + 0.25 * 4 = 5, stats 8 + 2 = 10
    assert torch.equal(w.detach(), torch.full((2,), 5.0)) and torch.equal(stats, torch.full((2,), 10.0))
    with torch.no_grad():
        w.add_(100.0)
    la.finish()                                 # the run ends on the slow weights
    assert torch.equal(w.detach(), torch.full((2,), 5.0))


def test_model_perturbation_stays_in_ball_raises_loss_and_restores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    params = list(model.parameters())

    def loss():  # training mode throughout: BN uses batch statistics, so this is deterministic
        return nn.functional.cross_entropy(model(x), y)

    def regrad():
        for p in params:
            p.grad = None
        loss().backward()

    regrad()
    with torch.no_grad():
        loss0 = loss().item()
    before = [p.detach().clone() for p in params]
    stats = model[1].running_mean.clone()
    amp = ModelPerturbation(params, list(model.buffers()), epsilon=0.05, inner_lr=0.03, inner_iters=3)
    amp.perturb(regrad)
    moved = [(p.detach() - b).norm().item() for p, b in zip(params, before)]
    assert all(m <= 0.05 + 1e-6 for m in moved)         # each tensor within its ball ...
    assert max(moved) > 0.05 - 1e-4 and min(moved) > 0  # ... reaching it after 3 steps of 0.03
    with torch.no_grad():
        loss_adv = loss().item()
    assert loss_adv > loss0                               # gradient ascent: a worse point
    amp.restore()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert torch.equal(model[1].running_mean, stats)     # BN statistics untouched by the probes


def test_ema_averages():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert torch.allclose(ema.model.weight, torch.full((1, 2), 0.1))


def test_ema_averages_bn_statistics_and_copies_counts():
    model = nn.BatchNorm2d(3)
    ema = EMA(model, decay=0.75)
    with torch.no_grad():
        model.running_mean.fill_(4.0)
        model.running_var.fill_(9.0)
        model.num_batches_tracked.fill_(7)
    ema.update(model)
    assert torch.allclose(ema.model.running_mean, torch.full((3,), 1.0))   # 0.75 * 0 + 0.25 * 4
    assert torch.allclose(ema.model.running_var, torch.full((3,), 3.0))    # 0.75 * 1 + 0.25 * 9
    assert ema.model.num_batches_tracked.item() == 7


def test_clipping_by_norm_and_value():
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    clip_gradients([p], Recipe(grad_clip_norm=1.0))
    assert p.grad.norm().item() == pytest.approx(1.0)
    p.grad = torch.tensor([3.0, -4.0, 0.5, 0.0])
    clip_gradients([p], Recipe(grad_clip_value=1.0))
    assert p.grad.tolist() == [1.0, -1.0, 0.5, 0.0]


# -----------------------------------------------------------------------------
# every path through the training step runs (two steps of the tiny zoo model)

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("optim_data"), n_train=256, n_test=50)


def test_lookahead_ramp_run_ends_on_the_slow_weights(data, tmp_path):
    from fastcifar.models import create_model
    from fastcifar.train import train
    from train_helpers import MODEL, TINY

    over = dict(epochs=1, lookahead_k=3, lookahead_alpha=0.2, lookahead_ramp=True)
    s = train(small_config(data, tmp_path / "run", overrides=over))
    assert s["status"] == "completed" and s["steps"] == 4            # 256 images, batch 64: 4 steps
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert ckpt["lookahead"]["count"] == 4
    # Lookahead's copies, in its order: trainable weights, then floating-point buffers
    model = create_model(MODEL, **TINY)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    names += [n for n, b in model.named_buffers() if b.is_floating_point()]
    slow = ckpt["lookahead"]["slow"]
    assert len(slow) == len(names) and any("running_var" in n for n in names)
    # the last sync was at step 3; the model is the slow copy, not where step 4 left it
    for name, value in zip(names, slow):
        assert torch.equal(ckpt["model"][name], value), name
    with pytest.raises(UserError, match="lookahead_ramp needs lookahead_k"):
        Recipe(lookahead_ramp=True).validate()


PATHS = {
    "sgd_nesterov": dict(optimizer="sgd", nesterov=True),
    "adam": dict(optimizer="adam", lr=1e-3),
    "adamw_cosine_warmup": dict(optimizer="adamw", lr=1e-3, schedule="cosine", warmup_epochs=0.5),
    "adadelta_constant": dict(optimizer="adadelta", lr=1.0, schedule="constant"),
    "multistep": dict(schedule="multistep", milestones=(1, 2)),
    "plateau": dict(schedule="plateau"),
    "linear": dict(schedule="linear", warmup_epochs=1),
    "lookahead": dict(lookahead_k=2, lookahead_alpha=0.5),
    "lookahead_ramp": dict(lookahead_k=2, lookahead_alpha=0.25, lookahead_ramp=True),
    "amp_perturbation": dict(amp_epsilon=0.1, amp_inner_lr=0.05, amp_inner_iters=2),
    "ema_tta": dict(ema=0.9, tta="flip_translate"),
    "clip_norm_value_smoothing": dict(grad_clip_norm=1.0, grad_clip_value=0.5, label_smoothing=0.1),
    "cutout": dict(cutout=8, translate=2),
    "bias_lr_scale": dict(bias_lr_scale=16.0),
    "muon": dict(optimizer="muon", muon_lr=0.05, nesterov=True),
}


OPTIMIZER_STATE = {"sgd": "momentum_buffer", "adam": "exp_avg", "adamw": "exp_avg", "adadelta": "acc_delta",
                   "muon": "momentum_buffer"}


@pytest.mark.parametrize("name", sorted(PATHS))
def test_training_path_runs(data, tmp_path, monkeypatch, name):
    """Two steps through each path, and the tricks the recipe names are really used on each
    step (and the others are not): optimizer kind, lr from the schedule, Lookahead, model
    perturbation, EMA, clipping, label smoothing, and the augmentation handed to the loader."""
    import beton_data
    import fastcifar.step as S
    from fastcifar.train import train

    calls = collections.Counter()

    def spy(owner, attr, key):
        real = getattr(owner, attr)

        def wrapper(*a, **k):
            calls[key] += 1
            return real(*a, **k)
        monkeypatch.setattr(owner, attr, wrapper)

    spy(S, "clip_gradients", "clip")
    spy(S.ModelPerturbation, "perturb", "perturb")
    spy(S.Lookahead, "step", "lookahead")
    spy(S.EMA, "update", "ema")
    smoothing, augs = [], []
    real_ce, real_loader = S.F.cross_entropy, beton_data.make_loader
    monkeypatch.setattr(S.F, "cross_entropy", lambda *a, **k: smoothing.append(k.get("label_smoothing"))
                        or real_ce(*a, **k))
    monkeypatch.setattr(beton_data, "make_loader", lambda *a, **k: augs.append(k.get("aug")) or real_loader(*a, **k))

    s = train(small_config(data, tmp_path / "run", max_steps=2, overrides=PATHS[name]))
    assert s["steps"] == 2 and s["status"] == "max_steps"
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    recipe = Recipe.from_dict(json.loads((tmp_path / "run" / "config.json").read_text())["recipe"])
    for key, value in PATHS[name].items():   # the overrides reached the recipe
        assert getattr(recipe, key) == (tuple(value) if isinstance(value, tuple) else value), key

    # optimizer kind and settings, read from its saved state
    group = ckpt["optimizer"]["param_groups"][0]
    states = list(ckpt["optimizer"]["state"].values())
    assert states and all(OPTIMIZER_STATE[recipe.optimizer] in st for st in states)
    if recipe.optimizer == "sgd":
        assert group["nesterov"] == recipe.nesterov and group["momentum"] == recipe.momentum
    if recipe.optimizer in ("adam", "adamw"):
        assert group["decoupled_weight_decay"] == (recipe.optimizer == "adamw")
    # the lr of the last step (index 1) is the schedule's, 4 steps per epoch over 256 images
    assert group["lr"] == pytest.approx(LRSchedule(recipe, 4, recipe.epochs * 4)(1))
    groups = ckpt["optimizer"]["param_groups"]
    muon = recipe.optimizer == "muon"
    assert len(groups) == 1 + (recipe.bias_lr_scale != 1) + muon
    if recipe.bias_lr_scale != 1:   # the 1-D parameters' group, at its multiple of the schedule
        assert groups[1]["lr"] == pytest.approx(group["lr"] * recipe.bias_lr_scale)
    if muon:                        # the conv filters' group, at muon_lr's share of the schedule
        assert groups[-1]["orthogonal"] and groups[-1]["lr"] == pytest.approx(group["lr"] * recipe.muon_lr / recipe.lr)
    # each trick on both steps exactly when the recipe asks for it
    clip = recipe.grad_clip_norm is not None or recipe.grad_clip_value is not None
    assert calls["clip"] == (2 if clip else 0)
    assert calls["perturb"] == (2 if recipe.amp_epsilon > 0 else 0)
    assert calls["lookahead"] == (2 if recipe.lookahead_k > 0 else 0)
    assert calls["ema"] == (2 if recipe.ema > 0 else 0)
    if name.startswith("lookahead"):
        assert ckpt["lookahead"]["count"] == 2
    assert (ckpt["ema"] is not None) == (recipe.ema > 0)
    assert len(smoothing) >= 2 and set(smoothing) == {recipe.label_smoothing}
    assert augs[0].flip == recipe.flip and augs[0].translate == recipe.translate and augs[0].cutout == recipe.cutout
    if name == "cutout":
        assert (augs[0].cutout, augs[0].translate) == (8, 2)


def test_bf16_autocast_path_runs_on_cpu(data, tmp_path):
    from fastcifar.train import train

    s = train(small_config(data, tmp_path / "run", max_steps=2, precision="bf16"))
    assert s["precision"] == "bf16" and s["steps"] == 2


def test_full_epoch_with_tta_and_ema_evaluates(data, tmp_path):
    from fastcifar.train import train

    s = train(small_config(data, tmp_path / "run", overrides=dict(epochs=1, ema=0.9, tta="flip")))
    assert s["status"] == "completed" and 0 <= s["final_acc"] <= 1
    assert math.isfinite(s["final_test_loss"])
    # the figures are those of the EMA weights under flip TTA: re-evaluate the checkpoint's EMA
    # weights with flip TTA, and check that the raw weights or no TTA would have given others
    from beton_data import make_loader
    from fastcifar.evaluate import evaluate
    from fastcifar.models import create_model
    from train_helpers import MODEL, TINY

    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    test = make_loader("gpu", str(data / "test.beton"), 50, train=False, aug=None, seed=0)

    def evaluated(weights, tta):
        model = create_model(MODEL, **TINY)
        model.load_state_dict(weights)
        return evaluate(model, test, tta=tta)

    ema_flip = evaluated(ckpt["ema"], "flip")
    assert s["final_test_loss"] == pytest.approx(ema_flip["loss"], rel=1e-6)
    assert s["final_acc"] == pytest.approx(ema_flip["acc"])
    # (the same figures agree to float rounding; these differ by >1e-4 relative here)
    assert evaluated(ckpt["model"], "flip")["loss"] != pytest.approx(ema_flip["loss"], rel=1e-5)
    assert evaluated(ckpt["ema"], "none")["loss"] != pytest.approx(ema_flip["loss"], rel=1e-5)


def test_recipe_tta_shift_reaches_training_and_eval(data, tmp_path):
    """The recipe's tta_shift is the shift of the run's final flip_translate evaluation, and
    `fastcifar eval` of the run uses it unless told another (--tta-shift)."""
    from fastcifar.evaluate import run_eval
    from fastcifar.train import train

    s = train(small_config(data, tmp_path / "run", overrides=dict(epochs=1, tta="flip_translate", tta_shift=1)))
    again = run_eval(tmp_path / "run", quiet=True)
    assert again["tta_shift"] == 1 and again["loss"] == pytest.approx(s["final_test_loss"], rel=1e-6)
    two = run_eval(tmp_path / "run", tta_shift=2, quiet=True)
    assert two["tta_shift"] == 2 and two["loss"] != pytest.approx(s["final_test_loss"], rel=1e-6)
    with pytest.raises(UserError, match="tta-shift must be in 1..8"):
        run_eval(tmp_path / "run", tta_shift=0, quiet=True)
    with pytest.raises(UserError, match="bad recipe: tta_shift must be in 1..8"):
        train(small_config(data, tmp_path / "bad", overrides=dict(tta_shift=9)))
    assert not (tmp_path / "bad").exists()


def test_ffcv_loader_path_runs(data, tmp_path):
    from fastcifar.train import train

    s = train(small_config(data, tmp_path / "run", loader="ffcv", num_workers=1, max_steps=2))
    assert s["loader"] == "ffcv" and s["steps"] == 2


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_fused_optimizer_skips_an_overflowed_first_step(optimizer):
    """fp16 with a GradScaler whose first steps overflow (the default initial scale, 2**16,
    does on this net): the fused optimizer must skip them exactly as the unfused one does, and
    then take the same steps. (PyTorch's fused SGD left its momentum buffers uninitialised
    after a skipped first step, and the weights turned to NaN or garbage a step later.)"""
    from fastcifar.models import create_model
    from train_helpers import MODEL, TINY

    def run(fused: bool):
        torch.manual_seed(0)
        model = create_model(MODEL, **TINY).to(memory_format=torch.channels_last)
        params = [p for p in model.parameters() if p.requires_grad]
        recipe = Recipe(optimizer=optimizer, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        opt = (build_optimizer(params, recipe) if fused else
               {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer](
                   params, lr=0.01, weight_decay=5e-4, foreach=True,
                   **(dict(momentum=0.9, nesterov=True) if optimizer == "sgd" else {})))
        scaler = torch.amp.GradScaler("cpu")
        x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (16,))
        losses = []
        for _ in range(10):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
        return losses, [p.detach() for p in params], scaler.get_scale()

    (losses_f, fused, scale_f), (losses_p, _, scale_p) = run(True), run(False)
    assert scale_f == scale_p < 2.0 ** 16                    # the same first steps were skipped
    assert all(torch.isfinite(p).all() for p in fused)
    # the same training: step for step (fused and unfused kernels round differently, and
    # fp16 training amplifies that a little, hence a relative tolerance of 1%)
    assert losses_f == pytest.approx(losses_p, rel=1e-2)
    assert losses_f[-1] < 0.5 * losses_f[0]


def test_the_compiled_step_computes_the_loss_inside_its_graph():
    """A small network's compiled step is bound by host dispatch, so the loss is compiled with
    the forward (fastcifar.step.ForwardLoss): the profile of a compiled TrainStep shows none of
    cross-entropy's eager ops or autograd nodes, and the step computes what the eager model and
    loss compute (loss, logits and gradients)."""
    from torch.profiler import profile
    from fastcifar.models import create_model
    from fastcifar.step import TrainStep, training_net
    from train_helpers import MODEL, TINY

    torch.manual_seed(0)
    model = create_model(MODEL, **TINY).to(memory_format=torch.channels_last)
    reference = copy.deepcopy(model)
    recipe = Recipe(optimizer="sgd", lr=0.1, momentum=0.9, label_smoothing=0.2, epochs=1)
    step = TrainStep(training_net(model, recipe.label_smoothing, compile=True), model, recipe,
                     "fp32", "cpu", steps_per_epoch=4, total_steps=4)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))

    # the gradients the optimizer steps with, and step 0's loss and logits (from the weights as
    # they were): the eager model's
    want_logits = reference(x)
    want_loss = F.cross_entropy(want_logits, y, label_smoothing=0.2)
    want_loss.backward()
    step._forward_backward(x, y)
    grads = [(name, p.grad, q.grad) for (name, p), q in zip(model.named_parameters(), reference.parameters())
             if q.grad is not None]
    assert len(grads) > 10
    for name, got, want in grads:
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5, msg=name)
    loss, logits = step(x, y, 0)
    torch.testing.assert_close(logits, want_logits.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, want_loss.detach(), rtol=1e-4, atol=1e-6)

    with profile() as prof:
        step(x, y, 1)
    names = {e.name for e in prof.events()}
    assert any("Compiled" in n for n in names), sorted(names)     # the profile saw the compiled step
    eager_loss = [n for n in names if any(k in n.lower() for k in ("cross_entropy", "nll_loss", "nllloss",
                                                                   "log_softmax", "logsoftmax"))]
    assert not eager_loss, eager_loss


def test_perturbed_step_returns_the_unperturbed_forwards_outputs_under_output_reuse():
    """Under CUDA graphs (compile mode reduce-overhead) a compiled net's next call writes its
    outputs into the memory of the previous call's. With adversarial model perturbation a step
    runs the net twice (at w, then at w + delta), and must still return the loss and logits of
    the first call. Here a net that reuses its output buffers the same way stands in for the
    CUDA graph."""
    from fastcifar.step import TrainStep

    class IntoBuffer(torch.autograd.Function):
        """Returns ``buffer`` itself, holding x's values; gradients pass through to x."""
        @staticmethod
        def forward(ctx, x, buffer):
            ctx.mark_dirty(buffer)
            return buffer.copy_(x)

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    class ReusingNet(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.out = model, None

        def forward(self, images, labels):
            logits = self.model(images)
            loss = F.cross_entropy(logits, labels)
            if self.out is None:
                self.out = (torch.empty_like(loss), torch.empty_like(logits))
            for buffer in self.out:
                buffer.detach_()   # the same memory, without the previous call's history
            return IntoBuffer.apply(loss, self.out[0]), IntoBuffer.apply(logits, self.out[1])

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    recipe = Recipe(optimizer="sgd", lr=0.1, momentum=0.0, epochs=1, amp_epsilon=0.5, amp_inner_lr=0.5)
    x, y = torch.randn(6, 3, 2, 2), torch.randint(0, 3, (6,))
    want_logits = model(x).detach()
    want_loss = F.cross_entropy(want_logits, y)
    step = TrainStep(ReusingNet(model), model, recipe, "fp32", "cpu", steps_per_epoch=1, total_steps=1)
    loss, logits = step(x, y, 0)
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(loss, want_loss)
