"""``bevdeploy show``: BEV and camera PNGs, with a box drawn where the ground truth says."""

import numpy as np
import pytest
from PIL import Image

from bevdeploy import cli
from bevdeploy.data.nuscenes import load_infos
from bevdeploy.data.synthetic import SYNTHETIC_SPLIT, SYNTHETIC_VERSION, generate
from bevdeploy.eval.nuscenes import boxes_from_info
from bevdeploy.eval.visualize import GT_COLOR, bev_figure, devkit_boxes


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("world"), num_scenes=1, samples_per_scene=2, seed=5, image_size=(90, 160),
                    progress=False)
    return root, load_infos(root, SYNTHETIC_VERSION, SYNTHETIC_SPLIT, progress=False)


def test_show_writes_bev_and_camera_pngs(world, tmp_path, capsys):
    root, infos = world
    out = tmp_path / "show"
    assert cli.main(["show", "--data", f"nuscenes:{root}@{SYNTHETIC_VERSION}", "--frames", "2", "-o", str(out), "-q"]) == 0
    pngs = sorted(out.glob("*.png"))
    assert [p.name.split("_")[-1] for p in pngs] == ["bev.png", "cams.png"] * 2
    assert Image.open(pngs[0]).size == (800, 800)
    w, h = Image.open(pngs[1]).size
    assert w == 1500 and 400 < h < 800  # 2 x 3 cameras of 16:9
    assert "4 pictures written" in capsys.readouterr().out


def test_bev_draws_the_ground_truth_box_where_it_is(world, tmp_path):
    _, infos = world
    gt = next(boxes_from_info(i)[0] for i in infos if len(boxes_from_info(i)[0]))
    fig, ax = bev_figure(gt, np.zeros((0, 9)))
    path = tmp_path / "bev.png"
    fig.savefig(path, dpi=fig.dpi)
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    corners = devkit_boxes(gt[:1])[0].bottom_corners()[:2].T  # LiDAR (x, y) of the 4 bottom corners
    mid = (corners[0] + corners[1]) / 2  # the middle of one edge: the line passes there
    px, py = ax.transData.transform(mid)
    row, col = int(round(pixels.shape[0] - py)), int(round(px))
    patch = pixels[row - 1:row + 2, col - 1:col + 2].reshape(-1, 3)
    want = np.array(GT_COLOR) * 255
    assert (np.abs(patch - want).max(axis=1) < 40).any(), patch
    assert not (np.abs(pixels[5:20, 5:20].reshape(-1, 3) - want).max(axis=1) < 40).any()  # not green everywhere


def test_show_draws_a_results_file(world, tmp_path, capsys):
    """``--results``: the submission file's boxes come back to the LiDAR frame and are drawn in red."""
    from bevdeploy.eval.detection import DetectionRun, write_results
    from bevdeploy.eval.visualize import PRED_COLOR

    root, infos = world
    run = DetectionRun()
    for info in infos:
        boxes, labels = boxes_from_info(info)
        run.boxes[info["token"]] = (boxes, np.ones(len(boxes)), labels)
    results = write_results(run, infos, tmp_path / "results.json")
    out = tmp_path / "show"
    assert cli.main(["show", "--data", f"nuscenes:{root}@{SYNTHETIC_VERSION}", "--results", str(results),
                     "--frames", "1", "-o", str(out), "-q"]) == 0
    bev = np.asarray(Image.open(next(out.glob("*_bev.png"))).convert("RGB")).astype(int)
    red = (np.abs(bev - np.array(PRED_COLOR) * 255).max(axis=-1) < 40).sum()
    assert red > 50  # prediction outlines present


