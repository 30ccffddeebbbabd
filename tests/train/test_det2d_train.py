"""2D training pieces: CenterNet targets and focal loss by hand, SimOTA on a hand-made scene, and a
few optimizer steps of each family lowering its loss on a tiny synthetic COCO set."""

from __future__ import annotations

import math

import pytest
import torch

from bevdeploy.models import MODELS
from bevdeploy.models.yolox import yolox_priors
from bevdeploy.train.centernet import (
    CenterNetTraining,
    centernet_targets,
    gaussian_focal_loss,
    gaussian_radius,
)
from bevdeploy.train.yolox import YOLOXTraining, decode_boxes, simota_assign


def test_gaussian_radius_keeps_the_overlap():
    h, w, overlap = 20.0, 30.0, 0.3
    r = gaussian_radius(h, w, overlap)
    assert 0 < r < min(h, w)
    # CornerNet's first case: a box whose two corners both moved by r along x and y (one inward,
    # one outward) overlaps the original by (h - r)(w - r) / (2hw - (h - r)(w - r)); the radius
    # is the minimum of the three cases, so this overlap is at least min_overlap
    inter = (h - r) * (w - r)
    assert inter / (2 * h * w - inter) >= overlap - 1e-9
    assert gaussian_radius(40.0, 60.0, overlap) == pytest.approx(2 * r)  # scales with the box


def test_centernet_targets_by_hand():
    boxes = [torch.tensor([[8.0, 4.0, 24.0, 12.0]])]  # input pixels; centre (16, 8), size 16x8
    t = centernet_targets(boxes, [torch.tensor([2])], num_classes=3, feat_hw=(8, 16), image_hw=(32, 64))
    # map stride 4: centre (4, 2), size (4, 2)
    assert t["heatmap"][0, 2, 2, 4] == 1.0 and t["heatmap"].eq(1).sum() == 1
    assert t["heatmap"][0, :2].sum() == 0
    torch.testing.assert_close(t["wh"][0, :, 2, 4], torch.tensor([4.0, 2.0]))
    torch.testing.assert_close(t["offset"][0, :, 2, 4], torch.tensor([0.0, 0.0]))
    assert t["weight"].sum() == 2


def test_gaussian_focal_loss_is_zero_for_the_target_and_positive_otherwise():
    target = torch.zeros(1, 1, 5, 5)
    target[0, 0, 2, 2] = 1.0
    perfect = target.clone()
    assert gaussian_focal_loss(perfect, target) < 1e-6
    assert gaussian_focal_loss(torch.full_like(target, 0.5), target) > 0.1


def test_simota_picks_points_inside_the_object():
    priors = yolox_priors((64, 64))
    gt = torch.tensor([[16.0, 16.0, 48.0, 48.0]])
    deltas = torch.zeros(priors.shape[0], 4)
    deltas[:, 2:] = torch.log(32.0 / priors[:, 2:])  # every point predicts a 32x32 box around its centre
    deltas[:, :2] = 0.5
    boxes = decode_boxes(priors, deltas)
    scores = torch.full((priors.shape[0], 2), 0.01)
    fg, gi, iou = simota_assign(scores, boxes, priors, gt, torch.tensor([1]))
    assert 1 <= fg.sum() <= 10
    centres = priors[fg, :2] + priors[fg, 2:] / 2
    assert ((centres > 16) & (centres < 48)).all()
    assert (gi[fg] == 0).all() and (iou[fg] > 0.5).all()
    # the best point is the one whose box is the GT itself: centre (32, 32) at stride 8
    exact = ((boxes - gt).abs().sum(1) < 1e-4).nonzero()[:, 0]
    assert fg[exact].all()
    none = simota_assign(scores, boxes, priors, gt[:0], torch.tensor([], dtype=torch.long))
    assert not none[0].any()


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("BEVDEPLOY_CACHE", str(tmp_path_factory.mktemp("cache")))
    from bevdeploy.data.det2d import resolve_det2d_spec

    yield resolve_det2d_spec("synthetic2d:6", progress=False)
    mp.undo()


