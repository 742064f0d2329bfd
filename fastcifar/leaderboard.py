"""The leaderboard: every measured result, as a Markdown table, a plot and JSON.

Where the rows come from (all under one or more results folders, searched recursively):

- entry files in ``<results>/leaderboard/``, one JSON file per entry, written by `add_entry`
  (`fastcifar speedrun` records one for its model and one for the baseline, updated after
  every run);
- speedrun result files (``speedrun_<model>_<device>.json``), the detailed record of the latest
  invocation; they hold the same entries, and rows are de-duplicated by entry id;
- ``summary.json`` files of `fastcifar train` runs. Single runs are pooled into one row (mean ±
  std over runs) only when everything that changes the result is the same: model, recipe tag,
  every recipe field (its `sources` and `notes` excepted), model options, precision, number of
  processes, BatchNorm backend, loader and compilation (these last three change the time),
  device and data identity.

Data identity is the SHA-256 a result records for its data (``data_sha256``); results that
lack one (older files) are identified by the data's display name. The settings of a row (the
recipe and the rest above, less model/device/data) are kept whole in ``settings``, with a short
hash; the table lists, for each model, the settings in which its rows differ.

Every row gets mean, std and 95% confidence interval of accuracy and time, and every model row
(speedrun or train) is compared with airbench94 (`fastcifar.results.compare`):

- a speedrun row with the baseline's runs of the same invocation (same process, same machine
  state), when that invocation ran the baseline;
- otherwise with all baseline runs recorded on the same data identity and the same device,
  pooled; with none there, there is no comparison.

Target rows (`fastcifar speedrun --target`) are runs that stopped as soon as they reached a
target accuracy: their time is the time to it (or to the recipe's end, for a run that missed),
their accuracy what they had then. They are not compared with the baseline, which trains to the
end of its schedule.

Train rows get the accuracy test only: their time is training alone, without the final
evaluation the speedrun and baseline times include, so it is not tested against the baseline's
and a train row is never a record. A record is a speedrun row with at least 5 runs and p < 0.05
on both tests.

Accuracies are stored as fractions (0.9401) and times in seconds; the table shows percent.

Concurrency: `add_entry` never rewrites a file shared between invocations. Each entry has its
own file, named after its date, model and id, written to a uniquely named temporary file in
the same folder and moved into place with ``os.replace``: any number of processes can record
results at once, nothing is lost, and a reader never sees a half-written entry (temporary files
start with '.' and are skipped). Writing an entry again with the same id replaces its file;
that is how a speedrun keeps its entry current after every run.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional

from beton_data.files import check_writable
from fastcifar.errors import UserError
from fastcifar.summary import from_dict as summary_from_dict
from fastcifar.results import (ACCURACY_MARGIN, atomic_write_text, compare, describe, format_ci, format_p,
                               format_pm, now_iso)

ENTRY_DIR = "leaderboard"
KINDS = ("speedrun", "baseline", "train", "target")
REQUIRED = ("model", "recipe", "device", "data", "accuracies", "times_s")
TARGET = 0.94  # the speedrun target accuracy, drawn on the plot
NOT_SETTINGS = ("sources", "notes", "tag")  # recipe fields that do not change a result (tag has its own column)


# -----------------------------------------------------------------------------
# writing

def add_entry(results_dir: str | Path, entry: dict) -> Path:
    """Record one leaderboard entry; returns the file written.

    ``entry`` needs model, recipe, device, data (a short name of the data source),
    accuracies (fractions, one per run) and times_s (seconds, one per run); it may carry kind
    (speedrun | baseline | train, default speedrun), id, date, data_sha256, settings, versions,
    command, failed_runs and notes. Missing id and date are filled in. An entry with the id
    (and date) of one already written replaces it.
    """
    entry = validate_entry(entry)
    folder = Path(results_dir) / ENTRY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / entry_file_name(entry)
    atomic_write_text(path, json.dumps(entry, indent=2) + "\n")
    return path


def entry_file_name(entry: dict) -> str:
    """'<date>_<model>_<hash of id>.json': sorted by date, one file per entry id."""
    stamp = entry["date"].replace(":", "").replace("-", "")[:15]
    return f"{stamp}_{_slug(entry['model'])}_{hashlib.sha256(str(entry['id']).encode()).hexdigest()[:12]}.json"


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
    if not isinstance(out.get("settings", {}), dict):
        raise ValueError("entry settings must be a dict")
    out.setdefault("id", uuid.uuid4().hex)
    out.setdefault("date", now_iso())
    out.setdefault("versions", {})
    out.setdefault("settings", {})
    out.setdefault("data_sha256", None)
    return out


def settings_of(recipe: Optional[dict], model_options: Optional[dict] = None, **run) -> dict:
    """The settings that change a result, flat: every recipe field except its sources, notes
    and tag; each model option as 'model:NAME'; and the ``run`` keywords given (precision,
    world_size, bn_backend, loader, compile)."""
    out = {k: v for k, v in sorted((recipe or {}).items()) if k not in NOT_SETTINGS}
    out.update({f"model:{k}": v for k, v in sorted((model_options or {}).items())})
    out.update(run)
    return out


def settings_hash(settings: dict) -> str:
    """A short stable hash of ``settings`` (8 hex digits)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


