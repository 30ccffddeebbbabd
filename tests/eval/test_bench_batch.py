"""``bench_model`` with several batches, dry-run on the CPU: the GPU-only calls (timing, device
memory, the GPU name) are replaced, the rest (PyTorch rows, batch-N builds, loads, SQNR, scoring at
batch 1, the results file) runs for real on reduced models."""

import functools
import json

import pytest
import torch

import bevdeploy.eval.bench_models as bm
from bevdeploy.data.nuscenes import load_infos
from bevdeploy.data.synthetic import SYNTHETIC_SPLIT, SYNTHETIC_VERSION, DataSource, generate
from bevdeploy.models import MODELS
from tests.engine.test_engine import TINY
from tests.engine.test_engine_bevdet import SMALL

REDUCED = {"bevformer-tiny": TINY, "bevdet-r50-cbgs": SMALL}
BATCHES = {"bevformer-tiny": [1, 4], "bevdet-r50-cbgs": [1, 2]}


class _Builds(list):
    """The batch of every build call, in order; ``kwargs``: all their keyword arguments."""

    def __init__(self):
        super().__init__()
        self.kwargs = []
        self.fresh = []  # (engine path, input shapes) of every fresh-process memory reading


@pytest.fixture(params=list(REDUCED))
def cpu_bench(request, monkeypatch, tmp_path):
    """bench_model's GPU-only calls replaced; timings: 10 ms per call at batch 1, 20 ms at batch N."""
    import bevdeploy.data.synthetic as synthetic
    import bevdeploy.engine as engine_pkg

    root = tmp_path / "world"
    generate(root, num_scenes=1, samples_per_scene=2, seed=3, image_size=(128, 192), progress=False)
    source = DataSource(root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT, num_samples=2)
    monkeypatch.setattr(synthetic, "resolve_data_spec", lambda spec, **kw: source)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    monkeypatch.setattr(bm, "gpu_dirname", lambda *a: "test-gpu")
    monkeypatch.setattr(bm, "_device_memory_mb", lambda: 1000.0)
    monkeypatch.setattr(bm, "_DEVICE", "cpu")
    monkeypatch.setattr(bm, "timing_inputs", functools.partial(bm.timing_inputs, device="cpu"))
    calls = []

    def measure(fn, iters=20, warmup=3):
        with torch.no_grad():
            fn()
        calls.append(fn)
        return {"ms": 10.0 if len(calls) % 2 else 20.0, "memory_mb": 900.0 if len(calls) > 2 else 1500.0,
                "allocated_mb": 100.0, "peak_allocated_mb": 200.0}

    monkeypatch.setattr(bm, "measure", measure)
    builds = _Builds()

    def fresh_process_memory(path, inputs, iters):
        builds.fresh.append((path, {k: tuple(v.shape) for k, v in inputs.items()}))
        return {"memory_mb": 600.0, "allocated_mb": 50.0, "peak_allocated_mb": 150.0, "ms": 11.0,
                "context_mb": 400.0, "loaded_mb": 550.0}

    monkeypatch.setattr(bm, "_fresh_process_memory", fresh_process_memory)
    name = request.param
    full = MODELS[name]
    monkeypatch.setitem(MODELS, name, lambda **kw: full(**{**REDUCED[name], **kw}))
    real_build, real_load = engine_pkg.build, engine_pkg.Engine.load

    def build(name, precision, **kw):
        builds.append(kw["batch"])
        builds.kwargs.append(kw)
        return real_build(name, precision, **kw, device="cpu", progress=False)

    monkeypatch.setattr(engine_pkg, "build", build)
    monkeypatch.setattr(engine_pkg.Engine, "load", classmethod(lambda cls, path, device=None: real_load(path, "cpu")))
    return name, tmp_path, builds


def test_rows_per_batch_with_frames_per_second(cpu_bench, ops_on_references):
    """BEVFormer-tiny and BEVDet (no temporal state: a batch is N frames in one call) at batch 1 and N."""
    name, tmp_path, builds = cpu_bench
    n = BATCHES[name][1]
    path = bm.bench_model(name, ["fp32"], data="synthetic:2", work_dir=tmp_path / "engines",
                          out_dir=tmp_path / "results", iters=2, batch=[1, n], command="test")
    assert path == tmp_path / "results" / "test-gpu" / f"{name}-batch.json"  # the main table untouched
    assert builds == [1, n] and (tmp_path / "engines" / f"{name}-fp32-b{n}.engine").is_file()
    rows = {(r["precision"], r["batch"]): r for r in json.loads(path.read_text())["rows"]}
    assert list(rows) == [("pytorch", 1), ("pytorch", n), ("fp32", 1), ("fp32", n)]
    one, four = rows["fp32", 1], rows["fp32", n]
    assert one["fps"] == 100.0 and four["fps"] == 50.0 * n and four["fps_vs_batch1"] == n / 2  # frames/s = n / 20 ms
    assert rows["pytorch", n]["fps"] == 50.0 * n and four["fps_ratio"] == 1.0
    # memory: the engine's own process (600 MB) against PyTorch's (1500); the in-process reading kept beside it
    assert one["memory_ratio"] == 0.4 and one["memory_inprocess_mb"] == 900.0 and one["peak_ratio"] == 0.75
    assert one["fresh_process_ms"] == 11.0 and one["memory_loaded_mb"] == 550.0
    assert one["eager_weights_mb"] > 0  # CPU: eager
    engines = tmp_path / "engines"
    assert [p for p, _ in builds.fresh] == [engines / f"{name}-fp32.engine", engines / f"{name}-fp32-b{n}.engine"]
    assert [shapes["image"][0] for _, shapes in builds.fresh] == [1, n]  # each row's own batch of frames
    assert one["nds"] is not None and one["fidelity_nds"] is not None
    assert four["nds"] is None and four["fidelity_nds"] is None and "batch 1" in four["note"]
    assert four["output_sqnr_db"] > 60 and one["output_sqnr_db"] > 60  # fp32 engine vs eager, same frames
    md = path.with_suffix(".md").read_text()
    assert "fps_vs_batch1" in md and "peak_allocated_mb" in md


