"""Modulated deformable convolution 2D, DCNv2 (the reference system's ``ModulatedDeformableConv2dTRT``).

Zhu et al., "Deformable ConvNets v2: More Deformable, Better Results", CVPR 2019. Semantics are
exactly mmcv's ``ModulatedDeformConv2d`` (``mmcv/ops/modulated_deform_conv.py`` and the im2col kernel
in ``modulated_deform_conv_cuda_kernel.cuh``), which torchvision's ``deform_conv2d`` shares::

    out[n, o, ho, wo] = bias[o] + sum_{c in group(o), i, j} weight[o, c, i, j] * mask[n, d(c)*K + k, ho, wo]
                        * bilinear(input[n, c], ho*sh - ph + i*dh + dy, wo*sw - pw + j*dw + dx)
    k = i*kw + j,  K = kh*kw,  d(c) = c // (Cin / deform_groups),
    dy = offset[n, d*2K + 2k, ho, wo],  dx = offset[n, d*2K + 2k + 1, ho, wo]

Bilinear sampling reads zero outside the image (a sample at y <= -1 or y >= H is zero as a whole).

Shapes: ``input (Tensor[N, Cin, H, W])``, ``offset (Tensor[N, 2*dg*kh*kw, Ho, Wo])``,
``mask (Tensor[N, dg*kh*kw, Ho, Wo])`` (already sigmoided), ``weight (Tensor[Cout, Cin/groups, kh, kw])``,
``bias (Tensor[Cout])`` -> ``Tensor[N, Cout, Ho, Wo]`` (contiguous; channels-last memory where the
implicit-GEMM kernel runs: ``fp16``/``fp16x2``/``int8`` with groups == 1).

Kernels (no column buffer is ever written):

1. Plan: per (image, deform group, kernel point, output pixel) the int32 offset of the top-left bilinear
   corner and the four corner weights (bilinear x mask, 0 for corners outside the image), read from
   offset/mask once; ~12-20 bytes per record, a few MB at ResNet-DCN sizes.
2. Fused implicit GEMM. A program owns BLOCK_M output pixels of one image x BLOCK_N output channels of
   one conv group. For each K-chunk (one kernel point x BLOCK_K input channels of one deform group) it
   loads the pixels' plan, gathers the four corners as [BLOCK_M, BLOCK_K] channel-contiguous loads
   (channels-last input; any strides work), blends them in registers and feeds ``tl.dot`` with the
   weight tile (weight K-contiguous: channels-last ``[Cout, Cin/g, kh, kw]`` = memory
   ``[Cout, kh, kw, Cin/g]``). The weight tile is the MMA's left operand (BLOCK_N up to 512 is its M
   side, which amortises the sampling) and the pixels are contiguous in the stored NCHW tile. Chunks
   run channel-block outer, kernel-point inner, so the kernel points of one channel block reuse the
   input slab from L1.

3. Implicit GEMM (the default for ``fp16``/``fp16x2``/``int8`` with groups == 1; ``BEVDEPLOY_DCN_IGEMM=0`` turns
   it off): no plan pass. out[m, o] over M = N*Ho*Wo output pixels (images flattened) x N = Cout, K
   loop over (kernel point x deform group) x channel blocks. Per chunk a program reads dy, dx, mask of
   its BLOCK_M pixels straight from ``offset``/``mask`` (any strides: the offset is a channel slice of
   the offset conv's output, read in place), computes the four corner weights, gathers the corners as
   [BLOCK_M, BLOCK_K] channel-contiguous loads of the channels-last input, blends them (times the
   mask) in registers and feeds ``tl.dot`` with the weight tile: channels-last weight is already the
   packed, K-contiguous [Cout, kh*kw*Cin] matrix (``ModulatedDeformConv2d`` keeps it that way), so
   nothing is packed at run time. fp32 accumulate, bias epilogue, channels-last output
   ([N, Cout, Ho, Wo] with channels-last strides; the fake says so). Tiles are timed per layer shape
   on the GPU (:func:`_igemm_candidate_configs`); groups > 1 run kernel 2. ``int8`` (groups 1) gathers
   int8 corners (half the bytes of fp16: the gathers are what the kernel spends its time on), blends the
   codes in paired fp16 into samples in code units and multiplies them with the weight codes on fp16
   MMAs (fp32 accumulate), then the int8 layers' epilogue (:mod:`bevdeploy.quant.int8_epilogue`:
   dequantize, bias, optional ReLU, fp16 or the next layer's int8 codes with ``out_scale`` /
   ``out_zero_point``). The samples are not rounded to codes: a blended sample times its mask is
   smaller than its corners, so rounding it at the input's step costs several times the input's own
   relative error (on the CPU-trained CenterNet the chained heatmap SQNR fell 32.1 -> 16.1 dB that way).
   ``int8_mma=True`` (experiments) rounds them and runs the int8 MMA, as kernel 2 does: timed on an H100
   at 1.66x the fp16x2 kernel (``bench/results/nvidia-h100-80gb-hbm3/dcn-igemm-int8.md``).

Variants: ``fp32`` (fp32 blend, fp32-accurate 3xTF32 dot: ``input_precision="tf32x3"``), ``fp16`` (fp16 storage, fp32 blend, fp16 x fp16 -> fp32
dot), ``fp16x2`` (the blend as HFMA2 on channel pairs, fp16 corner weights), ``int8`` (int8 input with
a per-tensor ``input_scale``, int8 weight with per-output-channel ``weight_scale``: the int8 codes are
blended in paired fp16 (exact codes, fp16 weights); kernel 2 re-quantises the modulated sample to int8
with ``input_scale`` -- round half to even, clamp to +-127 -- and feeds an int8 x int8 -> int32 dot, the
implicit GEMM multiplies the fp16 samples (see 3.);
dequantisation ``input_scale * weight_scale[o]`` and bias in the epilogue; fp16 output, or with groups 1
the fused ReLU / int8 output of ``activation`` / ``out_scale``). Every variant takes ``activation="relu"``:
the implicit GEMM applies it in its epilogue (a ResNet DCN block's ReLU then costs no extra pass over the
output), the other paths after the conv.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from bevdeploy.ops._utils import quantize_weight_per_channel as _quantize_weight_per_channel
from bevdeploy.ops._utils import (
    bf16_as_float32,
    VARIANT_INPUT_DTYPE,
    VARIANT_OUTPUT_DTYPE,
    check_int8_scale,
    check_same_device,
    check_tensor,
    interpreter_enabled,
    new_output,
    register_reference_autograd,
    resolve_variant,
    triton_available,
    use_triton,
)

_FLOAT_AUX = (torch.float32, torch.float16)
_ACTIVATIONS = ("none", "relu")


def _pairs(stride, padding, dilation) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    out = []
    for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        p = tuple(int(x) for x in _pair(v))
        if len(p) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
        out.append(p)
    return out[0], out[1], out[2]


def _output_hw(h, w, kh, kw, stride, padding, dilation):
    ho = (h + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    wo = (w + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    return ho, wo


def _check_inputs(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride,
    padding,
    dilation,
    groups: int,
    deform_groups: int,
    variant: str | None,
    input_scale: float | None,
    weight_scale: Tensor | None,
    activation: str = "none",
    out_scale: float | None = None,
    out_zero_point: int = 0,
    input_zero_point: int = 0,
) -> tuple[str, tuple[int, int, int, int]]:
    """Validate everything; return the resolved variant and the output shape [N, Cout, Ho, Wo]."""
    check_tensor("input", input, shape=("N", "Cin", "H", "W"))
    variant = resolve_variant(variant, input.dtype, "input")
    check_int8_scale("input_scale", input_scale, variant)
    (sh, sw), (ph, pw), (dh, dw) = _pairs(stride, padding, dilation)
    if sh < 1 or sw < 1 or dh < 1 or dw < 1 or ph < 0 or pw < 0:
        raise ValueError(
            f"stride and dilation must be >= 1 and padding >= 0, got stride={(sh, sw)}, "
            f"padding={(ph, pw)}, dilation={(dh, dw)}"
        )
    groups, deform_groups = int(groups), int(deform_groups)
    if groups < 1 or deform_groups < 1:
        raise ValueError(f"groups and deform_groups must be >= 1, got {groups=}, {deform_groups=}")
    n, cin, h, w = input.shape
    if cin % groups != 0:
        raise ValueError(f"input: in_channels {cin} must be divisible by groups={groups}")
    if cin % deform_groups != 0:
        raise ValueError(f"input: in_channels {cin} must be divisible by deform_groups={deform_groups}")
    check_tensor("weight", weight, shape=("Cout", cin // groups, "kh", "kw"),
                 dtypes=(VARIANT_INPUT_DTYPE[variant],))
    cout, _, kh, kw = weight.shape
    if cout % groups != 0:
        raise ValueError(f"weight: out_channels {cout} must be divisible by groups={groups}")
    ho, wo = _output_hw(h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw))
    if ho <= 0 or wo <= 0:
        raise ValueError(f"input: {h}x{w} is too small for the kernel (output would be {ho}x{wo})")
    kk = kh * kw
    check_tensor("offset", offset, shape=(n, 2 * deform_groups * kk, ho, wo), dtypes=_FLOAT_AUX)
    check_tensor("mask", mask, shape=(n, deform_groups * kk, ho, wo), dtypes=_FLOAT_AUX)
    if bias is not None:
        check_tensor("bias", bias, shape=(cout,), dtypes=_FLOAT_AUX)
    if variant == "int8":
        if weight_scale is None:
            raise ValueError("variant 'int8' needs weight_scale (Tensor[Cout] float32, per output channel)")
        check_tensor("weight_scale", weight_scale, shape=(cout,), dtypes=(torch.float32,))
    elif weight_scale is not None:
        raise ValueError(f"weight_scale is only for variant 'int8', got variant {variant!r}")
    _check_int8_epilogue(variant, groups, activation, out_scale, out_zero_point, input_zero_point)
    check_same_device(input=input, offset=offset, mask=mask, weight=weight, bias=bias, weight_scale=weight_scale)
    return variant, (n, cout, ho, wo)


def _check_int8_epilogue(variant: str, groups: int, activation: str, out_scale, out_zero_point: int,
                         input_zero_point: int = 0) -> None:
    """The int8 epilogue (int8 output) and an input zero point exist in the int8 implicit-GEMM kernel only;
    ``activation`` in every variant."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    fused = out_scale is not None or out_zero_point != 0 or input_zero_point != 0
    if fused and not (variant == "int8" and int(groups) == 1):
        raise ValueError(f"out_scale / out_zero_point / input_zero_point need variant 'int8' with "
                         f"groups == 1, got variant {variant!r}, groups {groups}")
    if activation != "none" and variant == "int8" and int(groups) != 1:
        raise ValueError(f"activation with variant 'int8' needs groups == 1, got groups {groups}")
    if not -128 <= int(input_zero_point) <= 127:
        raise ValueError(f"input_zero_point must be in [-128, 127], got {input_zero_point}")
    if out_scale is not None and not (math.isfinite(out_scale) and out_scale > 0):
        raise ValueError(f"out_scale must be a finite positive float, got {out_scale!r}")
    if out_zero_point != 0 and out_scale is None:
        raise ValueError("out_zero_point needs out_scale (it is the int8 output's zero point)")
    if not -128 <= int(out_zero_point) <= 127:
        raise ValueError(f"out_zero_point must be in [-128, 127], got {out_zero_point}")


