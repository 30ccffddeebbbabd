"""Data: the nuScenes reader, the synthetic world (same format) and BEVFormer's preprocessing.

``load_infos`` turns a nuScenes dataset (real or synthetic) into info records; ``generate`` writes the
synthetic world (``generate_coco`` its COCO-format 2D variant); ``prepare_frame`` / ``TemporalState``
make a BEVFormer engine's per-frame inputs.
"""

from .coco import COCO_CATEGORIES, COCO_CLASS_NAMES, generate_coco
from .nuscenes import CAMERA_NAMES, CLASS_NAMES, gt_box_corners, lidar2img, load_images, load_infos
from .preprocess import (
    BEVFORMER_BASE,
    BEVFORMER_SMALL,
    BEVFORMER_TINY,
    PREPROCESS,
    ImagePreprocess,
    TemporalState,
    frame_inputs,
    prepare_frame,
    preprocess_images,
    stack_frames,
)
from .synthetic import SYNTHETIC_SPLIT, SYNTHETIC_VERSION, DataSource, generate, parse_data_spec, resolve_data_spec

__all__ = [
    "COCO_CATEGORIES",
    "COCO_CLASS_NAMES",
    "generate_coco",
    "CAMERA_NAMES",
    "CLASS_NAMES",
    "gt_box_corners",
    "lidar2img",
    "load_images",
    "load_infos",
    "BEVFORMER_BASE",
    "BEVFORMER_SMALL",
    "BEVFORMER_TINY",
    "PREPROCESS",
    "ImagePreprocess",
    "TemporalState",
    "frame_inputs",
    "prepare_frame",
    "preprocess_images",
    "stack_frames",
    "SYNTHETIC_SPLIT",
    "SYNTHETIC_VERSION",
    "DataSource",
    "generate",
    "parse_data_spec",
    "resolve_data_spec",
]
