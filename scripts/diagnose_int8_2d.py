"""Why does a 2D detector lose accuracy in int8? Calibration methods, the chain and the worst layers, on one
trained checkpoint, in one process (for a GPU call: no engine is compiled, the int8 layers run eagerly on the
same Triton kernels the engine uses).

For each variant (calibration method x chain on/off, then keep-float of the K most sensitive layers) the
BN-folded model is quantized (``quantize_modules`` + optional ``chain_int8``, fp32 outside the int8 layers),
and scored against the float model: SQNR of every head output on a timing batch and pycocotools mAP on the
held-out set. Also written: the per-layer sensitivity (one layer int8 at a time, ``--ranking-method`` scales,
minmax unless named: the build ranks with the model's own calibration) and each
layer's input range by method (minmax / percentile / entropy amax: a large minmax-to-percentile ratio marks
rare outliers that stretch the scale); then SmoothQuant variants (``--smooth-alphas``); then QAT variants
(``--qat-steps``: the minmax start fine-tuned on every calibration-set image with the training loss,
chained), each beside a control: the float model fine-tuned the same steps without fake quantization (its
mAP tells what the extra training alone gives, so a QAT row is judged against its control, not only against
the checkpoint).

    python scripts/diagnose_int8_2d.py --model yolox-x --checkpoint /tmp/det2d/yolox-x.pth \\
        --calib synthetic2d:600@1 --calib-images 64 --eval synthetic2d:128@2 --out $OUT/diag
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bevdeploy.data.det2d import PIPELINES, CocoSet, load_batch, resolve_det2d_spec
from bevdeploy.engine.deploy import fold_batchnorms
from bevdeploy.engine.model_io import det2d_calibration_loop, image_input_convs, int8_scope_prefixes
from bevdeploy.eval.coco import coco_map, run_det2d
from bevdeploy.models import MODELS
from bevdeploy.models.checkpoint import load_checkpoint
from bevdeploy.quant.bias_correction import correct_biases
from bevdeploy.quant.calibrate import calibrate
from bevdeploy.quant.chain import chain_int8
from bevdeploy.quant.modules import quantize_modules
from bevdeploy.quant.qat import (
    distillation_loss,
    float_finetune,
    learned_scales,
    prepare_qat,
    qat_finetune,
    strip_qat,
    tie_shared_inputs,
)
from bevdeploy.quant.sensitivity import sensitivity_report, sqnr_db
from bevdeploy.quant.smooth import input_channel_ranges, smooth_inputs, smoothable
from bevdeploy.train import make_training


@contextlib.contextmanager
def _int8_kernels(triton: bool):
    """``triton=False``: the int8 layers run their plain-PyTorch references (codes multiplied in fp32) on
    the GPU too: no kernel compiles, and a Triton-vs-reference gap on the same scales isolates a kernel
    fault from a calibration one."""
    import bevdeploy.quant.int8_kernels as kernels

    saved = kernels.use_triton
    if not triton:
        kernels.use_triton = lambda t: False
    try:
        yield
    finally:
        kernels.use_triton = saved


def _outputs(model, x) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {k: v.float() for k, v in model(x).items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, choices=["yolox-x", "centernet-r18-dcn"])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--calib", required=True, help="2D data spec; its first --calib-images images calibrate")
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--eval", required=True, help="held-out 2D data spec (mAP)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--timing-images", type=int, default=8, help="images of the SQNR batch")
    p.add_argument("--methods", nargs="+", default=["minmax", "percentile", "entropy"],
                   help="the first one is also run on the Triton kernels and with the chain")
    p.add_argument("--ranking-method", default="minmax",
                   help="the calibration (one of --methods) of the sensitivity ranking and of the keep-float and "
                        "SmoothQuant variants; the engine build ranks and smooths with the model's own (YOLOX-x: "
                        "percentile, bevdeploy.engine.model_io.default_calibration_method)")
    p.add_argument("--keep-worst", type=int, nargs="*", default=[5, 15])
    p.add_argument("--no-sensitivity", dest="sensitivity", action="store_false")
    p.add_argument("--smooth-alphas", type=float, nargs="*", default=[0.5],
                   help="SmoothQuant variants (--ranking-method after smoothing, unchained and chained)")
    p.add_argument("--asymmetric", action="store_true",
                   help="minmax variants with zero points on the int8 inputs (unchained and chained, as "
                        "build(asymmetric=True)); the QAT variants then start from them")
    p.add_argument("--int8-dcn", action="store_true",
                   help="variants with the DCNv2 convs int8 too (build --int8-dcn; CenterNet's neck)")
    p.add_argument("--no-triton-variant", dest="triton_variant", action="store_false",
                   help="skip the first method's variant on the Triton kernels (GPU only; compiles them)")
    p.add_argument("--float-identity", action="store_true",
                   help="the chained variants of the ranking method also with float residual identities "
                        "(build --int8-chain float-identity)")
    p.add_argument("--bias-correction", action="store_true",
                   help="each chained variant also with its int8 layers' biases corrected (build --bias-correction)")
    p.add_argument("--qat-steps", type=int, nargs="*", default=[],
                   help="QAT variants (minmax start, chained) of these step counts, each with its float control")
    p.add_argument("--qat-lr", type=float, default=1e-5, help="QAT peak learning rate of the weights")
    p.add_argument("--qat-batch", type=int, default=8)
    p.add_argument("--qat-loss", choices=["task", "distill"], nargs="+", default=["task"],
                   help="task: the training loss on the labels (with a float control); distill: match the float "
                        "model's outputs (bevdeploy.quant.qat.distillation_loss; no control needed)")
    p.add_argument("--cache-dir", default=None, help="where the synthetic sets are rendered (reused)")
    p.add_argument("--image-size", type=int, nargs=2, default=None)
    p.add_argument("--overrides", default=None, help="JSON model overrides (tests: reduced models)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget", type=float, default=1e9, help="seconds: skip variants once spent")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.ranking_method not in args.methods:
        p.error(f"--ranking-method {args.ranking_method} must be one of --methods {args.methods}")
    t_start = time.perf_counter()
    dev = torch.device(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = torch.load(args.checkpoint, map_location="cpu", weights_only=True).get("meta", {})
    overrides = json.loads(args.overrides) if args.overrides else (meta.get("model_overrides") or {})
    if args.image_size:
        overrides["image_size"] = tuple(args.image_size)
    if "image_size" in overrides:
        overrides["image_size"] = tuple(overrides["image_size"])
    model = MODELS[args.model](**overrides)
    load_checkpoint(model, args.checkpoint)
    model = model.to(dev).eval()
    fold_batchnorms(model)
    size = tuple(model.config.image_size)
    workers = os.cpu_count() or 1
    train = resolve_det2d_spec(args.calib, cache_dir=args.cache_dir, progress=False, workers=workers)
    n_calib = min(args.calib_images, len(train.images()))
    calib = CocoSet(train.ann_file, train.image_dir, n_calib, spec=f"{train.spec} (first {n_calib})")
    held_out = resolve_det2d_spec(args.eval, cache_dir=args.cache_dir, progress=False, workers=workers)
    coco_gt = held_out.coco()
    ids = [r["id"] for r in held_out.images()]
    x, _ = load_batch(held_out, held_out.images()[:args.timing_images], PIPELINES[args.model], size)
    x = x.to(dev)
    ref = _outputs(model, x)
    ref_results, _ = run_det2d(model, held_out, args.model, model.config, batch=args.batch, device=dev)
    ref_map = coco_map(coco_gt, ref_results, ids)["mAP"]
    heldout = make_training(args.model, model, held_out, dev)

    def heldout_loss(m) -> float:
        """The training loss on the held-out images (mean over batches): smoother than mAP on a weak model."""
        batches = max(1, len(held_out.images()) // args.batch)
        with torch.no_grad():
            return sum(float(sum(heldout.loss(m, b).values())) for _, b in
                       zip(range(batches), heldout.batches(args.batch, 0))) / batches

    ref_loss = heldout_loss(model)
    report: dict = {"model": args.model, "checkpoint": args.checkpoint, "calib": calib.spec, "eval": args.eval,
                    "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    "float_map": ref_map, "float_heldout_loss": round(ref_loss, 4), "timing_images": args.timing_images,
                    "command": "python scripts/diagnose_int8_2d.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    "methods": list(args.methods), "ranking_method": args.ranking_method, "variants": [], "ranges": {},
                    "sensitivity": []}
    print(f"[diag] float mAP {ref_map:.4f}, held-out loss {ref_loss:.4f} ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    keep_stem = set(image_input_convs(model))
    scope = int8_scope_prefixes(model)

    def write() -> None:  # after every variant: a run cut by its timeout keeps both files
        (out_dir / f"diagnose-int8-{args.model}.json").write_text(json.dumps(report, indent=1))
        (out_dir / f"diagnose-int8-{args.model}.md").write_text(markdown(report))

    def variant(label: str, scales: dict[str, float], chain: bool | str, keep: set[str], triton: bool = False,
                base: torch.nn.Module | None = None, zero_points: dict[str, int] | None = None,
                int8_dcn: bool = False) -> None:
        """One row; with --bias-correction a chained variant gets a second row, its biases corrected first."""
        for corrected in (False, True) if args.bias_correction and chain else (False,):
            one_variant(label + (", bias-corrected" if corrected else ""), scales, chain, keep, triton, base,
                        zero_points, int8_dcn, corrected)

    def one_variant(label: str, scales: dict[str, float], chain: bool | str, keep: set[str], triton: bool,
                    base: torch.nn.Module | None, zero_points: dict[str, int] | None, int8_dcn: bool,
                    corrected: bool) -> None:
        label += ", Triton kernels" if triton else ", reference int8 math"
        if time.perf_counter() - t_start > args.budget:
            print(f"[diag] {label}: skipped (budget)", file=sys.stderr)
            return
        q = copy.deepcopy(model if base is None else base)
        scoped = {n: s for n, s in scales.items() if n.startswith(scope)}
        if corrected:  # as build(bias_correction=True): on the calibration images, before the conversion
            loop, _ = det2d_calibration_loop(calib, args.model, q, dev, batch=8, progress=False)
            correct_biases(q, loop, scoped, zero_points=zero_points, keep_float=keep_stem | keep, scope=scope)
        quantize_modules(q, scoped, keep_float=keep_stem | keep, out_dtype=torch.float32, zero_points=zero_points,
                         deform_convs=int8_dcn)
        # chain "float-identity": build(int8_chain="float-identity"), residual identities read as floats
        writers = chain_int8(q, int8_identity=chain != "float-identity") if chain else []
        with _int8_kernels(triton):
            score(label, q, len(writers), keep)
        del q

    def score(label: str, m: torch.nn.Module, writers: int, keep: set[str]) -> None:
        """One report row: ``m``'s SQNR against the checkpoint, held-out mAP and loss."""
        out = _outputs(m, x)
        results, _ = run_det2d(m, held_out, args.model, model.config, batch=args.batch, device=dev)
        loss = heldout_loss(m)
        mp = coco_map(coco_gt, results, ids)["mAP"]
        row = {"variant": label, "chain_int8_writers": writers, "kept_float": sorted(keep),
               "sqnr_db": {k: round(sqnr_db(ref[k], out[k]), 2) for k in ref}, "map": round(mp, 4),
               "dmap": round(mp - ref_map, 4), "heldout_loss": round(loss, 4)}
        report["variants"].append(row)
        write()
        print(f"[diag] {label}: mAP {mp:.4f} (d {mp - ref_map:+.4f}), held-out loss {loss:.4f}, SQNR {row['sqnr_db']} "
              f"({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)

    tables = {}
    for method in args.methods:
        loop, _ = det2d_calibration_loop(calib, args.model, model, dev, batch=8, progress=False)
        tables[method] = calibrate(model, loop, method, model_name=args.model, dataset=calib.spec)
        print(f"[diag] calibrated ({method}) ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    for name in sorted(set().union(*(t.amax for t in tables.values()))):
        report["ranges"][name] = {m: round(t.amax.get(name, float("nan")), 5) for m, t in tables.items()}
    scales_of = {m: {n: t.scale(n) for n in t.amax} for m, t in tables.items()}
    first = args.methods[0]
    variant(f"{first}, unchained", scales_of[first], False, set())
    if dev.type == "cuda" and args.triton_variant:
        variant(f"{first}, unchained", scales_of[first], False, set(), triton=True)
    sens = []
    rank = args.ranking_method
    if args.sensitivity and time.perf_counter() - t_start < args.budget - 20:
        scales = scales_of[rank]
        layers = [n for n in scales if n.startswith(scope) and n not in keep_stem and scales[n] > 0]
        with _int8_kernels(False):
            sens = sensitivity_report(model, scales, [{_forward_arg(model)[0]: x}], layers=layers)
        report["sensitivity"] = [{"layer": s.layer, "sqnr_db": round(s.sqnr_db, 2), "worst_output": s.worst_output}
                                 for s in sens]
        write()
        print(f"[diag] worst layers alone in int8 ({rank}): "
              + ", ".join(f"{s.layer} {s.sqnr_db:.1f}" for s in sens[:10]), file=sys.stderr)
    for method in args.methods[1:]:
        variant(f"{method}, unchained", scales_of[method], False, set())
    asym_scales, asym_zps = {}, {}  # minmax with zero points (build(asymmetric=True)): conv inputs only
    if "minmax" in tables and args.asymmetric:
        for n in scales_of["minmax"]:
            asym_scales[n], z = tables["minmax"].qparams(n, asymmetric=isinstance(model.get_submodule(n), nn.Conv2d))
            if z:
                asym_zps[n] = z
        variant("minmax asymmetric, unchained", asym_scales, False, set(), zero_points=asym_zps)
        variant("minmax asymmetric, chained", asym_scales, True, set(), zero_points=asym_zps)
    if "minmax" in tables:
        variant("minmax, chained", scales_of["minmax"], True, set())
        if args.int8_dcn:
            variant("minmax, chained, int8 DCN", scales_of["minmax"], True, set(), int8_dcn=True)
            if args.asymmetric:  # the DCNs take their offset convs' zero points (build(int8_dcn=True, asymmetric=True))
                variant("minmax asymmetric, chained, int8 DCN", asym_scales, True, set(), zero_points=asym_zps,
                        int8_dcn=True)
    if rank != "minmax":
        variant(f"{rank}, chained", scales_of[rank], True, set())
    if args.float_identity:
        variant(f"{rank}, chained, float identities", scales_of[rank], "float-identity", set())
    for k in args.keep_worst if sens else []:
        variant(f"{rank}, chained, keep float {k} worst", scales_of[rank], True, {s.layer for s in sens[:k]})
    for alpha in args.smooth_alphas:  # SmoothQuant (bevdeploy.quant.smooth), as build(smooth_alpha=) does it
        if time.perf_counter() - t_start > args.budget:
            break
        smoothed = copy.deepcopy(model)
        layers = [n for n, mod in smoothed.named_modules()
                  if n.startswith(scope) and n not in keep_stem and smoothable(mod)]
        loop, _ = det2d_calibration_loop(calib, args.model, smoothed, dev, batch=8, progress=False)
        smooth_inputs(smoothed, input_channel_ranges(smoothed, loop, layers), alpha)
        table = calibrate(smoothed, loop, rank, model_name=args.model, dataset=calib.spec)
        scales = {n: table.scale(n) for n in table.amax}
        for chain in (False, True, *(["float-identity"] if args.float_identity else [])):
            how = {False: "unchained", True: "chained", "float-identity": "chained, float identities"}[chain]
            variant(f"{rank}, smoothed alpha {alpha}, {how}", scales, chain, set(), base=smoothed)
    # per step count: the float control of a task-loss QAT first (what the extra training alone gives), then
    # the distilled QAT, then the task-loss QAT (a cut run keeps the control and the cheaper variants)
    qat_runs = [run for steps in args.qat_steps for run in
                ([(steps, "task", False)] if "task" in args.qat_loss else [])
                + ([(steps, "distill", True)] if "distill" in args.qat_loss else [])
                + ([(steps, "task", True)] if "task" in args.qat_loss else [])]
    start = asym_scales if args.asymmetric else scales_of.get("minmax", {})
    minmax_scoped = {n: v for n, v in start.items() if n.startswith(scope)}
    start_zps = {n: z for n, z in asym_zps.items() if n in minmax_scoped and n not in keep_stem}
    asym_txt = " asymmetric" if args.asymmetric else ""
    for steps, kind, quantized in qat_runs:
        if time.perf_counter() - t_start > args.budget or "minmax" not in tables:
            break
        tuned = copy.deepcopy(model)
        training = make_training(args.model, tuned, train, dev)
        if quantized:
            loss_fn = (training.loss if kind == "task" else
                       distillation_loss(copy.deepcopy(model), lambda b: (b.images,)))
            prepare_qat(tuned, minmax_scoped, keep_float=sorted(keep_stem), scope=scope, zero_points=start_zps)
            tie_shared_inputs(tuned, lambda: loss_fn(tuned, next(iter(training.batches(args.qat_batch, 0)))))
            losses = qat_finetune(tuned, loss_fn, training.batches(args.qat_batch, 0), steps=steps,
                                  lr=args.qat_lr, progress=False)
            learned = learned_scales(tuned)
            strip_qat(tuned)
            tuned.eval()
            variant(f"minmax{asym_txt} + QAT ({kind} loss) {steps} steps x {args.qat_batch} lr {args.qat_lr}, chained",
                    {**minmax_scoped, **learned}, True, set(), base=tuned, zero_points=start_zps)
        else:
            losses = float_finetune(tuned, training.loss, training.batches(args.qat_batch, 0), steps=steps,
                                    lr=args.qat_lr, progress=False)
            tuned.eval()
            score(f"float control: fine-tuned {steps} steps, no quantization", tuned, 0, set())
        print(f"[diag] {f'QAT ({kind})' if quantized else 'float'} {steps} steps: loss {losses[0]:.4f} -> "
              f"{losses[-1]:.4f} ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
        del tuned, training
    write()
    print(f"[diag] done in {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    return 0


def markdown(report: dict) -> str:
    """The report as markdown: one row per variant, then the worst layers with their input ranges."""
    outputs = list(report["variants"][0]["sqnr_db"]) if report["variants"] else []
    methods = report.get("methods", [])
    lines = [f"# int8 diagnosis: {report['model']} on {report['device']}", "",
             f"Checkpoint `{report['checkpoint']}`; calibration {report['calib']}; held-out `{report['eval']}`; float "
             f"mAP {report['float_map']:.4f}. SQNR on {report.get('timing_images')} held-out images against the "
             "checkpoint's float outputs; int8 layers eager (each variant names Triton kernels or the reference int8 "
             "math), fp32 elsewhere; no engine compiled.", "",
             *([f"Command: `{report['command']}`", ""] if report.get("command") else []),
             f"Held-out loss: the training loss on the held-out images (float model: {report['float_heldout_loss']}).",
             "",
             "| variant | mAP | dmAP | held-out loss | " + " | ".join(f"SQNR {k}" for k in outputs) + " | int8 writers |",
             "|---|---|---|---|" + "---|" * len(outputs) + "---|"]
    for r in report["variants"]:
        lines.append(f"| {r['variant']} | {r['map']} | {r['dmap']} | {r['heldout_loss']} | "
                     + " | ".join(str(r["sqnr_db"].get(k)) for k in outputs) + f" | {r['chain_int8_writers']} |")
    if report["sensitivity"]:
        lines += ["", f"Worst layers alone in int8 ({report.get('ranking_method', 'minmax')} scales), with their input "
                  "amax by method:", "",
                  "| layer | SQNR dB | worst output | " + " | ".join(f"amax {m}" for m in methods) + " |",
                  "|---|---|---|" + "---|" * len(methods)]
        for s in report["sensitivity"][:20]:
            rng = report["ranges"].get(s["layer"], {})
            lines.append(f"| {s['layer']} | {s['sqnr_db']} | {s['worst_output']} | "
                         + " | ".join(str(rng.get(m)) for m in methods) + " |")
    return "\n".join(lines) + "\n"


def _forward_arg(model) -> list[str]:
    import inspect

    return list(inspect.signature(model.forward).parameters)


if __name__ == "__main__":
    sys.exit(main())
