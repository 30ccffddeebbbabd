"""``bevdeploy <verb>``: the command line. Thin: parse, call the public API, print one-line errors.

Every error is one line on stderr naming the problem (exit code 2 for bad input / files / machine,
1 for an unexpected internal error, 130 when interrupted); ``--debug`` (anywhere on the line) shows
the traceback instead. Under torchrun (``train``, ``eval``, ``build``) rank 0 prints the results; an
error on any rank stops every rank, each printing one line (ranks other than 0 name themselves, and
a rank stopped by another's error names that one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EPILOG = """examples:
  bevdeploy eval --model bevformer-tiny --data synthetic:32       NDS/mAP and FPS on a synthetic world
  bevdeploy eval --model bevformer-base --data nuscenes:/data/nuscenes --checkpoint bevformer_base_epoch_24.pth
  bevdeploy demo                       synthetic world -> BEVFormer-tiny -> fp32/int8 engines -> NDS table
  bevdeploy demo --ops                 check every op (Triton kernels vs references) and print a table
  bevdeploy build --model bevformer-tiny --precision int8 --calib synthetic:32 -o tiny-int8.engine
  bevdeploy build --model bevdet-r50-cbgs --checkpoint ckpt.pth --precision int8-fp16 --calib synthetic:64 --qat-steps 200 -o q.engine
  torchrun --nproc-per-node 8 -m bevdeploy.cli build --model bevdet-r50-cbgs --checkpoint ckpt.pth --precision int8 --calib synthetic:500 --qat-steps 200 -o q.engine
  bevdeploy bench --model bevformer-tiny --precisions pytorch fp16 int8 --data synthetic:16
  bevdeploy bench --model bevdet-r50-cbgs --precisions pytorch fp16 int8-fp16   BEVDet-R50-CBGS table (GPU)
  bevdeploy bench --model bevformer-tiny --precisions pytorch fp16x2 --batch 1 4 8   frames/s per batch (bevformer-tiny-batch)
  bevdeploy bench --model bevdet-r50-cbgs --precisions pytorch fp16x2 fp8-fp16 --calib synthetic:4   fp8 (H100)
  bevdeploy eval --model bevdet-r50-cbgs --data synthetic:16   BEVDet with its 256x704 pipeline
  bevdeploy eval --model yolox-x --data coco:/data/coco --checkpoint yolox_x_8x8_300e_coco.pth --results yolox.json
  bevdeploy eval --model centernet-r18-dcn --data synthetic2d:64   COCO mAP (pycocotools) on synthetic views
  bevdeploy bench --model yolox-x centernet-r18-dcn --precisions pytorch fp16x2 int8-fp16 --data synthetic2d:64
  bevdeploy build --model yolox-x --checkpoint y.pth --precision int8-fp16 --calib synthetic2d:64@1 --qat-data synthetic2d:600@1 --qat-steps 300 --qat-batch 8 --qat-lr 1e-4 -o y.engine
  bevdeploy bench ops                  time every op variant at BEVFormer/BEVDet shapes (GPU)
  bevdeploy train --model bevdet-r50-cbgs --data synthetic:600@1 --steps 2000 --batch 8 -o bevdet.pth
  bevdeploy eval --model bevdet-r50-cbgs --data synthetic:120@2 --checkpoint bevdet.pth   held-out world
  bevdeploy train --model centernet-r18-dcn --data synthetic2d:600@1 --steps 3000 --batch 32 --lr 1e-3 --train-seconds 90 -o ct.pth
  bevdeploy eval --model centernet-r18-dcn --data synthetic2d:120@2 --checkpoint ct.pth   held-out 2D views
  bevdeploy bench ops --ops msda bev_pool_v2
  bevdeploy bench convs                int8 chain convs vs cuDNN fp16, per conv and per backbone (GPU)
  bevdeploy eval --engine tiny-int8.engine --data synthetic:32 --results results.json --metrics metrics.json
  bevdeploy show --engine tiny-int8.engine --data synthetic:4 -o out/show     BEV + camera pictures
  bevdeploy report bench/results/nvidia-h100-80gb-hbm3 -o report.html
  bevdeploy export --model bevformer-tiny -o tiny.onnx --check
