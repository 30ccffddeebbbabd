"""What an engine of each model family takes and returns, which layers go int8, and how it is calibrated.

Two families, written as explicit branches (two do not need a registry):

* BEVFormer (temporal): ``image, lidar2img, can_bus, prev_bev, use_prev_bev`` ->
  ``bev_embed, all_cls_scores, all_bbox_preds``; the host feeds ``bev_embed`` back as ``prev_bev``.
* BEVDet: ``image`` and the five BEVPool index arrays of the camera geometry (padded to fixed sizes,
  so one static engine serves every calibration) -> the CenterPoint maps ``reg, height, dim, rot,
  vel, heatmap``; the host computes the indices once per camera geometry (``BEVDet.prepare``).
* The 2D detectors (``yolox``, ``centernet``): an image batch ``image`` [B, 3, H, W] (static B)
  -> the raw head maps (YOLOX ``cls_scores, bbox_preds, objectness``; CenterNet ``heatmap, wh,
  offset``); the host decodes them (:mod:`bevdeploy.eval.coco`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "BEVFORMER_INT8_SCOPE",
    "BEVDET_INT8_SCOPE",
    "DET2D_INT8_SCOPE",
    "DET2D_FAMILIES",
    "family",
    "int8_scope_prefixes",
    "calibration_method_overrides",
    "default_calibration_method",
    "image_input_convs",
    "reads_camera_image",
    "input_names",
    "output_names",
    "family_input_names",
    "family_output_names",
    "example_inputs",
    "calibration_forward_loop",
]

#: BEVFormer: backbone and neck convs and the BEV encoder's linears (decoder, heads, CAN-bus MLP,
#: LayerNorm and softmax stay float, as in the reference system).
BEVFORMER_INT8_SCOPE = ("img_backbone.", "img_neck.", "pts_bbox_head.transformer.encoder.")
#: BEVDet: everything up to the CenterPoint head (image backbone and neck, the depth net, the int8
#: ``bev_pool_v2`` through the view transformer's calibration point, the BEV encoder); the head's
#: small convs produce the heatmap and box maps and stay float.
BEVDET_INT8_SCOPE = ("img_backbone.", "img_neck.", "img_view_transformer.", "img_bev_encoder_backbone.",
                     "img_bev_encoder_neck.")

#: 2D detectors: every conv of backbone, neck and head (the DCN of CenterNet's neck runs in the
#: precision's float variant; its offset conv is an ordinary conv and goes int8).
DET2D_INT8_SCOPE = ("backbone.", "neck.", "bbox_head.")
DET2D_FAMILIES = ("yolox", "centernet")

_BEVFORMER_INPUTS = ("image", "lidar2img", "can_bus", "prev_bev", "use_prev_bev")
_BEVFORMER_OUTPUTS = ("bev_embed", "all_cls_scores", "all_bbox_preds")


def family(model: nn.Module) -> str:
    """``"bevformer"``, ``"bevdet"``, ``"yolox"`` or ``"centernet"``; NotImplementedError for any other model."""
    from bevdeploy.models import YOLOX, BEVDet, BEVFormer, CenterNet

    if isinstance(model, BEVFormer):
        return "bevformer"
    if isinstance(model, BEVDet):
        return "bevdet"
    if isinstance(model, YOLOX):
        return "yolox"
    if isinstance(model, CenterNet):
        return "centernet"
    raise NotImplementedError(f"the engine builds BEVFormer, BEVDet, YOLOX and CenterNet models, not "
                              f"{type(model).__name__}")


def int8_scope_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module-name prefixes whose convs / linears may run int8 (the family's default scope)."""
    fam = family(model)
    if fam in DET2D_FAMILIES:
        return DET2D_INT8_SCOPE
    return BEVFORMER_INT8_SCOPE if fam == "bevformer" else BEVDET_INT8_SCOPE


def family_input_names(name: str) -> tuple[str, ...]:
    """The inputs of an engine of family ``name`` (``bevformer``, ``bevdet``, ``yolox``, ``centernet``), in positional order."""
    if name in DET2D_FAMILIES:
        return ("image",)
    if name == "bevformer":
        return _BEVFORMER_INPUTS
    from bevdeploy.models.bevdet import BEVPoolRanks

    return ("image", *BEVPoolRanks._fields)


def family_output_names(name: str) -> tuple[str, ...]:
    """The outputs of an engine of family ``name``, in the order the exported graph returns them."""
    if name == "yolox":
        from bevdeploy.models.yolox import YOLOX_OUTPUTS

        return YOLOX_OUTPUTS
    if name == "centernet":
        from bevdeploy.models.centernet import CENTERNET_OUTPUTS

        return CENTERNET_OUTPUTS
    if name == "bevformer":
        return _BEVFORMER_OUTPUTS
    from bevdeploy.models.bevdet import HEAD_OUTPUTS

    return tuple(HEAD_OUTPUTS)


def input_names(model: nn.Module) -> tuple[str, ...]:
    """The engine's inputs, in the model forward's positional order."""
    return family_input_names(family(model))


def output_names(model: nn.Module) -> tuple[str, ...]:
    """The keys of the model's output dict that the engine returns, in order."""
    return family_output_names(family(model))


