"""`fastcifar speedrun`: time a model's `fast` recipe over several seeds against the airbench94
baseline, on the same data and device, in one invocation.

    1. one untimed warm-up run (torch.compile, cuDNN autotuning, lazy CUDA initialisation);
    2. N timed runs of the model's fast recipe, seeds seed..seed+N-1;
    3. the baseline: one untimed warm-up, then N timed runs of airbench's train94 on the same
       images (see baseline.py);
    4. for both, mean ± std and the 95% confidence interval of accuracy and time; the ratio of
       their mean times; and the one-sided Welch tests of `fastcifar.results` (accuracy not
       lower by the margin or more, time lower), which decide whether it is a record.

The time of a run is what the speedrun records count: training (compile/warm-up steps
excluded, as train.py estimates them) plus the final evaluation with the recipe's test-time
augmentation, each bracketed by CUDA synchronisation. Loading the data onto the device,
writing checkpoints and the warm-up run are not in it. The same definition is applied to the
baseline.

Nothing measured is lost: the result file (default bench/results/speedrun_<model>_<device>.json,
the latest invocation for that model and device) and the two leaderboard entries beside it
(ours and the baseline's, which accumulate over invocations) are rewritten atomically after
every run. A run that fails is recorded with its error and the others go on; a signal
(Ctrl-C, SIGTERM from a time limit) stops the speedrun with every finished run on disk. If
airbench cannot be imported, the model's runs are still timed and recorded, and the command
ends by saying the baseline is missing.
"""
from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

from beton_data.files import check_writable
from fastcifar.errors import UserError
from fastcifar.config import check_compile_mode
from beton_data import check_data
from fastcifar.leaderboard import add_entry, settings_of
from fastcifar.summary import RunSummary, from_dict as summary_from_dict
from fastcifar.machine import command_line, device_name, machine_info, resolve_device
from fastcifar.results import (ACCURACY_MARGIN, ALPHA, RECORD_MIN_RUNS, aggregate, compare, device_slug, format_ci,
                               format_p, format_pm, now_iso, write_result)

DEFAULT_RESULTS = Path("bench/results")


class _Interrupted(Exception):
    """A timed run stopped by a signal: the speedrun stops too."""


