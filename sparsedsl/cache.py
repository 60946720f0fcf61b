"""On-disk cache of compiled kernels, shared by threads and processes.

An entry is one file, ``KEY.kernel``: the SHA-256 of its key and payload (64 hex digits and a
newline), then the payload (a shared library, a CUDA module's JSON); an entry copied under another
key does not check. Writers write a temporary file and rename it into place, so a reader sees a
whole entry or none, and a checksum is never out of step with what it covers. A reader reads an
entry once, checks it and loads a private copy of the payload, so an entry truncated, overwritten,
replaced or deleted while it loads cannot reach the loaded code. A damaged entry is removed (the
caller rebuilds it); temporary files that a killed process left behind are swept when an entry is
stored. A cache that cannot be written (read-only, deleted, full) costs a warning, never a failed
call.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sparsedsl.version import __version__

ENTRY = ".kernel"
STALE_SECONDS = 3600  # a temporary file this old was left by a process that died writing it
_TEMPORARY = re.compile(r"\.[0-9a-f]{32}\.")  # the names of this cache's temporary files begin so

T = TypeVar("T")


def digest(path: Path) -> str:
    """The SHA-256 of a file, in hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def key_of(*parts: str) -> str:
    """A cache key from everything that determines the compiled code (and sparsedsl's version)."""
    h = hashlib.sha256()
    h.update(__version__.encode())
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` into a temporary file beside ``path``, then rename it into place: readers see the
    old file or the new one, never half of one; concurrent writers each rename a whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def lookup(directory: Path, key: str, load: Callable[[Path], T], suffix: str) -> T | None:
    """What ``load`` makes of the entry for ``key`` (given a private copy of its payload, a file
    named ``*suffix``), or None when there is no usable entry; a damaged one is removed."""
    entry = directory / f"{key}{ENTRY}"
    try:
        with open(entry, "rb") as f:
            data, seen = f.read(), os.fstat(f.fileno())
    except OSError:
        return None
    payload = _payload(key, data)
    if payload is None:
        _discard(entry, seen)
        return None
    private = _private_copy(directory, key, suffix, payload)
    if private is None:
        return None
    try:
        return load(private)
    except Exception:  # noqa: BLE001 - an entry that does not load is as damaged as one that does not check
        _discard(entry, seen)
        return None
    finally:
        private.unlink(missing_ok=True)


def store(directory: Path, key: str, export: Callable[[Path], None], suffix: str) -> None:
    """Write the entry for ``key``: ``export`` writes its payload into a file named ``*suffix``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _sweep(directory)
        exported = _temporary(directory, key, suffix, export)
        try:
            payload = exported.read_bytes()
        finally:
            exported.unlink(missing_ok=True)
        atomic_write(directory / f"{key}{ENTRY}", lambda p: p.write_bytes(_checksum(key, payload) + b"\n" + payload))
    except Exception as err:  # noqa: BLE001 - the caller has its code: a cache it cannot write is no failure
        warnings.warn(f"the kernel cache {directory} could not be written: {err}", stacklevel=3)


def intact(entry: Path) -> bool:
    """Whether the entry file ``entry`` checks: its checksum matches its key and payload."""
    return _payload(entry.name.removesuffix(ENTRY), entry.read_bytes()) is not None


def _payload(key: str, data: bytes) -> bytes | None:
    """The payload of an entry's ``data``, or None if it does not check."""
    head, _, payload = data.partition(b"\n")
    return payload if head == _checksum(key, payload) else None


def _checksum(key: str, payload: bytes) -> bytes:
    return hashlib.sha256(key.encode() + b"\0" + payload).hexdigest().encode()


def _private_copy(directory: Path, key: str, suffix: str, payload: bytes) -> Path | None:
    """A copy of ``payload`` of this process's own: beside the entry, else (a read-only cache) in the
    system's temporary directory; None where neither can be written."""
    for place in (directory, Path(tempfile.gettempdir())):
        try:
            return _temporary(place, key, suffix, lambda p: p.write_bytes(payload))
        except OSError:
            continue
    return None


def _temporary(directory: Path, key: str, suffix: str, write: Callable[[Path], None]) -> Path:
    """A new file of this process's own in ``directory``, written by ``write``."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=f".{key}.", suffix=suffix)
    os.close(fd)
    path = Path(name)
    try:
        write(path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _discard(entry: Path, seen: os.stat_result) -> None:
    """Remove a damaged entry, unless another process has replaced it since it was read."""
    try:
        now = entry.stat()
        if (now.st_ino, now.st_size, now.st_mtime_ns) == (seen.st_ino, seen.st_size, seen.st_mtime_ns):
            entry.unlink()
    except OSError:
        pass


def _sweep(directory: Path) -> None:
    """Remove the temporary files that processes killed while writing them left behind."""
    limit = time.time() - STALE_SECONDS
    for path in directory.iterdir():
        if _TEMPORARY.match(path.name):
            try:
                if path.stat().st_mtime < limit:
                    path.unlink()
            except OSError:
                pass
