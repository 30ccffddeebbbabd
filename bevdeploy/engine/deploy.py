"""The deploy form of a model: what the engine exports, built from the eager PyTorch model.

Steps, in this order (each is a plain in-place function so the engine builder and tests can reuse it):

1. ``fold_batchnorms``: every BatchNorm2d that follows a conv is folded into that conv (a float
   conv becomes ``conv + bias``; the BN becomes ``nn.Identity``), so INT8 convs see the folded
   weights and the exported graph has no BN.
2. Calibration (``bevdeploy.quant.calibrate``) runs on this float, folded model (the builder's job).
3. ``apply_precision``: ``model.half()`` for the fp16 precisions, BEVFormer's spatial cross-attention
   switched to the camera-gathered op (``set_sca_gathered``; every precision), the ops' variant set on
   every module that calls an op (``op_variant``), then ``quantize_modules`` for the int8 precisions
   (``quantize_modules_fp8`` for the fp8 ones: e4m3 convs / linears in the same scope, same
   keep-float list; the ops, BEVDet's pooling included, stay float there), and last
   ``fuse_head_branches`` (every precision): each CenterPoint ``SeparateHead`` of BEVDet runs its
   branches as one conv stack (:class:`bevdeploy.models.bevdet.FusedSeparateHead`; same math). It runs
   after calibration and quantization, so the calibration table and the int8 scope see the
   official layer names; the head is float in every precision. With ``build --fused-epilogues``,
   ``fuse_centernet_head`` runs before ``apply_precision``: CenterNet's three head branches become one
   conv pair (:class:`bevdeploy.models.centernet.FusedCenterNetHead`), int8 included, its scales renamed and
   the branches' hidden ranges equalised so each keeps its int8 resolution.

Which layers become INT8 (:func:`int8_scope`) is the model family's scope
(:mod:`bevdeploy.engine.model_io`): for BEVFormer the image backbone and neck convs and the BEV
encoder's linears; the decoder layers, the heads, the CAN-bus MLP and every LayerNorm / softmax stay
float (the reference and NVIDIA's explicit-quantization ports keep them float: quantizing a decoder
collapsed accuracy in NVIDIA's Far3D port). For BEVDet everything before the
CenterPoint head, including the int8 ``bev_pool_v2``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "PRECISIONS",
    "PrecisionSpec",
    "precision_spec",
    "fold_batchnorms",
    "set_op_variant",
    "set_sca_gathered",
    "fuse_head_branches",
    "fuse_centernet_head",
    "fused_heads",
    "int8_scope",
    "apply_precision",
    "layer_precisions",
    "ExportWrapper",
]

#: Precision names, as everywhere in bevdeploy. ``fp8`` / ``fp8-fp16``: e4m3 convs and linears (Hopper
#: fp8 tensor cores), the float rest in fp32 / fp16.
PRECISIONS = ("fp32", "fp16", "fp16x2", "int8", "int8-fp16", "int8-fp16x2", "fp8", "fp8-fp16")


@dataclass(frozen=True)
class PrecisionSpec:
    """What one precision name means for the deploy form.

    Attributes:
        name: One of :data:`PRECISIONS`.
        float_dtype: Storage dtype of everything that is not INT8.
        op_variant: Variant forced on the ops (None: inferred from the dtype, i.e. fp32 / fp16).
        int8: Whether convs / linears in the model's int8 scope become INT8.
        fp8: Whether they become FP8 (e4m3) instead.
    """

    name: str
    float_dtype: torch.dtype
    op_variant: str | None
    int8: bool
    fp8: bool = False

    @property
    def quantized(self) -> bool:
        """Whether the precision needs calibrated activation ranges (int8 or fp8)."""
        return self.int8 or self.fp8


def precision_spec(precision: str) -> PrecisionSpec:
    """The :class:`PrecisionSpec` of ``precision`` (ValueError naming the choices otherwise)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision.startswith("fp8"):
        dtype = torch.float16 if precision == "fp8-fp16" else torch.float32
        return PrecisionSpec(precision, dtype, None, False, True)
    int8 = precision.startswith("int8")
    rest = precision[5:] if int8 and precision != "int8" else ("fp32" if int8 else precision)
    dtype = torch.float32 if rest == "fp32" else torch.float16
    return PrecisionSpec(precision, dtype, "fp16x2" if rest == "fp16x2" else None, int8)


