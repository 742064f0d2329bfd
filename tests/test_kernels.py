"""Correctness of the fused BatchNorm(+add)+ReLU kernels (kernels/bn_kernels.py, launched by
kernels/batchnorm.py) on CPU, and what they cost the host: launches, dispatch, geometry.

The kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when no
GPU is present). Every case is compared with a float64 reference (kernels/reference.py) fed
the very same inputs upcast, so the only differences are the kernels' own errors:

* fp32 compute: all kernel arithmetic and accumulation is fp32; sums run over at most a few
  thousand elements here, so relative errors stay ~1e-6 (TOL["fp32"] = 2e-5 leaves margin).
* output rounding: an fp16/bf16 result is the fp32 value rounded to nearest, an error of at
  most half an ulp, i.e. 2^-11 (fp16) / 2^-8 (bf16) relative. The tolerance is one full ulp
  relative (2^-10, 2^-7) so that the fp32 error can push a value over a rounding boundary.
* cancellation: dx = w/std * (dy' - mean(dy') - xhat * mean(dy' xhat)) can be small where its
  terms are not, so the absolute tolerance scales with the largest |expected| (normwise).

Outputs are filled with NaN before each launch (POISON), so an element no kernel writes fails.
"""
from __future__ import annotations

import collections
import copy
import importlib.util
import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

import kernels.batchnorm as impl
import kernels.bn_kernels as K
from fastcifar.models.norm import NormAct
from kernels import bn_relu
from kernels.reference import bn_relu_reference
from op_log import OpLog

# CPU (interpreter) here; on a GPU machine the same tests run the compiled kernels.
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {"fp32": 2e-5, "fp16": 2.0 ** -10, "bf16": 2.0 ** -7}


@pytest.fixture(autouse=True)
def _poison(monkeypatch, no_tf32):
    assert impl.INTERPRET or torch.cuda.is_available(), "kernels must run, not be skipped"
    monkeypatch.setattr(impl, "POISON", True)
    monkeypatch.setattr(impl, "CONFIG_OVERRIDE", {})


def make_inputs(shape, dtype, channels_last, residual, seed):
    """Random activations with per-channel means far from zero (so E[x^2] - E[x]^2 would
    cancel) and spreads that differ per channel; affine params and running stats random."""
    g = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    loc = torch.empty(C).uniform_(-4, 8, generator=g).view(1, C, 1, 1)
    spread = torch.empty(C).uniform_(0.5, 2.0, generator=g).view(1, C, 1, 1)
    x = (torch.randn(shape, generator=g) * spread + loc).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype) if residual else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        r = r.contiguous(memory_format=torch.channels_last) if residual else None
    w = torch.empty(C).uniform_(0.5, 1.5, generator=g) * torch.where(
        torch.rand(C, generator=g) < 0.2, -1.0, 1.0)   # some negative scales
    b = torch.randn(C, generator=g) * 0.5
    rm = torch.randn(C, generator=g)
    rv = torch.empty(C).uniform_(0.5, 2.0, generator=g)
    dy = torch.randn(shape, generator=g).to(dtype)
    if channels_last:
        dy = dy.contiguous(memory_format=torch.channels_last)
    return tuple(t.to(DEV) if t is not None else None for t in (x, w, b, rm, rv, r, dy))


