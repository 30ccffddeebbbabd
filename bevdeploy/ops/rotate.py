"""Rotation of images / BEV feature maps about a centre (the reference system's ``RotateTRT``).

BEVFormer rotates the previous BEV map (``prev_bev`` as [C=256, H, W], 50x50 .. 200x200) by the
CAN-bus yaw change about ``rotate_center`` before temporal self-attention. The angle is computed on
the device each frame, so the kernel reads angle and centre from device memory (no host sync; the
op can be captured in a CUDA graph).

Math (torchvision's ``rotate(img, angle, interpolation, expand=False, center, fill=None)``, derived
from ``_get_inverse_affine_matrix(center - size/2, -angle, ...)``, ``_gen_affine_grid`` and
``grid_sample(..., padding_mode="zeros", align_corners=False)``): output pixel (i, j) (column, row)
reads the input at

    u = i + 0.5 - cx,   v = j + 0.5 - cy,   t = angle in radians (counter-clockwise on screen)
    x = cos(t) u - sin(t) v + cx - 0.5
    y = sin(t) u + cos(t) v + cy - 0.5

with ``nearest`` (round half to even) or ``bilinear`` interpolation and zeros outside the image;
``center`` (cx, cy) is in pixels with the image centre at (W/2, H/2) (the default). Rotating by +90
degrees about the centre of a square image is ``torch.rot90(img, 1, dims=(-2, -1))``.

Zero fill means torchvision's ``fill=None`` (plain zero padding, what BEVFormer calls and what the
reference plugin computes). torchvision's ``fill=0`` is the same for ``nearest`` but, for
``bilinear``, also multiplies border pixels by their in-image weight.

Shapes: ``img (Tensor[C, H, W] or Tensor[B, C, H, W])``; ``angle`` (degrees) a Tensor [], [1] or
[B] (one angle per image); ``center`` a Tensor [2] -> same shape as ``img``. The output has the
same memory format as the input: channels-last (``stride_c == 1``, e.g. BEVFormer's
``prev_bev.reshape(H, W, C).permute(2, 0, 1)``) in, channels-last out, else contiguous.

Kernel: the grid_sample kernel's design (``grid_sample.py``: a block of output pixels x a block of
channels per program, taps and weights once per pixel, channel-vector gathers) with the source
coordinates computed from the angle: cos/sin are evaluated in degrees with an exact quadrant
reduction, so multiples of 90 degrees move pixels exactly. Variants as grid_sample: ``fp32``,
``fp16``, ``fp16x2`` (fp16 multiply-accumulate), ``int8`` (int8 image + per-tensor scale, fp16 out).
"""

from __future__ import annotations

import math

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevdeploy.ops._utils import (
    bf16_as_float32,
    VARIANT_OUTPUT_DTYPE,
    check_int8_scale,
    check_same_device,
    check_tensor,
    register_reference_autograd,
    resolve_variant,
    to_compute,
    triton_available,
    use_triton,
)
from bevdeploy.ops.grid_sample import _cdiv, _check_int32_offsets, _launch_config

#: interpolation names -> the reference plugin's integer attribute.
INTERPOLATIONS = {"bilinear": 0, "nearest": 1}
_INTERPOLATION_NAMES = {v: k for k, v in INTERPOLATIONS.items()}
_FLOAT_DTYPES = (torch.float16, torch.float32, torch.float64)


def _check_inputs(img: Tensor, angle: Tensor, center: Tensor, interpolation: int, variant: str, img_scale: float) -> None:
    check_tensor("img", img, ndim=(3, 4))
    resolve_variant(variant, img.dtype, "img")
    if img.shape[-1] == 0 or img.shape[-2] == 0:
        raise ValueError(f"img must have non-empty H and W ([C, H, W] or [B, C, H, W]), got {list(img.shape)}")
    B = img.shape[0] if img.dim() == 4 else 1
    check_tensor("angle", angle, dtypes=_FLOAT_DTYPES)
    if angle.dim() > 1 or angle.numel() not in (1, B):
        raise ValueError(f"angle must have shape [], [1] or [B] with B={B} (one angle per image), got {list(angle.shape)}")
    check_tensor("center", center, shape=(2,), dtypes=_FLOAT_DTYPES)
    check_same_device(img=img, angle=angle, center=center)
    if interpolation not in _INTERPOLATION_NAMES:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS} (by value), got {interpolation}")
    check_int8_scale("img_scale", img_scale, variant)


