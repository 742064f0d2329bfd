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


# --shard I/N: run every N-th test (0-based), so that N pytest processes share a many-core GPU
# machine. On a GPU most of the kernel tests' time is Triton compiling each specialisation, one
# at a time per process (bench/gpu_suite.sh runs the GPU tests this way). Tests marked
# `one_shard` (their cases share one results file) all run in shard 0.
def pytest_addoption(parser):
    parser.addoption("--shard", metavar="I/N", default=None,
                     help="run only shard I of N (0 <= I < N): every N-th test; `one_shard` tests in shard 0")


def pytest_configure(config):
    config.addinivalue_line("markers", "one_shard: with --shard, all of these run in shard 0")


def _parse_shard(spec: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--shard {spec!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise pytest.UsageError(f"--shard {spec!r}: need 0 <= I < N")
    return i, n


def pytest_collection_modifyitems(config, items):
    spec = config.getoption("--shard")
    if not spec:
        return
    i, n = _parse_shard(spec)
    keep, drop, k = [], [], 0
    for item in items:
        if item.get_closest_marker("one_shard"):
            mine = i == 0
        else:
            mine, k = k % n == i, k + 1
        (keep if mine else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_sessionfinish(session, exitstatus):
    # a shard left with no tests (more shards than tests) has nothing to fail
    if session.config.getoption("--shard") and exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK
