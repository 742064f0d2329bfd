"""BatchNorm + (residual add) + activation as one module, with a switchable backend.

Every model in the zoo sends each BatchNorm->ReLU pair, and each BatchNorm->add->ReLU at a
residual join, through ``NormAct`` (the activation is ReLU, GELU or none). That gives the
speed work one place to swap the implementation without touching model code:

    eager     F.batch_norm, then add, then the activation (nn.BatchNorm2d + nn.ReLU/nn.GELU)
    compiled  the same function through torch.compile (compiled once per process, shared by
              every module; works on CPU too)
    triton    kernels.bn_relu, the fused Triton kernels

``NormAct`` subclasses nn.BatchNorm2d, so its parameters and buffers (weight, bias,
running_mean, running_var, num_batches_tracked) carry the same state_dict keys as a plain
BatchNorm2d: a checkpoint saved under one backend loads under any other, and into a model
whose NormActs are replaced by nn.BatchNorm2d (or nn.BatchNorm2d + nn.ReLU, keys prefixed).
Every backend keeps nn.BatchNorm2d's bookkeeping: in training the batch is counted in
num_batches_tracked and the running statistics move by ``momentum`` (or, with
``momentum=None``, by the cumulative average 1 / num_batches_tracked); eval uses them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastcifar.errors import UserError

BACKENDS = ("eager", "compiled", "triton")
ACTIVATIONS = ("relu", "gelu", None)    # GELU is the exact (erf) one, as nn.GELU()


def _activate(y, act):
    if act == "relu":
        return F.relu(y)
    return F.gelu(y) if act == "gelu" else y


def bn_act(x, weight, bias, running_mean, running_var, training: bool, momentum: float,
           eps: float, residual=None, act: str | None = "relu"):
    """act(batch_norm(x) + residual): the reference every backend must match."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return _activate(y, act)


# torch.compile guards on the Python arguments (act, residual given or not, training), and
# dynamo keeps a bounded number of variants per code object (8 by default; past that it
# silently runs eager). One small function per (residual, activation) combination, compiled
# with dynamic shapes, keeps each to a few variants (train/eval, grad mode, memory format)
# for every layer of every model.
def _bn(x, w, b, rm, rv, training: bool, momentum: float, eps: float):
    return F.batch_norm(x, rm, rv, w, b, training, momentum, eps)


def _bn_relu(x, w, b, rm, rv, training: bool, momentum: float, eps: float):
    return F.relu(F.batch_norm(x, rm, rv, w, b, training, momentum, eps))


def _bn_add(x, w, b, rm, rv, training: bool, momentum: float, eps: float, residual):
    return F.batch_norm(x, rm, rv, w, b, training, momentum, eps) + residual


def _bn_add_relu(x, w, b, rm, rv, training: bool, momentum: float, eps: float, residual):
    return F.relu(F.batch_norm(x, rm, rv, w, b, training, momentum, eps) + residual)


def _bn_gelu(x, w, b, rm, rv, training: bool, momentum: float, eps: float):
    return F.gelu(F.batch_norm(x, rm, rv, w, b, training, momentum, eps))


def _bn_add_gelu(x, w, b, rm, rv, training: bool, momentum: float, eps: float, residual):
    return F.gelu(F.batch_norm(x, rm, rv, w, b, training, momentum, eps) + residual)


_VARIANTS = {(False, None): _bn, (False, "relu"): _bn_relu, (False, "gelu"): _bn_gelu,
             (True, None): _bn_add, (True, "relu"): _bn_add_relu, (True, "gelu"): _bn_add_gelu}
# Filled once, when a module is first switched to the compiled backend, and never changed
# afterwards: created lazily inside a forward, the dict would change while torch.compile
# traces an outer model (whose graph guards on it), and the second step would recompile.
_COMPILED: dict = {}


def _compile_variants() -> None:
    """Create the compiled variants (torch.compile itself compiles lazily, at first call)."""
    if not _COMPILED:
        _COMPILED.update({key: torch.compile(fn, dynamic=True) for key, fn in _VARIANTS.items()})


def _triton_bn_relu():
    """kernels.bn_relu, or a UserError saying what is missing."""
    try:
        import kernels
    except ImportError as e:  # pragma: no cover - the package ships with the repository
        raise UserError(f"the triton BN backend needs the `kernels` package ({e}); "
                        "reinstall fastcifar or use --bn-backend eager") from None
    fn = getattr(kernels, "bn_relu", None)
    if fn is None:
        raise UserError("the triton BN backend needs kernels.bn_relu, which this install lacks; "
                        "update the `kernels` package or use the eager/compiled backend")
    return fn


def _check_backend(backend: str):
    """Validate ``backend`` and get what it needs ready; returns the triton function or None."""
    if backend not in BACKENDS:
        raise UserError(f"unknown BN backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "compiled":
        _compile_variants()
    return _triton_bn_relu() if backend == "triton" else None


class NormAct(nn.BatchNorm2d):
    """BatchNorm2d, then optionally ``+ residual``, then the activation: ``forward(x, residual=None)``.

    ``act`` is "relu" (default), "gelu" (exact, as nn.GELU()) or None. ``backend`` (eager |
    compiled | triton) can be changed at any time; an unknown name, or triton without its
    kernels, raises a UserError when it is set.
    """

    def __init__(self, num_features: int, act: str | None = "relu", eps: float = 1e-5,
                 momentum: float | None = 0.1, backend: str = "eager"):
        super().__init__(num_features, eps=eps, momentum=momentum)
        if act not in ACTIVATIONS:
            raise UserError(f"unknown activation {act!r}; choose relu, gelu or None")
        self.act = act
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._triton = _check_backend(name)
        self._backend = name

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act}, backend={self.backend}"

    def _momentum(self) -> float:
        # nn.BatchNorm2d's rule: count the batch, then use momentum, or the cumulative
        # average 1/n when momentum is None.
        if not self.training:
            return 0.0 if self.momentum is None else self.momentum
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self._backend == "triton":
            # the kernels do the bookkeeping: the statistics pass counts the batch and the
            # finalize pass updates the running statistics (no extra launches)
            return self._triton(x, self.weight, self.bias, self.running_mean, self.running_var,
                                self.training, self.momentum, self.eps, residual=residual,
                                act=self.act, num_batches_tracked=self.num_batches_tracked)
        args = (x, self.weight, self.bias, self.running_mean, self.running_var,
                self.training, self._momentum(), self.eps)
        if self._backend == "eager":
            return bn_act(*args, residual=residual, act=self.act)
        fn = _COMPILED[(residual is not None, self.act)]
        # dynamo keeps nn.Parameter shapes static whatever `dynamic` says, which would
        # recompile for every channel count; a view of the parameter is a plain tensor
        # (gradients still flow to the parameter).
        args = (x, self.weight.view_as(self.weight), self.bias.view_as(self.bias), *args[3:])
        return fn(*args) if residual is None else fn(*args, residual)


def set_bn_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every NormAct in ``model`` to ``backend`` (eager | compiled | triton); returns model."""
    _check_backend(backend)     # fail now even for a model without NormAct
    for m in model.modules():
        if isinstance(m, NormAct):
            m.backend = backend
    return model
