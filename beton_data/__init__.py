"""CIFAR-10 as FFCV .beton files: conversion, reading, and the two training loaders.

    from beton_data import write_beton, read_beton, make_loader, AugConfig, CIFAR_MEAN, CIFAR_STD
"""
from beton_data.beton import read_beton, write_beton

# The loader API imports torch; load it only when asked for, so that reading and writing .beton
# files (and `fastcifar convert`) stay light.
_LAZY = {"make_loader": "beton_data.loaders", "epoch_order": "beton_data.loaders",
         "AugConfig": "beton_data.augment", "CIFAR_MEAN": "beton_data.augment", "CIFAR_STD": "beton_data.augment"}

__all__ = ["read_beton", "write_beton", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'beton_data' has no attribute {name!r}")
