"""Training-time augmentation: mmsegmentation 0.10 (VOC) and detectron2 PointRend (Cityscapes).

Images are uint8 H×W×3 BGR, labels uint8 H×W (255 = ignore), randomness from the `rng: numpy.random.Generator` argument;
nothing here normalises or pads (collate pads, the model normalises). A sampler is three stages, which seg/bench.py
times apart: a crop plan (CROP_PLANS: scale, crop windows tested on label windows gathered from the original label, flip
coin), resize_image_window, draw_jitter. Labels are resized exactly by OpenCV's (VOC) or Pillow's (Cityscapes) nearest
rule, images with OpenCV INTER_LINEAR's geometry in float32 (README "Differences from the references"): VOC images ±1 on
a few pixels (OpenCV's 11-bit weights; not checked against cv2), Cityscapes within 1 of Pillow BILINEAR upscaling,
sharper downscaling (no antialiasing: mean ~1.5 levels, max ~10 on a noisy photo-like image; up to ~40 on fine stripes).

Colour jitter (mmseg PhotoMetricDistortion, detectron2 ColorAugSSD) on 3×H×W planes or H×W×3 views of them:
draw_jitter draws a sample's parameters in the loader worker; apply_jitter_planes (numpy) applies them there, or
apply_jitter (torch) to the batch after the host->device copy, taking the costliest stage off a GPU machine's workers:
bit for bit the same. HSV conversions are OpenCV's uint8 BGR2HSV (exact) and float32 HSV2BGR, transcribed from its
source, checked against per-pixel transcriptions and colorsys, not against cv2."""

import functools

import numpy as np
import torch


def rescale_hw(h, w, long_short):
    """Keep-ratio size of mmcv.imrescale: the long side at most max(long_short), the short side at most
    min(long_short). Example: (375, 500) with (2048, 512) -> (512, 683)."""
    factor = min(max(long_short) / max(h, w), min(long_short) / min(h, w))
    return max(int(h * factor + 0.5), 1), max(int(w * factor + 0.5), 1)  # 1: a 20×4000 image would get 0 rows


def shortest_edge_hw(h, w, short_edge, max_size):
    """detectron2 ResizeShortestEdge.get_output_shape: short side -> short_edge, long side <= max_size."""
    scale = short_edge * 1.0 / min(h, w)
    new_h, new_w = (short_edge * 1.0, scale * w) if h < w else (scale * h, short_edge * 1.0)
    shrink = min(1.0, max_size * 1.0 / max(new_h, new_w))  # 1.0: the long side is within max_size
    return max(int(new_h * shrink + 0.5), 1), max(int(new_w * shrink + 0.5), 1)


# Source index tables: where the outputs dst = start .. start + length - 1 along one axis read (scale = src / dst).
def nearest_src_cv2(start, length, src_size, dst_size):
    """OpenCV INTER_NEAREST: min(floor(dst * scale), src_size - 1) -> intp (length,)."""
    scale = 1.0 / (dst_size / src_size)  # OpenCV stores the inverse scale and inverts it
    return np.minimum(np.floor(np.arange(start, start + length, dtype=float) * scale).astype(np.intp), src_size - 1)


def nearest_src_pil(start, length, src_size, dst_size):
    """Pillow NEAREST (ImagingScaleAffine): floor(scale / 2 + dst * scale), the position summed step by step in
    float64 as Pillow does; the running sum (not a product) equals Pillow for every size tried."""
    scale = src_size / dst_size
    steps = np.full(start + length, scale)
    steps[0] = 0.5 * scale
    return np.minimum(np.add.accumulate(steps)[start:].astype(np.intp), src_size - 1)


