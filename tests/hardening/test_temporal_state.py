"""NaN previous BEV and scene resets: one rule (carry_prev_bev) for the eval loop and Engine.step."""

import warnings

import pytest
import torch

from bevdeploy.data.preprocess import carry_prev_bev
from bevdeploy.engine import Engine
from bevdeploy.eval.detection import run_bevformer

SHAPE = (1, 4, 3)


def _carry(prev, prev_scene, scene, gate=1.0, token="t1"):
    return carry_prev_bev(prev, prev_scene, scene, gate, shape=SHAPE, device="cpu", token=token)


def test_rule():
    bev = torch.randn(SHAPE)
    assert _carry(bev, "a", "a")[0] is bev and _carry(bev, "a", "a")[1] == 1.0
    for prev, prev_scene, scene, gate in ((None, "a", "a", 1.0), (bev, "a", "b", 1.0), (bev, None, "a", 1.0),
                                          (bev, "a", None, 1.0), (bev, "", "", 1.0), (bev, "a", "a", 0.0)):
        out, g = _carry(prev, prev_scene, scene, gate)
        assert g == 0.0 and out.shape == SHAPE and not out.any()
    nan = bev.clone()
    nan[0, 1, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="frame tok42: the previous BEV holds NaN/inf"):
        out, g = _carry(nan, "a", "a", token="tok42")
    assert g == 0.0 and not out.any()


def test_eval_loop_does_not_carry_nan_into_the_next_frames():
    """Frame 1 returns a NaN BEV: frame 2 (same scene) and frame 3 (next scene) get zeros, gate 0."""
    infos = [dict(token=f"f{i}", scene_token=s) for i, s in enumerate(["A", "A", "A", "B", "B"])]
    seen = []

    def forward(image, lidar2img, can_bus, prev_bev, use_prev_bev):
        i = len(seen)
        seen.append((prev_bev.clone(), float(use_prev_bev)))
        bev = torch.full(SHAPE, float(i + 1))
        if i == 1:
            bev[0, 0, 0] = float("nan")
        return {"bev_embed": bev}

    def decode(outputs):
        return [(torch.zeros(0, 9), torch.zeros(0), torch.zeros(0, dtype=torch.long))]

    def prepare_frame(info, prev_info, preprocess):
        same = prev_info is not None and prev_info["scene_token"] == info["scene_token"]
        return {"image": torch.zeros(6, 3, 2, 2), "lidar2img": torch.eye(4).expand(6, 4, 4), "can_bus": torch.zeros(18),
                "use_prev_bev": torch.tensor([1.0 if same else 0.0])}

    mp = pytest.MonkeyPatch()
    mp.setattr("bevdeploy.data.preprocess.prepare_frame", prepare_frame)
    try:
        with pytest.warns(RuntimeWarning, match="frame f2: the previous BEV holds NaN"):
            run_bevformer(forward, decode, infos, preprocess=None, bev_shape=SHAPE[1:], device=torch.device("cpu"),
                          progress=False)
    finally:
        mp.undo()
    gates = [g for _, g in seen]
    assert gates == [0.0, 1.0, 0.0, 0.0, 1.0]
    assert all(torch.isfinite(p).all() for p, _ in seen)
    assert not seen[2][0].any() and not seen[3][0].any()  # reset after the NaN frame and at the new scene
    assert (seen[4][0] == 4.0).all()  # carried again inside scene B


def test_engine_step_resets_on_missing_scene_and_nan(tiny_engine_path, ops_on_references):
    engine = Engine.load(tiny_engine_path, device="cpu")
    g = torch.Generator().manual_seed(0)
    frame = dict(image=torch.randn(6, 3, 64, 96, generator=g), lidar2img=torch.eye(4).expand(6, 4, 4).clone(),
                 can_bus=torch.zeros(18), use_prev_bev=torch.ones(1), token="x", scene_token=None)
    first = engine.step(frame)
    second = engine.step(frame)  # the previous scene token is None: reset, so the same output
    torch.testing.assert_close(second["bev_embed"], first["bev_embed"])
    named = dict(frame, scene_token="s")
    engine.reset()
    engine.step(named)
    engine._streams[0]["prev_bev"] = torch.full_like(engine._streams[0]["prev_bev"], float("nan"))
    with pytest.warns(RuntimeWarning, match="frame x: the previous BEV holds NaN"):
        out = engine.step(named)
    torch.testing.assert_close(out["bev_embed"], first["bev_embed"])
    assert torch.isfinite(out["bev_embed"]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        carried = engine.step(named)  # finite again: carried, no warning
    assert not torch.allclose(carried["bev_embed"], first["bev_embed"])


def test_grid_sample_and_rotate_propagate_nan(monkeypatch):
    """A NaN grid or angle shows as NaN (as the references), never as a silently blank output."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from bevdeploy.ops.grid_sample import grid_sample
    from bevdeploy.ops.rotate import rotate
    from bevdeploy.ops.grid_sample import reference as grid_reference
    from bevdeploy.ops.rotate import reference as rotate_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 5, 7, generator=g)
    grid = torch.rand(1, 2, 3, 2, generator=g) * 2 - 1
    grid[0, 0, 1, 0] = float("nan")
    grid[0, 1, 2, 1] = float("inf")
    out = grid_sample(x, grid)
    assert torch.equal(out.isnan(), grid_reference(x, grid).isnan())
    assert out[0, :, 0, 1].isnan().all() and out[0, :, 1, 2].isnan().all() and out.isfinite().sum() == 3 * 4
    img = torch.randn(2, 3, 6, 6, generator=g)
    angle = torch.tensor([float("nan"), 30.0])
    center = torch.tensor([3.0, 3.0])
    out = rotate(img, angle, center)
    ref = rotate_reference(img, angle, center)
    assert out[0].isnan().all() and torch.isfinite(out[1]).all()
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out[1], ref[1])
    for fn in (rotate, rotate_reference):
        with pytest.raises(ValueError, match="angle must be a finite number of degrees, got inf"):
            fn(img, float("inf"), center)
