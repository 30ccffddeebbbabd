"""The int8 chain: int8 activations flow from layer to layer instead of fp16 + re-quantization.

After :func:`bevdeploy.quant.modules.quantize_modules`, every int8 layer still writes fp16 and its
consumer quantizes that again: one float write, one float read and one quantize pass per layer.
:func:`chain_int8` rewrites the structures whose data flow it knows so that a producer's epilogue
writes the int8 codes its consumers read (``QuantConv2d.out_scale`` / ``QuantLinear.out_scale`` =
the consumers' calibrated input scale, symmetric, no zero point):

* ResNet ``Bottleneck`` (BEVFormer/BEVDet image backbone) and ``BasicBlock`` (BEVDet BEV encoder):
  conv1 and conv2 fuse their ReLU and write int8 for the next conv (with ``build(int8_dcn=True)`` a DCNv2
  conv2, BEVFormer's R101 stages 3-4, is a ``QuantDeformConv2d``: it and its offset conv read conv1's
  codes, it writes conv3's); the last conv's epilogue does
  bias + identity (int8 codes with the block input's scale) or downsample branch (fp16) + ReLU +
  requantize to the next block's input scale, in one pass.
* Block sequences (a stage, stage to stage), the ResNet stem (conv + ReLU + int8 max-pool: max-pool
  commutes with a monotonic quantizer, so pooling the codes is exact) and ``nn.Sequential`` runs of
  int8 convs (FPN-LSS).
* The backbone's outputs into the neck's int8 laterals, and (BEVDet) the neck's output conv into the
  depth net; the laterals of BEVDet's ``CustomFPN`` and BEVFormer's ``FPN`` take the top-down sum
  as their fused residual (int8 codes, nearest-upsampled by a gather, when the level above writes
  int8), and write int8 for their output convs.
* BEVFormer's encoder linears: each layer's ``FFN`` (``layers.0.0`` -> ReLU -> Dropout ->
  ``layers.1``): the first linear fuses the ReLU and writes int8 codes at the second's input scale.
  That is the encoder's only linear -> linear edge: every other encoder linear reads a float tensor
  (LayerNorm output that the residual add also reads, ``cat``/``stack`` of queries and the previous
  BEV, camera features plus embeddings) or an attention op's output, and writes into an attention
  op (offsets, logits, values) or a residual add + LayerNorm, all float consumers.
* YOLOX (``ConvModule`` = conv + folded BN + SiLU fused into the int8 epilogue, so a ConvModule is
  one int8 conv): every conv -> conv edge. ``DarknetBottleneck`` (``x + SiLU(conv2(conv1(x)))``):
  conv1 writes int8 for conv2, whose epilogue does SiLU, then adds the identity (int8 codes of the
  block input's scale; ``residual_after_act``) and writes the block output for the next reader.
  ``CSPLayer``: main_conv and short_conv read one tensor (one scale), the blocks are chained, and the
  last block and short_conv both write at final_conv's input scale, so the concatenation of their
  codes is exactly final_conv's quantized input. ``SPPBottleneck``: conv1 writes at conv2's scale,
  the 5/9/13 max pools run on the codes and conv2 reads the concatenation. The backbone's stage
  sequence; ``YOLOXPAFPN``: each reduce conv's output (nearest-upsampled by a gather of codes) is
  concatenated with a backbone level for a top-down CSP and with a downsample conv's output for a
  bottom-up CSP, and that backbone level also feeds the next backbone stage: the three producers
  write at one scale shared by all five readers; CSP outputs into the next reduce / downsample conv
  and the out convs; out convs into both head towers, the towers' two convs, and the towers into
  the 1x1 predictors (which write the float outputs). The Focus stem conv stays float. On the full
  YOLOX-x, 145 of the 154 int8 convs write int8 (all but the 9 predictors).

A tensor goes int8 only when its producer is an int8 conv / linear and every consumer reads int8 (an
int8 layer's input, or an int8 conv epilogue's residual); any float consumer (a kept-float layer, a float DCN,
an upsample, the returned feature list) keeps it float, and the producer writes float directly, so
the chain never adds a dequantize pass. Readers of one tensor share one scale: the largest of their
calibrated input scales (they calibrated the same tensor, so these agree up to calibrator noise;
the largest clips nothing any of them kept). With zero points (asymmetric codes) they share the
(scale, zero point) covering the union of their ranges; producers write codes with that zero point
and residual epilogues read them with it.

Origin: TensorRT's explicit-quantization graphs (Q/DQ pairs propagated and fused into conv
epilogues) express the same data flow; here it is a module rewrite the engine exports as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevdeploy.models.yolox import YOLOXPAFPN
from bevdeploy.quant.int8_kernels import code_range
from bevdeploy.quant.modules import QuantConv2d, QuantDeformConv2d, QuantLinear
from bevdeploy.quant.smooth import ChannelScale

__all__ = ["Int8Bottleneck", "Int8BasicBlock", "Int8ResNet", "Int8CustomFPN", "Int8FPN", "Int8DarknetBottleneck",
           "Int8SPPBottleneck", "Int8YOLOXPAFPN", "chain_int8", "max_pool2d_int8", "smoothing_ties"]


def max_pool2d_int8(x: Tensor, kernel_size: int, stride: int, padding: int) -> Tensor:
    """Max-pool of int8 codes (no dilation, floor mode) as the max of shifted strided views.

    ``max(q(x)) == q(max(x))`` for a monotonic quantizer, so pooling codes is exact. Written with
    ``torch.maximum`` over views (a compiler fuses them into one pass) because int8 max-pool kernels
    are not available on every backend; padding uses -128, below every code. Separable (the max over
    a window is the max over its rows' maxima): 2k views instead of k^2 (YOLOX's SPP pools 13x13).
    """
    n, c, h, w = x.shape
    ho = (h + 2 * padding - kernel_size) // stride + 1
    wo = (w + 2 * padding - kernel_size) // stride + 1
    xp = F.pad(x, (padding, padding, padding, padding), value=-128) if padding else x
    rows = None
    for dx in range(kernel_size):
        v = xp[:, :, :, dx:dx + stride * (wo - 1) + 1:stride]
        rows = v if rows is None else torch.maximum(rows, v)
    out = None
    for dy in range(kernel_size):
        v = rows[:, :, dy:dy + stride * (ho - 1) + 1:stride, :]
        out = v if out is None else torch.maximum(out, v)
    return out


def _nearest_like(x: Tensor, size) -> Tensor:
    """Nearest upsampling to ``size`` (source index ``floor(dst * in / out)``, F.interpolate's
    'nearest'); int8 codes by an index gather (it commutes with the quantizer: exact)."""
    if x.dtype != torch.int8:
        return F.interpolate(x, size=size, mode="nearest")
    (h, w), (ho, wo) = x.shape[2:], size
    iy = torch.arange(ho, device=x.device) * h // ho
    ix = torch.arange(wo, device=x.device) * w // wo
    return x.index_select(2, iy).index_select(3, ix).contiguous(memory_format=torch.channels_last)


def _is_q(m) -> bool:
    """An int8 conv (plain or DCNv2): ReLU fused in its epilogue, int8 codes in and out."""
    return isinstance(m, (QuantConv2d, QuantDeformConv2d))


def _is_int8(m) -> bool:
    """An int8 layer whose epilogue can write int8 codes (a conv, a DCNv2 conv or a linear)."""
    return isinstance(m, (QuantConv2d, QuantDeformConv2d, QuantLinear))


def _conv_relu(conv: nn.Module, x: Tensor) -> Tensor:
    """conv + ReLU: fused in an int8 conv's epilogue (its activation is set to relu), else run here."""
    return conv(x) if _is_q(conv) else F.relu(conv(x))


