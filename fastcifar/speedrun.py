"""`fastcifar speedrun`: time a model's `fast` recipe over several seeds against the airbench94
baseline, on the same data and device, in one invocation.

    1. one untimed warm-up run (torch.compile, cuDNN autotuning, lazy CUDA initialisation);
    2. N timed runs of the model's fast recipe, seeds seed..seed+N-1;
    3. the baseline: one untimed warm-up, then N timed runs of airbench's train94 on the same
       images (see baseline.py);
    4. mean ± std of accuracy and time for both, and the ratio of their mean times.

The time of a run is what the speedrun records count: training (compile/warm-up steps
excluded, as train.py estimates them) plus the final evaluation with the recipe's test-time
augmentation, each bracketed by CUDA synchronisation. Loading the data onto the device,
writing checkpoints and the warm-up run are not in it. The same definition is applied to the
baseline.

Everything goes to one result file (default bench/results/speedrun_<model>_<device>.json, the
latest invocation for that model and device) and to two leaderboard entries (ours and the
baseline's) beside it, which accumulate over invocations.
"""
from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional


from fastcifar.errors import UserError
from fastcifar.leaderboard import add_entry, data_name
from fastcifar.machine import command_line, machine_info, resolve_device
from fastcifar.results import device_slug, format_pm, mean_std, now_iso, write_result

DEFAULT_RESULTS = Path("bench/results")


def speedrun(model: str = "speedrun_net", runs: int = 5, baseline: bool = True,
             data: Optional[Path] = None, out: Optional[Path] = None, device: str = "auto",
             seed: int = 0, overrides: Optional[dict] = None, original_npz: Optional[Path] = None,
             loader: str = "gpu", bn_backend: Optional[str] = None, compile: Optional[bool] = None) -> dict:
    """Run the speedrun; returns the result written to ``out``."""
    from fastcifar.baseline import import_airbench, load_npz, require_cuda
    from fastcifar.models import get_recipe
    from fastcifar.train import DEFAULT_DATA

    # --- check everything before the first (long) run ------------------------------------------
    if runs < 1:
        raise UserError(f"--runs must be at least 1, got {runs}")
    data = Path(data or DEFAULT_DATA)
    for split in ("train", "test"):
        if not (data / f"{split}.beton").is_file():
            raise UserError(f"no {data / f'{split}.beton'}; run `fastcifar convert` first "
                            f"(or pass --data DIR with train.beton and test.beton)")
    recipe = get_recipe(model, "fast")  # UserError for an unknown model
    try:
        recipe = recipe.replace(**(overrides or {}))
    except (ValueError, TypeError) as e:
        raise UserError(f"bad override: {e}") from None
    device = resolve_device(device)
    if original_npz is not None:
        load_npz(original_npz)  # fail now on a bad file, not after the runs
    if baseline:
        require_cuda(device)
        import_airbench()

    say = print
    run_id = uuid.uuid4().hex
    result = {
        "kind": "speedrun_result", "id": run_id, "model": model, "recipe": "fast",
        "recipe_fields": recipe.to_dict(), "overrides": dict(overrides or {}),
        "data": data_name(data), "data_dir": str(data), "command": command_line(),
        "date": now_iso(), "seeds": list(range(seed, seed + runs)), "loader": loader,
    }

    with tempfile.TemporaryDirectory(prefix="fastcifar-speedrun-") as work:
        work = Path(work)
        npz_beton = _npz_as_beton(original_npz, work) if original_npz is not None else None

        def one_run(run_seed: int, name: str) -> tuple[dict, dict]:
            summary = _train_once(model, overrides, data, work / name, device, run_seed, loader,
                                  bn_backend, compile)
            t = summary["times"]
            r = {"seed": run_seed, "accuracy": summary["final_acc"],
                 "time_s": t["train_s"] + t["eval_s"], "train_s": t["train_s"], "eval_s": t["eval_s"],
                 "compile_warmup_s": t["compile_warmup_s"], "wall_s": t["wall_s"]}
            if npz_beton is not None:
                r["original_accuracy"] = _accuracy_on(work / name, npz_beton, device)
            return r, summary

        say(f"speedrun: {model} (fast recipe, {recipe.epochs} epochs), {runs} timed runs on {device}, "
            f"data {result['data']}")
        t0 = time.perf_counter()
        warm, summary = one_run(seed + 10_000, "warmup")
        say(f"  warm-up run: {100 * warm['accuracy']:.2f}% in {time.perf_counter() - t0:.1f} s wall "
            f"(compile/warm-up {warm['compile_warmup_s']:.1f} s; untimed)")
        result["warmup"] = warm
        result["device"] = summary["device"]
        result["versions"] = summary["versions"]
        result["machine"] = machine_info(device)
        result["params"] = summary["params"]
        result["precision"], result["bn_backend"], result["compile"] = (
            summary["precision"], summary["bn_backend"], summary["compile"])

        ours = []
        for i, s in enumerate(result["seeds"]):
            r, _ = one_run(s, f"run{i}")
            ours.append(r)
            say(_run_line(model, i, runs, r))
        result["runs"] = ours
        result.update(_aggregate(ours))

        result["baseline"] = None
        out = Path(out) if out is not None else DEFAULT_RESULTS / f"speedrun_{model}_{device_slug(result['device'])}.json"
        _write(result, out)  # our runs are safe on disk before the baseline starts
        if baseline:
            try:
                result["baseline"] = _run_baseline(data, device, result["seeds"], original_npz, say)
            except Exception as e:  # keep our figures; say what failed
                result["baseline_error"] = f"{type(e).__name__}: {e}"
                _finish(result, out, say)
                raise UserError(f"the baseline failed ({result['baseline_error']}); "
                                f"the model's own results were written to {out}") from None
            result["time_ratio"] = result["baseline"]["time_mean_s"] / result["time_mean_s"]
    _finish(result, out, say)
    return result


