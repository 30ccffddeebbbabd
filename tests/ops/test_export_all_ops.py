"""Every op inside one exported program: export keeps each op as one node, the program survives
save/load, and runs the same as eager (also through torch.compile)."""

import io

import pytest
import torch

from tests._allops import AllOps, all_ops_inputs
from tests._utils import assert_rel_close

OP_NAMES = ["grid_sample", "msda", "msda_fused", "modulated_deform_conv2d", "rotate", "inverse", "bev_pool_v2", "flash_attention"]


def _bevdeploy_nodes(ep):
    return [n.target.name() for n in ep.graph.nodes if n.op == "call_function" and "bevdeploy" in str(n.target)]


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_export_save_load_run(device, variant):
    module = AllOps(variant).to(device)
    inputs = tuple(t.to(device) for t in all_ops_inputs(variant))
    with torch.no_grad():
        eager = module(*inputs)
        ep = torch.export.export(module, inputs)
    nodes = _bevdeploy_nodes(ep)
    assert sorted(nodes) == sorted(f"bevdeploy::{n}" for n in OP_NAMES), nodes
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    with torch.no_grad():
        outs = loaded.module()(*inputs)
    for name, a, b in zip(OP_NAMES, outs, eager):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_rel_close(a, b.float(), 1e-6, name)


@pytest.mark.slow
def test_compile_exported_program(device):
    module = AllOps("fp16").to(device)
    inputs = tuple(t.to(device) for t in all_ops_inputs("fp16"))
    with torch.no_grad():
        eager = module(*inputs)
        compiled = torch.compile(torch.export.export(module, inputs).module())
        outs = compiled(*inputs)
    for name, a, b in zip(OP_NAMES, outs, eager):
        assert_rel_close(a, b.float(), 1e-3, name)
