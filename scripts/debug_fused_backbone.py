"""Find where a fused-epilogue float engine's image backbone departs from the plain one (GPU).

Session 19 measured BEVFormer-base fp16x2 with ``--fused-epilogues`` writing non-finite outputs (SQNR -inf)
while the plain fp16x2 engine scored 49 dB. This runs the deploy form's ``img_backbone`` (random weights, the
build's seed) plain and fused, eager then compiled by Inductor, reports each output's relative error, and in
eager names the first swapped module whose output is non-finite or departs.

    python scripts/debug_fused_backbone.py --model bevformer-base --precision fp16x2 [--size 928 1600] [--overrides JSON]
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch._inductor.config as inductor_config

from bevdeploy.engine.build import _load_float_model
from bevdeploy.engine.conv_epilogue import fuse_conv_epilogues
from bevdeploy.engine.deploy import apply_precision, fold_batchnorms


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bevformer-base")
    p.add_argument("--precision", default="fp16x2")
    p.add_argument("--size", type=int, nargs=2, default=[480, 800])
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--overrides", type=json.loads, default=None, help='config overrides, e.g. \'{"depth": 50}\'')
    a = p.parse_args()
    _, model = _load_float_model(a.model, None, False, a.overrides, verbose=False)
    fold_batchnorms(model)
    apply_precision(model, a.precision)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    plain = model.img_backbone.to(dev).eval()
    fused = copy.deepcopy(plain)
    names = fuse_conv_epilogues(fused)
    print(f"fused {len(names)}: {names[:4]} ... {names[-2:]}")
    dtype = next(plain.parameters()).dtype
    torch.manual_seed(1)
    x = torch.randn(a.images, 3, *a.size, device=dev, dtype=dtype)

    want = {}
    for name, m in plain.named_modules():
        m.register_forward_hook(lambda mod, i, o, name=name: want.__setitem__(name, o) if torch.is_tensor(o) else None)
    got = {}
    for name, m in fused.named_modules():
        m.register_forward_hook(lambda mod, i, o, name=name: got.__setitem__(name, o) if torch.is_tensor(o) else None)
    with torch.no_grad():
        w_out, g_out = plain(x), fused(x)
    if dev == "cuda":
        torch.cuda.synchronize()
    for i, (w, g) in enumerate(zip(w_out, g_out)):
        print(f"eager out {i}: {list(g.shape)} finite {bool(torch.isfinite(g).all())} rel {_rel(g, w):.3e} "
              f"strides {g.stride()}")
    # fp16 holds up to 65504: a plain path near it would overflow in a kernel that accumulates or adds in fp16
    peak = max((float(v.float().abs().max()), k) for k, v in want.items() if v.is_floating_point())
    print(f"largest plain activation: {peak[0]:.4g} at {peak[1]!r}")
    reported = 0
    for name in names + [n for n in got if n not in names]:
        if name not in want or name not in got or want[name].shape != got[name].shape:
            continue
        bad = not bool(torch.isfinite(got[name]).all())
        rel = _rel(got[name], want[name])
        if bad or rel > 1e-2:
            print(f"  first departures: {name} ({type(fused.get_submodule(name)).__name__}) finite {not bad} "
                  f"rel {rel:.3e} strides {got[name].stride()} want finite {bool(torch.isfinite(want[name]).all())} "
                  f"max|want| {float(want[name].float().abs().max()):.4g}")
            reported += 1
            if reported > 12:
                break
    if a.no_compile:
        return
    for net in (plain, fused):
        for m in net.modules():
            m._forward_hooks.clear()
    for tag, net, freeze in (("plain", plain, True), ("fused", fused, False), ("fused", fused, True)):
        # the engine compiles with freezing (weights as Inductor constants); without it too, to tell the two apart
        torch._dynamo.reset()
        with torch.no_grad(), inductor_config.patch({"freezing": freeze}):
            out = torch.compile(net, dynamic=False)(x)
        for i, (w, c) in enumerate(zip(w_out, out)):
            print(f"compiled {tag} (freezing {freeze}) out {i}: rel {_rel(c, w):.3e} finite {bool(torch.isfinite(c).all())}")


if __name__ == "__main__":
    main()
