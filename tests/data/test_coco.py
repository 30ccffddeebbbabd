"""The synthetic COCO-format 2D set: loadable by pycocotools, boxes on the objects, GT scores AP 1."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from bevdeploy.data.coco import COCO_CATEGORIES, COCO_CLASS_NAMES, COCO_NAME_OF_CLASS, generate_coco
from bevdeploy.data.synthetic import CLASS_COLORS


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    return generate_coco(tmp_path_factory.mktemp("coco"), 12, seed=0, image_size=(180, 320), progress=False)


def test_categories():
    assert len(COCO_CATEGORIES) == 80 and COCO_CLASS_NAMES[0] == "person" and COCO_CATEGORIES[-1] == (90, "toothbrush")
    assert len({cid for cid, _ in COCO_CATEGORIES}) == 80
    assert set(COCO_NAME_OF_CLASS.values()) <= set(COCO_CLASS_NAMES)


def test_pycocotools_loads_and_gt_scores_ap_one(coco_dir):
    from PIL import Image
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(coco_dir / "annotations" / "instances_val2017.json"))
    assert len(gt.getImgIds()) == 12 and len(gt.getAnnIds()) > 10
    colours = {COCO_NAME_OF_CLASS[c]: np.array(CLASS_COLORS[c], float) for c in ("car", "bus", "pedestrian")}
    hits = 0
    for ann in gt.loadAnns(gt.getAnnIds()):
        img = gt.loadImgs(ann["image_id"])[0]
        x, y, w, h = ann["bbox"]
        assert 0 <= x < x + w <= img["width"] and 0 <= y < y + h <= img["height"] and w * h >= ann["area"] >= 16
        name = gt.loadCats(ann["category_id"])[0]["name"]
        if name in colours and ann["area"] > 200:
            pixels = np.asarray(Image.open(coco_dir / "val2017" / img["file_name"]))[y:y + h, x:x + w].reshape(-1, 3)
            base = colours[name]
            cos = pixels @ base / (np.linalg.norm(pixels, axis=1) * np.linalg.norm(base) + 1e-9)
            assert (cos > 0.97).mean() > 0.2  # the box holds the object's colour
            hits += 1
    assert hits > 0
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt.loadAnns(gt.getAnnIds())]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_cache_and_errors(coco_dir, tmp_path):
    ann = coco_dir / "annotations" / "instances_val2017.json"
    stamp = ann.stat().st_mtime_ns
    assert generate_coco(coco_dir, 12, seed=0, image_size=(180, 320), progress=False) == coco_dir
    assert ann.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="num_images"):
        generate_coco(tmp_path / "x", 0)


def test_seeded_2d_sets_are_disjoint(tmp_path):
    """``synthetic2d:N@1`` (training) and ``synthetic2d:N@2`` (held out) share no image id and no image."""
    import hashlib

    from bevdeploy.data.det2d import resolve_det2d_spec

    def digests(s):
        return {hashlib.sha256((s.image_dir / r["file_name"]).read_bytes()).hexdigest() for r in s.images()}

    kw = dict(cache_dir=tmp_path, image_size=(90, 160), progress=False)
    train = resolve_det2d_spec("synthetic2d:7@1", **kw)
    held = resolve_det2d_spec("synthetic2d:7@2", **kw)
    default = resolve_det2d_spec("synthetic2d:7", **kw)
    ids = [{r["id"] for r in s.images()} for s in (train, held, default)]
    assert all(len(i) == 7 for i in ids)
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    assert ids[2] == set(range(1, 8))  # seed 0 keeps ids 1..N
    assert not digests(train) & digests(held)
    assert train.spec == "synthetic2d:7@1" and train.ann_file != held.ann_file
    # the spec's seed is the one used: same set as the seed keyword
    assert resolve_det2d_spec("synthetic2d:7", seed=1, **kw).ann_file == train.ann_file
    with pytest.raises(ValueError, match="non-negative integer"):
        resolve_det2d_spec("synthetic2d:7@x", **kw)


def test_parallel_rendering_writes_the_same_set(tmp_path):
    one = generate_coco(tmp_path / "one", 7, seed=3, image_size=(90, 160), progress=False)
    two = generate_coco(tmp_path / "two", 7, seed=3, image_size=(90, 160), progress=False, workers=2)
    assert (one / "annotations/instances_val2017.json").read_bytes() == (two / "annotations/instances_val2017.json").read_bytes()
    for f in sorted((one / "val2017").iterdir()):
        assert f.read_bytes() == (two / "val2017" / f.name).read_bytes()
