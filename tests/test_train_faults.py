"""Faults: SIGTERM mid-run, a diverging loss, and two processes with torch.distributed (gloo)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest
import torch
import torch.multiprocessing as mp

from fastcifar.errors import UserError
from fastcifar.train import TrainConfig, train
from train_helpers import CLI, MODEL, make_data, small_config, subprocess_env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def test_sigterm_saves_a_checkpoint_and_resumes(data, tmp_path):
    out = tmp_path / "run"
    cmd = CLI + ["train", "--model", MODEL, "--model-opt", "widths=[8,16,16,16]", "--data", str(data),
                 "--out", str(out), "--epochs", "1000", "--batch-size", "64", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        deadline = time.time() + 120
        while not (out / "last.pt").exists():  # the first epoch's checkpoint
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted by SIGTERM" in stdout + stderr and "--resume" in stdout + stderr
    assert "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] >= 10
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["state"]["step"] == summary["steps"]

    resumed = train(TrainConfig(resume=str(out), max_steps=summary["steps"] + 3, progress=False))
    assert resumed["status"] == "max_steps" and resumed["steps"] == summary["steps"] + 3
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, len(lines) + 1))  # no gaps, no repeats


def test_sigint_stops_after_the_current_step(data, tmp_path, monkeypatch):
    """Ctrl-C during step 15 (mid-epoch 2): that step finishes, a checkpoint records the position."""
    import fastcifar.models as zoo

    real = zoo.create_model
    calls = {"n": 0}

    def interrupting(name, **kw):
        model = real(name, **kw)

        def hook(module, args):
            if module.training:
                calls["n"] += 1
                if calls["n"] == 15:
                    os.kill(os.getpid(), signal.SIGINT)
        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(zoo, "create_model", interrupting)
    s = train(small_config(data, tmp_path / "run", overrides=dict(epochs=4)))
    assert s["signal"] == signal.SIGINT and s["status"] == "interrupted" and s["steps"] == 15
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert (ckpt["state"]["epoch"], ckpt["state"]["batch"], ckpt["state"]["step"]) == (1, 5, 15)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handler given back


def test_diverging_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch):
    """Logits turn NaN in the third epoch: a clear error, the epoch-2 checkpoint kept intact."""
    import fastcifar.models as zoo

    real = zoo.create_model
    calls = {"n": 0}

    def poisoned(name, **kw):
        model = real(name, **kw)

        def hook(module, args, out):
            if module.training:
                calls["n"] += 1
                if calls["n"] > 25:          # 10 steps per epoch: poison step 26 (epoch 3)
                    return out * float("nan")
            return out
        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(zoo, "create_model", poisoned)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"non-finite in epoch 3 .*last good checkpoint .*last.pt is kept"):
        train(small_config(data, out, overrides=dict(epochs=5)))
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["state"]["epoch"] == 2 and ckpt["state"]["step"] == 20
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_out_of_memory_suggests_a_smaller_batch(data, tmp_path, monkeypatch):
    import fastcifar.models as zoo

    real = zoo.create_model

    def oom(name, **kw):
        model = real(name, **kw)

        def hook(module, args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(zoo, "create_model", oom)
    with pytest.raises(UserError, match="out of memory at batch size 64; try a smaller --batch-size, e.g. --batch-size 32"):
        train(small_config(data, tmp_path / "run"))


def test_huge_learning_rate_is_reported(data, tmp_path):
    with pytest.raises(UserError, match="diverged.*lower --lr"):
        train(small_config(data, tmp_path / "run", overrides=dict(lr=1e30, schedule="constant",
                                                                  optimizer="adadelta")))


# -----------------------------------------------------------------------------
# DDP on the CPU: 2 processes, gloo

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, data, out, weights_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import train_helpers  # noqa: F401  (registers the tiny model in this process)
    import fastcifar.models as zoo

    built = []
    real = zoo.create_model
    zoo.create_model = lambda name, **kw: built.append(real(name, **kw)) or built[-1]
    from pathlib import Path
    from fastcifar.train import train as run

    summary = run(small_config(Path(data), Path(out), overrides=dict(epochs=2, batch_size=64, lookahead_k=2, ema=0.5)))
    torch.save({"model": built[0].state_dict(), "summary": summary}, Path(weights_dir) / f"rank{rank}.pt")


def test_ddp_two_cpu_processes(data, tmp_path):
    out, weights = tmp_path / "run", tmp_path / "weights"
    weights.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(data), str(out), str(weights)), nprocs=2, join=True)
    r0 = torch.load(weights / "rank0.pt", weights_only=False)
    r1 = torch.load(weights / "rank1.pt", weights_only=False)
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    s0, s1 = r0["summary"], r1["summary"]
    assert s0["world_size"] == 2 and s0["steps"] == 2 * 10      # 640 images / (2 ranks x 32)
    assert s0["final_acc"] == s1["final_acc"]                     # the evaluation is all-reduced
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2                                        # written once, by rank 0
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert all(torch.equal(ckpt["model"][k], r0["model"][k]) for k in ckpt["model"])
