"""`fastcifar speedrun`: time a model's `fast` recipe over several seeds against the airbench94
baseline, on the same data and device, in one invocation.

    1. one untimed warm-up run of the model (torch.compile, cuDNN autotuning, lazy CUDA
       initialisation), then one of the baseline, airbench's train94 on the same images (see
       baseline.py);
    2. N timed pairs, seeds seed..seed+N-1: the model's fast recipe and train94 back to back,
       in alternating order (model first in the 1st, 3rd, ... pair, train94 first in the
       others). Interleaving keeps a slow drift of the machine (clocks, temperature, a
       neighbour's load) out of the comparison, which two blocks of runs one after the other
       would fold into it, and a speedrun cut short by a time limit still leaves pairs;
    3. for both, mean ± std and the 95% confidence interval of accuracy and time; the ratio of
       their mean times, and per pair (median and range); and the one-sided Welch tests of
       `fastcifar.results` (accuracy not lower by the margin or more, time lower), which decide
       whether it is a record.

With `--target` (and no baseline) each run instead stops as soon as its test accuracy reaches
the target, evaluating after every epoch: the zoo models' check against their reports
(`--target report --calibration calibrate_airbench.json` on the JPEG copy), recording per run
whether it got there, after how many epochs and how much training.

The time of a run is what the speedrun records count: training (compile/warm-up steps
excluded, as train.py estimates them) plus the final evaluation with the recipe's test-time
augmentation, each bracketed by CUDA synchronisation. Loading the data onto the device,
writing checkpoints and the warm-up run are not in it. The same definition is applied to the
baseline.

Nothing measured is lost: the result file (default bench/results/speedrun_<model>_<device>.json,
the latest invocation for that model and device) and the two leaderboard entries beside it
(ours and the baseline's, which accumulate over invocations) are rewritten atomically after
every run. A run that fails is recorded with its error and the others go on; a signal
(Ctrl-C, SIGTERM from a time limit), in a run of either, stops the speedrun with every
finished run on disk. If
airbench cannot be imported, the model's runs are still timed and recorded, and the command
ends by saying the baseline is missing.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

import numpy as np

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
             margin: float = ACCURACY_MARGIN, compile_mode: Optional[str] = None,
             target: Optional[str] = None, calibration: Optional[Path] = None,
             warmup_epochs: Optional[int] = None, train_budget_s: Optional[float] = None) -> dict:
    """Run the speedrun; returns the result written to ``out``. With ``target`` (see
    `resolve_target`) every run stops as soon as its test accuracy reaches it, and the result
    records, per run, whether and when it did. With ``train_budget_s`` the timed runs train
    for as many epochs as fit that much training at the warm-up's speed (`budget_epochs`)."""
    from fastcifar.baseline import NAME as BASELINE, import_airbench, load_npz, require_cuda
    from fastcifar.models import get_recipe

    # --- check everything before the first (long) run ------------------------------------------
    if runs < 1:
        raise UserError(f"--runs must be at least 1, got {runs}")
    if warmup_epochs is not None and warmup_epochs < 1:
        raise UserError(f"--warmup-epochs must be at least 1, got {warmup_epochs}")
    if train_budget_s is not None:
        if not train_budget_s > 0:
            raise UserError(f"--train-budget-s must be a positive number of seconds, got {train_budget_s:g}")
        if "epochs" in (overrides or {}):
            raise UserError("--train-budget-s chooses the epochs of the timed runs; drop --set epochs=...")
    if not 0 <= margin < 1:
        raise UserError(f"--margin must be in [0, 100) percentage points, got {100 * margin:g}")
    check_compile_mode(compile_mode)
    if compile is False and compile_mode is not None:
        raise UserError(f"--compile-mode {compile_mode} needs compilation; drop --no-compile or --compile-mode")
    data_files = check_data(data)   # refuses missing or damaged data before the first run
    data = data_files.folder
    recipe = get_recipe(model, "fast")  # UserError for an unknown model
    try:
        recipe = recipe.replace(**(overrides or {}))
    except (ValueError, TypeError) as e:
        raise UserError(f"bad override: {e}") from None
    model_options = dict(model_options or {})
    _check_model_options(model, model_options)
    if target is not None and baseline:
        raise UserError("--target stops each run at the target, so its times are not comparable with the "
                        "baseline's full runs; add --no-baseline")
    goal = resolve_target(target, calibration, model, data_files)
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
    if goal is not None:
        result["target"] = goal
    if baseline_missing:
        result["baseline_error"] = f"missing: {baseline_missing}"
    rec = _Recorder(result, out)

    with tempfile.TemporaryDirectory(prefix="fastcifar-speedrun-") as work, contextlib.ExitStack() as stack:
        work = Path(work)
        npz_beton = _npz_as_beton(original_npz, work) if original_npz is not None else None

        def one_run(run_seed: int, name: str, epochs: Optional[int] = None) -> tuple[dict, dict]:
            run_overrides = {**(overrides or {}), **({"epochs": epochs} if epochs else {})}
            summary = _train_once(model, run_overrides, model_options, data, work / name, device, run_seed,
                                  loader, bn_backend, compile, compile_mode,
                                  None if goal is None else goal["value"])
            t = summary.times
            r = {"seed": run_seed, "accuracy": summary.final_acc,
                 "time_s": t["train_s"] + t["eval_s"], "train_s": t["train_s"], "eval_s": t["eval_s"],
                 "compile_warmup_s": t["compile_warmup_s"], "wall_s": t["wall_s"]}
            if goal is not None:
                # a run that reaches the target stops there: its time_s is the time to the target,
                # training plus the evaluations after each epoch that checked it; train_to_target_s
                # is the training alone
                reached = summary.time_to_target if summary.target_reached else None
                r.update(target_reached=reached is not None, epochs=summary.epochs_completed,
                         train_to_target_s=reached["train_s"] if reached else None,
                         time_to_target_s=r["time_s"] if reached else None)
            if summary.cudagraphs is not None:   # graphs compiled by this run that ran without CUDA graphs
                r["cudagraphs"] = summary.cudagraphs
            if npz_beton is not None:
                r["original_accuracy"] = _accuracy_on(work / name, npz_beton, device)
            return r, summary

        say(f"speedrun: {model} (fast recipe, {recipe.epochs} epochs), {runs} timed runs on {device}, "
            f"data {result['data']}; results after every run in {out}")
        if goal is not None:
            say(f"  target: {target_text(goal)}; each run stops when its test accuracy reaches it")
        t0 = time.perf_counter()
        try:
            # the warm-up compiles what every run runs (the train step and the evaluation, whose
            # shapes do not depend on the epochs); one epoch of it does that in a fraction of
            # the time of a whole run (--warmup-epochs), which matters for the larger models
            warm, summary = one_run(seed + 10_000, "warmup", warmup_epochs)
            warm["epochs_trained"] = summary.epochs_completed
        except Exception as e:  # a broken recipe or device fails every run alike: stop here
            result["warmup"] = {"seed": seed + 10_000, "error": _error(e)}
            rec.finish("failed", say)
            raise UserError(f"the warm-up run failed ({result['warmup']['error']}); nothing was timed; "
                            f"see {out}") from None
        say(f"  warm-up run ({warm['epochs_trained']} epoch{'s' if warm['epochs_trained'] != 1 else ''}): "
            f"{100 * warm['accuracy']:.2f}% in {time.perf_counter() - t0:.1f} s wall "
            f"(compile/warm-up {warm['compile_warmup_s']:.1f} s; untimed)")
        if train_budget_s is not None:
            budget = budget_epochs(summary, train_budget_s)
            result["budget"] = budget
            overrides = {**(overrides or {}), "epochs": budget["epochs"]}
            recipe = recipe.replace(epochs=budget["epochs"])
            result["overrides"], result["recipe_fields"] = dict(overrides), recipe.to_dict()
            say(f"  epochs: {budget['epochs']}, to fill the {train_budget_s:g} s training budget at the "
                f"warm-up's {budget['epoch_train_s']:.2f} s of training an epoch")
        result.update(warmup=warm, device=summary.device, versions=summary.versions,
                      machine=machine_info(device), params=summary.params, precision=summary.precision,
                      bn_backend=summary.bn_backend, compile=summary.compile,
                      settings=settings_of(recipe.to_dict(), model_options, precision=summary.precision,
                                           world_size=summary.world_size, bn_backend=summary.bn_backend,
                                           loader=loader, compile=summary.compile,
                                           # the mode the runs compiled in (as train resolved
                                           # it), only when there is one: older entries' hashes stay
                                           **({"compile_mode": summary.compile_mode} if summary.compile_mode else {}),
                                           **({"target": round(goal["value"], 6)} if goal else {})))
        rec.save()

        # the baseline's set-up and warm-up now, so that its timed runs can alternate with ours
        base = None
        if baseline and not baseline_missing:
            try:
                base = _start_baseline(stack, data, device, original_npz, result, say)
            except _Interrupted as e:
                result["baseline_error"] = f"warm-up: {e}"
                rec.finish("interrupted", say)
                raise UserError(f"speedrun stopped: {e}; nothing was timed; see {out}") from None
        order = iter(range(2 * runs))    # each timed run's place in the sequence, both sides
        pair = ("model",) if base is None else ("model", "baseline")

        for i, s in enumerate(result["seeds"]):
            for side in pair if i % 2 == 0 else pair[::-1]:
                name = model if side == "model" else BASELINE
                try:
                    if side == "model":
                        r, _ = one_run(s, f"run{i}")
                    else:
                        with _signals_interrupt(f"seed {s} of {BASELINE}"):
                            r = base.run(s)
                    say(_run_line(name, i, runs, r))
                except _Interrupted as e:
                    _add_run(result, side, {"seed": s, "error": str(e)})
                    rec.finish("interrupted", say)
                    theirs = f" and {len(_ok(result['baseline']['runs']))} of {BASELINE}" if result["baseline"] else ""
                    raise UserError(f"speedrun stopped: {e}; the {rec.ok_runs()} finished run(s){theirs} "
                                    f"are in {out}") from None
                except Exception as e:  # this seed is lost on this side, the rest still run
                    r = {"seed": s, "error": _error(e)}
                    say(f"  {name} run {i + 1}/{runs} (seed {s}) FAILED: {r['error']}")
                r["order"] = next(order)
                _add_run(result, side, r)
                rec.save()
    rec.finish("completed", say)
    problems = []
    failed = [r for r in result["runs"] if "error" in r]
    if failed:
        problems.append(f"{len(failed)} of {runs} runs failed (seed {failed[0]['seed']}: {failed[0]['error']})")
    if baseline_missing:
        problems.append(f"the baseline is missing ({baseline_missing})")
    elif result.get("baseline_error"):
        problems.append(f"the baseline failed ({result['baseline_error']})")
    elif result["baseline"]:
        failed = [r for r in result["baseline"]["runs"] if "error" in r]
        if failed:
            problems.append(f"{len(failed)} of {runs} {BASELINE} runs failed "
                            f"(seed {failed[0]['seed']}: {failed[0]['error']})")
    if problems:
        kept = "the model's own results were" if rec.ok_runs() else "the errors were"
        raise UserError(f"{'; '.join(problems)}; {kept} written to {out}")
    return result


