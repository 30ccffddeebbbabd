"""``bevdeploy <verb>``: the command line. Thin: parse, call the public API, print one-line errors."""

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
  bevdeploy bench --model bevformer-tiny --precisions pytorch fp16 int8 --data synthetic:16
  bevdeploy bench --model bevdet-r50 --precisions pytorch fp16 int8-fp16   BEVDet-R50 table (GPU)
  bevdeploy eval --model bevdet-r50-cbgs --data synthetic:16   BEVDet with its 256x704 pipeline
  bevdeploy bench ops                  time every op variant at BEVFormer/BEVDet shapes (GPU)
  bevdeploy train --model bevdet-r50-cbgs --data synthetic:600@1 --steps 2000 --batch 8 -o bevdet.pth
  bevdeploy eval --model bevdet-r50-cbgs --data synthetic:120@2 --checkpoint bevdet.pth   held-out world
  bevdeploy bench ops --ops msda bev_pool_v2
  bevdeploy bench convs                int8 chain convs vs cuDNN fp16, per conv and per backbone (GPU)
"""


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
    from bevdeploy.eval.demo import print_demo_table, run_demo

    rows = run_demo(model_name=args.model, data=args.data, precisions=args.precisions, checkpoint=args.checkpoint,
                    work_dir=args.work_dir, workers=args.workers)
    print_demo_table(rows, "cuda" if torch.cuda.is_available() else "cpu")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from bevdeploy.eval.detection import DetectionRun, evaluate, score_run

    if args.score_run:
        from bevdeploy.data.nuscenes import load_infos
        from bevdeploy.data.synthetic import resolve_data_spec

        source = resolve_data_spec(args.data, workers=args.workers)
        infos = load_infos(source.dataroot, source.version, source.split)
        run = DetectionRun.load(args.score_run)
        metrics = score_run(run, [i for i in infos if i["token"] in run.boxes], source.dataroot, source.version, source.split)
        result = {"model": args.model, "data": args.data, "frames": len(run.boxes), "fps": run.fps,
                  "NDS": metrics["NDS"], "mAP": metrics["mAP"]}
    else:
        result = evaluate(args.model, args.data, checkpoint=args.checkpoint, allow_partial=args.allow_partial,
                          device=args.device, workers=args.workers, save_run=args.save_run, score=not args.no_score)
    fps = "n/a" if result["fps"] is None else f"{result['fps']:.2f}"
    line = f"{result['model']} on {result['data']}: {result['frames']} frames, FPS {fps}"
    if "NDS" in result:
        line += f", NDS {result['NDS']:.4f}, mAP {result['mAP']:.4f}"
    print(line)
    return 0


#: ``--int8-chain`` -> ``build(int8_chain=...)``.
_INT8_CHAIN = {"on": True, "off": False, "float-identity": "float-identity"}
_INT8_CHAIN_HELP = ("int8*: on (default): int8 activations flow between int8 layers; off: every int8 layer writes "
                    "floats; float-identity: chained, but residual blocks keep float boundaries")


def _build(args: argparse.Namespace) -> int:
    from bevdeploy.engine import build

    path = build(args.model, args.precision, out=args.output, checkpoint=args.checkpoint, allow_partial=args.allow_partial,
                 calib=args.calib, calib_method=args.calib_method, calib_table=args.calib_table,
                 keep_float=tuple(args.keep_float), device=args.device, sensitivity=args.sensitivity,
                 qat_steps=args.qat_steps, qat_data=args.qat_data, qat_lr=args.qat_lr, qat_batch=args.qat_batch,
                 int8_chain=_INT8_CHAIN[args.int8_chain])
    print(f"engine written: {path} ({path.stat().st_size / 2**20:.1f} MB)")
    if args.sensitivity:
        from bevdeploy.quant.sensitivity import LayerSensitivity, format_report

        report = [LayerSensitivity(**r) for r in json.loads(Path(f"{path}.sensitivity.json").read_text())]
        print("int8 sensitivity (output SQNR with only that layer in int8; worst first):")
        print(format_report(report))
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.model:
        from bevdeploy.eval.bench_models import bench_model

        engine_precisions = [p for p in args.precisions if p != "pytorch"]
        command = "bevdeploy " + " ".join(sys.argv[1:])
        for name in args.model:
            path = bench_model(name, engine_precisions, data=args.data, calib=args.calib, checkpoint=args.checkpoint,
                               out_dir=args.out, command=command, append=args.append,
                               int8_chain=_INT8_CHAIN[args.int8_chain])
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

        result = run_convs(args.backbones, args.out, command="bevdeploy " + " ".join(sys.argv[1:]))
        print(convs_markdown(result))
        return 0
    raise ValueError("say what to benchmark: 'bevdeploy bench ops', 'bevdeploy bench convs' or "
                     "'bevdeploy bench --model NAME'")


def _train(args: argparse.Namespace) -> int:
    from bevdeploy.train import train_model

    path = train_model(args.model, args.data, steps=args.steps, batch=args.batch, out=args.output, lr=args.lr,
                       weight_decay=args.weight_decay, warmup=args.warmup, clip=args.clip, seed=args.seed,
                       device=args.device,
                       workers=args.workers, training_options=({"depth_weight": args.depth_weight}
                                                               if args.depth_weight is not None else None))
    print(f"checkpoint written: {path} (load it with --checkpoint)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bevdeploy", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)

    demo = sub.add_parser("demo", help="synthetic world -> PyTorch -> engines -> NDS/fidelity table (--ops: op self-check)")
    demo.add_argument("--ops", action="store_true", help="instead: every op's kernels against its reference")
    demo.add_argument("--seed", type=int, default=0, help="seed of the op self-check inputs")
    demo.add_argument("--model", default="bevformer-tiny")
    demo.add_argument("--data", default="synthetic:3", help="synthetic[:N] (generated, cached) or nuscenes:PATH")
    demo.add_argument("--precisions", nargs="*", default=None, help="default: fp32 int8 on a CPU, all on a GPU")
    demo.add_argument("--checkpoint", default=None)
    demo.add_argument("--work-dir", default="out/demo", help="where the engine files go")
    demo.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    demo.set_defaults(func=_demo)

    ev = sub.add_parser("eval", help="run a model over a dataset and print NDS/mAP and FPS")
    ev.add_argument("--model", required=True, help="bevformer-tiny | bevformer-small | bevformer-base | bevdet-r50-cbgs")
    ev.add_argument("--data", default="synthetic", help="synthetic[:N] (generated, cached) or nuscenes:PATH")
    ev.add_argument("--checkpoint", default=None, help="official .pth (random weights if omitted)")
    ev.add_argument("--allow-partial", action="store_true", help="load a checkpoint with missing/unexpected keys")
    ev.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ev.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes rendering the synthetic world")
    ev.add_argument("--save-run", default=None, help="write the raw boxes and latencies to this JSON file")
    ev.add_argument("--score-run", default=None, help="score a saved run instead of running the model")
    ev.add_argument("--no-score", action="store_true", help="run and time only (no nuscenes-devkit needed)")
    ev.set_defaults(func=_eval)

    bd = sub.add_parser("build", help="build an engine file (deploy form, precision, torch.export, metadata)")
    bd.add_argument("--model", required=True, help="bevformer-tiny | bevformer-small | bevformer-base | bevdet-r50-cbgs")
    bd.add_argument("--precision", required=True, help="fp32 | fp16 | fp16x2 | int8 | int8-fp16 | int8-fp16x2")
    bd.add_argument("--checkpoint", default=None)
    bd.add_argument("--allow-partial", action="store_true")
    bd.add_argument("--calib", default=None, help="int8 calibration data: synthetic:N or nuscenes:PATH")
    bd.add_argument("--calib-method", default="entropy", choices=["entropy", "minmax", "percentile"])
    bd.add_argument("--calib-table", default=None, help="reuse a saved calibration table (.calib.json)")
    bd.add_argument("--keep-float", nargs="*", default=[], help="layer names to keep in float")
    bd.add_argument("--sensitivity", action="store_true", help="int8: rank layers by output SQNR (<engine>.sensitivity.json)")
    bd.add_argument("--qat-steps", type=int, default=0,
                    help="int8: quantization-aware fine-tuning steps from the calibrated scales (0: PTQ only)")
    bd.add_argument("--qat-data", default=None, help="QAT training data spec (default: --calib)")
    bd.add_argument("--qat-lr", type=float, default=1e-5, help="QAT learning rate of the weights (cosine decay)")
    bd.add_argument("--qat-batch", type=int, default=1, help="QAT batch size")
    bd.add_argument("--int8-chain", default="on", choices=list(_INT8_CHAIN), help=_INT8_CHAIN_HELP)
    bd.add_argument("--device", default=None)
    bd.add_argument("-o", "--output", required=True, help="engine file to write")
    bd.set_defaults(func=_build)

    bench = sub.add_parser("bench", help="benchmarks on the GPU; results under bench/results/<gpu>/")
    bench.add_argument("what", nargs="?", choices=["ops", "convs"],
                       help="'ops' for the op benchmark, 'convs' for int8 vs cuDNN fp16 backbone convs (or use --model)")
    bench.add_argument("--model", nargs="*", default=None, help="model name(s): the reference table for each")
    bench.add_argument("--precisions", nargs="*", default=["pytorch"],
                       help="pytorch (eager FP32 baseline) and engine precisions: fp32 fp16 fp16x2 int8 int8-fp16 int8-fp16x2")
    bench.add_argument("--data", default="synthetic:16", help="data scored for NDS/mAP and fidelity (synthetic[:N] or nuscenes:PATH)")
    bench.add_argument("--calib", default=None, help="int8 calibration data (default: --data)")
    bench.add_argument("--append", action="store_true",
                       help="keep earlier runs' rows for precisions not measured now (each run keeps its own PyTorch row)")
    bench.add_argument("--checkpoint", default=None)
    bench.add_argument("--int8-chain", default="on", choices=list(_INT8_CHAIN), help=_INT8_CHAIN_HELP)
    bench.add_argument("--ops", nargs="*", default=None, help="op names (default: all)")
    bench.add_argument("--backbones", nargs="*", default=None,
                       help="bench convs: bevdet-r50 bevformer-small bevformer-base (default: all)")
    bench.add_argument("--out", default="bench/results", help="results folder (default: bench/results)")
    bench.set_defaults(func=_bench)

    tr = sub.add_parser("train", help="train a model from scratch on a (synthetic) world; writes an official-layout .pth")
    tr.add_argument("--model", required=True, help="bevdet-r50-cbgs | bevformer-tiny (| bevformer-small | bevformer-base)")
    tr.add_argument("--data", default="synthetic:600@1", help="synthetic:N[@SEED] (rendered at 900x1600 for BEVFormer, 450x800 for BEVDet; cached) or nuscenes:PATH")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, NotImplementedError) as e:
        print(f"bevdeploy {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
