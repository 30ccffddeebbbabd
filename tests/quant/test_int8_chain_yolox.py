"""The int8 chain through YOLOX (``chain_int8`` on a reduced YOLOX-x: deepen 0.33, widen 0.125).

What is compared and why the floors hold:

* chained vs un-chained int8 with the SAME input scales and ``int8_identity=False``: the chain only
  moves the re-quantization of a value the un-chained model quantizes anyway into the producer's
  epilogue (``round(y * fp32(1/s))`` instead of ``round(y / s)``: equal except within an fp32 ulp of a
  .5 tie), concatenation / max-pool / nearest upsampling of codes are exact, and SiLU + identity are
  fused in fp32 where the un-chained model adds in fp32 too. Measured: bit-identical outputs (inf dB);
  asserted >= 60 dB so a rare tie flip does not fail it.
* chained (``int8_identity=True``, the build's default) vs un-chained with each layer's own scales:
  the identity of the 7 residual blocks is added as int8 codes (one more rounding than the un-chained
  float add) and readers of one tensor share the largest of their scales. Measured 47-54 dB; floor 35.
* either int8 model vs the float model: measured 42-48 dB; floor 30.
"""

import copy

import pytest
import torch
from torch import nn

from bevdeploy.quant.sensitivity import sqnr_db
from tests._utils import randomize_batchnorms

SMALL = dict(deepen_factor=0.33, widen_factor=0.125)
CHAIN_EXACT_SQNR_DB = 60.0
CHAIN_VS_UNCHAINED_SQNR_DB = 35.0
INT8_VS_FLOAT_SQNR_DB = 30.0
#: the head's 1x1 predictors (3 levels x cls / reg / obj) write the float outputs
PREDICTORS = {f"bbox_head.multi_level_conv_{k}.{i}" for k in ("cls", "reg", "obj") for i in range(3)}


def _model(size: int):
    """Reduced YOLOX, BN folded, with non-trivial BN statistics (so the folded biases matter) and zero
    predictor biases (else the -4.6 prior dominates the outputs and every SQNR is trivially high)."""
    from bevdeploy.engine.deploy import fold_batchnorms
    from bevdeploy.models import MODELS

    torch.manual_seed(0)
    model = MODELS["yolox-x"](**SMALL, image_size=(size, size)).eval()
    randomize_batchnorms(model)
    for name in ("multi_level_conv_cls", "multi_level_conv_obj"):
        for conv in getattr(model.bbox_head, name):
            conv.bias.data.zero_()
    fold_batchnorms(model)
    return model


def _int8(model, scales, *, chain=None):
    from bevdeploy.engine.model_io import image_input_convs
    from bevdeploy.quant.chain import chain_int8
    from bevdeploy.quant.modules import quantize_modules

    q = copy.deepcopy(model)
    quantize_modules(q, scales, keep_float=set(image_input_convs(q)), out_dtype=torch.float32)
    writers = chain_int8(q, int8_identity=chain) if chain is not None else None
    return q, writers


def _calibrated(size: int, batch: int):
    from bevdeploy.quant.calibrate import calibrate

    model = _model(size)
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 4 - 2
    table = calibrate(model, lambda m: m(x), "minmax")
    return model, x, {n: table.scale(n) for n in table.amax}


