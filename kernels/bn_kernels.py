"""The Triton kernels of the fused BatchNorm + (residual add) + activation.

    y = act(batch_norm(x) + residual)           residual optional; act ReLU, GELU or none

Only the device code lives here; kernels/batchnorm.py chooses block sizes and grids, launches
these, and wraps them as torch ops. kernels/reference.py is the same math in torch ops.

Passes (E = one activation tensor's bytes; a per-channel reduction over the whole batch must
finish before any output element can be written, so a tensor both need is read twice):

  forward (training)   fwd_stats_kernel     read x -> per-program (count, mean, M2)       E
                       fwd_finalize_kernel  merge programs -> batch mean, biased var  [C]
                                            + running statistics, in place
                       fwd_apply_kernel     read x (+ residual), write y                  2E (3E)
  forward (eval)       fwd_apply_kernel only, with the running statistics
  backward (training)  bwd_reduce_kernel    read dy, x (+ y|r) -> sum(dy'), sum(dy' (x-mean))
                                            (+ write d_residual = dy')                    2E (4E)
                       bwd_finalize_kernel  -> dweight, dbias                         [C]
                       bwd_dx_kernel        read dy (or dy'), x, write dx                 3E
  backward (eval)      bwd_reduce_kernel writing dx as it goes, then bwd_finalize_kernel

dy' = dy * act'(z), z = bn(x) (+ r), is the gradient before the activation: dy * (y > 0) for
ReLU, dy * gelu'(z) for GELU. Where z (or the ReLU mask) comes from is chosen by bytes moved:
  * no residual: recompute z = (x - mean) * w * invstd + b from x, which both backward passes
    read anyway. For ReLU the test is z rounded to x's dtype > 0 -- exactly `y > 0`, since y
    is that same rounded value; GELU's derivative takes the fp32 z the forward evaluated.
    Reading the saved y instead would add 2E. Backward = 5E.
  * residual (HAS_RES): z = bn(x) + r needs r. ReLU reads the saved y instead (y > 0 is the
    mask, and y costs what r would); GELU reads r, since gelu' cannot be had from y. Either
    way the reduce pass writes d_residual = dy', which must be written anyway, and the dx
    pass reads dy' back instead of dy and y (or r). Backward = 7E, the floor.

Layouts. Channels-last x is a row-major [N*H*W, C] matrix: a tile is BLOCK_M whole rows
(BLOCK_C = next power of two >= C, for C <= 256; wider rows in 256-channel blocks), i.e. one
contiguous stretch of memory, so loads are coalesced even for C = 66 or 132 (padded lanes idle;
the kernels are memory-bound). Contiguous NCHW x uses another index map over the same loops
(`_tile`): rows are (n, h*w) pairs of one image so that a tile's rows are contiguous in memory.

Statistics. N*H*W is up to 524288 per channel, so fp32 sum / sum-of-squares would lose the
variance to cancellation when |mean| >> std. Each lane of a program's tile keeps a running
mean and sum of squared deviations M2 (Welford) over the program's row blocks; then the
lanes, and then the programs, are merged with Chan et al.'s parallel update
    mean = mean_a + d * n_b / n,  M2 = M2_a + M2_b + d^2 n_a n_b / n,  d = mean_b - mean_a,
which never subtracts two large sums. Backward sums are of dy' and dy' * (x - mean): centred
already, summed per lane over the program's blocks, then across lanes (tree), then across
programs, in fp32. Keeping the loops free of reductions across threads matters on a GPU: an
earlier version merged every tile inside the loop (two block-wide reductions, each with a
barrier, between one load and the next) and read at 1.2 TB/s of the H100's 3.0 on large maps.

Arguments. Reduction passes write their per-program partials into one workspace tensor
([3, P, C] forward, [2, P, C] backward) and derive their share of the row blocks from the grid
(tl.num_programs), so the launcher passes one pointer and no per-program bookkeeping.
Arguments stay flat tensors and scalars (no tuples): torch.compile captures user kernels'
tensor arguments one by one.
"""
from __future__ import annotations

import triton
import triton.language as tl

# The activation (the ACT argument of the apply and backward kernels).
ACT_NONE = tl.constexpr(0)
ACT_RELU = tl.constexpr(1)
ACT_GELU = tl.constexpr(2)      # the exact (erf) GELU, as nn.GELU()

_SQRT1_2 = tl.constexpr(0.7071067811865476)      # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


# ----------------------------------------------------------------------------------------
# Helpers (inlined into the kernels)
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
def _program_blocks(n_blocks):
    """The row blocks [first, last) this program of a reduction pass covers: an even share,
    from the grid's size (the last programs may get fewer, or none)."""
    per_program = tl.cdiv(n_blocks, tl.num_programs(0))
    first = tl.program_id(0) * per_program
    return first, tl.minimum(first + per_program, n_blocks)


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
def _activate(z, ACT: tl.constexpr):
    """act(z) in fp32: relu(z), or gelu(z) = z * Phi(z) = z/2 * (1 + erf(z / sqrt(2)))."""
    if ACT == ACT_RELU:
        z = tl.maximum(z, 0.0)
    elif ACT == ACT_GELU:
        z = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    return z