# -----------------------------------------------------------------------------
# reading

def collect(results_dirs: Iterable[str | Path], warn=None, margin: float = ACCURACY_MARGIN) -> list[dict]:
    """All leaderboard rows found under ``results_dirs``, each with its statistics and its
    comparison with the baseline filled in, sorted by data source, then by whether the row
    reaches the target, then by time."""
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
                entry["settings_hash"] = settings_hash(entry["settings"])
                if entry["kind"] == "train":
                    train_runs[_group_key(entry)].append(entry)
                else:
                    # the same entry in a result file and in an entry file: a speedrun updates both
                    # after every run, so if they differ (stopped in between) the longer is newer
                    known = by_id.get(entry["id"])
                    if known is None or len(entry["accuracies"]) > len(known["accuracies"]):
                        by_id[entry["id"]] = entry
    rows = list(by_id.values()) + [_pool(runs) for runs in train_runs.values()]
    for row in rows:
        row.update(_stats(row))
    _compare_with_baselines(rows, margin)
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


def _entry_from_summary(d: dict) -> Optional[dict]:
    """A finished `fastcifar train` run's summary.json as a single-run entry (None otherwise)."""
    s = summary_from_dict(d)
    if not s.is_result or not _is_number(s.final_acc):
        return None
    return validate_entry({
        "kind": "train", "id": s.run_id or uuid.uuid4().hex, "model": s.model or "?",
        "recipe": s.recipe_tag or "?", "device": s.device or "?",
        "data": s.data_name or "?", "data_sha256": s.data_sha256,
        "settings": settings_of(s.recipe, s.model_options, precision=s.precision,
                                world_size=s.world_size, bn_backend=s.bn_backend,
                                loader=s.loader, compile=s.compile),
        "accuracies": [s.final_acc], "times_s": [s.train_time_s],
        "date": s.finished or now_iso(), "versions": s.versions or {},
        "command": s.command or "",
    })


def _data_key(e: dict) -> str:
    return e.get("data_sha256") or f"name:{e['data']}"


def _group_key(e: dict) -> tuple:
    return (e["model"], e["recipe"], e["settings_hash"], e["device"], _data_key(e))


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
    acc, t = describe(row["accuracies"], bounds=(0.0, 1.0)), describe(row["times_s"], bounds=(0.0, math.inf))
    return {"runs": acc["n"], "accuracy_mean": acc["mean"], "accuracy_std": acc["std"],
            "accuracy_ci95": acc["ci95"], "time_mean_s": t["mean"], "time_std_s": t["std"],
            "time_ci95_s": t["ci95"]}


def _same_data(a: dict, b: dict) -> bool:
    """Same data identity; by display name only where one of them records no SHA-256."""
    if a.get("data_sha256") and b.get("data_sha256"):
        return a["data_sha256"] == b["data_sha256"]
    return a["data"] == b["data"]


