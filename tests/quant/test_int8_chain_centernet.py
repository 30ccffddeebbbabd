"""The int8 chain through CenterNet's ResNet-18 (BasicBlocks within and across stages).

Chained vs un-chained int8 with the same scales differ only where a block's identity is added as int8
codes (one more rounding than the float add) and where readers share the larger of their scales, so
the outputs agree closely; both stay near the float model."""

import copy

import torch

from bevdeploy.quant.sensitivity import sqnr_db
from tests._utils import randomize_batchnorms

CHAIN_VS_UNCHAINED_SQNR_DB = 30.0
INT8_VS_FLOAT_SQNR_DB = 25.0


def _model():
    from bevdeploy.engine.deploy import fold_batchnorms
    from bevdeploy.models import MODELS

    torch.manual_seed(0)
    model = MODELS["centernet-r18-dcn"](image_size=(64, 64)).eval()
    randomize_batchnorms(model)  # non-trivial folded biases
    model.bbox_head.heatmap_head[-1].bias.data.zero_()  # else the -2.19 prior dominates the heatmap SQNR
    fold_batchnorms(model)
    return model


def test_centernet_resnet18_chains_within_and_across_stages(ops_on_references):
    from bevdeploy.engine.model_io import image_input_convs
    from bevdeploy.quant.calibrate import calibrate
    from bevdeploy.quant.chain import Int8BasicBlock, chain_int8
    from bevdeploy.quant.modules import quantize_modules

    model = _model()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 4 - 2
    table = calibrate(model, lambda m: m(x), "minmax")
    scales = {n: table.scale(n) for n in table.amax if n.startswith("backbone")}
    plain = copy.deepcopy(model)
    quantize_modules(plain, scales, keep_float=set(image_input_convs(plain)), out_dtype=torch.float32)
    chained = copy.deepcopy(plain)
    writers = chain_int8(chained)
    blocks = [m for m in chained.backbone.modules() if isinstance(m, Int8BasicBlock)]
    assert len(blocks) == 8
    # every backbone conv writes int8 but layer4's last (its output goes to the float DCN neck) and the
    # float stem; the projections (downsample convs) are read by the block epilogue as int8 residuals
    backbone_writers = [n for n in writers if n.startswith("backbone")]
    assert "backbone.layer4.1.conv2" not in backbone_writers
    assert {"backbone.layer1.1.conv2", "backbone.layer2.0.conv1", "backbone.layer3.1.conv2"} <= set(backbone_writers)
    g = chained.get_submodule
    # stage to stage: layer1's last conv writes at layer2's first block input scale
    assert g("backbone.layer1.1.conv2").out_scale == g("backbone.layer2.0").in_scale is not None
    # measured on the backbone's C5 (float: layer4's last conv reads int8 and writes float), where the
    # int8 error is not diluted by the float neck and the heads' biases
    with torch.no_grad():
        c5_c, c5_p, c5 = chained.backbone(x), plain.backbone(x), model.backbone(x)
        out = chained(x)
    assert c5_c.dtype == torch.float32 and all(torch.isfinite(v).all() for v in out.values())
    assert sqnr_db(c5_p, c5_c) > CHAIN_VS_UNCHAINED_SQNR_DB
    assert sqnr_db(c5, c5_c) > INT8_VS_FLOAT_SQNR_DB
    assert sqnr_db(c5, c5_p) > INT8_VS_FLOAT_SQNR_DB