def test_yolox_chain_structure_and_accuracy(ops_on_references):
    from bevdeploy.quant.chain import Int8DarknetBottleneck, Int8SPPBottleneck, Int8YOLOXPAFPN
    from bevdeploy.quant.modules import QuantConv2d

    model, x, scales = _calibrated(64, 2)
    plain, _ = _int8(model, scales)
    chained, writers = _int8(model, scales, chain=True)
    convs = [n for n, m in chained.named_modules() if isinstance(m, QuantConv2d)]
    assert len(convs) == 82  # every conv but the Focus stem's
    # everything writes int8 but the predictors, whose outputs leave the model
    assert set(writers) == set(convs) - PREDICTORS and len(writers) == 73
    assert isinstance(chained.neck, Int8YOLOXPAFPN)
    assert isinstance(chained.backbone.stage4[1], Int8SPPBottleneck)
    blocks = [m for m in chained.modules() if isinstance(m, Int8DarknetBottleneck)]
    assert len(blocks) == 12 and sum(b.add_identity for b in blocks) == 7  # stage4 and the neck: no shortcut
    for b in blocks:
        assert b.conv2.conv.residual_after_act == b.add_identity
        if b.add_identity:
            assert b.in_scale is not None  # the identity is read as int8 codes
    g = chained.get_submodule
    # kinds of edges, each writing at its reader's input scale
    edges = {
        "bottleneck conv1 -> conv2": ("backbone.stage2.1.blocks.0.conv1.conv",
                                      ["backbone.stage2.1.blocks.0.conv2.conv"]),
        "bottleneck (+identity) -> next bottleneck": ("backbone.stage2.1.blocks.0.conv2.conv",
                                                      ["backbone.stage2.1.blocks.1.conv1.conv"]),
        "last bottleneck (+identity) -> final_conv": ("backbone.stage2.1.blocks.2.conv2.conv",
                                                      ["backbone.stage2.1.final_conv.conv"]),
        "CSP short -> final_conv (concat)": ("backbone.stage2.1.short_conv.conv",
                                             ["backbone.stage2.1.final_conv.conv"]),
        "downsample -> CSP main + short": ("backbone.stage2.0.conv", ["backbone.stage2.1.main_conv.conv",
                                                                      "backbone.stage2.1.short_conv.conv"]),
        "SPP conv1 -> pools -> conv2": ("backbone.stage4.1.conv1.conv", ["backbone.stage4.1.conv2.conv"]),
        "head tower": ("bbox_head.multi_level_cls_convs.0.0.conv", ["bbox_head.multi_level_cls_convs.0.1.conv"]),
        "reg tower -> reg + obj": ("bbox_head.multi_level_reg_convs.1.1.conv", ["bbox_head.multi_level_conv_reg.1",
                                                                                "bbox_head.multi_level_conv_obj.1"]),
        "neck out -> cls + reg towers": ("neck.out_convs.2.conv", ["bbox_head.multi_level_cls_convs.2.0.conv",
                                                                   "bbox_head.multi_level_reg_convs.2.0.conv"]),
    }
    for kind, (producer, readers) in edges.items():
        assert all(g(producer).out_scale == g(r).input_scale for r in readers), kind
    # the next block's identity: the same codes, added after its conv2's SiLU at their scale
    assert g("backbone.stage2.1.blocks.1").in_scale == g("backbone.stage2.1.blocks.0.conv2.conv").out_scale
    # a PAFPN concat group: the reduce conv (upsampled), backbone level c4 and the second downsample
    # share one scale with all their readers (td0, bu1 and stage4's first conv)
    group = ["neck.reduce_layers.0.conv", "backbone.stage3.1.final_conv.conv", "neck.downsamples.1.conv"]
    readers = ["neck.top_down_blocks.0.main_conv.conv", "neck.top_down_blocks.0.short_conv.conv",
               "neck.bottom_up_blocks.1.main_conv.conv", "neck.bottom_up_blocks.1.short_conv.conv",
               "backbone.stage4.0.conv"]
    assert len({g(n).out_scale for n in group} | {g(n).input_scale for n in readers}) == 1
    assert chained.state_dict().keys() == plain.state_dict().keys()
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0].dtype, out.dtype)))
             for name, m in chained.named_modules() if isinstance(m, QuantConv2d)]
    with torch.no_grad():
        out_c, out_p, ref = chained(x), plain(x), model(x)
    for h in hooks:
        h.remove()
    assert {n for n, (i, _) in seen.items() if i != torch.int8} == {"backbone.stage1.0.conv"}  # reads the float stem
    assert {n for n, (_, o) in seen.items() if o == torch.int8} == set(writers)
    for k in ref:
        assert torch.isfinite(out_c[k]).all()
        assert sqnr_db(out_p[k], out_c[k]) > CHAIN_VS_UNCHAINED_SQNR_DB, k
        assert sqnr_db(ref[k], out_c[k]) > INT8_VS_FLOAT_SQNR_DB, k
        assert sqnr_db(ref[k], out_p[k]) > INT8_VS_FLOAT_SQNR_DB, k


