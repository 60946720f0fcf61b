"""Calling a compiled TVM kernel without TVM's Python FFI, for calls whose argument shapes repeat.

Every function of a TVM library is exported as ``__tvm_ffi_<name>``, of the C type
``TVMFFISafeCallType``: ``int f(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny*
result)`` (``tvm_ffi/include/tvm/ffi/c_api.h``), tensors passed as ``DLTensor`` pointers. Calling
it through TVM's Python FFI converts every torch tensor and costs ~4.5 µs for six tensors, as much
as a small kernel's work. ``DirectCall`` builds the argument records once, for one set of
argument shapes and dtypes, and each call only writes the tensors' data pointers and calls through
ctypes (~1 µs). The generated code still checks every argument against its signature.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Sequence

import torch
import tvm_ffi

from sparsedsl.backends.tvm import pool
from sparsedsl.errors import BackendError

_CPU = 1  # kDLCPU
_DL_CODES = {  # torch dtype -> DLPack type code (kDLInt, kDLUInt, kDLFloat, kDLBfloat)
    torch.int8: 0,
    torch.int16: 0,
    torch.int32: 0,
    torch.int64: 0,
    torch.uint8: 1,
    torch.uint16: 1,
    torch.float16: 2,
    torch.float32: 2,
    torch.float64: 2,
    torch.bfloat16: 4,
}
_INT, _FLOAT, _DLTENSOR_PTR = 1, 3, 7  # TVMFFITypeIndex: kTVMFFIInt, kTVMFFIFloat, kTVMFFIDLTensorPtr


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _Device),
        ("ndim", ctypes.c_int32),
        ("dtype", _DataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),  # NULL: compact, row-major
        ("byte_offset", ctypes.c_uint64),
    ]


class _Value(ctypes.Union):
    _fields_ = [("v_int64", ctypes.c_int64), ("v_float64", ctypes.c_double), ("v_ptr", ctypes.c_void_p)]


class _Any(ctypes.Structure):
    _fields_ = [("type_index", ctypes.c_int32), ("padding", ctypes.c_uint32), ("value", _Value)]


_SAFE_CALL = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(_Any), ctypes.c_int32, ctypes.POINTER(_Any))


def entry_point(library: ctypes.CDLL, name: str) -> int:
    """The address of the packed entry point of function ``name`` in a loaded kernel library."""
    return ctypes.cast(getattr(library, f"__tvm_ffi_{name}"), ctypes.c_void_p).value


class _Records:
    """The argument records of one call of arguments as ``spec`` says (``DirectCall.spec``):
    ``anys`` (one ``TVMFFIAny`` an argument), the ``DLTensor`` of each tensor argument, the result.
    Integer arguments (the sizes) are part of the shape and written once; a call writes the
    tensors' addresses and the float arguments."""

    def __init__(self, spec: list):
        self.anys = (_Any * len(spec))()
        result = _Any()
        self.tensors: list[tuple[int, _DLTensor]] = []  # (argument position, its record)
        self.floats: list[int] = []  # argument positions
        self.keep = [result]  # every record and shape array the call's pointers refer to
        for i, a in enumerate(spec):
            if isinstance(a, tuple):
                dims, dtype = a
                shape = (ctypes.c_int64 * max(len(dims), 1))(*dims)
                code = _DataType(_DL_CODES[dtype], dtype.itemsize * 8, 1)
                record = _DLTensor(None, _Device(_CPU, 0), len(dims), code, shape, None, 0)
                self.keep += [shape, record]
                self.tensors.append((i, record))
                self.anys[i].type_index = _DLTENSOR_PTR
                self.anys[i].value.v_ptr = ctypes.addressof(record)
            elif a is float:
                self.anys[i].type_index = _FLOAT
                self.floats.append(i)
            else:
                self.anys[i].type_index = _INT
                self.anys[i].value.v_int64 = a
        self.arguments = (None, self.anys, len(spec), ctypes.byref(result))
        self.result = result


class DirectCall:
    """Function ``name`` called on arguments shaped like ``example`` (tensors on the CPU, compact;
    the same ints; floats): ``call(args, threads)``. Each thread fills records of its own (a call
    writes its tensors' addresses into them). ``fallback`` is the function through TVM's FFI,
    called when the direct call reports an error, to raise it with TVM's message."""

    def __init__(self, address: int, example: Sequence, fallback: Callable, name: str):
        self.function = _SAFE_CALL(address)
        self.threads = pool.launcher().threads  # the thread count the library's parallel loops read
        self.fallback, self.name = fallback, name
        # per argument: a tensor's (shape, dtype), ``float``, or an int's value
        self.spec = [
            (tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else float if isinstance(a, float) else a
            for a in example
        ]
        self.local = threading.local()

    def __call__(self, args: Sequence, threads: int) -> None:
        try:
            records = self.local.records
        except AttributeError:
            records = self.local.records = _Records(self.spec)
        for i, record in records.tensors:
            record.data = args[i].data_ptr()
        for i in records.floats:
            records.anys[i].value.v_float64 = args[i]
        self.threads.value = threads
        records.result.type_index = 0
        if self.function(*records.arguments):
            _clear_raised()
            try:
                self.fallback(*args)
            except Exception as err:  # noqa: BLE001 - TVM raises its own error types
                raise BackendError(f"kernel '{self.name}' failed: {str(err).strip().splitlines()[-1]}") from None
            raise BackendError(f"kernel '{self.name}' failed on arguments shaped unlike those it was prepared for")


def _clear_raised() -> None:
    """Take the error the failed call left in this thread's FFI state, so that it is not
    mistaken for a later call's."""
    handle = ctypes.c_void_p()
    tvm_ffi.LIB.TVMFFIErrorMoveFromRaised(ctypes.byref(handle))
    if handle.value:
        tvm_ffi.LIB.TVMFFIObjectDecRef(handle)
