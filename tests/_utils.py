"""Helpers shared by the tests: relative-error checks that fail on NaN, and poisoned outputs."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import Tensor

#: Relative L2 error allowed per variant (||out - ref|| / ||ref||, ref in float64).
REL_TOL = {"fp32": 1e-5, "fp16": 1e-3, "fp16x2": 5e-3}


def rel_error(out: Tensor, ref: Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    return (torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64).clamp_min(1e-30)).item()


def assert_rel_close(out: Tensor, ref: Tensor, tol: float, name: str = "output") -> None:
    """Fail on any NaN/inf, a shape mismatch, or relative L2 error over ``tol``; print the worst."""
    assert out.shape == ref.shape, f"{name}: shape {list(out.shape)} != reference {list(ref.shape)}"
    finite = torch.isfinite(out.detach().double().cpu())
    ref_finite = torch.isfinite(ref.detach().double().cpu())
    bad = (~finite & ref_finite).sum().item()
    assert bad == 0, f"{name}: {bad} non-finite values where the reference is finite (unwritten or NaN)"
    err = rel_error(out, ref)
    if not err <= tol:
        diff = (out.detach().double().cpu() - ref.detach().double().cpu()).abs().flatten()
        worst = torch.topk(diff, min(5, diff.numel())).indices
        rows = [f"  idx {i}: got {out.flatten()[i].item():.6g}, want {ref.flatten()[i].item():.6g}" for i in worst.tolist()]
        raise AssertionError(f"{name}: relative error {err:.3g} > {tol:.1g}\n" + "\n".join(rows))


def assert_int8_close(out: Tensor, ref: Tensor, bound: float, name: str = "output") -> None:
    """int8 results: every element within ``bound`` (derived from the scales) of the float reference."""
    assert out.shape == ref.shape, f"{name}: shape {list(out.shape)} != reference {list(ref.shape)}"
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out64).all(), f"{name}: non-finite values"
    worst = (out64 - ref64).abs().max().item()
    assert worst <= bound, f"{name}: max abs error {worst:.4g} > bound {bound:.4g}"


def poisoned(shape, dtype: torch.dtype, device) -> Tensor:
    """An output buffer full of NaN (or -128 for int8) so unwritten elements fail the checks."""
    if dtype.is_floating_point:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.full(tuple(shape), -128, dtype=dtype, device=device)


def randomize_batchnorms(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine terms (seeded by the caller), so folded biases matter
    in int8 tests of randomly initialised models; returns ``model``."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


@contextlib.contextmanager
def ops_on_references_here():
    """What the ``ops_on_references`` fixture does, for the block of a module- or session-scoped fixture (a
    reduced engine built once): the ops run their plain-PyTorch references until the block ends, and the
    setting does not leak into later tests."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "0")
    try:
        yield
    finally:
        mp.undo()
