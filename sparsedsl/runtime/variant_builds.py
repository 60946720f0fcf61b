"""A kernel's CPU variants compiled as calls need them.

A format's kernel has up to five variants (``ir/variants.py``): token tiles, rows, half tiles, a
few tokens, one token. Most programs run one or two of them per format, so compiling all five on
first use spent most of a first call, and most of the test suite, building code that never ran:
one variant builds in a quarter of the time of five (TVM, ``linear`` with a GELU epilogue). Here
each variant is compiled the first time a call picks it; a measured choice (runtime/tuning.py)
compiles the variants it times together, in one module; an ahead-of-time build or a request for
the whole source compiles every variant into one library.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from sparsedsl.ir import loop_ir as L


class VariantBuilds:
    """The compiled variants of one kernel instance, with the backend ``Built`` interface
    (``prepare``, ``functions``, ``source``, ``export``), each compiled by ``build`` on first use.
    ``whole``: a module of every variant already built (an ahead-of-time library)."""

    def __init__(self, funcs: Sequence[L.LoopFunc], build: Callable[[list[L.LoopFunc]], object], whole=None):
        self.funcs = {f.name: f for f in funcs}
        self.build = build
        self.modules: dict[str, object] = dict.fromkeys(self.funcs, whole) if whole is not None else {}
        self.complete = whole  # a module of every variant, once one was built
        self.functions = _Functions(self)

    def require(self, names: Sequence[str]) -> None:
        """Compile, in one module, those of the variants ``names`` not compiled yet. A module once
        stored stays: where two threads compiled the same variant at once, the second keeps the
        first's (calls may be prepared on it already) and drops its own before any use."""
        missing = [name for name in names if name not in self.modules]
        if missing:
            module = self.build([self.funcs[name] for name in missing])
            if len(missing) == len(self.funcs):
                self.complete = module
            for name in missing:
                self.modules.setdefault(name, module)

    def module(self, name: str):
        """The backend module holding variant ``name``, compiled now if no call needed it yet."""
        self.require([name])
        return self.modules[name]

    def prepare(self, name: str, example: Sequence) -> Callable[[Sequence, int], None]:
        """Variant ``name`` for calls whose arguments are shaped like ``example``."""
        return self.module(name).prepare(name, example)

    def whole(self):
        """One module of every variant: the one a measurement or an AOT library made, else built now.
        The modules built before stay where they are: calls prepared on them hold their code's
        addresses, which live only as long as the module (an llvm engine frees its code)."""
        if self.complete is None:
            self.complete = self.build(list(self.funcs.values()))
            for name in self.funcs:
                self.modules.setdefault(name, self.complete)
        return self.complete

    def source(self, stage: str) -> str:
        """The generated code of every variant at ``stage`` (the backend's stages)."""
        return self.whole().source(stage)

    def export(self, path: Path) -> None:
        """A shared library of every variant (an ahead-of-time build's file)."""
        self.whole().export(path)


class _Functions(Mapping):
    """The variants' callables by name, each compiled when first looked up."""

    def __init__(self, builds: VariantBuilds):
        self.builds = builds

    def __getitem__(self, name: str):
        return self.builds.module(name).functions[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.builds.funcs)

    def __len__(self) -> int:
        return len(self.builds.funcs)
