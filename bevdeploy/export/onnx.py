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
sca_gathered                the reference's static SCA: offsets/logits expanded over cameras,
                            ``MultiScaleDeformableAttnTRT`` on ``[B*N, ...]``, mask Mul, ReduceSum,
                            Div by Max(count, 1)
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
            schema.set_type_and_shape_inference_function(_infer_plugin(name))
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


def _sca_gathered(value, spatial_shapes, reference_points_cam, bev_mask, sampling_offsets, attention_logits, variant,
                  value_scale):
    """The camera-gathered SCA as the reference system's graph computes SCA: every query in every camera
    (one MSDA node over B*N images), the mask multiply, the sum over cameras and the clamped count."""
    op = _op()
    B, N, S, H, D = value.shape
    _, Q, _, L, P, _ = sampling_offsets.shape
    R = reference_points_cam.shape[3]

    def per_camera(x, shape):  # [B, ...] -> [B*N, ...] repeated over cameras
        x = op.Expand(op.Unsqueeze(x, _const_i64([1])), _const_i64([B, N, *x.shape[1:]]))
        return op.Reshape(x, _const_i64(shape))

    v = op.Reshape(value, _const_i64([B * N, S, H, D]))
    ref = op.Reshape(reference_points_cam, _const_i64([B * N, Q, 1, R * 2]))
    offsets = per_camera(sampling_offsets, [B * N, Q, H, L * P * 2])
    logits = per_camera(attention_logits, [B * N, Q, H, L * P])
    y = _msda_node(v, spatial_shapes, ref, offsets, logits, variant, value_scale, [B, N, Q, H * D])
    seen = op.CastLike(op.Cast(bev_mask, to=TensorProto.BOOL), y)  # nonzero -> 1, in the output's dtype
    total = op.ReduceSum(op.Mul(y, op.Unsqueeze(seen, _const_i64([3]))), _const_i64([1]), keepdims=0)
    count = op.Max(op.ReduceSum(seen, _const_i64([1]), keepdims=1), op.CastLike(op.Constant(value_float=1.0), y))
    return op.Div(total, op.Reshape(count, _const_i64([B, Q, 1])))


def _modulated_deform_conv2d(input, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups,
                             variant, input_scale, weight_scale, activation="none", out_scale=None, out_zero_point=0,
                             input_zero_point=0):
    """The plugin node; an int8 layer's fused epilogue follows it as ``Relu`` and ``QuantizeLinear``
    (TensorRT fuses both into the plugin's int8 output; opset 18's Q takes float32, so a Cast precedes it;
    ONNX's Q clamps at -128 where ours stops at -127 for a symmetric output)."""
    op = _op()
    if input_zero_point:  # asymmetric codes: DQ with the zero point
        x = op.DequantizeLinear(input, op.Constant(value_float=float(input_scale)),
                                op.Constant(value=onnx.helper.make_tensor("zx", TensorProto.INT8, [], [int(input_zero_point)])))
    else:
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
    y = _to_fp16_out(y, variant)
    if activation == "relu":
        y = op.Relu(y)
    if out_scale is not None:
        y = op.QuantizeLinear(op.Cast(y, to=TensorProto.FLOAT), op.Constant(value_float=float(out_scale)),
                              op.Constant(value=onnx.helper.make_tensor("z", TensorProto.INT8, [], [int(out_zero_point)])))
    return y


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
        ops.sca_gathered.default: _sca_gathered,
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


# ---------------------------------------------------------------- shape inference of the plugin nodes


def _dims(ctx, i: int) -> list[int] | None:
    t = ctx.get_input_type(i)
    if t is None or not t.tensor_type.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.tensor_type.shape.dim]
    return None if any(d < 0 for d in dims) else dims


