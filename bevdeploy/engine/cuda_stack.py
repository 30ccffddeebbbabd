"""The CUDA context's per-thread stack (local memory) reservation: read it and give it back.

A kernel whose threads need local memory (register spills, large per-thread arrays) makes the driver
grow the context's stack limit to that kernel's need at launch, and the driver reserves
``limit x SMs x max resident threads per SM`` bytes of device memory for it (H100: 132 x 2048 threads,
so 1 KiB a thread is 264 MiB). The limit never shrinks by itself, and no allocator API counts the
reservation: it only shows as used device memory. An engine's load autotunes and compiles many kernel
variants and launches each once; one candidate that spills a few KiB a thread leaves gigabytes reserved
for the rest of the process, although the kernels the CUDA graph replays may need far less.

:func:`stack_limit_bytes` reads the limit, :func:`set_stack_limit_bytes` sets it (setting a small value
releases the reservation; the next launch of a kernel that needs more grows it again, to that kernel's
need only). Both use the driver API (``libcuda``: ``cuCtxGetLimit`` / ``cuCtxSetLimit`` with
``CU_LIMIT_STACK_SIZE`` on the current context, PyTorch's primary context once CUDA is initialised) and
return None where there is no CUDA driver or device.
"""

from __future__ import annotations

import ctypes
import functools

import torch

__all__ = ["DEFAULT_STACK_BYTES", "reservation_mb", "set_stack_limit_bytes", "stack_limit_bytes"]

#: The driver's initial per-thread stack size (``CU_LIMIT_STACK_SIZE`` of a fresh context).
DEFAULT_STACK_BYTES = 1024
_CU_LIMIT_STACK_SIZE = 0x00


@functools.cache
def _libcuda():
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def _context_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized() and _libcuda() is not None


def stack_limit_bytes() -> int | None:
    """The current context's per-thread stack limit in bytes (None without an initialised CUDA context)."""
    if not _context_ready():
        return None
    value = ctypes.c_size_t()
    rc = _libcuda().cuCtxGetLimit(ctypes.byref(value), _CU_LIMIT_STACK_SIZE)
    if rc != 0:
        raise RuntimeError(f"cuCtxGetLimit(CU_LIMIT_STACK_SIZE) failed with CUresult {rc}")
    return int(value.value)


def set_stack_limit_bytes(n: int) -> int | None:
    """Set the current context's per-thread stack limit to ``n`` bytes (waits for the device's queued work);
    returns the limit the driver then reports (None without an initialised CUDA context)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"stack limit must be an int >= 0 bytes, got {n!r}")
    if not _context_ready():
        return None
    rc = _libcuda().cuCtxSetLimit(_CU_LIMIT_STACK_SIZE, ctypes.c_size_t(n))
    if rc != 0:
        raise RuntimeError(f"cuCtxSetLimit(CU_LIMIT_STACK_SIZE, {n}) failed with CUresult {rc}")
    return stack_limit_bytes()


def reservation_mb(limit_bytes: int, device: torch.device | int | None = None) -> float:
    """Device memory (MiB) the driver reserves for a per-thread stack of ``limit_bytes`` on ``device``:
    the limit times every thread the device can hold at once."""
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    return limit_bytes * props.multi_processor_count * props.max_threads_per_multi_processor / 2**20