def speedrun(model: str = "speedrun_net", runs: int = 5, baseline: bool = True,
             data: Optional[Path] = None, out: Optional[Path] = None, device: str = "auto",
             seed: int = 0, overrides: Optional[dict] = None, model_options: Optional[dict] = None,
             original_npz: Optional[Path] = None,
             loader: str = "gpu", bn_backend: Optional[str] = None, compile: Optional[bool] = None,
             margin: float = ACCURACY_MARGIN, compile_mode: Optional[str] = None) -> dict:
    """Run the speedrun; returns the result written to ``out``."""
    from fastcifar.baseline import import_airbench, load_npz, require_cuda
    from fastcifar.models import get_recipe

    # --- check everything before the first (long) run ------------------------------------------
    if runs < 1:
        raise UserError(f"--runs must be at least 1, got {runs}")
    if not 0 <= margin < 1:
        raise UserError(f"--margin must be in [0, 100) percentage points, got {100 * margin:g}")
    check_compile_mode(compile_mode)
    data_files = check_data(data)   # refuses missing or damaged data before the first run
    data = data_files.folder
    recipe = get_recipe(model, "fast")  # UserError for an unknown model
    try:
        recipe = recipe.replace(**(overrides or {}))
    except (ValueError, TypeError) as e:
        raise UserError(f"bad override: {e}") from None
    model_options = dict(model_options or {})
    _check_model_options(model, model_options)
    device = resolve_device(device)
    if original_npz is not None:
        load_npz(original_npz)  # fail now on a bad file, not after the runs
    out = Path(out) if out is not None else \
        DEFAULT_RESULTS / f"speedrun_{model}_{device_slug(device_name(device))}.json"
    check_writable(out.parent, "speedrun --out")
    say = print
    baseline_missing = None
    if baseline:
        require_cuda(device)  # on a CPU the baseline can never run: a mistake in the command
        try:
            import_airbench()
        except UserError as e:  # an incomplete installation: the model's runs are still worth having
            baseline_missing = str(e)
            say(f"baseline: MISSING ({baseline_missing}); the model's runs are timed and recorded without it")

    result = {
        "kind": "speedrun_result", "id": uuid.uuid4().hex, "model": model, "recipe": "fast",
        "recipe_fields": recipe.to_dict(), "overrides": dict(overrides or {}), "model_options": model_options,
        "data": data_files.name, "data_sha256": data_files.identity, "data_dir": str(data),
        "command": command_line(), "date": now_iso(), "seeds": list(range(seed, seed + runs)),
        "loader": loader, "accuracy_margin": margin, "status": "running", "runs": [], "baseline": None,
    }
    if baseline_missing:
        result["baseline_error"] = f"missing: {baseline_missing}"
    rec = _Recorder(result, out)

    with tempfile.TemporaryDirectory(prefix="fastcifar-speedrun-") as work:
        work = Path(work)
        npz_beton = _npz_as_beton(original_npz, work) if original_npz is not None else None

        def one_run(run_seed: int, name: str) -> tuple[dict, dict]:
            summary = _train_once(model, overrides, model_options, data, work / name, device, run_seed,
                                  loader, bn_backend, compile, compile_mode)
            t = summary.times
            r = {"seed": run_seed, "accuracy": summary.final_acc,
                 "time_s": t["train_s"] + t["eval_s"], "train_s": t["train_s"], "eval_s": t["eval_s"],
                 "compile_warmup_s": t["compile_warmup_s"], "wall_s": t["wall_s"]}
            if npz_beton is not None:
                r["original_accuracy"] = _accuracy_on(work / name, npz_beton, device)
            return r, summary

        say(f"speedrun: {model} (fast recipe, {recipe.epochs} epochs), {runs} timed runs on {device}, "
            f"data {result['data']}; results after every run in {out}")
        t0 = time.perf_counter()
        try:
            warm, summary = one_run(seed + 10_000, "warmup")
        except Exception as e:  # a broken recipe or device fails every run alike: stop here
            result["warmup"] = {"seed": seed + 10_000, "error": _error(e)}
            rec.finish("failed", say)
            raise UserError(f"the warm-up run failed ({result['warmup']['error']}); nothing was timed; "
                            f"see {out}") from None
        say(f"  warm-up run: {100 * warm['accuracy']:.2f}% in {time.perf_counter() - t0:.1f} s wall "
            f"(compile/warm-up {warm['compile_warmup_s']:.1f} s; untimed)")
        result.update(warmup=warm, device=summary.device, versions=summary.versions,
                      machine=machine_info(device), params=summary.params, precision=summary.precision,
                      bn_backend=summary.bn_backend, compile=summary.compile,
                      settings=settings_of(recipe.to_dict(), model_options, precision=summary.precision,
                                           world_size=summary.world_size, bn_backend=summary.bn_backend,
                                           loader=loader, compile=summary.compile,
                                           # only when given: older entries' settings hashes stay
                                           **({"compile_mode": compile_mode} if compile_mode else {})))
        rec.save()

        for i, s in enumerate(result["seeds"]):
            try:
                r, _ = one_run(s, f"run{i}")
                say(_run_line(model, i, runs, r))
            except _Interrupted as e:
                result["runs"].append({"seed": s, "error": str(e)})
                rec.finish("interrupted", say)
                raise UserError(f"speedrun stopped: {e}; the {rec.ok_runs()} finished run(s) are in {out}") from None
            except Exception as e:  # this seed is lost, the others still run
                r = {"seed": s, "error": _error(e)}
                say(f"  {model} run {i + 1}/{runs} (seed {s}) FAILED: {r['error']}")
            result["runs"].append(r)
            rec.save()

        if baseline and not baseline_missing and rec.ok_runs():
            try:
                _run_baseline(data, device, result, original_npz, rec, say)
            except Exception as e:  # keep our figures; say what failed
                result["baseline_error"] = _error(e)
    rec.finish("completed", say)
    problems = []
    failed = [r for r in result["runs"] if "error" in r]
    if failed:
        problems.append(f"{len(failed)} of {runs} runs failed (seed {failed[0]['seed']}: {failed[0]['error']})")
    if baseline_missing:
        problems.append(f"the baseline is missing ({baseline_missing})")
    elif result.get("baseline_error"):
        problems.append(f"the baseline failed ({result['baseline_error']})")
    if problems:
        kept = "the model's own results were" if rec.ok_runs() else "the errors were"
        raise UserError(f"{'; '.join(problems)}; {kept} written to {out}")
    return result