def example_inputs(model: nn.Module, batch: int, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """Inputs of the engine's static shapes (values are placeholders: identity cameras, empty pooling).

    BEVDet's index arrays are padded to the frustum + voxel count and the voxel count
    (:func:`bevdeploy.models.bevdet.pad_ranks`), so the shapes do not depend on the cameras.
    """
    if family(model) in DET2D_FAMILIES:
        return {"image": torch.zeros(batch, 3, *model.image_size, device=device, dtype=dtype)}
    if family(model) == "bevformer":
        H, W = model.image_size
        N = model.num_cams
        return {
            "image": torch.zeros(batch, N, 3, H, W, device=device, dtype=dtype),
            "lidar2img": torch.eye(4, device=device).expand(batch, N, 4, 4).contiguous(),
            "can_bus": torch.zeros(batch, 18, device=device),
            "prev_bev": torch.zeros(batch, *model.bev_shape, device=device, dtype=dtype),
            "use_prev_bev": torch.zeros(batch, device=device),
        }
    cfg = model.config
    if not cfg.pad_ranks:
        raise ValueError("a BEVDet engine needs pad_ranks=True (fixed-size BEVPool indices for a static engine)")
    H, W = cfg.image_size
    P = model.geometry.num_points(batch, cfg.num_cams)
    V = model.geometry.num_voxels(batch)
    ranks = {name: torch.zeros(P if name.startswith("ranks") else V, dtype=torch.int32, device=device)
             for name in input_names(model)[1:]}
    return {"image": torch.zeros(batch, cfg.num_cams, 3, H, W, device=device, dtype=dtype), **ranks}


def calibration_forward_loop(infos: Sequence[dict], model_name: str, model: nn.Module, device: torch.device,
                             progress: bool = True):
    """A ``forward_loop(model)`` for :func:`bevdeploy.quant.calibrate.calibrate`: the inference host loop.

    BEVFormer: frames in order, ``prev_bev`` fed back from the last ``bev_embed``, reset to zeros
    with the gate closed at every scene start (as :func:`bevdeploy.eval.detection.run_bevformer`
    and the reference). BEVDet: each sample's images with the indices of its camera geometry.
    The forward loop checks the data's image size against the model's before running.
    """
    from tqdm import tqdm

    bar = {"desc": "calibration", "disable": not progress, "file": sys.stderr}
    if family(model) == "bevdet":
        from bevdeploy.data.preprocess_bevdet import GEOMETRY_KEYS, BEVDetPreprocess, prepare_bevdet_inputs

        config = BEVDetPreprocess(input_size=tuple(model.config.image_size))

        def bevdet_loop(m: nn.Module) -> int:
            for info in tqdm(infos, **bar):
                x = prepare_bevdet_inputs(info, config)
                ranks = model.prepare(*(x[k][None].to(device) for k in GEOMETRY_KEYS))
                m(x["image"][None].to(device), *ranks)
            return len(infos)

        return bevdet_loop

    from bevdeploy.data.preprocess import PREPROCESS, prepare_frame

    if model_name not in PREPROCESS:
        raise ValueError(f"no image pipeline for {model_name!r} (known: {sorted(PREPROCESS)})")
    preprocess = PREPROCESS[model_name]
    bev_shape, image_size = model.bev_shape, tuple(model.image_size)

    def bevformer_loop(m: nn.Module) -> int:
        prev_bev = torch.zeros(1, *bev_shape, device=device)
        prev_info = None
        for info in tqdm(infos, **bar):
            if prev_info is not None and prev_info.get("scene_token") != info.get("scene_token"):
                prev_info = None
                prev_bev = torch.zeros_like(prev_bev)
            frame = prepare_frame(info, prev_info, preprocess)
            if tuple(frame["image"].shape[-2:]) != image_size:
                raise ValueError(
                    f"calibration images preprocess to {tuple(frame['image'].shape[-2:])} but the model takes "
                    f"{image_size}: use calibration data of the model's camera resolution")
            out = m(frame["image"][None].to(device), frame["lidar2img"][None].to(device),
                    frame["can_bus"][None].to(device), prev_bev, frame["use_prev_bev"].to(device))
            prev_bev = out["bev_embed"].float()
            prev_info = info
        return len(infos)

    return bevformer_loop


def det2d_calibration_loop(calib, model_name: str, model: nn.Module, device: torch.device, batch: int = 8,
                           progress: bool = True, shard: tuple[int, int] | None = None):
    """A ``forward_loop(model)`` for the 2D detectors and a description of its data.

    ``calib`` is a 2D data spec (``synthetic2d:N[@SEED]`` / ``coco:PATH``) or a
    :class:`bevdeploy.data.det2d.CocoSet` (e.g. the first images of a training set); its first N images
    (COCO without a count: the first 500, as the reference calibrates on 500 samples) go through the
    model's test pipeline in batches of ``batch``. ``shard=(rank, world_size)``: this process runs its
    contiguous share of those images (:func:`bevdeploy.distributed.shard_contiguous`; each image is
    preprocessed on its own, so any split gives the same activations); the description names them all.
    """
    from tqdm import tqdm

    from bevdeploy.data.det2d import PIPELINES, CocoSet, load_batch, resolve_det2d_spec

    data = calib if isinstance(calib, CocoSet) else resolve_det2d_spec(calib, progress=progress)
    records = data.images()[:500] if data.num_images is None else data.images()
    if not records:
        raise ValueError(f"calibration data {calib!r} holds no images")
    described = f"{data.ann_file} [:{len(records)}]"
    if shard is not None:
        from bevdeploy.distributed import shard_contiguous

        records = shard_contiguous(records, *shard)
    kind, size = PIPELINES[model_name], tuple(model.image_size)

    def loop(m: nn.Module) -> int:
        for start in tqdm(range(0, len(records), batch), desc="calibration", disable=not progress, file=sys.stderr):
            x, _ = load_batch(data, records[start:start + batch], kind, size)
            m(x.to(device))
        return len(records)

    return loop, described


def image_input_convs(model: nn.Module) -> list[str]:
    """Convs of the int8 scope that read the camera image: the backbone stem (3 input channels, or 12
    for YOLOX's Focus stem, which reads the image's 2x2 space-to-depth).

    The int8 and fp8 builds keep them float unless asked (``build(..., int8_stem=True)``): with 3
    channels per tap the implicit GEMM's K tile is mostly padding, and the 7x7 stem ran 2.9x
    (BEVDet-R50) to 4.8x (BEVFormer-small) slower in int8 than cuDNN fp16 on an H100, which cost
    more than all the other int8 convs of the backbone gained (``bevdeploy bench convs``).
    """
    from bevdeploy.models.yolox import Focus

    prefixes = int8_scope_prefixes(model)
    focus_convs = {id(m.conv.conv) for m in model.modules() if isinstance(m, Focus)}
    return [n for n, m in model.named_modules()
            if (reads_camera_image(m) or id(m) in focus_convs) and n.startswith(prefixes)]


def reads_camera_image(module: nn.Module) -> bool:
    """A plain conv with at most 3 input channels (an image's): see :func:`image_input_convs`."""
    return type(module) is nn.Conv2d and module.in_channels <= 3


def default_calibration_method(family_name: str, *, fp8: bool = False) -> str:
    """The calibration method a build of family ``family_name`` uses unless told (``calib_method``).

    ``entropy`` (TensorRT's KL threshold) for the BEV networks (BEVFormer, BEVDet); ``minmax`` for fp8
    (e4m3's relative precision gains nothing from clipping) and CenterNet; ``percentile`` (99.99th of
    ``|x|``) for YOLOX. Measured on the 2D detectors' trained checkpoints:

    * YOLOX: every conv reads a SiLU output (or a sum, concatenation or pooling of them): half its values
      sit in SiLU's negative lobe ``[-0.28, 0)`` and fold onto the smallest bins of the ``|x|`` histogram,
      and the KL search, which weighs bins by their mass, then resolves that dense low region finely and
      clips the rare large activations that carry the objects (an H100 YOLOX-x build with entropy gave
      4.1 dB and lost 0.36 of its 0.57 mAP). The max is no safer: on the 2026-12-07 checkpoint (mAP 0.503,
      ``diagnose-int8-yolox-x.md``) a few outliers in the PAN's top-down blocks set those layers' scales
      (4-6 dB alone in int8) and minmax lost 0.49 mAP, entropy 0.19, the 99.99th percentile 0.084 (its
      engine: 0.079; QAT from it: +0.002).
    * CenterNet: on the trained 512x512 checkpoint (H100, ``diagnose-int8-centernet-r18-dcn.md``) entropy
      thresholds give the heatmap 9.8 dB SQNR against minmax's 24.0 dB (29.9 with zero points); its
      entropy engines had 8.6 dB and lost 0.022 mAP, the minmax engine of the same session's checkpoint
      +0.0002. (A reduced 128x160 model trained on the CPU showed no difference: 33 dB either way.)
    """
    if fp8 or family_name == "centernet":
        return "minmax"
    if family_name == "yolox":
        return "percentile"
    return "entropy"


def calibration_method_overrides(model: nn.Module) -> dict[str, str]:
    """Layers calibrated by their input's max instead of the build's method (layer name -> method).

    BEVDet: the convs reading the splatted BEV grid (the BEV encoder's first block: its conv1 and
    its projection). That grid is sparse (empty cells are exactly zero) and its rare large values
    are the occupied cells that carry the objects; the entropy threshold of a histogram dominated
    by zeros clips them (a reduced BEVDet briefly trained on the synthetic world: entropy put the
    threshold at a fifth of the max and the int8 head outputs fell to 15 dB SQNR; the max for these
    two layers alone gave 36 dB). BEVFormer: none.
    """
    if family(model) != "bevdet":
        return {}
    block = model.img_bev_encoder_backbone.layers[0][0]
    prefix = "img_bev_encoder_backbone.layers.0.0."
    names = [prefix + n for n, m in block.named_modules()
             if n.split(".")[0] in ("conv1", "downsample") and type(m) is nn.Conv2d]
    return dict.fromkeys(names, "minmax")
