"""Flash multi-head attention (the reference system's ``QKVTRT`` plugin).

``out = softmax(q @ k^T * scale) @ v`` per batch and head (scale > 0), no mask. BEVFormer's decoder
self-attention runs it on 900 queries x 8 heads x 32 channels; at that size the cost is launches,
so the kernel is sized to fill the GPU rather than to peak on the MMA.

Kernel: the FlashAttention-2 forward (Dao 2023, arXiv:2307.08691). One program per
(``BLOCK_M`` queries, batch x head); it streams ``BLOCK_N``-key tiles of K and V and keeps an
online softmax: running row max ``m``, running sum ``l``, and an output accumulator rescaled by
``exp2(m_old - m_new)`` whenever the max grows. ``log2(e)`` is folded into the scale so the
exponentials are ``exp2``. Full key tiles run unmasked; one masked tail tile takes ``Lk %
BLOCK_N``. The head dim is padded to a power of two (>= 16; >= 32 for int8, the MMA's K) with
zero-filled loads, so any ``D <= 128`` works, odd ones too.

Variants (all compute the logits with fp32 or int32 accumulation and the softmax in fp32):

* ``fp32``: fp32 operands, ``tl.dot(..., input_precision="tf32x3")`` for both products: three TF32
  tensor-core products per dot recover fp32 accuracy (1e-5 relative against float64; plain TF32
  would not), at tensor-core speed (the IEEE path on FMA units took 24 ms at 4x16x4096x64 on an H100).
* ``fp16``: fp16 operands to both products, fp32 accumulation; P cast to fp16 for ``P @ V``.
* ``fp16x2``: paired fp16 (the reference's ``nv_half2`` path). Kept in fp16: P (already divided
  by the running sum, so every value is in [0, 1]), the output accumulator, the per-tile rescale
  ``acc *= l_old * alpha / l_new`` (an elementwise fp16 multiply the compiler packs two to a
  register, HMUL2), and the ``P @ V`` accumulation itself (``tl.dot(..., out_dtype=float16)``:
  fp16-accumulating tensor-core MMA). Because the accumulator is kept normalised it never exceeds
  ``max |v|``, so fp16 cannot overflow however long the key sequence. Logits, max, sum and
  ``exp2`` stay fp32.
* ``int8``: q, k, v int8 with per-tensor scales. ``S = q8 @ k8^T`` is an int8 x int8 -> int32
  MMA, dequantised by ``q_scale * k_scale * scale``; softmax in fp32; P (in [0, 1] relative to
  the running max) is quantised to int8 with scale 1/127 (``round(127 p)``) and ``P8 @ v8`` is a
  second int8 -> int32 MMA. The running sum adds the *quantised* P, so the output is an exact
  convex combination of the rows of v: ``out = v_scale * sum_j P8_j v8_j / sum_j P8_j`` (the
  1/127 cancels). Error bound per query row (derived in the tests), with ``p_j = exp(s_j - max
  s)``, ``L = sum_j p_j`` and ``E = sum_j min(p_j, 1/254)`` (<= Lk / 254): ``|out - exact| <=
  2 E / max(1, L - E) * (max v - min v) / 2`` per channel, plus fp32 logit and fp16 output
  rounding. Typical relative error is ~1e-2 for diffuse attention (P's 1/127 step is coarse
  against small probabilities), ~2e-4 for peaked attention. Output fp16.

The CPU path (no Triton interpreter) and the autograd formula are the plain-PyTorch math on the
dequantised inputs (no P quantisation): the exact function the kernels approximate.

Shapes: ``q (Tensor[B, H, Lq, D])``, ``k, v (Tensor[B, H, Lk, D])`` -> ``Tensor[B, H, Lq, D]``.
Any strides (e.g. a ``[B, L, H, D]`` tensor viewed as ``[B, H, L, D]`` with ``transpose(1, 2)``).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import Tensor, nn

from bevdeploy.ops._utils import (
    bf16_as_float32,
    VARIANT_OUTPUT_DTYPE,
    check_dim,
    check_int8_scale,
    check_same_device,
    check_tensor,
    interpreter_enabled,
    new_output,
    register_reference_autograd,
    resolve_variant,
    to_compute,
    triton_available,
    use_triton,
)

MAX_D = 128
_LOG2E = 1.4426950408889634
_VARIANT_ID = {"fp32": 0, "fp16": 1, "fp16x2": 2, "int8": 3}


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, variant: str | None) -> str:
    """Validate shapes, dtypes and devices; return the resolved variant."""
    check_tensor("q", q, shape=("B", "H", "Lq", "D"))
    check_tensor("k", k, shape=("B", "H", "Lk", "D"))
    check_tensor("v", v, shape=("B", "H", "Lk", "D"))
    variant = resolve_variant(variant, q.dtype, "q")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    check_same_device(q=q, k=k, v=v)
    batch, heads, _, head_dim = q.shape
    for name, t in (("k", k), ("v", v)):
        check_dim(name, t.shape[0], batch, "the batch size B (dim 0)")
        check_dim(name, t.shape[1], heads, "the number of heads H (dim 1)")
        check_dim(name, t.shape[3], head_dim, "the head dim D (dim 3)")
    check_dim("v", v.shape[2], k.shape[2], "the number of keys Lk (dim 2, as in k)")
    if k.shape[2] < 1:
        raise ValueError(f"k must hold at least one key (Lk >= 1), got shape {list(k.shape)}")
    if not 1 <= head_dim <= MAX_D:
        raise ValueError(f"q: the head dim D must be in [1, {MAX_D}], got {head_dim=}")
    return variant


def reference(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Plain-PyTorch attention (CPU and GPU, differentiable); the test oracle.

    Computes in the dtype of its inputs: pass float64 for ground truth.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    return torch.matmul(torch.softmax(s, dim=-1), v)


def _flash_attention_cpu(
    q: Tensor, k: Tensor, v: Tensor, scale: float, variant: str, q_scale: float, k_scale: float, v_scale: float
) -> Tensor:
    """The variant's exact math in fp32 on the dequantised inputs; also the autograd formula."""
    out = reference(
        to_compute(q, variant, q_scale), to_compute(k, variant, k_scale), to_compute(v, variant, v_scale), scale
    )
    return out.to(VARIANT_OUTPUT_DTYPE[variant])


