"""The leaderboard: entry files, pooling of train summaries, rendering, concurrent writers, CLI."""
from __future__ import annotations

import json
import re
import multiprocessing as mp
import subprocess
import sys
from pathlib import Path

import numpy as np
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


# -----------------------------------------------------------------------------
# rows that mean one thing: grouping by settings and data identity

def _summary(run_dir: Path, acc: float, recipe=None, options=None, sha="a" * 64, **kw):
    """A finished train run's summary.json with the keys train.py writes."""
    run_dir.mkdir(parents=True)
    s = {"model": "resnet_2111", "model_options": options or {}, "recipe_tag": "fast",
         "recipe": {"tag": "fast", "epochs": 30, "batch_size": 512, "lr": 0.4, "sources": {"lr": "a sentence"},
                    "notes": "", **(recipe or {})},
         "device": "NVIDIA H100 80GB HBM3", "world_size": 1, "precision": "fp16", "bn_backend": "compiled",
         "loader": "gpu", "compile": True, "status": "completed", "final_acc": acc, "train_time_s": 60.0 + acc,
         "finished": "2026-11-23T10:00:00Z", "versions": {}, "command": "fastcifar train", "run_id": run_dir.name,
         "data": "beton_data/cifar10", "data_name": "cifar10-jpeg-q75 (lossy)", "data_sha256": sha, **kw}
    (run_dir / "summary.json").write_text(json.dumps(s))


def test_train_runs_pool_only_when_every_setting_matches(tmp_path):
    runs = tmp_path / "runs"
    _summary(runs / "a1", 0.930)
    _summary(runs / "a2", 0.932, recipe={"sources": {"lr": "another sentence"}, "notes": "n"})  # pools with a1
    _summary(runs / "b", 0.920, recipe={"epochs": 20})
    _summary(runs / "c", 0.921, recipe={"batch_size": 1024})
    _summary(runs / "d", 0.922, recipe={"lr": 0.8})
    _summary(runs / "e", 0.923, options={"widths": [32, 64]})
    _summary(runs / "f", 0.924, precision="bf16")
    _summary(runs / "g", 0.925, world_size=8)
    _summary(runs / "h", 0.926, sha="b" * 64)  # other data, same display name
    rows = collect([tmp_path])
    by_acc = {round(r["accuracy_mean"], 3): r for r in rows}
    assert len(rows) == 8 and by_acc[0.931]["runs"] == 2 and all(r["runs"] == 1 for r in rows if r is not by_acc[0.931])
    assert by_acc[0.931]["settings"]["epochs"] == 30 and "sources" not in by_acc[0.931]["settings"]
    assert by_acc[0.923]["settings"]["model:widths"] == [32, 64]
    assert by_acc[0.926]["data_sha256"] == "b" * 64
    md = render_markdown(rows)
    # the settings column names what differs between the rows of resnet_2111, with a hash of all settings
    row_b = next(line for line in md.splitlines() if "| 92.00 |" in line)
    h = by_acc[0.920]["settings_hash"]
    assert (f"| resnet_2111 | train | fast | batch_size=512, epochs=20, lr=0.4, model:widths=None, precision=fp16, "
            f"world_size=1 #{h} |") in row_b
    assert "`bbbbbbbb`" in next(line for line in md.splitlines() if "| 92.60 |" in line)  # the data identity


def test_old_summary_without_data_identity_falls_back_to_the_data_name(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({"source": "/x/cifar-10-python.tar.gz"}))
    for i in range(2):
        _summary(tmp_path / "runs" / f"r{i}", 0.93, data=str(tmp_path / "d"), data_name=None, data_sha256=None)
    [row] = collect([tmp_path])
    assert row["data"] == "cifar-10-python" and row["data_sha256"] is None and row["runs"] == 2


# -----------------------------------------------------------------------------
# statistics and comparison with the baseline

def _speedrun_pair(folder, invocation, accs, times, base_accs, base_times, device="NVIDIA H100 80GB HBM3", **kw):
    add_entry(folder, _entry(id=invocation, accs=accs, times=times, device=device, **kw))
    add_entry(folder, _entry(model="airbench94", kind="baseline", id=f"{invocation}-baseline", accs=base_accs,
                             times=base_times, device=device, **kw))


