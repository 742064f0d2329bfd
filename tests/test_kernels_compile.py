"""The kernels compile with Triton's real GPU compiler (sm_90 cubin), and torch.compile sees
them inside the ops, no GPU needed.

The interpreter that runs the correctness tests on CPU executes kernels with numpy and
accepts code the compiler would reject (types, layouts, loop-carried values). This compiles
every kernel ahead of time, for each layout and constexpr variant the launchers use (fp16;
bf16 and fp32 for the dtype conversions),
in a subprocess without TRITON_INTERPRET (the kernels are decorated for the interpreter in
this process). Skips where triton has no CUDA backend (e.g. a CPU-only triton build).

The second test traces a small network through torch.compile with the kernels compiled (not
interpreted), as on a GPU machine, and checks that the graphs the compiler backend receives
launch the Triton kernels themselves, with no opaque custom-op call left: what inductor gets
to generate its launch code from.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(r'''
    import itertools, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import kernels.bn_kernels as K

    ACT = {"x_ptr", "y_ptr", "res_ptr", "aux_ptr", "dy_ptr", "dx_ptr", "dres_ptr"}  # activation dtype
    FLOATS = {"eps", "momentum", "inv_count"}

    def signature(fn, act):
        sig = {}
        for name, p in zip(fn.arg_names, fn.params):
            if p.is_constexpr:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = act if name in ACT else "*i64" if name == "nbt_ptr" else "*fp32"
            else:
                sig[name] = "fp32" if name in FLOATS else "i32"
        return sig

    def compile_(fn, act="*fp16", **constexprs):
        # pointers 16-byte aligned and sizes multiples of 16, as torch allocations give
        attrs = {(i,): [["tt.divisibility", 16]]
                 for i, (n, p) in enumerate(zip(fn.arg_names, fn.params))
                 if not p.is_constexpr and n.endswith("_ptr")}
        src = ASTSource(fn, signature(fn, act), constexprs, attrs=attrs)
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

    ACTS = (K.ACT_NONE.value, K.ACT_RELU.value, K.ACT_GELU.value)
    # the backward's (ACT, HAS_RES) pairs the launchers use: HAS_RES only with an activation
    GRADS = [(a, r) for a in ACTS for r in (False, True) if a != K.ACT_NONE.value or not r]
    n = 0
    for cl in (True, False):                 # fp16: every variant the launchers use
        tile = dict(BLOCK_M=64, BLOCK_C=64, CHANNELS_LAST=cl)
        for count in (True, False):
            compile_(K.fwd_stats_kernel, COUNT_BATCH=count, **tile)
        for res, a in itertools.product((True, False), ACTS):
            compile_(K.fwd_apply_kernel, HAS_RES=res, ACT=a, **tile)
        for (a, res), write_dx in itertools.product(GRADS, (True, False)):
            compile_(K.bwd_reduce_kernel, ACT=a, HAS_RES=res, WRITE_DX=write_dx, **tile)
        for a in ACTS:
            compile_(K.bwd_dx_kernel, ACT=a, **tile)
        n += 2 + 6 + 10 + 3
    for act in ("*bf16", "*fp32"):           # other dtypes: the conversions, one layout
        tile = dict(BLOCK_M=32, BLOCK_C=128, CHANNELS_LAST=True)
        compile_(K.fwd_stats_kernel, act, COUNT_BATCH=True, **tile)
        for a in (K.ACT_RELU.value, K.ACT_GELU.value):
            compile_(K.fwd_apply_kernel, act, HAS_RES=True, ACT=a, **tile)
            compile_(K.bwd_reduce_kernel, act, ACT=a, HAS_RES=False, WRITE_DX=True, **tile)
            compile_(K.bwd_reduce_kernel, act, ACT=a, HAS_RES=True, WRITE_DX=False, **tile)
            compile_(K.bwd_dx_kernel, act, ACT=a, **tile)
        n += 9
    for update, cumulative in ((True, False), (True, True), (False, False)):
        compile_(K.fwd_finalize_kernel, BLOCK_P=64, BLOCK_C=64, UPDATE_RUNNING=update,
                 CUMULATIVE=cumulative)
    compile_(K.bwd_finalize_kernel, BLOCK_P=64, BLOCK_C=64)
    print("compiled", n + 4)
''')


CAPTURE = textwrap.dedent(r'''
    import json
    import torch
    import triton
    from torch import nn
    from torch._dynamo.backends.common import aot_autograd
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction
    import kernels.batchnorm as B
    from fastcifar.models.norm import NormAct

    # CPU tensors stand in for CUDA ones: launches are stubbed, the device check skipped, and
    # without a GPU torch's analysis of the kernels (which tensors they write) gets an H100
    # target to compile them for.
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: None
    B._check_device = lambda x: None
    if not torch.cuda.is_available():
        class H100:
            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)
        triton.runtime.driver.set_active(H100())

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1 = NormAct(8, backend="triton")
            self.bn2 = NormAct(8, backend="triton")
            self.bn3 = NormAct(8, act="gelu", backend="triton")

        def forward(self, x):
            h = self.bn1(x)
            h = self.bn2(h, residual=h)
            return self.bn3(h, residual=h)

    graphs = []
    def grab(gm, example_inputs):
        graphs.append(gm)
        return gm
    # inductor's own AOT setting: buffer mutations stay in the graph
    backend = aot_autograd(fw_compiler=grab, bw_compiler=grab, keep_inference_input_mutations=True)
    compiled = torch.compile(Net(), backend=backend, fullgraph=True)
    cl = torch.channels_last
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=cl).requires_grad_()
    compiled(x).backward(torch.randn(2, 8, 4, 4).contiguous(memory_format=cl))

    def calls(gm):
        out = []
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            if "triton_kernel_wrapper" in str(node.target):
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
                args = node.kwargs["kwargs"]
                # the finalize kernel writes the module's buffers (graph inputs) itself
                writes_buffers = kernel == "fwd_finalize_kernel" and all(
                    args[k].op == "placeholder" for k in ("rmean_ptr", "rvar_ptr"))
                out.append(kernel + (" (buffers)" if writes_buffers else ""))
            else:
                out.append(str(node.target))
        return out
    print(json.dumps({"visible": B.VISIBLE_TO_COMPILER, "graphs": [calls(g) for g in graphs]}))
''')


# Registers and spills of the kernels as the launchers use them on an H100: the geometry
# (tile, warps) from kernels/batchnorm.py's _geometry for zoo shapes at batch 512, fp16,
# channels-last, sizes divisible by 16 as at C = 64..512, through ptxas -v (the assembler
# Triton bundles and uses for sm_90). The reduction passes keep per-lane accumulators; at 4 warps a 4096-element
# tile took up to 244-255 registers and spilled (GELU with a residual), hence their 8 warps.
RESOURCES = textwrap.dedent(r"""
    import collections, itertools, json, os, re, subprocess, sys, tempfile
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import kernels.batchnorm as B
    import kernels.bn_kernels as K

    try:        # the assembler Triton itself uses for sm_90
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(90).path
    except Exception as e:
        print(json.dumps({"skip": f"no ptxas from this triton: {e}"})); sys.exit(0)
    ACT = {"x_ptr", "y_ptr", "res_ptr", "aux_ptr", "dy_ptr", "dx_ptr", "dres_ptr"}
    FLOATS = {"eps", "momentum", "inv_count"}
    DIV16 = {"S", "C", "n_blocks"}

    def resources(fn, num_warps, **constexprs):
        sig, attrs = {}, {}
        for i, (name, p) in enumerate(zip(fn.arg_names, fn.params)):
            if p.is_constexpr:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*fp16" if name in ACT else "*i64" if name == "nbt_ptr" else "*fp32"
            else:
                sig[name] = "fp32" if name in FLOATS else "i32"
            if name.endswith("_ptr") or name in DIV16:
                attrs[(i,)] = [["tt.divisibility", 16]]
        k = triton.compile(ASTSource(fn, sig, constexprs, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(k.asm["ptx"])
        out = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
        os.unlink(f.name)
        regs = int(re.search(r"Used (\d+) registers", out.stderr).group(1))
        spill = sum(int(v) for v in re.findall(r"(\d+) bytes spill", out.stderr))
        return {"registers": regs, "spill_bytes": spill}

    B._sm_count = lambda index: 132
    rows = []
    for C, H, W in ((64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)):
        g = B._geometry(512, C, H, W, True, torch.device("cuda", 0), ())
        tile = dict(BLOCK_M=g.block_m, BLOCK_C=g.block_c, CHANNELS_LAST=True)
        variants = [("fwd_stats_kernel", g.reduce_warps, dict(COUNT_BATCH=True))]
        for a, res in ((1, False), (1, True), (2, False), (2, True), (0, False)):
            variants.append(("bwd_reduce_kernel", g.reduce_warps, dict(ACT=a, HAS_RES=res, WRITE_DX=False)))
            variants.append(("fwd_apply_kernel", g.num_warps, dict(ACT=a, HAS_RES=res)))
        for a in (0, 1, 2):
            variants.append(("bwd_dx_kernel", g.num_warps, dict(ACT=a)))
        for name, warps, extra in variants:
            r = resources(getattr(K, name), warps, **tile, **extra)
            rows.append({"kernel": name, "C": C, "H": H, "W": W, "num_warps": warps, **extra, **r})
    print(json.dumps({"rows": rows}))
""")


def _run(script: str) -> subprocess.CompletedProcess:
    try:
        from triton.backends import backends
    except ImportError:
        pytest.skip("this triton has no backend registry")
    if "nvidia" not in backends:
        pytest.skip("triton has no CUDA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_kernels_compile_for_sm90():
    assert "compiled 64" in _run(SCRIPT).stdout


def test_torch_compile_sees_the_kernels():
    """With compiled kernels on torch >= 2.6 the ops are triton_ops: the forward graph of three
    training BN layers (ReLU; ReLU + residual; GELU + residual) is their three kernels each, the finalize kernel updating the running
    statistics (graph inputs), the backward graph three kernels each, and no fastcifar op is
    left for the compiled code to call back into Python."""
    import torch

    if not hasattr(torch.library, "triton_op"):
        pytest.skip("torch < 2.6: the ops are opaque custom ops")
    out = json.loads(_run(CAPTURE).stdout.strip().splitlines()[-1])
    assert out["visible"]
    forward, backward = out["graphs"]
    assert not [c for c in forward + backward if "fastcifar" in c]
    kernels = [c for c in forward if "kernel" in c]
    assert kernels == ["fwd_stats_kernel", "fwd_finalize_kernel (buffers)", "fwd_apply_kernel"] * 3
    assert [c for c in backward if "kernel" in c] == \
        ["bwd_reduce_kernel", "bwd_finalize_kernel", "bwd_dx_kernel"] * 3


def test_production_geometry_compiles_without_spills():
    """Every kernel variant at the geometry its launcher picks for the zoo's shapes on an
    H100 (batch 512, fp16, channels-last) assembles for sm_90 with no register spills, and
    the reduction passes stay at <= 128 registers a thread (>= 2 programs of 8 warps per SM)."""
    out = json.loads(_run(RESOURCES).stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(out["skip"])
    rows = out["rows"]
    assert len(rows) == 4 * 14
    assert [r for r in rows if r["spill_bytes"]] == []
    reduce = [r for r in rows if r["kernel"] in ("fwd_stats_kernel", "bwd_reduce_kernel")]
    assert max(r["registers"] for r in reduce) <= 128, reduce
