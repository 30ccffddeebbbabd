"""The eval loop: temporal order, the gate, prev_bev fed back, scoring through the devkit."""

import json

import numpy as np
import pytest
import torch

from bevdeploy.data.nuscenes import load_infos
from bevdeploy.data.preprocess import BEVFORMER_TINY
from bevdeploy.data.synthetic import SYNTHETIC_SPLIT, SYNTHETIC_VERSION, generate
from bevdeploy.eval.detection import DetectionRun, run_bevformer, score_run
from bevdeploy.models import MODELS


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate(root, num_scenes=2, samples_per_scene=2, seed=3, image_size=(128, 192))
    return root, load_infos(root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT, progress=False)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return MODELS["bevformer-tiny"](image_size=(64, 96), bev_h=8, bev_w=8, num_query=20).eval()


def test_loop_feeds_prev_bev_and_gates_scene_starts(world, tiny_model):
    root, infos = world
    seen = []

    def forward(**inputs):
        out = tiny_model(**inputs)
        seen.append((inputs["use_prev_bev"].item(), inputs["prev_bev"].clone(), out["bev_embed"].clone()))
        return out

    run = run_bevformer(forward, tiny_model.decode, infos, preprocess=BEVFORMER_TINY, bev_shape=tiny_model.bev_shape,
                        device=torch.device("cpu"), progress=False)
    assert len(run.boxes) == len(infos) == 4 and len(run.latencies_ms) == 4
    gates = [g for g, _, _ in seen]
    scene_start = [i == 0 or infos[i]["scene_token"] != infos[i - 1]["scene_token"] for i in range(4)]
    assert gates == [0.0 if s else 1.0 for s in scene_start]
    for i in range(1, 4):  # the previous frame's bev_embed comes back as prev_bev; zeros at a scene start
        assert torch.equal(seen[i][1], torch.zeros_like(seen[i][1]) if scene_start[i] else seen[i - 1][2])
    assert scene_start.count(True) >= 2 and not seen[0][1].any()
    for boxes, scores, labels in run.boxes.values():
        assert boxes.shape[1] == 9 and len(scores) == len(labels) == len(boxes)


def test_score_and_save_round_trip(world, tiny_model, tmp_path):
    root, infos = world
    run = run_bevformer(tiny_model, tiny_model.decode, infos, preprocess=BEVFORMER_TINY, bev_shape=tiny_model.bev_shape,
                        device=torch.device("cpu"), progress=False)
    path = tmp_path / "run.json"
    run.wall_s = 2.0
    run.save(path)
    loaded = DetectionRun.load(path)
    assert loaded.boxes.keys() == run.boxes.keys()
    assert loaded.wall_s == 2.0 and loaded.throughput == pytest.approx(len(infos) / 2.0)
    for t in run.boxes:
        np.testing.assert_allclose(loaded.boxes[t][0], run.boxes[t][0], rtol=1e-6)
    metrics = score_run(loaded, infos, root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT)
    assert 0.0 <= metrics["NDS"] <= 1.0 and 0.0 <= metrics["mAP"] <= 1.0


def test_score_of_ground_truth_is_high(world):
    """GT boxes fed through the same scoring path give mAP 1 on the boxes the devkit keeps."""
    from bevdeploy.eval.nuscenes import boxes_from_info

    root, infos = world
    run = DetectionRun()
    for info in infos:
        boxes, labels = boxes_from_info(info)  # the synthetic world has only the 10 classes: rows align
        keep = np.asarray(info["valid_flag"], dtype=bool)
        run.boxes[info["token"]] = (boxes[keep], np.ones(int(keep.sum())), labels[keep])
    metrics = score_run(run, infos, root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT)
    # The devkit averages over all 10 classes; a class this tiny world lacks scores AP 0.
    present = {n for info in infos for n, v in zip(info["gt_names"], info["valid_flag"]) if v}
    for name in present:
        assert metrics["per_class"][name]["AP"] > 0.99, name
    assert metrics["mAP"] == pytest.approx(sum(metrics["per_class"][n]["AP"] for n in metrics["per_class"]) / 10)


def test_corrupt_run_file_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"boxes": {"t": [[1, 2], "x"]}}))
    with pytest.raises(ValueError, match="not a bevdeploy detection-run file"):
        DetectionRun.load(bad)
