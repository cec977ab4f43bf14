"""PointRend semantic segmentation (detectron2 SemanticFPN + PointRend, R101-FPN, Cityscapes) on detectron2's MSRA
ResNet + FPN. Module names follow detectron2's (`bottom_up.res4.22.conv2.norm`, `fpn_lateral3`), so checkpoints load
unrenamed (names, shapes: tests/data/checkpoint_keys/detectron2_pointrend_r101_fpn.txt); reduced models: same code.
Point maths uses gathers instead of F.grid_sample, so the loss path stays on the device (the Ascend port ran grid_sample
on the host) and autograd flows through the bilinear weights. Coordinates are (x, y) in [0, 1] of the padded input;
pixel centres sit at ((i + 0.5)/W, (j + 0.5)/H), as for grid_sample with align_corners=False."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.data import normalize_and_pad
from seg.pspnet import EXPANSION, batch_norm, stage_blocks

FPN_LEVELS = ("p2", "p3", "p4", "p5")
FPN_STRIDES = (4, 8, 16, 32)


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine terms (buffers; train()/eval() change nothing): y = x·scale + shift,
    scale = weight / sqrt(running_var + eps), shift = bias - running_mean·scale. Fresh: the identity (as detectron2)."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"


def c2_msra_fill(conv):
    """detectron2/fvcore init for convs followed by ReLU: kaiming-normal (fan_out, relu), bias 0."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class NormedConv2d(nn.Conv2d):
    """Bias-free conv, no activation, its norm ("frozen" or "bn") as child `norm` (detectron2: `conv1.norm.*`)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, norm="frozen"):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.norm = FrozenBatchNorm2d(out_channels) if norm == "frozen" else batch_norm(out_channels, norm)

    def forward(self, x):
        return self.norm(super().forward(x))


class BottleneckMSRA(nn.Module):
    """MSRA bottleneck, stride on the first 1x1 conv (stride_in_1x1); the shortcut is a strided 1x1 conv + norm
    when the channel count changes (first block of a stage), else the identity."""

    def __init__(self, in_channels, width, stride, norm):
        super().__init__()
        out_channels = width * EXPANSION
        self.shortcut = (NormedConv2d(in_channels, out_channels, 1, stride=stride, norm=norm)
                         if in_channels != out_channels else None)
        self.conv1 = NormedConv2d(in_channels, width, 1, stride=stride, norm=norm)
        self.conv2 = NormedConv2d(width, width, 3, padding=1, norm=norm)
        self.conv3 = NormedConv2d(width, out_channels, 1, norm=norm)

    def forward(self, x):
        shortcut = x if self.shortcut is None else self.shortcut(x)
        y = F.relu(self.conv1(x), inplace=True)
        y = F.relu(self.conv2(y), inplace=True)
        return F.relu(self.conv3(y) + shortcut, inplace=True)


class StemMSRA(nn.Module):
    """7x7 stride-2 conv + norm + ReLU, then 3x3 stride-2 max-pool (floor mode): output stride 4."""

    def __init__(self, out_channels, norm):
        super().__init__()
        self.conv1 = NormedConv2d(3, out_channels, 7, stride=2, padding=3, norm=norm)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.conv1(x), inplace=True), kernel_size=3, stride=2, padding=1)


class ResNetMSRA(nn.Module):
    """detectron2-style ResNet; forward(x) -> {"res2".."res5"} at strides 4, 8, 16, 32."""

    def __init__(self, blocks, stem_channels, base_channels, norm):
        super().__init__()
        self.stem = StemMSRA(stem_channels, norm)
        self.out_channels, in_channels = {}, stem_channels
        for i, count in enumerate(blocks):
            name, width, stride = f"res{i + 2}", base_channels * 2**i, 1 if i == 0 else 2
            layer = [BottleneckMSRA(in_channels, width, stride, norm)]
            layer += [BottleneckMSRA(width * EXPANSION, width, 1, norm) for _ in range(count - 1)]
            self.add_module(name, nn.Sequential(*layer))
            in_channels = width * EXPANSION
            self.out_channels[name] = in_channels

    def forward(self, x):
        """x: N×3×H×W -> dict res2..res5, N×C×(H/s)×(W/s) for s = 4, 8, 16, 32."""
        x = self.stem(x)
        outputs = {}
        for name in self.out_channels:
            x = getattr(self, name)(x)
            outputs[name] = x
        return outputs


def build_resnet_msra(depth=101, stem_channels=64, base_channels=64, norm="frozen", blocks=None):
    """MSRA ResNet (detectron2 R-50/R-101, FrozenBN everywhere, no stage frozen), convs c2_msra_fill'ed.
    Stage res{i+2} has width base_channels·2^i and outputs 4× that; `blocks` overrides `depth`'s block counts."""
    model = ResNetMSRA(stage_blocks(depth, blocks), stem_channels, base_channels, norm)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            c2_msra_fill(module)
    return model


