"""Models train under bf16 autocast: every op takes the bf16 tensors autocast hands it and computes in fp32."""

import pytest
import torch

from bevdeploy.engine.model_io import example_inputs
from bevdeploy.models import MODELS
from bevdeploy.ops.grid_sample import grid_sample
from bevdeploy.ops.msda import msda
from tests.engine.test_engine import TINY
from tests.engine.test_engine_bevdet import SMALL as BEVDET



def test_bf16_op_call_equals_float32_call(ops_on_references):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 9, generator=g)
    grid = torch.rand(2, 5, 4, 2, generator=g) * 2 - 1
    got = grid_sample(x.bfloat16(), grid.bfloat16())
    want = grid_sample(x.bfloat16().float(), grid.bfloat16().float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    value = torch.randn(1, 12, 2, 4, generator=g)
    loc = torch.rand(1, 5, 2, 1, 3, 2, generator=g)
    w = torch.rand(1, 5, 2, 1, 3, generator=g)
    out = msda(value.bfloat16(), [(3, 4)], loc.bfloat16(), w.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("name, overrides", [("bevformer-tiny", TINY), ("bevdet-r50-cbgs", BEVDET)])
def test_model_trains_under_bf16_autocast(name, overrides, ops_on_references):
    torch.manual_seed(0)
    model = MODELS[name](**overrides).train()
    inputs = example_inputs(model, 1, torch.float32, torch.device("cpu"))
    inputs["image"].normal_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs)
    loss = sum(v.float().square().mean() for v in out.values())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