def _run_baseline(data: Path, device: str, seeds: list[int], original_npz, say) -> dict:
    from fastcifar import baseline as ab

    say(f"baseline: {ab.NAME} (airbench=={ab.VERSION}, published {100 * ab.PUBLISHED_ACC:.2f}% "
        f"on the original CIFAR-10), 1 warm-up + {len(seeds)} timed runs on the same data")
    runs: list[dict] = []

    def on_run(r):
        runs.append(r)
        say(_run_line(ab.NAME, len(runs) - 1, len(seeds), r))

    ab.run_baseline(data, device, seeds, original_npz, on_run=on_run)
    agg = _aggregate(runs)
    return {"name": ab.NAME, "package": f"airbench=={ab.VERSION}", "published_acc": ab.PUBLISHED_ACC,
            "runs": runs, **agg,
            # on the JPEG copy of CIFAR-10 this is the copy's accuracy penalty for airbench94
            "gap_to_published": ab.PUBLISHED_ACC - agg["accuracy_mean"]}


def _write(result: dict, out: Path) -> None:
    result["entries"] = _entries(result)
    write_result(out, result)


def _finish(result: dict, out: Path, say) -> None:
    """Final result file, leaderboard entries, and the summary on stdout."""
    _write(result, out)
    for entry in result["entries"]:
        add_entry(out.parent, entry)
    for line in report_lines(result):
        say(line)
    say(f"wrote {out} (and leaderboard entries in {out.parent / 'leaderboard'})")


# -----------------------------------------------------------------------------
# one run of ours

def _train_once(model, overrides, data, run_dir, device, seed, loader, bn_backend, compile) -> dict:
    from fastcifar.train import TrainConfig, train

    cfg = TrainConfig(model=model, recipe_tag="fast", overrides=dict(overrides or {}), data=str(data),
                      out=str(run_dir), device=device, seed=seed, loader=loader, bn_backend=bn_backend,
                      compile=compile, eval_every=10**9,  # evaluate after the last epoch only
                      progress=False)
    summary = train(cfg)
    if summary.get("signal") is not None or summary.get("status") not in ("completed", "target_reached"):
        raise UserError(f"speedrun stopped: a run ended with status {summary.get('status')!r}; "
                        "no result was written")
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


# -----------------------------------------------------------------------------
# results

def _aggregate(runs: list[dict]) -> dict:
    acc_mean, acc_std = mean_std([r["accuracy"] for r in runs])
    t_mean, t_std = mean_std([r["time_s"] for r in runs])
    out = {"accuracy_mean": acc_mean, "accuracy_std": acc_std, "time_mean_s": t_mean, "time_std_s": t_std}
    if all("original_accuracy" in r for r in runs):
        out["original_accuracy_mean"], out["original_accuracy_std"] = mean_std(
            [r["original_accuracy"] for r in runs])
    return out


def _entries(result: dict) -> list[dict]:
    """The leaderboard entries of this invocation: ours, and the baseline's if it ran."""
    common = {"device": result["device"], "data": result["data"], "date": result["date"],
              "versions": result["versions"], "command": result["command"]}
    entries = [{"kind": "speedrun", "id": result["id"], "model": result["model"], "recipe": "fast",
                "accuracies": [r["accuracy"] for r in result["runs"]],
                "times_s": [r["time_s"] for r in result["runs"]], **common}]
    if result.get("baseline"):
        b = result["baseline"]
        entries.append({"kind": "baseline", "id": result["id"] + "-baseline", "model": b["name"],
                        "recipe": b["package"], "accuracies": [r["accuracy"] for r in b["runs"]],
                        "times_s": [r["time_s"] for r in b["runs"]], **common})
    return entries


def report_lines(result: dict) -> list[str]:
    """The closing summary: mean ± std of accuracy and time, and the time ratio."""
    def line(name, agg):
        text = (f"{name:>14s}: accuracy {format_pm(agg['accuracy_mean'], agg['accuracy_std'], 100)} %   "
                f"time {format_pm(agg['time_mean_s'], agg['time_std_s'])} s")
        if agg.get("original_accuracy_mean") is not None:
            text += f"   (original test images: {format_pm(agg['original_accuracy_mean'], agg['original_accuracy_std'], 100)} %)"
        return text

    lines = [f"results over {len(result['runs'])} runs on {result['device']}, data {result['data']}:",
             line(result["model"], result)]
    b = result.get("baseline")
    if b:
        lines.append(line(b["name"], b))
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
