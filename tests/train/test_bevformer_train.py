"""BEVFormer training: match costs and assignment, the loss, the temporal queue, a few training steps.

Reduced model (32x64 images, BEV 8x8, 20 queries) on a tiny synthetic world rendered at 64x128
(tiny's 0.5 scale gives the model's 32x64); ops run their PyTorch references, on one thread (the
test machine's cores are shared: more threads ran several times slower).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from bevdeploy.data import synthetic as syn
from bevdeploy.data.nuscenes import load_infos
from bevdeploy.models import MODELS
from bevdeploy.train.bevformer import (
    BEVFormerTraining,
    bevformer_loss,
    focal_cost,
    gt_targets,
    hungarian_assign,
    l1_cost,
    match_cost,
    normalize_bbox,
    sigmoid_focal_loss,
)
from tests.models._helpers import SMALL, randomize_

WORLD_SIZE = (64, 128)
IMAGE = (32, 64)


@pytest.fixture(autouse=True)
def _ops_on_references(ops_on_references):
    """Every test here: ops on their references (fast; the kernels are tested in tests/ops)."""


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def infos(tmp_path_factory) -> list[dict]:
    root = syn.generate(tmp_path_factory.getbasetemp() / "synthetic-train", 2, 4, seed=0, image_size=WORLD_SIZE,
                        image_format="png", progress=False)
    return load_infos(root, syn.SYNTHETIC_VERSION, syn.SYNTHETIC_SPLIT, progress=False)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return MODELS["bevformer-tiny"](**{**SMALL, "image_size": IMAGE})


@pytest.fixture(scope="module")
def training(infos) -> BEVFormerTraining:
    return BEVFormerTraining(_model(), infos, "cpu", workers=1, progress=False)


# --------------------------------------------------------------------------------------------------
# Costs and assignment.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(20, 7), (9, 9), (13, 1), (5, 8)])
def test_hungarian_matches_scipy_on_random_costs(shape):
    g = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
    cost = torch.randn(shape, generator=g) * 3
    rows, cols = hungarian_assign(cost)
    ref_rows, ref_cols = linear_sum_assignment(cost.double().numpy())
    assert len(rows) == min(shape) and len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    c = cost.double().numpy()
    assert c[rows, cols].sum() == pytest.approx(c[ref_rows, ref_cols].sum(), abs=1e-9)


def test_hungarian_is_the_brute_force_minimum():
    g = torch.Generator().manual_seed(7)
    cost = torch.rand(5, 3, generator=g).double()
    rows, cols = hungarian_assign(cost)
    best = min(sum(cost[q, m].item() for m, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
    assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-12)
    # no GT: nothing assigned; NaN refused
    assert hungarian_assign(torch.zeros(4, 0))[0].size == 0
    with pytest.raises(ValueError, match="finite"):
        hungarian_assign(torch.tensor([[float("nan")]]))


def test_focal_cost_hand_values():
    # p = sigmoid(0) = 0.5: pos = -log(0.5) * 0.25 * 0.5^2, neg = -log(0.5) * 0.75 * 0.5^2
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), -math.log(3.0)]])  # second query: p = 0.75, 0.25
    cost = focal_cost(logits, torch.tensor([1, 0, 1]))
    half = -math.log(0.5) * 0.25 * 0.25 - (-math.log(0.5) * 0.75 * 0.25)
    assert cost.shape == (2, 3)
    torch.testing.assert_close(cost[0], torch.full((3,), half), atol=1e-6, rtol=0)
    pos_75 = -math.log(0.75) * 0.25 * 0.25**2 - (-math.log(0.25) * 0.75 * 0.75**2)  # class 0, p = 0.75
    pos_25 = -math.log(0.25) * 0.25 * 0.75**2 - (-math.log(0.75) * 0.75 * 0.25**2)  # class 1, p = 0.25
    torch.testing.assert_close(cost[1], torch.tensor([pos_25, pos_75, pos_25]), atol=1e-6, rtol=0)
    assert pos_75 < half < pos_25  # a confident right class is cheap


def test_l1_cost_and_match_cost_hand_values():
    pred = torch.tensor([[0.0, 0.0, 1.0], [1.0, -1.0, 0.5]])
    gt = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(l1_cost(pred, gt), torch.tensor([[1 + 2 + 2.0], [0 + 3 + 2.5]]))
    # the assigner's cost: 2 * focal + 0.25 * L1 over the first 8 code entries (velocity ignored)
    box = torch.zeros(1, 10)
    box[0, 8:] = 100.0
    gt_code = torch.zeros(1, 10)
    gt_code[0, 0] = 4.0
    cost = match_cost(torch.zeros(1, 10), box, torch.tensor([3]), gt_code)
    focal = -math.log(0.5) * 0.25 * (0.25 - 0.75)  # p = 0.5: pos - neg
    torch.testing.assert_close(cost, torch.tensor([[2 * focal + 0.25 * 4.0]]))


def test_normalize_bbox_hand_values():
    boxes = torch.tensor([[1.0, -2.0, 0.5, 2.0, 4.0, 1.5, math.pi / 2, 3.0, -1.0]])
    expected = torch.tensor([[1.0, -2.0, math.log(2.0), math.log(4.0), 0.5, math.log(1.5), 1.0, 0.0, 3.0, -1.0]])
    torch.testing.assert_close(normalize_bbox(boxes), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="9 values"):
        normalize_bbox(torch.zeros(2, 7))


def test_sigmoid_focal_loss_hand_values():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = 0.5, 0.75
    loss = sigmoid_focal_loss(logits, torch.tensor([[1.0, 0.0]]))
    expected = [-math.log(0.5) * 0.25 * 0.5**2, -math.log(0.25) * 0.75 * 0.75**2]
    torch.testing.assert_close(loss, torch.tensor([expected]), atol=1e-6, rtol=0)


def test_loss_is_zero_where_predictions_are_the_targets():
    """Queries that predict a GT box exactly (class logit high, others low) match it and cost no L1;
    the other queries only add a small background focal loss."""
    gt = torch.tensor(
        [[3.0, -4.0, 0.2, 1.9, 4.5, 1.6, 0.3, 1.0, 0.0], [-10.0, 6.0, -0.5, 0.6, 0.7, 1.7, -2.0, 0.0, 0.5]]
    )
    labels = torch.tensor([0, 8])
    L, Q, C = 2, 6, 10
    cls = torch.full((L, 1, Q, C), -12.0)
    box = torch.zeros(L, 1, Q, 10)
    box[:, 0, :, 2:4] = 3.0
    box[:, 0, 4] = normalize_bbox(gt[0])
    box[:, 0, 1] = normalize_bbox(gt[1])
    cls[:, 0, 4, 0] = 12.0
    cls[:, 0, 1, 8] = 12.0
    losses = bevformer_loss(cls, box, [gt], [labels], torch.ones(10))
    assert set(losses) == {"loss_cls", "loss_bbox", "d0.loss_cls", "d0.loss_bbox"}
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert 0 < losses["loss_cls"].item() < 1e-6
    # swap the two GT boxes' predictions in layer 0's queries: the matching follows, loss unchanged
    perm = box.clone()
    perm[0, 0, [1, 4]] = box[0, 0, [4, 1]]
    cls_perm = cls.clone()
    cls_perm[0, 0, [1, 4]] = cls[0, 0, [4, 1]]
    assert bevformer_loss(cls_perm, perm, [gt], [labels], torch.ones(10))["d0.loss_bbox"].item() < 1e-6
    # a wrong box costs 0.25 * |error| / num_gt
    off = box.clone()
    off[1, 0, 4, 0] += 2.0
    assert bevformer_loss(cls, off, [gt], [labels], torch.ones(10))["loss_bbox"].item() == pytest.approx(0.25 * 2 / 2)


def test_targets_are_the_eval_boxes_with_gravity_centre(infos):
    from bevdeploy.eval.nuscenes import boxes_from_info

    info = infos[1]
    boxes, labels = gt_targets(info, (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0))
    eval_boxes, eval_labels = boxes_from_info(info)
    assert 0 < len(boxes) <= len(eval_boxes) and boxes.dtype == np.float32
    # every target is an eval box with z moved from the bottom to the gravity centre
    for box, label in zip(boxes, labels):
        match = np.all(np.isclose(eval_boxes[:, [0, 1, 3, 4, 5, 6, 7, 8]], box[[0, 1, 3, 4, 5, 6, 7, 8]], atol=1e-4), 1)
        (i,) = np.nonzero(match)
        assert len(i) == 1 and eval_labels[i[0]] == label
        assert box[2] == pytest.approx(eval_boxes[i[0], 2] + eval_boxes[i[0], 5] / 2, abs=1e-4)
    tight = gt_targets(info, (-5.0, -5.0, -5.0, 5.0, 5.0, 3.0))[0]
    assert len(tight) < len(boxes) and np.all(np.abs(tight[:, :2]) < 5.0)


# --------------------------------------------------------------------------------------------------
# Temporal queue.
# --------------------------------------------------------------------------------------------------


def test_queue_follows_the_official_rule(training, infos):
    rng = np.random.default_rng(0)
    for i in range(len(infos)):
        for _ in range(5):
            q = training.queue(i, rng)
            assert len(q) == 3 and q[-1] == i
            earlier = [j for j in q[:-1] if j is not None]
            assert earlier == sorted(earlier) and all(i - 3 <= j < i for j in earlier)
            assert len(earlier) == min(i, 2) and q[: 2 - len(earlier)] == [None] * (2 - len(earlier))


def test_batches_gate_and_images(training, infos):
    batch = training.make_batch([3, 4], np.random.default_rng(1))  # frame 3 of scene 0; first frame of scene 1
    frames = batch["frames"]
    assert len(frames) == 3 and frames[0].image.shape == (2, 6, 3, *IMAGE)
    assert infos[4]["frame_idx"] == 0 and infos[3]["frame_idx"] == 3
    assert frames[0].use_prev_bev.tolist() == [0.0, 0.0]  # the queue's first frame never has a previous BEV
    assert frames[2].use_prev_bev.tolist() == [1.0, 0.0]  # a scene start drops the history
    assert torch.all(frames[2].can_bus[1, [0, 1, 2, 17]] == 0) and torch.any(frames[2].can_bus[0, :3] != 0)
    # normalised like the evaluation's preprocessing (uint8 rounding apart)
    from bevdeploy.data.preprocess import prepare_frame

    ref = prepare_frame(infos[4], None)  # the evaluation's path
    torch.testing.assert_close(frames[2].image[1], ref["image"], atol=0.5 / 57.0, rtol=0)
    torch.testing.assert_close(frames[2].lidar2img[1], ref["lidar2img"])
    assert len(batch["gt_boxes"]) == 2 and batch["gt_boxes"][1].shape[1] == 9


def test_history_has_no_grad_and_scene_start_resets(infos):
    training = BEVFormerTraining(_model(1), infos, "cpu", workers=1, progress=False)
    model = _model(1).train()
    randomize_(model.pts_bbox_head, seed=1)  # the official init hides most of TSA's use of the history
    batch = training.make_batch([3, 4], np.random.default_rng(2))
    prev = training.history_bev(model, batch)
    assert not prev.requires_grad and prev.grad_fn is None and model.training
    assert prev[0].abs().sum() > 0 and torch.all(prev[1] == 0)  # sample 1 starts a scene
    with torch.no_grad():
        model.eval()
        out = training.forward(model, batch)
        # other history images: the mid-scene sample's outputs change, the scene start's do not
        for f in batch["frames"][:-1]:
            f.image.add_(torch.randn_like(f.image))
        out2 = training.forward(model, batch)
    assert not torch.allclose(out["all_cls_scores"][:, 0], out2["all_cls_scores"][:, 0])
    torch.testing.assert_close(out["all_cls_scores"][:, 1], out2["all_cls_scores"][:, 1], atol=0, rtol=0)
    torch.testing.assert_close(out["all_bbox_preds"][:, 1], out2["all_bbox_preds"][:, 1], atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# Training steps.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_queries", [1, 2])
def test_training_steps_lower_the_loss(infos, group_queries):
    torch.manual_seed(0)
    model = _model(2).train()
    training = BEVFormerTraining(model, infos, "cpu", workers=1, progress=False, group_queries=group_queries)
    batch = next(training.batches(2, seed=group_queries))
    assert any(f.use_prev_bev.any() for f in batch["frames"][1:])  # the queue is on
    params = [p for p in model.parameters() if p.requires_grad] + training.extra_parameters()
    assert len(training.extra_parameters()) == (group_queries > 1)
    opt = torch.optim.AdamW(params, lr=5e-4)
    totals = []
    for _ in range(4):
        losses = training.loss(model, batch)
        assert len(losses) == 12 and all(torch.isfinite(v) for v in losses.values())
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    head = model.pts_bbox_head
    assert head.cls_branches[0][-1].weight.grad is not None and head.bev_embedding.weight.grad is not None
    assert totals[-1] < totals[0], totals


def test_bad_arguments(infos):
    with pytest.raises(ValueError, match="queue_length"):
        BEVFormerTraining(_model(), infos, "cpu", queue_length=0, progress=False)
    with pytest.raises(ValueError, match="model must be a BEVFormer"):
        BEVFormerTraining(torch.nn.Linear(2, 2), infos, "cpu", progress=False)
    with pytest.raises(ValueError, match="render the world at about 192x256"):
        BEVFormerTraining(MODELS["bevformer-tiny"](**{**SMALL, "image_size": (96, 128)}), infos, "cpu", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        next(BEVFormerTraining(_model(), infos[:2], "cpu", progress=False).batches(0, 0))