@pytest.mark.parametrize("flags, message", [
    (["--engine", "ENGINE"], "not a readable bevdeploy engine file"),
    (["--model", "bevformer-huge"], "unknown model 'bevformer-huge'"),
])
def test_show_refuses_a_bad_engine_or_model_before_rendering_the_world(tmp_path, monkeypatch, capsys, flags, message):
    """A corrupt engine or an unknown model name is reported at once, not after the data is rendered and read."""
    import bevdeploy.data.synthetic as synthetic

    def no_render(*args, **kwargs):
        raise AssertionError("the data was resolved before the engine / model was checked")

    monkeypatch.setattr(synthetic, "resolve_data_spec", no_render)
    engine = tmp_path / "bad.engine"
    engine.write_bytes(b"not a zip archive")
    flags = [str(engine) if f == "ENGINE" else f for f in flags]
    assert cli.main(["show", "--data", "synthetic:50", *flags, "-o", str(tmp_path / "show"), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and "internal error" not in err


def _red_pixels(path) -> np.ndarray:
    """Mask of the predictions' red (PRED_COLOR) in a PNG."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return (rgb[..., 0] > 200) & (rgb[..., 1] < 40) & (rgb[..., 2] < 40)


def test_show_of_2d_data_draws_each_image_with_its_boxes(tmp_path, monkeypatch, capsys):
    """2D data: one PNG per image; a results file's box is drawn where it says (red), ground truth alone in green."""
    import json

    from bevdeploy.data.det2d import resolve_det2d_spec

    monkeypatch.setenv("BEVDEPLOY_CACHE", str(tmp_path / "cache"))
    assert cli.main(["show", "--data", "synthetic2d:2", "-o", str(tmp_path / "gt"), "-q"]) == 0
    pngs = sorted((tmp_path / "gt").glob("*.png"))
    assert [p.name for p in pngs] == ["000_1_det.png", "001_2_det.png"]
    assert "2 pictures written" in capsys.readouterr().out
    source = resolve_det2d_spec("synthetic2d:2", progress=False)
    h, w = source.images()[0]["height"], source.images()[0]["width"]
    box = [w * 0.25, h * 0.25, w * 0.5, h * 0.5]  # [x, y, w, h] pixels
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": 1, "category_id": 3, "bbox": box, "score": 0.9},
                                   {"image_id": 1, "category_id": 3, "bbox": box, "score": 0.1}]))
    out = tmp_path / "res"
    assert cli.main(["show", "--data", "synthetic2d:2", "--results", str(results), "--frames", "1", "-o", str(out),
                     "-q"]) == 0
    red = _red_pixels(out / "000_1_det.png") & ~_red_pixels(pngs[0])  # what the results added (the world has red cars)
    rows, cols = np.nonzero(red)
    pw = red.shape[1] / w  # picture pixels per image pixel (the image fills the width)
    assert abs(cols.min() / pw - box[0]) < 4 and abs(cols.max() / pw - (box[0] + box[2])) < 4
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": {}}))
    assert cli.main(["show", "--data", "synthetic2d:2", "--results", str(bad), "-o", str(out), "-q"]) == 2
    assert "not a COCO results JSON" in capsys.readouterr().err
    # the COCO results with BEV data (the default): named for what they are
    assert cli.main(["show", "--results", str(results), "-o", str(out), "-q"]) == 2
    assert "is a COCO results list (a 2D detector's)" in capsys.readouterr().err


def test_show_runs_a_2d_model_and_refuses_2d_data_for_a_bev_model(tmp_path, monkeypatch, capsys, ops_on_references):
    from bevdeploy.models import MODELS

    monkeypatch.setenv("BEVDEPLOY_CACHE", str(tmp_path / "cache"))
    centernet = MODELS["centernet-r18-dcn"]
    monkeypatch.setitem(MODELS, "centernet-r18-dcn", lambda: centernet(image_size=(64, 96)))  # small and quick
    # a 2D model reads the default synthetic spec as its 2D form
    assert cli.main(["show", "--model", "centernet-r18-dcn", "--data", "synthetic:1", "--score-threshold", "0",
                     "--device", "cpu", "-o", str(tmp_path / "cn"), "-q"]) == 0
    assert [p.name for p in (tmp_path / "cn").glob("*.png")] == ["000_1_det.png"]
    assert cli.main(["show", "--data", "synthetic2d:1", "-o", str(tmp_path / "gt"), "-q"]) == 0
    # its 100 top-k boxes, all drawn at threshold 0, add red to the picture (the world has red cars of its own)
    added = _red_pixels(tmp_path / "cn" / "000_1_det.png") & ~_red_pixels(tmp_path / "gt" / "000_1_det.png")
    assert added.sum() > 500
    assert "RANDOM weights" in capsys.readouterr().err
    assert cli.main(["show", "--model", "bevformer-tiny", "--data", "synthetic2d:1", "-o", str(tmp_path / "x")]) == 2
    assert "bevformer-tiny is a BEV model" in capsys.readouterr().err
