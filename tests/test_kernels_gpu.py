"""The fused kernels at production sizes on a GPU: every BatchNorm shape of speedrun_net and
resnet_2111 at batch 512, fp16 channels-last, with and without the residual, ReLU and GELU,
against a float64 reference and against cuDNN.

At 512x64x32x32 each channel's statistics reduce 524,288 values, which the small CPU shapes
of tests/test_kernels.py never reach. The check is normwise, and measured against cuDNN's own
error: with tens of millions of elements some pre-activations z lie within rounding distance
of 0, and there the ReLU mask of any fp16 implementation may differ from the exact one (cuDNN
rounds bn(x) to fp16 before adding the residual, so its mask differs more often). An element
whose mask flips changes dx by a whole w/std * dy, so an elementwise test would fail on every
correct implementation; the relative error over the whole tensor does not hide a real bug
(a wrong term moves it by orders of magnitude).

For each case and each of y, dx, d_residual, dweight, dbias:
    err(impl) = ||impl - ref|| / ||ref||,   ref = float64 on the same fp16 inputs, exact mask
    require err(fused) <= max(2 * err(cuDNN), TOL)       TOL = one fp16 ulp (2^-10)
and the running statistics within 1e-4 of the reference.

With FASTCIFAR_KERNEL_ERRORS=FILE set (bench/gpu_suite.sh does), every case's errors are
written to FILE as JSON, with the device and versions, rewritten after each case.

Skipped without CUDA; `test_the_check_itself_on_the_cpu` runs the same code on a small shape in
the Triton interpreter (the CPU's native batch_norm standing in for cuDNN), so CI checks the
check.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from fastcifar.models.norm import bn_act
from kernels import bn_relu
from kernels.reference import bn_relu_reference
from test_kernels import DEV, make_inputs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# every case appends to one results file: with --shard (tests/conftest.py) they share a process
pytestmark = pytest.mark.one_shard

BATCH = 512
TOL = 2.0 ** -10
# (C, H, W, residual) of speedrun_net (whitening stem: maps of 31, 15, 7, 3) and resnet_2111
SHAPES = [(24, 31, 31, False), (64, 15, 15, False), (64, 15, 15, True), (256, 7, 7, True),
          (256, 3, 3, True), (64, 32, 32, False), (64, 32, 32, True), (128, 16, 16, True),
          (256, 8, 8, True), (512, 4, 4, True)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


RECORD: list = []      # one entry per compared case, each written out by _save_errors


def _save_errors():
    """Rewrite $FASTCIFAR_KERNEL_ERRORS (atomically) after each case, so a session cut short
    by a time limit keeps every case it finished."""
    path = os.environ.get("FASTCIFAR_KERNEL_ERRORS")
    if path and RECORD:
        from fastcifar.machine import device_name, versions
        from fastcifar.results import write_result
        write_result(path, {"what": "relative errors (norm of the difference / norm of the float64 "
                                    "reference) of the fused kernels and of the native implementation "
                                    "(cuDNN on a GPU), tests/test_kernels_gpu.py",
                            "device": device_name(DEV), "versions": versions(), "cases": list(RECORD)})


@pytest.fixture(autouse=True)
def _poison(monkeypatch, no_tf32):
    import kernels.batchnorm as impl
    monkeypatch.setattr(impl, "POISON", True)
    monkeypatch.setattr(impl, "CONFIG_OVERRIDE", {})


def _native(x, w, b, rm, rv, r, act):
    """What the eager backend runs: cuDNN's batch norm on a GPU, then the add and activation."""
    return bn_act(x, w, b, rm, rv, True, 0.1, 1e-5, residual=r, act=act)


def _fused(x, w, b, rm, rv, r, act):
    return bn_relu(x, w, b, rm, rv, True, 0.1, 1e-5, residual=r, act=act)


def _reference(x, w, b, rm, rv, r, act):
    return bn_relu_reference(x, w, b, rm, rv, True, 0.1, 1e-5, residual=r, act=act)


