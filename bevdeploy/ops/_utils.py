"""Shared plumbing of the operator library: input checks, variant rules, int8 helpers,
the Triton-or-reference dispatch rule, and the reference-based autograd formula.

Every op in :mod:`bevdeploy.ops` follows the same rules (see ``ops/README.md``):

* Variants: ``fp32`` (fp32 in/out), ``fp16`` (fp16 storage, fp32 math), ``fp16x2`` (fp16
  storage, paired fp16 math), ``int8`` (int8 input with a per-tensor scale, fp32 math, fp16 out).
* Dispatch: a CUDA tensor runs the Triton kernel; a CPU tensor runs the Triton kernel through
  Triton's interpreter when ``TRITON_INTERPRET=1`` was set before import, and the plain-PyTorch
  reference otherwise.
* Registration: ``torch.library.custom_op`` + ``register_fake``. The op stays one node in
  ``torch.export`` graphs (the ONNX exporter maps that node to the reference plugin's node), it
  exports under the interpreter too (``triton_op`` does not), and under CUDA-graph replay the
  opaque launch costs nothing extra.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

VARIANTS = ("fp32", "fp16", "fp16x2", "int8")

#: Bumped whenever an op's fake changes the strides it promises (Inductor's on-disk FX-graph cache
#: key does not cover fake implementations: a graph compiled against the old fake would be reused and
#: fail its stride asserts). The engine's and the tests' Inductor cache folders carry it.
#: 2: modulated_deform_conv2d returns channels-last memory where its implicit-GEMM kernel runs.
FAKE_LAYOUT_VERSION = 2

#: dtype each variant stores its main (large) input in.
VARIANT_INPUT_DTYPE = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "fp16x2": torch.float16,
    "int8": torch.int8,
}

#: dtype each variant writes its output in. int8 kernels dequantize on the way out: the
#: surrounding float layers read fp16 at half the bytes of fp32.
VARIANT_OUTPUT_DTYPE = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "fp16x2": torch.float16,
    "int8": torch.float16,
}

_DTYPE_TO_VARIANT = {torch.float32: "fp32", torch.float16: "fp16", torch.int8: "int8"}


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (Linux wheels); elsewhere only the references run."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    """Triton's interpreter runs kernels on CPU tensors; it must be chosen before import."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and triton_available()


def use_triton(t: Tensor) -> bool:
    """The dispatch rule: Triton on CUDA tensors, and on CPU tensors under the interpreter."""
    if t.device.type == "cuda":
        if not triton_available():
            raise NotImplementedError("bevdeploy's CUDA kernels need Triton, which is not installed")
        return True
    return t.device.type == "cpu" and interpreter_enabled()


def resolve_variant(variant: str | None, dtype: torch.dtype, arg: str, allowed: Sequence[str] = VARIANTS) -> str:
    """Check ``variant`` against the dtype of tensor ``arg`` (None: infer it from the dtype)."""
    if variant is None:
        if dtype not in _DTYPE_TO_VARIANT:
            raise ValueError(f"{arg} must be float32, float16 or int8, got {dtype}")
        variant = _DTYPE_TO_VARIANT[dtype]
    if variant not in allowed:
        raise ValueError(f"variant must be one of {tuple(allowed)}, got {variant!r}")
    if VARIANT_INPUT_DTYPE[variant] != dtype:
        raise ValueError(
            f"variant {variant!r} takes {arg} as {VARIANT_INPUT_DTYPE[variant]}, got {dtype}"
        )
    return variant


def check_tensor(
    name: str,
    t: object,
    *,
    shape: Sequence[int | None | str] | None = None,
    ndim: int | Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
) -> Tensor:
    """Raise a ValueError naming ``name`` when ``t`` is not a tensor of the expected form.

    ``shape`` entries are ints (must match), None (any size) or strings (labels printed in the
    message, any size), e.g. ``shape=("B", "S", "H", "D")``.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None:
        want = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
        if t.dim() != len(shape):
            raise ValueError(f"{name} must have shape {want} ({len(shape)}-D), got {list(t.shape)}")
        for i, s in enumerate(shape):
            if isinstance(s, int) and t.shape[i] != s:
                raise ValueError(f"{name} must have shape {want}, got {list(t.shape)} (dim {i})")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must be {' or '.join(f'{n}-D' for n in allowed)}, got shape {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    return t


def check_same_device(**tensors: Tensor | None) -> torch.device:
    """All given tensors on one device; the message names the first one that is not."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    device = items[0][1].device
    for k, v in items[1:]:
        if v.device != device:
            raise ValueError(f"{k} is on {v.device} but {items[0][0]} is on {device}; put them on one device")
    return device


