"""Where does int8 BEVDet lose accuracy on trained weights? Chain on / off / float-identity, per block.

Trains a BEVDet (reduced by default, so it runs on a CPU in minutes) briefly on a synthetic world,
calibrates it on training frames, and for each ``int8_chain`` setting (per-layer, float-identity,
chain) runs the eager int8 deploy form (``apply_precision``, the engine's module rewrite, before
export) on held-out frames: the worst head-output SQNR against the folded float model, and the
SQNR of every image-backbone block, the neck, the depth net, the view transformer and every BEV
encoder block (int8 block outputs dequantized with their scale). ``--no-bev-max`` calibrates the
BEV encoder's input convs like every other layer (the build's behaviour before the max override).

    PYTHONPATH=. python scripts/int8_chain_probe.py --steps 40 --calib-method entropy
    PYTHONPATH=. python scripts/int8_chain_probe.py --checkpoint ckpt.pth --full   # the real BEVDet-R50
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn

#: The reduced BEVDet of the diagnosis (full-width ResNet-50, 64x176 images, 32x32 BEV grid).
REDUCED = dict(image_size=(64, 176), depth_bins=(1.0, 41.0, 2.0), grid_x=(-25.6, 25.6, 1.6), grid_y=(-25.6, 25.6, 1.6),
               fpn_out_channels=64, bev_channels=32, bev_layer_channels=(32, 64, 128), bev_neck_out_channels=64,
               share_conv_channels=32, head_conv_channels=32)
NAME = "bevdet-r50-cbgs"
CONFIGS = {"per-layer": False, "float-identity": "float-identity", "chain": True}


def watched(name: str) -> bool:
    return ((name.count(".") == 2 and name.startswith("img_backbone.layer"))
            or (name.count(".") == 3 and name.startswith("img_bev_encoder_backbone.layers"))
            or name in ("img_backbone.conv1", "img_neck", "img_view_transformer.depth_net", "img_view_transformer",
                        "img_bev_encoder_neck"))


def dequantized(module: nn.Module, out):
    """A hooked output as floats (int8 codes times their scale); None when the scale is not known here."""
    from bevdeploy.quant.chain import Int8BasicBlock, Int8Bottleneck
    from bevdeploy.quant.modules import QuantConv2d

    if not isinstance(out, torch.Tensor):
        return None
    if out.dtype != torch.int8:
        return out.float()
    if isinstance(module, QuantConv2d):
        return out.float() * module.out_scale
    if isinstance(module, (Int8Bottleneck, Int8BasicBlock)):
        return out.float() * module.last_conv().out_scale
    if isinstance(module, nn.Sequential):
        kids = [c for c in module if not isinstance(c, nn.Identity)]
        return dequantized(kids[-1], out)
    return None


def run(model: nn.Module, frames: list[tuple]) -> list[tuple[dict, dict]]:
    """(head outputs, watched activations) per frame."""
    acts: dict = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: acts.__setitem__(n, dequantized(mod, o)))
             for n, m in model.named_modules() if watched(n)]
    outs = []
    try:
        with torch.no_grad():
            for x in frames:
                acts.clear()
                o = model(*x)
                outs.append(({k: v.float() for k, v in o.items()}, dict(acts)))
    finally:
        for h in hooks:
            h.remove()
    return outs


def main() -> None:
    from bevdeploy.data.nuscenes import load_infos
    from bevdeploy.data.preprocess_bevdet import GEOMETRY_KEYS, BEVDetPreprocess, prepare_bevdet_inputs
    from bevdeploy.data.synthetic import SYNTHETIC_SPLIT, SYNTHETIC_VERSION, generate
    from bevdeploy.engine.deploy import apply_precision, fold_batchnorms
    from bevdeploy.engine.model_io import calibration_forward_loop, calibration_method_overrides
    from bevdeploy.models import MODELS
    from bevdeploy.quant.calibrate import calibrate
    from bevdeploy.quant.sensitivity import sqnr_db
    from bevdeploy.train import make_training, train

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/int8_chain_probe")
    p.add_argument("--checkpoint", default=None, help="a trained state dict / .pth instead of training here")
    p.add_argument("--full", action="store_true", help="the full BEVDet-R50 config (default: the reduced one)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--calib-frames", type=int, default=8)
    p.add_argument("--calib-method", default="entropy", choices=["entropy", "minmax", "percentile"])
    p.add_argument("--no-bev-max", action="store_true", help="no max override for the BEV encoder's input convs")
    p.add_argument("--precision", default="int8", help="int8 (fp32 floats) or int8-fp16 (CUDA)")
    args = p.parse_args()

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides = {} if args.full else REDUCED
    work = Path(args.work)
    train_root, eval_root = work / "world_train", work / "world_eval"
    if not train_root.exists():
        generate(train_root, num_scenes=3, samples_per_scene=6, seed=1, image_size=(90, 160), progress=False)
        generate(eval_root, num_scenes=1, samples_per_scene=4, seed=2, image_size=(90, 160), progress=False)
    train_infos = load_infos(train_root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT, progress=False)
    eval_infos = load_infos(eval_root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT, progress=False)
    weights = Path(args.checkpoint) if args.checkpoint else work / f"trained-{args.steps}.pt"
    if not weights.exists():
        torch.manual_seed(0)
        model = MODELS[NAME](**overrides).to(dev)
        t = time.perf_counter()
        train(model, make_training(NAME, model, train_infos, dev, progress=False, workers=1), steps=args.steps,
              batch_size=args.batch, lr=args.lr, clip=5.0, progress=False)
        print(f"trained {args.steps} steps in {time.perf_counter() - t:.0f} s")
        torch.save(model.state_dict(), weights)

    def float_model() -> nn.Module:
        m = MODELS[NAME](**overrides).eval()
        state = torch.load(weights, map_location="cpu")
        m.load_state_dict(state.get("state_dict", state))
        fold_batchnorms(m)
        return m.to(dev)

    base = float_model()
    cfg = BEVDetPreprocess(input_size=tuple(base.config.image_size))

    def frame(info):
        x = prepare_bevdet_inputs(info, cfg)
        return (x["image"][None].to(dev), *base.prepare(*(x[k][None].to(dev) for k in GEOMETRY_KEYS)))

    held = [frame(i) for i in eval_infos[:2]]
    loop = calibration_forward_loop(train_infos[:args.calib_frames], NAME, base, dev, False)
    table = calibrate(base, loop, args.calib_method,
                      method_overrides=None if args.no_bev_max else calibration_method_overrides(base))
    scales = {n: table.scale(n) for n in table.amax}
    ref = run(base, held)
    results = {}
    for label, chain in CONFIGS.items():
        model = float_model()
        apply_precision(model, args.precision, scales=scales, int8_chain=chain)
        got = run(model, held)
        head = min(sqnr_db(r[0][k], g[0][k]) for r, g in zip(ref, got) for k in r[0])
        per = {}
        for k in ref[0][1]:
            vals = [sqnr_db(r[1][k], g[1][k]) for r, g in zip(ref, got)
                    if r[1].get(k) is not None and g[1].get(k) is not None]
            per[k] = min(vals) if vals else None
        results[label] = (head, per)
    print(f"calibration: {args.calib_method} on {args.calib_frames} frames, BEV-grid readers by max: "
          f"{not args.no_bev_max}; precision {args.precision}; SQNR (dB) vs the float model, worst of 2 held-out "
          "frames")
    print("| layer | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    print("| **head outputs (worst)** | " + " | ".join(f"{h:.1f}" for h, _ in results.values()) + " |")
    for k in ref[0][1]:
        cells = [f"{per[k]:.1f}" if per.get(k) is not None else "-" for _, per in results.values()]
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0")  # CPU: ops and int8 layers on their torch references
    main()
