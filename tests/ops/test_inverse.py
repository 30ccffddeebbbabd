import pytest
import torch

from bevdeploy.ops.inverse import Inverse, _inverse_triton, inverse, reference
from tests._utils import REL_TOL, assert_rel_close, poisoned


def _well_conditioned(batch, n, device):
    return torch.randn(*batch, n, n, device=device) + n * torch.eye(n, device=device)


@pytest.mark.parametrize("batch,n", [((6,), 4), ((2, 3), 3), ((5,), 1), ((7,), 9)])
def test_triton_matches_reference(device, batch, n):
    x = _well_conditioned(batch, n, device)
    out = poisoned(x.shape, torch.float32, device)
    _inverse_triton(x, out=out)
    assert_rel_close(out, reference(x.double()), REL_TOL["fp32"] * 10)


def test_pivoting_handles_zero_diagonal(device):
    # A permutation matrix has zeros on the diagonal: without pivoting this divides by zero.
    p = torch.eye(4, device=device)[[2, 0, 3, 1]].unsqueeze(0)
    assert_rel_close(_inverse_triton(p), p.transpose(-1, -2), 1e-6)


def test_non_contiguous_input(device):
    x = _well_conditioned((4,), 4, device).transpose(-1, -2)
    assert not x.is_contiguous()
    assert_rel_close(_inverse_triton(x), reference(x.double()), REL_TOL["fp32"] * 10)


def test_public_function_and_module(device):
    x = _well_conditioned((6,), 4, device)
    assert_rel_close(Inverse()(x), reference(x.double()), REL_TOL["fp32"] * 10)


def test_gradient_matches_reference():
    x = _well_conditioned((3,), 4, "cpu").double().requires_grad_(True)
    g = torch.randn(3, 4, 4, dtype=torch.float64)
    (ref_grad,) = torch.autograd.grad(reference(x), x, g)
    x32 = x.detach().float().requires_grad_(True)
    (grad,) = torch.autograd.grad(inverse(x32), x32, g.float())
    assert_rel_close(grad, ref_grad, 1e-4)


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.randn(4, 3), r"square"),
        (torch.randn(4), r"\[\.\.\., n, n\]"),
        (torch.randn(2, 4, 4, dtype=torch.float64), r"dtype"),
        (torch.randn(17, 17), r"up to 16x16"),
    ],
)
def test_input_checks(bad, match):
    with pytest.raises(ValueError, match=match):
        inverse(bad)


def test_opcheck():
    x = _well_conditioned((2,), 4, "cpu")
    torch.library.opcheck(torch.ops.bevdeploy.inverse.default, (x,))
