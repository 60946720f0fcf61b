"""Test-wide settings: a private kernel cache, so tests neither read nor fill the user's."""

import os
import tempfile

os.environ.setdefault("SPARSEDSL_CACHE_DIR", tempfile.mkdtemp(prefix="sparsedsl-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
