"""FP8 (e4m3) execution kernels: per-tensor activation quantization, fp8 linear, fp8 implicit-GEMM conv2d.

Math (e4m3 = ``torch.float8_e4m3fn``: 4 exponent bits, 3 mantissa bits, finite range +-448, no inf;
per-tensor activation scale ``s_x = amax / 448``, per-output-channel weight scale ``s_w[n] = amax_n / 448``)::

    quantize_fp8(x, s)[i] = e4m3_rne(clamp(x[i] / s, -448, 448))          (NaN stays NaN)
    fp8_linear:  y[m, n] = act( s_x * s_w[n] * sum_k x_q[m, k] * w_q[n, k] + bias[n] + residual[m, n] )
    fp8_conv2d:  y[b, o, ho, wo] = act( s_x * s_w[o] * sum_{i, j, c} x_q[b, c, hi, wi] * w_q[o, i, j, c]
                                        + bias[o] + residual[b, o, ho, wo] )

The clamp comes before the cast because torch builds disagree on what an out-of-range cast gives
(saturation on some, NaN on others); clamping makes every path saturate at +-448. A product of two
e4m3 values has at most 8 significant bits, so it is exact in fp32 and the sums run in fp32 (the
tensor cores' fp8 accumulate); everything after the sum (dequantization, bias, residual, activation,
cast) is fp32 and, in the Triton kernels, fused into the epilogue. Output fp16 (default) or fp32.

Kernels, by layer (CUDA):

* ``fp8_linear`` and 1x1 / stride-1 / unpadded ``fp8_conv2d`` (a GEMM on the NHWC view): through
  ``torch._scaled_mm`` (cuBLASLt, measured 1437 TFLOP/s at 8192^3 on the H100) when its layout rules
  hold: A = x_q [M, K] row-major, B = w_q.T column-major (w_q [N, K] contiguous), K and N multiples
  of 16, 16-byte aligned pointers; per-tensor scale of A given as a per-row [M, 1] vector and the
  per-channel weight scales as a per-column [1, N] vector (row-wise scaling; where the torch build
  refuses it for the requested output dtype, per-tensor scaling with an fp32 output and the
  per-channel scales in the epilogue). Bias, residual and activation then run as torch ops on the
  output. Otherwise (or with ``GEMM_BACKEND = "triton"``) the Triton GEMM below, epilogue fused.
* ``fp8_conv2d`` otherwise: Triton implicit GEMM on NHWC activations and [O, kh, kw, C] weights
  (both K-contiguous, what Hopper's fp8 wgmma reads), fp8 ``tl.dot`` with an fp32 accumulator, the
  epilogue fused; output [N, O, Ho, Wo] in channels-last memory.

CPU: the GEMM kernels run through Triton's interpreter when ``TRITON_INTERPRET=1`` (its fp8 ``tl.dot``
is exact), else the plain-PyTorch references below (the codes cast to fp32 and multiplied in fp32:
the same numbers up to summation order). ``quantize_fp8`` always uses torch's cast on the CPU: the
interpreter's fp32 -> e4m3 conversion rounds wrongly at binade edges (-1.95 -> -1) and flushes
subnormals, so its Triton kernel is GPU-only.

Origin: the tiling and grouped program order follow Triton's matrix-multiplication tutorial, the
implicit-GEMM walk CUTLASS's analytic conv iterators (as this package's int8 kernels). Inference only.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from bevdeploy.ops._utils import check_dim, check_same_device, check_tensor, triton_available, use_triton
from bevdeploy.quant.int8_kernels import _ACT_CODE, ACTIVATIONS  # one list: the epilogues share their codes

__all__ = [
    "ACTIVATIONS",
    "FP8_DTYPE",
    "FP8_MAX",
    "GEMM_BACKEND",
    "fp8_conv2d",
    "fp8_linear",
    "quantize_fp8",
    "quantize_weight_fp8",
    "reference_fp8_conv2d",
    "reference_fp8_linear",
    "reference_quantize_fp8",
    "scaled_mm_eligible",
]

#: Storage type of the codes (OCP e4m3, finite-only: its largest value is 448).
FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite e4m3 value: scale = amax / FP8_MAX.
FP8_MAX = 448.0
OUT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_DTYPE_NAME = {v: k for k, v in OUT_DTYPES.items()}
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_MAX_I32 = 2**31 - 1

#: Linears and 1x1 convs on CUDA: ``"scaled_mm"`` (cuBLASLt where its layout rules hold, else Triton)
#: or ``"triton"`` (always the Triton GEMM with the fused epilogue). Read at call time.
GEMM_BACKEND = "scaled_mm"

#: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
Config = tuple[int, int, int, int, int, int]


# ----------------------------------------------------------------------------------------------
# input checks (shared by the public functions and the fakes)


def _check_scale(name: str, scale: object) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name} must be a python float (a calibrated per-tensor scale), got {type(scale).__name__}")
    scale = float(scale)
    if not (0.0 < scale < math.inf):
        raise ValueError(f"{name} must be a positive finite float, got {scale}")
    return scale


def _check_epilogue(n: int, w_scale, bias, residual, res_shape, activation, out_dtype) -> None:
    check_tensor("w_scale", w_scale, shape=(n,), dtypes=(torch.float32,))
    if bias is not None:
        check_tensor("bias", bias, shape=(n,), dtypes=_FLOAT)
    if residual is not None:
        check_tensor("residual", residual, dtypes=_FLOAT)
        if tuple(residual.shape) != tuple(res_shape):
            raise ValueError(f"residual must have the output's shape {list(res_shape)}, got {list(residual.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {tuple(OUT_DTYPES)} (torch.float16 / torch.float32), "
                         f"got {out_dtype!r}")


def _check_quantize(x: Tensor, scale: float) -> None:
    check_tensor("x", x, dtypes=_FLOAT)
    _check_scale("scale", scale)


def _check_linear(x_q, w_q, x_scale, w_scale, bias, residual, activation, out_dtype) -> list[int]:
    check_tensor("x_q", x_q, dtypes=(FP8_DTYPE,))
    if x_q.dim() < 1:
        raise ValueError(f"x_q must have shape [..., K] (at least 1-D), got {list(x_q.shape)}")
    check_tensor("w_q", w_q, shape=("N", "K"), dtypes=(FP8_DTYPE,))
    check_dim("w_q", w_q.shape[1], x_q.shape[-1], "K (in_features, the last dim of x_q)")
    _check_scale("x_scale", x_scale)
    out_shape = [*x_q.shape[:-1], w_q.shape[0]]
    _check_epilogue(w_q.shape[0], w_scale, bias, residual, out_shape, activation, out_dtype)
    check_same_device(x_q=x_q, w_q=w_q, w_scale=w_scale, bias=bias, residual=residual)
    return out_shape


def _conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _check_conv(x_q, w_q, x_scale, w_scale, bias, stride, padding, dilation, groups, residual, activation,
                out_dtype) -> list[int]:
    if groups != 1:
        raise NotImplementedError(f"fp8_conv2d supports groups=1 only, got {groups=} (keep grouped convs float)")
    check_tensor("x_q", x_q, shape=("N", "C", "H", "W"), dtypes=(FP8_DTYPE,))
    check_tensor("w_q", w_q, shape=("O", "kh", "kw", "C"), dtypes=(FP8_DTYPE,))
    check_dim("w_q", w_q.shape[3], x_q.shape[1], "C (dim 3 of the [O, kh, kw, C] weight = input channels)")
    for name, v, lo in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(v) != 2 or any(int(e) < lo for e in v):
            raise ValueError(f"{name} must be 2 ints >= {lo}, got {list(v)}")
    _check_scale("x_scale", x_scale)
    n, _, h, w = x_q.shape
    o, kh, kw, _ = w_q.shape
    ho = _conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    wo = _conv_out_size(w, kw, stride[1], padding[1], dilation[1])
    if ho < 1 or wo < 1:
        raise ValueError(f"x_q: input {h}x{w} is smaller than the dilated kernel with this padding "
                         f"(output would be {ho}x{wo})")
    out_shape = [n, o, ho, wo]
    _check_epilogue(o, w_scale, bias, residual, out_shape, activation, out_dtype)
    check_same_device(x_q=x_q, w_q=w_q, w_scale=w_scale, bias=bias, residual=residual)
    return out_shape


# ----------------------------------------------------------------------------------------------
# plain-PyTorch references (the CPU path without Triton's interpreter; CPU and GPU)


def _act(y: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return torch.relu(y)
    if activation == "silu":
        return F.silu(y)
    return y


def reference_quantize_fp8(x: Tensor, scale: float) -> Tensor:
    """``e4m3(clamp(fp32(x) / scale, -448, 448))`` with torch's round-to-nearest-even cast, memory format kept.

    Plain torch ops, so a compiler fuses them into the kernel that produces ``x``: the fp8 modules
    use this form inside engines. NaN stays NaN (clamp passes it; e4m3fn has a NaN code).
    """
    return torch.clamp(x.float() / float(scale), -FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_weight_fp8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel (dim 0) e4m3 weights: ``scale = amax / 448`` (1 for an all-zero channel).

    Args:
        weight (Tensor[O, ...]): float weight.

    Returns:
        (Tensor[O, ...] float8_e4m3fn codes, Tensor[O] float32 scales), ``weight ~= codes * scale``
        broadcast over dim 0; the largest |w| of each channel maps to exactly 448.
    """
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("weight holds NaN or inf: nothing sensible to quantize")
    amax = w.abs().reshape(w.shape[0], -1).amax(dim=1) if w.numel() else w.new_zeros(w.shape[0])
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = torch.clamp(w / scale.view(-1, *([1] * (w.dim() - 1))), -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.contiguous()


def reference_fp8_linear(x_q, w_q, x_scale, w_scale, bias=None, residual=None, activation="none",
                         out_dtype="float16") -> Tensor:
    """The e4m3 codes multiplied in fp32 (each product exact), dequantized, epilogue in fp32."""
    acc = x_q.float() @ w_q.float().t()
    y = acc * (x_scale * w_scale)
    if bias is not None:
        y = y + bias.float()
    if residual is not None:
        y = y + residual.float()
    return _act(y, activation).to(OUT_DTYPES[out_dtype])


def reference_fp8_conv2d(x_q, w_q, x_scale, w_scale, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                         groups=1, residual=None, activation="none", out_dtype="float16") -> Tensor:
    """F.conv2d on the e4m3 codes in fp32, epilogue in fp32, channels-last output."""
    acc = F.conv2d(x_q.float(), w_q.permute(0, 3, 1, 2).float(), None, list(stride), list(padding), list(dilation))
    y = acc * (x_scale * w_scale)[None, :, None, None]
    if bias is not None:
        y = y + bias.float()[None, :, None, None]
    if residual is not None:
        y = y + residual.float()
    y = _act(y, activation).to(OUT_DTYPES[out_dtype])
    return y.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------
# launch configurations


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _p2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def gemm_config(m: int, n: int, k: int, device: torch.device) -> Config:
    """Launch heuristic of both Triton kernels; ``k`` is the contiguous K run (K for the linear, C for a conv).

    CUDA: 128 x 256 x 128 tiles, 8 warps, 3 stages (fp8 operand tiles are 48 KiB a stage, as int8's;
    the measured best Triton fp8 configs were of this family, 920 TFLOP/s at 8192^3), BLOCK_N down
    to 128 when the last wave would be mostly empty, smaller tiles until every SM has one. fp8 wgmma
    consumes K in steps of 32, so BLOCK_K >= 32. Interpreter: 32 x 32 x 32 tiles, so tiny odd test
    shapes still cover several tiles and the masked K tail.
    """
    if device.type != "cuda":
        return (32, 32, 32, 4, 4, 1)
    bk = next((b for b in (128, 64, 32) if k % b == 0), min(128, max(32, _p2(k))))
    bn = min(256, max(32, _p2(n)))
    bm = 128
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())

    def tiles(bm_, bn_):
        return -(-m // bm_) * -(-n // bn_)

    def efficiency(bn_):
        return tiles(bm, bn_) / (-(-tiles(bm, bn_) // sms) * sms)

    if bn == 256 and efficiency(128) > efficiency(256) + 0.1:
        bn = 128
    if tiles(bm, bn) < sms:
        bm = 64
        while tiles(bm, bn) < sms and bn > 64:
            bn //= 2
    warps = 8 if bm * bn >= 128 * 128 else 4
    stages = 3 if (bm, bn) == (128, 256) else max(2, min(4, (96 * 1024) // ((bm + bn) * bk)))
    return (bm, bn, bk, 8, warps, stages)


def scaled_mm_eligible(m: int, n: int, k: int, x2: Tensor, w_q: Tensor) -> bool:
    """Whether ``torch._scaled_mm`` takes this GEMM: CUDA, K and N multiples of 16, A [M, K] row-major
    and w_q [N, K] contiguous (so w_q.T is column-major), 16-byte aligned base pointers."""
    return (x2.device.type == "cuda" and m > 0 and k % 16 == 0 and n % 16 == 0 and x2.stride(1) == 1
            and x2.stride(0) % 16 == 0 and w_q.is_contiguous() and x2.data_ptr() % 16 == 0
            and w_q.data_ptr() % 16 == 0)


# ----------------------------------------------------------------------------------------------
# Triton kernels

if triton_available():
    import triton
    import triton.language as tl

    from bevdeploy.quant.gemm_tiles import conv_tile_pixels as _conv_tile_pixels
    from bevdeploy.quant.gemm_tiles import gemm_tile as _gemm_tile
    from bevdeploy.quant.gemm_tiles import program_tile as _program_tile

    @triton.jit
    def _quantize_fp8_kernel(
        # pointers
        x_ptr,  # dense float input (y has the same strides)
        y_ptr,  # float8e4nv output
        # sizes
        n,
        scale,
        # constexpr
        BLOCK: tl.constexpr,
    ):
        """y = e4m3_rne(clamp(x / scale, -448, 448)); IEEE division (``div_rn``) so codes match torch's.
        GPU only (see the module docstring). tl.minimum / tl.maximum need not propagate NaN
        (propagate_nan defaults to NONE), so NaN is put back explicitly: it must never become +-448."""
        base = tl.program_id(0).to(tl.int64) * BLOCK
        offs = tl.arange(0, BLOCK)
        mask = offs < n - base
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x, scale)
        c = tl.minimum(tl.maximum(v, -448.0), 448.0)
        c = tl.where(v != v, v, c)
        tl.store(y_ptr + base + offs, c.to(tl.float8e4nv), mask=mask)

    @triton.jit
    def _epilogue(
        acc, offs_m, offs_n, M, N, x_scale,
        ws_ptr, b_ptr, r_ptr, y_ptr,
        stride_rm, stride_rn, stride_ym, stride_yn,
        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    ):  # fmt: skip
        """out = act(acc * x_scale * w_scale[n] + bias[n] + residual[m, n]) in fp32, cast on store."""
        n_mask = offs_n < N
        mask = (offs_m[:, None] < M) & n_mask[None, :]
        ws = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
        out = acc * (ws * x_scale)[None, :]
        if HAS_BIAS:
            out = out + tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        rows = offs_m.to(tl.int64)
        if HAS_RESIDUAL:
            r_ptrs = r_ptr + rows[:, None] * stride_rm + offs_n[None, :] * stride_rn
            out = out + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        if ACTIVATION == 1:
            out = tl.maximum(out, 0.0)
        elif ACTIVATION == 2:
            out = out * tl.sigmoid(out)
        y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fp8_linear_kernel(
        # pointers
        x_ptr,  # x_q [M, K] e4m3, K-contiguous
        w_ptr,  # w_q [N, K] e4m3, K-contiguous
        ws_ptr,  # w_scale [N] fp32
        b_ptr,  # bias [N] (unused unless HAS_BIAS)
        r_ptr,  # residual [M, N] (unused unless HAS_RESIDUAL)
        y_ptr,  # out [M, N] fp16 / fp32
        # sizes
        M,
        N,
        K,
        x_scale,
        # strides (elements)
        stride_xm,
        stride_wn,
        stride_rm,
        stride_rn,
        stride_ym,
        stride_yn,
        # constexpr
        HAS_BIAS: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        ACTIVATION: tl.constexpr,  # 0 none, 1 relu, 2 silu
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """acc[m, n] = sum_k x[m, k] * w[n, k] in fp32 (fp8 tl.dot of [BM, BK] x trans([BN, BK]), both
        K-major), then the fused epilogue."""
        pid_m, pid_n = _program_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _gemm_tile(x_ptr, w_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_wn, EVEN_K, False, BLOCK_M,
                         BLOCK_N, BLOCK_K)
        _epilogue(acc, offs_m, offs_n, M, N, x_scale, ws_ptr, b_ptr, r_ptr, y_ptr,
                  stride_rm, stride_rn, stride_ym, stride_yn, HAS_BIAS, HAS_RESIDUAL, ACTIVATION)  # fmt: skip

    @triton.jit
    def _fp8_conv2d_kernel(
        # pointers
        x_ptr,  # x_q, NHWC memory [N, H, W, C] e4m3
        w_ptr,  # w_q [O, KH, KW, C] e4m3 contiguous (= [O, KH*KW*C], K-contiguous)
        ws_ptr,  # w_scale [O] fp32
        b_ptr,  # bias [O] (unused unless HAS_BIAS)
        r_ptr,  # residual as [N*Ho*Wo, O] (unused unless HAS_RESIDUAL)
        y_ptr,  # out, NHWC memory = [N*Ho*Wo, O]
        # sizes
        M,  # N * Ho * Wo
        O,
        C,
        H,
        W,
        Ho,
        Wo,
        x_scale,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        dil_h,
        dil_w,
        # strides (elements)
        stride_xb,  # H * W * C
        stride_wo,  # KH * KW * C
        stride_rm,
        stride_rn,
        # constexpr
        KH: tl.constexpr,
        KW: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        ACTIVATION: tl.constexpr,
        EVEN_C: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """Implicit GEMM, one flat loop over (kernel point, channel block): a gathered [BM, BK] slab of
        NHWC rows (zero in the padding) dotted with the [BN, BK] weight slab, fp32 accumulator."""
        offs_m, offs_n, rn, hi0, wi0, img = _conv_tile_pixels(M, O, Ho, Wo, stride_h, stride_w, pad_h, pad_w,
                                                              stride_xb, BLOCK_M, BLOCK_N, GROUP_M)
        offs_k = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + rn[:, None] * stride_wo + offs_k[None, :]
        c_blocks = tl.cdiv(C, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for it in range(0, KH * KW * c_blocks):
            kp = it // c_blocks
            c0 = (it - kp * c_blocks) * BLOCK_K
            ky = kp // KW
            kx = kp - ky * KW
            hi = hi0 + ky * dil_h
            wi = wi0 + kx * dil_w
            valid = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            pix = img + (hi * W + wi) * C
            a_ptrs = x_ptr + pix[:, None] + (c0 + offs_k)[None, :]
            w_ptrs = w_rows + (kp * C + c0)
            if EVEN_C:
                a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
                w = tl.load(w_ptrs)
            else:
                c_mask = (c0 + offs_k)[None, :] < C
                a = tl.load(a_ptrs, mask=valid[:, None] & c_mask, other=0.0)
                w = tl.load(w_ptrs, mask=c_mask, other=0.0)
            acc = tl.dot(a, tl.trans(w), acc)
        _epilogue(acc, offs_m, offs_n, M, O, x_scale, ws_ptr, b_ptr, r_ptr, y_ptr,
                  stride_rm, stride_rn, O, 1, HAS_BIAS, HAS_RESIDUAL, ACTIVATION)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# launchers (callable on CPU tensors under the interpreter; ``out`` lets tests poison the output)


def _check_out(out: Tensor | None, ref: Tensor) -> Tensor:
    if out is None:
        return ref
    if out.shape != ref.shape or out.dtype != ref.dtype or out.device != ref.device or out.stride() != ref.stride():
        raise ValueError(f"out must be a {ref.dtype} tensor of shape {list(ref.shape)} and strides {ref.stride()} "
                         f"on {ref.device}, got {out.dtype} {list(out.shape)} {out.stride()} on {out.device}")
    return out


def _quantize_fp8_triton(x: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
    """Flat kernel over the dense storage (CUDA): y gets x's strides."""
    y = _check_out(out, torch.empty_like(x, dtype=FP8_DTYPE))
    if y.numel() == 0:
        return y
    if x.stride() != y.stride():
        x = torch.empty_like(y, dtype=x.dtype).copy_(x)
    block = 4096
    _quantize_fp8_kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), float(scale), BLOCK=block, num_warps=8)
    return y


def _linear_launch(x2, w_q, x_scale, w_scale, bias, r2, activation, y2, config):
    m, k = x2.shape
    n = w_q.shape[0]
    bm, bn, bk, group_m, warps, stages = config or gemm_config(m, n, k, x2.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    dummy = w_scale
    _fp8_linear_kernel[grid](
        x2, w_q, w_scale, dummy if bias is None else bias, dummy if r2 is None else r2, y2,
        m, n, k, float(x_scale),
        x2.stride(0), w_q.stride(0),
        0 if r2 is None else r2.stride(0), 0 if r2 is None else r2.stride(1), y2.stride(0), y2.stride(1),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=r2 is not None, ACTIVATION=_ACT_CODE[activation],
        EVEN_K=k % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


#: Output dtypes for which this torch build refused row-wise scaled ``_scaled_mm`` (learned on first call).
_ROWWISE_REFUSED: set[torch.dtype] = set()


def _scaled_mm_gemm(x2, w_q, x_scale, w_scale, bias, r2, activation, y2) -> None:
    """y2 = epilogue(_scaled_mm(x2, w_q.T)). Row-wise scales put the per-channel dequantization inside
    cuBLASLt; where the build refuses them (older cuBLAS: bf16 output only) per-tensor scaling with an
    fp32 output and the per-channel scales applied here."""
    m = x2.shape[0]
    n = w_q.shape[0]
    plain = bias is None and r2 is None and activation == "none"
    out_dtype = y2.dtype if plain else torch.float32
    acc = None
    if out_dtype not in _ROWWISE_REFUSED:
        scale_a = torch.full((m, 1), float(x_scale), dtype=torch.float32, device=x2.device)
        try:
            acc = torch._scaled_mm(x2, w_q.t(), scale_a=scale_a, scale_b=w_scale.view(1, n), out_dtype=out_dtype,
                                   out=y2 if plain and y2.is_contiguous() else None)
        except RuntimeError:
            _ROWWISE_REFUSED.add(out_dtype)
        if acc is not None and acc.data_ptr() == y2.data_ptr():
            return
    if acc is None:
        one = torch.ones((), dtype=torch.float32, device=x2.device)
        acc = torch._scaled_mm(x2, w_q.t(), scale_a=one * float(x_scale), scale_b=one, out_dtype=torch.float32)
        acc.mul_(w_scale)
    if bias is not None:
        acc.add_(bias)
    if r2 is not None:
        acc.add_(r2)
    if activation == "relu":
        acc.relu_()
    elif activation == "silu":
        acc = F.silu(acc, inplace=True)
    y2.copy_(acc)


def _gemm(x2, w_q, x_scale, w_scale, bias, r2, activation, y2, config, backend) -> None:
    m, k = x2.shape
    n = w_q.shape[0]
    if backend == "scaled_mm" and config is None and scaled_mm_eligible(m, n, k, x2, w_q):
        _scaled_mm_gemm(x2, w_q, x_scale, w_scale, bias, r2, activation, y2)
    else:
        _linear_launch(x2, w_q, x_scale, w_scale, bias, r2, activation, y2, config)


def _k_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _fp8_linear_cuda_or_triton(
    x_q: Tensor,
    w_q: Tensor,
    x_scale: float,
    w_scale: Tensor,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    activation: str = "none",
    out_dtype: str = "float16",
    out: Tensor | None = None,
    *,
    config: Config | None = None,
    backend: str | None = None,
) -> Tensor:
    """x_q [..., K] -> [..., N]; ``backend`` (default :data:`GEMM_BACKEND`) picks ``_scaled_mm`` or Triton
    (``_scaled_mm`` only on CUDA and where its layout rules hold); ``config`` forces a Triton launch."""
    k = x_q.shape[-1]
    n = w_q.shape[0]
    lead = x_q.shape[:-1]
    y = _check_out(out, torch.empty((*lead, n), dtype=OUT_DTYPES[out_dtype], device=x_q.device))
    if y.numel() == 0:
        return y
    if k == 0:
        return y.copy_(reference_fp8_linear(x_q, w_q, x_scale, w_scale, bias, residual, activation, out_dtype))
    x2 = _k_contiguous(x_q.reshape(-1, k))
    r2 = None if residual is None else residual.reshape(-1, n)
    _gemm(x2, _k_contiguous(w_q), x_scale, w_scale, bias, r2, activation, y.view(-1, n), config,
          backend or GEMM_BACKEND)
    return y


def _fp8_conv2d_cuda_or_triton(
    x_q: Tensor,
    w_q: Tensor,
    x_scale: float,
    w_scale: Tensor,
    bias: Tensor | None = None,
    stride: list[int] = (1, 1),
    padding: list[int] = (0, 0),
    dilation: list[int] = (1, 1),
    groups: int = 1,
    residual: Tensor | None = None,
    activation: str = "none",
    out_dtype: str = "float16",
    out: Tensor | None = None,
    *,
    config: Config | None = None,
    backend: str | None = None,
) -> Tensor:
    """NHWC implicit GEMM; 1x1 / stride 1 / unpadded: the GEMM path (``_scaled_mm`` or Triton) on the
    NHWC views. An input or residual not in channels-last memory is copied to it first."""
    n, c, h, w = x_q.shape
    o, kh, kw, _ = w_q.shape
    ho = _conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    wo = _conv_out_size(w, kw, stride[1], padding[1], dilation[1])
    y = torch.empty((n, o, ho, wo), dtype=OUT_DTYPES[out_dtype], device=x_q.device, memory_format=torch.channels_last)
    y = _check_out(out, y)
    if y.numel() == 0:
        return y
    if c == 0:
        return y.copy_(reference_fp8_conv2d(x_q, w_q, x_scale, w_scale, bias, stride, padding, dilation, groups,
                                            residual, activation, out_dtype))
    if not x_q.is_contiguous(memory_format=torch.channels_last):
        x_q = x_q.contiguous(memory_format=torch.channels_last)
    if not w_q.is_contiguous():
        w_q = w_q.contiguous()
    if residual is not None and not residual.is_contiguous(memory_format=torch.channels_last):
        residual = residual.contiguous(memory_format=torch.channels_last)
    if h * w * c > _MAX_I32:
        raise ValueError(f"x_q: one image spans more than 2^31 elements ({h}x{w}x{c}); split it spatially")
    m = n * ho * wo
    y2 = y.permute(0, 2, 3, 1).reshape(m, o)  # views: NHWC memory is [M, O] row-major
    r2 = None if residual is None else residual.permute(0, 2, 3, 1).reshape(m, o)
    if kh == kw == 1 and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
        x2 = x_q.permute(0, 2, 3, 1).reshape(m, c)
        _gemm(x2, w_q.reshape(o, c), x_scale, w_scale, bias, r2, activation, y2, config, backend or GEMM_BACKEND)
        return y
    bm, bn, bk, group_m, warps, stages = config or gemm_config(m, o, c, x_q.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(o, bn),)
    dummy = w_scale
    _fp8_conv2d_kernel[grid](
        x_q, w_q, w_scale, dummy if bias is None else bias, dummy if r2 is None else r2, y2,
        m, o, c, h, w, ho, wo, float(x_scale),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        h * w * c, kh * kw * c, 0 if r2 is None else r2.stride(0), 0 if r2 is None else r2.stride(1),
        KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_RESIDUAL=r2 is not None, ACTIVATION=_ACT_CODE[activation],
        EVEN_C=c % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y


# ----------------------------------------------------------------------------------------------
# registration (custom_op + fake: each op stays one node in exported engines)


def _inference_only(name: str):
    def backward(ctx, grad_output):
        raise RuntimeError(
            f"bevdeploy::{name} is inference-only: fp8 codes have no gradient. Train or fine-tune the float "
            "model, then convert it with bevdeploy.quant.fp8_modules.quantize_modules_fp8."
        )

    def setup_context(ctx, inputs, output):
        pass

    return backward, setup_context


@torch.library.custom_op("bevdeploy::quantize_fp8", mutates_args=())
def _quantize_fp8_op(x: Tensor, scale: float) -> Tensor:
    if x.device.type == "cuda" and use_triton(x):
        return _quantize_fp8_triton(x, scale)
    return torch.empty_like(x, dtype=FP8_DTYPE).copy_(reference_quantize_fp8(x, scale))


@_quantize_fp8_op.register_fake
def _(x, scale):
    _check_quantize(x, scale)
    return torch.empty_like(x, dtype=FP8_DTYPE)


@torch.library.custom_op("bevdeploy::fp8_linear", mutates_args=())
def _fp8_linear_op(
    x_q: Tensor,
    w_q: Tensor,
    x_scale: float,
    w_scale: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    activation: str,
    out_dtype: str,
) -> Tensor:
    if use_triton(x_q):
        return _fp8_linear_cuda_or_triton(x_q, w_q, x_scale, w_scale, bias, residual, activation, out_dtype)
    return reference_fp8_linear(x_q, w_q, x_scale, w_scale, bias, residual, activation, out_dtype).contiguous()


@_fp8_linear_op.register_fake
def _(x_q, w_q, x_scale, w_scale, bias, residual, activation, out_dtype):
    shape = _check_linear(x_q, w_q, x_scale, w_scale, bias, residual, activation, out_dtype)
    return x_q.new_empty(shape, dtype=OUT_DTYPES[out_dtype])


@torch.library.custom_op("bevdeploy::fp8_conv2d", mutates_args=())
def _fp8_conv2d_op(
    x_q: Tensor,
    w_q: Tensor,
    x_scale: float,
    w_scale: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    residual: Tensor | None,
    activation: str,
    out_dtype: str,
) -> Tensor:
    if use_triton(x_q):
        return _fp8_conv2d_cuda_or_triton(x_q, w_q, x_scale, w_scale, bias, stride, padding, dilation, groups,
                                          residual, activation, out_dtype)
    return reference_fp8_conv2d(x_q, w_q, x_scale, w_scale, bias, stride, padding, dilation, groups, residual,
                                activation, out_dtype)


@_fp8_conv2d_op.register_fake
def _(x_q, w_q, x_scale, w_scale, bias, stride, padding, dilation, groups, residual, activation, out_dtype):
    shape = _check_conv(x_q, w_q, x_scale, w_scale, bias, stride, padding, dilation, groups, residual, activation,
                        out_dtype)
    return torch.empty(shape, dtype=OUT_DTYPES[out_dtype], device=x_q.device, memory_format=torch.channels_last)


for _op, _name in ((_quantize_fp8_op, "quantize_fp8"), (_fp8_linear_op, "fp8_linear"),
                   (_fp8_conv2d_op, "fp8_conv2d")):
    _bwd, _setup = _inference_only(_name)
    _op.register_autograd(_bwd, setup_context=_setup)


# ----------------------------------------------------------------------------------------------
# public functions


def _out_dtype_name(out_dtype: torch.dtype | str) -> str:
    if isinstance(out_dtype, torch.dtype):
        if out_dtype not in _DTYPE_NAME:
            raise ValueError(f"out_dtype must be torch.float16 or torch.float32, got {out_dtype}")
        return _DTYPE_NAME[out_dtype]
    return out_dtype


def quantize_fp8(x: Tensor, scale: float) -> Tensor:
    """Per-tensor e4m3 quantization in one pass.

    Args:
        x (Tensor[...]): float32 / float16 / bfloat16, any shape and memory format.
        scale (float): the calibrated scale (amax / 448); codes are ``e4m3(clamp(x / scale, -448, 448))``
            rounded to nearest even, so values beyond the calibrated range saturate at +-448.

    Returns:
        Tensor[...]: float8_e4m3fn codes, same shape and strides as ``x`` when it is dense. NaN inputs
        give NaN codes (never a finite value).
    """
    _check_quantize(x, scale)
    return _quantize_fp8_op(x, float(scale))


def fp8_linear(
    x_q: Tensor,
    w_q: Tensor,
    x_scale: float,
    w_scale: Tensor,
    bias: Tensor | None = None,
    *,
    residual: Tensor | None = None,
    activation: str = "none",
    out_dtype: torch.dtype | str = torch.float16,
) -> Tensor:
    """``act(x_scale * w_scale[n] * (x_q @ w_q.T)[.., n] + bias[n] + residual)`` with fp8 tensor-core math.

    Args:
        x_q (Tensor[..., K]): float8_e4m3fn input codes.
        w_q (Tensor[N, K]): float8_e4m3fn weight codes, nn.Linear's layout (K-contiguous).
        x_scale (float): per-tensor scale of ``x_q``.
        w_scale (Tensor[N]): float32 per-output-channel weight scales.
        bias (Tensor[N], optional): float bias, added after dequantization.
        residual (Tensor[..., N], optional): float tensor added before the activation.
        activation (str): ``"none"``, ``"relu"`` or ``"silu"``.
        out_dtype (torch.dtype): torch.float16 (default) or torch.float32.

    Returns:
        Tensor[..., N]: contiguous, ``out_dtype``.
    """
    out_dtype = _out_dtype_name(out_dtype)
    _check_linear(x_q, w_q, x_scale, w_scale, bias, residual, activation, out_dtype)
    return _fp8_linear_op(x_q, w_q, float(x_scale), w_scale, bias, residual, activation, out_dtype)


def fp8_conv2d(
    x_q: Tensor,
    w_q: Tensor,
    x_scale: float,
    w_scale: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    residual: Tensor | None = None,
    activation: str = "none",
    out_dtype: torch.dtype | str = torch.float16,
) -> Tensor:
    """2-D convolution on e4m3 codes with fp8 tensor-core math and a fused epilogue.

    Args:
        x_q (Tensor[N, C, H, W]): float8_e4m3fn input codes, channels-last memory (else copied to it).
        w_q (Tensor[O, kh, kw, C]): float8_e4m3fn weight codes, K-contiguous.
        x_scale (float): per-tensor scale of ``x_q``.
        w_scale (Tensor[O]): float32 per-output-channel weight scales.
        bias (Tensor[O], optional): float bias (BN folded in).
        stride, padding, dilation (int or (int, int)): as ``F.conv2d`` (zero padding).
        groups (int): 1 only (NotImplementedError otherwise).
        residual (Tensor[N, O, Ho, Wo], optional): float tensor added before the activation.
        activation (str): ``"none"``, ``"relu"`` or ``"silu"``.
        out_dtype (torch.dtype): torch.float16 (default) or torch.float32.

    Returns:
        Tensor[N, O, Ho, Wo]: ``out_dtype`` in channels-last memory.
    """
    out_dtype = _out_dtype_name(out_dtype)
    stride, padding, dilation = (list(_pair(v)) for v in (stride, padding, dilation))
    _check_conv(x_q, w_q, x_scale, w_scale, bias, stride, padding, dilation, groups, residual, activation, out_dtype)
    return _fp8_conv2d_op(x_q, w_q, float(x_scale), w_scale, bias, stride, padding, dilation, groups, residual,
                          activation, out_dtype)