@pytest.mark.parametrize("name", ["yolox-x", "centernet-r18-dcn"])
def test_a_few_steps_lower_the_loss(name, tiny_set, ops_on_references):
    torch.manual_seed(0)
    if name == "yolox-x":
        model = MODELS[name](deepen_factor=0.33, widen_factor=0.125, image_size=(64, 96))
        training = YOLOXTraining(model, tiny_set, "cpu")
    else:
        model = MODELS[name](image_size=(64, 96))
        training = CenterNetTraining(model, tiny_set, "cpu")
    assert sum(len(b) for b in training.boxes) > 0, "the tiny set has objects"
    batch = next(training.batches(2, seed=0))
    assert batch.images.shape == (2, 3, 64, 96)
    model.train()
    # SimOTA re-assigns every step, so YOLOX needs a few more steps to show the trend
    steps, lr = (8, 3e-3) if name == "yolox-x" else (4, 1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        terms = training.loss(model, batch)
        assert all(torch.isfinite(v) for v in terms.values()), terms
        total = sum(terms.values())
        losses.append(float(total.detach()))
        opt.zero_grad()
        total.backward()
        opt.step()
    assert losses[-1] < losses[0] and not math.isnan(losses[-1]), losses


# --- the wiring: make_training, the trainer, train_model's checkpoint ---------------------------------------

REDUCED = {
    "yolox-x": dict(deepen_factor=0.33, widen_factor=0.125, image_size=(64, 96)),
    "centernet-r18-dcn": dict(image_size=(64, 96)),
}


@pytest.mark.parametrize("name, cls", [("yolox-x", YOLOXTraining), ("centernet-r18-dcn", CenterNetTraining)])
def test_make_training_picks_the_2d_family(name, cls, tiny_set, ops_on_references):
    from bevdeploy.train import FamilyTraining, make_training

    torch.manual_seed(0)
    training = make_training(name, MODELS[name](**REDUCED[name]), tiny_set, "cpu")
    assert type(training) is cls and isinstance(training, FamilyTraining)
    assert training.images.shape[1:] == (3, 64, 96) and len(training.boxes) == 6
    with pytest.raises(TypeError, match="COCO-format set"):
        make_training(name, MODELS[name](**REDUCED[name]), [{"token": "x"}], "cpu")


def test_the_trainer_lowers_the_yolox_loss(tiny_set, ops_on_references):
    """20 steps of :func:`bevdeploy.train.train` (AdamW, warm-up + cosine, clip) on one batch's worth of images."""
    from bevdeploy.data.det2d import CocoSet
    from bevdeploy.train import make_training, train

    torch.manual_seed(0)
    model = MODELS["yolox-x"](**REDUCED["yolox-x"])
    two = CocoSet(tiny_set.ann_file, tiny_set.image_dir, 2)
    training = make_training("yolox-x", model, two, "cpu")
    history = train(model, training, steps=20, batch_size=2, lr=2e-3, warmup=2, log_every=1, progress=False)
    losses = [h["loss"] for h in history]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert not model.training  # train() leaves the model in eval mode


@pytest.mark.parametrize("name", ["yolox-x", "centernet-r18-dcn"])
def test_train_model_writes_a_strict_official_layout_checkpoint(name, tmp_path, monkeypatch, ops_on_references):
    from bevdeploy.models.checkpoint import load_checkpoint
    from bevdeploy.train import train_model

    monkeypatch.setenv("BEVDEPLOY_CACHE", str(tmp_path / "cache"))
    path = train_model(name, "synthetic2d:4@1", steps=2, batch=2, out=tmp_path / f"{name}.pth", device="cpu",
                       workers=1, render_size=(90, 160), model_overrides=REDUCED[name], progress=False)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"state_dict", "meta"}
    meta = ckpt["meta"]
    assert meta["data"] == "synthetic2d:4@1" and meta["frames_in_world"] == 4 and meta["steps"] == 2
    assert meta["model_overrides"]["image_size"] == [64, 96] and meta["render_size"] == [90, 160]
    fresh = MODELS[name](**REDUCED[name])
    report = load_checkpoint(fresh, path)  # strict: every key, every shape
    assert not report.missing and not report.unexpected and not report.mismatched
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, ckpt["state_dict"][k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="synthetic2d:N@SEED"):  # a BEV world is no 2D training set
        train_model(name, "synthetic:4@1", steps=1, batch=1, out=tmp_path / "x.pth", device="cpu")


