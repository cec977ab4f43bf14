"""Tests for seg/evaluate.py inference: slide against whole and against a per-pixel brute force, test-time
augmentation against hand-composed views, and evaluation end to end on a tiny generated VOC dataset."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from seg import amp, config, evaluate, metrics, prepare, tasks, transforms
from seg.files import UserError
from seg.pointrend import build_pointrend
from seg.pspnet import build_pspnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs.toml")
TINY_PSPNET = dict(base_channels=8, stem_channels=8, blocks=(1, 1, 1, 1), channels=16, aux_channels=8)


def small_pspnet(num_classes=3):
    torch.manual_seed(0)
    return build_pspnet(num_classes=num_classes, **TINY_PSPNET).eval()


def small_pointrend():
    torch.manual_seed(0)
    return build_pointrend(num_classes=3, fpn_channels=16, head_channels=8, head_groups=4, point_fc=16,
                           stem_channels=8, base_channels=4, blocks=(1, 1, 1, 1), subdivision_num_points=300).eval()


MODELS = {"pspnet": small_pspnet, "pointrend": small_pointrend}
OFF = lambda: amp.autocast_context("cpu", "off")  # noqa: E731


def random_image(height, width, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (1, 3, height, width), dtype=np.uint8))


def options(**changes):
    return {"mode": "whole", "crop_hw": [512, 512], "stride_hw": [341, 341], "flip": False, "scales": [1.0],
            "max_size": 4096, **changes}


def scores(model, image, test, out_hw=None):
    """test_time_scores of one view that fills `image`."""
    hw = torch.tensor([image.shape[-2:]])
    with torch.no_grad():
        return evaluate.test_time_scores(model, image, hw, out_hw or tuple(image.shape[-2:]), test)


# ------------------------------------------------------------------------------------------ windows

def test_window_starts_hand_worked():
    assert evaluate.window_starts(70, 32, 20) == [0, 20, 38]  # the last window shifted back to end at 70
    assert evaluate.window_starts(64, 32, 32) == [0, 32]
    assert evaluate.window_starts(65, 32, 32) == [0, 32, 33]
    assert evaluate.window_starts(10, 32, 20) == [0]  # crop larger than the image: one (shorter) window


@settings(max_examples=30, deadline=None, derandomize=True)
@given(size=st.integers(1, 300), crop=st.integers(1, 128), stride_share=st.floats(0.05, 1.0))
def test_windows_cover_the_axis_in_mmseg_count(size, crop, stride_share):
    stride = max(1, int(crop * stride_share))
    starts = evaluate.window_starts(size, crop, stride)
    length = min(crop, size)
    assert len(starts) == max(size - crop + stride - 1, 0) // stride + 1
    assert all(0 <= start and start + length <= size for start in starts)
    covered = np.zeros(size, bool)
    for start in starts:
        covered[start: start + length] = True
    assert covered.all() and starts[0] == 0 and starts[-1] + length == size


# ---------------------------------------------------------------------------------- slide vs whole

@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("crop_hw", [[50, 90], [64, 128]])
def test_slide_with_a_window_covering_the_image_equals_whole_exactly(name, crop_hw):
    model = MODELS[name]()
    image = random_image(50, 90)  # not a multiple of 32: PointRend pads inside the model
    for out_hw in [(50, 90), (75, 61)]:
        whole = scores(model, image, options(), out_hw)
        slide = scores(model, image, options(mode="slide", crop_hw=crop_hw, stride_hw=[20, 30]), out_hw)
        assert whole.shape == (1, 3, *out_hw)
        assert torch.equal(slide, whole)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_slide_with_overlapping_windows_equals_per_pixel_average(name):
    model = MODELS[name]()
    height, width, crop, stride = 40, 70, (24, 32), (16, 20)
    image = random_image(height, width, seed=1)
    # mmseg's loops, written out: a window every stride, clipped at the end by moving its start back
    windows = []
    for row in range(max(height - crop[0] + stride[0] - 1, 0) // stride[0] + 1):
        for col in range(max(width - crop[1] + stride[1] - 1, 0) // stride[1] + 1):
            bottom, right = min(row * stride[0] + crop[0], height), min(col * stride[1] + crop[1], width)
            top, left = max(bottom - crop[0], 0), max(right - crop[1], 0)
            with torch.no_grad():  # one window at a time, as mmseg runs them
                logits = evaluate.whole_logits(model, image[:, :, top:bottom, left:right].contiguous())
            windows.append((top, left, logits[0].numpy()))
    assert len(windows) == 2 * 3  # rows at 0 and 16, columns at 0, 20, 38
    expected = np.zeros((3, height, width), np.float64)
    for y in range(height):
        for x in range(width):
            values = [w[:, y - top, x - left] for top, left, w in windows
                      if top <= y < top + crop[0] and left <= x < left + crop[1]]
            expected[:, y, x] = np.mean(values, axis=0)
    actual = scores(model, image, options(mode="slide", crop_hw=list(crop), stride_hw=list(stride)))
    np.testing.assert_allclose(actual[0].numpy(), expected, rtol=1e-4, atol=1e-5)
    whole = scores(model, image, options())
    assert not torch.allclose(actual, whole, atol=1e-4)  # the windows do see less context than the image


# -------------------------------------------------------------------------------- test-time augmentation

def plain_whole_inference(model, image_bgr, long_short):
    """The pre-TTA evaluation path: resize, model, logits to the input size, then to the original size."""
    height, width = transforms.rescale_hw(*image_bgr.shape[:2], long_short)
    resized = torch.from_numpy(transforms.resize_image(image_bgr, (height, width))).permute(2, 0, 1)[None]
    with torch.no_grad():
        logits = model(resized, torch.tensor([[height, width]]))["seg"]
    logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return F.interpolate(logits, size=image_bgr.shape[:2], mode="bilinear", align_corners=False)


def views_scores(model, image_bgr, long_short, test):
    image, hw = evaluate.stack_views(evaluate.resize_to_scales(image_bgr, long_short, test["scales"]))
    with torch.no_grad():
        return evaluate.test_time_scores(model, image, hw, image_bgr.shape[:2], test)


def test_single_scale_without_flip_is_plain_whole_inference():
    model = small_pspnet()
    image_bgr = random_image(48, 64, seed=2)[0].permute(1, 2, 0).numpy()
    expected = plain_whole_inference(model, image_bgr, (96, 36))  # resized to 36×48
    actual = views_scores(model, image_bgr, (96, 36), options())
    assert torch.equal(actual.argmax(dim=1), expected.argmax(dim=1))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_scales_and_flip_average_the_softmax_of_every_view():
    model = small_pspnet()
    image_bgr = random_image(48, 64, seed=3)[0].permute(1, 2, 0).numpy()
    ratios = [0.5, 1.0, 1.5]
    expected = 0
    for ratio in ratios:
        size = transforms.rescale_hw(48, 64, (int(96 * ratio), int(36 * ratio)))
        view = torch.from_numpy(transforms.resize_image(image_bgr, size)).permute(2, 0, 1)[None]
        with torch.no_grad():
            for mirrored in (view, view.flip(-1)):
                logits = model(mirrored, torch.tensor([size]))["seg"]
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
                logits = logits.flip(-1) if mirrored is not view else logits
                expected = expected + F.interpolate(logits, size=(48, 64), mode="bilinear",
                                                    align_corners=False).softmax(dim=1)
    expected = expected / 6
    actual = views_scores(model, image_bgr, (96, 36), options(flip=True, scales=ratios))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actual.sum(dim=1), torch.ones(1, 48, 64))


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_flip_averaging_of_a_mirror_symmetric_image_is_mirror_symmetric(mode):
    model = small_pspnet()
    half = random_image(40, 32, seed=4)
    image = torch.cat([half, half.flip(-1)], dim=-1)  # 40×64, exactly symmetric
    test = options(mode=mode, crop_hw=[32, 40], stride_hw=[16, 24])
    flipped = scores(model, image, {**test, "flip": True})
    torch.testing.assert_close(flipped, flipped.flip(-1), rtol=0, atol=1e-6)
    plain = scores(model, image, test).softmax(dim=1)
    assert (plain - plain.flip(-1)).abs().max() > 1e-3  # the network alone is not mirror-equivariant


def test_bad_test_options_name_the_key():
    for changes, key in [({"mode": '"sliding"'}, "test.mode"), ({"stride_hw": [600, 10]}, "test.stride_hw"),
                         ({"crop_hw": [0, 512]}, "test.crop_hw"), ({"scales": []}, "test.scales")]:
        with pytest.raises(UserError, match=key):
            config.validate(config.load_config(CONFIGS, "pspnet_eval", [f"test.{k}={v}" for k, v in changes.items()],
                                               tasks.builder_defaults))


# ----------------------------------------------------------------------------------- no host synchronisation

def test_host_and_device_batches_pair_each_batch_with_its_copy():
    batches = [{"hw": torch.tensor([[index, index]]), "label": torch.full((1, 2, 3), index)} for index in range(3)]
    pairs = list(evaluate.host_and_device_batches(batches, torch.device("cpu")))
    assert [host["hw"][0, 0].item() for host, _ in pairs] == [0, 1, 2]
    assert all(host is batch and torch.equal(copy["label"], batch["label"])
               for (host, copy), batch in zip(pairs, batches))
    assert list(evaluate.host_and_device_batches([], torch.device("cpu"))) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("test", [options(), options(mode="slide", crop_hw=[32, 48], stride_hw=[16, 24]),
                                  options(flip=True, scales=[0.75, 1.0])], ids=["whole", "slide", "flip_scales"])
def test_evaluation_never_synchronises_with_the_cuda_device(name, test):
    """confusion_over (prefetch, test_time_scores, confusion_matrix) on pinned loader batches, and
    test_time_scores + confusion_matrix called directly, run with sync debug mode "error"."""
    device = torch.device("cuda")
    model = MODELS[name]().to(device)
    image_bgr = random_image(40, 56, seed=5)[0].permute(1, 2, 0).numpy()
    image, hw = evaluate.stack_views(evaluate.resize_to_scales(image_bgr, (56, 40), test["scales"]))
    label = torch.randint(0, 3, (1, 40, 56), generator=torch.Generator().manual_seed(0))
    label[:, :5] = 255
    batch = {"image": image.pin_memory(), "hw": hw.pin_memory(), "label": label.pin_memory()}
    evaluate.confusion_over(model, [batch], device, 3, OFF, test)  # warm-up: lazy CUDA/cuDNN set-up may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        matrix = evaluate.confusion_over(model, [batch, batch], device, 3, OFF, test)
        with torch.no_grad():
            scores = evaluate.test_time_scores(model, batch["image"].to(device, non_blocking=True), batch["hw"],
                                               (40, 56), test)
            direct = metrics.confusion_matrix(scores.argmax(dim=1), batch["label"].to(device, non_blocking=True), 3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    valid = int((label != 255).sum())
    assert scores.shape == (1, 3, 40, 56)
    assert int(matrix.sum()) == 2 * valid and int(direct.sum()) == valid


# ----------------------------------------------------------------------------------- evaluation end to end

def test_evaluation_with_flip_and_scales_counts_every_pixel(tmp_path):
    """tasks.evaluation (dataset views, loader, confusion, eval.json, saved panels) against per-image
    test_time_scores and a brute-force count."""
    prepare.make_demo_voc(str(tmp_path / "voc"), n_train=2, n_val=3, size=(48, 64), seed=1)
    cfg = config.load_config(CONFIGS, "pspnet_eval", [
        f"data_root={tmp_path}", "data.root=voc", f"output_dir={tmp_path / 'out'}", "device=cpu", "data.workers=0",
        "data.test_scale=[96,36]", "test.flip=true", "test.scales=[0.75,1.0]", "save_predictions=2",
        "model.num_classes=5", *[f"model.{key}={list(v) if isinstance(v, tuple) else v}" for key, v in
                                 TINY_PSPNET.items()]], tasks.builder_defaults)
    os.makedirs(cfg["output_dir"])
    model = small_pspnet(num_classes=5)
    result = tasks.evaluation(cfg, model, torch.device("cpu"))()
    model.eval()  # evaluation leaves the model's modes as it found them
    matrix = np.zeros((5, 5), np.int64)
    dataset, _ = tasks.eval_dataset(cfg)
    for views, label in dataset:
        image, hw = evaluate.stack_views(views)
        with torch.no_grad():
            pred = evaluate.test_time_scores(model, image, hw, label.shape, cfg["test"]).argmax(dim=1)[0].numpy()
        for truth, guess in zip(label.ravel(), pred.ravel()):
            if truth != 255:
                matrix[truth, guess] += 1
    expected = metrics.metrics_from_confusion(torch.from_numpy(matrix))
    assert result["aAcc"] == pytest.approx(expected["aAcc"]) and result["IoU"] == pytest.approx(expected["IoU"],
                                                                                              nan_ok=True)
    record = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert record["test"]["scales"] == [0.75, 1.0] and len(record["IoU"]) == 5
    tasks.save_predictions(cfg, model, torch.device("cpu"))
    panels = sorted(os.listdir(tmp_path / "out" / "predictions"))
    assert len(panels) == 2