FAST = dict(accs=(0.945, 0.946, 0.944, 0.945, 0.947), times=(2.0, 2.1, 2.05, 1.95, 2.0))
BASE = dict(base_accs=(0.940, 0.941, 0.939, 0.940, 0.942), base_times=(3.0, 3.1, 3.05, 2.95, 3.0))


def test_record_needs_five_runs_and_both_tests(tmp_path):
    from scipy import stats

    _speedrun_pair(tmp_path, "five", **FAST, **BASE)
    _speedrun_pair(tmp_path, "four", FAST["accs"][:4], FAST["times"][:4], **BASE)
    rows = {r["id"]: r for r in collect([tmp_path])}
    five, four = rows["five"], rows["four"]
    want_t = stats.ttest_ind(FAST["times"], BASE["base_times"], equal_var=False, alternative="less").pvalue
    want_a = stats.ttest_ind(np.array(FAST["accs"]) + 0.002, BASE["base_accs"], equal_var=False,
                             alternative="greater").pvalue
    assert five["comparison"]["p_time"] == pytest.approx(want_t) and five["comparison"]["p_accuracy"] == pytest.approx(want_a)
    assert five["comparison"]["baseline"] == "same invocation" and five["comparison"]["baseline_ids"] == ["five-baseline"]
    assert five["record"] and not four["record"] and "4 < 5 runs" in four["comparison"]["why"]
    assert five["accuracy_ci95"] == pytest.approx(list(stats.t.interval(
        0.95, 4, loc=np.mean(FAST["accs"]), scale=np.std(FAST["accs"], ddof=1) / np.sqrt(5))))
    md = render_markdown(collect([tmp_path]))
    [line] = [x for x in md.splitlines() if x.startswith("| speedrun_net") and "| 5 |" in x]
    assert "| <0.001 | <0.001 | **record** |" in line
    [line] = [x for x in md.splitlines() if x.startswith("| speedrun_net") and "| 4 |" in x]
    assert "| **record** |" not in line
    # a wider margin is recorded in the comparison
    wide = {r["id"]: r for r in collect([tmp_path], margin=0.01)}["four"]
    assert wide["comparison"]["accuracy_margin"] == 0.01


def test_which_baseline_a_row_is_compared_with(tmp_path):
    # this invocation's own baseline is used even where another baseline on the same data exists
    same = {"data_sha256": "a" * 64}
    _speedrun_pair(tmp_path, "inv", **FAST, **BASE, **same)
    add_entry(tmp_path, _entry(model="airbench94", kind="baseline", id="cal", accs=(0.5, 0.51), times=(9.0, 9.1),
                               **same))
    # a speedrun without its own baseline: every baseline on the same data and device, pooled
    add_entry(tmp_path, _entry(id="solo", accs=(0.95, 0.951), times=(2.0, 2.1), **same))
    # another device: its baseline is not used; no baseline there -> no comparison
    add_entry(tmp_path, _entry(id="a100", accs=(0.95, 0.951), times=(2.0, 2.1), device="NVIDIA A100", **same))
    # other data under the same display name (another identity): no comparison either
    add_entry(tmp_path, _entry(id="other", accs=(0.95, 0.951), times=(2.0, 2.1), data_sha256="c" * 64))
    # an entry without an identity (older files) is matched by the data's display name
    add_entry(tmp_path, _entry(id="old", accs=(0.95, 0.951), times=(2.0, 2.1)))
    rows = {r["id"]: r for r in collect([tmp_path])}
    assert rows["inv"]["comparison"]["baseline_ids"] == ["inv-baseline"]
    solo = rows["solo"]["comparison"]
    assert sorted(solo["baseline_ids"]) == ["cal", "inv-baseline"] and solo["baseline_runs"] == 7
    assert "2 baseline entries on this data and device, pooled" == solo["baseline"]
    assert rows["a100"]["comparison"] is None and rows["other"]["comparison"] is None
    assert not rows["a100"]["record"] and rows["cal"]["comparison"] is None  # baselines are not compared
    assert sorted(rows["old"]["comparison"]["baseline_ids"]) == ["cal", "inv-baseline"]