def _run(fn, inputs, dtype, act):
    """Forward + backward of fn on inputs cast to dtype (weights fp32, or fp64 with dtype):
    y, the gradients and the running statistics, all as float64."""
    x, w, b, rm, rv, r, dy = inputs
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    xi = x.to(dtype, copy=True).requires_grad_()      # copies: each run its own leaves
    wi, bi = (t.to(param_dtype, copy=True).requires_grad_() for t in (w, b))
    ri = r.to(dtype, copy=True).requires_grad_() if r is not None else None
    rmi, rvi = (t.to(param_dtype, copy=True) for t in (rm, rv))
    y = fn(xi, wi, bi, rmi, rvi, ri, act)
    y.backward(dy.to(dtype))
    out = dict(y=y, dx=xi.grad, dweight=wi.grad, dbias=bi.grad, running_mean=rmi, running_var=rvi)
    if r is not None:
        out["dresidual"] = ri.grad
    return {k: v.detach().double() for k, v in out.items()}


def compare(shape, dtype_name, channels_last, act, residual, seed=0, fused=_fused) -> dict:
    """Relative errors {name: (fused, native)} against float64; asserts the fused ones are
    within max(2x native, TOL) (the running statistics within 1e-4)."""
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(shape, dtype, channels_last, residual, seed)   # values exact in dtype
    ref = _run(_reference, inputs, torch.float64, act)
    outs = _run(fused, inputs, dtype, act), _run(_native, inputs, dtype, act)
    errors = {k: tuple(((o[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)).item() for o in outs)
              for k in ref}
    bounds = {k: 1e-4 if k.startswith("running") else max(2 * n, TOL) for k, (f, n) in errors.items()}
    RECORD.append({"shape": list(shape), "dtype": dtype_name, "channels_last": channels_last, "act": act,
                   "residual": residual, "fused": fused.__name__,
                   "errors": {k: {"fused": f, "native": n, "bound": bounds[k], "ok": f <= bounds[k]}
                              for k, (f, n) in errors.items()}})
    _save_errors()
    for k, (e_fused, e_native) in errors.items():
        assert e_fused <= bounds[k], f"{k}: fused error {e_fused:.2e} > {bounds[k]:.2e} (native {e_native:.2e})"
    return errors


@needs_cuda
@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}-{'res' if s[3] else 'nores'}")
def test_production_shape(shape, act):
    C, H, W, residual = shape
    compare((BATCH, C, H, W), "fp16", True, act, residual, seed=C + H)


@needs_cuda
@pytest.mark.parametrize("dtype,channels_last", [("bf16", True), ("fp16", False)])
def test_largest_shape_bf16_and_nchw(dtype, channels_last):
    compare((BATCH, 64, 32, 32), dtype, channels_last, "relu", True, seed=5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real thing above")
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_the_check_itself_on_the_cpu(act, tmp_path, monkeypatch):
    """The comparison runs and passes on a small shape in the interpreter, writes the case to
    $FASTCIFAR_KERNEL_ERRORS at once, and fails when the fused gradient is wrong (d_residual
    scaled by 1.01 here)."""
    assert DEV.type == "cpu"
    out = tmp_path / "errors.json"
    monkeypatch.setenv("FASTCIFAR_KERNEL_ERRORS", str(out))
    errors = compare((8, 64, 8, 8), "fp16", True, act, True, seed=1)
    assert set(errors) == {"y", "dx", "dweight", "dbias", "running_mean", "running_var", "dresidual"}
    last = json.loads(out.read_text())["cases"][-1]
    assert (last["shape"], last["act"], last["residual"]) == ([8, 64, 8, 8], act, True)
    assert last["errors"]["dx"]["fused"] == errors["dx"][0] and last["errors"]["dx"]["ok"]

    class Scale(torch.autograd.Function):      # the residual's gradient 1% too large
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            return g * 1.01

    def broken(x, w, b, rm, rv, r, a):
        return _fused(x, w, b, rm, rv, Scale.apply(r), a)

    with pytest.raises(AssertionError, match="dresidual"):
        compare((8, 64, 8, 8), "fp16", True, act, True, seed=1, fused=broken)
