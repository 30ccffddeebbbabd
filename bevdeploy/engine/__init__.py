"""The engine: build a deploy-form model into one file (``build``), load and run it (``Engine``).

Engines are ``torch.export`` programs with static shapes, metadata in the file, Inductor (frozen) +
CUDA graphs at run time; precisions ``fp32``, ``fp16``, ``fp16x2``, ``int8``, ``int8-fp16``,
``int8-fp16x2``, ``fp8``, ``fp8-fp16`` (e4m3 convs / linears); BEVFormer and BEVDet models (their engine I/O: :mod:`bevdeploy.engine.model_io`).
"""

from bevdeploy.engine.build import build
from bevdeploy.engine.deploy import PRECISIONS
from bevdeploy.engine.engine import Engine

__all__ = ["build", "Engine", "PRECISIONS"]
