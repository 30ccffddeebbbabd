"""Quantization-aware training (QAT): fine-tune the int8 form with fake quantization, then build the same
int8 engine from the learned scales.

Post-training quantization fixes each layer's input scale from a calibration pass and rounds the
weights once; QAT lets training see that rounding and adapt. The flow, the third step between
calibration (:mod:`bevdeploy.quant.calibrate`) and conversion (:mod:`bevdeploy.quant.modules`)::

    table = calibrate(model, forward_loop, "entropy")                 # PTQ scales
    prepare_qat(model, {n: table.scale(n) for n in table.amax}, scope=..., keep_float=...)
    qat_finetune(model, training.loss, training.batches(2, seed=0), steps=200)
    scales = learned_scales(model)                                     # {layer: scale}
    strip_qat(model)                                                   # plain float layers again
    quantize_modules(model, scales)                                    # the unchanged int8 path

Every layer the int8 path would convert becomes a fake-quant layer computing the int8 kernels' math
on float tensors (so a prepared model at step 0 gives the PTQ engine's results to fp32 rounding)::

    codes_x = clamp(round_half_even(x / s), -127, 127)                # per tensor, s learnable
    codes_w = clamp(round_half_even(w / s_w), -127, 127)              # s_w = max|w[o]| / 127, per channel
    y       = (s * s_w[o]) * sum(codes_x * codes_w) + bias[o]

``round`` passes gradients straight through (STE); the clamp blocks the input's gradient outside
[-127, 127]; the scale gets LSQ's gradient (Esser et al., "Learned Step Size Quantization", ICLR 2020):
``round(v) - v`` inside the range, ``+-127`` outside. ``s_w`` is recomputed from the current weights at
every step and treated as a constant (it is what conversion will compute from the final weights).
The learnable parameter is ``scale_log_ratio`` with ``s = calib_scale * exp(scale_log_ratio)``
(initially 0, so ``s`` starts bit-exactly at the calibrated scale): scales stay positive and one
learning rate moves every layer by the same relative amount, whatever its range. LSQ's gradient
normaliser ``1 / sqrt(numel * 127)`` is left out: AdamW divides each parameter's gradient by its
own running magnitude, which cancels any constant factor.

Asymmetric inputs (``prepare_qat(zero_points=)``, from ``CalibrationTable.qparams(name, asymmetric=True)``):
a layer with zero point ``z != 0`` computes ``codes_x = clamp(round_half_even(x / s) + z, -128, 127) - z``,
the int8 kernels' ``s * (q - z)``; ``z`` is fixed (a buffer), ``s`` is learned as above, and the clamp and
LSQ bounds become ``-128 - z`` and ``127 - z``. ``z == 0`` is the symmetric scheme above, bit for bit.

BatchNorm must be folded first (``bevdeploy.engine.deploy.fold_batchnorms``), as the int8 build
does: the engine quantizes the folded weights, so QAT must round those same weights.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevdeploy.ops.modulated_deform_conv2d import ModulatedDeformConv2dPack, modulated_deform_conv2d, split_offset_mask
from bevdeploy.quant.calibrate import CalibrationPoint
from bevdeploy.quant.int8_kernels import _check_zero_point, code_range
from bevdeploy.quant.modules import conv_unsupported

__all__ = [
    "QATConv2d",
    "QATLinear",
    "QATPoint",
    "distillation_loss",
    "fake_quantize",
    "float_finetune",
    "learned_scales",
    "learned_zero_points",
    "tie_shared_inputs",
    "prepare_qat",
    "qat_finetune",
    "strip_qat",
    "QATDeformConv2d",
]

INT8_MAX = 127


def _codes(x: Tensor, scale: Tensor, zero_point: Tensor | int = 0) -> Tensor:
    """``clamp(round_half_even(x / scale) + z, -128, 127) - z`` (``z == 0``: ``clamp(..., -127, 127)``) as
    float codes with straight-through rounding.

    The bounds ``-128 - z``, ``127 - z`` are integers, so clamping ``x / scale`` to them before rounding
    gives the same codes. ``round(c).detach() + (c - c.detach())`` equals ``round(c)`` exactly (the bracket
    is an exact 0) while its gradient is the clamp's (1 inside the range, 0 outside). A tensor ``z`` (a
    module's buffer) stays on the device: no host sync.
    """
    if isinstance(zero_point, Tensor):
        z = zero_point.float()
        c = torch.clamp(x / scale, -128.0 - z, 127.0 - z)
    else:
        lo, hi = code_range(zero_point)
        c = torch.clamp(x / scale, lo - zero_point, hi - zero_point)
    return torch.round(c).detach() + (c - c.detach())


def fake_quantize(x: Tensor, scale: Tensor | float, zero_point: int = 0) -> Tensor:
    """Per-tensor int8 fake quantization with STE / LSQ gradients: symmetric, or asymmetric with a fixed
    zero point.

    Args:
        x (Tensor[...]): float input (computed in fp32).
        scale (Tensor[] or float): the quantization step (``amax / 127``, or ``asymmetric_qparams``'), positive.
        zero_point (int): ``z`` in ``[-128, 127]``; 0: symmetric (codes in ``[-127, 127]``).

    Returns:
        Tensor[...] fp32: ``(clamp(round_half_even(x / scale) + z, -128, 127) - z) * scale`` (``z == 0``:
        ``clamp(round_half_even(x / scale), -127, 127) * scale``), the value the int8 kernels dequantize.
        Gradients: ``x`` gets the upstream gradient inside ``[lo, hi] * scale`` and 0 outside, with
        ``[lo, hi] = [-127, 127]`` (``z == 0``) or ``[-128 - z, 127 - z]``; ``scale`` gets ``round(v) - v``
        (inside) or the bound ``lo`` / ``hi`` (outside) per element, ``v = x / scale``.
    """
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return _codes(x.float(), scale, _check_zero_point("zero_point", zero_point)) * scale


def _weight_codes(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel codes of ``weight`` (STE) and their scales (``max|w| / 127``, 1 for an all-zero
    channel, no gradient): the same numbers as ``quantize_weight_per_channel`` computes at conversion."""
    w = weight.float()
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return _codes(w, scale.view(-1, *([1] * (w.dim() - 1)))), scale


def _check_scale(name: str, scale: object) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0.0 < float(scale) < math.inf):
        raise ValueError(f"scales[{name!r}] must be a positive finite float, got {scale!r}")
    return float(scale)


