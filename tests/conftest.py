import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on
# before triton is first imported (kernels decide at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
