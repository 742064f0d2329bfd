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