def _conv_residual_relu(conv: nn.Module, x: Tensor, identity: Tensor, identity_scale: float | None,
                        identity_zero_point: int = 0) -> Tensor:
    """relu(conv(x) + identity): one epilogue for an int8 conv (int8 or float identity)."""
    if _is_q(conv):
        if identity.dtype != torch.int8:
            return conv(x, residual=identity)
        return conv(x, residual=identity, residual_scale=identity_scale, residual_zero_point=identity_zero_point)
    assert identity.dtype != torch.int8, "float conv with an int8 identity: chain_int8 must keep it float"
    return F.relu(conv(x) + identity)


class Int8Bottleneck(nn.Module):
    """A ``Bottleneck`` whose convs pass int8 codes (see the module docstring); same child names.

    ``in_scale``, ``in_zero_point``: the scale and zero point of the int8 input codes (None: float input).
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = block.conv1, block.conv2, block.conv3
        self.downsample = block.downsample
        self.in_scale: float | None = None
        self.in_zero_point = 0
        self.int8_identity = True
        for conv in (self.conv1, self.conv2, self.conv3):
            if _is_q(conv):
                conv.activation = "relu"

    def input_readers(self) -> list[tuple[nn.Module | None, str]]:
        readers = [(self.conv1, "input")]
        if self.downsample is not None:
            readers.append((_single_conv(self.downsample), "input"))
        else:
            readers.append((self.conv3, "residual") if self.int8_identity else (None, "float"))
        return readers

    def last_conv(self) -> nn.Module:
        return self.conv3

    def link_internal(self) -> None:
        _link(self.conv1, [(self.conv2, "input")])
        _link(self.conv2, [(self.conv3, "input")])

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = _conv_relu(self.conv1, x)
        out = _conv_relu(self.conv2, out)
        return _conv_residual_relu(self.conv3, out, identity, self.in_scale, self.in_zero_point)


class Int8BasicBlock(nn.Module):
    """A ``BasicBlock`` (3x3 -> 3x3 + identity) whose convs pass int8 codes; same child names."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.conv1, self.conv2 = block.conv1, block.conv2
        self.downsample = block.downsample
        self.in_scale: float | None = None
        self.in_zero_point = 0
        self.int8_identity = True
        for conv in (self.conv1, self.conv2):
            if _is_q(conv):
                conv.activation = "relu"

    def input_readers(self) -> list[tuple[nn.Module | None, str]]:
        readers = [(self.conv1, "input")]
        if self.downsample is not None:
            readers.append((_single_conv(self.downsample), "input"))
        else:
            readers.append((self.conv2, "residual") if self.int8_identity else (None, "float"))
        return readers

    def last_conv(self) -> nn.Module:
        return self.conv2

    def link_internal(self) -> None:
        _link(self.conv1, [(self.conv2, "input")])

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = _conv_relu(self.conv1, x)
        return _conv_residual_relu(self.conv2, out, identity, self.in_scale, self.in_zero_point)


_BLOCKS = (Int8Bottleneck, Int8BasicBlock)


