"""Tests for seg/transforms.py and seg/transforms.py: every value is checked against a brute-force formula, Pillow,
colorsys, a per-pixel transcription of the reference code, or an invariant."""

import colorsys
import copy
import inspect
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from seg import transforms as T

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


# ----------------------------------------------------------------------------- brute-force references

def brute_bilinear(image, hw):
    """OpenCV INTER_LINEAR by the per-pixel formula, float64, rounded half up."""
    (h, w), (new_h, new_w) = image.shape[:2], hw

    def taps(dst, src_size, dst_size):
        position = (dst + 0.5) * src_size / dst_size - 0.5
        first = math.floor(position)
        weight = position - first
        if first < 0:
            first, weight = 0, 0.0
        if first >= src_size - 1:
            first, weight = src_size - 1, 0.0
        return first, min(first + 1, src_size - 1), weight

    out = np.zeros((new_h, new_w, 3), np.int64)
    for y in range(new_h):
        y0, y1, wy = taps(y, h, new_h)
        for x in range(new_w):
            x0, x1, wx = taps(x, w, new_w)
            top = (1 - wx) * image[y0, x0].astype(float) + wx * image[y0, x1]
            bottom = (1 - wx) * image[y1, x0].astype(float) + wx * image[y1, x1]
            out[y, x] = np.floor((1 - wy) * top + wy * bottom + 0.5)
    return out


def brute_nearest_cv2(label, hw):
    (h, w), (new_h, new_w) = label.shape, hw
    out = np.zeros(hw, np.uint8)
    for y in range(new_h):
        for x in range(new_w):
            sy = min(math.floor(y * (1.0 / (new_h / h))), h - 1)
            sx = min(math.floor(x * (1.0 / (new_w / w))), w - 1)
            out[y, x] = label[sy, sx]
    return out


def cv_round(x):
    return int(np.rint(x))


def opencv_bgr2hsv_pixel(b, g, r):
    """cv::RGB2HSV_b for one pixel, transcribed with Python ints."""
    v, v_min = max(b, g, r), min(b, g, r)
    diff = v - v_min
    s_div = cv_round((255 << 12) / v) if v else 0
    h_div = cv_round((180 << 12) / (6.0 * diff)) if diff else 0
    s = (diff * s_div + (1 << 11)) >> 12
    if v == r:
        h = g - b
    elif v == g:
        h = b - r + 2 * diff
    else:
        h = r - g + 4 * diff
    h = (h * h_div + (1 << 11)) >> 12
    return h + 180 if h < 0 else h, s, v


def opencv_hsv2bgr_pixel(h, s, v):
    """cv::HSV2RGB_b for one pixel, transcribed with float32 scalars."""
    f32 = np.float32
    s, v = f32(s) * (f32(1) / f32(255)), f32(v) * (f32(1) / f32(255))
    hue = f32(h) * (f32(6) / f32(180))
    sector = int(math.floor(hue))
    hue = f32(hue - f32(sector))
    sector %= 6
    tab = [v, f32(v * f32(1 - s)), f32(v * f32(1 - f32(s * hue))), f32(v * f32(1 - f32(s * f32(1 - hue))))]
    order = [(1, 3, 0), (1, 0, 2), (3, 0, 1), (0, 2, 1), (0, 1, 3), (2, 1, 0)][sector]
    return tuple(cv_round(f32(tab[k] * f32(255))) for k in order)


def per_pixel(function, image):
    flat = image.reshape(-1, 3).astype(int)
    return np.array([function(*p) for p in flat], np.uint8).reshape(image.shape)


def reference_jitter(rng, image, hue_high):
    """mmseg PhotoMetricDistortion / detectron2 ColorAugSSD as written upstream (per-pixel cv2 stand-ins),
    drawing from rng in the order seg.transforms.draw_jitter documents."""
    def convert(x, alpha=1, beta=0):
        return np.clip(x.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)

    def contrast(img):
        return convert(img, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else img

    img = image.copy()
    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-32, 32))
    contrast_first = rng.integers(2)
    if contrast_first:
        img = contrast(img)
    if rng.integers(2):
        hsv = per_pixel(opencv_bgr2hsv_pixel, img)
        hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        img = per_pixel(opencv_hsv2bgr_pixel, hsv)
    if rng.integers(2):
        hsv = per_pixel(opencv_bgr2hsv_pixel, img)
        hsv[..., 0] = (hsv[..., 0].astype(int) + rng.integers(-18, hue_high)) % 180
        img = per_pixel(opencv_hsv2bgr_pixel, hsv)
    if not contrast_first:
        img = contrast(img)
    return img


