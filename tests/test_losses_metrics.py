"""Losses against a straightforward per-pixel reference; metrics against brute-force numpy counting."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from seg import losses, metrics


def reference_cross_entropy(logits, label, average):
    """Per-pixel -log softmax at valid pixels, summed, divided by N·H·W or by the valid count."""
    n, c, h, w = logits.shape
    total, valid = 0.0, 0
    log_probs = torch.log_softmax(logits.double(), dim=1)
    for i in range(n):
        for y in range(h):
            for x in range(w):
                target = int(label[i, y, x])
                if target != 255:
                    total -= float(log_probs[i, target, y, x])
                    valid += 1
    if average == "all":
        return total / (n * h * w)
    return total / valid if valid else 0.0


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(1, 3), c=st.integers(2, 5), h=st.integers(1, 6), w=st.integers(1, 6),
       ignore_share=st.sampled_from([0.0, 0.3, 1.0]), average=st.sampled_from(["all", "valid"]),
       seed=st.integers(0, 10_000))
def test_pixel_cross_entropy_matches_reference(n, c, h, w, ignore_share, average, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=generator) * 3
    label = torch.randint(0, c, (n, h, w), generator=generator)
    label[torch.rand(n, h, w, generator=generator) < ignore_share] = 255
    got = losses.pixel_cross_entropy(logits, label, average)
    assert not torch.isnan(got)
    assert math.isclose(float(got), reference_cross_entropy(logits, label, average), rel_tol=1e-5, abs_tol=1e-6)


def test_pspnet_losses_resize_logits_to_label_and_weight_aux():
    generator = torch.Generator().manual_seed(0)
    seg, aux = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 4, 3, 3, generator=generator)
    label = torch.randint(0, 4, (2, 12, 12), generator=generator)
    label[:, :2] = 255
    got = losses.pspnet_losses({"seg": seg, "aux": aux}, label, "all", 0.4)
    up = lambda x: torch.nn.functional.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False)
    expected_seg = reference_cross_entropy(up(seg), label, "all")
    expected_aux = 0.4 * reference_cross_entropy(up(aux), label, "all")
    assert math.isclose(float(got["loss_seg"]), expected_seg, rel_tol=1e-5)
    assert math.isclose(float(got["loss_aux"]), expected_aux, rel_tol=1e-5)


def brute_force_metrics(pred, label, num_classes):
    intersect, pred_area, label_area = np.zeros(num_classes), np.zeros(num_classes), np.zeros(num_classes)
    for p, t in zip(pred.ravel(), label.ravel()):
        if t == 255:
            continue
        label_area[t] += 1
        pred_area[p] += 1
        intersect[t] += p == t
    union = pred_area + label_area - intersect
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = intersect / union, intersect / label_area
    return intersect.sum() / label_area.sum(), np.nanmean(iou), np.nanmean(acc), iou, acc


@settings(max_examples=25, deadline=None, derandomize=True)
@given(num_classes=st.integers(2, 6), size=st.integers(5, 60), seed=st.integers(0, 10_000))
def test_metrics_equal_brute_force(num_classes, size, seed):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, num_classes, size)
    label[rng.random(size) < 0.2] = 255
    label[0] = 0  # at least one valid pixel
    pred = rng.integers(0, num_classes, size)
    matrix = metrics.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label), num_classes)
    got = metrics.metrics_from_confusion(matrix)
    a_acc, m_iou, m_acc, iou, acc = brute_force_metrics(pred, label, num_classes)
    assert math.isclose(got["aAcc"], a_acc, rel_tol=1e-12)
    assert math.isclose(got["mIoU"], m_iou, rel_tol=1e-12)
    assert math.isclose(got["mAcc"], m_acc, rel_tol=1e-12)
    np.testing.assert_allclose(got["IoU"], iou, rtol=1e-12)  # NaN where brute force has NaN
    np.testing.assert_allclose(got["Acc"], acc, rtol=1e-12)


def brute_force_confusion(pred, label, num_classes):
    """Count (label, pred) pairs one pixel at a time, skipping label 255."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    for guess, truth in zip(pred.ravel().tolist(), label.ravel().tolist()):
        if truth != 255:
            matrix[truth, guess] += 1
    return matrix


@settings(max_examples=80, deadline=None, derandomize=True)
@given(num_classes=st.integers(1, 25), shape=st.lists(st.integers(1, 7), min_size=1, max_size=4),
       ignore_share=st.sampled_from([0.0, 0.25, 1.0]), label_dtype=st.sampled_from([torch.uint8, torch.int32, torch.int64]),
       pred_dtype=st.sampled_from([torch.uint8, torch.int64]), transposed=st.booleans(), seed=st.integers(0, 10_000))
def test_confusion_matrix_equals_brute_force_count(num_classes, shape, ignore_share, label_dtype, pred_dtype,
                                                   transposed, seed):
    """Any shape and integer dtype, 1 to 25 classes, none / some / all pixels ignored, strided inputs."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, num_classes, shape)
    label[rng.random(shape) < ignore_share] = 255
    pred = rng.integers(0, num_classes, shape)
    pred_tensor, label_tensor = torch.from_numpy(pred).to(pred_dtype), torch.from_numpy(label).to(label_dtype)
    if transposed:  # non-contiguous views, as a slice of a batch would be
        pred_tensor, label_tensor = pred_tensor.transpose(0, -1), label_tensor.transpose(0, -1)
        pred, label = pred.swapaxes(0, -1), label.swapaxes(0, -1)
    got = metrics.confusion_matrix(pred_tensor, label_tensor, num_classes)
    assert got.dtype == torch.int64 and got.shape == (num_classes, num_classes)
    np.testing.assert_array_equal(got.numpy(), brute_force_confusion(pred, label, num_classes))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int64])
def test_confusion_matrix_on_cuda_equals_cpu_without_a_host_sync(label_dtype):
    generator = torch.Generator().manual_seed(0)
    label = torch.randint(0, 21, (2, 97, 131), generator=generator)
    label[torch.rand(label.shape, generator=generator) < 0.2] = 255
    label = label.to(label_dtype)
    pred = torch.randint(0, 21, label.shape, generator=generator)
    on_device = [tensor.pin_memory().to("cuda", non_blocking=True) for tensor in (pred, label)]
    metrics.confusion_matrix(*on_device, 21)  # warm-up: lazy CUDA initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = metrics.confusion_matrix(*on_device, 21)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.cpu(), metrics.confusion_matrix(pred, label, 21))


def test_confusion_matrices_of_shards_add_up():
    rng = np.random.default_rng(0)
    pred, label = torch.from_numpy(rng.integers(0, 5, 1000)), torch.from_numpy(rng.integers(0, 5, 1000))
    label[::7] = 255
    whole = metrics.confusion_matrix(pred, label, 5)
    halves = metrics.confusion_matrix(pred[:400], label[:400], 5) + metrics.confusion_matrix(pred[400:], label[400:], 5)
    assert torch.equal(whole, halves)
    assert int(whole.sum()) == int((label != 255).sum())


def test_hand_worked_metrics():
    # gt: [0,0,1,1], pred: [0,1,1,1] -> I=[1,2], P=[1,3], L=[2,2], U=[2,3]
    matrix = metrics.confusion_matrix(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1, 1]), 3)
    got = metrics.metrics_from_confusion(matrix)
    assert got["aAcc"] == 0.75
    assert math.isclose(got["mIoU"], (1 / 2 + 2 / 3) / 2)  # class 2 absent everywhere: NaN, skipped
    assert math.isclose(got["mAcc"], (1 / 2 + 1) / 2)
    assert math.isnan(got["IoU"][2])