def _block_d(head_dim: int, variant: str) -> int:
    # the MMA's reduction dim must be >= 16 (>= 32 for 8-bit operands)
    return max(32 if variant == "int8" else 16, 1 << (head_dim - 1).bit_length())


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_config(device: torch.device, bh: int, lq: int, block_d: int, variant: str) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one launch.

    Small problems (BEVFormer's decoder: B*H = 8, 900 queries) are latency-bound: BLOCK_M 64
    gives 15 x 8 = 120 programs for the H100's 132 SMs (BLOCK_M 128 would leave half of them idle),
    and BLOCK_N 128 halves the sequential key loop against 64. Large problems take the
    Triton-tutorial Hopper tile (128 x 128, 8 warps, 3 stages; BLOCK_N 64 at D = 128 to keep the
    S tile and the accumulator in registers). fp32 runs its products as 3xTF32 ("tf32x3"), where
    small tiles keep register pressure down.
    """
    min_n = 32 if variant == "int8" else 16
    if interpreter_enabled() and device.type == "cpu":
        return 16, min_n, 1, 1
    if variant == "fp32":
        return 64, 32, 4, 2
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if bh * triton.cdiv(lq, 128) >= 2 * sms:
        return 128, (64 if block_d > 64 else 128), 8, 3
    return 64, (64 if block_d > 64 else 128), 4, 3


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _flash_attention_tile(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        start_n,
        Lk,
        D,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        qk_scale,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        VARIANT: tl.constexpr,
        MASK_N: tl.constexpr,
        EVEN_D: tl.constexpr,
    ):
        """One key tile of the online softmax: s = q k^T * scale * log2(e); m' = max(m, rowmax s);
        p = exp2(s - m'); alpha = exp2(m - m'); l' = alpha l + rowsum p; acc' = alpha acc + p v."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # (D, N)
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # (N, D)
        # masks only along the dims that need them: a mask constant along the contiguous dim
        # keeps the loads vectorised (16-byte cp.async)
        if MASK_N and EVEN_D:
            kt = tl.load(kt_ptrs, mask=offs_n[None, :] < Lk, other=0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < Lk, other=0)
        elif MASK_N:
            kt = tl.load(kt_ptrs, mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < D), other=0)
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < D), other=0)
        elif EVEN_D:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=offs_d[:, None] < D, other=0)
            v = tl.load(v_ptrs, mask=offs_d[None, :] < D, other=0)

        if VARIANT == 0:
            s = tl.dot(q, kt, input_precision="tf32x3", out_dtype=tl.float32)
        elif VARIANT == 3:
            s = tl.dot(q, kt, out_dtype=tl.int32).to(tl.float32)
        else:
            s = tl.dot(q, kt, out_dtype=tl.float32)
        if MASK_N:
            s = tl.where(offs_n[None, :] < Lk, s, float("-inf"))
        # qk_scale > 0, so the scaled row max is the scaled max, and the scaling folds into one
        # FFMA per logit. Every tile holds >= 1 real key: m_new is finite, alpha = 0 on the first.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)

        if VARIANT == 0:
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="tf32x3", out_dtype=tl.float32)
        elif VARIANT == 1:
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(tl.float16), v, acc * alpha[:, None], out_dtype=tl.float32)
        elif VARIANT == 2:
            # acc holds the normalised output (<= max|v|); P is divided by the new sum first
            l_new = l_i * alpha + tl.sum(p, 1)
            inv = 1.0 / l_new
            corr = (l_i * alpha * inv).to(tl.float16)
            p16 = (p * inv[:, None]).to(tl.float16)
            acc = tl.dot(p16, v, acc * corr[:, None], out_dtype=tl.float16)
            l_i = l_new
        else:
            p8 = (p * 127.0 + 0.5).to(tl.int8)  # round(127 p), p in [0, 1]
            l_i = l_i * alpha + tl.sum(p8.to(tl.int32), 1).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p8, v, out_dtype=tl.int32).to(tl.float32)
        return acc, l_i, m_new

    @triton.jit
    def _flash_attention_fwd_kernel(
        # pointers
        q_ptr,
        k_ptr,
        v_ptr,
        o_ptr,
        # sizes
        H,
        Lq,
        Lk,
        D,
        num_m_blocks,
        # strides (elements)
        stride_qb,
        stride_qh,
        stride_qm,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_ob,
        stride_oh,
        stride_om,
        # scalars
        qk_scale,  # scale * log2(e) (* q_scale * k_scale for int8)
        out_scale,  # v_scale for int8, unused otherwise
        # constexpr
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        VARIANT: tl.constexpr,  # 0 fp32, 1 fp16, 2 fp16x2, 3 int8
        EVEN_D: tl.constexpr,
    ):
        """FlashAttention-2 forward for one (BLOCK_M queries, batch x head) block.

        Programs of one batch x head are adjacent (query block fastest), so they read the same
        K/V tiles out of L2. A 1-D grid keeps any B*H within the launch limits.
        """
        pid = tl.program_id(0)
        pid_m = pid % num_m_blocks
        pid_bh = pid // num_m_blocks
        off_b = (pid_bh // H).to(tl.int64)
        off_h = (pid_bh % H).to(tl.int64)
        q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
        k_base = k_ptr + off_b * stride_kb + off_h * stride_kh
        v_base = v_ptr + off_b * stride_vb + off_h * stride_vh
        o_base = o_ptr + off_b * stride_ob + off_h * stride_oh

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        if EVEN_D:
            q_mask = offs_m[:, None] < Lq
        else:
            q_mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_mask, other=0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        if VARIANT == 2:
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float16)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        n_full = (Lk // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            acc, l_i, m_i = _flash_attention_tile(
                acc, l_i, m_i, q, k_base, v_base, start_n, Lk, D, stride_kn, stride_kd, stride_vn, stride_vd,
                qk_scale, BLOCK_N, BLOCK_D, VARIANT, False, EVEN_D,
            )  # fmt: skip
        if n_full < Lk:
            acc, l_i, m_i = _flash_attention_tile(
                acc, l_i, m_i, q, k_base, v_base, n_full, Lk, D, stride_kn, stride_kd, stride_vn, stride_vd,
                qk_scale, BLOCK_N, BLOCK_D, VARIANT, True, EVEN_D,
            )  # fmt: skip

        if VARIANT == 2:
            out = acc
        elif VARIANT == 3:
            out = acc * (out_scale / l_i)[:, None]
        else:
            out = acc * (1.0 / l_i)[:, None]
        tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=q_mask)


