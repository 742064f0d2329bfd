"""Fused BatchNorm + (residual add) + activation: launch geometry, launchers, torch ops and
`bn_relu`.

    y = bn_relu(x, weight, bias, running_mean, running_var, training, momentum, eps,
                residual=None, act="relu", num_batches_tracked=None)    # act: relu|gelu|None

The device code is in kernels/bn_kernels.py (what each pass reads and writes, and why); this
module decides how a tensor maps onto those kernels and wraps them as three torch ops:

    fastcifar::bn_stats_          training only: batch mean and biased variance, and, in the
                                  same two launches, the running statistics and
                                  num_batches_tracked updated in place (declared mutations)
    fastcifar::bn_relu_apply      y from x and a mean/variance (batch or running); functional,
                                  with an autograd formula calling
    fastcifar::bn_relu_backward   dx, dweight, dbias, d_residual

An op with an autograd formula must be functional, so the one that mutates the running
statistics is the statistics op; the apply op's formula gives the full gradient of batch
normalization (through the batch mean and variance too), so the statistics op needs none.

How torch.compile sees the ops (`VISIBLE_TO_COMPILER`):

* torch >= 2.6 with real (compiled) kernels: the ops are `torch.library.triton_op`s whose
  kernels are launched through `torch.library.wrap_triton`. torch.compile traces into them,
  so the compiled graph holds the Triton kernels themselves and inductor's generated code
  launches them with no Python in between: no custom-op dispatch, and the launch geometry,
  computed once while tracing, becomes constants.
* Under TRITON_INTERPRET=1 (the CPU test setting), or with torch < 2.6: plain
  `torch.library.custom_op`s with shape-only fake implementations. torch.compile keeps them
  as opaque calls, which run this module's Python per call. (Tracing into interpreted kernels
  cannot work: the interpreter reads tensor data, which traced tensors do not have; and
  inductor cannot launch a user Triton kernel without a GPU driver.)

Outside torch.compile both run the same Python and the same launches, each straight to its
kernel (`_direct_launches`: not through torch's wrapper op, ~0.5 ms a launch). Launch
geometry is cached per (shape, layout, device), so a step re-derives nothing.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
from dataclasses import dataclass
from typing import Optional

import numpy
import torch
import triton
from torch import Tensor
from torch.autograd.graph import increment_version

from kernels.bn_kernels import (ACT_GELU, ACT_NONE, ACT_RELU, bwd_dx_kernel,
                                bwd_finalize_kernel, bwd_reduce_kernel, fwd_apply_kernel,
                                fwd_finalize_kernel, fwd_stats_kernel)

# Under TRITON_INTERPRET=1 (set before triton is imported) kernels run on CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

VISIBLE_TO_COMPILER = (not INTERPRET and hasattr(torch.library, "triton_op")
                       and hasattr(torch.library, "wrap_triton"))

# Tests set this to fill every output with NaN before a kernel writes it, so an element a
# kernel forgets to write shows up as NaN instead of as stale memory that happens to be right.
POISON = os.environ.get("FASTCIFAR_POISON", "0") == "1"

# Tests override block sizes here to force multi-block / multi-tile / ragged-edge paths on
# small tensors; keys: block_m, block_c, programs (target program count of reduction passes),
# tile (elements per tile). Part of the geometry cache's key.
CONFIG_OVERRIDE: dict = {}

# The activations by name, as the ops take them, and their codes in the kernels (ACT).
ACTIVATIONS = {"none": int(ACT_NONE.value), "relu": int(ACT_RELU.value),
               "gelu": int(ACT_GELU.value)}

if VISIBLE_TO_COMPILER:
    from torch.library import wrap_triton
else:
    def wrap_triton(kernel):
        """The ops are opaque to the compiler here: launch the kernel as it is."""
        return kernel

try:
    from torch._library.triton import set_wrap_triton_enabled
except ImportError:         # torch < 2.6: no wrap_triton, nothing to switch off
    def set_wrap_triton_enabled(enabled: bool):
        return contextlib.nullcontext()


def _direct_launches():
    """Within: `wrap_triton(kernel)[grid](...)` launches the kernel itself. Outside it, and
    outside torch.compile, every such launch goes through torch's triton_kernel_wrapper
    higher-order op, whose dispatch cost ~0.5 ms of host time per launch on the H100 node
    (bench_bn_relu.json: 3-4 ms per fused forward+backward at any shape, cuDNN 0.2-0.5 ms).
    The triton_ops switch it off for their own eager calls; the eager path here bypasses
    the ops (see _EagerBNReLU), so it switches it off itself. Thread-local: the backward,
    which autograd may run on another thread, enters it again."""
    return set_wrap_triton_enabled(False)


# ----------------------------------------------------------------------------------------
# Launch geometry
# ----------------------------------------------------------------------------------------

def _pow2(n: int) -> int:
    """The smallest power of two >= n (and >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Geometry:
    """How a [N, C, H, W] tensor maps onto row blocks x channel blocks (see bn_kernels._tile)."""
    C: int
    count: int              # N*H*W, values per channel
    channels_last: bool
    S: int                  # rows per "image": N*H*W channels-last, H*W NCHW
    block_m: int
    block_c: int
    c_blocks: int
    n_blocks: int           # row blocks over all images
    P: int                  # programs per channel block in the reduction passes
    blocks_per_prog: int    # row blocks per reduction program (the kernels derive it too)
    num_warps: int          # the one-tile passes (apply, dx)
    reduce_warps: int       # the reduction passes (statistics, backward reduce)
    merge_block_p: int      # the finalize kernels' [BLOCK_P, BLOCK_C] tiles over the partials
    merge_block_c: int

    @property
    def reduce_grid(self) -> tuple:
        return (self.P, self.c_blocks)

    @property
    def tile_grid(self) -> tuple:
        return (self.n_blocks, self.c_blocks)

    @property
    def merge_grid(self) -> tuple:
        return (_cdiv(self.C, self.merge_block_c),)


MIN_ROWS = 64      # rows per program of a reduction pass, at least (see _geometry)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=4096)
def _geometry(N: int, C: int, H: int, W: int, channels_last: bool, device: torch.device,
              override: tuple) -> Geometry:
    cfg = dict(override)
    images, S = (1, N * H * W) if channels_last else (N, H * W)
    tile = cfg.get("tile", 4096)
    if channels_last:   # whole rows per tile: one contiguous stretch of memory
        block_c = min(_pow2(C), 256)    # wider C: several channel blocks, more programs
        block_m = max(1, min(tile // block_c, _pow2(S)))
    else:               # contiguous along h*w
        block_m = min(_pow2(S), 256)
        block_c = max(1, min(_pow2(C), tile // block_m))
    block_m = cfg.get("block_m", block_m)
    block_c = cfg.get("block_c", block_c)
    c_blocks = _cdiv(C, block_c)
    n_blocks = images * _cdiv(S, block_m)
    # Reduction passes: enough programs to fill the GPU (8 per SM), each looping over
    # several blocks, but each covering >= MIN_ROWS rows so that the per-program partials
    # ([2-3, P, C] fp32, written then re-read by the finalize kernel) stay under ~10% of the
    # bytes the pass reads. The floor was 256 rows (~2%) until the H100 profile: on the small
    # maps of the last stages it left 64-256 programs for 132 SMs (3-6% occupancy), and a
    # statistics pass over 8-17 MB took 45-55 us, as long as one over 67 MB.
    min_blocks = _cdiv(MIN_ROWS, block_m)
    if "programs" in cfg:
        target, min_blocks = cfg["programs"], 1
    elif device.type == "cuda":
        target = 8 * _sm_count(device.index)
    else:       # interpreter: every program instance costs Python time
        target = 4
    per_c = max(1, target // c_blocks)
    blocks_per_prog = max(_cdiv(n_blocks, per_c), min_blocks)
    P = _cdiv(n_blocks, blocks_per_prog)
    # The finalize kernels: narrow channel blocks so that many programs share the work and
    # each loops over few [BLOCK_P, BLOCK_C] tiles (P <= ~8 x SMs, i.e. <= ~9 iterations).
    merge_block_c = min(_pow2(C), 32)
    merge_block_p = max(1, min(_pow2(P), 4096 // merge_block_c))
    return Geometry(C=C, count=N * H * W, channels_last=channels_last, S=S, block_m=block_m,
                    block_c=block_c, c_blocks=c_blocks, n_blocks=n_blocks, P=P,
                    blocks_per_prog=_cdiv(n_blocks, P),
                    num_warps=4 if block_m * block_c <= 4096 else 8,
                    # twice the warps: the per-lane accumulators of a 4096-element tile in
                    # 128 threads took 123-244 registers (sm_90, ptxas), 64-128 in 256
                    reduce_warps=8 if block_m * block_c >= 2048 else 4,
                    merge_block_p=merge_block_p, merge_block_c=merge_block_c)


def geometry(x: Tensor) -> Geometry:
    """The launch geometry of a dense NCHW or channels-last x (cached)."""
    N, C, H, W = x.shape
    override = tuple(sorted(CONFIG_OVERRIDE.items())) if CONFIG_OVERRIDE else ()
    return _geometry(int(N), int(C), int(H), int(W), _is_channels_last(x), x.device, override)


def _is_channels_last(x: Tensor) -> bool:
    if x.is_contiguous(memory_format=torch.channels_last):
        return True
    if x.is_contiguous():
        return False
    raise ValueError("bn_relu kernels need a dense NCHW or channels-last tensor")


def _empty(shape_or_like, **kw) -> Tensor:
    if isinstance(shape_or_like, Tensor):
        t = torch.empty_like(shape_or_like, **kw)
    else:
        t = torch.empty(shape_or_like, **kw)
    if POISON and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def interpreter_problem(triton_version: str, numpy_version: str) -> Optional[str]:
    """Why Triton's interpreter cannot run these kernels with these versions, or None.

    The reduction passes loop over `range(first, last)` with bounds computed in the kernel.
    Triton's interpreter before 3.7 turns such a bound into an int with `int(array)` on a
    one-element array, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted
    to Python scalars"); compiled kernels on a GPU are not affected."""
    def major_minor(v: str) -> tuple:
        return tuple(int(p) for p in re.findall(r"\d+", v)[:2])
    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run these kernels "
                f"with NumPy {numpy_version}: install triton>=3.7 or numpy<2.4 for CPU runs")
    return None


# decided once, like INTERPRET: the versions do not change while the process runs
INTERPRETER_PROBLEM = interpreter_problem(triton.__version__, numpy.__version__) if INTERPRET else None


def _check_device(x: Tensor) -> None:
    if not (x.is_cuda or INTERPRET):
        raise RuntimeError(
            "bn_relu runs Triton kernels: give it CUDA tensors, or set TRITON_INTERPRET=1 "
            "before importing triton to run them on CPU (slow; meant for tests)")
    if INTERPRETER_PROBLEM:
        raise RuntimeError(INTERPRETER_PROBLEM)


# ----------------------------------------------------------------------------------------
# Launchers: the ops' implementations (under triton_op also what torch.compile traces)
# ----------------------------------------------------------------------------------------

def stats_(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
           num_batches_tracked: Optional[Tensor], momentum: float,
           cumulative: bool) -> tuple[Tensor, Tensor]:
    """Batch mean and biased variance of x (fp32 [C]); updates the running statistics (if
    given) and adds 1 to num_batches_tracked (if given), in place."""
    _check_device(x)
    g = geometry(x)
    f32 = dict(device=x.device, dtype=torch.float32)
    part = _empty((3, g.P, g.C), **f32)
    mean, var = _empty((g.C,), **f32), _empty((g.C,), **f32)
    update = running_mean is not None and running_var is not None
    count_batch = num_batches_tracked is not None
    nbt = num_batches_tracked if count_batch else part      # not read unless counting
    wrap_triton(fwd_stats_kernel)[g.reduce_grid](
        x, part, nbt, g.S, g.C, g.n_blocks,
        BLOCK_M=g.block_m, BLOCK_C=g.block_c, CHANNELS_LAST=g.channels_last,
        COUNT_BATCH=count_batch, num_warps=g.reduce_warps)
    wrap_triton(fwd_finalize_kernel)[g.merge_grid](
        part, mean, var, running_mean if update else mean, running_var if update else var,
        nbt, g.P, g.C, momentum, BLOCK_P=g.merge_block_p, BLOCK_C=g.merge_block_c,
        UPDATE_RUNNING=update, CUMULATIVE=cumulative)
    return mean, var


def apply(x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor,
          residual: Optional[Tensor], training: bool, eps: float, act: str) -> Tensor:
    """y = act((x - mean) / sqrt(var + eps) * weight + bias + residual), in x's layout, act
    one of ACTIVATIONS. (`training` only tells the backward whether mean/var are x's batch
    statistics.)"""
    _check_device(x)
    if x.numel() == 0:      # eval on an empty batch (training raised before getting here)
        return torch.empty_like(x)
    g = geometry(x)
    y = _empty(x)
    wrap_triton(fwd_apply_kernel)[g.tile_grid](
        x, residual if residual is not None else x, y, mean, var, weight, bias,
        g.S, g.C, eps, HAS_RES=residual is not None, ACT=ACTIVATIONS[act],
        BLOCK_M=g.block_m, BLOCK_C=g.block_c, CHANNELS_LAST=g.channels_last,
        num_warps=g.num_warps)
    return y


def backward(dy: Tensor, x: Tensor, aux: Optional[Tensor], weight: Tensor, bias: Tensor,
             mean: Tensor, var: Tensor, training: bool, eps: float, act: str,
             has_residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dx, dweight, dbias, and d_residual (= dy', only with an activation and a residual,
    else empty). `mean`/`var` are the batch statistics in training, the running ones in eval;
    `aux` is what the activation's gradient reads with a residual (`saved_for_backward`): the
    output y for ReLU, the residual for GELU; None otherwise."""
    _check_device(x)
    write_dres = act != "none" and has_residual
    if x.numel() == 0:
        dres = torch.empty_like(x) if write_dres else x.new_empty(0)
        return torch.empty_like(x), torch.zeros_like(weight), torch.zeros_like(bias), dres
    g = geometry(x)
    code = ACTIVATIONS[act]
    dres = _empty(x) if write_dres else x.new_empty(0)
    dx = _empty(x)
    part = _empty((2, g.P, g.C), device=x.device, dtype=torch.float32)
    wrap_triton(bwd_reduce_kernel)[g.reduce_grid](
        dy, x, aux if aux is not None else x, dres if write_dres else x, dx, mean, var, weight,
        bias, part, g.S, g.C, g.n_blocks, eps, ACT=code, HAS_RES=write_dres,
        WRITE_DX=not training, BLOCK_M=g.block_m, BLOCK_C=g.block_c, CHANNELS_LAST=g.channels_last,
        num_warps=g.reduce_warps)
    dweight, dbias = _empty(weight), _empty(bias)
    wrap_triton(bwd_finalize_kernel)[g.merge_grid](
        part, var, dweight, dbias, g.P, g.C, eps,
        BLOCK_P=g.merge_block_p, BLOCK_C=g.merge_block_c)
    if training:
        wrap_triton(bwd_dx_kernel)[g.tile_grid](
            dres if write_dres else dy, x, dx, mean, var, weight, bias, dweight, dbias,
            g.S, g.C, 1.0 / g.count, eps, ACT=ACTIVATIONS["none"] if write_dres else code,
            BLOCK_M=g.block_m, BLOCK_C=g.block_c, CHANNELS_LAST=g.channels_last,
            num_warps=g.num_warps)
    return dx, dweight, dbias, dres


# ----------------------------------------------------------------------------------------
# Torch ops (torch.compile traces them without graph breaks)
# ----------------------------------------------------------------------------------------

def _define(name: str, fn, mutates_args, fake):
    """A triton_op where the compiler can trace into the kernels, else an opaque custom op
    with `fake` as its shape function (a triton_op's fake is `fn` itself)."""
    if VISIBLE_TO_COMPILER:
        return torch.library.triton_op(name, fn, mutates_args=mutates_args)
    op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
    op.register_fake(fake)
    return op


def _stats_fake(x, running_mean, running_var, num_batches_tracked, momentum, cumulative):
    C = x.shape[1]
    return x.new_empty(C, dtype=torch.float32), x.new_empty(C, dtype=torch.float32)


def _apply_fake(x, weight, bias, mean, var, residual, training, eps, act):
    return torch.empty_like(x)


def _backward_fake(dy, x, aux, weight, bias, mean, var, training, eps, act, has_residual):
    dres = torch.empty_like(x) if act != "none" and has_residual else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias), dres


bn_stats_ = _define("fastcifar::bn_stats_", stats_,
                    ("running_mean", "running_var", "num_batches_tracked"), _stats_fake)
bn_relu_apply = _define("fastcifar::bn_relu_apply", apply, (), _apply_fake)
bn_relu_backward = _define("fastcifar::bn_relu_backward", backward, (), _backward_fake)


def _setup_context(ctx, inputs, output):
    x, weight, bias, mean, var, residual, training, eps, act = inputs
    ctx.training, ctx.eps, ctx.act = training, eps, act
    ctx.has_residual = residual is not None
    ctx.channels_last = x.is_contiguous(memory_format=torch.channels_last)
    # with a residual the activation's gradient reads y (ReLU) or the residual (GELU); see
    # bn_kernels' docstring
    aux = None
    if residual is not None and act == "relu":
        aux = output
    elif residual is not None and act == "gelu":
        aux = residual
    ctx.save_for_backward(x, weight, bias, mean, var, aux)


def _grads(ctx, dy, run_backward):
    """The gradients of (x, weight, bias, mean, var, residual, training, eps, act)."""
    x, weight, bias, mean, var, aux = ctx.saved_tensors
    fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
    if not dy.is_contiguous(memory_format=fmt):     # e.g. the expanded grad of a .sum()
        dy = dy.contiguous(memory_format=fmt)
    dx, dweight, dbias, dres = run_backward(
        dy, x, aux, weight, bias, mean, var, ctx.training, ctx.eps, ctx.act, ctx.has_residual)
    if ctx.has_residual and ctx.act == "none":
        dres = dy           # no activation: the residual's gradient is dy itself, no copy
    # mean/var get none: in training the formula already differentiates through them
    return (dx, dweight, dbias, None, None, dres if ctx.has_residual else None,
            None, None, None)


def _apply_backward(ctx, dy):
    return _grads(ctx, dy, torch.ops.fastcifar.bn_relu_backward)


bn_relu_apply.register_autograd(_apply_backward, setup_context=_setup_context)


class _EagerBNReLU(torch.autograd.Function):
    """bn_relu_apply and its formula for calls outside torch.compile: the same launchers and
    formula without the dispatcher, whose per-call Python for these ops (re-filling every
    argument's default, bumping version counters) costs more than the launches themselves."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, residual, training, eps, act):
        y = apply(x, weight, bias, mean, var, residual, training, eps, act)
        _setup_context(ctx, (x, weight, bias, mean, var, residual, training, eps, act), y)
        return y

    @staticmethod
    def backward(ctx, dy):
        with _direct_launches():
            return _grads(ctx, dy, backward)


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------

def _dense_like(t: Tensor, fmt) -> Tensor:
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def bn_relu(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Optional[Tensor],
            running_var: Optional[Tensor], training: bool, momentum: Optional[float] = 0.1,
            eps: float = 1e-5, residual: Optional[Tensor] = None, act: Optional[str] = "relu",
            num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """act(batch_norm(x) + residual), with autograd; residual optional, act "relu", "gelu"
    (exact, erf-based: nn.GELU()) or None.

    Same semantics as F.batch_norm(x, running_mean, running_var, weight, bias, training,
    momentum, eps) followed by the add and the activation: training normalizes with the batch
    statistics (biased variance) and updates the running statistics in place (unbiased
    variance); eval uses the running statistics. Given `num_batches_tracked`, training also
    adds 1 to it, as nn.BatchNorm2d does, and `momentum=None` then averages cumulatively
    (factor 1 / num_batches_tracked). x: [N, C, H, W] fp16/bf16/fp32, NCHW or channels-last
    (y comes back in the same format; other strides are copied first). Running stats,
    weight and bias are per-channel, fp32 even for fp16 x."""
    act_name = "none" if act is None else act
    if act_name not in ACTIVATIONS:
        raise ValueError(f"bn_relu: unknown activation {act!r}; choose relu, gelu or None")
    if x.dim() != 4:
        raise ValueError(f"bn_relu expects a 4-D [N, C, H, W] input, got shape {tuple(x.shape)}")
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and t.shape != (C,):
            raise ValueError(f"bn_relu: {name} must have shape ({C},), got {tuple(t.shape)}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("bn_relu: eval mode needs running_mean and running_var")
    if training and momentum is None and num_batches_tracked is None and running_mean is not None:
        raise ValueError("bn_relu: momentum=None (a cumulative average) needs num_batches_tracked")
    if training and x.numel() // max(C, 1) <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, "
                         f"got input size {list(x.shape)}")
    if x.numel() >= 2 ** 31:
        raise ValueError("bn_relu: tensors of 2**31 or more elements are not supported")
    # Kernels index dense tensors only. channels-last wins when both layouts fit (H=W=1);
    # any other strides are copied to the closer dense layout (one extra read+write of x).
    if x.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    elif x.is_contiguous():
        fmt = torch.contiguous_format
    else:
        fmt = torch.channels_last if x.stride(1) < x.stride(3) else torch.contiguous_format
        x = x.contiguous(memory_format=fmt)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"bn_relu: residual shape {tuple(residual.shape)} != input shape "
                             f"{tuple(x.shape)}")
        residual = _dense_like(residual.to(x.dtype), fmt)
    factor = 0.0 if momentum is None else float(momentum)
    if torch.compiler.is_compiling():   # the ops, which the compiler traces or keeps whole
        if training:
            mean, var = torch.ops.fastcifar.bn_stats_(
                x.detach(), running_mean, running_var, num_batches_tracked, factor,
                momentum is None)
        else:
            mean, var = running_mean, running_var
        return torch.ops.fastcifar.bn_relu_apply(x, weight, bias, mean, var, residual,
                                                 training, eps, act_name)
    with _direct_launches():
        if training:
            mean, var = stats_(x.detach(), running_mean, running_var, num_batches_tracked,
                               factor, momentum is None)
            # what the op's declared mutation would do: autograd then notices a graph that
            # saved these buffers (an eval-mode forward) being run backward after they changed
            for t in (running_mean, running_var, num_batches_tracked):
                if t is not None:
                    increment_version(t)
        else:
            mean, var = running_mean, running_var
        return _EagerBNReLU.apply(x, weight, bias, mean, var, residual, training, eps, act_name)