class _LearnedScale:
    """The learnable input scale shared by the fake-quant modules: buffer ``calib_scale`` (fp32, the
    calibrated start) and parameter ``scale_log_ratio`` (0 at the start); with an asymmetric input also
    buffer ``input_zero_point`` (int32, fixed: only a symmetric layer has none, so its state dict and
    arithmetic are today's)."""

    def _init_scale(self, scale: float, device, zero_point: int = 0) -> None:
        self.register_buffer("calib_scale", torch.tensor(scale, dtype=torch.float32, device=device))
        self.scale_log_ratio = nn.Parameter(torch.zeros((), dtype=torch.float32, device=device))
        if _check_zero_point("zero_point", zero_point):
            self.register_buffer("input_zero_point", torch.tensor(zero_point, dtype=torch.int32, device=device))

    @property
    def _zero_point(self) -> Tensor | int:
        return getattr(self, "input_zero_point", 0)

    def _scale_repr(self) -> str:
        z = int(self._zero_point)
        s = float(self.input_scale.detach())
        return f"input_scale={s:.6g}{f', zero_point={z}' if z else ''} (learned, int8 fake quant)"

    @property
    def input_scale(self) -> Tensor:
        """The current per-tensor input scale (a 0-dim fp32 tensor carrying gradient)."""
        return self.calib_scale * torch.exp(self.scale_log_ratio)


def _no_autocast(device: torch.device):
    # the codes must be computed in fp32: bf16 / fp16 would round x / s before round() does
    return torch.autocast(device.type, enabled=False)


