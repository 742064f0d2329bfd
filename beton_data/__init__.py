"""CIFAR-10 as FFCV .beton files: conversion, checking, reading, and the two training loaders.

    from beton_data import (DEFAULT_DATA_DIR, check_data, read_manifest, write_beton, read_beton,
                            make_loader, AugConfig, CIFAR_MEAN, CIFAR_STD)

    data = check_data(folder)          # before training: refuses missing, damaged or foreign data
    data.paths["train"], data.manifest, data.identity, data.name
"""
from beton_data.beton import read_beton, write_beton
from beton_data.integrity import DEFAULT_DATA_DIR, DataFiles, DamagedData, check_beton, check_data
from beton_data.manifest import Manifest, class_names, data_identity, data_name, read_manifest

# The loader API imports torch; load it only when asked for, so that reading and writing .beton
# files (and `fastcifar convert`) stay light.
_LAZY = {"make_loader": "beton_data.loaders", "epoch_order": "beton_data.loaders",
         "AugConfig": "beton_data.augment", "CIFAR_MEAN": "beton_data.augment", "CIFAR_STD": "beton_data.augment"}

__all__ = ["read_beton", "write_beton", "DEFAULT_DATA_DIR", "DataFiles", "DamagedData", "check_beton",
           "check_data", "Manifest", "class_names", "data_identity", "data_name", "read_manifest", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'beton_data' has no attribute {name!r}")
