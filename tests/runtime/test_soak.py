"""Soak: threads and processes compile and call kernels against one shared cache directory while
its entries are truncated, overwritten with junk and deleted under them. Every call must return
the dense answer or a clear SdslError, nothing may hang, and afterwards the cache must be whole."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import sparsedsl as sd
from sparsedsl import cache
from sparsedsl.backends.tvm.cpu import load_module

ROOT = Path(__file__).parents[2]
SOURCE = """
kernel mv(W: f32[N, K] @ CSR, x: f32[K]) -> (y: f32[N]) {
    y[n] = sum(k) W[n, k] * x[k]
}
"""
FORMATS = ("CSR", "BSR(2, 1)")  # two instances of one kernel: two cache entries
STORM_SECONDS = 4
PROCESSES = 2
THREADS = 3  # on the tvm backend, which caches on disk; one more on llvm, which compiles in memory
TIMEOUT = 240  # seconds: past this a worker is taken to hang


def storm(cache_dir: str, stop: Path, ready: Path, backend: str = "tvm") -> Counter:
    """Compile and call every format until ``stop`` exists; ``ready`` is written after the first
    round. Counts right answers and SdslErrors; anything else raises."""
    torch.manual_seed(0)
    w, x = torch.randn(8, 6), torch.randn(6)
    counts: Counter = Counter()
    while True:
        for fmt in FORMATS:
            try:
                prog = sd.compile(SOURCE, backend=backend, cache_dir=cache_dir)
                packed = prog.pack(fmt, w)
                y = prog.mv(packed, x)
                wrong = not torch.allclose(y, packed.to_dense() @ x, rtol=1e-4, atol=1e-5)
                counts["wrong" if wrong else "right"] += 1
            except sd.SdslError as err:  # a clear error is an allowed outcome
                counts[f"{type(err).__name__}: {err.message}"] += 1
        ready.touch()
        if stop.exists():
            return counts


def one_round(directory: Path) -> None:
    """``storm`` for one round: every answer right."""
    with tempfile.TemporaryDirectory() as tmp:
        done = Path(tmp) / "done"
        done.touch()
        assert storm(str(directory), done, done)["right"] == len(FORMATS)


def worker_main() -> None:
    """A process of the soak: ``storm`` with the arguments of the command line; counts on stdout."""
    cache_dir, stop, ready = sys.argv[1:4]
    print(json.dumps(storm(cache_dir, Path(stop), Path(ready))))


def vandal(directory: Path, stop: threading.Event, seed: int) -> Counter:
    """Damage the cache's entries at random until ``stop``: in place (truncated, junk written into
    it, a wrong checksum), replaced by junk, deleted; now and then the whole directory."""
    rng = random.Random(seed)

    def junk_inside(p: Path) -> None:
        with open(p, "r+b") as f:
            f.seek(rng.randrange(max(1, p.stat().st_size)))
            f.write(rng.randbytes(64))

    actions = {
        "truncate": lambda p: p.write_bytes(p.read_bytes()[: rng.randrange(200)]),
        "junk inside": junk_inside,
        "wrong checksum": lambda p: p.write_bytes(b"0" * 64 + p.read_bytes()[64:]),
        "replaced by junk": lambda p: cache.atomic_write(p, lambda t: t.write_bytes(rng.randbytes(5000))),
        "deleted": Path.unlink,
    }
    done: Counter = Counter()
    while not stop.wait(rng.uniform(0.02, 0.2)):
        if rng.random() < 0.02:
            shutil.rmtree(directory, ignore_errors=True)
            done["directory deleted"] += 1
            continue
        entries = list(directory.glob(f"*{cache.ENTRY}")) if directory.exists() else []
        if entries:
            name = rng.choice(sorted(actions))
            try:
                actions[name](rng.choice(entries))
                done[name] += 1
            except OSError:  # the entry went away meanwhile
                pass
    return done


def _thread(target, *args) -> tuple[threading.Thread, list]:
    out: list = []

    def run():
        try:
            out.append(target(*args))
        except BaseException as err:  # noqa: BLE001 - reported by the test
            out.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


@pytest.mark.filterwarnings("ignore:the kernel cache")  # the vandal deletes the directory under writers
def test_soak(tmp_path):
    directory, signals = tmp_path / "cache", tmp_path / "signals"
    signals.mkdir()
    stop = signals / "stop"
    one_round(directory)  # both entries built
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import tests.runtime.test_soak as t; t.worker_main()"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(directory), str(stop), str(signals / f"process{i}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(PROCESSES)
    ]
    threads = []
    try:
        _wait(signals, "process*", PROCESSES, procs)
        threads = [_thread(storm, str(directory), stop, signals / f"thread{i}") for i in range(THREADS)]
        threads.append(_thread(storm, str(directory), stop, signals / "thread-llvm", "llvm"))
        _wait(signals, "thread*", THREADS + 1, procs)
        halt = threading.Event()
        damage = _thread(vandal, directory, halt, 1)
        time.sleep(STORM_SECONDS)
        halt.set()
        damage[0].join(TIMEOUT)
        stop.touch()
        for thread, _ in threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "a thread hangs"
        outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        stop.touch()
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    results = [r for _, (r,) in threads] + [Counter(json.loads(out)) for out, _ in outputs]
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert all(r["right"] > 0 and not r["wrong"] for r in results), results
    assert sum(damage[1][0].values()) > 0, "the vandal did nothing"
    _assert_healed(directory)


def _wait(signals: Path, pattern: str, count: int, procs: list) -> None:
    """Until ``count`` workers have signalled ``pattern``: each has done its first round."""
    deadline = time.time() + TIMEOUT
    while len(list(signals.glob(pattern))) < count:
        assert time.time() < deadline, "the workers are not ready"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.1)


def _assert_healed(directory: Path) -> None:
    """One more round rebuilds what the storm destroyed; then every entry checks and loads, and no
    temporary file is left."""
    one_round(directory)
    entries = sorted(directory.glob(f"*{cache.ENTRY}"))
    assert len(entries) == len(FORMATS)
    for entry in entries:
        assert cache.intact(entry)
        assert cache.lookup(directory, entry.stem, load_module, ".so") is not None
    assert sorted(p.name for p in directory.iterdir()) == [e.name for e in entries]


def test_stale_temporary_files_are_swept(tmp_path):
    stale, fresh, foreign = tmp_path / f".{'a' * 32}.x.so", tmp_path / f".{'b' * 32}.y.so", tmp_path / ".bashrc"
    for p in (stale, fresh, foreign):
        p.write_bytes(b"x")
    os.utime(stale, (0, 0))
    os.utime(foreign, (0, 0))
    cache.store(tmp_path, "c" * 32, lambda p: p.write_bytes(b"payload"), ".bin")
    assert not stale.exists() and fresh.exists() and foreign.exists()
    assert cache.lookup(tmp_path, "c" * 32, Path.read_bytes, ".bin") == b"payload"


def test_damaged_entries_are_removed(tmp_path):
    key = "d" * 32
    entry = tmp_path / f"{key}{cache.ENTRY}"
    cache.store(tmp_path, key, lambda p: p.write_bytes(b"payload"), ".bin")
    entry.write_bytes(entry.read_bytes()[:-1])
    assert cache.lookup(tmp_path, key, Path.read_bytes, ".bin") is None and not entry.exists()
    cache.store(tmp_path, key, lambda p: p.write_bytes(b"payload"), ".bin")

    def refuse(path):
        raise ValueError("not a library")

    assert cache.lookup(tmp_path, key, refuse, ".bin") is None and not entry.exists()
    assert cache.lookup(tmp_path, key, Path.read_bytes, ".bin") is None
    assert not list(tmp_path.iterdir())


def test_an_entry_copied_under_another_key_does_not_check(tmp_path):
    one, other = "1" * 32, "2" * 32
    cache.store(tmp_path, one, lambda p: p.write_bytes(b"kernel one"), ".bin")
    shutil.copyfile(tmp_path / f"{one}{cache.ENTRY}", tmp_path / f"{other}{cache.ENTRY}")
    assert cache.lookup(tmp_path, other, Path.read_bytes, ".bin") is None
    assert cache.lookup(tmp_path, one, Path.read_bytes, ".bin") == b"kernel one"


def test_a_read_only_cache_is_read(tmp_path, monkeypatch):
    """Where the cache directory cannot be written, the private copy goes to the temporary directory."""
    key, directory = "3" * 32, tmp_path / "cache"
    cache.store(directory, key, lambda p: p.write_bytes(b"payload"), ".bin")
    mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if Path(dir) == directory:
            raise PermissionError(13, "Permission denied")
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert cache.lookup(directory, key, Path.read_bytes, ".bin") == b"payload"


def test_a_cache_that_cannot_be_written_is_a_warning(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.warns(UserWarning, match="could not be written"):
        cache.store(blocked / "cache", "e" * 32, lambda p: p.write_bytes(b"payload"), ".bin")
    assert cache.lookup(blocked / "cache", "e" * 32, Path.read_bytes, ".bin") is None
