"""``bevdeploy bench convs``: every distinct conv of the image backbones and necks, int8 vs cuDNN fp16.

Backbones: BEVDet-R50 (ResNet-50 + CustomFPN + depth net, 6 x 256 x 704), BEVFormer-small
(ResNet-101-DCN + 1-level FPN, 6 x 736 x 1280) and BEVFormer-base (ResNet-101-DCN + 4-level FPN,
6 x 928 x 1600), and the 2D detectors whole (YOLOX-x at 32 x 640 x 640, CenterNet-R18-DCN at
32 x 512 x 512). Each conv is taken as the int8 engine runs it: after ``quantize_modules`` and
``chain_int8`` (which convs read int8 / write int8, fuse ReLU and the residual, int8 or fp16
residual), found by one forward on the meta device. For every distinct (shape, epilogue):

* ours: ``int8_conv2d`` (int8 in, fused bias / residual / ReLU / requant epilogue) with the launch
  configuration the build-time autotune picks (the heuristic's time is listed too);
* cuDNN fp16 channels-last as eager PyTorch runs the same layer: ``F.conv2d`` with bias, then
  ``add_`` of the residual and ``relu_`` (separate kernels, as ``torch`` runs them without a
  compiler), ``torch.backends.cudnn.benchmark = True``;

both timed in the same run inside CUDA graphs (median of replays). Rows: shape, occurrences, us,
TOPS (2 * M * N * K / t), fp16 / int8 time ratio. Totals weight each row by its occurrences. Then
the whole backbone + neck module end to end, int8 chain (eager ops captured in one CUDA graph) vs
the BN-folded fp16 channels-last module (cuDNN, same capture); DCN layers run our fp16 DCN kernel
in both (they are not int8 convs), and so does the stem (cuDNN fp16: the int8 engine keeps it float). Results in
``<out>/<gpu>/convs.{json,md}`` (``--results-name`` for another stem).
"""

from __future__ import annotations

import copy
import datetime
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bevdeploy.eval.timing import gpu_dirname, time_cuda_graph

__all__ = ["BACKBONES", "ConvCall", "backbone_module", "conv_calls", "run", "to_markdown"]

#: name -> (model constructor key, image size and batch as the engine takes them: six cameras for the
#: BEV models, the tables' batch of 32 for the 2D detectors, whose whole network is the int8 scope)
BACKBONES = {
    "bevdet-r50": ("bevdet-r50-cbgs", (256, 704), 6),
    "bevformer-small": ("bevformer-small", (736, 1280), 6),
    "bevformer-base": ("bevformer-base", (928, 1600), 6),
    "yolox-x": ("yolox-x", (640, 640), 32),
    "centernet-r18-dcn": ("centernet-r18-dcn", (512, 512), 32),
}


class _BackboneNeck(nn.Module):
    """``img_backbone`` -> ``img_neck`` (-> BEVDet's depth net): the part of the model ``chain_int8``
    links, under the model's attribute names."""

    def __init__(self, backbone, neck, view_transformer=None) -> None:
        super().__init__()
        self.img_backbone, self.img_neck = backbone, neck
        if view_transformer is not None:
            self.img_view_transformer = view_transformer

    def forward(self, x):
        feats = self.img_neck(self.img_backbone(x))
        if hasattr(self, "img_view_transformer"):
            return self.img_view_transformer.depth_net(feats)
        return feats