class QATConv2d(_LearnedScale, nn.Conv2d):
    """``nn.Conv2d`` with int8 fake quantization of its input (learnable scale) and weight (per channel).

    Same parameters (``weight``, ``bias``) and state-dict keys as the conv it replaces, plus
    ``calib_scale``, ``scale_log_ratio`` (and ``input_zero_point`` if asymmetric). Build with
    :meth:`from_float`; see :func:`prepare_qat`. Returns fp32 NCHW whatever the autocast state.
    """

    @classmethod
    def from_float(cls, conv: nn.Conv2d, input_scale: float, zero_point: int = 0) -> QATConv2d:
        """A fake-quant conv sharing ``conv``'s parameters (no copy), input scale ``input_scale`` and zero
        point ``zero_point`` (0: symmetric)."""
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"QATConv2d.from_float takes an nn.Conv2d, got {type(conv).__name__}")
        if (why := conv_unsupported(conv)) is not None:
            raise NotImplementedError(f"QATConv2d: the int8 conv cannot run this layer: {why}")
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, bias=False, padding_mode=conv.padding_mode, device="meta")
        q.weight, q.bias = conv.weight, conv.bias
        q._init_scale(_check_scale("input_scale", input_scale), conv.weight.device, zero_point)
        q.train(conv.training)
        return q

    def forward(self, x: Tensor) -> Tensor:
        with _no_autocast(x.device):
            s = self.input_scale
            w_codes, w_scale = _weight_codes(self.weight)
            # zero padding of the codes q - z is the real 0, as the int8 conv's padded taps
            x_codes = _codes(x.float(), s, self._zero_point)
            y = self._conv_forward(x_codes, w_codes, None) * (s * w_scale)[None, :, None, None]
            if self.bias is not None:
                y = y + self.bias.float()[None, :, None, None]
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._scale_repr()}"


class QATLinear(_LearnedScale, nn.Linear):
    """``nn.Linear`` with int8 fake quantization of its input (learnable scale) and weight (per channel).

    Same parameters and state-dict keys as the linear it replaces, plus ``calib_scale``, ``scale_log_ratio``
    (and ``input_zero_point`` if asymmetric). Build with :meth:`from_float`; see :func:`prepare_qat`. Returns fp32.
    """

    @classmethod
    def from_float(cls, linear: nn.Linear, input_scale: float, zero_point: int = 0) -> QATLinear:
        """A fake-quant linear sharing ``linear``'s parameters (no copy), input scale ``input_scale`` and
        zero point ``zero_point`` (0: symmetric)."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"QATLinear.from_float takes an nn.Linear, got {type(linear).__name__}")
        q = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        q.weight, q.bias = linear.weight, linear.bias
        q._init_scale(_check_scale("input_scale", input_scale), linear.weight.device, zero_point)
        q.train(linear.training)
        return q

    def forward(self, x: Tensor) -> Tensor:
        with _no_autocast(x.device):
            s = self.input_scale
            w_codes, w_scale = _weight_codes(self.weight)
            y = F.linear(_codes(x.float(), s, self._zero_point), w_codes) * (s * w_scale)
            if self.bias is not None:
                y = y + self.bias.float()
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._scale_repr()}"


class QATPoint(_LearnedScale, nn.Module):
    """A :class:`~bevdeploy.quant.calibrate.CalibrationPoint` during QAT: fake-quantizes the tensor an int8 op
    reads (BEVDet's context features before the int8 ``bev_pool_v2``) with a learnable scale.

    Always symmetric (asymmetric inputs are for the int8 conv / linear layers only): :func:`prepare_qat`
    refuses a non-zero point for it rather than fake-quantizing differently from the engine."""

    def __init__(self, input_scale: float, device=None) -> None:
        super().__init__()
        self._init_scale(_check_scale("input_scale", input_scale), device)

    def forward(self, x: Tensor) -> Tensor:
        with _no_autocast(x.device):
            s = self.input_scale
            return (_codes(x.float(), s) * s).to(x.dtype)

    def extra_repr(self) -> str:
        return self._scale_repr()


_QAT_TYPES = (QATConv2d, QATLinear, QATPoint)


class QATDeformConv2d(ModulatedDeformConv2dPack):
    """A DCNv2 conv in the int8 DCN's QAT form (``prepare_qat(deform_convs=True)``): the input is
    fake-quantized with its offset conv's learned scale and zero point (the engine's ``QuantDeformConv2d`` samples the
    same codes), the weight per output channel: the int8 layer's math (its kernel keeps the blended samples
    in fp16; the ``int8_mma`` form that rounds them is not modelled). Same parameters, child and state-dict
    keys as the pack; :func:`strip_qat` turns it back into one."""

    @classmethod
    def from_pack(cls, pack: nn.Module) -> QATDeformConv2d:
        return _pack_sharing(cls, pack)

    def forward(self, x: Tensor) -> Tensor:
        offset, mask = split_offset_mask(self.conv_offset(x))  # a QATConv2d: fake-quantizes x itself
        with _no_autocast(x.device):
            s, z = self.conv_offset.input_scale, self.conv_offset._zero_point
            w_codes, w_scale = _weight_codes(self.weight)
            w = w_codes * w_scale.view(-1, 1, 1, 1)
            bias = None if self.bias is None else self.bias.float()
            return modulated_deform_conv2d(_codes(x.float(), s, z) * s, offset.float(), mask.float(), w, bias,
                                           self.stride, self.padding, self.dilation, self.groups,
                                           self.deform_groups)


def _pack_sharing(cls: type, pack: nn.Module) -> nn.Module:
    """A ``cls`` (a ``ModulatedDeformConv2dPack`` or :class:`QATDeformConv2d`) of ``pack``'s geometry holding
    ``pack``'s own weight, bias and offset conv, in its train/eval mode."""
    q = cls(pack.in_channels, pack.out_channels, pack.kernel_size, pack.stride, pack.padding, pack.dilation,
            pack.groups, pack.deform_groups, bias=pack.bias is not None)
    q.weight, q.bias, q.conv_offset = pack.weight, pack.bias, pack.conv_offset
    return q.train(pack.training)


