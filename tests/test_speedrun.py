"""`fastcifar speedrun` on the CPU with tiny data, the airbench adapter's data preparation, and
the command's errors. (Timing figures belong to bench/, not here: these tests check plumbing.)"""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch

from fastcifar import baseline as ab
from fastcifar.cli import main
from fastcifar.errors import UserError
from fastcifar.machine import package_version
from beton_data import data_name
from fastcifar.leaderboard import ENTRY_DIR, collect
from fastcifar.results import device_slug
from fastcifar.summary import from_dict as summary_from_dict
from fastcifar.speedrun import report_lines, speedrun


def _images(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    # class-dependent brightness, so a model can learn something in one epoch
    images = (rng.integers(0, 60, (n, 32, 32, 3)) + 19 * labels[:, None, None, None]).astype(np.uint8)
    return images, labels


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny data folder (train 64, test 32 images, JPEG-copy manifest) and an .npz of 12 images."""
    from beton_data import write_beton

    root = tmp_path_factory.mktemp("speedrun")
    data = root / "data"
    for split, n, seed in (("train", 64, 0), ("test", 32, 1)):
        write_beton(data / f"{split}.beton", *_images(n, seed))
    (data / "manifest.json").write_text(json.dumps(
        {"source": "/somewhere/cifar10-jpeg-q75.tar.gz", "lossy_source": True}))
    images, labels = _images(12, 2)
    np.savez(root / "original.npz", images=images, labels=labels)
    return root


TINY_RECIPE = {"epochs": "1", "batch_size": "32"}


def test_speedrun_cpu_two_runs_writes_result_and_entry(tiny, tmp_path, capsys):
    out = tmp_path / "results" / "speedrun_tiny.json"
    result = speedrun(model="speedrun_net", runs=2, baseline=False, data=tiny / "data", out=out,
                      device="cpu", seed=3, overrides=TINY_RECIPE, original_npz=tiny / "original.npz")
    stored = json.loads(out.read_text())
    assert stored == json.loads(json.dumps(result))
    assert stored["kind"] == "speedrun_result" and stored["model"] == "speedrun_net"
    # the installed distribution's version: "2.11.0" where torch.__version__ says "2.11.0+cu130"
    assert stored["device"].startswith("CPU") and stored["versions"]["torch"] == package_version("torch")
    assert torch.__version__.startswith(stored["versions"]["torch"])
    assert stored["data"] == "cifar10-jpeg-q75 (lossy)" and stored["recipe_fields"]["epochs"] == 1
    assert stored["command"] and stored["baseline"] is None and "time_ratio" not in stored
    assert stored["seeds"] == [3, 4] and [r["seed"] for r in stored["runs"]] == [3, 4]
    assert stored["warmup"]["seed"] not in stored["seeds"]
    for r in stored["runs"]:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["original_accuracy"] <= 1
        assert r["time_s"] == pytest.approx(r["train_s"] + r["eval_s"]) and r["train_s"] > 0 and r["eval_s"] > 0
    accs = [r["accuracy"] for r in stored["runs"]]
    assert stored["accuracy_mean"] == pytest.approx(np.mean(accs))
    assert stored["accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    assert stored["time_std_s"] is not None and stored["original_accuracy_mean"] is not None
    # the leaderboard entry beside the result file, de-duplicated against the result file itself
    assert len(list((out.parent / ENTRY_DIR).glob("*.json"))) == 1
    [row] = collect([out.parent])
    assert row["id"] == stored["id"] and row["runs"] == 2 and row["kind"] == "speedrun"
    printed = capsys.readouterr().out
    assert "speedrun_net run 2/2 (seed 4)" in printed and "accuracy" in printed and "time" in printed


def test_timed_runs_write_only_their_final_result(tiny, tmp_path, monkeypatch):
    """Two epochs per run: one checkpoint per run (at its end), no plots, no TensorBoard events,
    one evaluation (after the last epoch)."""
    import fastcifar.plots as plots
    import fastcifar.train as T

    calls = {"save": 0, "plot": 0, "eval": 0}
    real_save, real_eval = T.save_checkpoint, T.evaluate
    monkeypatch.setattr(T, "save_checkpoint", lambda *a, **k: calls.__setitem__("save", calls["save"] + 1)
                        or real_save(*a, **k))
    monkeypatch.setattr(T, "evaluate", lambda *a, **k: calls.__setitem__("eval", calls["eval"] + 1)
                        or real_eval(*a, **k))
    monkeypatch.setattr(plots, "plot_curves", lambda *a, **k: calls.__setitem__("plot", calls["plot"] + 1))
    made = []
    real_train = T.train
    monkeypatch.setattr(T, "train", lambda cfg: made.append(cfg) or real_train(cfg))
    result = speedrun(model="speedrun_net", runs=1, baseline=False, data=tiny / "data", out=tmp_path / "r.json",
                      device="cpu", overrides={"epochs": "2", "batch_size": "32"}, model_options={"stem": "whiten"})
    assert calls == {"save": 2, "plot": 0, "eval": 2}       # warm-up run + 1 timed run
    assert all(cfg.tensorboard is False and not cfg.epoch_checkpoints and not cfg.plots for cfg in made)
    # model options reach every run and are part of the result's settings
    assert [cfg.model_options for cfg in made] == [{"stem": "whiten"}] * 2
    assert result["model_options"] == {"stem": "whiten"} and result["settings"]["model:stem"] == "whiten"


def test_bad_model_option_fails_before_any_run(tiny, tmp_path, monkeypatch):
    import fastcifar.train as T

    monkeypatch.setattr(T, "train", lambda cfg: pytest.fail("a run started"))
    for options, message in (({"stem": "pca"}, "unknown stem 'pca'"), ({"depth": 3}, "has no option depth")):
        with pytest.raises(UserError, match=message):
            speedrun(model="speedrun_net", runs=1, baseline=False, data=tiny / "data", out=tmp_path / "r.json",
                     device="cpu", model_options=options)
    assert not (tmp_path / "r.json").exists()


def test_report_lines_with_baseline():
    result = {"model": "speedrun_net", "device": "NVIDIA H100 80GB HBM3", "data": "cifar10",
              "runs": [{}, {}], "accuracy_mean": 0.9412, "accuracy_std": 0.001, "time_mean_s": 2.0,
              "time_std_s": 0.1, "time_ratio": 1.5,
              "baseline": {"name": "airbench94", "accuracy_mean": 0.94, "accuracy_std": 0.002,
                           "time_mean_s": 3.0, "time_std_s": 0.05}}
    lines = report_lines(result)
    assert "accuracy 94.12 ± 0.10 %" in lines[1] and "time 2.00 ± 0.10 s" in lines[1]
    assert lines[-1] == "time ratio airbench94 / speedrun_net = 1.50 (speedrun_net is 1.50x faster)"
    result["time_ratio"] = 0.5
    assert report_lines(result)[-1].endswith("(speedrun_net is 2.00x slower)")


def test_data_name_and_device_slug(tmp_path):
    assert data_name(tmp_path) == f"{tmp_path.name} (no manifest)"
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"source": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "lossy_source": False}))
    assert data_name(tmp_path) == "cifar-10-python"
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert device_slug("CPU (x86_64, 2 cores, 2 threads)") == "cpu"


# -----------------------------------------------------------------------------
# the airbench adapter

def test_prepare_workdir_writes_what_airbench_loads(tiny, tmp_path):
    from beton_data import read_beton

    ab.prepare_workdir(tmp_path, tiny / "data", tiny / "original.npz")
    for sub, split, source in (("cifar10", "train", None), ("cifar10", "test", None), ("original", "test", "npz")):
        # airbench 0.1.8 does torch.load(path, map_location=...) with torch's default weights_only=True
        data = torch.load(tmp_path / sub / f"{split}.pt", weights_only=True)
        if source == "npz":
            with np.load(tiny / "original.npz") as z:
                images, labels = z["images"], z["labels"]
        else:
            images, labels = read_beton(tiny / "data" / f"{split}.beton")
        assert data["images"].dtype == torch.uint8 and data["images"].shape == (len(labels), 32, 32, 3)
        assert data["labels"].dtype == torch.int64
        assert np.array_equal(data["images"].numpy(), images) and np.array_equal(data["labels"].numpy(), labels)
        assert data["classes"] == list(ab.CLASSES)
    assert not [p for p in tmp_path.rglob(".*")], "temporary files left behind"


def test_write_split_rejects_bad_arrays(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        ab.write_airbench_split(tmp_path, True, np.zeros((2, 32, 32, 3), np.float32), np.zeros(2))
    with pytest.raises(ValueError, match="labels"):
        ab.write_airbench_split(tmp_path, True, np.zeros((2, 32, 32, 3), np.uint8), np.zeros(3))


def test_baseline_needs_cuda():
    with pytest.raises(UserError, match="needs a CUDA GPU.*--no-baseline"):
        ab.require_cuda("cpu")


def _fake_airbench(calls, fail=False):
    """A stand-in for airbench 0.1.8 with the same entry points and the same data contract."""

    class CifarLoader:
        def __init__(self, path, train=True, batch_size=500, aug=None, altflip=False):
            data = torch.load(f"{path}/{'train' if train else 'test'}.pt", weights_only=True)
            self.images, self.labels, self.train, self.path = data["images"], data["labels"], train, path

    def train94(train_loader, verbose=True):
        if fail:
            raise RuntimeError("CUDA error: out of luck")
        # train94 itself opens the test split by the relative path 'cifar10'
        CifarLoader("cifar10", train=False)
        calls.append(("train94", train_loader.path, train_loader.train, verbose))
        return "model"

    def evaluate(model, loader, tta_level=0):
        calls.append(("evaluate", loader.path, tta_level))
        return 0.5

    hyp = {"opt": {"batch_size": 16}, "aug": {"flip": True, "translate": 2}, "net": {"tta_level": 2}}
    return types.SimpleNamespace(CifarLoader=CifarLoader, train94=train94, evaluate=evaluate,
                                 lib_airbench94=types.SimpleNamespace(hyp=hyp))


def test_baseline_runs_train94_in_the_prepared_folder(tiny, monkeypatch):
    """The adapter's contract with airbench 0.1.8, checked against a stand-in module: loaders open
    'cifar10' (and 'original') relative to the working directory, train94 takes our training
    loader, and evaluate uses airbench's own TTA level."""
    calls = []
    fake = _fake_airbench(calls)
    monkeypatch.setattr(ab, "require_cuda", lambda device: None)
    monkeypatch.setattr(ab, "import_airbench", lambda: fake)
    seen = []
    runs = ab.run_baseline(tiny / "data", "cpu", [0, 1], tiny / "original.npz", on_run=seen.append)
    assert [r["seed"] for r in runs] == [0, 1] and seen == runs
    assert all(r["accuracy"] == 0.5 and r["original_accuracy"] == 0.5 and r["time_s"] > 0 for r in runs)
    assert calls[:3] == [("train94", "cifar10", True, False), ("evaluate", "cifar10", 2),
                         ("evaluate", "original", 2)]
    assert len(calls) == 9  # warm-up + 2 runs


def test_calibrate_reports_the_gap_to_the_published_accuracy(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ab, "require_cuda", lambda device: None)
    monkeypatch.setattr(ab, "import_airbench", lambda: _fake_airbench([]))
    out = tmp_path / "cal.json"
    ab.calibrate(tiny / "data", runs=2, original_npz=tiny / "original.npz", out=out, device="cpu")
    stored = json.loads(out.read_text())
    assert stored["kind"] == "airbench_calibration" and stored["data"] == "cifar10-jpeg-q75 (lossy)"
    assert len(stored["runs"]) == 2 and stored["accuracy_mean"] == 0.5 and stored["original_accuracy_mean"] == 0.5
    assert stored["gap_to_published"] == pytest.approx(0.9401 - 0.5)
    assert "gap +44.01 points" in capsys.readouterr().out


@pytest.mark.parametrize("fail", [False, True])
def test_speedrun_with_baseline(tiny, tmp_path, monkeypatch, fail):
    """The baseline's runs, the time ratio and its leaderboard entry; if the baseline breaks, the
    model's own results are still written and the command fails with a one-line error."""
    monkeypatch.setattr(ab, "require_cuda", lambda device: None)
    monkeypatch.setattr(ab, "import_airbench", lambda: _fake_airbench([], fail=fail))
    out = tmp_path / "r.json"
    args = dict(model="speedrun_net", runs=1, baseline=True, data=tiny / "data", out=out, device="cpu",
                overrides=TINY_RECIPE)
    if fail:
        with pytest.raises(UserError, match="the baseline failed .*out of luck.*written to"):
            speedrun(**args)
    else:
        speedrun(**args)
    stored = json.loads(out.read_text())
    assert len(stored["runs"]) == 1 and 0 <= stored["accuracy_mean"] <= 1
    rows = collect([tmp_path])
    if fail:
        assert stored["baseline"] is None and "out of luck" in stored["baseline_error"]
        assert [r["model"] for r in rows] == ["speedrun_net"]
    else:
        b = stored["baseline"]
        assert b["name"] == "airbench94" and b["accuracy_mean"] == 0.5 and len(b["runs"]) == 1
        assert b["gap_to_published"] == pytest.approx(0.9401 - 0.5)
        assert stored["time_ratio"] == pytest.approx(b["time_mean_s"] / stored["time_mean_s"])
        assert sorted(r["kind"] for r in rows) == ["baseline", "speedrun"]


@pytest.mark.skipif("airbench" in sys.modules, reason="airbench is importable here")
def test_missing_airbench_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "airbench", None)  # makes `import airbench` fail
    with pytest.raises(UserError, match=r"airbench==0\.1\.8"):
        ab.import_airbench()