def close(actual, expected, tol, what):
    """|a - e| <= tol * (|e| + max|e|): relative per element plus a normwise floor."""
    expected = expected.detach().double()
    atol = tol * max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual.detach().double(), expected, rtol=tol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def check_case(shape, dtype_name, channels_last, training, act, residual, seed):
    dtype = DTYPES[dtype_name]
    x, w, b, rm, rv, r, dy = make_inputs(shape, dtype, channels_last, residual, seed)
    # kernels
    xk = x.clone().requires_grad_()
    wk, bk = w.clone().requires_grad_(), b.clone().requires_grad_()
    rk = r.clone().requires_grad_() if residual else None
    rmk, rvk = rm.clone(), rv.clone()
    y = bn_relu(xk, wk, bk, rmk, rvk, training, 0.1, 1e-5, residual=rk, act=act)
    y.backward(dy)
    # float64 reference on the same values
    xr = x.double().requires_grad_()
    wr, br = w.double().requires_grad_(), b.double().requires_grad_()
    rr = r.double().requires_grad_() if residual else None
    rmr, rvr = rm.double(), rv.double()
    yr = bn_relu_reference(xr, wr, br, rmr, rvr, training, 0.1, 1e-5, residual=rr, act=act)
    yr.backward(dy.double())

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    assert xk.grad.dtype == dtype and xk.grad.is_contiguous(memory_format=fmt)
    tol = TOL[dtype_name]
    close(y, yr, tol, "y")
    close(xk.grad, xr.grad, tol, "dx")
    # dweight/dbias are fp32 sums of products of the same (rounded) inputs: fp32 accuracy
    close(wk.grad, wr.grad, 1e-4, "dweight")
    close(bk.grad, br.grad, 1e-4, "dbias")
    if residual:
        assert rk.grad.dtype == dtype
        close(rk.grad, rr.grad, tol, "dresidual")
    close(rmk, rmr, 1e-5, "running_mean")
    close(rvk, rvr, 1e-5, "running_var")
    if not training:
        assert torch.equal(rmk, rm) and torch.equal(rvk, rv)


SHAPES = [(2, 3, 7, 7), (1, 66, 8, 8), (3, 132, 2, 2), (2, 264, 1, 1), (1, 7, 32, 32),
          (3, 1, 4, 4), (2, 17, 3, 5), (4, 64, 8, 8), (5, 5, 2, 2), (2, 9, 7, 7)]
COMBOS = list(itertools.product(DTYPES, (True, False), (True, False), ("relu", None),
                                (True, False)))
# GELU: every dtype x layout x residual in training, eval in fp16 channels-last (the eval code
# path is the activation's; on a GPU each combination is one more set of kernel compilations)
COMBOS += [c for c in itertools.product(DTYPES, (True, False), (True, False), ("gelu",),
                                        (True, False)) if c[2] or (c[0] == "fp16" and c[1])]


@pytest.mark.parametrize("i", range(len(COMBOS)),
                         ids=["{}-{}-{}-{}-{}".format(d, "cl" if cl else "nchw",
                                                      "train" if t else "eval", a or "noact",
                                                      "res" if s else "nores")
                              for d, cl, t, a, s in COMBOS])
def test_matches_float64_reference(i):
    """Every dtype x layout x mode x activation x residual combination, each on another shape."""
    dtype, cl, training, act, residual = COMBOS[i]
    check_case(SHAPES[i % len(SHAPES)], dtype, cl, training, act, residual, seed=i)


@pytest.mark.parametrize("shape,cl,dtype,training,residual", [
    ((3, 66, 7, 7), True, "fp16", True, True),
    ((3, 66, 7, 7), False, "bf16", True, False),
    ((2, 37, 5, 5), True, "fp32", False, True),
    ((2, 37, 5, 5), False, "fp32", True, True),
])
def test_small_blocks(monkeypatch, shape, cl, dtype, training, residual):
    """Tiny blocks force what real sizes do on a GPU: several channel blocks per row (also
    channels-last), several programs each merging several row blocks, ragged last blocks."""
    monkeypatch.setattr(impl, "CONFIG_OVERRIDE", {"block_m": 4, "block_c": 16, "programs": 20})
    x = torch.empty(shape)
    geo = impl.geometry(x.contiguous(memory_format=torch.channels_last) if cl else x)
    assert geo.c_blocks > 1 and geo.P > 1 and geo.blocks_per_prog > 1
    check_case(shape, dtype, cl, training, "relu", residual, seed=100)
    check_case(shape, dtype, cl, training, "gelu", residual, seed=101)


@pytest.mark.parametrize("override", [{}, {"block_m": 16, "programs": 2}],
                         ids=["one-block", "32-blocks-per-program"])
