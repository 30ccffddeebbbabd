"""Evaluation sharded by scene over 2 gloo processes gives the boxes and the NDS of one process."""

import numpy as np
import pytest
import torch

from bevdeploy.data.nuscenes import load_infos
from bevdeploy.data.synthetic import SYNTHETIC_SPLIT, SYNTHETIC_VERSION, generate
from bevdeploy.distributed import shard_by_scene
from bevdeploy.eval.detection import run_model, run_sharded, score_run
from bevdeploy.models import MODELS
from tests.distributed._spawn import run_in_processes

TINY = dict(image_size=(64, 96), bev_h=8, bev_w=8, num_query=20, num_encoder_layers=1, num_decoder_layers=1)


def _model():
    torch.manual_seed(0)
    return MODELS["bevformer-tiny"](**TINY).eval()


def _sharded_run(ctx, root):
    infos = load_infos(root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT, progress=False)
    run = run_sharded(_model(), infos, "bevformer-tiny", torch.device("cpu"), ctx, progress=False)
    return None if run is None else (run.boxes, len(run.latencies_ms), run.wall_s, run.processes, run.throughput)


def test_shards_keep_whole_scenes_in_order_and_cover_everything():
    infos = [{"token": f"s{s}f{f}", "scene_token": f"scene{s}"} for s, n in enumerate([3, 1, 2, 2, 5]) for f in range(n)]
    shards = [shard_by_scene(infos, r, 3) for r in range(3)]
    tokens = [i["token"] for shard in shards for i in shard]
    assert sorted(tokens) == sorted(i["token"] for i in infos)
    for shard in shards:
        assert shard == [i for i in infos if i in shard]  # original order
    owners = {i["scene_token"]: r for r, shard in enumerate(shards) for i in shard}
    assert len(owners) == 5 and sum(len(s) for s in shards) == 13
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 2  # balanced by frames
    with pytest.raises(ValueError, match="no 'scene_token'"):
        shard_by_scene([{"token": "x"}], 0, 2)


def test_sharded_eval_equals_single_process(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # ops on their references (the kernels are tested in tests/ops)
    root = tmp_path / "world"
    generate(root, num_scenes=3, samples_per_scene=2, seed=5, image_size=(128, 192), progress=False)
    infos = load_infos(root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT, progress=False)
    single = run_model(_model(), infos, "bevformer-tiny", torch.device("cpu"), progress=False)
    results = run_in_processes(_sharded_run, 2, (root,))
    assert results[1] is None
    boxes, frames, wall_s, processes, throughput = results[0]
    assert list(boxes) == list(single.boxes) and frames == len(infos)
    # the pass's rate counts every process's frames over the slowest one's wall time
    assert processes == 2 and wall_s > 0 and throughput == pytest.approx(frames / wall_s)
    assert single.processes == 1 and single.throughput == pytest.approx(len(infos) / single.wall_s)
    for token, (b, s, lab) in single.boxes.items():
        np.testing.assert_allclose(boxes[token][0], b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(boxes[token][1], s, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(boxes[token][2], lab)
    merged = type(single)(boxes=boxes)
    nds_single = score_run(single, infos, root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT)["NDS"]
    nds_sharded = score_run(merged, infos, root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT)["NDS"]
    assert nds_sharded == pytest.approx(nds_single, abs=1e-6)  # boxes agree to float rounding (thread counts differ)
