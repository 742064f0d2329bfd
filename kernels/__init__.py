"""Triton kernels of fastcifar. See kernels/README.md for what each moves and why.

    from kernels import bn_relu      # act(batch_norm(x) + residual), fused, with autograd;
                                     # act relu (default), gelu or None

The module the models use, with running statistics and a backend switch, is
fastcifar.models.NormAct (its `triton` backend calls bn_relu).
"""
from kernels.batchnorm import bn_relu

__all__ = ["bn_relu"]