def test_statistics_survive_cancellation(monkeypatch, override):
    """fp32 activations with mean 1000 and std 0.05: sum(x^2)/n - mean^2 in fp32 loses the
    variance entirely, the blockwise mean/M2 merge must not: neither the merge across
    programs and lanes nor each lane's running update over many row blocks."""
    monkeypatch.setattr(impl, "CONFIG_OVERRIDE", override)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 3, 16, 16, generator=g) * 0.05 + 1000.0)
    x = x.contiguous(memory_format=torch.channels_last).to(DEV)
    if override:
        assert impl.geometry(x).blocks_per_prog == 32
    C = x.shape[1]
    rm, rv = torch.zeros(C, device=DEV), torch.ones(C, device=DEV)
    bn_relu(x, torch.ones(C, device=DEV), torch.zeros(C, device=DEV), rm, rv, True, momentum=1.0)
    n = x.numel() // C
    true_var = x.double().var(dim=(0, 2, 3), unbiased=True)
    naive = ((x * x).mean(dim=(0, 2, 3)) - x.mean(dim=(0, 2, 3)) ** 2).double() * n / (n - 1)
    assert ((naive - true_var).abs() / true_var).max() > 0.1   # the trap is real
    torch.testing.assert_close(rv.double(), true_var, rtol=1e-3, atol=0)