# -----------------------------------------------------------------------------
# command-line errors

@pytest.mark.parametrize("args, message", [
    (["--runs", "0", "--no-baseline"], "--runs must be at least 1"),
    (["--data", "{tmp}/nowhere", "--no-baseline"], "train.beton; run `fastcifar convert` first"),
    (["--model", "no_such_net", "--no-baseline"], "unknown model 'no_such_net'"),
    (["--set", "epochs", "--no-baseline"], "--set wants FIELD=VALUE"),
    (["--set", "no_field=1", "--no-baseline"], "bad override"),
    (["--original-npz", "{tmp}/missing.npz", "--no-baseline"], "no such .npz file"),
    (["--device", "cpu"], "needs a CUDA GPU"),
    (["--compile-mode", "turbo", "--no-baseline"], "unknown compile mode 'turbo'"),
    (["--target", "93"], "not comparable with the baseline's full runs; add --no-baseline"),
    (["--target", "fast", "--no-baseline"], "--target is an accuracy (94 or 0.94) or 'report', got 'fast'"),
    (["--target", "150", "--no-baseline"], "--target is an accuracy"),
    (["--target", "report", "--no-baseline"], "is a lossy copy of CIFAR-10"),
    (["--calibration", "{tmp}/c.json", "--no-baseline"], "add --target report"),
    (["--no-compile", "--compile-mode", "reduce-overhead", "--no-baseline"],
     "--compile-mode reduce-overhead needs compilation; drop --no-compile or --compile-mode"),
    (["--target", "report", "--calibration", "{tmp}/missing.json", "--no-baseline"], "cannot read it as JSON"),
])
def test_cli_errors(tiny, tmp_path, monkeypatch, capsys, args, message):
    _assert_cli_error("speedrun", tiny, tmp_path, monkeypatch, capsys, args, message)