class Int8ResNet(nn.Module):
    """The image ``ResNet`` with an int8 stem (conv + fused ReLU + int8 max-pool) and chained stages."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.conv1, self.maxpool = resnet.conv1, resnet.maxpool
        for i in range(1, 5):
            self.add_module(f"layer{i}", getattr(resnet, f"layer{i}"))
        self.out_indices = tuple(resnet.out_indices)
        self.depth, self.style = resnet.depth, resnet.style
        if _is_q(self.conv1):
            self.conv1.activation = "relu"

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(256 * 2**i for i in self.out_indices)

    def forward(self, x: Tensor) -> list[Tensor]:
        if not _is_q(self.conv1):
            # a float stem on an NCHW image: cuDNN's NHWC stem kernel then converts the image and its
            # [6, 64, H/2, W/2] output between layouts (three passes, 0.66 ms a frame in the base int8-fp16
            # profile); a channels-last input keeps the stem, ReLU and max-pool in NHWC
            x = x.contiguous(memory_format=torch.channels_last)
        x = _conv_relu(self.conv1, x)
        mp = self.maxpool
        if x.dtype == torch.int8:
            # channels-last: the layout layer1's int8 convs read (a compiler writes it so directly)
            x = max_pool2d_int8(x, mp.kernel_size, mp.stride, mp.padding).contiguous(memory_format=torch.channels_last)
        else:
            x = mp(x)
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            if i in self.out_indices:
                outs.append(x)
            if i >= max(self.out_indices):
                break
        return outs


class Int8CustomFPN(nn.Module):
    """BEVDet's ``CustomFPN`` with the top-down sum fused into the lateral conv's epilogue (as its
    residual) and the summed lateral written as int8 for the output conv when it is int8."""

    def __init__(self, fpn: nn.Module) -> None:
        super().__init__()
        self.out_ids = fpn.out_ids
        self.lateral_convs, self.fpn_convs = fpn.lateral_convs, fpn.fpn_convs

    def forward(self, inputs) -> Tensor:
        if len(inputs) != len(self.lateral_convs):
            raise ValueError(f"CustomFPN expects {len(self.lateral_convs)} input levels, got {len(inputs)}")
        n = len(inputs)
        lat = [None] * n
        lat[n - 1] = self.lateral_convs[n - 1].conv(inputs[n - 1])
        for i in range(n - 2, -1, -1):
            up = _nearest_like(lat[i + 1], inputs[i].shape[2:])
            conv = self.lateral_convs[i].conv
            lat[i] = conv(inputs[i], residual=up) if _is_q(conv) else conv(inputs[i]) + up
        return self.fpn_convs[0](lat[self.out_ids[0]])


class Int8FPN(nn.Module):
    """BEVFormer's ``FPN`` with the top-down sum fused into each lateral conv's epilogue (the
    upsampled level above as its residual, int8 codes when that lateral writes int8) and each
    lateral written as int8 for its output conv when both readers are int8. ``lateral_scales[i]``,
    ``lateral_zero_points[i]``: the scale and zero point of lateral i's int8 output (None: float)."""

    def __init__(self, fpn: nn.Module) -> None:
        super().__init__()
        for attr in ("in_channels", "out_channels", "num_outs", "start_level", "add_extra_convs",
                     "relu_before_extra_convs"):
            setattr(self, attr, getattr(fpn, attr))
        self.lateral_convs, self.fpn_convs = fpn.lateral_convs, fpn.fpn_convs
        self.lateral_scales: list[float | None] = [None] * len(self.lateral_convs)
        self.lateral_zero_points: list[int] = [0] * len(self.lateral_convs)

    def forward(self, inputs) -> list[Tensor]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"FPN expects {len(self.in_channels)} input levels, got {len(inputs)}")
        used = len(self.lateral_convs)
        xs = [inputs[i + self.start_level] for i in range(used)]
        lat = [None] * used
        lat[used - 1] = self.lateral_convs[used - 1].conv(xs[used - 1])
        for i in range(used - 2, -1, -1):
            up = _nearest_like(lat[i + 1], xs[i].shape[2:])
            conv = self.lateral_convs[i].conv
            if _is_q(conv) and up.dtype == torch.int8:
                lat[i] = conv(xs[i], residual=up, residual_scale=self.lateral_scales[i + 1],
                              residual_zero_point=self.lateral_zero_points[i + 1])
            elif _is_q(conv):
                lat[i] = conv(xs[i], residual=up)
            else:
                lat[i] = conv(xs[i]) + up
        outs = [self.fpn_convs[i](lat[i]) for i in range(used)]
        if self.num_outs > used:
            if self.add_extra_convs is None:
                for _ in range(self.num_outs - used):
                    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                outs.append(self.fpn_convs[used](outs[-1]))
                for i in range(used + 1, self.num_outs):
                    src = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs.append(self.fpn_convs[i](src))
        return outs


def _single_conv(m: nn.Module | None) -> nn.Module | None:
    """The conv of a projection (a conv, or ``Sequential(conv, Identity...)`` after BN folding)."""
    if isinstance(m, nn.Sequential):
        convs = [c for c in m if not isinstance(c, nn.Identity)]
        return convs[0] if len(convs) == 1 else None
    return m


def _shared_qparams(inputs: list[nn.Module]) -> tuple[float, int]:
    """One (scale, zero point) for the readers of one tensor: the largest scale when all are symmetric,
    else the asymmetric quantizer of the union of the ranges they represent."""
    if all(m.input_zero_point == 0 for m in inputs):
        return max(m.input_scale for m in inputs), 0
    from bevdeploy.quant.calibrate import asymmetric_qparams

    lo = min(m.input_scale * (code_range(m.input_zero_point)[0] - m.input_zero_point) for m in inputs)
    hi = max(m.input_scale * (code_range(m.input_zero_point)[1] - m.input_zero_point) for m in inputs)
    return asymmetric_qparams(lo, hi)


def _float_output(producer: nn.Module | None) -> None:
    if _is_int8(producer):
        producer.out_scale, producer.out_zero_point = None, 0