def resize_label(label, hw, rule):
    """Whole-label nearest resize, rule "cv2" (mmseg) or "pil" (detectron2), through the window path."""
    src = T.nearest_src_cv2 if rule == "cv2" else T.nearest_src_pil
    return T.resize_label_window(label, hw, (0, 0) + tuple(hw), src)


def bgr_to_hsv(image):
    """H×W×3 uint8 BGR -> HSV (cv2.COLOR_BGR2HSV) from colour's tables, read as _hsv_round_trip reads them."""
    b, g, r = T.planes_of(image)
    v = np.maximum(np.maximum(b, g), r)
    s = T._S_OF_MAX_MIN.take(T._key(v, np.minimum(np.minimum(b, g), r)))
    return np.stack([T._hue(b, g, r), s, v], axis=-1)


def hsv_to_bgr(hsv):
    """H×W×3 uint8 HSV (H >= 180 wraps) -> BGR (cv2.COLOR_HSV2BGR) with colour's _to_bgr and tables."""
    h, s, v = T.planes_of(hsv)
    return np.ascontiguousarray(T.planar_view(T._to_bgr(h, T._key(h, s), v, T._LOW_OF_S_V.take(T._key(s, v)))))


def jitter(rng, image, hue_high):
    """Draw and apply a colour jitter (what a sampler draws and the loader applies)."""
    return T.jittered(image, T.draw_jitter(rng, hue_high))


