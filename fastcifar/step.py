"""One training step, and the optimisation state it drives.

    step = TrainStep(net, model, recipe, precision="fp16", device_type="cuda",
                     steps_per_epoch=97, total_steps=97 * 24)
    loss, logits = step(images, labels, step_index)     # forward, backward, optimizer, EMA
    checkpoint.update(step.state_dict())                 # everything an exact resume needs

`fastcifar train` and bench/bench_train.py run this same step. Per step it does, in order:
learning rate from the schedule -> forward under autocast -> label-smoothed cross-entropy ->
backward through the GradScaler -> (adversarial model perturbation: a second backward at the
perturbed weights) -> (clipping) -> optimizer step -> (Lookahead) -> (EMA).

It never waits for the GPU: the returned loss and logits stay on the device, the GradScaler's
overflow check stays on the device (the fused optimizers take it as a tensor; see
optim.FUSED), and EMA is one multi-tensor update. The caller decides when to synchronise.
The returned tensors are valid until the next step: under CUDA graphs (compile mode
reduce-overhead) the next step's replay writes over them, so a caller that keeps one copies it.

``net`` computes the loss as well as the logits (`ForwardLoss`, built by `training_net`), so
that torch.compile makes one graph of both.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

from fastcifar.optim import EMA, Lookahead, LRSchedule, ModelPerturbation, build_optimizer, clip_gradients, set_lr

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_MARK_STEP = getattr(torch.compiler, "cudagraph_mark_step_begin", None)   # torch >= 2.3


class ForwardLoss(torch.nn.Module):
    """The network's forward and the training loss as one module: ``(images, labels) -> (loss,
    logits)``, the loss label-smoothed cross-entropy in fp32.

    Why one module: a small network's compiled step is bound by the host, not the GPU (on the
    H100, speedrun_net's step kept the GPU busy 49% of the time: bench/results/gpu/profile_step.json).
    A loss outside the compiled graph runs as ~10 eager ops forward and ~11 autograd nodes
    backward, each a host dispatch and a kernel launch; compiled with the forward, it fuses into
    a few kernels of the graph (and into its CUDA graph under reduce-overhead)."""

    def __init__(self, model: torch.nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.label_smoothing = model, float(label_smoothing)

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self.model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return loss, logits


def training_net(model: torch.nn.Module, label_smoothing: float, compile: bool,
                 compile_mode: str | None = None) -> torch.nn.Module:
    """What `TrainStep` runs: the model with its loss (`ForwardLoss`), compiled unless told not
    to. (`fastcifar train` wraps it in DDP when it runs on several processes.)"""
    net = ForwardLoss(model, label_smoothing)
    return torch.compile(net, mode=compile_mode) if compile else net


class CudaGraphSkips:
    """Graphs torch.compile was asked to replay as CUDA graphs and ran without them, and why.

    Why this exists: under a CUDA-graph mode (reduce-overhead) inductor captures each compiled
    graph once and replays it with one launch, which is what frees a host-bound step (on the
    H100 speedrun_net's compiled step was 51% idle). When it cannot capture a graph (an input
    mutated in place, a CPU tensor in the graph, an op it cannot record), it runs that graph
    launch by launch as in the default mode, says why on a log line that is off unless
    TORCH_LOGS asks for it, and goes on: the step is as host-bound as before and nothing shows
    it. This watcher counts those graphs (inductor's ``cudagraph_skips`` counter) and keeps
    their reasons (its log lines) from its creation on, so that runs and benchmarks can report
    them. On the CPU every graph is skipped, without a logged reason."""

    _reasons: list[str] = []           # every reason logged in this process, in order
    _handler: logging.Handler | None = None
    MAX_CHARS = 600                    # a reason with its stack trace, cut to this length

    def __init__(self):
        cls = type(self)
        if cls._handler is None:
            class Collect(logging.Handler):
                def emit(self, record):
                    cls._reasons.append(record.getMessage()[:cls.MAX_CHARS])
            cls._handler = Collect(logging.WARNING)
            # inductor logs a skip at WARNING on its "cudagraphs" artifact logger, which does not
            # propagate to the root logger unless TORCH_LOGS enables it; a handler on it still
            # sees every record at WARNING or above
            logging.getLogger("torch._inductor.cudagraph_utils.__cudagraphs").addHandler(cls._handler)
        self._first_reason, self._first_count = len(cls._reasons), self._count()
        self._reported = self._first_reason

    @staticmethod
    def _count() -> int:
        from torch._dynamo.utils import counters
        return int(counters["inductor"]["cudagraph_skips"])

    def report(self) -> dict:
        """``{"graphs_skipped": n, "reasons": [distinct reasons, first seen first]}`` since creation."""
        reasons = list(dict.fromkeys(type(self)._reasons[self._first_reason:]))
        # (max: someone may have cleared inductor's counters since)
        return {"graphs_skipped": max(self._count() - self._first_count, 0), "reasons": reasons}

    def new_reasons(self) -> list[str]:
        """Reasons logged since the last call (or creation), each once."""
        new = type(self)._reasons[self._reported:]
        self._reported += len(new)
        return list(dict.fromkeys(new))


def cudagraph_note(report: dict | None) -> str:
    """A result line's suffix for a `CudaGraphSkips.report()`: "" when every graph was replayed
    as a CUDA graph (or none was asked for)."""
    if not report or not report["graphs_skipped"]:
        return ""
    return f"  [{report['graphs_skipped']} graph(s) without CUDA graphs: see \"cudagraphs\" in the results]"


def watch_cudagraphs(compile: bool, compile_mode: str | None) -> CudaGraphSkips | None:
    """A `CudaGraphSkips` when the step is compiled in a CUDA-graph mode (create it before the
    first compile); None otherwise."""
    from fastcifar.config import CUDAGRAPH_MODES
    return CudaGraphSkips() if compile and compile_mode in CUDAGRAPH_MODES else None


class TrainStep:
    """The recipe's optimisation of ``model`` (the raw module), run through ``net`` (the model
    with its loss, `training_net`: compiled and/or wrapped in DDP)."""

    def __init__(self, net, model: torch.nn.Module, recipe, precision: str, device_type: str,
                 steps_per_epoch: int, total_steps: int):
        self.net, self.model, self.recipe = net, model, recipe
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, recipe)
        self.schedule = LRSchedule(recipe, steps_per_epoch, total_steps)
        self.scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")
        self.lookahead = (Lookahead(self.params, recipe.lookahead_k, recipe.lookahead_alpha,
                                    ramp=recipe.lookahead_ramp, buffers=list(model.buffers()))
                          if recipe.lookahead_k > 0 else None)
        self.perturb = (ModelPerturbation(self.params, list(model.buffers()), recipe.amp_epsilon,
                                          recipe.amp_inner_lr, recipe.amp_inner_iters)
                        if recipe.amp_epsilon > 0 else None)
        self.ema = EMA(model, recipe.ema) if recipe.ema > 0 else None
        self.clip = recipe.grad_clip_norm is not None or recipe.grad_clip_value is not None
        dtype = PRECISIONS[precision]
        self.autocast = (contextlib.nullcontext if precision == "fp32"
                         else lambda: torch.autocast(device_type, dtype=dtype))

    @property
    def averaged(self) -> torch.nn.Module | None:
        """The EMA weights (the run's result when the recipe keeps an average), or None."""
        return self.ema.model if self.ema is not None else None

    def _forward_backward(self, images, labels):
        with self.autocast():
            loss, logits = self.net(images, labels)
        self.scaler.scale(loss).backward()
        return loss, logits

    def __call__(self, images, labels, step_index: int):
        """One optimizer step on a batch; returns (loss, logits) of the unperturbed weights,
        detached and still on the device."""
        optimizer = self.optimizer
        if _MARK_STEP is not None:
            # a new step for torch.compile's CUDA graphs (mode reduce-overhead): the previous
            # step's graph outputs may be overwritten from here on (the loop has used them)
            _MARK_STEP()
        set_lr(optimizer, self.schedule(step_index))
        optimizer.zero_grad(set_to_none=True)
        loss, logits = self._forward_backward(images, labels)
        if self.perturb is not None:   # gradient at the adversarially perturbed weights (optim.py)
            # copies: under CUDA graphs the next forward writes its outputs where these are
            loss, logits = loss.detach().clone(), logits.detach().clone()
            def regrad():
                optimizer.zero_grad(set_to_none=True)
                self._forward_backward(images, labels)
            self.perturb.perturb(regrad)
            regrad()
            self.perturb.restore()
        if self.clip:
            self.scaler.unscale_(optimizer)
            clip_gradients(self.params, self.recipe)
        self.scaler.step(optimizer)
        self.scaler.update()
        if self.lookahead is not None:
            self.lookahead.step(progress=(step_index + 1) / self.schedule.total)
        if self.ema is not None:
            self.ema.update(self.model, step=step_index)
        return loss.detach(), logits.detach()

    # --- checkpointing ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "schedule": self.schedule.state_dict(),
                "lookahead": self.lookahead.state_dict() if self.lookahead else None,
                "ema": self.ema.state_dict() if self.ema else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.schedule.load_state_dict(state["schedule"])
        if self.lookahead:
            self.lookahead.load_state_dict(state["lookahead"])
        if self.ema:
            self.ema.load_state_dict(state["ema"])


def add_model_opt_argument(parser) -> None:
    """The benchmarks' ``--model-opt KEY=VALUE`` (repeatable), parsed as `fastcifar train`
    parses it: ``args.model_opt`` is a dict for `benchmark_step`; a malformed item is a usage
    error before any work."""
    import argparse

    class ModelOptions(argparse.Action):
        def __call__(self, parser, namespace, value, option_string=None):
            from fastcifar.cli import _model_options
            from fastcifar.errors import UserError
            try:
                parsed = _model_options([value])
            except UserError as e:
                parser.error(str(e))
            setattr(namespace, self.dest, {**getattr(namespace, self.dest), **parsed})

    parser.add_argument("--model-opt", action=ModelOptions, default={}, metavar="KEY=VALUE",
                        help="option for every model's builder, as `fastcifar train --model-opt` "
                             "(e.g. act=gelu for speedrun_net); repeatable")


def benchmark_step(model_name: str, bn_backend: str, device: torch.device, batch_size: int | None = None,
                   compile: bool = True, model_options: dict | None = None,
                   compile_mode: str | None = None) -> tuple[TrainStep, object, int]:
    """A zoo model's `fast`-recipe step as the benchmarks (bench_train.py, profile_step.py) time
    it: channels-last on ``device``, fp16 on a GPU and fp32 on the CPU, compiled unless told not
    to, seeded, cuDNN autotuning on; the recipe rescaled if ``batch_size`` differs from its own;
    the schedule over nominal 50,000-image epochs (a step's cost does not depend on it).
    ``model_options`` go to the model's builder (e.g. speedrun_net's act="gelu"); ``compile_mode``
    to torch.compile (e.g. "reduce-overhead": CUDA graphs).
    Returns (step, recipe, batch size)."""
    from fastcifar.models import create_model, get_recipe

    gpu = device.type == "cuda"
    recipe = get_recipe(model_name, "fast")
    batch = batch_size or recipe.batch_size
    if batch != recipe.batch_size:
        recipe, _ = recipe.for_batch_size(batch)
    torch.manual_seed(0)
    if gpu:
        torch.backends.cudnn.benchmark = True
    model = create_model(model_name, bn_backend=bn_backend, **(model_options or {}))
    model = model.to(device, memory_format=torch.channels_last)
    net = training_net(model, recipe.label_smoothing, compile, compile_mode)
    per_epoch = max(50_000 // batch, 1)
    step = TrainStep(net, model, recipe, "fp16" if gpu else "fp32", device.type, per_epoch, recipe.epochs * per_epoch)
    return step, recipe, batch
