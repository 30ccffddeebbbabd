"""Test oracle: the official BEVFormer head's math, re-written step by step from the official code.

A functional transcription of fundamentalvision/BEVFormer (``PerceptionTransformer.get_bev_features``
/ ``forward``, ``BEVFormerEncoder`` with ``point_sampling``, ``TemporalSelfAttention``,
``SpatialCrossAttention`` with its per-camera ``nonzero`` gather, ``MSDeformableAttention3D``,
``DetectionTransformerDecoder``, ``CustomMSDeformableAttention``, ``BEVFormerHead.forward``) and of
``BEVFormer.forward_test``'s CAN-bus rule, in the official layouts (sequence-first queries, batch 1),
reading weights by their official state-dict names. It shares no code with ``bevdeploy.models``:
sampling uses mmcv's classic MSDA math (:func:`bevdeploy.ops.msda.reference`), the decoder's
self-attention ``F.multi_head_attention_forward``, the previous-BEV rotation a transcription of
torchvision's tensor ``rotate`` (nearest), and the ego shift numpy float64 as the official.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bevdeploy.ops.msda import reference as msda_classic


def _lin(sd: dict, name: str, x: Tensor) -> Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def _ln(sd: dict, name: str, x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"])


def torchvision_rotate_nearest(img: Tensor, angle: float, center: tuple[float, float]) -> Tensor:
    """torchvision ``F.rotate(img [C, H, W], angle, center=center)`` (NEAREST, no expand, zero fill)."""
    _, h, w = img.shape
    cx, cy = [1.0 * (c - s * 0.5) for c, s in zip(center, [w, h])]
    rot = math.radians(-angle)
    a, b, c, d = math.cos(rot), -math.sin(rot), math.sin(rot), math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += m[0] * (-cx) + m[1] * (-cy)
    m[5] += m[3] * (-cx) + m[4] * (-cy)
    m[2] += cx
    m[5] += cy
    theta = torch.tensor(m, dtype=img.dtype).reshape(1, 2, 3)
    base = torch.empty(1, h, w, 3, dtype=img.dtype)
    base[..., 0].copy_(torch.linspace(-w * 0.5 + 0.5, w * 0.5 + 0.5 - 1, steps=w))
    base[..., 1].copy_(torch.linspace(-h * 0.5 + 0.5, h * 0.5 + 0.5 - 1, steps=h).unsqueeze_(-1))
    base[..., 2].fill_(1)
    rescaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], dtype=img.dtype)
    grid = base.view(1, h * w, 3).bmm(rescaled).view(1, h, w, 2)
    return F.grid_sample(img[None], grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]


def _tsa(sd, p, query, value, identity, query_pos, reference_points, spatial_shapes, heads=8, levels=1, points=4):
    # query [bs, nq, C] (batch_first=True), value None or [bs*2, nv, C]
    if value is None:
        bs, len_bev, c = query.shape
        value = torch.stack([query, query], 1).reshape(bs * 2, len_bev, c)
    if identity is None:
        identity = query
    query = query + query_pos
    bs, num_query, embed_dims = query.shape
    _, num_value, _ = value.shape
    query = torch.cat([value[:bs], query], -1)
    value = _lin(sd, f"{p}.value_proj", value).reshape(bs * 2, num_value, heads, -1)
    off = _lin(sd, f"{p}.sampling_offsets", query).view(bs, num_query, heads, 2, levels, points, 2)
    aw = _lin(sd, f"{p}.attention_weights", query).view(bs, num_query, heads, 2, levels * points).softmax(-1)
    aw = aw.view(bs, num_query, heads, 2, levels, points).permute(0, 3, 1, 2, 4, 5)
    aw = aw.reshape(bs * 2, num_query, heads, levels, points)
    off = off.permute(0, 3, 1, 2, 4, 5, 6).reshape(bs * 2, num_query, heads, levels, points, 2)
    normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
    loc = reference_points[:, :, None, :, None, :] + off / normalizer[None, None, None, :, None, :]
    out = msda_classic(value, [tuple(s) for s in spatial_shapes.tolist()], loc, aw)
    out = out.permute(1, 2, 0).view(num_query, embed_dims, bs, 2).mean(-1).permute(2, 0, 1)
    return _lin(sd, f"{p}.output_proj", out) + identity


def _msda3d(sd, p, query, value, reference_points, spatial_shapes, heads=8, points=8):
    levels = spatial_shapes.shape[0]
    bs, num_query, _ = query.shape
    _, num_value, _ = value.shape
    value = _lin(sd, f"{p}.value_proj", value).view(bs, num_value, heads, -1)
    off = _lin(sd, f"{p}.sampling_offsets", query).view(bs, num_query, heads, levels, points, 2)
    aw = _lin(sd, f"{p}.attention_weights", query).view(bs, num_query, heads, levels * points).softmax(-1)
    aw = aw.view(bs, num_query, heads, levels, points)
    normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
    _, _, num_z, _ = reference_points.shape
    ref = reference_points[:, :, None, None, None, :, :]
    off = off / normalizer[None, None, None, :, None, :]
    off = off.view(bs, num_query, heads, levels, points // num_z, num_z, 2)
    loc = (ref + off).view(bs, num_query, heads, levels, points, 2)
    return msda_classic(value, [tuple(s) for s in spatial_shapes.tolist()], loc, aw)


def _sca(sd, p, query, key, reference_points_cam, bev_mask, spatial_shapes, num_cams=6, embed=256):
    inp_residual = query
    slots = torch.zeros_like(query)
    bs, num_query, _ = query.shape
    D = reference_points_cam.size(3)
    indexes = [m[0].sum(-1).nonzero().squeeze(-1) for m in bev_mask]
    max_len = max(len(i) for i in indexes)
    queries_rebatch = query.new_zeros([bs, num_cams, max_len, embed])
    ref_rebatch = reference_points_cam.new_zeros([bs, num_cams, max_len, D, 2])
    for j in range(bs):
        for i, ref_per_img in enumerate(reference_points_cam):
            idx = indexes[i]
            queries_rebatch[j, i, : len(idx)] = query[j, idx]
            ref_rebatch[j, i, : len(idx)] = ref_per_img[j, idx]
    num_cams_, l, bs, embed_dims = key.shape
    key = key.permute(2, 0, 1, 3).reshape(bs * num_cams, l, embed)
    queries = _msda3d(
        sd,
        f"{p}.deformable_attention",
        queries_rebatch.view(bs * num_cams, max_len, embed),
        key,
        ref_rebatch.view(bs * num_cams, max_len, D, 2),
        spatial_shapes,
    ).view(bs, num_cams, max_len, embed)
    for j in range(bs):
        for i, idx in enumerate(indexes):
            slots[j, idx] += queries[j, i, : len(idx)]
    count = (bev_mask.sum(-1) > 0).permute(1, 2, 0).sum(-1).clamp(min=1.0)
    slots = slots / count[..., None]
    return _lin(sd, f"{p}.output_proj", slots) + inp_residual


def _ffn(sd, p, x):
    return x + _lin(sd, f"{p}.layers.1", F.relu(_lin(sd, f"{p}.layers.0.0", x)))


def _point_sampling(ref_3d, pc_range, lidar2img, img_shape):
    reference_points = ref_3d.clone()
    reference_points[..., 0:1] = reference_points[..., 0:1] * (pc_range[3] - pc_range[0]) + pc_range[0]
    reference_points[..., 1:2] = reference_points[..., 1:2] * (pc_range[4] - pc_range[1]) + pc_range[1]
    reference_points[..., 2:3] = reference_points[..., 2:3] * (pc_range[5] - pc_range[2]) + pc_range[2]
    reference_points = torch.cat((reference_points, torch.ones_like(reference_points[..., :1])), -1)
    reference_points = reference_points.permute(1, 0, 2, 3)
    D, B, num_query = reference_points.size()[:3]
    num_cam = lidar2img.size(1)
    reference_points = reference_points.view(D, B, 1, num_query, 4).repeat(1, 1, num_cam, 1, 1).unsqueeze(-1)
    lidar2img = lidar2img.view(1, B, num_cam, 1, 4, 4).repeat(D, 1, 1, num_query, 1, 1)
    cam = torch.matmul(lidar2img.float(), reference_points.float()).squeeze(-1)
    eps = 1e-5
    bev_mask = cam[..., 2:3] > eps
    cam = cam[..., 0:2] / torch.maximum(cam[..., 2:3], torch.ones_like(cam[..., 2:3]) * eps)
    cam[..., 0] /= img_shape[1]
    cam[..., 1] /= img_shape[0]
    bev_mask = bev_mask & (cam[..., 1:2] > 0.0) & (cam[..., 1:2] < 1.0) & (cam[..., 0:1] < 1.0) & (cam[..., 0:1] > 0.0)
    return cam.permute(2, 1, 3, 0, 4), bev_mask.permute(2, 1, 3, 0, 4).squeeze(-1)


def official_head(
    sd: dict,
    mlvl_feats: list[Tensor],  # each [1, N, C, h, w]
    lidar2img: Tensor,  # [1, N, 4, 4]
    can_bus: np.ndarray,  # [18] float64, deltas in [0:3] and [-1]
    prev_bev: Tensor | None,  # [HW, 1, C] (official layout) or None at a scene start
    *,
    bev_h: int,
    bev_w: int,
    num_enc: int,
    num_dec: int = 6,
    img_shape: tuple[int, int],
    pc_range=(-51.2, -51.2, -5.0, 51.2, 51.2, 3.0),
    shift_current_bev_ref: bool = True,
    rotate_center=(100, 100),
) -> dict[str, Tensor]:
    """One batch-1 frame of the official head; returns bev_embed [HW, 1, C] and the per-layer outputs."""
    h = "pts_bbox_head"
    t = f"{h}.transformer"
    can_bus = np.array(can_bus, dtype=np.float64)
    if prev_bev is None:  # BEVFormer.forward_test at a scene start
        can_bus[-1] = 0
        can_bus[:3] = 0
    bs = 1
    C = 256
    real_w, real_h = pc_range[3] - pc_range[0], pc_range[4] - pc_range[1]
    grid_length = (real_h / bev_h, real_w / bev_w)
    bev_queries = sd[f"{h}.bev_embedding.weight"].unsqueeze(1).repeat(1, bs, 1)
    x_embed = sd[f"{h}.positional_encoding.col_embed.weight"]
    y_embed = sd[f"{h}.positional_encoding.row_embed.weight"]
    pos = torch.cat((x_embed.unsqueeze(0).repeat(bev_h, 1, 1), y_embed.unsqueeze(1).repeat(1, bev_w, 1)), dim=-1)
    bev_pos = pos.permute(2, 0, 1).unsqueeze(0).flatten(2).permute(2, 0, 1)  # [HW, bs, C]

    delta_x, delta_y = np.array([can_bus[0]]), np.array([can_bus[1]])
    ego_angle = np.array([can_bus[-2] / np.pi * 180])
    translation_length = np.sqrt(delta_x**2 + delta_y**2)
    translation_angle = np.arctan2(delta_y, delta_x) / np.pi * 180
    bev_angle = ego_angle - translation_angle
    shift_y = translation_length * np.cos(bev_angle / 180 * np.pi) / grid_length[0] / bev_h
    shift_x = translation_length * np.sin(bev_angle / 180 * np.pi) / grid_length[1] / bev_w
    shift = bev_queries.new_tensor(np.array([shift_x, shift_y])).permute(1, 0)

    if prev_bev is not None:
        prev_bev = prev_bev.clone()
        tmp = prev_bev[:, 0].reshape(bev_h, bev_w, -1).permute(2, 0, 1)
        tmp = torchvision_rotate_nearest(tmp, float(can_bus[-1]), rotate_center)
        prev_bev[:, 0] = tmp.permute(1, 2, 0).reshape(bev_h * bev_w, 1, -1)[:, 0]

    cb = bev_queries.new_tensor(can_bus[None])
    cb = F.relu(_lin(sd, f"{t}.can_bus_mlp.0", cb))
    cb = _ln(sd, f"{t}.can_bus_mlp.norm", F.relu(_lin(sd, f"{t}.can_bus_mlp.2", cb)))
    bev_queries = bev_queries + cb[None]

    feat_flatten, spatial_shapes = [], []
    for lvl, feat in enumerate(mlvl_feats):
        _, num_cam, c, fh, fw = feat.shape
        feat = feat.flatten(3).permute(1, 0, 3, 2)
        feat = feat + sd[f"{t}.cams_embeds"][:, None, None, :]
        feat = feat + sd[f"{t}.level_embeds"][None, None, lvl : lvl + 1, :]
        spatial_shapes.append((fh, fw))
        feat_flatten.append(feat)
    feat_flatten = torch.cat(feat_flatten, 2).permute(0, 2, 1, 3)  # (num_cam, HW, bs, C)
    spatial_shapes = torch.as_tensor(spatial_shapes, dtype=torch.long)

    # ---- encoder ----
    Z = pc_range[5] - pc_range[2]
    D = 4
    zs = torch.linspace(0.5, Z - 0.5, D).view(-1, 1, 1).expand(D, bev_h, bev_w) / Z
    xs = torch.linspace(0.5, bev_w - 0.5, bev_w).view(1, 1, bev_w).expand(D, bev_h, bev_w) / bev_w
    ys = torch.linspace(0.5, bev_h - 0.5, bev_h).view(1, bev_h, 1).expand(D, bev_h, bev_w) / bev_h
    ref_3d = torch.stack((xs, ys, zs), -1).permute(0, 3, 1, 2).flatten(2).permute(0, 2, 1)[None].repeat(bs, 1, 1, 1)
    ref_y, ref_x = torch.meshgrid(
        torch.linspace(0.5, bev_h - 0.5, bev_h), torch.linspace(0.5, bev_w - 0.5, bev_w), indexing="ij"
    )
    ref_2d = torch.stack((ref_x.reshape(-1)[None] / bev_w, ref_y.reshape(-1)[None] / bev_h), -1)
    ref_2d = ref_2d.repeat(bs, 1, 1).unsqueeze(2)
    reference_points_cam, bev_mask = _point_sampling(ref_3d, pc_range, lidar2img, img_shape)
    if shift_current_bev_ref:  # v1: ``shift_ref_2d = ref_2d`` then ``+=`` in place
        ref_2d = ref_2d + shift[:, None, None, :]
        shift_ref_2d = ref_2d
    else:
        shift_ref_2d = ref_2d.clone() + shift[:, None, None, :]
    bev_query = bev_queries.permute(1, 0, 2)
    bev_pos_b = bev_pos.permute(1, 0, 2)
    _, len_bev, num_bev_level, _ = ref_2d.shape
    if prev_bev is not None:
        prev = torch.stack([prev_bev.permute(1, 0, 2), bev_query], 1).reshape(bs * 2, len_bev, -1)
        hybird_ref_2d = torch.stack([shift_ref_2d, ref_2d], 1).reshape(bs * 2, len_bev, num_bev_level, 2)
    else:
        prev = None
        hybird_ref_2d = torch.stack([ref_2d, ref_2d], 1).reshape(bs * 2, len_bev, num_bev_level, 2)
    bev_shape = torch.tensor([[bev_h, bev_w]])
    query = bev_query
    for i in range(num_enc):
        p = f"{t}.encoder.layers.{i}"
        query = _tsa(sd, f"{p}.attentions.0", query, prev, None, bev_pos_b, hybird_ref_2d, bev_shape)
        query = _ln(sd, f"{p}.norms.0", query)
        query = _sca(sd, f"{p}.attentions.1", query, feat_flatten, reference_points_cam, bev_mask, spatial_shapes)
        query = _ln(sd, f"{p}.norms.1", query)
        query = _ln(sd, f"{p}.norms.2", _ffn(sd, f"{p}.ffns.0", query))
    bev_embed = query  # [bs, HW, C]

    # ---- decoder (sequence-first, as mmcv's BaseTransformerLayer with batch_first=False) ----
    query_pos, q = torch.split(sd[f"{h}.query_embedding.weight"], C, dim=1)
    query_pos, q = query_pos.unsqueeze(0), q.unsqueeze(0)
    reference_points = _lin(sd, f"{t}.reference_points", query_pos).sigmoid()
    init_reference = reference_points
    q, query_pos = q.permute(1, 0, 2), query_pos.permute(1, 0, 2)
    value = bev_embed.permute(1, 0, 2)  # [HW, bs, C]
    inter_states, inter_refs = [], []
    for lid in range(num_dec):
        p = f"{t}.decoder.layers.{lid}"
        ref_in = reference_points[..., :2].unsqueeze(2)
        qk = q + query_pos
        attn = F.multi_head_attention_forward(
            qk, qk, q, C, 8,
            sd[f"{p}.attentions.0.attn.in_proj_weight"], sd[f"{p}.attentions.0.attn.in_proj_bias"],
            None, None, False, 0.0,
            sd[f"{p}.attentions.0.attn.out_proj.weight"], sd[f"{p}.attentions.0.attn.out_proj.bias"],
            training=False, need_weights=False,
        )[0]
        q = _ln(sd, f"{p}.norms.0", q + attn)
        # CustomMSDeformableAttention (batch_first=False)
        cq = (q + query_pos).permute(1, 0, 2)
        v = _lin(sd, f"{p}.attentions.1.value_proj", value.permute(1, 0, 2)).view(bs, -1, 8, 32)
        off = _lin(sd, f"{p}.attentions.1.sampling_offsets", cq).view(bs, -1, 8, 1, 4, 2)
        aw = _lin(sd, f"{p}.attentions.1.attention_weights", cq).view(bs, -1, 8, 4).softmax(-1).view(bs, -1, 8, 1, 4)
        normalizer = torch.tensor([[bev_w, bev_h]], dtype=off.dtype)
        loc = ref_in[:, :, None, :, None, :] + off / normalizer[None, None, None, :, None, :]
        out = _lin(sd, f"{p}.attentions.1.output_proj", msda_classic(v, [(bev_h, bev_w)], loc, aw))
        q = _ln(sd, f"{p}.norms.1", q + out.permute(1, 0, 2))
        q = _ln(sd, f"{p}.norms.2", _ffn(sd, f"{p}.ffns.0", q))
        output = q.permute(1, 0, 2)
        tmp = _reg(sd, lid, output)
        new_ref = torch.zeros_like(reference_points)
        new_ref[..., :2] = tmp[..., :2] + _inverse_sigmoid(reference_points[..., :2])
        new_ref[..., 2:3] = tmp[..., 4:5] + _inverse_sigmoid(reference_points[..., 2:3])
        reference_points = new_ref.sigmoid().detach()
        inter_states.append(q)
        inter_refs.append(reference_points)

    # ---- head ----
    hs = torch.stack(inter_states).permute(0, 2, 1, 3)
    classes, coords = [], []
    for lvl in range(hs.shape[0]):
        reference = _inverse_sigmoid(init_reference if lvl == 0 else inter_refs[lvl - 1])
        classes.append(_cls(sd, lvl, hs[lvl]))
        tmp = _reg(sd, lvl, hs[lvl])
        tmp[..., 0:2] += reference[..., 0:2]
        tmp[..., 0:2] = tmp[..., 0:2].sigmoid()
        tmp[..., 4:5] += reference[..., 2:3]
        tmp[..., 4:5] = tmp[..., 4:5].sigmoid()
        tmp[..., 0:1] = tmp[..., 0:1] * (pc_range[3] - pc_range[0]) + pc_range[0]
        tmp[..., 1:2] = tmp[..., 1:2] * (pc_range[4] - pc_range[1]) + pc_range[1]
        tmp[..., 4:5] = tmp[..., 4:5] * (pc_range[5] - pc_range[2]) + pc_range[2]
        coords.append(tmp)
    return {
        "bev_embed": bev_embed.permute(1, 0, 2),
        "all_cls_scores": torch.stack(classes),
        "all_bbox_preds": torch.stack(coords),
        "bev_mask": bev_mask,
    }


def _inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _cls(sd, i, x):
    p = f"pts_bbox_head.cls_branches.{i}"
    x = F.relu(_ln(sd, f"{p}.1", _lin(sd, f"{p}.0", x)))
    x = F.relu(_ln(sd, f"{p}.4", _lin(sd, f"{p}.3", x)))
    return _lin(sd, f"{p}.6", x)


def _reg(sd, i, x):
    p = f"pts_bbox_head.reg_branches.{i}"
    x = F.relu(_lin(sd, f"{p}.0", x))
    x = F.relu(_lin(sd, f"{p}.2", x))
    return _lin(sd, f"{p}.4", x)
