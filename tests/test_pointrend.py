"""Tests for seg/pointrend.py: point maths against F.grid_sample and brute force, heads against hand-written
forward passes, the model against detectron2's checkpoint key list."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from seg.pointrend import (
    SemSegFPNHead,
    StandardPointHead,
    build_pointrend,
    point_sample,
    sample_labels_nearest,
    subdivision_inference,
    uncertain_point_coords_on_grid,
    uncertain_point_coords_with_randomness,
    uncertainty,
)
from seg.losses import pointrend_losses

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
# the key names and shapes of detectron2's published PointRend SemanticFPN R101 Cityscapes checkpoint
KEYS_FILE = Path(__file__).resolve().parent / "data" / "checkpoint_keys" / "detectron2_pointrend_r101_fpn.txt"


def grid_sample_points(features, points_xy, mode="bilinear"):
    """detectron2's point_sample: grid_sample at 2u − 1 with zero padding; N×C×P."""
    grid = (2 * points_xy - 1).unsqueeze(2)
    return F.grid_sample(features, grid, mode=mode, align_corners=False).squeeze(3)


def sort_uncertainty(logits):
    """Second-largest minus largest logit over dim 1, via a full descending sort."""
    ordered = logits.sort(dim=1, descending=True).values
    return ordered[:, 1:2] - ordered[:, 0:1]


def unit_coordinates(size):
    """Coordinates in [0, 1] on an axis of `size` pixels, biased to the cases that break samplers.
    Drawn as Python floats; the tensor holds their nearest fp32 values."""
    return st.one_of(
        st.floats(0, 1),
        st.integers(0, size).map(lambda k: k / size),  # cell borders, 0 and 1 included
        st.integers(0, size - 1).map(lambda k: (k + 0.5) / size),  # cell centres
        st.floats(0, 0.5 / size),  # outer half-pixel bands: neighbours fall off the map
        st.floats(1 - 0.5 / size, 1),
    )


@st.composite
def maps_and_points(draw, max_size=9):
    """(seed, N, C, H, W, points N×P×2 fp32)."""
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    h, w, p = draw(st.integers(1, max_size)), draw(st.integers(1, max_size)), draw(st.integers(1, 12))
    xs = draw(st.lists(unit_coordinates(w), min_size=n * p, max_size=n * p))
    ys = draw(st.lists(unit_coordinates(h), min_size=n * p, max_size=n * p))
    points = torch.tensor([xs, ys], dtype=torch.float32).T.reshape(n, p, 2)
    return draw(st.integers(0, 2**31 - 1)), n, c, h, w, points


def assert_close_scaled(actual, expected, rel=1e-5):
    """Relative error <= rel, measured against the largest magnitude of `expected` (values near 0 included)."""
    scale = expected.abs().max().clamp(min=1e-6).item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


@SETTINGS
@given(maps_and_points())
def test_point_sample_matches_grid_sample_values_and_gradients(case):
    seed, n, c, h, w, points = case
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, c, h, w, generator=generator)
    weights = torch.randn(n, c, points.shape[1], generator=generator)
    results = []
    for sampler in (point_sample, grid_sample_points):
        f = features.clone().requires_grad_()
        u = points.clone().requires_grad_()
        out = sampler(f, u)
        (out * weights).sum().backward()
        results.append((out.detach(), f.grad, u.grad))
    (out, grad_f, grad_u), (ref, ref_grad_f, ref_grad_u) = results
    assert out.dtype == torch.float32 and out.shape == (n, c, points.shape[1])
    assert_close_scaled(out, ref)
    assert_close_scaled(grad_f, ref_grad_f)
    assert_close_scaled(grad_u, ref_grad_u)


def test_point_sample_returns_fp32_for_half_features():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 5, 7, generator=generator).half()
    points = torch.rand(2, 11, 2, generator=generator)
    out = point_sample(features, points)
    assert out.dtype == torch.float32
    assert_close_scaled(out, grid_sample_points(features.float(), points))


@SETTINGS
@given(maps_and_points(max_size=12))
def test_sample_labels_nearest_matches_grid_sample(case):
    seed, n, _, h, w, points = case
    labels = torch.randint(0, 256, (n, h, w), generator=torch.Generator().manual_seed(seed))
    expected = grid_sample_points(labels[:, None].float(), points, mode="nearest")[:, 0].long()
    actual = sample_labels_nearest(labels, points)
    assert actual.dtype == torch.int64
    assert torch.equal(actual, expected)


