"""Backbones: input normalisation, ResNetV1c (PSPNet) and MSRA ResNet + FPN (PointRend). Module names follow the
reference checkpoints, so their weights load without renaming: mmcv's for ResNetV1c (`stem.0`, `layer1.0.downsample.1`),
detectron2's for the MSRA ResNet and FPN (`bottom_up.res4.22.conv2.norm`, `fpn_lateral3`; tests/data/checkpoint_keys/).
Reduced widths/blocks (a CPU demo) run exactly the same code as the full models."""
import torch
import torch.nn.functional as F
from torch import nn

from seg.files import UserError

EXPANSION = 4  # bottleneck output channels = 4 x its width
STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def normalize_and_pad(image, hw, mean, std, rgb, divisor):
    """A padded batch of BGR images -> network input. image: N×3×H×W uint8 (or float) in 0..255, BGR; hw: int N×2
    valid (height, width), padding at bottom/right; mean, std: 3 values in the model's channel order (RGB if `rgb`:
    flip BGR to RGB first); divisor: pad H, W up to a multiple of it (1 = none). Returns float32 N×3×H'×W':
    (x - mean) / std inside each valid area, exactly 0 elsewhere (both references pad after normalising: 0 = mean)."""
    x = image.float().flip(1) if rgb else image.float()
    mean, std = (torch.as_tensor(v, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) for v in (mean, std))
    x = (x - mean) / std
    height, width = x.shape[-2:]
    hw = hw.to(x.device)
    # A mask instead of a loop over images keeps hw on the device: no host sync per batch.
    rows = torch.arange(height, device=x.device).view(1, height, 1) < hw[:, 0].view(-1, 1, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, width) < hw[:, 1].view(-1, 1, 1)
    x = x.masked_fill(~(rows & cols).unsqueeze(1), 0.0)
    if image.is_contiguous(memory_format=torch.channels_last):  # masked_fill returns NCHW; keep the caller's NHWC
        x = x.contiguous(memory_format=torch.channels_last)
    pad_h, pad_w = -height % divisor, -width % divisor
    return F.pad(x, (0, pad_w, 0, pad_h), value=0.0) if pad_h or pad_w else x


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


def make_norm(kind, channels):
    """"bn": nn.BatchNorm2d (eps 1e-5, momentum 0.1; the trainer may convert it to SyncBN); "frozen"."""
    if kind == "bn":
        return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
    if kind == "frozen":
        return FrozenBatchNorm2d(channels)
    raise UserError(f"unknown norm {kind!r}; use 'bn' or 'frozen'")


def stage_blocks(depth, blocks):
    """Blocks per stage: `blocks` if given (a reduced demo model), else the standard layout of `depth`."""
    if blocks is not None:
        if len(blocks) != 4 or min(blocks) < 1:
            raise UserError(f"blocks must be 4 positive counts, one per stage (got {blocks!r})")
        return tuple(blocks)
    if depth not in STAGE_BLOCKS:
        raise UserError(f"ResNet depth {depth} is not supported; use one of {sorted(STAGE_BLOCKS)}")
    return STAGE_BLOCKS[depth]


def c2_msra_fill(conv):
    """detectron2/fvcore init for convs followed by ReLU: kaiming-normal (fan_out, relu), bias 0."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class BottleneckV1c(nn.Module):
    """mmcv "pytorch"-style bottleneck, stride and dilation on the 3x3 conv: in -> width (1x1) -> width (3x3)
    -> 4·width (1x1), plus the shortcut (`downsample`: strided 1x1 conv + norm when the shape changes), ReLU."""

    def __init__(self, in_channels, width, stride, dilation, norm):
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = make_norm(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = make_norm(norm, width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = make_norm(norm, out_channels)
        self.downsample = None if stride == 1 and in_channels == out_channels else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), make_norm(norm, out_channels))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = F.relu(self.bn2(self.conv2(y)), inplace=True)
        y = self.bn3(self.conv3(y))
        return F.relu(y + shortcut, inplace=True)


class ResNetV1c(nn.Module):
    """Deep-stem ResNet with dilated late stages (mmseg ResNetV1c). Built by build_resnet_v1c."""

    def __init__(self, blocks, dilations, strides, contract_dilation, stem_channels, base_channels, norm):
        super().__init__()
        # Deep stem, 3x3 convs 3 -> stem/2 -> stem/2 -> stem (first stride 2) + norm + ReLU: convs 0/3/6, norms 1/4/7
        half, stem = stem_channels // 2, []
        for cin, cout, stride in ((3, half, 2), (half, half, 1), (half, stem_channels, 1)):
            stem += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), make_norm(norm, cout),
                     nn.ReLU(inplace=True)]
        self.stem = nn.Sequential(*stem)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.out_channels, in_channels = [], stem_channels
        for i, (count, stride, dilation) in enumerate(zip(blocks, strides, dilations)):
            width = base_channels * 2**i
            # contract_dilation: the block that enters a dilated stage uses half the dilation.
            first = dilation // 2 if contract_dilation and dilation > 1 else dilation
            layer = [BottleneckV1c(in_channels, width, stride, first, norm)]
            layer += [BottleneckV1c(width * EXPANSION, width, 1, dilation, norm) for _ in range(count - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            in_channels = width * EXPANSION
            self.out_channels.append(in_channels)

    def forward(self, x):
        """x: N×3×H×W -> list of the 4 stage outputs (strides 4, 8, 8, 8 for the default D8 layout)."""
        x = self.maxpool(self.stem(x))
        outputs = []
        for i in range(len(self.out_channels)):
            x = getattr(self, f"layer{i + 1}")(x)
            outputs.append(x)
        return outputs


def build_resnet_v1c(depth=50, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), contract_dilation=True,
                     stem_channels=64, base_channels=64, norm="bn", blocks=None, zero_init_residual=True):
    """mmseg ResNetV1c, by default the R50-D8 PSPNet backbone (output stride 8). Stage i has width
    base_channels·2^i and outputs 4× that (256/512/1024/2048); `blocks` overrides `depth`'s block counts.
    mmcv's from-scratch init: convs as c2_msra_fill (= kaiming_init(mode="fan_out")), norms 1 / 0 (as built), and
    with zero_init_residual every bn3 weight 0 (each residual branch starts as the identity)."""
    model = ResNetV1c(stage_blocks(depth, blocks), dilations, strides, contract_dilation,
                      stem_channels, base_channels, norm)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            c2_msra_fill(module)
        elif zero_init_residual and isinstance(module, BottleneckV1c) and isinstance(module.bn3, nn.BatchNorm2d):
            nn.init.zeros_(module.bn3.weight)
    return model


class NormedConv2d(nn.Conv2d):
    """Bias-free conv with its norm as child `norm` (detectron2: `conv1.weight`, `conv1.norm.*`); no activation."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, norm="frozen"):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.norm = make_norm(norm, out_channels)

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