def _run_baseline(data: Path, device: str, result: dict, original_npz, rec: "_Recorder", say) -> None:
    """airbench94's warm-up and timed runs; ``result['baseline']`` appears with its first run
    and the files are rewritten after each."""
    from fastcifar import baseline as ab

    seeds = result["seeds"]
    say(f"baseline: {ab.NAME} (airbench=={ab.VERSION}, published {100 * ab.PUBLISHED_ACC:.2f}% "
        f"on the original CIFAR-10), 1 warm-up + {len(seeds)} timed runs on the same data")

    def on_run(r):
        if result["baseline"] is None:
            result["baseline"] = {"name": ab.NAME, "package": f"airbench=={ab.VERSION}",
                                  "published_acc": ab.PUBLISHED_ACC, "runs": []}
        runs = result["baseline"]["runs"]
        runs.append(r)
        if "error" in r:
            say(f"  {ab.NAME} run {len(runs)}/{len(seeds)} (seed {r['seed']}) FAILED: {r['error']}")
        else:
            say(_run_line(ab.NAME, len(runs) - 1, len(seeds), r))
        rec.save()

    ab.run_baseline(data, device, seeds, original_npz, on_run=on_run)


class _Recorder:
    """Keeps the result file and the leaderboard entries current: figures recomputed and both
    rewritten (atomically) after every run."""

    def __init__(self, result: dict, out: Path):
        self.result, self.out = result, out

    def ok_runs(self) -> int:
        return sum("error" not in r for r in self.result["runs"])

    def save(self) -> None:
        from fastcifar import baseline as ab

        res = self.result
        res.update(aggregate(res["runs"]))
        b = res.get("baseline")
        if b:
            b.update(aggregate(b["runs"]))
            if b.get("accuracy_mean") is not None:
                # on the JPEG copy of CIFAR-10 this is the copy's accuracy penalty for airbench94
                b["gap_to_published"] = ab.PUBLISHED_ACC - b["accuracy_mean"]
            if b.get("runs_ok") and res.get("runs_ok"):
                res["time_ratio"] = b["time_mean_s"] / res["time_mean_s"]
                ours, theirs = _ok(res["runs"]), _ok(b["runs"])
                res["comparison"] = compare([r["accuracy"] for r in ours], [r["time_s"] for r in ours],
                                            [r["accuracy"] for r in theirs], [r["time_s"] for r in theirs],
                                            res["accuracy_margin"])
        res["entries"] = _entries(res)
        write_result(self.out, res)
        for entry in res["entries"]:
            add_entry(self.out.parent, entry)

    def finish(self, status: str, say) -> None:
        """The last write, and the summary on stdout."""
        self.result["status"] = status
        self.save()
        if self.ok_runs():
            for line in report_lines(self.result):
                say(line)
        say(f"wrote {self.out} (and leaderboard entries in {self.out.parent / 'leaderboard'})")


# -----------------------------------------------------------------------------
# one run of ours

def _check_model_options(model: str, options: dict) -> None:
    """Fail before the first (long) run on options the model's builder refuses."""
    from fastcifar.models import create_model

    try:
        create_model(model, **options)
    except TypeError as e:
        raise UserError(f"bad --model-opt for {model}: {e}") from None


def _train_once(model, overrides, model_options, data, run_dir, device, seed, loader, bn_backend,
                compile, compile_mode=None) -> "RunSummary":
    from fastcifar.train import TrainConfig, train

    # timed runs: evaluate after the last epoch only, and write nothing but the final result
    # (no per-epoch checkpoints, TensorBoard events or plots)
    cfg = TrainConfig(model=model, recipe_tag="fast", overrides=dict(overrides or {}),
                      model_options=dict(model_options or {}), data=str(data),
                      out=str(run_dir), device=device, seed=seed, loader=loader, bn_backend=bn_backend,
                      compile=compile, compile_mode=compile_mode, eval_every=10**9, progress=False,
                      tensorboard=False,
                      epoch_checkpoints=False, plots=False)
    summary = summary_from_dict(train(cfg))
    if summary.signal is not None:
        import signal

        raise _Interrupted(f"interrupted by {signal.Signals(summary.signal).name} (seed {seed})")
    if not summary.is_result:
        raise RuntimeError(f"the run ended with status {summary.status!r}")
    return summary