def _fold_into(conv: nn.Module, bn: nn.BatchNorm2d) -> nn.Module:
    """``bn(conv(x))`` as one conv-like module (Conv2d via ``fold_bn``; DCN weights scaled in place)."""
    from bevdeploy.quant.modules import fold_bn

    if type(conv) is nn.Conv2d:
        return fold_bn(conv, bn)
    if type(conv) is nn.ConvTranspose2d and conv.groups == 1:
        # weight [Cin, Cout, kh, kw]: the BN scales output channels, dim 1
        factor = (bn.weight.detach().double() if bn.weight is not None else 1.0) * torch.rsqrt(
            bn.running_var.detach().double() + bn.eps)
        b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(factor)
        beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(factor)
        with torch.no_grad():
            conv.weight.copy_(conv.weight.detach().double() * factor.view(1, -1, 1, 1))
            conv.bias = nn.Parameter(((b - bn.running_mean.detach().double()) * factor + beta).to(conv.weight.dtype),
                                     requires_grad=False)
        return conv
    # modulated deformable conv: out = sum(w * sampled) + b, so the BN folds the same way
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                               device=w.device)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(b)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(b)
    factor = gamma * torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    with torch.no_grad():
        conv.weight.copy_(w * factor.view(-1, *([1] * (w.dim() - 1))))
        conv.bias = nn.Parameter(((b - bn.running_mean.detach().double()) * factor + beta).to(conv.weight.dtype),
                                 requires_grad=False)
    return conv


def fold_batchnorms(model: nn.Module) -> list[str]:
    """Fold every BatchNorm2d into the conv before it, in place; returns the folded BN names.

    Pairs recognised: attributes ``convN`` / ``bnN`` of one module (mmdet's ResNet and Bottleneck)
    and consecutive ``(conv, bn)`` entries of an ``nn.Sequential`` (the downsample projections).
    A BatchNorm2d left unpaired raises: the deploy form must not silently keep one.
    """
    from bevdeploy.ops.modulated_deform_conv2d import ModulatedDeformConv2d

    conv_types = (nn.Conv2d, ModulatedDeformConv2d, nn.ConvTranspose2d)
    folded: list[str] = []
    for parent_name, parent in list(model.named_modules()):
        prefix = f"{parent_name}." if parent_name else ""
        children = dict(parent.named_children())
        if isinstance(parent, nn.Sequential):
            keys = list(children)
            for a, b in zip(keys, keys[1:]):
                conv, bn = children[a], children[b]
                if isinstance(conv, conv_types) and isinstance(bn, nn.BatchNorm2d):
                    setattr(parent, a, _fold_into(conv, bn))
                    setattr(parent, b, nn.Identity())
                    folded.append(prefix + b)
            continue
        for name, bn in children.items():
            if isinstance(bn, nn.BatchNorm2d) and name.startswith("bn"):
                conv = children.get("conv" + name[2:])
                if isinstance(conv, conv_types):
                    setattr(parent, "conv" + name[2:], _fold_into(conv, bn))
                    setattr(parent, name, nn.Identity())
                    folded.append(prefix + name)
    left = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if left:
        raise NotImplementedError(f"BatchNorm2d layers not following a recognised conv (cannot fold): {left}")
    return folded


class _VariantDCN(nn.Module):
    """A ``ModulatedDeformConv2dPack`` whose op call takes the deploy form's ``op_variant``."""

    def __init__(self, pack: nn.Module, variant: str | None) -> None:
        super().__init__()
        self.pack = pack
        self.op_variant = variant

    def forward(self, x: Tensor) -> Tensor:
        from bevdeploy.ops.modulated_deform_conv2d import modulated_deform_conv2d, split_offset_mask

        p = self.pack
        offset, mask = split_offset_mask(p.conv_offset(x))  # offset: a view, read in place by the op
        return modulated_deform_conv2d(x, offset, mask, p.weight, p.bias, p.stride, p.padding, p.dilation, p.groups,
                                       p.deform_groups, variant=self.op_variant, activation=p.activation)


def set_op_variant(model: nn.Module, variant: str | None) -> list[str]:
    """Set ``op_variant`` on every module of ``model`` that calls an op; returns their names.

    DCNv2 convs (``ModulatedDeformConv2dPack``, an ops module) are wrapped in :class:`_VariantDCN`
    when ``variant`` is not None (the wrapper keeps the same parameters under ``.pack``).
    """
    from bevdeploy.ops.modulated_deform_conv2d import ModulatedDeformConv2dPack

    names = []
    for name, module in list(model.named_modules()):
        if hasattr(module, "op_variant"):
            module.op_variant = variant
            names.append(name)
        elif isinstance(module, ModulatedDeformConv2dPack) and variant is not None:
            model.set_submodule(name, _VariantDCN(module, variant))
            names.append(name)
    return names


