"""The kernel cache (hits, corruption, concurrent writers) and ahead-of-time builds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tvm
from torch import nn

import sparsedsl as sd
from sparsedsl import cache
from sparsedsl.backends import host
from sparsedsl.backends.tvm import cpu
from sparsedsl.cli import main as cli
from sparsedsl.runtime.aot import SCHEMA_VERSION, AotError

ROOT = Path(__file__).parents[2]
SOURCE = """
kernel lin(X: f32[M, K], W: f32[N, K] @ BSR(4, 1), b: f32[N]) -> (Y: f32[M, N]) {
    Y[m, n] = sum(k) X[m, k] * W[n, k] + b[n]
}
model tiny {
    linear "up" use lin sparsity 0.75
    linear "down" use lin with CSR sparsity 0.5
}
"""


@pytest.fixture
def no_compiler(monkeypatch):
    """Any TVM compilation fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was compiled")

    monkeypatch.setattr(tvm, "compile", refuse)


def _call(prog, fmt="BSR(4, 1)"):
    torch.manual_seed(0)
    w = sd.prune(torch.randn(16, 12), fmt, 0.5)
    x, b = torch.randn(3, 12), torch.randn(16)
    torch.testing.assert_close(prog.lin(x, prog.pack(fmt, w), b), x @ w.T + b, rtol=1e-4, atol=1e-5)


def test_cache_hit_compiles_nothing(tmp_path, monkeypatch):
    _call(sd.compile(SOURCE, cache_dir=tmp_path))
    assert len(list(tmp_path.glob("*.kernel"))) == 1
    monkeypatch.setattr(tvm, "compile", lambda *a, **k: pytest.fail("compiled despite the cache"))
    _call(sd.compile(SOURCE, cache_dir=tmp_path))


@pytest.mark.parametrize("damage", [lambda data: data[:1000], lambda data: data[:64] + b"junk" + data[68:]])
def test_corrupt_entry_is_rebuilt(tmp_path, damage):
    _call(sd.compile(SOURCE, cache_dir=tmp_path))
    (entry,) = tmp_path.glob("*.kernel")
    whole = entry.read_bytes()
    entry.write_bytes(damage(whole))
    _call(sd.compile(SOURCE, cache_dir=tmp_path))
    assert cache.intact(entry)