def test_module_matches_batchnorm2d_relu():
    """NormAct on the triton backend against nn.Sequential(nn.BatchNorm2d, nn.ReLU): outputs, gradients,
    running stats and num_batches_tracked over training steps, then eval. Also a loss
    whose gradient is not dense (sum over all elements gives an expanded dy)."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.BatchNorm2d(6), nn.ReLU())
    with torch.no_grad():
        ref[0].weight.uniform_(0.5, 1.5)
        ref[0].bias.uniform_(-0.5, 0.5)
    mod = NormAct(6, backend="triton")
    ref.to(DEV), mod.to(DEV)
    mod.load_state_dict({k.removeprefix("0."): v for k, v in ref.state_dict().items()})
    for step in range(2):
        x = (torch.randn(3, 6, 5, 5, device=DEV) * 2 + 1).contiguous(
            memory_format=torch.channels_last)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref(xa), mod(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
        # step 1: sum() hands backward an expanded (stride-0) dy
        loss = (lambda y: (y * y).sum()) if step == 0 else (lambda y: y.sum())
        loss(ya).backward()
        loss(yb).backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mod.weight.grad, ref[0].weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mod.bias.grad, ref[0].bias.grad, rtol=1e-4, atol=1e-4)
        mod.zero_grad(), ref.zero_grad()
    torch.testing.assert_close(mod.running_mean, ref[0].running_mean)
    torch.testing.assert_close(mod.running_var, ref[0].running_var)
    assert mod.num_batches_tracked.item() == ref[0].num_batches_tracked.item() == 2
    ref.eval(), mod.eval()
    x = torch.randn(2, 6, 3, 3, device=DEV)
    torch.testing.assert_close(mod(x), ref(x), rtol=1e-5, atol=1e-5)
    assert mod.num_batches_tracked.item() == 2


def test_module_cumulative_momentum():
    """momentum=None: cumulative average of the batch statistics, as nn.BatchNorm2d."""
    torch.manual_seed(1)
    ref = nn.BatchNorm2d(4, momentum=None).to(DEV)
    mod = NormAct(4, act=None, momentum=None, backend="triton").to(DEV)
    for _ in range(3):
        x = torch.randn(2, 4, 3, 3, device=DEV) * 3 + 2
        torch.testing.assert_close(mod(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.running_var, ref.running_var)
    torch.testing.assert_close(mod.running_mean, ref.running_mean)
    assert mod.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3


def test_state_dict_interop():
    """Keys and shapes equal nn.BatchNorm2d's; nn.Sequential(BatchNorm2d, ReLU) keys are the
    same with a "0." prefix, and strict loading works both ways."""
    seq = nn.Sequential(nn.BatchNorm2d(5), nn.ReLU())
    mod = NormAct(5, backend="triton")
    with torch.no_grad():
        for t in (seq[0].weight, seq[0].bias, seq[0].running_mean):
            t.normal_()
        seq[0].running_var.uniform_(0.5, 2)
        seq[0].num_batches_tracked.fill_(7)
    sd = seq.state_dict()
    assert sorted(sd) == sorted("0." + k for k in mod.state_dict())
    assert {k: v.shape for k, v in mod.state_dict().items()} == \
        {k: v.shape for k, v in nn.BatchNorm2d(5).state_dict().items()}
    mod.load_state_dict({k.removeprefix("0."): v for k, v in sd.items()}, strict=True)
    for k, v in mod.state_dict().items():
        assert torch.equal(v, sd["0." + k])
    back = nn.Sequential(nn.BatchNorm2d(5), nn.ReLU())
    back.load_state_dict({"0." + k: v for k, v in mod.state_dict().items()}, strict=True)
    seq.eval().to(DEV), mod.eval().to(DEV), back.eval().to(DEV)
    x = torch.randn(2, 5, 4, 4, device=DEV)
    torch.testing.assert_close(mod(x), seq(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back(x), seq(x))


def test_strided_input_and_mixed_residual():
    """A non-dense input (a slice) is copied to a dense layout; an fp32 residual with an fp16
    input is cast, and its gradient comes back in fp32."""
    g = torch.Generator().manual_seed(3)
    big = torch.randn(3, 8, 6, 6, generator=g).to(DEV) + 2
    x = big[:, 2:7].half().requires_grad_()            # 5 channels, not dense
    r = torch.randn(3, 5, 6, 6, generator=g).to(DEV).requires_grad_()
    w = torch.ones(5, device=DEV, requires_grad=True)
    b = torch.zeros(5, device=DEV, requires_grad=True)
    y = bn_relu(x, w, b, torch.zeros(5, device=DEV), torch.ones(5, device=DEV), True, residual=r)
    y.float().square().sum().backward()
    xr, rr = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    yr = bn_relu_reference(xr, w.detach().double(), b.detach().double(), None, None, True,
                           residual=rr)
    (yr.half().double() ** 2).sum().backward()
    close(y, yr, TOL["fp16"], "y")
    assert r.grad.dtype == torch.float32
    # the gradient flowing in is 2*y with y rounded to fp16, so compare at fp16 accuracy
    close(r.grad, rr.grad, 4 * TOL["fp16"], "dresidual")
    close(x.grad, xr.grad, 4 * TOL["fp16"], "dx")


def test_bad_inputs():
    def t(*shape, fill=None):
        if fill is None:
            return torch.randn(*shape, device=DEV)
        return torch.full(shape, fill, device=DEV)

    w, b, rm, rv = t(4, fill=1.0), t(4, fill=0.0), t(4, fill=0.0), t(4, fill=1.0)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn_relu(t(1, 4, 1, 1), w, b, rm, rv, True)
    with pytest.raises(ValueError, match="4-D"):
        bn_relu(t(2, 4, 3), w, b, rm, rv, True)
    with pytest.raises(ValueError, match="weight must have shape"):
        bn_relu(t(2, 4, 3, 3), t(3), b, rm, rv, True)
    with pytest.raises(ValueError, match="residual shape"):
        bn_relu(t(2, 4, 3, 3), w, b, rm, rv, True, residual=t(2, 4, 3, 2))
    with pytest.raises(ValueError, match="eval mode needs"):
        bn_relu(t(2, 4, 3, 3), w, b, None, None, False)
    # eval with a single value per channel is fine, as in torch
    y = bn_relu(t(1, 4, 1, 1), w, b, rm, rv, False)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("triton_v, numpy_v, refused", [
    ("3.6.0", "2.5.2", True), ("3.6.0", "2.4.0", True),          # the interpreter's int(array)
    ("3.6.0", "2.3.5", False), ("3.7.0", "2.5.2", False), ("3.9.0", "2.4.6", False),
    ("3.6.0+git1a2b3c", "2.4.0rc1", True)])
def test_interpreter_version_check(triton_v, numpy_v, refused):
    problem = impl.interpreter_problem(triton_v, numpy_v)
    assert (problem is not None) == refused
    if refused:
        assert triton_v in problem and numpy_v in problem and "\n" not in problem


@pytest.mark.skipif(not impl.INTERPRET, reason="the check guards interpreter runs only")
def test_interpreter_problem_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(impl, "INTERPRETER_PROBLEM", "Triton 3.6.0's interpreter ...")
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="Triton 3.6.0's interpreter"):
        bn_relu(x, torch.ones(4), torch.zeros(4), torch.zeros(4), torch.ones(4), True)


def test_torch_compile_fullgraph():
    """A small residual network built on NormAct (triton backend) compiles with fullgraph=True (no
    graph breaks: the custom ops have fake impls, the running-stats mutation is declared) and
    matches eager in outputs, gradients and running statistics."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
            self.bn1 = NormAct(6, backend="triton")
            self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
            self.bn2 = NormAct(6, backend="triton")

        def forward(self, x):
            h = self.bn1(self.conv1(x))
            return self.bn2(self.conv2(h), residual=h).mean(dim=(2, 3))

    torch.manual_seed(0)
    eager = Net().to(DEV, memory_format=torch.channels_last)
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net, fullgraph=True)
    x = torch.randn(4, 3, 8, 8, device=DEV).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        out_e, out_c = eager(x), compiled(x)
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
        out_e.square().sum().backward()
        out_c.square().sum().backward()
    for (name, p), (_, q) in zip(eager.named_parameters(), compiled_net.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, p), (_, q) in zip(eager.named_buffers(), compiled_net.named_buffers()):
        torch.testing.assert_close(q, p, msg=name)
    assert compiled_net.bn1.num_batches_tracked.item() == 2
    eager.eval(), compiled.eval()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Host-side cost: launches, dispatch, cached geometry

