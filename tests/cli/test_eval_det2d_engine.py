"""``bevdeploy build`` -> ``bevdeploy eval --engine`` for a 2D detector: the engine file names its model, runs
its static batch and scores the same COCO mAP and detections as the model it was built from."""

import json

import pytest

from bevdeploy import cli
from bevdeploy.engine import build
from bevdeploy.engine.engine_file import peek_model_name
from bevdeploy.eval.coco import evaluate_det2d
from tests._utils import ops_on_references_here

SIZE = {"image_size": (64, 96)}
DATA = "synthetic2d:3"


@pytest.fixture(scope="module")
def engine_path(tmp_path_factory):
    with ops_on_references_here():
        return build("centernet-r18-dcn", "fp32", out=tmp_path_factory.mktemp("e") / "cn.engine",
                     model_overrides=SIZE, batch=2, progress=False, device="cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BEVDEPLOY_CACHE", str(tmp_path / "cache"))


def test_eval_of_a_2d_engine_equals_its_model(engine_path, cache, tmp_path, capsys, ops_on_references):
    assert peek_model_name(engine_path) == "centernet-r18-dcn"
    model = evaluate_det2d("centernet-r18-dcn", DATA, device="cpu", batch=2, progress=False, model_overrides=SIZE,
                           results_file=tmp_path / "model.json")
    assert "RANDOM weights" in capsys.readouterr().err
    out = tmp_path / "engine.json"
    rc = cli.main(["eval", "--engine", str(engine_path), "--data", DATA, "--device", "cpu", "--results", str(out), "-q"])
    printed, err = capsys.readouterr()
    assert rc == 0 and "RANDOM weights" in err
    assert f"centernet-r18-dcn engine {engine_path} on {DATA}: 3 images, 300 detections" in printed
    assert f"COCO mAP {model['mAP']:.4f}" in printed and str(out) in printed
    got, want = json.loads(out.read_text()), json.loads((tmp_path / "model.json").read_text())
    assert [d["image_id"] for d in got] == [d["image_id"] for d in want]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(got, want)) < 1e-4
    _same_detections_up_to_ties(got, want)


def _same_detections_up_to_ties(got: list[dict], want: list[dict], tol: float = 1e-4) -> None:
    """Every engine detection is a model detection of its image (same class, box within 0.05 px, score within
    ``tol``), in any order among equal scores (random weights give many: a last-bit difference swaps them). One
    left unmatched on either side must score at its image's lowest kept score (a tie across the top-k cut)."""
    pool = list(want)
    unmatched = []
    for a in got:
        j = next((k for k, b in enumerate(pool) if b["image_id"] == a["image_id"]
                  and b["category_id"] == a["category_id"] and abs(b["score"] - a["score"]) < tol
                  and max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])) < 0.05), None)
        if j is None:
            unmatched.append(a)
        else:
            pool.pop(j)
    lowest = {}
    for d in want:
        lowest[d["image_id"]] = min(lowest.get(d["image_id"], 1.0), d["score"])
    for d in unmatched + pool:
        assert abs(d["score"] - lowest[d["image_id"]]) < tol, f"a detection of one side only: {d}"


def test_eval_of_a_2d_engine_refuses_what_it_cannot_do(engine_path, cache, capsys):
    def refused(*args) -> str:
        assert cli.main(["eval", "--engine", str(engine_path), "--data", DATA, "--device", "cpu", "-q", *args]) == 2
        return capsys.readouterr().err

    assert "static batch 2; --batch 4 cannot run on it" in refused("--batch", "4")
    assert "--no-score: BEV models only" in refused("--no-score")
    assert "--checkpoint applies to --model only" in refused("--checkpoint", str(engine_path))
    with pytest.raises(ValueError, match="built from 'centernet-r18-dcn', not --model 'yolox-x'"):
        evaluate_det2d("yolox-x", DATA, engine=engine_path, device="cpu", progress=False)


def test_a_bad_2d_checkpoint_is_reported_before_the_images_are_rendered(tmp_path, cache, capsys, monkeypatch):
    import bevdeploy.data.det2d as det2d

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the checkpoint was checked")

    monkeypatch.setattr(det2d, "resolve_det2d_spec", no_data)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    assert cli.main(["eval", "--model", "yolox-x", "--checkpoint", str(bad), "--data", DATA, "--device", "cpu"]) == 2
    assert "not a PyTorch checkpoint" in capsys.readouterr().err


def test_peek_model_name_is_none_for_what_is_not_an_engine(tmp_path):
    junk = tmp_path / "junk.engine"
    junk.write_bytes(b"not a zip")
    assert peek_model_name(junk) is None and peek_model_name(tmp_path / "missing.engine") is None


def test_train_then_build_of_a_2d_model_quietly_and_the_next_commands_fit_it(tmp_path, cache, capsys):
    """``train -q`` shows no progress bar; ``build`` of a 2D model suggests 2D commands that parse."""
    import shlex

    ck, out = tmp_path / "cn.pth", tmp_path / "cn.engine"
    assert cli.main(["train", "--model", "centernet-r18-dcn", "--data", DATA, "--image-size", "64", "96",
                     "--steps", "1", "--batch", "2", "--device", "cpu", "-q", "-o", str(ck)]) == 0
    err = capsys.readouterr().err
    assert "train:" not in err and "it/s" not in err, err
    assert cli.main(["build", "--model", "centernet-r18-dcn", "--checkpoint", str(ck), "--precision", "fp32",
                     "--batch", "2", "--device", "cpu", "-q", "-o", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    hints = [line.split("#")[0].strip() for line in lines[lines.index("next:") + 1:]]
    assert len(hints) == 3 and all(h.startswith("bevdeploy ") for h in hints)
    for hint in hints:
        args = cli.build_parser().parse_args(shlex.split(hint)[1:])
        if "--data" in hint:
            assert args.data.startswith("synthetic2d"), hint  # not the BEV world
