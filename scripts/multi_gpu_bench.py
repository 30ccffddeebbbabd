"""Issue 16's run: training, QAT and evaluation on one process and on N (torchrun), speed-up and NDS compared.

Every stage is the user's own command, launched by ``torchrun --standalone --nproc-per-node K`` for K = 1 and
K = N in turn (the same launcher both times, so the only difference is the process count):

1. ``bevdeploy train`` (DDP: every process its own batches of ``--batch``, gradients averaged; the global batch
   grows with N, as data-parallel training does). Throughput: frames per second over the steps after the
   first logged ones (from the checkpoint's history, rank 0's clock; the ranks step together), so the
   one-off costs of the first steps (cuDNN plans, allocator growth) do not decide the ratio.
2. ``bevdeploy build --precision int8 --qat-steps Q`` from the one-process checkpoint: calibration split by
   scene and merged, QAT with averaged gradients. Throughput: the QAT loop's frames per second (the
   engine's ``qat`` metadata).
3. ``bevdeploy eval --checkpoint`` (the one-process checkpoint) over the held-out world: scenes split over
   the processes, rank 0 scores once. Throughput: frames per second of the whole pass (reading,
   preprocessing, forwards, decoding: the slowest process's wall time); NDS must be the same.

Targets (issue 16): training >= 0.85 x N x one process's frames/s, evaluation >= 0.9 x N x one process's,
the same NDS. Writes multi-gpu.{md,json} under bench/results/<gpu>/ (``--results-dir`` elsewhere) and
``--out``; every command's log under ``--work``.

GPU: python scripts/multi_gpu_bench.py --nproc 8  (the device call: scripts/gpu_multi.sh)
CPU (gloo; what tests/distributed/test_multi_gpu_bench.py runs, reduced model):
    python scripts/multi_gpu_bench.py --nproc 2 --device cpu --module tests.distributed._cli_worker ...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {"train": 0.85, "qat": None, "eval": 0.9}


def steady_throughput(meta: dict, skip: int = 1) -> float | None:
    """Frames per second between the ``skip``-th logged training step and the last one (rank 0's clock);
    None when the history has fewer than two entries after the skipped ones."""
    hist = [h for h in meta.get("history", []) if "seconds" in h]
    if len(hist) < skip + 2:
        return None
    first, last = hist[skip], hist[-1]
    seconds = last["seconds"] - first["seconds"]
    return (last["step"] - first["step"]) * meta["global_batch"] / seconds if seconds > 0 else None


def _launch(args: argparse.Namespace, nproc: int, argv: list[str], log: Path) -> float:
    """``torchrun ... -m MODULE ARGV`` with ``nproc`` processes; returns its wall seconds; raises with the
    log's tail when it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", args.module, *argv]
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    # the host's cores shared out the same way for 1 and N processes (torchrun would give each of N one thread)
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // nproc))
    if args.device == "cpu":
        env["TRITON_INTERPRET"] = "0"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                            timeout=args.stage_timeout).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(argv[:3])} with {nproc} processes failed (exit {rc}); {log}:\n" + "\n".join(tail))
    print(f"  {argv[0]} x{nproc}: {seconds:.1f} s (log {log.name})", file=sys.stderr)
    return seconds