def _plugin_output_shape(name: str, ctx) -> list[int] | None:
    """The output shape of plugin ``name`` from its input shapes (and attributes), as TensorRT's
    ``getOutputDimensions`` of the reference plugins computes it; None when an input shape is unknown."""
    base = name[:-1] if name.endswith("TRT2") else name
    a = _dims(ctx, 0)
    if a is None:
        return None
    if base == "GridSampler2DTRT":
        g = _dims(ctx, 1)
        return None if g is None else [a[0], a[1], g[2], g[3]]
    if base == "MultiScaleDeformableAttnTRT":
        w = _dims(ctx, 4)  # attention weights [B, Q, heads, L*P]
        return None if w is None else [w[0], w[1], a[2], a[3]]
    if base == "ModulatedDeformableConv2dTRT":
        off, wt = _dims(ctx, 1), _dims(ctx, 3)
        return None if off is None or wt is None else [a[0], wt[0], off[2], off[3]]
    if base in ("RotateTRT", "InverseTRT"):
        return a
    if base == "BEVPoolV2TRT":
        f = _dims(ctx, 1)
        attr = {k: ctx.get_attribute(k) for k in ("out_height", "out_width")}
        if f is None or any(v is None for v in attr.values()):
            return None
        return [1, attr["out_height"].i, attr["out_width"].i, f[3]]
    if base == "QKVTRT":
        v = _dims(ctx, 2)
        return None if v is None else [a[0], a[1], v[2]]
    return None


def _infer_plugin(name: str):
    def infer(ctx) -> None:
        elem = ctx.get_input_type(0).tensor_type.elem_type
        shape = _plugin_output_shape(name, ctx)
        out = onnx.helper.make_tensor_type_proto(elem, shape) if shape is not None else \
            onnx.helper.make_tensor_type_proto(elem, None)
        ctx.set_output_type(0, out)

    return infer


# ---------------------------------------------------------------- whole models, and checking a file in onnxruntime

#: Domain the plugin nodes are moved to for onnxruntime-extensions' Python custom ops (check only).
CHECK_DOMAIN = "ai.onnx.contrib"
#: Keys of the ONNX file's metadata that let ``check_onnx`` rebuild the PyTorch model.
META_MODEL, META_OVERRIDES, META_CHECKPOINT = "bevdeploy.model", "bevdeploy.model_overrides", "bevdeploy.checkpoint"