def _start_baseline(stack: contextlib.ExitStack, data: Path, device: str, original_npz, result: dict, say):
    """airbench94's data files and untimed warm-up run; the baseline, or None (with
    ``result['baseline_error']``) when either fails: the model's runs then go on alone."""
    from fastcifar import baseline as ab

    say(f"baseline: {ab.NAME} (airbench=={ab.VERSION}, published {100 * ab.PUBLISHED_ACC:.2f}% "
        f"on the original CIFAR-10), 1 warm-up, then its timed runs alternate with {result['model']}'s")
    try:
        with _signals_interrupt(f"the warm-up of {ab.NAME}"):
            base = stack.enter_context(ab.AirbenchBaseline(data, device, original_npz))
            base.warmup()
    except _Interrupted:
        raise
    except Exception as e:  # keep our figures; say what failed
        result["baseline_error"] = _error(e)
        say(f"baseline: FAILED before its first timed run ({result['baseline_error']}); "
            f"{result['model']}'s runs go on without it")
        return None
    return base


def _add_run(result: dict, side: str, r: dict) -> None:
    """A finished (or failed) timed run into the result: ours, or the baseline's (whose entry
    appears with its first run)."""
    from fastcifar import baseline as ab

    if side == "model":
        result["runs"].append(r)
        return
    if result["baseline"] is None:
        result["baseline"] = {"name": ab.NAME, "package": f"airbench=={ab.VERSION}",
                              "published_acc": ab.PUBLISHED_ACC, "runs": []}
    result["baseline"]["runs"].append(r)


