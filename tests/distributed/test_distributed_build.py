"""``build`` over 2 gloo processes (torchrun's ``build``): the one-process table and engine, QAT with averaged
gradients, one writer, and errors that stop every rank instead of hanging.

A reduced BEVDet-R50 (``SMALL`` of the engine tests) in int8 on a synthetic world of 2 scenes x 2 frames;
ops and int8 layers on their references (the kernels are tested in tests/ops and tests/quant).
"""

import shutil
import sys

import pytest
import torch
from torch import nn

from bevdeploy.data.nuscenes import load_infos
from bevdeploy.data.synthetic import SYNTHETIC_SPLIT, SYNTHETIC_VERSION, DataSource, generate
from bevdeploy.distributed import shard_by_scene
from bevdeploy.engine import build
from bevdeploy.engine.engine import read_metadata
from bevdeploy.engine.engine_file import read_archive
from bevdeploy.quant.calibrate import CalibrationTable
from tests.distributed._spawn import run_cli_ranks, run_in_processes
from tests.engine.test_engine_bevdet import SMALL

METHODS = ("minmax", "entropy")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate(root, num_scenes=2, samples_per_scene=2, seed=5, image_size=(64, 192), progress=False)
    return root


def _data(root) -> DataSource:
    return DataSource(root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT, num_samples=4)


def _spy_writes() -> list[str]:
    """Record every file the build writes (its atomic writes and torch.export.save) in this process."""
    build_module = sys.modules["bevdeploy.engine.build"]  # the module (bevdeploy.engine.build is the function)
    writes: list[str] = []
    real_atomic, real_save = build_module.atomic_output, torch.export.save

    def atomic(path, what="output"):
        writes.append(str(path))
        return real_atomic(path, what)

    def save(ep, f, **kwargs):
        writes.append(getattr(f, "name", str(f)))
        return real_save(ep, f, **kwargs)

    build_module.atomic_output = atomic
    torch.export.save = save
    return writes


def _sharded_builds(ctx, root, out_dir):
    writes = _spy_writes()
    paths = {m: build("bevdet-r50-cbgs", "int8", out=out_dir / f"q-{m}.engine", model_overrides=SMALL,
                      calib=_data(root), calib_method=m, progress=False, dist=ctx) for m in METHODS}
    return paths, writes


def test_two_process_build_equals_one_process(world, tmp_path, ops_on_references):
    sharded = tmp_path / "sharded"
    results = run_in_processes(_sharded_builds, 2, (world, sharded))
    (paths0, writes0), (paths1, writes1) = results
    assert paths1 == dict.fromkeys(METHODS) and writes1 == []  # rank 1 returns None and writes nothing
    assert writes0 and all(p.parent == sharded for p in paths0.values())
    expected = {f"q-{m}.engine{ext}" for m in METHODS for ext in ("", ".calib.json")}
    assert {p.name for p in sharded.iterdir()} == expected  # one engine per build, no leftover .tmp
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the spawned ranks: the same float rounding in every layer
    try:
        for method in METHODS:
            single = build("bevdet-r50-cbgs", "int8", out=tmp_path / "single" / f"{method}.engine",
                           model_overrides=SMALL, calib=_data(world), calib_method=method, progress=False,
                           calib_two_pass=True)
            a = CalibrationTable.load(f"{single}.calib.json")
            b = CalibrationTable.load(f"{paths0[method]}.calib.json")
            assert b.metadata["processes"] == 2 and a.metadata["processes"] == 1
            assert (b.method, b.num_samples, b.metadata["not_run"]) == (a.method, a.num_samples, a.metadata["not_run"])
            assert b.amax == a.amax, method  # exact: the same activations, histograms summed over the same bins
            _, meta_a = read_metadata(single)
            _, meta_b = read_metadata(paths0[method])
            assert meta_b["layer_precisions"] == meta_a["layer_precisions"] and meta_a["int8_layers"] > 50
            # graph, weights and constants (the int8 codes and scales) byte for byte
            assert read_archive(paths0[method]).content_hash == read_archive(single).content_hash, method
    finally:
        torch.set_num_threads(threads)


def _qat_build(ctx, root, out):
    from bevdeploy.quant import qat

    seen = {}
    real = qat.learned_scales

    def spy(model):  # the scales and the fine-tuned weights this rank ends with
        seen["scales"] = real(model)
        seen["weights"] = torch.cat([p.detach().flatten() for p in model.parameters()])
        return dict(seen["scales"])

    qat.learned_scales = spy
    path = build("bevdet-r50-cbgs", "int8", out=out, model_overrides=SMALL, calib=_data(root), calib_method="minmax",
                 qat_steps=2, progress=False, int8_chain=False, dist=ctx)
    return path, seen


