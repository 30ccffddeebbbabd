"""Per-layer sensitivity: the layer whose int8 version hurts most ranks first; the model is restored."""

import pytest
import torch
from torch import nn

from bevdeploy.quant.sensitivity import format_report, sensitivity_report, sqnr_db


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc_good = nn.Linear(8, 8)
        self.fc_bad = nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        return {"out": self.fc_bad(self.fc_good(y))}


@pytest.fixture
def net_and_inputs(ops_on_references):
    torch.manual_seed(0)
    net = Net().eval()
    inputs = [{"x": torch.randn(2, 8, 5, 7)} for _ in range(2)]
    amax = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: amax.__setitem__(n, max(amax.get(n, 0.0), a[0].abs().max().item())))
             for n, m in net.named_children()]
    with torch.no_grad():
        for x in inputs:
            net(**x)
    for h in hooks:
        h.remove()
    scales = {n: a / 127 for n, a in amax.items()}
    scales["fc_bad"] *= 40  # a badly calibrated layer: its int8 version clips hard
    return net, inputs, scales


def test_worst_layer_first_and_model_restored(net_and_inputs):
    net, inputs, scales = net_and_inputs
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = sensitivity_report(net, scales, inputs)
    assert [r.layer for r in report][0] == "fc_bad"
    assert {r.layer for r in report} == {"conv", "fc_good", "fc_bad"}
    assert report[0].sqnr_db < report[-1].sqnr_db and report[-1].sqnr_db > 25  # well-calibrated layers stay close
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in net.children())  # originals back in place
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert "fc_bad" in format_report(report)


def test_errors_name_the_problem(net_and_inputs):
    net, inputs, scales = net_and_inputs
    with pytest.raises(ValueError, match="at least one input"):
        sensitivity_report(net, scales, [])
    with pytest.raises(ValueError, match="nope"):
        sensitivity_report(net, scales, inputs, layers=["nope"])


def test_sqnr_db():
    x = torch.ones(10)
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(x, x * 1.1) == pytest.approx(20.0, abs=1e-4)  # 1.1 is not exact in float32
