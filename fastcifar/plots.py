"""The two pictures of a run: learning curves and the test-set confusion matrix."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from beton_data.files import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")


def plot_curves(history: list[dict], path: str | Path) -> None:
    """Loss and accuracy (train and test) against epoch, from metrics.jsonl records."""
    plt = _pyplot()
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
    _save(fig, path)
    plt.close(fig)


def plot_confusion(confusion, class_names: list[str], path: str | Path, title: str = "") -> None:
    """Row-normalised confusion matrix (rows: true class), cells annotated with percentages."""
    plt = _pyplot()
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
    _save(fig, path)
    plt.close(fig)
