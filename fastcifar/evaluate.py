"""Test-set evaluation: loss, accuracy, per-class accuracy, confusion matrix, optional TTA,
and the `fastcifar eval` command (a trained run or checkpoint on any .beton)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F

from beton_data import DEFAULT_DATA_DIR, class_names
from fastcifar import dist
from fastcifar.errors import UserError

TTA_MODES = ("none", "flip", "flip_translate")
TTA_SHIFTS = range(1, 9)     # flip_translate's shift (the recipe's tta_shift), pixels


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate images by (dy, dx) pixels, filling the border by reflection (as training does)."""
    p = max(abs(dy), abs(dx))
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    h, w = x.shape[-2:]
    return padded[..., p - dy:p - dy + h, p - dx:p - dx + w]


def tta_logits(model, x: torch.Tensor, mode: str, shift: int = 2) -> torch.Tensor:
    """Logits averaged over test-time views.

    - none: the image itself
    - flip: the image and its mirror image, averaged
    - flip_translate: both of those, each also shifted by ``shift`` pixels up-left and
      down-right; the unshifted view gets weight 1/2, each shifted one 1/4 (small shifts help a
      little, but the centred view is the most reliable one). The recipe's ``tta_shift``: 2 for
      fastcifar's recipes, which train with 2-pixel translations; airbench94 shifts by 1
    """
    if mode == "none":
        return model(x).float()
    views = [x, x.flip(-1)]
    if mode == "flip":
        return sum(model(v).float() for v in views) / 2
    if mode == "flip_translate":
        out = 0
        for v in views:
            out = out + 0.5 * model(v).float()
            out = out + 0.25 * model(_shift(v, shift, shift)).float() + 0.25 * model(_shift(v, -shift, -shift)).float()
        return out / 2
    raise UserError(f"unknown TTA mode {mode!r}; choose one of {', '.join(TTA_MODES)}")


@torch.no_grad()
def evaluate(model, loader, num_classes: int = 10, tta: str = "none", autocast=None,
             info: dist.DistInfo | None = None, tta_shift: int = 2) -> dict:
    """Loss, accuracy and confusion matrix of ``model`` over ``loader``.

    With several processes each one evaluates its shard of the test set and the sums are
    all-reduced, so every rank returns the same figures.

    Every batch is copied into one buffer the size of the first, the last (smaller) one padded
    with zeros whose outputs are ignored: a compiled model then sees one kind of input and
    compiles once -- a shorter last batch would be a new shape, and even a padded copy would
    differ from the loaders' batches, which are views, in what dynamo guards on. In eval mode
    every image's output depends on that image alone, so the padding changes nothing else."""
    info = info or dist.DistInfo()
    was_training = model.training
    model.eval()
    device = None
    loss_sum = None
    confusion = None
    buffer = None
    ctx = autocast if autocast is not None else contextlib.nullcontext
    for images, labels in loader:
        n = labels.shape[0]
        if device is None:
            device, buffer = labels.device, torch.empty_like(images)   # same layout as the batches
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
        buffer[:n].copy_(images)
        buffer[n:].zero_()
        with ctx():
            logits = tta_logits(model, buffer, tta, tta_shift)[:n]
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        pred = logits.argmax(1)
        confusion += torch.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
    model.train(was_training)
    if confusion is None:
        raise UserError("the evaluation set is empty")
    dist.all_reduce(loss_sum, info)
    dist.all_reduce(confusion, info)
    cm = confusion.view(num_classes, num_classes).cpu()
    n = int(cm.sum())
    per_class = (cm.diag().double() / cm.sum(1).clamp_min(1).double()).tolist()
    return {"loss": float(loss_sum) / n, "acc": float(cm.diag().sum()) / n, "n": n,
            "per_class_acc": per_class, "confusion": cm.tolist()}


# -----------------------------------------------------------------------------
# `fastcifar eval`

def run_eval(path: str | Path, data: str | Path | None = None, beton: str | Path | None = None,
             tta: str | None = None, device: str = "auto", batch_size: int = 1000,
             loader: str = "gpu", quiet: bool = False, tta_shift: int | None = None) -> dict:
    """Accuracy and per-class accuracy of a trained run (its last.pt) or a checkpoint file on
    ``beton`` (default: test.beton of ``data``, default: the data folder the run trained on).
    The EMA weights are evaluated when the run kept them, as training did."""
    from beton_data import make_loader
    from fastcifar.checkpoint import load_checkpoint
    from fastcifar.machine import resolve_device
    from fastcifar.models import create_model

    ckpt = load_checkpoint(path)
    for key in ("model_name", "model"):
        if key not in ckpt:
            raise UserError(f"{path} is not a fastcifar checkpoint (no {key!r})")
    cfg = ckpt.get("config", {})
    if beton is None:
        data_dir = Path(data if data is not None else cfg.get("data", DEFAULT_DATA_DIR))
        beton = data_dir / "test.beton"
    beton = Path(beton)
    if not beton.is_file():
        raise UserError(f"no {beton}; run `fastcifar convert` first, or pass --data DIR / --beton FILE")
    tta = tta or ckpt.get("recipe", {}).get("tta", "none")
    if tta not in TTA_MODES:
        raise UserError(f"unknown TTA mode {tta!r}; choose one of {', '.join(TTA_MODES)}")
    shift = int(tta_shift if tta_shift is not None else ckpt.get("recipe", {}).get("tta_shift", 2))
    if shift not in TTA_SHIFTS:
        raise UserError(f"--tta-shift must be in {TTA_SHIFTS[0]}..{TTA_SHIFTS[-1]} pixels, got {shift}")
    dev = torch.device(resolve_device(device))

    num_classes = int(ckpt.get("num_classes", 10))
    # every option as the network was built (older checkpoints: the options given)
    options = ckpt.get("model_options_full") or ckpt.get("model_options", {})
    model = create_model(ckpt["model_name"], num_classes=num_classes, **options)
    model.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
    model = model.to(dev, memory_format=torch.channels_last)
    test_loader = make_loader(loader, str(beton), batch_size, train=False, aug=None, device=dev,
                              dtype=torch.float32, seed=0)
    result = evaluate(model, test_loader, num_classes=num_classes, tta=tta, tta_shift=shift)
    names = class_names(beton.parent, num_classes)
    result.update(model=ckpt["model_name"], beton=str(beton), tta=tta, classes=names)
    if tta == "flip_translate":
        result["tta_shift"] = shift
    if not quiet:
        what = f"{tta}, {shift} px" if tta == "flip_translate" else tta
        print(f"{ckpt['model_name']} on {beton} (TTA {what}): accuracy {100 * result['acc']:.2f}% "
              f"of {result['n']} images, loss {result['loss']:.4f}")
        for name, acc in zip(names, result["per_class_acc"]):
            print(f"  {name:>12s}  {100 * acc:6.2f}%")
    return result
