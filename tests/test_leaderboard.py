"""The leaderboard: entry files, pooling of train summaries, rendering, concurrent writers, CLI."""
from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
from pathlib import Path

import pytest

from fastcifar.leaderboard import ENTRY_DIR, add_entry, collect, leaderboard, render_markdown
from fastcifar.results import mean_std

REPO = Path(__file__).resolve().parents[1]


def _entry(model="speedrun_net", accs=(0.940, 0.942), times=(5.0, 5.2), **kw):
    return {"model": model, "recipe": "fast", "device": "NVIDIA H100 80GB HBM3", "data": "cifar10-jpeg-q75 (lossy)",
            "accuracies": list(accs), "times_s": list(times), "versions": {"torch": "2.11.0"}, **kw}


def test_mean_std():
    assert mean_std([2.0]) == (2.0, None)
    m, s = mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)


def test_add_entry_then_collect(tmp_path):
    p = add_entry(tmp_path, _entry())
    assert p.parent == tmp_path / ENTRY_DIR and p.suffix == ".json"
    stored = json.loads(p.read_text())
    assert stored["id"] and stored["date"] and stored["kind"] == "speedrun"
    [row] = collect([tmp_path])
    assert row["runs"] == 2
    assert row["accuracy_mean"] == pytest.approx(0.941)
    assert row["accuracy_std"] == pytest.approx(0.0014142, rel=1e-3)
    assert row["time_mean_s"] == pytest.approx(5.1)


@pytest.mark.parametrize("bad, message", [
    ({"model": "m"}, "lacks"),
    (_entry(accs=()), "non-empty"),
    (_entry(accs=(0.9,), times=(1.0, 2.0)), "one value per run"),
    (_entry(accs=(94.0, 93.0)), "fractions"),
    (_entry(kind="nonsense"), "kind"),
])
def test_add_entry_rejects_malformed(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        add_entry(tmp_path, bad)
    assert not (tmp_path / ENTRY_DIR).exists() or not list((tmp_path / ENTRY_DIR).iterdir())


def test_rows_from_all_sources_deduplicated_and_sorted(tmp_path):
    # a speedrun result file and the entries the same invocation recorded share their ids
    ours = add_entry(tmp_path, _entry(id="run1", accs=(0.941, 0.943), times=(4.0, 4.4)))
    base = add_entry(tmp_path, _entry(model="airbench94", kind="baseline", id="run1-baseline",
                                      accs=(0.935, 0.937), times=(3.0, 3.1)))
    result = {"kind": "speedrun_result", "entries": [json.loads(ours.read_text()), json.loads(base.read_text())]}
    (tmp_path / "speedrun_speedrun_net_h100.json").write_text(json.dumps(result))
    # two train runs of one configuration pool into one row; a third on other data stays apart
    # (keys as train.py writes them; the data name comes from the data folder's manifest)
    for name, source, lossy in (("orig", "/x/cifar-10-python.tar.gz", False), ("jpeg", "/x/cifar10-jpeg-q75.tar.gz", True)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"source": source, "lossy_source": lossy}))
    for i, (acc, data) in enumerate([(0.95, "orig"), (0.96, "orig"), (0.90, "jpeg")]):
        run = tmp_path / "runs" / f"r{i}"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({
            "model": "resnet_2111", "recipe_tag": "report", "recipe": {"tag": "report", "epochs": 30},
            "device": "cpu", "data": str(tmp_path / data), "final_acc": acc, "train_time_s": 100.0 + i,
            "run_id": f"t{i}", "finished": f"2026-11-2{i}T10:00:00Z", "versions": {"torch": "2.13.0"},
            "status": "completed"}))
    # an interrupted run is not a result
    (tmp_path / "runs" / "r9").mkdir()
    (tmp_path / "runs" / "r9" / "summary.json").write_text(json.dumps({
        "model": "resnet_2111", "recipe_tag": "report", "device": "cpu", "data": str(tmp_path / "orig"),
        "final_acc": 0.5, "train_time_s": 1.0, "run_id": "t9", "status": "interrupted"}))
    # unrelated JSON, a corrupt file and a temp file of a write in progress are all skipped
    (tmp_path / "bench_train_cpu.json").write_text(json.dumps({"kind": "bench_train", "rows": []}))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / ENTRY_DIR / ".x.json.tmp.json").write_text('{"model": ')
    warnings = []
    rows = collect([tmp_path], warn=warnings.append)
    assert len(warnings) == 1 and "broken.json" in warnings[0]
    # by data source; within one, rows reaching the 94% target first, each group by time
    assert [(r["model"], r["data"], r["runs"]) for r in rows] == [
        ("resnet_2111", "cifar-10-python", 2),
        ("speedrun_net", "cifar10-jpeg-q75 (lossy)", 2),
        ("airbench94", "cifar10-jpeg-q75 (lossy)", 2),
        ("resnet_2111", "cifar10-jpeg-q75 (lossy)", 1),
    ]
    pooled = rows[0]
    assert pooled["accuracy_mean"] == pytest.approx(0.955) and pooled["accuracy_std"] is not None
    md = render_markdown(rows)
    # the speedrun row: mean ± std, the 95% CI of the mean, and its comparison with the same
    # invocation's baseline (accuracy better by 0.6 points: p 0.015; time worse: p 0.953)
    assert ("| speedrun_net | speedrun | fast | — | NVIDIA H100 80GB HBM3 | cifar10-jpeg-q75 (lossy) | 94.20 ± 0.14 "
            "| [92.93, 95.47] | 4.20 ± 0.28 | [1.66, 6.74] | 2 | 0.015 | 0.953 |  |") in md
    # one run: the value alone, no interval, no test (the baseline has another data source)
    assert ("| resnet_2111 | train | report | — | cpu | cifar10-jpeg-q75 (lossy) | 90.00 | — | 102.00 | — "
            "| 1 | — | — |  | 2026-11-22 |") in md