def _link(producer: nn.Module | None, readers: list[tuple[nn.Module | None, str]]) -> tuple[float, int] | None:
    """Make ``producer`` write int8 for ``readers`` when it and all of them are int8; returns the codes'
    (scale, zero point), or None (float).

    readers: ``(module, "input")`` for an int8 conv / linear reading the tensor as its input,
    ``(module, "residual")`` for an int8 conv epilogue adding it, ``(None, "float")`` for a float consumer.
    """
    inputs = [m for m, kind in readers if kind == "input"]
    if not _is_int8(producer) or not inputs or not all(_is_int8(m) for m, _ in readers):
        _float_output(producer)
        return None
    scale, zero_point = _shared_qparams(inputs)
    for m in inputs:
        m.input_scale = scale
        if m.input_zero_point != zero_point:
            m.set_input_zero_point(zero_point)
    producer.out_scale, producer.out_zero_point = scale, zero_point
    return scale, zero_point


def _link_into_block(producer: nn.Module | None, block: nn.Module, extra=()) -> None:
    block.in_scale, block.in_zero_point = _link(producer, [*block.input_readers(), *extra]) or (None, 0)


def _convert_blocks(model: nn.Module) -> None:
    from bevdeploy.models.bevdet import BasicBlock
    from bevdeploy.models.centernet import BasicBlock as CenterNetBasicBlock
    from bevdeploy.models.resnet import Bottleneck

    basic = (BasicBlock, CenterNetBasicBlock)  # the same block (CenterNet's projection is conv + BN)
    for name, m in list(model.named_modules()):
        cls = Int8Bottleneck if isinstance(m, Bottleneck) else Int8BasicBlock if isinstance(m, basic) else None
        if cls is None:
            continue
        model.set_submodule(name, cls(m))


def _link_sequentials(model: nn.Module) -> None:
    """Adjacent int8 convs of a plain ``nn.Sequential`` (Identity between them: folded BN, fused ReLU)."""
    for m in model.modules():
        if type(m) is not nn.Sequential:
            continue
        kids = [c for c in m if not isinstance(c, nn.Identity)]
        for a, b in zip(kids, kids[1:]):
            if _is_q(a) and _is_q(b):
                _link(a, [(b, "input")])


def _link_ffns(model: nn.Module) -> None:
    """BEVFormer's ``FFN``: ``layers.0 = Sequential(Linear, ReLU, Dropout)``, then ``layers.1`` (Linear):
    the hidden activation feeds ``layers.1`` alone, so ``layers.0.0`` fuses the ReLU and writes int8
    codes at ``layers.1``'s input scale (Dropout is the identity in eval; codes pass through it)."""
    from bevdeploy.models.bevformer import FFN

    for ffn in model.modules():
        if not isinstance(ffn, FFN):
            continue
        first, second = ffn.layers[0], ffn.layers[1]
        fc1, rest = first[0], list(first._modules.items())[1:]
        if not (_is_int8(fc1) and _is_int8(second)):
            continue
        if not all(type(m) in (nn.ReLU, nn.Dropout, nn.Identity) for _, m in rest):
            continue  # an unknown module between the linears: keep the float hand-over
        relus = [k for k, m in rest if type(m) is nn.ReLU]
        if relus:  # not fused by quantize_modules (fuse_relu=False): fuse it now, as the blocks do
            if fc1.activation != "none" or len(relus) > 1:
                continue
            fc1.activation = "relu"
            setattr(first, relus[0], nn.Identity())
        _link(fc1, [(second, "input")])


def _link_stage_blocks(stages: list[nn.Sequential]) -> None:
    for stage in stages:
        blocks = list(stage)
        if all(isinstance(b, _BLOCKS) for b in blocks):
            for a, b in zip(blocks, blocks[1:]):
                _link_into_block(a.last_conv(), b)


def _link_resnet(net: Int8ResNet, out_readers: dict[int, list]) -> None:
    """Stem -> layer1, stage ends -> next stage (+ the neck readers of returned stages)."""
    stages = [getattr(net, f"layer{i}") for i in range(1, 5)]
    _link_stage_blocks(stages)
    last = max(net.out_indices)
    _link_into_block(net.conv1, stages[0][0])
    for i in range(last + 1):
        producer = stages[i][-1].last_conv()
        readers = list(out_readers.get(i, [(None, "float")])) if i in net.out_indices else []
        if i < last:
            _link_into_block(producer, stages[i + 1][0], readers)
        else:
            _link(producer, readers)


# ---------------------------------------------------------------------------------------------- YOLOX


def _is_smooth_wrapper(m: nn.Module | None) -> bool:
    """``Sequential(ChannelScale, layer)`` of :func:`~bevdeploy.quant.smooth.smooth_inputs`, or its folded form
    ``Sequential(Identity, layer)`` (the divisor moved into the producer's epilogue)."""
    return type(m) is nn.Sequential and len(m) == 2 and isinstance(m[0], (ChannelScale, nn.Identity))


def _unwrap(m: nn.Module | None, through_scale: bool = False) -> nn.Module | None:
    """The layer of a folded smoothing wrapper (its input is the int8 tensor itself), or with ``through_scale``
    of any smoothing wrapper (for what the layer writes: its output does not depend on how its input is
    scaled); else ``m``."""
    if _is_smooth_wrapper(m) and (through_scale or isinstance(m[0], nn.Identity)):
        return m[1]
    return m


def _cm_conv(m: nn.Module | None, through_scale: bool = False) -> nn.Module | None:
    """The int8 conv of a deployed ``ConvModule`` (BN folded, SiLU fused: every other child is an
    Identity) or a plain int8 conv, seen through a folded smoothing wrapper (any one with
    ``through_scale``, see :func:`_unwrap`); None for anything float (its output is float)."""
    from bevdeploy.models.yolox import ConvModule

    if isinstance(m, ConvModule):
        rest = [c for k, c in m.named_children() if k != "conv"]
        conv = _unwrap(m.conv, through_scale)
        return conv if _is_q(conv) and all(type(c) is nn.Identity for c in rest) else None
    m = _unwrap(m, through_scale)
    return m if _is_int8(m) else None


