"""The .sdsl examples of docs/LANGUAGE.md check, as the document promises."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import sparsedsl as sd
from sparsedsl.errors import Source
from sparsedsl.frontend.check import check

DOC = Path(__file__).parents[1] / "docs" / "LANGUAGE.md"
BLOCKS = [b for b in re.findall(r"```\n(.*?)```", DOC.read_text(), re.S) if re.match(r"\s*(format|kernel|schedule)", b)]
KERNEL = next(b for b in BLOCKS if "kernel linear_gelu" in b)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.split("\n", 1)[0][:40] for b in BLOCKS])
def test_language_examples_check(block):
    if block.lstrip().startswith("schedule"):
        sd.compile(KERNEL + block)  # lowering applies the schedule: its loops must exist
    else:
        check(Source(block, "LANGUAGE.md"))


def test_there_are_examples():
    assert len(BLOCKS) >= 7
