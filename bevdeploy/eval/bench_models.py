"""``bevdeploy bench --model M``: the reference system's table, measured in one run on one GPU.

Rows: PyTorch eager FP32 (as users run it: default settings, ``torch.no_grad()``, our fp32 GPU
kernels standing in for mmcv's CUDA ops), then each engine precision when the engine exists.
FPS from CUDA events around whole forwards after warm-up (median), batch 1 unless stated; memory
= device memory in use by this process (total - free, which includes the CUDA context, like the
reference system's nvidia-smi figure) and the allocator's peak; engine size = file size.
Fidelity twice: ``fidelity_nds`` scores each engine's boxes over the dataset against the PyTorch
boxes as ground truth; ``output_sqnr_db`` compares the raw outputs with PyTorch's on the timing
inputs (the worst output; per output in the JSON). With random weights the first is dominated by
near-tied scores changing places; the second measures the numerics regardless of the weights.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch

from bevdeploy.eval.timing import gpu_dirname, time_eager
from bevdeploy.quant.sensitivity import sqnr_db

_ROW_KEYS = ("model", "precision", "batch", "fps", "fps_ratio", "engine_mb", "memory_mb", "memory_ratio",
             "size_ratio", "nds", "map", "fidelity_nds", "output_sqnr_db")


def _device_memory_mb() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def rig_lidar2img(scale: float) -> torch.Tensor:
    """[6, 4, 4] LiDAR(~ego) -> pixel matrices of the synthetic world's nuScenes-like rig, for
    images resized by ``scale`` from 1600x900 (so the spatial cross-attention sees real geometry)."""
    import numpy as np

    from bevdeploy.data.synthetic import nuscenes_rig

    rig = nuscenes_rig((round(900 * scale), round(1600 * scale)))
    mats = []
    for k, r, t in zip(rig.intrinsics, rig.rotations, rig.translations):
        cam2ego = np.eye(4)
        cam2ego[:3, :3], cam2ego[:3, 3] = r, t
        k4 = np.eye(4)
        k4[:3, :3] = k
        mats.append(k4 @ np.linalg.inv(cam2ego))
    return torch.tensor(np.stack(mats), dtype=torch.float32)


def random_inputs(model, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full-resolution inputs of a BEVFormer-like model (random image, a plausible camera rig)."""
    cfg = model.config
    g = torch.Generator(device="cuda").manual_seed(seed)
    H, W = cfg.image_size
    image = torch.randn(batch, 6, 3, H, W, device="cuda", generator=g)
    lidar2img = rig_lidar2img(W / 1600.0).cuda().expand(batch, 6, 4, 4).contiguous()
    can_bus = torch.zeros(batch, 18, device="cuda")
    prev_bev = torch.randn(batch, cfg.bev_h * cfg.bev_w, cfg.embed_dims, device="cuda", generator=g)
    use_prev_bev = torch.ones(batch, device="cuda")
    return {"image": image, "lidar2img": lidar2img, "can_bus": can_bus, "prev_bev": prev_bev, "use_prev_bev": use_prev_bev}