def test_two_process_qat_learns_the_same_scales_on_every_rank(world, tmp_path, ops_on_references):
    out = tmp_path / "qat" / "q.engine"
    (path, rank0), (none, rank1) = run_in_processes(_qat_build, 2, (world, out))
    assert path == out and none is None
    assert rank0["scales"] == rank1["scales"] and len(rank0["scales"]) > 50
    assert torch.equal(rank0["weights"], rank1["weights"])  # averaged gradients: the same steps everywhere
    ptq = CalibrationTable.load(f"{out}.calib.json")
    table = CalibrationTable.load(f"{out}.qat.calib.json")
    assert sum(rank0["scales"][n] != ptq.scale(n) for n in rank0["scales"]) > len(rank0["scales"]) // 2
    for name, s in rank0["scales"].items():
        assert table.scale(name) == pytest.approx(s, rel=1e-12)
    _, meta = read_metadata(out)
    assert meta["qat"]["processes"] == 2 and meta["qat"]["global_batch"] == 2
    assert meta["calibration"]["amax"] == table.amax
    assert {p.name for p in out.parent.iterdir()} == {"q.engine", "q.engine.calib.json", "q.engine.qat.calib.json"}


def _toy():
    from bevdeploy.quant.qat import prepare_qat

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return prepare_qat(model, {"0": 0.03, "2": 0.02})


def _toy_batch(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def _mse(model, batch):
    x, y = batch
    return {"mse": (model(x) - y).square().mean()}


def _toy_qat(ctx):
    from bevdeploy.quant.qat import learned_scales, qat_finetune

    model = _toy()
    batches = [_toy_batch(100 * step + ctx.rank) for step in range(3)]
    qat_finetune(model, _mse, batches, steps=3, lr=1e-2, scale_lr=1e-1, progress=False, dist=ctx)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, learned_scales(model)


def test_qat_over_two_processes_equals_one_process_with_the_doubled_batch():
    from bevdeploy.quant.qat import learned_scales, qat_finetune

    (w0, s0), (w1, s1) = run_in_processes(_toy_qat, 2)
    single = _toy()
    batches = []
    for step in range(3):
        (xa, ya), (xb, yb) = _toy_batch(100 * step), _toy_batch(100 * step + 1)
        batches.append((torch.cat([xa, xb]), torch.cat([ya, yb])))
    qat_finetune(single, _mse, batches, steps=3, lr=1e-2, scale_lr=1e-1, progress=False)
    assert s0 == s1
    start = _toy().state_dict()
    for k, v in single.state_dict().items():
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0)
        # to float rounding, which the scales' LSQ gradients (sums of round(v) - v) amplify to ~2e-6; a half
        # batch alone moves them by ~0.07
        torch.testing.assert_close(w0[k], v, rtol=1e-4, atol=1e-5)
        if k.endswith(("weight", "scale_log_ratio")):
            assert not torch.equal(v, start[k]), k  # the step moved it
    assert s0 == pytest.approx(learned_scales(single), rel=1e-4)


def _cli_args(root, out) -> list[str]:
    return ["build", "--model", "bevdet-r50-cbgs", "--precision", "int8", "--calib-method", "minmax", "-q",
            "--calib", f"nuscenes:{root}@{SYNTHETIC_VERSION}:{SYNTHETIC_SPLIT}:4", "-o", str(out)]


def test_cli_build_under_torchrun_rank0_prints_and_writes(world, tmp_path):
    out = tmp_path / "cli" / "q.engine"
    (rc0, out0, err0), (rc1, out1, err1) = run_cli_ranks(_cli_args(world, out), timeout=150)
    assert (rc0, rc1) == (0, 0), (err0, err1)
    assert out0.startswith(f"engine written: {out}") and out1 == ""
    assert "error" not in err0 + err1
    assert {p.name for p in out.parent.iterdir()} == {"q.engine", "q.engine.calib.json"}
    assert CalibrationTable.load(f"{out}.calib.json").metadata["processes"] == 2


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("bevdeploy build")]


def test_bad_calibration_data_on_rank1_stops_both_ranks(world, tmp_path):
    root = tmp_path / "world"
    shutil.copytree(world, root)
    infos = load_infos(root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT, progress=False)
    bad = shard_by_scene(infos, 1, 2)[-1]["cams"]["CAM_FRONT"]["data_path"]  # a frame only rank 1 reads
    with open(bad, "wb") as f:
        f.write(b"not a jpeg")
    out = tmp_path / "out" / "q.engine"
    (rc0, _, err0), (rc1, _, err1) = run_cli_ranks(_cli_args(root, out), timeout=120)
    assert rc0 != 0 and rc1 != 0
    assert "Traceback" not in err0 + err1
    (line1,) = _error_lines(err1)
    assert line1.startswith("bevdeploy build (rank 1): error:")
    (line0,) = _error_lines(err0)
    assert line0.startswith("bevdeploy build: error: rank 1 failed:")
    assert not out.parent.exists() or not any(out.parent.iterdir())  # nothing written, no partial file


def test_bad_output_path_stops_every_rank_before_any_work(world, tmp_path):
    out = tmp_path / "is-a-dir"
    out.mkdir()
    (rc0, _, err0), (rc1, _, err1) = run_cli_ranks(_cli_args(world, out), timeout=90)
    assert (rc0, rc1) == (2, 2)
    (line0,) = _error_lines(err0)
    (line1,) = _error_lines(err1)
    assert line0 == f"bevdeploy build: error: engine file {str(out)!r} is a directory; give a file path"
    assert line1.startswith("bevdeploy build (rank 1): error: rank 0 failed: ValueError: engine file")
    assert "RANDOM" not in err0 + err1  # stopped before the model was built