def _flash_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    variant: str,
    q_scale: float = 1.0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    out: Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> Tensor:
    """Launch the kernel; ``out`` lets tests poison the output, ``config`` = (BLOCK_M, BLOCK_N,
    num_warps, num_stages) overrides the heuristic for benchmark sweeps."""
    batch, heads, lq, head_dim = q.shape
    lk = k.shape[2]
    o = new_output((batch, heads, lq, head_dim), variant, q.device, out)
    if o.numel() == 0:
        return o
    block_d = _block_d(head_dim, variant)
    block_m, block_n, num_warps, num_stages = config or _launch_config(q.device, batch * heads, lq, block_d, variant)
    num_m_blocks = triton.cdiv(lq, block_m)
    qk_scale = scale * _LOG2E * (q_scale * k_scale if variant == "int8" else 1.0)
    grid = (num_m_blocks * batch * heads,)
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        _flash_attention_fwd_kernel[grid](
            q, k, v, o,
            heads, lq, lk, head_dim, num_m_blocks,
            *q.stride(), *k.stride(), *v.stride(), *o.stride()[:3],
            qk_scale, v_scale,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, VARIANT=_VARIANT_ID[variant],
            EVEN_D=block_d == head_dim, num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    return o


@torch.library.custom_op("bevdeploy::flash_attention", mutates_args=())
def _flash_attention_op(
    q: Tensor, k: Tensor, v: Tensor, scale: float, variant: str, q_scale: float, k_scale: float, v_scale: float
) -> Tensor:
    if use_triton(q):
        return _flash_attention_triton(q, k, v, scale, variant, q_scale, k_scale, v_scale)
    return _flash_attention_cpu(q, k, v, scale, variant, q_scale, k_scale, v_scale)


@_flash_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float, variant: str, q_scale: float, k_scale: float, v_scale: float):
    _check_inputs(q, k, v, variant)
    return q.new_empty(q.shape, dtype=VARIANT_OUTPUT_DTYPE[variant])


