"""Backbones and PSPNet: checkpoint layouts, parameter counts, shapes, and wiring against functional references.

Full-size models are built on the meta device (no memory, no init cost); anything that runs uses a reduced model
built by the same builders.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from seg.data import normalize_and_pad
from seg.pointrend import BottleneckMSRA, FrozenBatchNorm2d, build_resnet_fpn, build_resnet_msra
from seg.pspnet import BottleneckV1c, build_pspnet, build_resnet_v1c

REPO = Path(__file__).resolve().parents[1]
# key names and shapes of the published checkpoints (mmseg's pspnet_r50-d8 VOC12aug file, detectron2's PointRend
# SemanticFPN R101 Cityscapes file), listed once from those files: test data, kept in the repository
KEYS_DIR = REPO / "tests" / "data" / "checkpoint_keys"
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def reference_keys(filename, prefix=""):
    """[(key without prefix, shape tuple)] in file order, for keys starting with prefix."""
    entries = []
    for line in (KEYS_DIR / filename).read_text().splitlines():
        if line.startswith("#") or not line.startswith(prefix):
            continue
        key, shape = line.split("\t")
        dims = shape.strip("()").replace(" ", "").split(",")
        entries.append((key[len(prefix):], tuple(int(d) for d in dims if d)))
    return entries


def state_dict_shapes(model):
    return [(key, tuple(value.shape)) for key, value in model.state_dict().items()]


def trainable_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def tiny_pspnet(**overrides):
    args = dict(num_classes=5, base_channels=8, stem_channels=8, blocks=(1, 1, 1, 1), channels=16, aux_channels=8)
    return build_pspnet(**{**args, **overrides})


def tiny_fpn():
    return build_resnet_fpn(out_channels=16, stem_channels=8, base_channels=4, blocks=(1, 2, 1, 1))


def randomize_norms(model, seed=0):
    """Non-trivial statistics and affine terms in every norm, so a wrong norm placement shows up."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            n = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)


def eval_bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


# ---------------------------------------------------------------- checkpoint layouts and parameter counts


def test_pspnet_state_dict_equals_mmseg_keys_and_param_count():
    with torch.device("meta"):
        model = build_pspnet()
    reference = reference_keys("mmseg_pspnet_r50_d8.txt")
    assert state_dict_shapes(model) == reference
    reference_params = sum(int(np.prod(shape)) for key, shape in reference if not key.endswith(BUFFER_SUFFIXES))
    assert trainable_count(model) == reference_params == 48_977_034
    # The trainer converts BN to SyncBN; names must survive it.
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert state_dict_shapes(synced) == reference


def test_fpn_state_dict_equals_detectron2_backbone_keys():
    with torch.device("meta"):
        model = build_resnet_fpn()
    reference = reference_keys("detectron2_pointrend_r101_fpn.txt", prefix="backbone.")
    assert state_dict_shapes(model) == reference
    # FrozenBN statistics and affine terms are buffers: only conv weights and FPN biases train.
    names = [name for name, _ in model.named_parameters()]
    assert names and not any(".norm." in name for name in names)
    reference_params = sum(int(np.prod(shape)) for key, shape in reference if ".norm." not in key)
    assert trainable_count(model) == reference_params == 45_739_200


