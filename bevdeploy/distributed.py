"""Several processes, one job: ``torchrun --nproc-per-node N -m bevdeploy.cli train|eval|build ...``.

PyTorch's own stack only: ``torch.distributed`` with NCCL between GPUs and gloo between CPU
processes, DDP for training. torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
address; :func:`init_from_env` reads them (a plain ``python -m bevdeploy.cli`` is one process and
nothing here changes its behaviour).

What each verb does with N processes:

* evaluation: the frames are split by scene (:func:`shard_by_scene`), so the temporal order (and the
  previous BEV) stays inside one process; each process runs its scenes, rank 0 gathers the boxes
  (:func:`gather_runs`) and scores them once;
* calibration: every process collects its shard; ranges are merged before the threshold search
  (``bevdeploy.quant.calibrate.calibrate(..., dist=ctx)``), giving the table one process computes on
  all the data;
* training: DDP (gradients averaged over processes), one data seed per rank.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_from_env", "current", "shard_by_scene", "gather_objects", "comm_device"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job (``world_size == 1``: a single process, nothing distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that scores, writes files and prints."""
        return self.rank == 0


def init_from_env(device: str | None = None) -> DistContext:
    """Join the process group torchrun describes in the environment (once); a lone process gets rank 0 of 1.

    Args:
        device: ``"cpu"`` forces gloo; otherwise NCCL when CUDA is available (each rank on GPU ``LOCAL_RANK``).

    Raises:
        RuntimeError: more ranks on this host than GPUs, with NCCL.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but this host has {torch.cuda.device_count()} GPU(s): "
                               "start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistContext(rank, world_size, local_rank)


def current() -> DistContext:
    """The context of an already initialised process group (else a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    rank = dist.get_rank()
    return DistContext(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, the CPU for gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_by_scene(infos: Sequence[dict], rank: int, world_size: int) -> list[dict]:
    """The frames of the scenes that ``rank`` runs, in their original (temporal) order.

    Whole scenes go to one rank, so the previous-BEV chain is never cut. Scenes are dealt largest
    first to the least loaded rank (ties: lower rank, earlier scene), which balances frame counts
    and depends only on the infos, so every rank computes the same split.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    sizes: dict[object, int] = {}
    for info in infos:
        if "scene_token" not in info:
            raise ValueError(f"info of sample {info.get('token')!r} has no 'scene_token': cannot shard by scene")
        sizes[info["scene_token"]] = sizes.get(info["scene_token"], 0) + 1
    scenes = list(sizes)  # first-appearance order
    order = sorted(range(len(scenes)), key=lambda i: (-sizes[scenes[i]], i))
    load = [0] * world_size
    owner: dict[object, int] = {}
    for i in order:
        r = min(range(world_size), key=lambda k: (load[k], k))
        owner[scenes[i]] = r
        load[r] += sizes[scenes[i]]
    return [info for info in infos if owner[info["scene_token"]] == rank]


def gather_objects(obj: object, ctx: DistContext) -> list | None:
    """Every rank's ``obj`` on rank 0 (in rank order); None on the other ranks. One process: ``[obj]``."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out