"""


def _workers(args: argparse.Namespace) -> int:
    """--workers, or every core; a warning when the data is not generated (nothing to render)."""
    if args.workers is not None and not str(args.data).strip().lower().startswith("synthetic"):
        print(f"warning: --workers renders the synthetic world; {args.data!r} is read from disk, so it is ignored",
              file=sys.stderr)
    return args.workers or os.cpu_count() or 1


def _demo(args: argparse.Namespace) -> int:
    import torch

    if args.ops:
        if not torch.cuda.is_available() and "bevdeploy.ops" not in sys.modules:
            # No GPU: run the Triton kernels through Triton's interpreter (chosen before import).
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from bevdeploy.ops.selfcheck import print_table, run_checks

        rows = run_checks(seed=args.seed)
        print_table(rows)
        failed = [r for r in rows if not r["ok"]]
        if failed:
            print(f"{len(failed)} check(s) failed", file=sys.stderr)
            return 1
        return 0
    from bevdeploy.eval.demo import run_demo

    from bevdeploy.eval.demo import format_demo_table

    rows = run_demo(model_name=args.model, data=args.data, precisions=args.precisions, checkpoint=args.checkpoint,
                    work_dir=args.work_dir, workers=_workers(args), pictures=args.pictures)
    table = format_demo_table(rows, "cuda" if torch.cuda.is_available() else "cpu")
    print(table)
    work = Path(args.work_dir)
    (work / "demo-table.txt").write_text(table + "\n")
    pictures = f"   pictures: {work / 'pictures'}" if args.pictures else ""
    print(f"engines: {work}/*.engine{pictures}   table: {work / 'demo-table.txt'}")
    if not args.checkpoint:
        print("(random weights: NDS/mAP near 0 is expected; fidelity NDS compares each engine with PyTorch)")
    return 0


def _eval_det2d(args: argparse.Namespace) -> int:
    from bevdeploy.data.det2d import as_2d_spec
    from bevdeploy.eval.coco import evaluate_det2d

    bev_only = [flag for flag, value in (("--metrics", args.metrics), ("--save-run", args.save_run),
                                         ("--score-run", args.score_run), ("--no-score", args.no_score)) if value]
    if bev_only:
        raise ValueError(f"{' '.join(bev_only)}: BEV models only; a 2D model is scored with pycocotools "
                         "(--results writes its COCO results JSON)")
    if args.dist is not None and args.dist.enabled:
        raise ValueError("2D models are evaluated in one process: run without torchrun")
    r = evaluate_det2d(args.model, as_2d_spec(args.data), engine=args.engine,
                       checkpoint=args.checkpoint, allow_partial=args.allow_partial, device=args.device,
                       batch=args.batch, results_file=args.results, progress=not args.quiet)
    fps = "n/a" if r["fps"] is None else f"{r['fps']:.1f}"
    what = r["model"] if not r["engine"] else f"{r['model']} engine {r['engine']}"
    print(f"{what} on {r['data']}: {r['images']} images, {r['detections']} detections, images/s {fps}, "
          f"COCO mAP {r['mAP']:.4f} (AP50 {r['mAP_50']:.4f}, AP75 {r['mAP_75']:.4f})"
          + (f"; results: {args.results}" if args.results else ""))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from bevdeploy.engine.engine_file import peek_model_name
    from bevdeploy.models import DET2D_MODELS

    if args.model in DET2D_MODELS or (args.engine and peek_model_name(args.engine) in DET2D_MODELS):
        return _eval_det2d(args)
    from bevdeploy.eval.detection import DetectionRun, evaluate, format_metrics, score_run, write_metrics, write_results

    if args.model is None and args.engine is None and args.score_run is None:
        raise ValueError("say what to evaluate: --model NAME, --engine FILE or --score-run FILE")
    if args.score_run:
        from bevdeploy.data.nuscenes import load_infos
        from bevdeploy.data.synthetic import resolve_data_spec

        source = resolve_data_spec(args.data, workers=_workers(args))
        infos = load_infos(source.dataroot, source.version, source.split)
        run = DetectionRun.load(args.score_run)
        infos = [i for i in infos if i["token"] in run.boxes]
        result = {"model": args.model or args.score_run, "data": args.data, "frames": len(run.boxes), "fps": run.fps}
        if args.results:
            result["results_path"] = str(write_results(run, infos, args.results))
        if not args.no_score:
            metrics = score_run(run, infos, source.dataroot, source.version, source.split)
            result.update(NDS=metrics["NDS"], mAP=metrics["mAP"], metrics=metrics)
    else:
        if args.save_run:  # before the run, not after it
            from bevdeploy.paths import check_output_path

            check_output_path(args.save_run, "--save-run file")
        result = evaluate(args.model, args.data, engine=args.engine, checkpoint=args.checkpoint,
                          allow_partial=args.allow_partial, device=args.device, workers=_workers(args),
                          save_run=args.save_run, score=not args.no_score, results_path=args.results,
                          progress=not args.quiet, dist=args.dist)
        if result is None:  # another torchrun process: rank 0 scores and prints
            return 0
    fps = "n/a" if result["fps"] is None else f"{result['fps']:.2f}"
    what = result["model"] if not result.get("engine") else f"{result['model']} engine {result['engine']}"
    rate = ""
    if result.get("throughput"):
        procs = result.get("processes", 1)
        rate = (f"; the pass {result['wall_s']:.1f} s, {result['throughput']:.2f} frames/s"
                + (f" over {procs} processes" if procs > 1 else "") + " (reading, preprocessing and decoding too)")
    print(f"{what} on {result['data']}: {result['frames']} frames, FPS {fps}{rate}")
    if "metrics" in result:
        print(format_metrics(result["metrics"]))
        if args.metrics:
            print(f"metrics written: {write_metrics(result['metrics'], args.metrics)}")
    elif args.metrics:
        raise ValueError("--metrics needs scored data (not --no-score, not a test split)")
    if result.get("results_path"):
        print(f"nuScenes results written: {result['results_path']}")
    return 0


#: ``--int8-chain`` -> ``build(int8_chain=...)``.
_INT8_CHAIN = {"on": True, "off": False, "float-identity": "float-identity"}
_INT8_CHAIN_HELP = ("int8*: on (default): int8 activations flow between int8 layers; off: every int8 layer writes "
                    "floats; float-identity: chained, but residual blocks keep float boundaries")


def _build(args: argparse.Namespace) -> int:
    from bevdeploy.engine import build
    from bevdeploy.engine.deploy import precision_spec

    import torch

    from bevdeploy.models import DET2D_MODELS

    spec = precision_spec(args.precision)
    if not spec.quantized:
        ignored = [flag for flag, on in (("--calib", args.calib), ("--calib-table", args.calib_table),
                                         ("--keep-float", args.keep_float), ("--sensitivity", args.sensitivity),
                                         ("--keep-float-below", args.keep_float_below is not None),
                                         ("--smooth-alpha", args.smooth_alpha is not None),
                                         ("--bias-correction", args.bias_correction),
                                         ("--asymmetric", args.asymmetric),
                                         ("--int8-dcn", args.int8_dcn),
                                         ("--qat-steps", args.qat_steps)) if on]
        if ignored:
            raise ValueError(f"{', '.join(ignored)} appl{'ies' if len(ignored) == 1 else 'y'} to the int8 / fp8 "
                             f"precisions only, not --precision {args.precision}")
    batch = args.batch
    if batch is None:  # 2D engines: the reference's batch 32 on a GPU, a small one on a CPU
        batch = (32 if torch.cuda.is_available() and args.device != "cpu" else 2) if args.model in DET2D_MODELS else 1
    path = build(args.model, args.precision, out=args.output, checkpoint=args.checkpoint, allow_partial=args.allow_partial,
                 calib=args.calib, calib_method=args.calib_method, calib_table=args.calib_table,
                 keep_float=tuple(args.keep_float), device=args.device, sensitivity=args.sensitivity,
                 keep_float_below_db=args.keep_float_below, smooth_alpha=args.smooth_alpha,
                 bias_correction=args.bias_correction, qat_steps=args.qat_steps, qat_data=args.qat_data,
                 qat_lr=args.qat_lr, qat_batch=args.qat_batch,
                 batch=batch, progress=not args.quiet, allow_partial_calib=args.allow_partial_calib,
                 allow_nonfinite=args.allow_nonfinite, calib_two_pass=args.calib_two_pass,
                 int8_chain=_INT8_CHAIN[args.int8_chain], int8_stem=args.int8_stem, asymmetric=args.asymmetric,
                 int8_dcn=args.int8_dcn, fused_epilogues=args.fused_epilogues, dist=args.dist)
    if path is None:  # another torchrun process: rank 0 writes the engine and prints
        return 0
    print(f"engine written: {path} ({path.stat().st_size / 2**20:.1f} MB)")
    if args.sensitivity or args.keep_float_below is not None:
        from bevdeploy.quant.sensitivity import LayerSensitivity, format_report

        report = [LayerSensitivity(**r) for r in json.loads(Path(f"{path}.sensitivity.json").read_text())]
        print("int8 sensitivity (output SQNR with only that layer in int8; worst first):")
        print(format_report(report))
    print("next:")
    if args.model in DET2D_MODELS:
        print(f"  bevdeploy eval --engine {path} --data synthetic2d:128@2    # COCO mAP and images/s (or --data coco:PATH)")
        print(f"  bevdeploy show --engine {path} --data synthetic2d:4 -o out/show   # each image with its boxes")
    else:
        print(f"  bevdeploy eval --engine {path} --data synthetic:32          # NDS/mAP and FPS (or --data nuscenes:PATH)")
        print(f"  bevdeploy show --engine {path} --data synthetic:4 -o out/show   # BEV and camera pictures of its boxes")
    print(f"  bevdeploy bench --model {args.model} --precisions pytorch {args.precision}   # the speed table (GPU)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.model is not None and (args.ops is not None or args.what == "ops"):
        raise ValueError("--ops / 'ops' benchmark the operators; --model benchmarks models: run them separately")
    if args.model:
        from bevdeploy.eval.bench_models import bench_model

        engine_precisions = [p for p in args.precisions if p != "pytorch"]
        command = "bevdeploy " + " ".join(sys.argv[1:])
        for name in args.model:
            path = bench_model(name, engine_precisions, data=args.data, calib=args.calib, checkpoint=args.checkpoint,
                               out_dir=args.out, command=command, append=args.append, batch=args.batch,
                               int8_chain=_INT8_CHAIN[args.int8_chain], results_name=args.results_name,
                               int8_dcn=args.int8_dcn, fresh_memory=not args.inprocess_memory,
                               fused_epilogues=args.fused_epilogues)
            print(path.with_suffix(".md").read_text())
        return 0
    if args.what == "ops":
        from bevdeploy.eval.bench_ops import run, to_markdown

        result = run(args.ops, args.out, command="bevdeploy " + " ".join(sys.argv[1:]))
        print(to_markdown(result))
        return 0
    if args.what == "convs":
        from bevdeploy.eval.bench_convs import run as run_convs
        from bevdeploy.eval.bench_convs import to_markdown as convs_markdown

        result = run_convs(args.backbones, args.out, command="bevdeploy " + " ".join(sys.argv[1:]),
                           name=args.results_name or "convs")
        print(convs_markdown(result))
        return 0
    raise ValueError("say what to benchmark: 'bevdeploy bench ops', 'bevdeploy bench convs' or "
                     "'bevdeploy bench --model NAME'")


def _train(args: argparse.Namespace) -> int:
    from bevdeploy.train import train_model

    from bevdeploy.train import is_det2d

    if args.image_size is not None and not is_det2d(args.model):
        raise ValueError("--image-size sets a 2D model's network input (yolox-x, centernet-r18-dcn); "
                         f"{args.model} has its official input size")
    overrides = {"image_size": tuple(args.image_size)} if args.image_size is not None else None
    path = train_model(args.model, args.data, steps=args.steps, batch=args.batch, out=args.output, lr=args.lr,
                       weight_decay=args.weight_decay, warmup=args.warmup, clip=args.clip, seed=args.seed,
                       device=args.device, model_overrides=overrides,
                       time_limit=args.train_seconds,
                       workers=args.workers, training_options=({"depth_weight": args.depth_weight}
                                                               if args.depth_weight is not None else None),
                       progress=not args.quiet, dist=args.dist)
    if path is not None:  # rank 0 of a torchrun job (or the only process)
        print(f"checkpoint written: {path} (load it with --checkpoint)")
    return 0


MODEL_NAMES = ("bevformer-tiny | bevformer-small | bevformer-base | bevdet-r50-cbgs (alias bevdet-r50) | yolox-x | "
               "centernet-r18-dcn")
DATA_HELP = """data specs:
  synthetic[:N]                          a generated world of N samples (cached; default 32)
  synthetic:N@SEED                       a world of another seed (disjoint scenes: train on @1, score on @2)
  nuscenes:PATH                          v1.0-trainval (split val) or v1.0-mini (mini_val) under PATH
  nuscenes:PATH@v1.0-test:test           any table version and split
  nuscenes:PATH:val:100                  the first 100 samples (temporal order) of a split
  synthetic2d:N[@SEED]                   2D models: N generated camera views in COCO format (cached)
  coco:PATH[:SPLIT][:N]                  2D models: COCO's instances_SPLIT.json and SPLIT/ (default val2017;
                                         train2017 to train or calibrate), the first N images
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bevdeploy")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _show(args: argparse.Namespace) -> int:
    from bevdeploy.eval.visualize import show

    paths = show(args.data, args.output, model_name=args.model, engine=args.engine, results=args.results,
                 checkpoint=args.checkpoint, frames=args.frames, score_threshold=args.score_threshold,
                 device=args.device, workers=_workers(args), progress=not args.quiet)
    print(f"{len(paths)} pictures written to {args.output}: " + ", ".join(p.name for p in paths[:4])
          + (" ..." if len(paths) > 4 else ""))
    return 0