def _tiny_model():
    from bevdeploy.engine.deploy import fold_batchnorms
    from bevdeploy.models import MODELS
    from tests.engine.test_engine import TINY

    torch.manual_seed(0)
    model = MODELS["bevformer-tiny"](**TINY).eval()
    fold_batchnorms(model)
    return model


def _tiny_table(ctx, root):
    from bevdeploy.engine.build import _calibration_run

    data = DataSource(root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT, num_samples=6)
    table, _ = _calibration_run(_tiny_model(), "bevformer-tiny", data, "minmax", torch.device("cpu"), ctx,
                                two_pass=False, progress=False)
    return table.amax


def test_temporal_calibration_shards_whole_scenes(tmp_path, ops_on_references):
    """BEVFormer: each rank runs whole scenes, so every frame sees the previous BEV one process feeds it
    (a contiguous split of the frames would not: its second share starts mid-scene)."""
    from bevdeploy.distributed import DistContext
    from bevdeploy.engine.model_io import calibration_forward_loop
    from bevdeploy.quant.calibrate import calibrate

    root = tmp_path / "world"
    generate(root, num_scenes=3, samples_per_scene=2, seed=3, image_size=(128, 192), progress=False)
    infos = load_infos(root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT, progress=False)
    assert [i["token"] for i in shard_by_scene(infos, 1, 2)] == [i["token"] for i in infos[2:4]]
    sharded = run_in_processes(_tiny_table, 2, (root,))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _tiny_table(DistContext(), root)
        model = _tiny_model()
        halves = [calibrate(model, calibration_forward_loop(part, "bevformer-tiny", model, torch.device("cpu"), False),
                            "minmax").amax for part in (infos[:3], infos[3:])]
    finally:
        torch.set_num_threads(threads)
    assert sharded[0] == sharded[1] == single and len(single) > 50
    contiguous = {n: max(h.get(n, 0.0) for h in halves) for n in single}  # the merged minmax table of that split
    assert contiguous != single


def _failures(ctx):
    from bevdeploy.distributed import PeerError, fail_together
    from bevdeploy.quant.qat import qat_finetune

    seen = []
    try:  # rank 0 fails in a block the others wait in (the engine export)
        with fail_together(ctx):
            if ctx.is_main:
                raise OSError("disk full")
    except (OSError, PeerError) as e:
        seen.append((type(e).__name__, str(e)))

    def loss(model, batch):  # rank 1's second batch is bad
        out = _mse(model, batch[:2])
        return {"mse": out["mse"] * float("inf")} if ctx.rank == 1 and batch[2] == 1 else out

    batches = [(*_toy_batch(step), step) for step in range(3)]
    try:
        qat_finetune(_toy(), loss, batches, steps=3, progress=False, dist=ctx)
    except (RuntimeError, PeerError) as e:
        seen.append((type(e).__name__, str(e)))
    with fail_together(ctx):  # and the ranks still agree afterwards
        seen.append("ok")
    return seen


def test_an_error_on_one_rank_raises_on_every_rank():
    rank0, rank1 = run_in_processes(_failures, 2)
    assert rank0[0] == ("OSError", "disk full")
    assert rank1[0] == ("PeerError", "rank 0 failed: OSError: disk full")
    assert rank1[1][0] == "RuntimeError" and rank1[1][1].startswith("QAT step 1: non-finite loss")
    assert rank0[1] == ("PeerError", f"rank 1 failed: {rank1[1][0]}: {rank1[1][1]}")
    assert rank0[2] == rank1[2] == "ok"


def _yolox_table(ctx):
    from bevdeploy.engine.build import _calibration_run
    from bevdeploy.engine.deploy import fold_batchnorms
    from bevdeploy.models import MODELS
    from tests.engine.test_engine_det2d import SMALL as SMALL_2D

    torch.manual_seed(0)
    model = MODELS["yolox-x"](**SMALL_2D["yolox-x"]).eval()
    fold_batchnorms(model)
    table, _ = _calibration_run(model, "yolox-x", "synthetic2d:5", "minmax", torch.device("cpu"), ctx, two_pass=False,
                                progress=False)
    return table.amax, table.num_samples, table.metadata["dataset"]


def test_2d_calibration_splits_the_images(tmp_path, monkeypatch, ops_on_references):
    """2D models: contiguous shares of the images (3 + 2 here); rank 0 renders the world, rank 1 finds it."""
    from bevdeploy.distributed import DistContext

    monkeypatch.setenv("BEVDEPLOY_CACHE", str(tmp_path / "cache"))  # empty: rendered by rank 0 first
    sharded = run_in_processes(_yolox_table, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _yolox_table(DistContext())
    finally:
        torch.set_num_threads(threads)
    assert sharded[0] == sharded[1] == single and single[1] == 5 and single[2].endswith("[:5]")
