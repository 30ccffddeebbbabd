"""Load official ``.pth`` checkpoints into our models, refusing silent partial loads.

``torch.load(weights_only=True)`` only (a checkpoint is data, never code). mmcv saves
``{"meta": ..., "state_dict": ..., "optimizer": ...}``; other trainers save ``{"model": ...}`` or a
bare state dict; DataParallel adds a ``module.`` prefix. A checkpoint that does not match the
model key for key and shape for shape is an error (a half-loaded detector still runs and quietly
scores zero), unless the caller opts into a partial load (``allow_partial=True``, the CLI's
``--allow-partial``). Weights that are NaN or infinite are refused too (a NaN weight yields no
boxes, silently), unless ``allow_nonfinite=True``.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["LoadReport", "load_checkpoint", "nonfinite_keys", "read_state_dict"]

#: Wrapper keys under which trainers store the weights, tried in order.
_WRAPPER_KEYS = ("state_dict", "model")
#: BatchNorm's step counter: absent from some exports, never used in eval; not worth refusing a load.
_OPTIONAL_SUFFIXES = (".num_batches_tracked",)
_SHOW = 5


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did: keys loaded, and the ones it could not match."""

    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """Counts plus the first few names of each problem, one line each."""
        lines = [f"loaded {self.loaded} tensors"]
        if self.missing:
            lines.append(f"{len(self.missing)} missing from the checkpoint: {_first(self.missing)}")
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} unexpected (not in the model): {_first(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} (checkpoint {list(c)}, model {list(m)})" for k, c, m in self.mismatched[:_SHOW]]
            more = f", ... ({len(self.mismatched) - _SHOW} more)" if len(self.mismatched) > _SHOW else ""
            lines.append(f"{len(self.mismatched)} with a different shape: " + ", ".join(shown) + more)
        return "; ".join(lines)


def _first(keys: list[str]) -> str:
    more = f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def _numpy_safe_globals() -> list:
    """numpy scalar/array types that mmcv ``meta`` dicts may hold; safe to allow in weights_only.

    Files pickled by numpy 1.x name ``numpy.core.multiarray.*``, by numpy 2.x ``numpy._core...``;
    both names are allowed whichever numpy is installed (``(object, "pickled.name")`` pairs).
    """
    import importlib

    import numpy as np

    multiarray = None
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            multiarray = importlib.import_module(module)
            break
        except ImportError:
            continue
    types: list = [np.dtype, np.ndarray]
    if multiarray is not None:
        for name in ("scalar", "_reconstruct"):
            obj = getattr(multiarray, name)
            types += [(obj, f"numpy.core.multiarray.{name}"), (obj, f"numpy._core.multiarray.{name}")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        types += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return types


def _torch_load(path: str) -> object:
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (protocol 2+: 0x80)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise ValueError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle; "
                         f"starts with {head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first:
        # weights_only refuses unknown globals; mmcv's meta sometimes holds numpy scalars.
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise ValueError(
                f"{path}: cannot be read as weights only ({first}). It holds Python objects beyond "
                "tensors and numpy scalars; re-save just its state_dict with torch.save."
            ) from first
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as err:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): {err}") from err


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict inside a checkpoint file, unwrapped (``state_dict``/``model``) and without ``module.``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable checkpoint, or holds no tensor dict.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is a directory, not a checkpoint file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} is not a regular file")
    obj = _torch_load(path)
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"{path}: expected a state dict (or a dict with one under {list(_WRAPPER_KEYS)}), "
            f"got {type(obj).__name__}{' (empty)' if isinstance(obj, Mapping) else ''}"
        )
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise ValueError(f"{path}: the state dict has non-tensor entries, e.g. {bad[:_SHOW]}")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def nonfinite_keys(state: Mapping[str, Tensor]) -> list[str]:
    """Keys of floating-point tensors holding a NaN or an infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def load_checkpoint(model: nn.Module, path: str | os.PathLike, allow_partial: bool = False,
                    allow_nonfinite: bool = False) -> LoadReport:
    """Load ``path`` into ``model`` (in place), checking every key and shape first.

    Args:
        model: The model, e.g. ``MODELS["bevformer-tiny"]()``.
        path: A ``.pth`` file: mmcv-style ``{"state_dict": ...}``, ``{"model": ...}``, or a bare state
            dict, with or without DataParallel's ``module.`` prefix.
        allow_partial: Load the keys that match and warn about the rest, instead of raising.
        allow_nonfinite: Load NaN / inf weights (warned) instead of raising.

    Returns:
        LoadReport: counts and names of what was loaded, missing, unexpected and mis-shaped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file (a directory, not a checkpoint); NaN / inf weights (without
            ``allow_nonfinite``); or (without ``allow_partial``) any missing, unexpected or
            mis-shaped key, named in the message.
    """
    state = read_state_dict(path)
    bad = nonfinite_keys(state)
    if bad:
        message = f"{os.fspath(path)}: {len(bad)} weight tensor(s) hold NaN or inf: {_first(bad)}"
        if not allow_nonfinite:
            raise ValueError(message + " (a corrupt or diverged checkpoint; allow_nonfinite=True loads it anyway)")
        warnings.warn(message + " (loaded anyway: allow_nonfinite)", stacklevel=2)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(_OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape
    ]
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    report = LoadReport(loaded=len(usable), missing=missing, unexpected=unexpected, mismatched=mismatched)
    if not report.complete:
        message = f"{os.fspath(path)} does not match {type(model).__name__}: {report.summary()}"
        if not allow_partial:
            raise ValueError(
                message + ". Check the model name/config against the checkpoint; to load the matching "
                "keys anyway pass allow_partial=True (CLI: --allow-partial)."
            )
        warnings.warn(message + " (partial load: the rest keeps its current values)", stacklevel=2)
    model.load_state_dict(usable, strict=False)
    return report
