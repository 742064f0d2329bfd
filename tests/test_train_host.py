"""The training loop keeps the GPU fed: no host sync per step, one compilation per process,
and evaluation that reflects what was learned (CPU stand-ins for the GPU behaviour)."""
from __future__ import annotations

import pytest
import torch

import fastcifar.train as T
from fastcifar.config import resolve
from fastcifar.train import train
from train_helpers import make_data, small_config

# Everything that makes the host wait for a tensor's value.
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), n_train=640, n_test=700)


def _count_syncs_in_epochs(monkeypatch) -> list[int]:
    """Count host reads of tensor values made while `_train_epoch` runs (evaluation apart)."""
    counts, active = [], [False]
    for name in SYNC_METHODS:
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, _real=real, **k):
            if active[0]:
                counts[-1] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    real_epoch = T._train_epoch

    def epoch(*a, **k):
        counts.append(0)
        active[0] = True
        try:
            return real_epoch(*a, **k)
        finally:
            active[0] = False
    monkeypatch.setattr(T, "_train_epoch", epoch)
    return counts


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "adadelta", "muon"])
def test_fp16_loop_syncs_once_per_window(data, tmp_path, monkeypatch, optimizer):
    """fp16 with a GradScaler, EMA, Lookahead and clipping: 40 steps an epoch with the sync
    window widened past the epoch, so the only syncs allowed are the epoch's last (the window
    read and the epoch's sums). Adadelta and Muon have no fused implementation: their GradScaler
    reads the overflow flag every step, which is what this counter must see (and why they
    default to bf16)."""
    monkeypatch.setattr(T, "SYNC_EVERY", 1000)
    counts = _count_syncs_in_epochs(monkeypatch)
    lr = 1.0 if optimizer == "adadelta" else 0.01
    s = train(small_config(data, tmp_path / "run", precision="fp16", overrides=dict(
        epochs=2, batch_size=16, optimizer=optimizer, lr=lr, ema=0.9, lookahead_k=3, grad_clip_norm=5.0)))
    assert s["steps"] == 80 and s["precision"] == "fp16"
    assert len(counts) == 2
    if optimizer in ("adadelta", "muon"):
        assert min(counts) >= 40, counts
    else:
        assert max(counts) <= 2, counts


def test_muon_in_bf16_does_not_sync_per_step(data, tmp_path, monkeypatch):
    """Muon's default on a GPU is bf16 (no scaler): then its own step must not read a value on
    the host either (its norms stay tensors)."""
    monkeypatch.setattr(T, "SYNC_EVERY", 1000)
    counts = _count_syncs_in_epochs(monkeypatch)
    s = train(small_config(data, tmp_path / "run", precision="bf16", overrides=dict(
        epochs=2, batch_size=16, optimizer="muon", lr=0.01, muon_lr=0.05, ema=0.9)))
    assert s["steps"] == 80 and s["precision"] == "bf16"
    assert len(counts) == 2 and max(counts) <= 2, counts


def test_adadelta_defaults_to_bf16_on_gpu_only(data, tmp_path):
    cfg, _, _, notes = resolve(small_config(data, tmp_path / "r", overrides=dict(optimizer="adadelta", lr=1.0)))
    assert cfg.precision == "fp32" and not notes      # CPU: fp32, no note
    cfg, _, _, _ = resolve(small_config(data, tmp_path / "r", overrides=dict(optimizer="sgd")))
    assert cfg.precision == "fp32"


def test_compiles_once_over_epochs_evaluations_and_runs(data, tmp_path, monkeypatch):
    """torch.compile with a frame-counting backend: the train graph and the eval graph are
    compiled once each; the last, partial test batch (700 = 500 + 200) is padded instead of
    compiled again; more epochs and a second run in the same process (speedrun) compile
    nothing new."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **kw: real(model, backend=counter))
    s = train(small_config(data, tmp_path / "one", compile=True, overrides=dict(epochs=1, ema=0.9)))
    assert s["compile"] is True and s["evaluated"] == "ema"
    assert counter.frame_count == 2, counter.frame_count     # train + eval
    train(small_config(data, tmp_path / "two", compile=True, seed=1, overrides=dict(epochs=3, ema=0.9)))
    assert counter.frame_count == 2, counter.frame_count
    torch._dynamo.reset()


def test_padded_last_batch_gives_the_same_figures(data):
    """Padding the last test batch changes no figure (eval mode: images are independent)."""
    from beton_data import make_loader
    from fastcifar.evaluate import evaluate
    from fastcifar.models import create_model
    from train_helpers import MODEL, TINY

    torch.manual_seed(0)
    model = create_model(MODEL, **TINY).eval()
    a = evaluate(model, make_loader("gpu", str(data / "test.beton"), 500, train=False, seed=0))   # 500 + 200
    b = evaluate(model, make_loader("gpu", str(data / "test.beton"), 700, train=False, seed=0))   # one batch
    assert a["n"] == b["n"] == 700 and a["confusion"] == b["confusion"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_short_run_with_ema_evaluates_what_it_learned(tmp_path):
    """speedrun_net's own fast recipe (EMA 0.98, flip TTA, label smoothing), 40 steps of batch
    16 on an easy set: the raw weights learn it within the epoch; the evaluated (EMA) weights
    must show it too. Without the EMA warm-up the average is still 45% random initial weights
    and scores exactly chance (10.00%)."""
    data = make_data(tmp_path / "data", n_train=640, n_test=200)
    s = train(T.TrainConfig(model="speedrun_net", data=str(data), out=str(tmp_path / "run"), progress=False,
                            overrides=dict(epochs=1, batch_size=16)))
    assert s["evaluated"] == "ema" and s["recipe"]["ema"] == 0.98
    assert s["final_acc"] >= 0.5, s["final_acc"]