def test_sample_labels_nearest_exact_on_every_border_and_centre():
    """Exhaustive over widths 1..300: u = k/W and (k + 0.5)/W, also divided by 4 (u < 1/4 loses bits in
    2u − 1). Here a plain fp32 x·W − 0.5 disagrees with grid_sample's fused rounding (e.g. W=97, u=1/97)."""
    for w in range(1, 301):
        k = torch.arange(w + 1, dtype=torch.float64)
        xs = torch.cat([k / w, (k + 0.5) / w, k / (4 * w), (k + 0.5) / (4 * w)]).float()
        points = torch.stack([xs, torch.full_like(xs, 0.5)], dim=1)[None]
        labels = torch.arange(1, w + 1).view(1, 1, w)  # label = column + 1, so 0 means "outside"
        expected = grid_sample_points(labels[:, None].float(), points, mode="nearest")[:, 0].long()
        assert torch.equal(sample_labels_nearest(labels, points), expected), f"width {w}"


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(2, 6), st.booleans())
def test_uncertainty_matches_sort(seed, c, integer_logits):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, c, 3, 4, generator=generator)
    if integer_logits:  # many ties between the two largest
        logits = logits.mul(2).round()
    actual = uncertainty(logits)
    assert actual.shape == (2, 1, 3, 4)
    assert torch.equal(actual, sort_uncertainty(logits))
    assert (actual <= 0).all()


@SETTINGS
@given(
    st.integers(0, 2**31 - 1), st.integers(1, 40), st.sampled_from([1, 1.5, 2, 3, 4]),
    st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.integers(1, 8), st.integers(1, 8),
)
def test_training_points_are_the_most_uncertain_candidates(seed, num_points, ratio, beta, h, w):
    n = 2
    logits = torch.randn(n, 4, h, w, generator=torch.Generator().manual_seed(seed + 1))
    coords = uncertain_point_coords_with_randomness(
        logits, num_points, ratio, beta, generator=torch.Generator().manual_seed(seed)
    )
    assert coords.shape == (n, num_points, 2) and coords.dtype == torch.float32
    assert ((coords >= 0) & (coords < 1)).all()
    # replay the generator: same candidates, then the same uniform draw
    replay = torch.Generator().manual_seed(seed)
    num_candidates, num_uncertain = int(num_points * ratio), int(beta * num_points)
    candidates = torch.rand(n, num_candidates, 2, generator=replay)
    uniform = torch.rand(n, num_points - num_uncertain, 2, generator=replay)
    candidate_uncertainty = sort_uncertainty(grid_sample_points(logits, candidates))[:, 0]
    for i in range(n):
        best = set(candidate_uncertainty[i].argsort(descending=True)[:num_uncertain].tolist())
        match = (coords[i, :num_uncertain, None, :] == candidates[i, None, :, :]).all(dim=2)
        assert (match.sum(dim=1) == 1).all()  # each important point is exactly one candidate
        assert set(match.float().argmax(dim=1).tolist()) == best
        tail = coords[i, num_uncertain:]
        assert torch.equal(tail, uniform[i])
        assert not (tail[:, None, :] == candidates[i, None, :, :]).all(dim=2).any()


def test_training_points_reject_bad_ratios():
    logits = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError):
        uncertain_point_coords_with_randomness(logits, 8, oversample_ratio=0.5)
    with pytest.raises(ValueError):
        uncertain_point_coords_with_randomness(logits, 8, importance_sample_ratio=1.5)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 9), st.integers(1, 9), st.integers(1, 100))
def test_on_grid_points_are_the_most_uncertain_cells(seed, h, w, num_points):
    n = 2
    uncertainty_map = torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(seed))  # no ties
    indices, coords = uncertain_point_coords_on_grid(uncertainty_map, num_points)
    count = min(h * w, num_points)
    assert indices.shape == (n, count) and coords.shape == (n, count, 2)
    flat = uncertainty_map.reshape(n, h * w)
    centres_x = torch.linspace(0.5 / w, 1 - 0.5 / w, w).expand(h, w)
    centres_y = torch.linspace(0.5 / h, 1 - 0.5 / h, h)[:, None].expand(h, w)
    centres = torch.stack([centres_x, centres_y], dim=2).reshape(h * w, 2)
    for i in range(n):
        ranked = sorted(range(h * w), key=lambda cell: -flat[i, cell].item())
        assert set(indices[i].tolist()) == set(ranked[:count])
        torch.testing.assert_close(coords[i], centres[indices[i]], rtol=0, atol=1e-6)
    # a cell centre samples its own cell: nearest lookup in a map of cell numbers returns the index
    cell_numbers = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w).expand(n, 1, h, w)
    assert torch.equal(grid_sample_points(cell_numbers, coords, mode="nearest")[:, 0].long(), indices)