def _write_many(args):
    folder, worker, n = args
    for i in range(n):
        add_entry(folder, _entry(model=f"w{worker}", id=f"w{worker}-{i}", accs=(0.5 + i / 1000,), times=(1.0,)))


def test_concurrent_writers_lose_nothing(tmp_path):
    workers, per_worker = 4, 25
    ctx = mp.get_context("spawn")  # fresh interpreters: the writers share nothing but the folder
    with ctx.Pool(workers) as pool:
        pool.map(_write_many, [(tmp_path, w, per_worker) for w in range(workers)])
    files = list((tmp_path / ENTRY_DIR).iterdir())
    assert len(files) == workers * per_worker
    assert not [f for f in files if f.name.startswith(".")], "temporary files left behind"
    ids = {json.loads(f.read_text())["id"] for f in files}  # every file is complete JSON
    assert ids == {f"w{w}-{i}" for w in range(workers) for i in range(per_worker)}
    assert len(collect([tmp_path])) == workers * per_worker


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import beton_data.files as files

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OSError):
        add_entry(tmp_path, _entry())
    assert list((tmp_path / ENTRY_DIR).iterdir()) == []


def test_leaderboard_writes_markdown_and_plot(tmp_path, capsys):
    add_entry(tmp_path, _entry())
    add_entry(tmp_path, _entry(model="airbench94", kind="baseline", accs=(0.9401,), times=(3.0,)))
    out, plot = tmp_path / "LB.md", tmp_path / "lb.png"
    rows = leaderboard([tmp_path], out, plot, as_json=False)
    assert len(rows) == 2
    assert out.read_text().startswith("# CIFAR-10 leaderboard")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fastcifar.cli", "leaderboard", *args], cwd=cwd,
                          capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_cli_json(tmp_path):
    add_entry(tmp_path, _entry())
    r = _cli("--results", str(tmp_path), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    [row] = json.loads(r.stdout)
    assert row["model"] == "speedrun_net" and row["runs"] == 2
    assert not (tmp_path / "bench").exists()  # --json alone writes no files


def test_cli_errors(tmp_path):
    r = _cli("--results", str(tmp_path / "missing"), cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("error: results folder") and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    r = _cli("--results", str(tmp_path / "empty"), cwd=tmp_path)
    assert r.returncode == 1 and "no results under" in r.stderr
    add_entry(tmp_path / "empty", _entry())
    r = _cli("--results", str(tmp_path / "empty"), "--out", str(tmp_path / "nope" / "LB.md"), cwd=tmp_path)
    assert r.returncode == 1 and "does not exist" in r.stderr
