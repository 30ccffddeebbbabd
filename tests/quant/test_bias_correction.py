"""Empirical bias correction (bevdeploy.quant.bias_correction): each int8 layer's fake-quant form, with the
corrected bias, has the float layer's channel means on the calibration data; layers the int8 build keeps float
are untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bevdeploy.quant.bias_correction import correct_biases
from bevdeploy.quant.qat import QATConv2d, QATLinear


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 8, 1, bias=False), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(2), nn.Linear(36, 5)).eval()


def _data():
    g = torch.Generator().manual_seed(1)
    # one-sided, long-tailed inputs: clipping them at a low threshold moves the means, as a percentile scale does
    return [torch.randn(4, 4, 6, 6, generator=g).exp() for _ in range(3)]


def _scales(net, data, clip=0.3):
    """Per layer: the input's max times ``clip`` / 127 (a clipping threshold, so the rounding has a mean)."""
    amax = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: amax.__setitem__(n, max(amax.get(n, 0.0),
                                                                                  float(a[0].abs().max()))))
             for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for x in data:
            net(x)
    for h in hooks:
        h.remove()
    return {n: a * clip / 127 for n, a in amax.items()}


def _means(layer, inputs):
    out = torch.cat([layer(x).detach().transpose(0, 1).reshape(layer(x).shape[1], -1) if x.dim() == 4
                     else layer(x).detach().reshape(-1, layer(x).shape[-1]).t() for x in inputs], dim=1)
    return out.double().mean(dim=1)


def test_corrected_fake_quant_layers_have_the_float_layers_means():
    net, data = _net(), _data()
    scales = _scales(net, data)
    inputs = {n: [] for n in ("0", "2", "6")}
    hooks = [net.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].clone()))
             for n in inputs]
    with torch.no_grad():
        for x in data:
            net(x)
    for h in hooks:
        h.remove()
    want = {n: _means(net.get_submodule(n), inputs[n]) for n in inputs}
    before = {n: _means(_twin(net.get_submodule(n), scales[n]), inputs[n]) for n in inputs}
    grouped = net[4].weight.clone(), net[4].bias.clone()

    report = correct_biases(net, lambda m: [m(x) for x in data], scales)

    # the grouped conv stays float in the int8 build: not corrected; the others are, the bias-less one gets a bias
    assert set(report) == {"0", "2", "6"} and all(v > 0 for v in report.values())
    assert torch.equal(net[4].weight, grouped[0]) and torch.equal(net[4].bias, grouped[1])
    assert net[2].bias is not None and net[2].bias.shape == (8,)
    for n in inputs:
        got = _means(_twin(net.get_submodule(n), scales[n]), inputs[n])
        error_before = float((before[n] - want[n]).abs().max())
        assert error_before > 1e-3, n  # the clipping did move the means: the test can fail
        # the float layer's means at its original bias: what the corrected int8 layer now matches
        assert float((got - want[n]).abs().max()) < 1e-4 * max(1.0, float(want[n].abs().max())), n


def _twin(layer, scale):
    return (QATConv2d if isinstance(layer, nn.Conv2d) else QATLinear).from_float(layer, scale).eval()


def test_keep_float_and_scope_leave_layers_alone():
    net, data = _net(), _data()
    scales = _scales(net, data)
    b0 = net[0].bias.clone()
    report = correct_biases(net, lambda m: [m(x) for x in data], scales, keep_float=["0"], scope=("2",))
    assert set(report) == {"2"} and torch.equal(net[0].bias, b0) and net[6].bias is not None


def test_no_layer_selected_is_a_clear_error():
    net, data = _net(), _data()
    with pytest.raises(ValueError, match="no layer selected"):
        correct_biases(net, lambda m: [m(x) for x in data], {})