def prepare_qat(
    model: nn.Module,
    scales: dict[str, float],
    *,
    zero_points: dict[str, int] | None = None,
    keep_float: Iterable[str] = (),
    scope: Sequence[str] | None = None,
    deform_convs: bool = False,
) -> nn.Module:
    """Swap every layer the int8 path would convert for its fake-quant form, in place.

    The selection is the int8 build's: a plain ``nn.Conv2d`` / ``nn.Linear`` (exact type) or
    :class:`CalibrationPoint` whose name has a positive scale in ``scales``, lies under one of the
    ``scope`` prefixes and is not in ``keep_float``; convs the int8 conv cannot run (groups != 1,
    non-zero padding mode, asymmetric 'same' padding) stay float. Parameters are shared, not copied.

    Args:
        model (nn.Module): float model, BatchNorm folded; modified in place.
        scales (dict[str, float]): layer name -> calibrated input scale (``CalibrationTable.scale``);
            layers with scale 0 (input all zeros in calibration) stay float, as in the engine.
        zero_points (dict[str, int], optional): layer name -> fixed input zero point in ``[-128, 127]``
            (asymmetric input, ``CalibrationTable.qparams(name, asymmetric=True)``, whose scale goes in
            ``scales``); absent or 0: symmetric, exactly as without it. Conv / Linear only: a
            CalibrationPoint stays symmetric (a non-zero point for one is an error).
        keep_float (Iterable[str]): layer names to leave float.
        scope (Sequence[str], optional): module-name prefixes that may be quantized; None: every layer.
            For BEVFormer / BEVDet pass the family's ``bevdeploy.engine.model_io.int8_scope_prefixes(model)``.
        deform_convs (bool): the int8 DCN's form too (``build(int8_dcn=True)``): every DCNv2 pack (groups 1,
            not kept float) whose offset conv became a fake-quant conv becomes a :class:`QATDeformConv2d`
            sampling its input at that conv's learned scale (and fixed zero point).

    Returns:
        nn.Module: ``model``.

    Raises:
        ValueError: a BatchNorm is left, a bad scale or zero point (a zero point of a layer without a scale,
            or of a CalibrationPoint), an unknown ``keep_float`` name, the model is already prepared, or no
            layer was selected.
        TypeError: ``scope`` is a single string.
    """
    if isinstance(scope, str):
        raise TypeError(f"scope must be a sequence of prefixes, got the string {scope!r} (wrap it in a tuple)")
    if not isinstance(scales, dict):
        raise TypeError(f"scales must be a dict {{layer name: scale}}, got {type(scales).__name__}")
    modules = dict(model.named_modules())
    keep = set(keep_float)
    if unknown := keep - set(modules):
        raise ValueError(f"keep_float names no module of the model: {sorted(unknown)}")
    if bns := [n for n, m in modules.items() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
        raise ValueError(f"fold BatchNorm first (bevdeploy.engine.deploy.fold_batchnorms), as the int8 build does: "
                         f"the engine quantizes folded weights; found {bns[:3]}{' ...' if len(bns) > 3 else ''}")
    if any(isinstance(m, (*_QAT_TYPES, QATDeformConv2d)) for m in modules.values()):
        raise ValueError("model already has fake-quant layers (prepare_qat ran before): strip_qat it first")
    scales = {n: _check_scale(n, s) if s != 0 else 0.0 for n, s in scales.items()}
    if not isinstance(zero_points, (dict, type(None))):
        raise TypeError(f"zero_points must be a dict {{layer name: zero point}}, got {type(zero_points).__name__}")
    zero_points = {n: _check_zero_point(f"zero_points[{n!r}]", z) for n, z in (zero_points or {}).items()}
    if unscaled := sorted(set(zero_points) - set(scales)):
        raise ValueError(f"zero_points name layers without a scale in scales: {unscaled}")
    prefixes = None if scope is None else tuple(scope)
    swapped = 0
    for name, mod in modules.items():
        if type(mod) not in (nn.Conv2d, nn.Linear, CalibrationPoint) or scales.get(name, 0.0) <= 0.0:
            continue
        if name in keep or (prefixes is not None and not name.startswith(prefixes)):
            continue
        if type(mod) is nn.Conv2d and conv_unsupported(mod) is not None:
            continue
        if name == "":
            raise ValueError("model is itself the layer to quantize: wrap it in a module (e.g. nn.Sequential)")
        z = zero_points.get(name, 0)
        if type(mod) is nn.Conv2d:
            qat = QATConv2d.from_float(mod, scales[name], z)
        elif type(mod) is nn.Linear:
            qat = QATLinear.from_float(mod, scales[name], z)
        elif z:
            raise ValueError(f"zero_points[{name!r}] = {z}: CalibrationPoint {name!r} stays symmetric (asymmetric "
                             "inputs are for int8 conv / linear layers): leave it out of zero_points or give it 0")
        else:
            device = next(model.parameters(), torch.empty(0)).device
            qat = QATPoint(scales[name], device=device).train(mod.training)
        model.set_submodule(name, qat)
        swapped += 1
    if deform_convs:
        for name, mod in modules.items():
            if (name and type(mod) is ModulatedDeformConv2dPack and mod.groups == 1 and name not in keep
                    and isinstance(mod.conv_offset, QATConv2d)):
                model.set_submodule(name, QATDeformConv2d.from_pack(mod))
    if swapped == 0:
        raise ValueError(f"no layer selected for QAT: the {len(scales)} scales name no plain Conv2d / Linear / "
                         f"CalibrationPoint under scope {prefixes} outside keep_float")
    return model


def _fake_quant_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QAT_TYPES)]