def reference_subdivision(coarse, fine, point_head, steps, num_points):
    """Spec §3.5 with grid_sample, a sort for the ranking and boolean-mask assignment instead of scatter.
    Returns the refined map and, per step, (upsampled map, mask of replaced cells)."""
    refined, history = coarse, []
    for _ in range(steps):
        upsampled = F.interpolate(refined, scale_factor=2, mode="bilinear", align_corners=False)
        n, c, h, w = upsampled.shape
        order = sort_uncertainty(upsampled).reshape(n, h * w).argsort(dim=1, descending=True)
        chosen = order[:, : min(h * w, num_points)]
        cols, rows = chosen % w, chosen // w
        coords = torch.stack([(cols + 0.5) / w, (rows + 0.5) / h], dim=2).float()
        logits = point_head(grid_sample_points(fine, coords), grid_sample_points(coarse, coords))
        refined = upsampled.clone().reshape(n, c, h * w)
        mask = torch.zeros(n, h * w, dtype=torch.bool)
        for i in range(n):
            refined[i][:, chosen[i]] = logits[i]
            mask[i, chosen[i]] = True
        refined = refined.reshape(n, c, h, w)
        history.append((upsampled, mask.reshape(n, h, w)))
    return refined, history


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 2), st.integers(2, 5), st.integers(2, 6), st.integers(1, 80))
def test_subdivision_replaces_only_the_selected_cells(seed, steps, h, w, num_points):
    # h, w >= 2: upsampling a 1-pixel axis copies values, and tied uncertainties make any choice right
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # point head init
    point_head = StandardPointHead(num_classes=3, fine_channels=4, channels=8)
    coarse = torch.randn(2, 3, h, w, generator=generator)
    fine = torch.randn(2, 4, h, w, generator=generator)
    with torch.no_grad():
        actual = subdivision_inference(coarse, fine, point_head, steps, num_points)
        expected, history = reference_subdivision(coarse, fine, point_head, steps, num_points)
    assert actual.shape == (2, 3, h * 2**steps, w * 2**steps)
    assert_close_scaled(actual, expected)
    if steps == 1:  # the same upsampled map on both sides: untouched cells must be bit-identical
        upsampled, mask = history[0]
        keep = (~mask)[:, None].expand_as(upsampled)
        assert torch.equal(actual[keep], upsampled[keep])
        assert not torch.equal(actual[~keep], upsampled[~keep])


def test_coarse_head_matches_hand_written_forward():
    torch.manual_seed(0)
    head = SemSegFPNHead(num_classes=5, in_channels=8, channels=8, num_groups=4)
    features = {f"p{level}": torch.randn(2, 8, 64 >> level, 128 >> level) for level in (2, 3, 4, 5)}

    def conv_gn_relu(module, x):
        x = F.conv2d(x, module.weight, padding=1)
        return F.relu(F.group_norm(x, 4, module.norm.weight, module.norm.bias))

    total = 0
    for level in (2, 3, 4, 5):
        x = features[f"p{level}"]
        for i in range(max(1, level - 2)):
            x = conv_gn_relu(getattr(head, f"p{level}")[2 * i], x)
            if level > 2:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        total = total + x
    expected = F.conv2d(total, head.predictor.weight, head.predictor.bias)
    actual = head(features)
    assert actual.shape == (2, 5, 16, 32)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_point_head_matches_matrix_products_and_init():
    torch.manual_seed(0)
    head = StandardPointHead()  # full size: 275 -> 256 -> 256 -> 256 -> 19
    fine, coarse = torch.randn(2, 256, 30), torch.randn(2, 19, 30)
    x = torch.cat([fine, coarse], dim=1).transpose(1, 2)  # N×P×275
    for fc in (head.fc1, head.fc2, head.fc3):
        x = F.relu(x @ fc.weight[:, :, 0].T + fc.bias)
    expected = (x @ head.predictor.weight[:, :, 0].T + head.predictor.bias).transpose(1, 2)
    torch.testing.assert_close(head(fine, coarse), expected, rtol=1e-4, atol=1e-5)
    # init: kaiming normal fan_out (std sqrt(2/256)) for fc layers, N(0, 0.001) predictor, zero biases
    assert abs(head.fc2.weight.std().item() / math.sqrt(2 / 256) - 1) < 0.05
    assert abs(head.predictor.weight.std().item() / 0.001 - 1) < 0.1
    assert all(not module.bias.any() for module in (head.fc1, head.fc2, head.fc3, head.predictor))


def test_full_model_parameter_count_matches_detectron2():
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_pointrend()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 47_572_582
    state = model.state_dict()
    assert len(state) == 567 and "pixel_mean" not in state and "pixel_std" not in state
    assert state["sem_seg_head.point_head.fc1.weight"].shape == (256, 275, 1)


