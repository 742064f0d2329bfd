"""CIFAR-10 as FFCV .beton files: conversion, reading, and the two training loaders."""
from beton_data.beton import read_beton, write_beton

__all__ = ["read_beton", "write_beton"]