def test_a_failed_fresh_process_keeps_the_row_with_its_in_process_memory(cpu_bench, ops_on_references, monkeypatch,
                                                                         capsys):
    name, tmp_path, builds = cpu_bench
    if name != "bevformer-tiny":
        pytest.skip("one model is enough for the memory plumbing")

    def failing(path, inputs, iters):
        raise RuntimeError(f"fresh-process memory of {path} failed (exit 1):\nCUDA out of memory")

    monkeypatch.setattr(bm, "_fresh_process_memory", failing)
    path = bm.bench_model(name, ["fp32"], data="synthetic:2", work_dir=tmp_path / "engines",
                          out_dir=tmp_path / "results", iters=2, command="test")
    row = json.loads(path.read_text())["rows"][1]
    assert row["memory_mb"] == 1500.0 and "memory_inprocess_mb" not in row  # measure()'s in-process reading (2nd call)
    assert "fresh process failed" in row["note"] and "CUDA out of memory" in capsys.readouterr().err


def test_each_row_is_written_before_its_fresh_process_runs(cpu_bench, ops_on_references, monkeypatch):
    """A run cut while the child loads the engine keeps the row, with the in-process memory."""
    name, tmp_path, builds = cpu_bench
    if name != "bevformer-tiny":
        pytest.skip("one model is enough for the memory plumbing")
    table = tmp_path / "results" / "test-gpu" / f"{name}.json"
    seen = []

    def reading_the_table(path, inputs, iters):
        seen.append([(r["precision"], r["memory_mb"], "fresh_process_ms" in r) for r in json.loads(table.read_text())["rows"]])
        return {"memory_mb": 600.0, "allocated_mb": 50.0, "peak_allocated_mb": 150.0, "ms": 11.0,
                "context_mb": 400.0, "loaded_mb": 550.0}

    monkeypatch.setattr(bm, "_fresh_process_memory", reading_the_table)
    bm.bench_model(name, ["fp32"], data="synthetic:2", work_dir=tmp_path / "engines", out_dir=tmp_path / "results",
                   iters=2, command="test")
    assert seen == [[("pytorch", 1500.0, False), ("fp32", 1500.0, False)]]  # on disk before the child ran
    assert [(r["precision"], r["memory_mb"]) for r in json.loads(table.read_text())["rows"]] == [
        ("pytorch", 1500.0), ("fp32", 600.0)]  # then rewritten with the child's reading


def test_int8_dcn_rows_follow_each_int8_row(cpu_bench, ops_on_references, caplog):
    """``int8_dcn``: an ``int8 (int8 DCN)`` row after the int8 one, built with ``int8_dcn=True`` from the
    same calibration table (calibrated once); float rows get none."""
    name, tmp_path, builds = cpu_bench
    if name != "bevformer-tiny":
        pytest.skip("one model is enough for the row plumbing (BEVDet builds the same way)")
    path = bm.bench_model(name, ["fp32", "int8"], data="synthetic:2", work_dir=tmp_path / "engines",
                          out_dir=tmp_path / "results", iters=2, command="test", int8_dcn=True)
    rows = [r["precision"] for r in json.loads(path.read_text())["rows"]]
    assert rows == ["pytorch", "fp32", "int8", "int8 (int8 DCN)"]
    assert [kw["int8_dcn"] for kw in builds.kwargs] == [False, False, True]
    assert builds.kwargs[1]["calib"] is not None and builds.kwargs[2]["calib"] is None
    assert builds.kwargs[2]["calib_table"] == str(tmp_path / "engines" / f"{name}-int8.engine") + ".calib.json"
    assert (tmp_path / "engines" / f"{name}-int8-int8dcn.engine").is_file()
    assert "has no DCNv2 conv" in caplog.text  # BEVFormer-tiny's R50 has none: said, not silent
