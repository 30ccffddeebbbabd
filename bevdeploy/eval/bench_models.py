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
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bevdeploy.eval.timing import gpu_dirname, time_eager
from bevdeploy.quant.sensitivity import sqnr_db

#: Where the model tables run (the tests dry-run bench_model on the CPU by changing it).
_DEVICE = "cuda"
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


def random_inputs(model, batch: int = 1, seed: int = 0, device: str = "cuda") -> dict[str, torch.Tensor]:
    """Full-resolution inputs of a BEVFormer-like model (random image, a plausible camera rig)."""
    cfg = model.config
    g = torch.Generator(device=device).manual_seed(seed)
    H, W = cfg.image_size
    image = torch.randn(batch, 6, 3, H, W, device=device, generator=g)
    lidar2img = rig_lidar2img(W / 1600.0).to(device).expand(batch, 6, 4, 4).contiguous()
    can_bus = torch.zeros(batch, 18, device=device)
    prev_bev = torch.randn(batch, cfg.bev_h * cfg.bev_w, cfg.embed_dims, device=device, generator=g)
    use_prev_bev = torch.ones(batch, device=device)
    return {"image": image, "lidar2img": lidar2img, "can_bus": can_bus, "prev_bev": prev_bev, "use_prev_bev": use_prev_bev}


def bevdet_inputs(model, info: dict, batch: int = 1, seed: int = 0, device: str = "cuda") -> dict[str, torch.Tensor]:
    """Full-resolution inputs of BEVDet: a random image and the pooling indices of ``info``'s camera
    geometry (images not loaded: the original size is the pipeline's ``src_size``)."""
    from bevdeploy.data.preprocess_bevdet import GEOMETRY_KEYS, BEVDetPreprocess, prepare_bevdet_inputs
    from bevdeploy.models.bevdet import BEVPoolRanks

    H, W = model.config.image_size
    x = prepare_bevdet_inputs(info, BEVDetPreprocess(input_size=(H, W)), load=False)
    geometry = [x[k].expand(batch, *x[k].shape).to(device) for k in GEOMETRY_KEYS]
    g = torch.Generator(device=device).manual_seed(seed)
    image = torch.randn(batch, 6, 3, H, W, device=device, generator=g)
    return {"image": image, **dict(zip(BEVPoolRanks._fields, model.prepare(*geometry)))}


def timing_inputs(model, infos, batch: int = 1, device: str = "cuda") -> dict[str, torch.Tensor]:
    """The inputs every row of a table is timed and compared on: BEVFormer a random frame with the
    synthetic rig, BEVDet a random image with the first sample's camera geometry."""
    from bevdeploy.engine.model_io import family

    if family(model) == "bevdet":
        return bevdet_inputs(model, infos[0], batch, device=device)
    return random_inputs(model, batch, device=device)


