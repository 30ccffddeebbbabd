"""QuantDeformConv2d: the int8 DCNv2 layer (quantize_modules' conversion, the chain, state dicts)."""

import copy

import pytest
import torch
from torch import nn

from bevdeploy.ops.modulated_deform_conv2d import ModulatedDeformConv2dPack
from bevdeploy.quant.calibrate import calibrate
from bevdeploy.quant.modules import QuantConv2d, QuantDeformConv2d, quantize_modules
from bevdeploy.quant.sensitivity import sqnr_db


def _dcn_module(seed=0):
    """CenterNet's neck stage form: Sequential(DCN, folded BN, ReLU) then a 1x1 conv, with a trained-like
    offset conv (random weights: samples land between pixels, some off the image)."""
    g = torch.Generator().manual_seed(seed)
    dcn = ModulatedDeformConv2dPack(12, 20, 3, padding=1, deform_groups=2)
    with torch.no_grad():
        dcn.conv_offset.weight.copy_(torch.randn(dcn.conv_offset.weight.shape, generator=g) * 0.3)
        dcn.conv_offset.bias.copy_(torch.randn(dcn.conv_offset.bias.shape, generator=g))
        dcn.bias.copy_(torch.randn(20, generator=g) * 0.1)
    return nn.Sequential(nn.Sequential(dcn, nn.Identity(), nn.ReLU()), nn.Conv2d(20, 8, 1)).eval()


def _x(seed=1):
    return torch.randn(2, 12, 9, 13, generator=torch.Generator().manual_seed(seed))


def _quantized(model, **kw):
    x = _x()
    table = calibrate(model, lambda m: m(x), "minmax")
    q = copy.deepcopy(model)
    report = quantize_modules(q, {n: table.scale(n) for n in table.amax}, out_dtype=torch.float32, deform_convs=True,
                              **kw)
    return q, report


def test_dcn_converted_with_offset_conv_scale_and_fused_relu(ops_on_references):
    model = _dcn_module()
    q, report = _quantized(model)
    dcn = q[0][0]
    assert isinstance(dcn, QuantDeformConv2d) and isinstance(dcn.conv_offset, QuantConv2d)
    assert dcn.activation == "relu" and isinstance(q[0][2], nn.Identity)
    assert dcn.input_scale == dcn.conv_offset.input_scale
    rows = {r.name: r for r in report}
    assert rows["0.0"].precision == "int8" and "DCNv2" in rows["0.0"].reason
    assert rows["0.2"].precision == "fused"
    assert [r.name for r in report].index("0.0") < [r.name for r in report].index("0.0.conv_offset")
    dcn.input_scale = 0.5  # the offset conv follows: both read the same codes
    assert dcn.conv_offset.input_scale == 0.5


def test_dcn_int8_output_close_to_float(ops_on_references):
    model = _dcn_module()
    q, _ = _quantized(model)
    x = _x(2)
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # measured 28.7 dB (seeds 0 / 2): int8 input, offset conv (its offsets move the samples) and weights
    assert sqnr_db(ref, out) > 24.0, sqnr_db(ref, out)


def test_dcn_reads_int8_codes_and_writes_them(ops_on_references):
    # the chain's form: codes in (the same scale as its offset conv's), codes out at the consumer's scale
    model = _dcn_module()
    q, _ = _quantized(model)
    dcn = q[0][0]
    x = _x(3)
    xq = torch.clamp(torch.round(x / dcn.input_scale), -127, 127).to(torch.int8)
    with torch.no_grad():
        from_float, from_codes = dcn(x), dcn(xq)
        torch.testing.assert_close(from_codes, from_float, rtol=0, atol=0)
        dcn.out_scale = float(from_float.abs().max()) / 127
        codes = dcn(xq)
    assert dcn.activation == "relu" and codes.dtype == torch.int8 and codes.min() >= 0  # ReLU, then requantised
    # half a code, plus the fp16 rounding of the float output (the kernel writes fp16)
    assert (codes.float() * dcn.out_scale - from_float).abs().max() <= dcn.out_scale / 2 + 127 * dcn.out_scale * 2**-11
    # a float offset conv behind an int8 producer reads the dequantized codes
    kept, _ = _quantized(model, keep_float={"0.0.conv_offset"})
    with torch.no_grad():
        torch.testing.assert_close(kept[0][0](xq), kept[0][0](xq.float() * kept[0][0].input_scale),
                                   rtol=0, atol=0)


