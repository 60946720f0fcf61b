"""Reading .sdsl sources: what is a path, and every file that cannot be source text refused in one
located line (``PATH: error: ...``), by ``sd.compile`` as by ``read_source``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsedsl as sd
from sparsedsl.errors import SdslError, SourceFileError
from sparsedsl.frontend.check import check
from sparsedsl.frontend.source import MAX_SOURCE_BYTES, read_source

KERNEL = "kernel k(X: f32[M, K], W: f32[N, K] @ CSR) -> (Y: f32[M, N]) {\n    Y[m, n] = sum(k) X[m, k] * W[n, k]\n}\n"

# name -> (file content, expected message); None: the path is made by hand in ``bad_path``
BAD_FILES = {
    "empty": (b"", "is empty"),
    "blank": (b"  \n\t\n", "is empty"),
    "binary": (b"\x7fELF\x02\x01\x01\x00\x00\x00", ":1:8: error: is a binary file, not .sdsl text"),
    "latin1": ("kernel k()\n# caf\xe9\n".encode("latin-1"), ":2:6: error: is not UTF-8 text (byte 0xe9)"),
    "huge": (b"# " + b"x" * MAX_SOURCE_BYTES + b"\n", "larger than the limit of 1.0 MiB"),
    "directory": (None, "is a directory, not a .sdsl file"),
    "fifo": (None, "is not a regular file"),
    "missing": (None, "no such file"),
}


def bad_path(tmp_path: Path, name: str) -> Path:
    """A path that cannot be read as source, of the kind ``name``."""
    path = tmp_path / f"{name}.sdsl"
    content = BAD_FILES[name][0]
    if content is not None:
        path.write_bytes(content)
    elif name == "directory":
        path.mkdir()
    elif name == "fifo":
        os.mkfifo(path)  # opening it would wait for a writer forever
    return path


def one_line(err: SdslError) -> str:
    rendered = err.render()
    assert "\n" not in rendered, rendered
    return rendered


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_are_one_line_errors(tmp_path, name):
    path = bad_path(tmp_path, name)
    for arg in (path, str(path)):
        with pytest.raises(SourceFileError) as info:
            sd.compile(arg)
        line = one_line(info.value)
        assert line.startswith(f"{path}:") and "error: " in line, line
        assert BAD_FILES[name][1] in line, line


def unreadable(tmp_path: Path, monkeypatch) -> Path:
    """A file without read permission; as root, which reads it anyway, every open is refused."""
    path = tmp_path / "secret.sdsl"
    path.write_text(KERNEL)
    path.chmod(0)
    if os.geteuid() == 0:

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(Path, "open", refuse)
    return path


def test_unreadable_file(tmp_path, monkeypatch):
    path = unreadable(tmp_path, monkeypatch)
    with pytest.raises(SourceFileError) as info:
        read_source(path)
    assert one_line(info.value) == f"{path}: error: cannot read: Permission denied"


def test_a_byte_order_mark_is_not_text(tmp_path):
    path = tmp_path / "bom.sdsl"
    path.write_bytes(b"\xef\xbb\xbf" + KERNEL.encode())
    assert read_source(path).text == KERNEL
    path.write_bytes(b"\xef\xbb\xbfab\xff")
    with pytest.raises(SourceFileError, match=r":1:3: error: is not UTF-8 text \(byte 0xff\)"):
        read_source(path)


def test_neither_path_nor_text():
    with pytest.raises(SourceFileError, match="expected a path or the source text, got bytes"):
        sd.compile(KERNEL.encode())


@pytest.mark.parametrize("text", ["/some/dir", "examples/linear", "~/kernels/linear.sdsl", "linear.sdsl", "./x"])
def test_strings_that_look_like_paths_are_paths(text):
    with pytest.raises(SourceFileError, match="no such file"):
        read_source(text)


def test_an_existing_directory_is_a_path(tmp_path):
    with pytest.raises(SourceFileError, match="is a directory"):
        sd.compile(str(tmp_path))


@pytest.mark.parametrize(
    "text",
    [
        KERNEL,
        KERNEL.replace("\n", " "),  # one line: '/' in it is a division, not a path
        "format Half = (i, j) -> (i / 2: dense, j: compressed, i % 2: dense)",
    ],
)
def test_source_text_is_text(text):
    assert read_source(text).text == text
    assert read_source(text).filename == "<string>"


def test_huge_source_text():
    with pytest.raises(SourceFileError) as info:
        read_source("# " + "x" * MAX_SOURCE_BYTES + "\nformat F = (i) -> (i: dense)\n")
    assert one_line(info.value) == "<string>: error: is 1.0 MiB, larger than the limit of 1.0 MiB"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode), st.just(KERNEL.encode())))
def test_any_bytes_are_source_or_one_line(tmp_path, data):
    """Whatever a file holds: its text, or one located line; checking that text raises only SdslError."""
    path = tmp_path / "any.sdsl"
    path.write_bytes(data)
    try:
        source = read_source(path)
    except SourceFileError as err:
        assert one_line(err).startswith(f"{path}:"), err.render()
        return
    try:
        check(source)
    except SdslError as err:
        assert err.render().startswith(f"{path}:"), err.render()
