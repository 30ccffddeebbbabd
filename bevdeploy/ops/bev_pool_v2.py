"""BEVDet's voxel pooling of depth x context (BEVPoolv2; the reference system's ``BEVPoolV2TRT``).

Lift-Splat-Shoot lifts every feature pixel ``(b, n, h, w)`` to ``D`` frustum points, point
``(b, n, d, h, w)`` carrying ``depth[b, n, d, h, w] * feat[b, n, h, w, :]``, and sums the points
that fall into each BEV voxel. BEVPoolv2 (Huang & Huang, arXiv 2211.17111) never materialises the
``[B, N, D, fH, fW, C]`` product: the voxel of every frustum point depends on the camera geometry
only, so the points inside the grid are sorted by voxel once on the host
(:func:`bev_pool_v2_prepare`) into three index arrays and a list of intervals (runs of points with
the same voxel), and the op computes, for every interval ``k`` with points
``p in [interval_starts[k], interval_starts[k] + interval_lengths[k])``::

    out[ranks_bev[interval_starts[k]], :] = sum_p depth.flatten()[ranks_depth[p]]
                                                 * feat.reshape(-1, C)[ranks_feat[p], :]

Voxels no interval names are 0. ``ranks_depth`` indexes the flattened ``[B, N, D, fH, fW]`` depth,
``ranks_feat`` the flattened ``[B, N, fH, fW]`` pixels, ``ranks_bev`` the flattened
``[B, Z, Y, X]`` voxels; each interval must own a distinct voxel (as prepare makes them; BEVDet's
kernel races when two intervals share one, ours too), and a point counts only through the interval
that holds it. The result is returned as ``[B, C, Z, Y, X]`` like BEVDet's Python wrapper.

Layout: the kernel writes channels-last ``[B, Z, Y, X, C]`` rows (each interval's C channels are
one contiguous store) and the op returns the permuted view, so the ``[B, C, Z, Y, X]`` output has
strides ``(Z*Y*X*C, 1, Y*X*C, X*C, C)``; with Z = 1 the collapsed ``[B, C, Y, X]`` map is a
``channels_last`` tensor, the layout the fp16/int8 convolutions after it want. BEVDet calls
``.contiguous()`` on the permuted tensor; that copy (read + write of the whole map) is left to the
caller.

Origin: HuangJunJie2017/BEVDet ``mmdet3d/ops/bev_pool_v2`` (kernel, argument order, layouts) and
``LSSViewTransformer.voxel_pooling_prepare_v2`` (index preparation). Our own code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bevdeploy.ops._utils import (
    VARIANT_INPUT_DTYPE,
    VARIANT_OUTPUT_DTYPE,
    check_dim,
    check_int8_scale,
    check_same_device,
    check_tensor,
    new_output,
    register_reference_autograd,
    resolve_variant,
    triton_available,
    use_triton,
)

__all__ = [
    "BEVPoolV2",
    "bev_pool_v2",
    "bev_pool_v2_prepare",
    "bevdet_like_geometry",
    "reference",
    "scatter_add_reference",
]

#: BEVDet-R50's grid (dev2.1 ``grid_config``): x, y in [-51.2, 51.2) at 0.8 m, z in [-5, 3) as one cell.
BEVDET_GRID_LOWER_BOUND = (-51.2, -51.2, -5.0)
BEVDET_GRID_INTERVAL = (0.8, 0.8, 8.0)
BEVDET_GRID_SIZE = (128, 128, 1)

_RANK_DTYPES = (torch.int32,)


def _check_inputs(
    depth: Tensor,
    feat: Tensor,
    ranks_depth: Tensor,
    ranks_feat: Tensor,
    ranks_bev: Tensor,
    interval_starts: Tensor,
    interval_lengths: Tensor,
    bev_feat_shape: Sequence[int],
    variant: str | None,
    depth_scale: float | None,
    feat_scale: float | None,
) -> tuple[str, float, float]:
    """Validate shapes/dtypes/devices; return the resolved (variant, depth_scale, feat_scale)."""
    check_tensor("feat", feat, shape=("B", "N", "fH", "fW", "C"))
    check_tensor("depth", depth, shape=("B", "N", "D", "fH", "fW"))
    variant = resolve_variant(variant, feat.dtype, "feat")
    if depth.dtype != VARIANT_INPUT_DTYPE[variant]:
        raise ValueError(f"variant {variant!r} takes depth as {VARIANT_INPUT_DTYPE[variant]}, got {depth.dtype}")
    B, N, fH, fW, C = feat.shape
    check_dim("depth", depth.shape[0], B, "dim 0 (B)")
    check_dim("depth", depth.shape[1], N, "dim 1 (N, cameras)")
    check_dim("depth", depth.shape[3], fH, "dim 3 (fH)")
    check_dim("depth", depth.shape[4], fW, "dim 4 (fW)")
    check_tensor("ranks_depth", ranks_depth, shape=("P",), dtypes=_RANK_DTYPES)
    P = ranks_depth.shape[0]
    check_tensor("ranks_feat", ranks_feat, shape=(P,), dtypes=_RANK_DTYPES)
    check_tensor("ranks_bev", ranks_bev, shape=(P,), dtypes=_RANK_DTYPES)
    check_tensor("interval_starts", interval_starts, shape=("I",), dtypes=_RANK_DTYPES)
    check_tensor("interval_lengths", interval_lengths, shape=(interval_starts.shape[0],), dtypes=_RANK_DTYPES)
    check_same_device(
        depth=depth, feat=feat, ranks_depth=ranks_depth, ranks_feat=ranks_feat, ranks_bev=ranks_bev,
        interval_starts=interval_starts, interval_lengths=interval_lengths,
    )
    shape = list(bev_feat_shape)
    if len(shape) != 5 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"bev_feat_shape must be 5 positive ints (B, Z, Y, X, C), got {bev_feat_shape}")
    check_dim("bev_feat_shape", shape[0], B, "B (dim 0)")
    check_dim("bev_feat_shape", shape[4], C, "C (dim 4, the channels of feat)")
    # The kernel computes flat element offsets in int32.
    if math.prod(shape) >= 2**31 or depth.numel() >= 2**31 or feat.numel() >= 2**31:
        raise ValueError(f"bev_pool_v2: tensors of 2**31 elements or more are not supported, got {shape=}")
    depth_scale = check_int8_scale("depth_scale", depth_scale, variant)
    feat_scale = check_int8_scale("feat_scale", feat_scale, variant)
    return variant, depth_scale, feat_scale


def _compute_inputs(depth: Tensor, feat: Tensor, variant: str, depth_scale: float, feat_scale: float):
    """The float tensors the references compute on: dequantised int8, float64 kept as float64."""
    if variant == "int8" and depth.dtype == torch.int8:
        return depth.float() * depth_scale, feat.float() * feat_scale
    if depth.dtype == torch.float64 or feat.dtype == torch.float64:
        return depth.double(), feat.double()
    return depth.float(), feat.float()


def _output_dtype(variant: str, compute_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if compute_dtype == torch.float64 else VARIANT_OUTPUT_DTYPE[variant]


def reference(
    depth: Tensor,
    feat: Tensor,
    ranks_depth: Tensor,
    ranks_feat: Tensor,
    ranks_bev: Tensor,
    interval_starts: Tensor,
    interval_lengths: Tensor,
    bev_feat_shape: Sequence[int],
    variant: str = "fp32",
    depth_scale: float = 1.0,
    feat_scale: float = 1.0,
) -> Tensor:
    """Plain-PyTorch BEVPoolv2 with the interval semantics of BEVDet's kernel (CPU path, autograd).

    Each point is routed to the voxel of the interval holding it (``ranks_bev`` of the interval's
    first point); points outside every interval are dropped. Fixed-size ops only (no sync, no
    data-dependent shapes), so it also runs under fake tensors. Intervals must not overlap.
    Float64 inputs are computed and returned in float64 (for gradcheck); otherwise fp32 math and
    the variant's output dtype. Returns ``[B, C, Z, Y, X]`` (a permuted channels-last view).
    """
    B, Z, Y, X, C = (int(s) for s in bev_feat_shape)
    d, f = _compute_inputs(depth, feat, variant, depth_scale, feat_scale)
    P = ranks_depth.shape[0]
    device = ranks_depth.device
    starts = interval_starts.long()
    ends = starts + interval_lengths.long()
    # Which points some interval covers: +1 at each start, -1 at each end, prefix sum.
    edge = torch.zeros(P + 1, dtype=torch.long, device=device)
    edge.index_add_(0, starts.clamp(0, P), torch.ones_like(starts))
    edge.index_add_(0, ends.clamp(0, P), -torch.ones_like(ends))
    covered = edge.cumsum(0)[:P] > 0
    # The interval holding a covered point is the last one starting at or before it.
    sorted_starts, _ = torch.sort(starts)
    begins = torch.zeros(P + 1, dtype=torch.long, device=device)
    begins.index_add_(0, sorted_starts.clamp(0, P), torch.ones_like(sorted_starts))
    which = (begins.cumsum(0)[:P] - 1).clamp_min(0)
    if sorted_starts.numel() > 0:
        first = sorted_starts[which].clamp(0, max(P - 1, 0))
        cell = ranks_bev.long()[first] if P > 0 else ranks_bev.long()
    else:
        covered = torch.zeros_like(covered)
        cell = torch.zeros(P, dtype=torch.long, device=device)
    rows = d.reshape(-1)[ranks_depth.long()].unsqueeze(1) * f.reshape(-1, C)[ranks_feat.long()]
    rows = rows * covered.unsqueeze(1).to(rows.dtype)
    cell = torch.where(covered, cell, torch.zeros_like(cell))
    out = rows.new_zeros(B * Z * Y * X, C).index_add_(0, cell, rows)
    out = out.view(B, Z, Y, X, C).to(_output_dtype(variant, rows.dtype))
    return out.permute(0, 4, 1, 2, 3)


def scatter_add_reference(
    depth: Tensor,
    feat: Tensor,
    ranks_depth: Tensor,
    ranks_feat: Tensor,
    ranks_bev: Tensor,
    bev_feat_shape: Sequence[int],
    *,
    depth_scale: float | None = None,
    feat_scale: float | None = None,
) -> Tensor:
    """The dense Lift-Splat baseline: materialise depth x feat for every frustum point, add into the grid.

    Builds the whole ``[B, N, D, fH, fW, C]`` volume (as LSS and BEVDet before BEVPoolv2 did),
    keeps the points named by ``ranks_depth`` and ``index_add``s each into voxel ``ranks_bev``.
    Equals :func:`bev_pool_v2` when the intervals are those of :func:`bev_pool_v2_prepare`.
    int8 inputs are dequantised with the given scales; float64 stays float64 (the test oracle).

    Returns:
        Tensor[B, C, Z, Y, X]: contiguous, in the compute dtype (float32, or float64).
    """
    B, Z, Y, X, C = (int(s) for s in bev_feat_shape)
    if depth.dtype == torch.int8:
        d, f = depth.float() * float(depth_scale), feat.float() * float(feat_scale)
    else:
        d, f = _compute_inputs(depth, feat, "fp32", 1.0, 1.0)
    volume = d.unsqueeze(-1) * f.unsqueeze(2)  # [B, N, D, fH, fW, C]
    rows = volume.reshape(-1, C)[ranks_depth.long()]
    out = rows.new_zeros(B * Z * Y * X, C).index_add_(0, ranks_bev.long(), rows)
    return out.view(B, Z, Y, X, C).permute(0, 4, 1, 2, 3).contiguous()


# --------------------------------------------------------------------------------------------------
# Host-side preparation (once per camera geometry) and a synthetic geometry for tests/benchmarks.
# --------------------------------------------------------------------------------------------------


def bev_pool_v2_prepare(
    coor: Tensor,
    grid_lower_bound: Sequence[float] = BEVDET_GRID_LOWER_BOUND,
    grid_interval: Sequence[float] = BEVDET_GRID_INTERVAL,
    grid_size: Sequence[int] = BEVDET_GRID_SIZE,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """BEVDet's ``voxel_pooling_prepare_v2``: frustum point coordinates -> sorted ranks and intervals.

    Runs once per camera geometry (data-dependent sizes, host syncs); the results are the fixed-size
    index inputs of :func:`bev_pool_v2`.

    Args:
        coor (Tensor[B, N, D, fH, fW, 3]): per frustum point, either ego/lidar coordinates (x, y, z)
            in metres (floating dtype; converted to voxels as BEVDet does:
            ``((coor - grid_lower_bound) / grid_interval).long()``, i.e. truncation toward zero,
            so points up to one cell below the lower bound land in cell 0, a quirk kept for
            exactness), or voxel indices (integer dtype; used as they are).
        grid_lower_bound: (x, y, z) lower corner of the grid in metres (BEVDet-R50: -51.2, -51.2, -5).
        grid_interval: (x, y, z) cell size in metres (BEVDet-R50: 0.8, 0.8, 8).
        grid_size: (X, Y, Z) cells (BEVDet-R50: 128, 128, 1). The output is ``[B, C, Z, Y, X]``.

    Returns:
        (ranks_bev, ranks_depth, ranks_feat, interval_starts, interval_lengths), int32, contiguous,
        on coor's device, in BEVDet's return order. Points outside the grid are dropped; the rest
        are sorted by voxel (stable, so the order inside a voxel is the frustum order); one
        interval per occupied voxel. With no point inside the grid all five are empty.
    """
    check_tensor("coor", coor, shape=("B", "N", "D", "fH", "fW", 3))
    if len(grid_size) != 3 or len(grid_lower_bound) != 3 or len(grid_interval) != 3:
        raise ValueError(
            f"grid_lower_bound, grid_interval and grid_size take 3 values (x, y, z), got "
            f"{grid_lower_bound=}, {grid_interval=}, {grid_size=}"
        )
    B, N, D, H, W, _ = coor.shape
    num_points = B * N * D * H * W
    device = coor.device
    ranks_depth = torch.arange(num_points, dtype=torch.long, device=device)
    ranks_feat = (
        torch.arange(num_points // D if D else 0, dtype=torch.long, device=device)
        .reshape(B, N, 1, H, W)
        .expand(B, N, D, H, W)
        .flatten()
    )
    if coor.is_floating_point():
        lower = torch.tensor(grid_lower_bound, dtype=coor.dtype, device=device)
        step = torch.tensor(grid_interval, dtype=coor.dtype, device=device)
        voxel = ((coor - lower) / step).long().view(num_points, 3)
    else:
        voxel = coor.long().reshape(num_points, 3)
    gx, gy, gz = (int(s) for s in grid_size)
    batch = torch.arange(B, dtype=torch.long, device=device).repeat_interleave(num_points // B if B else 0)
    kept = (
        (voxel[:, 0] >= 0) & (voxel[:, 0] < gx)
        & (voxel[:, 1] >= 0) & (voxel[:, 1] < gy)
        & (voxel[:, 2] >= 0) & (voxel[:, 2] < gz)
    )
    voxel, batch, ranks_depth, ranks_feat = voxel[kept], batch[kept], ranks_depth[kept], ranks_feat[kept]
    ranks_bev = ((batch * gz + voxel[:, 2]) * gy + voxel[:, 1]) * gx + voxel[:, 0]
    order = torch.argsort(ranks_bev, stable=True)
    ranks_bev, ranks_depth, ranks_feat = ranks_bev[order], ranks_depth[order], ranks_feat[order]
    new_cell = torch.ones(ranks_bev.shape[0], dtype=torch.bool, device=device)
    new_cell[1:] = ranks_bev[1:] != ranks_bev[:-1]
    interval_starts = torch.nonzero(new_cell).flatten()
    interval_lengths = torch.diff(interval_starts, append=torch.tensor([ranks_bev.shape[0]], device=device))
    return tuple(t.to(torch.int32).contiguous() for t in (ranks_bev, ranks_depth, ranks_feat, interval_starts, interval_lengths))


#: nuScenes camera yaws (degrees, counter-clockwise from the ego x axis), in BEVDet's camera order.
_NUSCENES_CAMERAS = (
    # name, yaw, (x, y, z) position in the lidar frame (m), focal length (px at 1600x900)
    ("CAM_FRONT_LEFT", 55.0, (0.5, 0.5, -0.3), 1257.0),
    ("CAM_FRONT", 0.0, (0.7, 0.0, -0.3), 1266.0),
    ("CAM_FRONT_RIGHT", -55.0, (0.5, -0.5, -0.3), 1260.0),
    ("CAM_BACK_LEFT", 110.0, (-0.4, 0.5, -0.3), 1256.0),
    ("CAM_BACK", 180.0, (-1.0, 0.0, -0.3), 809.0),
    ("CAM_BACK_RIGHT", -110.0, (-0.4, -0.5, -0.3), 1259.0),
)


def bevdet_like_geometry(
    num_cams: int = 6,
    depth_bins: int = 59,
    feat_h: int = 16,
    feat_w: int = 44,
    *,
    image_size: tuple[int, int] = (256, 704),
    depth_start: float = 1.0,
    depth_step: float = 1.0,
    seed: int = 0,
) -> Tensor:
    """Frustum point coordinates of a nuScenes-like 6-camera ring, as BEVDet's ``get_geometry`` gives.

    Pixel grid and depths as BEVDet's ``create_frustum`` (``linspace`` over the 256x704 input,
    depths ``depth_start + depth_step * i``); cameras with nuScenes yaws, positions and focal
    lengths, the image resized by 0.44 and cropped to 256 rows as BEVDet's test pipeline does;
    ``seed`` jitters yaw, pitch, roll (about 1 degree) and height (5 cm). More than 6 cameras repeat
    the ring with offset yaws. Feed the result to :func:`bev_pool_v2_prepare`.

    Returns:
        Tensor[1, num_cams, depth_bins, feat_h, feat_w, 3]: float32 (x, y, z) in metres, lidar frame.
    """
    gen = torch.Generator().manual_seed(seed)
    iH, iW = image_size
    resize = iW / 1600.0
    crop_top = 900 * resize - iH  # BEVDet's test crop keeps the bottom rows
    ds = depth_start + depth_step * torch.arange(depth_bins, dtype=torch.float64)
    us = torch.linspace(0, iW - 1, feat_w, dtype=torch.float64)
    vs = torch.linspace(0, iH - 1, feat_h, dtype=torch.float64)
    d, v, u = torch.meshgrid(ds, vs, us, indexing="ij")  # [D, fH, fW]
    out = []
    for i in range(num_cams):
        _, yaw, pos, focal = _NUSCENES_CAMERAS[i % 6]
        yaw = yaw + 30.0 * (i // 6)
        jitter = (torch.rand(4, generator=gen, dtype=torch.float64) - 0.5) * 2.0
        fx = focal * resize
        cx, cy = 800.0 * resize, 450.0 * resize - crop_top
        # camera frame (x right, y down, z forward)
        pc = torch.stack(((u - cx) / fx * d, (v - cy) / fx * d, d), dim=-1)
        yaw_r, pitch_r, roll_r = (math.radians(a) for a in (yaw + jitter[0].item(), jitter[1].item(), jitter[2].item()))
        # camera axes -> ego axes (x forward, y left, z up), then roll, pitch, yaw
        base = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
        cr, sr = math.cos(roll_r), math.sin(roll_r)
        cp, sp = math.cos(pitch_r), math.sin(pitch_r)
        cyw, syw = math.cos(yaw_r), math.sin(yaw_r)
        rx = torch.tensor([[1.0, 0.0, 0.0], [0.0, cr, -sr], [0.0, sr, cr]], dtype=torch.float64)
        ry = torch.tensor([[cp, 0.0, sp], [0.0, 1.0, 0.0], [-sp, 0.0, cp]], dtype=torch.float64)
        rz = torch.tensor([[cyw, -syw, 0.0], [syw, cyw, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
        rot = rz @ ry @ rx @ base
        t = torch.tensor(pos, dtype=torch.float64) + torch.tensor([0.0, 0.0, 0.05 * jitter[3].item()], dtype=torch.float64)
        out.append(pc @ rot.T + t)
    return torch.stack(out).unsqueeze(0).float()
