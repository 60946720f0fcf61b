"""Test-wide settings: a private kernel cache, so tests neither read nor fill the user's, and
reproducible property tests: ``make test`` (and CI) draws the same examples on every run, while
``make fuzz`` (``SPARSEDSL_FUZZ_EXAMPLES`` set) draws new ones each time."""

import os
import tempfile

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("SPARSEDSL_CACHE_DIR", tempfile.mkdtemp(prefix="sparsedsl-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

settings.register_profile("reproducible", derandomize=True, print_blob=True)
settings.register_profile("fuzz", derandomize=False, print_blob=True)
settings.load_profile("fuzz" if os.environ.get("SPARSEDSL_FUZZ_EXAMPLES") else "reproducible")


@pytest.fixture
def set_threads():
    """``torch.set_num_threads`` for one test (the kernels run on as many threads as torch:
    ``sparsedsl.config.num_threads``), torch's count restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
