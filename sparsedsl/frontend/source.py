"""Reading .sdsl text: a path or the text itself, refused with a one-line error when it is not a
readable, non-empty UTF-8 text file of at most ``MAX_SOURCE_BYTES``."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sparsedsl.errors import Source, SourceFileError, Span

MAX_SOURCE_BYTES = 1 << 20  # 1 MiB: a thousand times the largest real .sdsl file
_PATH_CHARACTERS = "/\\~."


def read_source(path_or_source: str | os.PathLike) -> Source:
    """A Source from a path to a .sdsl file, or from the text itself. A ``PathLike`` is a path; so is
    a string without a newline that names an existing file or directory, ends in ``.sdsl``, or is
    one word with a path character (``/ \\ ~ .``) in it: no declaration is one word."""
    if not isinstance(path_or_source, str | os.PathLike):
        raise SourceFileError(f"expected a path or the source text, got {type(path_or_source).__name__}")
    if isinstance(path_or_source, os.PathLike) or _names_a_path(path_or_source):
        return read_file(Path(path_or_source).expanduser())
    size = len(path_or_source.encode(errors="replace"))
    if size > MAX_SOURCE_BYTES:
        raise SourceFileError(
            f"is {_size(size)}, larger than the limit of {_size(MAX_SOURCE_BYTES)}", None, Source("", "<string>")
        )
    return Source(path_or_source, "<string>")


def _names_a_path(text: str) -> bool:
    if "\n" in text:
        return False
    one_word = bool(text) and not any(c.isspace() for c in text)
    return (
        text.endswith(".sdsl")
        or (one_word and any(c in _PATH_CHARACTERS for c in text))
        or os.path.exists(os.path.expanduser(text))
    )


def read_file(path: Path) -> Source:
    """The text of a .sdsl file; SourceFileError (``PATH: error: ...``) when it cannot be one."""

    def error(message: str, span: Span | None = None) -> SourceFileError:
        return SourceFileError(message, span, Source("", str(path)))  # no text: nothing to quote

    try:
        info = path.stat()
    except FileNotFoundError:
        raise error("no such file") from None
    except OSError as err:
        raise error(f"cannot read: {err.strerror or err}") from None
    if stat.S_ISDIR(info.st_mode):
        raise error("is a directory, not a .sdsl file")
    if not stat.S_ISREG(info.st_mode):
        raise error("is not a regular file")  # a FIFO or a device: reading could block forever
    if info.st_size > MAX_SOURCE_BYTES:
        raise error(f"is {_size(info.st_size)}, larger than the limit of {_size(MAX_SOURCE_BYTES)}")
    try:
        with path.open("rb") as file:
            data = file.read(MAX_SOURCE_BYTES + 1)
    except OSError as err:
        raise error(f"cannot read: {err.strerror or err}") from None
    if len(data) > MAX_SOURCE_BYTES:  # grew since stat
        raise error(f"is larger than the limit of {_size(MAX_SOURCE_BYTES)}")
    data = data.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark: not part of the text
    bad = data.find(b"\0")
    if bad >= 0:
        raise error("is a binary file, not .sdsl text (a NUL byte)", _span_at(data, bad))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        byte = data[err.start : err.start + 1].hex()
        raise error(f"is not UTF-8 text (byte 0x{byte}): save it as UTF-8", _span_at(data, err.start)) from None
    if not text.strip():
        raise error("is empty")
    return Source(text, str(path))


def _span_at(data: bytes, offset: int) -> Span:
    """The line and column (in characters) of a byte offset, as the parser would count them."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    line = data.count(b"\n", 0, offset) + 1
    column = len(data[line_start:offset].decode("utf-8", errors="replace")) + 1
    return Span(line, column, line, column + 1)


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"
