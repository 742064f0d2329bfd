"""The model registry: one ``@register`` per model, ``create_model(name)`` to build one.

timm-style: each family file (resnet.py, se_resnet.py, ...) decorates its builder functions
with the report they come from, the published figures and the report's recipe; importing
``fastcifar.models`` imports the families so every model is registered.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from fastcifar.errors import UserError
from fastcifar.models.norm import set_bn_backend
from fastcifar.recipe import Recipe


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]
    report: str                        # file name of the report, e.g. 004_9a17163d1e54e00e.txt
    title: str                         # the report's title
    published_params: Optional[int]    # trainable parameters as the report prints them; None if not printed
    published_acc: Optional[float]     # test accuracy in percent as the report gives it; None if not given
    recipe: Recipe                     # the report's own recipe (tag "report"); a model with no
                                       # report shows its fast recipe here
    params: int                        # trainable parameters of the model as built here
    notes: str = ""
    published_acc_text: Optional[str] = None  # the accuracy as printed where it is a range, e.g. "90-91"


_REGISTRY: dict[str, dict] = {}


def register(name: str, *, report: str, title: str, published_params: int | None,
             published_acc: float | None, recipe: Recipe | None, notes: str = "",
             published_acc_text: str | None = None, fast: Recipe | None = None):
    """Decorator registering a builder ``fn(**options) -> nn.Module`` under ``name``.

    ``recipe`` is the report's own recipe, tagged "report"; a model of this project's own design
    has no report (``report=""``) and no report recipe (``recipe=None``), only a fast one.
    ``fast`` overrides the zoo-wide fast recipe for this model (see ``fast_recipe``).
    """
    if report and (recipe is None or recipe.tag != "report"):
        raise ValueError(f"{name}: a model from a report needs that report's recipe, tagged 'report'")
    if not report and recipe is not None:
        raise ValueError(f"{name}: a model with no report has no report recipe; pass recipe=None")
    fast = fast or fast_recipe()

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = dict(name=name, builder=fn, report=report, title=title,
                               published_params=published_params, published_acc=published_acc,
                               recipe=recipe or fast, notes=notes,
                               published_acc_text=published_acc_text, fast=fast)
        return fn

    return deco


def fast_recipe(**overrides) -> Recipe:
    """The zoo-wide starting point for fast training; speed work tunes it per model.

    Flip test-time augmentation (the test image and its mirror image, logits averaged) costs
    one more forward pass of the test set and no training time, which is what a run to its
    report's accuracy is timed by: resnet_2111 after 3 epochs of this recipe scored 78.04%
    without it and 78.62% with it on the JPEG copy (CPU, seed 0;
    bench/results/eval_cpu_resnet_2111_fast3_tta.json). flip_translate gained 0.23 more there,
    at twice flip's evaluation cost, which a run evaluated after every epoch pays each time."""
    base = Recipe(tag="fast", epochs=24, batch_size=512, optimizer="sgd", lr=0.2, momentum=0.9,
                  nesterov=True, weight_decay=5e-4, schedule="onecycle", pct_start=0.25,
                  final_lr_frac=0.0, label_smoothing=0.2, flip=True, translate=2, tta="flip",
                  notes="Untuned starting point: one-cycle SGD-nesterov, label smoothing 0.2, "
                        "batch 512, flip + 2-pixel translate, flip TTA.")
    return dataclasses.replace(base, **overrides)


def _entry(name: str) -> dict:
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise UserError(f"unknown model {name!r}; known models: {known}")
    return _REGISTRY[name]


def create_model(name: str, bn_backend: str = "eager", **options) -> nn.Module:
    """Build model ``name`` with its BatchNorm+ReLU layers (NormAct) on ``bn_backend``.

    ``options`` go to the model's builder (e.g. ``dropout``).
    """
    entry = _entry(name)
    builder = entry["builder"]
    accepted = inspect.signature(builder).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        allowed = ", ".join(accepted) or "none"
        raise UserError(f"model {name!r} has no option {', '.join(unknown)}; its options: {allowed}")
    return set_bn_backend(builder(**options), bn_backend)


def full_model_options(name: str, **options) -> dict:
    """``options`` with every other option of the builder at its current default (num_classes
    apart, which the data decides), as JSON values. Runs record this beside the options given,
    so that a checkpoint rebuilds the same network after a default changes."""
    params = inspect.signature(_entry(name)["builder"]).parameters
    full = {k: p.default for k, p in params.items()
            if p.default is not inspect.Parameter.empty and k != "num_classes"}
    full.update({k: v for k, v in options.items() if k != "num_classes"})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in full.items()}


def count_params(model: nn.Module) -> int:
    """Trainable parameters; a tensor shared by several layers counts once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# A training step costs about 3 forward passes per image: the forward, the gradient with respect
# to each layer's input and the one with respect to its weights, each as many multiply-adds as
# the forward. The usual convention behind "achieved TFLOP/s" (and what torch's FlopCounterMode
# would say, but it over-counts the backward of grouped convolutions, as in ResNeXt).
TRAIN_FLOPS_PER_FORWARD = 3


def forward_flops(name: str, **options) -> int:
    """Floating-point operations of one 32x32 image's forward pass through model ``name`` (built
    with ``options``): 2 per multiply-add of every convolution and matrix product, as torch's
    FlopCounterMode counts them (normalisation, activations and pooling are memory-bound and not
    counted)."""
    return _forward_flops(name) if not options else _count_forward_flops(create_model(name, **options))


@functools.lru_cache(maxsize=None)
def _forward_flops(name: str) -> int:
    return _count_forward_flops(create_model(name))


def _count_forward_flops(model: nn.Module) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, 32, 32))
    return int(counter.get_total_flops())


@functools.lru_cache(maxsize=None)
def _built_params(name: str) -> int:
    return count_params(_entry(name)["builder"]())


def get_model_info(name: str) -> ModelInfo:
    e = _entry(name)
    return ModelInfo(name=name, builder=e["builder"], report=e["report"], title=e["title"],
                     published_params=e["published_params"], published_acc=e["published_acc"],
                     recipe=e["recipe"], params=_built_params(name), notes=e["notes"],
                     published_acc_text=e["published_acc_text"])


def list_models() -> list[ModelInfo]:
    return [get_model_info(n) for n in _REGISTRY]


def model_names() -> list[str]:
    return list(_REGISTRY)


def get_recipe(name: str, tag: str = "report") -> Recipe:
    """The model's ``report`` recipe (as its report wrote it) or its ``fast`` recipe; a copy."""
    e = _entry(name)
    if tag == "report" and not e["report"]:
        raise UserError(f"{name} is this project's own design and has no report recipe; use --recipe fast")
    if tag == "report":
        return dataclasses.replace(e["recipe"], sources=dict(e["recipe"].sources))
    if tag == "fast":
        return dataclasses.replace(e["fast"], sources=dict(e["fast"].sources))
    raise UserError(f"unknown recipe tag {tag!r}; choose 'report' or 'fast'")
