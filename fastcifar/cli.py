"""The ``fastcifar`` command. Each command parses its options and calls one function."""
from __future__ import annotations

import json
from inspect import Parameter, Signature
import sys
from pathlib import Path
from typing import Optional

import typer

from beton_data import DEFAULT_DATA_DIR
from fastcifar.errors import UserError
from fastcifar.results import ACCURACY_MARGIN

app = typer.Typer(
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    help="Train the CIFAR-10 ResNets of five student reports in minutes on one GPU.\n\n"
         "Start with `fastcifar convert`, then `fastcifar train --model resnet_2111`.",
)


def _pairs(items: list[str], flag: str, form: str = "KEY=VALUE") -> dict[str, str]:
    """Repeated `FLAG KEY=VALUE` options as a dict (later ones win)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} wants {form}, got {item!r}")
        out[key.strip()] = value
    return out


@app.command()
def convert(
    source: Optional[str] = typer.Option(
        None, "--source", "-s",
        help="cifar-10-python.tar.gz, its extracted cifar-10-batches-py/ folder, or an image-folder "
             "tree (train/<class>/*, test/<class>/*) as a folder, .tar or .tar.gz. "
             "Default: download the official archive (MD5-checked, cached in ~/.cache/fastcifar "
             "or $FASTCIFAR_CACHE); offline, download it elsewhere and pass its path here."),
    out: Path = typer.Option(DEFAULT_DATA_DIR, "--out", "-o", help="Folder for train.beton, test.beton, manifest.json."),
    force: bool = typer.Option(False, "--force", help="Convert again even if OUT already holds this source, intact."),
):
    """Convert CIFAR-10 to FFCV .beton files (raw RGB images, integer labels).

    Writes OUT/train.beton, OUT/test.beton and OUT/manifest.json (source and its checksum, counts per class, and each file's size and SHA-256, which every reader checks) in one step: an interrupted or killed run leaves the previous output as it was, and no process behind.

    Running again on the same source does nothing while OUT is intact (damaged output is converted again), unless --force. A second convert into the same OUT waits for the first. OUT's location must be writable; that is checked before the source is read.
    """
    from beton_data.convert import convert as run

    run(source=source, out=out, force=force)


@app.command()
def inspect(
    path: Path = typer.Argument(DEFAULT_DATA_DIR, help="A .beton file or a folder written by `convert`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG grid to write (default: next to the data)."),
    samples: int = typer.Option(8, "--samples", "-n", help="Images per class in the grid."),
    model: str = typer.Option("resnet_2111", "--model", "-m", help="Zoo model whose recipe's augmentation the grid shows."),
    recipe: str = typer.Option("fast", "--recipe", help="That model's `fast` or `report` recipe."),
    verify: bool = typer.Option(False, "--verify", help="Also hash every file and compare it with the SHA-256 in its manifest."),
):
    """Counts per class, pixel statistics, and a grid of samples with and without augmentation.

    The grid shows, per class, the first images as stored (left) and as training sees them (right): with the augmentation of --model's --recipe (default: resnet_2111's fast recipe), exactly as both loaders produce it.

    Every file is checked first: a truncated, damaged or foreign .beton is refused. Its structure and size are always checked; --verify also compares its SHA-256 with the one `convert` recorded (training does that once per new file).
    """
    from beton_data.augment import AugConfig
    from beton_data.inspect import inspect as run
    from fastcifar.models import get_recipe

    aug = AugConfig.from_recipe(get_recipe(model, recipe))
    run(path=path, aug=aug, aug_label=f"{model}'s {recipe} recipe", out=out, samples=samples, verify=verify)


@app.command()
def models(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    recipe: Optional[str] = typer.Option(None, "--recipe", metavar="NAME",
                                         help="Show the report's recipe of model NAME, with the sentences it comes from."),
):
    """The model zoo: name, exact parameter count, source report, published accuracy and recipe."""
    from fastcifar.models.table import show

    show(as_json=as_json, recipe=recipe)


@app.command()
def leaderboard(
    results: list[Path] = typer.Option([Path("bench/results")], "--results", "-r",
                                       help="Folder of result files, searched recursively (speedrun results, "
                                            "leaderboard entries, train summary.json); repeat for several."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Markdown table to write (default: bench/LEADERBOARD.md; none with --json)."),
    plot: Optional[Path] = typer.Option(None, "--plot",
                                        help="Accuracy-against-time plot, PNG (default: bench/leaderboard.png; none with "
                                             "--json). Skipped with a message if matplotlib cannot draw it."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON (figures, tests, settings) instead of the table."),
    margin: float = typer.Option(100 * ACCURACY_MARGIN, "--margin", metavar="POINTS",
                                 help="Non-inferiority margin of the accuracy test, in percentage points: "
                                      "H0 = the model's mean accuracy is this much or more below the baseline's."),
):
    """Every recorded result as one table: accuracy and time (mean ± std, 95% CI) and the tests against airbench94.

    Train runs are pooled into one row only when model, recipe, settings, device and data are the same. Each model row is compared with the baseline (the same speedrun's, else every baseline run on the same data and device) by one-sided Welch t-tests: accuracy not lower by the margin or more, time lower. A record needs at least 5 runs and p < 0.05 on both.
    """
    from fastcifar.leaderboard import leaderboard as run

    run(results=results, out=out, plot=plot, as_json=as_json, margin=margin / 100)


# Recipe fields that have an option of their own (any field can be set with --set FIELD=VALUE).
RECIPE_OPTIONS = {
    "epochs": (("--epochs",), Optional[int], "Recipe field `epochs`."),
    "batch_size": (("--batch-size", "-b"), Optional[int],
                   "Recipe field `batch_size` (global, over all GPUs). Without --lr the learning rate "
                   "follows it (linear for SGD, square root for Adam-family optimizers)."),
    "lr": (("--lr",), Optional[float], "Recipe field `lr` (peak learning rate)."),
    "tta": (("--tta",), Optional[str], "Recipe field `tta`: none | flip | flip_translate."),
    "ema": (("--ema",), Optional[float], "Recipe field `ema`: EMA decay of the weights (0 = off)."),
}


def _model_options(pairs: list[str]) -> dict:
    """--model-opt KEY=VALUE pairs as create_model() keywords (JSON values, else strings)."""
    options = {}
    for key, value in _pairs(pairs, "--model-opt").items():
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def _train(**values):
    from fastcifar.config import TrainConfig
    from fastcifar.train import train as run

    overrides = {k: v for k in RECIPE_OPTIONS if (v := values.pop(k)) is not None}
    overrides.update(_pairs(values.pop("set_"), "--set", "FIELD=VALUE"))
    options = _model_options(values.pop("model_opt"))
    try:
        summary = run(TrainConfig(**values, overrides=overrides, model_options=options))
    except KeyboardInterrupt as e:  # a second Ctrl-C: stopped at once, the last checkpoint stays
        run_dir = getattr(e, "run_dir", None)
        typer.echo("interrupted; " + (f"the last checkpoint written is kept (continue with --resume {run_dir})"
                                      if run_dir else "nothing was written"), err=True)
        raise typer.Exit(130)
    if summary.get("final_acc") is not None:
        t = summary["times"]
        typer.echo(f"{summary['model']}: test accuracy {100 * summary['final_acc']:.2f}% "
                   f"(best {100 * summary['best_acc']:.2f}%), training {t['train_s']:.1f}s "
                   f"+ compile/warm-up {t['compile_warmup_s']:.1f}s, wall {t['wall_s']:.1f}s -> {summary['run_dir']}")
    if summary.get("signal"):
        raise typer.Exit(128 + int(summary["signal"]))


def _train_signature() -> Signature:
    """The options of `fastcifar train`: one per TrainConfig field that declares flags, one per
    RECIPE_OPTIONS field, then --set and --model-opt (see fastcifar/train.py)."""
    import dataclasses
    import typing

    from fastcifar.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    params = []

    def add(name, default, flags, annotation, help_text, **kw):
        params.append(Parameter(name, Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=typer.Option(default, *flags, help=help_text, **kw)))

    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("flags"):
            add(f.name, f.default, f.metadata["flags"], hints[f.name], f.metadata["help"],
                metavar=f.metadata["metavar"])
    for name, (flags, annotation, help_text) in RECIPE_OPTIONS.items():
        add(name, None, flags, annotation, help_text, metavar=name.upper())
    add("set_", [], ("--set",), list[str],
        "Override any recipe field, e.g. --set optimizer=adamw --set milestones=15,25 "
        "(repeatable; `fastcifar models --recipe NAME` lists the fields).", metavar="FIELD=VALUE")
    add("model_opt", [], ("--model-opt",), list[str],
        "Model builder option, e.g. --model-opt dropout=0.2 (repeatable; JSON values).", metavar="KEY=VALUE")
    return Signature(params)


_train.__signature__ = _train_signature()
app.command("train", help="""Train a zoo model: compiled, channels-last, mixed precision; writes a run folder.

The run folder gets config.json, metrics.jsonl (one line per epoch), summary.json (accuracy, per-class accuracy, timings), curves.png, confusion.png, last.pt and TensorBoard event files (`tensorboard --logdir runs`).

Ctrl-C or SIGTERM save a checkpoint and exit (code 130 / 143); `--resume RUN_DIR` continues exactly, with the run's own settings (only --device, --data, --workers, --eval-every, --target, --max-steps, --progress and --tensorboard may be given again).

Several GPUs: `torchrun --nproc_per_node N -m fastcifar.cli train ...`.
""")(_train)


@app.command("eval")
def eval_(
    path: Path = typer.Argument(..., metavar="RUN_DIR|CHECKPOINT", help="A run folder (its last.pt is used) or a .pt checkpoint."),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder whose test.beton to use (default: the one the run trained on)."),
    beton: Optional[Path] = typer.Option(None, "--beton", help="Any .beton file to evaluate on (instead of --data)."),
    tta: Optional[str] = typer.Option(None, "--tta", help="none | flip | flip_translate (default: the run's recipe)."),
    tta_shift: Optional[int] = typer.Option(None, "--tta-shift", help="Pixels flip_translate's shifted views move, 1..8 (default: the run's recipe; 2 before the recipe had the field)."),
    device: str = typer.Option("auto", "--device", help="auto, cuda or cpu."),
    batch_size: int = typer.Option(1000, "--batch-size", "-b", help="Evaluation batch size."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Accuracy and per-class accuracy of a trained model on a .beton (EMA weights if the run kept them)."""
    from fastcifar.evaluate import run_eval

    if data is not None and beton is not None:
        raise UserError("give --data or --beton, not both")
    result = run_eval(path, data=data, beton=beton, tta=tta, tta_shift=tta_shift, device=device,
                      batch_size=batch_size, quiet=as_json)
    if as_json:
        result.pop("confusion", None)
        typer.echo(json.dumps(result, indent=2))


@app.command()
def speedrun(
    model: str = typer.Option("speedrun_net", "--model", "-m", help="Zoo model whose `fast` recipe is timed."),
    runs: int = typer.Option(5, "--runs", "-n", help="Timed runs (seeds SEED..SEED+N-1), after one untimed warm-up. "
                                                     "A record needs at least 5."),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline",
                                  help="Also time airbench94 (airbench==0.1.8, CUDA only) on the same data and device."),
    data: Optional[Path] = typer.Option(None, "--data", help=f"Folder with train.beton and test.beton (default: {DEFAULT_DATA_DIR})."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Result file (default: bench/results/speedrun_<model>_<device>.json); "
                                            "leaderboard entries go beside it."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available), cuda or cpu."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first timed run."),
    set_: list[str] = typer.Option([], "--set", metavar="FIELD=VALUE",
                                   help="Override a field of the fast recipe, e.g. --set epochs=10 (repeatable)."),
    model_opt: list[str] = typer.Option([], "--model-opt", metavar="KEY=VALUE",
                                        help="Model builder option, e.g. --model-opt stem=whiten (repeatable; JSON values)."),
    original_npz: Optional[Path] = typer.Option(None, "--original-npz", metavar="NPZ",
                                                help="Also score every trained model on these images (an .npz of uint8 "
                                                     "'images' [N,32,32,3] and 'labels'), e.g. original CIFAR-10 test images."),
    loader: str = typer.Option("gpu", "--loader", help="gpu or ffcv."),
    bn_backend: Optional[str] = typer.Option(None, "--bn-backend", help="eager | compiled | triton (default: as `train`)."),
    margin: float = typer.Option(100 * ACCURACY_MARGIN, "--margin", metavar="POINTS",
                                 help="Non-inferiority margin of the accuracy test, in percentage points."),
    compile_mode: Optional[str] = typer.Option(
        None, "--compile-mode", metavar="MODE",
        help="torch.compile mode of the model's runs, e.g. reduce-overhead (CUDA graphs: no launch "
             "gaps between the step's kernels); default: torch's default mode."),
    compile_: Optional[bool] = typer.Option(
        None, "--compile/--no-compile",
        help="torch.compile the model's runs (default: as `train`, on for GPU). --no-compile runs them "
             "eagerly, as airbench94 runs."),
    target: Optional[str] = typer.Option(
        None, "--target", metavar="ACC|report",
        help="Stop each run as soon as its test accuracy reaches ACC (94 or 0.94), and record per run "
             "whether and after how much training it did. 'report': the model's published accuracy (94% "
             "for a model without one), less the data's penalty on a lossy copy (see --calibration). "
             "Needs --no-baseline."),
    calibration: Optional[Path] = typer.Option(
        None, "--calibration", metavar="FILE",
        help="For --target report on a lossy copy: a `fastcifar calibrate` result on the same data; "
             "airbench94's gap to its published 94.01% there is the penalty subtracted."),
    warmup_epochs: Optional[int] = typer.Option(
        None, "--warmup-epochs", metavar="N",
        help="Epochs of the untimed warm-up run (default: the recipe's). One is enough to compile "
             "everything the timed runs run, and saves most of a run's time on larger models."),
    train_budget_s: Optional[float] = typer.Option(
        None, "--train-budget-s", metavar="SECONDS",
        help="Train the timed runs for as many epochs as fit SECONDS of training (compilation "
             "excluded) at the speed the warm-up run measured; the result records the choice. "
             "Instead of --set epochs=N."),
):
    """Time a model's fast recipe over several seeds against the airbench94 baseline: accuracy and time, mean ± std, 95% CI, and one-sided Welch tests.

    Training time excludes compilation (one untimed warm-up run of each comes first) and includes the final test-time-augmented evaluation, for both. The timed runs go in pairs, one seed each, the model's and the baseline's back to back in alternating order, so that a drift of the machine reaches both alike. The result file and the leaderboard entries are rewritten after every run; a failed run is recorded and the others go on. If airbench cannot be imported, the model's runs are still recorded and the command ends with an error saying the baseline is missing.
    """
    from fastcifar.speedrun import speedrun as run

    overrides = _pairs(set_, "--set", "FIELD=VALUE")
    run(model=model, runs=runs, baseline=baseline, data=data, out=out, device=device, seed=seed,
        overrides=overrides, model_options=_model_options(model_opt), original_npz=original_npz, loader=loader,
        bn_backend=bn_backend, margin=margin / 100, compile_mode=compile_mode, compile=compile_, target=target,
        calibration=calibration, warmup_epochs=warmup_epochs, train_budget_s=train_budget_s)


@app.command()
def calibrate(
    data: Path = typer.Option(DEFAULT_DATA_DIR, "--data", help="Folder with train.beton and test.beton."),
    runs: int = typer.Option(5, "--runs", "-n", help="Timed runs (seeds SEED..SEED+N-1), after one untimed warm-up."),
    original_npz: Optional[Path] = typer.Option(None, "--original-npz", metavar="NPZ",
                                                help="Also score each trained network on these images, e.g. the "
                                                     "original CIFAR-10 test images."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Result file (default: bench/results/calibrate_airbench94_<device>.json); "
                                            "a baseline leaderboard entry goes beside it."),
    device: str = typer.Option("cuda", "--device", help="cuda or cuda:N (airbench runs on CUDA only)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first run."),
):
    """airbench94 alone, several runs on our data: its accuracy and time here, and the gap to its published 94.01%.

    On the JPEG copy of CIFAR-10 the gap is the copy's accuracy penalty for that network. The result file is rewritten after every run; a failed run is recorded and the others go on.
    """
    from fastcifar.baseline import calibrate as run

    run(data_dir=data, runs=runs, original_npz=original_npz, out=out, device=device, seed=seed)


def main() -> None:
    try:
        app()
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
