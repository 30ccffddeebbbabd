"""Time engines and list the kernels that take their time (GPU); one markdown file per engine.

    python scripts/profile_engine.py ENGINE [ENGINE ...] [--no-freezing] [--cudnn-benchmark] [--top 25]
    python scripts/profile_engine.py --build bevdet-r50:fp16x2 bevdet-r50:int8-fp16 --calib synthetic:4

Each ENGINE (or each MODEL:PRECISION, built first into --work, reusing an engine file already
there, e.g. the one ``bevdeploy bench`` wrote to ``out/engines/<model>-<precision>.engine``) is
loaded (Inductor + CUDA graphs), timed with CUDA events (median of 50 after warm-up) on random
inputs of its spec, then 10 calls are profiled with torch.profiler. Written to
``<out>/<gpu>/profile-<model>-<precision>.md``: the time per frame, the top kernels by GPU time with
their share and a kind (our int8 kernels, quantize, cuDNN/cuBLAS, Inductor-generated, our ops...),
the share per kind, and the float fallbacks (convs / linears of an int8 engine that run float, and
which layers write int8 for the next one). Used to decide what to optimise; the tables come from
``bevdeploy bench``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere, installed or not

#: (kind, pattern on the kernel name), first match wins
KINDS = [
    ("int8 conv (ours)", r"_int8_conv2d(_packed|_tma)?_kernel"),
    ("int8 GEMM (ours)", r"_int8_linear_kernel"),
    ("quantize (ours)", r"_quantize_per_tensor_kernel"),
    ("MSDA (ours)", r"msda"),
    ("DCN (ours)", r"deform|dcn"),
    ("bev_pool (ours)", r"bev_pool"),
    ("other ours (Triton)", r"^_[a-z0-9_]+_kernel"),
    ("Inductor fused (Triton)", r"^triton_"),
    ("cuDNN conv", r"conv|cudnn|implicit_gemm|xmma_fprop|sm90_xmma"),
    ("cuBLAS / CUTLASS GEMM", r"gemm|cutlass|cublas|sm90_|nvjet"),
    ("attention", r"flash|fmha|attention"),
    ("copies / elementwise (aten)", r"elementwise|copy|memcpy|memset|reduce|cat_|index"),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return kind
    return "other"


def _engine_path(spec: str, work: Path, calib: str, int8_dcn: bool = False, fused_epilogues: bool = False,
                 batch: int | None = None) -> Path:
    from bevdeploy.engine import build
    from bevdeploy.models import DET2D_MODELS

    model, _, precision = spec.partition(":")
    if not precision:
        raise ValueError(f"--build takes MODEL:PRECISION, got {spec!r}")
    if batch is None:  # the tables' batch: 32 images for the 2D detectors, one frame for the BEV models
        batch = 32 if model in DET2D_MODELS else 1
    dcn = int8_dcn and precision.startswith("int8")
    tags = ("-int8dcn" if dcn else "") + ("-fusedepi" if fused_epilogues else "")
    size = f"-b{batch}" if batch != 1 else ""
    path = work / f"{model}{size}-{precision}{tags}.engine"  # bench --int8-dcn's names; the 2D tables' -b32
    if not path.is_file():
        build(model, precision, out=path, calib=calib if precision.startswith("int8") else None, progress=False,
              int8_dcn=dcn, fused_epilogues=fused_epilogues, batch=batch)
    return path


def compiled_code_since(start: int) -> list[Path]:
    """The Python files Inductor generated or loaded from its cache since ``start`` (a former
    ``len(PyCodeCache.modules)``): an engine's wrapper code, whose ``call`` lists every kernel launch, extern
    call and copy in order, with the graph nodes each came from."""
    from torch._inductor.codecache import PyCodeCache

    return [Path(m.__file__) for m in PyCodeCache.modules[start:] if getattr(m, "__file__", None)]


def save_code(files: list[Path], dest: Path) -> list[Path]:
    """Copy ``files`` into ``dest`` (made if missing); returns the copies."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(f, dest / f.name)) for f in files]


