"""sparsedsl's version: part of every kernel cache key and of every ahead-of-time build's manifest."""

__version__ = "0.1.0"
