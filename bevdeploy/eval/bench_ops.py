"""``bevdeploy bench ops``: every op variant at BEVFormer / BEVDet shapes, timed on one GPU in one run.

For each case: the variant's median time per call (CUDA graph replay, see ``timing.py``), the
plain-PyTorch reference's time on the same inputs (float32, as the oracle runs), the speedup, the
fp32-kernel time (so a speedup is also stated against our own fp32 kernel, which stands in for the
mmcv-class CUDA kernels that official BEVFormer users run), and the achieved bandwidth over the
bytes-moved floor (each input read once, output written once) as a fraction of a device copy
measured in the same run. MSDA also reports gathered-corner throughput (4 corners x channels per
sample, the number public MSDA kernels quote).
"""

from __future__ import annotations

import datetime
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from bevdeploy.eval.timing import copy_bandwidth, gpu_dirname, time_cuda_graph, time_eager
from bevdeploy.ops._utils import quantize_int8


@dataclass
class Case:
    """One (op, shape) benchmark: ``make(variant)`` returns a zero-argument call on fixed inputs."""

    op: str
    shape: str
    variants: tuple[str, ...]
    make: Callable[[str], Callable[[], torch.Tensor]]
    reference: Callable[[], torch.Tensor]
    bytes_moved: Callable[[str], int]
    extra: dict[str, Callable[[str, float], float]] = field(default_factory=dict)


_ELT = {"fp32": 4, "fp16": 2, "fp16x2": 2, "int8": 1}
_OUT_ELT = {"fp32": 4, "fp16": 2, "fp16x2": 2, "int8": 2}
_FLOAT_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "fp16x2": torch.float16, "int8": torch.float16}


def _store(x: torch.Tensor, variant: str) -> tuple[torch.Tensor, float | None]:
    """The main input in a variant's storage: float cast, or int8 with its per-tensor scale."""
    if variant == "int8":
        scale = x.abs().max().item() / 127.0
        return quantize_int8(x, scale), scale
    return x.to(_FLOAT_DTYPE[variant]), None


# ------------------------------------------------------------------------------------------ MSDA


def _msda_case(label: str, B: int, Q: int, shapes: list[tuple[int, int]], P: int, R: int, H: int = 8, D: int = 32) -> Case:
    from bevdeploy.ops.msda import msda, msda_fused
    from bevdeploy.ops.msda import reference as msda_reference

    L = len(shapes)
    S = sum(h * w for h, w in shapes)
    g = torch.Generator(device="cuda").manual_seed(0)
    value = torch.randn(B, S, H, D, device="cuda", generator=g)
    ref_pts = torch.rand(B, Q, R, 2, device="cuda", generator=g)
    wh = torch.tensor([[w, h] for h, w in shapes], device="cuda", dtype=torch.float32)
    offsets = torch.randn(B, Q, H, L, P, 2, device="cuda", generator=g) * 0.05 * wh[None, None, None, :, None, :]
    logits = torch.randn(B, Q, H, L * P, device="cuda", generator=g)
    # classic-form inputs of the same sampling, for the reference composite
    anchor = ref_pts[:, :, None, None, torch.arange(P, device="cuda") % R, :]
    locations = anchor + offsets / wh[None, None, None, :, None, :]
    weights = logits.softmax(-1).view(B, Q, H, L, P)

    def make(variant: str):
        v, scale = _store(value, variant)
        small = torch.float32 if variant == "fp32" else torch.float16
        r, o, lg = ref_pts.to(small), offsets.to(small), logits.to(small)
        return lambda: msda_fused(v, shapes, r, o, lg, variant=variant, value_scale=scale)

    def make_classic(variant: str):
        v, scale = _store(value, variant)
        small = torch.float32 if variant == "fp32" else torch.float16
        loc, w = locations.to(small), weights.to(small)
        return lambda: msda(v, shapes, loc, w, variant=variant, value_scale=scale)

    def reference():
        return msda_reference(value, shapes, locations, weights)

    def bytes_moved(variant: str) -> int:
        small = 4 if variant == "fp32" else 2
        return (B * S * H * D * _ELT[variant] + B * Q * (R * 2 + H * L * P * 3) * small + B * Q * H * D * _OUT_ELT[variant])

    samples = B * Q * H * L * P

    def corner_tbps(variant: str, ms: float) -> float:
        return samples * 4 * D * _ELT[variant] / (ms * 1e-3) / 1e12

    case = Case("msda_fused", label, ("fp32", "fp16", "fp16x2", "int8"), make, reference, bytes_moved,
                {"corner_TBps": corner_tbps})
    classic = Case("msda", label, ("fp32", "fp16"), make_classic, reference, bytes_moved, {"corner_TBps": corner_tbps})
    return [case, classic]