def profile_one(path: Path, out_dir: Path, *, freeze: bool, cudnn_benchmark: bool, top: int,
                code_dir: Path | None = None) -> Path:
    from torch._inductor.codecache import PyCodeCache
    from torch.profiler import ProfilerActivity, profile

    from bevdeploy.engine import Engine
    from bevdeploy.engine.engine import example_inputs
    from bevdeploy.eval.timing import gpu_dirname, time_eager

    torch.backends.cudnn.benchmark = cudnn_benchmark
    t0 = time.time()
    code_start = len(PyCodeCache.modules)
    engine = Engine.load(path, device="cuda", freeze=freeze)
    load_s = time.time() - t0
    if code_dir is not None:
        saved = save_code(compiled_code_since(code_start), code_dir / path.stem)
        print(f"{len(saved)} compiled code files of {path.name} -> {code_dir / path.stem}")
    meta = engine.metadata
    inputs = example_inputs(engine.input_spec, engine.device)
    g = torch.Generator(device="cuda").manual_seed(0)
    for k, v in inputs.items():
        if v.is_floating_point() and k not in ("lidar2img", "use_prev_bev", "can_bus"):
            v.copy_(torch.randn(v.shape, device="cuda", generator=g))
    ms = time_eager(lambda: engine(**inputs), iters=50, warmup=5)
    calls = 10
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            engine(**inputs)
        torch.cuda.synchronize()
    kernels = defaultdict(lambda: [0.0, 0])  # name -> [total us, count]
    for e in prof.key_averages():
        dev_us = getattr(e, "device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "cuda_time_total", 0.0)
        if dev_us and e.key and not e.key.startswith("ProfilerStep"):
            kernels[e.key][0] += dev_us
            kernels[e.key][1] += e.count
    # only CUDA activity is recorded, so these are kernels and memcpys; drop any op-level range
    kernels = {k: v for k, v in kernels.items() if not k.startswith("aten::")}
    total = sum(v[0] for v in kernels.values()) or 1.0
    by_kind = defaultdict(float)
    for k, (us, _) in kernels.items():
        by_kind[kind_of(k)] += us
    # the int8 variants of one precision get files of their own (e.g. gpu_det2d.sh's asymmetric and QAT engines)
    precision = meta["precision"] + "".join(f"-{tag}" for tag, on in (
        ("int8dcn", meta.get("int8_dcn")), ("asymmetric", meta.get("zero_points")), ("qat", meta.get("qat")),
        ("fusedepi", meta.get("fused_epilogues"))) if on)
    model = meta["model"]
    # a static-batch engine (2D detectors: 32 images a call) is timed per call; say so, and give the rate per image
    batch = int(meta.get("batch", 1) or 1)
    unit = "frame" if batch == 1 else "call"
    rate = f"{1000 / ms:.1f} FPS" if batch == 1 else f"batch {batch}: {1000 * batch / ms:.1f} images/s"
    lines = [f"# Profile: {model} {precision} ({torch.cuda.get_device_name()}, torch {torch.__version__})", "",
             f"engine `{path.name}`, load + compile {load_s:.1f} s, **{ms:.3f} ms/{unit}** ({rate}), "
             f"freezing={freeze}, cudnn.benchmark={cudnn_benchmark}; kernel time summed over {calls} calls: "
             f"{total / calls / 1000:.3f} ms/{unit}", "", "## GPU time by kind", "", f"| kind | ms/{unit} | share |",
             "| --- | --- | --- |"]
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {us / calls / 1000:.3f} | {100 * us / total:.1f}% |")
    lines += ["", f"## Top {top} kernels", "", f"| kernel | kind | launches/{unit} | us/{unit} | share |",
              "| --- | --- | --- | --- | --- |"]
    for k, (us, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        name = k if len(k) <= 90 else k[:87] + "..."
        lines.append(f"| `{name}` | {kind_of(k)} | {n / calls:.0f} | {us / calls:.1f} | {100 * us / total:.1f}% |")
    rows = meta.get("layer_precisions", [])
    if meta.get("calibration") is not None:
        floats = [(n, p) for n, p in rows if p not in ("int8", "fused") and not n.endswith("(op)")]
        ops = [(n, p) for n, p in rows if n.endswith("(op)")]
        writers = meta.get("int8_outputs", [])
        lines += ["", "## Float fallbacks", "",
                  f"{sum(p == 'int8' for _, p in rows)} int8 layers, {len(floats)} float convs/linears, "
                  f"{len(writers)} int8 layers write int8 for the next one (the chain); "
                  f"{len(meta.get('launch_configs', {}))} layers carry an autotuned launch config.", ""]
        lines += [f"- `{n}`: {p}" for n, p in floats]
        lines += [f"- `{n}`: {p}" for n, p in ops]
    folder = out_dir / gpu_dirname()
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"profile-{model}-{precision}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12]))
    print(f"-> {out}")
    del engine
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines", nargs="*", help="engine files")
    ap.add_argument("--build", nargs="*", default=[], help="MODEL:PRECISION pairs (built into --work if missing)")
    ap.add_argument("--calib", default="synthetic:4", help="calibration data for int8 builds")
    ap.add_argument("--int8-dcn", action="store_true",
                    help="int8 --build engines with their DCNv2 convs int8 (profile-<model>-<precision>-int8dcn.md)")
    ap.add_argument("--fused-epilogues", action="store_true",
                    help="--build engines with cuDNN's fused conv + bias (+ residual) + ReLU in the ResNet blocks "
                         "(profile-<model>-<precision>-fusedepi.md)")
    ap.add_argument("--batch", type=int, default=None,
                    help="--build engines' static batch (default: the tables', 32 for YOLOX-x / CenterNet, 1 otherwise)")
    ap.add_argument("--work", default="out/engines", help="where --build engines live")
    ap.add_argument("--out", default="bench/results", help="results folder")
    ap.add_argument("--no-freezing", action="store_true", help="Engine.load(freeze=False)")
    ap.add_argument("--cudnn-benchmark", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--save-code", default=None, metavar="DIR",
                    help="copy each engine's Inductor wrapper code into DIR/<engine>/ (every launch, extern call and "
                         "copy of a frame, in order, with the graph nodes they come from)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_engine.py needs a CUDA GPU")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in args.engines] + [_engine_path(s, work, args.calib, args.int8_dcn, args.fused_epilogues,
                                                            args.batch)
                                               for s in args.build]
    if not paths:
        raise SystemExit("give engine files or --build MODEL:PRECISION ...")
    for p in paths:
        profile_one(p, Path(args.out), freeze=not args.no_freezing, cudnn_benchmark=args.cudnn_benchmark,
                    top=args.top, code_dir=Path(args.save_code) if args.save_code else None)


if __name__ == "__main__":
    main()