@triton.jit
def _act_grad(dy, x, aux_ptr, offs, mask, mean, scale, bias, dtype: tl.constexpr,
              ACT: tl.constexpr, HAS_RES: tl.constexpr):
    """dy' = dy * act'(z), z = bn(x) (+ residual); see the module docstring for where z comes
    from. aux_ptr holds the saved output y (ReLU with a residual) or the residual (GELU with
    a residual); it is not read without one.

    ReLU: dy where the forward's output was > 0. The recomputed z is rounded to the activation
    dtype before the test because that rounded value is what y held (an fp16 z of 1e-8 is a y
    of 0). Comparisons are made in fp32 (the interpreter compares bf16 by its bits).
    GELU: gelu'(z) = Phi(z) + z * phi(z), at the very fp32 z the forward evaluated."""
    if ACT == ACT_RELU:
        if HAS_RES:
            y = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.where(y > 0.0, dy, 0.0)
        else:
            z = _normalize(x, mean, scale, bias).to(dtype).to(tl.float32)
            dy = tl.where(z > 0.0, dy, 0.0)
    elif ACT == ACT_GELU:
        z = _normalize(x, mean, scale, bias)
        if HAS_RES:
            z += tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
        pdf = _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
        dy = dy * (cdf + z * pdf)
    return dy


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------

@triton.jit
def fwd_stats_kernel(x_ptr, part_ptr, nbt_ptr, S, C, n_blocks,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                     COUNT_BATCH: tl.constexpr):
    """Statistics pass: program p merges its row blocks of its channel block into
    (count, mean, M2) and writes them as partial p of part_ptr [3, P, C]. With COUNT_BATCH,
    program (0, 0) also adds 1 to num_batches_tracked (nbt_ptr), which the finalize kernel,
    launched after this one, then reads."""
    p = tl.program_id(0)
    P = tl.num_programs(0)
    c0 = tl.program_id(1) * BLOCK_C
    if COUNT_BATCH:
        if (p == 0) & (tl.program_id(1) == 0):
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
    # Welford's update per lane of the tile, merged across the tile's rows once at the end:
    # the loop body is a load and a few element-wise operations, with no reduction across
    # threads (a barrier per iteration) between one load and the next. Every lane of a row
    # sees the same values count, so the count is kept per row.
    mean_l = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    m2_l = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    count_r = tl.zeros([BLOCK_M], dtype=tl.float32)
    first, last = _program_blocks(n_blocks)
    for blk in range(first, last):
        offs, mask, rows = _tile(blk, c0, S, C, BLOCK_M, BLOCK_C, CHANNELS_LAST)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        valid = tl.arange(0, BLOCK_M) < rows
        count_r += valid.to(tl.float32)
        inv_n = 1.0 / tl.maximum(count_r, 1.0)
        delta = tl.where(valid[:, None], x - mean_l, 0.0)
        mean_l += delta * inv_n[:, None]
        m2_l += delta * (x - mean_l)        # 0 where delta is (an invalid row changes nothing)
    # merge the rows (the finalize kernel's group formula): n = sum n_r, mean = sum n_r
    # mean_r / n, M2 = sum M2_r + sum n_r (mean_r - mean)^2
    n = tl.sum(count_r, axis=0)
    mean = tl.sum(mean_l * count_r[:, None], axis=0) / tl.maximum(n, 1.0)
    d = mean_l - mean[None, :]
    m2 = tl.sum(m2_l + d * d * count_r[:, None], axis=0)
    count = tl.zeros([BLOCK_C], dtype=tl.float32) + n
    c = c0 + tl.arange(0, BLOCK_C)
    cm = c < C
    tl.store(part_ptr + p * C + c, count, mask=cm)
    tl.store(part_ptr + (P + p) * C + c, mean, mask=cm)
    tl.store(part_ptr + (2 * P + p) * C + c, m2, mask=cm)


