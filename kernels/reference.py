"""Reference implementation of kernels.bn_relu in plain torch ops, for the tests.

It spells out the math the kernels implement, stage by stage, in whatever dtype it is given
(the tests give it float64 copies of the inputs, so it is the oracle, not the thing under test).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def bn_relu_reference(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Optional[Tensor],
                      running_var: Optional[Tensor], training: bool, momentum: float = 0.1,
                      eps: float = 1e-5, residual: Optional[Tensor] = None,
                      act: Optional[str] = "relu") -> Tensor:
    """act(batch_norm(x) + residual) computed in x's dtype, act "relu", "gelu" (exact) or
    None; differentiable by autograd.
    Updates running_mean/running_var in place in training, as F.batch_norm does."""
    dims = (0, 2, 3)
    if training:
        n = x.numel() // x.shape[1]
        mean = x.mean(dims)
        var = ((x - mean[None, :, None, None]) ** 2).mean(dims)            # biased
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
                running_var.mul_(1 - momentum).add_(
                    momentum * (var * n / (n - 1)).to(running_var.dtype))  # unbiased
    else:
        mean, var = running_mean.to(x.dtype), running_var.to(x.dtype)
    shape = (1, -1, 1, 1)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)
    y = y * weight.to(x.dtype).view(shape) + bias.to(x.dtype).view(shape)
    if residual is not None:
        y = y + residual
    if act == "relu":
        return torch.relu(y)
    if act == "gelu":       # x * Phi(x), spelled out
        return 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    assert act is None, act
    return y
