"""Measured variant choice (runtime/tuning.py): measured once per shape bucket and thread count,
remembered in the kernel cache and in AOT builds, never measured again where remembered; any
variant chosen gives the dense answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sparsedsl as sd
from sparsedsl.runtime import tuning

EXAMPLE = Path(__file__).parents[2] / "examples" / "linear.sdsl"


@pytest.fixture
def measured(monkeypatch):
    """The variant sets measured, in order; every call of some work is measured."""
    monkeypatch.setattr(tuning, "MEASURED_WORK", 1)
    monkeypatch.delenv("SPARSEDSL_TUNE", raising=False)
    calls: list[list[str]] = []
    fastest = tuning.fastest

    def recording(runs):
        calls.append(sorted(runs))
        return fastest(runs)

    monkeypatch.setattr(tuning, "fastest", recording)
    return calls


def case(prog, tokens: int, fmt: str = "CSR"):
    torch.manual_seed(tokens)
    w = prog.pack(fmt, sd.prune(torch.randn(48, 64), prog.format(fmt), 0.7))
    x, b = torch.randn(tokens, 64), torch.randn(48)
    return (x, w, b), x @ w.to_dense().T + b


def choice_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("choices-*.json"))


def test_measured_once_per_bucket_and_remembered_across_processes(tmp_path, measured):
    prog = sd.compile(EXAMPLE, cache_dir=tmp_path)
    for tokens in (40, 33, 64, 3, 40):  # buckets 64, 64, 64, 4, 64
        args, expected = case(prog, tokens)
        torch.testing.assert_close(prog.linear(*args), expected)
    assert len(measured) == 2 and all(len(names) > 1 for names in measured)
    (file,) = choice_files(tmp_path)
    assert len(json.loads(file.read_text())) == 2
    again = sd.compile(EXAMPLE, cache_dir=tmp_path)  # another Program: reads the file
    args, expected = case(again, 50)
    torch.testing.assert_close(again.linear(*args), expected)
    assert len(measured) == 2


def test_each_backend_measures_its_own_choice(tmp_path, measured):
    """The same variants' loop IR compiles to different code per backend, with different relative
    speeds: a choice one backend measured is not taken by the other."""
    for backend in ("tvm", "llvm", "tvm"):
        prog = sd.compile(EXAMPLE, backend=backend, cache_dir=tmp_path)
        args, expected = case(prog, 40)
        torch.testing.assert_close(prog.linear(*args), expected)
    assert len(measured) == 2
    (file,) = choice_files(tmp_path)
    assert len(json.loads(file.read_text())) == 2


@pytest.mark.parametrize("backend", ["tvm", "llvm"])
def test_every_variant_a_choice_may_name_gives_the_dense_answer(tmp_path, backend, monkeypatch):
    monkeypatch.setattr(tuning, "MEASURED_WORK", 1)
    prog = sd.compile(EXAMPLE, cache_dir=tmp_path, backend=backend)
    args, expected = case(prog, 21)
    inst = prog.linear.instance_for(args[1])
    for variant in inst.variants.values():
        monkeypatch.setattr(tuning, "fastest", lambda runs, name=variant.name: name)
        fresh = sd.compile(EXAMPLE, cache_dir=None, backend=backend)
        torch.testing.assert_close(fresh.linear(*args), expected)


def test_measuring_off_and_small_work_keep_the_rule(tmp_path, measured, monkeypatch):
    monkeypatch.setenv("SPARSEDSL_TUNE", "0")
    prog = sd.compile(EXAMPLE, cache_dir=tmp_path)
    args, expected = case(prog, 40)
    torch.testing.assert_close(prog.linear(*args), expected)
    monkeypatch.setenv("SPARSEDSL_TUNE", "1")
    monkeypatch.setattr(tuning, "MEASURED_WORK", 1 << 40)
    args, expected = case(prog, 41)
    torch.testing.assert_close(prog.linear(*args), expected)
    assert measured == [] and choice_files(tmp_path) == []


def test_a_damaged_choices_file_is_measured_over(tmp_path, measured):
    prog = sd.compile(EXAMPLE, cache_dir=tmp_path)
    args, _ = case(prog, 40)
    prog.linear(*args)
    (file,) = choice_files(tmp_path)
    file.write_text("{not json")
    again = sd.compile(EXAMPLE, cache_dir=tmp_path)
    args, expected = case(again, 40)
    torch.testing.assert_close(again.linear(*args), expected)
    assert len(measured) == 2 and json.loads(file.read_text())


def test_aot_builds_carry_the_choices_of_the_machine(tmp_path, measured, monkeypatch):
    monkeypatch.setenv("SPARSEDSL_CACHE_DIR", str(tmp_path / "cache"))
    source = EXAMPLE.read_text().split("kernel linear_gelu")[0]  # the format and `linear` only: a quicker build
    prog = sd.compile(source)
    args, _ = case(prog, 40, "BSR(4, 1)")  # the format the build compiles (the kernel's own)
    prog.linear(*args)
    assert len(measured) == 1
    out = sd.build(source, tmp_path / "aot")
    assert len(json.loads((out / "manifest.json").read_text())["choices"]) == 1
    loaded = sd.load(out)
    args, expected = case(loaded, 40, "BSR(4, 1)")
    torch.testing.assert_close(loaded.linear(*args), expected)
    assert len(measured) == 1


def test_a_stall_during_every_run_of_few_rounds_does_not_decide(monkeypatch):
    """The rounds go on until they span ``MIN_SPAN_S``: a variant slowed by a stall of the machine
    through its first rounds is still seen at its speed, and chosen."""
    monkeypatch.setattr(tuning, "MIN_SPAN_S", 0.05)
    started = tuning.time.perf_counter()
    seconds = {"fast": 0.001, "slow": 0.002}

    def run(name):
        stalled = tuning.time.perf_counter() - started < 0.02  # the first rounds, all of them
        tuning.time.sleep(seconds[name] * (4 if stalled and name == "fast" else 1))

    assert tuning.fastest({n: lambda n=n: run(n) for n in seconds}) == "fast"
