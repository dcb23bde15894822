"""Shared pytest setup: repo root on sys.path, the `gpu` marker skips without CUDA, and
TRITON_INTERPRET=1 on CPU-only machines so the Triton kernels run in the interpreter."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


@pytest.hookimpl(trylast=True)       # after -m / -k have deselected
def pytest_collection_modifyitems(config, items):
    # MULTILORA_SHARD=i/n keeps every n-th test from the i-th: tests/gpu_run.sh runs the
    # long GPU files as n processes side by side.
    shard = os.environ.get("MULTILORA_SHARD")
    if shard:
        i, n = (int(v) for v in shard.split("/"))
        keep = items[i::n]
        config.hook.pytest_deselected(items=[t for t in items if t not in keep])
        items[:] = keep
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs CUDA (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """Where CPU tests run their tensors (the GPU suite passes device='cuda' itself)."""
    return "cpu"


@pytest.fixture(scope="module")
def one_thread():
    """2 shared cores: OpenMP contention makes tiny matmuls up to 100x slower; torch runs
    on one thread for the module, then gets its thread count back."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
