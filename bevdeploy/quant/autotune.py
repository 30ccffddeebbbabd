"""Build-time launch tuning of the int8 layers: time a few configurations per layer shape on the GPU.

One heuristic (:func:`bevdeploy.quant.int8_kernels.gemm_config`) cannot be best for every conv of a
ResNet (3 input channels to 2048, 64 to 60000 output pixels). At engine build, each int8 layer is
run once on the real activations of an example input; for every distinct call (weight shape,
geometry, input shape, epilogue) a short candidate list is timed with CUDA events inside a CUDA
graph (a Triton launch from Python costs ~40 us, more than many of these convs), and the fastest
is stored in the layer's ``launch_config``. It is an argument of the op call, so it is a constant
of the exported graph: the engine file carries it and loading never re-tunes. CPU builds (and the
interpreter) keep the heuristic.

A tuning cache (:func:`load_tuning_cache` / :func:`save_tuning_cache`, ``build(autotune_cache=)`` or
``BEVDEPLOY_AUTOTUNE_CACHE``) keeps each choice under the GPU's name, Triton's version and the call's
key, so the next build of the same shapes skips the timing (BEVFormer-base's int8 build spends minutes
in it; a device session is short).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from bevdeploy.eval.timing import time_cuda_graph
from bevdeploy.quant.int8_kernels import (
    PACKED_K,
    TMA,
    Config,
    _conv_out_size,
    _p2,
    _pick_block_k,
    candidate_configs,
    conv_runs_gemm_kernel,
    gemm_config,
    int8_conv2d,
    int8_linear,
    tma_conv_problem,
    valid_config,
)
from bevdeploy.quant.modules import QuantConv2d, QuantLinear

__all__ = ["autotune_int8_layers", "layer_candidates", "load_tuning_cache", "outputs_differ", "save_tuning_cache",
           "time_in_graph", "tma_candidates", "with_tma_candidates"]

logger = logging.getLogger(__name__)


#: K at or below which a GEMM-kernel call (two to four MMA steps per tile) waits on latency rather than on
#: bandwidth or tensor cores, and so tries the high-occupancy and persistent launches below first.
SHORT_K = 512


def short_k_candidates(k: int) -> list[Config]:
    """Launches for a short-K GEMM, tried right after the heuristic's pick. Compiled offline for sm_90
    (Triton 3.9, ptxas; the bias + int8 residual + ReLU + int8-out epilogue), the heuristic's 128x256 tile
    spills (255 registers) and a 128x128 one with 8 warps needs 193: one CTA per SM, so nothing hides a
    tile's load and epilogue latencies when there are only two K steps to overlap them with. 64x64 tiles
    with 4 warps need 96 registers (5 CTAs, 20 warps per SM), 64x128 170 (3 CTAs). Two stages: more would
    only hold shared memory. Last, the persistent launch (one program per SM) of the 128x128 tile."""
    bk = _pick_block_k(k)
    return [(64, 64, bk, 8, 4, 2), (64, 128, bk, 8, 4, 2), (128, 128, bk, 8, 8, 2, 1)]


def packs_k(k: int, gemm: bool) -> bool:
    """An implicit-GEMM conv (not the GEMM kernel) whose channel count ``k`` leaves K tiles of 128 partly
    masked at every kernel point but runs of 16 intact: the packed-K kernel's case (YOLOX-x's 80 / 160 / 320
    channels, 64-channel ResNet stages)."""
    return not gemm and k % 16 == 0 and k % 128 != 0


def packed_k_candidates() -> list[Config]:
    """Launches of :func:`~bevdeploy.quant.int8_kernels._int8_conv2d_packed_kernel`, tried right after the
    heuristic's pick: full-width K tiles across kernel points. Compiled offline for sm_90 (Triton 3.9, 3x3,
    160 channels, bias + SiLU + int8 out): the same registers (164-169, no spills), wgmma count and 16-byte
    cp.async loads as the per-kernel-point kernel's tiles."""
    return [(128, 128, 128, 8, 8, 3, PACKED_K), (128, 64, 64, 8, 4, 4, PACKED_K)]