def test_train_rows_get_the_accuracy_test_only(tmp_path):
    add_entry(tmp_path, _entry(model="airbench94", kind="baseline", id="cal", accs=(0.93, 0.931, 0.929),
                               times=(3.0, 3.1, 2.9), data_sha256="a" * 64, data="cifar10-jpeg-q75 (lossy)"))
    for i, acc in enumerate((0.95, 0.951, 0.952, 0.953, 0.954)):
        _summary(tmp_path / "runs" / f"r{i}", acc)
    [row] = [r for r in collect([tmp_path]) if r["kind"] == "train"]
    assert row["runs"] == 5 and row["comparison"]["p_accuracy"] < 0.05
    assert row["comparison"]["p_time"] is None and not row["record"]


def test_single_run_shows_no_spread_no_interval_no_test(tmp_path):
    _speedrun_pair(tmp_path, "one", (0.95,), (2.0,), (0.94,), (3.0,))
    rows = collect([tmp_path])
    row = next(r for r in rows if r["id"] == "one")
    assert row["accuracy_std"] is None and row["accuracy_ci95"] is None and row["time_ci95_s"] is None
    assert row["comparison"]["p_accuracy"] is None and row["comparison"]["p_time"] is None and not row["record"]
    line = next(x for x in render_markdown(rows).splitlines() if x.startswith("| speedrun_net"))
    assert "| 95.00 | — | 2.00 | — | 1 | — | — |  |" in line


