"""A kernel's CPU variants are compiled as calls need them (runtime/variant_builds.py): a call
compiles the one it runs, a measured choice the ones it times, together, and an ahead-of-time
build or the whole source every variant in one library."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import pytest
import torch

import sparsedsl as sd
from sparsedsl.runtime import tuning
from sparsedsl.runtime.variant_builds import VariantBuilds

EXAMPLE = Path(__file__).parents[2] / "examples" / "linear.sdsl"


@pytest.fixture(params=["tvm", "llvm"])
def compiled(request, monkeypatch):
    """A program whose backend builds are recorded: the variant names of each, in order."""
    prog = sd.compile(EXAMPLE, backend=request.param, cache_dir=None)
    builds: list[list[str]] = []
    build = prog.backend_build

    def recording(funcs):
        builds.append([f.name for f in funcs])
        return build(funcs)

    monkeypatch.setattr(prog, "backend_build", recording)
    return prog, builds


def case(prog, tokens: int):
    torch.manual_seed(tokens)
    w = sd.prune(torch.randn(48, 64), prog.format("CSR"), 0.7)
    x, b = torch.randn(tokens, 64), torch.randn(48)
    return x, w, b


def test_a_call_compiles_only_the_variant_it_runs(compiled, monkeypatch):
    prog, builds = compiled
    monkeypatch.setattr(tuning, "MEASURED_WORK", 1 << 40)
    x, w, b = case(prog, 1)
    W = prog.pack("CSR", w)
    torch.testing.assert_close(prog.linear(x, W, b), x @ w.T + b)
    (first,) = builds
    assert len(first) == 1
    x = torch.randn(40, 64)
    torch.testing.assert_close(prog.linear(x, W, b), x @ w.T + b)
    assert len(builds) == 2 and len(builds[1]) == 1 and builds[1] != first
    torch.testing.assert_close(prog.linear(x, W, b), x @ w.T + b)
    assert len(builds) == 2


def test_a_measurement_compiles_the_rest_together(compiled, monkeypatch):
    prog, builds = compiled
    monkeypatch.setattr(tuning, "MEASURED_WORK", 1)
    monkeypatch.delenv("SPARSEDSL_TUNE", raising=False)
    x, w, b = case(prog, 40)
    W = prog.pack("CSR", w)
    torch.testing.assert_close(prog.linear(x, W, b), x @ w.T + b)
    inst = prog.linear.instance_for(W)
    assert builds == [[v.name for v in inst.variants.values()]]


def test_the_whole_source_and_an_export_hold_every_variant(compiled, tmp_path):
    prog, builds = compiled
    x, w, b = case(prog, 1)
    W = prog.pack("CSR", w)
    prog.linear(x, W, b)
    inst = prog.linear.instance_for(W)
    names = [v.name for v in inst.variants.values()]
    stage = "tir" if prog.backend == "tvm" else "llvm"
    source = inst.built.source(stage)
    assert all(name in source for name in names)
    inst.built.export(tmp_path / "kernels.so")
    assert builds[-1] == names and len(builds) == 2  # the whole module built once, then reused
    gc.collect()  # the first call's module, on which its bound call was prepared, must still be there
    torch.testing.assert_close(prog.linear(x, W, b), x @ w.T + b)


def test_a_library_of_every_variant_is_never_built_again():
    calls = []
    whole = object()
    funcs = [type("F", (), {"name": n})() for n in ("a", "b")]
    builds = VariantBuilds(funcs, calls.append, whole=whole)
    assert builds.module("a") is whole and builds.whole() is whole and calls == []


def test_two_threads_compiling_one_variant_keep_the_first_module(monkeypatch):
    """Threads A and B meet the same variant first at once; B's build ends after A has run on
    its own: A's bound call must still find its code (llvm frees code with its engine)."""
    monkeypatch.setattr(tuning, "MEASURED_WORK", 1 << 40)
    prog = sd.compile(EXAMPLE, backend="llvm", cache_dir=None)
    x_a, x_b, w, b = torch.randn(2, 64), torch.randn(3, 64), *case(prog, 1)[1:]
    W = prog.pack("CSR", w)
    inst = prog.linear.instance_for(W)
    assert inst.function_name({"M": 2}, 2) == inst.function_name({"M": 3}, 2)
    b_building, a_done = threading.Event(), threading.Event()
    build = inst.built.build

    def ordered(funcs):
        if threading.current_thread().name == "B":
            b_building.set()
            a_done.wait(60)
        return build(funcs)

    inst.built.build = ordered
    results = {}

    def run(name, x):
        if name == "A":
            b_building.wait(60)
        results[name] = prog.linear(x, W, b)
        if name == "A":
            a_done.set()

    threads = [threading.Thread(target=run, args=(n, x), name=n) for n, x in (("B", x_b), ("A", x_a))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gc.collect()
    for name, x in (("A", x_a), ("B", x_b)):
        torch.testing.assert_close(results[name], x @ w.T + b)
        torch.testing.assert_close(prog.linear(x, W, b), x @ w.T + b)
