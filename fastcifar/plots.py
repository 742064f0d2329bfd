"""The pictures: a run's learning curves and test-set confusion matrix, and the helpers every
plot uses (`pyplot`, `save_figure`, `plot_or_skip`).

Plots are optional at run time: matplotlib is imported only when a plot is drawn, and callers
that must not fail because of a plot (training, the leaderboard) draw it through
`plot_or_skip`, which reports "plot skipped: <reason>" instead of raising.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np

from beton_data.files import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, never a window); ImportError if
    matplotlib cannot be imported."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    """The figure as a PNG, written atomically: the temporary file has a unique name, so any
    number of processes can write the same path at once and a reader never sees half a file."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")


def plot_or_skip(plot: Callable, *args, say: Callable[[str], None] = None, **kwargs) -> bool:
    """``plot(*args, **kwargs)``; True if it drew. If it fails (matplotlib missing or broken,
    the file not writable) it says "plot skipped: <reason>" (on stderr unless ``say``) and
    returns False: a plot is never worth the run that makes it."""
    try:
        plot(*args, **kwargs)
        return True
    except Exception as e:  # noqa: BLE001  (whatever broke, only the picture is lost)
        what = "matplotlib cannot be imported" if isinstance(e, ImportError) else type(e).__name__
        (say or (lambda m: print(m, file=sys.stderr)))(
            f"plot skipped: {getattr(plot, '__name__', 'plot')}: {what} ({e})")
        return False


def plot_curves(history: list[dict], path: str | Path) -> None:
    """Loss and accuracy (train and test) against epoch, from metrics.jsonl records."""
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [r["epoch"] for r in history]
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax_acc.plot(epochs, [100 * r["train_acc"] for r in history], label="train")
    evals = [r for r in history if r.get("test_acc") is not None]
    ax_loss.plot([r["epoch"] for r in evals], [r["test_loss"] for r in evals], "o-", label="test")
    ax_acc.plot([r["epoch"] for r in evals], [100 * r["test_acc"] for r in evals], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)
    plt.close(fig)


def plot_confusion(confusion, class_names: list[str], path: str | Path, title: str = "") -> None:
    """Row-normalised confusion matrix (rows: true class), cells annotated with percentages."""
    plt = pyplot()
    cm = np.asarray(confusion, dtype=np.float64)
    rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title or "Confusion matrix (% of true class)")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{100 * rows[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if rows[i, j] > 0.5 else "black")
    save_figure(fig, path)
    plt.close(fig)
