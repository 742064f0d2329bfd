"""Benchmark result files as Markdown tables, for README.md and bench/README.md.

    python bench/report.py                       # every result file under bench/results
    python bench/report.py FILE_OR_DIR ... [--out report.md] [--include-dry-run]

Figures go into documentation only from result files, with their machine named; this script is
how: each table is copied out of one file and says which, with its device and versions. It knows
four kinds of file (others are passed over; speedrun and training results are rendered by
`fastcifar leaderboard`):

* bench_bn_relu.py: fused BN(+add)+ReLU against cuDNN and torch.compile per shape, achieved
  bandwidth as a share of the measured copy bandwidth, the zoo-weighted summary, and the
  resnet_2111 train step per BN backend;
* bench_train.py: images/s, achieved TFLOP/s (and its share of the matrix-product rate that a
  bench_bn_relu file of the same device measured), data-wait share, peak memory, warm-up;
* bench_loaders.py: images/s per loader;
* profile_step.py: device time, launches, idle share and kernel groups of a training step.

Dry runs (interpreter timings, meaningless) are left out unless --include-dry-run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kind_of(d: dict) -> str | None:
    if d.get("kind") == "bench_train":
        return "train"
    if d.get("kind") == "profile_step":
        return "profile"
    if "shapes" in d and "copy_GBps" in d:
        return "bn_relu"
    if str(d.get("benchmark", "")).startswith("loader throughput"):
        return "loaders"
    return None


def is_dry_run(d: dict) -> bool:
    return bool(d.get("dry_run") or (d.get("settings") or {}).get("dry_run"))


def load(paths: list[Path]) -> list[tuple[Path, dict]]:
    """(file, content) of every JSON result file under ``paths``, in name order."""
    files = []
    for p in paths:
        files += sorted(p.rglob("*.json")) if p.is_dir() else [p]
    out = []
    for f in files:
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and kind_of(d):
            out.append((f, d))
    return out


def _rel(f: Path) -> str:
    try:
        return str(f.resolve().relative_to(ROOT))
    except ValueError:
        return str(f)


def _versions(d: dict) -> str:
    v = d.get("versions") or d.get("machine", {}).get("versions") or {}
    parts = [f"{k} {v[k]}" for k in ("torch", "triton", "cuda") if v.get(k)]
    cache = d.get("machine", {}).get("compile_cache")
    return ", ".join(parts + ([f"compile cache {cache}"] if cache else []))


def _device(d: dict) -> str:
    m = d.get("machine", {})
    return d.get("device") or m.get("device_name") or m.get("gpu") or m.get("cpu_model") or "?"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _ms(r: dict, key: str) -> str:
    if f"{key}_error" in r:
        return "failed"
    return f"{r[f'{key}_ms']:.3f}" if f"{key}_ms" in r else "-"


def _title(what: str, d: dict) -> str:
    return f"### {what}: {_device(d)}" + (" (DRY RUN: meaningless timings)" if is_dry_run(d) else "")


def _model_label(row: dict) -> str:
    """The row's model, with the builder options it was measured with (bench_train, profile_step)."""
    opts = " ".join(f"{k}={v}" for k, v in (row.get("model_options") or {}).items())
    return f"{row['model']} ({opts})" if opts else row["model"]


def _mode(d: dict) -> str:
    """The caption's note of a torch.compile mode other than the default, or of no compilation
    at all (bench_train, profile_step)."""
    settings = d.get("settings") or {}
    if settings.get("no_compile"):
        return "; not compiled (eager PyTorch)"
    mode = settings.get("compile_mode")
    return f"; torch.compile mode {mode}" if mode else ""


SKIPPED = " †"   # marks a row whose compile mode asked for CUDA graphs and got none for some graph


def _skipped(r: dict) -> str:
    return SKIPPED if (r.get("cudagraphs") or {}).get("graphs_skipped") else ""