def reference(
    img: Tensor,
    angle: float | Tensor,
    center: Sequence[float] | Tensor | None = None,
    interpolation: str = "nearest",
) -> Tensor:
    """torchvision's tensor ``rotate`` (``fill=None``) step by step in plain PyTorch, with a Tensor
    angle per image allowed. CPU and GPU, differentiable in img, angle and center; the test oracle.
    Computes in float32 (float64 when ``img`` is float64); dequantize an int8 image first."""
    x = img if img.dtype == torch.float64 else img.float()
    batched = x.dim() == 4
    if not batched:
        x = x.unsqueeze(0)
    B, C, H, W = x.shape
    f64 = dict(dtype=torch.float64, device=x.device)
    if isinstance(angle, (int, float)) and not math.isfinite(angle):
        raise ValueError(f"angle must be a finite number of degrees, got {angle}")
    a = torch.as_tensor(angle, **f64).reshape(-1).expand(B)
    c = torch.as_tensor([W * 0.5, H * 0.5] if center is None else center, **f64).reshape(2)
    # _get_inverse_affine_matrix(center_f, -angle, translate=0, scale=1, shear=0), in float64 as
    # torchvision's Python floats: [cos r, sin r, m2, -sin r, cos r, m5] with r = radians(-angle).
    cfx, cfy = c[0] - W * 0.5, c[1] - H * 0.5
    r = torch.deg2rad(-a)
    m0, m1, m3, m4 = torch.cos(r), torch.sin(r), -torch.sin(r), torch.cos(r)
    m2 = m0 * -cfx + m1 * -cfy + cfx
    m5 = m3 * -cfx + m4 * -cfy + cfy
    theta = torch.stack([m0, m1, m2, m3, m4, m5], -1).view(B, 2, 3).to(x.dtype)
    # _gen_affine_grid: pixel centres relative to the image centre, theta applied, then normalised.
    bx = torch.arange(W, dtype=x.dtype, device=x.device) + (0.5 - W * 0.5)
    by = torch.arange(H, dtype=x.dtype, device=x.device) + (0.5 - H * 0.5)
    base = torch.stack([bx.expand(H, W), by[:, None].expand(H, W), torch.ones(H, W, dtype=x.dtype, device=x.device)], -1)
    rescaled = theta.transpose(1, 2) / torch.tensor([0.5 * W, 0.5 * H], dtype=x.dtype, device=x.device)
    grid = base.view(1, H * W, 3).expand(B, -1, -1).bmm(rescaled).view(B, H, W, 2)
    out = F.grid_sample(x, grid, mode=interpolation, padding_mode="zeros", align_corners=False)
    # a NaN/inf angle (a device tensor: no host check) gives NaN, not a blank image
    out = torch.where(torch.isfinite(a).view(B, 1, 1, 1), out, torch.full((), float("nan"), dtype=out.dtype,
                                                                             device=out.device))
    return out if batched else out[0]


def _channels_last_out(img: Tensor) -> bool:
    """The output keeps a channels-last input's layout (C-vectors stay contiguous on both sides)."""
    C, H, W = img.shape[-3:]
    return C > 1 and H * W > 1 and img.stride(-3) == 1


def _new_output(img: Tensor, dtype: torch.dtype) -> Tensor:
    """Same shape as img; channels-last (dense [.., H, W, C] memory) or contiguous, see above."""
    if not _channels_last_out(img):
        return img.new_empty(img.shape, dtype=dtype)
    C, H, W = img.shape[-3:]
    if img.dim() == 3:
        return img.new_empty((H, W, C), dtype=dtype).permute(2, 0, 1)
    return img.new_empty((img.shape[0], H, W, C), dtype=dtype).permute(0, 3, 1, 2)