class FPN(nn.Module):
    """Feature pyramid p2..p5 on an MSRA ResNet, all `out_channels` wide, sum fusion, no p6. Children are named
    and registered as in detectron2, so state_dict() lists the reference checkpoint's keys in its order."""

    def __init__(self, bottom_up, out_channels):
        super().__init__()
        for level in (2, 3, 4, 5):
            lateral = nn.Conv2d(bottom_up.out_channels[f"res{level}"], out_channels, 1)
            output = nn.Conv2d(out_channels, out_channels, 3, padding=1)
            for conv in (lateral, output):  # detectron2's c2_xavier_fill: kaiming-uniform with a=1, bias 0
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)
            self.add_module(f"fpn_lateral{level}", lateral)
            self.add_module(f"fpn_output{level}", output)
        self.bottom_up = bottom_up

    def forward(self, x):
        """x: N×3×H×W (H, W multiples of 32) -> {"p2": N×C×H/4×W/4, ..., "p5": N×C×H/32×W/32}."""
        features = self.bottom_up(x)
        merged = self.fpn_lateral5(features["res5"])
        outputs = {"p5": self.fpn_output5(merged)}
        for level in (4, 3, 2):
            lateral = getattr(self, f"fpn_lateral{level}")(features[f"res{level}"])
            # size= as the NPU interpolate has no scale_factor; with H, W multiples of 32 this is nearest x2
            merged = lateral + F.interpolate(merged, size=lateral.shape[-2:], mode="nearest")
            outputs[f"p{level}"] = getattr(self, f"fpn_output{level}")(merged)
        return {name: outputs[name] for name in ("p2", "p3", "p4", "p5")}


def build_resnet_fpn(depth=101, out_channels=256, stem_channels=64, base_channels=64, norm="frozen", blocks=None):
    """PointRend backbone, MSRA ResNet (`bottom_up`) + FPN: forward(x) -> {"p2".."p5"}. With the defaults,
    state_dict() equals the `backbone.` entries of the detectron2 R101-FPN checkpoint."""
    return FPN(build_resnet_msra(depth, stem_channels, base_channels, norm, blocks), out_channels)


def _pixel_coordinate(unit, size, single_rounding=False):
    """Unit coordinates in [0, 1] -> fp32 pixel coordinates u·size − 0.5 (pixel centres at integers), evaluated as
    grid_sample does from its grid value 2u − 1: ((2u − 1) + 1)·size/2 − 0.5 (for u < 1/4, 2u − 1 drops low bits of
    u that can decide nearest ties). grid_sample's kernels fuse the final multiply-add (one rounding); fp32 here
    rounds twice, off by at most one ulp: harmless for bilinear weights, but it can turn a near-tie into an exact
    tie, so single_rounding=True computes it in fp64 (exact) and rounds to fp32 once."""
    grid = 2.0 * unit.float() - 1.0
    if single_rounding:
        return ((grid + 1.0).double() * (size / 2) - 0.5).float()
    return (grid + 1.0) * (size / 2) - 0.5


