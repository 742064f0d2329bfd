"""``fastcifar models``: the zoo as a table, as JSON, or one model's report recipe field by field."""
from __future__ import annotations

import dataclasses
import json
import textwrap

import typer

from fastcifar.models.registry import TRAIN_FLOPS_PER_FORWARD, ModelInfo, forward_flops, get_model_info, list_models
from fastcifar.recipe import Recipe


def show(as_json: bool = False, recipe: str | None = None) -> None:
    if recipe is not None:
        info = get_model_info(recipe)  # UserError for an unknown name
        typer.echo(json.dumps(_recipe_json(info), indent=2) if as_json else recipe_text(info))
        return
    infos = list_models()
    if as_json:
        typer.echo(json.dumps({"models": [_model_json(i) for i in infos]}, indent=2))
    else:
        typer.echo(table_text(infos))


def _acc(info: ModelInfo) -> str:
    if info.published_acc_text:
        return info.published_acc_text
    return "-" if info.published_acc is None else f"{info.published_acc:.2f}"


def recipe_summary(r: Recipe, mark_unstated: bool = True) -> str:
    """One line: optimizer, lr, schedule, epochs, batch, weight decay and the tricks in use.

    With ``mark_unstated``, a value the report does not state is marked with '?'.
    """
    def v(field: str, text: str) -> str:
        return text if field in r.sources or not mark_unstated else text + "?"

    parts = [v("optimizer", r.optimizer) + " " + v("lr", f"lr {r.lr:g}"), v("schedule", r.schedule),
             v("epochs", f"{r.epochs} ep"), v("batch_size", f"bs {r.batch_size}"),
             v("weight_decay", f"wd {r.weight_decay:g}")]
    if r.optimizer == "muon":
        parts.append(f"muon lr {r.muon_lr:g}")
    if r.bias_lr_scale != 1:
        parts.append(f"bias lr x{r.bias_lr_scale:g}")
    if r.grad_clip_value is not None:
        parts.append(f"clip {r.grad_clip_value:g}")
    if r.grad_clip_norm is not None:
        parts.append(f"clip-norm {r.grad_clip_norm:g}")
    if r.lookahead_k:
        parts.append(f"lookahead k={r.lookahead_k}" + (" ramped" if r.lookahead_ramp else ""))
    if r.amp_epsilon:
        parts.append(f"AMP eps={r.amp_epsilon:g}")
    if r.label_smoothing:
        parts.append(f"ls {r.label_smoothing:g}")
    flip = "altflip" if r.alternate_flip else "flip"
    aug = "+".join(a for a, on in ((flip, r.flip), (f"crop{r.translate}", r.translate),
                                   (f"cutout{r.cutout}", r.cutout)) if on) or "no aug"
    parts.append(aug)
    return ", ".join(parts)


def table_text(infos: list[ModelInfo]) -> str:
    header = ("name", "params", "published", "GFLOP", "acc %", "report", "report recipe")
    rows = [(i.name, f"{i.params:,}", "-" if i.published_params is None else f"{i.published_params:,}",
             f"{forward_flops(i.name) / 1e9:.2f}", _acc(i), i.report[:3] or "-",
             recipe_summary(i.recipe, bool(i.report))) for i in infos]
    widths = [max(len(str(row[c])) for row in [header, *rows]) for c in range(len(header))]
    right = {1, 2, 3, 4}

    def line(row):
        return "  ".join(str(x).rjust(w) if c in right else str(x).ljust(w)
                         for c, (x, w) in enumerate(zip(row, widths))).rstrip()

    out = [line(header), line(["-" * w for w in widths]), *map(line, rows), "",
           "params: trainable parameters as built here; published: as the report prints it "
           "(- where it prints none). GFLOP: one image's forward pass (2 per multiply-add of the "
           f"convolutions and linear layers); a training step costs about {TRAIN_FLOPS_PER_FORWARD}x that "
           "per image. '?' marks a recipe value the report does not state.", "",
           "reports:"]
    seen = {}
    for i in infos:
        seen.setdefault(i.report or "-", i.title)
    out += [f"  {file.ljust(24)}  {title}" for file, title in seen.items()]
    out += ["", "`fastcifar models --recipe NAME` shows a model's report recipe with its sources."]
    return "\n".join(out)


def recipe_text(info: ModelInfo) -> str:
    r = info.recipe
    if info.report:
        out = [f"{info.name}: recipe tagged '{r.tag}', read from {info.report}", f"  {info.title}", ""]
    else:
        out = [f"{info.name}: {info.title}; it has no report, so its recipe is this project's own", ""]
    fields = [f for f in dataclasses.fields(Recipe) if f.name not in ("tag", "sources", "notes")]
    shown = {f.name: "none" if getattr(r, f.name) is None else str(getattr(r, f.name)) for f in fields}
    width = max(map(len, shown))
    vwidth = max(map(len, shown.values()))
    for name, value in shown.items():
        src = r.sources.get(name)
        tag = f"[{r.tag}] {src}" if src else "[not stated in the report]" if info.report else "-"
        first, *rest = textwrap.wrap(tag, 100)
        out.append(f"  {name.ljust(width)}  {value.ljust(vwidth)}  {first}")
        out += [" " * (width + vwidth + 6) + line for line in rest]
    if r.notes:
        out += ["", "notes:"] + ["  " + line for line in textwrap.wrap(r.notes, 100)]
    return "\n".join(out)


def _model_json(i: ModelInfo) -> dict:
    return {"name": i.name, "params": i.params, "published_params": i.published_params,
            "forward_flops": forward_flops(i.name),
            "params_match_published": None if i.published_params is None else i.params == i.published_params,
            "report": i.report, "title": i.title, "published_acc": i.published_acc,
            "published_acc_text": i.published_acc_text, "notes": i.notes,
            "recipe_summary": recipe_summary(i.recipe), "recipe": _jsonable(i.recipe.to_dict())}


def _recipe_json(i: ModelInfo) -> dict:
    d = _jsonable(i.recipe.to_dict())
    return {"name": i.name, "report": i.report, "title": i.title, "recipe": d,
            "stated": sorted(i.recipe.sources)}


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