def _skipped_note(rows: list[dict]) -> list[str]:
    if not any(_skipped(r) for r in rows):
        return []
    return ["", f"{SKIPPED.strip()} torch.compile ran some of this row's graphs without CUDA graphs, launch by "
                f"launch (its `cudagraphs` field gives inductor's reasons): not a CUDA-graph figure."]


def _rate(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.2f}"


def bn_relu_section(f: Path, d: dict) -> list[str]:
    out = [_title("Fused BN-ReLU kernels", d), "",
           f"`{_rel(f)}` ({_versions(d)}); batch {d['batch']}, {d['dtype']}, {d['memory_format']}, "
           f"forward+backward ms per call (median); copy bandwidth {d['copy_GBps']:.0f} GB/s"
           + (f", dense matrix product {_rate(d['matmul_TFLOPs'])} TFLOP/s" if d.get("matmul_TFLOPs") else "")
           + ("" if d.get("complete") else "; **incomplete file** (the run was cut short)"), ""]
    rows = [[str(r["C"]), f"{r['H']}×{r['W']}", "yes" if r["residual"] else "no", r["act"] or "none",
             str(r["count"]), _ms(r, "fused"), _ms(r, "eager"), _ms(r, "compiled"),
             f"{r['fused_GBps']:.0f}" if "fused_GBps" in r else "-",
             f"{100 * r['fused_frac_of_copy_bw']:.0f}%" if "fused_frac_of_copy_bw" in r else "-"]
            for r in d["shapes"]]
    out += _table(["C", "H×W", "residual", "activation", "layers", "Triton ms", "cuDNN ms", "compile ms",
                   "Triton GB/s", "of copy"], rows)
    s = d.get("summary") or {}
    if s.get("zoo_weighted_ms"):
        w = s["zoo_weighted_ms"]
        out += ["", f"Weighted by layer count ({s.get('covers', '?')}): Triton {w['fused']:.2f} ms, cuDNN "
                    f"{w['eager']:.2f} ms (Triton ×{s['speedup_vs_eager']:.2f}), torch.compile {w['compiled']:.2f} ms "
                    f"(Triton ×{s['speedup_vs_compiled']:.2f}); Triton at {100 * s['fused_frac_of_copy_bw']:.0f}% "
                    f"of copy bandwidth."]
    t = d.get("train_step_resnet_2111") or {}
    if "triton" in t and "compiled" in t and "ms_per_step" in t["triton"] and "ms_per_step" in t["compiled"]:
        out += ["", f"resnet_2111 training step, batch {t['batch']}: `--bn-backend triton` "
                    f"{t['triton']['ms_per_step']:.2f} ms, `compiled` {t['compiled']['ms_per_step']:.2f} ms "
                    f"(compiled time / triton time = ×{t['speedup_triton_vs_compiled']:.2f})."]
    return out


def train_section(f: Path, d: dict, matmul: dict[str, float]) -> list[str]:
    peak = matmul.get(_device(d))
    precision = "fp32" if _device(d).startswith("CPU") else "fp16 autocast"
    out = [_title("Training throughput", d), "",
           f"`{_rel(f)}` ({_versions(d)}); each model's fast-recipe batch size, channels-last, {precision}"
           + _mode(d)
           + (f"; TFLOP/s with its share of the {_rate(peak)} TFLOP/s matrix-product rate measured on this "
              f"device" if peak else ""), ""]
    rows = []
    for r in d["rows"]:
        head = [_model_label(r), r["bn_backend"], r["loader"]]
        if "error" in r:
            rows.append(head + [f"failed: {r['error'][:80]}"] + [""] * 6)
            continue
        tf = r.get("achieved_tflops")
        rows.append(head + [
            f"{r['images_per_s']:,.0f}",
            "-" if tf is None else f"{tf:.1f}" + (f" ({100 * tf / peak:.0f}%)" if peak else ""),
            f"{100 * r['data_wait_share']:.1f}%", f"{r['step_ms']:.2f}{_skipped(r)}",
            "-" if r.get("peak_mem_mib") is None else f"{r['peak_mem_mib']:,.0f}",
            f"{r['compile_warmup_s']:.1f}", str(r["batch_size"])])
    out += _table(["model", "BN backend", "loader", "images/s", "TFLOP/s", "data wait", "step ms",
                   "peak MiB", "warm-up s", "batch"], rows) + _skipped_note(d["rows"])
    if d.get("running"):
        r = d["running"]
        out += ["", f"**Stopped inside** {r['model']} / {r['bn_backend']} ({r['started_s']} s into the run)."]
    return out