def test_cli_json_shows_the_figures(tmp_path):
    _speedrun_pair(tmp_path, "five", **FAST, **BASE)
    r = _cli("--results", str(tmp_path), "--json", "--margin", "0.5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    row = next(x for x in json.loads(r.stdout) if x["id"] == "five")
    assert row["record"] is True and len(row["accuracy_ci95"]) == 2 and len(row["time_ci95_s"]) == 2
    assert row["comparison"]["accuracy_margin"] == pytest.approx(0.005)
    assert {"p_accuracy", "p_time", "baseline", "baseline_runs", "why"} <= set(row["comparison"])


# -----------------------------------------------------------------------------
# output locations, concurrency, optional plotting

@pytest.mark.parametrize("flag", ["--out", "--plot"])
def test_unwritable_output_is_one_line(tmp_path, flag):
    add_entry(tmp_path / "res", _entry())
    (tmp_path / "file").write_text("a regular file: nothing can be created under it, not even by root")
    other = "--plot" if flag == "--out" else "--out"
    r = _cli("--results", str(tmp_path / "res"), flag, str(tmp_path / "file" / "x"),
             other, str(tmp_path / ("lb.png" if other == "--plot" else "lb.md")), cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith(f"error: leaderboard {flag}"), r.stderr
    assert "is a file, not a folder" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "lb.png").exists() and not (tmp_path / "lb.md").exists()


def test_concurrent_leaderboards_writing_the_same_outputs(tmp_path):
    """Several `fastcifar leaderboard` processes at once, all writing the same table and plot:
    every one succeeds and both files are complete (a fixed temporary file name made some fail)."""
    for i in range(6):
        add_entry(tmp_path / "res", _entry(model=f"m{i}"))
    out, plot = tmp_path / "LB.md", tmp_path / "lb.png"
    cmd = [sys.executable, "-m", "fastcifar.cli", "leaderboard", "--results", str(tmp_path / "res"),
           "--out", str(out), "--plot", str(plot)]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(6)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert [rc for rc, _ in results] == [0] * 6, [err for _, err in results]
    assert not [err for _, err in results if "plot skipped" in err], [err for _, err in results]
    assert out.read_text().startswith("# CIFAR-10 leaderboard") and len(re.findall(r"^\| m\d \|", out.read_text(), re.M)) == 6
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.read_bytes()[-8:] == b"IEND\xaeB`\x82"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LB.md", "lb.png", "res"]  # no temporaries left


def test_missing_matplotlib_costs_the_plot_not_the_table(tmp_path):
    add_entry(tmp_path, _entry())
    out, plot = tmp_path / "LB.md", tmp_path / "lb.png"
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # `import matplotlib` now fails
            "from fastcifar.cli import main\n"
            f"sys.argv = ['fastcifar', 'leaderboard', '--results', {str(tmp_path)!r}, '--out', {str(out)!r}, "
            f"'--plot', {str(plot)!r}]\nmain()\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "plot skipped: render_plot: matplotlib cannot be imported" in r.stderr and "Traceback" not in r.stderr
    assert out.read_text().startswith("# CIFAR-10 leaderboard") and not plot.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_plot_or_skip(tmp_path, monkeypatch):
    from fastcifar.plots import plot_curves, plot_or_skip

    history = [{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.1, "test_acc": 0.4}]
    said = []
    assert plot_or_skip(plot_curves, history, tmp_path / "ok.png", say=said.append) and said == []
    assert (tmp_path / "ok.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not plot_or_skip(plot_curves, history, tmp_path / "no.png", say=said.append)
    assert said == [said[0]] and said[0].startswith("plot skipped: plot_curves: matplotlib cannot be imported")
    assert not (tmp_path / "no.png").exists()


def test_spread_labels_moves_only_what_overlaps():
    from fastcifar.leaderboard import spread_labels

    assert spread_labels([(0, 0, 50, 10), (100, 0, 50, 10), (0, 40, 50, 10)]) == [0, 0, 0]
    boxes = [(0, 0, 50, 10), (20, 3, 50, 10), (10, 5, 50, 10), (200, 4, 10, 10)]
    shifts = spread_labels(boxes, pad=2)
    assert shifts[3] == 0 and shifts[2] == 0 and all(s < 0 for s in shifts[:2])   # the top one stays
    moved = [(x, y + dy, w, h) for (x, y, w, h), dy in zip(boxes, shifts)]
    for i, a in enumerate(moved):
        for b in moved[i + 1:]:
            assert not (a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]), (a, b)


def test_plot_labels_merge_repeats_and_never_overlap(tmp_path):
    """Repeated invocations of one configuration drawn on top of each other get one label with
    their count; different models at the same place get a label each, apart; one device is
    named once, in the title."""
    from fastcifar.leaderboard import _plot_figure

    for i, t in enumerate((2.65, 2.67, 2.84)):   # the baseline three times, almost the same point
        add_entry(tmp_path, _entry(model="airbench94", kind="baseline", id=f"b{i}", accs=(0.906, 0.907), times=(t, t)))
    for i, name in enumerate(("speedrun_net", "resnet_2111", "resnet_353_dropout")):   # three at one point
        add_entry(tmp_path, _entry(model=name, id=f"m{i}", accs=(0.899, 0.900), times=(4.5, 4.5)))
    add_entry(tmp_path, _entry(model="se_resnet_443", id="far", accs=(0.95,), times=(50.0,)))
    rows = collect([tmp_path])
    assert len(rows) == 7
    fig, ax = _plot_figure(rows)
    fig.canvas.draw()
    texts = {t.get_text(): t for t in ax.texts}
    assert set(texts) == {"airbench94 (×3)", "speedrun_net", "resnet_2111", "resnet_353_dropout", "se_resnet_443"}
    assert "NVIDIA H100 80GB HBM3" in ax.get_title()
    from matplotlib.text import Text
    boxes = [Text.get_window_extent(t) for t in texts.values()]   # the text's own box (not its line)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    moved = [t for t in texts.values() if t.arrow_patch is not None]
    assert len(moved) == 2     # of the three at one point, two moved down (with a line to it)


def test_target_rows_are_shown_as_such_and_never_tested(tmp_path):
    """Runs stopped at a target (`speedrun --target`) are their own kind of row: the target and
    how many runs reached it are shown, and they are not compared with the baseline."""
    add_entry(tmp_path, _entry(model="airbench94", kind="baseline", id="b", accs=(0.906, 0.907), times=(2.6, 2.7)))
    add_entry(tmp_path, _entry(model="resnet_2111", kind="target", id="t", accs=(0.905, 0.9052, 0.899),
                               times=(40.0, 41.0, 55.0), target=0.9048, reached_runs=2))
    add_entry(tmp_path, _entry(model="speedrun_net", id="s", accs=(0.90, 0.901), times=(2.0, 2.1)))
    rows = {r["model"]: r for r in collect([tmp_path])}
    assert rows["resnet_2111"]["comparison"] is None and rows["speedrun_net"]["comparison"] is not None
    md = render_markdown(list(rows.values()))
    assert "| resnet_2111 | target 90.48% | fast |" in md and "| 3 (2 reached) |" in md
    with pytest.raises(ValueError, match="entry kind must be one of speedrun, baseline, train, target"):
        add_entry(tmp_path, _entry(kind="targets"))
