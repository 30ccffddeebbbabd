"""2-D grid sampling: ``torch.nn.functional.grid_sample`` (the reference system's ``GridSampler2DTRT``).

For every output pixel ``(n, h, w)`` the grid gives a location ``(x, y)`` in ``[-1, 1]`` (beyond it
for padding); it is unnormalised to input pixels,

    align_corners=True:   ix = (x + 1) / 2 * (W_in - 1)
    align_corners=False:  ix = ((x + 1) * W_in - 1) / 2

the padding mode maps it back inside the image (``border``: clip; ``reflection``: reflect about the
borders, then clip; ``zeros``: out-of-image taps read 0), and every channel is interpolated there:
``bilinear`` (4 taps), ``nearest`` (round half to even, as ``nearbyint`` in ATen) or ``bicubic``
(16 taps, Keys' kernel with A = -0.75, padding applied per tap). These are exactly ATen's formulas
(``aten/src/ATen/native/cuda/GridSampler.cuh``), including the out-of-range guard that sends
non-finite or huge coordinates to -100 (outside the image).

Shapes: ``input (Tensor[N, C, H_in, W_in])``, ``grid (Tensor[N, H_out, W_out, 2])`` ->
``Tensor[N, C, H_out, W_out]`` (contiguous, as ``F.grid_sample``).

Kernel: a program owns a block of output pixels x a block of channels. The grid is read and the
coordinates, taps and weights are computed once per pixel; each tap is then one gather of a channel
vector, which is a contiguous (vectorised) load when the input is channels-last (``stride_c == 1``,
e.g. ``x.contiguous(memory_format=torch.channels_last)``) and a per-channel gather coalesced along
the pixels otherwise. Any input strides work. Variants: ``fp32``; ``fp16`` (fp16 storage, fp32
math); ``fp16x2`` (tap multiply-accumulate in fp16, which the compiler pairs into HFMA2);
``int8`` (int8 input with a per-tensor scale, fp32 math, fp16 output). Coordinates are always
computed in fp32 from the grid (ATen computes them in the input's dtype, fp16 for half inputs).
The grid may be float32 or float16 for every variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevdeploy.ops._utils import (
    bf16_as_float32,
    VARIANT_OUTPUT_DTYPE,
    check_dim,
    check_int8_scale,
    check_same_device,
    check_tensor,
    interpreter_enabled,
    new_output,
    register_reference_autograd,
    resolve_variant,
    to_compute,
    triton_available,
    use_triton,
)

#: mode / padding names -> the reference plugin's integer attributes.
MODES = {"bilinear": 0, "nearest": 1, "bicubic": 2}
PADDINGS = {"zeros": 0, "border": 1, "reflection": 2}
_MODE_NAMES = {v: k for k, v in MODES.items()}
_PADDING_NAMES = {v: k for k, v in PADDINGS.items()}

_GRID_DTYPES = (torch.float32, torch.float16)
_INT32_MAX = 2**31 - 1


def _check_inputs(
    input: Tensor,
    grid: Tensor,
    interpolation_mode: int,
    padding_mode: int,
    align_corners: bool,
    variant: str,
    input_scale: float,
) -> None:
    check_tensor("input", input, shape=("N", "C", "H_in", "W_in"))
    resolve_variant(variant, input.dtype, "input")
    check_tensor("grid", grid, shape=("N", "H_out", "W_out", 2), dtypes=_GRID_DTYPES)
    check_dim("grid", grid.shape[0], input.shape[0], "the batch size N (dim 0)")
    check_same_device(input=input, grid=grid)
    if input.shape[2] == 0 or input.shape[3] == 0:
        raise ValueError(f"input must have non-empty spatial dims [N, C, H_in, W_in], got {list(input.shape)}")
    if interpolation_mode not in _MODE_NAMES:
        raise ValueError(f"interpolation_mode must be one of {MODES} (by value), got {interpolation_mode}")
    if padding_mode not in _PADDING_NAMES:
        raise ValueError(f"padding_mode must be one of {PADDINGS} (by value), got {padding_mode}")
    check_int8_scale("input_scale", input_scale, variant)


def reference(
    input: Tensor, grid: Tensor, mode: str = "bilinear", padding_mode: str = "zeros", align_corners: bool = False
) -> Tensor:
    """Plain PyTorch (CPU and GPU, differentiable; the test oracle): ``F.grid_sample`` in float32,
    or in float64 when ``input`` is float64. Dequantize an int8 input before calling it.

    Non-finite grid points give NaN in bilinear mode with zeros padding and in bicubic mode, on
    every device: ATen's CPU kernel does so (its weights come from the raw coordinate), its CUDA
    kernel reads 0 there instead; NaN is kept so a bad grid shows, and the kernel does the same.
    Nearest mode and the clamped paddings of bilinear sample a finite pixel, as ATen."""
    x = input if input.dtype == torch.float64 else input.float()
    out = F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    if mode == "bicubic" or (mode == "bilinear" and padding_mode == "zeros"):
        bad = ~torch.isfinite(grid).all(-1)  # [N, Hout, Wout]
        out = out.masked_fill(bad.unsqueeze(1), float("nan"))
    return out


def _grid_sample_cpu(
    input: Tensor,
    grid: Tensor,
    interpolation_mode: int,
    padding_mode: int,
    align_corners: bool,
    variant: str,
    input_scale: float,
) -> Tensor:
    """The op's math without Triton: the reference on the variant's dequantized input, cast to its output dtype."""
    x = to_compute(input, variant, input_scale)
    out = reference(x, grid, _MODE_NAMES[interpolation_mode], _PADDING_NAMES[padding_mode], align_corners)
    return out.to(VARIANT_OUTPUT_DTYPE[variant]).contiguous()


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_config(
    C: int, P: int, batch: int, ch_contig: bool, elem_bytes: int, mode: int, device: torch.device
) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, num_warps) for a [BLOCK_C channels x BLOCK_P pixels] tile per program.

    Channels-last inputs get wide channel blocks (16-byte vector loads, a whole C-vector per tap);
    channels-first inputs get wide pixel blocks (lanes along pixels, so gathers of neighbouring
    pixels coalesce). Tiles hold fewer elements the more taps a mode reads, to keep the loads of
    all taps in registers. The pixel block shrinks until there are ~4 programs per SM (132 SMs).
    Under the interpreter (CPU tensors) the fewest, largest programs run fastest.
    """
    if device.type != "cuda":
        block_c = min(_pow2(C), 64)
        return block_c, min(_pow2(P), max(16, 4096 // block_c)), 4
    tile = {0: 2048, 1: 4096, 2: 1024}[mode]
    if ch_contig:
        block_c = min(_pow2(C), 128 if elem_bytes <= 2 else 64)
    else:
        block_c = min(_pow2(C), 8)
    block_p = max(16, tile // block_c)
    n_c = _cdiv(C, block_c)
    while block_p > 16 and batch * n_c * _cdiv(P, block_p) < 4 * 132:
        block_p //= 2
    block_p = max(16, min(block_p, _pow2(P)))
    elems = block_c * block_p
    num_warps = 4 if elems >= 1024 else 2 if elems >= 256 else 1
    return block_c, block_p, num_warps


def _check_int32_offsets(x: Tensor, out_numel_per_image: int) -> None:
    """Kernels index within one image in int32 (the batch offset is int64)."""
    span = sum((s - 1) * abs(st) for s, st in zip(x.shape[1:], x.stride()[1:]))
    if span > _INT32_MAX or out_numel_per_image > _INT32_MAX:
        raise NotImplementedError(
            f"one image of the input spans {span} elements and of the output {out_numel_per_image}; "
            f"the kernels index within an image in int32 (max {_INT32_MAX})"
        )


if triton_available():
    import triton
    import triton.language as tl

    # Inline PTX exists only on NVIDIA GPUs; the interpreter (CPU) runs the same math in numpy.
    _HFMA2_ASM = tl.constexpr(not interpreter_enabled())

    # ----------------------------------------------------------------- shared sampling helpers
    # rotate.py imports these: its kernel computes the source coordinates from an angle instead
    # of reading them from a grid, then samples with the same code.

    @triton.jit
    def _unnormalize(coord, size, ALIGN: tl.constexpr):
        """[-1, 1] -> input pixels (ATen's grid_sampler_unnormalize)."""
        if ALIGN:
            return (coord + 1.0) * 0.5 * (size - 1).to(tl.float32)
        else:
            return ((coord + 1.0) * size.to(tl.float32) - 1.0) * 0.5

    @triton.jit
    def _reflect(coord, twice_low, twice_high):
        """ATen's reflect_coordinates: reflect about [low, high] until inside (bounds given doubled)."""
        low = twice_low * 0.5
        span = (twice_high - twice_low) * 0.5
        span_safe = tl.where(span > 0, span, 1.0)
        c = tl.abs(coord - low)
        extra = c % span_safe
        flips = tl.floor(c / span_safe)
        odd = flips - 2.0 * tl.floor(flips * 0.5)
        out = tl.where(odd == 0.0, extra + low, span - extra + low)
        return tl.where(span > 0, out, 0.0)

    @triton.jit
    def _source_coord(coord, size, PADDING: tl.constexpr, ALIGN: tl.constexpr):
        """ATen's compute_coordinates: padding (0 zeros, 1 border, 2 reflection), then the range guard."""
        hi = (size - 1).to(tl.float32)
        if PADDING == 1:
            coord = tl.minimum(tl.maximum(coord, 0.0), hi)
        elif PADDING == 2:
            if ALIGN:
                coord = _reflect(coord, 0, 2 * (size - 1))
            else:
                coord = _reflect(coord, -1, 2 * size - 1)
            coord = tl.minimum(tl.maximum(coord, 0.0), hi)
        # ATen maps NaN/inf/huge to -100 (outside the image); 2^30 also keeps int32 tap math exact.
        bad = (coord != coord) | (tl.abs(coord) > 1073741824.0)
        return tl.where(bad, -100.0, coord)

    @triton.jit
    def _round_half_even(x):
        """nearbyint under the default rounding mode, as ATen's nearest mode."""
        f = tl.floor(x)
        d = x - f
        odd = f - 2.0 * tl.floor(f * 0.5)
        up = (d > 0.5) | ((d == 0.5) & (odd == 1.0))
        return tl.where(up, f + 1.0, f)

    @triton.jit
    def _gather(img_ptr, c_off, cmask, xi, yi, pmask, H, W, stride_h, stride_w):
        """One tap: the [BLOCK_C, BLOCK_P] channel vectors at integer pixels (xi, yi); 0 outside."""
        ok = pmask & (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
        # No tl.where(ok, off, 0) here: a select hides the offsets' divisibility from Triton and
        # turns the 16-byte channel-vector loads into scalar ones; masked lanes are never read.
        off = yi * stride_h + xi * stride_w
        return tl.load(img_ptr + c_off + off[None, :], mask=cmask & ok[None, :], other=0.0)

    @triton.jit
    def _fma(acc, v, w, FP16_MATH: tl.constexpr):
        """acc + v * w[None, :]; FP16_MATH: in fp16, as paired fma.rn.f16x2 (HFMA2) on the GPU."""
        if FP16_MATH:
            if _HFMA2_ASM:
                # LLVM pairs the multiplies but leaves the adds scalar; inline PTX pairs both.
                return tl.inline_asm_elementwise(
                    "fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r",
                    [v.to(tl.float16), w.to(tl.float16)[None, :], acc], dtype=tl.float16, is_pure=True, pack=2,
                )
            else:
                return acc + v.to(tl.float16) * w.to(tl.float16)[None, :]
        else:
            return acc + v.to(tl.float32) * w[None, :]

    @triton.jit
    def _cubic1(x):  # |x| <= 1, A = -0.75
        return ((-0.75 + 2.0) * x - (-0.75 + 3.0)) * x * x + 1.0

    @triton.jit
    def _cubic2(x):  # 1 < |x| < 2, A = -0.75
        return ((-0.75 * x - 5.0 * -0.75) * x + 8.0 * -0.75) * x - 4.0 * -0.75

    @triton.jit
    def _cubic_row(img_ptr, c_off, cmask, x0, x1, x2, x3, yi, pmask, H, W, stride_h, stride_w,
                   w0, w1, w2, w3, FP16_MATH: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        if FP16_MATH:
            row = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float16)
        else:
            row = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        row = _fma(row, _gather(img_ptr, c_off, cmask, x0, yi, pmask, H, W, stride_h, stride_w), w0, FP16_MATH)
        row = _fma(row, _gather(img_ptr, c_off, cmask, x1, yi, pmask, H, W, stride_h, stride_w), w1, FP16_MATH)
        row = _fma(row, _gather(img_ptr, c_off, cmask, x2, yi, pmask, H, W, stride_h, stride_w), w2, FP16_MATH)
        row = _fma(row, _gather(img_ptr, c_off, cmask, x3, yi, pmask, H, W, stride_h, stride_w), w3, FP16_MATH)
        return row

    @triton.jit
    def _sample_tile(
        img_ptr,  # this image's base pointer
        c_off,  # [BLOCK_C, 1] channel offsets (elements)
        cmask,  # [BLOCK_C, 1]
        ix,  # [BLOCK_P] fp32 source x in input pixels (unnormalised, before padding)
        iy,  # [BLOCK_P]
        pmask,  # [BLOCK_P]
        H,
        W,
        stride_h,
        stride_w,
        MODE: tl.constexpr,  # 0 bilinear, 1 nearest, 2 bicubic
        PADDING: tl.constexpr,  # 0 zeros, 1 border, 2 reflection
        ALIGN: tl.constexpr,
        FP16_MATH: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """Interpolate all channels of a block of pixels; ATen's per-mode formulas, taps in its order."""
        if FP16_MATH:
            acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float16)
        else:
            acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        if MODE == 0:
            sx = _source_coord(ix, W, PADDING, ALIGN)
            sy = _source_coord(iy, H, PADDING, ALIGN)
            fx = tl.floor(sx)
            fy = tl.floor(sy)
            x0 = fx.to(tl.int32)
            y0 = fy.to(tl.int32)
            wx1 = sx - fx
            wx0 = (fx + 1.0) - sx
            wy1 = sy - fy
            wy0 = (fy + 1.0) - sy
            acc = _fma(acc, _gather(img_ptr, c_off, cmask, x0, y0, pmask, H, W, stride_h, stride_w), wx0 * wy0, FP16_MATH)
            acc = _fma(acc, _gather(img_ptr, c_off, cmask, x0 + 1, y0, pmask, H, W, stride_h, stride_w), wx1 * wy0, FP16_MATH)
            acc = _fma(acc, _gather(img_ptr, c_off, cmask, x0, y0 + 1, pmask, H, W, stride_h, stride_w), wx0 * wy1, FP16_MATH)
            acc = _fma(acc, _gather(img_ptr, c_off, cmask, x0 + 1, y0 + 1, pmask, H, W, stride_h, stride_w), wx1 * wy1, FP16_MATH)
            if PADDING == 0:
                # ATen's bilinear-zeros weights come from the raw coordinate: NaN/inf there gives NaN out
                bad = (ix != ix) | (iy != iy) | (tl.abs(ix) == float("inf")) | (tl.abs(iy) == float("inf"))
                acc = tl.where(bad[None, :], float("nan"), acc)
        elif MODE == 1:
            xi = _round_half_even(_source_coord(ix, W, PADDING, ALIGN)).to(tl.int32)
            yi = _round_half_even(_source_coord(iy, H, PADDING, ALIGN)).to(tl.int32)
            acc += _gather(img_ptr, c_off, cmask, xi, yi, pmask, H, W, stride_h, stride_w).to(acc.dtype)
        else:
            # Taps at floor(i) - 1 .. floor(i) + 2 of the raw coordinate; padding per tap (ATen).
            fx = tl.floor(ix)
            fy = tl.floor(iy)
            tx = ix - fx
            ty = iy - fy
            x0 = _source_coord(fx - 1.0, W, PADDING, ALIGN).to(tl.int32)
            x1 = _source_coord(fx, W, PADDING, ALIGN).to(tl.int32)
            x2 = _source_coord(fx + 1.0, W, PADDING, ALIGN).to(tl.int32)
            x3 = _source_coord(fx + 2.0, W, PADDING, ALIGN).to(tl.int32)
            wx0 = _cubic2(tx + 1.0)
            wx1 = _cubic1(tx)
            wx2 = _cubic1(1.0 - tx)
            wx3 = _cubic2((1.0 - tx) + 1.0)
            wy0 = _cubic2(ty + 1.0)
            wy1 = _cubic1(ty)
            wy2 = _cubic1(1.0 - ty)
            wy3 = _cubic2((1.0 - ty) + 1.0)
            y = _source_coord(fy - 1.0, H, PADDING, ALIGN).to(tl.int32)
            row = _cubic_row(img_ptr, c_off, cmask, x0, x1, x2, x3, y, pmask, H, W, stride_h, stride_w,
                             wx0, wx1, wx2, wx3, FP16_MATH, BLOCK_C, BLOCK_P)
            acc = _fma(acc, row, wy0, FP16_MATH)
            y = _source_coord(fy, H, PADDING, ALIGN).to(tl.int32)
            row = _cubic_row(img_ptr, c_off, cmask, x0, x1, x2, x3, y, pmask, H, W, stride_h, stride_w,
                             wx0, wx1, wx2, wx3, FP16_MATH, BLOCK_C, BLOCK_P)
            acc = _fma(acc, row, wy1, FP16_MATH)
            y = _source_coord(fy + 1.0, H, PADDING, ALIGN).to(tl.int32)
            row = _cubic_row(img_ptr, c_off, cmask, x0, x1, x2, x3, y, pmask, H, W, stride_h, stride_w,
                             wx0, wx1, wx2, wx3, FP16_MATH, BLOCK_C, BLOCK_P)
            acc = _fma(acc, row, wy2, FP16_MATH)
            y = _source_coord(fy + 2.0, H, PADDING, ALIGN).to(tl.int32)
            row = _cubic_row(img_ptr, c_off, cmask, x0, x1, x2, x3, y, pmask, H, W, stride_h, stride_w,
                             wx0, wx1, wx2, wx3, FP16_MATH, BLOCK_C, BLOCK_P)
            acc = _fma(acc, row, wy3, FP16_MATH)
        return acc

    # ------------------------------------------------------------------------------ kernel

    # Sizes are never specialised: Triton would turn a size of 1 into a constexpr.
    @triton.jit(do_not_specialize=["H_in", "W_in"])
    def _grid_sample_fwd_kernel(
        # pointers
        x_ptr,
        grid_ptr,
        y_ptr,
        # sizes
        C,
        H_in,
        W_in,
        W_out,
        P_out,
        num_cblocks,
        num_pblocks,
        scale,
        # strides (elements)
        stride_xn,
        stride_xc,
        stride_xh,
        stride_xw,
        stride_gn,
        stride_gh,
        stride_gw,
        stride_gk,
        # constexpr
        MODE: tl.constexpr,
        PADDING: tl.constexpr,
        ALIGN: tl.constexpr,
        CH_CONTIG: tl.constexpr,
        FP16_MATH: tl.constexpr,
        SCALED: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """y[n, c, p] = sum_taps w_tap(grid[n, p]) * x[n, c, tap]; channel blocks vary fastest over
        program ids, so neighbouring programs share the grid reads and the input rows in L2."""
        pid = tl.program_id(0)
        pid_c = pid % num_cblocks
        pid_np = pid // num_cblocks
        pid_p = pid_np % num_pblocks
        n = (pid_np // num_pblocks).to(tl.int64)

        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < P_out
        oh = p // W_out
        ow = p - oh * W_out
        g_ptrs = grid_ptr + n * stride_gn + oh * stride_gh + ow * stride_gw
        gx = tl.load(g_ptrs, mask=pmask, other=0.0).to(tl.float32)
        gy = tl.load(g_ptrs + stride_gk, mask=pmask, other=0.0).to(tl.float32)
        ix = _unnormalize(gx, W_in, ALIGN)
        iy = _unnormalize(gy, H_in, ALIGN)

        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = (c < C)[:, None]
        if CH_CONTIG:
            c_off = c[:, None]  # unit stride known at compile time: vector loads along C
        else:
            c_off = c[:, None] * stride_xc
        acc = _sample_tile(x_ptr + n * stride_xn, c_off, cmask, ix, iy, pmask, H_in, W_in, stride_xh, stride_xw,
                           MODE, PADDING, ALIGN, FP16_MATH, BLOCK_C, BLOCK_P)
        if SCALED:
            acc = acc.to(tl.float32) * scale
        y_img = y_ptr + n * C * P_out
        tl.store(y_img + c[:, None] * P_out + p[None, :], acc.to(y_ptr.dtype.element_ty), mask=cmask & pmask[None, :])


def _grid_sample_triton(
    input: Tensor,
    grid: Tensor,
    interpolation_mode: int,
    padding_mode: int,
    align_corners: bool,
    variant: str,
    input_scale: float,
    out: Tensor | None = None,
) -> Tensor:
    """Launch the kernel (no host sync); ``out`` lets tests poison the output."""
    N, C, H_in, W_in = input.shape
    _, H_out, W_out, _ = grid.shape
    y = new_output((N, C, H_out, W_out), variant, input.device, out)
    P = H_out * W_out
    if y.numel() == 0:
        return y
    _check_int32_offsets(input, C * P)
    ch_contig = C > 1 and input.stride(1) == 1
    block_c, block_p, num_warps = _launch_config(
        C, P, N, ch_contig, input.element_size(), interpolation_mode, input.device
    )
    num_cblocks = _cdiv(C, block_c)
    num_pblocks = _cdiv(P, block_p)
    _grid_sample_fwd_kernel[(N * num_pblocks * num_cblocks,)](
        input, grid, y,
        C, H_in, W_in, W_out, P, num_cblocks, num_pblocks, float(input_scale),
        input.stride(0), input.stride(1), input.stride(2), input.stride(3),
        grid.stride(0), grid.stride(1), grid.stride(2), grid.stride(3),
        MODE=interpolation_mode, PADDING=padding_mode, ALIGN=bool(align_corners), CH_CONTIG=ch_contig,
        FP16_MATH=variant == "fp16x2", SCALED=variant == "int8", BLOCK_C=block_c, BLOCK_P=block_p,
        num_warps=num_warps,
    )  # fmt: skip
    return y


# Explicit schema: the modes are static ints (the plugin's attributes), not symbolic sizes.
@torch.library.custom_op(
    "bevdeploy::grid_sample",
    mutates_args=(),
    schema="(Tensor input, Tensor grid, int interpolation_mode, int padding_mode, bool align_corners, str variant, "
    "float input_scale) -> Tensor",
)
def _grid_sample_op(
    input: Tensor,
    grid: Tensor,
    interpolation_mode: int,
    padding_mode: int,
    align_corners: bool,
    variant: str,
    input_scale: float,
) -> Tensor:
    if use_triton(input):
        return _grid_sample_triton(input, grid, interpolation_mode, padding_mode, align_corners, variant, input_scale)
    return _grid_sample_cpu(input, grid, interpolation_mode, padding_mode, align_corners, variant, input_scale)


@_grid_sample_op.register_fake
def _(input, grid, interpolation_mode, padding_mode, align_corners, variant, input_scale):
    _check_inputs(input, grid, interpolation_mode, padding_mode, align_corners, variant, input_scale)
    N, C = input.shape[:2]
    return input.new_empty((N, C, grid.shape[1], grid.shape[2]), dtype=VARIANT_OUTPUT_DTYPE[variant])


register_reference_autograd(_grid_sample_op, _grid_sample_cpu)


@bf16_as_float32
def grid_sample(
    input: Tensor,
    grid: Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
    *,
    variant: str | None = None,
    input_scale: float | None = None,
) -> Tensor:
    """Sample ``input`` at the grid's locations, exactly as ``torch.nn.functional.grid_sample``.

    Args:
        input (Tensor[N, C, H_in, W_in]): float32, float16 or int8 (with ``input_scale``); any
            strides, fastest channels-last.
        grid (Tensor[N, H_out, W_out, 2]): float32 or float16 locations (x, y), [-1, 1] spans the
            input (values beyond it are handled by ``padding_mode``).
        mode (str): ``"bilinear"`` | ``"nearest"`` | ``"bicubic"``. Default ``"bilinear"``.
        padding_mode (str): ``"zeros"`` | ``"border"`` | ``"reflection"``. Default ``"zeros"``.
        align_corners (bool): -1 and 1 are the centres (True) or the outer edges (False) of the
            corner pixels. Default False.
        variant (str, optional): ``"fp32"`` | ``"fp16"`` | ``"fp16x2"`` | ``"int8"``; None infers it
            from ``input.dtype`` (float16 -> ``"fp16"``).
        input_scale (float, optional): per-tensor scale of an int8 ``input`` (value = q * scale).

    Returns:
        Tensor[N, C, H_out, W_out]: contiguous; float32 for ``fp32``, float16 otherwise.

    Example:
        >>> x = torch.arange(16.0).view(1, 1, 4, 4)
        >>> theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
        >>> g = F.affine_grid(theta, (1, 1, 4, 4), align_corners=False)
        >>> torch.equal(grid_sample(x, g), x)
        True
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    if padding_mode not in PADDINGS:
        raise ValueError(f"padding_mode must be one of {tuple(PADDINGS)}, got {padding_mode!r}")
    check_tensor("input", input, shape=("N", "C", "H_in", "W_in"))
    variant = resolve_variant(variant, input.dtype, "input")
    input_scale = check_int8_scale("input_scale", input_scale, variant)
    args = (input, grid, MODES[mode], PADDINGS[padding_mode], bool(align_corners), variant, input_scale)
    _check_inputs(*args)
    return _grid_sample_op(*args)


class GridSample(nn.Module):
    """See :func:`grid_sample`."""

    def __init__(self, mode: str = "bilinear", padding_mode: str = "zeros", align_corners: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
        if padding_mode not in PADDINGS:
            raise ValueError(f"padding_mode must be one of {tuple(PADDINGS)}, got {padding_mode!r}")
        self.mode = mode
        self.padding_mode = padding_mode
        self.align_corners = bool(align_corners)

    def forward(
        self, input: Tensor, grid: Tensor, *, variant: str | None = None, input_scale: float | None = None
    ) -> Tensor:
        return grid_sample(
            input, grid, self.mode, self.padding_mode, self.align_corners, variant=variant, input_scale=input_scale
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, padding_mode={self.padding_mode!r}, align_corners={self.align_corners}"