def random_image(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


VOC_SMALL = dict(scale=(160, 40), crop_hw=(24, 24))
CITY_SMALL = dict(short_edges=(16, 24, 32, 40, 48, 56, 64), max_size=128, crop_hw=(16, 32))


def replay_hw(rng, dataset, shape):
    """Resized size the sampler will use, from a copy of its rng (the first draw of both pipelines)."""
    rng = copy.deepcopy(rng)
    if dataset == "voc":
        ratio = rng.random() * 1.5 + 0.5
        return T.rescale_hw(*shape, (int(160 * ratio), int(40 * ratio))), rng
    short = CITY_SMALL["short_edges"][int(rng.integers(7))]
    return T.shortest_edge_hw(*shape, short, 128), rng


def sample(dataset, rng, image, label, **kwargs):
    """(image before the colour jitter, label) of a sampler; the jitter parameters are tested apart."""
    if dataset == "voc":
        return T.voc_train_sample(rng, image, label, **VOC_SMALL, **kwargs)[:2]
    return T.cityscapes_train_sample(rng, image, label, **CITY_SMALL, **kwargs)[:2]


# ------------------------------------------------------------------------------------------ sizes

def test_rescale_hw_hand_worked():
    assert T.rescale_hw(375, 500, (2048, 512)) == (512, 683)  # VOC test scale: 500 wide -> 683
    assert T.rescale_hw(500, 375, (2048, 512)) == (683, 512)
    assert T.rescale_hw(100, 1000, (2048, 512)) == (205, 2048)  # long side binds: 2.048
    assert T.rescale_hw(375, 500, (1024, 256)) == (256, 341)  # 341.33 rounds down


def test_shortest_edge_hw_hand_worked():
    assert T.shortest_edge_hw(1024, 2048, 1536, 4096) == (1536, 3072)
    assert T.shortest_edge_hw(1024, 2048, 2048, 3000) == (1500, 3000)  # long side capped
    assert T.shortest_edge_hw(2048, 1024, 512, 4096) == (1024, 512)
    assert T.shortest_edge_hw(375, 500, 512, 4096) == (512, 683)


# ------------------------------------------------------------------------------ windowed resizing

@SETTINGS
@given(st.integers(1, 20), st.integers(1, 20), st.integers(1, 40), st.integers(1, 40), st.data())
def test_image_window_equals_full_resize_then_crop(h, w, new_h, new_w, data):
    rng = np.random.default_rng(h * 1000 + w)
    image = random_image(rng, h, w)
    y0, x0 = data.draw(st.integers(0, new_h - 1)), data.draw(st.integers(0, new_w - 1))
    height, width = data.draw(st.integers(1, new_h - y0)), data.draw(st.integers(1, new_w - x0))
    flip = data.draw(st.booleans())
    full = T.resize_image(image, (new_h, new_w))
    brute = brute_bilinear(image, (new_h, new_w))
    assert full.shape == (new_h, new_w, 3) and full.dtype == np.uint8
    assert np.abs(full.astype(int) - brute).max() <= 1  # float32 vs float64 at rounding ties
    window = T.resize_image_window(image, (new_h, new_w), (y0, x0, height, width), flip)
    expected = full[y0:y0 + height, x0:x0 + width][:, ::-1 if flip else 1]
    np.testing.assert_array_equal(np.moveaxis(window, 0, -1), expected)


@pytest.mark.parametrize("hw", [(37, 51), (13, 17), (48, 80)])
def test_image_resize_is_the_same_in_any_strip_partition(monkeypatch, hw):
    """Real crops span many strips; small test images fit in one. Strips of 1 and 5 rows must agree."""
    image = random_image(np.random.default_rng(15), 24, 40)
    whole = T.resize_image(image, hw)
    for rows in (1, 5):
        monkeypatch.setattr(T, "_STRIP_VALUES", rows * hw[1] * 3)
        np.testing.assert_array_equal(T.resize_image(image, hw), whole)
        window = T.resize_image_window(image, hw, (3, 4, hw[0] - 5, hw[1] - 6), flip=True)
        np.testing.assert_array_equal(np.moveaxis(window, 0, -1), whole[3:hw[0] - 2, 4:hw[1] - 2][:, ::-1])


@SETTINGS
@given(st.integers(1, 30), st.integers(1, 30), st.integers(1, 60), st.integers(1, 60), st.data())
def test_label_window_equals_full_resize_then_crop(h, w, new_h, new_w, data):
    label = np.random.default_rng(h * 100 + w).integers(0, 256, (h, w), dtype=np.uint8)
    y0, x0 = data.draw(st.integers(0, new_h - 1)), data.draw(st.integers(0, new_w - 1))
    window = (y0, x0, data.draw(st.integers(1, new_h - y0)), data.draw(st.integers(1, new_w - x0)))
    flip = data.draw(st.booleans())
    pil = np.asarray(Image.fromarray(label).resize((new_w, new_h), Image.NEAREST))
    cv2 = brute_nearest_cv2(label, (new_h, new_w))
    for rule, full, src in (("pil", pil, T.nearest_src_pil), ("cv2", cv2, T.nearest_src_cv2)):
        np.testing.assert_array_equal(resize_label(label, (new_h, new_w), rule), full)
        crop = T.resize_label_window(label, (new_h, new_w), window, src, flip)
        expected = full[y0:y0 + window[2], x0:x0 + window[3]][:, ::-1 if flip else 1]
        np.testing.assert_array_equal(crop, expected)


def test_nearest_pil_matches_pillow_at_cityscapes_scales():
    label = np.random.default_rng(0).integers(0, 19, (4, 2048), dtype=np.uint8)
    for width in (1024, 1536, 2048, 2560, 3072, 3584, 4096, 683, 1365):
        pil = np.asarray(Image.fromarray(label).resize((width, 4), Image.NEAREST))
        np.testing.assert_array_equal(resize_label(label, (4, width), "pil"), pil)


def test_bilinear_upscale_within_one_of_pillow():
    """Documented difference: upscaling matches Pillow BILINEAR (detectron2) up to rounding."""
    image = random_image(np.random.default_rng(1), 24, 40)
    for hw in ((30, 50), (36, 60), (48, 80), (42, 70)):
        pil = np.asarray(Image.fromarray(image).resize(hw[::-1], Image.BILINEAR)).astype(int)
        assert np.abs(T.resize_image(image, hw).astype(int) - pil).max() <= 1


# ------------------------------------------------------------------------------------------ crops

@SETTINGS
@given(st.lists(st.sampled_from([0, 1, 2, 7, 254, 255]), min_size=1, max_size=41))
def test_class_counts_against_unique(values):
    label = np.array(values, np.uint8).reshape(1, -1)
    labels, counts = np.unique(label, return_counts=True)
    np.testing.assert_array_equal(T.class_counts(label, 255), counts[labels != 255])


def test_category_rules_hand_worked():
    def lab(*values):
        return np.array(values, np.uint8).reshape(1, -1)
    for accepts in (T.mmseg_accepts, T.detectron2_accepts):
        assert not accepts(lab(0, 0, 0, 1), 0.75, 255)  # 3/4 is not below 0.75
        assert accepts(lab(0, 0, 1, 1), 0.75, 255)
        assert accepts(lab(0, 1, 255, 255, 255, 255), 0.75, 255)  # ignore pixels are not counted
        assert not accepts(lab(3, 3, 255, 255), 0.75, 255)  # one class
        assert not accepts(lab(255, 255), 0.75, 255)
        assert not accepts(lab(0, 0, 255, 255), 0.75, 0)  # another ignore index: 255 is one class


@pytest.mark.parametrize("draw_after_last, draws", [(True, 11), (False, 10)])
def test_choose_window_fallback_is_last_drawn(draw_after_last, draws):
    rng = np.random.default_rng(3)
    replay = copy.deepcopy(rng)
    seen = []
    window, crop = T.choose_window(rng, lambda win: seen.append(win) or win, (40, 50), (16, 16),
                                   lambda crop: False, 10, draw_after_last)
    expected = [T._draw_window(replay, (40, 50), (16, 16)) for _ in range(draws)]
    assert seen == expected and window == expected[-1] and crop == expected[-1]
    assert rng.random() == replay.random()  # nothing else was drawn


def test_choose_window_stops_at_first_accepted():
    rng = np.random.default_rng(4)
    replay = copy.deepcopy(rng)
    calls = []
    window, _ = T.choose_window(rng, lambda win: win, (40, 50), (16, 16),
                                lambda crop: calls.append(crop) or len(calls) == 3, 10, True)
    assert window == [T._draw_window(replay, (40, 50), (16, 16)) for _ in range(3)][-1]


@pytest.mark.parametrize("dataset", ["voc", "cityscapes"])
def test_sampler_single_class_label_falls_back_to_last_window(dataset):
    rng = np.random.default_rng(5)
    image, label = random_image(rng, 30, 60), np.full((30, 60), 4, np.uint8)
    label[:, :3] = 255  # ignored pixels do not make a second class
    hw, replay = replay_hw(rng, dataset, label.shape)
    crop_hw = VOC_SMALL["crop_hw"] if dataset == "voc" else CITY_SMALL["crop_hw"]
    windows = [T._draw_window(replay, hw, crop_hw) for _ in range(11 if dataset == "voc" else 10)]
    flip = replay.random() < 0.5
    y0, x0, height, width = windows[-1]
    out_image, out_label = sample(dataset, rng, image, label)
    rule = "cv2" if dataset == "voc" else "pil"
    step = -1 if flip else 1
    np.testing.assert_array_equal(out_image, T.resize_image(image, hw)[y0:y0 + height, x0:x0 + width][:, ::step])
    np.testing.assert_array_equal(out_label, resize_label(label, hw, rule)[y0:y0 + height, x0:x0 + width][:, ::step])


@pytest.mark.parametrize("dataset, rule_key, stripe", [("voc", "cat_max_ratio", 12),
                                                       ("cityscapes", "single_category_max_area", 20)])
def test_sampler_applies_the_category_rule(dataset, rule_key, stripe):
    """Vertical stripes of two classes: many crops are single-class or dominated. With the rule every crop
    passes it (fixed seeds); with the rule off (1.0) some crop fails it."""
    label = ((np.arange(60) // stripe) % 2).astype(np.uint8)[None, :].repeat(30, 0)
    image = random_image(np.random.default_rng(0), 30, 60)

    def passes(seed, ratio):
        _, out = sample(dataset, np.random.default_rng(seed), image, label, **{rule_key: ratio})
        counts = T.class_counts(out)
        return len(counts) > 1 and counts.max() / counts.sum() < 0.75
    assert all(passes(seed, 0.75) for seed in range(16))
    assert not all(passes(seed, 1.0) for seed in range(16))


# ---------------------------------------------------------------------------------------- samplers

@SETTINGS
@given(st.sampled_from(["voc", "cityscapes"]), st.integers(8, 60), st.integers(8, 60), st.integers(0, 10 ** 6))
def test_sampler_shapes_and_label_values(dataset, h, w, seed):
    rng = np.random.default_rng(seed)
    image = random_image(rng, h, w)
    label = rng.choice(np.array([0, 3, 9, 255], np.uint8), size=(h, w))
    hw, _ = replay_hw(rng, dataset, (h, w))
    out_image, out_label = sample(dataset, rng, image, label)
    crop_hw = VOC_SMALL["crop_hw"] if dataset == "voc" else CITY_SMALL["crop_hw"]
    expected = (min(crop_hw[0], hw[0]), min(crop_hw[1], hw[1]))
    assert out_label.shape == expected and out_image.shape == expected + (3,)
    assert out_label.dtype == np.uint8 and out_image.dtype == np.uint8
    assert set(np.unique(out_label)) <= set(np.unique(label))  # nearest: ignore never becomes a class


@pytest.mark.parametrize("dataset", ["voc", "cityscapes"])
def test_sampler_image_and_label_stay_aligned(dataset):
    """Image channels hold the source row and column, the label holds them mod 15: after resize, crop
    and flip, the bilinear coordinates must sit within one pixel of the nearest label's coordinates."""
    y, x = np.mgrid[0:40, 0:60]
    image = np.stack([y, x, np.zeros_like(y)], -1).astype(np.uint8)
    label = ((y % 15) * 16 + x % 15).astype(np.uint8)
    flips = set()
    for seed in range(12):
        out_image, out_label = sample(dataset, np.random.default_rng(seed), image, label)
        for channel, encoded in ((0, out_label // 16), (1, out_label % 16)):
            distance = (out_image[..., channel].astype(int) - encoded) % 15
            assert np.minimum(distance, 15 - distance).max() <= 1
        flips.add(bool(out_image[0, 0, 1] > out_image[0, -1, 1]))
    assert flips == {False, True}  # both flip outcomes were exercised


def test_voc_resize_ratio_range(monkeypatch):
    sizes = []
    real = T.rescale_hw
    monkeypatch.setattr(T, "rescale_hw", lambda *args: sizes.append(real(*args)) or sizes[-1])
    image, label = np.zeros((375, 500, 3), np.uint8), np.zeros((375, 500), np.uint8)
    for seed in range(40):
        _, out_label, _ = T.voc_train_sample(np.random.default_rng(seed), image, label)
        assert out_label.shape == (min(512, sizes[-1][0]), min(512, sizes[-1][1]))
    short = np.array([min(hw) for hw in sizes])
    assert ((256 <= short) & (short < 1024)).all() and short.min() < 350 and short.max() > 900
    assert all(abs(w / h - 500 / 375) < 0.01 for h, w in sizes)  # keep ratio


def test_cityscapes_draw_frequencies(monkeypatch):
    """Each short edge is chosen and the flip happens about half the time (fixed seeds, 3-sigma bounds)."""
    shorts = []
    real = T.shortest_edge_hw
    monkeypatch.setattr(T, "shortest_edge_hw", lambda h, w, short, top: shorts.append(short) or real(h, w, short, top))
    y, x = np.mgrid[0:30, 0:60]
    image = np.stack([y, x, x], -1).astype(np.uint8)
    rng, flips = np.random.default_rng(14), 0
    for _ in range(300):
        out, _, _ = T.cityscapes_train_sample(rng, image, np.zeros((30, 60), np.uint8), **CITY_SMALL)
        flips += int(out[0, 0, 1] > out[0, -1, 1])
    assert 124 < flips < 176
    assert sorted(set(shorts)) == list(CITY_SMALL["short_edges"]) and max(np.bincount(shorts)) < 70


@pytest.mark.parametrize("dataset, hue_high", [("voc", 18), ("cityscapes", 19)])
def test_sampler_jitter_parameters_are_the_last_draws(dataset, hue_high, monkeypatch):
    """The sampler returns the unjittered crop and parameters drawn last from its rng, with the hue range of
    its reference (mmseg [-18, 17], detectron2 [-18, 18])."""
    states, real = [], T.draw_jitter
    monkeypatch.setattr(T, "draw_jitter",
                        lambda rng, high: states.append((copy.deepcopy(rng), high)) or real(rng, high))
    image, label = random_image(np.random.default_rng(6), 30, 60), np.zeros((30, 60), np.uint8)
    sampler, small = (T.voc_train_sample, VOC_SMALL) if dataset == "voc" else (T.cityscapes_train_sample, CITY_SMALL)
    for seed in range(6):
        rng = np.random.default_rng(seed)
        _, _, jitter = sampler(rng, image, label, **small)
        before, high = states[-1]
        assert high == hue_high and jitter.dtype == np.int16 and jitter.shape == (T.JITTER_SIZE,)
        np.testing.assert_array_equal(jitter, real(before, high))
        assert before.bit_generator.state == rng.bit_generator.state  # nothing drawn after the jitter


def test_jitter_is_a_per_pixel_colour_map():
    image = random_image(np.random.default_rng(6), 30, 60) // 64 * 64  # few colours, repeated
    for seed in range(6):
        colour_image = jitter(np.random.default_rng(seed), image, 19)
        plain, coloured = image.reshape(-1, 3), colour_image.reshape(-1, 3)
        _, first, inverse = np.unique(plain, axis=0, return_index=True, return_inverse=True)
        np.testing.assert_array_equal(coloured, coloured[first][inverse.ravel()])


def test_train_samplers_registry():
    assert T.TRAIN_SAMPLERS == {"voc": T.voc_train_sample, "cityscapes": T.cityscapes_train_sample}
    assert T.CROP_PLANS == {"voc": (T.voc_crop_plan, 18), "cityscapes": (T.cityscapes_crop_plan, 19)}


@SETTINGS
@given(st.sampled_from(["voc", "cityscapes"]), st.integers(8, 60), st.integers(8, 60), st.integers(0, 10 ** 6))
def test_sampler_is_plan_then_window_resize_then_jitter_draw(dataset, h, w, seed):
    """The stages seg/bench.py times, called one by one from the same seed, give the sampler's output bit for
    bit and leave the rng where the sampler does; the plan's label crop is the crop of the full resize."""
    rng = np.random.default_rng(seed)
    image = random_image(rng, h, w)
    label = rng.choice(np.array([0, 3, 9, 255], np.uint8), size=(h, w))
    if dataset == "voc":
        options, rule = dict(VOC_SMALL, ratio_range=(0.5, 2.0), cat_max_ratio=0.75), "cv2"
    else:
        options, rule = dict(CITY_SMALL, single_category_max_area=0.75), "pil"
    plan, hue_high = T.CROP_PLANS[dataset]
    staged_rng, sampler_rng = np.random.default_rng(seed + 1), np.random.default_rng(seed + 1)
    expected_hw, _ = replay_hw(staged_rng, dataset, (h, w))
    hw, (y0, x0, height, width), flip, crop_label = plan(staged_rng, label, **options)
    assert hw == expected_hw and (height, width) == tuple(np.minimum(options["crop_hw"], hw))
    assert 0 <= y0 <= hw[0] - height and 0 <= x0 <= hw[1] - width
    full = resize_label(label, hw, rule)[y0:y0 + height, x0:x0 + width]
    np.testing.assert_array_equal(crop_label, full[:, ::-1] if flip else full)
    staged = (T.planar_view(T.resize_image_window(image, hw, (y0, x0, height, width), flip)), crop_label,
              T.draw_jitter(staged_rng, hue_high))
    sampled = T.TRAIN_SAMPLERS[dataset](sampler_rng, image, label, **options)
    assert len(sampled) == len(staged)
    for got, expected in zip(sampled, staged):
        np.testing.assert_array_equal(got, expected)
    assert sampler_rng.bit_generator.state == staged_rng.bit_generator.state


# ------------------------------------------------------------------------------------------- colour

@pytest.mark.parametrize("nearest_src", [T.nearest_src_cv2, T.nearest_src_pil])
def test_flip_twice_is_identity(nearest_src):
    """The samplers mirror inside the window resizes (flip=True); at scale 1 that is a plain mirror."""
    rng = np.random.default_rng(8)
    image, label = random_image(rng, 5, 7), rng.integers(0, 256, (5, 7), dtype=np.uint8)

    def hflip(image, label):
        window = (0, 0) + label.shape
        return (np.ascontiguousarray(T.planar_view(T.resize_image_window(image, label.shape, window, flip=True))),
                T.resize_label_window(label, label.shape, window, nearest_src, flip=True))
    flipped = hflip(image, label)
    np.testing.assert_array_equal(flipped[0][:, 0], image[:, -1])
    np.testing.assert_array_equal(flipped[1][:, 0], label[:, -1])
    for original, twice in zip((image, label), hflip(*flipped)):
        np.testing.assert_array_equal(twice, original)


def test_bgr_to_hsv_matches_opencv_transcription_and_colorsys():
    rng = np.random.default_rng(9)
    image = np.concatenate([random_image(rng, 40, 50).reshape(-1, 3),
                            np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1),  # greys
                            [[0, 0, 255], [0, 255, 0], [255, 0, 0], [255, 255, 0], [1, 0, 0]]]).astype(np.uint8)
    image = image.reshape(1, -1, 3)
    hsv = bgr_to_hsv(image)
    np.testing.assert_array_equal(hsv, per_pixel(opencv_bgr2hsv_pixel, image))
    for (b, g, r), (h, s, v) in zip(image[0].astype(int), hsv[0].astype(int)):
        ref_h, ref_s, ref_v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
        assert min(abs(h - ref_h * 180), 180 - abs(h - ref_h * 180)) <= 1
        assert abs(s - ref_s * 255) <= 1 and v == round(ref_v * 255)
    assert hsv[..., 0].max() < 180


def test_hsv_to_bgr_matches_opencv_transcription():
    rng = np.random.default_rng(10)
    hsv = rng.integers(0, 256, (1, 3000, 3), dtype=np.uint8)  # H >= 180 included: OpenCV wraps it
    np.testing.assert_array_equal(hsv_to_bgr(hsv), per_pixel(opencv_hsv2bgr_pixel, hsv))


def test_hsv_round_trip_is_close_to_identity():
    """The fused round trip a jitter step computes (_hsv_round_trip, S and H unchanged) equals the two
    conversions above, and is close to the identity."""
    def round_trip(image):
        return T.planar_view(T._hsv_round_trip(T.planes_of(image)))
    image = random_image(np.random.default_rng(11), 100, 100)
    np.testing.assert_array_equal(round_trip(image), hsv_to_bgr(bgr_to_hsv(image)))
    error = np.abs(round_trip(image).astype(int) - image)
    assert error.max() <= 5 and error.mean() < 1  # H has 2-degree steps: up to 255/60 per channel
    grey = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, 2)
    np.testing.assert_array_equal(hsv_to_bgr(bgr_to_hsv(grey)), grey)
    np.testing.assert_array_equal(round_trip(grey), grey)


@pytest.mark.parametrize("hue_high", [18, 19])  # mmseg PhotoMetricDistortion, detectron2 ColorAugSSD
def test_jitter_matches_reference_transcription(hue_high):
    # it never sees the label: parameters come from the rng alone and apply to the image alone
    assert list(inspect.signature(T.draw_jitter).parameters) == ["rng", "hue_high"]
    assert list(inspect.signature(T.jittered).parameters) == ["image", "params"]
    image = random_image(np.random.default_rng(12), 6, 9)
    for seed in range(24):
        out = jitter(np.random.default_rng(seed), image, hue_high)
        assert out.shape == image.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(out, reference_jitter(np.random.default_rng(seed), image, hue_high))


@pytest.mark.parametrize("hw", [(24, 40), (48, 80), (6, 10), (3, 5), (24, 10), (12, 20)])
def test_bilinear_exact_at_dyadic_scales(hw):
    """At scales 1, 2, 4, 1/2, 1/4 every weight is a short binary fraction, so float32 is exact and the
    result must equal the brute force bit for bit, ties rounding half up."""
    image = random_image(np.random.default_rng(13), 12, 20)
    np.testing.assert_array_equal(T.resize_image(image, hw), brute_bilinear(image, hw))


def test_sampler_rejects_mismatched_label():
    with pytest.raises(ValueError, match="differ in size"):
        T.voc_train_sample(np.random.default_rng(0), np.zeros((10, 12, 3), np.uint8), np.zeros((10, 11), np.uint8))


# ------------------------------------------------------------------- colour jitter on the device (torch)

def numpy_jitter(planes, params):
    return np.stack([T.apply_jitter_planes(p, q) for p, q in zip(planes, params)])


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 20), st.integers(1, 20), st.integers(0, 10 ** 6), st.sampled_from([18, 19]))
def test_device_jitter_equals_the_loader_jitter(count, h, w, seed, hue_high):
    rng = np.random.default_rng(seed)
    planes = rng.integers(0, 256, (count, 3, h, w), dtype=np.uint8)
    params = np.stack([T.draw_jitter(rng, hue_high) for _ in range(count)])
    got = T.apply_jitter(torch.from_numpy(planes), torch.from_numpy(params))
    assert got.dtype == torch.uint8 and got.shape == planes.shape
    np.testing.assert_array_equal(got.numpy(), numpy_jitter(planes, params))


def all_steps(rng, shift):
    """Parameters with every step on: brightness+contrast, saturation, the given hue shift, contrast."""
    params = T.draw_jitter(rng, 19)
    params[T.PRE] = T._affine_map(rng.uniform(0.5, 1.5), rng.uniform(-32, 32))
    params[T.SATURATION], params[T.POST] = T._affine_map(rng.uniform(0.5, 1.5), 0), T._affine_map(1.3, 0)
    params[T.SATURATION_ON], params[T.HUE_ON], params[T.HUE_SHIFT] = 1, 1, shift
    return params


def test_device_jitter_equals_the_loader_jitter_on_every_green_blue_pair():
    """All 65536 (B, G) pairs with 8 R values, every step on, hue shifts at both ends of the range and 0."""
    b, g = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    r = np.random.default_rng(15).integers(0, 256, (8, 256, 256))
    planes = np.stack([np.broadcast_to(b, r.shape), np.broadcast_to(g, r.shape), r]).astype(np.uint8)
    planes = planes.reshape(3, 512, 1024)[None].repeat(3, 0)
    params = np.stack([all_steps(np.random.default_rng(shift + 100), shift) for shift in (-18, 0, 18)])
    np.testing.assert_array_equal(T.apply_jitter(torch.from_numpy(planes), torch.from_numpy(params)).numpy(),
                                  numpy_jitter(planes, params))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_jitter_on_cuda_equals_the_loader_jitter():
    rng = np.random.default_rng(16)
    planes = rng.integers(0, 256, (4, 3, 64, 96), dtype=np.uint8)
    params = np.stack([all_steps(rng, 7), all_steps(rng, -18)] + [T.draw_jitter(rng, 18) for _ in range(2)])
    images, params_cuda = torch.from_numpy(planes).cuda(), torch.from_numpy(params).cuda()
    T.apply_jitter(images[:1], params_cuda[:1])  # the tables are copied to the GPU once
    torch.cuda.set_sync_debug_mode("error")  # and no host synchronisation
    try:
        got = T.apply_jitter(images, params_cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    np.testing.assert_array_equal(got.cpu().numpy(), numpy_jitter(planes, params))