def _assert_cli_error(command, tiny, tmp_path, monkeypatch, capsys, args, message):
    """`fastcifar COMMAND --out FILE ARGS` exits 1 with a one-line error holding ``message``
    and writes no result."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--data" not in args:
        args += ["--data", str(tiny / "data")]
    monkeypatch.setattr(sys, "argv", ["fastcifar", command, "--out", str(tmp_path / "r.json"), *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "r.json").exists()


# -----------------------------------------------------------------------------
# nothing measured is lost: per-run files, failed runs, a missing baseline, the statistics

def _fake_train(monkeypatch, out, fail_seeds=(), interrupt_seed=None, accuracy=lambda s: 0.90 + s % 100 / 1000,
                seen=None, targets=None):
    """Replace the training of one run by a canned summary (the plumbing, not the training, is
    under test); before each timed run, note how many runs the result file already holds. With
    a target, a run reaches it when its canned accuracy does, after epoch 3 of 4 (``targets``
    collects the target each run was given)."""
    import fastcifar.speedrun as sr

    def fake(model, overrides, model_options, data, run_dir, device, seed, *rest):
        target = rest[4] if len(rest) > 4 else None
        if targets is not None:
            targets.append(target)
        if seen is not None and seed < 10_000:
            seen.append(len(json.loads(out.read_text())["runs"]) if out.exists() else None)
        if seed in fail_seeds:
            raise RuntimeError(f"CUDA out of memory (seed {seed})")
        if seed == interrupt_seed:
            raise sr._Interrupted(f"interrupted by SIGTERM (seed {seed})")
        reached = target is not None and accuracy(seed) >= target
        train_s = 1e-4 * (1 + seed % 3)
        # under CUDA graphs: the warm-up compiled a graph that ran without them; the runs nothing
        graphs = ({"graphs_skipped": int(seed >= 10_000), "reasons": ["mutated inputs"] if seed >= 10_000 else []}
                  if len(rest) > 3 and rest[3] == "reduce-overhead" else None)
        return summary_from_dict({
            "model": model, "status": "target_reached" if reached else "completed", "final_acc": accuracy(seed),
            "device": "CPU (test)", "versions": {"torch": torch.__version__}, "params": 1, "precision": "fp32",
            "bn_backend": "eager", "compile": False, "world_size": 1, "epochs_completed": 3 if reached else 4,
            "target": target, "target_reached": reached,
            "time_to_target": {"epoch": 3, "train_s": train_s} if reached else None,
            "times": {"train_s": train_s, "eval_s": 1e-5, "compile_warmup_s": 0.0, "wall_s": 0.1, "init_s": 0.0},
            "cudagraphs": graphs, "compile_mode": rest[3] if len(rest) > 3 else None})

    monkeypatch.setattr(sr, "_train_once", fake)


def test_failed_run_is_recorded_and_the_others_go_on(tiny, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    seen = []
    _fake_train(monkeypatch, out, fail_seeds={1}, seen=seen)
    with pytest.raises(UserError, match=r"1 of 4 runs failed \(seed 1: RuntimeError: CUDA out of memory"):
        speedrun(runs=4, baseline=False, data=tiny / "data", out=out, device="cpu")
    # the file was rewritten after every run: before run k it already held k runs
    assert seen == [0, 1, 2, 3]
    stored = json.loads(out.read_text())
    assert [("error" in r, r["seed"]) for r in stored["runs"]] == [(False, 0), (True, 1), (False, 2), (False, 3)]
    assert "CUDA out of memory" in stored["runs"][1]["error"] and stored["status"] == "completed"
    accs = [0.900, 0.902, 0.903]
    assert stored["runs_ok"] == 3 and stored["accuracy_mean"] == pytest.approx(np.mean(accs))
    [entry] = stored["entries"]
    assert entry["accuracies"] == pytest.approx(accs) and entry["failed_runs"] == 1 and entry["runs_planned"] == 4
    [row] = collect([tmp_path])
    assert row["runs"] == 3 and row["failed_runs"] == 1


def test_compile_mode_reaches_every_run_and_the_settings(tiny, tmp_path, monkeypatch):
    """--compile-mode goes to every run's training and into the result's settings (so its
    leaderboard entries are told apart); without it the settings do not name one, as before.
    Each run records the graphs it ran without CUDA graphs (the warm-up, which compiles them)."""
    import fastcifar.speedrun as sr

    modes = []
    _fake_train(monkeypatch, tmp_path / "r.json")
    fake = sr._train_once
    monkeypatch.setattr(sr, "_train_once", lambda *a: modes.append(a[10]) or fake(*a))
    with_graphs = speedrun(runs=2, baseline=False, data=tiny / "data", out=tmp_path / "r.json", device="cpu",
                           compile_mode="reduce-overhead")
    assert modes == ["reduce-overhead"] * 3 and with_graphs["settings"]["compile_mode"] == "reduce-overhead"
    plain = speedrun(runs=1, baseline=False, data=tiny / "data", out=tmp_path / "p.json", device="cpu")
    assert modes[3:] == [None, None] and "compile_mode" not in plain["settings"]
    assert with_graphs["entries"][0]["settings"]["compile_mode"] == "reduce-overhead"
    assert "compile_mode" not in plain["entries"][0]["settings"]
    assert with_graphs["warmup"]["cudagraphs"] == {"graphs_skipped": 1, "reasons": ["mutated inputs"]}
    assert [r["cudagraphs"]["graphs_skipped"] for r in with_graphs["runs"]] == [0, 0]
    assert "cudagraphs" not in plain["warmup"] and "cudagraphs" not in plain["runs"][0]


def test_interrupted_speedrun_keeps_finished_runs(tiny, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    _fake_train(monkeypatch, out, interrupt_seed=2)
    with pytest.raises(UserError, match=r"speedrun stopped: interrupted by SIGTERM .*the 2 finished run\(s\) are in"):
        speedrun(runs=5, baseline=False, data=tiny / "data", out=out, device="cpu")
    stored = json.loads(out.read_text())
    assert stored["status"] == "interrupted" and stored["runs_ok"] == 2 and len(stored["runs"]) == 3
    # the leaderboard entry file is current too, not only the result file
    [entry_file] = (tmp_path / ENTRY_DIR).glob("*.json")
    assert json.loads(entry_file.read_text())["accuracies"] == pytest.approx([0.900, 0.901])


def test_speedrun_without_importable_baseline_records_the_model(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.json"
    _fake_train(monkeypatch, out)
    monkeypatch.setattr(ab, "require_cuda", lambda device: None)
    monkeypatch.setitem(sys.modules, "airbench", None)  # `import airbench` fails
    with pytest.raises(UserError, match=r"the baseline is missing \(the baseline needs airbench==0\.1\.8.*written to"):
        speedrun(runs=2, baseline=True, data=tiny / "data", out=out, device="cpu")
    assert "baseline: MISSING" in capsys.readouterr().out  # said before the runs start
    stored = json.loads(out.read_text())
    assert stored["runs_ok"] == 2 and stored["baseline"] is None and stored["baseline_error"].startswith("missing:")
    assert [r["kind"] for r in collect([tmp_path])] == ["speedrun"]


def test_speedrun_statistics_against_the_baseline(tiny, tmp_path, monkeypatch, capsys):
    """Mean, CI and the two one-sided Welch tests in the result file, recomputed here with SciPy;
    5 runs, clearly more accurate and faster than the (stand-in) baseline: a record."""
    from scipy import stats

    from fastcifar.results import ACCURACY_MARGIN

    out = tmp_path / "r.json"
    _fake_train(monkeypatch, out)
    monkeypatch.setattr(ab, "require_cuda", lambda device: None)
    monkeypatch.setattr(ab, "import_airbench", lambda: _fake_airbench([]))
    monkeypatch.setattr(ab.AirbenchBaseline, "run", lambda self, seed: {
        "seed": seed, "accuracy": 0.5 + seed / 100, "time_s": 1.0 + seed / 10})
    result = speedrun(runs=5, baseline=True, data=tiny / "data", out=out, device="cpu")
    stored = json.loads(out.read_text())
    assert stored == json.loads(json.dumps(result))
    acc = np.array([r["accuracy"] for r in stored["runs"]])
    t = np.array([r["time_s"] for r in stored["runs"]])
    b_acc = np.array([r["accuracy"] for r in stored["baseline"]["runs"]])
    b_t = np.array([r["time_s"] for r in stored["baseline"]["runs"]])
    ci = stats.t.interval(0.95, 4, loc=acc.mean(), scale=acc.std(ddof=1) / np.sqrt(5))
    assert stored["accuracy_ci95"] == pytest.approx(list(ci))
    assert stored["baseline"]["time_ci95_s"] == pytest.approx(
        list(stats.t.interval(0.95, 4, loc=b_t.mean(), scale=b_t.std(ddof=1) / np.sqrt(5))))
    c = stored["comparison"]
    assert c["p_accuracy"] == pytest.approx(stats.ttest_ind(acc + ACCURACY_MARGIN, b_acc, equal_var=False,
                                                            alternative="greater").pvalue)
    assert c["p_time"] == pytest.approx(stats.ttest_ind(t, b_t, equal_var=False, alternative="less").pvalue)
    assert c["record"] and c["baseline_runs"] == 5
    printed = capsys.readouterr().out
    assert "95% CI [" in printed and "time lower p = <0.001" in printed and "a record (>= 5 runs" in printed
    # the leaderboard finds the same invocation's baseline and agrees
    [row] = [r for r in collect([tmp_path]) if r["kind"] == "speedrun"]
    assert row["record"] and row["comparison"]["baseline"] == "same invocation"
    assert row["comparison"]["p_time"] == pytest.approx(c["p_time"])


def _logged_sides(monkeypatch, out, base_run):
    """Fake training for ours and ``base_run`` for airbench94, both appending to one log of
    (side, seed) in the order the runs happen."""
    import fastcifar.speedrun as sr

    log = []
    _fake_train(monkeypatch, out)
    ours = sr._train_once

    def train_once(model, overrides, model_options, data, run_dir, device, seed, *rest):
        log.append(("model", seed))
        return ours(model, overrides, model_options, data, run_dir, device, seed, *rest)

    def run(self, seed):
        log.append(("airbench94", seed))
        return base_run(seed)

    monkeypatch.setattr(sr, "_train_once", train_once)
    monkeypatch.setattr(ab, "require_cuda", lambda device: None)
    monkeypatch.setattr(ab, "import_airbench", lambda: _fake_airbench([]))
    monkeypatch.setattr(ab.AirbenchBaseline, "run", run)
    return log


def test_speedrun_alternates_model_and_baseline_runs(tiny, tmp_path, monkeypatch, capsys):
    """Both warm-ups first, then one pair per seed, back to back, the order alternating; every
    timed run records its place in the sequence, and the per-pair time ratio is baseline/model
    per seed."""
    out = tmp_path / "r.json"
    log = _logged_sides(monkeypatch, out, lambda seed: {"seed": seed, "accuracy": 0.9, "time_s": 1e-4 * (seed + 2)})
    speedrun(runs=3, baseline=True, data=tiny / "data", out=out, device="cpu")
    assert log == [("model", 10_000), ("airbench94", -1),
                   ("model", 0), ("airbench94", 0), ("airbench94", 1), ("model", 1), ("model", 2), ("airbench94", 2)]
    stored = json.loads(out.read_text())
    assert [r["order"] for r in stored["runs"]] == [0, 3, 4]
    assert [r["order"] for r in stored["baseline"]["runs"]] == [1, 2, 5]
    ratios = [r_b["time_s"] / r["time_s"] for r, r_b in zip(stored["runs"], stored["baseline"]["runs"])]
    assert len(set(ratios)) == 3   # the fakes' times differ per seed on both sides, so pairing matters
    assert stored["paired_time_ratio"] == pytest.approx(
        {"pairs": 3, "median": float(np.median(ratios)), "min": min(ratios), "max": max(ratios)})
    assert f"per pair run back to back: median {np.median(ratios):.2f}" in capsys.readouterr().out


def test_a_signal_in_a_baseline_run_stops_the_speedrun_with_its_runs_on_disk(tiny, tmp_path, monkeypatch):
    import os
    import signal
    import time

    def base_run(seed):
        if seed == 1:   # SIGTERM from a time limit, in the middle of airbench's second timed run
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            raise AssertionError("the signal did not interrupt the baseline's run")
        return {"seed": seed, "accuracy": 0.9, "time_s": 1.0}

    out = tmp_path / "r.json"
    before = signal.getsignal(signal.SIGTERM)
    log = _logged_sides(monkeypatch, out, base_run)
    with pytest.raises(UserError, match=r"speedrun stopped: interrupted by SIGTERM \(seed 1 of airbench94\); "
                                        r"the 1 finished run\(s\) and 1 of airbench94 are in"):
        speedrun(runs=3, baseline=True, data=tiny / "data", out=out, device="cpu")
    assert log[-1] == ("airbench94", 1)            # nothing ran after the signal
    assert signal.getsignal(signal.SIGTERM) is before  # the process's own handler is back
    stored = json.loads(out.read_text())
    assert stored["status"] == "interrupted" and stored["runs_ok"] == 1
    assert [("error" in r) for r in stored["baseline"]["runs"]] == [False, True]
    assert stored["baseline"]["runs_ok"] == 1


def test_baseline_failures_leave_the_model_runs_and_are_named(tiny, tmp_path, monkeypatch, capsys):
    """A baseline that fails before its first timed run costs only itself; a failing timed run of
    it is recorded and the pairs go on; both end the command with an error naming them."""
    out = tmp_path / "r.json"

    def broken(seed):
        raise RuntimeError("CUDA error: out of luck")

    log = _logged_sides(monkeypatch, out, broken)
    with pytest.raises(UserError, match=r"the baseline failed \(RuntimeError: CUDA error: out of luck\)"):
        speedrun(runs=2, baseline=True, data=tiny / "data", out=out, device="cpu")
    assert log == [("model", 10_000), ("airbench94", -1), ("model", 0), ("model", 1)]
    assert "FAILED before its first timed run" in capsys.readouterr().out
    stored = json.loads(out.read_text())
    assert stored["runs_ok"] == 2 and stored["baseline"] is None

    def flaky(seed):
        if seed == 1:
            raise RuntimeError("CUDA error: an illegal memory access")
        return {"seed": seed, "accuracy": 0.9, "time_s": 1.0}

    log = _logged_sides(monkeypatch, out, flaky)
    with pytest.raises(UserError, match=r"1 of 3 airbench94 runs failed \(seed 1: RuntimeError: CUDA error: an illegal"):
        speedrun(runs=3, baseline=True, data=tiny / "data", out=out, device="cpu")
    assert log[-1] == ("airbench94", 2)            # the pairs went on after the failure
    stored = json.loads(out.read_text())
    assert stored["runs_ok"] == 3 and stored["baseline"]["runs_ok"] == 2
    assert stored["paired_time_ratio"]["pairs"] == 2


def test_calibrate_records_a_failed_run_and_goes_on(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(ab, "require_cuda", lambda device: None)
    monkeypatch.setattr(ab, "import_airbench", lambda: _fake_airbench([]))
    out = tmp_path / "cal.json"
    seen = []

    def run(self, seed):
        if seed >= 0:  # not the warm-up: how many runs the file holds before this one
            seen.append(len(json.loads(out.read_text())["runs"]) if out.exists() else 0)
        if seed == 1:
            raise RuntimeError("CUDA error: an illegal memory access")
        return {"seed": seed, "accuracy": 0.93 + seed / 1000, "time_s": 3.0}

    monkeypatch.setattr(ab.AirbenchBaseline, "run", run)
    with pytest.raises(UserError, match="1 of 3 calibration runs failed"):
        ab.calibrate(tiny / "data", runs=3, out=out, device="cpu")
    assert seen == [0, 1, 2]  # written after every run
    stored = json.loads(out.read_text())
    assert ["error" in r for r in stored["runs"]] == [False, True, False] and stored["runs_ok"] == 2
    assert stored["accuracy_mean"] == pytest.approx(0.931) and stored["accuracy_ci95"] is not None
    # the calibration is a baseline entry: the leaderboard compares other rows on this data and device with it
    [row] = collect([tmp_path])
    assert row["kind"] == "baseline" and row["runs"] == 2 and row["failed_runs"] == 1


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu"], "needs a CUDA GPU"),
    (["--runs", "0"], "--runs must be at least 1"),
    (["--data", "{tmp}/nowhere"], "run `fastcifar convert` first"),
])
def test_calibrate_cli_errors(tiny, tmp_path, monkeypatch, capsys, args, message):
    _assert_cli_error("calibrate", tiny, tmp_path, monkeypatch, capsys, args, message)


def test_unwritable_out_is_one_line_before_any_run(tiny, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("a regular file: nothing can be created under it, not even by root")
    monkeypatch.setattr(sys, "argv", ["fastcifar", "speedrun", "--no-baseline", "--device", "cpu", "--data",
                                      str(tiny / "data"), "--out", str(tmp_path / "file" / "r.json")])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith("error: speedrun --out") and "is a file, not a folder" in err


def test_cli_passes_model_options_and_overrides(monkeypatch):
    from typer.testing import CliRunner

    import fastcifar.speedrun as sr
    from fastcifar.cli import app

    got = {}
    monkeypatch.setattr(sr, "speedrun", lambda **kw: got.update(kw))
    r = CliRunner().invoke(app, ["speedrun", "--no-baseline", "--runs", "1", "--device", "cpu",
                                 "--model-opt", "stem=whiten", "--model-opt", "widths=[8,16,16,16]",
                                 "--set", "alternate_flip=true", "--compile-mode", "reduce-overhead",
                                 "--train-budget-s", "80"])
    assert r.exit_code == 0, r.output
    assert got["compile_mode"] == "reduce-overhead" and got["train_budget_s"] == 80.0
    assert got["model_options"] == {"stem": "whiten", "widths": [8, 16, 16, 16]}
    assert got["overrides"] == {"alternate_flip": "true"}
    assert got["compile"] is None                   # as train decides: on for a GPU
    # --no-compile: the runs go uncompiled, as airbench94 runs
    r = CliRunner().invoke(app, ["speedrun", "--no-baseline", "--runs", "1", "--device", "cpu", "--no-compile"])
    assert r.exit_code == 0, r.output
    assert got["compile"] is False


# -----------------------------------------------------------------------------
# --target: each run stops at it; the zoo models' check against their reports

def _calibration(tmp_path, tiny, gap=0.0333, identity=None):
    from beton_data import check_data

    path = tmp_path / "calibrate_airbench.json"
    path.write_text(json.dumps({"kind": "airbench_calibration", "data": "cifar10-jpeg-q75 (lossy)",
                                "data_sha256": identity or check_data(tiny / "data").identity,
                                "accuracy_mean": 0.9401 - gap, "gap_to_published": gap}))
    return path


def test_target_report_is_the_report_less_the_calibrated_penalty(tiny, tmp_path, monkeypatch, capsys):
    """resnet_2111's report says 93.81%; on a lossy copy whose calibration puts airbench94 3.33
    points below its published 94.01%, every run (the warm-up too) is given 90.48% and stops
    there; the result counts the runs that reached it and their training time to it."""
    out, targets = tmp_path / "r.json", []
    # seeds 0..4 score 90.10, 90.20, ..., 90.50: only the last reaches 90.48
    _fake_train(monkeypatch, out, targets=targets, accuracy=lambda s: 0.9010 + (s % 100) / 1000)
    result = speedrun(model="resnet_2111", runs=5, baseline=False, data=tiny / "data", out=out, device="cpu",
                      target="report", calibration=_calibration(tmp_path, tiny))
    assert targets == [pytest.approx(0.9048)] * 6
    goal = result["target"]
    assert goal["value"] == pytest.approx(0.9048) and goal["published"] == pytest.approx(0.9381)
    assert goal["penalty"] == pytest.approx(0.0333) and goal["from"] == "report" and goal["published_by_report"]
    assert [r["target_reached"] for r in result["runs"]] == [False, False, False, False, True]
    assert goal["runs"] == 5 and goal["reached_runs"] == 1
    reached = result["runs"][4]
    assert reached["epochs"] == 3 and reached["train_to_target_s"] == pytest.approx(2e-4)
    assert reached["time_to_target_s"] == reached["time_s"] and result["runs"][0]["time_to_target_s"] is None
    assert goal["train_to_target_max_s"] == pytest.approx(2e-4)
    assert result["settings"]["target"] == pytest.approx(0.9048)     # its own leaderboard row ...
    assert json.loads(out.read_text())["target"]["reached_runs"] == 1
    [entry] = result["entries"]                                        # ... of its own kind
    assert entry["kind"] == "target" and entry["reached_runs"] == 1 and entry["target"] == pytest.approx(0.9048)
    from fastcifar.leaderboard import render_markdown
    [row] = collect([tmp_path])
    assert row["kind"] == "target" and row["comparison"] is None and not row["record"]
    assert "| resnet_2111 | target 90.48% | fast |" in render_markdown([row]) and "| 5 (1 reached) |" in render_markdown([row])
    printed = capsys.readouterr().out
    assert "target 90.48% (the report's 93.81% less the data's penalty 3.33 points): reached in 1 of 5 runs" in printed
    assert "target MISSED after 4 epochs" in printed and "target reached after epoch 3" in printed


def test_target_report_without_a_published_accuracy_is_94(tiny, tmp_path, monkeypatch):
    targets = []
    _fake_train(monkeypatch, tmp_path / "r.json", targets=targets)
    result = speedrun(model="resnet_353_dropout", runs=1, baseline=False, data=tiny / "data", out=tmp_path / "r.json",
                      device="cpu", target="report", calibration=_calibration(tmp_path, tiny, gap=0.03))
    assert targets == [pytest.approx(0.91)] * 2 and not result["target"]["published_by_report"]
    plain = speedrun(runs=1, baseline=False, data=tiny / "data", out=tmp_path / "p.json", device="cpu", target="91.5")
    assert targets[2:] == [pytest.approx(0.915)] * 2 and plain["target"] == {
        "value": pytest.approx(0.915), "from": "given", "runs": 1, "reached_runs": 0,
        "train_to_target_median_s": None, "train_to_target_max_s": None}
    assert "target_reached" in plain["runs"][0] and "target" not in speedrun(
        runs=1, baseline=False, data=tiny / "data", out=tmp_path / "q.json", device="cpu")


def test_target_report_on_original_pixels_is_the_report(tiny, tmp_path, monkeypatch):
    import shutil

    data = tmp_path / "original"
    shutil.copytree(tiny / "data", data)
    (data / "manifest.json").write_text(json.dumps({"source": "/x/cifar-10-python.tar.gz", "lossy_source": False}))
    targets = []
    _fake_train(monkeypatch, tmp_path / "r.json", targets=targets)
    result = speedrun(model="resnet_2111", runs=1, baseline=False, data=data, out=tmp_path / "r.json",
                      device="cpu", target="report")
    assert targets == [pytest.approx(0.9381)] * 2 and result["target"]["penalty"] == 0
    with pytest.raises(UserError, match="is not a lossy copy"):
        speedrun(model="resnet_2111", runs=1, baseline=False, data=data, out=tmp_path / "q.json", device="cpu",
                 target="report", calibration=_calibration(tmp_path, tiny))


def test_target_refuses_a_calibration_of_other_data(tiny, tmp_path, monkeypatch):
    import fastcifar.train as T

    monkeypatch.setattr(T, "train", lambda cfg: pytest.fail("a run started"))
    other = _calibration(tmp_path, tiny, identity="0123456789abcdef")
    with pytest.raises(UserError, match="measured on other data"):
        speedrun(model="resnet_2111", runs=1, baseline=False, data=tiny / "data", out=tmp_path / "r.json",
                 device="cpu", target="report", calibration=other)
    no_gap = tmp_path / "nogap.json"
    no_gap.write_text(json.dumps({"kind": "bench_train"}))
    with pytest.raises(UserError, match="no measured airbench94 accuracy"):
        speedrun(model="resnet_2111", runs=1, baseline=False, data=tiny / "data", out=tmp_path / "r.json",
                 device="cpu", target="report", calibration=no_gap)
    assert not (tmp_path / "r.json").exists()


def test_a_real_run_stops_at_its_target(tiny, tmp_path):
    """On the CPU with tiny data: a target of 0.1% (one test image of 32 right) is reached after
    the first of three epochs, and the run stops there."""
    result = speedrun(model="speedrun_net", runs=1, baseline=False, data=tiny / "data", out=tmp_path / "r.json",
                      device="cpu", overrides={"epochs": "3", "batch_size": "32"}, target="0.001")
    [run] = result["runs"]
    assert run["target_reached"] and run["epochs"] == 1 and result["warmup"]["target_reached"]
    assert 0 < run["train_to_target_s"] <= run["train_s"] and run["time_to_target_s"] == run["time_s"]
    assert result["target"]["reached_runs"] == 1


def test_warmup_epochs_shorten_the_warmup_only(tiny, tmp_path, capsys):
    """--warmup-epochs 1: the untimed warm-up trains one epoch, the timed runs the recipe's."""
    result = speedrun(model="speedrun_net", runs=1, baseline=False, data=tiny / "data", out=tmp_path / "r.json",
                      device="cpu", overrides={"epochs": "2", "batch_size": "32"}, warmup_epochs=1)
    assert result["warmup"]["epochs_trained"] == 1 and result["recipe_fields"]["epochs"] == 2
    assert "warm-up run (1 epoch): " in capsys.readouterr().out
    assert result["runs"][0]["train_s"] > 0 and "error" not in result["runs"][0]
    with pytest.raises(UserError, match="--warmup-epochs must be at least 1"):
        speedrun(runs=1, baseline=False, data=tiny / "data", out=tmp_path / "q.json", device="cpu", warmup_epochs=0)