def bevdet_inputs(model, info: dict, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full-resolution inputs of BEVDet: a random image and the pooling indices of ``info``'s camera
    geometry (images not loaded: the original size is the pipeline's ``src_size``)."""
    from bevdeploy.data.preprocess_bevdet import GEOMETRY_KEYS, BEVDetPreprocess, prepare_bevdet_inputs
    from bevdeploy.models.bevdet import BEVPoolRanks

    H, W = model.config.image_size
    x = prepare_bevdet_inputs(info, BEVDetPreprocess(input_size=(H, W)), load=False)
    geometry = [x[k].expand(batch, *x[k].shape).to("cuda") for k in GEOMETRY_KEYS]
    g = torch.Generator(device="cuda").manual_seed(seed)
    image = torch.randn(batch, 6, 3, H, W, device="cuda", generator=g)
    return {"image": image, **dict(zip(BEVPoolRanks._fields, model.prepare(*geometry)))}


def timing_inputs(model, infos, batch: int = 1) -> dict[str, torch.Tensor]:
    """The inputs every row of a table is timed and compared on: BEVFormer a random frame with the
    synthetic rig, BEVDet a random image with the first sample's camera geometry."""
    from bevdeploy.engine.model_io import family

    if family(model) == "bevdet":
        return bevdet_inputs(model, infos[0], batch)
    return random_inputs(model, batch)


def pytorch_row(name: str, model, inputs: dict[str, torch.Tensor], base_mem: float, iters: int = 20
                ) -> tuple[dict, dict[str, torch.Tensor]]:
    """PyTorch eager FP32 FPS and memory of ``model`` (already on the GPU) on ``inputs``, and its
    outputs on them (the reference of every engine row's ``output_sqnr_db``)."""
    with torch.no_grad():
        ms = time_eager(lambda: model(**inputs), iters=iters, warmup=3)
        ref = {k: v.detach().clone() for k, v in model(**inputs).items()}
    row = dict.fromkeys(_ROW_KEYS)
    row.update(
        model=name, precision="pytorch", batch=int(inputs["image"].shape[0]),
        fps=round(1000.0 * inputs["image"].shape[0] / ms, 2), fps_ratio=1.0,
        memory_mb=round(_device_memory_mb(), 1), memory_ratio=1.0,
        peak_allocated_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1),
        memory_before_model_mb=round(base_mem, 1), latency_ms=round(ms, 3),
        params_mb=round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1),
    )
    return row, ref


