"""The kernels compile with Triton's real GPU compiler (sm_90 cubin), no GPU needed.

The interpreter that runs the correctness tests on CPU executes kernels with numpy and
accepts code the compiler would reject (types, layouts, loop-carried values). This compiles
every kernel ahead of time, for each layout and constexpr variant the launchers use (fp16;
bf16 and fp32 for the dtype conversions),
in a subprocess without TRITON_INTERPRET (the kernels are decorated for the interpreter in
this process). Skips where triton has no CUDA backend (e.g. a CPU-only triton build).
"""
from __future__ import annotations

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
    import kernels.batchnorm as K

    ACT = {"x_ptr", "y_ptr", "res_ptr", "dy_ptr", "dx_ptr", "dres_ptr"}   # activation dtype
    FLOATS = {"eps", "momentum", "unbias", "inv_count"}

    def signature(fn, act):
        sig = {}
        for name, p in zip(fn.arg_names, fn.params):
            if p.is_constexpr:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = act if name in ACT else "*fp32"
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

    n = 0
    for cl in (True, False):                 # fp16: every variant the launchers use
        tile = dict(BLOCK_M=64, BLOCK_C=64, CHANNELS_LAST=cl)
        compile_(K._fwd_stats_kernel, **tile)
        for res, relu in itertools.product((True, False), (True, False)):
            compile_(K._fwd_apply_kernel, HAS_RES=res, RELU=relu, **tile)
        for mask_from, write_dx in itertools.product((0, 1, 2), (True, False)):
            compile_(K._bwd_reduce_kernel, MASK_FROM=mask_from, WRITE_DRES=mask_from == 1,
                     WRITE_DX=write_dx, **tile)
        for mask_from in (0, 2):
            compile_(K._bwd_dx_kernel, MASK_FROM=mask_from, **tile)
        n += 1 + 4 + 6 + 2
    for act in ("*bf16", "*fp32"):           # other dtypes: the conversions, one layout
        tile = dict(BLOCK_M=32, BLOCK_C=128, CHANNELS_LAST=True)
        compile_(K._fwd_stats_kernel, act, **tile)
        compile_(K._fwd_apply_kernel, act, HAS_RES=True, RELU=True, **tile)
        compile_(K._bwd_reduce_kernel, act, MASK_FROM=2, WRITE_DRES=False, WRITE_DX=True, **tile)
        compile_(K._bwd_reduce_kernel, act, MASK_FROM=1, WRITE_DRES=True, WRITE_DX=False, **tile)
        compile_(K._bwd_dx_kernel, act, MASK_FROM=2, **tile)
        n += 5
    compile_(K._fwd_finalize_kernel, BLOCK_P=64, BLOCK_C=64)
    compile_(K._bwd_finalize_kernel, BLOCK_P=64, BLOCK_C=64)
    compile_(K._running_stats_kernel, BLOCK_C=64)
    print("compiled", n + 3)
''')


def test_kernels_compile_for_sm90():
    try:
        from triton.backends import backends
    except ImportError:
        pytest.skip("this triton has no backend registry")
    if "nvidia" not in backends:
        pytest.skip("triton has no CUDA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compiled 39" in proc.stdout
