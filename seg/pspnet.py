"""PSPNet (mmseg 0.10.0 R50-D8): mmseg's ResNetV1c backbone, pyramid pooling head, auxiliary FCN head. Module names
follow mmcv's / mmseg's (`stem.0`, `layer1.0.downsample.1`), so checkpoints load unrenamed: `state_dict()` equals
tests/data/checkpoint_keys/mmseg_pspnet_r50_d8.txt key for key. Reduced widths/blocks run the same code."""
import torch
import torch.nn.functional as F
from torch import nn

from seg.data import normalize_and_pad
from seg.files import UserError

EXPANSION = 4  # bottleneck output channels = 4 x its width
STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}  # blocks per stage; pointrend.py's MSRA ResNet uses them too


def batch_norm(channels, norm="bn"):
    """mmcv's BN, nn.BatchNorm2d (eps 1e-5, momentum 0.1; the trainer may convert it to SyncBN): ResNetV1c's norm."""
    if norm != "bn":
        raise UserError(f"unknown norm {norm!r}; use 'bn' (PointRend's MSRA ResNet also takes 'frozen')")
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)


def stage_blocks(depth, blocks):
    """Blocks per stage: `blocks` if given (a reduced demo model), else the standard layout of `depth`."""
    if blocks is not None:
        if len(blocks) != 4 or min(blocks) < 1:
            raise UserError(f"blocks must be 4 positive counts, one per stage (got {blocks!r})")
        return tuple(blocks)
    if depth not in STAGE_BLOCKS:
        raise UserError(f"ResNet depth {depth} is not supported; use one of {sorted(STAGE_BLOCKS)}")
    return STAGE_BLOCKS[depth]


class BottleneckV1c(nn.Module):
    """mmcv "pytorch"-style bottleneck, stride and dilation on the 3x3 conv: in -> width (1x1) -> width (3x3)
    -> 4·width (1x1), plus the shortcut (`downsample`: strided 1x1 conv + norm when the shape changes), ReLU."""

    def __init__(self, in_channels, width, stride, dilation, norm):
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = batch_norm(width, norm)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = batch_norm(width, norm)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = batch_norm(out_channels, norm)
        self.downsample = None if stride == 1 and in_channels == out_channels else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), batch_norm(out_channels, norm))

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
            stem += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), batch_norm(cout, norm),
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
    mmcv's from-scratch init: convs kaiming_init(mode="fan_out"), norms 1 / 0 (as built), and
    with zero_init_residual every bn3 weight 0 (each residual branch starts as the identity)."""
    model = ResNetV1c(stage_blocks(depth, blocks), dilations, strides, contract_dilation,
                      stem_channels, base_channels, norm)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):  # all bias-free
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif zero_init_residual and isinstance(module, BottleneckV1c):
            nn.init.zeros_(module.bn3.weight)
    return model


class ConvBNReLU(nn.Module):
    """mmcv ConvModule layout: children `conv` (bias-free) and `bn`, then ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = batch_norm(out_channels)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class PSPHead(nn.Module):
    """Pyramid pooling, N×C_in×h×w -> logits N×K×h×w: per scale s, AdaptiveAvgPool2d(s) -> 1x1 ConvBNReLU -> bilinear
    resize back; concat [x, branches] -> 3x3 ConvBNReLU (`bottleneck`) -> Dropout2d -> 1x1 `conv_seg` (with bias)."""

    def __init__(self, in_channels, channels, num_classes, pool_scales, dropout):
        super().__init__()
        # Registered first, as in mmseg, so the state_dict key order matches the reference.
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout)
        # PyTorch's own adaptive pool: its bins overlap for e.g. 64/3 and a hand-written one would not match.
        self.psp_modules = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels, channels, 1))
                                         for s in pool_scales)
        self.bottleneck = ConvBNReLU(in_channels + len(pool_scales) * channels, channels, 3, padding=1)

    def forward(self, x):
        branches = [F.interpolate(branch(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
                    for branch in self.psp_modules]
        return self.conv_seg(self.dropout(self.bottleneck(torch.cat([x] + branches, dim=1))))


class FCNHead(nn.Module):
    """Auxiliary head, N×C_in×h×w -> logits N×K×h×w: 3x3 ConvBNReLU (`convs.0`) -> Dropout2d -> 1x1 `conv_seg`."""

    def __init__(self, in_channels, channels, num_classes, dropout):
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.convs = nn.Sequential(ConvBNReLU(in_channels, channels, 3, padding=1))

    def forward(self, x):
        return self.conv_seg(self.dropout(self.convs(x)))


class PSPNet(nn.Module):
    """Backbone stages 3 and 4 feed the auxiliary and the decode head. forward(image uint8 N×3×H×W BGR, hw int N×2 valid
    sizes, padded at bottom/right) -> logits N×K×ceil(H/8)×ceil(W/8), train {"seg", "aux"}, eval {"seg"}."""

    def __init__(self, backbone, decode_head, auxiliary_head):
        super().__init__()
        self.backbone, self.decode_head, self.auxiliary_head = backbone, decode_head, auxiliary_head
        # mmseg's ImageNet RGB mean/std; non-persistent, so the state_dict stays identical to mmseg's.
        self.register_buffer("pixel_mean", torch.tensor((123.675, 116.28, 103.53)), persistent=False)
        self.register_buffer("pixel_std", torch.tensor((58.395, 57.12, 57.375)), persistent=False)
        self.input_rgb, self.size_divisibility = True, 1

    def forward(self, image, hw):
        x = normalize_and_pad(image, hw, self.pixel_mean, self.pixel_std, self.input_rgb, self.size_divisibility)
        stages = self.backbone(x)
        outputs = {"seg": self.decode_head(stages[3])}
        if self.training:
            outputs["aux"] = self.auxiliary_head(stages[2])
        return outputs


def build_pspnet(num_classes=21, depth=50, base_channels=64, stem_channels=64, blocks=None, channels=512,
                 aux_channels=256, dropout=0.1, pool_scales=(1, 2, 3, 6)):
    """PSPNet R{depth}-D8 (dilations 1,1,2,4, strides 1,2,1,1, contract_dilation). The defaults give mmseg's
    pspnet_r50-d8 for VOC (48,977,034 parameters); a CPU demo shrinks widths and blocks, same code path."""
    backbone = build_resnet_v1c(depth, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), contract_dilation=True,
                                stem_channels=stem_channels, base_channels=base_channels, norm="bn", blocks=blocks)
    decode_head = PSPHead(backbone.out_channels[3], channels, num_classes, pool_scales, dropout)
    auxiliary_head = FCNHead(backbone.out_channels[2], aux_channels, num_classes, dropout)
    for head in (decode_head, auxiliary_head):
        # mmseg head init: ConvModule convs kaiming-normal (fan_out, relu), norms 1/0 (fresh), conv_seg normal(0, .01)/0
        for module in head.modules():
            if isinstance(module, ConvBNReLU):
                nn.init.kaiming_normal_(module.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(head.conv_seg.weight, mean=0.0, std=0.01)
        nn.init.zeros_(head.conv_seg.bias)
    return PSPNet(backbone, decode_head, auxiliary_head)
