"""Fp8Linear / Fp8Conv2d against the float layers they replace, and ``quantize_modules_fp8``.

Layers run their ops on the CPU references (the kernels are tested in test_fp8_kernels.py), except
one Fp8Conv2d forward through Triton's interpreter.
"""

import os

import pytest
import torch
from torch import nn

from bevdeploy.quant.fp8_kernels import FP8_DTYPE, FP8_MAX
from bevdeploy.quant.fp8_modules import Fp8Conv2d, Fp8Linear, quantize_modules_fp8
from bevdeploy.quant.sensitivity import sqnr_db

#: Output SQNR floor (dB) of an fp8 layer vs its float layer on gaussian data with max calibration.
#: e4m3 rounds each value within 2^-4 relative (~31 dB per operand for a uniform relative error);
#: with both operands quantized a 512x256x256 gaussian linear measured 28.7 dB.
FP8_LAYER_SQNR_DB = 27.0


def _scale(x: torch.Tensor) -> float:
    return float(x.abs().amax()) / FP8_MAX


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_linear_close_to_float(out_dtype, ops_on_references):
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(96, 40)
    x = torch.randn(7, 11, 96, generator=g)
    q = Fp8Linear.from_float(lin, _scale(x), out_dtype=out_dtype)
    assert q.weight.dtype == FP8_DTYPE and q.weight.shape == (40, 96)
    with torch.no_grad():
        ref, out = lin(x), q(x)
    assert out.dtype == out_dtype and out.shape == ref.shape
    assert torch.isfinite(out).all() and sqnr_db(ref, out.float()) > FP8_LAYER_SQNR_DB
    assert "precision=fp8" in repr(q)


@pytest.mark.parametrize("stride,act", [(1, "relu"), (2, "none")])
def test_conv_close_to_float_with_residual(stride, act, ops_on_references):
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(24, 20, 3, stride=stride, padding=1)
    x = torch.randn(2, 24, 9, 10, generator=g)
    q = Fp8Conv2d.from_float(conv, _scale(x), act, out_dtype=torch.float32)
    assert q.weight.shape == (20, 3, 3, 24)
    with torch.no_grad():
        plain = conv(x)
        res = torch.randn(plain.shape, generator=g)
        ref = plain + res
        ref = torch.relu(ref) if act == "relu" else ref
        out = q(x, residual=res)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(out).all() and sqnr_db(ref, out) > FP8_LAYER_SQNR_DB


def test_conv_through_triton_interpreter_equals_reference_path(monkeypatch):
    if torch.cuda.is_available() or os.environ.get("BEVDEPLOY_TEST_INTERPRET", "1") == "0":
        pytest.skip("CPU interpreter test")
    g = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(13, 9, 3, padding=1)
    x = torch.randn(1, 13, 6, 7, generator=g)
    q = Fp8Conv2d.from_float(conv, _scale(x), "relu", out_dtype=torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with torch.no_grad():
        kernel = q(x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with torch.no_grad():
        ref = q(x)
    torch.testing.assert_close(kernel, ref, rtol=1e-5, atol=1e-5)


def test_input_scale_round_trips_through_state_dict_and_is_checked(ops_on_references):
    q = Fp8Linear.from_float(nn.Linear(16, 8), 0.25)
    r = Fp8Linear(16, 8, input_scale=1.0)
    r.load_state_dict(q.state_dict())
    assert r.input_scale == 0.25 and torch.equal(r.weight.float(), q.weight.float())
    with pytest.raises(ValueError, match="input_scale must be a positive finite"):
        Fp8Linear(4, 4, input_scale=-1.0)
    with pytest.raises(TypeError, match="Fp8Conv2d.from_float takes an nn.Conv2d"):
        Fp8Conv2d.from_float(nn.Linear(2, 2), 1.0)
    with pytest.raises(NotImplementedError, match="groups=2"):
        Fp8Conv2d.from_float(nn.Conv2d(4, 4, 3, groups=2), 1.0)


def test_quantize_modules_swaps_fuses_and_reports(ops_on_references):
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Identity(), nn.ReLU(), nn.Conv2d(16, 16, 1),
                          nn.Conv2d(16, 16, 3, groups=4, padding=1), nn.Flatten(), nn.Linear(16 * 25, 10)).eval()
    x = torch.randn(2, 8, 5, 5, generator=g)
    with torch.no_grad():
        ref = model(x)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0]))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    scales = {n: _scale(t) for n, t in inputs.items()}
    report = quantize_modules_fp8(model, scales, keep_float={"3"}, out_dtype=torch.float32)
    rows = {r.name: (r.precision, r.reason) for r in report}
    assert rows["0"][0] == "fp8" and "relu fused" in rows["0"][1] and rows["2"][0] == "fused"
    assert rows["3"] == ("float", "kept float (keep_float)")
    assert rows["4"][0] == "float" and "groups=4" in rows["4"][1]
    assert rows["6"][0] == "fp8"
    assert isinstance(model[0], Fp8Conv2d) and isinstance(model[2], nn.Identity) and isinstance(model[6], Fp8Linear)
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all() and sqnr_db(ref, out) > FP8_LAYER_SQNR_DB - 3  # two fp8 layers in a row
    with pytest.raises(ValueError, match="keep_float names no module"):
        quantize_modules_fp8(model, {}, keep_float={"nope"})
    with pytest.raises(ValueError, match=r"scales\['x'\] must be a positive finite float"):
        quantize_modules_fp8(model, {"x": 0.0})


