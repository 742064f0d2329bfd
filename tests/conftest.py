import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on
# before triton is first imported (kernels decide at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Checksums of .beton files are cached (beton_data.integrity); the tests' cache is their own, in
# a temporary folder, never the user's ~/.cache/fastcifar. Subprocesses inherit it.
if "FASTCIFAR_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["FASTCIFAR_CACHE"] = tempfile.mkdtemp(prefix="fastcifar-test-cache-")
    atexit.register(shutil.rmtree, os.environ["FASTCIFAR_CACHE"], ignore_errors=True)


import pytest  # noqa: E402


@pytest.fixture
def no_tf32():
    """TF32 off for the test (on a GPU, TF32 convolutions and matmuls would swamp comparisons
    with float64 references). Saved and restored by hand: these are properties backed by
    torch._C, which pytest's monkeypatch (9.2) records as absent and then fails to restore."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    yield
    cudnn.allow_tf32, matmul.allow_tf32 = saved