def _npz_as_beton(npz: Path, work: Path) -> Path:
    """The .npz images as a test .beton, so the trained runs are evaluated by `fastcifar eval`'s code."""
    from beton_data import write_beton
    from fastcifar.baseline import load_npz

    images, labels = load_npz(npz)
    return write_beton(work / "original" / "test.beton", images, labels)


def _accuracy_on(run_dir: Path, beton: Path, device: str) -> float:
    from fastcifar.evaluate import run_eval

    return run_eval(run_dir, beton=beton, device=device, quiet=True)["acc"]


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def _ok(runs: list[dict]) -> list[dict]:
    return [r for r in runs if "error" not in r]


# -----------------------------------------------------------------------------
# results

def _entries(result: dict) -> list[dict]:
    """The leaderboard entries of this invocation so far: ours, and the baseline's if it ran;
    only runs that finished, the failed ones counted."""
    common = {"device": result.get("device", "?"), "data": result["data"], "data_sha256": result["data_sha256"],
              "date": result["date"], "versions": result.get("versions", {}), "command": result["command"],
              "runs_planned": len(result["seeds"])}
    entries = []
    for kind, runs, extra in (("speedrun", result["runs"], {"id": result["id"], "model": result["model"],
                                                             "recipe": "fast", "settings": result.get("settings", {})}),
                              ("baseline", (result.get("baseline") or {}).get("runs", []),
                               {"id": result["id"] + "-baseline", "model": (result.get("baseline") or {}).get("name"),
                                "recipe": (result.get("baseline") or {}).get("package")})):
        ok = _ok(runs)
        if ok:
            entries.append({"kind": kind, **extra, "accuracies": [r["accuracy"] for r in ok],
                            "times_s": [r["time_s"] for r in ok], "failed_runs": len(runs) - len(ok), **common})
    return entries


def report_lines(result: dict) -> list[str]:
    """The closing summary: mean ± std and 95% CI of accuracy and time, the baseline, the tests
    against it, and the time ratio."""
    def line(name, agg):
        text = (f"{name:>14s}: accuracy {format_pm(agg['accuracy_mean'], agg['accuracy_std'], 100)} % "
                f"(95% CI {format_ci(agg.get('accuracy_ci95'), 100)})   "
                f"time {format_pm(agg['time_mean_s'], agg['time_std_s'])} s "
                f"(95% CI {format_ci(agg.get('time_ci95_s'))})")
        if agg.get("original_accuracy_mean") is not None:
            text += f"   (original test images: {format_pm(agg['original_accuracy_mean'], agg['original_accuracy_std'], 100)} %)"
        return text

    n_ok = sum("error" not in r for r in result["runs"])
    lines = [f"results over {n_ok} runs on {result['device']}, data {result['data']}:",
             line(result["model"], result)]
    b = result.get("baseline")
    if b and b.get("accuracy_mean") is not None:
        lines.append(line(b["name"], b))
        c = result.get("comparison")
        if c:
            lines.append(f"against {b['name']} (one-sided Welch t-tests, {c['baseline_runs']} baseline runs): "
                         f"accuracy not {100 * c['accuracy_margin']:g} points or more lower p = {format_p(c['p_accuracy'])}; "
                         f"time lower p = {format_p(c['p_time'])}")
            lines.append("  a record (>= {} runs, both p < {})".format(RECORD_MIN_RUNS, ALPHA) if c["record"]
                         else f"  not a record: {c['why']}")
        ratio = result["time_ratio"]
        lines.append(f"time ratio {b['name']} / {result['model']} = {ratio:.2f} "
                     f"({result['model']} is {ratio if ratio >= 1 else 1 / ratio:.2f}x "
                     f"{'faster' if ratio >= 1 else 'slower'})")
    return lines


def _run_line(name: str, i: int, n: int, r: dict) -> str:
    text = f"  {name} run {i + 1}/{n} (seed {r['seed']}): {100 * r['accuracy']:.2f}% in {r['time_s']:.2f} s"
    if "original_accuracy" in r:
        text += f", original test images {100 * r['original_accuracy']:.2f}%"
    return text