@contextlib.contextmanager
def _signals_interrupt(what: str):
    """Ctrl-C or SIGTERM inside the block raise `_Interrupted` (naming ``what``), as they stop a
    run of ours (train.py handles them there): the speedrun then ends with its file marked
    interrupted instead of dying mid-write. Outside the main thread (no handlers) a no-op."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Interrupted(f"interrupted by {signal.Signals(signum).name} ({what})")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


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
        if res.get("target"):
            ok = _ok(res["runs"])
            reached = [r for r in ok if r.get("target_reached")]
            train_s = sorted(r["train_to_target_s"] for r in reached)
            res["target"].update(runs=len(ok), reached_runs=len(reached),
                                 train_to_target_median_s=float(np.median(train_s)) if train_s else None,
                                 train_to_target_max_s=train_s[-1] if train_s else None)
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
                res["paired_time_ratio"] = paired_ratio(ours, theirs)
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
# the target: a number, or the model's report less the data's penalty

UNPUBLISHED_TARGET = 0.94   # a model whose report published no accuracy is held to the speedrun's 94%


def resolve_target(target: Optional[str], calibration: Optional[Path], model: str, data_files) -> Optional[dict]:
    """What ``--target`` means, as a dict whose "value" is an accuracy fraction; None without one.

    A number is an accuracy (94 or 0.94). "report" is the model's published accuracy (94% for a
    model whose report gave none), less the accuracy penalty of the data when the data is a
    lossy copy: airbench94's published 94.01% minus its mean measured on the same data, read
    from ``calibration`` (a `fastcifar calibrate` result, or a speedrun result with a baseline)."""
    if target is None:
        if calibration is not None:
            raise UserError("--calibration gives --target report its data penalty; add --target report")
        return None
    if target != "report":
        try:
            value = float(target)
        except ValueError:
            raise UserError(f"--target is an accuracy (94 or 0.94) or 'report', got {target!r}") from None
        value = value / 100 if value > 1 else value
        if not 0 < value <= 1:
            raise UserError(f"--target is an accuracy (94 or 0.94) or 'report', got {target!r}")
        if calibration is not None:
            raise UserError("--calibration is for --target report; a number is the target as given")
        return {"value": value, "from": "given"}
    from fastcifar.models import get_model_info

    published_pct = get_model_info(model).published_acc
    published = published_pct / 100 if published_pct is not None else UNPUBLISHED_TARGET
    goal = {"from": "report", "published": published, "published_by_report": published_pct is not None,
            "penalty": 0.0, "calibration": None}
    manifest = data_files.manifest
    if manifest is None:
        raise UserError(f"--target report: {data_files.folder} has no manifest.json, so whether its images are "
                        f"a lossy copy is unknown; give --target as a number")
    if manifest.lossy_source:
        if calibration is None:
            raise UserError(f"--target report: {data_files.name} is a lossy copy of CIFAR-10, which lowers every "
                            f"accuracy; give --calibration FILE (a `fastcifar calibrate` result on this data) "
                            f"to subtract its penalty, or --target as a number")
        goal.update(penalty=_penalty_from(Path(calibration), data_files), calibration=str(calibration))
    elif calibration is not None:
        raise UserError(f"--calibration: {data_files.name} is not a lossy copy, so the report's accuracy is the "
                        f"target as it stands; leave --calibration out")
    goal["value"] = goal["published"] - goal["penalty"]
    return goal


def _penalty_from(path: Path, data_files) -> float:
    """airbench94's gap to its published accuracy, from a calibration (or speedrun) result
    measured on the same data."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--calibration {path}: cannot read it as JSON ({type(e).__name__})") from None
    if not isinstance(d, dict):
        raise UserError(f"--calibration {path}: not a `fastcifar calibrate` result")
    gap = d.get("gap_to_published")
    if gap is None and isinstance(d.get("baseline"), dict):
        gap = d["baseline"].get("gap_to_published")
    if not isinstance(gap, (int, float)):
        raise UserError(f"--calibration {path}: no measured airbench94 accuracy in it (gap_to_published); "
                        f"give a `fastcifar calibrate` result")
    if d.get("data_sha256") != data_files.identity:
        raise UserError(f"--calibration {path}: measured on other data ({d.get('data', '?')}, "
                        f"{str(d.get('data_sha256'))[:8]}) than {data_files.name} ({str(data_files.identity)[:8]})")
    return float(gap)


