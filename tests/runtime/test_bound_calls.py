"""Bound calls (runtime/calls.py): a call whose arguments repeat a signature skips the full checks,
and everything that could make the kept work wrong (a replaced or rewritten index buffer, values of
another length or dtype, other shapes, another thread count) takes the full checks again."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import sparsedsl as sd
from sparsedsl.runtime import calls
from sparsedsl.runtime import program as program_module

EXAMPLE = Path(__file__).parents[2] / "examples" / "linear.sdsl"


@pytest.fixture(scope="module", params=["tvm", "llvm"])
def prog(request):
    return sd.compile(EXAMPLE, backend=request.param)


@pytest.fixture
def binds(monkeypatch):
    """How many calls took the full checks."""
    count = [0]
    full = program_module.CompiledKernel._bind_call

    def counting(self, *args):
        count[0] += 1
        return full(self, *args)

    monkeypatch.setattr(program_module.CompiledKernel, "_bind_call", counting)
    return count


def weight(prog, n: int = 24, k: int = 40) -> sd.SparseTensor:
    w = torch.randn(n, k) * (torch.rand(n, k) < 0.3)
    return prog.pack("CSR", w)


def test_a_repeated_signature_is_bound_once_and_other_shapes_each_once(prog, binds):
    w, bias = weight(prog), torch.randn(24)
    for tokens in (1, 5, 1, 5, 64, 1):
        x = torch.randn(tokens, 40)
        torch.testing.assert_close(prog.linear(x, w, bias), x @ w.to_dense().T + bias)
    assert binds[0] == 3


def test_a_rewritten_index_buffer_is_checked_again(prog, binds):
    w, bias, x = weight(prog), torch.randn(24), torch.randn(3, 40)
    prog.linear(x, w, bias)
    w.buffers["1_crd"][0] = 200  # outside the 40 columns: must never be read
    with pytest.raises(sd.PackError, match="outside"):
        prog.linear(x, w, bias)


def test_values_that_shrink_or_change_dtype_in_place_are_refused(prog):
    w, bias, x = weight(prog), torch.randn(24), torch.randn(3, 40)
    prog.linear(x, w, bias)
    values = w.values
    values.data = values.data[:-1].clone()  # what a module's conversions do: the same tensor object
    with pytest.raises(sd.PackError, match="one value per stored position"):
        prog.linear(x, w, bias)
    values.data = torch.zeros(values.numel() + 1, dtype=torch.float64)
    with pytest.raises(sd.ArgumentError, match="float32"):
        prog.linear(x, w, bias)


def test_a_module_converted_in_place_is_refused_not_misread(prog):
    layer = sd.SparseLinear(weight(prog), torch.randn(24), prog, kernel="linear")
    with torch.inference_mode():
        layer(torch.randn(2, 40))
    layer.half()
    with torch.inference_mode(), pytest.raises(sd.ArgumentError, match="float32"):
        layer(torch.randn(2, 40, dtype=torch.float16))


def test_a_module_reuses_its_sparse_weight_until_a_tensor_is_replaced(prog, binds):
    layer = sd.SparseLinear(weight(prog), torch.randn(24), prog, kernel="linear")
    x = torch.randn(4, 40)
    with torch.inference_mode():
        first = layer(x)
        assert layer.sparse_weight() is layer.sparse_weight()
        layer(x)
        assert binds[0] == 1
        dense = layer.sparse_weight().to_dense()
    layer.load_state_dict(sd.SparseLinear(weight(prog), layer.bias.detach(), prog, kernel="linear").state_dict())
    with torch.inference_mode():
        second = layer(x)
    torch.testing.assert_close(first, x @ dense.T + layer.bias)
    torch.testing.assert_close(second, x @ layer.sparse_weight().to_dense().T + layer.bias)


def test_the_thread_count_is_part_of_the_signature(prog, binds, monkeypatch, set_threads):
    monkeypatch.setattr(calls, "PARALLEL_WORK", 1)
    w, bias, x = weight(prog), torch.randn(24), torch.randn(7, 40)
    expected = x @ w.to_dense().T + bias
    for threads in (1, 2, 1):
        set_threads(threads)
        torch.testing.assert_close(prog.linear(x, w, bias), expected)
    assert binds[0] == 2


def test_small_work_runs_on_one_thread():
    assert calls.threads_for(calls.PARALLEL_WORK - 1, 8) == 1
    assert calls.threads_for(calls.PARALLEL_WORK * 3, 8) == 3
    assert calls.threads_for(calls.PARALLEL_WORK * 100, 2) == 2


def test_a_direct_call_refused_by_the_kernel_is_a_backend_error():
    prog = sd.compile(EXAMPLE, backend="tvm")
    w, bias, x = weight(prog), torch.randn(24), torch.randn(3, 40)
    prog.linear(x, w, bias)
    inst = prog.linear.instance_for(w)
    name = next(iter(inst.variants.values())).name
    example = [x, *(w.buffers[k] for k in ("1_pos", "1_crd", "vals")), bias, torch.empty(3, 24)]
    run = inst.built.prepare(name, [example[0].double(), *example[1:]])
    with pytest.raises(sd.BackendError, match=f"kernel '{name}' failed"):
        run(example, 1)


def test_weights_made_under_inference_mode_are_checked_like_any_other(prog):
    x, bias = torch.randn(3, 40), torch.randn(24)
    with torch.inference_mode():
        w = weight(prog)
        expected = x @ w.to_dense().T + bias
        torch.testing.assert_close(prog.linear(x, w, bias), expected)
        w.buffers["1_crd"][0] = 200
        with pytest.raises(sd.PackError, match="outside"):
            prog.linear(x, w, bias)


def test_threads_sharing_a_bound_call_each_get_their_own_answer(prog):
    """A bound call's argument records are per thread: two threads calling with the same signature
    never compute on each other's tensors."""
    w, bias = weight(prog), torch.randn(24)
    inputs = [torch.randn(5, 40) for _ in range(2)]
    expected = [x @ w.to_dense().T + bias for x in inputs]
    wrong: list[int] = []

    def work(which: int) -> None:
        for _ in range(300):
            if not torch.allclose(prog.linear(inputs[which], w, bias), expected[which], atol=1e-5):
                wrong.append(which)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
