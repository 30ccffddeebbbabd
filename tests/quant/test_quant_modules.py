"""Conversion: fold_bn exact, QuantLinear / QuantConv2d against their float layers by SQNR, the in-place
swap with its report, state dicts, and torch.export of converted models.

SQNR floor: 30 dB for one layer (8-bit minmax-calibrated Gaussian inputs and per-channel weights give
~40 dB; the fp16 output adds nothing measurable); 30 dB too for the CNN with three int8 layers (~60 dB
measured: its mean-pooled head averages the noise)."""

import io
import math

import pytest
import torch
from torch import nn

from bevdeploy.quant.modules import (
    LayerReport,
    QuantConv2d,
    QuantLinear,
    fold_bn,
    format_report,
    quantize_modules,
    quantize_weight_per_channel,
)
from tests._utils import assert_rel_close

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - out|^2) in dB, computed in float64."""
    ref64, out64 = ref.detach().double().cpu(), out.detach().double().cpu()
    noise = (ref64 - out64).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref64.pow(2).sum().item() / noise)


def _minmax_scale(x: torch.Tensor) -> float:
    return x.detach().abs().max().item() / 127.0


# ---------------------------------------------------------------------------------------------- fold_bn


def _random_bn(c):
    bn = nn.BatchNorm2d(c).double().eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.1, 3)
    return bn


@pytest.mark.parametrize("bias,groups,stride", [(True, 1, 1), (False, 1, 2), (False, 2, 1)])
def test_fold_bn_exact(bias, groups, stride):
    conv = nn.Conv2d(6, 10, 3, stride=stride, padding=1, groups=groups, bias=bias).double().eval()
    bn = _random_bn(10)
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    folded = fold_bn(conv, bn)
    assert folded.bias is not None and folded.groups == groups and folded.stride == conv.stride
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(conv(x)), rtol=1e-12, atol=1e-12)


def test_fold_bn_checks():
    with pytest.raises(ValueError, match="num_features must equal conv.out_channels=4"):
        fold_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5))
    with pytest.raises(TypeError, match="fold_bn takes"):
        fold_bn(nn.Linear(3, 4), nn.BatchNorm2d(4))


# ---------------------------------------------------------------------------------------------- modules


def test_quantize_weight_per_channel():
    w = torch.randn(5, 3, 2, 2)
    w[2] = 0  # an all-zero channel gets scale 1, codes 0
    q, s = quantize_weight_per_channel(w)
    assert q.dtype == torch.int8 and s.shape == (5,) and s[2] == 1 and (q[2] == 0).all()
    assert q.abs().amax(dim=(1, 2, 3)).tolist() == [127, 127, 0, 127, 127]
    assert (q.float() * s[:, None, None, None] - w).abs().max() <= s.max() / 2 + 1e-7


@pytest.mark.parametrize("activation", ["none", "relu"])
def test_quant_linear_sqnr(device, activation):
    lin = nn.Linear(45, 19).to(device)
    x = torch.randn(3, 37, 45, device=device)
    q = QuantLinear.from_float(lin, _minmax_scale(x), activation)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (19, 45) and q.bias.dtype == torch.float32
    out = q(x)
    ref = lin(x.double().float())
    ref = torch.relu(ref) if activation == "relu" else ref
    assert out.dtype == torch.float16 and out.shape == (3, 37, 19)
    assert sqnr(ref, out) >= 30


@pytest.mark.parametrize(
    "kwargs,out_dtype",
    [
        (dict(kernel_size=3, stride=2, padding=1), torch.float16),
        (dict(kernel_size=(3, 1), padding="same", dilation=2, bias=False), torch.float32),
        (dict(kernel_size=1), torch.float16),
    ],
)
def test_quant_conv2d_sqnr(device, kwargs, out_dtype):
    conv = nn.Conv2d(5, 19, **kwargs).to(device)
    x = torch.randn(2, 5, 9, 11, device=device).contiguous(memory_format=torch.channels_last)
    q = QuantConv2d.from_float(conv, _minmax_scale(x), "relu", out_dtype=out_dtype)
    kh, kw = conv.kernel_size
    assert q.weight.shape == (19, kh, kw, 5) and q.weight.is_contiguous()
    out = q(x)
    assert out.dtype == out_dtype and out.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = torch.relu(conv(x))
    assert out.shape == ref.shape
    assert sqnr(ref, out) >= 30


def test_quant_conv2d_int8_input_and_residual(device):
    conv = nn.Conv2d(6, 8, 3, padding=1).to(device)
    x = torch.randn(1, 6, 5, 7, device=device).contiguous(memory_format=torch.channels_last)
    q = QuantConv2d.from_float(conv, _minmax_scale(x), "relu", out_dtype=torch.float32)
    r = torch.randn(1, 8, 5, 7, device=device)
    from bevdeploy.quant.int8_kernels import quantize_per_tensor

    a = q(x, residual=r)
    b = q(quantize_per_tensor(x, q.input_scale), residual=r)  # pre-quantized input: same codes, same result
    assert torch.equal(a, b)
    with torch.no_grad():
        assert sqnr(torch.relu(conv(x) + r), a) >= 30


def test_state_dict_round_trip_and_repr(device):
    conv = nn.Conv2d(4, 6, 3, padding=1).to(device)
    q = QuantConv2d.from_float(conv, 0.0123, "relu")
    sd = q.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias", "input_scale_tensor"}
    assert sd["input_scale_tensor"].dtype == torch.float64 and sd["input_scale_tensor"].item() == 0.0123
    fresh = QuantConv2d(4, 6, 3, padding=1, activation="relu", device=device)
    fresh.load_state_dict(sd)
    assert fresh.input_scale == 0.0123
    x = torch.randn(1, 4, 5, 5, device=device)
    assert torch.equal(fresh(x), q(x))
    fresh.input_scale = 0.5
    assert fresh.input_scale_tensor.item() == 0.5
    text = repr(q)
    assert "precision=int8" in text and "int8 x int8 -> int32" in text and "activation=relu" in text
    assert "precision=int8" in repr(QuantLinear(3, 4))


def test_from_float_unsupported():
    with pytest.raises(NotImplementedError, match="groups=2"):
        QuantConv2d.from_float(nn.Conv2d(4, 4, 3, groups=2), 0.1)
    with pytest.raises(NotImplementedError, match="padding_mode='reflect'"):
        QuantConv2d.from_float(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), 0.1)
    with pytest.raises(ValueError, match="input_scale must be a positive finite"):
        QuantLinear.from_float(nn.Linear(3, 4), -1.0)
    with pytest.raises(ValueError, match="activation must be one of"):
        QuantLinear.from_float(nn.Linear(3, 4), 0.1, "gelu")


# ---------------------------------------------------------------------------------------------- quantize_modules


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),  # 0: kept float
            nn.ReLU(),  # 1: not fused (its conv stays float)
            nn.Conv2d(8, 16, 3, stride=2, padding=1),  # 2: int8, ReLU at 4 fused across the Identity
            nn.Identity(),  # 3: where a folded BatchNorm was
            nn.ReLU(),  # 4
            nn.Conv2d(16, 16, 3, padding=1, groups=2),  # 5: grouped: stays float
            nn.Conv2d(16, 16, 1),  # 6: int8 (1x1: the linear kernel)
        )
        self.head = nn.Linear(16, 10)  # int8
        self.aux = nn.Linear(16, 4)  # no calibrated scale: float

    def forward(self, x):
        f = self.features(x).float().mean((2, 3))
        return self.head(f).float() + self.aux(f)[:, :1]


def _calibrate(model, x):
    """A minimal minmax calibration: amax / 127 of each Linear / Conv2d input."""
    scales, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, name=name: scales.__setitem__(name, _minmax_scale(args[0]))))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return scales


def test_quantize_modules_small_cnn(device):
    torch.manual_seed(0)
    model = SmallCNN().to(device).eval()
    x = torch.randn(2, 3, 12, 10, device=device)
    with torch.no_grad():
        ref = model(x)
    scales = _calibrate(model, x)
    del scales["aux"]
    report = quantize_modules(model, scales, keep_float={"features.0"}, out_dtype=torch.float32)
    assert [(r.name, r.precision) for r in report] == [
        ("features.0", "float"), ("features.2", "int8"), ("features.4", "fused"), ("features.5", "float"),
        ("features.6", "int8"), ("head", "int8"), ("aux", "float")]
    reasons = {r.name: r.reason for r in report}
    assert reasons["features.0"] == "kept float (keep_float)" and "groups=2" in reasons["features.5"]
    assert reasons["aux"] == "no calibrated input scale" and "relu fused" in reasons["features.2"]
    assert all(isinstance(r, LayerReport) for r in report)
    f = model.features
    assert type(f[0]) is nn.Conv2d and type(f[1]) is nn.ReLU and type(f[5]) is nn.Conv2d
    assert isinstance(f[2], QuantConv2d) and f[2].activation == "relu" and type(f[4]) is nn.Identity
    assert isinstance(f[6], QuantConv2d) and f[6].activation == "none"
    assert isinstance(model.head, QuantLinear) and type(model.aux) is nn.Linear
    with torch.no_grad():
        out = model(x)
    assert sqnr(ref, out) >= 30
    assert "3 int8, 3 float" in format_report(report)


def test_quantize_modules_leaves_subclasses_alone(device):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.ffn = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

        def forward(self, x):
            return self.ffn(self.attn(x, x, x, need_weights=False)[0]).float()

    model = Block().to(device).eval()
    x = torch.randn(2, 5, 8, device=device)
    report = quantize_modules(model, {"attn.out_proj": 0.1, "ffn.0": 0.05, "ffn.2": 0.05})
    assert [(r.name, r.precision) for r in report] == [
        ("attn.out_proj", "float"), ("ffn.0", "int8"), ("ffn.1", "fused"), ("ffn.2", "int8")]
    assert "subclass" in report[0].reason and type(model.attn.out_proj) is not QuantLinear
    with torch.no_grad():
        assert model(x).shape == (2, 5, 8)


def test_quantize_modules_no_fusion_and_checks():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    report = quantize_modules(model, {"0": 0.1, "2": 0.1}, fuse_relu=False)
    assert [r.precision for r in report] == ["int8", "int8"] and type(model[1]) is nn.ReLU
    assert model[0].activation == "none"
    with pytest.raises(ValueError, match="keep_float names no module"):
        quantize_modules(nn.Sequential(nn.Linear(2, 2)), {"0": 0.1}, keep_float={"nope"})
    with pytest.raises(ValueError, match=r"scales\['0'\] must be a positive finite"):
        quantize_modules(nn.Sequential(nn.Linear(2, 2)), {"0": 0.0})


# ---------------------------------------------------------------------------------------------- export


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        f = self.body(x)
        return self.head(f.float().mean((2, 3)))


def _bevdeploy_nodes(ep):
    return [n.target.name() for n in ep.graph.nodes if n.op == "call_function" and "bevdeploy" in str(n.target)]


def test_export_save_load_run(device):
    model = _Tiny().to(device).eval()
    x = torch.randn(1, 3, 6, 5, device=device).contiguous(memory_format=torch.channels_last)
    quantize_modules(model, _calibrate(model, x))
    with torch.no_grad():
        eager = model(x)
        ep = torch.export.export(model, (x,))
    assert sorted(_bevdeploy_nodes(ep)) == sorted(
        ["bevdeploy::quantize_per_tensor"] * 3 + ["bevdeploy::int8_conv2d"] * 2 + ["bevdeploy::int8_linear"])
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    with torch.no_grad():
        out = loaded.module()(x)
    assert out.dtype == eager.dtype
    assert_rel_close(out, eager.float(), 1e-6)


@pytest.mark.slow
def test_compile_exported_program(device):
    # The engine's run path: torch.compile of the loaded program, under no_grad (~20 s on the CPU).
    model = _Tiny().to(device).eval()
    x = torch.randn(1, 3, 6, 5, device=device).contiguous(memory_format=torch.channels_last)
    quantize_modules(model, _calibrate(model, x))
    with torch.no_grad():
        eager = model(x)
        out = torch.compile(torch.export.export(model, (x,)).module())(x)
    assert_rel_close(out, eager.float(), 1e-6)