def set_sca_gathered(model: nn.Module, gathered: bool = True) -> list[str]:
    """Switch every spatial cross-attention of ``model`` (modules with a ``gathered`` knob, BEVFormer's
    ``SpatialCrossAttention``) between the camera-gathered op (:func:`bevdeploy.ops.sca.sca_gathered`)
    and the static form; returns their names. Same result either way; the gathered op samples only
    the cameras that see each BEV query."""
    names = []
    for name, module in model.named_modules():
        if isinstance(getattr(module, "gathered", None), bool):
            module.gathered = gathered
            names.append(name)
    return names


def fuse_head_branches(model: nn.Module, *, pad_to: int = 8) -> list[str]:
    """Run the branches of every CenterPoint ``SeparateHead`` of ``model`` as one conv stack, in place.

    Each ``SeparateHead`` becomes a :class:`bevdeploy.models.bevdet.FusedSeparateHead` (first convs
    concatenated, later convs block-diagonal, output channels padded to a multiple of ``pad_to``;
    the same maps, as channel views of one output). BEVDet-R50 on an H100 ran its 12 branch convs
    as separate small cuDNN convs, with 13 ``nhwcAddPaddingKernel`` launches per frame (34.7 us of
    1.525 ms, ``bench/results/nvidia-h100-80gb-hbm3/profile-bevdet-r50-int8-fp16.md``) and separate
    ReLU passes; fused they are 2 convs of channel counts that are multiples of 8 (not yet timed).
    A head that cannot fuse (e.g. a branch quantized by a custom scope) is left as it is, with a warning.

    Args:
        model: BatchNorm folded (:func:`fold_batchnorms`), eval mode; run after calibration and
            quantization (the fused layers have new names).
        pad_to: Output-channel multiple of every fused conv.

    Returns:
        Names of the heads fused, in module order (empty for models without a ``SeparateHead``).
    """
    from bevdeploy.models.bevdet import FusedSeparateHead, SeparateHead

    fused = []
    for name, module in list(model.named_modules()):
        if type(module) is not SeparateHead:
            continue
        try:
            new = FusedSeparateHead.from_separate_head(module, pad_to=pad_to)
        except ValueError as e:
            logger.warning("head %s left unfused: %s", name, e)
            continue
        new.train(module.training)
        model.set_submodule(name, new)
        fused.append(name)
    return fused


def fuse_centernet_head(model: nn.Module, scales: dict[str, float] | None = None, keep_float: Iterable[str] = (),
                        zero_points: dict[str, int] | None = None) -> dict[str, float] | None:
    """Run CenterNet's three head branches as one conv pair (:class:`bevdeploy.models.centernet.FusedCenterNetHead`),
    in place, before ``apply_precision``; returns ``scales`` renamed for it (None stays None).

    With scales (int8 / fp8), the branches' hidden channels are scaled by ``gains = S / s_b`` (``s_b`` branch
    b's 1x1 input scale, ``S`` the largest): the fused 1x1 reads them at ``S``, and each branch's codes are
    the ones its own scale gave (same maps in float; in int8 the layer-0 weights quantize per output
    channel, so their codes do not change either). The fused 3x3 takes the branches' common input scale.
    A head whose layers are kept float, have zero points or lack a scale is left unfused (a warning):
    mixing them would change what the engine computes.
    """
    from bevdeploy.models.centernet import CenterNetHead, FusedCenterNetHead

    keep = set(keep_float)
    for name, head in list(model.named_modules()):
        if type(head) is not CenterNetHead:
            continue
        prefix = f"{name}." if name else ""
        firsts = [f"{prefix}{b}_head.0" for b in FusedCenterNetHead.BRANCHES]
        lasts = [f"{prefix}{b}_head.2" for b in FusedCenterNetHead.BRANCHES]
        gains = None
        if scales is not None:
            layers = firsts + lasts
            problem = None
            if kept := sorted(keep.intersection(layers)):
                problem = f"kept float: {kept}"
            elif with_zp := sorted(set(zero_points or ()).intersection(layers)):
                problem = f"zero points on {with_zp}"
            elif unscaled := [n for n in layers if scales.get(n, 0) <= 0]:
                problem = f"no scale for {unscaled}"
            if problem:
                logger.warning("head %s left unfused: %s", name, problem)
                continue
            top = max(scales[n] for n in lasts)
            gains = [top / scales[n] for n in lasts]
        fused = FusedCenterNetHead(head, gains=gains)
        fused.train(head.training)
        model.set_submodule(name, fused)
        if scales is not None:
            renamed = {f"{prefix}convs.0": max(scales[n] for n in firsts), f"{prefix}convs.2": top}
            scales = {**{n: s for n, s in scales.items() if n not in layers}, **renamed}
    return scales


