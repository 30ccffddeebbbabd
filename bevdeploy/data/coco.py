"""COCO format: the 80 detection categories and a synthetic COCO-style 2D dataset.

Why: the 2D detectors (YOLOX, CenterNet) are evaluated with pycocotools on COCO-format data; without
COCO on the machine, the synthetic world's camera views stand in. Each image is one camera view of a
synthetic key frame; its boxes are the VISIBLE extent of each object (from the renderer's per-pixel
object ids, so occluded parts do not count, as in COCO), labelled with the matching COCO category
(pedestrian -> person, construction vehicle / trailer -> truck; barriers and traffic cones have no COCO
category and stay unlabelled background).

Layout written (COCO 2017 style): ``<out>/val2017/<id:012d>.jpg`` and
``<out>/annotations/instances_val2017.json``; load it with ``pycocotools.coco.COCO(ann_file)``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .nuscenes import CAMERA_NAMES
from .synthetic import SyntheticWorld, _check_image_size

#: COCO's 80 detection categories as (category id, name); list position = contiguous label (YOLOX, mmdet).
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"),
    (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"),
    (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
    (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"),
    (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
    (89, "hair drier"), (90, "toothbrush"),
)
#: COCO class names in contiguous label order (0..79).
COCO_CLASS_NAMES: tuple[str, ...] = tuple(name for _, name in COCO_CATEGORIES)

#: COCO category name of each synthetic (nuScenes) class that has one.
COCO_NAME_OF_CLASS: dict[str, str] = {
    "car": "car",
    "truck": "truck",
    "construction_vehicle": "truck",
    "trailer": "truck",
    "bus": "bus",
    "motorcycle": "motorcycle",
    "bicycle": "bicycle",
    "pedestrian": "person",
}

_MANIFEST = "synthetic_coco.json"
_GENERATOR_VERSION = 2  # 2: image ids carry the seed (seed * 10**6 + index), so sets of two seeds share none
_IDS_PER_SEED = 10**6
_SAMPLES_PER_SCENE = 10


def generate_coco(
    out_dir: str | Path,
    num_images: int,
    seed: int = 0,
    image_size: tuple[int, int] = (360, 640),
    *,
    min_area: int = 16,
    jpeg_quality: int = 92,
    progress: bool = True,
    workers: int = 1,
) -> Path:
    """Write a synthetic COCO-format detection set (cached: the same parameters reuse ``out_dir``).

    Args:
        out_dir: Dataset root to create.
        num_images: Images to write (camera views, 6 per synthetic key frame).
        seed: World seed (same parameters and seed give the same bytes; other seeds give other scenes,
            and image ids ``seed * 10**6 + 1 ...``, so two seeds' sets share no image id).
        image_size: (H, W) of each image (intrinsics keep nuScenes' square pixels at 16:9).
        min_area: Boxes with fewer visible pixels are not annotated.
        jpeg_quality: JPEG quality.
        progress: Show a progress bar.
        workers: Processes rendering key frames in parallel (the files do not depend on it).

    Returns:
        ``out_dir``; the annotation file is ``out_dir / "annotations/instances_val2017.json"``.
    """
    if not 1 <= num_images < _IDS_PER_SEED:
        raise ValueError(f"num_images must be in [1, {_IDS_PER_SEED}), got {num_images}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    h, w = _check_image_size(image_size)
    root = Path(out_dir).expanduser().absolute()
    manifest = {"generator": "bevdeploy.data.coco", "generator_version": _GENERATOR_VERSION, "seed": int(seed),
                "num_images": int(num_images), "image_size": [h, w], "min_area": int(min_area),
                "jpeg_quality": int(jpeg_quality)}
    marker = root / _MANIFEST
    if marker.is_file():
        old = json.loads(marker.read_text())
        if old == manifest:
            return root
        if old.get("generator") != manifest["generator"]:
            raise ValueError(f"{str(marker)!r} is not a bevdeploy synthetic COCO set; choose another out_dir")
        marker.unlink()
    elif root.exists() and any(p.name not in ("val2017", "annotations") for p in root.iterdir()):
        raise ValueError(f"out_dir {str(root)!r} exists and is not a synthetic COCO set")
    for sub in ("val2017", "annotations"):
        if (root / sub).exists():
            shutil.rmtree(root / sub)
        (root / sub).mkdir(parents=True)

    num_samples = math.ceil(num_images / len(CAMERA_NAMES))
    lengths = [_SAMPLES_PER_SCENE] * (num_samples // _SAMPLES_PER_SCENE)
    if num_samples % _SAMPLES_PER_SCENE:
        lengths.append(num_samples % _SAMPLES_PER_SCENE)
    # a different stream of worlds than the 3D set of the same seed
    world = SyntheticWorld(lengths, seed=int(seed) + 1_000_003, image_size=(h, w))
    # image k (0-based) is camera k % 6 of key frame k // 6, in scene order: jobs are independent
    frames = [(scene.index, frame) for scene in world.scenes for frame in range(scene.num_samples)]
    jobs = [(i * len(CAMERA_NAMES), sc, fr, str(root), int(seed), int(num_images), int(min_area), int(jpeg_quality))
            for i, (sc, fr) in enumerate(frames)]
    images, annotations = [], []
    bar = tqdm(total=num_images, desc="synthetic COCO", unit="image", disable=not progress)
    if workers == 1:
        done = (_render_frame(world, *job) for job in jobs)
    else:
        import multiprocessing as mp

        global _WORKER_WORLD
        _WORKER_WORLD = world
        pool = mp.get_context("fork").Pool(min(workers, len(jobs)))
        done = pool.imap(_render_frame_job, jobs)  # in order: ids and annotation ids as in one process
    try:
        for frame_images, frame_anns in done:
            images += frame_images
            for ann in frame_anns:
                annotations.append(dict(ann, id=len(annotations) + 1))
            bar.update(len(frame_images))
    finally:
        if workers != 1:
            pool.close()
            pool.join()
            _WORKER_WORLD = None
    bar.close()
    categories = [{"id": cid, "name": name, "supercategory": ""} for cid, name in COCO_CATEGORIES]
    ann = {"info": {"description": f"bevdeploy synthetic COCO, seed {seed}"}, "licenses": [], "images": images,
           "annotations": annotations, "categories": categories}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(ann, separators=(",", ":")))
    marker.write_text(json.dumps(manifest))
    return root


_WORKER_WORLD: SyntheticWorld | None = None  # the forked workers' world (generate_coco's workers > 1)


def _render_frame_job(job: tuple) -> tuple[list[dict], list[dict]]:
    return _render_frame(_WORKER_WORLD, *job)


def _render_frame(world: SyntheticWorld, first: int, scene_index: int, frame: int, root: str, seed: int,
                  num_images: int, min_area: int, jpeg_quality: int) -> tuple[list[dict], list[dict]]:
    """Render one key frame's camera views (images ``first``, ``first + 1``, ... below ``num_images``),
    write their JPEGs; returns their image records and annotations (ids to be numbered by the caller)."""
    from PIL import Image

    scene = world.scenes[scene_index]
    h, w = world.image_size
    boxes = {b.actor: b for b in world.boxes(scene, frame)}
    name_to_id = {name: cid for cid, name in COCO_CATEGORIES}
    images, annotations = [], []
    for k, (cam, (img, ids)) in enumerate(zip(CAMERA_NAMES, world.render_with_ids(scene_index, frame))):
        if first + k >= num_images:
            break
        image_id = seed * _IDS_PER_SEED + first + k + 1
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(img).save(Path(root) / "val2017" / file_name, quality=jpeg_quality)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w,
                       "scene": scene.name, "camera": cam, "frame": frame})
        annotations += _annotations(ids, boxes, image_id, name_to_id, 0, min_area)
    return images, annotations


def _annotations(ids: np.ndarray, boxes: dict, image_id: int, name_to_id: dict, first_id: int,
                 min_area: int) -> list[dict]:
    """COCO boxes [x, y, w, h] (pixel edges) of each object's visible pixels."""
    out = []
    flat = ids.ravel()
    seen = flat[flat >= 0]
    if not len(seen):
        return out
    counts = np.bincount(seen)
    width = ids.shape[1]
    for actor in np.flatnonzero(counts >= min_area):
        coco_name = COCO_NAME_OF_CLASS.get(boxes[int(actor)].cls)
        if coco_name is None:
            continue
        pix = np.flatnonzero(flat == actor)
        rows, cols = pix // width, pix % width
        x0, y0, x1, y1 = int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1
        out.append({
            "id": first_id + len(out) + 1, "image_id": image_id, "category_id": name_to_id[coco_name],
            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(counts[actor]), "iscrowd": 0,
            "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
        })
    return out
