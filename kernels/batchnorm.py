"""Fused BatchNorm + (residual add) + ReLU for training, in Triton.

    y = relu(batch_norm(x) + residual)          residual and relu optional

The unfused version moves every activation through memory several times (cuDNN BN reads x
twice and writes its output, add reads two tensors and writes one, ReLU reads and writes
again; the backward mirrors all of it). Here each direction does the fewest passes the math
allows, given that a per-channel reduction over the whole batch must finish before any
output element can be written:

  forward (training)   pass 1  _fwd_stats_kernel     read x -> per-block (count, mean, M2)
                               _fwd_finalize_kernel  combine blocks -> mean, biased var   [C]
                       pass 2  _fwd_apply_kernel     read x (+ residual), write y
                               _running_stats_kernel running stats (separate op: it mutates)
  forward (eval)       pass 2 only, with the running statistics
  backward (training)  pass 1  _bwd_reduce_kernel    read dy, x (+ y) -> sum(dy'), sum(dy' (x-mean))
                                                     (+ write d_residual = dy')
                               _bwd_finalize_kernel  -> dweight, dbias                    [C]
                       pass 2  _bwd_dx_kernel        read dy (or dy'), x, write dx
  backward (eval)      pass 1 alone, writing dx as it goes (dx needs no batch reduction)

dy' = dy * (y > 0) is the gradient after the ReLU. Where that mask comes from is chosen by
bytes moved (E = one activation tensor):
  * no residual: recompute z = (x - mean) * w * invstd + b from x, which both passes read
    anyway, and take z rounded to x's dtype > 0 -- exactly `y > 0`, because y is that same
    rounded value. Reading the saved y instead would add 2E. Backward = 5E.
  * residual: y = relu(bn(x) + r) needs r to recompute, which costs as much as reading y,
    so pass 1 reads the saved y, and since d_residual = dy' must be written anyway, pass 2
    reads dy' back instead of dy and y: pass 1 reads dy, y, x and writes dy' (4E), pass 2
    reads dy', x and writes dx (3E). Backward = 7E, the same as the floor (read dy, x and a
    mask source, write dx and d_residual, and re-read the two inputs pass 2 needs).
Forward moves 3E (4E with residual); eval forward 2E (3E).

Layouts. Channels-last x is a row-major [N*H*W, C] matrix: a tile is BLOCK_M whole rows
(BLOCK_C = next power of two >= C, for C <= 256; wider rows are split in 256-channel blocks,
still 512-byte contiguous runs), i.e. one contiguous stretch of memory, so loads are fully
coalesced even for C = 66 or 132 where the padded lanes just sit idle (the kernels are
memory-bound, idle ALUs cost nothing). Contiguous NCHW x uses another index map over the
same loops: rows are (n, h*w) pairs of one image so that a tile's rows are contiguous in
memory and the compiler coalesces along them; no copy is made. Other strides are copied to
a dense layout first (one extra read+write of x, done by autograd-visible torch ops).

Statistics. N*H*W is up to 524288 per channel, so plain fp32 sum / sum-of-squares would
lose the variance to cancellation when |mean| >> std. Each tile computes its exact mean and
sum of squared deviations M2 in registers (two passes over data already loaded), tiles and
then program blocks are merged with Chan et al.'s parallel update
    mean = mean_a + d * n_b / n,  M2 = M2_a + M2_b + d^2 n_a n_b / n,  d = mean_b - mean_a,
which never subtracts two large sums. Backward sums are of dy' and dy' * (x - mean): centred
already, summed per tile (tree) then per block (short sequential chains) in fp32.

torch.compile: three custom ops in the `fastcifar` namespace. A custom op with an autograd
formula must be functional, so the running-statistics update -- the one mutation -- is its
own op (`bn_update_running_stats_`, mutates_args declared) fed by the functional forward's
batch mean and variance; a tiny [C] kernel.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

# Under TRITON_INTERPRET=1 (set before triton is imported) kernels run on CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tests set this to fill every output with NaN before a kernel writes it, so an element a
# kernel forgets to write shows up as NaN instead of as stale memory that happens to be right.
POISON = os.environ.get("FASTCIFAR_POISON", "0") == "1"

# Tests override block sizes here to force multi-block / multi-tile / ragged-edge paths on
# small tensors; keys: block_m, block_c, programs (target program count of reduction passes).
CONFIG_OVERRIDE: dict = {}


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------

@triton.jit
def _tile(blk, c0, S, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
          CHANNELS_LAST: tl.constexpr):
    """Element offsets, in-bounds mask and valid-row count of row block `blk` x channels
    [c0, c0 + BLOCK_C). Rows are grouped in "images" of S rows: channels-last passes one
    image of S = N*H*W rows, NCHW passes N images of S = H*W rows (a block never straddles
    two images, so its rows stay contiguous in memory)."""
    blocks_per_image = tl.cdiv(S, BLOCK_M)
    n = blk // blocks_per_image
    s0 = (blk % blocks_per_image) * BLOCK_M
    s = s0 + tl.arange(0, BLOCK_M)
    c = c0 + tl.arange(0, BLOCK_C)
    if CHANNELS_LAST:
        offs = s[:, None] * C + c[None, :]
    else:
        offs = n * C * S + c[None, :] * S + s[:, None]
    mask = (s < S)[:, None] & (c < C)[None, :]
    return offs, mask, tl.minimum(S - s0, BLOCK_M)


@triton.jit
def _channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, c0, C, eps, BLOCK_C: tl.constexpr):
    """Per-channel mean, 1/std, scale = w/std and bias for channels [c0, c0 + BLOCK_C)."""
    c = c0 + tl.arange(0, BLOCK_C)
    cm = c < C
    mean = tl.load(mean_ptr + c, mask=cm, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + c, mask=cm, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt(var + eps)
    scale = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32) * invstd
    bias = tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
    return mean, invstd, scale, bias


@triton.jit
def _normalize(x, mean, scale, bias):
    """(x - mean) * scale + bias, the one expression both directions evaluate, so the
    backward's recomputed ReLU mask agrees with the forward's. Subtracting the mean first
    (rather than x * scale + shift) keeps the result exact-ish when |mean| >> std."""
    return (x - mean[None, :]) * scale[None, :] + bias[None, :]


@triton.jit
def _fwd_stats_kernel(x_ptr, pmean_ptr, pm2_ptr, pcount_ptr, S, C, n_blocks, blocks_per_prog,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                      CHANNELS_LAST: tl.constexpr):
    """Pass 1 of the forward: program p merges row blocks [p*bpp, (p+1)*bpp) of its channel
    block into (count, mean, M2) and writes them as partial p."""
    p = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK_C
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    # rows merged so far: the same for every channel, but a vector keeps the loop types simple
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    first = p * blocks_per_prog
    last = tl.minimum(first + blocks_per_prog, n_blocks)
    for blk in range(first, last):
        offs, mask, rows = _tile(blk, c0, S, C, BLOCK_M, BLOCK_C, CHANNELS_LAST)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        n_b = rows.to(tl.float32)
        mean_b = tl.sum(x, axis=0) / n_b
        d = tl.where(mask, x - mean_b[None, :], 0.0)
        m2_b = tl.sum(d * d, axis=0)
        n = count + n_b
        delta = mean_b - mean
        mean += delta * (n_b / n)
        m2 += m2_b + delta * delta * (count * (n_b / n))
        count = n
    c = c0 + tl.arange(0, BLOCK_C)
    cm = c < C
    tl.store(pmean_ptr + p * C + c, mean, mask=cm)
    tl.store(pm2_ptr + p * C + c, m2, mask=cm)
    tl.store(pcount_ptr + p * C + c, count, mask=cm)


@triton.jit
def _fwd_finalize_kernel(pmean_ptr, pm2_ptr, pcount_ptr, mean_ptr, var_ptr, P, C,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the P partials of each channel: BLOCK_P at a time with the exact group formula
    (n = sum n_i, mean = sum n_i mean_i / n, M2 = sum M2_i + sum n_i (mean_i - mean)^2),
    groups with Chan's update. Writes the batch mean and biased variance."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < P)[:, None] & cm[None, :]
        offs = p[:, None] * C + c[None, :]
        n_i = tl.load(pcount_ptr + offs, mask=mask, other=0.0)
        mean_i = tl.load(pmean_ptr + offs, mask=mask, other=0.0)
        m2_i = tl.load(pm2_ptr + offs, mask=mask, other=0.0)
        n_b = tl.sum(n_i, axis=0)
        mean_b = tl.sum(n_i * mean_i, axis=0) / tl.maximum(n_b, 1.0)
        d_i = mean_i - mean_b[None, :]
        m2_b = tl.sum(m2_i + n_i * d_i * d_i, axis=0)
        n = count + n_b
        delta = mean_b - mean
        w_b = n_b / tl.maximum(n, 1.0)
        mean += delta * w_b
        m2 += m2_b + delta * delta * (count * w_b)
        count = n
    tl.store(mean_ptr + c, mean, mask=cm)
    tl.store(var_ptr + c, m2 / tl.maximum(count, 1.0), mask=cm)


@triton.jit
def _running_stats_kernel(rmean_ptr, rvar_ptr, mean_ptr, var_ptr, C, momentum, unbias,
                          BLOCK_C: tl.constexpr):
    """running = (1 - momentum) * running + momentum * batch, with the unbiased variance
    (var * n / (n - 1)) as torch's batch_norm does."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    rm = tl.load(rmean_ptr + c, mask=cm).to(tl.float32)
    rv = tl.load(rvar_ptr + c, mask=cm).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=cm)
    var = tl.load(var_ptr + c, mask=cm)
    rm = momentum * mean + (1.0 - momentum) * rm
    rv = momentum * (var * unbias) + (1.0 - momentum) * rv
    tl.store(rmean_ptr + c, rm.to(rmean_ptr.dtype.element_ty), mask=cm)
    tl.store(rvar_ptr + c, rv.to(rvar_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _fwd_apply_kernel(x_ptr, res_ptr, y_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, S, C, eps,
                      HAS_RES: tl.constexpr, RELU: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                      CHANNELS_LAST: tl.constexpr):
    """Pass 2 of the forward (the only pass in eval): one tile per program."""
    c0 = tl.program_id(1) * BLOCK_C
    offs, mask, rows = _tile(tl.program_id(0), c0, S, C, BLOCK_M, BLOCK_C, CHANNELS_LAST)
    mean, invstd, scale, bias = _channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, c0, C, eps,
                                                BLOCK_C)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = _normalize(x, mean, scale, bias)
    if HAS_RES:
        z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        z = tl.maximum(z, 0.0)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _relu_grad(dy, x, y_ptr, offs, mask, mean, scale, bias, dtype: tl.constexpr,
               MASK_FROM: tl.constexpr):
    """dy' = dy where the forward's output was > 0. MASK_FROM: 0 no ReLU, 1 read saved y,
    2 recompute from x. The recomputed z is rounded to the activation dtype before the test
    because that rounded value is what y held (an fp16 z of 1e-8 is a y of 0).
    Comparisons are made in fp32 (the interpreter compares bf16 by its bits)."""
    if MASK_FROM == 1:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.where(y > 0.0, dy, 0.0)
    elif MASK_FROM == 2:
        z = _normalize(x, mean, scale, bias).to(dtype).to(tl.float32)
        dy = tl.where(z > 0.0, dy, 0.0)
    return dy


@triton.jit
def _bwd_reduce_kernel(dy_ptr, x_ptr, y_ptr, dres_ptr, dx_ptr, mean_ptr, var_ptr, w_ptr, b_ptr,
                       psum_ptr, psumx_ptr, S, C, n_blocks, blocks_per_prog, eps,
                       MASK_FROM: tl.constexpr, WRITE_DRES: tl.constexpr,
                       WRITE_DX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                       CHANNELS_LAST: tl.constexpr):
    """Pass 1 of the backward: per-block sum(dy') and sum(dy' * (x - mean)); writes
    d_residual = dy' when asked, and in eval mode dx = dy' * w / std as well (eval's dx needs
    no batch reduction, so eval's backward is this one pass)."""
    p = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK_C
    mean, invstd, scale, bias = _channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, c0, C, eps,
                                                BLOCK_C)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    accx = tl.zeros([BLOCK_C], dtype=tl.float32)
    first = p * blocks_per_prog
    last = tl.minimum(first + blocks_per_prog, n_blocks)
    for blk in range(first, last):
        offs, mask, rows = _tile(blk, c0, S, C, BLOCK_M, BLOCK_C, CHANNELS_LAST)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = _relu_grad(dy, x, y_ptr, offs, mask, mean, scale, bias,
                        x_ptr.dtype.element_ty, MASK_FROM)
        if WRITE_DRES:
            tl.store(dres_ptr + offs, dy.to(dres_ptr.dtype.element_ty), mask=mask)
        if WRITE_DX:
            tl.store(dx_ptr + offs, (dy * scale[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)
        acc += tl.sum(dy, axis=0)                       # masked lanes hold dy = 0
        accx += tl.sum(dy * (x - mean[None, :]), axis=0)
    c = c0 + tl.arange(0, BLOCK_C)
    cm = c < C
    tl.store(psum_ptr + p * C + c, acc, mask=cm)
    tl.store(psumx_ptr + p * C + c, accx, mask=cm)


@triton.jit
def _bwd_finalize_kernel(psum_ptr, psumx_ptr, var_ptr, dw_ptr, db_ptr, P, C, eps,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dbias = sum(dy'), dweight = sum(dy' * xhat) = invstd * sum(dy' * (x - mean))."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    s = tl.zeros([BLOCK_C], dtype=tl.float32)
    sx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < P)[:, None] & cm[None, :]
        offs = p[:, None] * C + c[None, :]
        s += tl.sum(tl.load(psum_ptr + offs, mask=mask, other=0.0), axis=0)
        sx += tl.sum(tl.load(psumx_ptr + offs, mask=mask, other=0.0), axis=0)
    var = tl.load(var_ptr + c, mask=cm, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(db_ptr + c, s.to(db_ptr.dtype.element_ty), mask=cm)
    tl.store(dw_ptr + c, (sx * invstd).to(dw_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _bwd_dx_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, dw_ptr, db_ptr,
                   S, C, inv_count, eps, MASK_FROM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Pass 2 of the training backward:
        dx = w * invstd * (dy' - mean(dy') - xhat * mean(dy' * xhat)),
    the means over the batch being dbias / n and dweight / n. dy_ptr holds dy (MASK_FROM 0
    or 2) or the already-masked d_residual (residual case, MASK_FROM 0)."""
    c0 = tl.program_id(1) * BLOCK_C
    offs, mask, rows = _tile(tl.program_id(0), c0, S, C, BLOCK_M, BLOCK_C, CHANNELS_LAST)
    mean, invstd, scale, bias = _channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, c0, C, eps,
                                                BLOCK_C)
    c = c0 + tl.arange(0, BLOCK_C)
    cm = c < C
    mean_dy = tl.load(db_ptr + c, mask=cm, other=0.0).to(tl.float32) * inv_count
    mean_dyxhat = tl.load(dw_ptr + c, mask=cm, other=0.0).to(tl.float32) * inv_count
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = _relu_grad(dy, x, dy_ptr, offs, mask, mean, scale, bias,
                    x_ptr.dtype.element_ty, MASK_FROM)
    xhat = (x - mean[None, :]) * invstd[None, :]
    dx = scale[None, :] * (dy - mean_dy[None, :] - xhat * mean_dyxhat[None, :])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sm_count(device_index) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


class _Geometry:
    """How a [N, C, H, W] tensor maps onto row blocks x channel blocks."""

    def __init__(self, x: Tensor, channels_last: bool):
        N, C, H, W = x.shape
        self.C, self.count = C, N * H * W
        self.channels_last = channels_last
        # images of S rows each (see _tile)
        self.images, self.S = (1, N * H * W) if channels_last else (N, H * W)
        tile = CONFIG_OVERRIDE.get("tile", 4096)
        if channels_last:   # whole rows per tile: one contiguous stretch of memory
            block_c = min(_pow2(C), 256)    # wider C: several channel blocks, more programs
            block_m = max(1, min(tile // block_c, _pow2(self.S)))
        else:               # contiguous along h*w
            block_m = min(_pow2(self.S), 256)
            block_c = max(1, min(_pow2(C), tile // block_m))
        self.block_m = CONFIG_OVERRIDE.get("block_m", block_m)
        self.block_c = CONFIG_OVERRIDE.get("block_c", block_c)
        self.c_blocks = triton.cdiv(C, self.block_c)
        self.n_blocks = self.images * triton.cdiv(self.S, self.block_m)
        # Reduction passes: enough programs to fill the GPU, each looping over several blocks,
        # but each covering >= 256 rows so that the per-program partials ([P, C] fp32, written
        # then re-read by the finalize kernel) stay ~2% of the bytes the pass moves.
        min_blocks = triton.cdiv(256, self.block_m)
        if "programs" in CONFIG_OVERRIDE:
            target, min_blocks = CONFIG_OVERRIDE["programs"], 1
        elif x.is_cuda:
            target = 8 * _sm_count(x.device.index)
        else:       # interpreter: every program instance costs Python time
            target = 4
        per_c = max(1, target // self.c_blocks)
        self.blocks_per_prog = max(triton.cdiv(self.n_blocks, per_c), min_blocks)
        self.P = triton.cdiv(self.n_blocks, self.blocks_per_prog)
        self.num_warps = 4 if self.block_m * self.block_c <= 4096 else 8

    def reduce_grid(self):
        return (self.P, self.c_blocks)

    def tile_grid(self):
        return (self.n_blocks, self.c_blocks)

    def small(self):
        """Block sizes for the [P, C] partial-combining kernels: narrow channel blocks so
        that many programs share the work and each loops over few [BLOCK_P, BLOCK_C] tiles
        (P <= ~8 x SMs, i.e. <= ~9 iterations)."""
        block_c = min(_pow2(self.C), 32)
        block_p = max(1, min(_pow2(self.P), 4096 // block_c))
        return block_p, block_c, triton.cdiv(self.C, block_c)


def _empty(shape_or_like, **kw) -> Tensor:
    if isinstance(shape_or_like, Tensor):
        t = torch.empty_like(shape_or_like, **kw)
    else:
        t = torch.empty(shape_or_like, **kw)
    if POISON and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def _is_channels_last(x: Tensor) -> bool:
    if x.is_contiguous(memory_format=torch.channels_last):
        return True
    if x.is_contiguous():
        return False
    raise ValueError("bn_relu kernels need a dense NCHW or channels-last tensor")


def _check_device(x: Tensor) -> None:
    if not (x.is_cuda or INTERPRET):
        raise RuntimeError(
            "bn_relu runs Triton kernels: give it CUDA tensors, or set TRITON_INTERPRET=1 "
            "before importing triton to run them on CPU (slow; meant for tests)")


# ----------------------------------------------------------------------------------------
# Launchers (plain functions on tensors; the custom ops below wrap them)
# ----------------------------------------------------------------------------------------

def forward(x, weight, bias, running_mean, running_var, residual, training: bool, eps: float,
            relu: bool):
    """y and, in training, the batch mean and biased variance (fp32 [C])."""
    _check_device(x)
    if x.numel() == 0:      # eval on an empty batch (training raised before getting here)
        stat = x.new_empty(0, dtype=torch.float32)
        return torch.empty_like(x), stat, stat.clone()
    geo = _Geometry(x, _is_channels_last(x))
    C = geo.C
    if training:
        mean = _empty((C,), device=x.device, dtype=torch.float32)
        var = _empty((C,), device=x.device, dtype=torch.float32)
        part = [_empty((geo.P, C), device=x.device, dtype=torch.float32) for _ in range(3)]
        _fwd_stats_kernel[geo.reduce_grid()](
            x, *part, geo.S, C, geo.n_blocks, geo.blocks_per_prog,
            BLOCK_M=geo.block_m, BLOCK_C=geo.block_c, CHANNELS_LAST=geo.channels_last,
            num_warps=geo.num_warps)
        block_p, block_c, grid = geo.small()
        _fwd_finalize_kernel[(grid,)](*part, mean, var, geo.P, C,
                                      BLOCK_P=block_p, BLOCK_C=block_c)
        use_mean, use_var = mean, var
    else:
        mean, var = x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
        use_mean, use_var = running_mean, running_var
    y = _empty(x)
    _fwd_apply_kernel[geo.tile_grid()](
        x, residual if residual is not None else x, y, use_mean, use_var, weight, bias,
        geo.S, C, eps, HAS_RES=residual is not None, RELU=relu,
        BLOCK_M=geo.block_m, BLOCK_C=geo.block_c, CHANNELS_LAST=geo.channels_last,
        num_warps=geo.num_warps)
    return y, mean, var


def update_running_stats(running_mean, running_var, mean, var, momentum: float, count: int):
    C = mean.numel()
    block_c = min(_pow2(C), 1024)
    _running_stats_kernel[(triton.cdiv(C, block_c),)](
        running_mean, running_var, mean, var, C, momentum, count / (count - 1), BLOCK_C=block_c)


def backward(dy, x, y, weight, bias, mean, var, training: bool, eps: float, relu: bool,
             has_residual: bool):
    """dx, dweight, dbias, and d_residual (= dy', only when relu and residual, else empty).
    `mean`/`var` are the batch statistics in training, the running ones in eval; `y` is the
    saved output, needed only for relu with a residual."""
    _check_device(x)
    if x.numel() == 0:
        dres = torch.empty_like(x) if relu and has_residual else x.new_empty(0)
        return torch.empty_like(x), torch.zeros_like(weight), torch.zeros_like(bias), dres
    geo = _Geometry(x, _is_channels_last(x))
    C = geo.C
    mask_from = (1 if has_residual else 2) if relu else 0
    write_dres = relu and has_residual
    dres = _empty(x) if write_dres else x.new_empty(0)
    dx = _empty(x)
    psum = _empty((geo.P, C), device=x.device, dtype=torch.float32)
    psumx = _empty((geo.P, C), device=x.device, dtype=torch.float32)
    _bwd_reduce_kernel[geo.reduce_grid()](
        dy, x, y if y is not None else x, dres if write_dres else x, dx, mean, var, weight,
        bias, psum, psumx, geo.S, C, geo.n_blocks, geo.blocks_per_prog, eps,
        MASK_FROM=mask_from, WRITE_DRES=write_dres, WRITE_DX=not training,
        BLOCK_M=geo.block_m, BLOCK_C=geo.block_c, CHANNELS_LAST=geo.channels_last,
        num_warps=geo.num_warps)
    dweight = _empty(weight)
    dbias = _empty(bias)
    block_p, block_c, grid = geo.small()
    _bwd_finalize_kernel[(grid,)](psum, psumx, var, dweight, dbias, geo.P, C, eps,
                                  BLOCK_P=block_p, BLOCK_C=block_c)
    if training:
        _bwd_dx_kernel[geo.tile_grid()](
            dres if write_dres else dy, x, dx, mean, var, weight, bias, dweight, dbias,
            geo.S, C, 1.0 / geo.count, eps, MASK_FROM=0 if write_dres else mask_from,
            BLOCK_M=geo.block_m, BLOCK_C=geo.block_c, CHANNELS_LAST=geo.channels_last,
            num_warps=geo.num_warps)
    return dx, dweight, dbias, dres


# ----------------------------------------------------------------------------------------
# Custom ops (torch.compile traces through them without graph breaks)
# ----------------------------------------------------------------------------------------

@torch.library.custom_op("fastcifar::bn_relu_fwd", mutates_args=())
def bn_relu_fwd(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Optional[Tensor],
                running_var: Optional[Tensor], residual: Optional[Tensor], training: bool,
                eps: float, relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(y, batch mean, batch biased var); the statistics are empty in eval mode."""
    return forward(x, weight, bias, running_mean, running_var, residual, training, eps, relu)


@bn_relu_fwd.register_fake
def _(x, weight, bias, running_mean, running_var, residual, training, eps, relu):
    n = x.shape[1] if training else 0
    return (torch.empty_like(x), x.new_empty(n, dtype=torch.float32),
            x.new_empty(n, dtype=torch.float32))


@torch.library.custom_op("fastcifar::bn_relu_bwd", mutates_args=())
def bn_relu_bwd(dy: Tensor, x: Tensor, y: Optional[Tensor], weight: Tensor, bias: Tensor,
                mean: Tensor, var: Tensor, training: bool, eps: float, relu: bool,
                has_residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, d_residual); d_residual is empty unless relu and has_residual."""
    return backward(dy, x, y, weight, bias, mean, var, training, eps, relu, has_residual)


@bn_relu_bwd.register_fake
def _(dy, x, y, weight, bias, mean, var, training, eps, relu, has_residual):
    dres = torch.empty_like(x) if relu and has_residual else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias), dres


@torch.library.custom_op("fastcifar::bn_update_running_stats_",
                         mutates_args=("running_mean", "running_var"))
def bn_update_running_stats_(running_mean: Tensor, running_var: Tensor, mean: Tensor,
                             var: Tensor, momentum: float, count: int) -> None:
    update_running_stats(running_mean, running_var, mean, var, momentum, count)


@bn_update_running_stats_.register_fake
def _(running_mean, running_var, mean, var, momentum, count):
    return None


def _setup_context(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, residual, training, eps, relu = inputs
    y, mean, var = output
    if not training:        # eval normalizes with the running statistics
        mean, var = running_mean, running_var
    ctx.training, ctx.eps, ctx.relu = training, eps, relu
    ctx.has_residual = residual is not None
    ctx.channels_last = x.is_contiguous(memory_format=torch.channels_last)
    # y is only read back for relu with a residual (see the module docstring)
    keep_y = y if relu and residual is not None else None
    ctx.save_for_backward(x, weight, bias, mean, var, keep_y)


def _backward(ctx, dy, _dmean, _dvar):
    x, weight, bias, mean, var, y = ctx.saved_tensors
    fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
    if not dy.is_contiguous(memory_format=fmt):     # e.g. the expanded grad of a .sum()
        dy = dy.contiguous(memory_format=fmt)
    dx, dweight, dbias, dres = torch.ops.fastcifar.bn_relu_bwd(
        dy, x, y, weight, bias, mean, var, ctx.training, ctx.eps, ctx.relu, ctx.has_residual)
    if ctx.has_residual and not ctx.relu:
        dres = dy           # no ReLU: the residual's gradient is dy itself, no copy
    return (dx, dweight, dbias, None, None, dres if ctx.has_residual else None,
            None, None, None)


bn_relu_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------

def _dense_like(t: Tensor, fmt) -> Tensor:
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def bn_relu(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Optional[Tensor],
            running_var: Optional[Tensor], training: bool, momentum: float = 0.1,
            eps: float = 1e-5, residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """relu(batch_norm(x) + residual), with autograd; residual and relu optional.

    Same semantics as F.batch_norm(x, running_mean, running_var, weight, bias, training,
    momentum, eps) followed by the add and the ReLU: training normalizes with the batch
    statistics (biased variance) and updates the running statistics in place (unbiased
    variance); eval uses the running statistics. x: [N, C, H, W] fp16/bf16/fp32, NCHW or
    channels-last (y comes back in the same format; other strides are copied first).
    Running stats, weight and bias are per-channel, fp32 even for fp16 x."""
    if x.dim() != 4:
        raise ValueError(f"bn_relu expects a 4-D [N, C, H, W] input, got shape {tuple(x.shape)}")
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and t.shape != (C,):
            raise ValueError(f"bn_relu: {name} must have shape ({C},), got {tuple(t.shape)}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("bn_relu: eval mode needs running_mean and running_var")
    count = x.numel() // max(C, 1)
    if training and count <= 1:
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
    x = _dense_like(x, fmt)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"bn_relu: residual shape {tuple(residual.shape)} != input shape "
                             f"{tuple(x.shape)}")
        residual = _dense_like(residual.to(x.dtype), fmt)
    y, mean, var = torch.ops.fastcifar.bn_relu_fwd(
        x, weight, bias, running_mean, running_var, residual, training, eps, relu)
    if training and running_mean is not None and running_var is not None:
        torch.ops.fastcifar.bn_update_running_stats_(
            running_mean, running_var, mean.detach(), var.detach(), momentum, count)
    return y


class BatchNormReLU2d(torch.nn.BatchNorm2d):
    """nn.BatchNorm2d followed by an optional residual add and ReLU, fused.

    Parameters and buffers are BatchNorm2d's own (weight, bias, running_mean, running_var,
    num_batches_tracked), so state dicts load both ways with nn.BatchNorm2d and with
    nn.Sequential(nn.BatchNorm2d(C), nn.ReLU()) once the Sequential's "0." prefix is
    dropped or added."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 relu: bool = True, device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True,
                         track_running_stats=True, device=device, dtype=dtype)
        self.relu = relu

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:   # cumulative moving average, as BatchNorm2d
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        return bn_relu(x, self.weight, self.bias,
                       self.running_mean if track else None,
                       self.running_var if track else None,
                       training=use_batch, momentum=factor, eps=self.eps,
                       residual=residual, relu=self.relu)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", relu={self.relu}"
