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

Layout: the ``[B, C, Z, Y, X]`` output is stored channels last (``torch.empty_permuted``, strides
``(Z*Y*X*C, 1, Y*X*C, X*C, C)``), so each interval's C channels are one contiguous row store, and
with Z = 1 the collapsed ``[B, C, Y, X]`` map is a ``channels_last`` tensor, the layout the
fp16/int8 convolutions after it want. BEVDet calls ``.contiguous()`` on the permuted tensor; that
copy (a read and a write of the whole map, 4 MB fp32 / 2 MB fp16 at BEVDet-R50) is left to the
caller who needs it.

Kernel (Triton): the output is zeroed (one memset), then every interval's row is written once, no
atomics. The first eighth of the intervals (the longest, in :func:`bev_pool_v2_prepare`'s order)
get one program each, walking the interval 64 points a step; the rest are packed 8 per program,
8 points of each a step (BEVDet-R50 sizes; :func:`_launch_config` scales them). A step gathers a
``[points, C]`` tile of feature rows (contiguous vector loads along C) and one depth scalar per
point, reused across the channels; fp32 accumulation; indices and gathers are software-pipelined
two steps deep. Variants: ``fp32``; ``fp16`` (fp16 depth/feat/out, fp32 math); ``fp16x2`` (the
multiply-accumulate in fp16, paired over channels into HFMA2; steps summed in fp32); ``int8``
(int8 depth and feat with per-tensor scales, fp32 math on the integers, scaled once per row,
fp16 out).

Untrusted indices: the index arrays are engine inputs, so a bad one must never touch memory out
of bounds. :func:`check_ranks` validates them on the host (ranges of the three ``ranks_*``,
intervals non-negative and inside the points) with a ValueError: at prepare time, in the
reference path (which would otherwise wrap negatives as Python indexing does) and in eager calls.
The kernel guards itself too: loads and stores at out-of-range indices are masked off (they move
no bytes), and a per-device error flag is raised; :func:`raise_if_bad_indices` reads and clears
it outside any CUDA graph (the eager wrapper does, and ``Engine`` after every BEVDet call).

Origin: HuangJunJie2017/BEVDet ``mmdet3d/ops/bev_pool_v2`` (kernel, argument order, layouts) and
``LSSViewTransformer.voxel_pooling_prepare_v2`` (index preparation). Our own code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bevdeploy.ops._utils import (
    bf16_as_float32,
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
    "check_ranks",
    "raise_if_bad_indices",
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


def check_ranks(
    ranks_depth: Tensor,
    ranks_feat: Tensor,
    ranks_bev: Tensor,
    interval_starts: Tensor,
    interval_lengths: Tensor,
    *,
    num_depth: int,
    num_pixels: int,
    num_voxels: int,
) -> None:
    """Host-side check of the index arrays (one sync): every ``ranks_depth`` in ``[0, num_depth)``,
    ``ranks_feat`` in ``[0, num_pixels)``, ``ranks_bev`` in ``[0, num_voxels)``; every interval
    start and length >= 0 with ``start + length <= P``. ValueError naming the array, the first bad
    position, its value and the valid range."""
    P = int(ranks_depth.shape[0])
    for name, t, hi in (("ranks_depth", ranks_depth, num_depth), ("ranks_feat", ranks_feat, num_pixels),
                        ("ranks_bev", ranks_bev, num_voxels), ("interval_starts", interval_starts, P + 1),
                        ("interval_lengths", interval_lengths, P + 1)):
        if t.numel() == 0:
            continue
        bad = (t < 0) | (t >= hi)
        if bool(bad.any()):
            i = int(torch.nonzero(bad.reshape(-1))[0])
            raise ValueError(f"bev_pool_v2: {name}[{i}] = {int(t.reshape(-1)[i])} is out of range: must be in "
                             f"[0, {hi - 1}] ({int(bad.sum())} bad entries)")
    if interval_starts.numel():
        ends = interval_starts.long() + interval_lengths.long()
        bad = ends > P
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise ValueError(f"bev_pool_v2: interval {i} (start {int(interval_starts[i])}, length "
                             f"{int(interval_lengths[i])}) runs past the {P} points")


def _is_concrete(t: Tensor) -> bool:
    """A real tensor with data (not a fake / traced one), outside torch.compile tracing."""
    from torch._subclasses.fake_tensor import is_fake

    return not (torch.compiler.is_compiling() or is_fake(t) or isinstance(t, torch.fx.Proxy))


def _check_ranks_for(depth: Tensor, feat: Tensor, ranks_depth, ranks_feat, ranks_bev, interval_starts,
                     interval_lengths, bev_feat_shape) -> None:
    B, Z, Y, X, C = (int(s) for s in bev_feat_shape)
    check_ranks(ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths, num_depth=depth.numel(),
                num_pixels=feat.numel() // max(C, 1), num_voxels=B * Z * Y * X)


_ERROR_FLAGS: dict[str, Tensor] = {}


def _error_flag(device: torch.device) -> Tensor:
    """The kernel's per-device error flag (int32 [1]); allocated once, so CUDA graphs capture its address."""
    key = str(device)
    if key not in _ERROR_FLAGS:
        _ERROR_FLAGS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _ERROR_FLAGS[key]


def raise_if_bad_indices(device: torch.device | str | None = None) -> None:
    """Raise ValueError if a ``bev_pool_v2`` kernel on ``device`` (all devices when None) met an
    out-of-range index since the last check, and clear the flag. One host sync; call it outside
    CUDA graph capture (after a replay)."""
    for key, flag in _ERROR_FLAGS.items():
        if device is not None and key != str(torch.device(device)):
            continue
        if int(flag.item()):
            flag.zero_()
            raise ValueError("bev_pool_v2: out-of-range indices (ranks_* or intervals) were passed to the kernel; "
                             "the bad points were skipped and their output is incomplete. Recompute the indices "
                             "(bev_pool_v2_prepare / Engine.prepare)")


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

    Arguments in the op's order (intervals before ``bev_feat_shape``, unlike :func:`bev_pool_v2`).
    Each point is routed to the voxel of the interval holding it (``ranks_bev`` of the interval's
    first point); points outside every interval are dropped. Fixed-size ops only (no sync, no
    data-dependent shapes), so it also runs under fake tensors. Intervals must not overlap.
    Float64 inputs are computed and returned in float64 (for gradcheck); otherwise fp32 math and
    the variant's output dtype. Returns ``[B, C, Z, Y, X]`` with the op's channels-last strides.
    Out-of-range indices raise ValueError (:func:`check_ranks`) when the tensors hold data.
    """
    if _is_concrete(ranks_depth):  # Python indexing would wrap a negative index silently
        _check_ranks_for(depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths,
                         bev_feat_shape)
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
    if P > 0 and sorted_starts.numel() > 0:
        cell = ranks_bev.long()[sorted_starts[which].clamp(0, P - 1)]
    else:
        covered = torch.zeros_like(covered)
        cell = torch.zeros(P, dtype=torch.long, device=device)
    rows = d.reshape(-1)[ranks_depth.long()].unsqueeze(1) * f.reshape(-1, C)[ranks_feat.long()]
    rows = rows * covered.unsqueeze(1).to(rows.dtype)
    cell = torch.where(covered, cell, torch.zeros_like(cell))
    out = rows.new_zeros(B * Z * Y * X, C).index_add_(0, cell, rows)
    out = out.view(B, Z, Y, X, C).to(_output_dtype(variant, rows.dtype))
    return out.permute(0, 4, 1, 2, 3).clone()  # clone keeps the channels-last strides, drops the view


def scatter_add_reference(
    depth: Tensor,
    feat: Tensor,
    ranks_depth: Tensor,
    ranks_feat: Tensor,
    ranks_bev: Tensor,
    bev_feat_shape: Sequence[int],
    interval_starts: Tensor | None = None,
    interval_lengths: Tensor | None = None,
    *,
    depth_scale: float | None = None,
    feat_scale: float | None = None,
) -> Tensor:
    """The dense Lift-Splat baseline: materialise depth x feat for every frustum point, add into the grid.

    Builds the whole ``[B, N, D, fH, fW, C]`` volume (as LSS and BEVDet before BEVPoolv2 did),
    keeps the points named by ``ranks_depth`` and ``index_add``s each into voxel ``ranks_bev``.
    Takes :func:`bev_pool_v2`'s arguments; the intervals are not needed (each point carries its
    voxel), so this equals :func:`bev_pool_v2` whenever the intervals partition the points by voxel,
    as those of :func:`bev_pool_v2_prepare` do. int8 inputs are dequantised with the given scales;
    float64 stays float64 (the test oracle), everything else computes in float32.

    Returns:
        Tensor[B, C, Z, Y, X]: contiguous, in the compute dtype (float32, or float64).
    """
    B, Z, Y, X, C = (int(s) for s in bev_feat_shape)
    if depth.dtype == torch.int8 or feat.dtype == torch.int8:
        if depth_scale is None or feat_scale is None:
            raise ValueError("scatter_add_reference: int8 inputs need depth_scale and feat_scale")
        d, f = depth.float() * float(depth_scale), feat.float() * float(feat_scale)
    else:
        d, f = _compute_inputs(depth, feat, "fp32", 1.0, 1.0)
    volume = d.unsqueeze(-1) * f.unsqueeze(2)  # [B, N, D, fH, fW, C]
    rows = volume.reshape(-1, C)[ranks_depth.long()]
    out = rows.new_zeros(B * Z * Y * X, C).index_add_(0, ranks_bev.long(), rows)
    return out.view(B, Z, Y, X, C).permute(0, 4, 1, 2, 3).contiguous()


_MAX_ROWS = 128


def _points_per_step(num_intervals: int, num_points: int) -> int:
    """BLOCK_J of the packed programs: the power of two nearest below half the mean interval length
    (BEVDet-R50: mean ~17, so 8; its lengths cluster at 16 and 32, a pixel column's 16 rows)."""
    mean = num_points / max(num_intervals, 1)
    block_j = 1
    while block_j * 2 <= min(_MAX_ROWS, max(1.0, mean / 2)):
        block_j *= 2
    return block_j


def _launch_config(num_intervals: int, num_points: int, C: int, elt_bytes: int) -> dict:
    """Tile shapes from the static sizes (the lengths themselves are on the device).

    Every program gathers ``ROWS`` feature rows of ``BLOCK_C`` channels per step (64 x 64 at
    BEVDet-R50). The first ``n_wide`` intervals (the longest ones when prepare orders them) get one
    program each that walks its interval ``ROWS`` points a step; the rest are packed ``BLOCK_I``
    per program, ``BLOCK_J`` points of each per step. One eighth of the intervals go wide: at
    BEVDet-R50 that covers lengths >= ~32, so no packed program steps more than 4 times and the
    longest interval (~530 points) takes 9 steps. Warps (ptxas, sm_90a, 64x64 tile): fp16/fp16x2
    and fp32 with 8 warps use 48 / 72 registers (5 / 3 programs, 40 / 24 warps per SM); int8 with
    4 warps 64 registers (8 programs, 32 warps per SM).
    """
    block_c = max(2, triton.next_power_of_2(C))
    rows = min(_MAX_ROWS, max(16, 4096 // block_c))
    block_j = min(rows, _points_per_step(num_intervals, num_points))
    n_wide = min(num_intervals, -(-num_intervals // 8))
    if rows * block_c >= 4096:
        # Measured on the H100 at BEVDet-R50 (scripts/sweep_bev_pool.py, 64x64 tiles): 2 warps 11.1 us
        # fp16 / 15.7 us fp32, against 39 / 22 us with 8 warps (fewer warps, more resident programs).
        num_warps = 2 if elt_bytes >= 2 else 4
    else:
        num_warps = 4 if rows * block_c >= 2048 else 2
    return dict(
        BLOCK_C=block_c, WIDE_J=rows, BLOCK_I=rows // block_j, BLOCK_J=block_j, n_wide=n_wide, num_warps=num_warps
    )


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _pool_intervals(
        # pointers
        depth_ptr,
        feat_ptr,
        ranks_depth_ptr,
        ranks_feat_ptr,
        ranks_bev_ptr,
        starts_ptr,
        lengths_ptr,
        out_ptr,
        flag_ptr,
        # sizes
        first,
        n_intervals,
        n_points,
        n_depth,
        n_pixels,
        n_voxels,
        stride_feat,
        out_scale,
        # constexpr
        C: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_I: tl.constexpr,
        BLOCK_J: tl.constexpr,
        HALF2: tl.constexpr,
    ):
        """out[ranks_bev[s_k]] = out_scale * sum_j depth[ranks_depth[s_k + j]] * feat[ranks_feat[s_k + j]]
        for intervals k = first .. first + BLOCK_I - 1, BLOCK_J points of each per step.

        Software-pipelined two deep: the iteration that accumulates step t has the gathers of
        step t + 1 and the indices of step t + 2 in flight, so a step costs one L2 round trip
        instead of two dependent ones (index, then data). Masked lanes move no bytes.

        Guard: an interval outside [0, n_points) and a point or voxel index outside its tensor are
        masked off (nothing read or written through them) and set ``flag_ptr[0] = 1``."""
        ks = first + tl.arange(0, BLOCK_I)
        kmask = ks < n_intervals
        start = tl.load(starts_ptr + ks, mask=kmask, other=0)
        length = tl.load(lengths_ptr + ks, mask=kmask, other=0)
        kvalid = (start >= 0) & (length >= 0) & (start <= n_points - length)
        nbad = tl.sum((kmask & (kvalid == 0)).to(tl.int32), axis=0)
        start = tl.where(kvalid, start, 0)
        length = tl.where(kvalid & kmask, length, 0)
        max_len = tl.max(length, axis=0)
        j = tl.arange(0, BLOCK_J)
        c3 = tl.arange(0, BLOCK_C)[None, None, :]
        cmask = c3 < C
        if HALF2:
            acc = tl.zeros([BLOCK_I, BLOCK_J, BLOCK_C], dtype=tl.float16)
        else:
            acc = tl.zeros([BLOCK_I, BLOCK_J, BLOCK_C], dtype=tl.float32)
        # step 0: indices, then gathers
        pidx = start[:, None] + j[None, :]  # [BLOCK_I, BLOCK_J] point indices
        pmask = j[None, :] < length[:, None]
        rd = tl.load(ranks_depth_ptr + pidx, mask=pmask, other=0)
        rf = tl.load(ranks_feat_ptr + pidx, mask=pmask, other=0)
        ok = (rd >= 0) & (rd < n_depth) & (rf >= 0) & (rf < n_pixels)
        bad = (pmask & (ok == 0)).to(tl.int32)
        gmask = pmask & ok
        d = tl.load(depth_ptr + rd, mask=gmask, other=0)  # one depth scalar per point
        f = tl.load(feat_ptr + rf[:, :, None] * stride_feat + c3, mask=gmask[:, :, None] & cmask, other=0)
        # step 1: indices
        pidx += BLOCK_J
        pmask = (j[None, :] + BLOCK_J) < length[:, None]
        rd = tl.load(ranks_depth_ptr + pidx, mask=pmask, other=0)
        rf = tl.load(ranks_feat_ptr + pidx, mask=pmask, other=0)
        for j0 in range(0, max_len, BLOCK_J):
            nidx = pidx + BLOCK_J
            nmask = (j[None, :] + (j0 + 2 * BLOCK_J)) < length[:, None]
            rd_next = tl.load(ranks_depth_ptr + nidx, mask=nmask, other=0)
            rf_next = tl.load(ranks_feat_ptr + nidx, mask=nmask, other=0)
            ok = (rd >= 0) & (rd < n_depth) & (rf >= 0) & (rf < n_pixels)
            bad += (pmask & (ok == 0)).to(tl.int32)
            gmask = pmask & ok
            d_next = tl.load(depth_ptr + rd, mask=gmask, other=0)
            f_next = tl.load(feat_ptr + rf[:, :, None] * stride_feat + c3, mask=gmask[:, :, None] & cmask, other=0)
            if HALF2:
                acc += d[:, :, None] * f  # fp16 multiply-add, paired over channels (HFMA2)
            else:
                acc += d.to(tl.float32)[:, :, None] * f.to(tl.float32)
            d, f = d_next, f_next
            pidx, pmask, rd, rf = nidx, nmask, rd_next, rf_next
        rows = tl.sum(acc.to(tl.float32), axis=1) * out_scale  # [BLOCK_I, BLOCK_C]
        write = kmask & (length > 0)
        cell = tl.load(ranks_bev_ptr + start, mask=write, other=0)
        cell_ok = (cell >= 0) & (cell < n_voxels)
        nbad += tl.sum((write & (cell_ok == 0)).to(tl.int32), axis=0) + tl.sum(tl.sum(bad, axis=1), axis=0)
        write = write & cell_ok
        c = tl.arange(0, BLOCK_C)[None, :]
        tl.store(out_ptr + cell[:, None] * C + c, rows.to(out_ptr.dtype.element_ty), mask=write[:, None] & (c < C))
        tl.store(flag_ptr, nbad.to(tl.int32) * 0 + 1, mask=nbad > 0)

    @triton.jit
    def _bev_pool_v2_fwd_kernel(
        # pointers
        depth_ptr,
        feat_ptr,
        ranks_depth_ptr,
        ranks_feat_ptr,
        ranks_bev_ptr,
        starts_ptr,
        lengths_ptr,
        out_ptr,
        flag_ptr,
        # sizes
        n_intervals,
        n_wide,
        n_points,
        n_depth,
        n_pixels,
        n_voxels,
        stride_feat,
        out_scale,
        # constexpr
        C: tl.constexpr,
        BLOCK_C: tl.constexpr,
        WIDE_J: tl.constexpr,
        BLOCK_I: tl.constexpr,
        BLOCK_J: tl.constexpr,
        HALF2: tl.constexpr,
    ):
        """Programs [0, n_wide) own one interval each (WIDE_J points per step); the rest own
        BLOCK_I consecutive intervals after those. Each interval's output row is written once."""
        pid = tl.program_id(0)
        if pid < n_wide:
            _pool_intervals(
                depth_ptr, feat_ptr, ranks_depth_ptr, ranks_feat_ptr, ranks_bev_ptr, starts_ptr, lengths_ptr, out_ptr,
                flag_ptr, pid, n_intervals, n_points, n_depth, n_pixels, n_voxels, stride_feat, out_scale,
                C=C, BLOCK_C=BLOCK_C, BLOCK_I=1, BLOCK_J=WIDE_J, HALF2=HALF2,
            )
        else:
            _pool_intervals(
                depth_ptr, feat_ptr, ranks_depth_ptr, ranks_feat_ptr, ranks_bev_ptr, starts_ptr, lengths_ptr, out_ptr,
                flag_ptr, n_wide + (pid - n_wide) * BLOCK_I, n_intervals, n_points, n_depth, n_pixels, n_voxels,
                stride_feat, out_scale,
                C=C, BLOCK_C=BLOCK_C, BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J, HALF2=HALF2,
            )


def _feat_rows(feat: Tensor) -> tuple[Tensor, int]:
    """feat as [pixels, C] rows with unit channel stride, without a copy when the layout allows it
    (contiguous, or a channels-last depth-net output sliced and permuted as BEVDet does)."""
    C = feat.shape[-1]
    try:
        rows = feat.view(-1, C)
    except RuntimeError:
        rows = None
    if rows is None or (rows.stride(1) != 1 and C > 1) or rows.stride(0) < C:
        rows = feat.contiguous().view(-1, C)
    return rows, (rows.stride(0) if rows.shape[0] > 1 else C)


def _bev_pool_v2_triton(
    depth: Tensor,
    feat: Tensor,
    ranks_depth: Tensor,
    ranks_feat: Tensor,
    ranks_bev: Tensor,
    interval_starts: Tensor,
    interval_lengths: Tensor,
    bev_feat_shape: Sequence[int],
    variant: str,
    depth_scale: float = 1.0,
    feat_scale: float = 1.0,
    out: Tensor | None = None,
) -> Tensor:
    """Zero the channels-last [B, Z, Y, X, C] buffer, then one kernel over the intervals.

    ``out`` (a contiguous [B, Z, Y, X, C] buffer) lets tests poison the output; the result is
    always the [B, C, Z, Y, X] permuted view of the buffer.
    """
    B, Z, Y, X, C = (int(s) for s in bev_feat_shape)
    if out is None:
        result = torch.empty_permuted(
            (B, C, Z, Y, X), (0, 2, 3, 4, 1), dtype=VARIANT_OUTPUT_DTYPE[variant], device=feat.device
        )
        buf = result.permute(0, 2, 3, 4, 1)
    else:
        buf = new_output((B, Z, Y, X, C), variant, feat.device, out)
        result = buf.permute(0, 4, 1, 2, 3)
    # Cells no interval names are 0: a memset (one fast pass at copy bandwidth) is cheaper than
    # finding them, which would need the inverse map cell -> interval.
    buf.zero_()
    num_intervals = interval_starts.shape[0]
    if num_intervals == 0 or ranks_depth.shape[0] == 0:
        return result
    depth_flat = depth.contiguous().view(-1)
    feat_rows, stride_feat = _feat_rows(feat)
    if feat_rows.shape[0] * stride_feat >= 2**31:
        raise ValueError("bev_pool_v2: feat spans 2**31 elements or more; pass a contiguous feat")
    cfg = _launch_config(num_intervals, ranks_depth.shape[0], C, feat.element_size())
    n_wide = cfg.pop("n_wide")
    num_warps = cfg.pop("num_warps")
    grid = (n_wide + triton.cdiv(num_intervals - n_wide, cfg["BLOCK_I"]),)
    _bev_pool_v2_fwd_kernel[grid](
        depth_flat,
        feat_rows,
        ranks_depth.contiguous(),
        ranks_feat.contiguous(),
        ranks_bev.contiguous(),
        interval_starts.contiguous(),
        interval_lengths.contiguous(),
        buf,
        _error_flag(feat.device),
        num_intervals,
        n_wide,
        ranks_depth.shape[0],
        depth_flat.numel(),
        feat_rows.shape[0],
        B * Z * Y * X,
        stride_feat,
        depth_scale * feat_scale if variant == "int8" else 1.0,
        C=C,
        HALF2=variant == "fp16x2",
        num_warps=num_warps,
        **cfg,
    )
    return result


@torch.library.custom_op("bevdeploy::bev_pool_v2", mutates_args=())
def _bev_pool_v2_op(
    depth: Tensor,
    feat: Tensor,
    ranks_depth: Tensor,
    ranks_feat: Tensor,
    ranks_bev: Tensor,
    interval_starts: Tensor,
    interval_lengths: Tensor,
    bev_feat_shape: list[int],
    variant: str,
    depth_scale: float,
    feat_scale: float,
) -> Tensor:
    args = (depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths, bev_feat_shape)
    if use_triton(feat):
        return _bev_pool_v2_triton(*args, variant, depth_scale, feat_scale)
    return reference(  # checks the indices (ValueError) before any gather
        depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths, bev_feat_shape,
        variant, depth_scale, feat_scale,
    )


@_bev_pool_v2_op.register_fake
def _(
    depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths, bev_feat_shape,
    variant, depth_scale, feat_scale,
):
    _check_inputs(
        depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths, bev_feat_shape,
        variant, depth_scale, feat_scale,
    )
    B, Z, Y, X, C = bev_feat_shape
    return feat.new_empty_strided(
        (B, C, Z, Y, X), (Z * Y * X * C, 1, Y * X * C, X * C, C), dtype=VARIANT_OUTPUT_DTYPE[variant]
    )


register_reference_autograd(_bev_pool_v2_op, reference)


@bf16_as_float32
def bev_pool_v2(
    depth: Tensor,
    feat: Tensor,
    ranks_depth: Tensor,
    ranks_feat: Tensor,
    ranks_bev: Tensor,
    bev_feat_shape: Sequence[int],
    interval_starts: Tensor,
    interval_lengths: Tensor,
    *,
    variant: str | None = None,
    depth_scale: float | None = None,
    feat_scale: float | None = None,
) -> Tensor:
    """BEVDet's voxel pooling: sum depth x feat of the frustum points of every BEV voxel.

    Arguments in BEVDet's order (``mmdet3d.ops.bev_pool_v2.bev_pool_v2``); the index tensors come
    from :func:`bev_pool_v2_prepare`, once per camera geometry.

    Args:
        depth (Tensor[B, N, D, fH, fW]): depth distribution per camera pixel (softmax output).
        feat (Tensor[B, N, fH, fW, C]): context features, channels last. A view whose pixels share
            one stride with unit channel stride (e.g. a channels-last depth-net output sliced and
            permuted) is read in place; other layouts are copied.
        ranks_depth (Tensor[P] int32): per point, flat index into ``depth``.
        ranks_feat (Tensor[P] int32): per point, flat index into the ``B*N*fH*fW`` pixels of ``feat``.
        ranks_bev (Tensor[P] int32): per point, flat index into the ``B*Z*Y*X`` voxels.
        bev_feat_shape: (B, Z, Y, X, C) of the grid, static ints.
        interval_starts (Tensor[I] int32): first point of each interval (run of points of one voxel).
        interval_lengths (Tensor[I] int32): points in each interval.
        variant: ``fp32``, ``fp16``, ``fp16x2`` or ``int8`` (None: from feat's dtype). depth and
            feat share the storage dtype; int8 output is fp16.
        depth_scale, feat_scale: per-tensor scales of int8 depth and feat (int8 only).

    Returns:
        Tensor[B, C, Z, Y, X]: pooled features (fp32, or fp16 for fp16/fp16x2/int8), 0 in voxels no
        interval names. Stored channels last (strides ``(Z*Y*X*C, 1, Y*X*C, X*C, C)``); call
        ``.contiguous()`` for BEVDet's exact layout (one extra read+write of the map).

    Raises:
        ValueError: bad shapes / dtypes, or indices out of range (:func:`check_ranks` on the
            reference path; the kernel's guard flag, read after eager calls).

    Example:
        >>> coor = bevdet_like_geometry(num_cams=2, depth_bins=8, feat_h=4, feat_w=8)
        >>> ranks_bev, ranks_depth, ranks_feat, starts, lengths = bev_pool_v2_prepare(coor)
        >>> depth = torch.rand(1, 2, 8, 4, 8).softmax(2)
        >>> feat = torch.randn(1, 2, 4, 8, 16)
        >>> bev_pool_v2(depth, feat, ranks_depth, ranks_feat, ranks_bev, (1, 1, 128, 128, 16), starts, lengths).shape
        torch.Size([1, 16, 1, 128, 128])
    """
    variant, depth_scale, feat_scale = _check_inputs(
        depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths, bev_feat_shape,
        variant, depth_scale, feat_scale,
    )
    out = _bev_pool_v2_op(
        depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths,
        [int(s) for s in bev_feat_shape], variant, depth_scale, feat_scale,
    )
    capturing = feat.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if _is_concrete(feat) and not capturing and str(feat.device) in _ERROR_FLAGS:
        raise_if_bad_indices(feat.device)  # eager calls: the kernel's guard reported here
    return out


class BEVPoolV2(nn.Module):
    """See :func:`bev_pool_v2`. ``bev_feat_shape`` is fixed at construction: (B, Z, Y, X, C)."""

    def __init__(self, bev_feat_shape: Sequence[int]):
        super().__init__()
        if len(bev_feat_shape) != 5:
            raise ValueError(f"bev_feat_shape must be (B, Z, Y, X, C), got {bev_feat_shape}")
        self.bev_feat_shape = tuple(int(s) for s in bev_feat_shape)

    def forward(
        self,
        depth: Tensor,
        feat: Tensor,
        ranks_depth: Tensor,
        ranks_feat: Tensor,
        ranks_bev: Tensor,
        interval_starts: Tensor,
        interval_lengths: Tensor,
        *,
        variant: str | None = None,
        depth_scale: float | None = None,
        feat_scale: float | None = None,
    ) -> Tensor:
        return bev_pool_v2(
            depth, feat, ranks_depth, ranks_feat, ranks_bev, self.bev_feat_shape, interval_starts, interval_lengths,
            variant=variant, depth_scale=depth_scale, feat_scale=feat_scale,
        )

    def extra_repr(self) -> str:
        return f"bev_feat_shape={self.bev_feat_shape}"


# --------------------------------------------------------------------------------------------------
# Host-side preparation (once per camera geometry) and a synthetic geometry for tests/benchmarks.
# --------------------------------------------------------------------------------------------------


def bev_pool_v2_prepare(
    coor: Tensor,
    grid_lower_bound: Sequence[float] = BEVDET_GRID_LOWER_BOUND,
    grid_interval: Sequence[float] = BEVDET_GRID_INTERVAL,
    grid_size: Sequence[int] = BEVDET_GRID_SIZE,
    *,
    interval_order: str = "length",
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
        interval_order: ``"length"`` (default) lists the intervals longest first, by the number
            of steps the kernel's packed programs take on them, in voxel order among equals: the
            kernel gives the first eighth one wide program each and packs the rest several per
            program, so this order balances its work (BEVDet-R50: lengths 1 to ~530, mean ~17)
            and keeps packed neighbours close in space. ``"bev"`` keeps BEVDet's order (by
            voxel); same result, worse balance. The points (``ranks_*``) are sorted by voxel
            either way.

    Returns:
        (ranks_bev, ranks_depth, ranks_feat, interval_starts, interval_lengths), int32, contiguous,
        on coor's device, in BEVDet's return order. Points outside the grid are dropped; the rest
        are sorted by voxel (stable, so the order inside a voxel is the frustum order); one
        interval per occupied voxel. With no point inside the grid all five are empty.
    """
    check_tensor("coor", coor, shape=("B", "N", "D", "fH", "fW", 3))
    if interval_order not in ("length", "bev"):
        raise ValueError(f"interval_order must be 'length' or 'bev', got {interval_order!r}")
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
    if interval_order == "length":
        # Longest first in units of the kernel's packed step; voxel order kept inside a unit, so
        # packed neighbours are neighbours in space and share feature rows in L1.
        step = _points_per_step(interval_starts.shape[0], ranks_bev.shape[0])
        order = torch.argsort(-((interval_lengths + step - 1) // step), stable=True)
        interval_starts, interval_lengths = interval_starts[order], interval_lengths[order]
    out = (ranks_bev, ranks_depth, ranks_feat, interval_starts, interval_lengths)
    return tuple(t.to(torch.int32).contiguous() for t in out)


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
        t = torch.tensor(pos, dtype=torch.float64)
        t[2] += 0.05 * jitter[3].item()
        out.append(pc @ rot.T + t)
    return torch.stack(out).unsqueeze(0).float()
