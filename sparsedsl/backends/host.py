"""The host CPU's instruction-set extensions as LLVM names them (``avx2``, ``fma``, ``avx512f``...):
what the CPU backends compile for, and what an ahead-of-time build checks where it is loaded."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache

import llvmlite.binding as llvm

# The extensions LLVM may use on its own in compiled arithmetic: vectors, fused multiply-adds,
# half-precision conversions, bit manipulation. The others (mwaitx, rdpru, sha...) are used only
# through intrinsics no kernel calls, and virtual machines often hide them from a CPU that has them.
_USED_IN_CODE = re.compile(r"sse|ssse3|avx|fma|f16c|bmi|lzcnt|popcnt|xop|cmov|movbe|cx16")


@cache
def present() -> frozenset[str]:
    """The extensions this CPU has."""
    return frozenset(name for name, on in llvm.get_host_cpu_features().items() if on)


def used_in_code(features: Iterable[str]) -> list[str]:
    """Those of ``features`` that code compiled for them may contain, sorted."""
    return sorted(f for f in features if _USED_IN_CODE.match(f))


def dot_group(features: Iterable[str]) -> int:
    """Products per int32 lane of the integer dot-product instruction code for ``features`` uses
    (``ir/dot_products.py``): 4 where the llvm backend's table has a 256-bit ``vpdpbusd`` for them
    (AVX-VNNI, or AVX-512 VNNI with VL), else 2 (``vpmaddwd``)."""
    from sparsedsl.backends.llvm.codegen import DOT_INTRINSICS, provides

    return 4 if provides(DOT_INTRINSICS[("int8", 4, 8)], frozenset(features)) else 2


def bf16_dot(features: Iterable[str]) -> bool:
    """Whether code for ``features`` sums bf16 pairs with ``vdpbf16ps`` (AVX-512 BF16 with VL)."""
    from sparsedsl.backends.llvm.codegen import DOT_INTRINSICS, provides

    return provides(DOT_INTRINSICS[("bf16", 2, 8)], frozenset(features))
