"""The exception family of sparsedsl: every error a user can cause carries a source span.

Rendering (``FILE:LINE:COL: error: MESSAGE``, the source line and a caret) lives here and only here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A region of a source file: 1-based line and column, end exclusive."""

    line: int
    column: int
    end_line: int
    end_column: int

    def __str__(self) -> str:
        return f"{self.line}:{self.column}"


@dataclass(frozen=True)
class Source:
    """The text of a .sdsl file and the name to report it under."""

    text: str
    filename: str = "<string>"

    def line_text(self, line: int) -> str:
        lines = self.text.split("\n")  # the parser counts only newlines, not form feeds and the like
        return lines[line - 1].rstrip("\r") if 0 < line <= len(lines) else ""


class SdslError(Exception):
    """Base class of every error sparsedsl reports to its users."""

    kind = "error"

    def __init__(self, message: str, span: Span | None = None, source: Source | None = None):
        super().__init__(message)
        self.message = message
        self.span = span
        self.source = source

    def with_source(self, source: Source) -> SdslError:
        """Attach the source text, unless one is already attached; returns self."""
        if self.source is None:
            self.source = source
        return self

    def render(self) -> str:
        """``FILE:LINE:COL: error: MESSAGE`` followed by the source line and a caret."""
        if self.span is None or self.source is None:
            return f"{self.source.filename}: error: {self.message}" if self.source else self.message
        span = self.span
        head = f"{self.source.filename}:{span.line}:{span.column}: error: {self.message}"
        text = self.source.line_text(span.line)
        if not text:
            return head
        width = span.end_column - span.column if span.end_line == span.line else 1
        caret = " " * (span.column - 1) + "^" + "~" * max(0, width - 1)
        return f"{head}\n{text}\n{caret}"

    def __str__(self) -> str:
        return self.render()


class SourceFileError(SdslError):
    """A .sdsl file cannot be read as source: missing, a directory, unreadable, binary, not UTF-8,
    empty or too large."""


class SdslSyntaxError(SdslError):
    """The text does not follow the grammar."""


class SdslSemanticError(SdslError):
    """The text parses but means nothing valid: unknown names, mismatched shapes, bad formats."""


class ScheduleError(SdslError):
    """A schedule directive is illegal for the kernel it is applied to."""


class PackError(SdslError):
    """A dense tensor cannot be stored in the requested format."""


class ArgumentError(SdslError):
    """A tensor handed to a compiled kernel does not fit its signature."""


class BackendError(SdslError):
    """The target cannot generate code for a kernel (for example an unsupported dtype)."""