def tma_candidates(x_shape: tuple[int, ...], out_hw: tuple[int, int], o: int, stride, x_zero_point: int,
                   device: torch.device) -> list[Config]:
    """Launches of :func:`~bevdeploy.quant.int8_kernels._int8_conv2d_tma_kernel` for an implicit-GEMM conv of
    input ``x_shape`` (N, C, H, W) that it can run (Hopper or newer; see ``tma_conv_problem``), else []:
    128-pixel tiles 16 or 8 pixels wide (8 x 16 or 16 x 8 output pixels: a narrow map wastes less of the
    second), 128 output channels (64 for narrower layers), one 256-wide variant for wide layers."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return []
    _, c, h, w = x_shape
    bk = next((b for b in (128, 64, 32) if c % b == 0), 0)
    if not bk:
        return []
    bn = 64 if o <= 64 else 128
    stages = 4 if bk < 128 else 3
    out = [(128, bn, bk, 16, 8, stages, TMA), (128, bn, bk, 8, 8, stages, TMA)]
    if o >= 256:
        out.append((128, 256, bk, 16, 8, 3, TMA))
    wo = out_hw[1]
    if wo <= 8:
        out = [c_ for c_ in out if c_[3] == 8]
    return [c_ for c_ in out if tma_conv_problem(c, h, w, stride, x_zero_point, c_) is None]


def with_tma_candidates(listed: list[Config], tma: list[Config], max_candidates: int) -> list[Config]:
    """The configs timed for one call: the heuristic's pick (``listed[0]``), then every TMA candidate (a separate
    kernel, not one of the listed tiles: always timed where it can run), then the rest of ``listed`` up to
    ``max_candidates`` of them."""
    return listed[:1] + tma + listed[1:max_candidates]


def layer_candidates(m: int, n: int, k: int, device: torch.device, gemm: bool = False) -> list[Config]:
    """The heuristic's pick plus the candidates that fit the problem (no tile far wider than N or the
    contiguous K run, which would only add masked work), smaller tiles for narrow layers. ``gemm``: the
    call runs the GEMM kernel (a linear, or a 1x1 / stride-1 / unpadded conv); with K <= ``SHORT_K``
    :func:`short_k_candidates` come second. An implicit-GEMM conv whose channels :func:`packs_k` tries
    :func:`packed_k_candidates` second."""
    extra = [(128, 64, 64, 8, 4, 4), (64, 64, 64, 8, 4, 4), (128, 128, 32, 8, 4, 4), (64, 128, 64, 8, 4, 4)]
    out = [gemm_config(m, n, k, device)]
    if gemm and k <= SHORT_K:
        out += [c for c in short_k_candidates(k) if c not in out]
    if packs_k(k, gemm):
        out += packed_k_candidates()
    for c in candidate_configs() + extra:
        bm, bn, bk = c[:3]
        if bn > max(64, 2 * _p2(n)) or bk > max(32, _p2(k)) or bm > max(64, 2 * _p2(m)):
            continue
        if c not in out:
            out.append(c)
    return out


def time_in_graph(fn, calls: int = 10, replays: int = 7) -> float:
    """Median microseconds per call of ``fn`` captured ``calls`` times in a CUDA graph (CUDA events): the
    benchmarks' :func:`~bevdeploy.eval.timing.time_cuda_graph` with one warm-up (the compile) and few replays,
    as every candidate of every layer is timed at build."""
    return 1000.0 * time_cuda_graph(fn, calls_per_graph=calls, replays=replays, warmup=1)


def _call(layer: nn.Module, x_q: Tensor, residual, residual_scale, residual_zero_point, config,
          residual_mul=None) -> Tensor:
    kw = dict(residual=residual, residual_scale=residual_scale, residual_mul=residual_mul, activation=layer.activation,
              out_dtype=layer.out_dtype, out_scale=layer.out_scale, config=config,
              residual_after_act=layer.residual_after_act, residual_zero_point=residual_zero_point,
              **layer._kernel_args())
    if isinstance(layer, QuantConv2d):
        return int8_conv2d(x_q, layer.weight, layer.input_scale, layer.weight_scale, layer.bias, layer.stride,
                           layer.padding, layer.dilation, **kw)
    return int8_linear(x_q, layer.weight, layer.input_scale, layer.weight_scale, layer.bias, **kw)


def _out_hw(layer: nn.Module, x_q: Tensor) -> tuple[int, int]:
    return tuple(_conv_out_size(*a) for a in zip(x_q.shape[2:], layer.kernel_size, layer.stride, layer.padding,
                                                 layer.dilation))


def _gemm_dims(layer: nn.Module, x_q: Tensor) -> tuple[int, int, int]:
    if isinstance(layer, QuantConv2d):
        ho, wo = _out_hw(layer, x_q)
        return x_q.shape[0] * ho * wo, layer.out_channels, x_q.shape[1]
    return x_q.numel() // x_q.shape[-1], layer.out_features, x_q.shape[-1]


def outputs_differ(out: Tensor, ref: Tensor) -> str | None:
    """Why two launch configurations' outputs of one call are not the same result (None: they are): int8
    codes may differ by one step, floats by rounding; NaN never passes."""
    if out.dtype == torch.int8:
        d = int((out.int() - ref.int()).abs().max()) if out.numel() else 0
        return None if d <= 1 else f"int8 codes differ by up to {d} from the heuristic's"
    a, b = out.float(), ref.float()
    if not torch.isfinite(a).all() and not torch.equal(a.isnan(), b.isnan()):
        return "NaN where the heuristic's output has none"
    err = float((a - b).nan_to_num().norm() / b.nan_to_num().norm().clamp_min(1e-12))
    return None if err < 1e-3 else f"relative error {err:.2e} against the heuristic's output"


def _runs_gemm_kernel(layer: nn.Module) -> bool:
    """A linear, or a conv the int8 conv op hands to the GEMM kernel (1x1, stride 1, no padding)."""
    return not isinstance(layer, QuantConv2d) or conv_runs_gemm_kernel(layer.kernel_size, layer.stride, layer.padding)


def _cache_key(device: torch.device, key: tuple, short_k_gemm: bool = False, packed_k: bool = False,
               tma: bool = False) -> str:
    """The tuning cache's key of one distinct call: the GPU, the Triton version and the call's shapes;
    short-K GEMM calls, packed-K convs and TMA-eligible convs are marked with their candidate list's version
    (choices cached before :func:`short_k_candidates` / :func:`packed_k_candidates` / :func:`tma_candidates`
    are timed again, the rest stay cached)."""
    import triton

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    mark = " | short-K candidates v2" if short_k_gemm else " | packed-K candidates v1" if packed_k else ""
    if tma:
        mark += " | TMA candidates v1"
    return f"{gpu} | triton {triton.__version__}{mark} | {key!r}"


def load_tuning_cache(path: str | os.PathLike) -> dict[str, list[int]]:
    """The cache at ``path`` ({} when the file does not exist yet)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        cache = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a tuning cache (invalid JSON: {e}); delete it to start a new one") from e
    if not isinstance(cache, dict) or not all(isinstance(v, list) and valid_config(v) for v in cache.values()):
        raise ValueError(f"{path}: not a tuning cache ({{key: [6 or 7 ints]}}); delete it to start a new one")
    return cache