def _compare_with_baselines(rows: list[dict], margin: float) -> None:
    """Fill in ``comparison`` (None where there is nothing to compare with) and ``record``."""
    baselines = [r for r in rows if r["kind"] == "baseline"]
    by_id = {r["id"]: r for r in baselines}
    for row in rows:
        row["comparison"], row["record"] = None, False
        if row["kind"] in ("baseline", "target"):
            continue
        own = by_id.get(f"{row['id']}-baseline") if row["kind"] == "speedrun" else None
        if own is not None:
            chosen, how = [own], "same invocation"
        else:
            chosen = [b for b in baselines if b["device"] == row["device"] and _same_data(b, row)]
            how = f"{len(chosen)} baseline entr{'y' if len(chosen) == 1 else 'ies'} on this data and device, pooled"
        if not chosen:
            continue
        base_acc = [a for b in chosen for a in b["accuracies"]]
        base_t = [t for b in chosen for t in b["times_s"]]
        times = row["times_s"] if row["kind"] == "speedrun" else None
        c = compare(row["accuracies"], times, base_acc, base_t, margin)
        c.update(baseline=how, baseline_ids=[b["id"] for b in chosen])
        row["comparison"], row["record"] = c, c["record"]


# -----------------------------------------------------------------------------
# rendering

def render_markdown(rows: list[dict], margin: float = ACCURACY_MARGIN) -> str:
    m = f"{100 * margin:g}"
    lines = [
        "# CIFAR-10 leaderboard",
        "",
        f"Generated by `fastcifar leaderboard` on {now_iso()} from the result files listed below.",
        "Accuracy is top-1 on the test split of the named data. Time is seconds on the named device,",
        "compile/warm-up excluded: training plus the final (test-time-augmented) evaluation for speedrun",
        "and baseline rows, training alone for train rows. Mean ± sample std over runs, and the 95%",
        "confidence interval of the mean (Student's t); with one run, the value alone.",
        "Rows on different data are not comparable: the JPEG copy of CIFAR-10 is lossy and scores lower",
        "than the original pixels. Compare a model with the baseline run on the same data and device.",
        "",
        "p-values: one-sided Welch t-tests against airbench94 (the same invocation's baseline runs, or",
        "else all baseline runs on the same data and device). *p acc*: H0 = the model's mean accuracy",
        f"is {m} points or more below the baseline's; a small p shows it is at most {m} points lower",
        "(or higher). *p time*: H0 = the model is not faster; a small p shows it is faster. Train rows",
        "time training alone, so they get no time test. **record**: a speedrun row with ≥ 5 runs and",
        "p < 0.05 on both. — : no test (fewer than 2 runs on a side, or no baseline to compare with).",
        "*settings*: where rows of one model differ in recipe, model options, precision, processes,",
        "backend, loader or compilation, the differing values and a hash of all settings.",
        "*target* rows: runs that stopped as soon as they reached the accuracy named (`fastcifar",
        "speedrun --target`); their time is the time to it, including the evaluation after every",
        "epoch that checked it (to the recipe's end for a run that missed it), and *runs* says how",
        "many reached it. They are not tested against the baseline, which trains to its end.",
        "",
        "| model | kind | recipe | settings | device | data | accuracy (%) | 95% CI | time (s) | 95% CI "
        "| runs | p acc | p time | record | date | versions |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    differing = _differing_settings(rows)
    for r in rows:
        c = r.get("comparison") or {}
        notes = ([f"{r['reached_runs']} reached"] if r["kind"] == "target" and "reached_runs" in r else []) + \
            ([f"{r['failed_runs']} failed"] if r.get("failed_runs") else [])
        runs = str(r["runs"]) + (f" ({', '.join(notes)})" if notes else "")
        kind = r["kind"]
        if kind == "target" and _is_number(r.get("target")):
            kind = f"target {100 * r['target']:.2f}%"
        lines.append("| " + " | ".join([
            r["model"], kind, r["recipe"], _settings_cell(r, differing.get(r["model"], [])),
            r["device"], r["data"] + (f" `{r['data_sha256'][:8]}`" if r.get("data_sha256") else ""),
            format_pm(r["accuracy_mean"], r["accuracy_std"], 100), format_ci(r.get("accuracy_ci95"), 100),
            format_pm(r["time_mean_s"], r["time_std_s"]), format_ci(r.get("time_ci95_s")),
            runs, format_p(c.get("p_accuracy")), format_p(c.get("p_time")),
            "**record**" if r.get("record") else "", r["date"][:10], _versions(r.get("versions", {})),
        ]) + " |")
    lines += ["", "Sources:", ""] + [f"- `{r['source']}`" for r in rows]
    return "\n".join(lines) + "\n"


def _differing_settings(rows: list[dict]) -> dict[str, list[str]]:
    """For each model, the settings keys whose values differ between its rows."""
    out = {}
    for model in {r["model"] for r in rows}:
        mine = [r.get("settings", {}) for r in rows if r["model"] == model]
        keys = sorted({k for s in mine for k in s})
        out[model] = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True, default=str) for s in mine}) > 1]
    return out