def bilinear_src(start, length, src_size, dst_size):
    """OpenCV INTER_LINEAR taps floor(src), floor(src) + 1 of src = (dst + 0.5) * scale - 0.5 in float32 (no
    antialiasing) -> (first, second, weight of second), intp, intp, float32 (length,); clamped at the borders."""
    scale = 1.0 / (dst_size / src_size)
    position = ((np.arange(start, start + length, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first, weight = np.floor(position).astype(np.intp), position - np.floor(position)
    weight[(first < 0) | (first >= src_size - 1)] = 0
    first = np.clip(first, 0, src_size - 1)
    return first, np.minimum(first + 1, src_size - 1), weight


# A window is (y0, x0, height, width) in the coordinates of the resized image.
_STRIP_VALUES = 1 << 17  # output values per strip: keeps the float temporaries in cache


def _blend(values, first, second, weight, axis):
    """values[first] + weight * (values[second] - values[first]) along axis (0 or 1), float32."""
    base = values.take(first, axis=axis)
    if not weight.any():  # scale 1 along this axis: the blend would return base exactly
        return base.astype(np.float32, copy=False)
    out = np.subtract(values.take(second, axis=axis), base, dtype=np.float32)
    out *= weight if axis == 1 else weight[:, None]
    out += base
    return out


def resize_image_window(image, hw, window, flip=False):
    """Window of the H×W×3 uint8 image bilinearly resized to hw, mirrored if flip -> 3×height×width planes.
    In strips of output rows: columns first when upscaling rows (on the few source rows a strip reads), else rows
    first; the order depends only on the scale, so a window is bit for bit that window of the full resize. 0.5 added
    before the last pass (a convex blend keeps it) makes the truncating float -> uint8 cast round half up, as OpenCV."""
    (h, w), (y0, x0, height, width) = image.shape[:2], window
    if tuple(hw) == (h, w):  # scale 1: every tap weight is 0, a plain crop
        crop = image[y0:y0 + height, x0:x0 + width]
        return np.ascontiguousarray((crop[:, ::-1] if flip else crop).transpose(2, 0, 1))
    top, bottom, wy = bilinear_src(y0, height, h, hw[0])
    left, right, wx = (taps[::-1] if flip else taps for taps in bilinear_src(x0, width, w, hw[1]))
    lo, hi = int(min(left.min(), right.min())), int(max(left.max(), right.max())) + 1
    channel = np.arange(3)[:, None]  # gather channel-major so each strip comes out as 3 planes
    left3, right3, wx3 = ((left - lo) * 3 + channel).ravel(), ((right - lo) * 3 + channel).ravel(), np.tile(wx, 3)
    planes = np.empty((3, height, width), np.uint8)
    strip = max(1, _STRIP_VALUES // len(left3))
    for start in range(0, height, strip):
        first, second, weight = top[start:start + strip], bottom[start:start + strip], wy[start:start + strip]
        r0, r1 = int(first.min()), int(second.max()) + 1
        source = image[r0:r1, lo:hi].reshape(r1 - r0, -1)
        if hw[0] > h:
            source = source.astype(np.float32)  # float gathers are cheaper than mixed-type blends
            source += 0.5
            rows = _blend(_blend(source, left3, right3, wx3, 1), first - r0, second - r0, weight, 0)
        else:
            rows = _blend(source, first - r0, second - r0, weight, 0)
            rows += 0.5
            rows = _blend(rows, left3, right3, wx3, 1)
        planes[:, start:start + strip] = rows.reshape(len(first), 3, width).transpose(1, 0, 2)
    return planes


def resize_label_window(label, hw, window, nearest_src, flip=False):
    """Window of the H×W label resized to hw with nearest_src (nearest_src_cv2 or _pil), mirrored if flip.
    Reads only the source rows and column span the window uses."""
    (h, w), (y0, x0, height, width) = label.shape, window
    rows, cols = nearest_src(y0, height, h, hw[0]), nearest_src(x0, width, w, hw[1])
    lo, hi = int(cols.min()), int(cols.max()) + 1
    return label[:, lo:hi].take(rows, axis=0).take(cols[::-1] - lo if flip else cols - lo, axis=1)


def resize_image(image, hw):
    """Bilinear resize of an H×W×3 uint8 image to hw = (new_h, new_w), OpenCV INTER_LINEAR geometry."""
    return planar_view(resize_image_window(image, hw, (0, 0) + tuple(hw)))


def _draw_window(rng, hw, crop_hw):
    """Uniform crop window (y0, x0, height, width) inside hw; a side shorter than the crop is kept whole."""
    height, width = min(crop_hw[0], hw[0]), min(crop_hw[1], hw[1])
    return int(rng.integers(hw[0] - height + 1)), int(rng.integers(hw[1] - width + 1)), height, width  # y0 first


def class_counts(label, ignore_index=255):
    """Pixel count of every class present in label, ignore_index left out -> int64 (classes present,)."""
    flat = label.reshape(-1)
    if flat.size % 2 == 0:  # count byte pairs: half as many elements for bincount to convert
        pairs = np.bincount(flat.view(np.uint16), minlength=1 << 16).reshape(256, 256)
        counts = pairs.sum(axis=0) + pairs.sum(axis=1)
    else:
        counts = np.bincount(flat, minlength=256)
    if 0 <= ignore_index < 256:
        counts[ignore_index] = 0
    return counts[counts > 0]


def mmseg_accepts(label, cat_max_ratio, ignore_index):
    """mmseg RandomCrop: more than one class and the largest below cat_max_ratio of the counted pixels."""
    counts = class_counts(label, ignore_index)
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def detectron2_accepts(label, max_area, ignore_index):
    """detectron2 RandomCrop_CategoryAreaConstraint: the same rule written as max < sum * max_area."""
    counts = class_counts(label, ignore_index)
    return len(counts) > 1 and counts.max() < counts.sum() * max_area


def choose_window(rng, label_of, hw, crop_hw, accepts, tries, draw_after_last):
    """Draw windows in hw until accepts(label_of(window) -> label crop), at most `tries` times -> (window, label crop).
    If all fail, mmseg (draw_after_last=True) draws one more, untested; detectron2 (False) keeps the last tried."""
    for attempt in range(tries + (draw_after_last or tries == 0)):  # the extra draw is not tested
        window = _draw_window(rng, hw, crop_hw)
        crop_label = label_of(window)
        if attempt < tries and accepts(crop_label):
            break
    return window, crop_label


def _plan_window(rng, label, hw, crop_hw, accepts, draw_after_last, nearest_src):
    """(hw, crop window (up to 10 tries of accepts; None: no test), flip coin, label crop mirrored if flip)."""
    label_of = lambda window: resize_label_window(label, hw, window, nearest_src)  # noqa: E731
    window, crop_label = choose_window(rng, label_of, hw, crop_hw, accepts, 10 if accepts else 0, draw_after_last)
    flip = bool(rng.random() < 0.5)
    return hw, window, flip, np.ascontiguousarray(crop_label[:, ::-1]) if flip else crop_label


def voc_crop_plan(rng, label, *, scale=(2048, 512), ratio_range=(0.5, 2.0), crop_hw=(512, 512), cat_max_ratio=0.75,
                  ignore_index=255):
    """mmseg 0.10 Resize(scale, ratio_range, keep_ratio) -> RandomCrop(crop_hw, cat_max_ratio, 10 tries) ->
    RandomFlip(0.5) on an H×W label. Draws rng.random() ratio, windows (y0 then x0), rng.random() flip."""
    ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    hw = rescale_hw(*label.shape, (int(scale[0] * ratio), int(scale[1] * ratio)))
    accepts = lambda crop: mmseg_accepts(crop, cat_max_ratio, ignore_index)  # noqa: E731
    return _plan_window(rng, label, hw, crop_hw, accepts if cat_max_ratio < 1 else None, True, nearest_src_cv2)


def cityscapes_crop_plan(rng, label, *, short_edges=(512, 768, 1024, 1280, 1536, 1792, 2048), max_size=4096,
                         crop_hw=(512, 1024), single_category_max_area=0.75, ignore_index=255):
    """detectron2 ResizeShortestEdge(short_edges, max_size, "choice") -> RandomCrop_CategoryAreaConstraint(crop_hw,
    max_area, 10 tries) -> RandomFlip. Draws rng.integers short edge index, windows (y0, x0), rng.random() flip."""
    hw = shortest_edge_hw(*label.shape, short_edges[int(rng.integers(len(short_edges)))], max_size)
    accepts = lambda crop: detectron2_accepts(crop, single_category_max_area, ignore_index)  # noqa: E731
    accepts = accepts if single_category_max_area < 1 else None
    return _plan_window(rng, label, hw, crop_hw, accepts, False, nearest_src_pil)


# name -> (crop plan, hue_high of draw_jitter: mmseg's hue shift is in [-18, 17], detectron2's [-18, 18])
CROP_PLANS = {"voc": (voc_crop_plan, 18), "cityscapes": (cityscapes_crop_plan, 19)}


def _train_sample(name, rng, image, label, **options):
    """(H×W×3 uint8 BGR image, a view of channel planes; H×W uint8 label, not padded; int16 jitter parameters, applied
    later by jittered or apply_jitter). Flip drawn before the jitter (detectron2: after): the jitter is per pixel."""
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image.shape[:2]} and label {label.shape} differ in size")
    plan, hue_high = CROP_PLANS[name]
    hw, window, flip, label = plan(rng, label, **options)
    return planar_view(resize_image_window(image, hw, window, flip)), label, draw_jitter(rng, hue_high)


# (rng, image, label, **crop plan options; defaults: the recipes') -> sample: mmseg 0.10's VOC, detectron2's Cityscapes
voc_train_sample = functools.partial(_train_sample, "voc")
cityscapes_train_sample = functools.partial(_train_sample, "cityscapes")
TRAIN_SAMPLERS = {"voc": voc_train_sample, "cityscapes": cityscapes_train_sample}


# ------------------------------------------------------------------------------------ colour jitter

def planar_view(planes):
    """3×H×W planes -> H×W×3 view (no copy; torch.from_numpy(view).permute(2, 0, 1) is contiguous)."""
    return np.moveaxis(planes, 0, -1)


def planes_of(image):
    """H×W×3 image -> 3×H×W contiguous planes, without a copy when image is a planar_view."""
    return np.ascontiguousarray(np.moveaxis(image, -1, 0))


# BGR -> HSV uses 12-bit reciprocals rounded half to even (cvRound): S depends only on (max, min), H only on
# (g - b, b - r), so two tables are exact. HSV -> BGR: with H * (6/180) = sector + f the channels are v (max),
# v(1 - s) (min, tabulated by (s, v)) and v(1 - s*m) (middle; m = f or 1 - f by sector, computed per pixel in
# OpenCV's order), times 255, rounded half to even.
_HUE_OFFSET = 255 * 511 + 255  # hue table index: (g - b) * 511 + (b - r) + this, in [0, 511 * 511)


def _colour_tables():
    n = np.arange(256, dtype=np.float64)
    with np.errstate(divide="ignore"):
        s_recip = np.where(n > 0, np.rint((255 << 12) / n), 0).astype(np.int64)
        h_recip = np.where(n > 0, np.rint((180 << 12) / (6 * n)), 0).astype(np.int64)
    v, v_min = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    saturation = ((np.maximum(v - v_min, 0) * s_recip[v] + 2048) >> 12).astype(np.uint8).reshape(-1)
    g_minus_b, b_minus_r = np.meshgrid(np.arange(-255, 256), np.arange(-255, 256), indexing="ij")
    b = np.maximum(np.maximum(0, -g_minus_b), b_minus_r)  # any b keeping all three >= 0 will do
    g, r = b + g_minus_b, b - b_minus_r
    v, v_min = np.maximum(np.maximum(b, g), r), np.minimum(np.minimum(b, g), r)
    diff = v - v_min
    numerator = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    hue = (numerator * h_recip[np.minimum(diff, 255)] + 2048) >> 12
    hue_table = np.where(hue < 0, hue + 180, hue).astype(np.uint8).reshape(-1)  # rows g - b, columns b - r
    scaled = np.arange(256, dtype=np.float32) * (np.float32(6.0) / np.float32(180))
    f = scaled - np.trunc(scaled)
    sector = (np.arange(256) // 30) % 6  # equals OpenCV's float sector for every uint8 H
    m = np.where(sector % 2 == 1, f, np.float32(1) - f)  # sectors 1, 3, 5 fall, 0, 2, 4 rise
    unit = np.arange(256, dtype=np.float32) * (np.float32(1.0) / np.float32(255.0))  # OpenCV's s, v scale
    middle = (np.float32(1) - unit[None, :] * m[:, None]).reshape(-1)  # indexed [h, s]
    low = np.rint((unit[None, :] * (np.float32(1) - unit[:, None])) * np.float32(255))  # indexed [s, v]
    return saturation, hue_table, middle, low.astype(np.uint8).reshape(-1)


def _key(high, low):
    """high * 256 + low as uint16, the index of the 256×256 tables."""
    key = np.left_shift(high, 8, dtype=np.uint16)
    return np.bitwise_or(key, low, out=key)


def _s_and_low(saturation):
    """Given S per (max, min) key (65536,) uint8: S | low << 8, low = HSV2BGR's smallest channel."""
    v = np.repeat(np.arange(256, dtype=np.uint8), 256)
    return saturation | (_LOW_OF_S_V.take(_key(saturation, v)).astype(np.uint16) << 8)


_S_OF_MAX_MIN, _H_OF_DIFFS, _MIDDLE_OF_H_S, _LOW_OF_S_V = _colour_tables()
_S_AND_LOW = _s_and_low(_S_OF_MAX_MIN)
_INV_255 = np.float32(1.0) / np.float32(255.0)
_BYTE_PAIRS = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)  # the two bytes of every uint16


def _hue(b, g, r, shift=0):
    """(OpenCV H + shift) mod 180 of uint8 B, G, R planes; the shift goes into the table, not the pixels."""
    key = np.subtract(g, b, dtype=np.int32)
    key *= 511
    key += np.subtract(b, r, dtype=np.int16)
    key += _HUE_OFFSET
    return _shifted_hue_table(shift % 180).take(key, mode="clip")


@functools.lru_cache(maxsize=None)
def _shifted_hue_table(shift):
    """_H_OF_DIFFS + shift mod 180 for 0 <= shift < 180. Cached: rebuilding the 261K-entry table costs
    about as much as a tenth of a 512×512 round trip, and only 37 shifts are ever drawn (~9.6 MB)."""
    return ((_H_OF_DIFFS.astype(np.uint16) + shift) % 180).astype(np.uint8) if shift else _H_OF_DIFFS


def _select(mask, if_true, if_false, out):
    """np.where(mask, if_true, if_false) for uint8 into out, with bit operations (several times faster)."""
    bits = mask.view(np.uint8)
    np.negative(bits, out=bits)  # True -> 0xFF
    change = np.bitwise_xor(if_true, if_false)
    np.bitwise_xor(if_false, np.bitwise_and(change, bits, out=change), out=out)


def _to_bgr(h, middle_key, v, low):
    """3×H×W B, G, R planes from the H and V planes, the (h, s) keys of the middle and the min channel."""
    middle = _MIDDLE_OF_H_S.take(middle_key, mode="clip")  # uint16 keys: always in range
    middle *= np.multiply(v, _INV_255, dtype=np.float32)
    middle *= np.float32(255)
    middle = np.rint(middle, out=middle).astype(np.uint8)
    wrapped = h % 180 if h.max() >= 180 else h  # OpenCV input may have H up to 255; sector k: H in [30k, 30k + 30)
    out = np.empty((3,) + h.shape, np.uint8)
    # B: min in sectors 0-1, v in 3-4; G: min in 4-5, v in 1-2; R: min in 2-3, v in 5 and 0
    _select(wrapped < 60, low, middle, out=out[0])
    _select(wrapped - np.uint8(90) < 60, v, out[0], out=out[0])
    _select(wrapped - np.uint8(120) < 60, low, middle, out=out[1])
    _select(wrapped - np.uint8(30) < 60, v, out[1], out=out[1])
    _select(wrapped - np.uint8(60) < 60, low, middle, out=out[2])
    _select(wrapped - np.uint8(30) < 120, out[2], v, out=out[2])
    return out


def _hsv_round_trip(planes, saturation_map=None, hue_shift=0):
    """BGR2HSV, S = saturation_map[S], H = (H + hue_shift) mod 180, HSV2BGR on 3×H×W uint8 planes."""
    b, g, r = planes
    v = np.maximum(np.maximum(b, g), r)
    table = _S_AND_LOW if saturation_map is None else _s_and_low(saturation_map[_S_OF_MAX_MIN])
    s_and_low = table.take(_key(v, np.minimum(np.minimum(b, g), r)), mode="clip")  # S and the min at once
    h = _hue(b, g, r, hue_shift)
    return _to_bgr(h, _key(h, s_and_low & 255), v, (s_and_low >> 8).astype(np.uint8))


def _affine_map(alpha, beta):
    """uint8 -> uint8 table of mmseg/detectron2 `convert`: clip(float32(x) * alpha + beta, 0, 255), truncated."""
    return np.clip(np.arange(256, dtype=np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)


def _map_planes(planes, table):
    """table[planes] for a (256,) uint8 table; looks up byte pairs in a 65536 table (half the lookups)."""
    flat = planes.reshape(-1)
    if flat.size % 2:
        return table.take(planes)
    pairs = table.take(_BYTE_PAIRS).view(np.uint16)
    return pairs.take(flat.view(np.uint16), mode="clip").view(np.uint8).reshape(planes.shape)


# Jitter parameters of one sample, int16 (JITTER_SIZE,): three 256-entry uint8 maps (brightness and a leading
# contrast composed; saturation; a trailing contrast), whether the saturation and hue steps happen, the hue shift.
PRE, SATURATION, POST = slice(0, 256), slice(256, 512), slice(512, 768)
SATURATION_ON, HUE_ON, HUE_SHIFT, JITTER_SIZE = 768, 769, 770, 771
_IDENTITY = np.arange(256, dtype=np.uint8)


def draw_jitter(rng, hue_high):
    """int16 (JITTER_SIZE,) parameters of mmseg PhotoMetricDistortion / detectron2 ColorAugSSD. Each step happens with
    probability 1/2, in this order: brightness (beta in [-32, 32)), contrast first (coin), contrast (alpha in [0.5,
    1.5)) if first, saturation (alpha in [0.5, 1.5)), hue (shift in [-18, hue_high): 18 for mmseg's numpy randint, 19
    for detectron2's inclusive randint), contrast if not first; brightness and contrast compose exactly into one map."""
    def maybe(draw, default=None):
        return draw() if rng.integers(2) else default
    pre = maybe(lambda: _affine_map(1, rng.uniform(-32, 32)), _IDENTITY)
    contrast_first = rng.integers(2)
    if contrast_first:
        pre = maybe(lambda: _affine_map(rng.uniform(0.5, 1.5), 0), _IDENTITY)[pre]
    saturation = maybe(lambda: _affine_map(rng.uniform(0.5, 1.5), 0))
    shift = maybe(lambda: int(rng.integers(-18, hue_high)))
    post = _IDENTITY if contrast_first else maybe(lambda: _affine_map(rng.uniform(0.5, 1.5), 0), _IDENTITY)
    params = np.zeros(JITTER_SIZE, np.int16)
    params[PRE], params[SATURATION], params[POST] = pre, _IDENTITY if saturation is None else saturation, post
    params[SATURATION_ON], params[HUE_ON], params[HUE_SHIFT] = saturation is not None, shift is not None, shift or 0
    return params


def apply_jitter_planes(planes, params):
    """Jitter 3×H×W uint8 planes (numpy) with draw_jitter parameters; identity maps are skipped.
    Every HSV step is its own uint8 round trip, as in the references (fusing two changes results)."""
    pre, post = params[PRE].astype(np.uint8), params[POST].astype(np.uint8)
    if not np.array_equal(pre, _IDENTITY):
        planes = _map_planes(planes, pre)
    if params[SATURATION_ON]:
        planes = _hsv_round_trip(planes, params[SATURATION].astype(np.uint8))
    if params[HUE_ON]:
        planes = _hsv_round_trip(planes, None, int(params[HUE_SHIFT]))
    if not np.array_equal(post, _IDENTITY):
        planes = _map_planes(planes, post)
    return planes


def jittered(image, params):
    """apply_jitter_planes on an H×W×3 image view (as the samplers return) -> H×W×3 view of the result."""
    return planar_view(apply_jitter_planes(planes_of(image), params))


# On the device: the same tables and operation order in int32/float32 torch ops, batched, no host synchronisation. On a
# CPU 5-10× slower than numpy (one thread: 17 vs 3.3 ms per 512×512 round trip), so the host keeps numpy.
@functools.lru_cache(maxsize=None)
def _device_tables(device):
    """(saturation, hue, middle, low) tables as int32 / float32 tensors on `device`, built once per device."""
    return tuple(torch.from_numpy(np.ascontiguousarray(table)).to(device=device, dtype=dtype) for table, dtype in (
        (_S_OF_MAX_MIN, torch.int), (_H_OF_DIFFS, torch.int), (_MIDDLE_OF_H_S, torch.float), (_LOW_OF_S_V, torch.int)))


def _round_trip_torch(x, maps, saturation_base, shift):
    """_hsv_round_trip on int32 N×3×H×W B, G, R values: S -> maps[saturation_base + S] (per-sample tables
    in the flat int32 `maps`, or unchanged when saturation_base is None), H -> (H + shift) mod 180."""
    saturation, hue, middle_table, low_table = _device_tables(x.device)
    b, g, r = x.unbind(1)
    v = torch.maximum(torch.maximum(b, g), r)
    s = saturation[v * 256 + torch.minimum(torch.minimum(b, g), r)]
    if saturation_base is not None:
        s = maps[s + saturation_base]
    h = hue[(g - b) * 511 + (b - r) + _HUE_OFFSET]
    if shift is not None:
        h = (h + shift) % 180
    middle = torch.round(middle_table[h * 256 + s] * (v.float() * _INV_255) * 255).int()  # as _to_bgr, sectors too
    low = low_table[s * 256 + v]
    blue = torch.where((h >= 90) & (h < 150), v, torch.where(h < 60, low, middle))
    green = torch.where((h >= 30) & (h < 90), v, torch.where(h >= 120, low, middle))
    red = torch.where((h >= 30) & (h < 150), torch.where((h >= 60) & (h < 120), low, middle), v)
    return torch.stack([blue, green, red], dim=1)


def apply_jitter(images, params):
    """apply_jitter_planes, bit for bit, on a batch on any device: uint8 N×3×H×W images, int16 N×JITTER_SIZE parameters
    -> uint8 N×3×H×W. Steps a sample did not draw are computed anyway and dropped by torch.where: nothing read back."""
    count = images.shape[0]
    params = params.to(torch.int32)
    maps = params[:, :POST.stop].contiguous().view(-1)  # the three 256-entry maps of every sample
    base = (torch.arange(count, device=images.device, dtype=torch.int32) * POST.stop).view(count, 1, 1, 1)
    x = maps[images.int() + base + PRE.start]
    drawn = lambda column: params[:, column].view(count, 1, 1, 1) != 0  # noqa: E731
    x = torch.where(drawn(SATURATION_ON), _round_trip_torch(x, maps, base[:, 0] + SATURATION.start, None), x)
    x = torch.where(drawn(HUE_ON), _round_trip_torch(x, maps, None, params[:, HUE_SHIFT].view(count, 1, 1)), x)
    return maps[x + base + POST.start].to(torch.uint8)
