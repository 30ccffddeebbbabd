"""Run a function in N gloo processes (a torchrun-like environment per rank) and collect each rank's result."""

from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="0")
    torch.set_num_threads(1)
    from bevdeploy.distributed import init_from_env, shutdown

    ctx = init_from_env(device="cpu")
    try:
        result = fn(ctx, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        shutdown()  # every group, the control group too: one left to the exit can abort the process


def run_in_processes(fn, world_size: int = 2, args: tuple = ()) -> list:
    """``fn(ctx, *args)`` in ``world_size`` processes on 127.0.0.1; returns the per-rank results."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world_size, _free_port(), fn, args, out_dir), nprocs=world_size,
                           join=True, start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def run_cli_ranks(argv: list[str], world_size: int = 2, timeout: float = 120.0) -> list[tuple[int, str, str]]:
    """``bevdeploy ARGV`` (:mod:`tests.distributed._cli_worker`) as ``world_size`` independent processes with
    torchrun's environment; returns (exit code, stdout, stderr) per rank.

    No launcher watches them (torchrun would stop the others when one fails), so a rank left waiting
    for a failed one shows up as a hang: past ``timeout`` seconds the processes are killed and the
    test fails.
    """
    import subprocess
    import sys
    import time

    port = _free_port()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs, logs = [], []
    try:
        for rank in range(world_size):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                       LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       TRITON_INTERPRET="0", OMP_NUM_THREADS="1", TQDM_DISABLE="1",
                       PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
            # files, not pipes: a rank blocked on a full pipe would look like a hang
            logs.append((tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")))
            procs.append(subprocess.Popen([sys.executable, "-m", "tests.distributed._cli_worker", *argv], cwd=root,
                                          env=env, stdout=logs[-1][0], stderr=logs[-1][1], text=True))
        deadline = time.monotonic() + timeout
        for rank, p in enumerate(procs):
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"rank {rank} still running after {timeout:.0f} s (a hang?)") from None
        results = []
        for p, (out, err) in zip(procs, logs):
            out.seek(0)
            err.seek(0)
            results.append((p.returncode, out.read(), err.read()))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for out, err in logs:
            out.close()
            err.close()
