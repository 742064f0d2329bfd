"""A run's life beyond one uninterrupted process: resume rules, kills, locks, read-only
places, step limits, and the settings a user changes (batch size, number of classes), and
TensorBoard."""
from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from beton_data import write_beton
from fastcifar.config import resolve_recipe
from fastcifar.errors import UserError
from fastcifar.train import TrainConfig, train
from train_helpers import CLI, MODEL, TINY, make_data, small_config, subprocess_env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def _start(data, out, epochs=1000, extra=()):
    cmd = CLI + ["train", "--model", MODEL, "--model-opt", "widths=[8,16,16,16]", "--data", str(data),
                 "--out", str(out), "--epochs", str(epochs), "--batch-size", "64", "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())


def _wait_for_epochs(proc, out, n, timeout=180):
    deadline = time.time() + timeout
    while True:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n and (out / "last.pt").exists():
            return
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"fewer than {n} epochs within {timeout} s"
        time.sleep(0.1)


# -----------------------------------------------------------------------------
# resume: which options may change

def test_resume_refuses_options_that_would_change_the_run(data, tmp_path):
    out = tmp_path / "run"
    train(small_config(data, out, max_steps=3))
    with pytest.raises(UserError) as e:
        train(TrainConfig(resume=str(out), model="resnet_2111", overrides=dict(epochs=5, batch_size=64, lr=0.5),
                          progress=False))
    msg = str(e.value)
    assert "cannot change: --model, recipe field epochs, recipe field lr" in msg
    assert "batch_size" not in msg             # 64 is what the run has: no conflict
    assert "allowed with --resume: --data, --device" in msg and "\n" not in msg
    # the run is untouched, and options that may change are applied
    s = train(TrainConfig(resume=str(out), overrides=dict(batch_size=64), max_steps=5, eval_every=2,
                          target=0.99, progress=False))
    assert s["steps"] == 5 and s["target"] == 0.99
    assert json.loads((out / "config.json").read_text())["config"]["eval_every"] == 2


def test_cli_resume_with_conflicting_flags_is_one_line(data, tmp_path):
    out = tmp_path / "run"
    train(small_config(data, out, max_steps=2))
    r = subprocess.run(CLI + ["train", "--resume", str(out), "--model", "resnet_2111", "--epochs", "5",
                              "-b", "32", "--lr", "0.5"], capture_output=True, text=True, env=subprocess_env(),
                       timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: --resume continues") and len(r.stderr.strip().splitlines()) == 1
    for flag in ("--model", "epochs", "batch_size", "lr"):
        assert flag in r.stderr


# -----------------------------------------------------------------------------
# kills: timings that add up, temporary files cleaned, one writer at a time

def test_sigkill_then_resume_keeps_the_time_of_every_session(data, tmp_path):
    """Killed after 2 epochs, resumed to 4: every epoch's training time is in the totals (the
    killed session's included), elapsed time never goes backwards, nothing is negative."""
    out = tmp_path / "run"
    proc = _start(data, out, epochs=4)
    try:
        _wait_for_epochs(proc, out, 2)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = len((out / "metrics.jsonl").read_text().splitlines())
    assert done < 4
    s = train(TrainConfig(resume=str(out), progress=False))
    assert s["status"] == "completed" and s["epochs_completed"] == 4
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    t = s["times"]
    assert t["train_incl_warmup_s"] >= 0.99 * sum(r["epoch_time_s"] for r in history)
    assert min(t.values()) >= 0, t
    assert t["setup_s"] + t["train_incl_warmup_s"] + t["eval_s"] + t["checkpoint_s"] <= t["wall_s"] * 1.0001
    elapsed = [r["elapsed_s"] for r in history]
    assert elapsed == sorted(elapsed)
    assert s["train_time_s"] == t["train_s"] > 0


def test_leftover_temporary_checkpoint_is_removed_on_resume(data, tmp_path):
    out = tmp_path / "run"
    train(small_config(data, out, max_steps=2))
    dead = 2 ** 22 + 12345           # above any pid this machine hands out
    stale = [out / f".last.pt.{dead}.abc123.tmp", out / ".last.pt.k2j4x9.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    train(TrainConfig(resume=str(out), max_steps=3, progress=False))
    assert not any(p.exists() for p in stale)


def test_a_run_folder_has_one_writer(data, tmp_path):
    """--resume of a folder another process is training in is refused at once; once that
    process is killed (its lock dies with it), the resume goes ahead."""
    out = tmp_path / "run"
    proc = _start(data, out)
    try:
        _wait_for_epochs(proc, out, 1)
        with pytest.raises(UserError, match=r"is in use: process \d+ is training in"):
            train(TrainConfig(resume=str(out), max_steps=1, progress=False))
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpt = torch.load(out / "last.pt", weights_only=False)
    s = train(TrainConfig(resume=str(out), max_steps=ckpt["state"]["step"] + 1, progress=False))
    assert s["steps"] == ckpt["state"]["step"] + 1


# -----------------------------------------------------------------------------
# places that cannot be written, step limits, a second Ctrl-C

def test_unwritable_run_folder_is_one_line_before_any_work(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = subprocess.run(CLI + ["train", "--model", MODEL, "--data", str(data), "--out", str(blocker / "run")],
                       capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: run folder") and "is a file" in r.stderr


def test_a_checkpoint_rebuilds_its_network_after_a_default_changes(data, tmp_path, monkeypatch):
    """The run records every builder option (defaults included): after a default changes,
    --resume and `fastcifar evaluate` still build the network the run trained, not today's."""
    import inspect

    from fastcifar.evaluate import run_eval
    from fastcifar.models import full_model_options, registry

    out = tmp_path / "run"
    train(small_config(data, out, max_steps=4))
    ckpt = torch.load(out / "last.pt", weights_only=False)
    full = ckpt["model_options_full"]
    assert full == full_model_options(MODEL, **TINY) and full["act"] == "relu" and full["widths"] == TINY["widths"]
    assert json.loads((out / "config.json").read_text())["model_options_full"] == full
    # the builder's default activation changes from relu to gelu
    original = registry._REGISTRY[MODEL]["builder"]
    built = []

    def changed(**kw):
        kw.setdefault("act", "gelu")
        built.append(kw["act"])
        return original(**kw)

    sig = inspect.signature(original)
    changed.__signature__ = sig.replace(parameters=[p.replace(default="gelu") if p.name == "act" else p
                                                    for p in sig.parameters.values()])
    monkeypatch.setitem(registry._REGISTRY[MODEL], "builder", changed)
    assert full_model_options(MODEL, **TINY)["act"] == "gelu"       # a fresh run would get GELU
    s = train(TrainConfig(resume=str(out), progress=False))           # to the end of the run
    r = run_eval(out, quiet=True)
    assert built == ["relu", "relu"]                                  # the resumed run, the evaluation
    assert s["status"] == "completed" and r["acc"] == pytest.approx(s["final_acc"])


def test_max_steps_says_where_it_stopped(data, tmp_path, capsys):
    out = tmp_path / "run"
    s = train(small_config(data, out, max_steps=4))
    assert s["status"] == "max_steps"
    said = capsys.readouterr().out
    assert f"stopped after 4 steps (--max-steps 4): checkpoint written to {out / 'last.pt'}" in said
    assert f"fastcifar train --resume {out}" in said


def test_second_ctrl_c_names_the_run_folder(data, tmp_path, monkeypatch):
    import fastcifar.models as zoo
    from fastcifar.cli import app

    real = zoo.create_model

    def interrupting(name, **kw):
        model = real(name, **kw)
        calls = {"n": 0}

        def hook(module, args):
            calls["n"] += 1
            if calls["n"] == 13:       # after the first epoch's checkpoint (10 steps, 2 flip-TTA views)
                raise KeyboardInterrupt
        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(zoo, "create_model", interrupting)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--model", MODEL, "--model-opt", "widths=[8,16,16,16]", "--data", str(data),
                                 "--out", str(out), "--epochs", "3", "-b", "64", "--set", "tta=flip", "--no-progress"])
    assert r.exit_code == 130
    assert f"continue with --resume {out}" in r.output and "RUN_DIR" not in r.output
    assert (out / "last.pt").exists()


# -----------------------------------------------------------------------------
# settings a user changes

def test_batch_size_alone_scales_the_learning_rate(data, tmp_path):
    recipe, notes = resolve_recipe("speedrun_net", "fast", None, {"batch_size": "256"})
    assert recipe.lr == pytest.approx(0.8 * 256 / 1024)            # SGD: linear
    assert "learning rate 0.8 -> 0.2 (linear scaling for sgd" in notes[0]
    recipe, notes = resolve_recipe("speedrun_net", "fast", None, {"batch_size": "256", "optimizer": "adam"})
    assert recipe.lr == pytest.approx(0.8 * 0.5)                    # Adam: square root
    recipe, notes = resolve_recipe("speedrun_net", "fast", None, {"batch_size": "256", "lr": "0.3"})
    assert recipe.lr == 0.3 and not notes                           # --lr wins
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"lr": 0.05}))
    recipe, notes = resolve_recipe("speedrun_net", "fast", str(conf), {"batch_size": "256"})
    assert recipe.lr == 0.05 and not notes                          # so does a config file's lr
    from fastcifar.models import get_recipe
    report = get_recipe("resnet_2111", "report")
    recipe, notes = resolve_recipe("resnet_2111", "report", None, {"batch_size": "64"})
    assert recipe.optimizer == "adam" and recipe.lr == pytest.approx(report.lr * (64 / report.batch_size) ** 0.5)


