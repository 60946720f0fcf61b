"""On-disk cache of compiled kernels: one shared library per key, written atomically, checked by
a SHA-256 on every load (a corrupt or truncated entry is detected and rebuilt)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def key_of(*parts: str) -> str:
    """A cache key from everything that determines the compiled code (and sparsedsl's version)."""
    from sparsedsl import __version__

    h = hashlib.sha256()
    h.update(__version__.encode())
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` into a temporary file beside ``path``, then rename it into place: readers see the
    old entry or the new one, never half of one; concurrent writers each rename a whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def lookup(directory: Path, key: str, load: Callable[[Path], object]) -> object | None:
    """The cached object for ``key``, or None if absent or corrupt (then the entry is removed)."""
    lib, check = directory / f"{key}.so", directory / f"{key}.sha256"
    if not lib.exists() or not check.exists():
        return None
    try:
        if check.read_text().strip() != digest(lib):
            raise ValueError("checksum mismatch")
        return load(lib)
    except Exception:  # noqa: BLE001 - any failure to load means: rebuild
        for p in (lib, check):
            p.unlink(missing_ok=True)
        return None


def store(directory: Path, key: str, export: Callable[[Path], None]) -> None:
    """Write the entry for ``key`` (library, then its checksum)."""
    lib = directory / f"{key}.so"
    atomic_write(lib, export)
    atomic_write(directory / f"{key}.sha256", lambda p: p.write_text(digest(lib)))
