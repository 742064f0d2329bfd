"""The ``fastcifar`` command. Each command parses its options and calls one function."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from fastcifar.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train the CIFAR-10 ResNets of five student reports in minutes on one GPU.\n\n"
         "Start with `fastcifar convert`, then `fastcifar train --model resnet_2111`.",
)

DEFAULT_DATA = Path("beton_data/cifar10")


@app.command()
def convert(
    source: Optional[str] = typer.Option(
        None, "--source", "-s",
        help="cifar-10-python.tar.gz, its extracted cifar-10-batches-py/ folder, or an image-folder "
             "tree (train/<class>/*, test/<class>/*) as a folder, .tar or .tar.gz. "
             "Default: download the official archive (MD5-checked, cached)."),
    out: Path = typer.Option(DEFAULT_DATA, "--out", "-o", help="Folder for train.beton, test.beton, manifest.json."),
    force: bool = typer.Option(False, "--force", help="Convert again even if OUT already holds this source."),
):
    """Convert CIFAR-10 to FFCV .beton files (raw RGB images, integer labels)."""
    from beton_data.convert import convert as run

    run(source=source, out=out, force=force)


@app.command()
def inspect(
    path: Path = typer.Argument(DEFAULT_DATA, help="A .beton file or a folder written by `convert`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG grid to write (default: next to the data)."),
    samples: int = typer.Option(8, "--samples", "-n", help="Images per class in the grid."),
):
    """Counts per class, pixel statistics, and a grid of samples with and without augmentation."""
    from beton_data.inspect import inspect as run

    run(path=path, out=out, samples=samples)


@app.command()
def models(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    recipe: Optional[str] = typer.Option(None, "--recipe", metavar="NAME",
                                         help="Show the report's recipe of model NAME, with the sentences it comes from."),
):
    """The model zoo: name, exact parameter count, source report, published accuracy and recipe."""
    from fastcifar.models.table import show

    show(as_json=as_json, recipe=recipe)


def main() -> None:
    try:
        app()
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
