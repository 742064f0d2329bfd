"""`fastcifar train` / `fastcifar eval` end to end on tiny synthetic data (CPU)."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from typer.testing import CliRunner

from fastcifar.errors import UserError
from fastcifar.train import TrainConfig, train
from train_helpers import CLI, MODEL, TINY, make_data, small_config, subprocess_env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """One finished 6-epoch run of the tiny model (shared by the tests that read a run)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    summary = train(small_config(data, out, overrides=dict(epochs=6)))
    return out, summary


def test_learns_the_synthetic_task(run):
    out, s = run
    assert s["status"] == "completed" and s["epochs_completed"] == 6 and s["steps"] == 60
    assert s["final_acc"] > 0.6, s["final_acc"]          # chance is 0.1
    assert s["best_acc"] >= s["final_acc"]
    assert set(s["per_class_acc"]) == {"airplane", "automobile", "bird", "cat", "deer",
                                       "dog", "frog", "horse", "ship", "truck"}


def test_run_folder_contents(run):
    out, s = run
    for name in ("config.json", "metrics.jsonl", "summary.json", "curves.png", "confusion.png", "last.pt"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*tmp*"))                   # no temporary files left behind
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert {"epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
            "images_per_s", "epoch_time_s", "eval_time_s"} <= set(lines[0])
    assert lines[-1]["test_acc"] == s["final_acc"]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["final_acc"] == s["final_acc"] and saved["params"] == s["params"]
    assert {"torch", "triton", "ffcv", "numba", "numpy", "python"} <= set(saved["versions"])
    t = saved["times"]
    assert t["train_s"] > 0 and t["compile_warmup_s"] >= 0 and t["eval_s"] > 0
    assert t["train_s"] + t["compile_warmup_s"] + t["eval_s"] <= t["wall_s"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["recipe"]["epochs"] == 6 and cfg["config"]["model_options"] == TINY


def test_eval_command_reproduces_the_run(run):
    out, s = run
    from fastcifar.cli import app

    result = CliRunner().invoke(app, ["eval", str(out), "--json", "--tta", "none"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    assert r["acc"] == pytest.approx(s["final_acc"]) and r["n"] == 200
    assert len(r["per_class_acc"]) == 10
    flipped = CliRunner().invoke(app, ["eval", str(out / "last.pt"), "--tta", "flip"])
    assert flipped.exit_code == 0 and "accuracy" in flipped.output and "airplane" in flipped.output
    assert "(TTA flip)" in flipped.output                  # the option reaches the evaluation


def test_eval_on_another_beton_and_missing_one(run, tmp_path):
    out, _ = run
    from fastcifar.evaluate import run_eval

    other = make_data(tmp_path / "other", n_train=20, n_test=30, seed=5)
    r = run_eval(out, beton=other / "test.beton", quiet=True)
    assert r["n"] == 30
    with pytest.raises(UserError, match="fastcifar convert"):
        run_eval(out, data=tmp_path / "nowhere", quiet=True)


def test_target_stops_early_and_records_time(data, tmp_path):
    s = train(small_config(data, tmp_path / "run", target=0.15, overrides=dict(epochs=6)))
    assert s["status"] == "target_reached" and s["target_reached"]
    assert s["epochs_completed"] < 6 and s["final_acc"] >= 0.15
    assert s["time_to_target"]["epoch"] == s["epochs_completed"] and s["time_to_target"]["train_s"] > 0


def test_resume_is_bit_identical(data, tmp_path, monkeypatch):
    """3 epochs straight == stopped mid-epoch 2, resumed, stopped at the end of epoch 2, resumed
    to 3; with Lookahead, EMA, a plateau schedule and dropout (so the RNG state matters too):
    every piece of state must survive."""
    import fastcifar.models as zoo

    real = zoo.create_model
    monkeypatch.setattr(zoo, "create_model", lambda name, **kw: torch.nn.Sequential(torch.nn.Dropout(0.1), real(name, **kw)))
    extra = dict(lookahead_k=3, ema=0.8, schedule="plateau", patience=0, gamma=0.5)
    straight = train(small_config(data, tmp_path / "a", overrides=extra))
    first = train(small_config(data, tmp_path / "b", max_steps=13, overrides=extra))
    assert first["status"] == "max_steps" and first["steps"] == 13
    second = train(TrainConfig(resume=str(tmp_path / "b"), max_steps=20, progress=False))
    assert second["steps"] == 20 and second["epochs_completed"] == 2
    final = train(TrainConfig(resume=str(tmp_path / "b"), progress=False))
    assert final["status"] == "completed" and final["steps"] == straight["steps"] == 30

    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert len(a["lookahead"]["slow"]) == len(b["lookahead"]["slow"]) > 0
    for sa, sb in zip(a["lookahead"]["slow"], b["lookahead"]["slow"]):
        assert torch.equal(sa, sb)
    assert a["lookahead"]["count"] == b["lookahead"]["count"]
    assert a["schedule"] == b["schedule"]
    mom_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    mom_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert len(mom_a) == len(mom_b) > 0 and all(torch.equal(x, y) for x, y in zip(mom_a, mom_b))
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])   # dropout's generator too
    # and the logged history is the same, epoch by epoch
    la = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    keys = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc")
    assert [[r[k] for k in keys] for r in la] == [[r[k] for k in keys] for r in lb]


def test_refuses_to_overwrite_a_run(data, tmp_path):
    train(small_config(data, tmp_path / "run", max_steps=1))
    with pytest.raises(UserError, match="--resume"):
        train(small_config(data, tmp_path / "run", max_steps=1))


def test_errors_are_one_line_user_errors(data, tmp_path):
    with pytest.raises(UserError, match="unknown model 'nope'.*resnet_2111"):
        train(TrainConfig(model="nope", data=str(data), out=str(tmp_path / "x"), progress=False))
    with pytest.raises(UserError, match="run `fastcifar convert`"):
        train(small_config(tmp_path / "no_data", tmp_path / "y"))
    with pytest.raises(UserError, match="unknown recipe field 'learning_rate'"):
        train(small_config(data, tmp_path / "z", overrides=dict(learning_rate="0.1")))
    with pytest.raises(UserError, match="bad recipe: optimizer"):
        train(small_config(data, tmp_path / "w", overrides=dict(optimizer="rmsprop")))
    with pytest.raises(UserError, match="has no option depth"):
        train(TrainConfig(model=MODEL, model_options={"depth": 3}, data=str(data), out=str(tmp_path / "v"),
                          progress=False))
    with pytest.raises(UserError, match="nothing to resume"):
        train(TrainConfig(resume=str(tmp_path / "empty"), progress=False))
    assert list(tmp_path.iterdir()) == []                 # no run folder left behind by any of them


def test_cli_train_help_and_errors(data, tmp_path):
    from fastcifar.cli import app

    runner = CliRunner()
    help_text = runner.invoke(app, ["train", "--help"]).output
    for flag in ("--model", "--recipe", "--set", "--resume", "--target", "--tta", "--ema", "--loader",
                 "--bn-backend", "--precision", "--compile"):
        assert flag in help_text
    assert runner.invoke(app, ["eval", "--help"]).exit_code == 0
    env = subprocess_env()
    bad_model = subprocess.run(CLI + ["train", "--model", "nope", "--data", str(data), "--out", str(tmp_path / "r")],
                               capture_output=True, text=True, env=env, timeout=120)
    assert bad_model.returncode == 1
    assert bad_model.stderr.startswith("error: unknown model 'nope'; known models:") and "resnet_2111" in bad_model.stderr
    assert "Traceback" not in bad_model.stderr
    bad_set = subprocess.run(CLI + ["train", "--model", MODEL, "--data", str(data), "--set", "lr"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert bad_set.returncode == 1 and "--set wants FIELD=VALUE" in bad_set.stderr


def test_cli_train_runs_and_sets_fields(data, tmp_path):
    from fastcifar.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", "--model", MODEL, "--model-opt", "widths=[8,16,16,16]", "--data", str(data),
        "--out", str(out), "--epochs", "1", "--batch-size", "64", "--lr", "0.1", "--no-progress",
        "--set", "optimizer=adamw", "--set", "milestones=1,2", "--set", "nesterov=false", "--tta", "flip"])
    assert result.exit_code == 0, result.output
    recipe = json.loads((out / "config.json").read_text())["recipe"]
    assert recipe["optimizer"] == "adamw" and recipe["milestones"] == [1, 2] and recipe["tta"] == "flip"
    assert recipe["nesterov"] is False and recipe["epochs"] == 1 and recipe["lr"] == 0.1
    assert "test accuracy" in result.output


def test_config_file_then_overrides(data, tmp_path):
    conf = tmp_path / "recipe.json"
    conf.write_text(json.dumps({"optimizer": "adam", "lr": 0.003, "epochs": 2, "cutout": 8}))
    cfg = small_config(data, tmp_path / "run", max_steps=1, config_file=str(conf))
    cfg.overrides = {"lr": "0.001", "batch_size": 64}   # the command line wins over the file
    train(cfg)
    recipe = json.loads((tmp_path / "run" / "config.json").read_text())["recipe"]
    assert (recipe["optimizer"], recipe["lr"], recipe["epochs"], recipe["cutout"]) == ("adam", 0.001, 2, 8)
    with pytest.raises(UserError, match="batch size 1024 is larger than the training set"):
        cfg.overrides, cfg.out = {}, str(tmp_path / "r1")
        train(cfg)
    with pytest.raises(UserError, match="no config file"):
        train(small_config(data, tmp_path / "r2", config_file=str(tmp_path / "missing.json")))


def test_report_zoo_model_takes_a_step(data, tmp_path):
    """A full-size report model through the real path: one step, batch 8."""
    s = train(TrainConfig(model="resnet_2111", recipe_tag="report", data=str(data), out=str(tmp_path / "r"),
                          overrides=dict(batch_size=8), max_steps=1, progress=False))
    assert s["steps"] == 1 and s["params"] > 4_000_000
