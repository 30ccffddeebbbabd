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
    from bevdeploy.distributed import init_from_env

    ctx = init_from_env(device="cpu")
    try:
        result = fn(ctx, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def run_in_processes(fn, world_size: int = 2, args: tuple = ()) -> list:
    """``fn(ctx, *args)`` in ``world_size`` processes on 127.0.0.1; returns the per-rank results."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world_size, _free_port(), fn, args, out_dir), nprocs=world_size,
                           join=True, start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
