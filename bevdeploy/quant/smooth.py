"""Per-input-channel smoothing of int8 layers (SmoothQuant: Xiao et al., ICML 2023), for convs too.

Per-tensor int8 activations give every input channel of a layer the same step. When a few channels
are much larger than the rest (a CSP concat of a large and a small branch, a residual stream next
to a fresh branch), the small channels round to a handful of codes. Smoothing moves that spread
into the weights, which are quantized per output channel and tolerate it better::

    m[c] = amax_x[c] ** alpha / amax_w[:, c] ** (1 - alpha),  normalised to max(m) == 1
    conv(x, W) == conv(x / m, W * m)      (exact in real arithmetic; m over input channels)

:func:`smooth_inputs` rewrites each chosen layer as ``nn.Sequential(ChannelScale(1 / m), layer)``
with the layer's weights multiplied by ``m``; the float model computes the same function (to
rounding), and the int8 build then calibrates and quantizes the smoothed input. Layers that read one
tensor (a CSP layer's main and short convs, a YOLOX head's two towers) get one joint ``m`` (their
weights' ranges combined), so the tensor has one smoothed form; so do the channel slices named as one
tensor's (``ties``: YOLOX's PAFPN concatenations read in two orders, an SPP's pooled copies).

Where the producer of a smoothed tensor is an int8 conv and every reader is smoothed alike (YOLOX),
:func:`bevdeploy.quant.chain.chain_int8` folds the divisor into the producer's epilogue (``out_mul``:
after its activation and residual, before the requantization), the readers' ``ChannelScale`` becomes
an ``nn.Identity`` and a residual block that adds the tensor as its identity multiplies it back in its
conv's epilogue (``residual_mul``): the tensor stays int8 between them (on the reduced YOLOX-x of the
tests: 81 of 82 divisors, all but the float stem's reader). Elsewhere (a float producer, a reader that
takes the tensor otherwise too, the other model families) ``ChannelScale`` stays a float multiply and
the chain does not link through it.

Measured (CPU, a YOLOX-x config at deepen 1.33 / widen 0.25 trained briefly; box-output SQNR vs
float, minmax scales, unchained): 12.1 dB plain, 20.8 dB with ``alpha=0.5``
(``bench/results/cpu/diagnose-int8-yolox-deepen133.md`` and ``scripts/diagnose_int8_2d.py``).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ChannelRanges", "ChannelScale", "input_channel_ranges", "smooth_inputs", "smoothable"]


class ChannelScale(nn.Module):
    """``x * inv`` over the channel dim (dim 1 of a conv input, the last dim of a linear input)."""

    def __init__(self, inv: Tensor, channel_dim: int) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.register_buffer("inv", inv.detach().clone().float())

    def forward(self, x: Tensor) -> Tensor:
        shape = [1] * x.dim()
        shape[self.channel_dim if self.channel_dim >= 0 else x.dim() + self.channel_dim] = -1
        return x * self.inv.view(shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.inv.numel()}, channel_dim={self.channel_dim}"


class ChannelRanges(dict):
    """Layer name -> ``max |x|`` per input channel, and ``shared``: the groups (lists of two or more names)
    of layers that read one tensor, found while the ranges were measured."""

    def __init__(self, ranges: dict[str, Tensor], shared: list[list[str]] | None = None) -> None:
        super().__init__(ranges)
        self.shared = shared or []


def smoothable(module: nn.Module) -> bool:
    """A plain conv with one group or a plain linear: their input channels are the GEMM's K."""
    if type(module) is nn.Conv2d:
        return module.groups == 1
    return type(module) is nn.Linear


def input_channel_ranges(model: nn.Module, forward_loop: Callable[[nn.Module], object],
                         layers: Iterable[str]) -> ChannelRanges:
    """``max |x|`` per input channel of each named layer over ``forward_loop(model)`` (no grad), and which
    layers read the same tensor object (at each layer's first call; a weak reference, so a freed tensor
    whose id is reused never matches)."""
    ranges: dict[str, Tensor] = {}
    first_inputs: list[tuple[weakref.ref, str]] = []
    group_of: dict[str, list[str]] = {}
    hooks = []
    for name in layers:
        module = model.get_submodule(name)
        if not smoothable(module):
            raise ValueError(f"{name}: {type(module).__name__} cannot be smoothed (plain Conv2d with groups=1 "
                             "or Linear only)")
        dims = (0, 2, 3) if isinstance(module, nn.Conv2d) else None

        def hook(mod, args, name=name, dims=dims):
            if name not in group_of:
                shared = next((group_of[other] for ref, other in first_inputs if ref() is args[0]), None)
                group_of[name] = shared if shared is not None else []
                group_of[name].append(name)
                first_inputs.append((weakref.ref(args[0]), name))
            x = args[0].detach().float()
            amax = x.abs().amax(dims) if dims is not None else x.abs().reshape(-1, x.shape[-1]).amax(0)
            ranges[name] = amax if name not in ranges else torch.maximum(ranges[name], amax)

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in layers if n not in ranges]
    if missing:
        raise RuntimeError(f"the calibration loop never ran {len(missing)} layer(s), e.g. {missing[:3]}")
    groups = {id(g): g for g in group_of.values() if len(g) > 1}
    return ChannelRanges(ranges, list(groups.values()))


