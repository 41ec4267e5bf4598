"""Set-up shared by the Triton kernel tests: the device, the CUDA-only mark, the kernel modules, the seed fixture.

Without CUDA the kernels run under the Triton interpreter. A kernel is decorated when its module is imported, so
TRITON_INTERPRET must be set before triton is: tests/conftest.py sets it, and pytest loads it before this file and
before any test module. Test modules import the names here as ``from tests.kernels.conftest import ...``.
"""

import importlib
import random
from types import ModuleType

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def kernel_module(name: str, kernel: str, *imports_from: str) -> ModuleType:
    """``fewstep.kernels.<name>``; skips the test module where triton is missing.

    Without CUDA its Triton function ``kernel`` must be the interpreter's: a module imported earlier in this process
    without the interpreter flag is reloaded (re-decorated) under it, after the modules it takes kernels from
    (``imports_from``, names under fewstep.kernels too).
    """
    pytest.importorskip("triton")
    mod = importlib.import_module(f"fewstep.kernels.{name}")
    if not torch.cuda.is_available() and type(getattr(mod, kernel)).__name__ != "InterpretedFunction":
        for dep in imports_from:
            importlib.reload(importlib.import_module(f"fewstep.kernels.{dep}"))
        mod = importlib.reload(mod)
    return mod


@pytest.fixture
def seed():
    """A fresh random seed per test, set in torch; failures print it."""
    s = random.SystemRandom().randrange(2**31)
    torch.manual_seed(s)
    return s