def _report(args: argparse.Namespace) -> int:
    from bevdeploy.eval.report import write_report

    out = args.output or str(Path(args.results_dir) / "report.html")
    path = write_report(args.results_dir, out)
    print(f"report written: {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from bevdeploy.export.onnx import check_onnx, export_model

    if args.model is None and not isinstance(args.check, str):
        raise ValueError("say what to export: --model NAME -o FILE.onnx (or --check FILE.onnx)")
    path = args.check if isinstance(args.check, str) else None
    if args.model is not None:
        if not args.output:
            raise ValueError("--model needs -o FILE.onnx")
        path = export_model(args.model, args.output, checkpoint=args.checkpoint)
        print(f"ONNX written: {path}")
    if args.check:
        report = check_onnx(path, model_name=args.model, checkpoint=args.checkpoint)
        print(report["text"])
        return 0 if report["ok"] else 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bevdeploy", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Deploy camera BEV 3D detectors (BEVFormer, BEVDet) and 2D detectors (YOLOX, CenterNet) "
                    "from PyTorch to fast engines: build, evaluate, look at and benchmark them.")
    parser.add_argument("--version", action="version", version=f"bevdeploy {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    loud = common.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="more messages (debug logging)")
    loud.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings and errors only")
    sub = parser.add_subparsers(dest="verb", required=True)

    demo = sub.add_parser("demo", parents=[common],
                          help="synthetic world -> PyTorch -> engines -> NDS/fidelity table (--ops: op self-check)")
    demo.add_argument("--ops", action="store_true", help="instead: every op's kernels against its reference")
    demo.add_argument("--seed", type=int, default=0, help="seed of the op self-check inputs")
    demo.add_argument("--model", default="bevformer-tiny", help=f"model name: {MODEL_NAMES}")
    demo.add_argument("--data", default="synthetic:3", help="synthetic[:N] (generated, cached) or nuscenes:PATH[...]")
    demo.add_argument("--precisions", nargs="*", default=None, help="default: fp32 int8 on a CPU, all on a GPU")
    demo.add_argument("--checkpoint", default=None, help="official .pth (random weights if omitted)")
    demo.add_argument("--work-dir", default="out/demo", help="where the engines, pictures and report go")
    demo.add_argument("--pictures", type=int, default=2, help="frames drawn as BEV/camera PNGs (0: none)")
    demo.add_argument("--workers", type=int, default=None,
                     help="processes rendering the synthetic world (default: all cores)")
    demo.set_defaults(func=_demo)

    ev = sub.add_parser("eval", help="run a model or an engine over a dataset: full nuScenes metrics (COCO mAP for "
                        "2D models) and FPS", parents=[common], epilog=DATA_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ev.add_mutually_exclusive_group()
    what.add_argument("--model", default=None, help=f"model name: {MODEL_NAMES}")
    what.add_argument("--engine", default=None, help="engine file from 'bevdeploy build' (CPU-built engines run on a CPU)")
    ev.add_argument("--data", default="synthetic", help="synthetic[:N] or nuscenes:PATH[@version][:split][:N]; "
                    "2D models: synthetic2d:N or coco:PATH[:SPLIT][:N]")
    ev.add_argument("--checkpoint", default=None, help="official .pth for --model (random weights if omitted)")
    ev.add_argument("--allow-partial", action="store_true", help="load a checkpoint with missing/unexpected keys")
    ev.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ev.add_argument("--workers", type=int, default=None,
                   help="processes rendering the synthetic world (default: all cores)")
    ev.add_argument("--results", default=None, help="write the results file here: the nuScenes detection submission "
                    "JSON (BEV models) or the COCO results JSON (2D models)")
    ev.add_argument("--metrics", default=None, help="write the metrics summary (NDS, mAP, TP errors, per class) as JSON")
    ev.add_argument("--save-run", default=None, help="write the raw boxes and latencies to this JSON file")
    ev.add_argument("--score-run", default=None, help="score a saved run instead of running the model")
    ev.add_argument("--no-score", action="store_true", help="run and time only (no nuscenes-devkit needed)")
    ev.add_argument("--batch", type=int, default=None, help="2D models: images per forward (default 32 on a GPU, "
                    "2 on a CPU; an engine runs its own static batch)")
    ev.set_defaults(func=_eval)

    bd = sub.add_parser("build", parents=[common], epilog=DATA_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                        help="build an engine file (deploy form, precision, torch.export, metadata)")
    bd.add_argument("--model", required=True, help=f"model name: {MODEL_NAMES}")
    bd.add_argument("--precision", required=True, help="fp32 | fp16 | fp16x2 | int8 | int8-fp16 | int8-fp16x2 | fp8 | fp8-fp16")
    bd.add_argument("--checkpoint", default=None, help="official .pth (random weights if omitted)")
    bd.add_argument("--allow-partial", action="store_true", help="load a checkpoint with missing/unexpected keys")
    bd.add_argument("--calib", default=None, help="int8 / fp8 calibration data: synthetic:N or nuscenes:PATH[...] "
                    "(default split: train; 2D models: synthetic2d:N or coco:PATH:train2017:500)")
    bd.add_argument("--calib-method", default=None, choices=["entropy", "minmax", "percentile"],
                    help="default: entropy for the BEV models' int8, percentile (99.99th) for YOLOX, minmax for CenterNet and for fp8")
    bd.add_argument("--calib-two-pass", action="store_true",
                    help="entropy / percentile: exact histograms from a first pass over the data (2x calibration "
                         "time; always on under torchrun, whose table equals this one)")
    bd.add_argument("--allow-partial-calib", action="store_true",
                    help="build although the calibration table does not cover the int8 layers exactly (warned)")
    bd.add_argument("--allow-nonfinite", action="store_true", help="load a checkpoint holding NaN/inf weights (warned)")
    bd.add_argument("--calib-table", default=None, help="reuse a saved calibration table (.calib.json)")
    bd.add_argument("--keep-float", nargs="*", default=[], help="layer names to keep in float (int8 / fp8)")
    bd.add_argument("--sensitivity", action="store_true", help="int8: rank layers by output SQNR (<engine>.sensitivity.json)")
    bd.add_argument("--keep-float-below", type=float, default=None, metavar="DB",
                    help="int8: keep float every layer whose output SQNR alone in int8 is below DB (the "
                         "--sensitivity ranking, also written); recorded in the engine")
    bd.add_argument("--smooth-alpha", type=float, default=None, metavar="A",
                    help="int8: per-input-channel smoothing (SmoothQuant) of the int8 layers with alpha A in [0, 1] "
                         "(0.5 is the usual choice): for networks whose layer inputs mix small and large channels")
    bd.add_argument("--bias-correction", action="store_true",
                    help="int8: shift each int8 layer's bias by the mean error its rounding makes on the calibration "
                         "data (one more pass over it; no run-time cost); the shifts are recorded in the engine")
    bd.add_argument("--asymmetric", action="store_true",
                    help="int8: zero points on the int8 layers' inputs (asymmetric codes over each input's signed "
                         "calibrated range): ReLU / SiLU outputs are one-sided, so this halves their rounding step; "
                         "padded convs run slower (the padding holds the zero point's code: 1.3-2.3x a conv on the "
                         "H100, whole 2D engines 31-37%%)")
    bd.add_argument("--fused-epilogues", action="store_true",
                    help="the float ResNet blocks run each conv with its bias (+ residual) + ReLU in one cuDNN call "
                         "instead of a conv and a separate pass (bevdeploy.engine.conv_epilogue), image-reading "
                         "stems read NHWC, CenterNet's head branches run as one conv pair (H100: BEVDet fp16x2 "
                         "1.78 -> 1.51 ms, CenterNet int8-fp16 4.29x -> 5.25x PyTorch FP32 before the head fusion)")
    bd.add_argument("--int8-dcn", action="store_true",
                    help="int8: the DCNv2 convs run int8 too (int8 gathers, fp16 samples x int8 weights, chained; "
                         "BEVFormer-small/base, CenterNet); --qat-steps trains them in that form. Measured on an "
                         "H100 before the kernel took its weight codes as fp16: no faster than the fp16 DCN in the "
                         "BEVFormer-base int8-fp16 engine (22.58 vs 22.59 ms); the current kernel is not timed yet")
    bd.add_argument("--qat-steps", type=int, default=0,
                    help="int8: quantization-aware fine-tuning steps from the calibrated scales (0: PTQ only)")
    bd.add_argument("--qat-data", default=None,
                    help="QAT training data spec (default: --calib); 2D models train on all its images, e.g. "
                         "synthetic2d:600@1 or coco:PATH:train2017 (annotations needed: the loss is the training loss)")
    bd.add_argument("--qat-lr", type=float, default=1e-5, help="QAT learning rate of the weights (cosine decay)")
    bd.add_argument("--qat-batch", type=int, default=1, help="QAT batch size")
    bd.add_argument("--int8-chain", default="on", choices=list(_INT8_CHAIN), help=_INT8_CHAIN_HELP)
    bd.add_argument("--int8-stem", action="store_true",
                    help="int8/fp8: quantize the convs reading the camera image too (default: they stay float, "
                         "which is faster)")
    bd.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available); build where you run")
    bd.add_argument("--batch", type=int, default=None,
                    help="static batch (default 1; 2D models 32 on a GPU, 2 on a CPU); BEVFormer: N independent "
                         "temporal streams, run frame by frame with Engine.step_batch")
    bd.add_argument("-o", "--output", required=True, help="engine file to write")
    bd.set_defaults(func=_build)

    bench = sub.add_parser("bench", parents=[common], help="benchmarks on the GPU; results under bench/results/<gpu>/")
    bench.add_argument("what", nargs="?", choices=["ops", "convs"],
                       help="'ops' for the op benchmark, 'convs' for int8 vs cuDNN fp16 backbone convs (or use --model)")
    bench.add_argument("--model", nargs="*", default=None, help="model name(s): the reference table for each")
    bench.add_argument("--precisions", nargs="*", default=["pytorch"],
                       help="pytorch (eager FP32 baseline) and engine precisions: fp32 fp16 fp16x2 int8 int8-fp16 int8-fp16x2 "
                            "fp8 fp8-fp16")
    bench.add_argument("--data", default="synthetic:16", help="data scored for NDS/mAP and fidelity (synthetic[:N] or nuscenes:PATH)")
    bench.add_argument("--calib", default=None, help="int8 / fp8 calibration data (default: --data)")
    bench.add_argument("--append", action="store_true",
                       help="keep earlier runs' rows for precisions not measured now (each run keeps its own PyTorch row)")
    bench.add_argument("--checkpoint", default=None, help="official .pth (random weights if omitted)")
    bench.add_argument("--batch", type=int, nargs="+", default=None,
                       help="BEV models: one row per batch for each precision (e.g. 1 4 8: independent streams, "
                            "FPS = frames/s on the GPU; default 1); 2D models: one static batch (default 32)")
    bench.add_argument("--results-name", default=None,
                       help="results file stem under --out/<gpu>/ (default: the model name; '<model>-batch' when "
                            "--batch is not just 1; 'convs' for bench convs)")
    bench.add_argument("--int8-chain", default="on", choices=list(_INT8_CHAIN), help=_INT8_CHAIN_HELP)
    bench.add_argument("--int8-dcn", action="store_true",
                       help="BEV models: after each int8 row, a '<precision> (int8 DCN)' row with the DCNv2 convs int8")
    bench.add_argument("--fused-epilogues", action="store_true",
                       help="after each engine row, a '<precision> (fused)' row built with --fused-epilogues (the "
                            "image-reading stem in NHWC, float convs' bias + residual + ReLU in cuDNN's fused calls)")
    bench.add_argument("--inprocess-memory", action="store_true",
                       help="BEV models: read each engine row's GPU memory in the benchmark's own process (which "
                            "still holds the PyTorch row's and the build's leftovers) instead of a fresh process "
                            "that only loads and runs the engine (the default, as a server would)")
    bench.add_argument("--ops", nargs="*", default=None, help="op names (default: all)")
    bench.add_argument("--backbones", nargs="*", default=None,
                       help="bench convs: bevdet-r50 bevformer-small bevformer-base yolox-x centernet-r18-dcn "
                            "(default: all)")
    bench.add_argument("--out", default="bench/results", help="results folder (default: bench/results)")
    bench.set_defaults(func=_bench)

    tr = sub.add_parser("train", parents=[common], help="train a model from scratch on a (synthetic) world; writes an official-layout .pth")
    tr.add_argument("--model", required=True, help="bevdet-r50-cbgs | bevformer-tiny (| bevformer-small | bevformer-base) "
                    "| yolox-x | centernet-r18-dcn")
    tr.add_argument("--data", default="synthetic:600@1", help="synthetic:N[@SEED] (rendered at 900x1600 for BEVFormer, "
                    "450x800 for BEVDet; cached) or nuscenes:PATH; 2D models: synthetic2d:N[@SEED] (360x640 views) "
                    "or coco:PATH:train2017")
    tr.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                    help="2D models: network input canvas (default: official, YOLOX 640 640, CenterNet 512 512); "
                         "recorded in the checkpoint's meta (model_overrides); `python -m bevdeploy.eval.accuracy "
                         "--image-size` trains, builds and scores at one size")
    tr.add_argument("--train-seconds", type=float, default=None,
                    help="time budget: the cosine schedule is shortened to the steps that fit (measured after 25 steps)")
    tr.add_argument("--steps", type=int, default=2000)
    tr.add_argument("--batch", type=int, default=8)
    tr.add_argument("--lr", type=float, default=2e-4, help="AdamW peak learning rate (official 2e-4)")
    tr.add_argument("--weight-decay", type=float, default=1e-2)
    tr.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default: min(500, steps // 10))")
    tr.add_argument("--clip", type=float, default=None, help="max gradient norm (default: BEVDet 5, BEVFormer 35)")
    tr.add_argument("--depth-weight", type=float, default=None,
                    help="BEVDet: weight of the LiDAR depth supervision (default 3; 0 = the official loss only)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default=None)
    tr.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes rendering and loading frames")
    tr.add_argument("-o", "--output", required=True, help="checkpoint file to write")
    tr.set_defaults(func=_train)

    show = sub.add_parser("show", parents=[common], epilog=DATA_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                          help="draw frames: BEV plot (ground truth vs predictions) and the six cameras with boxes "
                               "(PNG); 2D models: each image with its boxes")
    src = show.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help=f"run this model: {MODEL_NAMES}")
    src.add_argument("--engine", default=None, help="run this engine file")
    src.add_argument("--results", default=None,
                     help="draw a results JSON of eval --results (nuScenes; COCO with 2D data)")
    show.add_argument("--data", default="synthetic:4", help="synthetic[:N] or nuscenes:PATH[@version][:split][:N]; "
                      "2D: synthetic2d:N or coco:PATH (a 2D model reads synthetic[:N] as synthetic2d[:N])")
    show.add_argument("--checkpoint", default=None, help="official .pth for --model (random weights if omitted)")
    show.add_argument("--frames", type=int, default=4, help="how many frames to draw (default 4)")
    show.add_argument("--score-threshold", type=float, default=0.3, help="draw predictions at or above this score")
    show.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    show.add_argument("--workers", type=int, default=None,
                     help="processes rendering the synthetic world (default: all cores)")
    show.add_argument("-o", "--output", required=True, help="folder for the PNGs")
    show.set_defaults(func=_show)

    rep = sub.add_parser("report", parents=[common],
                         help="one self-contained HTML page from the bench JSONs of a results folder")
    rep.add_argument("results_dir", help="a bench results folder, e.g. bench/results/nvidia-h100-80gb-hbm3")
    rep.add_argument("-o", "--output", default=None, help="HTML file (default: RESULTS_DIR/report.html)")
    rep.set_defaults(func=_report)

    ex = sub.add_parser("export", parents=[common],
                        help="ONNX for TensorRT users (plugin nodes); --check runs it in onnxruntime against PyTorch")
    ex.add_argument("--model", default=None, help=f"model name: {MODEL_NAMES}")
    ex.add_argument("--checkpoint", default=None, help="official .pth (random weights if omitted)")
    ex.add_argument("-o", "--output", default=None, help="ONNX file to write")
    ex.add_argument("--check", nargs="?", const=True, default=None, metavar="ONNX",
                    help="run the file (the one just written, or ONNX) in onnxruntime and compare with PyTorch")
    ex.set_defaults(func=_export)
    return parser


def _logging(args: argparse.Namespace) -> None:
    import logging

    level = logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING if getattr(args, "quiet", False) \
        else logging.INFO
    # other libraries (torch, Inductor) stay at warnings; -v/-q set bevdeploy's own messages
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bevdeploy").setLevel(level)
    if getattr(args, "quiet", False):
        os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads it for every bar, the devkit's too


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text += f": {e.filename}"
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    _logging(args)
    args.dist = None
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # under torchrun every process that fails prints its line: say which one (rank 0 stays unmarked)
    who = f"bevdeploy {args.verb}" + (f" (rank {os.environ.get('RANK')})" if torchrun and os.environ.get("RANK") != "0"
                                      else "")
    try:
        if torchrun:  # started by torchrun: join its process group
            if args.verb not in ("eval", "train", "build"):
                raise ValueError(f"'{args.verb}' runs in one process; under torchrun use 'eval', 'train' or 'build'")
            from bevdeploy.distributed import init_from_env

            args.dist = init_from_env(getattr(args, "device", None))
        if getattr(args, "device", None):
            from bevdeploy.engine.build import resolve_device

            resolve_device(args.device)  # "--device cuda" on a machine without a GPU: one line, before any work
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{who}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, NotImplementedError, OSError, KeyError) as e:
        if debug:
            raise
        print(f"{who}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001  (an unexpected failure: still one line; --debug shows where)
        if debug:
            raise
        print(f"{who}: internal error: {type(e).__name__}: {_one_line(e)} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        if torchrun:
            from bevdeploy.distributed import shutdown

            shutdown()


if __name__ == "__main__":
    sys.exit(main())
