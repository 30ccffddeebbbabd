"""nuScenes reader: info records, camera projections and images.

The constants below are the shared vocabulary of the project (models, eval and data all import them).
"""

from __future__ import annotations

#: The 10 nuScenes detection classes in BEVFormer's label order (index = model label).
CLASS_NAMES: tuple[str, ...] = (
    "car",
    "truck",
    "construction_vehicle",
    "bus",
    "trailer",
    "barrier",
    "motorcycle",
    "bicycle",
    "pedestrian",
    "traffic_cone",
)

#: The 6 cameras in the order of BEVFormer's / mmdet3d's data converter (image index = position here).
CAMERA_NAMES: tuple[str, ...] = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_FRONT_LEFT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_BACK_RIGHT",
)
