"""INT8 execution kernels: per-tensor activation quantization, int8 linear, int8 implicit-GEMM conv2d.

Math (symmetric int8, per-tensor activation scale ``s_x``, per-output-channel weight scale ``s_w[n]``)::

    quantize_per_tensor(x, s)[i] = clamp(round_half_even(x[i] / s), -127, 127)          (int8)
    int8_linear:  y[m, n] = act( s_x * s_w[n] * sum_k x_q[m, k] * w_q[n, k] + bias[n] + residual[m, n] )
    int8_conv2d:  y[b, o, ho, wo] = act( s_x * s_w[o] * sum_{i, j, c} x_q[b, c, hi, wi] * w_q[o, i, j, c]
                                         + bias[o] + residual[b, o, ho, wo] ),
                  hi = ho * stride_h - pad_h + i * dil_h,  wi = wo * stride_w - pad_w + j * dil_w
                  (x_q is zero outside the image)

``act`` is ``none``, ``relu`` or ``silu`` (x * sigmoid(x), YOLOX's activation); the residual is added
before it (ResNet bottleneck: conv3 + identity, then ReLU), or with ``residual_after_act`` after it
(YOLOX's ``DarknetBottleneck``: ``x + SiLU(conv2(...))``, i.e. ``y = act(...) + residual``).
Sums run in int32 on the tensor cores; everything after the sum (dequantization, bias, residual, activation, cast) is fused into the
kernel's epilogue and computed in fp32; the output is fp16 (default) or fp32, or, with ``out_scale``,
the int8 codes the next int8 layer reads (``clamp(round_half_even(y / out_scale), -127, 127)``,
symmetric, or with a zero point: see below; a NaN becomes the code of 0), so activations stay int8 between layers. The residual may itself be
int8 codes with their own ``residual_scale`` (a ResNet identity coming from the previous block's
int8 output): ``residual[m, n]`` above then reads ``residual_scale * residual_q[m, n]``.

Zero points (asymmetric activations). ReLU and SiLU outputs are one-sided, so symmetric codes waste
about one bit on them. Every activation code may carry an integer zero point ``z`` in [-128, 127]:
``x ~= s * (q - z)``, codes clamped to [-128, 127] (``z = 0`` is the symmetric scheme above, codes in
[-127, 127], bit for bit). The input's ``z`` adds no arithmetic to the main loop:
``sum_k (q - z) w = sum_k q w - z * w_sum[n]`` with ``w_sum[n] = sum_k w_q[n, k]`` precomputed, one
int32 multiply-subtract per output in the epilogue (exact); the conv pads with ``z`` (the code of
0), so padded taps cancel in that sum. That padding is not free: a masked load with a non-zero fill
made a padded conv 1.30-2.27x the symmetric one on the H100 (``zero-point-conv-timing.md``), and the
per-kernel-point alternative timed there (pad with 0, subtract per tap) was slower still. The int8 output (``out_zero_point``) adds ``z`` after rounding;
an int8 residual subtracts its ``residual_zero_point`` before its scale.

Layouts. On the H100 an int8 ``tl.dot`` reaches ~1160 TOPS only when BOTH operands are K-contiguous
(Hopper's 8-bit wgmma reads both operands K-major); with a row-major [K, N] right operand it measured
~300 TOPS (``reference/h100-measured.md``). So:

* ``int8_linear``: ``x_q [M, K]`` (rows K-contiguous) and ``w_q [N, K]`` (nn.Linear's own layout).
  The kernel loads the weight tile as [BLOCK_N, BLOCK_K] and feeds ``tl.trans`` of it to ``tl.dot``.
* ``int8_conv2d``: ``x_q [N, C, H, W]`` in channels-last memory (NHWC: a pixel's channels are
  contiguous) and ``w_q [O, kh, kw, C]`` contiguous (= a [O, kh*kw*C] K-contiguous matrix).
  An implicit GEMM: M = N*Ho*Wo output pixels, N = O, K = kh*kw*C iterated as (kernel point,
  channel block): each step gathers a [BLOCK_M, BLOCK_K] slab of channel-contiguous int8 rows
  (masked to zero where the kernel point falls in the padding) and the matching [BLOCK_N, BLOCK_K]
  weight slab. No im2col buffer. Output [N, O, Ho, Wo] in channels-last memory, so the next int8
  conv reads it without a relayout. A 1x1, stride-1, unpadded conv is a plain GEMM on the NHWC view
  and runs through the linear kernel.
* A conv config may instead name the packed-K kernel (K tiles across kernel points) or the TMA kernel
  (``_int8_conv2d_tma_kernel``: the A slab of each step is one tensor-memory-accelerator box load of a
  block of output pixels' input, the padding TMA's zero fill); the build's autotune times them beside the
  gather kernel per layer shape and keeps a config only if its output matches the heuristic's.

Origin: the tiling and grouped program order follow Triton's matrix-multiplication tutorial; the
implicit-GEMM walk is the standard one of CUTLASS's "analytic" conv iterators. Inference only:
the ops have no gradient (int8 weights are not trainable here; QAT trains the float model with
fake quantization).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from bevdeploy.ops._utils import (
    check_dim,
    check_same_device,
    check_tensor,
    triton_available,
    use_triton,
)

ACTIVATIONS = ("none", "relu", "silu")
_ACT_CODE = {"none": 0, "relu": 1, "silu": 2}
OUT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_DTYPE_NAME = {v: k for k, v in OUT_DTYPES.items()}
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_MAX_I32 = 2**31 - 1

#: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, 7th]). GEMM kernel (linears and 1x1 /
#: stride-1 / unpadded convs): a 7th > 0 launches that many programs per SM of
#: :func:`_int8_linear_persistent_kernel` instead of one program per tile (0 or absent). Implicit-GEMM conv:
#: a 7th of ``PACKED_K`` runs :func:`_int8_conv2d_packed_kernel` (K tiles across kernel points).
Config = tuple[int, ...]
PACKED_K = 1
#: A conv config's 7th entry asking for :func:`_int8_conv2d_tma_kernel`; its 4th entry is then the tile's width in
#: output pixels (BLOCK_W; the tile covers BLOCK_M // BLOCK_W output rows) instead of GROUP_M.
TMA = 2


# ----------------------------------------------------------------------------------------------
# input checks (shared by the public functions and the fakes)


def _check_scale(name: str, scale: object) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name} must be a python float (a calibrated per-tensor scale), got {type(scale).__name__}")
    scale = float(scale)
    if not (0.0 < scale < float("inf")):
        raise ValueError(f"{name} must be a positive finite float, got {scale}")
    return scale


def _check_zero_point(name: str, zp: object) -> int:
    if isinstance(zp, bool) or not isinstance(zp, int) or not -128 <= zp <= 127:
        raise ValueError(f"{name} must be an int in [-128, 127] (an int8 code), got {zp!r}")
    return zp


def _check_zero_points(n: int, x_zero_point=0, w_sum=None, residual=None, residual_zero_point=0, out_scale=None,
                       out_zero_point=0) -> None:
    _check_zero_point("x_zero_point", x_zero_point)
    if w_sum is not None:
        check_tensor("w_sum", w_sum, shape=(n,), dtypes=(torch.int32,))
    if _check_zero_point("residual_zero_point", residual_zero_point) and (residual is None
                                                                          or residual.dtype != torch.int8):
        raise ValueError("residual_zero_point applies to an int8 residual only")
    if _check_zero_point("out_zero_point", out_zero_point) and out_scale is None:
        raise ValueError("out_zero_point applies to an int8 output (out_scale) only")


def _check_channel_muls(n: int, out_mul, residual_mul, residual) -> None:
    """The epilogue's per-channel multipliers of the output (a consumer's smoothing divisor) and of the residual
    (undoing it on a smoothed identity): fp32 [N] each."""
    if out_mul is not None:
        check_tensor("out_mul", out_mul, shape=(n,), dtypes=(torch.float32,))
    if residual_mul is not None:
        check_tensor("residual_mul", residual_mul, shape=(n,), dtypes=(torch.float32,))
        if residual is None:
            raise ValueError("residual_mul multiplies a residual: pass residual too")


def _check_epilogue(n: int, w_scale, bias, residual, res_shape, activation, out_dtype, residual_scale=None,
                    out_scale=None, config=None) -> None:
    check_tensor("w_scale", w_scale, shape=(n,), dtypes=(torch.float32,))
    if bias is not None:
        check_tensor("bias", bias, shape=(n,), dtypes=_FLOAT)
    if residual is not None:
        check_tensor("residual", residual, dtypes=(*_FLOAT, torch.int8))
        if tuple(residual.shape) != tuple(res_shape):
            raise ValueError(f"residual must have the output's shape {list(res_shape)}, got {list(residual.shape)}")
    if residual is not None and residual.dtype == torch.int8:
        if residual_scale is None:
            raise ValueError("residual is int8 codes: residual_scale (its per-tensor scale) is required, got None")
        _check_scale("residual_scale", residual_scale)
    elif residual_scale is not None:
        raise ValueError(f"residual_scale applies to an int8 residual only, got {residual_scale=} with "
                         f"residual {None if residual is None else residual.dtype}")
    if out_scale is not None:
        _check_scale("out_scale", out_scale)
    if config is not None and not valid_config(config):
        raise ValueError(f"config must be 6 ints >= 1 (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages) and an "
                         f"optional 7th >= 0 (persistent programs per SM), got {list(config)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {tuple(OUT_DTYPES)} (torch.float16 / torch.float32), "
                         f"got {out_dtype!r}")


def conv_runs_gemm_kernel(kernel_size, stride, padding) -> bool:
    """A 1x1, stride-1, unpadded conv is a GEMM on its NHWC view: the int8 conv op runs the GEMM kernel."""
    return tuple(kernel_size) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)


def valid_config(config) -> bool:
    """Six ints >= 1 and an optional persistent-programs-per-SM count >= 0 (see ``Config``)."""
    c = list(config)
    return len(c) in (6, 7) and all(int(v) >= 1 for v in c[:6]) and (len(c) == 6 or int(c[6]) >= 0)


def _check_quantize(x: Tensor, scale: float, zero_point: int = 0) -> None:
    check_tensor("x", x, dtypes=_FLOAT)
    _check_scale("scale", scale)
    _check_zero_point("zero_point", zero_point)


def _check_linear(x_q, w_q, x_scale, w_scale, bias, residual, activation, out_dtype, residual_scale=None,
                  out_scale=None, config=None) -> list[int]:
    check_tensor("x_q", x_q, dtypes=(torch.int8,))
    if x_q.dim() < 1:
        raise ValueError(f"x_q must have shape [..., K] (at least 1-D), got {list(x_q.shape)}")
    check_tensor("w_q", w_q, shape=("N", "K"), dtypes=(torch.int8,))
    check_dim("w_q", w_q.shape[1], x_q.shape[-1], "K (in_features, the last dim of x_q)")
    _check_scale("x_scale", x_scale)
    out_shape = [*x_q.shape[:-1], w_q.shape[0]]
    _check_epilogue(w_q.shape[0], w_scale, bias, residual, out_shape, activation, out_dtype, residual_scale,
                    out_scale, config)
    check_same_device(x_q=x_q, w_q=w_q, w_scale=w_scale, bias=bias, residual=residual)
    return out_shape


def _conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _check_conv(x_q, w_q, x_scale, w_scale, bias, stride, padding, dilation, groups, residual, activation,
                out_dtype, residual_scale=None, out_scale=None, config=None) -> list[int]:
    if groups != 1:
        raise NotImplementedError(f"int8_conv2d supports groups=1 only, got {groups=} (keep grouped convs float)")
    check_tensor("x_q", x_q, shape=("N", "C", "H", "W"), dtypes=(torch.int8,))
    check_tensor("w_q", w_q, shape=("O", "kh", "kw", "C"), dtypes=(torch.int8,))
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
    _check_epilogue(o, w_scale, bias, residual, out_shape, activation, out_dtype, residual_scale, out_scale, config)
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


def code_range(zero_point: int) -> tuple[int, int]:
    """The int8 codes a quantizer with this zero point writes: [-127, 127] symmetric (``z = 0``, as
    TensorRT), the full [-128, 127] with a zero point."""
    return (-127 if zero_point == 0 else -128), 127


def reference_quantize_per_tensor(x: Tensor, scale: float, zero_point: int = 0) -> Tensor:
    """round_half_even(fp32(x) / fp32(scale)) + zero_point clamped to :func:`code_range`, memory format kept.

    Plain torch ops (a python-float divisor is applied in fp32), so a compiler can fuse them into the
    kernel that produces ``x``: the int8 modules use this form inside engines (``quantize_in_graph``).
    """
    lo, hi = code_range(zero_point)
    v = torch.round(x.float() / float(scale))
    q = torch.clamp(v + zero_point if zero_point else v, lo, hi)
    return q.to(torch.int8)


def _requantize(y: Tensor, out_scale: float, out_zero_point: int = 0) -> Tensor:
    """The int8 epilogue: clamp(round_half_even(y * fp32(1 / out_scale)) + out_zero_point, code_range) in
    fp32, NaN -> the code of 0 (``out_zero_point``).

    The kernels multiply by the reciprocal (a division per output element would cost more than the
    rest of the epilogue); it differs from ``y / out_scale`` by at most one fp32 ulp, i.e. only where
    the quotient is within an ulp of a .5 tie. A NaN has no int8 code: it becomes 0 (what a GPU's
    saturating float-to-int conversion gives), in the kernels and here, never a saturated code."""
    inv = torch.tensor(1.0 / out_scale, dtype=torch.float32).item()
    v = y.float() * inv
    v = torch.where(torch.isnan(v), torch.zeros((), dtype=v.dtype, device=v.device), v)
    lo, hi = code_range(out_zero_point)
    return torch.clamp(torch.round(v) + out_zero_point, lo, hi).to(torch.int8)


def _epilogue_ref(y, bias, residual, residual_scale, activation, out_dtype, out_scale, shape_bias,
                  residual_after_act=False, residual_zero_point=0, out_zero_point=0, out_mul=None,
                  residual_mul=None) -> Tensor:
    if bias is not None:
        y = y + bias.float().view(shape_bias)
    r = None
    if residual is not None:
        r = ((residual.float() - residual_zero_point) * residual_scale if residual.dtype == torch.int8
             else residual.float())
        if residual_mul is not None:
            r = r * residual_mul.float().view(shape_bias)
    if r is not None and not residual_after_act:
        y = y + r
    y = _act(y, activation)
    if r is not None and residual_after_act:
        y = y + r
    if out_mul is not None:
        y = y * out_mul.float().view(shape_bias)
    return _requantize(y, out_scale, out_zero_point) if out_scale is not None else y.to(OUT_DTYPES[out_dtype])


def reference_int8_linear(x_q, w_q, x_scale, w_scale, bias=None, residual=None, activation="none",
                          out_dtype="float16", residual_scale=None, out_scale=None,
                          residual_after_act=False, x_zero_point=0, residual_zero_point=0,
                          out_zero_point=0, out_mul=None, residual_mul=None) -> Tensor:
    """The int8 codes (less their zero point) multiplied in fp32 (products exact; sums exact while
    |acc| < 2^24, else within 6e-8 relative), dequantized, epilogue in fp32 (int8 output with ``out_scale``;
    ``out_mul[n]`` multiplies output channel n last, ``residual_mul[n]`` the residual's channel n)."""
    acc = (x_q.float() - x_zero_point) @ w_q.float().t()
    y = acc * (x_scale * w_scale)
    return _epilogue_ref(y, bias, residual, residual_scale, activation, out_dtype, out_scale, (-1,),
                         residual_after_act, residual_zero_point, out_zero_point, out_mul, residual_mul)


def reference_int8_conv2d(x_q, w_q, x_scale, w_scale, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                          groups=1, residual=None, activation="none", out_dtype="float16", residual_scale=None,
                          out_scale=None, residual_after_act=False, x_zero_point=0, residual_zero_point=0,
                          out_zero_point=0, out_mul=None, residual_mul=None) -> Tensor:
    """F.conv2d on the int8 codes less their zero point in fp32, zero padding (= padding the codes
    with the zero point; same exactness as the linear), epilogue in fp32 (int8 output with
    ``out_scale``), channels-last output."""
    acc = F.conv2d(x_q.float() - x_zero_point, w_q.permute(0, 3, 1, 2).float(), None, list(stride), list(padding),
                   list(dilation))
    y = acc * (x_scale * w_scale)[None, :, None, None]
    y = _epilogue_ref(y, bias, residual, residual_scale, activation, out_dtype, out_scale, (1, -1, 1, 1),
                      residual_after_act, residual_zero_point, out_zero_point, out_mul, residual_mul)
    return y.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------
# launch configurations


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _p2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _pick_block_k(k: int) -> int:
    """The largest of 128/64/32 dividing k (no masked tail), else the power of two covering k up to 128.
    int8 wgmma consumes K in steps of 32, so 32 is the floor."""
    for bk in (128, 64, 32):
        if k % bk == 0:
            return bk
    return min(128, max(32, _p2(k)))


def gemm_config(m: int, n: int, k: int, device: torch.device) -> Config:
    """The launch heuristic of both kernels; ``k`` is the contiguous K run (K for the linear, C for a conv).

    CUDA: BLOCK_M 128 x BLOCK_N 256 x BLOCK_K 128, 8 warps, 4 stages is the configuration that measured
    1164 TOPS on the H100 (4 stages x 48 KiB of int8 operand tiles = 192 KiB of shared memory, one CTA
    per SM). BLOCK_N drops to 128 (3 stages, 96 KiB: two CTAs fit an SM) when 256-wide tiles leave the
    last wave of programs mostly empty (e.g. 272 tiles on 132 SMs = 2.06 waves), and to the next power
    of two >= N for narrow layers; with fewer tiles than SMs, BLOCK_M drops to 64 and BLOCK_N halves
    (down to 64) until every SM has a tile (e.g. 900 x 256 decoder linears). GROUP_M 8
    runs 8 row-tiles against each weight tile back to back for L2 reuse.
    Interpreter: 32 x 32 x 32 tiles, so the tests' tiny odd shapes still cover several tiles and the
    masked K tail, at numpy speed.
    """
    if device.type != "cuda":
        return (32, 32, 32, 4, 4, 1)
    bk = _pick_block_k(k)
    bn = min(256, max(32, _p2(n)))
    bm = 128
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())

    def tiles(bm_, bn_):
        return -(-m // bm_) * -(-n // bn_)

    def efficiency(bn_):  # busy fraction of the last wave, one CTA per SM
        return tiles(bm, bn_) / (-(-tiles(bm, bn_) // sms) * sms)

    if bn == 256 and efficiency(128) > efficiency(256) + 0.1:
        bn = 128
    if tiles(bm, bn) < sms:  # small problems: more, smaller tiles until every SM has one
        bm = 64
        while tiles(bm, bn) < sms and bn > 64:
            bn //= 2
    warps = 8 if bm * bn >= 128 * 128 else 4
    per_stage = (bm + bn) * bk
    stages = 4 if (bm, bn) == (128, 256) else max(2, min(4, (96 * 1024) // per_stage))
    return (bm, bn, bk, 8, warps, stages)


def candidate_configs() -> list[Config]:
    """Configurations worth timing on a new GPU (pass one as ``config=`` to the private launchers)."""
    return [
        (128, 256, 128, 8, 8, 4),
        (128, 256, 64, 8, 8, 4),
        (128, 128, 128, 8, 8, 3),
        (128, 128, 128, 8, 8, 4),
        (128, 128, 64, 8, 4, 4),
        (64, 256, 128, 8, 8, 3),
        (64, 128, 128, 8, 4, 4),
        (256, 128, 128, 8, 8, 3),
    ]


# ----------------------------------------------------------------------------------------------
# Triton kernels

if triton_available():
    import triton
    import triton.language as tl

    from bevdeploy.quant.int8_epilogue import int8_epilogue as _epilogue
    from bevdeploy.quant.int8_epilogue import load_residual_tile as _load_residual_tile
    from bevdeploy.quant.gemm_tiles import conv_tile_pixels as _conv_tile_pixels
    from bevdeploy.quant.gemm_tiles import gemm_tile as _gemm_tile
    from bevdeploy.quant.gemm_tiles import program_tile as _program_tile
    from bevdeploy.quant.gemm_tiles import tile_coords as _tile_coords

    @triton.jit
    def _quantize_per_tensor_kernel(
        # pointers
        x_ptr,  # dense float input (any memory order; y has the same strides)
        y_ptr,  # int8 output
        # sizes
        n,
        scale,
        lo,  # code_range(z)[0] - z, as fp32 (the clamp before rounding; bounds are integers)
        hi,  # 127 - z
        zp,  # z, as fp32
        # constexpr
        BLOCK: tl.constexpr,
    ):
        """y = clamp(rint(x / scale), lo, hi) + z. The division is IEEE round-to-nearest (``div_rn``;
        Triton's ``/`` on fp32 may be the approximate ``div.full``), so codes equal torch's bit for bit;
        rint by the 1.5 * 2^23 trick: for |v| <= 255 the fp32 sum v + 12582912 has ulp 1, so the
        addition rounds half to even like torch.round."""
        base = tl.program_id(0).to(tl.int64) * BLOCK
        offs = tl.arange(0, BLOCK)
        mask = offs < n - base
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x, scale)
        v = tl.minimum(tl.maximum(v, lo), hi)
        r = (v + 12582912.0) - 12582912.0 + zp
        tl.store(y_ptr + base + offs, r.to(tl.int8), mask=mask)

    @triton.jit
    def _tile_sums(x_ptr, w_ptr, r_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_wn, stride_rm, stride_rn,
                   EVEN_K: tl.constexpr, PRELOAD_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
        """(residual tile, int32 sums) of one GEMM tile: the residual read first when PRELOAD_RES
        (:func:`preloads_residual`; else 0 and the epilogue reads it), then the K loop."""
        if PRELOAD_RES:
            res_tile = _load_residual_tile(r_ptr, offs_m, offs_n, M, N, stride_rm, stride_rn)
        else:
            res_tile = 0
        acc = _gemm_tile(x_ptr, w_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_wn, EVEN_K, True, BLOCK_M,
                         BLOCK_N, BLOCK_K)
        return res_tile, acc

    @triton.jit
    def _int8_linear_kernel(
        # pointers
        x_ptr,  # x_q [M, K] int8, K-contiguous
        w_ptr,  # w_q [N, K] int8, K-contiguous
        ws_ptr,  # w_scale [N] fp32
        b_ptr,  # bias [N] (unused unless HAS_BIAS)
        r_ptr,  # residual [M, N] (unused unless HAS_RESIDUAL)
        y_ptr,  # out [M, N] fp16 / fp32
        # sizes
        M,
        N,
        K,
        x_scale,
        res_scale,  # residual multiplier (its int8 scale; 1.0 for a float residual)
        inv_out_scale,  # 1 / out_scale (OUT_INT8)
        x_zp,  # input zero point (int; used when HAS_XZP)
        wsum_ptr,  # w_sum [N] int32 (used when HAS_XZP)
        res_zp,  # int8 residual's zero point (fp32; 0 otherwise)
        out_lo,  # int8 output: code range less out_zp (fp32)
        out_hi,
        out_zp,  # int8 output's zero point (fp32)
        om_ptr,  # out multiplier [N] fp32 (used when HAS_OUT_MUL)
        rm_ptr,  # residual multiplier [N] fp32 (used when HAS_RES_MUL)
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
        OUT_INT8: tl.constexpr,  # requantize to int8 codes of out_scale
        RES_AFTER_ACT: tl.constexpr,  # the residual is added after the activation
        HAS_XZP: tl.constexpr,  # the input has a zero point: subtract x_zp * w_sum[n] in the epilogue
        EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks in the main loop
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        PRELOAD_RES: tl.constexpr,  # read the residual tile before the K loop (see int8_epilogue)
        HAS_OUT_MUL: tl.constexpr,  # multiply the output by om[n] before it is stored / requantized
        HAS_RES_MUL: tl.constexpr,  # multiply the residual by rm[n]
    ):
        """One tile per program: :func:`_tile_sums`, then the fused epilogue."""
        pid_m, pid_n = _program_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        res_tile, acc = _tile_sums(x_ptr, w_ptr, r_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_wn, stride_rm,
                                   stride_rn, EVEN_K, PRELOAD_RES, BLOCK_M, BLOCK_N, BLOCK_K)
        _epilogue(acc, offs_m, offs_n, M, N, x_scale, ws_ptr, b_ptr, r_ptr, y_ptr,
                  stride_rm, stride_rn, stride_ym, stride_yn, res_scale, inv_out_scale,
                  x_zp, wsum_ptr, res_zp, out_lo, out_hi, out_zp, om_ptr, rm_ptr,
                  HAS_BIAS, HAS_RESIDUAL, ACTIVATION, OUT_INT8, RES_AFTER_ACT, HAS_XZP, res_tile,
                  PRELOAD_RES, HAS_OUT_MUL, HAS_RES_MUL)  # fmt: skip

    @triton.jit
    def _int8_linear_persistent_kernel(
        x_ptr, w_ptr, ws_ptr, b_ptr, r_ptr, y_ptr,
        M, N, K, x_scale, res_scale, inv_out_scale, x_zp, wsum_ptr, res_zp, out_lo, out_hi, out_zp, om_ptr, rm_ptr,
        stride_xm, stride_wn, stride_rm, stride_rn, stride_ym, stride_yn,
        NUM_PROGRAMS,  # the launch's program count (a few per SM)
        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, OUT_INT8: tl.constexpr,
        RES_AFTER_ACT: tl.constexpr, HAS_XZP: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        PRELOAD_RES: tl.constexpr, HAS_OUT_MUL: tl.constexpr, HAS_RES_MUL: tl.constexpr,
    ):  # fmt: skip
        """:func:`_int8_linear_kernel` (same arguments, sums and epilogue) as a persistent kernel: program
        ``p`` walks tiles ``p, p + NUM_PROGRAMS, ...``. In the short-K GEMMs of a ResNet's 1x1 convs and
        BEVFormer's linears (K <= 512: two to four MMA steps a tile) the epilogue's residual read and
        output store are much of a tile's time; with the tile and K loops flattened
        (``tl.range(flatten=True)``, the pattern of Triton's persistent-matmul tutorial) the compiler's
        pipeliner can issue the next tile's operand loads while this tile's epilogue runs. The
        epilogue's tile comes from its own counter (``tile_c``), as there."""
        pid = tl.program_id(0)
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        tile_c = pid - NUM_PROGRAMS
        for tile in tl.range(pid, num_tiles, NUM_PROGRAMS, flatten=True):
            pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            res_tile, acc = _tile_sums(x_ptr, w_ptr, r_ptr, rows, cols, M, N, K, stride_xm, stride_wn, stride_rm,
                                       stride_rn, EVEN_K, PRELOAD_RES, BLOCK_M, BLOCK_N, BLOCK_K)
            tile_c += NUM_PROGRAMS
            pid_mc, pid_nc = _tile_coords(tile_c, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            offs_m = pid_mc * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_nc * BLOCK_N + tl.arange(0, BLOCK_N)
            _epilogue(acc, offs_m, offs_n, M, N, x_scale, ws_ptr, b_ptr, r_ptr, y_ptr,
                      stride_rm, stride_rn, stride_ym, stride_yn, res_scale, inv_out_scale,
                      x_zp, wsum_ptr, res_zp, out_lo, out_hi, out_zp, om_ptr, rm_ptr,
                      HAS_BIAS, HAS_RESIDUAL, ACTIVATION, OUT_INT8, RES_AFTER_ACT, HAS_XZP, res_tile,
                      PRELOAD_RES, HAS_OUT_MUL, HAS_RES_MUL)  # fmt: skip

    @triton.jit
    def _int8_conv2d_kernel(
        # pointers
        x_ptr,  # x_q, NHWC memory [N, H, W, C] int8
        w_ptr,  # w_q [O, KH, KW, C] int8 contiguous (= [O, KH*KW*C], K-contiguous)
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
        res_scale,
        inv_out_scale,
        x_zp,  # input zero point (int): the padding's code, and x_zp * w_sum[o] comes off the sum
        wsum_ptr,
        res_zp,
        out_lo,
        out_hi,
        out_zp,
        om_ptr,  # out multiplier [O] fp32 (used when HAS_OUT_MUL)
        rm_ptr,  # residual multiplier [O] fp32 (used when HAS_RES_MUL)
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
        OUT_INT8: tl.constexpr,
        RES_AFTER_ACT: tl.constexpr,
        HAS_XZP: tl.constexpr,
        EVEN_C: tl.constexpr,  # C % BLOCK_K == 0: only the padding mask (constant along channels)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        HAS_OUT_MUL: tl.constexpr,
        HAS_RES_MUL: tl.constexpr,
    ):
        """Implicit GEMM: one flat loop over (kernel point, channel block) so the software pipeliner
        prefetches across kernel points; each step is a gathered [BM, BK] slab of NHWC rows (the code
        of 0 in the padding) dotted with the [BN, BK] weight slab, transposed (both K-major)."""
        offs_m, offs_n, rn, hi0, wi0, img = _conv_tile_pixels(M, O, Ho, Wo, stride_h, stride_w, pad_h, pad_w,
                                                              stride_xb, BLOCK_M, BLOCK_N, GROUP_M)
        offs_k = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + rn[:, None] * stride_wo + offs_k[None, :]
        c_blocks = tl.cdiv(C, BLOCK_K)
        pad_code = x_zp.to(tl.int8)  # the code of 0 (symmetric: 0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for it in range(0, KH * KW * c_blocks):
            kp = it // c_blocks
            c0 = (it - kp * c_blocks) * BLOCK_K
            ky = kp // KW
            kx = kp - ky * KW
            hi = hi0 + ky * dil_h
            wi = wi0 + kx * dil_w
            valid = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            pix = img + (hi * W + wi) * C  # start of each row's channel run
            a_ptrs = x_ptr + pix[:, None] + (c0 + offs_k)[None, :]
            w_ptrs = w_rows + (kp * C + c0)
            if EVEN_C:
                if HAS_XZP:
                    a = tl.load(a_ptrs, mask=valid[:, None], other=pad_code)
                else:
                    a = tl.load(a_ptrs, mask=valid[:, None], other=0)
                w = tl.load(w_ptrs)
            else:
                c_mask = (c0 + offs_k)[None, :] < C  # the channel tail's weights are 0: any code there
                if HAS_XZP:
                    a = tl.load(a_ptrs, mask=valid[:, None] & c_mask, other=pad_code)
                else:
                    a = tl.load(a_ptrs, mask=valid[:, None] & c_mask, other=0)
                w = tl.load(w_ptrs, mask=c_mask, other=0)
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        _epilogue(acc, offs_m, offs_n, M, O, x_scale, ws_ptr, b_ptr, r_ptr, y_ptr,
                  stride_rm, stride_rn, O, 1, res_scale, inv_out_scale,
                  x_zp, wsum_ptr, res_zp, out_lo, out_hi, out_zp, om_ptr, rm_ptr,
                  HAS_BIAS, HAS_RESIDUAL, ACTIVATION, OUT_INT8, RES_AFTER_ACT, HAS_XZP, 0, False,
                  HAS_OUT_MUL, HAS_RES_MUL)  # fmt: skip

    @triton.jit
    def _int8_conv2d_packed_kernel(
        x_ptr, w_ptr, ws_ptr, b_ptr, r_ptr, y_ptr,
        M, O, C, H, W, Ho, Wo, x_scale, res_scale, inv_out_scale, x_zp, wsum_ptr, res_zp, out_lo, out_hi, out_zp,
        om_ptr, rm_ptr,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, stride_xb, stride_wo, stride_rm, stride_rn,
        KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        ACTIVATION: tl.constexpr, OUT_INT8: tl.constexpr, RES_AFTER_ACT: tl.constexpr, HAS_XZP: tl.constexpr,
        EVEN_K: tl.constexpr,  # KH * KW * C % BLOCK_K == 0: no mask on the K tail
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        HAS_OUT_MUL: tl.constexpr, HAS_RES_MUL: tl.constexpr,
    ):  # fmt: skip
        """:func:`_int8_conv2d_kernel` (same arguments, gather and epilogue) with the K loop over the flattened
        (kernel point, channel) axis in BLOCK_K steps, as the weights lie ([O, KH*KW*C]): a K tile may span two
        kernel points, so channel counts that do not fill BLOCK_K (YOLOX-x's 80 / 160 / 320, 3x3) waste no MMA
        on masked channels and run full-width tiles. Needs C % 16 == 0: each run of 16 K positions stays in
        one kernel point, a contiguous 16-byte NHWC load (the hint below)."""
        offs_m, offs_n, rn, hi0, wi0, img = _conv_tile_pixels(M, O, Ho, Wo, stride_h, stride_w, pad_h, pad_w,
                                                              stride_xb, BLOCK_M, BLOCK_N, GROUP_M)
        offs_k = tl.arange(0, BLOCK_K)
        k_total = KH * KW * C
        w_rows = w_ptr + rn[:, None] * stride_wo
        pad_code = x_zp.to(tl.int8)  # the code of 0 (symmetric: 0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, k_total, BLOCK_K):
            k = k0 + offs_k
            kp = k // C
            c = k - kp * C
            ky = kp // KW
            kx = kp - ky * KW
            hi = hi0[:, None] + (ky * dil_h)[None, :]
            wi = wi0[:, None] + (kx * dil_w)[None, :]
            valid = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            off = img[:, None] + ((hi * W + wi) * C + c[None, :])
            off = tl.max_contiguous(tl.multiple_of(off, [1, 16]), [1, 16])
            if EVEN_K:
                if HAS_XZP:
                    a = tl.load(x_ptr + off, mask=valid, other=pad_code)
                else:
                    a = tl.load(x_ptr + off, mask=valid, other=0)
                w = tl.load(w_rows + k[None, :])
            else:
                k_in = (k < k_total)[None, :]  # past the last kernel point: weight 0, any code
                if HAS_XZP:
                    a = tl.load(x_ptr + off, mask=valid & k_in, other=pad_code)
                else:
                    a = tl.load(x_ptr + off, mask=valid & k_in, other=0)
                w = tl.load(w_rows + k[None, :], mask=k_in, other=0)
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        _epilogue(acc, offs_m, offs_n, M, O, x_scale, ws_ptr, b_ptr, r_ptr, y_ptr,
                  stride_rm, stride_rn, O, 1, res_scale, inv_out_scale,
                  x_zp, wsum_ptr, res_zp, out_lo, out_hi, out_zp, om_ptr, rm_ptr,
                  HAS_BIAS, HAS_RESIDUAL, ACTIVATION, OUT_INT8, RES_AFTER_ACT, HAS_XZP, 0, False,
                  HAS_OUT_MUL, HAS_RES_MUL)  # fmt: skip


    @triton.jit
    def _int8_conv2d_tma_kernel(
        x_desc,  # TMA descriptor of x_q (NHWC) viewed [N, H / sh, sh, W / sw, sw * C], box [1, BH, 1, BW, BK]
        w_desc,  # TMA descriptor of w_q as [O, KH*KW*C], box [BN, BK]
        ws_ptr, b_ptr, r_ptr, y_ptr,
        M, O, C, Ho, Wo, x_scale, res_scale, inv_out_scale, res_zp, out_lo, out_hi, out_zp, om_ptr, rm_ptr,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, stride_rm, stride_rn,
        KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        ACTIVATION: tl.constexpr, OUT_INT8: tl.constexpr, RES_AFTER_ACT: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_OUT_MUL: tl.constexpr, HAS_RES_MUL: tl.constexpr,
    ):  # fmt: skip
        """The implicit GEMM with both operands brought by the tensor-memory accelerator (TMA): the tile is a
        BLOCK_H x BLOCK_W block of output pixels of one image, and for each (kernel point, channel block) its
        A slab is ONE box load of the input, the block of input pixels that kernel point reads. The padding
        costs nothing: TMA fills coordinates outside the tensor (negative ones included) with 0, the code of
        0 for symmetric activations. A stride s is a phase of the descriptor's view: input row h = s * q + p
        is coordinate (q, p) of [H / s, s], so output row oh at kernel offset d = ky * dil - pad reads
        (oh + floor(d / s), d mod s). Needs C % BLOCK_K == 0 (a box never straddles two phases' channels),
        H and W divisible by the stride, and no input zero point (TMA pads with 0, not the zero point's code).
        Pixels of the block past the output's edge are computed on whatever the box holds and not stored."""
        pid = tl.program_id(0)
        tiles_n = tl.cdiv(O, BLOCK_N)
        tiles_w = tl.cdiv(Wo, BLOCK_W)
        tiles_h = tl.cdiv(Ho, BLOCK_H)
        pid_n = pid % tiles_n  # the output-channel tiles of one pixel block run side by side (A from L2)
        t = pid // tiles_n
        ow0 = (t % tiles_w) * BLOCK_W
        t = t // tiles_w
        oh0 = (t % tiles_h) * BLOCK_H
        img = t // tiles_h
        c_blocks = C // BLOCK_K
        acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_N), dtype=tl.int32)
        for it in range(0, KH * KW * c_blocks):
            kp = it // c_blocks
            c0 = (it - kp * c_blocks) * BLOCK_K
            ky = kp // KW
            kx = kp - ky * KW
            dh = ky * dil_h - pad_h
            dw = kx * dil_w - pad_w
            qh = (dh + 64 * stride_h) // stride_h - 64  # floor division of a possibly negative offset
            qw = (dw + 64 * stride_w) // stride_w - 64
            a = x_desc.load([img, oh0 + qh, dh - qh * stride_h, ow0 + qw, (dw - qw * stride_w) * C + c0])
            a = tl.reshape(a, (BLOCK_H * BLOCK_W, BLOCK_K))
            w = w_desc.load([pid_n * BLOCK_N, kp * C + c0])
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        rows = tl.arange(0, BLOCK_H * BLOCK_W)
        oh = oh0 + rows // BLOCK_W
        ow = ow0 + rows % BLOCK_W
        offs_m = tl.where((oh < Ho) & (ow < Wo), (img * Ho + oh) * Wo + ow, M)  # M: masked in the epilogue
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _epilogue(acc, offs_m, offs_n, M, O, x_scale, ws_ptr, b_ptr, r_ptr, y_ptr,
                  stride_rm, stride_rn, O, 1, res_scale, inv_out_scale,
                  0, ws_ptr, res_zp, out_lo, out_hi, out_zp, om_ptr, rm_ptr,
                  HAS_BIAS, HAS_RESIDUAL, ACTIVATION, OUT_INT8, RES_AFTER_ACT, False, 0, False,
                  HAS_OUT_MUL, HAS_RES_MUL)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# launchers (callable on CPU tensors under the interpreter; ``out`` lets tests poison the output)


def _dense_like(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``empty_like`` keeps the strides of a dense tensor (so channels-last stays channels-last)."""
    return torch.empty_like(x, dtype=dtype)


def _check_out(out: Tensor | None, ref: Tensor) -> Tensor:
    if out is None:
        return ref
    if out.shape != ref.shape or out.dtype != ref.dtype or out.device != ref.device or out.stride() != ref.stride():
        raise ValueError(f"out must be a {ref.dtype} tensor of shape {list(ref.shape)} and strides {ref.stride()} "
                         f"on {ref.device}, got {out.dtype} {list(out.shape)} {out.stride()} on {out.device}")
    return out


def _quantize_per_tensor_triton(x: Tensor, scale: float, out: Tensor | None = None, *, zero_point: int = 0) -> Tensor:
    """Flat kernel over the dense storage: y gets x's strides (channels-last in, channels-last out)."""
    y = _check_out(out, _dense_like(x, torch.int8))
    if y.numel() == 0:
        return y
    if x.stride() != y.stride():  # x not dense (a slice): copy it into y's dense layout first
        x = torch.empty_like(y, dtype=x.dtype).copy_(x)
    block = 1024 if x.device.type != "cuda" else 4096
    grid = (triton.cdiv(x.numel(), block),)
    lo, hi = code_range(zero_point)
    _quantize_per_tensor_kernel[grid](x, y, x.numel(), float(scale), float(lo - zero_point), float(hi - zero_point),
                                      float(zero_point), BLOCK=block, num_warps=8)
    return y


def _epilogue_args(residual_scale, out_scale, residual_zero_point=0, out_zero_point=0) -> tuple[float, ...]:
    """(res_scale, inv_out_scale, res_zp, out_lo, out_hi, out_zp) kernel scalars; the reciprocal is
    rounded to fp32 as the reference does."""
    inv = 1.0 if out_scale is None else torch.tensor(1.0 / out_scale, dtype=torch.float32).item()
    lo, hi = code_range(out_zero_point)
    return ((1.0 if residual_scale is None else float(residual_scale)), inv, float(residual_zero_point),
            float(lo - out_zero_point), float(hi - out_zero_point), float(out_zero_point))


def weight_sums(w_q: Tensor) -> Tensor:
    """``w_sum[n] = sum_k w_q[n, k]`` (int32) of int8 weights ``[N, ...]``: what an input zero point
    costs the epilogue (``z * w_sum[n]``); computed once per layer at conversion."""
    return w_q.reshape(w_q.shape[0], -1).sum(1, dtype=torch.int32)


def _out_dtype(out_dtype: str, out_scale: float | None) -> torch.dtype:
    return torch.int8 if out_scale is not None else OUT_DTYPES[out_dtype]


def _w_sum_arg(x_zero_point: int, w_sum: Tensor | None, w_q: Tensor) -> Tensor | None:
    """The w_sum a zero-point input needs (computed here when the caller has none), else None."""
    if not x_zero_point:
        return None
    return w_sum if w_sum is not None else weight_sums(w_q)


def _linear_launch(x2, w_q, x_scale, w_scale, bias, r2, activation, y2, config, residual_scale=None, out_scale=None,
                   residual_after_act=False, x_zero_point=0, w_sum=None, residual_zero_point=0, out_zero_point=0,
                   out_mul=None, residual_mul=None):
    m, k = x2.shape
    n = w_q.shape[0]
    config = tuple(config or gemm_config(m, n, k, x2.device))
    bm, bn, bk, group_m, warps, stages = config[:6]
    per_sm = config[6] if len(config) == 7 else 0
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    dummy = w_scale
    w_sum = _w_sum_arg(x_zero_point, w_sum, w_q)
    res_scale, inv_out, res_zp, out_lo, out_hi, out_zp = _epilogue_args(residual_scale, out_scale,
                                                                        residual_zero_point, out_zero_point)
    args = (x2, w_q, w_scale, dummy if bias is None else bias, dummy if r2 is None else r2, y2,
            m, n, k, float(x_scale), res_scale, inv_out,
            int(x_zero_point), dummy if w_sum is None else w_sum, res_zp, out_lo, out_hi, out_zp,
            dummy if out_mul is None else out_mul, dummy if residual_mul is None else residual_mul,
            x2.stride(0), w_q.stride(0),
            0 if r2 is None else r2.stride(0), 0 if r2 is None else r2.stride(1), y2.stride(0), y2.stride(1))
    if per_sm:  # a few programs per SM walk the tiles (the interpreter: per_sm programs)
        sms = _num_sms(x2.device.index if x2.device.index is not None else torch.cuda.current_device()) \
            if x2.device.type == "cuda" else 1
        programs = min(tiles, per_sm * sms)
        kernel, grid, args = _int8_linear_persistent_kernel, (programs,), (*args, programs)
    else:
        kernel, grid = _int8_linear_kernel, (tiles,)
    kernel[grid](
        *args,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=r2 is not None, ACTIVATION=_ACT_CODE[activation],
        OUT_INT8=out_scale is not None, RES_AFTER_ACT=bool(residual_after_act), HAS_XZP=w_sum is not None,
        EVEN_K=k % bk == 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m,
        PRELOAD_RES=r2 is not None and preloads_residual(bm, bn, warps, r2.element_size()),
        HAS_OUT_MUL=out_mul is not None, HAS_RES_MUL=residual_mul is not None, num_warps=warps, num_stages=stages,
    )  # fmt: skip


#: Most bytes of residual per thread read before the K loop (16 registers; see :func:`preloads_residual`).
_PRELOAD_BYTES_PER_THREAD = 64


def preloads_residual(block_m: int, block_n: int, warps: int, element_size: int) -> bool:
    """Whether the GEMM kernel reads its residual tile before the K loop. Compiled offline for sm_90 (Triton
    3.9, bias + int8 residual + ReLU + int8 out), reading it early costs 23-37 registers a thread: a 64x64
    tile with 4 warps goes from 96 to 119 (5 to 4 CTAs per SM), 64x128 from 170 to 207 (3 to 2), so small
    tiles keep the late read and hide its latency behind other CTAs. A 128x128 tile with 8 warps holds one
    CTA per SM either way (193 or 229 registers): nothing else would hide the read, so it goes first, when
    it fits ``_PRELOAD_BYTES_PER_THREAD`` (an int8 residual; not fp16's 128 bytes)."""
    return block_m * block_n >= 128 * 128 and block_m * block_n * element_size <= _PRELOAD_BYTES_PER_THREAD * 32 * warps


def _k_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _int8_linear_triton(
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
    residual_scale: float | None = None,
    out_scale: float | None = None,
    residual_after_act: bool = False,
    x_zero_point: int = 0,
    w_sum: Tensor | None = None,
    residual_zero_point: int = 0,
    out_zero_point: int = 0,
    out_mul: Tensor | None = None,
    residual_mul: Tensor | None = None,
) -> Tensor:
    """x_q [..., K] -> [..., N]. Operands that are not K-contiguous are copied (the slow layout is
    never fed to the dot); ``config`` forces (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages)."""
    k = x_q.shape[-1]
    n = w_q.shape[0]
    lead = x_q.shape[:-1]
    y = _check_out(out, torch.empty((*lead, n), dtype=_out_dtype(out_dtype, out_scale), device=x_q.device))
    if y.numel() == 0:
        return y
    zps = (x_zero_point, residual_zero_point, out_zero_point)
    if k == 0:  # empty sum: the epilogue alone
        return y.copy_(reference_int8_linear(x_q, w_q, x_scale, w_scale, bias, residual, activation, out_dtype,
                                             residual_scale, out_scale, residual_after_act, *zps, out_mul,
                                             residual_mul))
    x2 = _k_contiguous(x_q.reshape(-1, k))
    r2 = None if residual is None else residual.reshape(-1, n)
    _linear_launch(x2, _k_contiguous(w_q), x_scale, w_scale, bias, r2, activation, y.view(-1, n), config,
                   residual_scale, out_scale, residual_after_act, x_zero_point, w_sum, residual_zero_point,
                   out_zero_point, out_mul, residual_mul)
    return y


def _int8_conv2d_triton(
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
    residual_scale: float | None = None,
    out_scale: float | None = None,
    residual_after_act: bool = False,
    x_zero_point: int = 0,
    w_sum: Tensor | None = None,
    residual_zero_point: int = 0,
    out_zero_point: int = 0,
    out_mul: Tensor | None = None,
    residual_mul: Tensor | None = None,
) -> Tensor:
    """NHWC implicit GEMM (1x1 / stride 1 / no padding: the linear kernel on the NHWC views).
    An input or residual not in channels-last memory is copied to it first (one int8 relayout)."""
    n, c, h, w = x_q.shape
    o, kh, kw, _ = w_q.shape
    ho = _conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    wo = _conv_out_size(w, kw, stride[1], padding[1], dilation[1])
    y = torch.empty((n, o, ho, wo), dtype=_out_dtype(out_dtype, out_scale), device=x_q.device,
                    memory_format=torch.channels_last)
    y = _check_out(out, y)
    if y.numel() == 0:
        return y
    if c == 0:
        return y.copy_(reference_int8_conv2d(x_q, w_q, x_scale, w_scale, bias, stride, padding, dilation, groups,
                                             residual, activation, out_dtype, residual_scale, out_scale,
                                             residual_after_act, x_zero_point, residual_zero_point, out_zero_point,
                                             out_mul, residual_mul))
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
    if conv_runs_gemm_kernel((kh, kw), stride, padding):
        x2 = x_q.permute(0, 2, 3, 1).reshape(m, c)
        _linear_launch(x2, w_q.reshape(o, c), x_scale, w_scale, bias, r2, activation, y2, config, residual_scale,
                       out_scale, residual_after_act, x_zero_point, w_sum, residual_zero_point, out_zero_point,
                       out_mul, residual_mul)
        return y
    kind = config[6] if config is not None and len(config) == 7 else 0
    if kind not in (0, PACKED_K, TMA):
        raise ValueError(f"config {list(config)}: a persistent launch is for the GEMM kernel (linears and 1x1, "
                         f"stride-1, unpadded convs), not a {kh}x{kw} stride {list(stride)} conv (a conv's 7th "
                         f"entry {PACKED_K} asks for the packed-K kernel, {TMA} for the TMA kernel)")
    if kind == TMA:
        _conv_tma_launch(x_q, w_q, x_scale, w_scale, bias, stride, padding, dilation, r2, activation, y2, config,
                         residual_scale, out_scale, residual_after_act, x_zero_point, residual_zero_point,
                         out_zero_point, ho, wo, out_mul, residual_mul)
        return y
    packed = kind == PACKED_K
    if packed and c % 16:
        raise ValueError(f"config {list(config)}: the packed-K conv kernel needs channels % 16 == 0, got {c}")
    bm, bn, bk, group_m, warps, stages = (config or gemm_config(m, o, c, x_q.device))[:6]
    if x_q.is_cuda and bk < 32:  # the interpreter multiplies any tile; the compiler rejects it deep inside
        raise ValueError(f"config {list(config)}: int8 tensor-core dots need BLOCK_K >= 32 on the GPU, got {bk}")
    grid = (triton.cdiv(m, bm) * triton.cdiv(o, bn),)
    dummy = w_scale
    w_sum = _w_sum_arg(x_zero_point, w_sum, w_q)
    res_scale, inv_out, res_zp, out_lo, out_hi, out_zp = _epilogue_args(residual_scale, out_scale,
                                                                        residual_zero_point, out_zero_point)
    kernel, k_even = ((_int8_conv2d_packed_kernel, dict(EVEN_K=(kh * kw * c) % bk == 0)) if packed else
                      (_int8_conv2d_kernel, dict(EVEN_C=c % bk == 0)))
    kernel[grid](
        x_q, w_q, w_scale, dummy if bias is None else bias, dummy if r2 is None else r2, y2,
        m, o, c, h, w, ho, wo, float(x_scale), res_scale, inv_out,
        int(x_zero_point), dummy if w_sum is None else w_sum, res_zp, out_lo, out_hi, out_zp,
        dummy if out_mul is None else out_mul, dummy if residual_mul is None else residual_mul,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        h * w * c, kh * kw * c, 0 if r2 is None else r2.stride(0), 0 if r2 is None else r2.stride(1),
        KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_RESIDUAL=r2 is not None, ACTIVATION=_ACT_CODE[activation],
        OUT_INT8=out_scale is not None, RES_AFTER_ACT=bool(residual_after_act), HAS_XZP=w_sum is not None,
        **k_even,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, HAS_OUT_MUL=out_mul is not None,
        HAS_RES_MUL=residual_mul is not None, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y


def tma_conv_problem(c: int, h: int, w: int, stride, x_zero_point: int, config: Config) -> str | None:
    """Why the TMA conv kernel cannot run this conv with ``config`` (None: it can); see its docstring."""
    bm, _, bk, bw = config[:4]
    if x_zero_point:
        return "an input zero point (TMA pads with 0, not the zero point's code)"
    if bk % 16 or c % bk:
        return f"channels {c} not a multiple of BLOCK_K {bk} (a multiple of 16)"
    if h % stride[0] or w % stride[1]:
        return f"input {h}x{w} not divisible by the stride {list(stride)}"
    if bm % bw:
        return f"BLOCK_M {bm} not a multiple of the tile width {bw}"
    return None


def _conv_tma_launch(x_q, w_q, x_scale, w_scale, bias, stride, padding, dilation, r2, activation, y2, config,
                     residual_scale, out_scale, residual_after_act, x_zero_point, residual_zero_point,
                     out_zero_point, ho, wo, out_mul=None, residual_mul=None) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    n, c, h, w = x_q.shape
    o, kh, kw, _ = w_q.shape
    bm, bn, bk, bw, warps, stages = config[:6]
    if problem := tma_conv_problem(c, h, w, stride, x_zero_point, config):
        raise ValueError(f"config {list(config)}: the TMA conv kernel cannot run this conv: {problem}")
    if x_q.is_cuda and torch.cuda.get_device_capability(x_q.device)[0] < 9:
        raise ValueError(f"config {list(config)}: the TMA conv kernel needs a Hopper GPU or newer (TMA)")
    sh, sw = stride
    x_desc = TensorDescriptor(x_q.permute(0, 2, 3, 1), [n, h // sh, sh, w // sw, sw * c],
                              [h * w * c, sh * w * c, w * c, sw * c, 1], [1, bm // bw, 1, bw, bk])
    k = kh * kw * c
    w_desc = TensorDescriptor(w_q.reshape(o, k), [o, k], [k, 1], [bn, bk])
    res_scale, inv_out, res_zp, out_lo, out_hi, out_zp = _epilogue_args(residual_scale, out_scale,
                                                                        residual_zero_point, out_zero_point)
    m = n * ho * wo
    grid = (n * triton.cdiv(ho, bm // bw) * triton.cdiv(wo, bw) * triton.cdiv(o, bn),)
    dummy = w_scale
    _int8_conv2d_tma_kernel[grid](
        x_desc, w_desc, w_scale, dummy if bias is None else bias, dummy if r2 is None else r2, y2,
        m, o, c, ho, wo, float(x_scale), res_scale, inv_out, res_zp, out_lo, out_hi, out_zp,
        dummy if out_mul is None else out_mul, dummy if residual_mul is None else residual_mul,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        0 if r2 is None else r2.stride(0), 0 if r2 is None else r2.stride(1),
        KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_RESIDUAL=r2 is not None, ACTIVATION=_ACT_CODE[activation],
        OUT_INT8=out_scale is not None, RES_AFTER_ACT=bool(residual_after_act),
        BLOCK_H=bm // bw, BLOCK_W=bw, BLOCK_N=bn, BLOCK_K=bk, HAS_OUT_MUL=out_mul is not None,
        HAS_RES_MUL=residual_mul is not None, num_warps=warps, num_stages=stages,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# registration


def _inference_only(name: str):
    def backward(ctx, grad_output):
        raise RuntimeError(
            f"bevdeploy::{name} is inference-only: int8 codes have no gradient. Train or fine-tune the float "
            "model (QAT with fake quantization), then convert it with bevdeploy.quant.modules.quantize_modules."
        )

    def setup_context(ctx, inputs, output):
        pass

    return backward, setup_context


def _config(config: list[int] | None) -> Config | None:
    return None if config is None else tuple(int(v) for v in config)


@torch.library.custom_op("bevdeploy::quantize_per_tensor", mutates_args=())
def _quantize_per_tensor_op(x: Tensor, scale: float, zero_point: int = 0) -> Tensor:
    if use_triton(x):
        return _quantize_per_tensor_triton(x, scale, zero_point=zero_point)
    out = _dense_like(x, torch.int8)
    return out.copy_(reference_quantize_per_tensor(x, scale, zero_point))


@_quantize_per_tensor_op.register_fake
def _(x, scale, zero_point=0):
    _check_quantize(x, scale, zero_point)
    return _dense_like(x, torch.int8)


@torch.library.custom_op("bevdeploy::int8_linear", mutates_args=())
def _int8_linear_op(
    x_q: Tensor,
    w_q: Tensor,
    x_scale: float,
    w_scale: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    activation: str,
    out_dtype: str,
    residual_scale: float | None = None,
    out_scale: float | None = None,
    config: list[int] | None = None,
    residual_after_act: bool = False,
    x_zero_point: int = 0,
    w_sum: Tensor | None = None,
    residual_zero_point: int = 0,
    out_zero_point: int = 0,
    out_mul: Tensor | None = None,
    residual_mul: Tensor | None = None,
) -> Tensor:
    if use_triton(x_q):
        return _int8_linear_triton(x_q, w_q, x_scale, w_scale, bias, residual, activation, out_dtype,
                                   config=_config(config), residual_scale=residual_scale, out_scale=out_scale,
                                   residual_after_act=residual_after_act, x_zero_point=x_zero_point, w_sum=w_sum,
                                   residual_zero_point=residual_zero_point, out_zero_point=out_zero_point,
                                   out_mul=out_mul, residual_mul=residual_mul)
    return reference_int8_linear(x_q, w_q, x_scale, w_scale, bias, residual, activation, out_dtype, residual_scale,
                                 out_scale, residual_after_act, x_zero_point, residual_zero_point,
                                 out_zero_point, out_mul, residual_mul).contiguous()


@_int8_linear_op.register_fake
def _(x_q, w_q, x_scale, w_scale, bias, residual, activation, out_dtype, residual_scale=None, out_scale=None,
      config=None, residual_after_act=False, x_zero_point=0, w_sum=None, residual_zero_point=0, out_zero_point=0,
      out_mul=None, residual_mul=None):
    shape = _check_linear(x_q, w_q, x_scale, w_scale, bias, residual, activation, out_dtype, residual_scale,
                          out_scale, config)
    _check_zero_points(w_q.shape[0], x_zero_point, w_sum, residual, residual_zero_point, out_scale, out_zero_point)
    _check_channel_muls(w_q.shape[0], out_mul, residual_mul, residual)
    return x_q.new_empty(shape, dtype=_out_dtype(out_dtype, out_scale))


@torch.library.custom_op("bevdeploy::int8_conv2d", mutates_args=())
def _int8_conv2d_op(
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
    residual_scale: float | None = None,
    out_scale: float | None = None,
    config: list[int] | None = None,
    residual_after_act: bool = False,
    x_zero_point: int = 0,
    w_sum: Tensor | None = None,
    residual_zero_point: int = 0,
    out_zero_point: int = 0,
    out_mul: Tensor | None = None,
    residual_mul: Tensor | None = None,
) -> Tensor:
    if use_triton(x_q):
        return _int8_conv2d_triton(x_q, w_q, x_scale, w_scale, bias, stride, padding, dilation, groups, residual,
                                   activation, out_dtype, config=_config(config), residual_scale=residual_scale,
                                   out_scale=out_scale, residual_after_act=residual_after_act,
                                   x_zero_point=x_zero_point, w_sum=w_sum, residual_zero_point=residual_zero_point,
                                   out_zero_point=out_zero_point, out_mul=out_mul, residual_mul=residual_mul)
    return reference_int8_conv2d(x_q, w_q, x_scale, w_scale, bias, stride, padding, dilation, groups, residual,
                                 activation, out_dtype, residual_scale, out_scale, residual_after_act, x_zero_point,
                                 residual_zero_point, out_zero_point, out_mul, residual_mul)


@_int8_conv2d_op.register_fake
def _(x_q, w_q, x_scale, w_scale, bias, stride, padding, dilation, groups, residual, activation, out_dtype,
      residual_scale=None, out_scale=None, config=None, residual_after_act=False, x_zero_point=0, w_sum=None,
      residual_zero_point=0, out_zero_point=0, out_mul=None, residual_mul=None):
    shape = _check_conv(x_q, w_q, x_scale, w_scale, bias, stride, padding, dilation, groups, residual, activation,
                        out_dtype, residual_scale, out_scale, config)
    _check_zero_points(w_q.shape[0], x_zero_point, w_sum, residual, residual_zero_point, out_scale, out_zero_point)
    _check_channel_muls(w_q.shape[0], out_mul, residual_mul, residual)
    return torch.empty(shape, dtype=_out_dtype(out_dtype, out_scale), device=x_q.device,
                       memory_format=torch.channels_last)


for _op, _name in ((_quantize_per_tensor_op, "quantize_per_tensor"), (_int8_linear_op, "int8_linear"),
                   (_int8_conv2d_op, "int8_conv2d")):
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


def _opt_float(v):
    return None if v is None else float(v)


def _opt_list(config):
    return None if config is None else [int(v) for v in config]


def quantize_per_tensor(x: Tensor, scale: float, zero_point: int = 0) -> Tensor:
    """Per-tensor int8 quantization in one fused pass (symmetric, or with a zero point).

    Args:
        x (Tensor[...]): float32 / float16 / bfloat16, any shape and memory format.
        scale (float): the calibrated scale (amax / 127); codes are ``round_half_even(x / scale)``
            in fp32, clamped to [-127, 127] (-128 is never produced, as TensorRT's symmetric int8).
        zero_point (int): asymmetric codes ``round_half_even(x / scale) + zero_point`` clamped to
            [-128, 127] (``x ~= scale * (q - zero_point)``); 0: the symmetric codes above.

    Returns:
        Tensor[...]: int8 codes, same shape and strides as ``x`` when it is dense (a channels-last
        input gives a channels-last output), else contiguous in ``x``'s suggested memory format.
    """
    _check_quantize(x, scale, zero_point)
    return _quantize_per_tensor_op(x, float(scale), int(zero_point))


def int8_linear(
    x_q: Tensor,
    w_q: Tensor,
    x_scale: float,
    w_scale: Tensor,
    bias: Tensor | None = None,
    *,
    residual: Tensor | None = None,
    residual_scale: float | None = None,
    activation: str = "none",
    out_dtype: torch.dtype | str = torch.float16,
    out_scale: float | None = None,
    config: Config | None = None,
    residual_after_act: bool = False,
    x_zero_point: int = 0,
    w_sum: Tensor | None = None,
    residual_zero_point: int = 0,
    out_zero_point: int = 0,
    out_mul: Tensor | None = None,
    residual_mul: Tensor | None = None,
) -> Tensor:
    """``act(x_scale * w_scale[n] * (x_q @ w_q.T)[.., n] + bias[n] + residual)`` with int8 tensor-core math.

    Args:
        x_q (Tensor[..., K]): int8 input codes (last dim contiguous is the fast layout).
        w_q (Tensor[N, K]): int8 weight codes, nn.Linear's layout (K-contiguous).
        x_scale (float): per-tensor scale of ``x_q``.
        w_scale (Tensor[N]): float32 per-output-channel weight scales.
        bias (Tensor[N], optional): float bias, added after dequantization.
        residual (Tensor[..., N], optional): added before the activation: a float tensor, or int8
            codes with their per-tensor ``residual_scale``.
        residual_scale (float, optional): scale of an int8 ``residual`` (required for one, else None).
        activation (str): ``"none"``, ``"relu"`` or ``"silu"``.
        out_dtype (torch.dtype): torch.float16 (default) or torch.float32 (ignored with ``out_scale``).
        out_scale (float, optional): write int8 codes ``clamp(round_half_even(y / out_scale), -127, 127)``
            (symmetric; see ``out_zero_point``) of the epilogue's result instead of floats: the
            consumer's calibrated input scale, so it reads them directly.
        config (tuple of 6 ints, optional): launch configuration (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
            warps, stages), e.g. a layer's autotuned choice; default: :func:`gemm_config`.
        residual_after_act (bool): add the residual after the activation instead of before it:
            ``act(... + bias[n]) + residual`` (YOLOX's ``DarknetBottleneck``: x + SiLU(conv(...))).
        x_zero_point (int): zero point of ``x_q`` (``x ~= x_scale * (x_q - x_zero_point)``; 0: symmetric).
        w_sum (Tensor[N] int32, optional): :func:`weight_sums` of ``w_q``, used with ``x_zero_point``
            (computed here when None; layers pass it precomputed so an engine holds it as a constant).
        residual_zero_point (int): zero point of an int8 ``residual``.
        out_zero_point (int): zero point of the int8 output (with ``out_scale``): codes
            ``round_half_even(y / out_scale) + out_zero_point`` clamped to [-128, 127].
        out_mul (Tensor[N] float32, optional): output channel n is multiplied by ``out_mul[n]`` after the
            activation and residual, before the store or requantization (a smoothed consumer's divisor,
            :mod:`bevdeploy.quant.smooth`, applied here so the tensor between them stays int8).
        residual_mul (Tensor[N] float32, optional): the residual's channel n is multiplied by ``residual_mul[n]``
            after its dequantization (a smoothed tensor read back as an identity: undoes its producer's
            ``out_mul``).

    Returns:
        Tensor[..., N]: contiguous, ``out_dtype`` (int8 with ``out_scale``).
    """
    out_dtype = _out_dtype_name(out_dtype)
    _check_linear(x_q, w_q, x_scale, w_scale, bias, residual, activation, out_dtype, residual_scale, out_scale,
                  config)
    _check_zero_points(w_q.shape[0], x_zero_point, w_sum, residual, residual_zero_point, out_scale, out_zero_point)
    _check_channel_muls(w_q.shape[0], out_mul, residual_mul, residual)
    if x_zero_point and w_sum is None:
        w_sum = weight_sums(w_q)
    return _int8_linear_op(x_q, w_q, float(x_scale), w_scale, bias, residual, activation, out_dtype,
                           _opt_float(residual_scale), _opt_float(out_scale), _opt_list(config),
                           bool(residual_after_act), int(x_zero_point), w_sum if x_zero_point else None,
                           int(residual_zero_point), int(out_zero_point), out_mul, residual_mul)


def int8_conv2d(
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
    residual_scale: float | None = None,
    activation: str = "none",
    out_dtype: torch.dtype | str = torch.float16,
    out_scale: float | None = None,
    config: Config | None = None,
    residual_after_act: bool = False,
    x_zero_point: int = 0,
    w_sum: Tensor | None = None,
    residual_zero_point: int = 0,
    out_zero_point: int = 0,
    out_mul: Tensor | None = None,
    residual_mul: Tensor | None = None,
) -> Tensor:
    """2-D convolution on int8 codes with int8 tensor-core math and a fused epilogue.

    Args:
        x_q (Tensor[N, C, H, W]): int8 input codes in channels-last memory (NHWC); another layout is
            copied to channels-last first.
        w_q (Tensor[O, kh, kw, C]): int8 weight codes, K-contiguous (``conv.weight.permute(0, 2, 3, 1)``).
        x_scale (float): per-tensor scale of ``x_q``.
        w_scale (Tensor[O]): float32 per-output-channel weight scales.
        bias (Tensor[O], optional): float bias (BN folded in), added after dequantization.
        stride, padding, dilation (int or (int, int)): as ``F.conv2d`` (zero padding).
        groups (int): 1 only (NotImplementedError otherwise).
        residual (Tensor[N, O, Ho, Wo], optional): added before the activation (the ResNet identity):
            float, or int8 codes with ``residual_scale``; channels-last memory avoids a copy.
        residual_scale (float, optional): scale of an int8 ``residual`` (required for one, else None).
        activation (str): ``"none"``, ``"relu"`` or ``"silu"``.
        out_dtype (torch.dtype): torch.float16 (default) or torch.float32 (ignored with ``out_scale``).
        out_scale (float, optional): write int8 codes of this scale (the consumer's input scale),
            ``clamp(round_half_even(y / out_scale), -127, 127)``, instead of floats.
        config (tuple of 6 ints, optional): launch configuration, as :func:`int8_linear`'s.
        residual_after_act (bool): ``act(... + bias[o]) + residual`` instead of ``act(... + residual)``
            (YOLOX's ``DarknetBottleneck``: the identity is added to the SiLU output).
        x_zero_point (int): zero point of ``x_q`` (``x ~= x_scale * (x_q - x_zero_point)``; 0: symmetric);
            the padding holds it (the code of 0).
        w_sum (Tensor[O] int32, optional): :func:`weight_sums` of ``w_q``, used with ``x_zero_point``
            (computed here when None; layers pass it precomputed so an engine holds it as a constant).
        residual_zero_point (int): zero point of an int8 ``residual``.
        out_zero_point (int): zero point of the int8 output (with ``out_scale``): codes
            ``round_half_even(y / out_scale) + out_zero_point`` clamped to [-128, 127].
        out_mul (Tensor[N] float32, optional): output channel n is multiplied by ``out_mul[n]`` after the
            activation and residual, before the store or requantization (a smoothed consumer's divisor,
            :mod:`bevdeploy.quant.smooth`, applied here so the tensor between them stays int8).
        residual_mul (Tensor[N] float32, optional): the residual's channel n is multiplied by ``residual_mul[n]``
            after its dequantization (a smoothed tensor read back as an identity: undoes its producer's
            ``out_mul``).

    Returns:
        Tensor[N, O, Ho, Wo]: ``out_dtype`` (int8 with ``out_scale``) in channels-last memory.
    """
    out_dtype = _out_dtype_name(out_dtype)
    stride, padding, dilation = (list(_pair(v)) for v in (stride, padding, dilation))
    _check_conv(x_q, w_q, x_scale, w_scale, bias, stride, padding, dilation, groups, residual, activation, out_dtype,
                residual_scale, out_scale, config)
    _check_zero_points(w_q.shape[0], x_zero_point, w_sum, residual, residual_zero_point, out_scale, out_zero_point)
    _check_channel_muls(w_q.shape[0], out_mul, residual_mul, residual)
    if x_zero_point and w_sum is None:
        w_sum = weight_sums(w_q)
    return _int8_conv2d_op(x_q, w_q, float(x_scale), w_scale, bias, stride, padding, dilation, groups, residual,
                           activation, out_dtype, _opt_float(residual_scale), _opt_float(out_scale),
                           _opt_list(config), bool(residual_after_act), int(x_zero_point),
                           w_sum if x_zero_point else None, int(residual_zero_point), int(out_zero_point), out_mul,
                           residual_mul)