def _sample_columns(input, offset, mask, kh, kw, stride, padding, dilation, deform_groups) -> Tensor:
    """Deformable im2col: the modulated bilinear samples, Tensor[N, Cin, kh*kw, Ho*Wo], in input's dtype."""
    n, c, h, w = input.shape
    ho, wo = offset.shape[-2:]
    kk = kh * kw
    dg = deform_groups
    dtype, dev = input.dtype, input.device
    off = offset.to(dtype).reshape(n, dg, kk, 2, ho, wo)
    m = mask.to(dtype).reshape(n, dg, kk, ho * wo)
    ki = torch.arange(kh, device=dev).repeat_interleave(kw)
    kj = torch.arange(kw, device=dev).repeat(kh)
    base_y = (torch.arange(ho, device=dev) * stride[0] - padding[0])[None, :, None] + (ki * dilation[0])[:, None, None]
    base_x = (torch.arange(wo, device=dev) * stride[1] - padding[1])[None, None, :] + (kj * dilation[1])[:, None, None]
    y = off[:, :, :, 0] + base_y.to(dtype)  # [N, dg, K, Ho, Wo]
    x = off[:, :, :, 1] + base_x.to(dtype)
    # mmcv: a sample at y <= -1, y >= H (or x likewise) is zero; NaN offsets land there too.
    inside = (y > -1) & (y < h) & (x > -1) & (x < w)
    y = torch.where(inside, y, torch.zeros_like(y))
    x = torch.where(inside, x, torch.zeros_like(x))
    y0 = torch.floor(y).detach()
    x0 = torch.floor(x).detach()
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    y0i, x0i = y0.long(), x0.long()
    src = input.reshape(n, dg, c // dg, h * w)
    cols = 0
    for dy, dx, wgt in ((0, 0, hy * hx), (0, 1, hy * lx), (1, 0, ly * hx), (1, 1, ly * lx)):
        yy, xx = y0i + dy, x0i + dx
        ok = inside & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        idx = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).reshape(n, dg, 1, kk * ho * wo)
        v = torch.gather(src, 3, idx.expand(n, dg, c // dg, kk * ho * wo))
        wgt = torch.where(ok, wgt, torch.zeros_like(wgt)).reshape(n, dg, 1, kk * ho * wo)
        cols = cols + v * wgt
    cols = cols.reshape(n, dg, c // dg, kk, ho * wo) * m[:, :, None]
    return cols.reshape(n, c, kk, ho * wo)


def _grouped_gemm(cols: Tensor, weight: Tensor, groups: int, ho: int, wo: int) -> Tensor:
    """cols [N, Cin, K, L] x weight [Cout, Cin/g, kh, kw] -> [N, Cout, Ho, Wo] (per conv group)."""
    n, c, kk, l = cols.shape
    cout = weight.shape[0]
    a = cols.reshape(n, groups, (c // groups) * kk, l)
    b = weight.reshape(groups, cout // groups, (c // groups) * kk)
    return torch.einsum("gok,ngkl->ngol", b, a).reshape(n, cout, ho, wo)


def reference(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    deform_groups: int = 1,
) -> Tensor:
    """Plain-PyTorch DCNv2 (mmcv's im2col + GEMM) in input's dtype; differentiable; the test oracle."""
    stride, padding, dilation = _pairs(stride, padding, dilation)
    kh, kw = weight.shape[-2:]
    ho, wo = offset.shape[-2:]
    cols = _sample_columns(input, offset, mask, kh, kw, stride, padding, dilation, deform_groups)
    out = _grouped_gemm(cols, weight.to(input.dtype), groups, ho, wo)
    if bias is not None:
        out = out + bias.to(out.dtype)[None, :, None, None]
    return out.contiguous()


def _round_half_even_clamp(x: Tensor) -> Tensor:
    return torch.clamp(torch.round(x), -127, 127)


def _cpu_impl(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    deform_groups: int,
    variant: str,
    input_scale: float,
    weight_scale: Tensor | None,
    activation: str = "none",
    out_scale: float | None = None,
    out_zero_point: int = 0,
    input_zero_point: int = 0,
) -> Tensor:
    """The variant's math in plain PyTorch (the op's CPU path and its autograd formula)."""
    out_dtype = VARIANT_OUTPUT_DTYPE[variant]
    if variant != "int8":
        out = reference(input.float(), offset.float(), mask.float(), weight.float(),
                        None if bias is None else bias.float(), stride, padding, dilation, groups, deform_groups)
        return (torch.relu(out) if activation == "relu" else out).to(out_dtype).contiguous()
    # int8: blend the int8 codes, dequantise per output channel after an exact float64 GEMM. The plan
    # kernel (groups > 1) re-quantises each blended sample with input_scale (rounds the blended code) for an
    # int8 x int8 MMA; the implicit GEMM (groups == 1) multiplies the unrounded samples in fp16.
    stride_, padding_, dilation_ = _pairs(stride, padding, dilation)
    kh, kw = weight.shape[-2:]
    ho, wo = offset.shape[-2:]
    # codes less the zero point are the values in steps of input_scale (outside the image: 0)
    cols = _sample_columns(input.float() - input_zero_point, offset.float(), mask.float(), kh, kw, stride_,
                           padding_, dilation_, deform_groups)
    q = cols.double() if _uses_igemm(variant, groups) else _round_half_even_clamp(cols).double()
    acc = _grouped_gemm(q, weight.double(), groups, ho, wo)
    out = acc * (input_scale * weight_scale.double())[None, :, None, None]
    if bias is not None:
        out = out + bias.double()[None, :, None, None]
    if activation == "relu":
        out = torch.relu(out)
    if out_scale is not None:  # the int8 kernels' requantisation (fp32 reciprocal, half to even)
        from bevdeploy.quant.int8_kernels import _requantize

        return _requantize(out.float(), out_scale, out_zero_point).contiguous()
    return out.to(out_dtype).contiguous()


_VARIANT_CODE = {"fp32": 0, "fp16": 1, "fp16x2": 2, "int8": 3}
_MAX_I32 = 2**31 - 1


def _candidate_configs(variant: str) -> list[tuple[int, int, int, int, int]]:
    """(BLOCK_M pixels, BLOCK_N output channels, BLOCK_K channels, num_warps, num_stages) timed on the
    GPU at the first call of a shape; the first is the untuned default.

    The sampling (gather + blend, CUDA cores) costs per pixel x channel, the MMA per pixel x channel x
    output channel, so a wide BLOCK_N (the MMA's M side, the whole Cout of a ResNet stage) amortises the
    sampling. BLOCK_K=32 keeps 4-warp programs under ~240 registers and ~55 KB of shared memory, so two
    programs share an SM and one's MMA overlaps the other's sampling (the MMA of a program waits for its
    own freshly blended operand). Counted from the sm_90 SASS of the loop (Triton 3.9): ~1100 warp
    instructions per MFLOP at (64, 256, 32, 4 warps) in fp16x2, ~1500 in fp16 (fp32 blend)."""
    if variant == "fp32":  # 3xTF32 dot: three tensor-core products per K step; these do not spill
        return [(64, 128, 16, 8, 2), (32, 128, 16, 4, 2), (64, 64, 32, 8, 2), (128, 64, 16, 8, 2),
                (64, 64, 16, 4, 2)]
    return [(64, 256, 32, 4, 2), (128, 256, 32, 8, 2), (32, 512, 32, 4, 2), (64, 512, 32, 8, 2),
            (64, 128, 64, 4, 2), (128, 128, 64, 8, 3)]


def _fit_configs(configs, variant, m_img, cout_g, seg, n_img, groups=1):
    """Shrink blocks to the problem (powers of two, >= the MMA minimum); drop duplicates."""
    k_min = 32 if variant == "int8" else 16
    p2 = lambda v, lo: max(lo, 1 << max(0, int(v) - 1).bit_length())  # noqa: E731
    fitted = []
    for bm, bn, bk, warps, stages in configs:
        bm, bn, bk = min(bm, p2(m_img, 16)), min(bn, p2(cout_g, 16)), min(bk, p2(seg, k_min))
        # Too few programs to fill the GPU: halve BLOCK_M first (the gather is per pixel).
        while bm > 32 and n_img * groups * -(-m_img // bm) * -(-cout_g // bn) < 264:
            bm //= 2
        cfg = (bm, bn, bk, max(1, min(warps, bm * bn // 512)), stages)  # fewer warps only for tiny tiles
        if cfg not in fitted:
            fitted.append(cfg)
    return fitted


def _interpreter_config(variant, m_img, cout_g, seg):
    """Under TRITON_INTERPRET few large blocks run fastest (numpy per op); shapes there are tiny."""
    k_min = 32 if variant == "int8" else 16
    p2 = lambda v, lo, hi: min(hi, max(lo, 1 << max(0, int(v) - 1).bit_length()))  # noqa: E731
    return (p2(m_img, 16, 64), p2(cout_g, 16, 64), p2(seg, k_min, 64), 4, 1)


if triton_available():
    import triton
    import triton.language as tl

    from bevdeploy.quant.int8_epilogue import int8_epilogue as _int8_epilogue

    @triton.jit
    def _corner_weights(sy, sx, mk, valid, H, W):
        """mmcv's bilinear sample at (sy, sx) times the modulation ``mk``: the top-left corner (y0, x0)
        and the four corner weights. A sample with y <= -1, y >= H, x <= -1 or x >= W (NaN too) or not
        ``valid`` weighs 0; corners outside the image weigh 0 (they read zero padding)."""
        # (H * 1.0: an int argument equal to 1 is specialised to a constexpr, which has no .to)
        inside = (sy > -1.0) & (sy < H * 1.0) & (sx > -1.0) & (sx < W * 1.0) & valid
        sy = tl.where(inside, sy, 0.0)
        sx = tl.where(inside, sx, 0.0)
        y0f = tl.floor(sy)
        x0f = tl.floor(sx)
        ly = sy - y0f
        lx = sx - x0f
        hy = 1.0 - ly
        hx = 1.0 - lx
        y0 = y0f.to(tl.int32)
        x0 = x0f.to(tl.int32)
        mk = tl.where(inside, mk, 0.0)
        top = y0 >= 0
        bottom = y0 < H - 1
        left = x0 >= 0
        right = x0 < W - 1
        w00 = tl.where(top & left, hy * hx * mk, 0.0)
        w01 = tl.where(top & right, hy * lx * mk, 0.0)
        w10 = tl.where(bottom & left, ly * hx * mk, 0.0)
        w11 = tl.where(bottom & right, ly * lx * mk, 0.0)
        return y0, x0, w00, w01, w10, w11

    @triton.jit
    def _corner_load_masks(w00, w01, w10, w11, c_ok, CH_MASK: tl.constexpr):
        """Load masks of the four corners' [BLOCK_M, BLOCK_K] gathers: a zero weight means the corner is
        outside (or contributes nothing), so its load is skipped; ``c_ok`` masks the channel tail."""
        m00 = (w00 != 0.0)[:, None]
        m01 = (w01 != 0.0)[:, None]
        m10 = (w10 != 0.0)[:, None]
        m11 = (w11 != 0.0)[:, None]
        if CH_MASK:
            m00 = m00 & c_ok
            m01 = m01 & c_ok
            m10 = m10 & c_ok
            m11 = m11 & c_ok
        return m00, m01, m10, m11

    @triton.jit
    def _modulated_deform_conv2d_plan_kernel(
        # pointers
        off_ptr,  # offset [N, 2*DG*KK, Ho, Wo], any strides
        msk_ptr,  # mask [N, DG*KK, Ho, Wo], any strides
        pidx_ptr,  # out: int32 [N*DG*KK, Ho*Wo] element offset of the top-left corner inside one image
        pw_ptr,  # out: [N*DG*KK, 4, Ho*Wo] corner weights (bilinear x mask, 0 for corners outside)
        # sizes
        H,
        W,
        Wo,
        HoWo,
        DG,
        num_p_blocks,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        dil_h,
        dil_w,
        # strides (elements)
        stride_on,
        stride_oc,
        stride_oh,
        stride_ow,
        stride_mn,
        stride_mc,
        stride_mh,
        stride_mw,
        stride_xh,
        stride_xw,
        # constexpr
        KH: tl.constexpr,
        KW: tl.constexpr,
        BLOCK_KK: tl.constexpr,  # next power of two of KH*KW
        BLOCK: tl.constexpr,
    ):
        """Sampling plan of every (image, deform group, kernel point, output pixel), mmcv's rule:
        y = ho*sh - ph + i*dh + dy (x alike); a sample with y <= -1, y >= H, x <= -1 or x >= W is zero;
        corners outside the image read zero. A program does all kernel points of BLOCK pixels of one
        (image, deform group); the result is read by every output-channel tile of the main kernel."""
        KK: tl.constexpr = KH * KW
        pid = tl.program_id(0)
        nd = pid // num_p_blocks  # n*DG + d
        pb = pid % num_p_blocks
        nd64 = nd.to(tl.int64)
        kp = tl.arange(0, BLOCK_KK)[:, None]
        p = pb * BLOCK + tl.arange(0, BLOCK)[None, :]
        ok = (kp < KK) & (p < HoWo)
        ki = kp // KW
        kj = kp % KW
        ho = p // Wo
        wo = p % Wo
        n = nd64 // DG
        d = nd % DG
        o_row = off_ptr + n * stride_on + ho * stride_oh + wo * stride_ow
        oc = d * (2 * KK) + 2 * kp
        dy = tl.load(o_row + oc * stride_oc, mask=ok, other=0.0).to(tl.float32)
        dx = tl.load(o_row + (oc + 1) * stride_oc, mask=ok, other=0.0).to(tl.float32)
        mk = tl.load(msk_ptr + n * stride_mn + (d * KK + kp) * stride_mc + ho * stride_mh + wo * stride_mw,
                     mask=ok, other=0.0).to(tl.float32)
        sy = (ho * stride_h - pad_h + ki * dil_h).to(tl.float32) + dy
        sx = (wo * stride_w - pad_w + kj * dil_w).to(tl.float32) + dx
        y0, x0, w00, w01, w10, w11 = _corner_weights(sy, sx, mk, ok, H, W)
        r = nd64 * KK + kp  # plan row (n*DG + d)*KK + kp
        tl.store(pidx_ptr + r * HoWo + p, y0 * stride_xh + x0 * stride_xw, mask=ok)
        wrow = pw_ptr + r * 4 * HoWo + p
        tl.store(wrow, w00.to(pw_ptr.dtype.element_ty), mask=ok)
        tl.store(wrow + HoWo, w01.to(pw_ptr.dtype.element_ty), mask=ok)
        tl.store(wrow + 2 * HoWo, w10.to(pw_ptr.dtype.element_ty), mask=ok)
        tl.store(wrow + 3 * HoWo, w11.to(pw_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _blend_f16(v00, v01, v10, v11, w00, w01, w10, w11, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   USE_ASM: tl.constexpr):
        """sum_i v_i * w_i[:, None] in fp16. On the GPU as explicit HFMA2 on channel pairs of one pixel
        (left to itself, LLVM pairs two pixels and shuffles halves); plain fp16 math in the interpreter."""
        if USE_ASM:
            shape: tl.constexpr = (BLOCK_M, BLOCK_K)
            a = tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r",
                                          [v00, tl.broadcast_to(w00[:, None], shape)],
                                          dtype=tl.float16, is_pure=True, pack=2)
            a = tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r",
                                          [v01, tl.broadcast_to(w01[:, None], shape), a],
                                          dtype=tl.float16, is_pure=True, pack=2)
            a = tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r",
                                          [v10, tl.broadcast_to(w10[:, None], shape), a],
                                          dtype=tl.float16, is_pure=True, pack=2)
            a = tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r",
                                          [v11, tl.broadcast_to(w11[:, None], shape), a],
                                          dtype=tl.float16, is_pure=True, pack=2)
        else:
            a = v00 * w00[:, None]
            a = a + v01 * w01[:, None]
            a = a + v10 * w10[:, None]
            a = a + v11 * w11[:, None]
        return a

    @triton.jit
    def _i8_to_f16(v, USE_ASM: tl.constexpr):
        """int8 codes -> fp16 (exact). GPU: 4 codes per 32-bit register become two f16x2 by the
        0x64xx magic (1024 + byte, then subtract 1152) instead of one I2F per element."""
        if USE_ASM:
            return tl.inline_asm_elementwise(
                """{
                .reg .b32 t, bias;
                xor.b32 t, $2, 0x80808080;
                prmt.b32 $0, t, 0x64646464, 0x4140;
                prmt.b32 $1, t, 0x64646464, 0x4342;
                mov.b32 bias, 0x64806480;
                sub.rn.f16x2 $0, $0, bias;
                sub.rn.f16x2 $1, $1, bias;
                }""",
                "=r,=r,r", [v], dtype=tl.float16, is_pure=True, pack=4)
        else:
            return v.to(tl.float16)

    @triton.jit
    def _f16_to_i8(a, USE_ASM: tl.constexpr):
        """Round fp16 (code units) half to even and clamp to [-127, 127]: t = a + 1536 has ulp 1, so it
        is the rounded value, and its low byte is the int8 code."""
        if USE_ASM:
            return tl.inline_asm_elementwise(
                """{
                .reg .b32 c, lo, hi, x0, x1;
                mov.b32 c, 0x66006600;
                mov.b32 lo, 0x65816581;
                mov.b32 hi, 0x667F667F;
                add.rn.f16x2 x0, $1, c;
                add.rn.f16x2 x1, $2, c;
                max.f16x2 x0, x0, lo;
                max.f16x2 x1, x1, lo;
                min.f16x2 x0, x0, hi;
                min.f16x2 x1, x1, hi;
                prmt.b32 $0, x0, x1, 0x6420;
                }""",
                "=r,r,r", [a], dtype=tl.int8, is_pure=True, pack=4)
        else:
            t = tl.minimum(tl.maximum(a + 1536.0, 1409.0), 1663.0)
            return t.to(tl.int16, bitcast=True).to(tl.int8)

    @triton.jit
    def _modulated_deform_conv2d_fwd_kernel(
        # pointers
        x_ptr,  # input [N, Cin, H, W], any strides (channels-last: vector loads along C)
        pidx_ptr,  # plan: int32 [N*DG*KK, Ho*Wo]
        pw_ptr,  # plan: [N*DG*KK, 4, Ho*Wo] corner weights
        w_ptr,  # weight [Cout, Cin/g, KH, KW] (channels-last memory = K-contiguous)
        b_ptr,  # bias [Cout] (unused unless HAS_BIAS)
        ws_ptr,  # weight_scale [Cout] (int8 only)
        y_ptr,  # out [N, Cout, Ho, Wo] contiguous
        # sizes
        HoWo,
        Cout,
        Cout_g,
        Cg,
        Cd,
        DG,
        ND,  # deform groups overlapping one conv group (at most)
        num_p_tiles,
        num_n_tiles_g,
        num_n_tiles,
        input_scale,
        # strides (elements)
        stride_xn,
        stride_xc,
        stride_xh,
        stride_xw,
        stride_wo,
        stride_wc,
        stride_wh,
        stride_ww,
        # constexpr
        KH: tl.constexpr,
        KW: tl.constexpr,
        VARIANT: tl.constexpr,  # 0 fp32, 1 fp16, 2 fp16x2, 3 int8
        HAS_BIAS: tl.constexpr,
        NCB: tl.constexpr,  # channel blocks per (conv group, deform group) segment
        CH_MASK: tl.constexpr,  # channel blocks may be partial or empty
        N_MASK: tl.constexpr,  # output-channel tiles may be partial
        CH_ALIGN: tl.constexpr,  # every channel block starts at a multiple of this
        BASE_ALIGN: tl.constexpr,  # stride_xh and stride_xw are multiples of this (so are plan offsets)
        USE_ASM: tl.constexpr,  # inline PTX (GPU); the interpreter runs the plain-Triton twin
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """out[o, p] = sum_t W_t[o, :] @ A_t[p, :]^T; A_t = modulated bilinear samples of BLOCK_K channels at
        one kernel point for BLOCK_M pixels (gathered and blended in registers from the plan), W_t =
        weight[o, c, k]. The weight tile is the MMA's left operand, so acc is [BLOCK_N, BLOCK_M]: a wide
        BLOCK_N amortises the sampling, and pixels are contiguous in the NCHW output."""
        KK: tl.constexpr = KH * KW
        pid = tl.program_id(0)
        pid_m = pid // num_n_tiles
        pid_n = pid % num_n_tiles
        n = pid_m // num_p_tiles
        pt = pid_m % num_p_tiles
        g = pid_n // num_n_tiles_g
        nt = pid_n % num_n_tiles_g

        p = pt * BLOCK_M + tl.arange(0, BLOCK_M)
        p_ok = p < HoWo
        n64 = n.to(tl.int64)
        x_img = x_ptr + n64 * stride_xn
        o_loc = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        o = g * Cout_g + o_loc
        o_ok = o_loc < Cout_g
        w_row = w_ptr + o * stride_wo
        g_lo = g * Cg
        d_first = g_lo // Cd
        plan_n = n64 * DG * KK

        if VARIANT == 3:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        # Chunks: deform-group segment, then channel block, then kernel point (innermost, so the KK
        # points of one channel block hit the same input slab in L1).
        for t in range(0, ND * (NCB * KK)):
            kp = t % KK
            r = t // KK
            cb = r % NCB
            d = d_first + r // NCB
            ki = kp // KW
            kj = kp % KW
            seg_lo = tl.maximum(g_lo, d * Cd)
            seg_hi = tl.minimum(g_lo + Cg, d * Cd + Cd)
            c = tl.multiple_of(seg_lo + cb * BLOCK_K, CH_ALIGN) + tl.arange(0, BLOCK_K)
            row_ok = p_ok
            if CH_MASK:
                # (compared as a tensor: the interpreter mistypes bool-tensor & bool-scalar)
                row_ok = row_ok & (p * 0 + seg_lo < seg_hi)

            # The plan of kernel point kp, deform group d, for BLOCK_M pixels.
            rr = plan_n + d * KK + kp
            base = tl.multiple_of(tl.load(pidx_ptr + rr * HoWo + p, mask=row_ok, other=0), BASE_ALIGN)
            wrow = pw_ptr + rr * 4 * HoWo + p
            w00 = tl.load(wrow, mask=row_ok, other=0.0)
            w01 = tl.load(wrow + HoWo, mask=row_ok, other=0.0)
            w10 = tl.load(wrow + 2 * HoWo, mask=row_ok, other=0.0)
            w11 = tl.load(wrow + 3 * HoWo, mask=row_ok, other=0.0)
            m00, m01, m10, m11 = _corner_load_masks(w00, w01, w10, w11, (c < seg_hi)[None, :], CH_MASK)

            # Four corners as [BLOCK_M, BLOCK_K] channel-contiguous gathers, blended in registers.
            pa = x_img + base[:, None] + (c * stride_xc)[None, :]
            v00 = tl.load(pa, mask=m00, other=0.0)
            v01 = tl.load(pa + stride_xw, mask=m01, other=0.0)
            v10 = tl.load(pa + stride_xh, mask=m10, other=0.0)
            v11 = tl.load(pa + (stride_xh + stride_xw), mask=m11, other=0.0)
            if VARIANT == 0 or VARIANT == 1:
                a = v00.to(tl.float32) * w00[:, None]
                a = a + v01.to(tl.float32) * w01[:, None]
                a = a + v10.to(tl.float32) * w10[:, None]
                a = a + v11.to(tl.float32) * w11[:, None]
                a = a.to(x_ptr.dtype.element_ty)
            elif VARIANT == 2:
                a = _blend_f16(v00, v01, v10, v11, w00, w01, w10, w11, BLOCK_M, BLOCK_K, USE_ASM)
            else:
                # int8 codes are exact in fp16: blend in paired fp16, then re-quantise with input_scale
                # (the blend is in code units, so that is rounding it).
                a = _blend_f16(_i8_to_f16(v00, USE_ASM), _i8_to_f16(v01, USE_ASM), _i8_to_f16(v10, USE_ASM),
                               _i8_to_f16(v11, USE_ASM), w00, w01, w10, w11, BLOCK_M, BLOCK_K, USE_ASM)
                a = _f16_to_i8(a, USE_ASM)

            # Weight tile [BLOCK_N, BLOCK_K], K-contiguous for channels-last weight.
            wp = w_row[:, None] + ((c - g_lo) * stride_wc)[None, :] + (ki * stride_wh + kj * stride_ww)
            if CH_MASK:
                if N_MASK:
                    b = tl.load(wp, mask=o_ok[:, None] & (c < seg_hi)[None, :], other=0.0)
                else:
                    b = tl.load(wp, mask=(c < seg_hi)[None, :], other=0.0)
            else:
                if N_MASK:
                    b = tl.load(wp, mask=o_ok[:, None], other=0.0)
                else:
                    b = tl.load(wp)
            if VARIANT == 0:
                acc = tl.dot(b, tl.trans(a), acc, input_precision="tf32x3")
            elif VARIANT == 3:  # Triton 3.6 needs the int32 accumulator type spelled out
                acc = tl.dot(b, tl.trans(a), acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(b, tl.trans(a), acc)

        if VARIANT == 3:
            ws = tl.load(ws_ptr + o, mask=o_ok, other=0.0)
            res = acc.to(tl.float32) * (ws * input_scale)[:, None]
        else:
            res = acc
        if HAS_BIAS:
            res = res + tl.load(b_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[:, None]
        # [BLOCK_N, BLOCK_M] tile: pixels contiguous in the NCHW output, coalesced stores.
        y_off = n64 * Cout * HoWo + (o.to(tl.int64) * HoWo)[:, None] + p[None, :]
        tl.store(y_ptr + y_off, res.to(y_ptr.dtype.element_ty), mask=o_ok[:, None] & p_ok[None, :])


    @triton.jit
    def _igemm_tap_plan(o_row, k_row, m_ok, y_top, x_left, kp, d, ki, kj, H, W, dil_h, dil_w,
                        stride_oc, stride_mc, stride_xh, stride_xw, KK: tl.constexpr):
        """One kernel point's sampling for BLOCK_M pixels: the element offset of the top-left corner in the
        image and the four corner weights (bilinear x mask, 0 for corners outside the image)."""
        # mmcv's rule: y = ho*sh - ph + i*dh + dy (x alike); a sample with y <= -1, y >= H,
        # x <= -1 or x >= W is zero (NaN offsets too); corners outside the image read zero.
        oc = d * (2 * KK) + 2 * kp
        dy = tl.load(o_row + oc * stride_oc, mask=m_ok, other=0.0).to(tl.float32)
        dx = tl.load(o_row + (oc + 1) * stride_oc, mask=m_ok, other=0.0).to(tl.float32)
        mk = tl.load(k_row + (d * KK + kp) * stride_mc, mask=m_ok, other=0.0).to(tl.float32)
        sy = (y_top + ki * dil_h).to(tl.float32) + dy
        sx = (x_left + kj * dil_w).to(tl.float32) + dx
        y0, x0, w00, w01, w10, w11 = _corner_weights(sy, sx, mk, m_ok, H, W)
        base = y0 * stride_xh + x0 * stride_xw
        return base, w00, w01, w10, w11

    @triton.jit
    def _modulated_deform_conv2d_igemm_kernel(
        # pointers
        x_ptr,  # input [N, Cin, H, W], any strides (channels-last: vector loads along C)
        off_ptr,  # offset [N, 2*DG*KK, Ho, Wo], any strides (e.g. a channel slice of the offset conv's output)
        msk_ptr,  # mask [N, DG*KK, Ho, Wo], any strides
        w_ptr,  # weight [Cout, Cin, KH, KW] (channels-last memory = [Cout, KH*KW*Cin], K-contiguous); int8: fp16 weight codes (int8 codes for INT8_MMA)
        b_ptr,  # bias [Cout] (unused unless HAS_BIAS)
        y_ptr,  # out [N, Cout, Ho, Wo] in channels-last memory: row m = n*HoWo + p holds Cout values
        ws_ptr,  # weight_scale [Cout] float32 (int8 only)
        # int8 epilogue (int8 only): dequantisation, requantisation of an int8 output
        input_scale,
        inv_out_scale,
        out_lo,  # code_range(out_zp) less out_zp, as fp32
        out_hi,
        out_zp,
        x_zp,  # int8 only: the input codes' zero point, as fp32 (0: symmetric)
        # sizes
        M,  # N*Ho*Wo
        HoWo,
        Wo,
        H,
        W,
        Cout,
        Cd,  # channels per deform group
        DG,
        num_n_tiles,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        dil_h,
        dil_w,
        # strides (elements)
        stride_xn,
        stride_xc,
        stride_xh,
        stride_xw,
        stride_on,
        stride_oc,
        stride_oh,
        stride_ow,
        stride_mn,
        stride_mc,
        stride_mh,
        stride_mw,
        stride_wo,
        stride_wc,
        stride_wh,
        stride_ww,
        # constexpr
        KH: tl.constexpr,
        KW: tl.constexpr,
        VARIANT: tl.constexpr,  # 0 fp32, 1 fp16, 2 fp16x2, 3 int8
        HAS_BIAS: tl.constexpr,
        ACTIVATION: tl.constexpr,  # 0 none, 1 relu (after the bias)
        OUT_INT8: tl.constexpr,  # int8 only: write int8 codes of 1 / inv_out_scale (+ out_zp)
        NCB: tl.constexpr,  # channel blocks per deform group
        CH_MASK: tl.constexpr,  # Cd % BLOCK_K != 0
        N_MASK: tl.constexpr,  # Cout % BLOCK_N != 0
        BASE_ALIGN: tl.constexpr,  # stride_xh and stride_xw are multiples of this
        USE_ASM: tl.constexpr,  # inline PTX (GPU); the interpreter runs the plain-Triton twin
        CARRY: tl.constexpr,  # compute a kernel point's sampling once and carry it over its channel blocks
        SWAP: tl.constexpr,  # weight tile as the MMA's left operand (acc [BLOCK_N, BLOCK_M]), samples via smem
        TAP_INNER: tl.constexpr,  # chunk order channel block outer, kernel point inner (input slab reuse in L1)
        INT8_MMA: tl.constexpr,  # int8 only: round the blended samples to codes and run an int8 MMA
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Implicit GEMM, out[m, o] = bias[o] + sum_{k, c} A[m, (k, c)] * W[(k, c), o], over M = N*Ho*Wo
        output pixels (rows, images flattened), K = KH*KW*Cin, N = Cout. A[m, (k, c)] = mask * bilinear
        sample of channel c at kernel point k's deformed position, gathered from the input and blended in
        registers, never written to memory: the MMA's left operand ([BLOCK_M, BLOCK_K]) with the weight tile
        [BLOCK_K, BLOCK_N] on the right, or (SWAP) the weight tile [BLOCK_N, BLOCK_K] on the left and the
        samples on the right (acc [BLOCK_N, BLOCK_M]). Chunks run kernel point (x deform group) outer and
        channel block inner, or (TAP_INNER) the reverse. Each chunk computes its kernel point's sampling
        (coordinates, four corner weights x mask) from offset/mask, or (CARRY) takes it from the chunk
        before when only the channel block changed."""
        KK: tl.constexpr = KH * KW
        pid = tl.program_id(0)
        pid_m = pid // num_n_tiles
        pid_n = pid % num_n_tiles

        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < M
        mm = tl.where(m_ok, m, 0)
        n = mm // HoWo
        pix = mm % HoWo
        ho = pix // Wo
        wo = pix % Wo
        n64 = n.to(tl.int64)
        x_row = x_ptr + n64 * stride_xn  # [BLOCK_M] image bases
        o_row = off_ptr + n64 * stride_on + ho * stride_oh + wo * stride_ow
        k_row = msk_ptr + n64 * stride_mn + ho * stride_mh + wo * stride_mw
        y_top = ho * stride_h - pad_h
        x_left = wo * stride_w - pad_w

        o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        o_ok = o < Cout
        w_col = w_ptr + o * stride_wo  # [BLOCK_N]
        kc = tl.arange(0, BLOCK_K)

        base = tl.zeros((BLOCK_M,), dtype=tl.int32)
        w00 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        w01 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        w10 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        w11 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        ACC_T: tl.constexpr = tl.int32 if VARIANT == 3 and INT8_MMA else tl.float32
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC_T)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_T)
        for t in range(0, KK * DG * NCB):
            if TAP_INNER:
                kp = t % KK
                r = t // KK
                cb = r % NCB
                d = r // NCB
            else:
                cb = t % NCB
                td = t // NCB
                kp = td // DG
                d = td % DG
            ki = kp // KW
            kj = kp % KW
            if CARRY:
                if cb == 0:
                    base, w00, w01, w10, w11 = _igemm_tap_plan(
                        o_row, k_row, m_ok, y_top, x_left, kp, d, ki, kj, H, W, dil_h, dil_w,
                        stride_oc, stride_mc, stride_xh, stride_xw, KK)
            else:
                base, w00, w01, w10, w11 = _igemm_tap_plan(
                    o_row, k_row, m_ok, y_top, x_left, kp, d, ki, kj, H, W, dil_h, dil_w,
                    stride_oc, stride_mc, stride_xh, stride_xw, KK)
            cl = cb * BLOCK_K + kc  # channel inside the deform group
            c = d * Cd + cl
            bm = tl.multiple_of(base, BASE_ALIGN)
            m00, m01, m10, m11 = _corner_load_masks(w00, w01, w10, w11, (cl < Cd)[None, :], CH_MASK)
            pa = x_row[:, None] + (bm[:, None] + (c * stride_xc)[None, :])
            v00 = tl.load(pa, mask=m00, other=0.0)
            v01 = tl.load(pa + stride_xw, mask=m01, other=0.0)
            v10 = tl.load(pa + stride_xh, mask=m10, other=0.0)
            v11 = tl.load(pa + (stride_xh + stride_xw), mask=m11, other=0.0)
            if VARIANT == 2:
                # paired fp16 blend with fp16 corner weights (carried in fp32: one loop-carried type)
                a = _blend_f16(v00, v01, v10, v11, w00.to(tl.float16), w01.to(tl.float16), w10.to(tl.float16),
                               w11.to(tl.float16), BLOCK_M, BLOCK_K, USE_ASM)
            elif VARIANT == 3:
                # int8 codes (half the gather bytes of fp16) are exact in fp16: blend them in paired fp16
                # (fp16 corner weights) into fp16 samples in code units; INT8_MMA rounds them to codes
                a = _blend_f16(_i8_to_f16(v00, USE_ASM), _i8_to_f16(v01, USE_ASM), _i8_to_f16(v10, USE_ASM),
                               _i8_to_f16(v11, USE_ASM), w00.to(tl.float16), w01.to(tl.float16),
                               w10.to(tl.float16), w11.to(tl.float16), BLOCK_M, BLOCK_K, USE_ASM)
                if INT8_MMA:
                    a = _f16_to_i8(a, USE_ASM)
                else:  # codes less the zero point: a corner outside the image weighs 0, i.e. reads the value 0
                    wsum = (w00 + w01) + (w10 + w11)
                    a = a - (x_zp * wsum).to(tl.float16)[:, None]
            else:
                a = v00.to(tl.float32) * w00[:, None]
                a = a + v01.to(tl.float32) * w01[:, None]
                a = a + v10.to(tl.float32) * w10[:, None]
                a = a + v11.to(tl.float32) * w11[:, None]
                a = a.to(x_ptr.dtype.element_ty)

            # Weight tile [BLOCK_K, BLOCK_N], K-contiguous columns for channels-last weight.
            wp = w_col[None, :] + ((c * stride_wc)[:, None] + (ki * stride_wh + kj * stride_ww))
            if CH_MASK:
                if N_MASK:
                    b = tl.load(wp, mask=(cl < Cd)[:, None] & o_ok[None, :], other=0.0)
                else:
                    b = tl.load(wp, mask=(cl < Cd)[:, None], other=0.0)
            else:
                if N_MASK:
                    b = tl.load(wp, mask=o_ok[None, :], other=0.0)
                else:
                    b = tl.load(wp)
            if SWAP:
                if VARIANT == 0:
                    acc = tl.dot(tl.trans(b), tl.trans(a), acc, input_precision="tf32x3")
                elif VARIANT == 3 and INT8_MMA:  # Triton 3.6 needs the int32 accumulator type spelled out
                    acc = tl.dot(tl.trans(b), tl.trans(a), acc, out_dtype=tl.int32)
                else:
                    acc = tl.dot(tl.trans(b), tl.trans(a), acc)
            else:
                if VARIANT == 0:
                    acc = tl.dot(a, b, acc, input_precision="tf32x3")
                elif VARIANT == 3 and INT8_MMA:
                    acc = tl.dot(a, b, acc, out_dtype=tl.int32)
                else:
                    acc = tl.dot(a, b, acc)

        # the tile of the channels-last output: output channels contiguous
        m64 = m.to(tl.int64)
        if VARIANT == 3:
            # the int8 layers' epilogue: dequantise, bias, activation, fp16 or requantised int8 codes
            if SWAP:
                acc = tl.trans(acc)
            _int8_epilogue(acc, m, o, M, Cout, input_scale, ws_ptr, b_ptr, b_ptr, y_ptr, 0, 0, Cout, 1, 0.0,
                           inv_out_scale, 0, ws_ptr, 0, out_lo, out_hi, out_zp, ws_ptr, ws_ptr, HAS_BIAS=HAS_BIAS,
                           HAS_RESIDUAL=False, ACTIVATION=ACTIVATION, OUT_INT8=OUT_INT8, RES_AFTER_ACT=False,
                           HAS_XZP=False, res_tile=0.0, RES_PRELOADED=False, HAS_OUT_MUL=False,
                           HAS_RES_MUL=False)
        elif SWAP:
            res = acc
            if HAS_BIAS:
                res = res + tl.load(b_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[:, None]
            if ACTIVATION == 1:
                res = tl.maximum(res, 0.0)
            tl.store(y_ptr + (m64[None, :] * Cout + o[:, None]), res.to(y_ptr.dtype.element_ty),
                     mask=o_ok[:, None] & m_ok[None, :])
        else:
            res = acc
            if HAS_BIAS:
                res = res + tl.load(b_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
            if ACTIVATION == 1:
                res = tl.maximum(res, 0.0)
            tl.store(y_ptr + (m64[:, None] * Cout + o[None, :]), res.to(y_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & o_ok[None, :])


def _span(t: Tensor) -> int:
    """Largest element offset inside one batch item (int32 addressing inside the kernel)."""
    return sum((s - 1) * abs(st) for s, st in zip(t.shape[1:], t.stride()[1:]))


def _launch_operands(input: Tensor, weight: Tensor, offset: Tensor, mask: Tensor, relayout: bool) -> tuple[Tensor, Tensor]:
    """Both kernels' operand preparation: channels-last input / weight when ``relayout`` (the fast
    layout), and the 32-bit offset limits the kernels index with."""
    if relayout:
        if input.stride(1) != 1:
            input = input.contiguous(memory_format=torch.channels_last)
        if weight.stride(1) != 1:
            weight = weight.contiguous(memory_format=torch.channels_last)
    for name, t in (("input", input), ("offset", offset), ("mask", mask)):
        if _span(t) > _MAX_I32:
            raise ValueError(f"{name}: one batch item spans more than 2^31 elements; split the batch spatially")
    if weight.numel() > _MAX_I32:
        raise ValueError(f"weight: more than 2^31 elements ({weight.numel()})")
    return input, weight


def _segments(cin: int, groups: int, deform_groups: int) -> tuple[int, int, bool]:
    """(longest channel run inside one (conv group, deform group) pair, deform groups per conv group, all equal)."""
    cg, cd = cin // groups, cin // deform_groups
    lengths, nd = [], 0
    for g in range(groups):
        lo, hi = g * cg, (g + 1) * cg
        ds = range(lo // cd, (hi - 1) // cd + 1)
        nd = max(nd, len(ds))
        lengths += [min(hi, (d + 1) * cd) - max(lo, d * cd) for d in ds]
    # every segment has the same length and starts at a multiple of it exactly when one group size
    # divides the other
    uniform = cg % cd == 0 or cd % cg == 0
    return max(lengths), nd, uniform


_TUNED: dict[tuple, tuple[int, int, int, int, int]] = {}
_TUNE_MIN_FLOPS = 1e9  # smaller layers take the default config: tens of microseconds either way


def _modulated_deform_conv2d_triton(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    deform_groups: int,
    variant: str,
    input_scale: float,
    weight_scale: Tensor | None,
    out: Tensor | None = None,
    *,
    config: tuple[int, int, int, int, int] | None = None,
    relayout: bool = True,
) -> Tensor:
    """Launch the fused kernel. ``relayout`` copies a non-channels-last input / weight to channels-last
    (the fast layout; tests turn it off to cover arbitrary strides); ``config`` forces
    (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). On the GPU the first call of each shape times
    a few configs (skipped while a CUDA graph is being captured, or with BEVDEPLOY_AUTOTUNE=0)."""
    n, cin, h, w = input.shape
    cout, cg, kh, kw = weight.shape
    ho, wo = offset.shape[-2:]
    y = new_output((n, cout, ho, wo), variant, input.device, out)
    if y.numel() == 0:
        return y
    input, weight = _launch_operands(input, weight, offset, mask, relayout)
    cout_g, cd = cout // groups, cin // deform_groups
    seg, nd, uniform = _segments(cin, groups, deform_groups)
    m_img = ho * wo
    kk = kh * kw
    # The sampling plan: one small pass over offset/mask; fp16 corner weights where the blend is fp16.
    rows = n * deform_groups * kk
    pidx = torch.empty((rows, m_img), dtype=torch.int32, device=input.device)
    pw = torch.empty((rows, 4, m_img), dtype=torch.float16 if variant in ("fp16x2", "int8") else torch.float32,
                     device=input.device)
    block_kk = triton.next_power_of_2(kk)
    plan_block = max(16, 2048 // block_kk) if input.device.type == "cuda" else \
        max(16, min(256, triton.next_power_of_2(m_img)))
    num_p_blocks = triton.cdiv(m_img, plan_block)
    _modulated_deform_conv2d_plan_kernel[(n * deform_groups * num_p_blocks,)](
        offset, mask, pidx, pw,
        h, w, wo, m_img, deform_groups, num_p_blocks,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *offset.stride(), *mask.stride(), input.stride(2), input.stride(3),
        KH=kh, KW=kw, BLOCK_KK=block_kk, BLOCK=plan_block, num_warps=4,
    )  # fmt: skip
    code = _VARIANT_CODE[variant]
    dummy = y
    b = dummy if bias is None else bias
    ws = dummy if weight_scale is None else weight_scale

    def launch(cfg):
        bm, bn, bk, warps, stages = cfg
        num_p_tiles = triton.cdiv(m_img, bm)
        num_n_tiles_g = triton.cdiv(cout_g, bn)
        grid = (n * num_p_tiles * groups * num_n_tiles_g,)
        _modulated_deform_conv2d_fwd_kernel[grid](
            input, pidx, pw, weight, b, ws, y,
            m_img, cout, cout_g, cg, cd, deform_groups, nd, num_p_tiles, num_n_tiles_g, groups * num_n_tiles_g,
            float(input_scale), *input.stride(), *weight.stride(),
            KH=kh, KW=kw, VARIANT=code, HAS_BIAS=bias is not None, NCB=triton.cdiv(seg, bk),
            CH_MASK=not (uniform and seg % bk == 0), N_MASK=cout_g % bn != 0,
            CH_ALIGN=math.gcd(seg, bk) if uniform else 1,
            BASE_ALIGN=math.gcd(math.gcd(input.stride(2), input.stride(3)), 16), USE_ASM=input.device.type == "cuda",
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        )  # fmt: skip

    if config is not None:
        launch(config)
    elif interpreter_enabled() or input.device.type != "cuda":
        launch(_interpreter_config(variant, m_img, cout_g, seg))
    else:
        fitted = _fit_configs(_candidate_configs(variant), variant, m_img, cout_g, seg, n, groups)
        key = (variant, input.device.index, tuple(input.shape), input.stride(1) == 1, tuple(weight.shape),
               weight.stride(1) == 1, offset.dtype, mask.dtype, None if bias is None else bias.dtype, tuple(stride),
               tuple(padding), tuple(dilation), groups, deform_groups)
        flops = 2 * n * m_img * cout * cg * kk
        launch(_tuned_config(key, fitted, launch) if flops >= _TUNE_MIN_FLOPS else fitted[0])
    return y


def _tuned_config(key, fitted, launch):
    """Time each fitted config once per key (Triton's do_bench); the first one while a CUDA graph is
    being captured (timing would break the capture) or with BEVDEPLOY_AUTOTUNE=0."""
    if key in _TUNED:
        return _TUNED[key]
    if len(fitted) == 1 or os.environ.get("BEVDEPLOY_AUTOTUNE", "1") == "0" or torch.cuda.is_current_stream_capturing():
        return fitted[0]
    best, best_ms, error = None, float("inf"), None
    for cfg in fitted:
        try:
            ms = triton.testing.do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=25)
        except Exception as e:  # a config the compiler or the GPU rejects (e.g. shared memory): try the others
            error = e
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise error
    _TUNED[key] = best
    return best


# ---- tensor-core implicit GEMM (groups == 1; fp16/fp16x2 by default, fp32 on request) ----

_IGEMM_VARIANTS = ("fp16", "fp16x2", "int8")  # where the implicit GEMM is the default (fp32: the plan kernel)
_IGEMM_SUPPORTED = ("fp32", "fp16", "fp16x2", "int8")
# Carrying a kernel point's sampling (loop-carried [BLOCK_M] vectors through an scf.if) saves ALU work
# but, compiled offline for sm_90, made Triton 3.6 give the corner gathers a scalar layout (255
# registers, ~2 KB of spills, no cp.async for them); recomputing it at every chunk compiles clean on
# 3.6 and 3.9 (126-235 registers, gathers pipelined). Kept as a switch for experiments.
_IGEMM_CARRY = False


def _uses_igemm(variant: str, groups: int) -> bool:
    """Whether the op runs the implicit-GEMM kernel (channels-last output) for these arguments. Read by
    the op, its CPU path and its fake alike, so the output strides agree everywhere.
    ``BEVDEPLOY_DCN_IGEMM=0`` turns it off (the plan kernel, NCHW output, as before)."""
    if os.environ.get("BEVDEPLOY_DCN_IGEMM", "1") == "0":
        return False
    return variant in _IGEMM_VARIANTS and int(groups) == 1


def _igemm_candidate_configs(variant: str) -> list[tuple]:
    """(BLOCK_M pixels, BLOCK_N output channels, BLOCK_K channels, num_warps, num_stages[, swap[,
    tap_inner]]); the first is the untuned default, all are timed on the GPU at the first call of a
    shape (:func:`_tuned_config`). ``swap``: the weight tile is the MMA's left operand and the samples
    go through shared memory (acc [BLOCK_N, BLOCK_M]); otherwise the samples are the left operand.
    ``tap_inner``: chunks run channel block outer, kernel point inner.

    Compiled offline for sm_90 (ptxas -v, strides specialised as at run time) with Triton 3.6 (the GPU
    machine's) and 3.9: all fp16 ones fit in 118-235 registers without spills. With num_stages > 1 the
    software pipeliner turns the four corner gathers into 16-byte ``cp.async.cg`` copies, which bypass
    L1: every corner is read from L2 (at R101 stage 3: ~0.64 GB of gathers a layer, plus the weight
    once per pixel tile, 1.2 MB x M/BLOCK_M). num_stages=1 keeps them plain loads, cached in L1, where
    the 3x3 neighbourhood of a channel block is reused across kernel points (tap_inner), latency hidden
    by several programs per SM instead. Which wins is for the GPU to say. With Triton 3.6 the
    un-swapped forms draw ptxas' C7515 warning (wgmma serialised); the swapped ones do not.
    Registers and shared memory set the CTAs per SM (sm_90 offline, Triton 3.9, ReLU + int8-out epilogue
    and fp16 weight codes for int8: ``scripts/dcn_ptxas_check.py int8``): the first fp16x2 config 118
    registers, 84 KB (2 CTAs); the first int8 one, the same tile, 118 registers, 68 KB (2 CTAs: the int8
    gathers stage half the bytes); int8 with BLOCK_K 64 143 registers but 136 KB (1 CTA); the last of each
    list, 64x128 with 4 warps, 151 / 125 registers (3 / 4 CTAs, 12 / 16 warps per SM). Before the weight
    codes went to fp16 ahead of the launch, the int8 tiles converted them in registers at every K step:
    162 registers for the BLOCK_K 64 tile."""
    if variant == "fp32":  # 3xTF32: three MMAs a step, fp32 operands twice the bytes
        return [(64, 128, 32, 8, 2), (128, 64, 32, 8, 2), (64, 64, 32, 4, 2)]
    if variant == "int8":  # K >= 32 (the int8_mma form's MMA); 64 channels are one 64-byte row of codes
        return [(64, 256, 32, 8, 3, True), (128, 256, 64, 8, 2, True), (64, 256, 64, 8, 3, True),
                (128, 128, 64, 8, 3), (64, 256, 64, 8, 1, True, True), (128, 256, 64, 8, 1, True, True),
                (64, 128, 128, 4, 2, True), (128, 128, 64, 8, 1, False, True), (64, 128, 32, 4, 3, True)]
    return [(64, 256, 32, 8, 3, True), (128, 256, 32, 8, 2, True), (64, 256, 64, 8, 2, True),
            (128, 128, 64, 8, 3), (64, 256, 32, 8, 1, True, True), (128, 256, 32, 8, 1, True, True),
            (64, 256, 64, 8, 1, True, True), (128, 128, 64, 8, 1, False, True), (64, 128, 32, 4, 3, True)]


def _igemm_fit_configs(configs, m_total, cout, cd, k_min=16):
    """Shrink blocks to the problem (powers of two, >= 16 for the MMA, BLOCK_K >= ``k_min``: 32 for
    int8); halve BLOCK_M while the grid has fewer programs than an H100 has SMs (132); drop duplicates.
    (A large BLOCK_M reads the weight fewer times: once per pixel tile.)"""
    p2 = lambda v: max(16, 1 << max(0, int(v) - 1).bit_length())  # noqa: E731
    fitted = []
    for bm, bn, bk, warps, stages, *order in configs:
        bm, bn, bk = min(bm, p2(m_total)), min(bn, p2(cout)), max(k_min, min(bk, p2(cd)))
        while bm > 64 and -(-m_total // bm) * -(-cout // bn) < 132:
            bm //= 2
        cfg = (bm, bn, bk, max(1, min(warps, bm * bn // 1024)), stages, *order)
        if cfg not in fitted:
            fitted.append(cfg)
    return fitted


def _output_dtype(variant: str, out_scale: float | None) -> torch.dtype:
    return torch.int8 if out_scale is not None else VARIANT_OUTPUT_DTYPE[variant]


def _new_channels_last_output(shape, dtype, device, out):
    """[N, Cout, Ho, Wo] in channels-last memory, or a caller-given one of that layout (tests poison it)."""
    n, c, h, w = shape
    if out is None:
        return torch.empty((n, h, w, c), dtype=dtype, device=device).permute(0, 3, 1, 2)
    if (tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device
            or not out.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"out must be a channels-last {dtype} tensor of shape {list(shape)} on {device}, "
                         f"got {out.dtype} {list(out.shape)} strides {out.stride()} on {out.device}")
    return out


def _modulated_deform_conv2d_igemm(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    deform_groups: int,
    variant: str,
    out: Tensor | None = None,
    *,
    config: tuple | None = None,
    relayout: bool = True,
    input_scale: float = 1.0,
    weight_scale: Tensor | None = None,
    activation: str = "none",
    out_scale: float | None = None,
    out_zero_point: int = 0,
    int8_mma: bool = False,
    input_zero_point: int = 0,
) -> Tensor:
    """Launch the implicit-GEMM kernel (groups == 1); returns [N, Cout, Ho, Wo] in channels-last memory
    (int8: fp16, or the int8 codes of ``out_scale`` / ``out_zero_point``, after ``activation``).
    ``int8_mma`` (int8, experiments): round each blended sample to an input code and run an int8 MMA,
    as the plan kernel does, instead of the fp16 MMA on the unrounded samples (see the module docstring).
    offset and mask are read in place with any strides (a channel slice of the offset conv's output
    needs no copy). ``relayout`` copies a non-channels-last input / weight to channels-last (tests turn
    it off to cover arbitrary strides); ``config`` forces (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
    num_stages). On the GPU the first call of each shape times the candidate configs."""
    if variant not in _IGEMM_SUPPORTED:
        raise NotImplementedError(f"the implicit-GEMM kernel takes {_IGEMM_SUPPORTED}, got {variant=}")
    if variant == "int8" and weight_scale is None:
        raise ValueError("variant 'int8' needs weight_scale (Tensor[Cout] float32, per output channel)")
    if input_zero_point and int8_mma:
        raise NotImplementedError("int8_mma rounds the samples to symmetric codes: it takes no input_zero_point")
    k_min = 32 if variant == "int8" else 16
    n, cin, h, w = input.shape
    cout, cg, kh, kw = weight.shape
    if cg != cin:
        raise NotImplementedError(f"the implicit-GEMM kernel needs groups == 1 (weight has {cg} of {cin} channels)")
    ho, wo = offset.shape[-2:]
    y = _new_channels_last_output((n, cout, ho, wo), _output_dtype(variant, out_scale), input.device, out)
    if y.numel() == 0:
        return y
    input, weight = _launch_operands(input, weight, offset, mask, relayout)
    if variant == "int8" and not int8_mma:
        # the fp16 MMA multiplies the weight codes as fp16 (exact): one 2-byte copy of the weight per call
        # (a few us) instead of converting a [BLOCK_K, BLOCK_N] tile in registers at every K step of every
        # program, which also makes the tile round-trip through registers on its way to the tensor cores
        weight = weight.to(torch.float16)
    cd = cin // deform_groups
    m_total = n * ho * wo
    b = y if bias is None else bias
    ws = y if weight_scale is None else weight_scale
    from bevdeploy.quant.int8_kernels import _epilogue_args

    _, inv_out, _, out_lo, out_hi, out_zp = _epilogue_args(None, out_scale, 0, out_zero_point)

    def launch(cfg):
        bm, bn, bk, warps, stages, *order = cfg  # optional: swap, tap_inner
        swap, tap_inner = (bool(v) for v in (tuple(order) + (False, False))[:2])
        num_n_tiles = triton.cdiv(cout, bn)
        grid = (triton.cdiv(m_total, bm) * num_n_tiles,)
        _modulated_deform_conv2d_igemm_kernel[grid](
            input, offset, mask, weight, b, y, ws, float(input_scale), inv_out, out_lo, out_hi, out_zp,
            float(input_zero_point),
            m_total, ho * wo, wo, h, w, cout, cd, deform_groups, num_n_tiles,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            *input.stride(), *offset.stride(), *mask.stride(), *weight.stride(),
            KH=kh, KW=kw, VARIANT=_VARIANT_CODE[variant], HAS_BIAS=bias is not None,
            ACTIVATION=_ACTIVATIONS.index(activation), OUT_INT8=out_scale is not None, NCB=triton.cdiv(cd, bk),
            CH_MASK=cd % bk != 0, N_MASK=cout % bn != 0,
            BASE_ALIGN=math.gcd(math.gcd(input.stride(2), input.stride(3)), 16), USE_ASM=input.device.type == "cuda",
            CARRY=_IGEMM_CARRY and not tap_inner, SWAP=swap, TAP_INNER=tap_inner, INT8_MMA=bool(int8_mma),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        )  # fmt: skip

    if config is not None:
        launch(config)
    elif interpreter_enabled() or input.device.type != "cuda":
        p2 = lambda v, hi: min(hi, max(16, 1 << max(0, int(v) - 1).bit_length()))  # noqa: E731
        launch((p2(m_total, 64), p2(cout, 64), max(k_min, p2(cd, 64)), 4, 1))
    else:
        fitted = _igemm_fit_configs(_igemm_candidate_configs(variant), m_total, cout, cd, k_min)
        key = ("igemm", variant, activation, out_scale is not None, bool(int8_mma), input.device.index, tuple(input.shape), input.stride(1) == 1, tuple(weight.shape),
               weight.stride(1) == 1, offset.dtype, offset.stride(1) == 1, mask.dtype,
               None if bias is None else bias.dtype, tuple(stride), tuple(padding), tuple(dilation), deform_groups)
        flops = 2 * m_total * cout * cin * kh * kw
        launch(_tuned_config(key, fitted, launch) if flops >= _TUNE_MIN_FLOPS else fitted[0])
    return y


# flexible_layout: Inductor may hand the op its inputs in whatever layout it chose (channels-last after its
# conv layout optimisation) instead of forcing the traced NCHW strides: the kernels take any strides.
@torch.library.custom_op("bevdeploy::modulated_deform_conv2d", mutates_args=(),
                         tags=(torch.Tag.flexible_layout,) if hasattr(torch.Tag, "flexible_layout") else ())
def _modulated_deform_conv2d_op(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    deform_groups: int,
    variant: str,
    input_scale: float,
    weight_scale: Tensor | None,
    activation: str = "none",
    out_scale: float | None = None,
    out_zero_point: int = 0,
    input_zero_point: int = 0,
) -> Tensor:
    igemm = _uses_igemm(variant, groups)
    if use_triton(input):
        if igemm:
            return _modulated_deform_conv2d_igemm(input, offset, mask, weight, bias, stride, padding, dilation,
                                                  deform_groups, variant, input_scale=input_scale,
                                                  weight_scale=weight_scale, activation=activation,
                                                  out_scale=out_scale, out_zero_point=out_zero_point,
                                                  input_zero_point=input_zero_point)
        out = _modulated_deform_conv2d_triton(input, offset, mask, weight, bias, stride, padding, dilation, groups,
                                              deform_groups, variant, input_scale, weight_scale)
        return out.relu_() if activation == "relu" else out
    out = _cpu_impl(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups, variant,
                    input_scale, weight_scale, activation, out_scale, out_zero_point, input_zero_point)
    # the same strides as the GPU path (and the fake): channels-last where the implicit GEMM runs
    return out.contiguous(memory_format=torch.channels_last) if igemm else out


@_modulated_deform_conv2d_op.register_fake
def _(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups, variant, input_scale,
      weight_scale, activation="none", out_scale=None, out_zero_point=0, input_zero_point=0):
    variant, shape = _check_inputs(input, offset, mask, weight, bias, stride, padding, dilation, groups,
                                   deform_groups, variant, input_scale, weight_scale, activation, out_scale,
                                   out_zero_point, input_zero_point)
    out = input.new_empty(shape, dtype=_output_dtype(variant, out_scale))
    return out.contiguous(memory_format=torch.channels_last) if _uses_igemm(variant, groups) else out


register_reference_autograd(_modulated_deform_conv2d_op, _cpu_impl)


@bf16_as_float32
def modulated_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    deform_groups: int = 1,
    *,
    variant: str | None = None,
    input_scale: float | None = None,
    weight_scale: Tensor | None = None,
    activation: str = "none",
    out_scale: float | None = None,
    out_zero_point: int = 0,
    input_zero_point: int = 0,
) -> Tensor:
    """Modulated deformable convolution (DCNv2), exactly mmcv's ``modulated_deform_conv2d``.

    Args:
        input (Tensor[N, Cin, H, W]): features; channels-last memory is fastest (others are copied to it).
            float32 (``fp32``), float16 (``fp16``/``fp16x2``) or int8 codes (``int8``).
        offset (Tensor[N, 2*dg*kh*kw, Ho, Wo]): float32/float16 sampling offsets in pixels, per deform
            group and kernel point ``k = i*kw + j`` the pair (dy, dx).
        mask (Tensor[N, dg*kh*kw, Ho, Wo]): float32/float16 modulation, already sigmoided.
        weight (Tensor[Cout, Cin/groups, kh, kw]): same dtype as ``input`` (int8 for ``int8``);
            channels-last memory ([Cout, kh, kw, Cin/g]) avoids a per-call copy.
        bias (Tensor[Cout], optional): float32/float16.
        stride, padding, dilation (int or (int, int)): as ``nn.Conv2d``.
        groups (int): conv groups. deform_groups (int): groups of input channels sharing offsets.
        variant (str, optional): ``fp32``, ``fp16``, ``fp16x2`` or ``int8``; None infers it from ``input``.
        input_scale (float, optional): per-tensor scale of the int8 ``input`` (``int8`` only).
        weight_scale (Tensor[Cout], optional): float32 per-output-channel scale of the int8 ``weight``
            (``int8`` only); see :func:`quantize_weight_per_channel`.
        activation (str): ``none`` or ``relu``, after the bias (in the implicit GEMM's epilogue where it runs;
            ``int8``: groups == 1 only).
        out_scale (float, optional): write the int8 codes ``clamp(round_half_even(y / out_scale) +
            out_zero_point)`` the next int8 layer reads instead of fp16 (``int8`` with groups == 1 only;
            the int8 layers' requantising epilogue, :mod:`bevdeploy.quant.int8_kernels`).
        input_zero_point (int): the zero point of the int8 ``input`` codes (``x ~= input_scale * (q - z)``;
            asymmetric codes; ``int8`` with groups == 1 only).

    Returns:
        Tensor[N, Cout, Ho, Wo]: float32 for ``fp32``, int8 codes with ``out_scale``, float16 otherwise;
        channels-last memory with ``groups == 1`` for ``fp16``/``fp16x2``/``int8`` (the implicit-GEMM
        kernel's output), contiguous otherwise.

    Example:
        >>> x = torch.randn(1, 4, 5, 5)
        >>> w = torch.randn(3, 4, 3, 3)
        >>> off, m = torch.zeros(1, 18, 5, 5), torch.ones(1, 9, 5, 5)
        >>> torch.allclose(modulated_deform_conv2d(x, off, m, w, padding=1),
        ...                torch.nn.functional.conv2d(x, w, padding=1), atol=1e-5)
        True
    """
    stride_, padding_, dilation_ = _pairs(stride, padding, dilation)
    variant, _ = _check_inputs(input, offset, mask, weight, bias, stride_, padding_, dilation_, groups,
                               deform_groups, variant, input_scale, weight_scale, activation, out_scale,
                               out_zero_point, input_zero_point)
    scale = check_int8_scale("input_scale", input_scale, variant)
    return _modulated_deform_conv2d_op(input, offset, mask, weight, bias, list(stride_), list(padding_),
                                       list(dilation_), int(groups), int(deform_groups), variant, scale,
                                       weight_scale, activation, None if out_scale is None else float(out_scale),
                                       int(out_zero_point), int(input_zero_point))


def quantize_weight_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 weights for the ``int8`` variant.

    Args:
        weight (Tensor[Cout, Cin/g, kh, kw]): float weights.

    Returns:
        (Tensor[Cout, Cin/g, kh, kw] int8 in channels-last memory (the kernel's K-contiguous layout),
        Tensor[Cout] float32 scales with ``weight ~= q * scale[:, None, None, None]``; an all-zero
        channel gets scale 1).
    """
    check_tensor("weight", weight, shape=("Cout", "Cin/g", "kh", "kw"), dtypes=(torch.float32, torch.float16))
    q, scale = _quantize_weight_per_channel(weight)
    return q.contiguous(memory_format=torch.channels_last), scale


def split_offset_mask(out: Tensor) -> tuple[Tensor, Tensor]:
    """mmcv ``DCNv2``'s split of the offset conv's output [N, 3*dg*kh*kw, Ho, Wo]: its first two thirds
    are the offsets (mmcv concatenates the first two chunks, which are adjacent, so this is a view of
    ``out``: the op reads it in place, with any strides), the last third the mask logits (sigmoided)."""
    k = out.shape[1] // 3
    return out[:, : 2 * k], torch.sigmoid(out[:, 2 * k :])


class ModulatedDeformConv2d(nn.Module):
    """See :func:`modulated_deform_conv2d`. Parameters ``weight`` [Cout, Cin/g, kh, kw] and ``bias``
    [Cout] as mmcv; ``weight`` is kept in channels-last memory, the kernel's K-contiguous layout.
    ``activation`` (``"none"``; the deploy form's fused blocks set ``"relu"``) is applied in the op."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = True,
    ):
        super().__init__()
        if in_channels % groups != 0:
            raise ValueError(f"in_channels must be divisible by groups, got {in_channels=}, {groups=}")
        if out_channels % groups != 0:
            raise ValueError(f"out_channels must be divisible by groups, got {out_channels=}, {groups=}")
        if in_channels % deform_groups != 0:
            raise ValueError(f"in_channels must be divisible by deform_groups, got {in_channels=}, {deform_groups=}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pairs(stride, padding, dilation)
        self.groups = groups
        self.deform_groups = deform_groups
        weight = torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        self.weight = nn.Parameter(weight.contiguous(memory_format=torch.channels_last))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.activation = "none"
        self.init_weights()

    def init_weights(self) -> None:
        """mmcv's: uniform(+-1/sqrt(Cin*kh*kw)) weights, zero bias."""
        n = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        stdv = 1.0 / math.sqrt(n)
        with torch.no_grad():
            self.weight.uniform_(-stdv, stdv)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        return modulated_deform_conv2d(x, offset, mask, self.weight, self.bias, self.stride, self.padding,
                                       self.dilation, self.groups, self.deform_groups, activation=self.activation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"deform_groups={self.deform_groups}, bias={self.bias is not None}")


class ModulatedDeformConv2dPack(ModulatedDeformConv2d):
    """mmcv's ``DCNv2`` (``ModulatedDeformConv2dPack``): offsets and mask from a zero-initialised
    ``conv_offset`` (Cin -> 3*dg*kh*kw, same stride/padding/dilation); its output is split in three,
    the first two thirds are the offsets, the last third the mask logits. State-dict keys ``weight``,
    ``bias``, ``conv_offset.weight``, ``conv_offset.bias`` (mmcv's version 2)."""

    _version = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_offset = nn.Conv2d(
            self.in_channels,
            self.deform_groups * 3 * self.kernel_size[0] * self.kernel_size[1],
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        if hasattr(self, "conv_offset"):
            with torch.no_grad():
                self.conv_offset.weight.zero_()
                self.conv_offset.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        offset, mask = split_offset_mask(self.conv_offset(x))
        return modulated_deform_conv2d(x, offset, mask, self.weight, self.bias, self.stride, self.padding,
                                       self.dilation, self.groups, self.deform_groups, activation=self.activation)
