"""Camera-gathered spatial cross-attention (SCA): each BEV query samples only the cameras that see it.

BEVFormer's SCA (Li et al., ECCV 2022, https://arxiv.org/abs/2203.17270) projects the ``R`` pillar
points of every BEV query into the ``N`` cameras; ``bev_mask[b, n, q]`` says whether camera ``n``
sees query ``q`` (any of its pillar points inside the image, in front of the camera). For each
query, a multi-scale deformable attention (:func:`~bevdeploy.ops.msda.msda_fused` math) runs in
every camera that sees it, with the query's own offsets and softmaxed weights (shared by the
cameras) and the camera's reference points; the results are averaged over those cameras::

    out[b, q] = sum_{n : mask[b, n, q]} msda_fused(value[b, n], ref[b, n, q], offsets[b, q], logits[b, q])
                / max(1, #{n : mask[b, n, q]})

A query seen by no camera gives 0. ``value (Tensor[B, N, S, H, D])``, ``reference_points_cam
(Tensor[B, N, Q, R, 2])`` (point ``p`` uses reference ``p % R``), ``bev_mask (Tensor[B, N, Q])``,
``sampling_offsets (Tensor[B, Q, H, L, P, 2])`` in pixels of each level, ``attention_logits
(Tensor[B, Q, H, L*P])``; output ``Tensor[B, Q, H*D]``.

**Static form (the reference).** :func:`reference` is what ``SpatialCrossAttention`` computes without
this op and what the reference system's TensorRT graph does: every query runs in all ``N`` cameras
(offsets and logits broadcast over the camera axis), ``[B, N, Q, C]`` is multiplied by the mask,
summed over cameras and divided by the clamped count. The official PyTorch model gathers the
visible queries per camera with data-dependent sizes, which a static-shape engine cannot do.

**Kernel (gathered form).** One program per (batch, block of ``BLOCK_Q`` consecutive queries, head),
with msda's ``[BLOCK_Q * P, D]`` tile (one row per (query, point)). The softmax statistics of the
block's logits are computed once; then a loop over the ``N`` cameras loads the block's ``BLOCK_Q``
mask entries and skips the camera with a scalar branch when none is set. For a camera that some
query of the block sees, the rows of the queries it does not see are masked off (their loads move
no bytes, their corners read nothing), and the others sample as in msda: coordinates and corner
weights in fp32, one gather of ``BLOCK_Q * P`` channel rows per corner, levels unrolled with
constexpr sizes. The per-query camera count is summed in the same loop; the output is scaled by
``1 / max(count, 1)`` and written once as ``[B, Q, C]``: no ``[B, N, Q, C]`` intermediate, no mask
multiply, no host sync, static shapes (CUDA-graph safe), no extra kernel.

Why this and not compacted per-camera query lists (a prefix sum per camera, then msda over lists
of static capacity): BEV queries are row-major over the grid, so a block of 8 consecutive queries
covers 8 neighbouring cells, which the nuScenes rig's cameras see as a whole except along the
few camera-boundary rays; nearly every block visits one or two cameras, which is the gathered
work. Compaction would add a scan kernel, a capacity to choose (too small drops queries), an
index indirection in every load and a scatter (or atomics) to merge the cameras of a query; this
form needs none of them and its skipped cameras cost one 8-element mask load each.

Variants as :mod:`bevdeploy.ops.msda`: ``fp32``; ``fp16`` (fp16 value, fp32 math); ``fp16x2`` (fp16
pairs for the corner multiply-adds, per-level fp16 accumulator); ``int8`` (int8 value with a
per-tensor ``value_scale``, fp32 math, fp16 output). Reference points, offsets and logits are fp32,
or fp32/fp16 outside ``fp32``; ``bev_mask`` is bool, uint8, float16 or float32 (nonzero = seen).

**ONNX.** :mod:`bevdeploy.export.onnx` writes this op as the reference system's static form: the
offsets and logits expanded over cameras, one ``MultiScaleDeformableAttnTRT(2)`` node on
``[B*N, ...]`` (value ``[B*N, S, H, D]``, reference points ``[B*N, Q, 1, R*2]``), then ``Mul`` by the
mask, ``ReduceSum`` over cameras, ``Div`` by ``Max(count, 1)``: the node layout of its graphs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bevdeploy.ops._utils import (
    VARIANT_INPUT_DTYPE,
    VARIANT_OUTPUT_DTYPE,
    VARIANTS,
    bf16_as_float32,
    check_dim,
    check_int8_scale,
    check_same_device,
    check_tensor,
    new_output,
    register_reference_autograd,
    resolve_variant,
    to_compute,
    triton_available,
    use_triton,
)
from bevdeploy.ops.msda import (
    MAX_LEVELS,
    Shapes,
    _flatten_shapes,
    _launch_config,
    _normalize_shapes,
    _pair_shapes,
    reference_fused,
)

_INT32_MAX = 2**31 - 1
#: dtypes ``bev_mask`` may have (nonzero = the camera sees the query).
MASK_DTYPES = (torch.bool, torch.uint8, torch.float16, torch.float32)


def _small_dtypes(variant: str) -> tuple[torch.dtype, ...]:
    return (torch.float32,) if variant == "fp32" else (torch.float32, torch.float16)


def _check_inputs(
    value: Tensor,
    shapes: Shapes,
    reference_points_cam: Tensor,
    bev_mask: Tensor,
    sampling_offsets: Tensor,
    attention_logits: Tensor,
    variant: str,
    value_scale: float,
) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    check_tensor("value", value, shape=("B", "N", "S", "H", "D"), dtypes=(VARIANT_INPUT_DTYPE[variant],))
    check_int8_scale("value_scale", value_scale, variant)
    if len(shapes) > MAX_LEVELS:
        raise ValueError(f"spatial_shapes: at most {MAX_LEVELS} levels are supported, got {len(shapes)}")
    B, N, S, H, _ = value.shape
    num_keys = sum(h * w for h, w in shapes)
    if S != num_keys:
        raise ValueError(
            f"value must have shape [B, N, S, H, D] with S = sum(h*w) over spatial_shapes = {num_keys}, got S={S}"
        )
    L = len(shapes)
    small = _small_dtypes(variant)
    check_tensor("sampling_offsets", sampling_offsets, shape=("B", "Q", "H", "L", "P", 2), dtypes=small)
    _, Q, _, _, P, _ = sampling_offsets.shape
    check_dim("sampling_offsets", sampling_offsets.shape[0], B, "batch (dim 0)")
    check_dim("sampling_offsets", sampling_offsets.shape[2], H, "num_heads (dim 2)")
    check_dim("sampling_offsets", sampling_offsets.shape[3], L, "num_levels (dim 3)")
    check_tensor("reference_points_cam", reference_points_cam, shape=("B", "N", "Q", "R", 2), dtypes=small)
    check_dim("reference_points_cam", reference_points_cam.shape[0], B, "batch (dim 0)")
    check_dim("reference_points_cam", reference_points_cam.shape[1], N, "num_cams (dim 1, value's dim 1)")
    check_dim("reference_points_cam", reference_points_cam.shape[2], Q, "num_queries (dim 2)")
    R = reference_points_cam.shape[3]
    if R == 0 or P % R != 0:
        raise ValueError(
            f"reference_points_cam: R (dim 3) must divide num_points P={P} (point p uses reference p % R), got R={R}"
        )
    check_tensor("bev_mask", bev_mask, shape=("B", "N", "Q"), dtypes=MASK_DTYPES)
    check_dim("bev_mask", bev_mask.shape[0], B, "batch (dim 0)")
    check_dim("bev_mask", bev_mask.shape[1], N, "num_cams (dim 1, value's dim 1)")
    check_dim("bev_mask", bev_mask.shape[2], Q, "num_queries (dim 2)")
    check_tensor("attention_logits", attention_logits, shape=(B, Q, H, L * P), dtypes=small)
    check_same_device(
        value=value,
        reference_points_cam=reference_points_cam,
        bev_mask=bev_mask,
        sampling_offsets=sampling_offsets,
        attention_logits=attention_logits,
    )


def _broadcast_cams(t: Tensor, num_cams: int) -> Tensor:
    """[B, ...] -> [B*N, ...]: one copy per camera (what the static form feeds msda)."""
    return t[:, None].expand(t.shape[0], num_cams, *t.shape[1:]).reshape(t.shape[0] * num_cams, *t.shape[1:])


def reference(
    value: Tensor,
    spatial_shapes: Sequence[Sequence[int]] | Tensor,
    reference_points_cam: Tensor,
    bev_mask: Tensor,
    sampling_offsets: Tensor,
    attention_logits: Tensor,
) -> Tensor:
    """The static form in plain PyTorch: msda in every camera, masked sum, divided by the count.

    Float inputs of any dtype (the tests use float64); returns ``Tensor[B, Q, H*D]``.
    """
    B, N, S, H, D = value.shape
    Q = sampling_offsets.shape[1]
    out = reference_fused(
        value.reshape(B * N, S, H, D),
        _normalize_shapes(spatial_shapes),
        reference_points_cam.reshape(B * N, Q, *reference_points_cam.shape[3:]),
        _broadcast_cams(sampling_offsets, N),
        _broadcast_cams(attention_logits, N),
    ).view(B, N, Q, H * D)
    seen = (bev_mask != 0).to(out.dtype)  # [B, N, Q]
    return (out * seen[..., None]).sum(1) / seen.sum(1).clamp(min=1.0)[..., None]


if triton_available():
    import triton
    import triton.language as tl

    from bevdeploy.ops.msda import _bilinear_accumulate

    @triton.jit
    def _sca_fwd_kernel(
        # pointers
        v_ptr,  # [B, N, S, H, D] fp32 / fp16 / int8, contiguous
        ref_ptr,  # [B, N, Q, R, 2] reference points in [0, 1] of each camera's image
        mask_ptr,  # [B, N, Q] nonzero: camera n sees query q
        off_ptr,  # [B, Q, H, L, P, 2] pixel offsets
        lg_ptr,  # [B, Q, H, L*P] logits
        out_ptr,  # [B, Q, H*D]
        # sizes
        Q,
        num_q_blocks,
        value_scale,
        # strides (elements; value is contiguous, its strides are constexpr)
        stride_rb, stride_rn, stride_rq, stride_rr, stride_rc,
        stride_mb, stride_mn, stride_mq,
        stride_fb, stride_fq, stride_fh, stride_fl, stride_fp, stride_fc,
        stride_gb, stride_gq, stride_gh, stride_gk,
        stride_ob, stride_oq,
        # constexpr
        H0: tl.constexpr, W0: tl.constexpr,
        H1: tl.constexpr, W1: tl.constexpr,
        H2: tl.constexpr, W2: tl.constexpr,
        H3: tl.constexpr, W3: tl.constexpr,
        NUM_CAMS: tl.constexpr,
        NUM_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        NUM_LEVELS: tl.constexpr,
        NUM_POINTS: tl.constexpr,
        NUM_REFS: tl.constexpr,
        HALF2: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_LP: tl.constexpr,
    ):
        """out[q, h*D:(h+1)*D] = scale / max(1, c_q) * sum_{n: m[n,q]} sum_{l,p} a_lp * bilinear(value[n], ...).

        a = softmax over the query's L*P logits (shared by the cameras); pixel coordinates in
        camera n: x = ref[n, q, p % R, 0] * W_l + off_x - 0.5 (y likewise); c_q = number of
        cameras that see q. A camera none of the block's queries sees is skipped by a branch.
        """
        ROWS: tl.constexpr = BLOCK_Q * BLOCK_P
        ROW_STRIDE: tl.constexpr = NUM_HEADS * HEAD_DIM
        NUM_KEYS: tl.constexpr = H0 * W0 + H1 * W1 + H2 * W2 + H3 * W3
        pid = tl.program_id(0)
        # batch-major, then query block, then head: the heads of one block share its mask,
        # offsets and logits cache lines
        h = pid % NUM_HEADS
        t = pid // NUM_HEADS
        qb = t % num_q_blocks
        b = (t // num_q_blocks).to(tl.int64)

        rows = tl.arange(0, ROWS)
        q_of_row = rows // BLOCK_P
        offs_q = qb * BLOCK_Q + q_of_row
        offs_p = rows % BLOCK_P
        offs_d = tl.arange(0, BLOCK_D)
        row_mask = (offs_q < Q) & (offs_p < NUM_POINTS)
        qq = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_mask = qq < Q

        # softmax statistics of each query's L*P logits, once for all cameras
        lp = tl.arange(0, BLOCK_LP)
        lp_mask = lp[None, :] < NUM_LEVELS * NUM_POINTS
        lg_all = tl.load(
            lg_ptr + b * stride_gb + h * stride_gh + qq[:, None] * stride_gq + lp[None, :] * stride_gk,
            mask=q_mask[:, None] & lp_mask,
            other=0.0,
        ).to(tl.float32)
        lg_all = tl.where(lp_mask, lg_all, float("-inf"))
        m_q = tl.max(lg_all, axis=1)
        inv_q = 1.0 / tl.sum(tl.exp(lg_all - m_q[:, None]), axis=1)
        m_i = tl.gather(m_q, q_of_row, 0)
        inv_s = tl.gather(inv_q, q_of_row, 0)

        f_rows = off_ptr + b * stride_fb + h * stride_fh + offs_q * stride_fq + offs_p * stride_fp
        g_rows = lg_ptr + b * stride_gb + h * stride_gh + offs_q * stride_gq + offs_p * stride_gk
        r_rows = ref_ptr + b * stride_rb + offs_q * stride_rq + (offs_p % NUM_REFS) * stride_rr
        m_base = mask_ptr + b * stride_mb

        acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
        count = tl.zeros([BLOCK_Q], tl.float32)
        for n in range(NUM_CAMS):
            seen_q = tl.load(m_base + n * stride_mn + qq * stride_mq, mask=q_mask, other=0) != 0
            count += seen_q.to(tl.float32)
            if tl.max(seen_q.to(tl.int32), axis=0) > 0:
                # rows of queries this camera does not see load nothing and sample nothing
                live = row_mask & (tl.load(m_base + n * stride_mn + offs_q * stride_mq, mask=row_mask, other=0) != 0)
                rx = tl.load(r_rows + n * stride_rn, mask=live, other=0.0).to(tl.float32)
                ry = tl.load(r_rows + n * stride_rn + stride_rc, mask=live, other=0.0).to(tl.float32)
                v_base = v_ptr + (b * NUM_CAMS + n) * (NUM_KEYS * ROW_STRIDE) + h * HEAD_DIM + offs_d[None, :]
                for l in tl.static_range(NUM_LEVELS):
                    if l == 0:
                        hl = H0
                        wl = W0
                        start = 0
                    elif l == 1:
                        hl = H1
                        wl = W1
                        start = H0 * W0
                    elif l == 2:
                        hl = H2
                        wl = W2
                        start = H0 * W0 + H1 * W1
                    else:
                        hl = H3
                        wl = W3
                        start = H0 * W0 + H1 * W1 + H2 * W2
                    # dead rows read x = -1e4: all four corners fall outside, no per-corner row test
                    lx = tl.load(f_rows + l * stride_fl, mask=live, other=-1.0e4).to(tl.float32)
                    ly = tl.load(f_rows + l * stride_fl + stride_fc, mask=live, other=0.0).to(tl.float32)
                    lg = tl.load(g_rows + (l * NUM_POINTS) * stride_gk, mask=live, other=0.0).to(tl.float32)
                    a = tl.exp(lg - m_i) * inv_s
                    x = rx * (wl * 1.0) + lx - 0.5
                    y = ry * (hl * 1.0) + ly - 0.5
                    acc = _bilinear_accumulate(
                        acc, v_base, x, y, a, offs_d, start, hl, wl, ROW_STRIDE, HEAD_DIM, BLOCK_D, HALF2
                    )

        scale_q = value_scale / tl.maximum(count, 1.0)  # a query no camera sees: acc = 0, out = 0
        out = tl.sum(tl.reshape(acc, [BLOCK_Q, BLOCK_P, BLOCK_D]), axis=1) * scale_q[:, None]
        o_ptrs = out_ptr + b * stride_ob + qq[:, None] * stride_oq + h * HEAD_DIM + offs_d[None, :]
        o_mask = q_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_mask)


def _launch_config_sca(B: int, Q: int, H: int, P: int, D: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_P, BLOCK_D, num_warps): half msda's query block, one warp per 256 tile elements.

    Measured on an H100 at BEVFormer-base's layer (fp16, `bevdeploy bench ops --ops sca`,
    bench/results/nvidia-h100-80gb-hbm3/ops-sca.md): (BLOCK_Q, warps) = (4, 4) 0.519 ms,
    (8, 8) 0.599 ms, (8, 4) 0.677 ms, (16, 8) 0.856 ms. A smaller block visits fewer cameras per
    query (a block runs every camera any of its queries sees), which outweighs the shorter tiles."""
    block_q, block_p, block_d, _ = _launch_config(B, Q, H, P, D, device)
    block_q = max(1, block_q // 2)
    num_warps = max(1, min(8, block_q * block_p * block_d // 256))
    return block_q, block_p, block_d, num_warps


def _sca_triton(
    value: Tensor,
    spatial_shapes: Sequence[Sequence[int]] | Sequence[int],
    reference_points_cam: Tensor,
    bev_mask: Tensor,
    sampling_offsets: Tensor,
    attention_logits: Tensor,
    variant: str,
    value_scale: float = 1.0,
    out: Tensor | None = None,
    launch: tuple[int, int] | None = None,
) -> Tensor:
    """Triton :func:`sca_gathered` (CUDA tensors, or CPU tensors under the interpreter).

    ``launch``: (BLOCK_Q, num_warps) instead of the heuristic's (benchmark sweeps; BLOCK_Q a power of 2).
    """
    if isinstance(spatial_shapes, Sequence) and spatial_shapes and isinstance(spatial_shapes[0], int):
        shapes = _pair_shapes(spatial_shapes)
    else:
        shapes = _normalize_shapes(spatial_shapes)
    B, N, S, H, D = value.shape
    _, Q, _, L, P, _ = sampling_offsets.shape
    y = new_output((B, Q, H * D), variant, value.device, out)
    if y.numel() == 0:
        return y
    if N == 0:
        return y.zero_()
    value = value.contiguous()  # constexpr strides; the corner gathers need contiguous channels
    if value.numel() // max(B, 1) > _INT32_MAX or y.numel() // max(B, 1) > _INT32_MAX:
        raise NotImplementedError("sca_gathered: over 2**31 elements per batch element (int32 offsets)")
    if bev_mask.dtype == torch.bool:
        bev_mask = bev_mask.view(torch.uint8)  # same bytes; Triton reads it as bytes
    levels = {}
    for i in range(MAX_LEVELS):
        levels[f"H{i}"], levels[f"W{i}"] = shapes[i] if i < L else (0, 0)
    block_q, block_p, block_d, num_warps = _launch_config_sca(B, Q, H, P, D, value.device)
    if launch is not None:
        block_q, num_warps = launch
    num_q_blocks = triton.cdiv(Q, block_q)
    grid = (B * num_q_blocks * H,)
    _sca_fwd_kernel[grid](
        value, reference_points_cam, bev_mask, sampling_offsets, attention_logits, y,
        Q, num_q_blocks, float(value_scale) if variant == "int8" else 1.0,
        *reference_points_cam.stride(),
        *bev_mask.stride(),
        *sampling_offsets.stride(),
        *attention_logits.stride(),
        y.stride(0), y.stride(1),
        **levels, NUM_CAMS=N, NUM_HEADS=H, HEAD_DIM=D, NUM_LEVELS=L, NUM_POINTS=P,
        NUM_REFS=reference_points_cam.shape[3], HALF2=variant == "fp16x2",
        BLOCK_Q=block_q, BLOCK_P=block_p, BLOCK_D=block_d, BLOCK_LP=triton.next_power_of_2(L * P),
        num_warps=num_warps,
    )  # fmt: skip
    return y


def _sca_cpu(
    value: Tensor,
    spatial_shapes: list[int],
    reference_points_cam: Tensor,
    bev_mask: Tensor,
    sampling_offsets: Tensor,
    attention_logits: Tensor,
    variant: str,
    value_scale: float,
) -> Tensor:
    """The op's reference path: :func:`reference` in fp32 on the (dequantized) inputs."""
    out = reference(
        to_compute(value, variant, value_scale),
        _pair_shapes(spatial_shapes),
        reference_points_cam.float(),
        bev_mask,
        sampling_offsets.float(),
        attention_logits.float(),
    )
    return out.to(VARIANT_OUTPUT_DTYPE[variant])


@torch.library.custom_op(
    "bevdeploy::sca_gathered",
    mutates_args=(),
    schema="(Tensor value, int[] spatial_shapes, Tensor reference_points_cam, Tensor bev_mask, "
    "Tensor sampling_offsets, Tensor attention_logits, str variant, float value_scale) -> Tensor",
)
def _sca_op(
    value: Tensor,
    spatial_shapes: list[int],
    reference_points_cam: Tensor,
    bev_mask: Tensor,
    sampling_offsets: Tensor,
    attention_logits: Tensor,
    variant: str,
    value_scale: float,
) -> Tensor:
    args = (value, spatial_shapes, reference_points_cam, bev_mask, sampling_offsets, attention_logits, variant, value_scale)
    if use_triton(value):
        return _sca_triton(*args)
    return _sca_cpu(*args)


@_sca_op.register_fake
def _(value, spatial_shapes, reference_points_cam, bev_mask, sampling_offsets, attention_logits, variant, value_scale):
    shapes = _pair_shapes(spatial_shapes)
    _check_inputs(value, shapes, reference_points_cam, bev_mask, sampling_offsets, attention_logits, variant, value_scale)
    B, _, _, H, D = value.shape
    Q = sampling_offsets.shape[1]
    return value.new_empty((B, Q, H * D), dtype=VARIANT_OUTPUT_DTYPE[variant])


register_reference_autograd(_sca_op, _sca_cpu)


@bf16_as_float32
def sca_gathered(
    value: Tensor,
    spatial_shapes: Sequence[Sequence[int]] | Tensor,
    reference_points_cam: Tensor,
    bev_mask: Tensor,
    sampling_offsets: Tensor,
    attention_logits: Tensor,
    *,
    variant: str | None = None,
    value_scale: float | None = None,
) -> Tensor:
    """Spatial cross-attention that samples each BEV query only in the cameras that see it.

    Equals :func:`reference` (the static form: :func:`~bevdeploy.ops.msda.msda_fused` in every camera,
    masked sum over cameras, divided by the number of cameras that see the query, at least 1), without
    its ``[B, N, Q, C]`` intermediate and without sampling the cameras a query is not seen by.

    Args:
        value (Tensor[B, N, S, H, D]): per-camera, per-head values of all levels (level ``l`` in rows
            ``start_l .. start_l + h_l*w_l``, row-major). float32 (``fp32``), float16 (``fp16``,
            ``fp16x2``) or int8 (``int8``, with ``value_scale``).
        spatial_shapes: the ``(h, w)`` of each level (at most 4): int pairs, or a CPU int tensor [L, 2].
        reference_points_cam (Tensor[B, N, Q, R, 2]): (x, y) in [0, 1] of camera ``n``'s image for
            the query's ``R`` pillar points; point ``p`` uses reference ``p % R`` (``R`` divides ``P``).
            float32, or float16 outside ``fp32``.
        bev_mask (Tensor[B, N, Q]): nonzero where camera ``n`` sees query ``q``; bool, uint8,
            float16 or float32.
        sampling_offsets (Tensor[B, Q, H, L, P, 2]): (x, y) offsets in pixels of level ``l``, shared
            by the cameras (same dtypes as the reference points).
        attention_logits (Tensor[B, Q, H, L*P]): pre-softmax weights, shared by the cameras.
        variant (str, optional): ``fp32``, ``fp16``, ``fp16x2`` or ``int8``; default from ``value.dtype``.
        value_scale (float, optional): the per-tensor scale of an int8 ``value`` (int8 only).

    Returns:
        Tensor[B, Q, H*D]: float32 for ``fp32``, float16 otherwise; 0 for a query no camera sees.

    Example:
        >>> value = torch.randn(1, 2, 6 * 8, 2, 4)
        >>> ref = torch.rand(1, 2, 10, 2, 2)
        >>> mask = torch.rand(1, 2, 10) > 0.5
        >>> off = torch.randn(1, 10, 2, 1, 4, 2)
        >>> sca_gathered(value, [(6, 8)], ref, mask, off, torch.randn(1, 10, 2, 4)).shape
        torch.Size([1, 10, 8])
    """
    check_tensor("value", value)
    variant = resolve_variant(variant, value.dtype, "value")
    scale = check_int8_scale("value_scale", value_scale, variant) if variant == "int8" else 1.0
    shapes = _normalize_shapes(spatial_shapes)
    _check_inputs(value, shapes, reference_points_cam, bev_mask, sampling_offsets, attention_logits, variant, scale)
    return _sca_op(
        value, _flatten_shapes(shapes), reference_points_cam, bev_mask, sampling_offsets, attention_logits, variant, scale
    )


class SCAGathered(nn.Module):
    """See :func:`sca_gathered`."""

    def __init__(self, *, variant: str | None = None, value_scale: float | None = None) -> None:
        super().__init__()
        self.variant = variant
        self.value_scale = value_scale

    def forward(
        self,
        value: Tensor,
        spatial_shapes: Sequence[Sequence[int]] | Tensor,
        reference_points_cam: Tensor,
        bev_mask: Tensor,
        sampling_offsets: Tensor,
        attention_logits: Tensor,
    ) -> Tensor:
        return sca_gathered(
            value,
            spatial_shapes,
            reference_points_cam,
            bev_mask,
            sampling_offsets,
            attention_logits,
            variant=self.variant,
            value_scale=self.value_scale,
        )

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, value_scale={self.value_scale}"