def test_dcn_kept_float_or_asymmetric(ops_on_references):
    model = _dcn_module()
    q, report = _quantized(model, keep_float={"0.0"})
    assert isinstance(q[0][0], ModulatedDeformConv2dPack)
    assert {r.name: r.precision for r in report}["0.0"] == "float"
    # asymmetric input codes (the offset conv's zero point): the DCN samples q - z, its offset conv reads the
    # same codes; one-sided ReLU-like input here, so the zero point buys a bit over symmetric codes
    x = torch.relu(_x())
    table = calibrate(model, lambda m: m(x), "minmax")
    scale, zp = table.qparams("0.0.conv_offset", asymmetric=True)
    assert zp == -128
    scales = {n: table.scale(n) for n in table.amax}
    sym, asym, both = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    float_offsets = {"0.0.conv_offset"}  # isolates the DCN's own sampling of the codes
    quantize_modules(sym, scales, out_dtype=torch.float32, deform_convs=True, keep_float=float_offsets)
    quantize_modules(asym, {**scales, "0.0.conv_offset": scale}, zero_points={"0.0.conv_offset": zp},
                     out_dtype=torch.float32, deform_convs=True, keep_float=float_offsets)
    report = quantize_modules(both, {**scales, "0.0.conv_offset": scale}, zero_points={"0.0.conv_offset": zp},
                              out_dtype=torch.float32, deform_convs=True)
    assert asym[0][0].input_zero_point == zp and isinstance(asym[0][0].conv_offset, nn.Conv2d)
    dcn = both[0][0]
    assert isinstance(dcn, QuantDeformConv2d) and dcn.input_zero_point == dcn.conv_offset.input_zero_point == zp
    assert "zero point -128" in {r.name: r.reason for r in report}["0.0"]
    x2 = torch.relu(_x(6))
    with torch.no_grad():  # the DCN stage alone (the 1x1 conv after it reads symmetric codes either way)
        ref, out_s, out_a = model[0](x2), sym[0](x2), asym[0](x2)
        xq = torch.clamp(torch.round(x2 / scale) + zp, -128, 127).to(torch.int8)
        torch.testing.assert_close(dcn(xq), dcn(x2), rtol=0, atol=0)  # codes in: the same result
        # a float offset conv behind asymmetric codes reads them dequantized
        torch.testing.assert_close(asym[0][0](xq), asym[0][0]((xq.float() - zp) * scale), rtol=0, atol=0)
    # measured (seed 6): symmetric 37.1 dB, asymmetric 37.6 dB against the float stage (12 input channels:
    # the per-channel weight rounding weighs as much as the input's here)
    assert sqnr_db(ref, out_a) > sqnr_db(ref, out_s) + 0.2, (sqnr_db(ref, out_s), sqnr_db(ref, out_a))
    fresh = QuantDeformConv2d(12, 20, 3, padding=1, deform_groups=2, activation="relu", out_dtype=torch.float32)
    fresh.conv_offset = QuantConv2d(12, 54, 3, padding=1, out_dtype=torch.float32)
    fresh.load_state_dict(dcn.state_dict())  # the zero point travels in the state dict
    assert fresh.input_zero_point == fresh.conv_offset.input_zero_point == zp


def test_dcn_state_dict_round_trip(ops_on_references):
    model = _dcn_module()
    q, _ = _quantized(model)
    fresh = QuantDeformConv2d(12, 20, 3, padding=1, deform_groups=2, activation="relu", out_dtype=torch.float32)
    fresh.conv_offset = QuantConv2d(12, 54, 3, padding=1, out_dtype=torch.float32)
    fresh.load_state_dict(q[0][0].state_dict())
    assert fresh.input_scale == q[0][0].input_scale and fresh.weight.is_contiguous(memory_format=torch.channels_last)
    x = _x(4)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), q[0][0](x), rtol=0, atol=0)


def test_dcn_stays_float_unless_asked(ops_on_references):
    x = _x()
    model = _dcn_module()
    table = calibrate(model, lambda m: m(x), "minmax")
    q = copy.deepcopy(model)
    report = quantize_modules(q, {n: table.scale(n) for n in table.amax})
    assert isinstance(q[0][0], ModulatedDeformConv2dPack) and isinstance(q[0][0].conv_offset, QuantConv2d)
    assert "0.0" not in {r.name for r in report}


def test_qat_form_of_the_int8_dcn(ops_on_references):
    """prepare_qat(deform_convs=True): the pack samples its input at the offset conv's learned scale (so
    that scale learns from the DCN too), with per-channel fake-quant weights; its forward is the int8
    layer's math (up to the kernel's fp16 samples and output); strip_qat gives the pack back."""
    from bevdeploy.quant.qat import QATDeformConv2d, learned_scales, prepare_qat, strip_qat

    model = _dcn_module()
    x = _x()
    table = calibrate(model, lambda m: m(x), "minmax")
    scales = {n: table.scale(n) for n in table.amax}
    q, _ = _quantized(model)
    qat = copy.deepcopy(model)
    weight = qat[0][0].weight
    prepare_qat(qat, scales, deform_convs=True)
    dcn = qat[0][0]
    assert isinstance(dcn, QATDeformConv2d) and dcn.weight is weight
    x2 = _x(5)
    out = qat(x2)
    with torch.no_grad():
        want = q(x2)
    # measured 61.5 dB (34-36 dB while the int8 layer rounded each blended sample to a code)
    assert sqnr_db(want, out.detach()) > 50.0, sqnr_db(want, out.detach())
    out.square().mean().backward()
    assert dcn.conv_offset.scale_log_ratio.grad is not None and dcn.conv_offset.scale_log_ratio.grad != 0
    assert dcn.weight.grad is not None and torch.isfinite(dcn.weight.grad).all()
    assert set(learned_scales(qat)) == {"0.0.conv_offset", "1"}
    strip_qat(qat)
    assert type(qat[0][0]) is ModulatedDeformConv2dPack and qat[0][0].weight is weight
    assert type(qat[0][0].conv_offset) is nn.Conv2d
    with pytest.raises(ValueError, match="prepare_qat ran before"):
        prepare_qat(prepare_qat(copy.deepcopy(model), scales, deform_convs=True), scales)
    plain = prepare_qat(copy.deepcopy(model), scales)  # off by default: the float DCN samples float
    assert type(plain[0][0]) is ModulatedDeformConv2dPack