KERNELS = ("fwd_stats_kernel", "fwd_finalize_kernel", "fwd_apply_kernel", "bwd_reduce_kernel",
           "bwd_finalize_kernel", "bwd_dx_kernel")


def _count_launches(monkeypatch) -> collections.Counter:
    """Counts each kernel's launches (`kernel[grid](...)` calls `kernel.run`) and still runs
    them. Patched on the class: an instance attribute, once "restored", would shadow later
    patches of the class."""
    counts = collections.Counter()
    cls = type(K.fwd_stats_kernel)      # InterpretedFunction, or JITFunction on a GPU
    original = cls.run

    def run(self, *args, **kwargs):
        counts[self.fn.__name__] += 1
        with _disable_current_modes():      # the interpreter's own tensor traffic
            return original(self, *args, **kwargs)
    monkeypatch.setattr(cls, "run", run)
    return counts


def test_launches_per_step(monkeypatch):
    """One training step of a layer launches three kernels forward (statistics; finalize,
    which also moves the running statistics; apply) and three backward (reduce, finalize, dx);
    the batch count and the running statistics cost no launch of their own. Eval's forward is
    the apply kernel alone."""
    counts = _count_launches(monkeypatch)
    mod = NormAct(8, backend="triton").to(DEV)
    x = torch.randn(2, 8, 4, 4, device=DEV, requires_grad=True)
    with OpLog() as log:
        y = mod(x)
    assert dict(counts) == {"fwd_stats_kernel": 1, "fwd_finalize_kernel": 1, "fwd_apply_kernel": 1}
    # besides the kernels only allocations: no num_batches_tracked.add_, no running-stats op
    assert set(log.ops) <= {"aten.detach.default", "aten.empty.memory_format",
                            "aten.empty_like.default", "aten.fill_.Scalar"}, log.ops
    assert mod.num_batches_tracked.item() == 1
    y.backward(torch.randn_like(y))
    assert dict(counts) == {name: 1 for name in KERNELS}
    counts.clear()
    mod.eval()
    with torch.no_grad():
        mod(x)
    assert dict(counts) == {"fwd_apply_kernel": 1}
    assert mod.num_batches_tracked.item() == 1