def target_text(goal: dict) -> str:
    """'90.48% (the report's 93.81% less the data's penalty 3.33 points)', or '92.00%'."""
    text = f"{100 * goal['value']:.2f}%"
    if goal["from"] == "report":
        whose = "the report's" if goal["published_by_report"] else "the speedrun's (no published accuracy)"
        text += f" ({whose} {100 * goal['published']:.2f}%"
        text += f" less the data's penalty {100 * goal['penalty']:.2f} points)" if goal["calibration"] else ")"
    return text


# -----------------------------------------------------------------------------
# one run of ours

def _check_model_options(model: str, options: dict) -> None:
    """Fail before the first (long) run on options the model's builder refuses."""
    from fastcifar.models import create_model

    try:
        create_model(model, **options)
    except TypeError as e:
        raise UserError(f"bad --model-opt for {model}: {e}") from None


def budget_epochs(warmup: RunSummary, budget_s: float) -> dict:
    """How many epochs fit ``budget_s`` seconds of training, at the speed of the warm-up run
    ``warmup`` (whole epochs, compilation excluded): ``{"train_budget_s", "epoch_train_s",
    "init_s", "epochs"}``, at least one epoch.

    Why: the zoo's check against the reports allows each run a fixed amount of training (120 s
    on the H100); its epochs are best chosen from the model's speed on the machine at hand, which
    its warm-up has just measured, rather than guessed before. A run's training is its
    data-dependent initialisation (once) plus its steps; the warm-up's steps after its first
    few (which compile) give the time of a step."""
    t, epochs = warmup.times, warmup.epochs_completed
    if not epochs:
        raise UserError("the warm-up run trained no whole epoch, so it cannot say how many fit "
                        "--train-budget-s")
    epoch_s = (t["train_s"] - t["init_s"]) / epochs     # its steps at the steady speed
    fit = int((budget_s - t["init_s"]) // epoch_s) if epoch_s > 0 else 1
    return {"train_budget_s": budget_s, "epoch_train_s": epoch_s, "init_s": t["init_s"], "epochs": max(fit, 1)}


def _train_once(model, overrides, model_options, data, run_dir, device, seed, loader, bn_backend,
                compile, compile_mode=None, target=None) -> "RunSummary":
    from fastcifar.train import TrainConfig, train

    # timed runs: evaluate after the last epoch only (after every epoch with a target, which
    # stops the run when reached), and write nothing but the final result (no per-epoch
    # checkpoints, TensorBoard events or plots)
    cfg = TrainConfig(model=model, recipe_tag="fast", overrides=dict(overrides or {}),
                      model_options=dict(model_options or {}), data=str(data), target=target,
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


def paired_ratio(ours: list[dict], theirs: list[dict]) -> Optional[dict]:
    """The baseline's time over ours, per seed that finished on both sides (the two runs of a
    pair ran back to back): median, min and max; None without a pair. Above 1: ours faster."""
    by_seed = {r["seed"]: r["time_s"] for r in theirs}
    ratios = sorted(by_seed[r["seed"]] / r["time_s"] for r in ours if r["seed"] in by_seed and r["time_s"] > 0)
    if not ratios:
        return None
    return {"pairs": len(ratios), "median": float(np.median(ratios)), "min": ratios[0], "max": ratios[-1]}


# -----------------------------------------------------------------------------
# results

def _entries(result: dict) -> list[dict]:
    """The leaderboard entries of this invocation so far: ours, and the baseline's if it ran;
    only runs that finished, the failed ones counted."""
    common = {"device": result.get("device", "?"), "data": result["data"], "data_sha256": result["data_sha256"],
              "date": result["date"], "versions": result.get("versions", {}), "command": result["command"],
              "runs_planned": len(result["seeds"])}
    entries = []
    ours = {"id": result["id"], "model": result["model"], "recipe": "fast", "settings": result.get("settings", {})}
    goal = result.get("target")
    if goal:   # runs stopped at a target: their own kind of row, with the target and how many reached it
        ours.update(target=goal["value"], reached_runs=goal["reached_runs"])
    for kind, runs, extra in (("target" if goal else "speedrun", result["runs"], ours),
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
    goal = result.get("target")
    if goal and goal.get("runs"):
        text = f"target {target_text(goal)}: reached in {goal['reached_runs']} of {goal['runs']} runs"
        if goal["reached_runs"]:
            text += (f"; training to it: median {goal['train_to_target_median_s']:.2f} s, "
                     f"longest {goal['train_to_target_max_s']:.2f} s")
        lines.append(text)
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
        text = (f"time ratio {b['name']} / {result['model']} = {ratio:.2f} "
                f"({result['model']} is {ratio if ratio >= 1 else 1 / ratio:.2f}x "
                f"{'faster' if ratio >= 1 else 'slower'})")
        pairs = result.get("paired_time_ratio")
        if pairs:
            text += (f"; per pair run back to back: median {pairs['median']:.2f}, "
                     f"range {pairs['min']:.2f}-{pairs['max']:.2f} over {pairs['pairs']} pair{'s' if pairs['pairs'] != 1 else ''}")
        lines.append(text)
    return lines


def _run_line(name: str, i: int, n: int, r: dict) -> str:
    text = f"  {name} run {i + 1}/{n} (seed {r['seed']}): {100 * r['accuracy']:.2f}% in {r['time_s']:.2f} s"
    if "target_reached" in r:
        text += (f", target reached after epoch {r['epochs']} ({r['train_to_target_s']:.2f} s of training)"
                 if r["target_reached"] else f", target MISSED after {r['epochs']} epochs")
    if "original_accuracy" in r:
        text += f", original test images {100 * r['original_accuracy']:.2f}%"
    return text

