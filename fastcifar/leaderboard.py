"""The leaderboard: every measured result, as a Markdown table, a plot and JSON.

Where the rows come from (all under one or more results folders, searched recursively):

- entry files in ``<results>/leaderboard/``, one JSON file per entry, written by `add_entry`
  (`fastcifar speedrun` records one for its model and one for the baseline every time it runs);
- speedrun result files (``speedrun_<model>_<device>.json``), the detailed record of the latest
  invocation; they hold the same entries, and rows are de-duplicated by entry id;
- ``summary.json`` files of `fastcifar train` runs; single runs of the same model, recipe,
  device and data are pooled into one row (mean ± std over runs).

Accuracies are stored as fractions (0.9401) and times in seconds; the table shows percent.

Concurrency: `add_entry` never rewrites a shared file. Each entry gets its own file with a
unique name, written to a temporary file in the same folder and moved into place with
``os.replace``, so any number of processes can record results at once, nothing is lost, and a
reader never sees a half-written entry (temporary files start with '.' and are skipped).
"""
from __future__ import annotations

import json
import math
import re
import sys
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional

from fastcifar.errors import UserError
from fastcifar.results import atomic_write_text, format_pm, mean_std, now_iso

ENTRY_DIR = "leaderboard"
KINDS = ("speedrun", "baseline", "train")
REQUIRED = ("model", "recipe", "device", "data", "accuracies", "times_s")
TARGET = 0.94  # the speedrun target accuracy, drawn on the plot


# -----------------------------------------------------------------------------
# writing

def add_entry(results_dir: str | Path, entry: dict) -> Path:
    """Record one leaderboard entry; returns the file written.

    ``entry`` needs model, recipe, device, data (a short name of the data source),
    accuracies (fractions, one per run) and times_s (seconds, one per run); it may carry kind
    (speedrun | baseline | train, default speedrun), id, date, versions, command and notes.
    Missing id and date are filled in.
    """
    entry = validate_entry(entry)
    folder = Path(results_dir) / ENTRY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stamp = entry["date"].replace(":", "").replace("-", "")[:15]
    path = folder / f"{stamp}_{_slug(entry['model'])}_{uuid.uuid4().hex[:12]}.json"
    atomic_write_text(path, json.dumps(entry, indent=2) + "\n")
    return path


def validate_entry(entry: dict) -> dict:
    """A checked copy of ``entry`` with id, kind and date filled in; ValueError if malformed."""
    if not isinstance(entry, dict):
        raise ValueError(f"a leaderboard entry must be a dict, got {type(entry).__name__}")
    missing = [k for k in REQUIRED if k not in entry]
    if missing:
        raise ValueError(f"leaderboard entry lacks {', '.join(missing)}")
    out = dict(entry)
    out.setdefault("kind", "speedrun")
    if out["kind"] not in KINDS:
        raise ValueError(f"entry kind must be one of {', '.join(KINDS)}, got {out['kind']!r}")
    for key in ("accuracies", "times_s"):
        values = out[key]
        if not isinstance(values, (list, tuple)) or not values or not all(_is_number(v) for v in values):
            raise ValueError(f"entry {key} must be a non-empty list of numbers")
        out[key] = [float(v) for v in values]
    if len(out["accuracies"]) != len(out["times_s"]):
        raise ValueError("entry accuracies and times_s must have one value per run")
    if not all(0.0 <= a <= 1.0 for a in out["accuracies"]):
        raise ValueError("entry accuracies must be fractions in [0, 1]")
    out.setdefault("id", uuid.uuid4().hex)
    out.setdefault("date", now_iso())
    out.setdefault("versions", {})
    return out




# -----------------------------------------------------------------------------
# reading

