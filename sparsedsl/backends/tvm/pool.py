"""TVM kernels' parallel loops on torch's OpenMP threads, not on a thread pool of TVM's own.

A compiled TVM library calls its parallel loops through a function pointer it exports,
``__TVMBackendParallelLaunch``, which TVM's loader points at TVM's pool. Two pools on two cores
fight: in a model, torch's OpenMP workers and TVM's take turns dozens of times per forward, each
either spinning on the other's cores or sleeping and being woken. ``adopt`` points a loaded
library's launch pointer at ``launch`` instead: a few lines of LLVM IR (JIT-compiled by llvmlite,
like the llvm backend's kernels) that run the loop's lambda on ``GOMP_parallel``, the pool torch
uses and the llvm backend's kernels use. TVM's pool is then never started, and no environment
variable of TVM's is read or set.

TVM's contract (``tvm/runtime/c_backend_api.h``): ``int launch(FTVMParallelLambda f, void* cdata,
int num_task)`` calls ``f(task_id, &env, cdata)`` once for each task id in ``[0, env.num_task)``,
concurrently, and returns non-zero if any call did. The lambda splits the loop by ``env.num_task``.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import llvmlite.binding as llvm
from llvmlite import ir

from sparsedsl.backends.llvm.jit import optimized_engine
from sparsedsl.config import num_threads

LAUNCH_POINTER = "__TVMBackendParallelLaunch"


@dataclass(frozen=True)
class Launcher:
    """The JIT-compiled launch function and the thread count it reads."""

    engine: object  # keeps the code alive
    address: int
    threads: ctypes.c_int32


def _module() -> ir.Module:
    """``sparsedsl_parallel_launch(f, cdata, num_task)``: ``f`` on ``sparsedsl_threads`` OpenMP
    threads (``num_task`` is a hint TVM leaves at 0: the threads decide, the lambda follows)."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    env = ir.LiteralStructType([i8p, i32])  # TVMParallelGroupEnv: sync handle, task count
    lambda_type = ir.FunctionType(i32, [i32, env.as_pointer(), i8p]).as_pointer()
    frame_type = ir.LiteralStructType([lambda_type, i8p, i32])  # the lambda, its data, any failure
    module = ir.Module(name="sparsedsl_tvm_pool")
    module.triple = llvm.get_process_triple()
    threads = ir.GlobalVariable(module, i32, name="sparsedsl_threads")
    threads.initializer = ir.Constant(i32, 1)
    zero, one, two = (ir.Constant(i32, v) for v in (0, 1, 2))

    task = ir.Function(module, ir.FunctionType(ir.VoidType(), [i8p]), name="sparsedsl_parallel_task")
    task.linkage = "internal"
    b = ir.IRBuilder(task.append_basic_block("entry"))
    frame = b.bitcast(task.args[0], frame_type.as_pointer())
    tid = b.call(ir.Function(module, ir.FunctionType(i32, []), name="omp_get_thread_num"), [])
    count = b.call(ir.Function(module, ir.FunctionType(i32, []), name="omp_get_num_threads"), [])
    group = b.alloca(env)
    b.store(ir.Constant(i8p, None), b.gep(group, [zero, zero]))
    b.store(count, b.gep(group, [zero, one]))
    f, data = (b.load(b.gep(frame, [zero, ir.Constant(i32, i)])) for i in (0, 1))
    failed = b.call(f, [tid, group, data])
    b.atomic_rmw("or", b.gep(frame, [zero, two]), failed, "monotonic")
    b.ret_void()

    task_type = ir.FunctionType(ir.VoidType(), [i8p]).as_pointer()
    gomp = ir.Function(module, ir.FunctionType(ir.VoidType(), [task_type, i8p, i32, i32]), name="GOMP_parallel")
    launch = ir.Function(module, ir.FunctionType(i32, [lambda_type, i8p, i32]), name="sparsedsl_parallel_launch")
    b = ir.IRBuilder(launch.append_basic_block("entry"))
    count = b.load(threads)
    with b.if_then(b.icmp_signed("<=", count, one)):  # one thread: the lambda here, no fork
        group = b.alloca(env)
        b.store(ir.Constant(i8p, None), b.gep(group, [zero, zero]))
        b.store(one, b.gep(group, [zero, one]))
        b.ret(b.call(launch.args[0], [zero, group, launch.args[1]]))
    frame = b.alloca(frame_type)
    for i, value in enumerate([launch.args[0], launch.args[1], zero]):
        b.store(value, b.gep(frame, [zero, ir.Constant(i32, i)]))
    b.call(gomp, [task, b.bitcast(frame, i8p), count, zero])
    b.ret(b.load(b.gep(frame, [zero, two])))
    return module


@cache
def launcher() -> Launcher:
    """The launch function, compiled once per process."""
    engine = optimized_engine(str(_module()))
    threads = ctypes.c_int32.from_address(engine.get_global_value_address("sparsedsl_threads"))
    return Launcher(engine, engine.get_function_address("sparsedsl_parallel_launch"), threads)


def adopt(path: Path) -> ctypes.CDLL:
    """Point the library at ``path``, already loaded by TVM, at ``launch`` for its parallel loops
    (a library without parallel loops exports no launch pointer and is left as it is); returns
    the library's handle."""
    library = ctypes.CDLL(str(path), mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)
    try:
        pointer = ctypes.c_void_p.in_dll(library, LAUNCH_POINTER)
    except ValueError:
        return library
    pointer.value = launcher().address
    return library


def set_threads(count: int) -> None:
    """The number of threads the next parallel loop of an adopted library runs on (one: no fork)."""
    launcher().threads.value = count


def run_with_threads(function):
    """``function`` (a TVM kernel of an adopted library) called with the thread count of the
    moment (``sparsedsl.config.num_threads``)."""

    def call(*args):
        set_threads(num_threads())
        return function(*args)

    return call