def measure(fn: Callable[[], object], iters: int = 20, warmup: int = 3) -> dict[str, float]:
    """Time ``fn`` and read its memory, the same way for the PyTorch row and every engine row.

    Warm-up calls (compile, autotune, the allocator's first growth), then the cached blocks nobody
    holds are given back and one more call settles the working set; the allocator's peak is reset
    and the timed calls run (CUDA events, median). Then: ``memory_mb`` the device memory in use by
    the process (total - free: CUDA context, weights, cached and graph-pool blocks, as nvidia-smi
    shows), ``allocated_mb`` the tensors alive, ``peak_allocated_mb`` the allocator's peak during
    the timed calls (weights + the largest working set of one call).
    """
    import gc

    with torch.no_grad():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        ms = time_eager(fn, iters=iters, warmup=0)
    return {"ms": ms, "memory_mb": round(_device_memory_mb(), 1),
            "allocated_mb": round(torch.cuda.memory_allocated() / 2**20, 1),
            "peak_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def pytorch_row(name: str, model, inputs: dict[str, torch.Tensor], base_mem: float, iters: int = 20
                ) -> tuple[dict, dict[str, torch.Tensor]]:
    """PyTorch eager FP32 FPS and memory of ``model`` (already on the GPU) on ``inputs``
    (:func:`measure`), and its outputs on them (the reference of every engine row's ``output_sqnr_db``)."""
    mem = measure(lambda: model(**inputs), iters=iters)
    with torch.no_grad():
        ref = {k: v.detach().clone() for k, v in model(**inputs).items()}
    b = int(inputs["image"].shape[0])
    row = dict.fromkeys(_ROW_KEYS)
    row.update(
        model=name, precision="pytorch", batch=b, fps=round(1000.0 * b / mem["ms"], 2), fps_ratio=1.0,
        memory_mb=mem["memory_mb"], memory_ratio=1.0, allocated_mb=mem["allocated_mb"],
        peak_allocated_mb=mem["peak_allocated_mb"], peak_ratio=1.0,
        memory_before_model_mb=round(base_mem, 1), latency_ms=round(mem["ms"], 3),
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


def earlier_rows(path: str | Path, replaced: set[str], batches: set[int] | None = None) -> list[dict]:
    """Rows of the results file ``path`` (``<out_dir>/<gpu>/<name>.json``) from earlier runs that
    this run does not re-measure (precisions in ``replaced``, at the ``batches`` this run measures;
    all batches when None; a row without a batch counts as batch 1).

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
    def remeasured(r: dict) -> bool:
        return r["precision"] in replaced and (batches is None or (r.get("batch") or 1) in batches)

    keep = [r for r in rows if r["precision"] == "pytorch" or not remeasured(r)]
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


def engine_runs(precisions: list[str], int8_dcn: bool = False,
                fused_epilogues: bool = False) -> list[tuple[str, bool, bool, str]]:
    """The engine rows of a BEV table in order: ``(precision, int8 DCN, fused epilogues, label)``; each int8
    precision followed by its int8-DCN row (``int8_dcn``), each plain row by its fused row (``fused_epilogues``)."""
    from bevdeploy.engine.deploy import precision_spec

    runs = []
    for p in precisions:
        for dcn in (False, True) if int8_dcn and precision_spec(p).int8 else (False,):
            runs.append((p, dcn, False, p + (" (int8 DCN)" if dcn else "")))
            if fused_epilogues and not dcn:
                runs.append((p, False, True, f"{p} (fused)"))
    return runs


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
    batch: int | Sequence[int] | None = None,
    int8_chain: bool | str = True,
    results_name: str | None = None,
    int8_dcn: bool = False,
    fused_epilogues: bool = False,
    fresh_memory: bool = True,
) -> Path:
    """The reference system's table for one model, measured in one run on this GPU.

    The 2D models (``yolox-x``, ``centernet-r18-dcn``) go to :func:`bevdeploy.eval.bench_det2d.bench_det2d`
    (COCO mAP, images/s at ``batch``, default 32). The BEV models run at each of ``batch`` (an int
    or ints, default 1): a batch-N row times a batch-N engine (N independent streams in one call;
    ``bevdeploy build --batch N``) and PyTorch eager on the same N frames; ``fps`` is frames per
    second on the GPU (N x calls per second), ``fps_ratio`` against PyTorch at the same batch,
    ``fps_vs_batch1`` against the same precision at batch 1. NDS/mAP and fidelity are scored at batch
    1 only (a batch-N row states its numerics by ``output_sqnr_db`` against PyTorch at batch N).
    Results go to ``<model>.json`` for batch 1 alone, ``<model>-batch.json`` otherwise, or
    ``<results_name>.json``.

    PyTorch eager FP32 first (FPS on random full-size inputs, NDS/mAP over ``data``), then for each
    precision: build the engine (int8*: calibrated on ``calib``, default the same data spec), load it
    (Inductor + CUDA graphs), time it on the same inputs, score it over ``data`` and against the
    PyTorch boxes (fidelity). Memory: the device memory a process running only that row holds (total -
    free, CUDA context included, as nvidia-smi counts it) after warm-up, and the allocator's peak during
    the timed calls (``peak_allocated_mb``, ``peak_ratio``). The PyTorch row is the first GPU work of this
    process (:func:`measure`); an engine row is measured again in a fresh child process that only loads and
    runs the engine (:func:`bevdeploy.eval.engine_memory.fresh_process_memory`: how a user serves it),
    since this process still holds what the PyTorch row and the engine's build loaded
    (``memory_inprocess_mb`` keeps the in-process reading; ``fresh_memory=False`` reports that one; a row
    without ``fresh_process_ms`` holds the in-process reading: written before the child ran, so a run cut
    during the child keeps the row).
    Engine rows also give ``eager_weights_mb``, the weights held outside the compiled program (0:
    discarded after freezing).

    ``append``: keep the rows of earlier runs in the results file for precisions this run does not
    measure (for tables too long to build in one sitting); this run measures its own PyTorch row
    and its ratios are against it. Without it the file holds this run alone.

    ``int8_chain``: the int8* engines' ``int8_chain`` (``bevdeploy.engine.build``).

    ``int8_dcn``: after each int8* row, a ``"<precision> (int8 DCN)"`` row of the same precision with
    the DCNv2 convs int8 too (``build(int8_dcn=True)``; BEVFormer-small/base), calibrated once for both.
    ``fused_epilogues``: after each row, a ``"<precision> (fused)"`` row built with ``build(fused_epilogues=True)``
    (the image-reading stem in NHWC and the float convs' epilogues in cuDNN's fused calls), the same measurements.
    """
    import gc

    from bevdeploy.data.synthetic import resolve_data_spec
    from bevdeploy.engine import Engine, build
    from bevdeploy.engine.deploy import precision_spec
    from bevdeploy.eval.detection import run_model, score_run
    from bevdeploy.eval.nuscenes import fidelity_metrics
    from bevdeploy.models import MODELS

    from bevdeploy.models import DET2D_MODELS

    if name in DET2D_MODELS:  # the 2D table: COCO mAP, images/s at a static batch
        from bevdeploy.eval.bench_det2d import bench_det2d, fused_jobs

        if int8_dcn:
            raise ValueError(f"{name}: int8 DCN rows are for the BEV tables; for a 2D engine use "
                             "`bevdeploy build --int8-dcn` and `bevdeploy eval --engine`")

        if batch is not None and not isinstance(batch, int):
            if len(batch) != 1:
                raise ValueError(f"{name}: the 2D table runs one static batch per run, got batch {list(batch)}")
            batch = batch[0]
        return bench_det2d(name, precisions, data=data, calib=calib, checkpoint=checkpoint, batch=batch or 32,
                           work_dir=work_dir, iters=iters, out_dir=out_dir, command=command, append=append,
                           extra_jobs=fused_jobs(precisions) if fused_epilogues else None)
    batches = bench_batches(batch)
    if results_name is None:
        results_name = name if batches == [1] else f"{name}-batch"
    if not torch.cuda.is_available():
        raise RuntimeError("bevdeploy bench --model times engines on a CUDA GPU and none is visible here; on a CPU, "
                           "`bevdeploy demo --model NAME` runs the same pipeline (without meaningful timings)")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    for precision in precisions:  # before an hour of work, not after the PyTorch row
        precision_spec(precision)
    source = resolve_data_spec(data, workers=workers)
    infos = source.infos(spec=data)
    dev = torch.device(_DEVICE)
    runs = engine_runs(precisions, int8_dcn, fused_epilogues)
    labels = [label for *_, label in runs]
    keep_rows = (earlier_rows(Path(out_dir) / gpu_dirname() / f"{results_name}.json", set(labels),
                              batches=set(batches)) if append else [])
    run_id = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    # PyTorch eager FP32, at every batch (NDS/mAP and the fidelity reference at batch 1)
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
    base_mem = _device_memory_mb()
    model = model.to(dev).eval()
    # the timing inputs of every batch, kept on the host so no row carries another batch's frames
    host_inputs = {b: {k: v.cpu() for k, v in timing_inputs(model, infos, b).items()} for b in batches}
    rows: list[dict] = []
    pytorch: dict[int, dict] = {}  # batch -> this run's PyTorch row
    ref_outs: dict[int, dict[str, torch.Tensor]] = {}
    ref_records = threshold = None
    for b in batches:
        inputs = _to_cuda(host_inputs[b])
        row, ref = pytorch_row(name, model, inputs, base_mem, iters=iters)
        ref_outs[b] = {k: v.cpu() for k, v in ref.items()}
        row.update(engine_mb=round(pth_mb, 1), size_ratio=1.0, note="engine_mb = the .pth of the state dict",
                   run=run_id, fps_vs_batch1=1.0 if b == 1 else None)
        if b == 1:
            ref_run = run_model(model, infos, name, dev)
            metrics = score_run(ref_run, infos, source.dataroot, source.version, source.split)
            row.update(nds=round(metrics["NDS"], 4), map=round(metrics["mAP"], 4))
            ref_records = results_records(ref_run, infos)
            threshold = fidelity_threshold(ref_records)
            row["fidelity_threshold"] = round(threshold, 4)
        else:
            row["note"] += "; accuracy is measured at batch 1"
        rows.append(row)
        pytorch[b] = row
        del inputs, ref
    _fps_vs_batch1(rows)
    write_results(results_name, rows, out_dir, command, keep_rows)
    del model
    _free()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tables: dict[str, str] = {}  # int8 / fp8: calibrate once per precision, reuse the table for the others
    for precision, dcn, fused, label in runs:
        for b in batches:
            stem = f"{name}-{precision}" + ("-int8dcn" if dcn else "") + ("-fusedepi" if fused else "")
            path = work / (f"{stem}.engine" if b == 1 else f"{stem}-b{b}.engine")
            quantized = precision_spec(precision).quantized
            table = tables.get(precision)
            build(name, precision, out=path, checkpoint=checkpoint, batch=b, int8_chain=int8_chain,
                  calib=(calib or data) if quantized and table is None else None, calib_table=table, int8_dcn=dcn,
                  fused_epilogues=fused)
            if quantized and table is None:
                tables[precision] = str(path) + ".calib.json"
            _free()
            engine = Engine.load(path, device="cuda")
            inputs = _to_cuda(host_inputs[b])
            mem = measure(lambda: engine(**inputs), iters=iters)
            out = engine(**inputs)
            sqnr = {k: round(sqnr_db(ref_outs[b][k], out[k].cpu()), 1) for k in engine.output_names}
            base = pytorch[b]
            r = dict.fromkeys(_ROW_KEYS)
            r.update(model=name, precision=label, batch=b, fps=round(1000.0 * b / mem["ms"], 2),
                     fps_ratio=round(1000.0 * b / mem["ms"] / base["fps"], 2),
                     engine_mb=round(engine.file_mb, 1), size_ratio=round(engine.file_mb / pth_mb, 3),
                     eager_weights_mb=round(engine.eager_weights_mb, 1), latency_ms=round(mem["ms"], 3),
                     output_sqnr_db=min(sqnr.values()), output_sqnr_db_each=sqnr,
                     int8_layers=sum(1 for _, p in engine.layer_precisions if p == "int8") if precision.startswith("int8") else None,
                     fp8_layers=sum(1 for _, p in engine.layer_precisions if p == "fp8") if precision.startswith("fp8") else None,
                     run=run_id, note=nonfinite_note(name, label, out))
            if b == 1:
                run = run_model(engine, infos, name, dev)
                m = score_run(run, infos, source.dataroot, source.version, source.split)
                fid = fidelity_metrics(results_records(run, infos), ref_records, score_threshold=threshold)
                r.update(nds=round(m["NDS"], 4), map=round(m["mAP"], 4), fidelity_nds=round(fid["NDS"], 4))
            else:
                r["note"] = "; ".join(filter(None, [r["note"], "accuracy is measured at batch 1"]))
            del engine, out, inputs
            _free()
            _set_memory(r, mem, base)
            rows.append(r)
            _fps_vs_batch1(rows)
            # after every row: a run cut short keeps what it measured (here, the in-process memory)
            write_results(results_name, rows, out_dir, command, keep_rows)
            if fresh_memory:  # the serving process's memory (this one still holds the build's leftovers)
                try:
                    fresh = _fresh_process_memory(path, host_inputs[b], iters)
                except RuntimeError as e:  # keep the row (in-process memory), say why
                    print(f"WARNING: {name} {label}: {e}; its memory is the in-process reading", file=sys.stderr)
                    r["note"] = ((r.get("note") or "") + "; memory read in-process (the fresh process failed)").lstrip("; ")
                else:
                    r.update(fresh_process_ms=fresh["ms"], memory_inprocess_mb=mem["memory_mb"],
                             memory_loaded_mb=fresh["loaded_mb"], memory_context_mb=fresh["context_mb"],
                             **{k: fresh[k] for k in _FRESH_PROCESS_KEYS if k in fresh})
                    _set_memory(r, dict(mem, memory_mb=fresh["memory_mb"], allocated_mb=fresh["allocated_mb"],
                                        peak_allocated_mb=fresh["peak_allocated_mb"]), base)
                write_results(results_name, rows, out_dir, command, keep_rows)
            print(f"{name} {label} batch {b}: {r['fps']} FPS ({r['fps_ratio']}x), {r['engine_mb']} MB, "
                  f"mem {r['memory_mb']} MB ({r['memory_ratio']}x), peak {r['peak_allocated_mb']} MB, "
                  f"NDS {r['nds']}, fidelity NDS {r['fidelity_nds']}, SQNR {r['output_sqnr_db']} dB", file=sys.stderr)
    return write_results(results_name, rows, out_dir, command, keep_rows)


def nonfinite_note(name: str, label: str, outputs: dict[str, torch.Tensor]) -> str | None:
    """A row's note when the engine wrote NaN / inf on the timing batch (its SQNR reads -inf), warned on stderr: a
    broken engine must not pass for a slow or inaccurate one."""
    bad = [k for k, v in outputs.items() if not bool(torch.isfinite(v).all())]
    if not bad:
        return None
    print(f"WARNING: {name} {label}: the engine wrote non-finite values (NaN / inf) in {bad}: its outputs are wrong, "
          "whatever its speed", file=sys.stderr)
    return f"NON-FINITE outputs {bad}"


def bench_batches(batch: int | Sequence[int] | None) -> list[int]:
    """The batches of a BEV table: ``None`` -> [1]; an int or ints (each >= 1, in the order given)."""
    batches = [1] if batch is None else [batch] if isinstance(batch, int) else list(batch)
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise ValueError(f"batch must be positive ints, got {batch!r}")
    if len(set(batches)) != len(batches):
        raise ValueError(f"batch lists a batch twice: {batches}")
    return batches


def _fps_vs_batch1(rows: list[dict]) -> None:
    """Each row's throughput against its precision's batch-1 row of the same run (when measured)."""
    one = {(r["precision"], r.get("run")): r["fps"] for r in rows if r.get("batch") == 1}
    for r in rows:
        ref = one.get((r["precision"], r.get("run")))
        r["fps_vs_batch1"] = round(r["fps"] / ref, 2) if ref else None


def _to_cuda(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(_DEVICE) for k, v in inputs.items()}


def _set_memory(row: dict, mem: dict, base: dict) -> None:
    """A row's memory columns from a reading (:func:`measure`'s keys) and their ratios to the PyTorch row."""
    row.update(memory_mb=mem["memory_mb"], memory_ratio=round(mem["memory_mb"] / base["memory_mb"], 3),
               allocated_mb=mem["allocated_mb"], peak_allocated_mb=mem["peak_allocated_mb"],
               peak_ratio=round(mem["peak_allocated_mb"] / base["peak_allocated_mb"], 3))


#: the fresh process's allocator readings (after its timed calls and after the load), and of the CUDA stack
#: reservation and Engine.release_stack (GPU only)
_FRESH_PROCESS_KEYS = ("reserved_mb", "allocated_loaded_mb", "reserved_loaded_mb", "stack_limit_kb",
                       "stack_reserved_mb", "memory_after_stack_release_mb", "ms_after_release",
                       "stack_limit_after_release_kb", "outputs_equal_after_release", "max_abs_diff_after_release",
                       "stack_release_error")


def _fresh_process_memory(path: Path, inputs: dict[str, torch.Tensor], iters: int) -> dict:
    """:func:`bevdeploy.eval.engine_memory.fresh_process_memory` of one engine row, with the stack-release
    readings (the tests replace it)."""
    from bevdeploy.eval.engine_memory import fresh_process_memory

    return fresh_process_memory(path, inputs, iters=iters, stack_release=True)


def _free() -> None:
    """Drop the previous row's objects: Python garbage, Dynamo's compiled frames, the cached blocks."""
    import gc

    gc.collect()
    torch._dynamo.reset()
    torch.cuda.empty_cache()
