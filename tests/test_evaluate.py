"""Evaluation semantics: the TTA views and their weights, and the figures evaluate() reports
(loss, accuracy, per-class accuracy, confusion matrix), each against a reference written here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fastcifar.errors import UserError
from fastcifar.evaluate import evaluate, tta_logits


class Linear(nn.Module):
    """A fixed random linear map of every pixel: any change of view changes the logits."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(10, 3 * 32 * 32, generator=g, dtype=torch.float64) / 50)

    def forward(self, x):
        return x.double().flatten(1) @ self.w.T


def reflect_shift(x: np.ndarray, d: int) -> np.ndarray:
    """out[..., i, j] = x[..., r(i - d), r(j - d)] with r reflecting without repeating the edge."""
    idx = np.arange(32) - d
    idx = np.where(idx < 0, -idx, np.where(idx > 31, 62 - idx, idx))
    return x[..., idx, :][..., idx]


def test_tta_views_and_weights():
    torch.manual_seed(0)
    model = Linear()
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    xn = x.numpy()
    w = model.w.detach().numpy()

    def f(v):
        return np.ascontiguousarray(v).reshape(len(v), -1) @ w.T

    mirror = xn[..., ::-1]                                     # left-right (width) mirror
    none_ref = f(xn)
    flip_ref = (f(xn) + f(mirror)) / 2
    ft_ref = sum(0.5 * f(v) + 0.25 * f(reflect_shift(v, 2)) + 0.25 * f(reflect_shift(v, -2))
                 for v in (xn, mirror)) / 2
    with torch.no_grad():
        got = {m: tta_logits(model, x, m).double().numpy() for m in ("none", "flip", "flip_translate")}
    # float32 outputs (tta_logits returns .float()): compare at float32 accuracy
    np.testing.assert_allclose(got["none"], none_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["flip"], flip_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["flip_translate"], ft_ref, rtol=1e-5, atol=1e-5)
    # the views really differ, so the comparisons above could tell the modes apart
    assert np.abs(flip_ref - none_ref).max() > 1e-2 and np.abs(ft_ref - flip_ref).max() > 1e-2
    with pytest.raises(UserError, match="unknown TTA mode"):
        tta_logits(model, x, "flip_rotate")


@pytest.mark.parametrize("shift", [1, 3])
def test_tta_shift_moves_the_shifted_views(shift):
    """flip_translate's shifted views move by the recipe's tta_shift (airbench94 uses 1 pixel)."""
    model = Linear()
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(shift))
    xn, w = x.numpy(), model.w.detach().numpy()

    def f(v):
        return np.ascontiguousarray(v).reshape(len(v), -1) @ w.T

    ref = sum(0.5 * f(v) + 0.25 * f(reflect_shift(v, shift)) + 0.25 * f(reflect_shift(v, -shift))
              for v in (xn, xn[..., ::-1])) / 2
    with torch.no_grad():
        got = tta_logits(model, x, "flip_translate", shift).double().numpy()
        two = tta_logits(model, x, "flip_translate").double().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert np.abs(got - two).max() > 1e-3                      # not the default 2 pixels


class Oracle(nn.Module):
    """Predicts the class written in pixel (0, 0) of channel 0, with margin 3."""

    def forward(self, x):
        return 3.0 * nn.functional.one_hot(x[:, 0, 0, 0].long(), 10).float()


def test_evaluate_reports_exact_figures():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 50)
    preds = np.where(rng.random(50) < 0.6, labels, rng.integers(0, 10, 50))   # ~60% right
    preds[labels == 9] = 0           # class 9 always wrong, for a zero per-class entry
    images = torch.zeros(50, 3, 32, 32)
    images[:, 0, 0, 0] = torch.from_numpy(preds).float()
    loader = [(images[i:i + 16], torch.from_numpy(labels[i:i + 16])) for i in range(0, 50, 16)]   # ragged

    model = Oracle().train()
    r = evaluate(model, loader)
    assert model.training                                      # mode given back

    cm = np.zeros((10, 10), int)
    for t, p in zip(labels, preds):
        cm[t, p] += 1
    assert r["n"] == 50 and r["confusion"] == cm.tolist()
    assert r["acc"] == pytest.approx(np.mean(preds == labels))
    for c in range(10):
        n_c = np.sum(labels == c)
        assert r["per_class_acc"][c] == pytest.approx(np.sum((labels == c) & (preds == c)) / n_c if n_c else 0.0)
    assert r["per_class_acc"][9] == 0.0 and 0 < r["acc"] < 1
    # cross entropy of logits 3 * one_hot(pred): -log softmax at the label
    right, wrong = -math.log(math.exp(3) / (math.exp(3) + 9)), -math.log(1 / (math.exp(3) + 9))
    assert r["loss"] == pytest.approx(np.mean(np.where(preds == labels, right, wrong)), rel=1e-6)


def test_evaluate_applies_tta():
    model = Linear(1)
    g = torch.Generator().manual_seed(2)
    images, labels = torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    with torch.no_grad():
        ref = tta_logits(model, images, "flip_translate")
    r = evaluate(model, [(images, labels)], tta="flip_translate")
    assert r["loss"] == pytest.approx(nn.functional.cross_entropy(ref, labels).item(), rel=1e-6)
    assert r["acc"] == pytest.approx((ref.argmax(1) == labels).float().mean().item())
    plain = evaluate(model, [(images, labels)], tta="none")["loss"]
    assert plain != pytest.approx(r["loss"], rel=1e-6)         # the modes give different figures
    with torch.no_grad():
        ref1 = tta_logits(model, images, "flip_translate", 1)
    r1 = evaluate(model, [(images, labels)], tta="flip_translate", tta_shift=1)
    assert r1["loss"] == pytest.approx(nn.functional.cross_entropy(ref1, labels).item(), rel=1e-6)
    assert r1["loss"] != pytest.approx(r["loss"], rel=1e-6)


def test_evaluate_empty_loader():
    with pytest.raises(UserError, match="empty"):
        evaluate(Oracle(), [])