def test_scaled_learning_rate_is_printed_and_recorded(data, tmp_path):
    from fastcifar.cli import app

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--model", MODEL, "--model-opt", "widths=[8,16,16,16]", "--data", str(data),
                                 "--out", str(out), "--epochs", "1", "-b", "16", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "note: batch size 16 instead of the recipe's 1024: learning rate 0.8 -> 0.0125" in r.output
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"]["lr"] == pytest.approx(0.0125) and "0.8 -> 0.0125" in config["notes"][0]


def test_number_of_classes_comes_from_the_data(tmp_path):
    """A 5-class data set: the model, the loss, the evaluation, the confusion matrix and the
    per-class figures all have 5 classes; a conflicting --model-opt num_classes is refused."""
    rng = np.random.default_rng(0)
    from train_helpers import PALETTE
    folder = tmp_path / "five"
    for split, n in (("train", 320), ("test", 100)):
        labels = np.arange(n) % 5
        images = PALETTE[labels][:, None, None, :] + rng.normal(0, 30, (n, 32, 32, 3))
        write_beton(folder / f"{split}.beton", np.clip(images, 0, 255).astype(np.uint8), labels)
    s = train(small_config(folder, tmp_path / "run", overrides=dict(epochs=3)))
    assert list(s["per_class_acc"]) == ["0", "1", "2", "3", "4"] and s["final_acc"] > 0.3   # chance: 0.2
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert ckpt["num_classes"] == 5 and ckpt["model"]["fc.weight"].shape[0] == 5
    from fastcifar.evaluate import run_eval
    r = run_eval(tmp_path / "run", quiet=True)
    assert len(r["confusion"]) == 5 and r["acc"] == pytest.approx(s["final_acc"])
    with pytest.raises(UserError, match="has 5 classes; the model's number of classes comes from the data"):
        train(TrainConfig(model=MODEL, model_options=dict(TINY, num_classes=10), data=str(folder),
                          out=str(tmp_path / "r2"), overrides=dict(batch_size=64), progress=False))
    s = train(TrainConfig(model=MODEL, model_options=dict(TINY, num_classes=5), data=str(folder),
                          out=str(tmp_path / "r3"), overrides=dict(batch_size=64), max_steps=1, progress=False))
    assert s["steps"] == 1