def learned_scales(model: nn.Module) -> dict[str, float]:
    """The current input scale of every fake-quant layer, ``{layer name: scale}`` in module order.

    The format ``prepare_qat`` and ``quantize_modules`` take (``CalibrationTable.scale`` values:
    ``amax / 127``); a table's ``amax`` is ``127 * scale``.
    """
    found = _fake_quant_modules(model)
    if not found:
        raise ValueError("model has no fake-quant layer: call prepare_qat first")
    return {n: float(m.input_scale.detach()) for n, m in found}


def tie_shared_inputs(model: nn.Module, run: Callable[[], object]) -> list[list[str]]:
    """Fake-quant layers that read one tensor learn one scale, in place; returns the tied groups.

    The chained int8 engine quantizes a tensor once for all its readers (``bevdeploy.quant.chain``:
    the largest of their scales), so scales learned apart would deploy as another scale than the one
    QAT trained (YOLOX's CSP ``main_conv`` / ``short_conv``, a ResNet block's ``conv1`` / downsample).
    ``run()`` runs one forward of ``model`` (e.g. the loss of one batch); layers whose input is the
    same tensor object are grouped, start from the group's largest calibrated scale and share one
    ``scale_log_ratio`` parameter. Layers with different zero points are left apart. Call it right
    after :func:`prepare_qat`, before :func:`qat_finetune`.
    """
    found = _fake_quant_modules(model)
    if not found:
        raise ValueError("model has no fake-quant layer: call prepare_qat first")
    readers: dict[int, list[str]] = {}
    alive: list[Tensor] = []  # the inputs stay referenced, so no two of them share an id

    def hook(name: str):
        def fn(mod, args):
            alive.append(args[0])
            readers.setdefault(id(args[0]), [])
            if name not in readers[id(args[0])]:
                readers[id(args[0])].append(name)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in found]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    modules = dict(found)
    groups = []
    for names in readers.values():
        group = [modules[n] for n in names]
        if len(group) < 2 or len({int(m._zero_point) for m in group}) > 1:
            continue
        start = max(float(m.calib_scale) for m in group)
        with torch.no_grad():
            for m in group:
                m.calib_scale.fill_(start)
                m.scale_log_ratio.zero_()
        for m in group[1:]:
            m.scale_log_ratio = group[0].scale_log_ratio
        groups.append(names)
    return groups