def point_sample(features, points_xy):
    """= grid_sample(features, 2u − 1, align_corners=False), zero padding: bilinear samples of N×C×H×W features (any
    float dtype) at N×P×2 points_xy, (x, y) in [0, 1] -> N×C×P fp32 (as under autocast), differentiable in both."""
    (n, c, h, w), p = features.shape, points_xy.shape[1]
    px, py = _pixel_coordinate(points_xy[..., 0], w), _pixel_coordinate(points_xy[..., 1], h)
    x0, y0 = px.floor(), py.floor()
    fx, fy = px - x0, py - y0  # weights of the +1 neighbours; floor() passes no gradient
    xs = torch.stack([x0, x0 + 1, x0, x0 + 1], dim=1)  # N×4×P: the four neighbours
    ys = torch.stack([y0, y0, y0 + 1, y0 + 1], dim=1)
    weights = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], dim=1)
    inside = (xs >= 0) & (xs <= w - 1) & (ys >= 0) & (ys <= h - 1)
    weights = weights * inside  # zero padding: outside neighbours contribute nothing, value or gradient
    # clamp before .long() so far-away points cannot overflow; their weight is already 0
    index = ys.clamp(0, h - 1).long() * w + xs.clamp(0, w - 1).long()
    flat = features.float().reshape(n, c, h * w)
    values = flat.gather(2, index.reshape(n, 1, 4 * p).expand(n, c, 4 * p)).reshape(n, c, 4, p)
    return (values * weights[:, None]).sum(dim=2)


def sample_labels_nearest(labels, points_xy):
    """Nearest label at each point, exactly detectron2's point targets: grid_sample(labels[:, None].float(), 2u − 1,
    mode="nearest", align_corners=False).long(). labels: N×H×W int64; points_xy: N×P×2 in [0, 1] -> N×P int64. Ties
    (u·W − 0.5 = k + 0.5) round half to even; a pixel outside the map gives 0, not 255 (never for u in [0, 1))."""
    n, h, w = labels.shape
    # fp64 only for this N×P index maths (no autograd); torch.round is half-to-even like grid_sample
    col = _pixel_coordinate(points_xy[..., 0], w, single_rounding=True).round()
    row = _pixel_coordinate(points_xy[..., 1], h, single_rounding=True).round()
    inside = (col >= 0) & (col <= w - 1) & (row >= 0) & (row <= h - 1)
    index = row.clamp(0, h - 1).long() * w + col.clamp(0, w - 1).long()
    return labels.reshape(n, h * w).gather(1, index).masked_fill(~inside, 0)


def uncertainty(logits):
    """Second-largest minus largest logit over dim 1: N×C×... -> N×1×..., values <= 0, highest = most
    uncertain. sorted=True because the NPU topk does not support sorted=False."""
    top2 = logits.topk(2, dim=1, sorted=True).values
    return top2[:, 1:2] - top2[:, 0:1]


@torch.no_grad()
def uncertain_point_coords_with_randomness(coarse_logits, num_points, oversample_ratio=3, importance_sample_ratio=0.75,
                                           generator=None):
    """Training points (detectron2 `projects/PointRend/point_rend/point_features.py`): the int(β·P) most uncertain of
    int(k·P) uniform candidates (uncertainty of the interpolated logits), then P − int(β·P) fresh uniform points.
    coarse_logits: N×C×h×w -> N×P×2 in [0, 1), important first. generator: a torch.Generator on its device or None."""
    if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"need oversample_ratio >= 1 and 0 <= importance_sample_ratio <= 1, "
                         f"got {oversample_ratio} and {importance_sample_ratio}")
    n, device = coarse_logits.shape[0], coarse_logits.device
    num_candidates, num_uncertain = int(num_points * oversample_ratio), int(importance_sample_ratio * num_points)
    candidates = torch.rand(n, num_candidates, 2, device=device, generator=generator)
    candidate_uncertainty = uncertainty(point_sample(coarse_logits, candidates))[:, 0]  # N×S
    chosen = candidate_uncertainty.topk(num_uncertain, dim=1, sorted=True).indices  # N×K
    important = candidates.gather(1, chosen[..., None].expand(n, num_uncertain, 2))
    uniform = torch.rand(n, num_points - num_uncertain, 2, device=device, generator=generator)
    return torch.cat([important, uniform], dim=1)