@pytest.mark.slow
def test_a_reduced_yolox_learns_its_training_images(tmp_path, monkeypatch, ops_on_references):
    """The whole 2D training path learns: a reduced YOLOX trained 150 steps on 8 views scores mAP50 > 0.1
    on those views (pycocotools; memorising, not generalising: the held-out mAP is the GPU table's job);
    untrained, the same model scores ~0. About a minute on two CPU cores."""
    from bevdeploy.eval.coco import evaluate_det2d
    from bevdeploy.train import train_model

    monkeypatch.setenv("BEVDEPLOY_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    overrides = dict(deepen_factor=0.33, widen_factor=0.125, image_size=(96, 160))
    path = train_model("yolox-x", "synthetic2d:8@1", steps=150, batch=8, out=tmp_path / "y.pth", lr=2e-3, warmup=5,
                       device="cpu", workers=1, render_size=(90, 160), model_overrides=overrides, progress=False)
    kw = dict(device="cpu", batch=8, progress=False, model_overrides=overrides)
    from bevdeploy.data import det2d

    monkeypatch.setattr(det2d, "resolve_det2d_spec", _at_size(det2d.resolve_det2d_spec, (90, 160)))
    before = evaluate_det2d("yolox-x", "synthetic2d:8@1", **kw)
    after = evaluate_det2d("yolox-x", "synthetic2d:8@1", checkpoint=str(path), **kw)
    assert after["mAP_50"] > 0.1 and after["mAP_50"] > before["mAP_50"] + 0.1, (before["mAP_50"], after["mAP_50"])


def _at_size(resolve, size):
    return lambda spec, **kw: resolve(spec, **{**kw, "image_size": size})


def test_simota_dynamic_k_per_gt_matches_a_loop():
    """The vectorised dynamic-k match equals the per-GT loop of mmdet's ``dynamic_k_matching``."""
    g = torch.Generator().manual_seed(0)
    v, n = 40, 5
    cost = torch.rand(v, n, generator=g) * 10
    iou = torch.rand(v, n, generator=g)
    k = 10
    dyn = iou.topk(k, dim=0).values.sum(0).int().clamp(min=1, max=k)
    loop = torch.zeros(v, n, dtype=torch.bool)
    for j in range(n):
        loop[cost[:, j].topk(int(dyn[j]), largest=False).indices, j] = True
    vec = torch.zeros(v, n, dtype=torch.bool)
    vec.scatter_(0, cost.topk(k, dim=0, largest=False).indices, torch.arange(k)[:, None] < dyn[None, :])
    assert torch.equal(loop, vec)


def test_centernet_loss_keeps_a_gradient_where_a_bf16_sigmoid_saturates(tiny_set, ops_on_references):
    """Heatmap logits of 8: a bf16 sigmoid gives exactly 1.0 there and a zero gradient (the cell would stay
    stuck); the training loss takes the sigmoid in fp32, so the heatmap's bias still gets pushed down."""
    torch.manual_seed(0)
    model = MODELS["centernet-r18-dcn"](image_size=(64, 96))
    with torch.no_grad():
        model.bbox_head.heatmap_head[-1].bias.fill_(8.0)
    training = CenterNetTraining(model, tiny_set, "cpu")
    batch = next(training.batches(2, seed=0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(batch.images)["heatmap"].eq(1).float().mean() > 0.9, "the bf16 forward saturates"
        terms = training.loss(model, batch)
    sum(terms.values()).backward()
    grad = model.bbox_head.heatmap_head[-1].bias.grad
    assert torch.isfinite(grad).all() and (grad > 0).all(), grad  # every class: lower the logits


def test_centernet_prebuilt_targets_equal_the_per_batch_ones(tiny_set, ops_on_references):
    torch.manual_seed(0)
    training = CenterNetTraining(MODELS["centernet-r18-dcn"](image_size=(64, 96)), tiny_set, "cpu")
    batch = next(training.batches(3, seed=1))
    want = centernet_targets(batch.boxes, batch.labels, 80, (16, 24), (64, 96))
    assert set(batch.targets) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(batch.targets[key], value, atol=1e-3, rtol=1e-3)  # heatmap kept in fp16


@pytest.mark.parametrize("canvas", [(192, 320), (384, 672)])
def test_centernet_targets_decode_back_to_the_ground_truth(canvas, tiny_set):
    """Encode -> decode: the training targets of the tiny set's views, fed to the evaluation path as if
    they were the head's outputs (decoder, mapping back to original pixels, COCO category ids,
    pycocotools), score mAP ~1. Catches any frame mismatch between training and evaluation: input vs
    map pixels, the canvas paste / shrink, wh or offset units, offset sign, label ids. ``(192, 320)``
    shrinks the 360x640 views by half; ``(384, 672)`` pastes them unscaled off the origin."""
    from bevdeploy.data.det2d import load_training_set
    from bevdeploy.eval.coco import coco_map, run_det2d
    from bevdeploy.models.centernet import CenterNetConfig

    cfg = CenterNetConfig(image_size=canvas)
    _, boxes, labels = load_training_set(tiny_set, "centernet", canvas)
    assert sum(len(b) for b in boxes) >= 10
    t = centernet_targets(boxes, labels, 80, (canvas[0] // 4, canvas[1] // 4), canvas)
    n = len(boxes)

    def forward(x):
        assert x.shape[0] == n
        return {"heatmap": t["heatmap"], "wh": t["wh"], "offset": t["offset"]}

    results, _ = run_det2d(forward, tiny_set, "centernet-r18-dcn", cfg, batch=n, device=torch.device("cpu"))
    peaks = [r for r in results if r["score"] == 1.0]
    assert len(peaks) == int(t["heatmap"].eq(1).sum())
    stats = coco_map(tiny_set.coco(), results, [r["id"] for r in tiny_set.images()])
    # two objects of one class whose centres share a map cell keep one peak: not quite 1
    assert stats["mAP"] > 0.9 and stats["mAP_75"] > 0.9, stats


@pytest.mark.slow
def test_a_reduced_centernet_learns_its_training_images(tmp_path, monkeypatch, ops_on_references):
    """The whole CenterNet training path learns: CenterNet-R18-DCN (full width) at a 96x160 canvas trained
    80 steps on 8 views scores mAP > 0.3 on those views (memorising, not generalising; measured 0.80,
    heatmap loss 17.9 -> 0.10); untrained ~0. With the neck's old transposed-conv init (the bilinear
    kernel in every channel pair: identical output channels) the same training stayed at mAP 0.0
    (60 steps: heatmap loss 6.97, 150 steps: 2.80). About 50 s on one CPU core."""
    from bevdeploy.eval.coco import evaluate_det2d
    from bevdeploy.train import train_model

    monkeypatch.setenv("BEVDEPLOY_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~0.6 s a step; two threads on a busy two-core machine were 10x slower
    overrides = dict(image_size=(96, 160))
    try:
        path = train_model("centernet-r18-dcn", "synthetic2d:8@1", steps=80, batch=8, out=tmp_path / "c.pth",
                           lr=2e-3, warmup=5, device="cpu", workers=1, render_size=(90, 160),
                           model_overrides=overrides, progress=False)
    finally:
        torch.set_num_threads(threads)
    from bevdeploy.data import det2d

    monkeypatch.setattr(det2d, "resolve_det2d_spec", _at_size(det2d.resolve_det2d_spec, (90, 160)))
    kw = dict(device="cpu", batch=8, progress=False, model_overrides=overrides)
    before = evaluate_det2d("centernet-r18-dcn", "synthetic2d:8@1", **kw)
    after = evaluate_det2d("centernet-r18-dcn", "synthetic2d:8@1", checkpoint=str(path), **kw)
    history = torch.load(path, weights_only=True)["meta"]["history"]
    assert history[-1]["loss_center_heatmap"] < 0.5 * history[0]["loss_center_heatmap"], history[-1]
    assert after["mAP"] > 0.3 and after["mAP"] > before["mAP"] + 0.3, (before["mAP"], after["mAP"])