def test_reduced_models_use_the_full_layout():
    """Same builders, fewer channels: key names are identical and every shape is the full one or 1/4 of it."""
    with torch.device("meta"):
        full, small = build_pspnet(), build_pspnet(base_channels=16, stem_channels=16, channels=128, aux_channels=64)
    full_shapes, small_shapes = dict(state_dict_shapes(full)), dict(state_dict_shapes(small))
    assert list(full_shapes) == list(small_shapes)
    for key, shape in full_shapes.items():
        assert all(s in (f, f // 4) for s, f in zip(small_shapes[key], shape)), key
    assert [type(m) for m in full.modules()] == [type(m) for m in small.modules()]


# ---------------------------------------------------------------- layer tables from the specs


def test_v1c_d8_strides_and_contract_dilation_follow_spec_table():
    with torch.device("meta"):
        backbone = build_pspnet().backbone
        deep = build_resnet_v1c(depth=101)
    # stage: (stride, dilation of block 0, dilation of later blocks), pspnet.md §2.2
    table = {1: (1, 1, 1), 2: (2, 1, 1), 3: (1, 1, 2), 4: (1, 2, 4)}
    for stage, (stride, first, rest) in table.items():
        layer = getattr(backbone, f"layer{stage}")
        assert len(layer) == (3, 4, 6, 3)[stage - 1]
        for index, block in enumerate(layer):
            dilation = first if index == 0 else rest
            assert block.conv2.dilation == block.conv2.padding == (dilation, dilation)
            assert block.conv2.stride == ((stride, stride) if index == 0 else (1, 1))
            assert block.conv1.stride == block.conv3.stride == (1, 1)
        assert layer[0].downsample[0].stride == (stride, stride)
        assert all(block.downsample is None for block in layer[1:])
    assert [len(getattr(deep, f"layer{i}")) for i in (1, 2, 3, 4)] == [3, 4, 23, 3]
    assert [m.stride for m in backbone.stem if isinstance(m, nn.Conv2d)] == [(2, 2), (1, 1), (1, 1)]


def test_msra_stride_sits_in_first_1x1_conv():
    with torch.device("meta"):
        resnet = build_resnet_msra(depth=101)
    assert [len(getattr(resnet, f"res{i}")) for i in (2, 3, 4, 5)] == [3, 4, 23, 3]
    for stage in (2, 3, 4, 5):
        layer = getattr(resnet, f"res{stage}")
        stride = 1 if stage == 2 else 2
        assert layer[0].conv1.stride == layer[0].shortcut.stride == (stride, stride)
        assert all(block.conv2.stride == (1, 1) and block.conv2.dilation == (1, 1) for block in layer)
        assert all(block.shortcut is None for block in layer[1:])
    assert resnet.stem.conv1.kernel_size == (7, 7) and resnet.stem.conv1.stride == (2, 2)


# ---------------------------------------------------------------- normalisation


def test_frozen_batchnorm_equals_eval_batchnorm():
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(6).eval()
    frozen = FrozenBatchNorm2d(6)
    randomize_norms(reference, seed=1)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(frozen, name).copy_(getattr(reference, name).detach())
    x = torch.randn(2, 6, 5, 7) * 3
    frozen.train()  # train mode must not matter
    torch.testing.assert_close(frozen(x), reference(x).detach(), rtol=1e-5, atol=1e-5)
    assert list(frozen.parameters()) == []
    torch.testing.assert_close(FrozenBatchNorm2d(6)(x), x)  # fresh one is the identity


def test_normalize_and_pad_hand_worked_case():
    blue = [[11, 19, 250], [7, 7, 7]]
    green = [[22, 6, 0], [1, 1, 1]]
    red = [[41, 3, 255], [2, 2, 2]]
    image = torch.tensor([[blue, green, red], [[[9] * 3] * 2] * 3], dtype=torch.uint8)  # 2×3×2×3, BGR
    hw = torch.tensor([[1, 2], [2, 3]])
    out = normalize_and_pad(image, hw, mean=(1, 2, 3), std=(2, 4, 8), rgb=True, divisor=4)
    expected = torch.zeros(2, 3, 4, 4)
    # image 0: only row 0, cols 0-1 are valid; channels now R, G, B.
    expected[0, 0, 0, :2] = torch.tensor([(41 - 1) / 2, (3 - 1) / 2])
    expected[0, 1, 0, :2] = torch.tensor([(22 - 2) / 4, (6 - 2) / 4])
    expected[0, 2, 0, :2] = torch.tensor([(11 - 3) / 8, (19 - 3) / 8])
    expected[1, :, :2, :3] = torch.tensor([(9 - 1) / 2, (9 - 2) / 4, (9 - 3) / 8]).view(3, 1, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_normalize_and_pad_matches_per_pixel_loop(data):
    n, height, width = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    divisor, rgb = data.draw(st.sampled_from([1, 4, 32])), data.draw(st.booleans())
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(n, 3, height, width), dtype=np.uint8)
    hw = np.stack([rng.integers(1, height + 1, n), rng.integers(1, width + 1, n)], axis=1)
    mean, std = rng.uniform(0, 255, 3), rng.uniform(1, 80, 3)
    out = normalize_and_pad(torch.from_numpy(image), torch.from_numpy(hw), mean, std, rgb, divisor).numpy()
    out_h, out_w = -(-height // divisor) * divisor, -(-width // divisor) * divisor
    expected = np.zeros((n, 3, out_h, out_w), dtype=np.float64)
    for i in range(n):
        for c in range(3):
            source = 2 - c if rgb else c
            for y in range(hw[i, 0]):
                for x in range(hw[i, 1]):
                    expected[i, c, y, x] = (float(image[i, source, y, x]) - mean[c]) / std[c]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- blocks against functional references


def test_v1c_bottleneck_matches_functional_reference():
    torch.manual_seed(0)
    block = BottleneckV1c(8, 4, stride=2, dilation=2, norm="bn").eval()
    randomize_norms(block)
    x = torch.randn(2, 8, 9, 11)
    y = F.relu(eval_bn(F.conv2d(x, block.conv1.weight), block.bn1))
    y = F.relu(eval_bn(F.conv2d(y, block.conv2.weight, stride=2, padding=2, dilation=2), block.bn2))
    y = eval_bn(F.conv2d(y, block.conv3.weight), block.bn3)
    shortcut = eval_bn(F.conv2d(x, block.downsample[0].weight, stride=2), block.downsample[1])
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.relu(y + shortcut))


def test_msra_bottleneck_matches_functional_reference():
    torch.manual_seed(0)
    block = BottleneckMSRA(8, 4, stride=2, norm="frozen")
    randomize_norms(block)
    x = torch.randn(2, 8, 9, 11)
    y = F.relu(eval_bn(F.conv2d(x, block.conv1.weight, stride=2), block.conv1.norm))
    y = F.relu(eval_bn(F.conv2d(y, block.conv2.weight, padding=1), block.conv2.norm))
    y = eval_bn(F.conv2d(y, block.conv3.weight), block.conv3.norm)
    shortcut = eval_bn(F.conv2d(x, block.shortcut.weight, stride=2), block.shortcut.norm)
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.relu(y + shortcut))


def test_fpn_shapes_and_top_down_sum():
    torch.manual_seed(0)
    fpn = tiny_fpn()
    randomize_norms(fpn)
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        out, features = fpn(x), fpn.bottom_up(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p2": (2, 16, 16, 32), "p3": (2, 16, 8, 16), "p4": (2, 16, 4, 8), "p5": (2, 16, 2, 4)}
    merged = None
    for level in (5, 4, 3, 2):
        lateral, output = getattr(fpn, f"fpn_lateral{level}"), getattr(fpn, f"fpn_output{level}")
        merged_here = F.conv2d(features[f"res{level}"], lateral.weight, lateral.bias)
        if merged is not None:  # nearest x2 by copying every value into a 2x2 cell
            merged_here = merged_here + merged.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        merged = merged_here
        torch.testing.assert_close(out[f"p{level}"], F.conv2d(merged, output.weight, output.bias, padding=1))


def test_psp_head_matches_functional_reference():
    torch.manual_seed(0)
    head = tiny_pspnet().decode_head.eval()
    randomize_norms(head)
    x = torch.randn(2, head.psp_modules[0][1].conv.in_channels, 13, 10)

    def conv_bn_relu(module, y, padding=0):
        return F.relu(eval_bn(F.conv2d(y, module.conv.weight, padding=padding), module.bn))

    global_mean = x.mean(dim=(2, 3), keepdim=True)  # scale 1: the pooled map is constant after resizing
    branches = [x, conv_bn_relu(head.psp_modules[0][1], global_mean).expand(-1, -1, 13, 10)]
    for scale, branch in zip((2, 3, 6), head.psp_modules[1:]):
        pooled = conv_bn_relu(branch[1], F.adaptive_avg_pool2d(x, scale))
        branches.append(F.interpolate(pooled, size=(13, 10), mode="bilinear", align_corners=False))
    fused = conv_bn_relu(head.bottleneck, torch.cat(branches, dim=1), padding=1)
    expected = F.conv2d(fused, head.conv_seg.weight, head.conv_seg.bias)
    with torch.no_grad():
        torch.testing.assert_close(head(x), expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- PSPNet forward


def test_pspnet_outputs_train_and_eval():
    torch.manual_seed(0)
    model = tiny_pspnet()
    image = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    hw = torch.tensor([[64, 64], [40, 50]])
    outputs = model.train()(image, hw)
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {"seg": (2, 5, 8, 8), "aux": (2, 5, 8, 8)}
    aux_calls = []
    model.auxiliary_head.register_forward_hook(lambda *args: aux_calls.append(1))
    with torch.no_grad():
        outputs = model.eval()(torch.randint(0, 256, (2, 3, 60, 70), dtype=torch.uint8), hw)
    assert list(outputs) == ["seg"] and tuple(outputs["seg"].shape) == (2, 5, 8, 9) and not aux_calls


def test_pspnet_padding_reads_as_the_mean_colour():
    """Pixels outside hw must reach the network as exactly the (BGR) mean colour, whatever they held."""
    torch.manual_seed(0)
    model = tiny_pspnet().eval()
    randomize_norms(model)
    image = torch.randint(0, 256, (2, 3, 32, 40), dtype=torch.uint8)
    hw = torch.tensor([[20, 40], [32, 17]])
    mean_colour_bgr = torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1)
    filled = image.float()
    filled[0, :, 20:, :] = mean_colour_bgr
    filled[1, :, :, 17:] = mean_colour_bgr
    with torch.no_grad():
        padded = model(image, hw)["seg"]
        reference = model(filled, torch.tensor([[32, 40], [32, 40]]))["seg"]
    torch.testing.assert_close(padded, reference, rtol=1e-4, atol=1e-5)
