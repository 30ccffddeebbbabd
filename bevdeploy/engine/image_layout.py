"""The engine's image as cuDNN's first-layer conv reads it: NHWC with the 3 colour channels padded to 4.

An engine takes images the way the data pipeline makes them, ``[N, 3, H, W]`` contiguous (NCHW). The ResNet
stem's 7x7 conv runs fastest in cuDNN's NHWC first-layer kernel, which reads 4 channels. Left to Inductor, the
layout change is a Triton transposition that writes 3-element pixel rows (169 us a call for CenterNet's
32 x 3 x 512 x 512 fp16 images on the H100, ``profile-centernet-r18-dcn-int8-fp16.md``) and cuDNN then pads the
channels to 4 in a second pass (``nhwcAddPaddingKernel``). :func:`image_nhwc` does both in one pass: each
program reads a block of pixels of every channel plane (coalesced) and writes the block's pixels as
``channels``-wide rows (one 8-byte store per pixel in fp16), zero in the padded channels. The stem conv's weight
gets the matching zero input channel (:func:`pad_in_channels`), so the conv's sums are the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bevdeploy.ops._utils import check_tensor, triton_available, use_triton

__all__ = ["image_nhwc", "pad_in_channels"]

_FLOAT = (torch.float32, torch.float16)
_BLOCK = 256

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _image_nhwc_kernel(x_ptr, y_ptr, num_pixels, H, W, sn, sc, sh, sw, C: tl.constexpr, CP: tl.constexpr,
                           BLOCK: tl.constexpr):
        p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        c = tl.arange(0, CP)
        in_range = p < num_pixels
        w = p % W
        t = p // W
        src = (t // H) * sn + (t % H) * sh + w * sw
        v = tl.load(x_ptr + src[:, None] + c[None, :] * sc, mask=in_range[:, None] & (c[None, :] < C), other=0.0)
        tl.store(y_ptr + p[:, None] * CP + c[None, :], v.to(y_ptr.dtype.element_ty), mask=in_range[:, None])


def _check(x: Tensor, channels: int) -> None:
    check_tensor("x", x, shape=("N", "C", "H", "W"), dtypes=_FLOAT)
    if not isinstance(channels, int) or channels < x.shape[1] or channels & (channels - 1):
        raise ValueError(f"image_nhwc: channels must be a power of two >= the image's {x.shape[1]} channels, "
                         f"got {channels!r}")


def _empty_nhwc(x: Tensor, channels: int) -> Tensor:
    n, _, h, w = x.shape
    return x.new_empty((n, h, w, channels)).permute(0, 3, 1, 2)  # [N, channels, H, W], channels-last memory


@torch.library.custom_op("bevdeploy::image_nhwc", mutates_args=())
def image_nhwc(x: Tensor, channels: int) -> Tensor:
    """``x`` [N, C, H, W] (any strides, fp32/fp16) as [N, channels, H, W] in channels-last memory, the
    channels past C zero; one pass (Triton on CUDA and under the interpreter, PyTorch otherwise)."""
    _check(x, channels)
    y = _empty_nhwc(x, channels)
    if not use_triton(x):
        y.copy_(F.pad(x, (0, 0, 0, 0, 0, channels - x.shape[1])))
        return y
    n, c, h, w = x.shape
    num_pixels = n * h * w
    if num_pixels:
        _image_nhwc_kernel[(triton.cdiv(num_pixels, _BLOCK),)](x, y, num_pixels, h, w, *x.stride(), C=c, CP=channels,
                                                               BLOCK=_BLOCK)
    return y


@image_nhwc.register_fake
def _(x, channels):
    _check(x, channels)
    return _empty_nhwc(x, channels)


def pad_in_channels(weight: Tensor, channels: int) -> Tensor:
    """A conv weight [O, C, kh, kw] with zero input channels appended up to ``channels``, channels-last (what
    cuDNN's NHWC kernels read, so no per-call weight copy)."""
    extra = channels - weight.shape[1]
    if extra < 0:
        raise ValueError(f"pad_in_channels: the weight already has {weight.shape[1]} > {channels} input channels")
    return F.pad(weight, (0, 0, 0, 0, 0, extra)).contiguous(memory_format=torch.channels_last)