def test_measured_sqnr_printout(ops_on_references, capsys):
    """Not a check of its own: prints the SQNR the floor above was set from (run with -s to see it)."""
    g = torch.Generator().manual_seed(9)
    lin = nn.Linear(256, 256)
    x = torch.randn(512, 256, generator=g)
    with torch.no_grad():
        s = sqnr_db(lin(x), Fp8Linear.from_float(lin, _scale(x), out_dtype=torch.float32)(x))
    print(f"fp8 linear 512x256x256 gaussian: {s:.1f} dB")
    assert s > FP8_LAYER_SQNR_DB


def test_onnx_export_refuses_fp8_layers(ops_on_references):
    pytest.importorskip("onnx")
    from bevdeploy.export.onnx import export_onnx

    model = nn.Sequential(Fp8Linear.from_float(nn.Linear(16, 8), 0.1)).eval()
    with pytest.raises(NotImplementedError, match="ONNX export of fp8 layers is not supported"):
        export_onnx(model, (torch.randn(2, 16),))


def test_epilogue_in_graph_for_scaled_mm_layers_equals_fused_epilogue(ops_on_references):
    """Engines give the ``_scaled_mm``-eligible layers (linears, 1x1 convs, K and N multiples of 16) a
    plain-torch epilogue that the compiler fuses downstream; the numbers stay those of the fused one."""
    from bevdeploy.quant.fp8_modules import scaled_mm_layer

    g = torch.Generator().manual_seed(6)

    def make():
        torch.manual_seed(6)
        return nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(32, 32, 1), nn.Flatten(1), nn.Linear(32 * 16, 20)).eval()

    assert [scaled_mm_layer(m) for m in make()] == [True, False, False, False, True, False, False]
    x = torch.randn(2, 16, 4, 4, generator=g)
    scales = {n: 0.01 for n in ("0", "2", "4", "6")}
    fused, split = make(), make()
    quantize_modules_fp8(fused, scales, out_dtype=torch.float32)
    report = quantize_modules_fp8(split, scales, out_dtype=torch.float32, quantize_in_graph=True)
    assert [m.epilogue_in_graph for m in split if isinstance(m, (Fp8Linear, Fp8Conv2d))] == [True, False, True, False]
    assert "epilogue in the graph" in dict((r.name, r.reason) for r in report)["0"]
    with torch.no_grad():
        a, b = fused(x), split(x)
        res = torch.randn(2, 32, 4, 4, generator=g)
        ra, rb = fused[0](x, residual=res), split[0](x, residual=res)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rb, ra, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(a).all()