def _settings_cell(row: dict, keys: list[str]) -> str:
    if not keys:
        return "—"
    s = row.get("settings", {})
    shown = ", ".join(f"{k}={_short(s.get(k))}" for k in keys)
    return f"{shown} #{row['settings_hash']}"


def _short(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "()"
    return str(v)


def _versions(v: dict) -> str:
    keep = ("fastcifar", "torch", "cuda", "airbench")
    return ", ".join(f"{k} {v[k]}" for k in keep if v.get(k))


def render_plot(rows: list[dict], path: str | Path) -> None:
    """Accuracy against training time, one point per row with its 95% confidence intervals as
    error bars (none for a single run); records ringed."""
    from fastcifar.plots import pyplot, save_figure

    fig, _ = _plot_figure(rows)
    save_figure(fig, path)
    pyplot().close(fig)


def _plot_figure(rows: list[dict]):
    """The leaderboard plot's figure and axes (see `render_plot`)."""
    from fastcifar.plots import pyplot

    plt = pyplot()
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {"speedrun": "o", "baseline": "s", "train": "^", "target": "D"}
    data_sources = sorted({r["data"] for r in rows})
    colors = {d: f"C{i}" for i, d in enumerate(data_sources)}
    for r in rows:
        x, y = r["time_mean_s"], 100 * r["accuracy_mean"]
        ax.errorbar(x, y, xerr=_half_widths(r.get("time_ci95_s"), x),
                    yerr=_half_widths(r.get("accuracy_ci95"), r["accuracy_mean"], 100),
                    fmt=markers[r["kind"]], color=colors[r["data"]], capsize=3)
        if r.get("record"):
            ax.plot(x, y, "o", ms=14, mfc="none", mec="black")
    ax.axhline(100 * TARGET, color="gray", ls="--", lw=0.8)
    for d in data_sources:  # legend: one handle per data source
        ax.plot([], [], "o", color=colors[d], label=d)
    for kind, m in markers.items():
        if any(r["kind"] == kind for r in rows):
            ax.plot([], [], m, color="gray", label=kind)
    devices = sorted({r["device"] for r in rows})
    title = "CIFAR-10: accuracy against time (bars: 95% CI of the mean)"
    if len(devices) == 1:   # the device once, in the title, rather than in every label
        title += f"\non {devices[0]}"
    ax.set(xlabel="time (s)", ylabel="test accuracy (%)", title=title)
    ax.set_xscale("log")
    plain = FuncFormatter(lambda x, _: f"{x:g}")  # 2.5 rather than 2.5x10^0 on a log axis
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _label_points(fig, ax, rows, with_device=len(devices) > 1)
    return fig, ax


LABEL_OFFSET_PX = (6, 4)   # a label's lower left corner, from its point
MERGE_PX = 30              # rows of one label closer than this on the plot share the label


def _label_points(fig, ax, rows: list[dict], with_device: bool) -> None:
    """Name the points without overlapping names: rows with the same name drawn close together
    (repeated invocations of one configuration) get one label, "name (×N)"; labels that would
    still overlap are moved down, with a line to their point."""
    ax.autoscale_view()
    to_px = ax.transData.transform
    groups: list[tuple[str, list]] = []          # (label, [point in pixels, ...])
    for r in rows:
        text = f"{r['model']} ({r['device']})" if with_device else r["model"]
        px = tuple(to_px((r["time_mean_s"], 100 * r["accuracy_mean"])))
        for label, points in groups:
            if label == text and any(abs(px[0] - p[0]) <= MERGE_PX and abs(px[1] - p[1]) <= MERGE_PX for p in points):
                points.append(px)
                break
        else:
            groups.append((text, [px]))
    renderer = fig.canvas.get_renderer()
    labels = []
    for text, points in groups:
        anchor = max(points)                      # the rightmost point: the label sits right of the group
        if len(points) > 1:
            text = f"{text} (×{len(points)})"
        xy = ax.transData.inverted().transform(anchor)
        t = ax.annotate(text, xy, xytext=LABEL_OFFSET_PX, textcoords="offset pixels", fontsize=7)
        b = t.get_window_extent(renderer)
        labels.append((t, text, xy, (b.x0, b.y0, b.width, b.height)))
    shifts = spread_labels([box for *_, box in labels])
    for (t, text, xy, _), dy in zip(labels, shifts):
        if dy:   # moved: drawn again, with a line back to its point
            t.remove()
            ax.annotate(text, xy, xytext=(LABEL_OFFSET_PX[0], LABEL_OFFSET_PX[1] + dy),
                        textcoords="offset pixels", fontsize=7,
                        arrowprops=dict(arrowstyle="-", lw=0.5, color="gray", shrinkA=0, shrinkB=3))


def spread_labels(boxes: list[tuple[float, float, float, float]], pad: float = 2.0) -> list[float]:
    """Vertical shifts (pixels, <= 0) that leave no two label boxes ``(x0, y0, width, height)``
    overlapping: from the top label down, a label that meets one already placed moves to just
    below it, until it meets none."""
    placed: list[tuple[float, float, float, float]] = []
    shifts = [0.0] * len(boxes)
    for i in sorted(range(len(boxes)), key=lambda i: -(boxes[i][1] + boxes[i][3])):
        x0, y0, w, h = boxes[i]
        y = y0
        while True:
            hit = [p for p in placed if x0 < p[0] + p[2] and p[0] < x0 + w and y < p[1] + p[3] + pad and p[1] < y + h + pad]
            if not hit:
                break
            y = min(p[1] for p in hit) - h - pad
        placed.append((x0, y, w, h))
        shifts[i] = y - y0
    return shifts


def _half_widths(ci: Optional[list[float]], centre: float, scale: float = 1.0):
    """matplotlib's [[below], [above]] error bar lengths from an interval (0 without one)."""
    if ci is None:
        return 0
    return [[scale * max(centre - ci[0], 0.0)], [scale * max(ci[1] - centre, 0.0)]]


# -----------------------------------------------------------------------------
# the `fastcifar leaderboard` command

def leaderboard(results: list[Path], out: Optional[Path], plot: Optional[Path], as_json: bool,
                margin: float = ACCURACY_MARGIN) -> list[dict]:
    """Collect rows from ``results`` and write the Markdown table and the plot.

    With ``as_json`` the rows are printed as JSON and files are written only where ``out`` /
    ``plot`` are given; otherwise ``out`` and ``plot`` default to bench/LEADERBOARD.md and
    bench/leaderboard.png. A plot that cannot be drawn (matplotlib missing or broken) is
    skipped with a message; the table is still written."""
    from fastcifar.plots import plot_or_skip

    if not 0 <= margin < 1:
        raise UserError(f"--margin must be in [0, 100) percentage points, got {100 * margin:g}")
    if not as_json:
        out = out or Path("bench/LEADERBOARD.md")
        plot = plot or Path("bench/leaderboard.png")
    targets = [(flag, t) for flag, t in (("--out", out), ("--plot", plot)) if t is not None]
    for flag, target in targets:  # one line now rather than a traceback after the work
        check_writable(target.parent, f"leaderboard {flag}")
    rows = collect(results, margin=margin)
    if not rows:
        raise UserError(f"no results under {', '.join(map(str, results))}; "
                        f"run `fastcifar speedrun` or `fastcifar train` first")
    for flag, target in targets:
        if not target.parent.is_dir():
            raise UserError(f"folder {target.parent} does not exist; create it or choose another path")
        if target.is_dir():
            raise UserError(f"leaderboard {flag} {target} is a folder; give a file name")
    if out is not None:
        atomic_write_text(out, render_markdown(rows, margin))
    drawn = plot is not None and plot_or_skip(render_plot, rows, plot)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print(render_markdown(rows, margin), end="")
        print(f"wrote {out}" + (f" and {plot}" if drawn else ""))
    return rows


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-")[:60] or "x"
