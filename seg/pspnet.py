"""PSPNet (mmseg 0.10.0 R50-D8): ResNetV1c backbone, pyramid pooling head, auxiliary FCN head. Module names are
mmseg's: `state_dict()` equals tests/data/checkpoint_keys/mmseg_pspnet_r50_d8.txt key for key."""
import torch
import torch.nn.functional as F
from torch import nn

from seg.resnet import build_resnet_v1c, normalize_and_pad


class ConvBNReLU(nn.Module):
    """mmcv ConvModule layout: children `conv` (bias-free) and `bn`, then ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1)

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
