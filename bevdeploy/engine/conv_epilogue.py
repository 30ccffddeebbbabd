"""Conv epilogues fused into the conv for the float engines: ``relu(conv(x) + b)`` and
``relu(conv(x) + b + z)`` as one cuDNN call (its fused conv-bias-add-ReLU graph) instead of a conv and a
separate pass.

An fp16 engine compiled by Inductor runs each ResNet conv as a cuDNN conv (or, for a 1x1, a cuBLAS GEMM)
and then one Triton pass that adds the bias and the residual and applies the ReLU: that pass reads and
writes the whole activation again. On BEVFormer-tiny's fp16x2 engine those ``triton_poi_fused_add_
convolution_relu`` kernels take about a quarter of the GPU time (``profile-bevformer-tiny-fp16x2.md``).
``build(fused_epilogues=True)`` swaps every ResNet block whose convs are float for a form that calls the
two ops below (:func:`fuse_conv_epilogues`); whether cuDNN's fused kernels beat conv + Triton pass is
measured by ``scripts/conv_epilogue_timing.py`` and the engine profiles, so the build keeps the plain form
unless asked.

The ops are ``torch.library`` custom ops (one node each in the exported graph, an opaque call for
Inductor): on CUDA with fp16 / fp32 tensors they call ``torch.cudnn_convolution_relu`` /
``torch.cudnn_convolution_add_relu``; elsewhere (CPU, other dtypes) the plain composite. Layouts: the
output is always channels-last (cuDNN's fast NHWC kernels; the fake promises the same), inputs in another
layout are made channels-last inside the op, and the ops carry ``flexible_layout`` so Inductor hands them
its own (channels-last) buffers instead of copying them back to the traced NCHW strides. The block swap
stores the swapped convs' weights channels-last, so no weight is copied per call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevdeploy.engine.image_layout import pad_in_channels  # also registers bevdeploy::image_nhwc

__all__ = ["FocusNHWC", "FusedBasicBlock", "FusedBottleneck", "FusedConvReLU", "conv2d_add_relu", "conv2d_relu",
           "fuse_conv_epilogues"]

_CUDNN_DTYPES = (torch.float16, torch.float32)


def _out_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> list[int]:
    n, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return [n, o, ho, wo]


_CL = torch.channels_last
#: Inductor may pass the inputs in the layout it chose (the kernels take any; cuDNN's are made NHWC here)
_TAGS = (torch.Tag.flexible_layout,) if hasattr(torch.Tag, "flexible_layout") else ()


def _use_cudnn(x: Tensor) -> bool:
    return x.is_cuda and x.dtype in _CUDNN_DTYPES and torch.backends.cudnn.is_available()


@torch.library.custom_op("bevdeploy::conv2d_relu", mutates_args=(), tags=_TAGS)
def conv2d_relu(x: Tensor, weight: Tensor, bias: Tensor, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int) -> Tensor:
    """``relu(conv2d(x, weight, bias))``: one cuDNN call on CUDA; channels-last out."""
    if _use_cudnn(x):
        y = torch.cudnn_convolution_relu(x.contiguous(memory_format=_CL), weight.contiguous(memory_format=_CL), bias,
                                         list(stride), list(padding), list(dilation), groups)
    else:
        y = F.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups))
    return y.contiguous(memory_format=_CL)


@conv2d_relu.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    return x.new_empty(_out_shape(x, weight, stride, padding, dilation)).contiguous(memory_format=_CL)


@torch.library.custom_op("bevdeploy::conv2d_add_relu", mutates_args=(), tags=_TAGS)
def conv2d_add_relu(x: Tensor, weight: Tensor, z: Tensor, bias: Tensor, stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """``relu(conv2d(x, weight, bias) + z)`` (a residual block's last conv): one cuDNN call on CUDA;
    channels-last out."""
    if _use_cudnn(x) and z.dtype == x.dtype:
        y = torch.cudnn_convolution_add_relu(x.contiguous(memory_format=_CL), weight.contiguous(memory_format=_CL),
                                             z.contiguous(memory_format=_CL), 1.0, bias, list(stride), list(padding),
                                             list(dilation), groups)
    else:
        y = F.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups) + z)
    return y.contiguous(memory_format=_CL)


@conv2d_add_relu.register_fake
def _(x, weight, z, bias, stride, padding, dilation, groups):
    shape = _out_shape(x, weight, stride, padding, dilation)
    if list(z.shape) != shape:
        raise ValueError(f"conv2d_add_relu: the residual must have the conv's output shape {shape}, "
                         f"got {list(z.shape)}")
    return x.new_empty(shape).contiguous(memory_format=_CL)


def _plain(conv: nn.Module) -> bool:
    """A float ``nn.Conv2d`` with a bias (BatchNorm folded), zero padding: what the fused ops run."""
    return type(conv) is nn.Conv2d and conv.bias is not None and conv.padding_mode == "zeros"


def _args(conv: nn.Conv2d) -> tuple:
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups


def _conv_relu(conv: nn.Module, x: Tensor) -> Tensor:
    if _plain(conv):
        return torch.ops.bevdeploy.conv2d_relu(x, conv.weight, conv.bias, *_args(conv))
    if _is_deform(conv) and _dcn_module(conv).activation == "relu":  # the op applies it
        return conv(x)
    return F.relu(conv(x))


def _conv_add_relu(conv: nn.Module, x: Tensor, z: Tensor) -> Tensor:
    if _plain(conv):
        return torch.ops.bevdeploy.conv2d_add_relu(x, conv.weight, z, conv.bias, *_args(conv))
    return F.relu(conv(x) + z)


class FusedConvReLU(nn.Module):
    """``relu(conv(x))`` of a ResNet stem (BatchNorm folded) as one fused call; keeps the conv as ``conv``.

    A stem reading the 3-channel image reads it through :func:`~bevdeploy.engine.image_layout.image_nhwc` (one
    pass to NHWC, padded to 4 channels: what cuDNN's first-layer kernel reads), with the weight's matching zero
    input channel; the sums are the same.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.image_channels = conv.in_channels if conv.in_channels == 3 and conv.groups == 1 else 0
        if self.image_channels:
            conv.weight.data = pad_in_channels(conv.weight.data, 4)
            conv.in_channels = 4
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        if self.image_channels:
            if x.shape[1] != self.image_channels:
                raise ValueError(f"the stem reads {self.image_channels}-channel images, got shape {list(x.shape)}")
            x = torch.ops.bevdeploy.image_nhwc(x, 4)
        return _conv_relu(self.conv, x)


class FocusNHWC(nn.Module):
    """YOLOX's Focus stem (BatchNorm folded) reading the image's space-to-depth as NHWC rows of 16 channels (one
    :func:`~bevdeploy.engine.image_layout.image_nhwc` pass instead of four strided slices concatenated in NCHW),
    its conv's weight padded with zero input channels to match; keeps the ConvModule as ``conv``."""

    def __init__(self, focus: nn.Module) -> None:
        super().__init__()
        conv = focus.conv.conv
        self.image_channels = conv.in_channels // 4
        conv.weight.data = pad_in_channels(conv.weight.data, 16)
        conv.in_channels = 16
        self.conv = focus.conv

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.image_channels:
            raise ValueError(f"the Focus stem reads {self.image_channels}-channel images, got shape {list(x.shape)}")
        return self.conv(torch.ops.bevdeploy.image_nhwc(x, 16, 2))


class FusedBottleneck(nn.Module):
    """A BN-folded ``Bottleneck`` (same child names) whose float convs run with their epilogue fused; a
    float DCNv2 ``conv2`` (BEVFormer's R101 stages 3-4) applies the ReLU in its own kernel's epilogue."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = block.conv1, block.conv2, block.conv3
        self.downsample = block.downsample
        if _is_deform(self.conv2):
            _dcn_module(self.conv2).activation = "relu"

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = _conv_relu(self.conv1, x)
        out = _conv_relu(self.conv2, out)
        return _conv_add_relu(self.conv3, out, identity)


class FusedBasicBlock(nn.Module):
    """A BN-folded ``BasicBlock`` (3x3 -> 3x3 + identity; same child names) with fused epilogues."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.conv1, self.conv2 = block.conv1, block.conv2
        self.downsample = block.downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return _conv_add_relu(self.conv2, _conv_relu(self.conv1, x), identity)


def fuse_conv_epilogues(model: nn.Module) -> list[str]:
    """Swap every residual block of ``model`` for its fused-epilogue form, each ResNet stem's conv + ReLU
    for one fused call and YOLOX's Focus stem for its NHWC form (:class:`FocusNHWC`), in place; a float DCNv2
    followed by a ReLU in an ``nn.Sequential`` (CenterNet's neck ConvModules) applies that ReLU itself. Returns
    their names (a ResNet stem as ``<resnet>.conv1``, a DCN by its own name).

    Needs BatchNorm folded first (:func:`bevdeploy.engine.deploy.fold_batchnorms`: each block's BNs are
    ``nn.Identity`` and its convs carry the bias). Blocks with an int8 or fp8 conv are left alone (those
    layers fuse their own epilogue). The swapped convs' weights are stored channels-last.
    """
    from bevdeploy.models.bevdet import BasicBlock
    from bevdeploy.models.centernet import BasicBlock as CenterNetBasicBlock
    from bevdeploy.models.centernet import ResNet18
    from bevdeploy.models.resnet import Bottleneck, ResNet
    from bevdeploy.models.yolox import Focus

    swapped = []
    for name, m in list(model.named_modules()):
        if isinstance(m, Focus) and _plain(m.conv.conv) and m.conv.conv.in_channels == 12 and m.conv.conv.groups == 1:
            _check_folded(name, (m.conv.bn,))
            model.set_submodule(name, FocusNHWC(m))  # its padded weight is channels-last already
            swapped.append(name)
            continue
        if isinstance(m, (ResNet, ResNet18)) and type(m.conv1) is nn.Conv2d:  # stem: maxpool(relu(bn1(conv1(x))))
            _check_folded(name or "the model", (m.bn1,))
            if _plain(m.conv1):
                m.conv1.weight.data = m.conv1.weight.data.contiguous(memory_format=_CL)
                m.conv1, m.relu = FusedConvReLU(m.conv1), nn.Identity()  # an image-reading stem: NHWC, 4 channels
                swapped.append(f"{name}.conv1" if name else "conv1")
            continue
        if type(m) is nn.Sequential:  # DCN (+ folded BN) + ReLU: the DCN's epilogue takes the ReLU
            kids = [(n, c) for n, c in m.named_children() if not isinstance(c, nn.Identity)]
            for (dcn_name, dcn), (relu_name, relu) in zip(kids, kids[1:]):
                if _is_deform(dcn) and type(relu) is nn.ReLU and _dcn_module(dcn).activation == "none":
                    _dcn_module(dcn).activation = "relu"
                    setattr(m, relu_name, nn.Identity())
                    swapped.append(f"{name}.{dcn_name}" if name else dcn_name)
            continue
        if isinstance(m, Bottleneck):
            cls, convs, bns = FusedBottleneck, (m.conv1, m.conv2, m.conv3), (m.bn1, m.bn2, m.bn3)
        elif isinstance(m, (BasicBlock, CenterNetBasicBlock)):
            cls, convs, bns = FusedBasicBlock, (m.conv1, m.conv2), (m.bn1, m.bn2)
        else:
            continue
        _check_folded(name, bns)
        if not any(_plain(c) for c in convs) or any(type(c) is not nn.Conv2d and not _is_deform(c) for c in convs):
            continue
        for c in convs:  # what cuDNN's NHWC kernels read: no per-call weight copy
            if _plain(c):
                c.weight.data = c.weight.data.contiguous(memory_format=_CL)
        model.set_submodule(name, cls(m))
        swapped.append(name)
    return swapped


def _check_folded(name: str, bns) -> None:
    if not all(isinstance(bn, nn.Identity) for bn in bns):
        raise ValueError(f"fuse_conv_epilogues: {name} still has BatchNorm; fold it first (fold_batchnorms)")


def _is_deform(conv: nn.Module) -> bool:
    """A float DCNv2 conv: the module, or the deploy form's op-variant wrapper of it (fp16 / fp16x2 engines)."""
    from bevdeploy.engine.deploy import _VariantDCN
    from bevdeploy.ops.modulated_deform_conv2d import ModulatedDeformConv2dPack

    return isinstance(conv, (ModulatedDeformConv2dPack, _VariantDCN))


def _dcn_module(conv: nn.Module) -> nn.Module:
    return conv.pack if hasattr(conv, "pack") else conv
