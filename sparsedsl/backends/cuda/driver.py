"""The CUDA driver API through ctypes: load a cubin into torch's CUDA context and launch its kernels
on torch's current stream. Nothing but ``libcuda`` (installed with the NVIDIA driver) is needed."""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from sparsedsl.errors import BackendError


@cache
def _libcuda() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise BackendError("the CUDA driver (libcuda.so.1) is not installed: CUDA kernels cannot run here") from None
    _check(lib.cuInit(0), "cuInit")
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        lib = ctypes.CDLL("libcuda.so.1")
        text = ctypes.c_char_p()
        lib.cuGetErrorString(status, ctypes.byref(text))
        raise BackendError(f"{what} failed: CUDA error {status} ({(text.value or b'unknown').decode()})")


def _current_context(device: int) -> None:
    """Make torch's context (the device's primary context) current on this thread."""
    lib = _libcuda()
    torch.cuda.init()
    ctx = ctypes.c_void_p()
    _check(lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    if not ctx.value:
        _check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device), "cuDevicePrimaryCtxRetain")
        _check(lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


class LoadedModule:
    """A cubin loaded on one device; ``function(name)`` is a launchable kernel handle."""

    def __init__(self, cubin: bytes, device: int):
        _current_context(device)
        self._image = ctypes.create_string_buffer(cubin, len(cubin))
        self._handle = ctypes.c_void_p()
        _check(_libcuda().cuModuleLoadData(ctypes.byref(self._handle), self._image), "loading the CUDA module")
        self._functions: dict[str, ctypes.c_void_p] = {}

    def function(self, name: str) -> ctypes.c_void_p:
        if name not in self._functions:
            fn = ctypes.c_void_p()
            _check(_libcuda().cuModuleGetFunction(ctypes.byref(fn), self._handle, name.encode()), f"finding '{name}'")
            self._functions[name] = fn
        return self._functions[name]


def launch(fn: ctypes.c_void_p, grid: tuple[int, int, int], block: tuple[int, int, int], args: list, shared: int = 0):
    """Launch ``fn`` on torch's current stream; ``args`` are ctypes values in parameter order."""
    params = (ctypes.c_void_p * len(args))(*(ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args))
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    status = _libcuda().cuLaunchKernel(fn, *grid, *block, shared, stream, params, None)
    _check(status, "launching the kernel")