def fused_heads(model: nn.Module) -> list[str]:
    """Names of the heads of ``model`` that run fused (:func:`fuse_head_branches`, :func:`fuse_centernet_head`), in
    module order."""
    from bevdeploy.models.bevdet import FusedSeparateHead
    from bevdeploy.models.centernet import FusedCenterNetHead

    return [n for n, m in model.named_modules() if isinstance(m, (FusedSeparateHead, FusedCenterNetHead))]


def int8_scope(model: nn.Module, scope: Sequence[str] | None = None) -> list[str]:
    """Names of the plain Conv2d / Linear layers and calibration points of ``model`` under the INT8
    ``scope`` prefixes (default: the model family's, :func:`bevdeploy.engine.model_io.int8_scope_prefixes`)."""
    from bevdeploy.engine.model_io import int8_scope_prefixes
    from bevdeploy.quant.calibrate import CalibrationPoint

    scope = int8_scope_prefixes(model) if scope is None else tuple(scope)
    return [n for n, m in model.named_modules()
            if type(m) in (nn.Conv2d, nn.Linear, CalibrationPoint) and any(n.startswith(p) for p in scope)]


def _int8_pooling(model: nn.Module, scales: dict[str, float], keep_float: set[str]) -> list[str]:
    """Switch every op module with a calibrated ``feat_point`` (BEVDet's view transformer) to its int8
    pooling (``feat_scale``); returns their names. ``keep_float`` naming the point keeps it float."""
    switched = []
    for name, module in model.named_modules():
        point = f"{name}.feat_point" if name else "feat_point"
        if hasattr(module, "feat_scale") and point in scales and point not in keep_float:
            module.feat_scale = float(scales[point])
            switched.append(name)
    return switched


def apply_precision(
    model: nn.Module,
    precision: str,
    *,
    scales: dict[str, float] | None = None,
    keep_float: Iterable[str] = (),
    scope: Sequence[str] | None = None,
    int8_chain: bool | str = True,
    gathered_sca: bool = True,
    fuse_heads: bool = True,
    zero_points: dict[str, int] | None = None,
    int8_dcn: bool = False,
) -> list:
    """Turn the folded float32 model into ``precision``'s deploy form, in place.

    Args:
        model: BatchNorm already folded (:func:`fold_batchnorms`), eval mode, float32.
        precision: One of :data:`PRECISIONS`.
        scales: Layer name -> input scale; required for int8* (``amax / 127``, ``CalibrationTable.scale``)
            and fp8* (``amax / 448``). Layers outside ``scope``, in ``keep_float`` or with a zero
            scale stay float.
        keep_float: Layer names to keep float.
        scope: Module-name prefixes that may be quantized (default: the model family's).
        int8_chain: int8* only: let int8 activations flow between int8 layers
            (:func:`bevdeploy.quant.chain.chain_int8`: requantizing epilogues, fused ReLU and residual)
            instead of every int8 layer writing floats that the next one quantizes again;
            ``"float-identity"``: the same, but residual blocks keep float boundaries (their identity
            is not quantized: more accurate, less int8 traffic saved).
        gathered_sca: BEVFormer's spatial cross-attention runs the camera-gathered op
            (:func:`set_sca_gathered`) instead of the static form (same result, less work).
        fuse_heads: Last step, every precision: BEVDet's CenterPoint head branches run as one conv
            stack (:func:`fuse_head_branches`; same result, 2 convs instead of 12).
        zero_points: int8*: layer name -> input zero point (asymmetric activations; ``scales`` then
            holds those layers' asymmetric scales); the chain links them with their zero points.
        int8_dcn: int8*: the DCNv2 convs run int8 too (:class:`bevdeploy.quant.modules.QuantDeformConv2d`,
            reading and, chained, writing int8 codes); otherwise they run the float variant.

    Returns:
        list of ``LayerReport`` rows of ``quantize_modules`` (empty for float precisions).
    """
    from bevdeploy.quant.calibrate import CalibrationPoint
    from bevdeploy.quant.modules import quantize_modules

    spec = precision_spec(precision)
    if int8_dcn and not spec.int8:
        raise ValueError(f"int8_dcn applies to the int8 precisions, not {precision!r}")
    if spec.float_dtype != torch.float32:
        model.half()
    set_sca_gathered(model, gathered_sca)
    if not spec.quantized:
        set_op_variant(model, spec.op_variant)
        if fuse_heads:
            fuse_head_branches(model)
        return []
    if scales is None:
        raise ValueError(f"precision {precision!r} needs calibrated scales (a calibration table)")
    allowed = set(int8_scope(model, scope))
    usable = {n: s for n, s in scales.items() if n in allowed and s > 0}
    keep = set(keep_float)
    modules = dict(model.named_modules())
    points = {n for n in usable if isinstance(modules[n], CalibrationPoint)}
    if spec.fp8:
        from bevdeploy.quant.fp8_modules import quantize_modules_fp8

        report = quantize_modules_fp8(model, {n: s for n, s in usable.items() if n not in points}, keep_float=keep,
                                      out_dtype=spec.float_dtype, quantize_in_graph=True)
        set_op_variant(model, spec.op_variant)
        if fuse_heads:
            fuse_head_branches(model)
        return report
    if zero_points and not spec.int8:
        raise ValueError(f"zero_points apply to the int8 precisions, not {precision!r}")
    if bad := sorted(n for n in (zero_points or {}) if n in points):
        raise ValueError(f"zero_points: {bad} are int8 pooling inputs, which stay symmetric")
    report = quantize_modules(model, {n: s for n, s in usable.items() if n not in points}, keep_float=keep,
                              out_dtype=spec.float_dtype, quantize_in_graph=True, zero_points=zero_points,
                              deform_convs=int8_dcn)
    _int8_pooling(model, {n: usable[n] for n in points}, keep)
    # after quantizing: the variant wrapper renames DCN offset convs (``.pack.``), which would hide
    # them from the calibration table's names
    set_op_variant(model, spec.op_variant)
    if int8_chain not in (True, False, "float-identity"):
        raise ValueError(f"int8_chain must be True, False or 'float-identity', got {int8_chain!r}")
    if int8_chain:
        from bevdeploy.quant.chain import chain_int8

        chain_int8(model, int8_identity=int8_chain is True)
    if fuse_heads:  # after quantizing and chaining: both find layers by their official names
        fuse_head_branches(model)
    return report


