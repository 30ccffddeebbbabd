"""bevdeploy: camera BEV 3D detectors (and 2D detectors) from PyTorch to fast GPU engines."""

__version__ = "0.1.0"
