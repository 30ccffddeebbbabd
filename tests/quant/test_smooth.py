"""Per-input-channel smoothing (SmoothQuant): the float function is unchanged, the int8 error drops on
inputs whose channels differ in scale, and bad arguments are refused."""

import pytest
import torch
from torch import nn

from bevdeploy.quant.modules import quantize_modules
from bevdeploy.quant.sensitivity import sqnr_db
from bevdeploy.quant.smooth import ChannelScale, input_channel_ranges, smooth_inputs


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(7, 12, 3, padding=1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        y = self.dw(self.conv(x))
        return self.fc(y.mean((2, 3)))


def _inputs(n=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 7, 9, 11, generator=g)
    x[:, :2] *= 60.0  # two loud channels next to five quiet ones: per-tensor int8 starves the quiet ones
    return x


def test_smoothing_keeps_the_float_function_and_records_per_channel_ranges():
    torch.manual_seed(0)
    net, x = _Net().eval(), _inputs()
    ref = net(x)
    ranges = input_channel_ranges(net, lambda m: m(x), ["conv", "fc"])
    assert ranges["conv"].shape == (7,) and ranges["fc"].shape == (12,)
    assert torch.allclose(ranges["conv"], x.abs().amax((0, 2, 3)))
    names = smooth_inputs(net, ranges, alpha=0.5)
    assert names == ["conv.1", "fc.1"]
    assert isinstance(net.conv[0], ChannelScale) and isinstance(net.fc[0], ChannelScale)
    assert torch.allclose(net(x), ref, rtol=1e-5, atol=1e-5)
    scale = net.conv[0].inv
    assert scale.min() >= 1.0 - 1e-6  # m normalised to max 1: the smoothing only lifts channels


def test_smoothing_raises_the_int8_sqnr_of_a_conv_with_unequal_channels(ops_on_references):
    torch.manual_seed(0)
    net, x = _Net().eval(), _inputs()
    with torch.no_grad():
        net.conv.weight[:, 2:] *= 60.0  # the quiet channels matter as much to the output as the loud ones
    ref = net(x)

    def int8(model, names):
        hooks_in = {}
        hs = [model.get_submodule(n).register_forward_pre_hook(
            lambda mod, a, n=n: hooks_in.__setitem__(n, a[0].abs().max().item())) for n in names]
        model(x)
        for h in hs:
            h.remove()
        quantize_modules(model, {n: v / 127 for n, v in hooks_in.items()}, out_dtype=torch.float32)
        return model(x)

    import copy

    plain = sqnr_db(ref, int8(copy.deepcopy(net), ["conv"]))
    smoothed = copy.deepcopy(net)
    smooth_inputs(smoothed, input_channel_ranges(smoothed, lambda m: m(x), ["conv"]), alpha=0.5)
    smooth = sqnr_db(ref, int8(smoothed, ["conv.1"]))
    assert smooth > plain + 6.0, (plain, smooth)


def test_smoothing_refuses_what_it_cannot_smooth():
    net, x = _Net().eval(), _inputs()
    with pytest.raises(ValueError, match="cannot be smoothed"):
        input_channel_ranges(net, lambda m: m(x), ["dw"])
    with pytest.raises(ValueError, match="alpha"):
        smooth_inputs(net, {"conv": torch.ones(7)}, alpha=1.5)
    with pytest.raises(RuntimeError, match="never ran"):
        input_channel_ranges(net, lambda m: None, ["conv"])


def test_tied_slices_get_one_divisor_and_the_function_stays():
    """``ties``: one tensor read at different channel offsets (a concat read in two orders) and a layer reading a
    tensor twice (a copy beside it) get equal divisors on the tied channels, from their combined ranges."""
    torch.manual_seed(0)
    a = torch.randn(4, 3, 6, 6) * torch.tensor([1.0, 20.0, 0.1]).view(1, 3, 1, 1)
    b = torch.randn(4, 2, 6, 6)
    net = nn.ModuleDict({"ab": nn.Conv2d(5, 4, 1), "ba": nn.Conv2d(5, 4, 1), "aa": nn.Conv2d(6, 4, 1)})

    def run(m):
        return m["ab"](torch.cat([a, b], 1)), m["ba"](torch.cat([b, a], 1)), m["aa"](torch.cat([a, a], 1))

    ranges = input_channel_ranges(net, run, ["ab", "ba", "aa"])
    with torch.no_grad():
        want = run(net)
    ties = [[("ab", 0, 3), ("ba", 2, 5), ("aa", 0, 3), ("aa", 3, 6)], [("ab", 3, 5), ("ba", 0, 2)]]
    smooth_inputs(net, ranges, alpha=0.5, ties=ties)
    inv = {k: net[k][0].inv for k in ("ab", "ba", "aa")}
    assert torch.equal(inv["ab"][:3], inv["ba"][2:]) and torch.equal(inv["ab"][:3], inv["aa"][:3])
    assert torch.equal(inv["aa"][:3], inv["aa"][3:]) and torch.equal(inv["ab"][3:], inv["ba"][:2])
    assert inv["ab"][1] < inv["ab"][0] < inv["ab"][2]  # the wide channel divided most
    assert max(float((1 / v).max()) for v in inv.values()) == 1.0  # linked layers normalised together
    with torch.no_grad():
        for got, ref in zip(run(net), want):
            assert sqnr_db(ref, got) > 100
    fresh = nn.ModuleDict({"ab": nn.Conv2d(5, 4, 1), "ba": nn.Conv2d(5, 4, 1), "aa": nn.Conv2d(6, 4, 1)})
    with pytest.raises(ValueError, match=r"ba\[1:5\] is not a slice of its 5 input channels as long as the others"):
        smooth_inputs(fresh, input_channel_ranges(fresh, run, ["ab", "ba", "aa"]), ties=[[("ab", 0, 3), ("ba", 1, 5)]])