register_reference_autograd(_flash_attention_op, _flash_attention_cpu)


@bf16_as_float32
def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    variant: str | None = None,
    q_scale: float | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
) -> Tensor:
    """Multi-head attention ``softmax(q @ k^T * scale) @ v`` without a mask, in one fused kernel.

    Args:
        q (Tensor[B, H, Lq, D]): queries; float32, float16 or int8 (variant ``int8``). Any strides.
        k (Tensor[B, H, Lk, D]): keys, dtype of ``q``.
        v (Tensor[B, H, Lk, D]): values, dtype of ``q``.
        scale: logit scale, > 0; default ``1 / sqrt(D)``.
        variant: ``fp32``, ``fp16``, ``fp16x2`` or ``int8`` (see the module docstring); None infers
            it from the dtype (float16 -> ``fp16``).
        q_scale, k_scale, v_scale: per-tensor scales of the int8 inputs (``x = x8 * x_scale``);
            required for ``int8``, ignored otherwise.

    Returns:
        Tensor[B, H, Lq, D]: float32 for ``fp32``, float16 otherwise.

    Example:
        >>> q = torch.randn(1, 8, 30, 32)  # decoder self-attention: (1, 8, 900, 32)
        >>> flash_attention(q, q, q).shape
        torch.Size([1, 8, 30, 32])
    """
    variant = _check_inputs(q, k, v, variant)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scale = float(scale)
    if not (scale > 0.0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite float, got {scale}")
    q_scale = check_int8_scale("q_scale", q_scale, variant)
    k_scale = check_int8_scale("k_scale", k_scale, variant)
    v_scale = check_int8_scale("v_scale", v_scale, variant)
    return _flash_attention_op(q, k, v, scale, variant, q_scale, k_scale, v_scale)


class FlashAttention(nn.Module):
    """See :func:`flash_attention`."""

    def __init__(self, scale: float | None = None) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return flash_attention(q, k, v, scale=self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