def test_two_processes_fill_one_cache(tmp_path):
    script = (
        "import sys, torch, sparsedsl as sd\n"
        f"prog = sd.compile({SOURCE!r}, cache_dir=sys.argv[1])\n"
        "w = sd.prune(torch.randn(64, 64), 'BSR(4, 1)', 0.5)\n"
        "x = torch.randn(9, 64)\n"
        "assert torch.allclose(prog.lin(x, prog.pack('BSR(4, 1)', w), torch.zeros(64)), x @ w.T, atol=1e-4)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)]) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert len(list(tmp_path.glob("*.kernel"))) == 1 and not list(tmp_path.glob(".*"))
    _call(sd.compile(SOURCE, cache_dir=tmp_path))


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "tiny.sdsl"
    src.write_text(SOURCE)
    out = tmp_path_factory.mktemp("aot")
    assert cli(["build", str(src), "-o", str(out)]) == 0
    return out


def test_aot_manifest(build_dir):
    manifest = json.loads((build_dir / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert set(manifest["versions"]) == {"sparsedsl", "tvm", "torch"}
    assert manifest["target"]["cpu"]
    assert {"sse2", "cx16"} <= set(manifest["target"]["features"]) <= host.present()
    assert {(k["kernel"], k["format"]) for k in manifest["kernels"]} == {("lin", "BSR(4, 1)"), ("lin", "CSR")}
    assert all(len(k["sha256"]) == 64 and k["signature"].startswith("lin(") for k in manifest["kernels"])


def test_aot_load_compiles_nothing(build_dir, no_compiler):
    prog = sd.load(build_dir)
    _call(prog, "BSR(4, 1)")
    _call(prog, "CSR")
    with pytest.raises(sd.BackendError, match="not built ahead of time"):
        _call(prog, "NM(2, 4)")


def test_aot_loads_private_copies_of_the_checked_bytes(build_dir, monkeypatch):
    """A library swapped in the build after its SHA-256 was checked is never the one loaded."""
    from sparsedsl.backends.tvm import cpu

    loaded = []
    load_module = cpu.load_module

    def record(path):
        loaded.append(Path(path))
        return load_module(path)

    monkeypatch.setattr(cpu, "load_module", record)
    _call(sd.load(build_dir), "CSR")
    assert loaded and all(build_dir not in p.parents for p in loaded)


def test_compile_model_with_aot(build_dir, no_compiler):
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(12, 16), nn.Linear(16, 12)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    model = Tiny()
    compiled = sd.compile_model(model, None, aot=build_dir)
    assert {r.layer for r in sd.report(compiled) if r.sparse} == {"up", "down"}
    x = torch.randn(2, 12)
    ref = nn.Sequential(compiled.up.to_dense(), nn.ReLU(), compiled.down.to_dense())
    torch.testing.assert_close(compiled(x), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m, d: m["versions"].update(tvm="0.1"), "built with tvm 0.1"),
        (lambda m, d: m["target"]["features"].append("sparsedsl-isa"), r"a CPU with sparsedsl-isa, which this one"),
        (lambda m, d: m["target"].pop("features"), "does not list the CPU features its code needs"),
        (lambda m, d: m["target"].update(backend="llvm"), "built with llvmlite None"),
        (lambda m, d: m["target"].update(kind="tpu"), "no target kind 'tpu'"),
        (lambda m, d: m["kernels"][0].update(file="../manifest.json"), "kernels missing or malformed"),
        (lambda m, d: m["kernels"][0].update(kernel="nope"), "a kernel 'nope' that source.sdsl does not define"),
        (lambda m, d: m["rules"].append({"pattern": "x"}), "rules missing or malformed"),
        (lambda m, d: m["attention"].append({"pattern": "x", "window": 4}), "attention missing or malformed"),
        (lambda m, d: m.pop("source"), "source missing or malformed"),
        (lambda m, d: m.update(schema_version=99), "build schema 99"),
        (lambda m, d: (d / m["kernels"][0]["file"]).write_bytes(b"junk"), "does not match its SHA-256"),
        (lambda m, d: (d / "source.sdsl").write_text("# edited"), "does not match the manifest"),
    ],
)
def test_aot_mismatch_is_a_clear_error(build_dir, tmp_path, damage, message):
    copy, manifest = _copy(build_dir, tmp_path)
    damage(manifest, copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(sd.SdslError, match=message):
        sd.load(copy)


def _copy(build_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(build_dir, copy)
    return copy, json.loads((copy / "manifest.json").read_text())


def test_aot_loads_on_another_cpu_with_its_features(build_dir, tmp_path, no_compiler):
    """The CPU's name only tuned the code: a build loads wherever every extension it lists is present."""
    copy, manifest = _copy(build_dir, tmp_path)
    manifest["target"]["cpu"] = "some-other-cpu"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    _call(sd.load(copy))


@pytest.mark.parametrize("lacking", ["avx512f", "sse2"])
def test_aot_refused_on_a_cpu_without_its_features(build_dir, tmp_path, monkeypatch, lacking):
    """A build whose code may use AVX-512 (or SSE2, which every x86-64 build uses), loaded on a CPU
    without it, as the host's feature query reports it."""
    copy, manifest = _copy(build_dir, tmp_path)
    manifest["target"]["features"] = sorted({*manifest["target"]["features"], lacking})
    (copy / "manifest.json").write_text(json.dumps(manifest))
    here = host.present()
    monkeypatch.setattr(host, "present", lambda: here - {lacking})
    with pytest.raises(AotError, match=f"built for a CPU with {lacking}, which this one .* lacks: rebuild it here"):
        sd.load(copy)


def test_features_the_cpu_hides_are_turned_off(monkeypatch):
    """A virtual machine may hide an extension that its CPU's name implies: TVM must not use it."""
    hide = cpu.code_features()[-1]
    here = host.present()
    monkeypatch.setattr(host, "present", lambda: here - {hide})
    cpu.hidden_features.cache_clear()
    try:
        assert hide in cpu.hidden_features()
        assert f"-{hide}" in cpu.host_target().attrs["mattr"]
        assert hide not in cpu.code_features()
    finally:
        cpu.hidden_features.cache_clear()


def test_damaged_manifest(build_dir, tmp_path):
    copy, _ = _copy(build_dir, tmp_path)
    for data, message in ((b"[1]", "not a JSON object"), (b"{", "is damaged"), (b"\xff", "is damaged")):
        (copy / "manifest.json").write_bytes(data)
        with pytest.raises(AotError, match=message):
            sd.load(copy)


def test_missing_build_dir(tmp_path):
    with pytest.raises(sd.SdslError, match="not a sparsedsl build"):
        sd.load(tmp_path)