def test_yolox_chain_float_identity_equals_unchained(ops_on_references):
    """Same input scales, identity float: the chain changes where codes are rounded, not their values."""
    from bevdeploy.quant.modules import QuantConv2d

    model, x, scales = _calibrated(64, 2)
    chained, writers = _int8(model, scales, chain=False)
    assert len(writers) == 73 - 7  # the 7 identity blocks' inputs stay float (their identity reads them)
    shared = {n: m.input_scale for n, m in chained.named_modules() if isinstance(m, QuantConv2d)}
    plain, _ = _int8(model, {**scales, **shared})
    with torch.no_grad():
        out_c, out_p = chained(x), plain(x)
    for k in out_c:
        assert sqnr_db(out_p[k], out_c[k]) > CHAIN_EXACT_SQNR_DB, k


@pytest.mark.parametrize("smoothed", [False, True])
def test_yolox_chain_on_the_kernels(device, monkeypatch, smoothed):
    """The chained model on the Triton kernels (interpreter on CPU) against the same model on the torch
    references: the kernels' epilogues (SiLU, identity after it, requantization; smoothed: the folded
    divisors and the identities multiplied back) agree with the references up to rare tie flips (measured
    identical)."""
    if smoothed:
        _, model, _, x, scales = _smoothed(32, 1)
    else:
        model, x, scales = _calibrated(32, 1)
    chained, _ = _int8(model.to(device), scales, chain=True)
    assert (sum(getattr(m, "out_mul", None) is not None for m in chained.modules()) > 30) == smoothed
    with torch.no_grad():
        out = chained(x.to(device))
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors now take the references
        want = chained.cpu()(x)
    for k in want:
        assert sqnr_db(want[k], out[k].cpu()) > CHAIN_EXACT_SQNR_DB, k


def _smoothed(size: int, batch: int):
    """The reduced YOLOX with every int8 conv smoothed (alpha 0.5, as ``build(smooth_alpha=0.5)``), calibrated."""
    from bevdeploy.engine.model_io import image_input_convs
    from bevdeploy.quant.calibrate import calibrate
    from bevdeploy.quant.chain import smoothing_ties
    from bevdeploy.quant.smooth import input_channel_ranges, smooth_inputs

    model = _model(size)
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 4 - 2
    stem = set(image_input_convs(model))
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n not in stem]
    ranges = input_channel_ranges(model, lambda m: m(x), layers)
    smoothed = copy.deepcopy(model)
    smooth_inputs(smoothed, ranges, alpha=0.5, ties=smoothing_ties(model))
    table = calibrate(smoothed, lambda m: m(x), "minmax")
    return model, smoothed, ranges, x, {n: table.scale(n) for n in table.amax}


#: the smoothed reader whose divisor stays a float multiply: the float stem's (every other producer is an int8 conv;
#: the PAFPN's concatenations and the SPP's pooled copies are tied by smoothing_ties)
UNFOLDED = {"backbone.stage1.0.conv"}