def backbone_module(name: str) -> nn.Module:
    """The float backbone + neck (+ depth net) of ``name`` with random weights and BN folded; a 2D
    detector whole (backbone, neck and head: the maps its engine returns)."""
    from bevdeploy.engine.deploy import fold_batchnorms
    from bevdeploy.models import DET2D_MODELS, MODELS
    from bevdeploy.models.bevdet import BEVDET_CONFIGS, CustomFPN, LSSViewTransformer
    from bevdeploy.models.bevformer import BEVFORMER_CONFIGS
    from bevdeploy.models.fpn import FPN
    from bevdeploy.models.resnet import ResNet

    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {name!r}")
    key = BACKBONES[name][0]
    torch.manual_seed(0)
    if key in DET2D_MODELS:
        module = MODELS[key]()
    elif key.startswith("bevdet"):
        cfg = BEVDET_CONFIGS[key]
        backbone = ResNet(depth=cfg.depth, out_indices=cfg.out_indices, style=cfg.style)
        neck = CustomFPN(in_channels=cfg.fpn_in_channels, out_channels=cfg.fpn_out_channels, out_ids=(0,))
        vt = LSSViewTransformer(in_channels=cfg.fpn_out_channels, out_channels=cfg.bev_channels,
                                num_depth_bins=cfg.num_depth_bins, grid_size=cfg.grid_size)
        module = _BackboneNeck(backbone, neck, vt)
    else:
        cfg = BEVFORMER_CONFIGS[key]
        backbone = ResNet(depth=cfg.depth, out_indices=cfg.out_indices, style=cfg.style,
                          stage_with_dcn=cfg.stage_with_dcn)
        neck = FPN(in_channels=cfg.fpn_in_channels, out_channels=cfg.embed_dims, num_outs=cfg.num_levels,
                   start_level=0, add_extra_convs="on_output", relu_before_extra_convs=cfg.relu_before_extra_convs)
        module = _BackboneNeck(backbone, neck)
    module.eval()
    fold_batchnorms(module)
    return module


def _int8_module(float_module: nn.Module, scale: float = 0.02) -> nn.Module:
    """Every plain conv int8 but the stem (one placeholder input scale: timing does not depend on the
    values), chained, as the int8 engine builds it (the stem stays float: ``image_input_convs``)."""
    from bevdeploy.engine.model_io import image_input_convs, reads_camera_image
    from bevdeploy.models import YOLOX, CenterNet
    from bevdeploy.quant.chain import chain_int8
    from bevdeploy.quant.modules import quantize_modules

    m = copy.deepcopy(float_module).half()  # the float layers (DCN) in fp16, as an int8-fp16 engine
    stems = set(image_input_convs(m)) if isinstance(m, (YOLOX, CenterNet)) else set()
    names = {n: scale for n, c in m.named_modules()
             if type(c) is nn.Conv2d and not reads_camera_image(c) and n not in stems}
    quantize_modules(m, names, out_dtype=torch.float16)
    chain_int8(m)
    return m


@dataclass(frozen=True)
class ConvCall:
    """One int8 conv call as the chained engine makes it."""

    c: int
    o: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    in_shape: tuple[int, int, int, int]  # N, C, H, W
    bias: bool
    residual: str | None  # "int8", "fp16" or None
    activation: str
    int8_out: bool

    def out_hw(self) -> tuple[int, int]:
        from bevdeploy.quant.int8_kernels import _conv_out_size

        return tuple(_conv_out_size(*args) for args in
                     zip(self.in_shape[2:], self.kernel, self.stride, self.padding, self.dilation))

    def ops(self) -> float:
        """2 * M * N * K of the implicit GEMM."""
        ho, wo = self.out_hw()
        return 2.0 * self.in_shape[0] * ho * wo * self.o * self.c * self.kernel[0] * self.kernel[1]

    def min_bytes(self) -> int:
        """The least DRAM traffic of one call: the int8 input and weights read once, the output written
        once (int8 codes or fp16), the residual read once (int8 or fp16)."""
        n, c, h, w = self.in_shape
        ho, wo = self.out_hw()
        out = n * ho * wo * self.o
        res = {None: 0, "int8": 1, "fp16": 2}[self.residual]
        return n * c * h * w + self.o * c * self.kernel[0] * self.kernel[1] + out * (1 if self.int8_out else 2) + out * res

    def floor_us(self, peak_tops: float, peak_gbs: float) -> float:
        """Roofline time: the larger of the MMA time at ``peak_tops`` and the traffic time at ``peak_gbs``."""
        return max(self.ops() / (peak_tops * 1e12), self.min_bytes() / (peak_gbs * 1e9)) * 1e6

    def label(self) -> str:
        n, c, h, w = self.in_shape
        epi = "+".join(x for x in ("bias" if self.bias else "", f"res {self.residual}" if self.residual else "",
                                   self.activation if self.activation != "none" else "",
                                   "int8 out" if self.int8_out else "fp16 out") if x)
        return (f"{self.kernel[0]}x{self.kernel[1]} s{self.stride[0]} {c}->{self.o} @ {n}x{h}x{w} "
                f"({epi})")