@triton.jit
def fwd_finalize_kernel(part_ptr, mean_ptr, var_ptr, rmean_ptr, rvar_ptr, nbt_ptr, P, C, momentum,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                        UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr):
    """Merge the P partials of each channel: BLOCK_P at a time with the exact group formula
    (n = sum n_i, mean = sum n_i mean_i / n, M2 = sum M2_i + sum n_i (mean_i - mean)^2),
    groups with Chan's update. Writes the batch mean and biased variance, and with
    UPDATE_RUNNING updates the running statistics in place as F.batch_norm does:
        running = (1 - f) * running + f * batch    (the variance unbiased: M2 / (n - 1))
    with f = momentum, or f = 1 / num_batches_tracked when CUMULATIVE (momentum=None)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < P)[:, None] & cm[None, :]
        offs = p[:, None] * C + c[None, :]
        n_i = tl.load(part_ptr + offs, mask=mask, other=0.0)
        mean_i = tl.load(part_ptr + P * C + offs, mask=mask, other=0.0)
        m2_i = tl.load(part_ptr + 2 * P * C + offs, mask=mask, other=0.0)
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
    if UPDATE_RUNNING:
        if CUMULATIVE:
            f = 1.0 / tl.load(nbt_ptr).to(tl.float32)
        else:
            f = momentum
        rm = tl.load(rmean_ptr + c, mask=cm).to(tl.float32)
        rv = tl.load(rvar_ptr + c, mask=cm).to(tl.float32)
        rm = f * mean + (1.0 - f) * rm
        rv = f * (m2 / tl.maximum(count - 1.0, 1.0)) + (1.0 - f) * rv
        tl.store(rmean_ptr + c, rm.to(rmean_ptr.dtype.element_ty), mask=cm)
        tl.store(rvar_ptr + c, rv.to(rvar_ptr.dtype.element_ty), mask=cm)


@triton.jit
def fwd_apply_kernel(x_ptr, res_ptr, y_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, S, C, eps,
                     HAS_RES: tl.constexpr, ACT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Normalize pass (the only pass in eval): one tile per program."""
    c0 = tl.program_id(1) * BLOCK_C
    offs, mask, rows = _tile(tl.program_id(0), c0, S, C, BLOCK_M, BLOCK_C, CHANNELS_LAST)
    mean, invstd, scale, bias = _channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, c0, C, eps,
                                                BLOCK_C)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = _normalize(x, mean, scale, bias)
    if HAS_RES:
        z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = _activate(z, ACT)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------

@triton.jit
def bwd_reduce_kernel(dy_ptr, x_ptr, aux_ptr, dres_ptr, dx_ptr, mean_ptr, var_ptr, w_ptr, b_ptr,
                      part_ptr, S, C, n_blocks, eps,
                      ACT: tl.constexpr, HAS_RES: tl.constexpr, WRITE_DX: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Reduce pass of the backward: per-program sum(dy') and sum(dy' * (x - mean)) into
    part_ptr [2, P, C]. With an activation and a residual (HAS_RES; aux_ptr: y for ReLU, the
    residual for GELU) it writes d_residual = dy' (the residual's gradient, and what the dx
    pass reads instead of dy and aux); with WRITE_DX (eval) it writes dx = dy' * w / std as
    well, since eval's dx needs no batch reduction."""
    p = tl.program_id(0)
    P = tl.num_programs(0)
    c0 = tl.program_id(1) * BLOCK_C
    mean, invstd, scale, bias = _channel_affine(mean_ptr, var_ptr, w_ptr, b_ptr, c0, C, eps,
                                                BLOCK_C)
    # element-wise accumulators, summed across rows once after the loop (no reduction across
    # threads inside it; see fwd_stats_kernel)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    accx = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    first, last = _program_blocks(n_blocks)
    for blk in range(first, last):
        offs, mask, rows = _tile(blk, c0, S, C, BLOCK_M, BLOCK_C, CHANNELS_LAST)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = _act_grad(dy, x, aux_ptr, offs, mask, mean, scale, bias,
                       x_ptr.dtype.element_ty, ACT, HAS_RES)
        if HAS_RES:
            tl.store(dres_ptr + offs, dy.to(dres_ptr.dtype.element_ty), mask=mask)
        if WRITE_DX:
            tl.store(dx_ptr + offs, (dy * scale[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)
        acc += dy                       # masked lanes hold dy = 0
        accx += dy * (x - mean[None, :])
    c = c0 + tl.arange(0, BLOCK_C)
    cm = c < C
    tl.store(part_ptr + p * C + c, tl.sum(acc, axis=0), mask=cm)
    tl.store(part_ptr + (P + p) * C + c, tl.sum(accx, axis=0), mask=cm)


@triton.jit
def bwd_finalize_kernel(part_ptr, var_ptr, dw_ptr, db_ptr, P, C, eps,
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
        s += tl.sum(tl.load(part_ptr + offs, mask=mask, other=0.0), axis=0)
        sx += tl.sum(tl.load(part_ptr + P * C + offs, mask=mask, other=0.0), axis=0)
    var = tl.load(var_ptr + c, mask=cm, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(db_ptr + c, s.to(db_ptr.dtype.element_ty), mask=cm)
    tl.store(dw_ptr + c, (sx * invstd).to(dw_ptr.dtype.element_ty), mask=cm)


@triton.jit
def bwd_dx_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, dw_ptr, db_ptr,
                  S, C, inv_count, eps, ACT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """dx pass of the training backward:
        dx = w * invstd * (dy' - mean(dy') - xhat * mean(dy' * xhat)),
    the means over the batch being dbias / n and dweight / n. dy_ptr holds dy (z then comes
    from x alone) or d_residual = dy' already (then ACT_NONE)."""
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
    dy = _act_grad(dy, x, dy_ptr, offs, mask, mean, scale, bias,
                   x_ptr.dtype.element_ty, ACT, False)
    xhat = (x - mean[None, :]) * invstd[None, :]
    dx = scale[None, :] * (dy - mean_dy[None, :] - xhat * mean_dyxhat[None, :])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
