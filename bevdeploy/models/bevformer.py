"""BEVFormer (tiny / small / base): camera images -> BEV features -> 3D boxes, as tensors in and out.

BEVFormer (Li et al., ECCV 2022, https://arxiv.org/abs/2203.17270) lifts six camera views into a
bird's-eye-view grid of queries with two deformable attentions per encoder layer: temporal
self-attention (TSA) over [previous BEV, current BEV] and spatial cross-attention (SCA) from 3D
pillar points projected into the cameras. A DETR-style decoder then refines 900 object queries
against the BEV. Origin of every number and name: fundamentalvision/BEVFormer
(``projects/configs/bevformer/bevformer_{tiny,small,base}.py``; ``projects/mmdet3d_plugin/
bevformer/{detectors/bevformer.py, dense_heads/bevformer_head.py, modules/*.py}``;
``core/bbox/coders/nms_free_coder.py``; ``core/bbox/util.py``) and the mmcv/mmdet 2.x bricks they
build (``MultiheadAttention``, ``FFN``, ``LearnedPositionalEncoding``, ``ResNet``, ``FPN``).

**State dict.** Module names follow the official model exactly, so an official checkpoint loads
with :func:`bevdeploy.models.checkpoint.load_checkpoint` (``img_backbone``, ``img_neck``,
``pts_bbox_head.{transformer.{encoder,decoder,level_embeds,cams_embeds,reference_points,
can_bus_mlp}, bev_embedding, query_embedding, positional_encoding, cls_branches, reg_branches,
code_weights}``).

**Inputs** (static shapes, no ``img_metas``): ``image`` [B, 6, 3, H, W] normalised as the config's
``image_mean/std/to_rgb`` say and padded to ``image_size``; ``lidar2img`` [B, 6, 4, 4] (the
intrinsics scaled to the resized image, as the official pipeline's ``RandomScaleImageMultiViewImage``
does); ``can_bus`` [B, 18] as BEVFormer's test loop feeds it (``[0:3]`` ego translation delta vs the
previous frame, ``[-2]`` ego yaw in radians, ``[-1]`` yaw delta in degrees); ``prev_bev``
[B, bev_h*bev_w, C] (batch first; row-major (y, x) over the grid; the official layout is
[bev_h*bev_w, B, C]); ``use_prev_bev`` [B] float 0/1. ``B`` is a batch of independent streams;
every sample runs the official batch-1 math.

**Temporal gate** (the reference system's, made exact): ``u = use_prev_bev``. The official model,
without a previous BEV, zeroes ``can_bus[0:3]`` and ``can_bus[-1]`` and lets TSA attend to the
current query twice; here the deltas are multiplied by ``u`` in the graph and, in every encoder
layer, TSA's values are ``u * [rotated prev_bev, bev_query] + (1 - u) * [query, query]``. With
``u = 0`` the result does not depend on ``prev_bev`` (keep it finite: 0 * NaN is NaN); with
``u = 1`` it is the official result with that previous BEV.

**Spatial cross-attention, static form.** The official SCA gathers, per camera, the BEV queries
whose pillar hits the image (data-dependent sizes). Here every BEV query attends in every camera,
the contributions of cameras its pillar misses are zeroed, and the sum is divided by the number of
cameras that see it (at least 1): the official result, with static shapes. The per-camera query
projection is separated (:meth:`SpatialCrossAttention.forward`); with ``gathered`` set (the engine's
deploy form) the camera-gathered op :func:`~bevdeploy.ops.sca.sca_gathered` computes the same result
sampling only the cameras that see each query, with static shapes.

**Outputs**: ``bev_embed`` [B, bev_h*bev_w, C], ``all_cls_scores`` [num_dec_layers, B, num_query,
10] (logits) and ``all_bbox_preds`` [num_dec_layers, B, num_query, 10] (cx, cy, log w, log l, cz,
log h, sin, cos, vx, vy; centres in metres). :meth:`BEVFormer.decode` turns the last layer into
boxes with the official NMS-free coder.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bevdeploy.models.fpn import FPN
from bevdeploy.models.resnet import ResNet
from bevdeploy.ops.msda import msda_fused
from bevdeploy.ops.rotate import rotate
from bevdeploy.ops.sca import sca_gathered

__all__ = [
    "BEVFormerConfig",
    "BEVFormer",
    "BEVFormerHead",
    "PerceptionTransformer",
    "BEVFormerEncoder",
    "BEVFormerLayer",
    "DetectionTransformerDecoder",
    "DetrTransformerDecoderLayer",
    "TemporalSelfAttention",
    "SpatialCrossAttention",
    "MSDeformableAttention3D",
    "CustomMSDeformableAttention",
    "MultiheadAttention",
    "FFN",
    "LearnedPositionalEncoding",
    "NMSFreeCoder",
    "denormalize_bbox",
    "inverse_sigmoid",
    "BEVFORMER_CONFIGS",
    "bevformer_tiny",
    "bevformer_small",
    "bevformer_base",
]

#: can_bus entries that are deltas vs the previous frame (translation xyz, yaw in degrees).
_CAN_BUS_DELTA_INDICES = (0, 1, 2, 17)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BEVFormerConfig:
    """Every number of one BEVFormer variant (the official config, flattened; no inheritance).

    Override fields with :func:`dataclasses.replace` (tests shrink ``image_size``, ``bev_h/w`` and
    ``num_query``); state-dict shapes depend on ``bev_h``, ``bev_w`` and ``num_query`` only through
    ``bev_embedding``, ``positional_encoding`` and ``query_embedding``.

    The image fields describe the official test pipeline, which runs before the model: resize the
    1600x900 camera images by ``image_scale`` (and scale ``lidar2img``'s first two rows with them),
    normalise with ``image_mean``/``image_std`` (after BGR->RGB when ``image_to_rgb``; the caffe
    R101 of small/base takes BGR, mean-subtracted, unit std), pad bottom/right with zeros to
    ``image_size`` (H, W), a multiple of 32. Projections are normalised by the padded size, as the
    official ``img_shape`` after ``PadMultiViewImage``.

    ``shift_current_bev_ref`` and ``rotate_center``: see :class:`BEVFormerEncoder` and
    :class:`PerceptionTransformer`.
    """

    name: str
    image_size: tuple[int, int]
    image_scale: float
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    image_to_rgb: bool
    num_cams: int = 6
    # backbone (mmdet ResNet)
    depth: int = 50
    style: str = "pytorch"
    out_indices: tuple[int, ...] = (3,)
    stage_with_dcn: tuple[bool, bool, bool, bool] = (False, False, False, False)
    frozen_stages: int = 1
    norm_eval: bool = True
    # neck (mmdet FPN, add_extra_convs='on_output')
    fpn_in_channels: tuple[int, ...] = (2048,)
    num_levels: int = 1
    relu_before_extra_convs: bool = True
    # transformer
    embed_dims: int = 256
    num_heads: int = 8
    ffn_dims: int = 512
    bev_h: int = 50
    bev_w: int = 50
    num_encoder_layers: int = 3
    num_decoder_layers: int = 6
    num_points_in_pillar: int = 4
    tsa_num_points: int = 4
    sca_num_points: int = 8
    decoder_num_points: int = 4
    num_feature_levels: int = 4
    rotate_prev_bev: bool = True
    use_shift: bool = True
    use_can_bus: bool = True
    can_bus_norm: bool = True
    use_cams_embeds: bool = True
    rotate_center: tuple[float, float] = (100.0, 100.0)
    shift_current_bev_ref: bool = True
    pc_range: tuple[float, float, float, float, float, float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    # head
    num_query: int = 900
    num_classes: int = 10
    code_size: int = 10
    num_reg_fcs: int = 2
    code_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)
    # NMS-free coder
    post_center_range: tuple[float, float, float, float, float, float] = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
    max_num: int = 300
    score_threshold: float | None = None

    def __post_init__(self) -> None:
        positive = {
            "num_cams": self.num_cams,
            "embed_dims": self.embed_dims,
            "num_heads": self.num_heads,
            "ffn_dims": self.ffn_dims,
            "bev_h": self.bev_h,
            "bev_w": self.bev_w,
            "num_encoder_layers": self.num_encoder_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "num_points_in_pillar": self.num_points_in_pillar,
            "num_query": self.num_query,
            "num_classes": self.num_classes,
            "max_num": self.max_num,
        }
        for key, val in positive.items():
            if not (isinstance(val, int) and val > 0):
                raise ValueError(f"BEVFormerConfig.{key} must be a positive int, got {val!r}")
        if len(self.image_size) != 2 or min(self.image_size) < 32:
            raise ValueError(f"BEVFormerConfig.image_size must be (H, W) with both >= 32, got {self.image_size}")
        if self.embed_dims % self.num_heads:
            raise ValueError(f"embed_dims ({self.embed_dims}) must be divisible by num_heads ({self.num_heads})")
        if self.embed_dims % 2:
            raise ValueError(f"embed_dims must be even (half goes to x, half to y positions), got {self.embed_dims}")
        if len(self.fpn_in_channels) != len(self.out_indices):
            raise ValueError(
                f"fpn_in_channels {self.fpn_in_channels} must have one entry per backbone out_indices "
                f"{self.out_indices}"
            )
        if not len(self.out_indices) <= self.num_levels <= self.num_feature_levels:
            raise ValueError(
                f"num_levels must be in [{len(self.out_indices)}, num_feature_levels={self.num_feature_levels}], "
                f"got {self.num_levels}"
            )
        if self.sca_num_points % self.num_points_in_pillar:
            raise ValueError(
                f"sca_num_points ({self.sca_num_points}) must be a multiple of num_points_in_pillar "
                f"({self.num_points_in_pillar}): each pillar height gets the same number of points"
            )
        if self.code_size != 10 or len(self.code_weights) != self.code_size:
            raise ValueError(
                f"code_size must be 10 with 10 code_weights, got {self.code_size} and {len(self.code_weights)}"
            )
        if len(self.pc_range) != 6 or len(self.post_center_range) != 6:
            raise ValueError("pc_range and post_center_range must have 6 values (x0, y0, z0, x1, y1, z1)")

    @property
    def num_bev(self) -> int:
        """bev_h * bev_w: the number of BEV queries."""
        return self.bev_h * self.bev_w


_IMAGENET_RGB = dict(image_mean=(123.675, 116.28, 103.53), image_std=(58.395, 57.12, 57.375), image_to_rgb=True)
_CAFFE_BGR = dict(image_mean=(103.530, 116.280, 123.675), image_std=(1.0, 1.0, 1.0), image_to_rgb=False)

#: The official configs (``projects/configs/bevformer/bevformer_{tiny,small,base}.py``).
BEVFORMER_CONFIGS: dict[str, BEVFormerConfig] = {
    # R50 (torchvision weights, pytorch style), C5 only, 800x450 -> padded 800x480, BEV 50x50.
    "bevformer-tiny": BEVFormerConfig(
        name="bevformer-tiny",
        image_size=(480, 800),
        image_scale=0.5,
        **_IMAGENET_RGB,
        depth=50,
        style="pytorch",
        out_indices=(3,),
        fpn_in_channels=(2048,),
        num_levels=1,
        bev_h=50,
        bev_w=50,
        num_encoder_layers=3,
    ),
    # R101-DCN (FCOS3D weights, caffe style), C5 only, 1280x720 -> padded 1280x736, BEV 150x150.
    "bevformer-small": BEVFormerConfig(
        name="bevformer-small",
        image_size=(736, 1280),
        image_scale=0.8,
        **_CAFFE_BGR,
        depth=101,
        style="caffe",
        out_indices=(3,),
        stage_with_dcn=(False, False, True, True),
        fpn_in_channels=(2048,),
        num_levels=1,
        bev_h=150,
        bev_w=150,
        num_encoder_layers=3,
    ),
    # R101-DCN, C3-C5 + one extra FPN level, 1600x900 -> padded 1600x928, BEV 200x200.
    "bevformer-base": BEVFormerConfig(
        name="bevformer-base",
        image_size=(928, 1600),
        image_scale=1.0,
        **_CAFFE_BGR,
        depth=101,
        style="caffe",
        out_indices=(1, 2, 3),
        stage_with_dcn=(False, False, True, True),
        fpn_in_channels=(512, 1024, 2048),
        num_levels=4,
        bev_h=200,
        bev_w=200,
        num_encoder_layers=6,
    ),
}


# --------------------------------------------------------------------------------------------
# Small bricks (mmcv/mmdet names)
# --------------------------------------------------------------------------------------------


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """log(x / (1 - x)) with both clamped to >= eps (mmdet's ``inverse_sigmoid``)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class FFN(nn.Module):
    """Two-layer MLP with residual (mmcv ``FFN``: keys ``layers.0.0`` and ``layers.1``)."""

    def __init__(self, *, embed_dims: int, feedforward_channels: int, ffn_drop: float = 0.1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, feedforward_channels), nn.ReLU(inplace=True), nn.Dropout(ffn_drop)),
            nn.Linear(feedforward_channels, embed_dims),
            nn.Dropout(ffn_drop),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layers(x)


class MultiheadAttention(nn.Module):
    """Decoder self-attention (mmcv ``MultiheadAttention``: ``attn`` is a ``nn.MultiheadAttention``).

    The parameters live in ``attn`` (``in_proj_weight``, ``in_proj_bias``, ``out_proj``) for the
    checkpoint; the math is written out with ``scaled_dot_product_attention`` so the engine can
    swap in its flash-attention op. q = k = query + query_pos, v = query, residual = query.
    """

    def __init__(self, *, embed_dims: int, num_heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=dropout)

    def forward(self, query: Tensor, query_pos: Tensor) -> Tensor:
        B, Q, C = query.shape  # batch first
        H = self.num_heads
        w_q, w_k, w_v = self.attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.attn.in_proj_bias.chunk(3)
        qk = query + query_pos
        q = F.linear(qk, w_q, b_q).view(B, Q, H, C // H).transpose(1, 2)  # [B, H, Q, d]
        k = F.linear(qk, w_k, b_k).view(B, Q, H, C // H).transpose(1, 2)
        v = F.linear(query, w_v, b_v).view(B, Q, H, C // H).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, Q, d]
        out = self.attn.out_proj(out.transpose(1, 2).reshape(B, Q, C))
        return query + out


class LearnedPositionalEncoding(nn.Module):
    """Learned row/col embeddings (mmdet ``LearnedPositionalEncoding``).

    Returns ``Tensor[bev_h * bev_w, 2 * num_feats]``: for cell (y, x), ``col_embed[x]`` then
    ``row_embed[y]``, rows in row-major (y, x) order.
    """

    def __init__(self, *, num_feats: int, row_num_embed: int, col_num_embed: int) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(row_num_embed, num_feats)
        self.col_embed = nn.Embedding(col_num_embed, num_feats)

    def forward(self) -> Tensor:
        h, w = self.row_embed.num_embeddings, self.col_embed.num_embeddings
        x = self.col_embed.weight[None, :, :].expand(h, w, -1)
        y = self.row_embed.weight[:, None, :].expand(h, w, -1)
        return torch.cat((x, y), dim=-1).reshape(h * w, -1)


# --------------------------------------------------------------------------------------------
# Deformable attentions
# --------------------------------------------------------------------------------------------


def _grid_init_bias(num_heads: int, num_levels: int, num_points: int) -> Tensor:
    """The official sampling-offset bias init: per head a unit direction, scaled by point index + 1."""
    thetas = torch.arange(num_heads, dtype=torch.float32) * (2.0 * math.pi / num_heads)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(num_heads, 1, 1, 2).repeat(1, num_levels, num_points, 1)
    for i in range(num_points):
        grid[:, :, i, :] *= i + 1
    return grid.reshape(-1)


def _init_deformable(sampling_offsets: nn.Linear, attention_weights: nn.Linear, grid_bias: Tensor) -> None:
    nn.init.zeros_(sampling_offsets.weight)
    with torch.no_grad():
        sampling_offsets.bias.copy_(grid_bias.to(sampling_offsets.bias.device))
    nn.init.zeros_(attention_weights.weight)
    nn.init.zeros_(attention_weights.bias)


def _xavier(linear: nn.Linear) -> None:
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)


class TemporalSelfAttention(nn.Module):
    """BEV queries attend to [previous BEV, current BEV] with deformable sampling (TSA).

    Offsets and weights come from ``[value_prev, query + bev_pos]`` (2C -> per queue entry); each
    queue entry is one deformable attention over the BEV map, and the two results are averaged.
    The official module divides the raw offsets by (bev_w, bev_h) before adding them to the
    normalised reference points; :func:`~bevdeploy.ops.msda.msda_fused` takes offsets in pixels of
    the level, which are therefore the raw offsets themselves (same math).
    """

    num_bev_queue = 2

    def __init__(self, *, embed_dims: int, num_heads: int, num_levels: int = 1, num_points: int = 4) -> None:
        super().__init__()
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        q = self.num_bev_queue
        self.sampling_offsets = nn.Linear(embed_dims * q, q * num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims * q, q * num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        #: ops variant for msda (None: from the dtype); the engine's deploy form sets "fp16x2".
        self.op_variant: str | None = None

    def init_weights(self) -> None:
        grid = _grid_init_bias(self.num_heads, self.num_levels * self.num_bev_queue, self.num_points)
        _init_deformable(self.sampling_offsets, self.attention_weights, grid)
        _xavier(self.value_proj)
        _xavier(self.output_proj)

    def forward(
        self,
        query: Tensor,  # [B, Q, C] (Q = bev_h * bev_w)
        value_prev: Tensor,  # [B, Q, C]
        value_cur: Tensor,  # [B, Q, C]
        query_pos: Tensor,  # [Q, C] or [B, Q, C]
        reference_points: Tensor,  # [B, 2, Q, 1, 2]: (x, y) in [0, 1] for the prev and current entry
        bev_hw: tuple[int, int],
    ) -> Tensor:
        B, Q, C = query.shape
        nq, H, L, P = self.num_bev_queue, self.num_heads, self.num_levels, self.num_points
        identity = query
        q = torch.cat([value_prev, query + query_pos], -1)  # [B, Q, 2C]
        value = self.value_proj(torch.stack([value_prev, value_cur], 1))  # [B, 2, Q, C]
        value = value.reshape(B * nq, Q, H, C // H)
        offsets = self.sampling_offsets(q).view(B, Q, H, nq, L, P, 2)
        offsets = offsets.permute(0, 3, 1, 2, 4, 5, 6).reshape(B * nq, Q, H, L, P, 2)
        logits = self.attention_weights(q).view(B, Q, H, nq, L * P)
        logits = logits.permute(0, 3, 1, 2, 4).reshape(B * nq, Q, H, L * P)
        out = msda_fused(
            value, [bev_hw], reference_points.reshape(B * nq, Q, 1, 2), offsets, logits, variant=self.op_variant
        )
        out = out.view(B, nq, Q, C).mean(1)  # fuse history and current
        return identity + self.output_proj(out)


class MSDeformableAttention3D(nn.Module):
    """SCA's deformable attention: ``num_points`` per level around ``D`` projected pillar points.

    Point ``p`` belongs to pillar height ``p % D`` (the official views the points as
    ``[num_points // D, D]``), which is :func:`~bevdeploy.ops.msda.msda_fused`'s ``p % R`` rule.
    No output projection (the enclosing :class:`SpatialCrossAttention` owns it).
    """

    def __init__(self, *, embed_dims: int, num_heads: int, num_levels: int, num_points: int = 8) -> None:
        super().__init__()
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        #: ops variant for msda (None: from the dtype); the engine's deploy form sets "fp16x2".
        self.op_variant: str | None = None

    def init_weights(self) -> None:
        grid = _grid_init_bias(self.num_heads, self.num_levels, self.num_points)
        _init_deformable(self.sampling_offsets, self.attention_weights, grid)
        _xavier(self.value_proj)

    def project_queries(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """Per-query offsets ``[B, Q, H, L, P, 2]`` (pixels of each level) and logits ``[B, Q, H, L*P]``."""
        B, Q, _ = query.shape
        H, L, P = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query).view(B, Q, H, L, P, 2)
        logits = self.attention_weights(query).view(B, Q, H, L * P)
        return offsets, logits

    def project_value(self, value: Tensor) -> Tensor:
        """``value_proj`` of ``[B', S, C]`` image features, split into heads: ``[B', S, H, C // H]``."""
        Bc, S, C = value.shape
        return self.value_proj(value).view(Bc, S, self.num_heads, C // self.num_heads)

    def forward(
        self,
        value: Tensor,  # [B', S, C] image features of B' (batch, camera) pairs
        spatial_shapes: Sequence[tuple[int, int]],
        reference_points: Tensor,  # [B', Q, D, 2] in [0, 1] of the image
        offsets: Tensor,  # [B', Q, H, L, P, 2]
        logits: Tensor,  # [B', Q, H, L*P]
    ) -> Tensor:
        return msda_fused(  # [B', Q, C]
            self.project_value(value), list(spatial_shapes), reference_points, offsets, logits, variant=self.op_variant
        )


class SpatialCrossAttention(nn.Module):
    """BEV queries attend to the image features of the cameras their pillar projects into (SCA).

    Static form: every query runs in every camera; contributions where ``bev_mask`` (any of the
    pillar's points inside the image, in front of the camera) is false are zeroed; the sum over
    cameras is divided by the number of cameras that see the query (clamped to >= 1), then
    ``output_proj`` and the residual. Equal to the official gathered computation, which runs each
    camera only on its visible queries (each query's attention depends on that query alone).

    Gathered form (``gathered = True``, which the engine's deploy form sets): the same result from
    :func:`~bevdeploy.ops.sca.sca_gathered`, which samples each query only in the cameras that see
    it and writes ``[B, Q, C]`` directly (no ``[B, N, Q, C]`` intermediate, no offsets copied per
    camera). The static form stays the reference and what the ONNX export writes by default.
    """

    def __init__(self, *, embed_dims: int, num_heads: int, num_levels: int, num_points: int, num_cams: int) -> None:
        super().__init__()
        self.embed_dims = embed_dims
        self.num_cams = num_cams
        self.deformable_attention = MSDeformableAttention3D(
            embed_dims=embed_dims, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        #: deploy knob (not in the state dict): use the gathered op; its variant is
        #: ``deformable_attention.op_variant``. ``bevdeploy.engine.deploy.set_sca_gathered`` sets it.
        self.gathered = False

    def init_weights(self) -> None:
        self.deformable_attention.init_weights()
        _xavier(self.output_proj)

    def forward(
        self,
        query: Tensor,  # [B, Q, C]
        value: Tensor,  # [B, N, S, C] camera features (+ camera and level embeddings)
        spatial_shapes: Sequence[tuple[int, int]],
        reference_points_cam: Tensor,  # [B, N, Q, D, 2]
        bev_mask: Tensor,  # [B, N, Q] float 0/1: the camera sees the query's pillar
    ) -> Tensor:
        B, Q, C = query.shape
        N = value.shape[1]
        offsets, logits = self.deformable_attention.project_queries(query)
        if self.gathered:
            attn = self.deformable_attention
            v = attn.project_value(value.reshape(B * N, value.shape[2], C))  # [B*N, S, H, C // H]
            out = sca_gathered(  # [B, Q, C]
                v.view(B, N, *v.shape[1:]), list(spatial_shapes), reference_points_cam, bev_mask, offsets, logits,
                variant=attn.op_variant,
            )
            return query + self.output_proj(out)
        # All cameras share the query's offsets and logits: broadcast them over the camera axis.
        offsets = offsets[:, None].expand(B, N, *offsets.shape[1:]).reshape(B * N, *offsets.shape[1:])
        logits = logits[:, None].expand(B, N, *logits.shape[1:]).reshape(B * N, *logits.shape[1:])
        out = self.deformable_attention(
            value.reshape(B * N, value.shape[2], C),
            spatial_shapes,
            reference_points_cam.reshape(B * N, Q, *reference_points_cam.shape[3:]),
            offsets,
            logits,
        ).view(B, N, Q, C)
        slots = (out * bev_mask[..., None]).sum(1)  # [B, Q, C]
        count = bev_mask.sum(1).clamp(min=1.0)  # [B, Q]
        return query + self.output_proj(slots / count[..., None])


class CustomMSDeformableAttention(nn.Module):
    """Decoder cross-attention: object queries sample the BEV around their (x, y) reference point.

    As in :class:`TemporalSelfAttention`, the official normalises the raw offsets by (bev_w, bev_h);
    the fused op takes them in pixels, i.e. raw.
    """

    def __init__(self, *, embed_dims: int, num_heads: int, num_levels: int = 1, num_points: int = 4) -> None:
        super().__init__()
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        #: ops variant for msda (None: from the dtype); the engine's deploy form sets "fp16x2".
        self.op_variant: str | None = None

    def init_weights(self) -> None:
        grid = _grid_init_bias(self.num_heads, self.num_levels, self.num_points)
        _init_deformable(self.sampling_offsets, self.attention_weights, grid)
        _xavier(self.value_proj)
        _xavier(self.output_proj)

    def forward(
        self,
        query: Tensor,  # [B, Q, C]
        query_pos: Tensor,  # [B, Q, C]
        value: Tensor,  # [B, S, C] (the BEV)
        reference_points: Tensor,  # [B, Q, 1, 2]
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> Tensor:
        B, Q, C = query.shape
        H, L, P = self.num_heads, self.num_levels, self.num_points
        q = query + query_pos
        v = self.value_proj(value).view(B, value.shape[1], H, C // H)
        offsets = self.sampling_offsets(q).view(B, Q, H, L, P, 2)
        logits = self.attention_weights(q).view(B, Q, H, L * P)
        out = msda_fused(v, list(spatial_shapes), reference_points, offsets, logits, variant=self.op_variant)
        return query + self.output_proj(out)


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------


class BEVFormerLayer(nn.Module):
    """TSA -> LN -> SCA -> LN -> FFN -> LN (keys ``attentions.{0,1}``, ``ffns.0``, ``norms.{0,1,2}``)."""

    def __init__(
        self, *, tsa: TemporalSelfAttention, sca: SpatialCrossAttention, embed_dims: int, ffn_dims: int
    ) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([tsa, sca])
        self.ffns = nn.ModuleList([FFN(embed_dims=embed_dims, feedforward_channels=ffn_dims)])
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(3)])

    def forward(
        self,
        query: Tensor,  # [B, Q, C]
        *,
        bev_query: Tensor,  # [B, Q, C] the encoder's input query (current entry of TSA's queue)
        prev_bev: Tensor,  # [B, Q, C] rotated previous BEV
        use_prev_bev: Tensor,  # [B] float 0/1
        bev_pos: Tensor,  # [Q, C]
        ref_2d: Tensor,  # [B, 2, Q, 1, 2]
        bev_hw: tuple[int, int],
        value: Tensor,  # [B, N, S, C]
        spatial_shapes: Sequence[tuple[int, int]],
        reference_points_cam: Tensor,  # [B, N, Q, D, 2]
        bev_mask: Tensor,  # [B, N, Q]
    ) -> Tensor:
        u = use_prev_bev.view(-1, 1, 1).to(query.dtype)
        # Without a previous BEV the official TSA attends to [query, query] of this layer.
        value_prev = u * prev_bev + (1 - u) * query
        value_cur = u * bev_query + (1 - u) * query
        query = self.attentions[0](query, value_prev, value_cur, bev_pos, ref_2d, bev_hw)
        query = self.norms[0](query)
        query = self.attentions[1](query, value, spatial_shapes, reference_points_cam, bev_mask)
        query = self.norms[1](query)
        return self.norms[2](self.ffns[0](query))


class BEVFormerEncoder(nn.Module):
    """Stack of :class:`BEVFormerLayer` plus the reference points of TSA (2D) and SCA (3D -> cameras).

    Args:
        layers: The encoder layers (keys ``layers.i``).
        pc_range: (x0, y0, z0, x1, y1, z1) of the BEV volume in the LiDAR frame, metres.
        num_points_in_pillar: Heights sampled per BEV cell (``num_Z_anchors``, 4).
        image_size: Padded network input (H, W): projections are normalised by it.
        shift_current_bev_ref: The released checkpoints' behaviour (BEVFormer v1 code, kept "for
            reproducing our results in paper"): the ego-motion shift moves the reference points of
            both TSA queue entries. False: only the previous entry's, as BEVFormer's code since its
            2023 V2 update and the reference system's TensorRT graphs do.
    """

    def __init__(
        self,
        *,
        layers: Sequence[BEVFormerLayer],
        pc_range: Sequence[float],
        num_points_in_pillar: int,
        image_size: tuple[int, int],
        shift_current_bev_ref: bool = True,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.pc_range = tuple(float(v) for v in pc_range)
        self.num_points_in_pillar = num_points_in_pillar
        self.image_size = tuple(image_size)
        self.shift_current_bev_ref = shift_current_bev_ref

    def reference_points_2d(self, bev_h: int, bev_w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Cell centres ``[bev_h * bev_w, 2]`` as (x, y) in [0, 1], row-major (y, x)."""
        ys = (torch.arange(bev_h, device=device, dtype=dtype) + 0.5) / bev_h
        xs = (torch.arange(bev_w, device=device, dtype=dtype) + 0.5) / bev_w
        return torch.stack([xs[None, :].expand(bev_h, bev_w), ys[:, None].expand(bev_h, bev_w)], -1).reshape(-1, 2)

    def reference_points_3d(self, bev_h: int, bev_w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Pillar points ``[D, bev_h * bev_w, 3]`` as (x, y, z) in [0, 1] of pc_range."""
        D = self.num_points_in_pillar
        z_extent = self.pc_range[5] - self.pc_range[2]
        # official: linspace(0.5, Z - 0.5, D) / Z with Z the pillar height in metres
        zs = torch.linspace(0.5, z_extent - 0.5, D, device=device, dtype=dtype) / z_extent
        xy = self.reference_points_2d(bev_h, bev_w, device, dtype)  # [Q, 2]
        return torch.cat([xy[None].expand(D, -1, -1), zs[:, None, None].expand(D, xy.shape[0], 1)], -1)

    def point_sampling(
        self, ref_3d: Tensor, lidar2img: Tensor, mask_dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """Project pillar points into every camera, in fp32 whatever the model's dtype.

        Returns:
            reference_points_cam (Tensor[B, N, Q, D, 2]): float32 (x, y) / (W, H) of the padded image.
            bev_mask (Tensor[B, N, Q]): ``mask_dtype`` 0/1, 1 where any of the query's D points lands
                inside the image in front of the camera.
        """
        x0, y0, z0, x1, y1, z1 = self.pc_range
        # Pillar points in metres, [D, Q] each.
        px = ref_3d[..., 0].float() * (x1 - x0) + x0
        py = ref_3d[..., 1].float() * (y1 - y0) + y0
        pz = ref_3d[..., 2].float() * (z1 - z0) + z0
        l2i = lidar2img.float()[:, :, :, :, None, None]  # [B, N, 4, 4, 1, 1]
        # lidar2img @ (x, y, z, 1) as explicit fp32 products: TF32 never applies (the official
        # turns it off for this projection) and no tensor is built from host lists.
        # rows x, y, depth of the camera point: [B, N, 3, D, Q]
        cam = l2i[:, :, :3, 0] * px + l2i[:, :, :3, 1] * py + l2i[:, :, :3, 2] * pz + l2i[:, :, :3, 3]
        eps = 1e-5
        depth = cam[:, :, 2]
        in_front = depth > eps
        depth = depth.clamp(min=eps)
        H, W = self.image_size
        x = cam[:, :, 0] / depth / W  # [B, N, D, Q]
        y = cam[:, :, 1] / depth / H
        inside = in_front & (x > 0.0) & (x < 1.0) & (y > 0.0) & (y < 1.0)
        bev_mask = inside.any(2).to(mask_dtype)  # [B, N, Q]
        # Points behind a camera land ~1e5 image widths away; every such sample reads zeros (as in
        # the official), and clamping keeps pixel indices far inside int32 for the kernels.
        xy = torch.stack([x, y], -1).clamp(-1e3, 1e3)  # [B, N, D, Q, 2]
        return xy.permute(0, 1, 3, 2, 4), bev_mask

    def forward(
        self,
        bev_query: Tensor,  # [B, Q, C]
        value: Tensor,  # [B, N, S, C]
        *,
        spatial_shapes: Sequence[tuple[int, int]],
        bev_hw: tuple[int, int],
        bev_pos: Tensor,  # [Q, C]
        lidar2img: Tensor,  # [B, N, 4, 4]
        prev_bev: Tensor,  # [B, Q, C] (rotated)
        use_prev_bev: Tensor,  # [B]
        shift: Tensor,  # [B, 2] (x, y) in [0, 1] units of the grid
    ) -> Tensor:
        bev_h, bev_w = bev_hw
        # Reference points stay fp32 in every precision (the ops take fp32 coordinates with fp16
        # values): in fp16 a 200-cell grid would lose a fifth of a cell.
        ref_2d = self.reference_points_2d(bev_h, bev_w, bev_query.device, torch.float32)  # [Q, 2]
        ref_3d = self.reference_points_3d(bev_h, bev_w, bev_query.device, torch.float32)  # [D, Q, 3]
        reference_points_cam, bev_mask = self.point_sampling(ref_3d, lidar2img, bev_query.dtype)
        shifted = ref_2d[None] + shift.float()[:, None, :]  # [B, Q, 2]
        current = shifted if self.shift_current_bev_ref else ref_2d[None].expand_as(shifted)
        ref_tsa = torch.stack([shifted, current], 1)[:, :, :, None, :]  # [B, 2, Q, 1, 2]
        output = bev_query
        for layer in self.layers:
            output = layer(
                output,
                bev_query=bev_query,
                prev_bev=prev_bev,
                use_prev_bev=use_prev_bev,
                bev_pos=bev_pos,
                ref_2d=ref_tsa,
                bev_hw=bev_hw,
                value=value,
                spatial_shapes=spatial_shapes,
                reference_points_cam=reference_points_cam,
                bev_mask=bev_mask,
            )
        return output


# --------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------


class DetrTransformerDecoderLayer(nn.Module):
    """Self-attn -> LN -> deformable cross-attn -> LN -> FFN -> LN (mmdet ``DetrTransformerDecoderLayer``)."""

    def __init__(
        self,
        *,
        self_attn: MultiheadAttention,
        cross_attn: CustomMSDeformableAttention,
        embed_dims: int,
        ffn_dims: int,
    ) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([self_attn, cross_attn])
        self.ffns = nn.ModuleList([FFN(embed_dims=embed_dims, feedforward_channels=ffn_dims)])
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(3)])

    def forward(
        self,
        query: Tensor,  # [B, Q, C]
        query_pos: Tensor,  # [B, Q, C]
        value: Tensor,  # [B, S, C]
        reference_points: Tensor,  # [B, Q, 1, 2]
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> Tensor:
        query = self.norms[0](self.attentions[0](query, query_pos))
        query = self.norms[1](self.attentions[1](query, query_pos, value, reference_points, spatial_shapes))
        return self.norms[2](self.ffns[0](query))


class DetectionTransformerDecoder(nn.Module):
    """Decoder layers with iterative box refinement of the (x, y, z) reference points."""

    def __init__(self, *, layers: Sequence[DetrTransformerDecoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)


# --------------------------------------------------------------------------------------------
# Transformer, head, detector
# --------------------------------------------------------------------------------------------


class PerceptionTransformer(nn.Module):
    """BEV encoder + object decoder with the temporal bookkeeping (shift, rotation, CAN bus).

    Args:
        encoder, decoder: The two stacks.
        embed_dims: C.
        num_feature_levels: Rows of ``level_embeds`` (the official keeps its default 4 for every config).
        num_cams: Rows of ``cams_embeds``.
        rotate_prev_bev, use_shift, use_can_bus, can_bus_norm, use_cams_embeds: As the official flags.
        rotate_center: (x, y) pixel centre of the previous-BEV rotation; the official fixes (100, 100)
            for every BEV size.
    """

    def __init__(
        self,
        *,
        encoder: BEVFormerEncoder,
        decoder: DetectionTransformerDecoder,
        embed_dims: int,
        num_feature_levels: int = 4,
        num_cams: int = 6,
        rotate_prev_bev: bool = True,
        use_shift: bool = True,
        use_can_bus: bool = True,
        can_bus_norm: bool = True,
        use_cams_embeds: bool = True,
        rotate_center: tuple[float, float] = (100.0, 100.0),
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.embed_dims = embed_dims
        self.num_feature_levels = num_feature_levels
        self.num_cams = num_cams
        self.rotate_prev_bev = rotate_prev_bev
        self.use_shift = use_shift
        self.use_can_bus = use_can_bus
        self.use_cams_embeds = use_cams_embeds
        self.rotate_center = (float(rotate_center[0]), float(rotate_center[1]))
        #: ops variant for rotate (None: from the dtype); the engine's deploy form sets "fp16x2".
        self.op_variant: str | None = None
        self.level_embeds = nn.Parameter(torch.empty(num_feature_levels, embed_dims))
        self.cams_embeds = nn.Parameter(torch.empty(num_cams, embed_dims))
        self.reference_points = nn.Linear(embed_dims, 3)
        self.can_bus_mlp = nn.Sequential(
            nn.Linear(18, embed_dims // 2),
            nn.ReLU(inplace=True),
            nn.Linear(embed_dims // 2, embed_dims),
            nn.ReLU(inplace=True),
        )
        if can_bus_norm:
            self.can_bus_mlp.add_module("norm", nn.LayerNorm(embed_dims))
        delta_mask = torch.zeros(18)
        delta_mask[list(_CAN_BUS_DELTA_INDICES)] = 1.0
        self.register_buffer("can_bus_delta_mask", delta_mask, persistent=False)

    def init_weights(self) -> None:
        """The official init: xavier for every matrix, then the attentions' own, normal embeddings."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, (TemporalSelfAttention, SpatialCrossAttention, CustomMSDeformableAttention)):
                m.init_weights()
        nn.init.normal_(self.level_embeds)
        nn.init.normal_(self.cams_embeds)
        _xavier(self.reference_points)
        for m in self.can_bus_mlp:
            if isinstance(m, nn.Linear):
                _xavier(m)

    def ego_shift(self, can_bus: Tensor, bev_h: int, bev_w: int) -> Tensor:
        """BEV grid shift ``[B, 2]`` (x, y in grid fractions) of the previous frame's BEV."""
        x0, y0, _, x1, y1, _ = self.encoder.pc_range
        real_w, real_h = x1 - x0, y1 - y0
        grid_length_y, grid_length_x = real_h / bev_h, real_w / bev_w
        delta_x, delta_y = can_bus[:, 0], can_bus[:, 1]
        ego_angle = can_bus[:, -2]  # radians (the official goes through degrees and back)
        translation_length = torch.sqrt(delta_x**2 + delta_y**2)
        translation_angle = torch.atan2(delta_y, delta_x)
        bev_angle = ego_angle - translation_angle
        shift_y = translation_length * torch.cos(bev_angle) / grid_length_y / bev_h
        shift_x = translation_length * torch.sin(bev_angle) / grid_length_x / bev_w
        return torch.stack([shift_x, shift_y], -1) * float(self.use_shift)

    def get_bev_features(
        self,
        mlvl_feats: Sequence[Tensor],  # each [B, N, C, h, w]
        bev_queries: Tensor,  # [Q, C]
        bev_pos: Tensor,  # [Q, C]
        bev_hw: tuple[int, int],
        *,
        lidar2img: Tensor,  # [B, N, 4, 4]
        can_bus: Tensor,  # [B, 18]
        prev_bev: Tensor,  # [B, Q, C]
        use_prev_bev: Tensor,  # [B]
    ) -> Tensor:
        """The BEV encoder with its temporal inputs; returns ``bev_embed`` ``[B, Q, C]``."""
        bev_h, bev_w = bev_hw
        B = mlvl_feats[0].shape[0]
        C = self.embed_dims
        u = use_prev_bev.to(can_bus.dtype)
        # Official first-frame rule: no previous BEV -> translation and yaw deltas are zero.
        delta = self.can_bus_delta_mask.to(can_bus.dtype)
        can_bus = can_bus * (1.0 - delta + delta * u[:, None])
        shift = self.ego_shift(can_bus, bev_h, bev_w)

        if self.rotate_prev_bev:
            # channels-last view in, channels-last out: no copies around the rotation
            grid = prev_bev.reshape(B, bev_h, bev_w, C).permute(0, 3, 1, 2)  # [B, C, bev_h, bev_w]
            grid = rotate(
                grid, can_bus[:, -1], center=self.rotate_center, interpolation="nearest", variant=self.op_variant
            )
            prev_bev = grid.permute(0, 2, 3, 1).reshape(B, bev_h * bev_w, C)

        can_bus_feat = self.can_bus_mlp(can_bus.to(bev_queries.dtype))  # [B, C]
        bev_query = bev_queries[None] + can_bus_feat[:, None, :] * float(self.use_can_bus)  # [B, Q, C]

        feats, spatial_shapes = [], []
        for lvl, feat in enumerate(mlvl_feats):
            _, N, _, h, w = feat.shape
            feat = feat.flatten(3).transpose(2, 3)  # [B, N, h*w, C]
            if self.use_cams_embeds:
                feat = feat + self.cams_embeds[None, :N, None, :].to(feat.dtype)
            feat = feat + self.level_embeds[None, None, lvl : lvl + 1, :].to(feat.dtype)
            feats.append(feat)
            spatial_shapes.append((int(h), int(w)))
        value = torch.cat(feats, 2)  # [B, N, S, C]

        return self.encoder(
            bev_query,
            value,
            spatial_shapes=spatial_shapes,
            bev_hw=bev_hw,
            bev_pos=bev_pos,
            lidar2img=lidar2img,
            prev_bev=prev_bev,
            use_prev_bev=u,
            shift=shift,
        )

    def decode(
        self,
        bev_embed: Tensor,  # [B, Q_bev, C]
        object_query_embed: Tensor,  # [num_query, 2C]: (query_pos, query)
        bev_hw: tuple[int, int],
        reg_branches: nn.ModuleList,
        cls_branches: nn.ModuleList,
        pc_range: Sequence[float],
    ) -> tuple[Tensor, Tensor]:
        """Decoder with box refinement; returns ``(all_cls_scores, all_bbox_preds)`` [L, B, Q, *]."""
        B = bev_embed.shape[0]
        query_pos, query = torch.split(object_query_embed, self.embed_dims, dim=1)
        query_pos = query_pos[None].expand(B, -1, -1)
        query = query[None].expand(B, -1, -1)
        reference = self.reference_points(query_pos).sigmoid()  # [B, Q, 3]
        x0, y0, z0, x1, y1, z1 = (float(v) for v in pc_range)
        classes, coords = [], []
        for lid, layer in enumerate(self.decoder.layers):
            query = layer(query, query_pos, bev_embed, reference[..., None, :2], [bev_hw])
            tmp = reg_branches[lid](query)  # [B, Q, 10]
            # Refined (x, y, z) in [0, 1]: the head's box centre and the next layer's reference.
            xyz = torch.cat([tmp[..., 0:2], tmp[..., 4:5]], -1) + inverse_sigmoid(reference)
            new_reference = xyz.sigmoid()
            cx = new_reference[..., 0:1] * (x1 - x0) + x0
            cy = new_reference[..., 1:2] * (y1 - y0) + y0
            cz = new_reference[..., 2:3] * (z1 - z0) + z0
            coords.append(torch.cat([cx, cy, tmp[..., 2:4], cz, tmp[..., 5:]], -1))
            classes.append(cls_branches[lid](query))
            reference = new_reference.detach()
        return torch.stack(classes), torch.stack(coords)


class NMSFreeCoder:
    """Top-k decoding of the last decoder layer (BEVFormer's ``NMSFreeCoder`` + ``get_bboxes``).

    Per sample: sigmoid scores, top ``max_num`` over (query, class), :func:`denormalize_bbox`, keep
    centres inside ``post_center_range`` (and above ``score_threshold`` with the official
    fall-back, if set), then move z from the box centre to its bottom (mmdet3d
    ``LiDARInstance3DBoxes``' origin (0.5, 0.5, 0)).
    """

    def __init__(
        self,
        *,
        post_center_range: Sequence[float],
        max_num: int = 300,
        score_threshold: float | None = None,
        num_classes: int = 10,
    ) -> None:
        self.post_center_range = tuple(float(v) for v in post_center_range)
        self.max_num = max_num
        self.score_threshold = score_threshold
        self.num_classes = num_classes

    def decode_single(self, cls_scores: Tensor, bbox_preds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``cls_scores [Q, num_classes]`` logits, ``bbox_preds [Q, 10]`` -> (boxes [N, 9], scores [N], labels [N])."""
        scores, indices = cls_scores.sigmoid().reshape(-1).topk(min(self.max_num, cls_scores.numel()))
        labels = indices % self.num_classes
        boxes = denormalize_bbox(bbox_preds[indices // self.num_classes])
        rng = boxes.new_tensor(self.post_center_range)
        mask = (boxes[:, :3] >= rng[:3]).all(1) & (boxes[:, :3] <= rng[3:]).all(1)
        if self.score_threshold:
            threshold = self.score_threshold
            keep = scores > threshold
            while not bool(keep.any()):
                threshold *= 0.9
                if threshold < 0.01:
                    keep = scores > -1
                    break
                keep = scores >= threshold
            mask &= keep
        boxes, scores, labels = boxes[mask], scores[mask], labels[mask]
        boxes = boxes.clone()
        boxes[:, 2] = boxes[:, 2] - boxes[:, 5] * 0.5
        return boxes, scores, labels.long()

    def decode(self, all_cls_scores: Tensor, all_bbox_preds: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Decode the last layer of ``[L, B, Q, *]`` outputs: one (boxes, scores, labels) per sample."""
        cls, box = all_cls_scores[-1].float(), all_bbox_preds[-1].float()
        return [self.decode_single(cls[b], box[b]) for b in range(cls.shape[0])]


def denormalize_bbox(normalized: Tensor) -> Tensor:
    """BEVFormer's box code to boxes (``denormalize_bbox`` of ``core/bbox/util.py``).

    ``[..., 10]`` (cx, cy, log w, log l, cz, log h, sin, cos, vx, vy) -> ``[..., 9]``
    (x, y, z, w, l, h, yaw, vx, vy); z stays the box centre's.
    """
    rot = torch.atan2(normalized[..., 6:7], normalized[..., 7:8])
    cx, cy, cz = normalized[..., 0:1], normalized[..., 1:2], normalized[..., 4:5]
    w, l, h = normalized[..., 2:3].exp(), normalized[..., 3:4].exp(), normalized[..., 5:6].exp()
    return torch.cat([cx, cy, cz, w, l, h, rot, normalized[..., 8:10]], -1)


class BEVFormerHead(nn.Module):
    """BEV queries, object queries, the transformer and the per-layer class/box branches.

    Args:
        transformer: The :class:`PerceptionTransformer`.
        bev_h, bev_w: BEV grid.
        num_query: Object queries (900).
        num_classes, code_size: Output widths (10, 10).
        num_reg_fcs: Hidden layers of each branch (2).
        pc_range: BEV volume, for the box centres.
        code_weights: Training-only loss weights, kept because they are in the checkpoint.
        bbox_coder: The NMS-free decoder.
    """

    def __init__(
        self,
        *,
        transformer: PerceptionTransformer,
        bev_h: int,
        bev_w: int,
        num_query: int,
        num_classes: int,
        code_size: int,
        num_reg_fcs: int,
        pc_range: Sequence[float],
        code_weights: Sequence[float],
        bbox_coder: NMSFreeCoder,
    ) -> None:
        super().__init__()
        C = transformer.embed_dims
        self.transformer = transformer
        self.bev_h, self.bev_w = bev_h, bev_w
        self.num_query = num_query
        self.num_classes = num_classes
        self.code_size = code_size
        self.embed_dims = C
        self.pc_range = tuple(float(v) for v in pc_range)
        self.bbox_coder = bbox_coder
        self.positional_encoding = LearnedPositionalEncoding(num_feats=C // 2, row_num_embed=bev_h, col_num_embed=bev_w)
        num_pred = transformer.decoder.num_layers
        self.cls_branches = nn.ModuleList([self._cls_branch(C, num_classes, num_reg_fcs) for _ in range(num_pred)])
        self.reg_branches = nn.ModuleList([self._reg_branch(C, code_size, num_reg_fcs) for _ in range(num_pred)])
        self.bev_embedding = nn.Embedding(bev_h * bev_w, C)
        self.query_embedding = nn.Embedding(num_query, C * 2)
        self.register_buffer("code_weights", torch.tensor(list(code_weights), dtype=torch.float32))

    @staticmethod
    def _cls_branch(C: int, num_classes: int, num_reg_fcs: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for _ in range(num_reg_fcs):
            layers += [nn.Linear(C, C), nn.LayerNorm(C), nn.ReLU(inplace=True)]
        return nn.Sequential(*layers, nn.Linear(C, num_classes))

    @staticmethod
    def _reg_branch(C: int, code_size: int, num_reg_fcs: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for _ in range(num_reg_fcs):
            layers += [nn.Linear(C, C), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(C, code_size))

    def init_weights(self) -> None:
        self.transformer.init_weights()
        nn.init.uniform_(self.positional_encoding.row_embed.weight)
        nn.init.uniform_(self.positional_encoding.col_embed.weight)
        bias = -math.log((1 - 0.01) / 0.01)  # mmcv bias_init_with_prob(0.01)
        for branch in self.cls_branches:
            nn.init.constant_(branch[-1].bias, bias)

    def forward_bev(
        self,
        mlvl_feats: Sequence[Tensor],
        lidar2img: Tensor,
        can_bus: Tensor,
        prev_bev: Tensor,
        use_prev_bev: Tensor,
    ) -> Tensor:
        """Image features (+ temporal inputs) -> ``bev_embed`` ``[B, bev_h * bev_w, C]``."""
        dtype = mlvl_feats[0].dtype
        return self.transformer.get_bev_features(
            mlvl_feats,
            self.bev_embedding.weight.to(dtype),
            self.positional_encoding().to(dtype),
            (self.bev_h, self.bev_w),
            lidar2img=lidar2img,
            can_bus=can_bus,
            prev_bev=prev_bev.to(dtype),
            use_prev_bev=use_prev_bev,
        )

    def forward_head(self, bev_embed: Tensor) -> tuple[Tensor, Tensor]:
        """``bev_embed`` -> ``(all_cls_scores, all_bbox_preds)``, each ``[num_dec_layers, B, num_query, 10]``."""
        return self.transformer.decode(
            bev_embed,
            self.query_embedding.weight.to(bev_embed.dtype),
            (self.bev_h, self.bev_w),
            self.reg_branches,
            self.cls_branches,
            self.pc_range,
        )


class BEVFormer(nn.Module):
    """The detector: ``img_backbone`` -> ``img_neck`` -> ``pts_bbox_head``, tensors in and out.

    Build with :meth:`from_config` (or the ``MODELS`` constructors); see the module docstring for the
    inputs, the temporal gate and the outputs.

    Example:
        >>> import dataclasses
        >>> cfg = dataclasses.replace(BEVFORMER_CONFIGS["bevformer-tiny"], image_size=(64, 96),
        ...                           bev_h=8, bev_w=8, num_query=20)
        >>> model = BEVFormer.from_config(cfg).eval()
        >>> out = model(torch.randn(1, 6, 3, 64, 96), torch.eye(4).expand(1, 6, 4, 4),
        ...             torch.zeros(1, 18), torch.zeros(1, 64, 256), torch.zeros(1))
        >>> tuple(out["all_bbox_preds"].shape)
        (6, 1, 20, 10)
    """

    def __init__(
        self,
        *,
        img_backbone: ResNet,
        img_neck: FPN,
        pts_bbox_head: BEVFormerHead,
        image_size: tuple[int, int],
        num_cams: int = 6,
        config: BEVFormerConfig | None = None,
    ) -> None:
        super().__init__()
        self.img_backbone = img_backbone
        self.img_neck = img_neck
        self.pts_bbox_head = pts_bbox_head
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.num_cams = num_cams
        self.config = config

    @classmethod
    def from_config(cls, cfg: BEVFormerConfig) -> BEVFormer:
        """Build the whole model from a :class:`BEVFormerConfig`, with the official initialisation."""
        C = cfg.embed_dims
        backbone = ResNet(
            depth=cfg.depth,
            out_indices=cfg.out_indices,
            style=cfg.style,
            stage_with_dcn=cfg.stage_with_dcn,
            frozen_stages=cfg.frozen_stages,
            norm_eval=cfg.norm_eval,
        )
        neck = FPN(
            in_channels=cfg.fpn_in_channels,
            out_channels=C,
            num_outs=cfg.num_levels,
            start_level=0,
            add_extra_convs="on_output",
            relu_before_extra_convs=cfg.relu_before_extra_convs,
        )
        encoder_layers = [
            BEVFormerLayer(
                tsa=TemporalSelfAttention(
                    embed_dims=C, num_heads=cfg.num_heads, num_levels=1, num_points=cfg.tsa_num_points
                ),
                sca=SpatialCrossAttention(
                    embed_dims=C,
                    num_heads=cfg.num_heads,
                    num_levels=cfg.num_levels,
                    num_points=cfg.sca_num_points,
                    num_cams=cfg.num_cams,
                ),
                embed_dims=C,
                ffn_dims=cfg.ffn_dims,
            )
            for _ in range(cfg.num_encoder_layers)
        ]
        decoder_layers = [
            DetrTransformerDecoderLayer(
                self_attn=MultiheadAttention(embed_dims=C, num_heads=cfg.num_heads),
                cross_attn=CustomMSDeformableAttention(
                    embed_dims=C, num_heads=cfg.num_heads, num_levels=1, num_points=cfg.decoder_num_points
                ),
                embed_dims=C,
                ffn_dims=cfg.ffn_dims,
            )
            for _ in range(cfg.num_decoder_layers)
        ]
        transformer = PerceptionTransformer(
            encoder=BEVFormerEncoder(
                layers=encoder_layers,
                pc_range=cfg.pc_range,
                num_points_in_pillar=cfg.num_points_in_pillar,
                image_size=cfg.image_size,
                shift_current_bev_ref=cfg.shift_current_bev_ref,
            ),
            decoder=DetectionTransformerDecoder(layers=decoder_layers),
            embed_dims=C,
            num_feature_levels=cfg.num_feature_levels,
            num_cams=cfg.num_cams,
            rotate_prev_bev=cfg.rotate_prev_bev,
            use_shift=cfg.use_shift,
            use_can_bus=cfg.use_can_bus,
            can_bus_norm=cfg.can_bus_norm,
            use_cams_embeds=cfg.use_cams_embeds,
            rotate_center=cfg.rotate_center,
        )
        head = BEVFormerHead(
            transformer=transformer,
            bev_h=cfg.bev_h,
            bev_w=cfg.bev_w,
            num_query=cfg.num_query,
            num_classes=cfg.num_classes,
            code_size=cfg.code_size,
            num_reg_fcs=cfg.num_reg_fcs,
            pc_range=cfg.pc_range,
            code_weights=cfg.code_weights,
            bbox_coder=NMSFreeCoder(
                post_center_range=cfg.post_center_range,
                max_num=cfg.max_num,
                score_threshold=cfg.score_threshold,
                num_classes=cfg.num_classes,
            ),
        )
        head.init_weights()
        return cls(
            img_backbone=backbone,
            img_neck=neck,
            pts_bbox_head=head,
            image_size=cfg.image_size,
            num_cams=cfg.num_cams,
            config=cfg,
        )

    @property
    def bev_shape(self) -> tuple[int, int]:
        """(bev_h * bev_w, C): the per-sample shape of ``prev_bev`` / ``bev_embed`` (with C last)."""
        head = self.pts_bbox_head
        return head.bev_h * head.bev_w, head.embed_dims

    def _check_inputs(
        self, image: Tensor, lidar2img: Tensor, can_bus: Tensor, prev_bev: Tensor, use_prev_bev: Tensor
    ) -> None:
        H, W = self.image_size
        N = self.num_cams
        if image.dim() != 5 or tuple(image.shape[1:]) != (N, 3, H, W):
            raise ValueError(f"image must have shape [B, {N}, 3, {H}, {W}] (padded input), got {list(image.shape)}")
        B = image.shape[0]
        expected = {
            "lidar2img": (lidar2img, (B, N, 4, 4)),
            "can_bus": (can_bus, (B, 18)),
            "prev_bev": (prev_bev, (B, *self.bev_shape)),
            "use_prev_bev": (use_prev_bev, (B,)),
        }
        for name, (t, shape) in expected.items():
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")

    def extract_img_feat(self, image: Tensor) -> list[Tensor]:
        """``image [B, N, 3, H, W]`` -> FPN levels, each ``[B, N, C, h_l, w_l]``."""
        B, N = image.shape[:2]
        feats = self.img_neck(self.img_backbone(image.flatten(0, 1)))
        return [f.view(B, N, *f.shape[1:]) for f in feats]

    def forward_bev(
        self, img_feats: Sequence[Tensor], lidar2img: Tensor, can_bus: Tensor, prev_bev: Tensor, use_prev_bev: Tensor
    ) -> Tensor:
        """See :meth:`BEVFormerHead.forward_bev`."""
        return self.pts_bbox_head.forward_bev(img_feats, lidar2img, can_bus, prev_bev, use_prev_bev)

    def forward_head(self, bev_embed: Tensor) -> tuple[Tensor, Tensor]:
        """See :meth:`BEVFormerHead.forward_head`."""
        return self.pts_bbox_head.forward_head(bev_embed)

    def forward(
        self, image: Tensor, lidar2img: Tensor, can_bus: Tensor, prev_bev: Tensor, use_prev_bev: Tensor
    ) -> dict[str, Tensor]:
        """One frame of B independent streams.

        Args:
            image (Tensor[B, 6, 3, H, W]): normalised, padded camera images.
            lidar2img (Tensor[B, 6, 4, 4]): LiDAR -> image pixels of the resized image.
            can_bus (Tensor[B, 18]): with ``[0:3]`` and ``[-1]`` as deltas vs the previous frame.
            prev_bev (Tensor[B, bev_h*bev_w, C]): the previous frame's ``bev_embed``.
            use_prev_bev (Tensor[B]): 1.0 to use ``prev_bev``, 0.0 at a scene start.

        Returns:
            dict: ``bev_embed`` [B, bev_h*bev_w, C], ``all_cls_scores`` and ``all_bbox_preds``
            [num_dec_layers, B, num_query, 10].
        """
        self._check_inputs(image, lidar2img, can_bus, prev_bev, use_prev_bev)
        img_feats = self.extract_img_feat(image)
        bev_embed = self.forward_bev(img_feats, lidar2img, can_bus, prev_bev, use_prev_bev)
        all_cls_scores, all_bbox_preds = self.forward_head(bev_embed)
        return {"bev_embed": bev_embed, "all_cls_scores": all_cls_scores, "all_bbox_preds": all_bbox_preds}

    def decode(self, outputs: dict[str, Tensor]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Boxes of the last decoder layer, per sample: ``(boxes [N, 9], scores [N], labels [N] int64)``.

        ``boxes`` are (x, y, z of the bottom centre, w, l, h, yaw, vx, vy) in the LiDAR frame,
        exactly BEVFormer's ``get_bboxes`` output (mmdet3d 0.17 ``LiDARInstance3DBoxes``).
        """
        return self.pts_bbox_head.bbox_coder.decode(outputs["all_cls_scores"], outputs["all_bbox_preds"])


# --------------------------------------------------------------------------------------------
# Named constructors
# --------------------------------------------------------------------------------------------


def _build(name: str, overrides: dict) -> BEVFormer:
    cfg = dataclasses.replace(BEVFORMER_CONFIGS[name], **overrides) if overrides else BEVFORMER_CONFIGS[name]
    return BEVFormer.from_config(cfg)


def bevformer_tiny(**overrides) -> BEVFormer:
    """BEVFormer-tiny: R50, one FPN level, 480x800 input, BEV 50x50, 3 encoder layers.

    Keyword arguments override :class:`BEVFormerConfig` fields (e.g. a smaller ``image_size``).
    """
    return _build("bevformer-tiny", overrides)


def bevformer_small(**overrides) -> BEVFormer:
    """BEVFormer-small: R101-DCN (caffe), one FPN level, 736x1280 input, BEV 150x150, 3 encoder layers."""
    return _build("bevformer-small", overrides)


def bevformer_base(**overrides) -> BEVFormer:
    """BEVFormer-base: R101-DCN (caffe), 4 FPN levels, 928x1600 input, BEV 200x200, 6 encoder layers."""
    return _build("bevformer-base", overrides)
