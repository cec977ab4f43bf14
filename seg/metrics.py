"""Segmentation metrics from a dataset-level confusion matrix (mmsegmentation §6 / Cityscapes IoU).

The matrix is accumulated on the device with torch.bincount and all-reduced across ranks; no prediction
maps are kept. Rows are ground truth, columns are predictions.
"""
import math

import torch


def confusion_matrix(pred, label, num_classes, ignore_index=255):
    """num_classes×num_classes int64 counts of (label, pred) pairs over pixels whose label is valid.

    pred, label: integer tensors of the same shape, on the same device. Labels outside
    [0, num_classes) other than ignore_index are a caller bug and are rejected by the data loader.
    """
    valid = label != ignore_index
    index = label[valid].long() * num_classes + pred[valid].long()
    counts = torch.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def metrics_from_confusion(matrix):
    """aAcc, mIoU, mAcc and per-class IoU / Acc as fractions, NaN-aware as np.nanmean.

    Acc_c is NaN when class c never occurs in the ground truth; IoU_c is NaN when it occurs in neither
    prediction nor ground truth. Means skip NaN classes.
    """
    matrix = matrix.double().cpu()
    intersection = matrix.diag()
    label_area = matrix.sum(dim=1)
    union = label_area + matrix.sum(dim=0) - intersection
    iou = intersection / union  # 0/0 -> NaN, as in mmsegmentation
    acc = intersection / label_area
    return {
        "aAcc": (intersection.sum() / label_area.sum()).item(),
        "mIoU": _nanmean(iou.tolist()),
        "mAcc": _nanmean(acc.tolist()),
        "IoU": iou.tolist(),
        "Acc": acc.tolist(),
    }


def _nanmean(values):
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def format_table(metrics, class_names):
    """The per-class IoU/Acc table and the summary line, in percent with 2 decimals."""
    width = max(len(name) for name in class_names)
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    for name, iou, acc in zip(class_names, metrics["IoU"], metrics["Acc"]):
        lines.append(f"{name:<{width}}  {_percent(iou):>6}  {_percent(acc):>6}")
    lines.append(
        f"aAcc {_percent(metrics['aAcc'])}  mIoU {_percent(metrics['mIoU'])}  mAcc {_percent(metrics['mAcc'])}"
    )
    return "\n".join(lines)


def _percent(value):
    return "nan" if math.isnan(value) else f"{100 * value:.2f}"