def collect(results_dirs: Iterable[str | Path], warn=None) -> list[dict]:
    """All leaderboard rows found under ``results_dirs``, each with mean/std filled in,
    sorted by data source, then by whether the row reaches the target, then by time."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    by_id: dict[str, dict] = {}
    train_runs: dict[tuple, list[dict]] = defaultdict(list)
    for folder in results_dirs:
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"results folder {folder} does not exist; run `fastcifar speedrun` first "
                            f"or pass --results DIR")
        for path in sorted(folder.rglob("*.json")):
            if path.name.startswith("."):  # a temporary file of a write in progress
                continue
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
                warn(f"skipping unreadable {path}: {e}")
                continue
            for entry in _entries_of(path, data, warn):
                entry["source"] = str(path)
                if entry["kind"] == "train":
                    train_runs[_group_key(entry)].append(entry)
                else:
                    by_id.setdefault(entry["id"], entry)
    rows = list(by_id.values()) + [_pool(runs) for runs in train_runs.values()]
    for row in rows:
        row.update(_stats(row))
    rows.sort(key=lambda r: (r["data"], not r["accuracy_mean"] >= TARGET, r["time_mean_s"]))
    return rows


def _entries_of(path: Path, data, warn) -> list[dict]:
    """The leaderboard entries one JSON file holds (none for unrelated JSON files)."""
    if not isinstance(data, dict):
        return []
    try:
        if path.parent.name == ENTRY_DIR or data.get("kind") in KINDS:
            return [validate_entry(data)]
        if data.get("kind") == "speedrun_result":
            return [validate_entry(e) for e in data.get("entries", [])]
        if path.name == "summary.json":
            entry = _entry_from_summary(data)
            return [entry] if entry else []
    except ValueError as e:
        warn(f"skipping {path}: {e}")
    return []


def _entry_from_summary(s: dict) -> Optional[dict]:
    """A finished `fastcifar train` run's summary.json as a single-run entry (None otherwise)."""
    if s.get("status") not in ("completed", "target_reached") or not _is_number(s.get("final_acc")):
        return None
    return validate_entry({
        "kind": "train", "id": s.get("run_id") or uuid.uuid4().hex, "model": s.get("model", "?"),
        "recipe": s.get("recipe_tag", "?"), "device": s.get("device", "?"),
        "data": data_name(Path(s["data"])) if s.get("data") else "?",
        "accuracies": [s["final_acc"]], "times_s": [s.get("train_time_s")],
        "date": s.get("finished") or now_iso(), "versions": s.get("versions", {}),
        "command": s.get("command", ""),
    })


def _group_key(e: dict) -> tuple:
    return (e["model"], e["recipe"], e["device"], e["data"])


def _pool(runs: list[dict]) -> dict:
    """Single train runs of the same configuration as one row."""
    runs = sorted(runs, key=lambda e: e["date"])
    row = dict(runs[-1])
    row["id"] = "+".join(e["id"] for e in runs)
    row["accuracies"] = [a for e in runs for a in e["accuracies"]]
    row["times_s"] = [t for e in runs for t in e["times_s"]]
    row["source"] = ", ".join(sorted({e["source"] for e in runs}))
    return row


def _stats(row: dict) -> dict:
    acc_mean, acc_std = mean_std(row["accuracies"])
    t_mean, t_std = mean_std(row["times_s"])
    return {"runs": len(row["accuracies"]), "accuracy_mean": acc_mean, "accuracy_std": acc_std,
            "time_mean_s": t_mean, "time_std_s": t_std}




# -----------------------------------------------------------------------------
# rendering

def render_markdown(rows: list[dict]) -> str:
    lines = [
        "# CIFAR-10 leaderboard",
        "",
        f"Generated by `fastcifar leaderboard` on {now_iso()} from the result files listed below.",
        "Accuracy is top-1 on the test split of the named data. Time is seconds on the named device,",
        "compile/warm-up excluded: training plus the final (test-time-augmented) evaluation for speedrun",
        "and baseline rows, training alone for train rows. Mean ± sample std over runs.",
        "Rows on different data are not comparable: the JPEG copy of CIFAR-10 is lossy and scores lower",
        "than the original pixels. Compare a model with the baseline run on the same data and device.",
        "",
        "| model | kind | recipe | device | data | accuracy (%) | time (s) | runs | date | versions |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append("| " + " | ".join([
            r["model"], r["kind"], r["recipe"], r["device"], r["data"],
            format_pm(r["accuracy_mean"], r["accuracy_std"], 100),
            format_pm(r["time_mean_s"], r["time_std_s"]),
            str(r["runs"]), r["date"][:10], _versions(r.get("versions", {})),
        ]) + " |")
    lines += ["", "Sources:", ""] + [f"- `{r['source']}`" for r in rows]
    return "\n".join(lines) + "\n"