def uncertain_point_coords_on_grid(uncertainty_map, num_points):
    """The min(H·W, num_points) most uncertain cells of an N×1×H×W map: (indices N×n int64 into the flat map,
    coords N×n×2 fp32 cell centres ((i mod W) + 0.5)/W, ((i div W) + 0.5)/H)."""
    n, _, h, w = uncertainty_map.shape
    count = min(h * w, num_points)
    indices = uncertainty_map.reshape(n, h * w).topk(count, dim=1, sorted=True).indices
    cols, rows = (indices % w).float(), torch.div(indices, w, rounding_mode="floor").float()
    return indices, torch.stack([(cols + 0.5) / w, (rows + 0.5) / h], dim=2)


def subdivision_inference(coarse, fine_features, point_head, steps=2, num_points=8192):
    """detectron2 `point_rend/semantic_seg.py` inference: `steps` times upsample ×2 and overwrite the most uncertain
    cells with the point head's logits, which always sees the ORIGINAL coarse logits. coarse: N×C×h×w;
    fine_features: N×F×h×w (p2) -> fp32 N×C×(h·2^steps)×(w·2^steps)."""
    refined = coarse.float()
    for _ in range(steps):
        refined = Upsample2x.forward(refined)
        n, c, h, w = refined.shape
        indices, coords = uncertain_point_coords_on_grid(uncertainty(refined), num_points)
        point_logits = point_head(point_sample(fine_features, coords), point_sample(coarse, coords))
        # scatter in fp32: point_head may run in fp16 under autocast, and the NPU scatter wants fp16/fp32
        index = indices[:, None].expand(n, c, indices.shape[1])
        refined = refined.reshape(n, c, h * w).scatter(2, index, point_logits.float()).reshape(n, c, h, w)
    return refined


class ConvGNReLU(nn.Conv2d):
    """3×3 conv without bias -> GroupNorm -> ReLU; the norm is a child named `norm` as in detectron2."""

    def __init__(self, in_channels, out_channels, num_groups):
        super().__init__(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(num_groups, out_channels)
        c2_msra_fill(self)

    def forward(self, x):
        return F.relu(self.norm(super().forward(x)))


class Upsample2x(nn.Module):
    """Bilinear ×2 (align_corners=False) with an explicit size, as the NPU interpolate has no scale_factor. A module
    to keep detectron2's Sequential indices (p4.2, p5.4)."""

    @staticmethod
    def forward(x):
        return F.interpolate(x, size=(2 * x.shape[-2], 2 * x.shape[-1]), mode="bilinear", align_corners=False)


class SemSegFPNHead(nn.Module):
    """detectron2 SemSegFPNHead (`detectron2/modeling/meta_arch/semantic_seg.py`): per level max(1, log2(stride/4))
    conv-GN-ReLU (+ ×2 upsampling but at stride 4), summed, a 1×1 predictor: {"p2".."p5"} -> N×K×H/4×W/4 logits."""

    def __init__(self, num_classes=19, in_channels=256, channels=128, num_groups=32):
        super().__init__()
        for level, stride in zip(FPN_LEVELS, FPN_STRIDES):
            layers = []
            for i in range(max(1, stride.bit_length() - 3)):
                layers.append(ConvGNReLU(in_channels if i == 0 else channels, channels, num_groups))
                if stride != 4:
                    layers.append(Upsample2x())
            self.add_module(level, nn.Sequential(*layers))
        self.predictor = nn.Conv2d(channels, num_classes, 1)
        c2_msra_fill(self.predictor)

    def forward(self, features):
        return self.predictor(sum(getattr(self, level)(features[level]) for level in FPN_LEVELS))


class StandardPointHead(nn.Module):
    """Per-point MLP (detectron2 `projects/PointRend/point_rend/point_head.py` StandardPointHead) as 1×1 Conv1d:
    concat(fine N×F×P, coarse N×C×P) -> 3×(fc + ReLU) -> predictor -> N×num_classes×P."""

    def __init__(self, num_classes=19, fine_channels=256, channels=256):
        super().__init__()
        self.fc1 = nn.Conv1d(fine_channels + num_classes, channels, 1)
        self.fc2 = nn.Conv1d(channels, channels, 1)
        self.fc3 = nn.Conv1d(channels, channels, 1)
        self.predictor = nn.Conv1d(channels, num_classes, 1)
        for fc in (self.fc1, self.fc2, self.fc3):
            c2_msra_fill(fc)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, fine, coarse):
        x = torch.cat([fine, coarse], dim=1)
        for fc in (self.fc1, self.fc2, self.fc3):
            x = F.relu(fc(x))
        return self.predictor(x)


