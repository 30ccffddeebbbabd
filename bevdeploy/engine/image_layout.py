"""The engine's image as cuDNN's first-layer conv reads it: NHWC with the 3 colour channels padded to 4.

An engine takes images the way the data pipeline makes them, ``[N, 3, H, W]`` contiguous (NCHW). The ResNet
stem's 7x7 conv runs fastest in cuDNN's NHWC first-layer kernel, which reads 4 channels. Left to Inductor, the
layout change is a Triton transposition that writes 3-element pixel rows (169 us a call for CenterNet's
32 x 3 x 512 x 512 fp16 images on the H100, ``profile-centernet-r18-dcn-int8-fp16.md``) and cuDNN then pads the
channels to 4 in a second pass (``nhwcAddPaddingKernel``). :func:`image_nhwc` does both in one pass: each
program reads a block of pixels of every channel plane (coalesced) and writes the block's pixels as
``channels``-wide rows (one 8-byte store per pixel in fp16), zero in the padded channels. The stem conv's weight
gets the matching zero input channel (:func:`pad_in_channels`), so the conv's sums are the same numbers.

YOLOX's Focus stem first gathers each 2x2 pixel block into 12 channels (``torch.cat`` of four strided slices, an
NCHW tensor) and its 3x3 conv then ran as cuDNN's NHWC kernel between two layout conversions (the output's back to
NCHW took 555 us a call of YOLOX-x's batch of 32 on the H100, ``profile-yolox-x-int8-fp16-asymmetric.md``).
``image_nhwc(x, 16, block=2)`` writes that space-to-depth straight as NHWC rows of 16 channels (12 + 4 zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bevdeploy.ops._utils import check_tensor, triton_available, use_triton

__all__ = ["image_nhwc", "pad_in_channels", "space_to_depth"]

_FLOAT = (torch.float32, torch.float16)
_BLOCK = 256

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _image_nhwc_kernel(x_ptr, y_ptr, num_pixels, Ho, Wo, sn, sc, sh, sw, C: tl.constexpr, CP: tl.constexpr,
                           B: tl.constexpr, BLOCK: tl.constexpr):
        p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # output pixels
        j = tl.arange(0, CP)  # output channels: j = k * C + c, k = dx * B + dy (YOLOX's Focus order)
        k = j // C
        src_c = (j - k * C) * sc + (k % B) * sh + (k // B) * sw
        in_range = p < num_pixels
        wo = p % Wo
        t = p // Wo
        src = (t // Ho) * sn + (t % Ho) * (B * sh) + wo * (B * sw)
        v = tl.load(x_ptr + src[:, None] + src_c[None, :], mask=in_range[:, None] & (j[None, :] < C * B * B),
                    other=0.0)
        tl.store(y_ptr + p[:, None] * CP + j[None, :], v.to(y_ptr.dtype.element_ty), mask=in_range[:, None])


def _check(x: Tensor, channels: int, block: int) -> None:
    check_tensor("x", x, shape=("N", "C", "H", "W"), dtypes=_FLOAT)
    if not isinstance(block, int) or block < 1 or x.shape[2] % block or x.shape[3] % block:
        raise ValueError(f"image_nhwc: block must be a positive int dividing the image's {x.shape[2]}x{x.shape[3]} "
                         f"pixels, got {block!r}")
    need = x.shape[1] * block * block
    if not isinstance(channels, int) or channels < need or channels & (channels - 1):
        raise ValueError(f"image_nhwc: channels must be a power of two >= {need} (the image's {x.shape[1]} channels "
                         f"x block {block} squared), got {channels!r}")


def _empty_nhwc(x: Tensor, channels: int, block: int) -> Tensor:
    n, _, h, w = x.shape
    return x.new_empty((n, h // block, w // block, channels)).permute(0, 3, 1, 2)  # channels-last memory


def space_to_depth(x: Tensor, block: int) -> Tensor:
    """[N, C, H, W] -> [N, C * block^2, H / block, W / block], channel ``(dx * block + dy) * C + c`` holding pixel
    (block * i + dy, block * j + dx): for block 2 the order of YOLOX's Focus (TL, BL, TR, BR)."""
    if block == 1:
        return x
    return torch.cat([x[..., dy::block, dx::block] for dx in range(block) for dy in range(block)], dim=1)


@torch.library.custom_op("bevdeploy::image_nhwc", mutates_args=())
def image_nhwc(x: Tensor, channels: int, block: int = 1) -> Tensor:
    """``x`` [N, C, H, W] (any strides, fp32/fp16), space-to-depth by ``block`` (:func:`space_to_depth`), as
    [N, channels, H / block, W / block] in channels-last memory, the channels past C * block^2 zero; one pass
    (Triton on CUDA and under the interpreter, PyTorch otherwise)."""
    _check(x, channels, block)
    y = _empty_nhwc(x, channels, block)
    if not use_triton(x):
        s2d = space_to_depth(x, block)
        y.copy_(F.pad(s2d, (0, 0, 0, 0, 0, channels - s2d.shape[1])))
        return y
    n, c, h, w = x.shape
    num_pixels = n * (h // block) * (w // block)
    if num_pixels:
        _image_nhwc_kernel[(triton.cdiv(num_pixels, _BLOCK),)](x, y, num_pixels, h // block, w // block, *x.stride(),
                                                               C=c, CP=channels, B=block, BLOCK=_BLOCK)
    return y


@image_nhwc.register_fake
def _(x, channels, block=1):
    _check(x, channels, block)
    return _empty_nhwc(x, channels, block)


def pad_in_channels(weight: Tensor, channels: int) -> Tensor:
    """A conv weight [O, C, kh, kw] with zero input channels appended up to ``channels``, channels-last (what
    cuDNN's NHWC kernels read, so no per-call weight copy)."""
    extra = channels - weight.shape[1]
    if extra < 0:
        raise ValueError(f"pad_in_channels: the weight already has {weight.shape[1]} > {channels} input channels")
    return F.pad(weight, (0, 0, 0, 0, 0, extra)).contiguous(memory_format=torch.channels_last)