def test_reduction_geometry_fills_an_h100_at_every_zoo_shape(monkeypatch):
    """At batch 512, channels-last, on a 132-SM GPU: every zoo shape's reduction passes run at
    least ~2 programs per SM (the small maps of the last stages once got 64) unless each
    program is already down to 64 rows (the floor), and their partials stay under
    10% of the bytes the pass reads (fp16)."""
    bench = _load_bench("bench_bn_relu")
    shapes, _ = bench.zoo_shapes()
    monkeypatch.setattr(impl, "_sm_count", lambda index: 132)
    impl._geometry.cache_clear()
    try:
        for C, H, W, _, _ in shapes:
            g = impl._geometry(512, C, H, W, True, torch.device("cuda", 0), ())
            assert (g.P * g.c_blocks >= 256
                    or g.blocks_per_prog * g.block_m <= 64), (C, H, W, g)
            assert 3 * g.P * g.C * 4 <= 0.1 * 512 * C * H * W * 2, (C, H, W, g)
    finally:
        impl._geometry.cache_clear()


def test_eager_launches_bypass_the_wrapper_op(monkeypatch):
    """Outside torch.compile every launch, forward and backward, goes straight to its kernel:
    with torch's wrap_triton switched on (its default), each launch would go through the
    triton_kernel_wrapper higher-order op, ~0.5 ms of host time apiece on a GPU. The switch is
    back on afterwards (it is thread-local state the caller owns)."""
    from torch._library.triton import is_wrap_triton_enabled
    assert is_wrap_triton_enabled()
    seen = []
    cls = type(K.fwd_stats_kernel)
    original = cls.run

    def run(self, *args, **kwargs):
        seen.append((self.fn.__name__, is_wrap_triton_enabled()))
        with _disable_current_modes():
            return original(self, *args, **kwargs)
    monkeypatch.setattr(cls, "run", run)
    for act, res in (("relu", True), ("gelu", False)):
        x = torch.randn(4, 8, 3, 3, device=DEV, requires_grad=True)
        r = torch.randn_like(x, requires_grad=True) if res else None
        w, b = torch.rand(8, device=DEV, requires_grad=True), torch.randn(8, device=DEV)
        rm, rv = torch.zeros(8, device=DEV), torch.ones(8, device=DEV)
        bn_relu(x, w, b, rm, rv, True, residual=r, act=act).sum().backward()
        with torch.no_grad():
            bn_relu(x, w, b, rm, rv, False, act=act)
    assert {name for name, _ in seen} == set(KERNELS)
    assert [name for name, enabled in seen if enabled] == []
    assert is_wrap_triton_enabled()


def test_geometry_is_cached(monkeypatch):
    """Launch geometry is computed once per (shape, layout, device, overrides): a second
    training step derives nothing."""
    impl._geometry.cache_clear()
    x = torch.randn(2, 8, 4, 4, device=DEV, requires_grad=True)
    mod = NormAct(8, backend="triton").to(DEV)
    mod(x).sum().backward()
    misses = impl._geometry.cache_info().misses
    assert misses == 1
    mod(x).sum().backward()
    assert impl._geometry.cache_info().misses == misses
    assert impl.geometry(x) is impl.geometry(x.detach().clone())
    cl = impl.geometry(x.detach().contiguous(memory_format=torch.channels_last))
    assert cl.channels_last and not impl.geometry(x).channels_last
    monkeypatch.setattr(impl, "CONFIG_OVERRIDE", {"block_m": 4})
    assert impl.geometry(x).block_m == 4