def loaders_section(f: Path, d: dict) -> list[str]:
    out = [_title("Loaders", d), "",
           f"`{_rel(f)}` ({_versions(d)}); batch {d['batch_size']}, {d['dtype']}, median of "
           f"{d['timed_epochs']} full epochs after a warm-up", ""]
    rows = [[name, "failed: " + r["error"][:80] if "error" in r else f"{r['images_per_s_median']:,}"]
            for name, r in d["results"].items()]
    return out + _table(["loader", "images/s"], rows)


def profile_section(f: Path, d: dict) -> list[str]:
    out = [_title("Where a training step's time goes", d), "",
           f"`{_rel(f)}` ({_versions(d)}){_mode(d)}; device ms per step (CUDA events), kernel launches and "
           f"time per step (torch.profiler), the share of the step with no kernel running, and the kernel groups", ""]
    rows = []
    for r in d["rows"]:
        head = [_model_label(r), r["bn_backend"]]
        if "error" in r:
            rows.append(head + [f"failed: {r['error'][:80]}", "", "", "", ""])
            continue
        idle = "-" if r.get("device_idle_share") is None else f"{100 * r['device_idle_share']:.0f}%"
        groups = ", ".join(f"{k} {v['ms_per_step']:.2f} ms ({v['launches_per_step']:.0f})"
                           for k, v in r["by_category"].items())
        rows.append(head + [f"{r['step_ms']:.2f}{_skipped(r)}", f"{r['kernels_per_step']:.0f}",
                            f"{r['kernel_ms_per_step']:.2f}", idle, groups])
    return out + _table(["model", "BN backend", "step ms", "launches", "kernel ms", "idle",
                         "groups: ms per step (launches)"], rows) + _skipped_note(d["rows"])


def report(paths: list[Path], include_dry_run: bool = False) -> str:
    found = [(f, d) for f, d in load(paths) if include_dry_run or not is_dry_run(d)]
    matmul = {_device(d): d["matmul_TFLOPs"] for f, d in found
              if kind_of(d) == "bn_relu" and d.get("matmul_TFLOPs") and not is_dry_run(d)}
    sections = []
    for f, d in found:
        k = kind_of(d)
        if k == "bn_relu":
            sections.append(bn_relu_section(f, d))
        elif k == "train":
            sections.append(train_section(f, d, matmul))
        elif k == "profile":
            sections.append(profile_section(f, d))
        else:
            sections.append(loaders_section(f, d))
    if not sections:
        return "no bench_bn_relu, bench_train, bench_loaders or profile_step result files found\n"
    return "\n\n".join("\n".join(s) for s in sections) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", type=Path, default=[ROOT / "bench" / "results"],
                   help="result files or folders (searched recursively); default bench/results")
    p.add_argument("--out", type=Path, help="write the Markdown here instead of printing it")
    p.add_argument("--include-dry-run", action="store_true", help="also render --dry-run files")
    args = p.parse_args(argv)
    missing = [str(x) for x in args.paths if not x.exists()]
    if missing:
        print(f"error: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 1
    text = report(args.paths, args.include_dry_run)
    if args.out:
        from beton_data.files import atomic_path
        with atomic_path(args.out) as tmp:
            tmp.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
