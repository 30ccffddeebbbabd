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
* training: DDP (gradients averaged over processes), one data seed per rank;
* engine build: calibration sharded as above, QAT with averaged gradients, then rank 0 alone
  converts, exports and writes; the other ranks wait for it and write nothing.

Failing together: a rank that raises while the others wait in a collective would leave them hanging
(until the backend's timeout). The phases of a job therefore run under :func:`fail_together`: at
the end of each phase the ranks agree (a one-number all-reduce on a gloo group with a long timeout,
:func:`control_group`) whether any of them failed; if one did, every rank raises (the failing rank
its own error, the others :class:`PeerError` naming that rank and its message).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "PeerError", "init_from_env", "current", "shard_by_scene", "shard_contiguous",
           "gather_objects", "broadcast_object", "comm_device", "control_group", "fail_together", "rank0_first",
           "average_gradients", "shutdown"]

#: How long a rank waits in :func:`fail_together` for the others: covers rank 0 rendering a synthetic
#: world or exporting an engine while the others wait (NCCL's default 10 minutes does not).
WAIT_TIMEOUT = datetime.timedelta(hours=2)


class PeerError(RuntimeError):
    """Another process of the job failed; this one stops too (``rank`` is the failing one)."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(f"rank {rank} failed: {message}")
        self.rank = rank


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


def shard_contiguous(items: Sequence, rank: int, world_size: int) -> list:
    """``rank``'s contiguous share of ``items`` (shares differ in length by at most one, in order).

    For data without temporal order (2D calibration images), where any split gives the same
    per-item activations.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    n = len(items)
    return list(items[rank * n // world_size:(rank + 1) * n // world_size])


def broadcast_object(obj: object, ctx: DistContext) -> object:
    """Rank 0's ``obj`` on every rank (picklable; one process: ``obj``)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


_CONTROL: tuple[object, object] | None = None  # (default group it was made for, gloo group)


def control_group():
    """A gloo group over every rank with a :data:`WAIT_TIMEOUT` timeout, for agreement and waiting.

    Made on first use (a collective call: every rank must reach it, as every rank reaches the
    first :func:`fail_together`); CPU tensors whatever the default backend.
    """
    global _CONTROL
    if _CONTROL is None or _CONTROL[0] is not dist.group.WORLD:
        _CONTROL = (dist.group.WORLD, dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT))
    return _CONTROL[1]


def shutdown() -> None:
    """Leave the job: destroy every process group (also :func:`control_group`'s) before the interpreter exits.

    A gloo group left to the interpreter's exit can be torn down with its threads still joinable,
    which aborts the process ("terminate called without an active exception", exit code -6)."""
    global _CONTROL
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL = None


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def fail_together(ctx: DistContext | None) -> Iterator[None]:
    """Run a phase of a job so that an error on any rank stops every rank, instead of a hang.

    Every rank must enter the block (a rank with nothing to do in it enters it empty: it then waits
    there for the others). On leaving, the ranks agree whether any raised: if none did, all go on;
    otherwise the failing rank re-raises its error and the others raise :class:`PeerError` with the
    lowest failing rank's message. One process (``ctx`` None or of size 1): the block runs as is.
    ``KeyboardInterrupt`` is not held back (torchrun interrupts every rank).

    Example::

        with fail_together(ctx):
            if ctx.is_main:
                write_the_engine()       # the other ranks wait here, and stop if rank 0 fails
    """
    if ctx is None or not ctx.enabled:
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001  (re-raised below, after the others heard of it)
        error = e
    group = control_group()
    failed = torch.tensor([0 if error is None else 1], dtype=torch.int64)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    if not failed.item():
        return
    messages: list[str | None] = [None] * ctx.world_size
    dist.all_gather_object(messages, None if error is None else _describe(error), group=group)
    if error is not None:
        raise error
    first = next(r for r, m in enumerate(messages) if m is not None)
    raise PeerError(first, messages[first])


def average_gradients(params: list[torch.nn.Parameter], world_size: int, bucket_bytes: int = 25 * 2**20) -> None:
    """Average the gradients of ``params`` over the processes (``torch.distributed.all_reduce`` in
    flattened buckets, as DDP does). A parameter without a gradient here counts as a zero gradient,
    so every process reduces the same buckets."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    bucket: list[torch.Tensor] = []
    size = 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= bucket_bytes or i == len(grads) - 1:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat /= world_size
            for g_, f in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g_.copy_(f)
            bucket, size = [], 0


def rank0_first(fn, ctx: DistContext | None):
    """``fn()`` on rank 0, then on the other ranks; returns this rank's result.

    For steps that fill a shared cache (rendering a synthetic world): rank 0 makes it, the others
    then find it. An error on any rank stops every rank (:func:`fail_together`).
    """
    result = None
    with fail_together(ctx):
        if ctx is None or ctx.is_main:
            result = fn()
    with fail_together(ctx):
        if ctx is not None and not ctx.is_main:
            result = fn()
    return result
