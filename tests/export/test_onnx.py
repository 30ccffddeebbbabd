"""ONNX export: every op becomes exactly one reference-plugin node, and the model passes the checker."""

import onnx
import pytest
import torch

from bevdeploy.export.onnx import export_onnx, plugin_nodes
from tests._allops import AllOps, all_ops_inputs

EXPECTED = {
    "GridSampler2DTRT": 1,
    "MultiScaleDeformableAttnTRT": 2,  # msda and msda_fused
    "ModulatedDeformableConv2dTRT": 1,
    "RotateTRT": 1,
    "InverseTRT": 1,
    "BEVPoolV2TRT": 1,
    "QKVTRT": 1,
}


def _counts(model):
    counts = {}
    for n in plugin_nodes(model):
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "all_ops.onnx"
    model = export_onnx(AllOps("fp32"), all_ops_inputs("fp32"), path)
    assert path.exists() and path.stat().st_size > 0
    return onnx.load(str(path))


def test_plugin_nodes_and_checker(fp32_model):
    onnx.checker.check_model(fp32_model, full_check=True)
    assert _counts(fp32_model) == EXPECTED
    assert all(n.domain == "" for n in plugin_nodes(fp32_model))


def test_node_signatures(fp32_model):
    nodes = {n.op_type: n for n in plugin_nodes(fp32_model)}
    assert _attrs(nodes["GridSampler2DTRT"]) == {"interpolation_mode": 0, "padding_mode": 0, "align_corners": 0}
    assert _attrs(nodes["ModulatedDeformableConv2dTRT"]) == {
        "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "deform_groups": 1}
    assert len(nodes["ModulatedDeformableConv2dTRT"].input) == 5  # with bias
    assert _attrs(nodes["RotateTRT"]) == {"interpolation": 0}
    assert _attrs(nodes["BEVPoolV2TRT"]) == {"out_height": 4, "out_width": 5}
    assert len(nodes["MultiScaleDeformableAttnTRT"].input) == 5
    assert len(nodes["QKVTRT"].input) == 3
    # shapes the reference plugins expect, from ONNX shape inference
    inferred = onnx.shape_inference.infer_shapes(fp32_model)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in inferred.graph.value_info}
    grid_in = nodes["GridSampler2DTRT"].input[1]
    assert shapes[grid_in] == [1, 2, 5, 5]  # channel-first grid
    q_in = nodes["QKVTRT"].input[0]
    assert shapes[q_in] == [2, 5, 4]  # batch x heads merged


def test_half2_variant_names():
    model = export_onnx(AllOps("fp16x2"), all_ops_inputs("fp16x2"))
    names = {n.op_type for n in plugin_nodes(model)}
    assert names == {"GridSampler2DTRT2", "MultiScaleDeformableAttnTRT2", "ModulatedDeformableConv2dTRT2",
                     "RotateTRT2", "InverseTRT", "BEVPoolV2TRT2", "QKVTRT2"}


def test_int8_variant_has_dequantize_in_front():
    model = export_onnx(AllOps("int8"), all_ops_inputs("int8"))
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in plugin_nodes(model):
        if node.op_type == "InverseTRT":
            continue
        first = producers.get(node.input[0])
        assert first is not None and first.op_type in ("DequantizeLinear", "Reshape", "Squeeze"), node.op_type


def test_int8_dcn_fused_epilogue_exports_as_relu_and_quantize():
    # the int8 DCN's fused ReLU + requantisation (the int8 chain's producer form) follows the plugin, and
    # its asymmetric input is dequantized with the zero point in front of it
    from bevdeploy.ops.modulated_deform_conv2d import modulated_deform_conv2d, quantize_weight_per_channel

    class Dcn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            wq, ws = quantize_weight_per_channel(torch.randn(8, 4, 3, 3))
            self.register_buffer("wq", wq)
            self.register_buffer("ws", ws)

        def forward(self, x, off, m):
            return modulated_deform_conv2d(x, off, m, self.wq, None, padding=1, variant="int8", input_scale=0.02,
                                           weight_scale=self.ws, activation="relu", out_scale=0.05, out_zero_point=-3,
                                           input_zero_point=-128)

    args = (torch.randint(-127, 128, (1, 4, 5, 5), dtype=torch.int8), torch.randn(1, 18, 5, 5), torch.rand(1, 9, 5, 5))
    model = export_onnx(Dcn(), args)
    out = model.graph.output[0]
    producers = {o: n for n in model.graph.node for o in n.output}
    q = producers[out.name]
    assert q.op_type == "QuantizeLinear" and out.type.tensor_type.elem_type == onnx.TensorProto.INT8
    cast = producers[q.input[0]]  # opset 18's QuantizeLinear takes float32
    assert cast.op_type == "Cast" and producers[cast.input[0]].op_type == "Relu"
    [plugin] = plugin_nodes(model)
    assert plugin.op_type == "ModulatedDeformableConv2dTRT"
    dq = producers[plugin.input[0]]  # the asymmetric input codes: DQ with their zero point
    assert dq.op_type == "DequantizeLinear" and len(dq.input) == 3