def learned_zero_points(model: nn.Module) -> dict[str, int]:
    """The fixed input zero point of every fake-quant layer, ``{layer name: z}`` in module order (0:
    symmetric); the keys of :func:`learned_scales`, for ``prepare_qat(zero_points=)`` and the int8 build."""
    found = _fake_quant_modules(model)
    if not found:
        raise ValueError("model has no fake-quant layer: call prepare_qat first")
    return {n: int(m._zero_point) for n, m in found}


def strip_qat(model: nn.Module) -> nn.Module:
    """Swap every fake-quant layer back for the plain layer it replaced, keeping the fine-tuned
    weights (the same parameter tensors), in place; returns ``model``.

    Read :func:`learned_scales` (and :func:`learned_zero_points`) first: they go with the fake-quant layers.
    """
    for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, QATDeformConv2d)]:
        model.set_submodule(name, _pack_sharing(ModulatedDeformConv2dPack, mod))
    for name, mod in _fake_quant_modules(model):
        if isinstance(mod, QATConv2d):
            plain = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                              mod.dilation, mod.groups, bias=False, padding_mode=mod.padding_mode, device="meta")
            plain.weight, plain.bias = mod.weight, mod.bias
        elif isinstance(mod, QATLinear):
            plain = nn.Linear(mod.in_features, mod.out_features, bias=False, device="meta")
            plain.weight, plain.bias = mod.weight, mod.bias
        else:
            plain = CalibrationPoint()
        plain.train(mod.training)
        if name == "":
            raise ValueError("model is itself a fake-quant layer: nothing to swap it into")
        model.set_submodule(name, plain)
    return model