def run_stages(args: argparse.Namespace) -> dict:
    import torch

    from bevdeploy.engine.engine_file import read_archive
    from bevdeploy.eval.detection import DetectionRun

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    common = ["--device", args.device, "-q"]  # every command: where it runs, no progress bars

    def workers(k: int) -> list[str]:  # the loader processes shared out over the ranks
        return ["--workers", str(max(1, args.workers // k))]

    counts = [1, args.nproc]
    rows: list[dict] = []
    nds: dict[int, float] = {}
    for k in counts:
        ck = work / f"train-x{k}.pth"
        wall = _launch(args, k, ["train", "--model", args.model, "--data", args.train_data, "--steps", str(args.steps),
                                 "--batch", str(args.batch), "--seed", "0", *common, *workers(k), "-o", str(ck)],
                       work / f"train-x{k}.log")
        meta = torch.load(ck, map_location="cpu", weights_only=False)["meta"]
        rows.append(dict(stage="train", processes=k, frames_per_s=steady_throughput(meta),
                         frames_per_s_whole=meta["throughput"]["frames_per_s"], steps=meta["steps"],
                         batch_per_process=meta["batch"], global_batch=meta["global_batch"],
                         final_loss=round(meta["final_loss"], 4), wall_s=round(wall, 1)))
    checkpoint = str(work / "train-x1.pth")
    if args.qat_steps:
        for k in counts:
            engine = work / f"qat-x{k}.engine"
            wall = _launch(args, k, ["build", "--model", args.model, "--checkpoint", checkpoint, "--precision", "int8",
                                     "--calib", args.calib, "--qat-steps", str(args.qat_steps), "--qat-batch",
                                     str(args.qat_batch), *common, "-o", str(engine)], work / f"qat-x{k}.log")
            qat = read_archive(engine).metadata["qat"]
            rows.append(dict(stage="qat", processes=k, frames_per_s=qat.get("frames_per_s"), steps=qat["steps"],
                             batch_per_process=qat["batch"], global_batch=qat["global_batch"],
                             final_loss=round(qat["loss_last"], 4), wall_s=round(wall, 1)))
    for k in counts:
        metrics, run_file = work / f"eval-x{k}.metrics.json", work / f"eval-x{k}.run.json"
        wall = _launch(args, k, ["eval", "--model", args.model, "--checkpoint", checkpoint, "--data", args.eval_data,
                                 *common, *workers(k), "--metrics", str(metrics), "--save-run", str(run_file)],
                       work / f"eval-x{k}.log")
        run = DetectionRun.load(run_file)
        nds[k] = json.loads(metrics.read_text())["NDS"]
        rows.append(dict(stage="eval", processes=k, frames_per_s=run.throughput, frames=len(run.latencies_ms),
                         nds=round(nds[k], 4), wall_s=round(wall, 1)))
    base = {r["stage"]: r["frames_per_s"] for r in rows if r["processes"] == 1}
    for r in rows:  # ratios of the measured rates; the rates are stored rounded to 0.01 frames/s
        one, rate = base.get(r["stage"]), r["frames_per_s"]
        r["frames_per_s"] = None if rate is None else round(rate, 2)
        if r["processes"] > 1 and one and rate:
            r["speedup"] = round(rate / one, 2)
            r["efficiency"] = round(rate / (one * r["processes"]), 3)
            target = TARGETS[r["stage"]]
            if target is not None:
                r["target"] = f">= {target} x N"
                r["met"] = r["efficiency"] >= target
    same_nds = abs(nds[1] - nds[args.nproc]) < 5e-4
    return {"rows": rows, "same_nds": same_nds, "nds": {str(k): v for k, v in nds.items()}}


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"cpu ({os.cpu_count()} cores, gloo)"


def write_results(args: argparse.Namespace, result: dict, command: str) -> list[Path]:
    import torch

    doc = {"device": device_name(args.device), "torch": torch.__version__, "command": command,
           "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model, "nproc": args.nproc,
           "train_data": args.train_data, "eval_data": args.eval_data, "calib": args.calib, **result}
    cols = ["stage", "processes", "frames_per_s", "speedup", "efficiency", "target", "met", "nds", "steps",
            "batch_per_process", "global_batch", "final_loss", "frames", "wall_s", "frames_per_s_whole"]
    lines = [f"# Several processes: {args.model} on {doc['device']}", "",
             f"torch {doc['torch']}, written {doc['written']}. Command: `{command}`", "",
             "Each stage is the user's command under `torchrun --standalone --nproc-per-node K`, K = 1 then "
             f"{args.nproc}. train: `bevdeploy train` on `{args.train_data}` (DDP, `--batch` per process), "
             "frames/s over the steps after the first logged ones (rank 0's clock); qat: `bevdeploy build "
             f"--precision int8 --qat-steps` (calibration on `{args.calib}` merged over the processes), the QAT "
             f"loop's frames/s; eval: `bevdeploy eval` on `{args.eval_data}` with the one-process checkpoint, "
             "frames/s of the whole pass (reading, preprocessing, forwards, decoding). efficiency = frames/s / "
             "(N x one process's frames/s).", "",
             f"NDS with 1 process {result['nds']['1']:.4f}, with {args.nproc}: {result['nds'][str(args.nproc)]:.4f} "
             f"({'the same' if result['same_nds'] else 'DIFFERENT'}).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in cols) + " |")
    if args.results_dir:
        folder = Path(args.results_dir)
    else:
        from bevdeploy.eval.timing import gpu_dirname

        folder = ROOT / "bench" / "results" / (gpu_dirname(0) if args.device == "cuda" else "cpu")
    written = []
    for d in [folder] + ([Path(args.out)] if args.out else []):
        d.mkdir(parents=True, exist_ok=True)
        (d / "multi-gpu.json").write_text(json.dumps(doc, indent=1))
        (d / "multi-gpu.md").write_text("\n".join(lines) + "\n")
        written.append(d / "multi-gpu.md")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=None, help="processes of the N run (default: the GPUs here)")
    p.add_argument("--model", default="bevdet-r50-cbgs")
    p.add_argument("--train-data", default="synthetic:600@1")
    p.add_argument("--eval-data", default="synthetic:120@2")
    p.add_argument("--calib", default="synthetic:64@1")
    p.add_argument("--steps", type=int, default=40, help="training steps of each run")
    p.add_argument("--batch", type=int, default=8, help="training batch per process")
    p.add_argument("--qat-steps", type=int, default=30, help="0: no QAT stage")
    p.add_argument("--qat-batch", type=int, default=4)
    p.add_argument("--device", default=None, help="cuda (NCCL) or cpu (gloo); default cuda when available")
    p.add_argument("--module", default="bevdeploy.cli", help="what torchrun runs (tests: a reduced-model wrapper)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                   help="processes rendering the worlds and reading frames (train and eval), in all: each of K "
                        "ranks gets 1/K of them")
    p.add_argument("--work", default="/tmp/multi-gpu")
    p.add_argument("--out", default=None, help="also write the results here (the device call's $OUT)")
    p.add_argument("--results-dir", default=None, help="instead of bench/results/<gpu>/")
    p.add_argument("--stage-timeout", type=float, default=None, help="seconds one command may take")
    args = p.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.nproc is None:
        args.nproc = torch.cuda.device_count() if args.device == "cuda" else 2
    if args.nproc < 2:
        p.error(f"--nproc must be >= 2 (the run compares one process with N), got {args.nproc}"
                + (" (one GPU here)" if args.device == "cuda" else ""))
    if args.device == "cuda" and args.nproc > torch.cuda.device_count():
        p.error(f"--nproc {args.nproc} but {torch.cuda.device_count()} GPUs here")
    command = "python scripts/multi_gpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = run_stages(args)
    for path in write_results(args, result, command):
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