def write_results(name: str, rows: list[dict], out_dir: str | Path = "bench/results", command: str = "",
                  keep_rows: list[dict] | None = None, extra: dict | None = None, notes: list[str] | None = None) -> Path:
    """``<out_dir>/<gpu>/<name>.{json,md}`` (the reference system's table: one row per precision).

    ``keep_rows``: rows of earlier runs to keep in the file after this run's ``rows`` (see
    :func:`bench_model`'s ``append``); every row names its run, and each ratio is against the
    PyTorch row of that same run. ``extra``: more top-level JSON entries (e.g. the training
    budget); ``notes``: paragraphs of the markdown above the table. Without a GPU (CPU test runs)
    the folder is ``<out_dir>/cpu``.
    """
    on_gpu = torch.cuda.is_available()
    result = {
        "gpu": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command or "bevdeploy " + " ".join(sys.argv[1:]),
        **(extra or {}),
        "rows": rows + list(keep_rows or []),
    }
    for r in rows:  # rows of this run: stamped by the caller (bench_model) or by this write
        r.setdefault("run", result["date"])
        r.setdefault("command", result["command"])
    rows = result["rows"]
    folder = Path(out_dir) / (gpu_dirname() if on_gpu else "cpu")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    hidden = {"command", "output_sqnr_db_each"}  # in the JSON
    keys = list(_ROW_KEYS) + sorted({k for r in rows for k in r} - set(_ROW_KEYS) - hidden)
    commands = list(dict.fromkeys(f"{r.get('run')}: `{r.get('command')}`" for r in rows))
    md = [f"# {name} on {result['gpu']}", "", f"torch {result['torch']}, written {result['date']}", "",
          *[line for note in (notes or []) for line in (note, "")],
          "Runs (each ratio is against the PyTorch row of its own run):", *[f"- {c}" for c in commands], "",
          "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + " |" for r in rows]
    (folder / f"{name}.md").write_text("\n".join(md) + "\n")
    return path


def earlier_rows(path: str | Path, replaced: set[str]) -> list[dict]:
    """Rows of the results file ``path`` (``<out_dir>/<gpu>/<name>.json``) from earlier runs that
    this run does not re-measure (precisions in ``replaced``).

    A run's engine rows are kept only with that run's PyTorch row (their ratios refer to it); an
    earlier run left with no engine row is dropped whole. Rows from files without run stamps count
    as one run.
    """
    path = Path(path)
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: cannot append to a results file that is not JSON ({e}); move it away") from e
    rows = [dict(r, run=r.get("run", doc.get("date")), command=r.get("command", doc.get("command")))
            for r in doc.get("rows", [])]
    keep = [r for r in rows if r["precision"] == "pytorch" or r["precision"] not in replaced]
    runs_with_engines = {r["run"] for r in keep if r["precision"] != "pytorch"}
    return [r for r in keep if r["run"] in runs_with_engines]


def pth_size_mb(model) -> float:
    """Size of the model's state dict saved as a PyTorch .pth (the reference table's baseline size)."""
    import io

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes / 2**20


def results_records(run, infos) -> dict:
    from bevdeploy.eval.nuscenes import to_nusc_results

    by_token = {i["token"]: i for i in infos}
    return {t: to_nusc_results(t, b, s, lab, by_token[t]) for t, (b, s, lab) in run.boxes.items()}


def fidelity_threshold(ref_records: dict) -> float:
    """Score threshold for fidelity: the official 0.3, or half the best reference score when lower.

    Untrained (random) weights score low (the head's prior bias), so a fixed 0.3 would keep no
    reference box; half the best score keeps the reference's most confident boxes.
    """
    best = max((r["detection_score"] for recs in ref_records.values() for r in recs), default=0.0)
    return min(0.3, 0.5 * best)


def bench_model(
    name: str,
    precisions: list[str],
    *,
    data: str = "synthetic:16",
    calib: str | None = None,
    checkpoint: str | None = None,
    work_dir: str | Path = "out/engines",
    iters: int = 30,
    workers: int = 8,
    out_dir: str | Path = "bench/results",
    command: str = "",
    append: bool = False,
    batch: int | None = None,
    int8_chain: bool | str = True,
) -> Path:
    """The reference system's table for one model, measured in one run on this GPU.

    The 2D models (``yolox-x``, ``centernet-r18-dcn``) go to :func:`bevdeploy.eval.bench_det2d.bench_det2d`
    (COCO mAP, images/s at ``batch``, default 32); the BEV models run at batch 1 (``batch`` unused).

    PyTorch eager FP32 first (FPS on random full-size inputs, NDS/mAP over ``data``), then for each
    precision: build the engine (int8*: calibrated on ``calib``, default the same data spec), load it
    (Inductor + CUDA graphs), time it on the same inputs, score it over ``data`` and against the
    PyTorch boxes (fidelity). Memory is the device memory in use (total - free) while each runs,
    after freeing the previous row's objects; it includes the CUDA context, as nvidia-smi would.

    ``append``: keep the rows of earlier runs in the results file for precisions this run does not
    measure (for tables too long to build in one sitting); this run measures its own PyTorch row
    and its ratios are against it. Without it the file holds this run alone.

    ``int8_chain``: the int8* engines' ``int8_chain`` (``bevdeploy.engine.build``).
    """
    import gc

    from bevdeploy.data.nuscenes import load_infos
    from bevdeploy.data.synthetic import resolve_data_spec
    from bevdeploy.engine import Engine, build
    from bevdeploy.engine.deploy import precision_spec
    from bevdeploy.eval.detection import run_model, score_run
    from bevdeploy.eval.nuscenes import fidelity_metrics
    from bevdeploy.models import MODELS

    from bevdeploy.models import DET2D_MODELS

    if name in DET2D_MODELS:  # the 2D table: COCO mAP, images/s at a static batch
        from bevdeploy.eval.bench_det2d import bench_det2d

        return bench_det2d(name, precisions, data=data, calib=calib, checkpoint=checkpoint, batch=batch or 32,
                           work_dir=work_dir, iters=iters, out_dir=out_dir, command=command, append=append)
    if not torch.cuda.is_available():
        raise RuntimeError("bevdeploy bench --model times engines on a CUDA GPU and none is visible here; on a CPU, "
                           "`bevdeploy demo --model NAME` runs the same pipeline (without meaningful timings)")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    for precision in precisions:  # before an hour of work, not after the PyTorch row
        precision_spec(precision)
    source = resolve_data_spec(data, workers=workers)
    infos = load_infos(source.dataroot, source.version, source.split, progress=False)
    if source.num_samples is not None:
        infos = infos[: source.num_samples]
    if not infos:
        raise ValueError(f"data {data!r} holds no samples")
    dev = torch.device("cuda")
    keep_rows = earlier_rows(Path(out_dir) / gpu_dirname() / f"{name}.json", set(precisions)) if append else []
    run_id = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    # PyTorch eager FP32
    torch.manual_seed(0)
    model = MODELS[name]()
    if checkpoint:
        from bevdeploy.models.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint)
    else:
        from bevdeploy.eval.detection import warn_random_weights

        warn_random_weights(name, "bench: NDS near 0; fidelity and output SQNR still measure the engines")
    pth_mb = pth_size_mb(model)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base_mem = _device_memory_mb()
    model = model.to(dev).eval()
    inputs = timing_inputs(model, infos)
    row, ref_out = pytorch_row(name, model, inputs, base_mem, iters=iters)
    ref_run = run_model(model, infos, name, dev)
    metrics = score_run(ref_run, infos, source.dataroot, source.version, source.split)
    row.update(nds=round(metrics["NDS"], 4), map=round(metrics["mAP"], 4), engine_mb=round(pth_mb, 1), size_ratio=1.0,
               note="engine_mb = the .pth of the state dict", run=run_id)
    rows = [row]
    base_fps, base_mem = row["fps"], row["memory_mb"]
    ref_records = results_records(ref_run, infos)
    threshold = fidelity_threshold(ref_records)
    row["fidelity_threshold"] = round(threshold, 4)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    for precision in precisions:
        path = work / f"{name}-{precision}.engine"
        build(name, precision, out=path, checkpoint=checkpoint,
              calib=(calib or data) if precision_spec(precision).quantized else None,
              int8_chain=int8_chain)
        gc.collect()
        torch.cuda.empty_cache()
        engine = Engine.load(path, device="cuda")
        ms = time_eager(lambda: engine(**inputs), iters=iters, warmup=3)
        mem = _device_memory_mb()
        out = engine(**inputs)
        sqnr = {k: round(sqnr_db(ref_out[k], out[k]), 1) for k in engine.output_names}
        run = run_model(engine, infos, name, dev)
        m = score_run(run, infos, source.dataroot, source.version, source.split)
        fid = fidelity_metrics(results_records(run, infos), ref_records, score_threshold=threshold)
        r = dict.fromkeys(_ROW_KEYS)
        r.update(model=name, precision=precision, batch=1, fps=round(1000.0 / ms, 2), fps_ratio=round(1000.0 / ms / base_fps, 2),
                 engine_mb=round(engine.file_mb, 1), size_ratio=round(engine.file_mb / pth_mb, 3), memory_mb=round(mem, 1),
                 memory_ratio=round(mem / base_mem, 3), nds=round(m["NDS"], 4), map=round(m["mAP"], 4),
                 fidelity_nds=round(fid["NDS"], 4), latency_ms=round(ms, 3),
                 output_sqnr_db=min(sqnr.values()), output_sqnr_db_each=sqnr,
                 int8_layers=sum(1 for _, p in engine.layer_precisions if p == "int8") if precision.startswith("int8") else None,
                 fp8_layers=sum(1 for _, p in engine.layer_precisions if p == "fp8") if precision.startswith("fp8") else None,
                 run=run_id)
        rows.append(r)
        print(f"{name} {precision}: {r['fps']} FPS ({r['fps_ratio']}x), {r['engine_mb']} MB, mem {r['memory_mb']} MB, "
              f"NDS {r['nds']}, fidelity NDS {r['fidelity_nds']}", file=sys.stderr)
        del engine, out
        gc.collect()
        torch.cuda.empty_cache()
        write_results(name, rows, out_dir, command, keep_rows)  # after every row: a run cut short keeps what it measured
    return write_results(name, rows, out_dir, command, keep_rows)
