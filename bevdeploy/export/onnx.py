"""ONNX export for TensorRT users: every ``bevdeploy`` op becomes the reference system's plugin node.

The reference system (DerryHub/BEVFormer_tensorrt) ships TensorRT plugins whose ONNX nodes have no
domain; TensorRT's ONNX parser finds a plugin by the node's op type. We emit exactly those nodes
(names, input order and layouts, attributes), inserting the permutes/scales/reshapes our cleaner
Python API needs in front of them:

==========================  ===========================================================
our op (variant)            ONNX node
==========================  ===========================================================
grid_sample                 ``GridSampler2DTRT`` (grid channel-first, scaled by 10)
msda / msda_fused           ``MultiScaleDeformableAttnTRT`` (pixel offsets, logits)
modulated_deform_conv2d     ``ModulatedDeformableConv2dTRT``
rotate                      ``RotateTRT`` (one node per image: the plugin takes [C, H, W])
inverse                     ``InverseTRT``
bev_pool_v2                 ``BEVPoolV2TRT``
flash_attention             ``QKVTRT`` (batch and heads merged)
==========================  ===========================================================

The ``fp16x2`` variant emits the ``...TRT2`` node (the plugin's half2 kernel); ``int8`` variants put
a ``DequantizeLinear`` with the calibrated scale in front (explicit Q/DQ, which TensorRT folds into
the plugin's int8 input). The schemas are registered with ONNX so ``onnx.checker`` (full check) and
shape inference understand the nodes. The dynamo exporter needs opset >= 18 (the reference used
13); TensorRT parses both.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import onnx
import torch
from onnx import TensorProto
from onnx.defs import OpSchema

# Reference plugin name -> (inputs [(name, type var)], attributes [(name, AttrType)]).
_F = ("tensor(float)", "tensor(float16)", "tensor(int8)")
_I = ("tensor(int32)", "tensor(int64)")
_INT, _INTS = OpSchema.AttrType.INT, OpSchema.AttrType.INTS

PLUGINS: dict[str, tuple[list[tuple[str, str]], list[tuple[str, OpSchema.AttrType]]]] = {
    "GridSampler2DTRT": (
        [("input", "T"), ("grid", "T")],
        [("interpolation_mode", _INT), ("padding_mode", _INT), ("align_corners", _INT)],
    ),
    "MultiScaleDeformableAttnTRT": (
        [("value", "T"), ("value_spatial_shapes", "I"), ("reference_points", "T"),
         ("sampling_offsets", "T"), ("attention_weights", "T")],
        [],
    ),
    "ModulatedDeformableConv2dTRT": (
        [("input", "T"), ("offset", "T"), ("mask", "T"), ("weight", "T"), ("bias", "T")],
        [("stride", _INTS), ("padding", _INTS), ("dilation", _INTS), ("groups", _INT), ("deform_groups", _INT)],
    ),
    "RotateTRT": ([("img", "T"), ("angle", "T"), ("center", "T")], [("interpolation", _INT)]),
    "InverseTRT": ([("input", "T")], []),
    "BEVPoolV2TRT": (
        [("depth", "T"), ("feat", "T"), ("ranks_depth", "I"), ("ranks_feat", "I"), ("ranks_bev", "I"),
         ("interval_starts", "I"), ("interval_lengths", "I")],
        [("out_height", _INT), ("out_width", _INT)],
    ),
    "QKVTRT": ([("query", "T"), ("key", "T"), ("value", "T")], []),
}
#: Plugins that have a half2 ("...TRT2") twin with the same signature.
HALF2_PLUGINS = ("GridSampler2DTRT", "MultiScaleDeformableAttnTRT", "ModulatedDeformableConv2dTRT",
                 "RotateTRT", "BEVPoolV2TRT", "QKVTRT")
PLUGIN_NODE_NAMES = frozenset(PLUGINS) | {n + "2" for n in HALF2_PLUGINS}


@functools.cache
def register_plugin_schemas() -> None:
    """Register the plugin nodes with ONNX (default domain, since version 1); idempotent."""
    for base, (inputs, attrs) in PLUGINS.items():
        for name in (base, base + "2") if base in HALF2_PLUGINS else (base,):
            if onnx.defs.has(name, ""):
                continue
            optional = OpSchema.FormalParameterOption.Optional
            params = [
                OpSchema.FormalParameter(n, t, param_option=optional) if n == "bias" else OpSchema.FormalParameter(n, t)
                for n, t in inputs
            ]
            schema = OpSchema(
                name, "", 1,
                doc=f"TensorRT plugin {name} of the reference system (see bevdeploy.export.onnx).",
                inputs=params,
                outputs=[OpSchema.FormalParameter("output", "T")],
                type_constraints=[("T", list(_F), "float, half or int8 tensors"), ("I", list(_I), "index tensors")],
                attributes=[OpSchema.Attribute(a, t, a) for a, t in attrs],
            )
            onnx.defs.register_schema(schema)


def _plugin(name: str, variant: str):
    """The onnxscript op for a plugin, its half2 twin for the ``fp16x2`` variant."""
    import onnxscript

    if variant == "fp16x2" and name in HALF2_PLUGINS:
        name = name + "2"
    return onnxscript.values.Op(onnxscript.values.Opset("", 18), name)


def _op():
    from onnxscript import opset18

    return opset18


def _const_i64(values):
    return _op().Constant(value_ints=[int(v) for v in values])


def _dequant(x, scale: float, variant: str):
    """int8 variants: explicit DQ in front of the plugin (TensorRT fuses it into the int8 input)."""
    if variant != "int8":
        return x
    op = _op()
    return op.DequantizeLinear(x, op.Constant(value_float=float(scale)))


def _to_fp16_out(y, variant: str):
    """Our int8 kernels write fp16: keep the ONNX graph's dtypes equal to the PyTorch graph's."""
    if variant != "int8":
        return y
    return _op().Cast(y, to=TensorProto.FLOAT16)


def _match_type(x, like_variant: str):
    """The plugins take their float inputs in one precision: fp16 variants cast small inputs to half."""
    if like_variant in ("fp16", "fp16x2"):
        return _op().Cast(x, to=TensorProto.FLOAT16)
    return _op().Cast(x, to=TensorProto.FLOAT)


# ---------------------------------------------------------------- translations, one per op


def _inverse(input):
    return _plugin("InverseTRT", "fp32")(input)


def _grid_sample(input, grid, interpolation_mode, padding_mode, align_corners, variant, input_scale):
    op = _op()
    x = _dequant(input, input_scale, variant)
    # Reference layout: grid [N, 2, Hout, Wout], coordinates scaled by 10.
    g = op.Mul(op.Transpose(_match_type(grid, variant), perm=[0, 3, 1, 2]), op.CastLike(op.Constant(value_float=10.0), x))
    y = _plugin("GridSampler2DTRT", variant)(
        x, g, interpolation_mode=int(interpolation_mode), padding_mode=int(padding_mode), align_corners=int(bool(align_corners))
    )
    return _to_fp16_out(y, variant)


def _msda_node(value, spatial_shapes, reference_points, offsets_px, logits, variant, value_scale, out_shape):
    """Shared tail of both MSDA forms: plugin inputs in the reference layout, output reshaped to [B, Q, H*D]."""
    op = _op()
    shapes = op.Constant(
        value=onnx.helper.make_tensor("value_spatial_shapes", TensorProto.INT32, [len(spatial_shapes) // 2, 2], list(spatial_shapes))
    )
    v = _dequant(value, value_scale, variant)
    y = _plugin("MultiScaleDeformableAttnTRT", variant)(
        v, shapes, _match_type(reference_points, variant), _match_type(offsets_px, variant), _match_type(logits, variant)
    )
    return _to_fp16_out(op.Reshape(y, _const_i64(out_shape)), variant)


def _msda(value, spatial_shapes, sampling_locations, attention_weights, variant, value_scale):
    """Classic form -> plugin form: reference 0, pixel offsets = location * (W, H), logits = log(weight)
    (softmax(log w) = w for weights that sum to one per query and head, as MSDA's do)."""
    op = _op()
    B, Q, H, L, P, _ = sampling_locations.shape
    D = value.shape[3]
    wh = [float(s) for i in range(L) for s in (spatial_shapes[2 * i + 1], spatial_shapes[2 * i])]
    scale = op.Constant(value=onnx.helper.make_tensor("level_wh", TensorProto.FLOAT, [L, 1, 2], wh))
    offsets = op.Reshape(op.Mul(op.Cast(sampling_locations, to=TensorProto.FLOAT), scale), _const_i64([B, Q, H, L * P * 2]))
    logits = op.Reshape(op.Log(op.Cast(attention_weights, to=TensorProto.FLOAT)), _const_i64([B, Q, H, L * P]))
    ref = op.Constant(value=onnx.helper.make_tensor("reference_points", TensorProto.FLOAT, [B, Q, 1, 2], [0.0] * (B * Q * 2)))
    return _msda_node(value, spatial_shapes, ref, offsets, logits, variant, value_scale, [B, Q, H * D])


def _msda_fused(value, spatial_shapes, reference_points, sampling_offsets, attention_logits, variant, value_scale):
    op = _op()
    B, Q, H, L, P, _ = sampling_offsets.shape
    R = reference_points.shape[2]
    D = value.shape[3]
    ref = op.Reshape(reference_points, _const_i64([B, Q, 1, R * 2]))
    offsets = op.Reshape(sampling_offsets, _const_i64([B, Q, H, L * P * 2]))
    return _msda_node(value, spatial_shapes, ref, offsets, attention_logits, variant, value_scale, [B, Q, H * D])


def _modulated_deform_conv2d(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups,
                             variant, input_scale, weight_scale):
    op = _op()
    x = _dequant(input, input_scale, variant)
    w = weight
    if variant == "int8":
        # Per-output-channel weight scales: DequantizeLinear along axis 0.
        w = op.DequantizeLinear(weight, weight_scale, axis=0)
    inputs = [x, _match_type(offset, variant), _match_type(mask, variant), _match_type(w, variant)]
    if bias is not None:
        inputs.append(_match_type(bias, variant))
    y = _plugin("ModulatedDeformableConv2dTRT", variant)(
        *inputs, stride=list(stride), padding=list(padding), dilation=list(dilation), groups=int(groups), deform_groups=int(deform_groups)
    )
    return _to_fp16_out(y, variant)


def _rotate(img, angle, center, interpolation, variant, img_scale):
    """RotateTRT takes one [C, H, W] image and a [1] angle: a batch becomes one node per image."""
    op = _op()
    x = _dequant(img, img_scale, variant)
    plugin = _plugin("RotateTRT", variant)
    c = _match_type(center, variant)
    if len(img.shape) == 3:
        a = op.Reshape(_match_type(angle, variant), _const_i64([1]))
        return _to_fp16_out(plugin(x, a, c, interpolation=int(interpolation)), variant)
    B = img.shape[0]
    n_angles = 1
    for s in angle.shape:
        n_angles *= int(s)
    angles = op.Reshape(_match_type(angle, variant), _const_i64([n_angles]))
    outs = []
    for b in range(B):
        xb = op.Squeeze(op.Slice(x, _const_i64([b]), _const_i64([b + 1]), _const_i64([0])), _const_i64([0]))
        ab = op.Slice(angles, _const_i64([b if n_angles > 1 else 0]), _const_i64([(b if n_angles > 1 else 0) + 1]), _const_i64([0]))
        outs.append(op.Unsqueeze(plugin(xb, ab, c, interpolation=int(interpolation)), _const_i64([0])))
    y = outs[0] if B == 1 else op.Concat(*outs, axis=0)
    return _to_fp16_out(y, variant)


def _flash_attention(q, k, v, scale, variant, q_scale, k_scale, v_scale):
    """QKVTRT computes softmax(Q K^T / sqrt(D)) V on [B*H, L, D]; another scale is folded into Q."""
    op = _op()
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    qf, kf, vf = _dequant(q, q_scale, variant), _dequant(k, k_scale, variant), _dequant(v, v_scale, variant)
    if abs(float(scale) * D**0.5 - 1.0) > 1e-7:
        qf = op.Mul(qf, op.CastLike(op.Constant(value_float=float(scale) * D**0.5), qf))
    y = _plugin("QKVTRT", variant)(
        op.Reshape(qf, _const_i64([B * H, Lq, D])), op.Reshape(kf, _const_i64([B * H, Lk, D])), op.Reshape(vf, _const_i64([B * H, Lk, D]))
    )
    return _to_fp16_out(op.Reshape(y, _const_i64([B, H, Lq, D])), variant)


def _bev_pool_v2(depth, feat, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths, bev_feat_shape,
                 variant, depth_scale, feat_scale):
    """BEVPoolV2TRT takes depth [N, D, H, W], feat [N, H, W, C] (batch 1) and writes [1, Y, X, C]."""
    op = _op()
    B, Z, Y, X, C = (int(s) for s in bev_feat_shape)
    if B != 1 or Z != 1:
        raise NotImplementedError(f"BEVPoolV2TRT supports batch 1 and one Z slice, got bev_feat_shape={list(bev_feat_shape)}")
    d = op.Reshape(_dequant(depth, depth_scale, variant), _const_i64([-1, *depth.shape[2:]]))
    f = op.Reshape(_dequant(feat, feat_scale, variant), _const_i64([-1, *feat.shape[2:]]))
    if variant == "int8":
        f = op.CastLike(f, d)
    y = _plugin("BEVPoolV2TRT", variant)(
        d, f, ranks_depth, ranks_feat, ranks_bev, interval_starts, interval_lengths, out_height=Y, out_width=X
    )
    # [1, Y, X, C] -> our [B, C, Z, Y, X]
    y = op.Unsqueeze(op.Transpose(y, perm=[0, 3, 1, 2]), _const_i64([2]))
    return _to_fp16_out(y, variant)


def translation_table() -> dict:
    """Our ops' overloads -> their plugin translations, for ``torch.onnx.export(custom_translation_table=)``.

    Imports every op module so their ``torch.ops.bevdeploy`` overloads exist.
    """
    import bevdeploy.ops  # noqa: F401  (registers the ops)

    ops = torch.ops.bevdeploy
    return {
        ops.inverse.default: _inverse,
        ops.grid_sample.default: _grid_sample,
        ops.msda.default: _msda,
        ops.msda_fused.default: _msda_fused,
        ops.modulated_deform_conv2d.default: _modulated_deform_conv2d,
        ops.rotate.default: _rotate,
        ops.flash_attention.default: _flash_attention,
        ops.bev_pool_v2.default: _bev_pool_v2,
    }


def export_onnx(
    module: torch.nn.Module | torch.export.ExportedProgram,
    args: tuple = (),
    path: str | os.PathLike | None = None,
    *,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    check: bool = True,
) -> onnx.ModelProto:
    """Export ``module(*args)`` (static shapes) to ONNX with the reference plugins' nodes.

    Args:
        module: an ``nn.Module`` (exported here with ``torch.export.export``) or an ExportedProgram.
        args: example inputs (their shapes are baked in, as TensorRT engines of the reference).
        path: where to write the ``.onnx`` file (optional).
        input_names / output_names: names for the graph's inputs/outputs (the reference's
            ``image``, ``prev_bev``, ... for BEVFormer).
        check: run ``onnx.checker.check_model(full_check=True)``.

    Returns:
        The ONNX ModelProto.
    """
    register_plugin_schemas()
    ep = module if isinstance(module, torch.export.ExportedProgram) else torch.export.export(module, tuple(args))
    fp8 = sorted({str(node.target) for node in ep.graph.nodes if str(node.target).startswith(
        ("bevdeploy.fp8_", "bevdeploy.quantize_fp8"))})
    if fp8:  # TensorRT's fp8 Q/DQ form has no counterpart here yet
        raise NotImplementedError(f"ONNX export of fp8 layers is not supported (found {', '.join(fp8)}): "
                                  "export a float or int8 deploy form instead")
    program = torch.onnx.export(
        ep,
        dynamo=True,
        custom_translation_table=translation_table(),
        opset_version=18,
        input_names=input_names,
        output_names=output_names,
        verbose=False,
    )
    model = program.model_proto
    if check:
        onnx.checker.check_model(model, full_check=True)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
    return model


def plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The reference-plugin nodes of a model, in graph order."""
    return [n for n in model.graph.node if n.op_type in PLUGIN_NODE_NAMES and n.domain == ""]