def test_budget_epochs_fill_the_training_budget_at_the_warmups_speed():
    """5 s of training an epoch in the warm-up (10.5 s for 2 epochs, 0.5 s of it the data-dependent
    initialisation, which a run does once): 19 epochs fit 100 s (0.5 + 19 x 5 = 95.5), 20 would
    not; a budget below one epoch still trains one."""
    from fastcifar.speedrun import budget_epochs

    warm = summary_from_dict({"steps": 194, "epochs_completed": 2,
                              "times": {"train_s": 10.5, "init_s": 0.5, "compile_warmup_s": 30.0}})
    assert budget_epochs(warm, 100.0) == {"train_budget_s": 100.0, "epoch_train_s": 5.0, "init_s": 0.5,
                                          "epochs": 19}
    assert budget_epochs(warm, 105.5)["epochs"] == 21 and budget_epochs(warm, 3.0)["epochs"] == 1
    with pytest.raises(UserError, match="no whole epoch"):
        budget_epochs(summary_from_dict({"steps": 3, "epochs_completed": 0, "times": warm.times}), 100.0)


def test_train_budget_sets_the_timed_runs_epochs(tiny, tmp_path, monkeypatch, capsys):
    """--train-budget-s: the warm-up measures, the timed runs train the epochs that fit, and the
    result (recipe, overrides, settings of its leaderboard entry) says so; the budget cannot be
    combined with --set epochs, and must be positive."""
    import fastcifar.speedrun as sr

    given = []
    _fake_train(monkeypatch, tmp_path / "r.json")
    fake = sr._train_once
    monkeypatch.setattr(sr, "_train_once", lambda *a: given.append(dict(a[1])) or fake(*a))
    # the canned warm-up (seed 10000) trains 4 epochs in 2e-4 s: 5e-5 s an epoch
    result = speedrun(runs=2, baseline=False, data=tiny / "data", out=tmp_path / "r.json", device="cpu",
                      overrides={"batch_size": "32"}, train_budget_s=0.0011)
    budget = result["budget"]
    assert budget["epoch_train_s"] == pytest.approx(5e-5) and budget["epochs"] == int(0.0011 // budget["epoch_train_s"])
    assert given[0] == {"batch_size": "32"}                                     # the warm-up: the recipe's
    assert given[1:] == [{"batch_size": "32", "epochs": budget["epochs"]}] * 2   # the timed runs
    assert result["recipe_fields"]["epochs"] == budget["epochs"] == result["overrides"]["epochs"]
    assert result["settings"]["epochs"] == result["entries"][0]["settings"]["epochs"] == budget["epochs"]
    assert f"epochs: {budget['epochs']}, to fill the 0.0011 s training budget" in capsys.readouterr().out
    with pytest.raises(UserError, match="drop --set epochs"):
        speedrun(runs=1, baseline=False, data=tiny / "data", out=tmp_path / "q.json", device="cpu",
                 overrides={"epochs": "3"}, train_budget_s=60)
    with pytest.raises(UserError, match="positive number of seconds"):
        speedrun(runs=1, baseline=False, data=tiny / "data", out=tmp_path / "q.json", device="cpu", train_budget_s=0)
    assert not (tmp_path / "q.json").exists()
