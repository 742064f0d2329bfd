"""Import ffcv without losing torch's thread count.

Importing ffcv runs ``Compiler.set_num_threads(1)`` (ffcv/pipeline/compiler.py), which also
calls ``torch.set_num_threads(1)``: every later torch CPU op in the process would use one core
(CPU training, evaluation, the GPU-resident loader run on the CPU). Import ffcv through this
module, which puts torch's setting back. The FFCV Loader sets its own (numba) threads when it
is built.
"""
import torch

_threads = torch.get_num_threads()
import ffcv  # noqa: E402,F401

torch.set_num_threads(_threads)
