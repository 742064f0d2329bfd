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


def test_a_graph_run_without_cuda_graphs_is_reported(data, tmp_path, monkeypatch, capsys):
    """Asked for CUDA graphs (reduce-overhead), inductor runs a graph it cannot capture launch by
    launch, says why on a log line that is off by default, and goes on. The run says so: the
    reason is printed once, after the epoch that compiled the graph, and the summary counts the
    graphs and keeps the reason. Here a compiler backend reports the skip through inductor's own
    logging function, as inductor does on a GPU for e.g. an input mutated in place."""
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    reason = "skipping cudagraphs due to mutated inputs (1 instances). Found from : File model.py, line 7"

    def skipping_backend(gm, example_inputs):
        log_cudagraph_skip_and_bump_counter(reason)
        return gm.forward

    torch._dynamo.reset()
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **kw: real(model, backend=skipping_backend))
    s = train(small_config(data, tmp_path / "graphs", compile=True, compile_mode="reduce-overhead",
                           overrides=dict(epochs=2)))
    out = capsys.readouterr().out
    assert s["compile_mode"] == "reduce-overhead"
    assert s["cudagraphs"] == {"graphs_skipped": 2, "reasons": [reason]}     # train and eval graphs
    assert out.count("without CUDA graphs") == 1 and reason in out, out
    assert "CUDA graphs need a GPU" in out                               # the CPU's own note
    # without a CUDA-graph mode nothing is watched or printed
    s = train(small_config(data, tmp_path / "plain", compile=True, overrides=dict(epochs=1)))
    assert s["cudagraphs"] is None and "without CUDA graphs" not in capsys.readouterr().out
    torch._dynamo.reset()


def test_cudagraph_watch_counts_inductors_own_skips():
    """With the real inductor on the CPU every graph is run without CUDA graphs (inductor counts
    it and logs no reason there): a watcher created before the compile counts the step's graphs
    (the forward's skip, which its backward follows), one created after sees none of them."""
    from fastcifar.step import CudaGraphSkips, watch_cudagraphs

    assert watch_cudagraphs(True, None) is None and watch_cudagraphs(False, "reduce-overhead") is None
    torch._dynamo.reset()
    watch = watch_cudagraphs(True, "reduce-overhead")
    net = torch.compile(torch.nn.Linear(4, 2), mode="reduce-overhead")
    net(torch.randn(3, 4)).sum().backward()
    report = watch.report()
    assert report["graphs_skipped"] >= 1 and report["reasons"] == [], report
    assert CudaGraphSkips().report()["graphs_skipped"] == 0
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