def example_model_inputs(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Plausible inputs of a model at its configured size (CPU, batch 1): a random image; for BEVFormer /
    BEVDet six of them and the synthetic world's nuScenes-like camera rig (so attention samples real pixels)."""
    import numpy as np

    from bevdeploy.data.synthetic import nuscenes_rig
    from bevdeploy.engine.model_io import DET2D_FAMILIES, family

    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    H, W = cfg.image_size
    kind = family(model)
    if kind in DET2D_FAMILIES:
        return {"image": torch.randn(1, 3, H, W, generator=g)}
    image = torch.randn(1, 6, 3, H, W, generator=g)
    if kind == "bevformer":
        from bevdeploy.eval.bench_models import rig_lidar2img

        can_bus = torch.zeros(1, 18)
        can_bus[0, :3] = torch.tensor([0.5, 1.0, 0.0])  # some ego motion: exercises the BEV shift and rotation
        can_bus[0, -2:] = torch.tensor([0.3, 2.0])
        return {"image": image, "lidar2img": rig_lidar2img(W / 1600.0)[None],
                "can_bus": can_bus, "prev_bev": torch.randn(1, cfg.bev_h * cfg.bev_w, cfg.embed_dims, generator=g),
                "use_prev_bev": torch.ones(1)}
    from bevdeploy.models.bevdet import BEVPoolRanks

    rig = nuscenes_rig((H, W))
    s2e = np.tile(np.eye(4), (6, 1, 1))
    s2e[:, :3, :3], s2e[:, :3, 3] = rig.rotations, rig.translations
    f32 = dict(dtype=torch.float32)
    geometry = (torch.tensor(s2e, **f32)[None], torch.tensor(rig.intrinsics, **f32)[None],
                torch.eye(3).expand(1, 6, 3, 3), torch.zeros(1, 6, 3), torch.eye(3)[None])
    return {"image": image, **dict(zip(BEVPoolRanks._fields, model.prepare(*geometry)))}


def _load_model(model_name: str, checkpoint: str | None, overrides: dict | None) -> torch.nn.Module:
    from bevdeploy.engine.deploy import fold_batchnorms
    from bevdeploy.models import MODELS
    from bevdeploy.models.checkpoint import load_checkpoint

    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; choose from {sorted(MODELS)}")
    torch.manual_seed(0)  # random weights (no checkpoint) are the same in export and check
    model = MODELS[model_name](**(overrides or {}))
    if checkpoint:
        load_checkpoint(model, checkpoint)
    else:
        from bevdeploy.eval.detection import warn_random_weights

        warn_random_weights(model_name, "ONNX export")
    model = model.float().eval()
    fold_batchnorms(model)
    return model


def export_model(
    model_name: str,
    path: str | os.PathLike,
    *,
    checkpoint: str | None = None,
    model_overrides: dict | None = None,
) -> Path:
    """Export a whole model (fp32, batch 1, static shapes) to ONNX with plugin nodes.

    Inputs and outputs carry the engine's names (BEVFormer: ``image, lidar2img, can_bus, prev_bev,
    use_prev_bev`` -> ``bev_embed, all_cls_scores, all_bbox_preds``; BEVDet: ``image`` and the five
    BEVPool index arrays -> the head maps; YOLOX / CenterNet: ``image`` [1, 3, H, W] -> the head maps,
    CenterNet's neck DCNs as ``ModulatedDeformableConv2dTRT``). Every plugin output has its shape (inferred
    by the registered schemas), and the model name, overrides and checkpoint go into the file's metadata
    so :func:`check_onnx` can rebuild the same PyTorch model.
    """
    import json

    from bevdeploy.engine.deploy import ExportWrapper
    from bevdeploy.engine.model_io import input_names, output_names

    model = _load_model(model_name, checkpoint, model_overrides)
    inputs = example_model_inputs(model)
    wrapper = ExportWrapper(model, output_names(model)).eval()
    with torch.no_grad():
        ep = torch.export.export(wrapper, tuple(inputs.values()), strict=False)
    proto = export_onnx(ep, input_names=list(input_names(model)), output_names=list(output_names(model)), check=False)
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    onnx.checker.check_model(proto, full_check=True)
    for key, value in ((META_MODEL, model_name), (META_OVERRIDES, json.dumps(model_overrides or {})),
                       (META_CHECKPOINT, str(checkpoint or ""))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


def _plugin_impls() -> dict:
    """Plugin op type -> numpy implementation (the reference system's layouts, our ops' references)."""
    import numpy as np

    from bevdeploy.ops import bev_pool_v2, flash_attention, grid_sample, inverse, modulated_deform_conv2d, msda, rotate

    t = torch.from_numpy

    def out(y):
        return y.detach().cpu().numpy()

    def grid(x, g, interpolation_mode, padding_mode, align_corners):
        gr = (t(g).float() / 10.0).permute(0, 2, 3, 1)
        return out(grid_sample.reference(t(x), gr, grid_sample._MODE_NAMES[interpolation_mode],
                                         grid_sample._PADDING_NAMES[padding_mode], bool(align_corners)).to(t(x).dtype))

    def msda_plugin(value, shapes, ref, offsets, logits):
        v = t(value)
        B, Q, Hh, LP = logits.shape
        L = shapes.shape[0]
        ref_t = t(ref).float().reshape(B, Q, -1, 2)
        off = t(offsets).float().reshape(B, Q, Hh, L, LP // L, 2)
        y = msda.reference_fused(v.float(), [tuple(int(s) for s in row) for row in shapes], ref_t, off,
                                 t(logits).float())
        return out(y.reshape(B, Q, Hh, v.shape[3]).to(v.dtype))

    def dcn(x, offset, mask, weight, bias=None, *, stride, padding, dilation, groups, deform_groups):
        xt = t(x)
        y = modulated_deform_conv2d.reference(xt.float(), t(offset).float(), t(mask).float(), t(weight).float(),
                                              None if bias is None else t(bias).float(), tuple(stride), tuple(padding),
                                              tuple(dilation), groups, deform_groups)
        return out(y.to(xt.dtype))

    def rot(img, angle, center, interpolation):
        it = t(img)
        y = rotate.reference(it.float(), t(angle).double(), t(center).double(),
                             rotate._INTERPOLATION_NAMES[interpolation])
        return out(y.to(it.dtype))

    def inv(x):
        return out(inverse.reference(t(x)))

    def pool(depth, feat, ranks_depth, ranks_feat, ranks_bev, starts, lengths, out_height, out_width):
        d, f = t(depth), t(feat)
        shape = (1, 1, out_height, out_width, f.shape[-1])
        y = bev_pool_v2.reference(d[None].float(), f[None].float(), *(t(a.astype(np.int64)) for a in
                                  (ranks_depth, ranks_feat, ranks_bev, starts, lengths)), shape)
        return out(y[:, :, 0].permute(0, 2, 3, 1).to(d.dtype))  # [B, C, Z, Y, X] -> [1, Y, X, C]

    def qkv(q, k, v):
        qt = t(q)
        return out(flash_attention.reference(qt.float()[None], t(k).float()[None], t(v).float()[None])[0].to(qt.dtype))

    return {"GridSampler2DTRT": grid, "MultiScaleDeformableAttnTRT": msda_plugin,
            "ModulatedDeformableConv2dTRT": dcn, "RotateTRT": rot, "InverseTRT": inv, "BEVPoolV2TRT": pool,
            "QKVTRT": qkv}


_ACTIVE_IMPLS: dict = {}
_REGISTERED: set = set()


def _register_python_ops(model: onnx.ModelProto) -> None:
    """Declare each plugin of ``model`` (op type, input/output dtypes, attributes) as an
    onnxruntime-extensions Python op running :func:`_plugin_impls`' implementation."""
    try:
        from onnxruntime_extensions import PyCustomOpDef, onnx_op
    except ImportError as e:
        raise RuntimeError("checking plugin graphs needs onnxruntime-extensions: pip install onnxruntime-extensions "
                           "(or pip install -e '.[onnx]')") from e
    _ACTIVE_IMPLS.update(_plugin_impls())  # looked up at call time: onnxruntime keeps the first registration
    types = {TensorProto.FLOAT: PyCustomOpDef.dt_float, TensorProto.FLOAT16: PyCustomOpDef.dt_float16,
             TensorProto.INT32: PyCustomOpDef.dt_int32, TensorProto.INT64: PyCustomOpDef.dt_int64,
             TensorProto.INT8: PyCustomOpDef.dt_int8}
    inferred = onnx.shape_inference.infer_shapes(model)
    elem = {v.name: v.type.tensor_type.elem_type for v in
            list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    elem.update({i.name: i.data_type for i in inferred.graph.initializer})
    for node in inferred.graph.node:
        if node.op_type == "Constant":
            elem[node.output[0]] = next(onnx.helper.get_attribute_value(a).data_type for a in node.attribute)
    done = _REGISTERED
    for node in plugin_nodes(model):
        base = node.op_type[:-1] if node.op_type.endswith("TRT2") else node.op_type
        in_types = tuple(types[elem[i]] for i in node.input if i)
        key = (node.op_type, in_types)
        if key in done:
            continue
        done.add(key)
        attrs = {a.name: PyCustomOpDef.dt_int64 for a in node.attribute if a.type == onnx.AttributeProto.INT}
        list_attrs = [a.name for a in node.attribute if a.type == onnx.AttributeProto.INTS]

        def run(*inputs, _base=base, _lists=tuple(list_attrs), **kw):
            # INTS attributes travel as strings in the Python-op API: parse them back
            kw = {k: ([int(x) for x in str(v).strip("[]").split(",") if x.strip()] if k in _lists else int(v))
                  for k, v in kw.items()}
            return _ACTIVE_IMPLS[_base](*inputs, **kw)

        if list_attrs:
            attrs.update({n: PyCustomOpDef.dt_string for n in list_attrs})
        onnx_op(op_type=node.op_type, domain=CHECK_DOMAIN, inputs=list(in_types), outputs=[in_types[0]],
                attrs=attrs)(run)


def check_onnx(
    path: str | os.PathLike,
    *,
    model_name: str | None = None,
    checkpoint: str | None = None,
    model_overrides: dict | None = None,
    seed: int = 0,
    min_sqnr_db: float = 80.0,
) -> dict:
    """Run an exported ONNX file in onnxruntime (plugins as Python custom ops) and compare with PyTorch.

    The PyTorch model is rebuilt from the file's metadata (or ``model_name`` / ``checkpoint`` /
    ``model_overrides``), both get the same plausible inputs, and each output's SQNR (of its
    variation around the per-channel mean) and max abs difference are reported. Catches a plugin
    graph that TensorRT would parse but that computes something else (a wrong layout, scale or
    attribute).

    Returns:
        dict with ``ok`` (every output's SQNR >= ``min_sqnr_db`` and one output not constant; both sides
        compute in fp32, so a correct graph differs by rounding only: 94 to 130 dB measured on reduced
        models, while a BEVPool plugin dropping half its channels gave 41 to 52 dB), ``outputs`` ({name:
        {sqnr_db, max_abs_diff, shape, constant}}), ``plugins`` (node count per type) and ``text`` (a
        printable table).
    """
    import json

    import numpy as np
    import onnxruntime as ort

    from bevdeploy.quant.sensitivity import sqnr_db

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {str(path)!r} does not exist")
    register_plugin_schemas()
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    model_name = model_name or meta.get(META_MODEL)
    if not model_name:
        raise ValueError(f"{path}: no bevdeploy model name in the file's metadata; pass the model name (--model)")
    overrides = model_overrides if model_overrides is not None else json.loads(meta.get(META_OVERRIDES) or "{}")
    checkpoint = checkpoint or meta.get(META_CHECKPOINT) or None
    model = _load_model(model_name, checkpoint, overrides)
    inputs = example_model_inputs(model, seed)
    with torch.no_grad():
        expected = model(*inputs.values())
    _register_python_ops(proto)
    counts: dict[str, int] = {}
    for node in plugin_nodes(proto):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        node.domain = CHECK_DOMAIN
        for i, a in enumerate(node.attribute):  # the Python-op API reads list attributes as strings
            if a.type == onnx.AttributeProto.INTS:
                node.attribute[i].CopyFrom(onnx.helper.make_attribute(a.name, str(list(a.ints))))
    proto.opset_import.append(onnx.helper.make_opsetid(CHECK_DOMAIN, 1))
    from onnxruntime_extensions import get_library_path

    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    outputs = {}
    for name, value in got.items():
        ref = expected[name].float()
        y = torch.from_numpy(np.asarray(value)).float()
        if tuple(y.shape) != tuple(ref.shape):
            outputs[name] = {"sqnr_db": float("-inf"), "max_abs_diff": float("inf"), "shape": list(y.shape),
                             "constant": False}
            continue
        # SQNR of the variation: a random-weight head's output is mostly its bias, which would hide a
        # wrong plugin; remove each channel's (4-D maps) or feature's (else) mean from both sides
        dims = [d for d in range(ref.dim()) if d != (1 if ref.dim() == 4 else ref.dim() - 1)]
        mean = ref.mean(dim=dims, keepdim=True)
        outputs[name] = {"sqnr_db": float(sqnr_db(ref - mean, y - mean)), "max_abs_diff": float((y - ref).abs().max()),
                         "shape": list(y.shape), "constant": bool((ref - mean).abs().max() == 0)}
    # an output that is the same at every position (a random-weight head can be) proves nothing alone
    ok = (any(not o.get("constant") for o in outputs.values())
          and all(o["sqnr_db"] >= min_sqnr_db for o in outputs.values()))
    lines = [f"{path.name}: {model_name}, plugins {counts}; onnxruntime vs PyTorch on the same inputs:"]
    lines += [f"  {n:<22} shape {o['shape']}  SQNR {o['sqnr_db']:.1f} dB  max |diff| {o['max_abs_diff']:.3g}"
              + ("  (constant over its positions)" if o.get("constant") else "") for n, o in outputs.items()]
    lines.append(f"{'OK' if ok else 'MISMATCH'} (every output >= {min_sqnr_db:.0f} dB, at least one not constant)")
    return {"ok": ok, "outputs": outputs, "plugins": counts, "text": "\n".join(lines)}