def save_tuning_cache(path: str | os.PathLike, cache: dict[str, list[int]]) -> None:
    """Write ``cache`` to ``path`` merged over what the file holds now (another build may have added
    entries), atomically."""
    path = Path(path)
    merged = {**load_tuning_cache(path), **cache}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


@torch.no_grad()
def autotune_int8_layers(module: nn.Module, example_args: tuple, *, candidates=None,
                         max_candidates: int = 5, cache: dict[str, list[int]] | None = None,
                         cache_path: str | os.PathLike | None = None) -> dict[str, list[int]]:
    """Time launch configurations for every int8 layer of ``module`` and store the fastest.

    Args:
        module: the deploy form (int8 layers converted and chained), on CUDA, eval mode.
        example_args: positional inputs of ``module`` of the engine's shapes (values only steer the
            activations; the timing depends on shapes).
        candidates: optional ``fn(m, n, k, device, gemm) -> list[Config]`` (default :func:`layer_candidates`;
            ``gemm``: the call runs the GEMM kernel, where a persistent launch is allowed).
        max_candidates: configurations timed per distinct call, the heuristic's first (each new one
            costs a Triton compile, ~1 s, at build time).
        cache: a tuning cache (:func:`load_tuning_cache`): a call found there is not timed; new choices
            are added to it (save it with :func:`save_tuning_cache`).
        cache_path: where each new choice of ``cache`` is also written the moment it is made (merged over the
            file), so a build cut by a timeout keeps the layers it tuned (session 17 lost a BEVDet build's
            32 tuned layers to a timeout: the cache was written only after the whole model).

    Returns:
        layer name -> chosen ``[BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages(, persistent)]`` (also set as the
        layer's ``launch_config``).
    """
    candidates = candidates or layer_candidates
    layers = {name: m for name, m in module.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}
    calls: dict[str, tuple] = {}

    def hook(name):
        def fn(mod, args, kwargs, out):
            if name in calls:
                return  # a layer called twice (shared weights): tune its first call
            x = args[0]
            residual = kwargs.get("residual", args[1] if len(args) > 1 else None)
            rs = kwargs.get("residual_scale", args[2] if len(args) > 2 else None)
            rz = kwargs.get("residual_zero_point", args[3] if len(args) > 3 else 0)
            rm = kwargs.get("residual_mul", args[4] if len(args) > 4 else None)
            x_q = x if x.dtype == torch.int8 else mod._quantize_input(x)
            calls[name] = (x_q.clone(), None if residual is None else residual.clone(), rs, rz, rm)
        return fn

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in layers.items()]
    try:
        module(*example_args)
    finally:
        for h in handles:
            h.remove()
    chosen: dict[str, list[int]] = {}
    by_key: dict[tuple, Config] = {}
    for name, (x_q, residual, rs, rz, rm) in calls.items():
        layer = layers[name]
        key = (type(layer).__name__, tuple(layer.weight.shape), getattr(layer, "stride", None),
               getattr(layer, "padding", None), getattr(layer, "dilation", None), tuple(x_q.shape),
               None if residual is None else residual.dtype, layer.out_scale is not None, layer.activation,
               layer.bias is not None, layer.out_dtype, layer.input_zero_point != 0)
        m, n, k = _gemm_dims(layer, x_q)
        gemm = _runs_gemm_kernel(layer)
        tma = [] if gemm else tma_candidates(tuple(x_q.shape), _out_hw(layer, x_q), n, layer.stride,
                                             layer.input_zero_point, x_q.device)
        ckey = _cache_key(x_q.device, key, gemm and k <= SHORT_K, packs_k(k, gemm), bool(tma))
        if key not in by_key and cache is not None and (cached := cache.get(ckey)):
            by_key[key] = tuple(int(v) for v in cached)
            logger.info("autotune %s %s: %s (cached)", name, list(key[1]), list(cached))
        if key not in by_key:
            results, first = [], None
            for cfg in with_tma_candidates(candidates(m, n, k, x_q.device, gemm), tma, max_candidates):
                try:
                    out = _call(layer, x_q, residual, rs, rz, cfg, rm)
                    if first is None:
                        first = out
                    elif problem := outputs_differ(out, first):  # a kernel must compute what the heuristic's does
                        logger.warning("autotune %s: config %s left out: %s", name, list(cfg), problem)
                        continue
                    us = time_in_graph(lambda cfg=cfg: _call(layer, x_q, residual, rs, rz, cfg, rm))
                except Exception as e:  # noqa: BLE001  (out of shared memory / registers for this shape)
                    logger.debug("%s: config %s failed: %s", name, cfg, e)
                    continue
                results.append((us, cfg))
            if not results:
                continue
            best_us, best = min(results)
            logger.info("autotune %s %s: %s %.1f us (heuristic %.1f us)", name, list(key[1]), list(best), best_us,
                        results[0][0])
            by_key[key] = best
            if cache is not None:
                cache[ckey] = list(best)
                if cache_path is not None:
                    save_tuning_cache(cache_path, {ckey: list(best)})
        layer.launch_config = tuple(by_key[key])
        chosen[name] = list(by_key[key])
    return chosen
