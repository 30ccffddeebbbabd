"""COCO evaluation: pycocotools mAP on a hand-made set, the 2D pipelines' box round trip, and the
``bevdeploy eval`` path on a tiny synthetic COCO set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from bevdeploy.data.coco import COCO_CATEGORIES
from bevdeploy.data.det2d import boxes_to_image, preprocess_image, resolve_det2d_spec
from bevdeploy.eval.coco import coco_map, evaluate_det2d, fidelity_map, to_coco_results


def _hand_made_gt(tmp_path):
    images = [{"id": 1, "file_name": "a.jpg", "height": 100, "width": 200},
              {"id": 2, "file_name": "b.jpg", "height": 100, "width": 200}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 50], "area": 2000, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [100, 20, 60, 40], "area": 2400, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [5, 5, 90, 90], "area": 8100, "iscrowd": 0},
    ]
    cats = [{"id": c, "name": n} for c, n in COCO_CATEGORIES]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path)), anns


def test_perfect_detections_score_one_and_misses_score_less(tmp_path):
    gt, anns = _hand_made_gt(tmp_path)
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in anns]
    assert coco_map(gt, perfect)["mAP"] == pytest.approx(1.0)
    # the car of image 2 missed: car AP drops to 0.5 (recall 1/2 at precision 1), person stays 1
    partial = perfect[:2]
    m = coco_map(gt, partial)
    assert m["mAP"] == pytest.approx((1.0 + 0.5) / 2, abs=0.01)
    # wrong class everywhere: 0
    wrong = [dict(r, category_id=2) for r in perfect]
    assert coco_map(gt, wrong)["mAP"] == 0.0
    assert coco_map(gt, [])["mAP"] == 0.0


def test_to_coco_results_maps_labels_and_boxes():
    res = to_coco_results(7, torch.tensor([[1.0, 2.0, 11.0, 22.0]]), torch.tensor([0.5]), torch.tensor([79]))
    assert res == [{"image_id": 7, "category_id": 90, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}]


@pytest.mark.parametrize("kind", ["yolox", "centernet"])
def test_pipeline_box_round_trip(kind):
    """A box drawn on the original image comes back where it was after the pipeline and its inverse."""
    img = np.zeros((90, 160, 3), dtype=np.uint8)
    img[20:50, 30:90] = 255  # white rectangle x 30..90, y 20..50
    x, meta = preprocess_image(img, kind, (64, 64))
    assert x.shape == (3, 64, 64) and torch.isfinite(x).all()
    plane = x[0]
    bright = plane > (200 if kind == "yolox" else 1.5)
    ys, xs = torch.nonzero(bright, as_tuple=True)
    box_in = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    back = boxes_to_image(box_in, meta)
    torch.testing.assert_close(back, torch.tensor([[30.0, 20.0, 90.0, 50.0]]), atol=3.0, rtol=0)
    if kind == "yolox":
        assert plane[-1, -1] == 114.0  # pad value at the bottom right
    else:
        torch.testing.assert_close(x[:, 0, 0], torch.tensor([-123.675 / 58.395, -116.28 / 57.12, -103.53 / 57.375]))


def test_bad_specs():
    with pytest.raises(ValueError, match=r"coco:PATH\[:SPLIT\]\[:N\]' or 'synthetic2d:N"):
        resolve_det2d_spec("nuscenes:/x")
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        resolve_det2d_spec("coco:/nonexistent/coco")
    with pytest.raises(ValueError, match="positive image count"):
        resolve_det2d_spec("synthetic2d:0")
    with pytest.raises(ValueError, match="kind must be"):
        preprocess_image(np.zeros((4, 4, 3), np.uint8), "ssd", (32, 32))


def test_coco_spec_names_a_split_and_a_count(tmp_path):
    """coco:PATH:train2017:N reads instances_train2017.json and train2017/ (train or calibrate on other images
    than those scored), its first N images."""
    from bevdeploy.data.coco import generate_coco

    root = generate_coco(tmp_path / "coco", 3, seed=0, image_size=(36, 64), progress=False)
    (root / "annotations" / "instances_val2017.json").rename(root / "annotations" / "instances_train2017.json")
    (root / "val2017").rename(root / "train2017")
    data = resolve_det2d_spec(f"coco:{root}:train2017:2")
    assert data.image_dir == root / "train2017" and data.ann_file.name == "instances_train2017.json"
    assert [r["id"] for r in data.images()] == [1, 2] and len(resolve_det2d_spec(f"coco:{root}:train2017").images()) == 3
    with pytest.raises(FileNotFoundError, match="instances_val2017.json and val2017/"):
        resolve_det2d_spec(f"coco:{root}")
    with pytest.raises(ValueError, match="must be positive"):
        resolve_det2d_spec(f"coco:{root}:train2017:0")


def test_fidelity_of_identical_results_is_one(tmp_path):
    gt, anns = _hand_made_gt(tmp_path)
    images = gt.dataset["images"]
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.8}
            for a in anns]
    assert fidelity_map(dets, dets, [1, 2], images, 0.3) == pytest.approx(1.0)
    assert fidelity_map(dets[:1], dets, [1, 2], images, 0.3) < 0.5


def test_eval_on_synthetic_coco_writes_results(tmp_path, monkeypatch, ops_on_references):
    monkeypatch.setenv("BEVDEPLOY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "res.json"
    r = evaluate_det2d("centernet-r18-dcn", "synthetic2d:3", device="cpu", batch=2, results_file=out, progress=False,
                       model_overrides={"image_size": (64, 96)})
    assert r["images"] == 3 and r["detections"] == 300  # top-100 per image, no NMS
    assert 0.0 <= r["mAP"] <= 1.0
    written = json.loads(out.read_text())
    assert len(written) == 300 and {d["image_id"] for d in written} == {1, 2, 3}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_bench_of_a_2d_model_refuses_without_a_gpu():
    from bevdeploy.eval.bench_models import bench_model

    with pytest.raises(RuntimeError, match="CUDA GPU"):
        bench_model("yolox-x", ["fp16"], data="synthetic2d:4")


def test_the_bev_spellings_of_the_synthetic_world_read_as_its_2d_views():
    from bevdeploy.data.det2d import CocoSet, as_2d_spec

    assert as_2d_spec("synthetic") == "synthetic2d" and as_2d_spec("synthetic:8@2") == "synthetic2d:8@2"
    assert as_2d_spec("coco:/data/coco:train2017") == "coco:/data/coco:train2017"
    assert as_2d_spec("synthetic2d:4") == "synthetic2d:4"
    data = CocoSet(None, None)
    assert as_2d_spec(data) is data
