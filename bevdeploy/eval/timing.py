"""GPU timing that measures the kernel, not the Python launch.

A Triton launch from Python costs tens of microseconds, more than many of our kernels run; per-call
CUDA events on a drained queue would then report the launch. So we capture ``calls_per_graph``
calls in one CUDA graph, replay it after warm-up, time each replay with CUDA events and report the
median time per call. Inputs are fixed tensors (static addresses, as the engines run them).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import torch


def gpu_dirname(device: torch.device | int | None = None) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3`` (the results folder name)."""
    name = torch.cuda.get_device_name(device)
    return "-".join(name.lower().replace("_", " ").split())


def write_gpu_result(name: str, text: str, out: str | None = None) -> Path:
    """Write a GPU script's result file ``name`` to ``bench/results/<gpu>/`` (to be committed) and to ``out``
    too when given (the device call's ``$OUT``, which comes back); returns the first path."""
    folders = [Path("bench") / "results" / gpu_dirname()] + ([Path(out)] if out else [])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folders[0] / name


def time_cuda_graph(fn: Callable[[], object], *, calls_per_graph: int = 10, replays: int = 30, warmup: int = 3) -> float:
    """Median milliseconds per call of ``fn`` replayed inside a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):  # compile kernels, settle the allocator
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls_per_graph)
    del graph
    return statistics.median(times)


def time_eager(fn: Callable[[], object], *, iters: int = 20, warmup: int = 3) -> float:
    """Median milliseconds per call with events around each call (for work too long or too
    dynamic for a graph, e.g. a model's eager forward as users run it)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = time_cuda_graph(lambda: dst.copy_(src), calls_per_graph=5, replays=20)
    return 2 * nbytes / (ms * 1e-3)