def test_full_model_state_dict_equals_detectron2_key_list():
    with torch.device("meta"):
        model = build_pointrend()
    keys = [(name, str(tuple(value.shape))) for name, value in model.state_dict().items()]
    lines = KEYS_FILE.read_text().splitlines()
    assert keys == [tuple(line.split("\t")) for line in lines if line and not line.startswith("#")]


def small_model(**kwargs):
    torch.manual_seed(0)
    return build_pointrend(
        fpn_channels=16, head_channels=8, head_groups=4, point_fc=16, stem_channels=8, base_channels=4,
        blocks=(1, 1, 1, 1), train_num_points=50, subdivision_num_points=300, **kwargs
    )


def test_small_model_train_and_eval_shapes():
    model = small_model()
    assert model.input_rgb is False and model.size_divisibility == 32
    assert model.pixel_mean.tolist() == pytest.approx([103.53, 116.28, 123.675])
    assert model.pixel_std.tolist() == [1.0, 1.0, 1.0]
    image = torch.randint(0, 256, (2, 3, 60, 120), dtype=torch.uint8)  # padded to 64×128
    hw = torch.tensor([[60, 120], [40, 100]])
    out = model.train()(image, hw)
    assert set(out) == {"coarse", "point_logits", "point_coords"}
    assert out["coarse"].shape == (2, 19, 16, 32) and out["coarse"].requires_grad
    assert out["point_logits"].shape == (2, 19, 50)
    assert out["point_coords"].shape == (2, 50, 2)
    assert ((out["point_coords"] >= 0) & (out["point_coords"] < 1)).all()
    with torch.no_grad():
        seg = model.eval()(image, hw)
    assert set(seg) == {"seg"} and seg["seg"].shape == (2, 19, 64, 128)
    assert torch.isfinite(seg["seg"]).all()


def test_point_loss_reaches_the_coarse_head():
    """coarse logits are not detached before point sampling (detectron2 point_rend/semantic_seg.py)."""
    model = small_model().train()
    image = torch.randint(0, 256, (2, 3, 64, 128), dtype=torch.uint8)
    out = model(image, torch.tensor([[64, 128], [64, 128]]))
    target = torch.randint(0, 19, out["point_logits"].shape[::2])
    F.cross_entropy(out["point_logits"], target).backward()
    coarse_predictor = model.sem_seg_head.coarse_sem_seg_head.predictor
    assert coarse_predictor.weight.grad is not None and coarse_predictor.weight.grad.abs().sum() > 0
    assert model.backbone.fpn_output5.weight.grad.abs().sum() > 0  # p5 only reaches the loss via coarse


# ---- seg/train.py pointrend_losses (it calls sample_labels_nearest) ----


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.floats(0, 1))
def test_pointrend_losses_match_cross_entropy(seed, ignored_fraction):
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(2, 5, 4, 8, generator=generator)
    point_logits = torch.randn(2, 5, 30, generator=generator)
    coords = torch.rand(2, 30, 2, generator=generator)
    label = torch.randint(0, 5, (2, 16, 32), generator=generator)
    label[torch.rand(2, 16, 32, generator=generator) < ignored_fraction] = 255
    losses = pointrend_losses({"coarse": coarse, "point_logits": point_logits, "point_coords": coords}, label)
    upsampled = F.interpolate(coarse, scale_factor=4, mode="bilinear", align_corners=False)
    point_labels = grid_sample_points(label[:, None].float(), coords, mode="nearest")[:, 0].long()
    expected = {
        "loss_sem_seg": F.cross_entropy(upsampled, label, ignore_index=255),
        "loss_sem_seg_point": F.cross_entropy(point_logits, point_labels, ignore_index=255),
    }
    assert set(losses) == set(expected)
    for key, value in expected.items():
        if torch.isnan(value):  # every pixel/point ignored: F.cross_entropy gives NaN, ours must give 0
            assert losses[key].item() == 0
        else:
            torch.testing.assert_close(losses[key], value, rtol=1e-5, atol=1e-6)


def test_pointrend_losses_are_zero_when_everything_is_ignored():
    outputs = {
        "coarse": torch.randn(1, 3, 4, 4, requires_grad=True),
        "point_logits": torch.randn(1, 3, 10, requires_grad=True),
        "point_coords": torch.rand(1, 10, 2),
    }
    losses = pointrend_losses(outputs, torch.full((1, 16, 16), 255))
    assert all(value.item() == 0 for value in losses.values())
    sum(losses.values()).backward()  # still differentiable: gradients are zero, not NaN
    assert torch.equal(outputs["point_logits"].grad, torch.zeros_like(outputs["point_logits"]))
