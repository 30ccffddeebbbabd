"""Multi-scale deformable attention (MSDA), the reference system's ``MultiScaleDeformableAttnTRT``.

Deformable DETR (Zhu et al., ICLR 2021, https://arxiv.org/abs/2010.04159) attends from each query
to a few learned points per feature level instead of to every key. For batch ``b``, query ``q``,
head ``h`` and channel ``d``::

    out[b, q, h*D + d] = sum_{l < L, p < P} a[b, q, h, l, p] * bilinear(value_l[b, :, :, h, d], x, y)
    x = loc[b, q, h, l, p, 0] * W_l - 0.5        (align_corners=False)
    y = loc[b, q, h, l, p, 1] * H_l - 0.5

``value_l`` is level ``l`` of ``value (Tensor[B, S, H, D])``, the rows ``start_l .. start_l + H_l*W_l``
of ``S = sum_l H_l*W_l`` in row-major (y, x) order; corners outside the map count as zero. This is
mmcv's ``multi_scale_deformable_attn_pytorch`` exactly (one ``F.grid_sample`` per level), which
:func:`reference` keeps as written: it is the test oracle and the slow baseline of the benchmarks.

Two public forms:

* :func:`msda`: mmcv's classic form, with sampling locations normalised to [0, 1] and attention
  weights already normalised.
* :func:`msda_fused`: the reference system's current plugin form. Locations are computed inside the
  kernel from reference points ``[B, Q, R, 2]`` (in [0, 1], shared by all levels; point ``p`` uses
  reference ``p % R``) and per-level pixel offsets, ``pixel = ref * [W_l, H_l] + offset - 0.5``;
  the weights are a max-subtracted softmax over the ``L*P`` logits of each (query, head), in
  registers. Fewer bytes move than writing locations and weights out first.

Kernel (Triton; the query-block tiling of "Efficient Multi-Scale Deformable Attention on GPUs",
as in roulbac/msda-triton, with the points of a level folded into the tile): one program owns
``BLOCK_Q`` consecutive queries of one (batch, head) as a ``[BLOCK_Q * P, D]`` tile, one row per
(query, point). Per level, the parameters of all rows are loaded at once (the threads that share a
warp instruction read the consecutive point records of one query: one cache line, not one line per
query), coordinates and corner weights are computed in fp32, and each bilinear corner is one
gather of ``BLOCK_Q * P`` contiguous channel rows (``D = 32`` fp16: 64 B per row, 16-byte loads).
Levels are unrolled and their sizes are constexpr: no device tensor, no host sync (CUDA-graph
safe), bounds tests against constants, and the (x+1, y), (x, y+1), (x+1, y+1) corners are
address immediates of the (x, y) gather. The points are summed once, at the end. Programs run
batch-major, then query block, then head, so the programs in flight share one camera's value in
L2 (BEVFormer-base: 15.8 MB of fp16 value per camera, 50 MB of L2 on an H100).

Variants: ``fp32`` (fp32 in/out); ``fp16`` (fp16 value, fp32 coordinates and accumulators);
``fp16x2`` (fp16 value; coordinates and corner weights in fp32, then the four corner
multiply-adds of every point run in fp16 pairs (HFMA2) into a per-level fp16 accumulator, summed
across levels in fp32, as the reference's ``half2`` kernel); ``int8`` (int8 value with a per-tensor
``value_scale``, fp32 math, fp16 output). The small tensors (locations, reference points, offsets,
weights, logits) are fp32, or fp32/fp16 outside the fp32 variant; coordinates are always computed
in fp32 (the reference's fp16 plugin computes them in half, which loses pixels on 200-wide maps).

Up to 4 levels (Deformable DETR, BEVFormer); any ``D`` (odd too); the backward pass is the
reference's autograd (training/QAT), the engines run forward only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevdeploy.ops._utils import (
    bf16_as_float32,
    VARIANT_INPUT_DTYPE,
    VARIANT_OUTPUT_DTYPE,
    VARIANTS,
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

MAX_LEVELS = 4
_INT32_MAX = 2**31 - 1

Shapes = list[tuple[int, int]]


def _small_dtypes(variant: str) -> tuple[torch.dtype, ...]:
    return (torch.float32,) if variant == "fp32" else (torch.float32, torch.float16)


def _normalize_shapes(spatial_shapes: Sequence[Sequence[int]] | Tensor) -> Shapes:
    """(h, w) int pairs from a sequence or a CPU int tensor [L, 2] (a CUDA tensor would sync)."""
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.device.type != "cpu":
            raise ValueError(
                "spatial_shapes must be a sequence of (h, w) ints or a CPU int tensor [L, 2]; reading a "
                f"{spatial_shapes.device.type} tensor would synchronise with the host"
            )
        if spatial_shapes.is_floating_point() or spatial_shapes.is_complex() or spatial_shapes.dim() != 2:
            raise ValueError(
                f"spatial_shapes must be an int tensor of shape [L, 2], got {spatial_shapes.dtype} "
                f"{list(spatial_shapes.shape)}"
            )
        spatial_shapes = spatial_shapes.tolist()
    pairs = []
    for item in spatial_shapes:
        item = tuple(item) if isinstance(item, Sequence | Tensor) else (item,)
        if len(item) != 2:
            raise ValueError(f"spatial_shapes must hold (h, w) pairs, got {item!r}")
        h, w = (int(v) for v in item)
        if h <= 0 or w <= 0:
            raise ValueError(f"spatial_shapes must hold positive (h, w) sizes, got {(h, w)}")
        pairs.append((h, w))
    if not pairs:
        raise ValueError("spatial_shapes must hold at least one (h, w) level")
    return pairs


def _flatten_shapes(shapes: Shapes) -> list[int]:
    return [v for hw in shapes for v in hw]


def _pair_shapes(flat: Sequence[int]) -> Shapes:
    if len(flat) % 2 or not flat:
        raise ValueError(f"spatial_shapes (flattened) must be [h0, w0, h1, w1, ...], got {list(flat)}")
    return [(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]


def _check_value(value: Tensor, shapes: Shapes, variant: str, value_scale: float) -> tuple[int, int, int, int]:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    check_tensor("value", value, shape=("B", "S", "H", "D"), dtypes=(VARIANT_INPUT_DTYPE[variant],))
    check_int8_scale("value_scale", value_scale, variant)
    if len(shapes) > MAX_LEVELS:
        raise ValueError(f"spatial_shapes: at most {MAX_LEVELS} levels are supported, got {len(shapes)}")
    B, S, H, D = value.shape
    num_keys = sum(h * w for h, w in shapes)
    if S != num_keys:
        raise ValueError(
            f"value must have shape [B, S, H, D] with S = sum(h*w) over spatial_shapes = {num_keys}, got S={S}"
        )
    return B, S, H, D


def _check_inputs(
    value: Tensor,
    shapes: Shapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    variant: str,
    value_scale: float,
) -> None:
    B, _, H, _ = _check_value(value, shapes, variant, value_scale)
    L = len(shapes)
    small = _small_dtypes(variant)
    check_tensor("sampling_locations", sampling_locations, shape=(B, "Q", H, L, "P", 2), dtypes=small)
    _, Q, _, _, P, _ = sampling_locations.shape
    check_tensor("attention_weights", attention_weights, shape=(B, Q, H, L, P), dtypes=small)
    check_same_device(value=value, sampling_locations=sampling_locations, attention_weights=attention_weights)


def _check_inputs_fused(
    value: Tensor,
    shapes: Shapes,
    reference_points: Tensor,
    sampling_offsets: Tensor,
    attention_logits: Tensor,
    variant: str,
    value_scale: float,
) -> None:
    B, _, H, _ = _check_value(value, shapes, variant, value_scale)
    L = len(shapes)
    small = _small_dtypes(variant)
    check_tensor("sampling_offsets", sampling_offsets, shape=(B, "Q", H, L, "P", 2), dtypes=small)
    _, Q, _, _, P, _ = sampling_offsets.shape
    check_tensor("reference_points", reference_points, shape=(B, Q, "R", 2), dtypes=small)
    R = reference_points.shape[2]
    if R == 0 or P % R != 0:
        raise ValueError(
            f"reference_points: R (dim 2) must divide num_points P={P} (point p uses reference p % R), got R={R}"
        )
    check_tensor("attention_logits", attention_logits, shape=(B, Q, H, L * P), dtypes=small)
    check_same_device(
        value=value,
        reference_points=reference_points,
        sampling_offsets=sampling_offsets,
        attention_logits=attention_logits,
    )


def reference(
    value: Tensor,
    spatial_shapes: Sequence[Sequence[int]] | Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """mmcv's ``multi_scale_deformable_attn_pytorch``, as written: the oracle and slow baseline.

    One ``F.grid_sample`` per level over a ``[B*H, D, H_l, W_l]`` view, then a weighted sum over
    ``L*P``. Float inputs of any dtype (the tests use float64); returns ``Tensor[B, Q, H*D]``.
    """
    bs, _, num_heads, embed_dims = value.shape
    _, num_queries, num_heads, num_levels, num_points, _ = sampling_locations.shape
    value_list = value.split([H_ * W_ for H_, W_ in spatial_shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for level, (H_, W_) in enumerate(spatial_shapes):
        # bs, H_*W_, num_heads, embed_dims -> bs*num_heads, embed_dims, H_, W_
        value_l_ = value_list[level].flatten(2).transpose(1, 2).reshape(bs * num_heads, embed_dims, H_, W_)
        # bs, num_queries, num_heads, num_points, 2 -> bs*num_heads, num_queries, num_points, 2
        sampling_grid_l_ = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # bs*num_heads, embed_dims, num_queries, num_points
        sampling_value_l_ = F.grid_sample(
            value_l_, sampling_grid_l_, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        sampling_value_list.append(sampling_value_l_)
    # (bs, num_queries, num_heads, num_levels, num_points) -> (bs*num_heads, 1, num_queries, num_levels*num_points)
    attention_weights = attention_weights.transpose(1, 2).reshape(bs * num_heads, 1, num_queries, num_levels * num_points)
    output = (
        (torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights)
        .sum(-1)
        .view(bs, num_heads * embed_dims, num_queries)
    )
    return output.transpose(1, 2).contiguous()


def fused_to_classic(
    spatial_shapes: Sequence[Sequence[int]] | Tensor,
    reference_points: Tensor,
    sampling_offsets: Tensor,
    attention_logits: Tensor,
) -> tuple[Tensor, Tensor]:
    """The (sampling_locations, attention_weights) that :func:`msda_fused` computes in its kernel.

    ``loc[..., l, p, :] = ref[..., p % R, :] + offsets[..., l, p, :] / [W_l, H_l]``, weights =
    softmax over the ``L*P`` logits, as the reference system's plugin wrapper writes it.
    """
    shapes = _normalize_shapes(spatial_shapes)
    B, Q, H, L, P, _ = sampling_offsets.shape
    R = reference_points.shape[2]
    ref = reference_points.repeat(1, 1, P // R, 1)  # [B, Q, P, 2]: index p holds ref p % R
    # offsets / [w_l, h_l] with Python divisors: no host-to-device copy, so CUDA graphs capture it
    normalized = [
        torch.stack([sampling_offsets[:, :, :, lvl, :, 0] / w, sampling_offsets[:, :, :, lvl, :, 1] / h], -1)
        for lvl, (h, w) in enumerate(shapes)
    ]
    locations = ref[:, :, None, None] + torch.stack(normalized, 3)
    weights = attention_logits.softmax(-1).view(B, Q, H, L, P)
    return locations, weights


def reference_fused(
    value: Tensor,
    spatial_shapes: Sequence[Sequence[int]] | Tensor,
    reference_points: Tensor,
    sampling_offsets: Tensor,
    attention_logits: Tensor,
) -> Tensor:
    """Plain-PyTorch :func:`msda_fused`: :func:`fused_to_classic` then :func:`reference`."""
    locations, weights = fused_to_classic(spatial_shapes, reference_points, sampling_offsets, attention_logits)
    return reference(value, _normalize_shapes(spatial_shapes), locations, weights)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_config(B: int, Q: int, H: int, P: int, D: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_P, BLOCK_D, num_warps): a tile of BLOCK_Q*BLOCK_P (query, point) rows.

    ~2048 tile elements per program (64 rows at D = 32: 16 fp32 accumulators per thread at 4
    warps); smaller query blocks while the grid would give an SM fewer than 4 programs (decoder:
    900 queries x 8 heads), since the gathers need many loads in flight.
    """
    block_p = triton.next_power_of_2(P)
    block_d = triton.next_power_of_2(D)
    block_q = max(1, 2048 // (block_p * block_d))
    sms = 132  # the interpreter's stand-in: an H100
    if device.type == "cuda":
        sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    while block_q > 1 and block_q * block_p > 32 and B * H * triton.cdiv(Q, block_q) < 4 * sms:
        block_q //= 2
    num_warps = max(1, min(8, block_q * block_p * block_d // 512))
    return block_q, block_p, block_d, num_warps


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _to_f32(v):
        """Widen a gathered corner to fp32. int8 goes without I2F (quarter rate on Hopper): the
        bits (q & 0xFF) ^ 0x4B000080 = 0x4B000000 + (q + 128) are the float 2**23 + 128 + q."""
        if v.dtype == tl.int8:
            return ((v.to(tl.int32) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        else:
            return v.to(tl.float32)

    @triton.jit
    def _bilinear_accumulate(
        acc,  # [ROWS, BLOCK_D] fp32
        v_base,  # pointers [1, BLOCK_D]: the value's channels of this (image, head) at key 0
        x,  # [ROWS] fp32 pixel coordinates in the level (align_corners=False, -0.5 applied)
        y,
        a,  # [ROWS] fp32 attention weight of the row's point
        offs_d,
        START: tl.constexpr,  # first key of the level
        HL: tl.constexpr,
        WL: tl.constexpr,
        ROW_STRIDE: tl.constexpr,  # value elements from one key to the next
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HALF2: tl.constexpr,
    ):
        """acc + a * bilinear(value level, x, y) per row, zero padding: the sampling step that
        msda and the gathered SCA (``ops/sca.py``) share (inlined into both kernels)."""
        wf = WL * 1.0
        hf = HL * 1.0
        x0 = tl.floor(x)
        y0 = tl.floor(y)
        fx = x - x0
        fy = y - y0
        # zero padding: a corner counts only inside the map. The (x0, y0) offset of a point
        # far outside may wrap: it is only dereferenced under a mask that proves it in range.
        vx0 = (x0 >= 0.0) & (x0 < wf)
        vx1 = (x0 >= -1.0) & (x0 < wf - 1.0)
        vy0 = (y0 >= 0.0) & (y0 < hf)
        vy1 = (y0 >= -1.0) & (y0 < hf - 1.0)
        off00 = ((START + (x0 + y0 * wf).to(tl.int32)) * ROW_STRIDE)[:, None]
        wy1 = a * fy
        wy0 = a - wy1
        w00 = (wy0 - wy0 * fx)[:, None]
        w01 = (wy0 * fx)[:, None]
        w10 = (wy1 - wy1 * fx)[:, None]
        w11 = (wy1 * fx)[:, None]
        m00 = (vy0 & vx0)[:, None]
        m01 = (vy0 & vx1)[:, None]
        m10 = (vy1 & vx0)[:, None]
        m11 = (vy1 & vx1)[:, None]
        if BLOCK_D != HEAD_DIM:
            d_mask = offs_d[None, :] < HEAD_DIM
            m00 = m00 & d_mask
            m01 = m01 & d_mask
            m10 = m10 & d_mask
            m11 = m11 & d_mask
        # constant steps from the (x0, y0) pointer fold into the gathers' address immediates
        p00 = v_base + off00
        v00 = tl.load(p00, mask=m00, other=0.0)
        v01 = tl.load(p00 + ROW_STRIDE, mask=m01, other=0.0)
        v10 = tl.load(p00 + WL * ROW_STRIDE, mask=m10, other=0.0)
        v11 = tl.load(p00 + (WL + 1) * ROW_STRIDE, mask=m11, other=0.0)
        if HALF2:
            # paired fp16 multiply-adds (HFMA2) into a per-level fp16 accumulator; the corner
            # weights are rounded to fp16 once per point
            acc16 = v00 * w00.to(tl.float16)
            acc16 += v01 * w01.to(tl.float16)
            acc16 += v10 * w10.to(tl.float16)
            acc16 += v11 * w11.to(tl.float16)
            acc += acc16.to(tl.float32)
        else:
            acc += _to_f32(v00) * w00
            acc += _to_f32(v01) * w01
            acc += _to_f32(v10) * w10
            acc += _to_f32(v11) * w11
        return acc

    @triton.jit
    def _msda_fwd_kernel(
        # pointers
        v_ptr,  # [B, S, H, D] fp32 / fp16 / int8, channels contiguous
        loc_ptr,  # [B, Q, H, L, P, 2] locations in [0, 1] (FUSED: pixel offsets)
        w_ptr,  # [B, Q, H, L, P] weights (FUSED: [B, Q, H, L*P] logits)
        ref_ptr,  # FUSED: [B, Q, R, 2] reference points in [0, 1]
        out_ptr,  # [B, Q, H*D]
        # sizes
        Q,
        num_q_blocks,
        value_scale,
        # strides (elements; value is contiguous, its strides are constexpr)
        stride_lb, stride_lq, stride_lh, stride_ll, stride_lp, stride_lc,
        stride_wb, stride_wq, stride_wh, stride_wl, stride_wp,
        stride_rb, stride_rq, stride_rr, stride_rc,
        stride_ob, stride_oq,
        # constexpr
        H0: tl.constexpr, W0: tl.constexpr,  # level sizes: constexpr, so that the corner offsets
        H1: tl.constexpr, W1: tl.constexpr,  # (x+1, y+1) are immediates of the gather instructions
        H2: tl.constexpr, W2: tl.constexpr,  # and the bounds tests compare with constants
        H3: tl.constexpr, W3: tl.constexpr,
        NUM_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        NUM_LEVELS: tl.constexpr,
        NUM_POINTS: tl.constexpr,
        NUM_REFS: tl.constexpr,
        FUSED: tl.constexpr,
        HALF2: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_LP: tl.constexpr,
    ):
        """out[q, h*D:(h+1)*D] = scale * sum_{l,p} a_lp * sum_{corners c} bilinear_c * value[c, h, :].

        Pixel coordinates: x = loc_x * W_l - 0.5 (classic) or ref_x * W_l + off_x - 0.5 (FUSED,
        with a = softmax over the L*P logits, max-subtracted, in fp32 registers).

        The tile is [BLOCK_Q*BLOCK_P, BLOCK_D], one row per (query, point): the points of a level
        are rows, not a loop, so the threads of a warp that load parameters read the consecutive
        point records of one query (one cache line) instead of one record from each of 8 queries,
        and each corner is one gather of BLOCK_Q*P channel rows. Points are summed at the end.
        """
        ROWS: tl.constexpr = BLOCK_Q * BLOCK_P
        ROW_STRIDE: tl.constexpr = NUM_HEADS * HEAD_DIM  # value elements from one pixel to the next
        NUM_KEYS: tl.constexpr = H0 * W0 + H1 * W1 + H2 * W2 + H3 * W3
        pid = tl.program_id(0)
        # batch-major, then query block, then head: the programs in flight share one camera's value
        h = pid % NUM_HEADS
        t = pid // NUM_HEADS
        qb = t % num_q_blocks
        b = (t // num_q_blocks).to(tl.int64)

        rows = tl.arange(0, ROWS)
        offs_q = qb * BLOCK_Q + rows // BLOCK_P
        offs_p = rows % BLOCK_P
        offs_d = tl.arange(0, BLOCK_D)
        row_mask = (offs_q < Q) & (offs_p < NUM_POINTS)

        v_base = v_ptr + b * (NUM_KEYS * ROW_STRIDE) + h * HEAD_DIM + offs_d[None, :]
        l_rows = loc_ptr + b * stride_lb + h * stride_lh + offs_q * stride_lq + offs_p * stride_lp
        w_rows = w_ptr + b * stride_wb + h * stride_wh + offs_q * stride_wq + offs_p * stride_wp

        if FUSED:
            r_rows = ref_ptr + b * stride_rb + offs_q * stride_rq + (offs_p % NUM_REFS) * stride_rr
            rx = tl.load(r_rows, mask=row_mask, other=0.0).to(tl.float32)
            ry = tl.load(r_rows + stride_rc, mask=row_mask, other=0.0).to(tl.float32)
            # softmax statistics over the L*P logits of each query from one [BLOCK_Q, L*P] tile,
            # handed to the query's rows with a gather (which keeps the rows' layout: no layout
            # conversion of the per-level weights follows)
            qq = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
            lp = tl.arange(0, BLOCK_LP)
            lp_mask = lp[None, :] < NUM_LEVELS * NUM_POINTS
            lg_all = tl.load(
                w_ptr + b * stride_wb + h * stride_wh + qq[:, None] * stride_wq + lp[None, :] * stride_wp,
                mask=(qq < Q)[:, None] & lp_mask,
                other=0.0,
            ).to(tl.float32)
            lg_all = tl.where(lp_mask, lg_all, float("-inf"))
            m_q = tl.max(lg_all, axis=1)
            inv_q = 1.0 / tl.sum(tl.exp(lg_all - m_q[:, None]), axis=1)
            q_of_row = rows // BLOCK_P
            m_i = tl.gather(m_q, q_of_row, 0)
            inv_s = tl.gather(inv_q, q_of_row, 0)

        acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
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
            wf = wl * 1.0
            hf = hl * 1.0

            # masked rows (past Q, padded points) read x = -1e4: far outside, so all four corners
            # are padding and the row mask never enters the per-corner tests
            lx = tl.load(l_rows + l * stride_ll, mask=row_mask, other=-1.0e4).to(tl.float32)
            ly = tl.load(l_rows + l * stride_ll + stride_lc, mask=row_mask, other=0.0).to(tl.float32)
            if FUSED:
                x = rx * wf + lx - 0.5
                y = ry * hf + ly - 0.5
                lg = tl.load(w_rows + l * stride_wl, mask=row_mask, other=0.0).to(tl.float32)
                a = tl.exp(lg - m_i) * inv_s
            else:
                x = lx * wf - 0.5
                y = ly * hf - 0.5
                a = tl.load(w_rows + l * stride_wl, mask=row_mask, other=0.0).to(tl.float32)
            acc = _bilinear_accumulate(
                acc, v_base, x, y, a, offs_d, start, hl, wl, ROW_STRIDE, HEAD_DIM, BLOCK_D, HALF2
            )

        out = tl.sum(tl.reshape(acc, [BLOCK_Q, BLOCK_P, BLOCK_D]), axis=1) * value_scale
        oq = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
        o_ptrs = out_ptr + b * stride_ob + oq[:, None] * stride_oq + h * HEAD_DIM + offs_d[None, :]
        o_mask = (oq < Q)[:, None] & (offs_d[None, :] < HEAD_DIM)
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_mask)


def _launch(
    value: Tensor,
    shapes: Shapes,
    loc: Tensor,
    weights: Tensor,
    ref: Tensor | None,
    variant: str,
    value_scale: float,
    out: Tensor | None,
) -> Tensor:
    """Shared launcher: ``loc``/``weights`` are locations/weights, or offsets/logits with ``ref``."""
    B, S, H, D = value.shape
    _, Q, _, L, P, _ = loc.shape
    y = new_output((B, Q, H * D), variant, value.device, out)
    if y.numel() == 0:
        return y
    value = value.contiguous()  # constexpr strides; the corner gathers need contiguous channels
    for name, t in (("value", value), ("sampling tensors", loc), ("output", y)):
        if t.numel() // max(B, 1) > _INT32_MAX:
            raise NotImplementedError(f"msda: {name} has over 2**31 elements per batch element (int32 offsets)")
    fused = ref is not None
    levels = {}
    for i in range(MAX_LEVELS):
        levels[f"H{i}"], levels[f"W{i}"] = shapes[i] if i < L else (0, 0)
    if fused:
        stride_wl, stride_wp = P * weights.stride(3), weights.stride(3)
        ref_strides = ref.stride()
        num_refs = ref.shape[2]
    else:
        stride_wl, stride_wp = weights.stride(3), weights.stride(4)
        ref, ref_strides, num_refs = loc, (0, 0, 0, 0), 1
    block_q, block_p, block_d, num_warps = _launch_config(B, Q, H, P, D, value.device)
    num_q_blocks = triton.cdiv(Q, block_q)
    grid = (B * num_q_blocks * H,)
    _msda_fwd_kernel[grid](
        value, loc, weights, ref, y,
        Q, num_q_blocks, float(value_scale) if variant == "int8" else 1.0,
        *loc.stride(),
        weights.stride(0), weights.stride(1), weights.stride(2), stride_wl, stride_wp,
        *ref_strides,
        y.stride(0), y.stride(1),
        **levels, NUM_HEADS=H, HEAD_DIM=D, NUM_LEVELS=L, NUM_POINTS=P, NUM_REFS=num_refs,
        FUSED=fused, HALF2=variant == "fp16x2",
        BLOCK_Q=block_q, BLOCK_P=block_p, BLOCK_D=block_d, BLOCK_LP=triton.next_power_of_2(L * P),
        num_warps=num_warps,
    )  # fmt: skip
    return y


def _msda_triton(
    value: Tensor,
    spatial_shapes: Sequence[Sequence[int]] | Sequence[int],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    variant: str,
    value_scale: float = 1.0,
    out: Tensor | None = None,
) -> Tensor:
    """Triton :func:`msda` (CUDA tensors, or CPU tensors under the interpreter)."""
    shapes = _as_pairs(spatial_shapes)
    return _launch(value, shapes, sampling_locations, attention_weights, None, variant, value_scale, out)


def _msda_fused_triton(
    value: Tensor,
    spatial_shapes: Sequence[Sequence[int]] | Sequence[int],
    reference_points: Tensor,
    sampling_offsets: Tensor,
    attention_logits: Tensor,
    variant: str,
    value_scale: float = 1.0,
    out: Tensor | None = None,
) -> Tensor:
    """Triton :func:`msda_fused` (CUDA tensors, or CPU tensors under the interpreter)."""
    shapes = _as_pairs(spatial_shapes)
    return _launch(value, shapes, sampling_offsets, attention_logits, reference_points, variant, value_scale, out)


def _as_pairs(spatial_shapes) -> Shapes:
    """Accept the op's flat int list as well as (h, w) pairs."""
    if isinstance(spatial_shapes, Sequence) and spatial_shapes and isinstance(spatial_shapes[0], int):
        return _pair_shapes(spatial_shapes)
    return _normalize_shapes(spatial_shapes)


def _msda_cpu(
    value: Tensor,
    spatial_shapes: list[int],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    variant: str,
    value_scale: float,
) -> Tensor:
    """The op's reference path: :func:`reference` in fp32 on the (dequantized) inputs."""
    out = reference(
        to_compute(value, variant, value_scale),
        _pair_shapes(spatial_shapes),
        sampling_locations.float(),
        attention_weights.float(),
    )
    return out.to(VARIANT_OUTPUT_DTYPE[variant])


def _msda_fused_cpu(
    value: Tensor,
    spatial_shapes: list[int],
    reference_points: Tensor,
    sampling_offsets: Tensor,
    attention_logits: Tensor,
    variant: str,
    value_scale: float,
) -> Tensor:
    """The fused op's reference path: :func:`reference_fused` in fp32 on the (dequantized) inputs."""
    out = reference_fused(
        to_compute(value, variant, value_scale),
        _pair_shapes(spatial_shapes),
        reference_points.float(),
        sampling_offsets.float(),
        attention_logits.float(),
    )
    return out.to(VARIANT_OUTPUT_DTYPE[variant])


# explicit schemas: int[] (static level sizes), not the SymInt[] that list[int] would infer
@torch.library.custom_op(
    "bevdeploy::msda",
    mutates_args=(),
    schema="(Tensor value, int[] spatial_shapes, Tensor sampling_locations, Tensor attention_weights, str variant, "
    "float value_scale) -> Tensor",
)
def _msda_op(
    value: Tensor,
    spatial_shapes: list[int],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    variant: str,
    value_scale: float,
) -> Tensor:
    if use_triton(value):
        return _msda_triton(value, spatial_shapes, sampling_locations, attention_weights, variant, value_scale)
    return _msda_cpu(value, spatial_shapes, sampling_locations, attention_weights, variant, value_scale)


@_msda_op.register_fake
def _(value, spatial_shapes, sampling_locations, attention_weights, variant, value_scale):
    _check_inputs(value, _pair_shapes(spatial_shapes), sampling_locations, attention_weights, variant, value_scale)
    B, _, H, D = value.shape
    Q = sampling_locations.shape[1]
    return value.new_empty((B, Q, H * D), dtype=VARIANT_OUTPUT_DTYPE[variant])


register_reference_autograd(_msda_op, _msda_cpu)


@torch.library.custom_op(
    "bevdeploy::msda_fused",
    mutates_args=(),
    schema="(Tensor value, int[] spatial_shapes, Tensor reference_points, Tensor sampling_offsets, "
    "Tensor attention_logits, str variant, float value_scale) -> Tensor",
)
def _msda_fused_op(
    value: Tensor,
    spatial_shapes: list[int],
    reference_points: Tensor,
    sampling_offsets: Tensor,
    attention_logits: Tensor,
    variant: str,
    value_scale: float,
) -> Tensor:
    if use_triton(value):
        return _msda_fused_triton(
            value, spatial_shapes, reference_points, sampling_offsets, attention_logits, variant, value_scale
        )
    return _msda_fused_cpu(value, spatial_shapes, reference_points, sampling_offsets, attention_logits, variant, value_scale)


@_msda_fused_op.register_fake
def _(value, spatial_shapes, reference_points, sampling_offsets, attention_logits, variant, value_scale):
    shapes = _pair_shapes(spatial_shapes)
    _check_inputs_fused(value, shapes, reference_points, sampling_offsets, attention_logits, variant, value_scale)
    B, _, H, D = value.shape
    Q = sampling_offsets.shape[1]
    return value.new_empty((B, Q, H * D), dtype=VARIANT_OUTPUT_DTYPE[variant])


register_reference_autograd(_msda_fused_op, _msda_fused_cpu)


def _resolve(value: Tensor, spatial_shapes, variant: str | None, value_scale: float | None) -> tuple[Shapes, str, float]:
    check_tensor("value", value)
    variant = resolve_variant(variant, value.dtype, "value")
    # float variants ignore value_scale (a scale there would change nothing on the CPU path)
    scale = check_int8_scale("value_scale", value_scale, variant) if variant == "int8" else 1.0
    return _normalize_shapes(spatial_shapes), variant, scale


@bf16_as_float32
def msda(
    value: Tensor,
    spatial_shapes: Sequence[Sequence[int]] | Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    variant: str | None = None,
    value_scale: float | None = None,
) -> Tensor:
    """Multi-scale deformable attention, mmcv's classic form (``multi_scale_deformable_attn_pytorch``).

    Bilinear sampling with zero padding and ``align_corners=False`` at each location of each level,
    weighted by ``attention_weights`` and summed over levels and points.

    Args:
        value (Tensor[B, S, H, D]): per-head values of all levels, level ``l`` in rows
            ``start_l .. start_l + h_l*w_l`` (row-major), ``S = sum h_l*w_l``. float32 (``fp32``),
            float16 (``fp16``, ``fp16x2``) or int8 (``int8``, with ``value_scale``).
        spatial_shapes: the ``(h, w)`` of each level (at most 4): a sequence of int pairs, or an int
            tensor ``[L, 2]`` on the CPU. Pass plain ints under ``torch.export``.
        sampling_locations (Tensor[B, Q, H, L, P, 2]): (x, y) normalised to [0, 1] over each level;
            outside the map samples zeros. float32, or float16 outside the ``fp32`` variant.
        attention_weights (Tensor[B, Q, H, L, P]): already normalised weights (same dtypes).
        variant (str, optional): ``fp32``, ``fp16``, ``fp16x2`` or ``int8``; default from
            ``value.dtype`` (float16 gives ``fp16``).
        value_scale (float, optional): the per-tensor scale of an int8 ``value`` (int8 only).

    Returns:
        Tensor[B, Q, H*D]: float32 for ``fp32``, float16 otherwise.

    Example:
        >>> value = torch.randn(1, 6 * 8, 2, 4)
        >>> loc = torch.rand(1, 10, 2, 1, 3, 2)
        >>> w = torch.softmax(torch.randn(1, 10, 2, 1, 3), -1)
        >>> msda(value, [(6, 8)], loc, w).shape
        torch.Size([1, 10, 8])
    """
    shapes, variant, scale = _resolve(value, spatial_shapes, variant, value_scale)
    _check_inputs(value, shapes, sampling_locations, attention_weights, variant, scale)
    return _msda_op(value, _flatten_shapes(shapes), sampling_locations, attention_weights, variant, scale)


@bf16_as_float32
def msda_fused(
    value: Tensor,
    spatial_shapes: Sequence[Sequence[int]] | Tensor,
    reference_points: Tensor,
    sampling_offsets: Tensor,
    attention_logits: Tensor,
    *,
    variant: str | None = None,
    value_scale: float | None = None,
) -> Tensor:
    """Multi-scale deformable attention with locations and softmax computed inside the kernel.

    The reference system's current ``MultiScaleDeformableAttnTRT`` math: point ``p`` of level ``l``
    samples at pixel ``ref[p % R] * [w_l, h_l] + offset - 0.5`` with weight
    ``softmax(attention_logits)[l*P + p]`` (over all ``L*P``, max-subtracted). Equals
    ``msda(value, spatial_shapes, *fused_to_classic(spatial_shapes, reference_points,
    sampling_offsets, attention_logits))``.

    Args:
        value (Tensor[B, S, H, D]): as in :func:`msda`.
        spatial_shapes: as in :func:`msda`.
        reference_points (Tensor[B, Q, R, 2]): (x, y) in [0, 1], shared by all heads and levels;
            ``R`` divides ``P`` (BEVFormer's spatial cross-attention: R = 4 pillar heights).
        sampling_offsets (Tensor[B, Q, H, L, P, 2]): (x, y) offsets in pixels of level ``l``.
        attention_logits (Tensor[B, Q, H, L*P]): pre-softmax weights.
        variant (str, optional): as in :func:`msda`.
        value_scale (float, optional): as in :func:`msda`.

    Returns:
        Tensor[B, Q, H*D]: float32 for ``fp32``, float16 otherwise.

    Example:
        >>> value = torch.randn(1, 6 * 8, 2, 4)
        >>> ref = torch.rand(1, 10, 2, 2)
        >>> off = torch.randn(1, 10, 2, 1, 4, 2)
        >>> msda_fused(value, [(6, 8)], ref, off, torch.randn(1, 10, 2, 4)).shape
        torch.Size([1, 10, 8])
    """
    shapes, variant, scale = _resolve(value, spatial_shapes, variant, value_scale)
    _check_inputs_fused(value, shapes, reference_points, sampling_offsets, attention_logits, variant, scale)
    return _msda_fused_op(
        value, _flatten_shapes(shapes), reference_points, sampling_offsets, attention_logits, variant, scale
    )


class MSDA(nn.Module):
    """See :func:`msda`."""

    def __init__(self, *, variant: str | None = None, value_scale: float | None = None) -> None:
        super().__init__()
        self.variant = variant
        self.value_scale = value_scale

    def forward(
        self,
        value: Tensor,
        spatial_shapes: Sequence[Sequence[int]] | Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
    ) -> Tensor:
        return msda(
            value, spatial_shapes, sampling_locations, attention_weights, variant=self.variant, value_scale=self.value_scale
        )

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, value_scale={self.value_scale}"


class MSDAFused(nn.Module):
    """See :func:`msda_fused`."""

    def __init__(self, *, variant: str | None = None, value_scale: float | None = None) -> None:
        super().__init__()
        self.variant = variant
        self.value_scale = value_scale

    def forward(
        self,
        value: Tensor,
        spatial_shapes: Sequence[Sequence[int]] | Tensor,
        reference_points: Tensor,
        sampling_offsets: Tensor,
        attention_logits: Tensor,
    ) -> Tensor:
        return msda_fused(
            value,
            spatial_shapes,
            reference_points,
            sampling_offsets,
            attention_logits,
            variant=self.variant,
            value_scale=self.value_scale,
        )

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, value_scale={self.value_scale}"