def layer_precisions(model: nn.Module, report: list, precision: str) -> list[tuple[str, str]]:
    """Which precision every conv / linear and every op-calling module runs in, in module order.

    INT8 / FP8 rows: the int8 / fp8 modules themselves (their names may have moved since ``quantize_modules``'
    ``report``: the fp16x2 wrapper of DCN packs), fused activations from the report; float layers
    report the storage dtype; op-calling modules report the op variant (e.g. ``fp16x2``), tagged ``(op)``.
    The convs of a fused head (:func:`fuse_head_branches`) name the layers they replace:
    ``pts_bbox_head.task_heads.0.convs.1 (fused reg.1, height.1, ...)``.
    """
    from bevdeploy.quant.fp8_modules import Fp8Conv2d, Fp8Linear
    from bevdeploy.ops.modulated_deform_conv2d import ModulatedDeformConv2d
    from bevdeploy.quant.modules import QuantConv2d, QuantLinear

    spec = precision_spec(precision)
    float_name = "fp32" if spec.float_dtype == torch.float32 else "fp16"
    by_name = {r.name: r.precision for r in report}
    wrapped = {f"{n}.pack" for n, m in model.named_modules() if isinstance(m, _VariantDCN)}  # reported by the wrapper
    fused_names = {}
    for head in fused_heads(model):
        for layer, sources in model.get_submodule(head).fused_layers.items():
            fused_names[f"{head}.{layer}"] = f"{head}.{layer} (fused {', '.join(sources)})"
    rows: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if isinstance(module, (QuantConv2d, QuantLinear)):
            rows.append((fused_names.get(name, name), "int8"))
        elif isinstance(module, (Fp8Conv2d, Fp8Linear)):
            rows.append((fused_names.get(name, name), "fp8"))
        elif name in by_name:
            p = by_name[name]
            rows.append((name, p if p in ("int8", "fp8", "fused") else float_name))
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            rows.append((fused_names.get(name, name), float_name))
        elif getattr(module, "feat_scale", None) is not None:
            rows.append((f"{name} (op)", "int8"))
        elif hasattr(module, "op_variant"):
            rows.append((f"{name} (op)", module.op_variant or float_name))
        elif isinstance(module, ModulatedDeformConv2d) and name not in wrapped:  # runs its dtype's variant
            rows.append((f"{name} (op)", float_name))
    return rows


class ExportWrapper(nn.Module):
    """The model's forward with tuple outputs (``output_names`` of its dict, in that order).

    Exported programs return flat outputs; the engine maps them back to the model's dict keys.
    """

    def __init__(self, model: nn.Module, output_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.output_names = tuple(output_names)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        out = self.model(*inputs)
        return tuple(out[k] for k in self.output_names)
