import os
import sys
from pathlib import Path

# `python -m pytest` puts the checkout on sys.path, where its top-level kernels/ (installed as
# mmdit.kernels) would shadow PyPI's `kernels`, which transformers >= 5.25 requires and imports.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton kernels run in the interpreter on machines without CUDA; it is read at import time.
# Inductor's CPU code without SIMD: the tests compare numbers and read the generated wrapper, and
# scalar C++ compiles in a third less time (vectorized codegen and g++ dominate a cold compile).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")  # read when inductor's config is imported

# The test models are tiny: one thread avoids thread hand-off costs that dominate them.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped otherwise)")
    config.addinivalue_line("markers", "slow: cold compiles, several processes, subprocesses "
                                       "(`bash run.sh test -m 'not slow'` leaves them out; CI runs everything)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