def _weight_input_ranges(layer: nn.Module) -> Tensor:
    w = layer.weight.detach().float()
    return (w.abs().amax((0, 2, 3)) if isinstance(layer, nn.Conv2d) else w.abs().amax(0)).clamp_min(1e-8)


class _Sets:
    """Union-find over ``range(n)``."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _tied_divisors(model: nn.Module, ranges: dict[str, Tensor], alpha: float,
                   ties: Iterable[Sequence[tuple[str, int, int]]]) -> dict[str, Tensor]:
    """``m`` of every layer of ``ranges`` per input channel, where the channel slices of a ``ties`` entry hold the
    same channels and so share one ``m`` (from the largest activation and weight ranges among them). Layers
    linked this way are normalised together (largest ``m`` 1), so equal channels keep equal divisors."""
    names = list(ranges)
    sizes = [ranges[n].numel() for n in names]
    offset = dict(zip(names, itertools.accumulate([0] + sizes[:-1])))
    channels = _Sets(sum(sizes))
    for tie in ties:
        tie = [(n, lo, hi) for n, lo, hi in tie if n in ranges]
        for n, lo, hi in tie:
            if not 0 <= lo < hi <= ranges[n].numel() or hi - lo != tie[0][2] - tie[0][1]:
                raise ValueError(f"tie {tie}: {n}[{lo}:{hi}] is not a slice of its {ranges[n].numel()} input "
                                 "channels as long as the others")
        for (n0, lo0, hi0), (n, lo, _) in itertools.product(tie[:1], tie[1:]):
            for c in range(hi0 - lo0):
                channels.union(offset[n0] + lo0 + c, offset[n] + lo + c)
    root = torch.tensor([channels.find(i) for i in range(sum(sizes))])
    layer_of = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(sizes))
    layers = _Sets(len(names))
    for i, r in enumerate(root.tolist()):
        layers.union(int(layer_of[i]), int(layer_of[r]))
    amax_x = torch.cat([ranges[n].detach().float().cpu() for n in names]).clamp_min(1e-8)
    amax_w = torch.cat([_weight_input_ranges(model.get_submodule(n)).cpu() for n in names])
    x_root = torch.zeros(len(root)).scatter_reduce(0, root, amax_x, "amax")
    w_root = torch.zeros(len(root)).scatter_reduce(0, root, amax_w, "amax")
    m = x_root[root] ** alpha / w_root[root] ** (1.0 - alpha)
    linked = torch.tensor([layers.find(i) for i in range(len(names))])[layer_of]
    m = (m / torch.zeros(len(names)).scatter_reduce(0, linked, m, "amax")[linked]).clamp_min(1e-5)
    return {n: m[offset[n]:offset[n] + size] for n, size in zip(names, sizes)}


def smooth_inputs(model: nn.Module, ranges: dict[str, Tensor], alpha: float = 0.5,
                  ties: Iterable[Sequence[tuple[str, int, int]]] = ()) -> list[str]:
    """Rewrite every layer of ``ranges`` as ``Sequential(ChannelScale(1 / m), layer with W * m)``, in place.

    Returns the new names of the smoothed layers (``<name>.1``: the int8 candidates now). ``alpha``
    in [0, 1]: 0 leaves the activations as they are, 1 moves all of their spread into the weights.
    Channels that never saw a non-zero value keep ``m`` at the floor (1e-5 of the largest). The layers of
    one group of ``ranges.shared`` (a :class:`ChannelRanges`) read one tensor and get one ``m``, from the
    tensor's range and the largest of their weights' ranges per input channel. ``ties``: lists of
    ``(layer, start, stop)`` input-channel slices that hold the same tensor (one producer's output inside
    concatenations read in different orders, a tensor and its max-pooled copies): their channels get one ``m``
    too, so the producer can apply it once (:func:`bevdeploy.quant.chain.smoothing_ties` lists YOLOX's).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    # layers reading one tensor: all of their channels tied
    shared = [[(n, 0, ranges[n].numel()) for n in g if n in ranges] for g in getattr(ranges, "shared", [])]
    divisors = _tied_divisors(model, ranges, alpha, shared + list(ties))
    new_names = []
    for name in ranges:
        layer = model.get_submodule(name)
        m = divisors[name].to(layer.weight.device)
        with torch.no_grad():
            view = (1, -1, 1, 1) if isinstance(layer, nn.Conv2d) else (1, -1)
            layer.weight.mul_(m.view(view).to(layer.weight.dtype))
        channel_dim = 1 if isinstance(layer, nn.Conv2d) else -1
        model.set_submodule(name, nn.Sequential(ChannelScale(1.0 / m, channel_dim), layer))
        new_names.append(f"{name}.1")
    return new_names
