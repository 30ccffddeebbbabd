"""Find which stage of the engine's run makes a BEV engine's outputs non-finite or wrong.

Session 19 measured BEVFormer-base fp16x2 with ``--fused-epilogues`` writing non-finite outputs (SQNR -inf) on the
GPU; session 20 found its fused image backbone finite and close to the plain one, eager and under torch.compile
(``scripts/debug_fused_backbone.py``). The engine does more than that: the exported program (whole model), Inductor
with freezing, then a CUDA graph. This builds the engine (or loads ``--engine``), runs it on the bench's timing
inputs in each of these modes and prints each output's finiteness and SQNR against the exported program run
eagerly; where the eager run itself is non-finite it names the first graph node that writes a non-finite value.

    python scripts/debug_engine_modes.py --model bevformer-base --precision fp16x2 --fused-epilogues
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.fx

from bevdeploy.engine import Engine, build
from bevdeploy.engine.model_io import family
from bevdeploy.eval.bench_models import timing_inputs
from bevdeploy.models import MODELS

#: (label, Engine.load keywords): each mode adds one stage of the bench's run (the last one is it)
MODES = [
    ("eager exported program", dict(compile=False, cuda_graphs=False)),
    ("Inductor, no freezing", dict(compile=True, cuda_graphs=False, freeze=False)),
    ("Inductor, freezing", dict(compile=True, cuda_graphs=False, freeze=True)),
    ("Inductor, freezing, CUDA graph", dict(compile=True, cuda_graphs=True, freeze=True)),
]


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    noise = float((out - ref).pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(max(float(ref.pow(2).sum()), 1e-300) / noise)


def first_nonfinite_node(module: torch.fx.GraphModule, args: tuple) -> str | None:
    """Run the exported graph node by node; the first node (name, target, source line) whose output holds NaN / inf
    while its inputs are all finite: where the non-finite values are made. None when they come from the inputs."""

    def _finite(values) -> bool:
        leaves = torch.utils._pytree.tree_leaves(values)
        return all(bool(torch.isfinite(t).all()) for t in leaves if torch.is_tensor(t) and t.is_floating_point())

    class Finder(torch.fx.Interpreter):
        found: str | None = None

        def run_node(self, n):
            out = super().run_node(n)
            if self.found is None and n.op != "placeholder" and not _finite(out):
                if _finite([self.env[a] for a in n.all_input_nodes if a in self.env]):  # made here, not passed on
                    lines = [s.strip() for s in (n.meta.get("stack_trace") or "").splitlines()]
                    ours = [i for i, s in enumerate(lines) if s.startswith("File") and "bevdeploy" in s]
                    at = lines[ours[-1]:ours[-1] + 2] if ours else lines[-2:]  # the model's line, not torch's
                    self.found = f"{n.name} ({n.target}): " + " | ".join(at)
            return out

    finder = Finder(module)
    with torch.no_grad():
        finder.run(*args)
    return finder.found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bevformer-base")
    p.add_argument("--precision", default="fp16x2")
    p.add_argument("--fused-epilogues", action="store_true")
    p.add_argument("--engine", default=None, help="an engine file to load instead of building one")
    p.add_argument("--out", default="/tmp/debug-engine-modes", help="folder for the built engine")
    p.add_argument("--device", default="cuda")
    p.add_argument("--modes", type=int, nargs="*", default=None, help=f"indices into {[m for m, _ in MODES]}")
    p.add_argument("--overrides", type=json.loads, default=None, help='config overrides, e.g. \'{"bev_h": 50}\'')
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: pass --device cpu (only the eager modes then)")
    path = a.engine
    if path is None:
        t0 = time.perf_counter()
        out = Path(a.out) / f"{a.model}-{a.precision}{'-fused' if a.fused_epilogues else ''}.engine"
        out.parent.mkdir(parents=True, exist_ok=True)
        path = build(a.model, a.precision, out=out, model_overrides=a.overrides, device=a.device,
                     fused_epilogues=a.fused_epilogues, progress=False)
        print(f"built {path} in {time.perf_counter() - t0:.0f} s")
    torch.manual_seed(0)  # the bench's model, for its timing inputs (BEVFormer: random image, the synthetic rig)
    model = MODELS[a.model](**(a.overrides or {}))
    infos = None
    if family(model) == "bevdet":  # its pooling indices come from a sample's camera geometry
        from bevdeploy.data.synthetic import resolve_data_spec

        infos = resolve_data_spec("synthetic:1").infos(spec="synthetic:1")
    inputs = timing_inputs(model, infos, device=a.device)
    del model
    # default order: eager (cheap, the reference), the bench's full mode (does the fault reproduce?), then the
    # stages between them (each load compiles anew: ~1-2 min for base)
    modes = [MODES[i] for i in (a.modes if a.modes is not None else (0, 3, 2, 1))]
    if a.device != "cuda":
        modes = [m for m in modes if not m[1]["compile"]]
    ref = None
    for label, kw in modes:
        t0 = time.perf_counter()
        engine = Engine.load(path, device=a.device, **kw)
        outs = engine(**inputs)
        if ref is None:
            ref = outs
        report = []
        for k, v in outs.items():
            finite = bool(torch.isfinite(v).all())
            report.append(f"{k} finite {finite}" + (f" SQNR {sqnr_db(v, ref[k]):.1f} dB" if finite else
                                                   f" ({int((~torch.isfinite(v)).sum())} of {v.numel()} non-finite)"))
        print(f"{label} ({time.perf_counter() - t0:.0f} s): " + "; ".join(report), flush=True)
        if not kw["compile"] and not all(bool(torch.isfinite(v).all()) for v in outs.values()):
            args = tuple(inputs[k] for k in engine.input_spec)
            print(f"  first node making non-finite values: {first_nonfinite_node(engine._module, args) or 'none (inputs)'}")
        del engine
        if a.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
