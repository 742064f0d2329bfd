"""Triton kernels of fastcifar. See kernels/README.md for what each moves and why."""
from kernels.batchnorm import BatchNormReLU2d, bn_relu

__all__ = ["bn_relu", "BatchNormReLU2d"]