def conv_calls(int8_module: nn.Module, image_size: tuple[int, int], batch: int) -> dict[ConvCall, list[str]]:
    """Distinct int8 conv calls of one forward (on the meta device: shapes only) -> layer names."""
    from bevdeploy.quant.modules import QuantConv2d

    found: dict[ConvCall, list[str]] = {}
    meta = copy.deepcopy(int8_module).to("meta")

    def hook(name):
        def fn(mod, args, kwargs, out):
            x = args[0]
            residual = kwargs.get("residual")
            call = ConvCall(mod.in_channels, mod.out_channels, tuple(mod.kernel_size), tuple(mod.stride),
                            tuple(mod.padding), tuple(mod.dilation), tuple(x.shape), mod.bias is not None,
                            None if residual is None else ("int8" if residual.dtype == torch.int8 else "fp16"),
                            mod.activation, mod.out_scale is not None)
            found.setdefault(call, []).append(name)
        return fn

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in meta.named_modules()
               if isinstance(m, QuantConv2d)]
    with torch.no_grad():
        meta(torch.empty(batch, 3, *image_size, device="meta", dtype=torch.float16))
    for h in handles:
        h.remove()
    return found


def measured_peaks() -> dict:
    """This GPU's rates in this run, the roofline the rows are held against: our int8 GEMM at 8192^3 with
    the configuration that measured 1164 TOPS on the H100 (``reference/h100-measured.md``), and the
    device copy bandwidth (a 1 GiB copy: bytes read + written per second)."""
    from bevdeploy.quant.int8_kernels import int8_linear

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    n = 8192
    a = torch.randint(-127, 128, (n, n), generator=g, device=dev, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, n), generator=g, device=dev, dtype=torch.int8)
    ws = torch.full((n,), 1e-4, device=dev)
    gemm_ms = time_cuda_graph(lambda: int8_linear(a, w, 0.01, ws, config=(128, 256, 128, 8, 8, 4)),
                              calls_per_graph=3, replays=10)
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ms = time_cuda_graph(lambda: dst.copy_(src), calls_per_graph=3, replays=10)
    return {"int8_tops": 2.0 * n**3 / (gemm_ms * 1e-3) / 1e12, "copy_gbs": 2.0 * src.numel() / (copy_ms * 1e-3) / 1e9}