def _cm_readers(m: nn.Module | None) -> list[tuple[nn.Module | None, str]]:
    conv = _cm_conv(m)
    return [(conv, "input")] if conv is not None else [(None, "float")]


class Int8DarknetBottleneck(nn.Module):
    """YOLOX's ``DarknetBottleneck`` (``x + SiLU(conv2(conv1(x)))``) with the identity fused into conv2's
    epilogue after its SiLU (``residual_after_act``; int8 codes of the block input's scale, or float),
    so conv2 writes the block output directly (int8 for the next reader); same child names."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.conv1, self.conv2 = block.conv1, block.conv2
        self.add_identity = block.add_identity
        self.in_scale: float | None = None
        self.in_zero_point = 0
        self.int8_identity = True
        # the block input's per-channel multiplier when its producer divided it for conv1's smoothing (_y_fold):
        # conv2's epilogue multiplies the identity back
        self.register_buffer("in_mul", None)
        c2 = _cm_conv(self.conv2, through_scale=True)  # a smoothed conv2 may run its epilogue once folded
        if self.add_identity and c2 is not None:
            c2.residual_after_act = True

    def input_readers(self) -> list[tuple[nn.Module | None, str]]:
        readers = _cm_readers(self.conv1)
        if self.add_identity:
            c2 = _cm_conv(self.conv2)
            readers.append((c2, "residual") if self.int8_identity and c2 is not None else (None, "float"))
        return readers

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        if not self.add_identity:
            return self.conv2(out)
        c2 = _cm_conv(self.conv2)
        if c2 is not None:
            if x.dtype != torch.int8:
                return c2(out, residual=x, residual_mul=self.in_mul)
            return c2(out, residual=x, residual_scale=self.in_scale, residual_zero_point=self.in_zero_point,
                      residual_mul=self.in_mul)
        assert x.dtype != torch.int8, "float conv2 with an int8 identity: chain_int8 must keep it float"
        assert self.in_mul is None, "float conv2 with a divided identity: _y_fold must not fold into this block"
        return self.conv2(out) + x


class Int8SPPBottleneck(nn.Module):
    """YOLOX's ``SPPBottleneck`` on int8 codes: conv1 writes them at conv2's input scale, the max pools
    run on the codes (exact, :func:`max_pool2d_int8`) and conv2 reads their concatenation (one scale:
    exact); same child names."""

    def __init__(self, spp: nn.Module) -> None:
        super().__init__()
        self.conv1, self.poolings, self.conv2 = spp.conv1, spp.poolings, spp.conv2

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        if x.dtype == torch.int8:
            pools = [max_pool2d_int8(x, p.kernel_size, p.stride, p.padding) for p in self.poolings]
            return self.conv2(torch.cat([x, *pools], 1).contiguous(memory_format=torch.channels_last))
        return self.conv2(torch.cat([x] + [pool(x) for pool in self.poolings], 1))


class Int8YOLOXPAFPN(YOLOXPAFPN):
    """``YOLOXPAFPN`` whose 2x nearest upsampling gathers int8 codes (exact) when the reduce conv
    writes int8; otherwise the same forward and child names."""

    def __init__(self, neck: YOLOXPAFPN) -> None:
        nn.Module.__init__(self)  # adopts the float neck's children (no new parameters)
        self.in_channels = neck.in_channels
        self.upsample = neck.upsample
        self.reduce_layers, self.top_down_blocks = neck.reduce_layers, neck.top_down_blocks
        self.downsamples, self.bottom_up_blocks = neck.downsamples, neck.bottom_up_blocks
        self.out_convs = neck.out_convs

    def _up(self, x: Tensor) -> Tensor:
        return _nearest_like(x, (2 * x.shape[2], 2 * x.shape[3])) if x.dtype == torch.int8 else self.upsample(x)


def _y_readers(m: nn.Module) -> list[tuple[nn.Module | None, str]]:
    """Who reads a tensor fed to YOLOX module ``m`` (see :func:`_link`'s readers)."""
    from bevdeploy.models.yolox import CSPLayer

    if isinstance(m, Int8DarknetBottleneck):
        return m.input_readers()
    if isinstance(m, Int8SPPBottleneck):
        return _cm_readers(m.conv1)
    if isinstance(m, CSPLayer):
        return _cm_readers(m.main_conv) + _cm_readers(m.short_conv)
    if type(m) is nn.Sequential and not _is_smooth_wrapper(m):
        return _y_readers(m[0])
    return _cm_readers(m)


def _y_producer(m: nn.Module) -> nn.Module | None:
    """The int8 conv writing YOLOX module ``m``'s output (None: float), whatever scales its input (a smoothed
    layer still writes its output), but for a ``DarknetBottleneck`` with an identity: its conv2 adds the
    identity in its epilogue only when it reads conv1's tensor itself (its forward's int8 path)."""
    from bevdeploy.models.yolox import CSPLayer

    if isinstance(m, Int8DarknetBottleneck):
        return _cm_conv(m.conv2, through_scale=not m.add_identity)
    if isinstance(m, Int8SPPBottleneck):
        return _cm_conv(m.conv2, through_scale=True)
    if isinstance(m, CSPLayer):
        return _cm_conv(m.final_conv, through_scale=True)
    if type(m) is nn.Sequential and not _is_smooth_wrapper(m):
        return _y_producer(m[-1])
    return _cm_conv(m, through_scale=True)


def _y_smoothed_entries(m: nn.Module) -> list[nn.Module] | None:
    """The ``Sequential(ChannelScale, layer)`` wrappers through which YOLOX module ``m`` reads its input, and
    the ``DarknetBottleneck`` that adds it as its identity (its int8 conv2 can multiply the divisor back);
    None when it reads it otherwise too (a plain layer, a float op, a float conv2's identity)."""
    from bevdeploy.models.yolox import ConvModule, CSPLayer

    if isinstance(m, Int8DarknetBottleneck):
        entries = _y_smoothed_entries(m.conv1)
        if not m.add_identity or entries is None:
            return entries
        return entries + [m] if _cm_conv(m.conv2) is not None else None
    if isinstance(m, Int8SPPBottleneck):
        return _y_smoothed_entries(m.conv1)
    if isinstance(m, CSPLayer):
        main, short = _y_smoothed_entries(m.main_conv), _y_smoothed_entries(m.short_conv)
        return None if main is None or short is None else main + short
    if isinstance(m, ConvModule):
        return _y_smoothed_entries(m.conv)
    if _is_smooth_wrapper(m):
        return [m] if isinstance(m[0], ChannelScale) else None
    if type(m) is nn.Sequential and len(m):
        return _y_smoothed_entries(m[0])
    return None


def _y_fold(producers: list[nn.Module], readers: list[nn.Module], extra=(), concat: bool = False,
            reads: list[list[nn.Module]] | None = None) -> None:
    """Move the smoothing divisor of ``readers`` into the epilogues of ``producers`` (module docstring of
    :mod:`bevdeploy.quant.smooth`): when every reader reads its input only through a ``ChannelScale`` (or as a
    ``DarknetBottleneck``'s identity, added by its int8 conv2), every producer is an int8 conv or linear, and
    each producer's channels get the same divisor from every reader, each producer multiplies its output
    channels by it (``out_mul``), the readers' ``ChannelScale`` become ``nn.Identity`` and the blocks multiply
    their identity back (``in_mul``). What each reader reads: ``reads`` (per reader, the producers whose outputs
    it concatenates, in order; a producer twice for a tensor and its max-pooled copy), else the one producer, or
    all of them concatenated in this order (``concat``). The same function either way; the linking that follows
    then sees int8 readers."""
    if extra or not readers:
        return
    if reads is None:
        if len(producers) > 1 and not concat:
            return
        reads = [producers] * len(readers)
    convs = {id(p): _y_producer(p) for p in producers}
    if not all(isinstance(c, (QuantConv2d, QuantLinear)) for c in convs.values()):
        return
    divisors: dict[int, Tensor] = {}  # producer -> the divisor of its channels
    entries: list[nn.Module] = []
    blocks: list[tuple[nn.Module, Tensor]] = []
    for reader, parts in zip(readers, reads, strict=True):
        found = _y_smoothed_entries(reader)
        if found is None:
            return
        scales = [e for e in found if not isinstance(e, Int8DarknetBottleneck)]
        if not scales:
            return
        inv = scales[0][0].inv
        sizes = [convs[id(p)].weight.shape[0] for p in parts]
        if sum(sizes) != inv.numel() or not all(torch.equal(e[0].inv, inv) for e in scales):
            return
        for p, part in zip(parts, inv.split(sizes)):
            if not torch.equal(divisors.setdefault(id(p), part), part):
                return
        entries += scales
        blocks += [(e, inv) for e in found if isinstance(e, Int8DarknetBottleneck)]
    if len(divisors) != len(convs):
        return
    # once per producer: its readers' ChannelScale are Identities after this, so no later fold finds them
    for key, c in convs.items():
        c.set_out_mul(divisors[key])
    for e in entries:
        e[0] = nn.Identity()
    for b, inv in blocks:
        b.in_mul = (1.0 / inv).float()


def _y_set_in_qparams(readers: list[nn.Module], qparams: tuple[float, int] | None) -> None:
    """Blocks among ``readers`` (first modules of a Sequential included) learn their int8 input's
    (scale, zero point)."""
    for m in readers:
        while type(m) is nn.Sequential:
            m = m[0]
        if isinstance(m, Int8DarknetBottleneck):
            m.in_scale, m.in_zero_point = qparams or (None, 0)


def _y_link(producers: list[nn.Module], readers: list[nn.Module], extra=(), concat: bool = False,
            reads=None) -> tuple[float, int] | None:
    """The outputs of YOLOX modules ``producers`` (one tensor, or tensors concatenated for the readers: how,
    ``concat`` / ``reads``, matters to :func:`_y_fold` only) go int8 at one (scale, zero point) when every
    producer's last conv is int8 and every reader is; else all float."""
    convs = [_y_producer(p) for p in producers]
    rs = [r for m in readers for r in _y_readers(m)] + list(extra)
    qparams = None
    if all(c is not None for c in convs):
        qparams = _link(convs[0], rs)
        for c in convs[1:]:
            c.out_scale, c.out_zero_point = qparams or (None, 0)
    else:
        for c in convs:
            _float_output(c)
    _y_set_in_qparams(readers, qparams)
    return qparams


def _link_csp(csp: nn.Module, link=_y_link) -> None:
    """main_conv -> blocks -> (last block, short_conv) concatenated -> final_conv (one scale: exact)."""
    seq = [csp.main_conv, *csp.blocks]
    for a, b in zip(seq, seq[1:]):
        link([a], [b])
    link([seq[-1], csp.short_conv], [csp.final_conv], concat=True)


def _link_yolox(model: nn.Module, link=_y_link) -> None:
    """The data flow of :class:`bevdeploy.models.yolox.YOLOX` (``backbone``, ``neck``, ``bbox_head``): each edge
    handed to ``link`` (:func:`_y_link`, or :func:`_y_fold` in the pass before it)."""
    from bevdeploy.models.yolox import CSPDarknet, CSPLayer, YOLOXHead

    for m in model.modules():  # inside the blocks first: a CSP's concat link reads its last block's conv2
        if isinstance(m, Int8DarknetBottleneck):
            link([m.conv1], [m.conv2])
        elif isinstance(m, Int8SPPBottleneck):  # conv2 reads conv1's output and its max-pooled copies
            link([m.conv1], [m.conv2], reads=[[m.conv1] * (1 + len(m.poolings))])
    for m in model.modules():
        if isinstance(m, CSPLayer):
            _link_csp(m, link)
    backbone, neck, head = (getattr(model, k, None) for k in ("backbone", "neck", "bbox_head"))
    whole = isinstance(backbone, CSPDarknet) and isinstance(neck, Int8YOLOXPAFPN) and isinstance(head, YOLOXHead)
    for net in [m for m in model.modules() if isinstance(m, CSPDarknet)]:
        stages = [net.stage1, net.stage2, net.stage3, net.stage4]
        seq = [net.stem.conv] + [m for s in stages for m in s]
        outs = {id(s[-1]) for s in stages[1:]}  # stages 2-4 are returned
        for a, b in zip(seq, seq[1:]):
            if id(a) not in outs:
                link([a], [b])
        if not (whole and net is backbone):  # returned to unknown readers: float
            for s in stages[1:]:
                link([s[-1]], [], [(None, "float")])
    if not whole:
        return
    n = len(neck.in_channels)
    inputs = [backbone.stage2, backbone.stage3, backbone.stage4][-n:]
    nxt = {id(backbone.stage2): backbone.stage3[0], id(backbone.stage3): backbone.stage4[0]}
    td, bu, red, down = neck.top_down_blocks, neck.bottom_up_blocks, neck.reduce_layers, neck.downsamples
    link([inputs[n - 1][-1]], [red[0]])  # the top level: the first reduce conv
    for j in range(n - 1):
        # high_j (reduce_layers[j]) is upsampled and concatenated with backbone level n-2-j for
        # top_down_blocks[j], and concatenated after downsamples[n-2-j] for bottom_up_blocks[n-2-j];
        # that level is also the next backbone stage's input: the three tensors share one scale
        level = inputs[n - 2 - j]
        readers = [td[j], bu[n - 2 - j]] + ([nxt[id(level)]] if id(level) in nxt else [])
        reads = [[red[j], level[-1]], [down[n - 2 - j], red[j]]] + ([[level[-1]]] if id(level) in nxt else [])
        link([red[j], level[-1], down[n - 2 - j]], readers, reads=reads)
        if j < n - 2:
            link([td[j]], [red[j + 1]])
    link([td[n - 2]], [down[0], neck.out_convs[0]])  # outs[0]
    for i in range(n - 1):  # outs[i + 1]
        link([bu[i]], [neck.out_convs[i + 1]] + ([down[i + 1]] if i + 1 < n - 1 else []))
    for i in range(n):
        cls, reg = head.multi_level_cls_convs[i], head.multi_level_reg_convs[i]
        link([neck.out_convs[i]], [cls, reg])
        for tower in (cls, reg):
            for a, b in zip(tower, list(tower)[1:]):
                link([a], [b])
        link([cls], [head.multi_level_conv_cls[i]])
        link([reg], [head.multi_level_conv_reg[i], head.multi_level_conv_obj[i]])


def smoothing_ties(model: nn.Module) -> list[list[tuple[str, int, int]]]:
    """The input-channel slices of YOLOX convs that hold one producer's output read in several ways, as
    :func:`bevdeploy.quant.smooth.smooth_inputs` takes them (``ties``): the PAFPN's reduce conv output (upsampled
    first in a top-down concat, second in a bottom-up one), the backbone level beside it (second in the top-down
    concat, and the next stage's input), and an SPP's conv1 output with its max-pooled copies. Tied, they get one
    divisor, which :func:`_y_fold` moves into the producer. Names of the float model (before smoothing); ``[]``
    for other models."""
    from bevdeploy.models.yolox import CSPDarknet, SPPBottleneck, YOLOXPAFPN

    names = {id(m): n for n, m in model.named_modules()}
    ties = []
    for m in model.modules():
        if isinstance(m, SPPBottleneck):
            c, conv2 = m.conv1.conv.out_channels, names[id(m.conv2.conv)]
            ties.append([(conv2, i * c, (i + 1) * c) for i in range(1 + len(m.poolings))])
    backbone, neck = getattr(model, "backbone", None), getattr(model, "neck", None)
    if not (isinstance(backbone, CSPDarknet) and isinstance(neck, YOLOXPAFPN)):
        return ties
    n = len(neck.in_channels)
    inputs = [backbone.stage2, backbone.stage3, backbone.stage4][-n:]
    nxt = {id(backbone.stage2): backbone.stage3[0], id(backbone.stage3): backbone.stage4[0]}

    def csp_inputs(csp: nn.Module, lo: int, hi: int) -> list[tuple[str, int, int]]:
        return [(names[id(csp.main_conv.conv)], lo, hi), (names[id(csp.short_conv.conv)], lo, hi)]

    for j in range(n - 1):
        level = inputs[n - 2 - j]
        td, bu = neck.top_down_blocks[j], neck.bottom_up_blocks[n - 2 - j]
        c_red = neck.reduce_layers[j].conv.out_channels
        c_level = level[-1].final_conv.conv.out_channels
        c_down = neck.downsamples[n - 2 - j].conv.out_channels
        ties.append(csp_inputs(td, 0, c_red) + csp_inputs(bu, c_down, c_down + c_red))
        ties.append(csp_inputs(td, c_red, c_red + c_level)
                    + ([(names[id(nxt[id(level)].conv)], 0, c_level)] if id(level) in nxt else []))
    return ties


def _convert_yolox(model: nn.Module) -> None:
    from bevdeploy.models.yolox import DarknetBottleneck, SPPBottleneck

    for name, m in list(model.named_modules()):
        cls = (Int8DarknetBottleneck if isinstance(m, DarknetBottleneck) else
               Int8SPPBottleneck if isinstance(m, SPPBottleneck) else
               Int8YOLOXPAFPN if type(m) is YOLOXPAFPN else None)
        if cls is None:
            continue
        model.set_submodule(name, cls(m))


def chain_int8(model: nn.Module, *, int8_identity: bool = True) -> list[str]:
    """Rewrite ``model`` (after ``quantize_modules``) so int8 activations flow between its int8 layers.

    Recognised: the image ``ResNet`` (``img_backbone``) and its neck (``img_neck``: BEVDet's
    ``CustomFPN`` or BEVFormer's ``FPN``), BEVDet's depth net, ``Bottleneck`` / ``BasicBlock``
    sequences anywhere (BEVDet's BEV encoder; CenterNet's ResNet-18, stage to stage), int8 convs
    adjacent in an ``nn.Sequential``, the two linears of every BEVFormer ``FFN`` (the encoder's; the
    decoder's stay float by default), and
    YOLOX (``DarknetBottleneck``, ``CSPLayer``, ``SPPBottleneck`` anywhere; ``CSPDarknet``'s stages;
    with ``backbone`` / ``neck`` / ``bbox_head`` of a YOLOX, the PAFPN and head edges too; a
    ``CSPDarknet`` used alone returns float features).
    A ``ResNet`` used alone returns float features (its consumers are unknown).

    Args:
        model: a model whose convs were converted by ``quantize_modules`` (BN folded), in place.
        int8_identity: a residual block's identity (ResNet's, YOLOX's DarknetBottleneck's) is read as
            int8 codes (the block input's); False keeps block boundaries float (the identity then adds
            the float input: one fewer quantization per block, ~6 dB better SQNR on a random-weight
            ResNet-101, but block outputs are written as fp16 and quantized again by the next block's
            convs; on YOLOX the block input stays float and conv2 still writes the block output int8).

    Returns:
        Names of the int8 layers (convs and linears) that now write int8 codes, in module order.
    """
    from bevdeploy.models.bevdet import CustomFPN
    from bevdeploy.models.centernet import ResNet18
    from bevdeploy.models.fpn import FPN
    from bevdeploy.models.resnet import ResNet

    _convert_blocks(model)
    for m in list(model.modules()):
        if isinstance(m, _BLOCKS):
            m.int8_identity = int8_identity
            m.link_internal()
    for name, m in list(model.named_modules()):
        if isinstance(m, ResNet):
            model.set_submodule(name, Int8ResNet(m))
    for name, m in list(model.named_modules()):
        wrap = Int8CustomFPN if isinstance(m, CustomFPN) else Int8FPN if isinstance(m, FPN) else None
        if wrap is not None:
            model.set_submodule(name, wrap(m))

    backbone, neck = getattr(model, "img_backbone", None), getattr(model, "img_neck", None)
    resnets = [m for m in model.modules() if isinstance(m, Int8ResNet)]
    for net in resnets:
        out_readers: dict[int, list] = {}
        if net is backbone and isinstance(neck, (Int8CustomFPN, Int8FPN)):
            start = getattr(neck, "start_level", 0)
            for k, stage in enumerate(net.out_indices):
                j = k - start
                out_readers[stage] = [(neck.lateral_convs[j].conv, "input")] if j >= 0 else [(None, "float")]
        _link_resnet(net, out_readers)
    for m in model.modules():  # the other block sequences (BEVDet's BEV encoder): within each stage
        if isinstance(m, nn.Sequential) and not any(m is getattr(n, f"layer{i}") for n in resnets for i in range(1, 5)):
            _link_stage_blocks([m])
    for net in [m for m in model.modules() if isinstance(m, ResNet18)]:  # CenterNet's: stage to stage too
        stages = [getattr(net, f"layer{i}") for i in range(1, 5)]
        if all(isinstance(b, _BLOCKS) for st in stages for b in st):
            for a, b in zip(stages, stages[1:]):
                _link_into_block(a[-1].last_conv(), b[0])
    _link_sequentials(model)
    if isinstance(neck, Int8CustomFPN):
        n = len(neck.lateral_convs)
        for i in range(n):
            readers = [(None, "float")] if i > 0 else []  # upsampled into the level below
            if i == neck.out_ids[0]:
                readers.append((neck.fpn_convs[0].conv, "input"))
            _link(neck.lateral_convs[i].conv, readers)
        vt = getattr(model, "img_view_transformer", None)
        depth_net = getattr(vt, "depth_net", None)
        _link(neck.fpn_convs[0].conv, [(depth_net, "input")] if depth_net is not None else [(None, "float")])
    for fpn in [m for m in model.modules() if isinstance(m, Int8FPN)]:
        n = len(fpn.lateral_convs)
        for i in range(n - 1, -1, -1):  # top-down: a lateral's int8 output is the next one's residual
            readers = [(fpn.fpn_convs[i].conv, "input")]
            if i > 0:
                readers.append((fpn.lateral_convs[i - 1].conv, "residual"))
            fpn.lateral_scales[i], fpn.lateral_zero_points[i] = _link(fpn.lateral_convs[i].conv, readers) or (None, 0)
    _link_ffns(model)
    _convert_yolox(model)
    for m in model.modules():
        if isinstance(m, Int8DarknetBottleneck):
            m.int8_identity = int8_identity
    _link_yolox(model, _y_fold)  # smoothing divisors into producers first, so every edge links int8 after
    _link_yolox(model)
    return [n for n, m in model.named_modules() if _is_int8(m) and m.out_scale is not None]