def qat_finetune(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], dict[str, Tensor]],
    batches: Iterable[Any],
    *,
    steps: int,
    lr: float = 1e-5,
    scale_lr: float = 1e-3,
    weight_decay: float = 1e-2,
    max_grad_norm: float | None = 35.0,
    progress: bool = True,
    dist=None,
) -> list[float]:
    """Fine-tune a :func:`prepare_qat`-ed model: AdamW over all its parameters and the learnable scales.

    The weights' learning rate is small (the model is trained; QAT only adapts it to the rounding)
    and decays along a cosine to 0; scales move in relative terms (``scale_lr`` per step changes a
    scale by about that fraction, see the module docstring). Gradients of the weights are clipped to
    ``max_grad_norm`` (35, the official BEVFormer / BEVDet setting). BatchNorm must be folded
    (:func:`prepare_qat` checks), so no running statistics move. The model runs in training mode and
    is put back in its previous mode afterwards.

    Args:
        model (nn.Module): prepared with :func:`prepare_qat`.
        loss_fn: ``loss_fn(model, batch) -> {term: scalar Tensor}``; the total is the sum (e.g.
            ``bevdeploy.train.make_training(...).loss``).
        batches (Iterable): yields at least ``steps`` batches (e.g. ``training.batches(batch_size, seed)``).
        steps (int): optimizer steps (0: nothing is done).
        lr (float): peak learning rate of the weights.
        scale_lr (float): learning rate of the scales' log-ratios.
        weight_decay (float): AdamW decay of the weights (none on the scales).
        max_grad_norm (float, optional): gradient-norm clip of the weights (None: no clipping).
        progress (bool): a tqdm bar showing the loss.
        dist (bevdeploy.distributed.DistContext, optional): several processes (torchrun): each feeds
            its own ``batches`` and the gradients of the weights and the scales are averaged over the
            processes after every backward, before clipping (as ``bevdeploy.train.train(dist=)``
            does), so every process takes the same steps and ends with the same weights and scales.
            An error in one process's step (a bad batch, a non-finite loss) stops every process.

    Returns:
        list[float]: the total loss of every step (before its update; this process's batch).

    Raises:
        ValueError: bad arguments, a model without fake-quant layers, or fewer batches than ``steps``.
        RuntimeError: a non-finite loss (the message names the step and the terms).
    """
    _check_finetune_args(steps, lr, scale_lr, weight_decay, max_grad_norm)
    fq = _fake_quant_modules(model)
    if not fq:
        raise ValueError("model has no fake-quant layer: call prepare_qat first")
    scale_params = list({id(m.scale_log_ratio): m.scale_log_ratio for _, m in fq}.values())  # tied: once
    scale_ids = {id(p) for p in scale_params}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in scale_ids]
    for p in scale_params:
        p.requires_grad_(True)
    return _finetune(model, loss_fn, batches, steps, weights, scale_params, lr=lr, scale_lr=scale_lr,
                     weight_decay=weight_decay, max_grad_norm=max_grad_norm, progress=progress, dist=dist, desc="QAT")


def float_finetune(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], dict[str, Tensor]],
    batches: Iterable[Any],
    *,
    steps: int,
    lr: float = 1e-5,
    weight_decay: float = 1e-2,
    max_grad_norm: float | None = 35.0,
    progress: bool = True,
) -> list[float]:
    """:func:`qat_finetune`'s recipe (optimizer, schedule, clip, batches) on a float model without fake
    quantization: the control of a QAT run. QAT changes the weights as well as adapting them to the
    rounding, so a QAT engine's accuracy change against the checkpoint mixes the two; the same steps in
    float tell what the extra training alone gives. Returns the loss of every step."""
    _check_finetune_args(steps, lr, 0.0, weight_decay, max_grad_norm)
    if _fake_quant_modules(model):
        raise ValueError("float_finetune: the model has fake-quant layers (use qat_finetune, or strip_qat first)")
    weights = [p for p in model.parameters() if p.requires_grad]
    return _finetune(model, loss_fn, batches, steps, weights, [], lr=lr, scale_lr=0.0, weight_decay=weight_decay,
                     max_grad_norm=max_grad_norm, progress=progress, dist=None, desc="float fine-tune")


def _check_finetune_args(steps, lr, scale_lr, weight_decay, max_grad_norm) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    for name, value in (("lr", lr), ("scale_lr", scale_lr), ("weight_decay", weight_decay)):
        if not (isinstance(value, (int, float)) and 0.0 <= float(value) < math.inf):
            raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a positive float or None, got {max_grad_norm!r}")