# -----------------------------------------------------------------------------
# TensorBoard

def test_tensorboard_events_per_step_and_per_epoch(data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    s = train(small_config(data, out, overrides=dict(epochs=2)))      # on by default when installed
    ea = EventAccumulator(str(out))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_s", "test/acc", "test/loss", "train/acc_epoch",
            "time/epoch_time_s", "test_per_class/airplane"} <= tags
    loss = ea.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, s["steps"] + 1))
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in ea.Scalars("test/acc")] == pytest.approx([r["test_acc"] for r in history])
    lr = {e.step: e.value for e in ea.Scalars("train/lr")}
    assert [lr[r["step"]] for r in history] == pytest.approx([r["lr"] for r in history])


def test_tensorboard_off_and_missing(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(small_config(data, out, max_steps=2, tensorboard=False))
    assert not list(out.glob("events.out.tfevents*"))
    import fastcifar.runlog as R
    monkeypatch.setattr(R, "tensorboard_available", lambda: False)
    with pytest.raises(UserError, match="--tensorboard needs the tensorboard package"):
        train(small_config(data, tmp_path / "r2", tensorboard=True))
    s = train(small_config(data, tmp_path / "r3", max_steps=1))        # default: off without it
    assert s["steps"] == 1 and not list((tmp_path / "r3").glob("events.out.tfevents*"))


def test_checkpoint_of_an_older_format_is_refused_with_a_reason(data, tmp_path):
    out = tmp_path / "run"
    train(small_config(data, out, max_steps=2))
    ckpt = torch.load(out / "last.pt", weights_only=False)
    ckpt["format"] = 1
    torch.save(ckpt, out / "last.pt")
    with pytest.raises(UserError, match=r"older fastcifar \(checkpoint format 1.*`fastcifar eval .*` still scores it"):
        train(TrainConfig(resume=str(out), progress=False))