def _is_channels_last_dense(t: Tensor) -> bool:
    C, H, W = t.shape[-3:]
    return tuple(t.stride()[-3:]) == (1, W * C, C)


def _rotate_cpu(img: Tensor, angle: Tensor, center: Tensor, interpolation: int, variant: str, img_scale: float) -> Tensor:
    """The op's math without Triton: the reference on the dequantized image, in the op's output layout."""
    x = to_compute(img, variant, img_scale)
    out = reference(x, angle, center, _INTERPOLATION_NAMES[interpolation])
    dtype = VARIANT_OUTPUT_DTYPE[variant]
    return _new_output(img, dtype).copy_(out.to(dtype))


if triton_available():
    import triton
    import triton.language as tl

    from bevdeploy.ops.grid_sample import _sample_tile

    @triton.jit
    def _cos_sin_degrees(deg):
        """cos and sin of an angle in degrees: exact reduction to [-45, 45] degrees (so quarter
        turns are exact), then Taylor polynomials accurate to fp32 rounding on [-pi/4, pi/4]."""
        q = tl.floor(deg / 90.0 + 0.5)
        r = (deg - q * 90.0) * 0.017453292519943295
        r2 = r * r
        s = r * (1.0 + r2 * (-1.0 / 6.0 + r2 * (1.0 / 120.0 + r2 * (-1.0 / 5040.0 + r2 * (1.0 / 362880.0)))))
        c = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24.0 + r2 * (-1.0 / 720.0 + r2 * (1.0 / 40320.0 + r2 * (-1.0 / 3628800.0)))))
        k = q - 4.0 * tl.floor(q * 0.25)  # quadrant, 0..3
        cos_t = tl.where(k == 0.0, c, tl.where(k == 1.0, -s, tl.where(k == 2.0, -c, s)))
        sin_t = tl.where(k == 0.0, s, tl.where(k == 1.0, c, tl.where(k == 2.0, -s, -c)))
        return cos_t, sin_t

    # H and W are never specialised: Triton would turn a size of 1 into a constexpr.
    @triton.jit(do_not_specialize=["H", "W"])
    def _rotate_fwd_kernel(
        # pointers
        x_ptr,
        angle_ptr,
        center_ptr,
        y_ptr,
        # sizes
        C,
        H,
        W,
        P,
        num_cblocks,
        num_pblocks,
        scale,
        # strides (elements)
        stride_xb,
        stride_xc,
        stride_xh,
        stride_xw,
        stride_ab,
        stride_ck,
        # constexpr
        MODE: tl.constexpr,
        CH_CONTIG: tl.constexpr,
        OUT_CL: tl.constexpr,
        FP16_MATH: tl.constexpr,
        SCALED: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """y[b, c, j, i] = interp(x[b, c], R(angle[b]) about center applied to pixel (i, j))."""
        pid = tl.program_id(0)
        pid_c = pid % num_cblocks
        pid_bp = pid // num_cblocks
        pid_p = pid_bp % num_pblocks
        b = (pid_bp // num_pblocks).to(tl.int64)

        angle = tl.load(angle_ptr + b * stride_ab).to(tl.float32)
        cos_t, sin_t = _cos_sin_degrees(angle)
        cx = tl.load(center_ptr).to(tl.float32)
        cy = tl.load(center_ptr + stride_ck).to(tl.float32)

        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < P
        oh = p // W
        ow = p - oh * W
        u = ow.to(tl.float32) + 0.5 - cx
        v = oh.to(tl.float32) + 0.5 - cy
        ix = cos_t * u - sin_t * v + (cx - 0.5)
        iy = sin_t * u + cos_t * v + (cy - 0.5)

        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = (c < C)[:, None]
        if CH_CONTIG:
            c_off = c[:, None]
        else:
            c_off = c[:, None] * stride_xc
        acc = _sample_tile(x_ptr + b * stride_xb, c_off, cmask, ix, iy, pmask, H, W, stride_xh, stride_xw,
                           MODE, 0, False, FP16_MATH, BLOCK_C, BLOCK_P)
        if SCALED:
            acc = acc.to(tl.float32) * scale
        # a NaN/inf angle has no rotation: NaN out (as the reference), which the temporal loop then
        # sees in the BEV and resets, instead of a silently blank image
        acc = tl.where((angle == angle) & (tl.abs(angle) != float("inf")), acc, float("nan"))
        y_img = y_ptr + b * C * P
        if OUT_CL:
            y_off = p[None, :] * C + c[:, None]
        else:
            y_off = c[:, None] * P + p[None, :]
        tl.store(y_img + y_off, acc.to(y_ptr.dtype.element_ty), mask=cmask & pmask[None, :])


def _rotate_triton(
    img: Tensor,
    angle: Tensor,
    center: Tensor,
    interpolation: int,
    variant: str,
    img_scale: float,
    out: Tensor | None = None,
) -> Tensor:
    """Launch the kernel (no host sync). ``out`` (tests poison it) may be contiguous or dense channels-last."""
    dtype = VARIANT_OUTPUT_DTYPE[variant]
    if out is None:
        y = _new_output(img, dtype)
    else:
        if out.shape != img.shape or out.dtype != dtype or out.device != img.device:
            raise ValueError(f"out must be a {dtype} tensor of shape {list(img.shape)} on {img.device}, "
                             f"got {out.dtype} {list(out.shape)} on {out.device}")
        if not (out.is_contiguous() or _is_channels_last_dense(out)):
            raise ValueError(f"out must be contiguous or dense channels-last, got strides {out.stride()}")
        y = out
    if y.numel() == 0:
        return y
    x = img if img.dim() == 4 else img.unsqueeze(0)
    B, C, H, W = x.shape
    P = H * W
    _check_int32_offsets(x, C * P)
    a = angle.reshape(-1)
    ch_contig = C > 1 and x.stride(1) == 1
    block_c, block_p, num_warps = _launch_config(C, P, B, ch_contig, x.element_size(), interpolation, x.device)
    num_cblocks = _cdiv(C, block_c)
    num_pblocks = _cdiv(P, block_p)
    _rotate_fwd_kernel[(B * num_pblocks * num_cblocks,)](
        x, a, center, y,
        C, H, W, P, num_cblocks, num_pblocks, float(img_scale),
        x.stride(0), x.stride(1), x.stride(2), x.stride(3), 0 if a.numel() == 1 else a.stride(0), center.stride(0),
        MODE=interpolation, CH_CONTIG=ch_contig, OUT_CL=not y.is_contiguous(), FP16_MATH=variant == "fp16x2",
        SCALED=variant == "int8", BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps,
    )  # fmt: skip
    return y


# Explicit schema: the interpolation is a static int (the plugin's attribute), not a symbolic size.
@torch.library.custom_op(
    "bevdeploy::rotate",
    mutates_args=(),
    schema="(Tensor img, Tensor angle, Tensor center, int interpolation, str variant, float img_scale) -> Tensor",
)
def _rotate_op(img: Tensor, angle: Tensor, center: Tensor, interpolation: int, variant: str, img_scale: float) -> Tensor:
    if use_triton(img):
        return _rotate_triton(img, angle, center, interpolation, variant, img_scale)
    return _rotate_cpu(img, angle, center, interpolation, variant, img_scale)


@_rotate_op.register_fake
def _(img, angle, center, interpolation, variant, img_scale):
    _check_inputs(img, angle, center, interpolation, variant, img_scale)
    return _new_output(img, VARIANT_OUTPUT_DTYPE[variant])


register_reference_autograd(_rotate_op, _rotate_cpu)


def _device_scalars(img: Tensor, values: Sequence[float]) -> Tensor:
    """A small float32 tensor on img's device built with fill kernels, not a host-to-device copy
    (which a CUDA-graph capture refuses)."""
    t = img.new_full((len(values),), float(values[0]), dtype=torch.float32)
    for i, v in enumerate(values[1:], 1):
        if v != values[0]:
            t[i] = float(v)
    return t


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@bf16_as_float32
def rotate(
    img: Tensor,
    angle: float | Tensor,
    center: Sequence[float] | Tensor | None = None,
    interpolation: str = "nearest",
    *,
    variant: str | None = None,
    img_scale: float | None = None,
) -> Tensor:
    """Rotate images counter-clockwise about a centre, exactly as torchvision's
    ``rotate(img, angle, interpolation, expand=False, center=center)`` with zero fill.

    Args:
        img (Tensor[C, H, W] or Tensor[B, C, H, W]): float32, float16 or int8 (with ``img_scale``);
            any strides, fastest channels-last.
        angle (float or Tensor[] / Tensor[1] / Tensor[B]): degrees, counter-clockwise; a tensor
            stays on the device (no host sync), one angle for all images or one per image. A
            NaN/inf float is a ValueError; a NaN/inf in a tensor gives that image all NaN (as
            :func:`reference`), so a bad angle shows downstream instead of a blank image.
        center (sequence of 2 floats or Tensor[2], optional): (x, y) in pixels, the image centre
            being (W / 2, H / 2) (the default).
        interpolation (str): ``"nearest"`` (default) | ``"bilinear"``.
        variant (str, optional): ``"fp32"`` | ``"fp16"`` | ``"fp16x2"`` | ``"int8"``; None infers it
            from ``img.dtype``.
        img_scale (float, optional): per-tensor scale of an int8 ``img`` (value = q * scale).

    Returns:
        Tensor: same shape as ``img``, float32 for ``fp32`` else float16; channels-last when
        ``img`` is (``img.stride(-3) == 1``), else contiguous.

    Example:
        >>> x = torch.arange(9.0).view(1, 3, 3)
        >>> torch.equal(rotate(x, 90.0), torch.rot90(x, 1, dims=(-2, -1)))
        True
    """
    check_tensor("img", img, ndim=(3, 4))
    interpolation = getattr(interpolation, "value", interpolation)  # torchvision's InterpolationMode
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {tuple(INTERPOLATIONS)}, got {interpolation!r}")
    variant = resolve_variant(variant, img.dtype, "img")
    img_scale = check_int8_scale("img_scale", img_scale, variant)
    if _is_number(angle):
        if not math.isfinite(float(angle)):
            raise ValueError(f"angle must be a finite number of degrees, got {angle}")
        angle = _device_scalars(img, [angle])
    elif not isinstance(angle, Tensor):
        raise TypeError(f"angle must be a float or a Tensor, got {type(angle).__name__}")
    if center is None:
        center = (img.shape[-1] * 0.5, img.shape[-2] * 0.5)
    if not isinstance(center, Tensor):
        if not (isinstance(center, Sequence) and len(center) == 2 and all(_is_number(v) for v in center)):
            raise ValueError(f"center must be a Tensor [2] or a sequence (x, y) of two numbers, got {center!r}")
        center = _device_scalars(img, list(center))
    args = (img, angle, center, INTERPOLATIONS[interpolation], variant, img_scale)
    _check_inputs(*args)
    return _rotate_op(*args)


class Rotate(nn.Module):
    """See :func:`rotate`."""

    def __init__(self, center: Sequence[float] | None = None, interpolation: str = "nearest"):
        super().__init__()
        interpolation = getattr(interpolation, "value", interpolation)
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {tuple(INTERPOLATIONS)}, got {interpolation!r}")
        self.center = None if center is None else tuple(float(c) for c in center)
        self.interpolation = interpolation

    def forward(
        self, img: Tensor, angle: float | Tensor, *, variant: str | None = None, img_scale: float | None = None
    ) -> Tensor:
        return rotate(img, angle, self.center, self.interpolation, variant=variant, img_scale=img_scale)

    def extra_repr(self) -> str:
        return f"center={self.center}, interpolation={self.interpolation!r}"