def _finetune(model, loss_fn, batches, steps: int, weights: list, scale_params: list, *, lr: float, scale_lr: float,
              weight_decay: float, max_grad_norm: float | None, progress: bool, dist, desc: str) -> list[float]:
    """The loop of :func:`qat_finetune` and :func:`float_finetune`: AdamW, the weights' cosine decay, clip."""
    from tqdm import tqdm

    from bevdeploy.distributed import average_gradients, fail_together

    if steps == 0:
        return []
    distributed = dist is not None and dist.enabled
    groups = [{"params": weights, "lr": lr, "weight_decay": weight_decay}]
    schedules = [lambda i: 0.5 * (1.0 + math.cos(math.pi * i / steps))]
    if scale_params:
        groups.append({"params": scale_params, "lr": scale_lr, "weight_decay": 0.0})
        schedules.append(lambda i: 1.0)
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedules)
    was_training = model.training
    model.train()
    it = iter(batches)
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc.lower(), disable=not progress, file=sys.stderr)
    try:
        for step in bar:
            with fail_together(dist):
                try:
                    batch = next(it)
                except StopIteration:
                    raise ValueError(f"batches ran out after {step} of {steps} {desc} steps") from None
                terms = loss_fn(model, batch)
                if not isinstance(terms, dict) or not terms:
                    raise ValueError(f"loss_fn must return a non-empty dict of loss terms, got {terms!r}")
                loss = sum(terms.values())
                if not torch.isfinite(loss):
                    shown = {k: float(v.detach()) for k, v in terms.items()}
                    raise RuntimeError(f"{desc} step {step}: non-finite loss {float(loss.detach())} (terms {shown})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
            if distributed:
                average_gradients(weights + scale_params, dist.world_size)
            if max_grad_norm is not None and weights:
                torch.nn.utils.clip_grad_norm_(weights, max_grad_norm)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        model.train(was_training)
        bar.close()
        # no gradients left behind: they hold memory, and a later change of a weight's shape (the NHWC stem's
        # zero input channels, conv_epilogue.py) conflicts with them at export (session 20's smoothed QAT row)
        opt.zero_grad(set_to_none=True)
    return losses


def distillation_loss(teacher: nn.Module, inputs: Callable[[Any], tuple]) -> Callable[[nn.Module, Any], dict[str, Tensor]]:
    """A ``loss_fn`` for :func:`qat_finetune` that trains the fake-quant model to reproduce ``teacher``
    (the float model before :func:`prepare_qat`) instead of fitting labels.

    Each output's term is its squared error relative to the teacher's energy,
    ``mean((student - teacher)^2) / mean(teacher^2)`` (1 / linear SQNR, so outputs of any scale weigh the
    same and the loss reads as the SQNR the engine will be checked on). Why: with the task loss, QAT also
    trains the model further, and on a checkpoint that is not converged its int8 result mixes the recovered
    rounding with that extra training; matching the teacher recovers only the rounding, needs no labels
    (the calibration images suffice) and cannot move the model away from the float one it deploys.
    Measured caveat (H100, trained YOLOX-x, ``bench/results/nvidia-h100-80gb-hbm3/diagnose-int8-yolox-x.md``):
    300 steps raised the box output's SQNR from 8.4 to 16.3 dB but lowered mAP from 0.389 to 0.206; on raw
    detector logits the error is dominated by the background, so this is not yet a substitute for the task loss.

    Args:
        teacher: The float model (kept in eval mode, no gradients).
        inputs: ``inputs(batch) -> positional model inputs`` (2D detectors: ``lambda b: (b.images,)``).
    """
    teacher.eval().requires_grad_(False)

    def loss(model: nn.Module, batch: Any) -> dict[str, Tensor]:
        args = inputs(batch)
        with torch.no_grad():
            target = teacher(*args)
        out = model(*args)
        if not isinstance(target, dict):
            target, out = {"output": target}, {"output": out}
        return {f"distill_{k}": (out[k].float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-12)
                for k, t in target.items()}

    return loss