def _time_call(call: ConvCall, max_candidates: int) -> dict:
    from bevdeploy.quant.autotune import layer_candidates, outputs_differ, tma_candidates, with_tma_candidates
    from bevdeploy.quant.int8_kernels import TMA, conv_runs_gemm_kernel, int8_conv2d

    dev = torch.device("cuda")
    n, c, h, w = call.in_shape
    kh, kw = call.kernel
    ho, wo = call.out_hw()
    cl = torch.channels_last
    g = torch.Generator(device=dev).manual_seed(0)
    x_q = torch.randint(-127, 128, (n, c, h, w), generator=g, device=dev, dtype=torch.int8).contiguous(memory_format=cl)
    w_q = torch.randint(-127, 128, (call.o, kh, kw, c), generator=g, device=dev, dtype=torch.int8)
    ws = torch.rand(call.o, generator=g, device=dev) * 1e-3 + 1e-4
    bias = torch.randn(call.o, generator=g, device=dev) if call.bias else None
    res_q = res16 = None
    if call.residual == "int8":
        res_q = torch.randint(-127, 128, (n, call.o, ho, wo), generator=g, device=dev,
                              dtype=torch.int8).contiguous(memory_format=cl)
    if call.residual:
        res16 = torch.randn(n, call.o, ho, wo, generator=g, device=dev, dtype=torch.float16).contiguous(memory_format=cl)
    residual = res_q if call.residual == "int8" else res16
    rs = 0.02 if call.residual == "int8" else None
    out_scale = 0.05 if call.int8_out else None

    def ours(cfg):
        return lambda: int8_conv2d(x_q, w_q, 0.02, ws, bias, call.stride, call.padding, call.dilation,
                                   residual=residual, residual_scale=rs, activation=call.activation,
                                   out_scale=out_scale, config=cfg)

    m = n * ho * wo
    results, first = [], None
    gemm = conv_runs_gemm_kernel(call.kernel, call.stride, call.padding)
    tma = [] if gemm else tma_candidates(call.in_shape, (ho, wo), call.o, call.stride, 0, dev)
    for cfg in with_tma_candidates(layer_candidates(m, call.o, c, dev, gemm), tma, max_candidates):
        try:
            out = ours(cfg)()
            first = out if first is None else first
            if problem := outputs_differ(out, first):
                print(f"  {call.label()}: config {cfg} left out: {problem}", file=sys.stderr)
                continue
            results.append((time_cuda_graph(ours(cfg), replays=15) * 1000, cfg))
        except Exception as e:  # noqa: BLE001  (a config that does not fit this GPU's shared memory)
            print(f"  {call.label()}: config {cfg} failed ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr)
    best_us, best = min(results)
    heuristic_us = results[0][0]
    no_tma = [r for r in results if not (len(r[1]) == 7 and r[1][6] == TMA)]
    tma_us = min((r for r in results if r not in no_tma), default=(None,))[0]

    x16 = torch.randn(n, c, h, w, generator=g, device=dev, dtype=torch.float16).contiguous(memory_format=cl)
    w16 = torch.randn(call.o, c, kh, kw, generator=g, device=dev, dtype=torch.float16).contiguous(memory_format=cl)
    b16 = bias.half() if bias is not None else None

    def cudnn():
        y = F.conv2d(x16, w16, b16, call.stride, call.padding, call.dilation)
        if res16 is not None:
            y = y.add_(res16)
        if call.activation == "relu":
            y = y.relu_()
        return y

    fp16_us = time_cuda_graph(cudnn, replays=15) * 1000
    ops = call.ops()
    return {"int8_us": best_us, "int8_heuristic_us": heuristic_us, "config": list(best), "fp16_us": fp16_us,
            "int8_tma_us": tma_us, "int8_no_tma_us": min(no_tma)[0] if no_tma else None,
            "int8_tops": ops / (best_us * 1e-6) / 1e12, "fp16_tflops": ops / (fp16_us * 1e-6) / 1e12,
            "ratio": fp16_us / best_us, "gop": ops / 1e9}


def _time_module(float_module: nn.Module, int8_module: nn.Module, image_size, batch: int) -> dict:
    from bevdeploy.quant.autotune import autotune_int8_layers

    dev = torch.device("cuda")
    cl = torch.channels_last
    x = torch.randn(batch, 3, *image_size, device=dev, dtype=torch.float16).contiguous(memory_format=cl)
    f16 = copy.deepcopy(float_module).half().to(dev).to(memory_format=cl)
    q = int8_module.to(dev)
    with torch.no_grad():
        autotune_int8_layers(q, (x,))
        fp16_ms = time_cuda_graph(lambda: f16(x), replays=15, calls_per_graph=3)
        int8_ms = time_cuda_graph(lambda: q(x), replays=15, calls_per_graph=3)
    return {"fp16_ms": fp16_ms, "int8_ms": int8_ms, "ratio": fp16_ms / int8_ms}


def run(backbones: list[str] | None = None, out_dir: str | Path = "bench/results", command: str = "",
        max_candidates: int = 4, end_to_end: bool = True, name: str = "convs") -> dict:
    """Benchmark the convs of ``backbones`` (default: all) on the current GPU; writes ``<name>.{json,md}``
    (another name keeps a run of some backbones from replacing the committed table of the others)."""
    if not torch.cuda.is_available():
        raise RuntimeError("bevdeploy bench convs needs a CUDA GPU (CUDA graphs and events)")
    import bevdeploy.ops  # noqa: F401
    import bevdeploy.quant.int8_kernels  # noqa: F401

    torch.backends.cudnn.benchmark = True
    names = backbones or list(BACKBONES)
    for b in names:
        if b not in BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {b!r}")
    rows, totals = [], []
    peaks = measured_peaks()
    print(f"roofline: int8 GEMM {peaks['int8_tops']:.0f} TOPS, copy {peaks['copy_gbs']:.0f} GB/s", file=sys.stderr)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": command, "peaks": peaks, "rows": rows, "totals": totals}
    folder = Path(out_dir) / gpu_dirname()
    folder.mkdir(parents=True, exist_ok=True)
    for b in names:
        _, image_size, batch = BACKBONES[b]
        float_module = backbone_module(b)
        int8_module = _int8_module(float_module)
        calls = conv_calls(int8_module, image_size, batch)
        print(f"{b}: {sum(len(v) for v in calls.values())} int8 convs, {len(calls)} distinct", file=sys.stderr)
        sum8 = sum16 = sum_floor = sum_no_tma = 0.0
        for call, layers in calls.items():
            r = _time_call(call, max_candidates)
            floor = call.floor_us(peaks["int8_tops"], peaks["copy_gbs"])
            count = len(layers)
            sum8 += count * r["int8_us"]
            sum_no_tma += count * (r["int8_no_tma_us"] or r["int8_us"])
            sum16 += count * r["fp16_us"]
            sum_floor += count * floor
            rows.append({"backbone": b, "shape": call.label(), "count": count, "layers": layers[:3], **r,
                         "floor_us": floor, "roofline_fraction": floor / r["int8_us"]})
            print(f"  {call.label()} x{count}: int8 {r['int8_us']:.1f} us (TMA {r['int8_tma_us']}, other "
                  f"{r['int8_no_tma_us']}), fp16 {r['fp16_us']:.1f} us", file=sys.stderr)
            (folder / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")  # a cut run keeps its rows
        total = {"backbone": b, "int8_sum_us": sum8, "int8_no_tma_sum_us": sum_no_tma, "fp16_sum_us": sum16,
                 "ratio": sum16 / sum8,
                 "floor_sum_us": sum_floor, "roofline_fraction": sum_floor / sum8}
        if end_to_end:
            total.update({f"module_{k}": v for k, v in _time_module(float_module, int8_module, image_size, batch).items()})
        totals.append(total)
        del float_module, int8_module
        torch.cuda.empty_cache()
        # written after every backbone: a run cut by a time limit keeps what it measured
        (folder / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        (folder / f"{name}.md").write_text(to_markdown(result))
    return result


def to_markdown(result: dict) -> str:
    lines = [f"# int8 convs vs cuDNN fp16 channels-last ({result['gpu']}, torch {result['torch']}, {result['date']})",
             "", f"`{result['command']}`", "",
             "ours: int8_conv2d, int8 in, fused epilogue, autotuned config (heuristic in brackets); "
             "fp16: eager F.conv2d (cuDNN, channels-last, benchmark mode) + add_ + relu_. "
             "CUDA graphs, median of replays. ratio = fp16 time / int8 time. TMA / other: the best time of the "
             "TMA conv kernel's configs and of the others (- where none ran)."]
    peaks = result.get("peaks")
    if peaks:  # runs before 2026-12-07 measured none
        lines.append(f"floor: the roofline time of the call, max(2MNK / {peaks['int8_tops']:.0f} TOPS, least bytes / "
                     f"{peaks['copy_gbs']:.0f} GB/s), both rates measured in this run (our int8 GEMM at 8192^3, a 1 GiB "
                     "device copy); roof = floor / int8 time.")
    lines += ["", "| backbone | conv (epilogue) | count | int8 us [heur.] | TMA us | other us | int8 TOPS | fp16 us "
              "| fp16 TFLOP/s | ratio | floor us | roof |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    dash = lambda r, k, f: format(r[k], f) if r.get(k) is not None else "-"  # noqa: E731
    for r in result["rows"]:
        lines.append(f"| {r['backbone']} | {r['shape']} | {r['count']} | {r['int8_us']:.1f} [{r['int8_heuristic_us']:.1f}] "
                     f"| {dash(r, 'int8_tma_us', '.1f')} | {dash(r, 'int8_no_tma_us', '.1f')} "
                     f"| {r['int8_tops']:.0f} | {r['fp16_us']:.1f} | {r['fp16_tflops']:.0f} | {r['ratio']:.2f} "
                     f"| {dash(r, 'floor_us', '.1f')} | {dash(r, 'roofline_fraction', '.2f')} |")
    lines += ["", "| backbone | sum int8 us | without TMA | sum fp16 us | ratio | sum floor us | roof | module int8 ms "
              "| module fp16 ms | module ratio |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in result["totals"]:
        mod = (f"{t['module_int8_ms']:.3f} | {t['module_fp16_ms']:.3f} | {t['module_ratio']:.2f}"
               if "module_int8_ms" in t else "- | - | -")
        lines.append(f"| {t['backbone']} | {t['int8_sum_us']:.0f} | {dash(t, 'int8_no_tma_sum_us', '.0f')} "
                     f"| {t['fp16_sum_us']:.0f} | {t['ratio']:.2f} "
                     f"| {dash(t, 'floor_sum_us', '.0f')} | {dash(t, 'roofline_fraction', '.2f')} | {mod} |")
    return "\n".join(lines) + "\n"
