"""Batched inverse of small square matrices (the reference system's ``InverseTRT`` plugin).

BEVFormer inverts ``lidar2img`` (4x4 per camera) to lift image points; the plugin exists because
TensorRT had no matrix inverse. Gauss-Jordan elimination with partial pivoting, one program per
matrix, the whole matrix in registers: n <= 16.

Shapes: ``input (Tensor[..., n, n])`` float32 -> ``Tensor[..., n, n]`` float32. fp32 only, as the
reference plugin (inverting in fp16 loses the translation column of a lidar2img matrix).
A singular matrix gives inf/NaN entries, as ``torch.linalg.inv_ex`` without ``check_errors``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bevdeploy.ops._utils import (
    check_tensor,
    new_output,
    register_reference_autograd,
    triton_available,
    use_triton,
)

MAX_N = 16


def _check_inputs(input: Tensor) -> None:
    check_tensor("input", input, dtypes=(torch.float32,))
    if input.dim() < 2 or input.shape[-1] != input.shape[-2]:
        raise ValueError(f"input must have shape [..., n, n] (square matrices), got {list(input.shape)}")
    if input.shape[-1] > MAX_N:
        raise ValueError(f"input: matrices up to {MAX_N}x{MAX_N} are supported, got n={input.shape[-1]}")


def reference(input: Tensor) -> Tensor:
    """Plain-PyTorch inverse (CPU and GPU, differentiable); the test oracle."""
    return torch.linalg.inv_ex(input).inverse


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _inverse_fwd_kernel(
        # pointers
        x_ptr,
        y_ptr,
        # sizes
        n,
        # strides (elements)
        stride_xb,
        stride_xr,
        stride_xc,
        # constexpr
        BLOCK_N: tl.constexpr,
    ):
        """Gauss-Jordan on [A | I] with partial pivoting; row ops are rank-1 updates in registers."""
        pid = tl.program_id(0)
        rows = tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_N)
        r2 = rows[:, None]
        c2 = cols[None, :]
        inside = (r2 < n) & (c2 < n)
        a = tl.load(x_ptr + pid * stride_xb + r2 * stride_xr + c2 * stride_xc, mask=inside, other=0.0)
        a = a.to(tl.float32)
        # Padding rows/cols act as identity so they never become pivots for real columns.
        eye = tl.where(r2 == c2, 1.0, 0.0)
        a = tl.where(inside, a, eye)
        inv = eye
        for k in range(0, n):
            col_k = tl.sum(tl.where(c2 == k, a, 0.0), axis=1)  # [BLOCK_N] column k
            cand = tl.where((rows >= k) & (rows < n), tl.abs(col_k), -1.0)
            best = tl.max(cand, axis=0)
            p = tl.min(tl.where(cand == best, rows, BLOCK_N), axis=0)  # first row holding the max
            # swap rows k and p
            row_k_a = tl.sum(tl.where(r2 == k, a, 0.0), axis=0)
            row_p_a = tl.sum(tl.where(r2 == p, a, 0.0), axis=0)
            row_k_i = tl.sum(tl.where(r2 == k, inv, 0.0), axis=0)
            row_p_i = tl.sum(tl.where(r2 == p, inv, 0.0), axis=0)
            a = tl.where(r2 == k, row_p_a[None, :], tl.where(r2 == p, row_k_a[None, :], a))
            inv = tl.where(r2 == k, row_p_i[None, :], tl.where(r2 == p, row_k_i[None, :], inv))
            # normalise the pivot row, then eliminate column k from every other row
            pivot = tl.sum(tl.where(cols == k, row_p_a, 0.0), axis=0)
            prow_a = row_p_a / pivot
            prow_i = row_p_i / pivot
            factor = tl.sum(tl.where(c2 == k, a, 0.0), axis=1)  # column k after the swap
            factor = tl.where(rows == k, 0.0, factor)
            a = a - factor[:, None] * prow_a[None, :]
            inv = inv - factor[:, None] * prow_i[None, :]
            a = tl.where(r2 == k, prow_a[None, :], a)
            inv = tl.where(r2 == k, prow_i[None, :], inv)
        tl.store(y_ptr + pid * n * n + r2 * n + c2, inv, mask=inside)


def _inverse_triton(input: Tensor, out: Tensor | None = None) -> Tensor:
    """Launch the kernel over the flattened batch; ``out`` lets tests poison the output."""
    n = input.shape[-1]
    x = input.reshape(-1, n, n)
    y = new_output(input.shape, "fp32", input.device, out)
    if x.shape[0] == 0:
        return y
    block = max(2, triton.next_power_of_2(n))
    _inverse_fwd_kernel[(x.shape[0],)](x, y, n, x.stride(0), x.stride(1), x.stride(2), BLOCK_N=block, num_warps=1)
    return y


@torch.library.custom_op("bevdeploy::inverse", mutates_args=())
def _inverse_op(input: Tensor) -> Tensor:
    if use_triton(input):
        return _inverse_triton(input)
    return reference(input)


@_inverse_op.register_fake
def _(input: Tensor) -> Tensor:
    _check_inputs(input)
    return input.new_empty(input.shape)


register_reference_autograd(_inverse_op, lambda input: reference(input))


def inverse(input: Tensor) -> Tensor:
    """Invert a batch of small square fp32 matrices.

    Args:
        input (Tensor[..., n, n]): float32 matrices, n <= 16.

    Returns:
        Tensor[..., n, n]: float32 inverses.

    Example:
        >>> m = torch.eye(4).expand(6, 4, 4)
        >>> torch.equal(inverse(m), m)
        True
    """
    _check_inputs(input)
    return _inverse_op(input)


class Inverse(nn.Module):
    """See :func:`inverse`."""

    def forward(self, input: Tensor) -> Tensor:
        return inverse(input)
