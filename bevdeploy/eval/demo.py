"""``bevdeploy demo``: the whole pipeline on the synthetic default, on whatever machine this is.

Generate a small synthetic world -> BEVFormer-tiny in PyTorch (random weights unless a checkpoint)
-> build engines (fp32 and int8 on a CPU; every precision on a GPU) -> run each over the world in
temporal order -> NDS/mAP (nuscenes-devkit) and fidelity to the PyTorch boxes -> one table. On a CPU
the ops run their PyTorch references and the int8 layers the PyTorch form of the same int8 math
(Triton's interpreter would take far too long for a whole network); the table says so.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def run_demo(
    *,
    model_name: str = "bevformer-tiny",
    data: str = "synthetic:4",
    precisions: list[str] | None = None,
    checkpoint: str | None = None,
    work_dir: str | Path = "out/demo",
    workers: int = 1,
    pictures: int = 0,
) -> list[dict]:
    """Run the pipeline and return one row per precision (PyTorch first).

    Engines go to ``work_dir``; with ``pictures`` > 0 the first frames are also drawn (BEV and
    cameras, the PyTorch model's boxes) under ``work_dir/pictures``.
    """
    from bevdeploy.data.synthetic import resolve_data_spec
    from bevdeploy.engine import Engine, build
    from bevdeploy.eval.bench_models import fidelity_threshold, pth_size_mb, results_records
    from bevdeploy.eval.detection import run_model, score_run
    from bevdeploy.eval.nuscenes import fidelity_metrics
    from bevdeploy.models import DET2D_MODELS, MODELS
    from bevdeploy.models.checkpoint import load_checkpoint

    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; choose from {sorted(MODELS)}")
    if model_name in DET2D_MODELS:  # before the BEV world is rendered for it
        raise ValueError(f"the demo runs the BEV models; for {model_name}: bevdeploy eval --model {model_name} "
                         f"--data synthetic2d:N (COCO mAP), bevdeploy build, and bevdeploy bench --model {model_name} "
                         "(every precision's mAP, fidelity and images/s; GPU)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if precisions is None:
        precisions = ["fp32", "fp16", "fp16x2", "int8", "int8-fp16"] if device.type == "cuda" else ["fp32", "int8"]
    source = resolve_data_spec(data, workers=workers)
    infos = source.infos(spec=data)

    def score(run):
        return score_run(run, infos, source.dataroot, source.version, source.split)

    torch.manual_seed(0)  # build() seeds 0 too: the engines hold the same random weights
    model = MODELS[model_name]()
    if checkpoint:
        load_checkpoint(model, checkpoint)
    else:
        from bevdeploy.eval.detection import warn_random_weights

        warn_random_weights(model_name, "demo: expect NDS and mAP near 0; fidelity NDS still compares the engines")
    pth_mb = pth_size_mb(model)
    model = model.to(device).eval()
    print(f"[demo] PyTorch {model_name} on {len(infos)} frames ({device.type})", file=sys.stderr)
    ref = run_model(model, infos, model_name, device)
    m = score(ref)
    rows = [{"precision": "pytorch", "fps": ref.fps, "size_mb": pth_mb, "nds": m["NDS"], "map": m["mAP"], "fidelity_nds": None}]
    work = Path(work_dir)
    if pictures:
        from bevdeploy.eval.visualize import show

        paths = show(data, work / "pictures", predictions=ref.boxes, frames=min(pictures, len(infos)), workers=workers,
                     progress=False)
        print(f"[demo] {len(paths)} pictures (BEV and cameras, PyTorch boxes) in {work / 'pictures'}", file=sys.stderr)
    ref_records = results_records(ref, infos)
    threshold = fidelity_threshold(ref_records)
    del model
    for precision in precisions:
        print(f"[demo] build {precision}", file=sys.stderr)
        path = build(model_name, precision, out=work / f"{model_name}-{precision}.engine", checkpoint=checkpoint,
                     calib=data if precision.startswith(("int8", "fp8")) else None, device=device.type)
        engine = Engine.load(path, device=device)
        run = run_model(engine, infos, model_name, device)
        m = score(run)
        fid = fidelity_metrics(results_records(run, infos), ref_records, score_threshold=threshold)
        rows.append({"precision": precision, "fps": run.fps, "size_mb": engine.file_mb, "nds": m["NDS"], "map": m["mAP"],
                     "fidelity_nds": fid["NDS"]})
        del engine
    return rows


def format_demo_table(rows: list[dict], device: str) -> str:
    """The demo's table: FPS, size, NDS/mAP and fidelity NDS per precision, PyTorch first."""
    base = rows[0]
    lines = [f"{'precision':<12}{'FPS':>9}{'x PyTorch':>11}{'size MB':>10}{'x .pth':>8}{'NDS':>8}{'mAP':>8}"
             f"{'fidelity NDS':>14}"]
    for r in rows:
        ratio = "" if not (r["fps"] and base["fps"]) else f"{r['fps'] / base['fps']:.2f}"
        fid = "" if r["fidelity_nds"] is None else f"{r['fidelity_nds']:.4f}"
        lines.append(f"{r['precision']:<12}{(r['fps'] or 0):>9.2f}{ratio:>11}{r['size_mb']:>10.1f}"
                     f"{r['size_mb'] / base['size_mb']:>8.2f}{r['nds']:>8.4f}{r['map']:>8.4f}{fid:>14}")
    if device == "cpu":
        lines.append("(CPU: ops on their PyTorch references, int8 layers in the PyTorch form of the int8 math; "
                     "FPS is not meaningful here - run on a GPU for speed)")
    return "\n".join(lines)


def print_demo_table(rows: list[dict], device: str) -> None:
    print(format_demo_table(rows, device))