def check_dim(name: str, got: int, want: int, what: str) -> None:
    """Consistency check between arguments, e.g. ``check_dim("attention_weights", w.shape[1], Q, "num_queries")``."""
    if got != want:
        raise ValueError(f"{name}: {what} must be {want} to match the other inputs, got {got}")


def check_int8_scale(name: str, scale: float | None, variant: str) -> float:
    """int8 variants need a positive finite per-tensor scale; float variants ignore it."""
    if variant != "int8":
        return 1.0 if scale is None else float(scale)
    if scale is None:
        raise ValueError(f"variant 'int8' needs {name} (the per-tensor scale of the int8 input)")
    scale = float(scale)
    if not (scale > 0.0 and scale < float("inf")):
        raise ValueError(f"{name} must be a positive finite float, got {scale}")
    return scale


def quantize_int8(x: Tensor, scale: float | Tensor) -> Tensor:
    """Symmetric per-tensor (or broadcast per-channel) int8: round(x / scale) clamped to [-127, 127]."""
    return torch.clamp(torch.round(x.float() / scale), -127, 127).to(torch.int8)


def quantize_weight_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 (dim 0): ``scale = amax / 127`` (1 for an all-zero channel).

    Args:
        weight (Tensor[O, ...]): float weight.

    Returns:
        (Tensor[O, ...] int8 codes, Tensor[O] float32 scales), codes ``round_half_even(w / scale)``
        clamped to [-127, 127], so ``weight ~= codes * scale`` broadcast over dim 0.
    """
    w = weight.detach().float()
    amax = w.abs().reshape(w.shape[0], -1).amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale.view(-1, *([1] * (w.dim() - 1)))), -127, 127).to(torch.int8)
    return q, scale.contiguous()


def dequantize_int8(q: Tensor, scale: float | Tensor) -> Tensor:
    return q.float() * scale


def to_compute(x: Tensor, variant: str, scale: float = 1.0) -> Tensor:
    """The fp32 tensor a reference computes on, for any variant's storage."""
    if variant == "int8" and x.dtype == torch.int8:
        return dequantize_int8(x, scale)
    return x.float()


def new_output(shape: Sequence[int], variant: str, device: torch.device, out: Tensor | None = None) -> Tensor:
    """Allocate a kernel's output, or validate a caller-given one (tests poison it with NaN)."""
    dtype = VARIANT_OUTPUT_DTYPE[variant]
    if out is None:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {dtype} tensor of shape {list(shape)} on {device}, "
            f"got {out.dtype} {list(out.shape)} on {out.device}"
        )
    return out


def register_reference_autograd(op, reference_impl: Callable[..., Tensor]) -> None:
    """Give ``op`` a backward by differentiating ``reference_impl`` (same signature as the op).

    Exported engines run under ``torch.no_grad()``; this exists so the ops also train and fine-tune
    (QAT) with exact gradients of the reference math, without a second set of kernels.
    """
    names = [a.name for a in op._opoverload._schema.arguments]

    def setup_context(ctx, inputs, output):
        tensors = [x for x in inputs if isinstance(x, Tensor)]
        ctx.save_for_backward(*tensors)
        ctx.layout = [isinstance(x, Tensor) for x in inputs]
        ctx.constants = [None if isinstance(x, Tensor) else x for x in inputs]

    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        args = []
        for is_tensor, const in zip(ctx.layout, ctx.constants):
            if is_tensor:
                t = next(saved)
                args.append(t.detach().requires_grad_(True) if t.is_floating_point() else t)
            else:
                args.append(const)
        wanted = [a for a in args if isinstance(a, Tensor) and a.requires_grad]
        with torch.enable_grad():
            out = reference_impl(**dict(zip(names, args)))
            grads = torch.autograd.grad(out, wanted, grad_output.to(out.dtype), allow_unused=True)
        it = iter(grads)
        return tuple(next(it) if isinstance(a, Tensor) and a.requires_grad else None for a in args)

    op.register_autograd(backward, setup_context=setup_context)


def bf16_as_float32(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Run a call with bfloat16 tensors in float32.

    No kernel takes bfloat16; it reaches an op only from a model trained under bf16 autocast, where
    float32 math (and a float32 result, which autocast's next matmul casts back) is what the op should do.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if any(isinstance(a, Tensor) and a.dtype == torch.bfloat16 for a in (*args, *kwargs.values())):
            def cast(a):
                return a.float() if isinstance(a, Tensor) and a.dtype == torch.bfloat16 else a

            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return fn(*args, **kwargs)

    return wrapper