def _versions(v: dict) -> str:
    keep = ("fastcifar", "torch", "cuda", "airbench")
    return ", ".join(f"{k} {v[k]}" for k in keep if v.get(k))


def render_plot(rows: list[dict], path: str | Path) -> None:
    """Accuracy against training time, one point per row with ±std error bars."""
    from fastcifar.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {"speedrun": "o", "baseline": "s", "train": "^"}
    data_sources = sorted({r["data"] for r in rows})
    colors = {d: f"C{i}" for i, d in enumerate(data_sources)}
    for r in rows:
        ax.errorbar(r["time_mean_s"], 100 * r["accuracy_mean"],
                    xerr=r["time_std_s"] or 0, yerr=100 * (r["accuracy_std"] or 0),
                    fmt=markers[r["kind"]], color=colors[r["data"]], capsize=3)
        ax.annotate(f"{r['model']} ({r['device']})", (r["time_mean_s"], 100 * r["accuracy_mean"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.axhline(100 * TARGET, color="gray", ls="--", lw=0.8)
    for d in data_sources:  # legend: one handle per data source
        ax.plot([], [], "o", color=colors[d], label=d)
    for kind, m in markers.items():
        if any(r["kind"] == kind for r in rows):
            ax.plot([], [], m, color="gray", label=kind)
    ax.set(xlabel="training time (s)", ylabel="test accuracy (%)", title="CIFAR-10: accuracy against time")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter
    plain = FuncFormatter(lambda x, _: f"{x:g}")  # 2.5 rather than 2.5x10^0 on a log axis
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, Path(path))
    plt.close(fig)


# -----------------------------------------------------------------------------
# the `fastcifar leaderboard` command

def leaderboard(results: list[Path], out: Optional[Path], plot: Optional[Path], as_json: bool) -> list[dict]:
    """Collect rows from ``results`` and write the Markdown table and the plot.

    With ``as_json`` the rows are printed as JSON and files are written only where ``out`` /
    ``plot`` are given; otherwise ``out`` and ``plot`` default to bench/LEADERBOARD.md and
    bench/leaderboard.png."""
    rows = collect(results)
    if not rows:
        raise UserError(f"no results under {', '.join(map(str, results))}; "
                        f"run `fastcifar speedrun` or `fastcifar train` first")
    if not as_json:
        out = out or Path("bench/LEADERBOARD.md")
        plot = plot or Path("bench/leaderboard.png")
    for target in (out, plot):
        if target is not None and not target.parent.is_dir():
            raise UserError(f"folder {target.parent} does not exist; create it or choose another path")
    if out is not None:
        atomic_write_text(out, render_markdown(rows))
    if plot is not None:
        render_plot(rows, plot)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print(render_markdown(rows), end="")
        print(f"wrote {out} and {plot}")
    return rows


def data_name(data_dir: Path) -> str:
    """A short name for the data: the source in the folder's manifest (file name without
    archive extensions), marked '(lossy)' for a JPEG copy."""
    try:
        manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return f"{Path(data_dir).name} (no manifest)"
    source = str(manifest.get("source", "?")).rstrip("/")
    name = re.sub(r"(\.tar\.gz|\.tgz|\.tar|\.zip)$", "", source.rsplit("/", 1)[-1])
    return f"{name} (lossy)" if manifest.get("lossy_source") else name


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-")[:60] or "x"
