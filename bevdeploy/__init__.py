"""bevdeploy: camera BEV 3D detectors (and 2D detectors) from PyTorch to fast GPU engines.

The names most users need, importable from the top (loaded on first use, so ``import bevdeploy``
stays light): ``build`` and ``Engine`` (engine files), ``evaluate`` (a model or engine over a
dataset, nuScenes metrics), ``MODELS`` and ``load_checkpoint``, ``load_infos`` (nuScenes or
synthetic data as info records), ``calibrate`` and ``quantize_modules`` (int8 for your own module).
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "build": "bevdeploy.engine.build",
    "Engine": "bevdeploy.engine.engine",
    "evaluate": "bevdeploy.eval.detection",
    "MODELS": "bevdeploy.models",
    "load_checkpoint": "bevdeploy.models.checkpoint",
    "load_infos": "bevdeploy.data.nuscenes",
    "calibrate": "bevdeploy.quant.calibrate",
    "quantize_modules": "bevdeploy.quant.modules",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bevdeploy' has no attribute {name!r}")
