"""Shared by tests that count what a region dispatches to ATen (launch counts on the CPU)."""
from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode


class OpLog(TorchDispatchMode):
    """The ops a region dispatches, in order, as "aten.NAME.OVERLOAD" (a custom op's internals
    run below the mode, unseen)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def counts(self) -> collections.Counter:
        """How often each op ran, by its name alone ("bmm", "transpose", ...)."""
        return collections.Counter(op.split(".")[1] for op in self.ops)