def msda_cases() -> list[Case]:
    base_levels = [(116, 200), (58, 100), (29, 50), (15, 25)]
    return [
        *_msda_case("base SCA 6x10000q 4lvl P8", 6, 10000, base_levels, 8, 4),
        *_msda_case("base SCA 6x40000q 4lvl P8", 6, 40000, base_levels, 8, 4),
        *_msda_case("base TSA 2x40000q 200x200 P4", 2, 40000, [(200, 200)], 4, 1),
        *_msda_case("tiny SCA 6x2500q 15x25 P8", 6, 2500, [(15, 25)], 8, 4),
        *_msda_case("tiny TSA 2x2500q 50x50 P4", 2, 2500, [(50, 50)], 4, 1),
        *_msda_case("decoder 900q 200x200 P4", 1, 900, [(200, 200)], 4, 1),
    ]


# ------------------------------------------------------------------------------------------- SCA


def sca_cases() -> list[Case]:
    """BEVFormer-base's spatial cross-attention, per encoder layer: the camera-gathered op against the
    static form (msda_fused over all 6 cameras with offsets/logits copied per camera, then the mask
    multiply, sum and division, as ``SpatialCrossAttention`` runs without the switch), same variant.

    Geometry is real: the pillar points of the 200x200 BEV grid projected by the synthetic world's
    nuScenes-like rig with the model's own ``point_sampling`` (so ``bev_mask`` and the reference
    points are what the engine sees); value, offsets and logits are random, as in the msda cases.
    """
    from bevdeploy.eval.bench_models import rig_lidar2img
    from bevdeploy.models.bevformer import BEVFORMER_CONFIGS, BEVFormerEncoder
    from bevdeploy.ops.msda import msda_fused
    from bevdeploy.ops.sca import _launch_config_sca, _sca_triton, sca_gathered
    from bevdeploy.ops.sca import reference as sca_reference

    cfg = BEVFORMER_CONFIGS["bevformer-base"]
    img_h, img_w = cfg.image_size  # padded 928x1600
    # FPN levels at strides 8, 16, 32 and the extra stride-2 conv: 116x200, 58x100, 29x50, 15x25
    shapes = [(-(-img_h // 2**k), -(-img_w // 2**k)) for k in range(3, 3 + cfg.num_levels)]
    B, N, H, C = 1, cfg.num_cams, cfg.num_heads, cfg.embed_dims
    D, L, P, R = C // H, len(shapes), cfg.sca_num_points, cfg.num_points_in_pillar
    Q, S = cfg.num_bev, sum(h * w for h, w in shapes)
    encoder = BEVFormerEncoder(layers=[], pc_range=cfg.pc_range, num_points_in_pillar=R, image_size=cfg.image_size)
    ref_3d = encoder.reference_points_3d(cfg.bev_h, cfg.bev_w, torch.device("cuda"), torch.float32)
    lidar2img = rig_lidar2img(img_w / 1600.0).cuda()[None].expand(B, N, 4, 4)
    ref_cam, bev_mask = encoder.point_sampling(ref_3d, lidar2img)  # [B, N, Q, R, 2] fp32, [B, N, Q] 0/1
    g = torch.Generator(device="cuda").manual_seed(0)
    value = torch.randn(B, N, S, H, D, device="cuda", generator=g)
    wh = torch.tensor([[w, h] for h, w in shapes], device="cuda", dtype=torch.float32)
    offsets = torch.randn(B, Q, H, L, P, 2, device="cuda", generator=g) * 0.05 * wh[None, None, None, :, None, :]
    logits = torch.randn(B, Q, H, L * P, device="cuda", generator=g)

    seen = bev_mask.sum(1)  # cameras per query
    block_q, _, _, num_warps = _launch_config_sca(B, Q, H, P, D, torch.device("cuda"))
    pad = -Q % block_q
    per_block = F.pad(bev_mask, (0, pad)).view(B, N, -1, block_q).amax(-1)  # [B, N, blocks]: camera visited
    stats = {
        "cams_per_query": seen.mean().item(),
        "unseen_query_fraction": (seen == 0).float().mean().item(),
        "cams_visited_per_block": per_block.sum(1).mean().item(),
    }
    samples = seen.sum().item() * H * L * P  # (query, camera, head, level, point) samples really taken

    def small(variant):
        return torch.float32 if variant == "fp32" else torch.float16

    def make(variant: str):
        v, scale = _store(value, variant)
        r, o, lg, m = (t.to(small(variant)) for t in (ref_cam, offsets, logits, bev_mask))
        return lambda: sca_gathered(v, shapes, r, m, o, lg, variant=variant, value_scale=scale)

    static_cache: dict[str, float] = {}

    def static_ms(variant: str, _ms: float) -> float:
        v, scale = _store(value, variant)
        v = v.view(B * N, S, H, D)
        dt = small(variant)
        r, o, lg = ref_cam.reshape(B * N, Q, R, 2).to(dt), offsets.to(dt), logits.to(dt)
        m = bev_mask.to(torch.float32 if variant == "fp32" else torch.float16)

        def static():
            o_n = o[:, None].expand(B, N, *o.shape[1:]).reshape(B * N, *o.shape[1:])
            lg_n = lg[:, None].expand(B, N, *lg.shape[1:]).reshape(B * N, *lg.shape[1:])
            out = msda_fused(v, shapes, r, o_n, lg_n, variant=variant, value_scale=scale).view(B, N, Q, C)
            return (out * m[..., None]).sum(1) / m.sum(1).clamp(min=1.0)[..., None]

        static_cache[variant] = time_cuda_graph(static)
        return static_cache[variant]

    def speedup_vs_static(variant: str, ms: float) -> float:
        return static_cache[variant] / ms

    def launch_ms(block_q: int, num_warps: int):
        """fp16 only: the gathered kernel at another (BLOCK_Q, num_warps) than the heuristic's."""

        def timed(variant: str, _ms: float) -> float | None:
            if variant != "fp16":
                return None
            v, r, o, lg, m = value.half(), ref_cam.half(), offsets.half(), logits.half(), bev_mask.half()
            return time_cuda_graph(lambda: _sca_triton(v, shapes, r, m, o, lg, "fp16", launch=(block_q, num_warps)))

        return timed

    def reference():
        return sca_reference(value, shapes, ref_cam, bev_mask, offsets, logits)

    def bytes_moved(variant: str) -> int:
        sm = 4 if variant == "fp32" else 2
        return (B * N * S * H * D * _ELT[variant] + B * N * Q * (R * 2 + 1) * sm + B * Q * H * L * P * 3 * sm
                + B * Q * C * _OUT_ELT[variant])

    def corner_tbps(variant: str, ms: float) -> float:
        return samples * 4 * D * _ELT[variant] / (ms * 1e-3) / 1e12

    extra = {
        "static_ms": static_ms,
        "speedup_vs_static": speedup_vs_static,  # after static_ms (it reads its measurement)
        "corner_TBps": corner_tbps,
        **{k: (lambda variant, ms, x=x: x) for k, x in stats.items()},
        "block_q": lambda variant, ms: block_q,
        "num_warps": lambda variant, ms: num_warps,
        **{f"ms_block{bq}_warps{nw}": launch_ms(bq, nw) for bq, nw in ((8, 8), (8, 4), (4, 4), (2, 2), (16, 8)) if (bq, nw) != (block_q, num_warps)},
    }
    label = f"base layer {N} cams x {Q}q {L}lvl P{P} R{R}, rig mask"
    # fp16 first: the target row (<= 0.6 ms on an H100) is on disk early in a run cut short
    return [Case("sca_gathered", label, ("fp16", "fp16x2", "fp32", "int8"), make, reference, bytes_moved, extra)]


# ------------------------------------------------------------------------------ grid sample, rotate


def grid_sample_cases() -> list[Case]:
    from bevdeploy.ops.grid_sample import grid_sample

    cases = []
    for label, (N, C, H, W), (Ho, Wo) in [
        ("BEV 1x256x200x200 -> 200x200", (1, 256, 200, 200), (200, 200)),
        ("cams 6x256x58x100 -> 64x176", (6, 256, 58, 100), (64, 176)),
    ]:
        g = torch.Generator(device="cuda").manual_seed(1)
        x = torch.randn(N, C, H, W, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
        theta = torch.tensor([[0.9, -0.2, 0.05], [0.2, 0.9, -0.03]], device="cuda").expand(N, 2, 3)
        grid = F.affine_grid(theta, (N, C, Ho, Wo), align_corners=False)

        def make(variant, x=x, grid=grid):
            xs, scale = _store(x, variant)
            xs = xs.contiguous(memory_format=torch.channels_last)
            gr = grid.to(torch.float32 if variant == "fp32" else torch.float16)
            return lambda: grid_sample(xs, gr, variant=variant, input_scale=scale)

        def reference(x=x, grid=grid):
            return F.grid_sample(x, grid, align_corners=False)

        def bytes_moved(variant, N=N, C=C, H=H, W=W, Ho=Ho, Wo=Wo):
            return N * C * H * W * _ELT[variant] + N * Ho * Wo * 2 * (4 if variant == "fp32" else 2) + N * C * Ho * Wo * _OUT_ELT[variant]

        cases.append(Case("grid_sample", label, ("fp32", "fp16", "fp16x2", "int8"), make, reference, bytes_moved))
    return cases


def rotate_cases() -> list[Case]:
    from bevdeploy.ops.rotate import reference as rotate_reference
    from bevdeploy.ops.rotate import rotate

    cases = []
    for label, (C, H, W) in [("prev_bev 256x200x200", (256, 200, 200)), ("prev_bev 256x50x50", (256, 50, 50))]:
        x = torch.randn(C, H, W, device="cuda")
        angle = torch.tensor([3.7], device="cuda")
        center = torch.tensor([100.0, 100.0], device="cuda")

        def make(variant, x=x, angle=angle, center=center):
            xs, scale = _store(x, variant)
            return lambda: rotate(xs, angle, center, interpolation="bilinear", variant=variant, img_scale=scale)

        def reference(x=x, angle=angle, center=center):
            return rotate_reference(x, angle, center, interpolation="bilinear")

        def bytes_moved(variant, C=C, H=H, W=W):
            return C * H * W * (_ELT[variant] + _OUT_ELT[variant])

        cases.append(Case("rotate", label, ("fp32", "fp16", "fp16x2", "int8"), make, reference, bytes_moved))
    return cases


# --------------------------------------------------------------------------------------- inverse


def inverse_cases() -> list[Case]:
    from bevdeploy.ops.inverse import inverse, reference

    cases = []
    for label, n in [("lidar2img 6x4x4", 6), ("batch 4096x4x4", 4096)]:
        x = torch.randn(n, 4, 4, device="cuda") + 4 * torch.eye(4, device="cuda")
        cases.append(Case("inverse", label, ("fp32",), lambda variant, x=x: (lambda: inverse(x)),
                          lambda x=x: reference(x), lambda variant, n=n: n * 16 * 8))
    return cases


# ------------------------------------------------------------------------------------------- DCN


def dcn_cases() -> list[Case]:
    from bevdeploy.ops.modulated_deform_conv2d import modulated_deform_conv2d, quantize_weight_per_channel
    from bevdeploy.ops.modulated_deform_conv2d import reference as dcn_reference

    cases = []
    for label, (N, C, H, W, stride) in [
        ("R101 stage3 6x256x58x100 3x3", (6, 256, 58, 100, 1)),
        ("R101 stage4 6x512x29x50 3x3", (6, 512, 29, 50, 1)),
        ("R101 stage4 entry 6x512x58x100 s2", (6, 512, 58, 100, 2)),
    ]:
        g = torch.Generator(device="cuda").manual_seed(2)
        Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
        x = torch.randn(N, C, H, W, device="cuda", generator=g)
        offset = torch.randn(N, 18, Ho, Wo, device="cuda", generator=g)
        mask = torch.rand(N, 9, Ho, Wo, device="cuda", generator=g)
        weight = torch.randn(C, C, 3, 3, device="cuda", generator=g) / math.sqrt(9 * C)
        bias = torch.randn(C, device="cuda", generator=g)

        def make(variant, x=x, offset=offset, mask=mask, weight=weight, bias=bias, stride=stride):
            if variant == "int8":
                xs, scale = _store(x, variant)
                wq, ws = quantize_weight_per_channel(weight)
                xs = xs.contiguous(memory_format=torch.channels_last)
                o, m = offset.half(), mask.half()
                return lambda: modulated_deform_conv2d(xs, o, m, wq, bias, stride, 1, 1, variant=variant,
                                                       input_scale=scale, weight_scale=ws)
            dt = _FLOAT_DTYPE[variant]
            xs = x.to(dt).contiguous(memory_format=torch.channels_last)
            # weights channels-last, as ModulatedDeformConv2d keeps them (no per-call layout copy)
            o, m, b = offset.to(dt), mask.to(dt), bias.to(dt)
            w = weight.to(dt).contiguous(memory_format=torch.channels_last)
            return lambda: modulated_deform_conv2d(xs, o, m, w, b, stride, 1, 1, variant=variant)

        def reference(x=x, offset=offset, mask=mask, weight=weight, bias=bias, stride=stride):
            return dcn_reference(x, offset, mask, weight, bias, stride, 1, 1)

        def bytes_moved(variant, N=N, C=C, H=H, W=W, Ho=Ho, Wo=Wo):
            small = 4 if variant == "fp32" else 2
            return N * C * H * W * _ELT[variant] + N * 27 * Ho * Wo * small + C * C * 9 * _ELT[variant] + N * C * Ho * Wo * _OUT_ELT[variant]

        flops = 2 * N * C * C * 9 * Ho * Wo

        def dense_conv_ms(variant, _ms, x=x, weight=weight, stride=stride):
            xs = x.half().contiguous(memory_format=torch.channels_last)
            return time_cuda_graph(lambda: F.conv2d(xs, weight.half(), None, stride, 1))

        def tflops(variant, ms, flops=flops):
            return flops / (ms * 1e-3) / 1e12

        cases.append(Case("modulated_deform_conv2d", label, ("fp32", "fp16", "fp16x2", "int8"), make, reference, bytes_moved,
                          {"TFLOPs": tflops, "cudnn_fp16_dense_ms": dense_conv_ms}))
    return cases


#: BEVFormer's R101-DCN layers (caffe style: every DCN is a stride-1 3x3 conv2), 6 cameras, feature
#: maps of the padded images (small 736x1280, base 928x1600): stage 3 at /16 (23 layers a frame),
#: stage 4 at /32 (3 layers).
DCN_BEVFORMER_LAYERS = [
    ("BEVFormer-base R101 stage3 6x256x58x100 3x3 (x23)", (6, 256, 58, 100)),
    ("BEVFormer-base R101 stage4 6x512x29x50 3x3 (x3)", (6, 512, 29, 50)),
    ("BEVFormer-small R101 stage3 6x256x46x80 3x3 (x23)", (6, 256, 46, 80)),
    ("BEVFormer-small R101 stage4 6x512x23x40 3x3 (x3)", (6, 512, 23, 40)),
]


def dcn_igemm_cases(layers=DCN_BEVFORMER_LAYERS, device: str = "cuda",
                    variants: tuple[str, ...] = ("fp16", "fp16x2", "fp32")) -> list[Case]:
    """The implicit-GEMM DCN kernel (the default for fp16/fp16x2) at BEVFormer's R101-DCN layer shapes,
    timed beside the previous plan + fused kernel on the same inputs and beside cuDNN's fp16
    channels-last plain 3x3 conv of the same shape (the FLOPs floor; target: DCN <= 1.5x cuDNN).
    ``int8``: input codes at amax / 127, per-channel weights (the int8 engines' DCN; the reference is
    the float DCN, so its error includes the quantization).
    Inputs as the engine feeds them: channels-last activations and weights, offset a channel slice of
    the offset conv's channels-last output, mask its sigmoid."""
    from bevdeploy.ops import modulated_deform_conv2d as mdc

    cases = []
    for label, (N, C, H, W) in layers:
        g = torch.Generator(device=device).manual_seed(3)
        x = torch.randn(N, C, H, W, device=device, generator=g)
        conv_out = torch.randn(N, 27, H, W, device=device, generator=g).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(C, C, 3, 3, device=device, generator=g) / math.sqrt(9 * C)
        bias = torch.randn(C, device=device, generator=g)
        flops = 2 * N * C * C * 9 * H * W
        cudnn_ms: dict[str, float] = {}

        x_scale = x.abs().max().item() / 127.0  # int8: per-tensor input codes, per-channel weights
        w_q, w_scale = mdc.quantize_weight_per_channel(weight)

        def inputs(variant, x=x, conv_out=conv_out, weight=weight, bias=bias, x_scale=x_scale, w_q=w_q):
            dt = _FLOAT_DTYPE[variant]
            out = conv_out.to(dt)
            if variant == "int8":
                xs = torch.clamp(torch.round(x / x_scale), -127, 127).to(torch.int8)
                return (xs.contiguous(memory_format=torch.channels_last), out[:, :18], torch.sigmoid(out[:, 18:]), w_q,
                        bias.to(dt))
            return (x.to(dt).contiguous(memory_format=torch.channels_last), out[:, :18], torch.sigmoid(out[:, 18:]),
                    weight.to(dt).contiguous(memory_format=torch.channels_last), bias.to(dt))

        def int8_args(variant, x_scale=x_scale, w_scale=w_scale):
            return dict(input_scale=x_scale, weight_scale=w_scale) if variant == "int8" else {}

        # every closure binds this case's inputs and scales as defaults: the loop rebinds the names, and a late
        # lookup would hand the first layer the last layer's per-channel weight scales
        def make(variant, inputs=inputs, int8_args=int8_args):
            xs, o, m, w, b = inputs(variant)
            return lambda: mdc._modulated_deform_conv2d_igemm(xs, o, m, w, b, [1, 1], [1, 1], [1, 1], 1, variant,
                                                              **int8_args(variant))

        def old_kernel_ms(variant, _ms, inputs=inputs, int8_args=int8_args, cache={}):  # noqa: B006 (one per case)
            if variant not in cache:
                xs, o, m, w, b = inputs(variant)
                kw = int8_args(variant)
                cache[variant] = time_cuda_graph(lambda: mdc._modulated_deform_conv2d_triton(
                    xs, o, m, w, b, [1, 1], [1, 1], [1, 1], 1, 1, variant, kw.get("input_scale", 1.0),
                    kw.get("weight_scale")))
            return cache[variant]

        def int8_mma_ms(variant, _ms, inputs=inputs, int8_args=int8_args):
            """int8 only: the same kernel rounding each blended sample to a code for an int8 MMA."""
            if variant != "int8":
                return None
            xs, o, m, w, b = inputs(variant)
            return time_cuda_graph(lambda: mdc._modulated_deform_conv2d_igemm(
                xs, o, m, w, b, [1, 1], [1, 1], [1, 1], 1, variant, int8_mma=True, **int8_args(variant)))

        def err_vs_cpu_int8(variant, _ms, inputs=inputs, int8_args=int8_args):
            """int8 only: the kernel against the op's CPU int8 math (float64 GEMM) on the same codes, relative
            L2: separates the kernel from the quantization, which the reference comparison includes."""
            if variant != "int8":
                return None
            xs, o, m, w, b = inputs(variant)
            kw = int8_args(variant)
            y = mdc._modulated_deform_conv2d_igemm(xs, o, m, w, b, [1, 1], [1, 1], [1, 1], 1, variant, **kw).double().cpu()
            want = mdc._cpu_impl(xs.cpu(), o.cpu(), m.cpu(), w.cpu(), b.cpu(), [1, 1], [1, 1], [1, 1], 1, 1, variant,
                                 kw["input_scale"], kw["weight_scale"].cpu()).double()
            return round(((y - want).norm() / want.norm()).item(), 6)

        def cudnn_fp16_ms(variant, _ms, x=x, weight=weight, bias=bias, cache=cudnn_ms):
            if "ms" not in cache:
                torch.backends.cudnn.benchmark = True
                xs = x.half().contiguous(memory_format=torch.channels_last)
                w = weight.half().contiguous(memory_format=torch.channels_last)
                cache["ms"] = time_cuda_graph(lambda: F.conv2d(xs, w, bias.half(), 1, 1))
            return cache["ms"]

        def reference(x=x, conv_out=conv_out, weight=weight, bias=bias):
            return mdc.reference(x, conv_out[:, :18], torch.sigmoid(conv_out[:, 18:]), weight, bias, 1, 1, 1)

        def bytes_moved(variant, N=N, C=C, H=H, W=W):
            small = 4 if variant == "fp32" else 2
            return N * C * H * W * _ELT[variant] * 2 + N * 27 * H * W * small + C * C * 9 * _ELT[variant]

        cases.append(Case(
            "modulated_deform_conv2d_igemm", label, tuple(variants), make, reference, bytes_moved,
            {
                "TFLOPs": lambda variant, ms, flops=flops: flops / (ms * 1e-3) / 1e12,
                "old_kernel_ms": old_kernel_ms,
                "speedup_vs_old_kernel": lambda variant, ms, f=old_kernel_ms: f(variant, ms) / ms,
                "cudnn_fp16_ms": cudnn_fp16_ms,
                "int8_mma_ms": int8_mma_ms,
                "err_vs_cpu_int8": err_vs_cpu_int8,
                "ratio_vs_cudnn_fp16": lambda variant, ms, f=cudnn_fp16_ms: ms / f(variant, ms),
            },
        ))  # fmt: skip
    return cases


# ----------------------------------------------------------------------------------- bev_pool_v2


def bev_pool_cases() -> list[Case]:
    from bevdeploy.ops import bev_pool_v2 as bp

    coor = bp.bevdet_like_geometry()  # [1, 6, 59, 16, 44, 3] metres, BEVDet-R50's frustum
    ranks_bev, ranks_depth, ranks_feat, starts, lengths = (t.cuda() for t in bp.bev_pool_v2_prepare(coor))
    B, N, D, fH, fW, _ = coor.shape
    g = torch.Generator(device="cuda").manual_seed(4)
    depth = torch.randn(B, N, D, fH, fW, device="cuda", generator=g).softmax(2)
    feat = torch.randn(B, N, fH, fW, 64, device="cuda", generator=g)
    shape = (B, 1, 128, 128, 64)

    def make(variant):
        d, ds = _store(depth, variant)
        f, fs = _store(feat, variant)
        return lambda: bp.bev_pool_v2(d, f, ranks_depth, ranks_feat, ranks_bev, shape, starts, lengths,
                                      variant=variant, depth_scale=ds, feat_scale=fs)

    def reference():
        return bp.scatter_add_reference(depth, feat, ranks_depth, ranks_feat, ranks_bev, shape, starts, lengths)

    n_pts = ranks_bev.numel()
    n_out = math.prod(shape)

    def bytes_moved(variant):
        return depth.numel() * _ELT[variant] + feat.numel() * _ELT[variant] + n_pts * 12 + starts.numel() * 8 + n_out * _OUT_ELT[variant]

    return [Case("bev_pool_v2", f"BEVDet-R50 {n_pts} pts {starts.numel()} intervals", ("fp32", "fp16", "fp16x2", "int8"),
                 make, reference, bytes_moved)]


# ------------------------------------------------------------------------------- flash attention


def attention_cases() -> list[Case]:
    from bevdeploy.ops.flash_attention import flash_attention, reference

    cases = []
    for label, (B, H, L, D) in [("decoder 1x8x900x32", (1, 8, 900, 32)), ("large 4x16x4096x64", (4, 16, 4096, 64))]:
        g = torch.Generator(device="cuda").manual_seed(3)
        q, k, v = (torch.randn(B, H, L, D, device="cuda", generator=g) for _ in range(3))

        def make(variant, q=q, k=k, v=v):
            (qs, qsc), (ks, ksc), (vs, vsc) = _store(q, variant), _store(k, variant), _store(v, variant)
            return lambda: flash_attention(qs, ks, vs, variant=variant, q_scale=qsc, k_scale=ksc, v_scale=vsc)

        def bytes_moved(variant, B=B, H=H, L=L, D=D):
            return 3 * B * H * L * D * _ELT[variant] + B * H * L * D * _OUT_ELT[variant]

        flops = 4 * B * H * L * L * D

        def sdpa_fp16_ms(variant, _ms, q=q, k=k, v=v):
            qh, kh, vh = q.half(), k.half(), v.half()
            return time_cuda_graph(lambda: F.scaled_dot_product_attention(qh, kh, vh))

        def tflops(variant, ms, flops=flops):
            return flops / (ms * 1e-3) / 1e12

        cases.append(Case("flash_attention", label, ("fp32", "fp16", "fp16x2", "int8"), make,
                          lambda q=q, k=k, v=v: reference(q, k, v), bytes_moved, {"TFLOPs": tflops, "sdpa_fp16_ms": sdpa_fp16_ms}))
    return cases


# ------------------------------------------------------------------------- int8 GEMM / conv layers


def int8_layer_cases() -> list[Case]:
    """The engine's int8 convs/linears (bevdeploy.quant) against PyTorch's fp32 layer (reference)
    and cuDNN/cuBLAS fp16 channels-last (extra column): int8 must beat fp16 to be worth it."""
    from bevdeploy.ops._utils import quantize_weight_per_channel
    from bevdeploy.quant.int8_kernels import int8_conv2d, int8_linear

    cases = []
    for label, (N, C, H, W, O, k) in [
        ("conv3x3 256->256 6x58x100", (6, 256, 58, 100, 256, 3)),
        ("conv1x1 1024->256 6x58x100", (6, 1024, 58, 100, 256, 1)),
        ("conv3x3 64->64 6x120x200", (6, 64, 120, 200, 64, 3)),
    ]:
        g = torch.Generator(device="cuda").manual_seed(5)
        x = torch.randn(N, C, H, W, device="cuda", generator=g)
        w = torch.randn(O, C, k, k, device="cuda", generator=g) / math.sqrt(C * k * k)
        b = torch.randn(O, device="cuda", generator=g)
        pad = k // 2

        def make(variant, x=x, w=w, b=b, pad=pad):
            xq, xs = _store(x, "int8")
            xq = xq.contiguous(memory_format=torch.channels_last)
            wq, ws = quantize_weight_per_channel(w)
            wq = wq.permute(0, 2, 3, 1).contiguous()  # [O, kh, kw, C]: K-contiguous
            return lambda: int8_conv2d(xq, wq, xs, ws, b, 1, pad, 1, activation="relu")

        def reference(x=x, w=w, b=b, pad=pad):
            return torch.relu(F.conv2d(x, w, b, 1, pad))

        def cudnn_fp16_ms(variant, _ms, x=x, w=w, b=b, pad=pad):
            xh = x.half().contiguous(memory_format=torch.channels_last)
            wh, bh = w.half().contiguous(memory_format=torch.channels_last), b.half()
            return time_cuda_graph(lambda: torch.relu(F.conv2d(xh, wh, bh, 1, pad)))

        ops = 2 * N * H * W * O * C * k * k

        def tops(variant, ms, ops=ops):
            return ops / (ms * 1e-3) / 1e12

        def bytes_moved(variant, N=N, C=C, H=H, W=W, O=O, k=k):
            return N * C * H * W + O * C * k * k + N * O * H * W * 2

        cases.append(Case("int8_conv2d", label, ("int8",), make, reference, bytes_moved,
                          {"TOPS": tops, "cudnn_fp16_ms": cudnn_fp16_ms}))
    M, K, Nn = 40000, 256, 512
    g = torch.Generator(device="cuda").manual_seed(6)
    x = torch.randn(M, K, device="cuda", generator=g)
    w = torch.randn(Nn, K, device="cuda", generator=g) / 16
    b = torch.randn(Nn, device="cuda", generator=g)

    def make_linear(variant):
        xq, xs = _store(x, "int8")
        wq, ws = quantize_weight_per_channel(w)
        return lambda: int8_linear(xq, wq, xs, ws, b, activation="relu")

    def cublas_fp16_ms(variant, _ms):
        xh, wh, bh = x.half(), w.half(), b.half()
        return time_cuda_graph(lambda: torch.relu(F.linear(xh, wh, bh)))

    cases.append(Case("int8_linear", "FFN 40000x256->512", ("int8",), make_linear,
                      lambda: torch.relu(F.linear(x, w, b)), lambda v: M * K + Nn * K + M * Nn * 2,
                      {"TOPS": lambda v, ms: 2 * M * K * Nn / (ms * 1e-3) / 1e12, "cublas_fp16_ms": cublas_fp16_ms}))
    return cases


ALL_CASES = {
    "msda": msda_cases,
    "sca": sca_cases,
    "grid_sample": grid_sample_cases,
    "rotate": rotate_cases,
    "inverse": inverse_cases,
    "modulated_deform_conv2d": dcn_cases,
    "modulated_deform_conv2d_igemm": dcn_igemm_cases,
    "bev_pool_v2": bev_pool_cases,
    "flash_attention": attention_cases,
    "int8_layers": int8_layer_cases,
}


def run(ops: list[str] | None = None, out_dir: str | Path = "bench/results", command: str = "") -> dict:
    """Run the op benchmark on the current GPU and write ``<out_dir>/<gpu>/ops.{json,md}``."""
    if not torch.cuda.is_available():
        raise RuntimeError("bevdeploy bench ops needs a CUDA GPU (none is visible to PyTorch)")
    from tqdm import tqdm

    names = ops or list(ALL_CASES)
    unknown = [n for n in names if n not in ALL_CASES]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; choose from {list(ALL_CASES)}")
    bandwidth = copy_bandwidth()
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "copy_bandwidth_TBps": round(bandwidth / 1e12, 3),
        "timing": "CUDA graph of 10 calls, median of 30 replays after warm-up; reference = plain-PyTorch fp32",
        "rows": [],
    }
    folder = Path(out_dir) / gpu_dirname()
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        for case in ALL_CASES[name]():
            with torch.no_grad():
                ref_ms, ref_timing = _time_reference(case.reference)
                fp32_ms = None
                for variant in tqdm(case.variants, desc=f"{case.op} {case.shape}", file=sys.stderr, leave=False):
                    ms = time_cuda_graph(case.make(variant))
                    if variant == "fp32":
                        fp32_ms = ms
                    row = {
                        "op": case.op,
                        "variant": variant,
                        "shape": case.shape,
                        "ms": round(ms, 5),
                        "reference_ms": round(ref_ms, 5),
                        "speedup": round(ref_ms / ms, 2),
                        "speedup_vs_fp32_kernel": round(fp32_ms / ms, 2) if fp32_ms else None,
                        "bandwidth_fraction": round(case.bytes_moved(variant) / (ms * 1e-3) / bandwidth, 3),
                    }
                    if ref_timing != "graph":
                        row["reference_timing"] = ref_timing
                    for key, fn in case.extra.items():
                        extra = fn(variant, ms)  # None: does not apply to this variant
                        if extra is not None:
                            row[key] = round(extra, 4)
                    result["rows"].append(row)
                    # written after every row: a run cut short keeps what it measured
                    (folder / "ops.json").write_text(json.dumps(result, indent=1) + "\n")
                    (folder / "ops.md").write_text(to_markdown(result))
            torch.cuda.empty_cache()
    return result


def _time_reference(fn) -> tuple[float, str]:
    """References are plain PyTorch; one that builds host tensors cannot be captured in a graph and
    is timed with events around each call instead (which then includes its launch overhead)."""
    try:
        return time_cuda_graph(fn), "graph"
    except RuntimeError:
        torch.cuda.synchronize()
        return time_eager(fn), "eager (not capturable)"


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def to_markdown(result: dict) -> str:
    keys = ["op", "variant", "shape", "ms", "reference_ms", "speedup", "speedup_vs_fp32_kernel", "bandwidth_fraction"]
    extra = sorted({k for r in result["rows"] for k in r} - set(keys))
    lines = [
        f"# Op benchmark on {result['gpu']}",
        "",
        f"torch {result['torch']}, triton {result['triton']}, {result['date']}; copy bandwidth "
        f"{result['copy_bandwidth_TBps']} TB/s; {result['timing']}.",
        f"Command: `{result['command']}`",
        "",
        "| " + " | ".join(keys + extra) + " |",
        "|" + "---|" * (len(keys) + len(extra)),
    ]
    for r in result["rows"]:
        lines.append("| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys + extra) + " |")
    return "\n".join(lines) + "\n"
