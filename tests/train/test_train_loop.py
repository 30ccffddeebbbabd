"""The training loop, its schedule, checkpoints (strict loading) and the family dispatch."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from bevdeploy.cli import main
from bevdeploy.models import MODELS
from bevdeploy.models.checkpoint import load_checkpoint
from bevdeploy.train import FamilyTraining, lr_at, make_training, save_checkpoint, train, train_model

from .test_bevdet_train import SMALL


class _Regression:
    """A FamilyTraining for a linear model: y = x @ w_true."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def batches(self, batch_size, seed):
        g = torch.Generator().manual_seed(seed)
        while True:
            idx = torch.randint(0, 64, (batch_size,), generator=g)
            yield self.x[idx], self.y[idx]

    def loss(self, model, batch):
        x, y = batch
        return {"mse": ((model(x).squeeze(1) - y) ** 2).mean()}


def test_schedule_warms_up_then_decays():
    kw = dict(steps=100, lr=1e-3, warmup=10)
    assert lr_at(0, **kw) == pytest.approx(1e-6)
    assert lr_at(5, **kw) == pytest.approx(1e-3 * (1e-3 + (1 - 1e-3) * 0.5))
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(55, **kw) == pytest.approx(1e-3 * (1e-3 + (1 - 1e-3) * 0.5))
    assert lr_at(100, **kw) == pytest.approx(1e-6)
    lrs = [lr_at(s, **kw) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_train_lowers_the_loss_and_records_history():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    task = _Regression()
    assert isinstance(task, FamilyTraining)
    history = train(model, task, steps=200, batch_size=16, lr=5e-2, weight_decay=0.0, warmup=5, progress=False)
    assert history[0]["step"] == 0 and history[-1]["step"] == 199
    assert {"lr", "loss", "mse", "grad_norm", "seconds"} <= set(history[-1])
    assert history[-1]["loss"] < 0.05 * history[0]["loss"]
    assert not model.training  # left in eval mode


def test_train_stops_at_the_time_limit():
    history = train(nn.Linear(4, 1), _Regression(), steps=50, batch_size=4, time_limit=0.0, progress=False)
    assert history[-1]["step"] == 0 and history[-1]["stopped_early"]


def test_train_fits_the_schedule_into_the_time_budget():
    class Slow(_Regression):
        def loss(self, model, batch):
            time.sleep(0.01)
            return super().loss(model, batch)

    history = train(nn.Linear(4, 1), Slow(), steps=10_000, batch_size=4, time_limit=1.0, fit_at=10, progress=False,
                    log_every=5)
    last = history[-1]
    assert 10 < last["steps_fitted"] < 120  # 10 ms per step, 1 s: ~65 steps fit, not 10_000
    if "stopped_early" not in last:  # (a loaded machine may still hit the hard stop near the end)
        assert last["step"] + 1 == last["steps_fitted"]
        assert last["lr"] < 0.01 * max(h["lr"] for h in history)  # the cosine ran to its end


def test_train_rejects_bad_arguments():
    model = nn.Linear(4, 1)
    for kw, match in (({"steps": 0, "batch_size": 1}, "steps"), ({"steps": 1, "batch_size": 0}, "batch_size"),
                      ({"steps": 1, "batch_size": 1, "lr": 0.0}, "lr")):
        with pytest.raises(ValueError, match=match):
            train(model, _Regression(), progress=False, **kw)


def test_train_stops_on_a_diverged_loss():
    class Nan(_Regression):
        def loss(self, model, batch):
            return {"mse": model(batch[0]).sum() * math.nan}

    with pytest.raises(RuntimeError, match="diverged"):
        train(nn.Linear(4, 1), Nan(), steps=2, batch_size=2, progress=False)


def test_make_training_dispatch():
    with pytest.raises(ValueError, match="no training"):
        make_training("resnet50", nn.Linear(1, 1), [], "cpu")
    with pytest.raises(TypeError, match="COCO-format set"):  # 2D families take a CocoSet, not info records
        make_training("yolox-x", nn.Linear(1, 1), [], "cpu")
    with pytest.raises(TypeError, match="model_name"):
        make_training(3, nn.Linear(1, 1), [], "cpu")


def test_checkpoint_saves_and_loads_strictly(tmp_path):
    torch.manual_seed(1)
    model = MODELS["bevdet-r50-cbgs"](**SMALL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    path = save_checkpoint(model, tmp_path / "ckpt.pth", {"steps": 3})
    doc = torch.load(path, weights_only=True)
    assert set(doc) == {"state_dict", "meta"} and doc["meta"] == {"steps": 3}
    torch.manual_seed(2)
    fresh = MODELS["bevdet-r50-cbgs"](**SMALL)
    report = load_checkpoint(fresh, path)  # strict: raises on any missing or unexpected key
    assert report.complete and not report.missing and not report.unexpected
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_train_model_end_to_end(tmp_path, ops_on_references, capsys):
    """Render a tiny world, train one step, save; the checkpoint loads strictly and records its budget."""
    out = train_model("bevdet-r50-cbgs", "synthetic:2@4", steps=1, batch=1, out=tmp_path / "t.pth", lr=1e-3,
                      render_size=(90, 160), model_overrides=SMALL, cache_dir=tmp_path / "worlds", progress=False,
                      training_options={"depth_weight": 0.0})
    meta = torch.load(out, weights_only=False)["meta"]
    assert meta["steps"] == 1 and meta["frames_in_world"] == 2 and math.isfinite(meta["final_loss"])
    assert set(meta["final_terms"]) >= {"loss_heatmap", "loss_bbox"} and "loss_depth" not in meta["final_terms"]
    assert meta["throughput"]["s_per_step"] > 0
    load_checkpoint(MODELS["bevdet-r50-cbgs"](**SMALL), out)
    assert "frames/s" in capsys.readouterr().err


def test_cli_train_reports_bad_input(capsys):
    assert main(["train", "--model", "nope", "--data", "synthetic:2", "-o", "x.pth"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["train", "--model", "bevdet-r50-cbgs", "--data", "synthetic:2@x", "-o", "x.pth"]) == 2
    assert "seed" in capsys.readouterr().err


def test_train_model_checks_the_schedule_before_rendering(tmp_path, monkeypatch):
    from bevdeploy.data import det2d

    def no_render(*args, **kwargs):
        raise AssertionError("the data was read before the arguments were checked")

    monkeypatch.setattr(det2d, "resolve_det2d_spec", no_render)
    for kw, match in (({"batch": 0}, "batch_size"), ({"steps": 0}, "steps"), ({"lr": float("nan")}, "lr")):
        with pytest.raises(ValueError, match=match):
            train_model("centernet-r18-dcn", "synthetic2d:4", out=tmp_path / "c.pth",
                        **{"steps": 1, "batch": 1, **kw})


def test_bench_cli_passes_the_checkpoint(monkeypatch, tmp_path):
    """``bevdeploy bench --model M --checkpoint C`` hands C to bench_model (which loads it into the
    PyTorch row and passes it to build() for every engine row; that part needs a GPU)."""
    import bevdeploy.eval.bench_models as bm

    seen = {}

    def fake_bench_model(name, precisions, **kw):
        seen[name] = (precisions, kw["checkpoint"])
        path = tmp_path / f"{name}.md"
        path.write_text("table")
        return path.with_suffix(".json")

    monkeypatch.setattr(bm, "bench_model", fake_bench_model)
    assert main(["bench", "--model", "bevdet-r50", "bevformer-tiny", "--precisions", "pytorch", "fp16",
                 "--checkpoint", "c.pth"]) == 0
    assert seen == {"bevdet-r50": (["fp16"], "c.pth"), "bevformer-tiny": (["fp16"], "c.pth")}
