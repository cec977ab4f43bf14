"""Losses shared by the trainers: a loss takes (model outputs, int64 N×H×W labels with 255 = ignored or padded) and
returns a dict of "loss*" terms whose sum is minimised.

PSPNet: mmsegmentation 0.10 `mmseg/models/decode_heads/decode_head.py` (logits resized to the label, cross-entropy
averaged over every pixel) plus 0.4 × the auxiliary FCN head's. PointRend: detectron2
`projects/PointRend/point_rend/semantic_seg.py` (coarse loss over valid pixels, point loss over valid points).
"""
import functools

import torch.nn.functional as F

from seg.files import IGNORE_INDEX
from seg.pointrend import sample_labels_nearest


def pixel_cross_entropy(logits, label, average="all", ignore_index=IGNORE_INDEX):
    """fp32 cross-entropy of N×C×H×W logits against N×H×W labels, summed over valid pixels and divided by N·H·W
    (average="all", mmsegmentation 0.10) or by the valid pixels (average="valid", detectron2; 0 if none)."""
    per_pixel = F.cross_entropy(logits.float(), label, reduction="none", ignore_index=ignore_index)
    if average == "all":
        return per_pixel.mean()
    if average == "valid":  # clamp keeps an all-ignored batch at 0/1 = 0 instead of 0/0 = NaN
        return per_pixel.sum() / (label != ignore_index).sum().clamp(min=1)
    raise ValueError(f"loss average must be 'all' or 'valid', got {average!r}")


def resize_logits(logits, size_hw):
    """Bilinear (align_corners=False) resize of N×C×h×w logits to size_hw, in fp32."""
    return F.interpolate(logits.float(), size=tuple(size_hw), mode="bilinear", align_corners=False)


def pspnet_losses(outputs, label, average="all", aux_weight=0.4):
    """mmsegmentation's decode + 0.4·auxiliary loss: logits are resized to the label size first."""
    size = label.shape[-2:]
    losses = {"loss_seg": pixel_cross_entropy(resize_logits(outputs["seg"], size), label, average)}
    if "aux" in outputs:
        losses["loss_aux"] = aux_weight * pixel_cross_entropy(resize_logits(outputs["aux"], size), label, average)
    return losses


def pointrend_losses(outputs, label):
    """detectron2's coarse loss plus the point loss. The stride-4 coarse logits are upsampled to the padded
    input size (= label size) and averaged over valid pixels. Point labels are nearest-sampled from the padded
    labels at the points the model used; the point loss averages over valid points and is 0 when all are
    ignored (detectron2 issue #1455 went NaN there)."""
    coarse = resize_logits(outputs["coarse"], label.shape[-2:])
    point_labels = sample_labels_nearest(label, outputs["point_coords"])
    return {"loss_sem_seg": pixel_cross_entropy(coarse, label, "valid"),
            "loss_sem_seg_point": pixel_cross_entropy(outputs["point_logits"], point_labels, "valid")}


def loss_function(model_name, loss_table):
    """outputs, label -> dict of losses for model `model_name`; loss_table is the config's [loss] (PSPNet's)."""
    if model_name == "pspnet":
        return functools.partial(pspnet_losses, **loss_table)
    return pointrend_losses