def test_bookkeeping_over_several_blocks(monkeypatch):
    """Several channel blocks and programs per block: num_batches_tracked still grows by one
    per step (one program adds it), and momentum=None's cumulative average, which reads it,
    matches nn.BatchNorm2d."""
    monkeypatch.setattr(impl, "CONFIG_OVERRIDE", {"block_m": 4, "block_c": 16, "programs": 20})
    torch.manual_seed(2)
    ref = nn.BatchNorm2d(37, momentum=None).to(DEV)
    mod = NormAct(37, act=None, momentum=None, backend="triton").to(DEV)
    geo = impl.geometry(torch.empty(2, 37, 5, 5, device=DEV))
    assert geo.c_blocks > 1 and geo.P > 1
    for step in range(3):
        x = torch.randn(2, 37, 5, 5, device=DEV) * (step + 1) + step
        torch.testing.assert_close(mod(x), ref(x), rtol=1e-5, atol=1e-5)
        assert mod.num_batches_tracked.item() == step + 1
    torch.testing.assert_close(mod.running_mean, ref.running_mean)
    torch.testing.assert_close(mod.running_var, ref.running_var)


def test_cumulative_average_needs_the_batch_count():
    x = torch.randn(2, 4, 3, 3, device=DEV)
    w, b = torch.ones(4, device=DEV), torch.zeros(4, device=DEV)
    rm, rv = torch.zeros(4, device=DEV), torch.ones(4, device=DEV)
    with pytest.raises(ValueError, match="needs num_batches_tracked"):
        bn_relu(x, w, b, rm, rv, True, momentum=None)


def test_ops_are_opaque_under_the_interpreter():
    """Interpreted kernels cannot be traced (they read tensor data), so on the CPU the ops
    are opaque custom ops; with compiled kernels on torch >= 2.6 they are triton_ops
    (tests/test_kernels_compile.py checks what the compiler sees there)."""
    if impl.INTERPRET:
        assert not impl.VISIBLE_TO_COMPILER
    else:
        assert impl.VISIBLE_TO_COMPILER == hasattr(torch.library, "triton_op")


def test_eval_graph_notices_changed_running_statistics():
    """An eval-mode forward saves the running statistics for its backward; a training step
    in between changes them in place, and the kernels say so to autograd (as the ops'
    declared mutations do under torch.compile), so that backward fails instead of silently
    differentiating with the new values (which nn.BatchNorm2d does)."""
    mod = NormAct(4, act=None, backend="triton").to(DEV).eval()
    x = torch.randn(2, 4, 3, 3, device=DEV, requires_grad=True)
    y = mod(x)
    mod.train()
    mod(torch.randn(2, 4, 3, 3, device=DEV))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("training,residual,act", [(True, True, "relu"), (False, False, "relu"),
                                                   (True, True, "gelu"), (True, False, "none")])
def test_opcheck(training, residual, act):
    """The ops' registrations (schema and declared mutations, fake functions, autograd
    formula) pass torch.library.opcheck: what torch.compile relies on."""
    x, w, b, rm, rv, r, dy = make_inputs((2, 5, 3, 3), torch.float32, True, residual, seed=7)
    nbt = torch.zeros((), dtype=torch.long, device=DEV)
    if training:
        torch.library.opcheck(torch.ops.fastcifar.bn_stats_.default,
                              (x, rm, rv, nbt, 0.1, False))
        mean, var = impl.stats_(x, None, None, None, 0.1, False)
    else:
        mean, var = rm, rv
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    torch.library.opcheck(torch.ops.fastcifar.bn_relu_apply.default,
                          (x, w, b, mean, var, r, training, 1e-5, act))


# ---------------------------------------------------------------------------------------------
# The benchmark (bench/bench_bn_relu.py) on the CPU