class PointRendSemSegHead(nn.Module):
    """Coarse head + point head, with the point settings of `pointrend_semantic_R_101_FPN_1x_cityscapes.yaml`:
    `train_points` (num_points, oversample_ratio, importance_sample_ratio) and `subdivision` (steps, num_points)."""

    def __init__(self, coarse_sem_seg_head, point_head, train_points, subdivision):
        super().__init__()
        self.coarse_sem_seg_head, self.point_head = coarse_sem_seg_head, point_head
        self.train_points, self.subdivision = train_points, subdivision

    def forward(self, features):
        """features {"p2".."p5"} -> train: {"coarse", "point_logits", "point_coords"}; eval: {"seg"}."""
        coarse = self.coarse_sem_seg_head(features)
        if not self.training:
            return {"seg": subdivision_inference(coarse, features["p2"], self.point_head, *self.subdivision)}
        coords = uncertain_point_coords_with_randomness(coarse, *self.train_points)
        # coarse is not detached: the point loss trains the coarse head and backbone too (as detectron2)
        point_logits = self.point_head(point_sample(features["p2"], coords), point_sample(coarse, coords))
        return {"coarse": coarse, "point_logits": point_logits, "point_coords": coords}


class PointRend(nn.Module):
    """ResNet-FPN + PointRendSemSegHead; forward(image uint8 N×3×H×W BGR, hw int64 N×2) at the padded H'×W' (multiples
    of 32): train {"coarse": N×C×H'/4×W'/4, "point_logits": N×C×P, "point_coords": N×P×2}, eval {"seg": N×C×H'×W'}."""

    def __init__(self, backbone, sem_seg_head):
        super().__init__()
        self.backbone, self.sem_seg_head = backbone, sem_seg_head
        # MSRA weights: BGR 0-255 input, std folded into conv1. Not persistent: detectron2 checkpoints lack them.
        self.register_buffer("pixel_mean", torch.tensor([103.53, 116.28, 123.675]), persistent=False)
        self.register_buffer("pixel_std", torch.tensor([1.0, 1.0, 1.0]), persistent=False)
        self.input_rgb = False
        self.size_divisibility = 32  # res5's stride: every FPN top-down step is then exactly ×2

    def forward(self, image, hw):
        x = normalize_and_pad(image, hw, self.pixel_mean, self.pixel_std, self.input_rgb, self.size_divisibility)
        return self.sem_seg_head(self.backbone(x))


def build_pointrend(num_classes=19, depth=101, fpn_channels=256, head_channels=128, head_groups=32,
                    point_fc=256, train_num_points=2048, oversample_ratio=3, importance_sample_ratio=0.75,
                    subdivision_steps=2, subdivision_num_points=8192, **backbone_kwargs):
    """detectron2's pointrend_semantic_R_101_FPN_1x_cityscapes. backbone_kwargs go to build_resnet_fpn (e.g.
    reduced widths); head_groups must divide head_channels."""
    backbone = build_resnet_fpn(depth=depth, out_channels=fpn_channels, **backbone_kwargs)
    head = PointRendSemSegHead(SemSegFPNHead(num_classes, fpn_channels, head_channels, head_groups),
                               StandardPointHead(num_classes, fpn_channels, point_fc),
                               (train_num_points, oversample_ratio, importance_sample_ratio),
                               (subdivision_steps, subdivision_num_points))
    return PointRend(backbone, head)
