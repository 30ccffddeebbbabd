"""Training on the synthetic world (or nuScenes): one loop for every model family.

Why: accuracy claims about engines (NDS change of fp16 / int8 vs PyTorch FP32) mean something only
on weights that see the objects; no official checkpoint can be downloaded here, so the models are
trained from scratch on a synthetic world and scored on a held-out one (``synthetic:N@SEED``).

Pieces:

- :class:`FamilyTraining`: what a model family supplies: an endless stream of shuffled batches
  already on the device, and its official losses as named terms (the total is their sum).
  BEVDet: :class:`bevdeploy.train.bevdet.BEVDetTraining`; BEVFormer:
  :class:`bevdeploy.train.bevformer.BEVFormerTraining`; YOLOX: :class:`bevdeploy.train.yolox.YOLOXTraining`
  (SimOTA); CenterNet: :class:`bevdeploy.train.centernet.CenterNetTraining`. :func:`make_training`
  picks by model name. The BEV families read nuScenes info records, the 2D ones a COCO-format set
  (``synthetic2d:N@SEED`` or ``coco:PATH``, :class:`bevdeploy.data.det2d.CocoSet`).
- :func:`train`: AdamW, linear warm-up then cosine decay, bf16 autocast on CUDA, gradient
  clipping, a progress bar showing the loss; returns the loss history.
- :func:`save_checkpoint`: the official key layout ``{"state_dict": ..., "meta": ...}``, which
  :func:`bevdeploy.models.checkpoint.load_checkpoint` (and ``--checkpoint`` everywhere) loads strictly.
- :func:`train_model`: data spec -> rendered world -> model -> training -> checkpoint (``bevdeploy train``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from bevdeploy.distributed import average_gradients  # noqa: F401  (also bevdeploy.train.average_gradients)

__all__ = ["FamilyTraining", "make_training", "save_checkpoint", "train", "train_model", "lr_at", "is_det2d"]

#: Rendered image size of training worlds: BEVFormer-tiny's native 450x800, and BEVDet's 256x704
#: crop comes out the same as from 900x1600 (its resize fits the width), at a quarter of the render cost.
TRAIN_RENDER_SIZE = (450, 800)


def default_render_size(model_name: str) -> tuple[int, int]:
    """Camera image size to render a training world at: BEVFormer's official pipeline halves nuScenes'
    900x1600 to its 480x800 input, so it needs full-size images; BEVDet crops 256x704 from a 0.44x resize,
    which half-size renders (450x800) serve as well, four times faster."""
    return (900, 1600) if model_name.startswith("bevformer") else TRAIN_RENDER_SIZE


@runtime_checkable
class FamilyTraining(Protocol):
    """A model family's training data and losses."""

    def batches(self, batch_size: int, seed: int) -> Iterator[Any]:
        """Endless, shuffled (by ``seed``) batches, already on the training device."""
        ...

    def loss(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        """Named scalar loss terms of ``model`` on ``batch``; the training loss is their sum."""
        ...


def make_training(model_name: str, model: nn.Module, data, device, **kwargs) -> FamilyTraining:
    """The family training of ``model_name``: ``bevdet*`` -> BEVDetTraining, ``bevformer*`` ->
    BEVFormerTraining, ``yolox*`` -> YOLOXTraining, ``centernet*`` -> CenterNetTraining.

    Args:
        model_name: The model's name (a ``MODELS`` key).
        model: The model, on ``device``.
        data: BEV families: the info records (``list[dict]``, temporal order); 2D families: the
            COCO-format set (:class:`bevdeploy.data.det2d.CocoSet`).
        device: The training device.
        **kwargs: The family constructor's keywords.
    """
    if not isinstance(model_name, str):
        raise TypeError(f"model_name must be a str, got {type(model_name).__name__}")
    if model_name.startswith(("yolox", "centernet")):
        from bevdeploy.data.det2d import CocoSet

        if not isinstance(data, CocoSet):
            raise TypeError(f"{model_name} trains on a COCO-format set (bevdeploy.data.det2d.CocoSet, from "
                            f"resolve_det2d_spec('synthetic2d:N@SEED')), got {type(data).__name__}")
        if model_name.startswith("yolox"):
            from bevdeploy.train.yolox import YOLOXTraining

            return YOLOXTraining(model, data, device, **kwargs)
        from bevdeploy.train.centernet import CenterNetTraining

        return CenterNetTraining(model, data, device, **kwargs)
    infos = data
    if model_name.startswith("bevdet"):
        from bevdeploy.train.bevdet import BEVDetTraining

        return BEVDetTraining(model, infos, device, **kwargs)
    if model_name.startswith("bevformer"):
        try:
            from bevdeploy.train.bevformer import BEVFormerTraining
        except ImportError as e:
            raise NotImplementedError(f"BEVFormer training is not available in this build ({e})") from e
        return BEVFormerTraining(model, infos, device, **kwargs)
    raise ValueError(f"no training for model {model_name!r}; expected a bevdet*, bevformer*, yolox* or "
                     "centernet* model name")


def lr_at(step: int, *, steps: int, lr: float, warmup: int, warmup_ratio: float = 1e-3, min_ratio: float = 1e-3) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up from ``lr * warmup_ratio`` over ``warmup``
    steps, then cosine decay to ``lr * min_ratio`` at ``steps`` (BEVFormer's schedule; mmcv's
    ``CosineAnnealing`` with linear warm-up)."""
    if step < warmup:
        return lr * (warmup_ratio + (1.0 - warmup_ratio) * step / warmup)
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t)))


def train(
    model: nn.Module,
    training: FamilyTraining,
    *,
    steps: int,
    batch_size: int,
    lr: float = 2e-4,
    weight_decay: float = 1e-2,
    warmup: int | None = None,
    clip: float = 35.0,
    seed: int = 0,
    amp: bool = True,
    progress: bool = True,
    log_every: int = 10,
    time_limit: float | None = None,
    fit_at: int = 25,
    dist=None,
) -> list[dict]:
    """Train ``model`` in place for ``steps`` optimizer steps.

    Args:
        model: The model, on the training device.
        training: Its family's batches and losses (:func:`make_training`).
        steps: Optimizer steps.
        batch_size: Samples per step.
        lr, weight_decay: AdamW's (the official 2e-4, 0.01).
        warmup: Linear warm-up steps (default: min(500, steps // 10)).
        clip: Max global gradient norm (BEVFormer 35, BEVDet 5).
        seed: Seeds the parameters' RNG users (dropout) and the batch order.
        amp: bf16 autocast on CUDA (ignored on the CPU).
        progress: tqdm bar with the running loss.
        log_every: Steps between history entries (the last step is always recorded).
        time_limit: Seconds the training may take (a budget for capped device calls): after
            ``fit_at`` steps the time per step is measured and, if ``steps`` would not fit, the
            schedule is shortened to the steps that fit (warm-up and cosine end included; the
            history's entries then carry ``steps_fitted``); past the limit it stops anyway (the last
            entry has ``stopped_early: True``).
        fit_at: Step at which the time per step is measured (from step 5, after start-up).
        dist: a :class:`bevdeploy.distributed.DistContext` of several processes (torchrun): each
            process draws its own batches (seed + rank), gradients are averaged over the processes
            after every backward (DDP's all-reduce; the families call the model's parts, which DDP's
            forward hook would not see), so the global batch is ``batch_size * world_size``; the
            time budget's step count and stop are agreed across processes.

    Returns:
        The loss history: dicts with ``step``, ``lr``, ``loss`` and each named term (floats),
        ``seconds`` since the start.
    """
    from tqdm import tqdm

    _check_schedule(steps, batch_size, lr)
    warmup = min(500, steps // 10) if warmup is None else int(warmup)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    if device.type == "cuda":  # NHWC convolutions (bf16 tensor cores); autotuned conv algorithms
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    use_amp = amp and device.type == "cuda"
    model.train()
    history: list[dict] = []
    distributed = dist is not None and dist.enabled
    batches = training.batches(batch_size, seed + (dist.rank if distributed else 0))
    params = [p for p in model.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc="train", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    running = None
    planned = steps
    fitted = None
    t_start_measure = None
    step = 0
    while step < steps:
        cur_lr = lr_at(step, steps=steps, lr=lr, warmup=warmup)
        for group in optimizer.param_groups:
            group["lr"] = cur_lr
        batch = next(batches)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            terms = training.loss(model, batch)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if distributed:
            average_gradients(params, dist.world_size)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if time_limit is not None and fitted is None and step in (5, fit_at):
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step == 5 or t_start_measure is None:
                t_start_measure = (step, time.perf_counter())
            else:
                per_step = (time.perf_counter() - t_start_measure[1]) / (step - t_start_measure[0])
                # 90% of the time left: steps vary, and a hard stop would cut the cosine short
                fit = step + 1 + int(0.9 * (time_limit - (time.perf_counter() - t0)) / per_step)
                fitted = min(steps, max(step + 1, fit))
                if distributed:  # every process must run the same number of steps
                    fitted = int(_all_reduce_scalar(fitted, "min"))
                if fitted < steps:
                    print(f"train: {per_step:.3f} s/step: {steps} steps exceed the {time_limit:.0f} s budget; "
                          f"the schedule is shortened to {fitted} steps", file=sys.stderr)
                    steps = fitted
                    warmup = min(warmup, steps // 2)  # unchanged for any real budget: the warm-up
                    # does not depend on ``steps``, so --steps N --warmup W replays this schedule
                    bar.total = steps
                    bar.refresh()
        elapsed = time.perf_counter() - t0
        out_of_time = time_limit is not None and elapsed > time_limit and step < steps - 1
        if distributed and time_limit is not None:
            out_of_time = bool(_all_reduce_scalar(float(out_of_time), "max"))
        if step % log_every == 0 or step == steps - 1 or out_of_time:
            # reading values waits for the GPU: only every log_every steps, so launches run ahead
            value = float(loss.detach())
            if not math.isfinite(value):
                raise RuntimeError(f"training diverged at step {step}: loss {value} "
                                   f"({ {k: float(v.detach()) for k, v in terms.items()} }); lower --lr")
            running = value if running is None else 0.5 * running + 0.5 * value
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{cur_lr:.1e}")
            history.append({"step": step, "lr": cur_lr, "warmup": warmup, "loss": value, "grad_norm": float(grad_norm),
                            **{k: float(v.detach()) for k, v in terms.items()}, "seconds": elapsed})
            if steps != planned:
                history[-1]["steps_fitted"] = steps
        bar.update(1)
        step += 1
        if out_of_time:
            history[-1]["stopped_early"] = True
            print(f"train: time limit {time_limit:.0f} s reached after {step} of {steps} steps", file=sys.stderr)
            break
    bar.close()
    model.eval()
    return history



def _all_reduce_scalar(value: float, op: str) -> float:
    import torch.distributed as torch_dist

    from bevdeploy.distributed import comm_device

    t = torch.tensor([float(value)], dtype=torch.float64, device=comm_device())
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MIN if op == "min" else torch_dist.ReduceOp.MAX)
    return float(t.item())

def save_checkpoint(model: nn.Module, path: str | Path, meta: dict | None = None) -> Path:
    """Write ``{"state_dict": ..., "meta": ...}`` (CPU tensors, the official mmcv layout) to ``path``.

    ``meta`` is stored as plain JSON types (strings for anything else), so the file loads with
    ``torch.load(weights_only=True)``, as :func:`bevdeploy.models.checkpoint.load_checkpoint` does.
    """
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": state, "meta": json.loads(json.dumps(dict(meta or {}), default=str))}, tmp)
    tmp.replace(path)
    return path


def default_clip(model_name: str) -> float:
    """The official gradient-clipping norm: BEVDet 5 (``grad_clip=dict(max_norm=5)``), BEVFormer 35,
    CenterNet 35 (``centernet_resnet18_dcnv2_140e_coco``); YOLOX clips nothing officially (SGD), here
    35 as well: from scratch with AdamW the first SimOTA steps may see large gradients."""
    return 5.0 if model_name.startswith("bevdet") else 35.0


def is_det2d(model_name: str) -> bool:
    """Whether ``model_name`` is a 2D (COCO) detector, trained on ``synthetic2d:N@SEED`` / ``coco:PATH``."""
    return model_name.startswith(("yolox", "centernet"))


#: Image size the 2D training / held-out views are rendered at (the generator's default: 16:9).
DET2D_RENDER_SIZE = (360, 640)


def _check_schedule(steps, batch_size, lr) -> None:
    for name, val in {"steps": steps, "batch_size": batch_size}.items():
        if isinstance(val, bool) or not (isinstance(val, int) and val >= 1):
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
        raise ValueError(f"lr must be a finite float > 0, got {lr!r}")


def train_model(
    model_name: str,
    data: str,
    *,
    steps: int,
    batch: int,
    out: str | Path,
    lr: float = 2e-4,
    weight_decay: float = 1e-2,
    warmup: int | None = None,
    clip: float | None = None,
    seed: int = 0,
    device: str | None = None,
    workers: int = 1,
    render_size: tuple[int, int] | None = None,
    model_overrides: dict | None = None,
    training_options: dict | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    extra_meta: dict | None = None,
    time_limit: float | None = None,
    dist=None,
) -> Path | None:
    """Render (or reuse) the world of ``data``, train ``model_name`` from scratch, save the checkpoint.

    Args:
        model_name: A key of ``bevdeploy.models.MODELS``.
        data: A data spec: ``synthetic:N@SEED`` or ``nuscenes:PATH`` (BEV models); ``synthetic2d:N@SEED``
            or ``coco:PATH[:SPLIT][:N]`` (2D models; COCO reads instances_SPLIT.json and SPLIT/, default
            val2017: train on ``coco:PATH:train2017``).
        steps, batch, lr, weight_decay, warmup, clip, seed: See :func:`train` (``clip`` default:
            :func:`default_clip`).
        out: The checkpoint file.
        device: ``cuda`` / ``cpu`` (default: cuda when available).
        workers: Processes rendering the world and loading the frames.
        render_size: (H, W) the synthetic world is rendered at (default :func:`default_render_size`;
            2D models :data:`DET2D_RENDER_SIZE`).
        model_overrides: Config overrides (reduced models in tests; a 2D model's network input
            ``image_size``); saved in the checkpoint's meta.
        training_options: Keywords of the family's training class (e.g. ``depth_weight=0``).
        cache_dir: Where synthetic worlds are cached (default ``$BEVDEPLOY_CACHE``).
        extra_meta: More entries for the checkpoint's ``meta`` (e.g. the caller's render time).
        time_limit: Seconds of training after which it stops early (see :func:`train`).
        dist: a :class:`bevdeploy.distributed.DistContext` of several processes (``torchrun``): rank 0
            renders the world first (the others then reuse it), every rank trains on its own batches
            with averaged gradients (global batch ``batch * world_size``), rank 0 writes the checkpoint
            and returns its path, the other ranks return None.

    Returns:
        The checkpoint path. Its ``meta`` holds the training budget, the final loss and the history.
    """
    from bevdeploy.models import MODELS

    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; choose from {sorted(MODELS)}")
    _check_schedule(steps, batch, lr)  # before the world is rendered
    det2d = is_det2d(model_name)
    if det2d != str(data).startswith(("synthetic2d", "coco:")):
        raise ValueError(f"{model_name} trains on " + ("'synthetic2d:N@SEED' or 'coco:PATH'" if det2d else
                         "'synthetic:N@SEED' or 'nuscenes:PATH'") + f" data, got {data!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if render_size is None:
        render_size = DET2D_RENDER_SIZE if det2d else default_render_size(model_name)
    t0 = time.perf_counter()
    distributed = dist is not None and dist.enabled
    if distributed:
        import torch.distributed as torch_dist

        if dev.type == "cuda":
            dev = torch.device("cuda", torch.cuda.current_device())
        if not dist.is_main:
            torch_dist.barrier()  # rank 0 renders (or finds) the world; the others then read it
    show = progress and (not distributed or dist.is_main)
    if det2d:
        from bevdeploy.data.det2d import resolve_det2d_spec

        samples = resolve_det2d_spec(data, cache_dir=cache_dir, image_size=tuple(render_size), progress=show,
                                     workers=workers)
        num_samples = len(samples.images())
    else:
        from bevdeploy.data.nuscenes import load_infos
        from bevdeploy.data.synthetic import resolve_data_spec

        source = resolve_data_spec(data, workers=workers, image_size=tuple(render_size), progress=show,
                                   cache_dir=cache_dir)
        samples = load_infos(source.dataroot, source.version, source.split, progress=False)
        if source.num_samples is not None:
            samples = samples[: source.num_samples]
        num_samples = len(samples)
    if distributed and dist.is_main:
        torch_dist.barrier()
    if not num_samples:
        raise ValueError(f"data {data!r} holds no samples")
    t_render = time.perf_counter() - t0
    torch.manual_seed(seed)
    model = MODELS[model_name](**(model_overrides or {})).to(dev)
    t1 = time.perf_counter()
    options = dict(training_options or {})
    if not det2d:  # the 2D sets are preprocessed once in this process, kept on the device
        options.setdefault("workers", workers)
        options.setdefault("progress", progress)
    training = make_training(model_name, model, samples, dev, **options)
    t_load = time.perf_counter() - t1
    clip = default_clip(model_name) if clip is None else clip
    t2 = time.perf_counter()
    history = train(model, training, steps=steps, batch_size=batch, lr=lr, weight_decay=weight_decay, warmup=warmup,
                    clip=clip, seed=seed, progress=progress and (not distributed or dist.is_main), time_limit=time_limit,
                    dist=dist)
    t_train = time.perf_counter() - t2
    steps_done = history[-1]["step"] + 1
    world = dist.world_size if distributed else 1
    frames = steps_done * batch * world
    if distributed and not dist.is_main:
        return None
    meta = {
        "model": model_name, "data": data, "frames_in_world": num_samples, "steps": steps_done, "steps_planned": steps,
        "warmup": history[-1]["warmup"],
        "batch": batch, "processes": world, "global_batch": batch * world, "lr": lr,
        "weight_decay": weight_decay, "clip": clip, "seed": seed, "render_size": list(render_size),
        "model_overrides": dict(model_overrides or {}), "training_options": dict(training_options or {}),
        "final_loss": history[-1]["loss"], "final_terms": history[-1],
        "seconds": {"render": round(t_render, 1), "load": round(t_load, 1), "train": round(t_train, 1)},
        "throughput": {"frames_per_s": round(frames / t_train, 2), "s_per_step": round(t_train / steps_done, 4)},
        "device": str(dev), "torch": torch.__version__, "history": history, **(extra_meta or {}),
    }
    print(f"trained {model_name}: {steps_done} steps x batch {batch} on {num_samples} frames in {t_train:.0f} s "
          f"({meta['throughput']['frames_per_s']} frames/s, {meta['throughput']['s_per_step']} s/step; "
          f"render {t_render:.0f} s, load {t_load:.0f} s); final loss {history[-1]['loss']:.4f}", file=sys.stderr)
    return save_checkpoint(model, out, meta)