def test_smoothed_yolox_chain_folds_the_divisors_into_the_producers(ops_on_references):
    """Smoothing with the chain: readers of one tensor get one divisor (CSP main + short, the head's towers, reg +
    obj), and where every reader of a tensor reads it through that divisor (or as a residual block's identity)
    and its producers are int8 convs, the producers multiply their output channels by it in the epilogue
    (``out_mul``, split over a CSP concat), the readers' ChannelScale becomes an Identity and the block's conv2
    multiplies its identity back (``in_mul``): the tensor stays int8. Same function as the unfolded, unchained
    model up to rounding ties (the fold moves y * m / s into one fp32 epilogue; measured 54-61 dB)."""
    from bevdeploy.quant.chain import _is_smooth_wrapper
    from bevdeploy.quant.modules import QuantConv2d
    from bevdeploy.quant.smooth import ChannelScale

    model, smoothed, ranges, x, scales = _smoothed(64, 2)
    assert ["backbone.stage2.1.main_conv.conv", "backbone.stage2.1.short_conv.conv"] in ranges.shared
    assert ["bbox_head.multi_level_conv_reg.1", "bbox_head.multi_level_conv_obj.1"] in ranges.shared
    assert ["bbox_head.multi_level_cls_convs.0.0.conv", "bbox_head.multi_level_reg_convs.0.0.conv"] in ranges.shared
    g = smoothed.get_submodule
    assert torch.equal(g("backbone.stage2.1.main_conv.conv")[0].inv, g("backbone.stage2.1.short_conv.conv")[0].inv)
    with torch.no_grad():
        ref, same = model(x), smoothed(x)
    for k in ref:
        assert sqnr_db(ref[k], same[k]) > 100, k  # smoothing alone keeps the float function
    chained, writers = _int8(smoothed, scales, chain=False)
    wrappers = {n.removesuffix(".0"): m for n, m in chained.named_modules() if _is_smooth_wrapper(m)}
    assert len(wrappers) == 82
    assert {n for n, m in wrappers.items() if isinstance(m[0], ChannelScale)} == UNFOLDED
    c = chained.get_submodule
    blk = "backbone.stage2.1.blocks.0."
    assert torch.equal(c(blk + "conv1.conv.1").out_mul, g(blk + "conv2.conv")[0].inv)  # conv1 -> conv2
    divisor = g("backbone.stage2.1.blocks.1.conv1.conv")[0].inv  # block 0 -> block 1 (conv1 + identity)
    assert torch.equal(c(blk + "conv2.conv.1").out_mul, divisor)
    torch.testing.assert_close(c("backbone.stage2.1.blocks.1").in_mul * divisor, torch.ones_like(divisor))
    final = g("backbone.stage2.1.final_conv.conv")[0].inv  # the concat: the last block's channels, then short's
    main_out = c("backbone.stage2.1.blocks.2.conv2.conv.1")
    n_main = main_out.weight.shape[0]
    assert torch.equal(main_out.out_mul, final[:n_main])
    assert torch.equal(c("backbone.stage2.1.short_conv.conv.1").out_mul, final[n_main:])
    assert c("bbox_head.multi_level_reg_convs.1.1.conv.1").out_mul is not None  # reg tower -> reg + obj
    assert c("backbone.stage2.1.blocks.0.conv2.conv.1").out_scale is None  # int8_identity=False: a float input
    assert c(blk + "conv1.conv.1").out_scale is not None and c("neck.out_convs.0.conv.1").out_scale is not None
    unfolded, _ = _int8(smoothed, scales)  # the multiplier travels with the state dict, as a zero point does
    layer = unfolded.get_submodule(blk + "conv1.conv.1")
    assert getattr(layer, "out_mul", None) is None
    layer.load_state_dict(c(blk + "conv1.conv.1").state_dict())
    assert torch.equal(layer.out_mul, c(blk + "conv1.conv.1").out_mul)
    # the ties: the PAFPN's reduce conv divides its channels once for both concatenations that read them, the
    # backbone level once for the top-down concat and the next stage, the SPP's conv1 once for its pooled copies
    td, bu = "neck.top_down_blocks.0.main_conv.conv", "neck.bottom_up_blocks.1.short_conv.conv"
    red = c("neck.reduce_layers.0.conv.1").out_mul
    n_down = c("neck.downsamples.1.conv.1").weight.shape[0]
    assert torch.equal(g(td)[0].inv[:red.numel()], red) and torch.equal(g(bu)[0].inv[n_down:], red)
    level = c("backbone.stage3.1.final_conv.conv.1").out_mul
    assert torch.equal(g(td)[0].inv[red.numel():], level)
    assert torch.equal(g("backbone.stage4.0.conv")[0].inv, level)
    spp = c("backbone.stage4.1.conv1.conv.1").out_mul
    assert torch.equal(g("backbone.stage4.1.conv2.conv")[0].inv, spp.repeat(4))
    # as many writers as unsmoothed: 73, 66 with float identities (the 7 identity blocks' inputs)
    assert len(writers) == 66
    _, identity_writers = _int8(smoothed, scales, chain=True)
    assert len(identity_writers) == 73
    shared = {n: m.input_scale for n, m in chained.named_modules() if isinstance(m, QuantConv2d)}
    plain, _ = _int8(smoothed, {**scales, **shared})
    with torch.no_grad():
        out_c, out_p = chained(x), plain(x)
    for k in ref:
        assert torch.isfinite(out_c[k]).all()
        assert sqnr_db(out_p[k], out_c[k]) > 45.0, k
        assert sqnr_db(ref[k], out_c[k]) > INT8_VS_FLOAT_SQNR_DB, k