def _load_bench(name):
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_bn_relu_keeps_going_and_writes_as_it_goes(monkeypatch, tmp_path):
    """--dry-run: a shape where one implementation fails gets the error in its row and the
    run goes on; the result file is rewritten after every shape (incomplete until the end)."""
    bench = _load_bench("bench_bn_relu")
    monkeypatch.setattr(bench.torch, "compile", lambda fn, **kw: fn)   # no inductor here
    fused = bench.fused_bn_act

    def failing_for_c128(x, *args):
        if x.shape[1] == 128:
            raise RuntimeError("out of resources")
        return fused(x, *args)
    monkeypatch.setattr(bench, "fused_bn_act", failing_for_c128)
    written = []
    write = bench.write_result

    def record(path, result):
        written.append((len(result["shapes"]), result["complete"]))
        return write(path, result)
    monkeypatch.setattr(bench, "write_result", record)
    out = tmp_path / "bn.json"
    bench.main(["--dry-run", "--skip-train-step", "--models", "resnet_2111", "--out", str(out)])
    stored = json.loads(out.read_text())
    assert stored["complete"] and stored["dry_run"]
    assert stored["copy_GBps"] > 0 and stored["matmul_TFLOPs"] > 0 and stored["machine"]["versions"]["torch"]
    rows = stored["shapes"]
    failed = [r for r in rows if r["C"] == 128]
    assert failed and all(r["fused_error"] == "RuntimeError: out of resources" and "fused_ms" not in r
                          and "eager_ms" in r for r in failed)
    assert all("fused_ms" in r for r in rows if r["C"] != 128)
    # one write before the first shape, one after each, one at the end
    assert written == [(0, False)] + [(i + 1, False) for i in range(len(rows))] + [(len(rows), True)]
    assert str(len(rows) - len(failed)) in stored["summary"]["covers"]
    # kernel time needs the CUDA profiler: on the CPU it is absent, not made up
    assert not any(k.endswith("kernel_ms") for r in rows for k in r)
    assert "zoo_weighted_kernel_ms" not in stored["summary"]


def test_bench_bn_relu_summary_of_kernel_time():
    """The zoo-weighted kernel times, their ratios and the bandwidth share follow the rows'
    layer counts, and are left out unless every implementation has kernel time on every
    shape timed."""
    bench = _load_bench("bench_bn_relu")
    impls = {"fused": None, "eager": None, "compiled": None}
    rows = [{"count": 3, "min_bytes": 3e9, "fused_ms": 9.0, "eager_ms": 6.0, "compiled_ms": 3.0,
             "fused_kernel_ms": 1.0, "eager_kernel_ms": 2.0, "compiled_kernel_ms": 1.5},
            {"count": 1, "min_bytes": 1e9, "fused_ms": 3.0, "eager_ms": 2.0, "compiled_ms": 1.0,
             "fused_kernel_ms": 2.0, "eager_kernel_ms": 2.0, "compiled_kernel_ms": 2.5}]
    s = bench.summarize(rows, impls, copy_gbps=4000.0, n_shapes=2, n_layers=4)
    assert s["zoo_weighted_kernel_ms"] == {"fused": 5.0, "eager": 8.0, "compiled": 7.0}
    assert s["kernel_speedup_vs_eager"] == pytest.approx(1.6)
    assert s["kernel_speedup_vs_compiled"] == pytest.approx(1.4)
    # 10 GB in 5 ms = 2000 GB/s, half of 4000
    assert s["fused_kernel_GBps_weighted"] == pytest.approx(2000.0)
    assert s["fused_kernel_frac_of_copy_bw"] == pytest.approx(0.5)
    assert s["speedup_vs_compiled"] == pytest.approx(10 / 30)
    del rows[1]["eager_kernel_ms"]
    assert "zoo_weighted_kernel_ms" not in bench.summarize(rows, impls, 4000.0, 2, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the host-time benchmark stubs interpreted launches")
def test_bench_bn_host_quick(tmp_path):
    """bench_bn_host.py --quick runs, counts the launches the test above counts, and leaves
    the interpreter's launcher and torch's thread count as it found them."""
    from triton.runtime.interpreter import InterpretedFunction

    bench = _load_bench("bench_bn_host")
    run, threads = InterpretedFunction.run, torch.get_num_threads()
    out = tmp_path / "host.json"
    bench.main(["--quick", "--no-compile", "--out", str(out)])
    assert InterpretedFunction.run is run and torch.get_num_threads() == threads
    stored = json.loads(out.read_text())
    configs = stored["configs"]
    assert configs["triton/eager"]["launches_per_layer_step"] == 6
    assert configs["eager/eager"]["launches_per_layer_step"] == 0
    assert configs["triton/eager"]["host_us_per_layer_step"]["n"] == 3
    assert stored["machine"]["versions"]["torch"] and "load_average_at_start" in stored
