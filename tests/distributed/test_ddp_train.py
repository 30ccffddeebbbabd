"""Training over 2 gloo processes: two steps with gradients averaged equal one process on the doubled batch."""

import torch
from torch import nn

from bevdeploy.train import train
from tests.distributed._spawn import run_in_processes


class _Toy:
    """A FamilyTraining whose batches are fixed per seed: rank r (seed 10 + r) draws samples of seed 10 + r."""

    def batches(self, batch_size, seed):
        g = torch.Generator().manual_seed(seed)
        while True:
            yield torch.randn(batch_size, 6, generator=g), torch.randn(batch_size, 3, generator=g)

    def loss(self, model, batch):
        x, y = batch
        return {"mse": (model(x) - y).square().mean()}


class _Union(_Toy):
    """One process: the two ranks' batches side by side (the doubled global batch)."""

    def batches(self, batch_size, seed):
        a, b = _Toy().batches(batch_size // 2, seed), _Toy().batches(batch_size // 2, seed + 1)
        while True:
            (xa, ya), (xb, yb) = next(a), next(b)
            yield torch.cat([xa, xb]), torch.cat([ya, yb])


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _ddp(ctx):
    model = _model()
    history = train(model, _Toy(), steps=2, batch_size=4, lr=1e-2, warmup=0, seed=10, progress=False, log_every=1,
                    dist=ctx)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, [h["loss"] for h in history]


def test_two_processes_equal_one_process_with_the_doubled_batch():
    (w0, _), (w1, _) = run_in_processes(_ddp, 2)
    single = _model()
    train(single, _Union(), steps=2, batch_size=8, lr=1e-2, warmup=0, seed=10, progress=False)
    start = _model().state_dict()
    for k, v in single.state_dict().items():
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0)  # the ranks stay identical
        torch.testing.assert_close(w0[k], v, rtol=1e-5, atol=1e-6)  # = the doubled batch, to float rounding
        assert not torch.equal(v, start[k])  # and training moved the weights
