"""Issue 21, fast on the machine you have: amp = "auto" picks bf16 + channels_last only where the device runs bf16
natively (the capability check mocked both ways, and read against /proc/cpuinfo), fp32 prediction stays byte for byte
what an explicit fp32 call gives, evaluation and prediction honour amp and channels_last (model and input), and bf16 +
channels_last training on CPU works for both models and resumes exactly."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from seg import amp, checkpoint, config, evaluate, metrics, predict, prepare, tasks
from seg.data import normalize_and_pad
from seg.files import UserError
from seg.pspnet import build_pspnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs.toml")
TINY = dict(num_classes=5, base_channels=8, stem_channels=8, blocks=(1, 1, 1, 1), channels=16, aux_channels=8)
TINY_OVERRIDES = [f"model.{key}={list(value) if isinstance(value, tuple) else value}".replace(" ", "")
                  for key, value in TINY.items()]
CL = torch.channels_last


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A seg checkpoint of the tiny PSPNet (random init, BN statistics moved off the identity so bf16 matters)."""
    torch.manual_seed(0)
    model = build_pspnet(**TINY).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    checkpoint.save_atomic({"model": model.state_dict(), "iteration": 0, "config": {}}, path)
    return str(path)


def loaded_model(path):
    model = build_pspnet(**TINY).eval()
    checkpoint.load_model_weights(model, path, log=lambda *a: None)
    return model


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory):
    rng = np.random.default_rng(3)
    y, x = np.mgrid[:48, :64]
    image = np.stack([x * 4, y * 5, (x * y) % 256], axis=-1) + rng.integers(0, 40, (48, 64, 3))
    path = tmp_path_factory.mktemp("photos") / "street.png"
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(path)
    return str(path)


def predict_config(weights, input_path, output, *extra):
    return config.load_config(CONFIGS, "pspnet_predict", [f"weights={weights}", f"input={input_path}",
                                                          f"output={output}", "device=cpu", "data.test_scale=[96,36]",
                                                          *TINY_OVERRIDES, *extra], tasks.builder_defaults)


def expected_png(weights, photo_path, precision, memory_format):
    """Label-map PNG bytes of predict_label called directly with `precision` on the model in `memory_format`."""
    model = loaded_model(weights).to(memory_format=memory_format)
    image = np.asarray(Image.open(photo_path).convert("RGB"))[:, :, ::-1]
    cfg = predict_config(weights, photo_path, "unused")
    label, _ = predict.predict_label(model, image, cfg["test"], (96, 36), amp.autocast_for("cpu", precision))
    return predict.label_png(label, tasks.dataset_info(cfg)["palette"])


def spy_inference(monkeypatch):
    """Record (autocast enabled, its dtype, model channels_last) of every test_time_scores call predict makes."""
    seen = []

    def recording(model, *args):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), evaluate.channels_last(model)))
        return original(model, *args)
    original = predict.test_time_scores
    monkeypatch.setattr(predict, "test_time_scores", recording)
    return seen


# ------------------------------------------------------------------------------------------- the choice

@pytest.mark.skipif(not os.path.isfile("/proc/cpuinfo"), reason="reads the CPU flags from /proc/cpuinfo")
def test_native_bf16_check_agrees_with_the_cpu_flags():
    with open("/proc/cpuinfo") as handle:
        flags = {flag for line in handle if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    if not flags:
        pytest.skip("no x86 flags in /proc/cpuinfo")
    assert amp.runs_bf16_natively("cpu") == bool(flags & {"amx_tile", "avx512_bf16"})


@pytest.mark.parametrize("native, device, expected", [(False, "cpu", ("off", False)), (True, "cpu", ("bf16", True)),
                                                      (True, "cuda", ("bf16", True)), (False, "cuda", ("off", False)),
                                                      (False, "npu", ("fp16", False))])
def test_auto_follows_the_capability_check(monkeypatch, native, device, expected):
    monkeypatch.setattr(amp, "runs_bf16_natively", lambda device_type: native)
    assert amp.inference_precision(device, "auto", False) == expected
    assert amp.inference_precision(device, "bf16", False) == ("bf16", False)  # explicit values pass through
    assert amp.inference_precision(device, "off", True) == ("off", True)


def test_defaults_auto_for_prediction_fp32_for_evaluation_refused_for_training():
    load = lambda name, *extra: config.load_config(CONFIGS, name, list(extra), tasks.builder_defaults)  # noqa: E731
    assert load("pspnet_predict")["amp"] == load("pointrend_predict")["amp"] == "auto"
    for name in ("pspnet_eval", "pointrend_eval", "pspnet_1p", "pointrend_8p", "pspnet_export", "demo"):
        assert load(name)["amp"] == "off" and not load(name)["channels_last"]
    for name in ("pspnet_1p", "demo", "pspnet_export"):
        with pytest.raises(UserError, match='amp = "auto".*predict and evaluate'):
            config.validate(load(name, "amp=auto"))
    with pytest.raises(UserError, match="bench.amp"):
        config.validate(load("pspnet_bench", 'bench.amp=["auto"]'))


# ------------------------------------------------------------------------------------------- prediction

def test_amp_off_and_auto_without_bf16_units_give_the_fp32_bytes(monkeypatch, weights, photo_path, tmp_path, capsys):
    expected = expected_png(weights, photo_path, "off", torch.contiguous_format)
    tasks.predict_task(predict_config(weights, photo_path, tmp_path / "off", "amp=off"))
    assert (tmp_path / "off" / "street.png").read_bytes() == expected
    assert 'amp = "auto"' not in capsys.readouterr().out
    monkeypatch.setattr(amp, "runs_bf16_natively", lambda device_type: False)
    seen = spy_inference(monkeypatch)
    tasks.predict_task(predict_config(weights, photo_path, tmp_path / "auto"))
    assert (tmp_path / "auto" / "street.png").read_bytes() == expected
    assert seen == [(False, torch.bfloat16, False)]  # autocast off (its dtype the CPU default), NCHW model
    assert 'amp = "auto" on this cpu: fp32; amp=off gives exact fp32' in capsys.readouterr().out


def test_auto_with_bf16_units_predicts_in_bf16_channels_last(monkeypatch, weights, photo_path, tmp_path, capsys):
    monkeypatch.setattr(amp, "runs_bf16_natively", lambda device_type: True)
    seen = spy_inference(monkeypatch)
    tasks.predict_task(predict_config(weights, photo_path, tmp_path / "out"))
    assert seen == [(True, torch.bfloat16, True)]
    assert 'amp = "auto" on this cpu: bf16 + channels_last; amp=off gives exact fp32' in capsys.readouterr().out
    assert (tmp_path / "out" / "street.png").read_bytes() == expected_png(weights, photo_path, "bf16", CL)


def test_channels_last_reaches_the_network_input_with_the_same_values():
    image = torch.randint(0, 256, (2, 3, 20, 30), dtype=torch.uint8)
    hw = torch.tensor([[20, 30], [14, 22]])
    for rgb, divisor in ((True, 1), (False, 32)):
        plain = normalize_and_pad(image, hw, (1.0, 2.0, 3.0), (4.0, 5.0, 6.0), rgb, divisor)
        nhwc = normalize_and_pad(image.contiguous(memory_format=CL), hw, (1.0, 2.0, 3.0), (4.0, 5.0, 6.0), rgb, divisor)
        assert torch.equal(plain, nhwc) and nhwc.is_contiguous(memory_format=CL) and plain.is_contiguous()
    model = build_pspnet(**TINY).eval()
    seen = []
    model.backbone.stem[0].register_forward_pre_hook(lambda module, args: seen.append(
        args[0].is_contiguous(memory_format=CL) and not args[0].is_contiguous()))
    with torch.no_grad():
        plain = evaluate.whole_logits(model, image)
        nhwc = evaluate.whole_logits(model.to(memory_format=CL), image)
    assert seen == [False, True]
    torch.testing.assert_close(nhwc, plain, rtol=1e-4, atol=1e-5)


def test_evaluate_with_auto_scores_the_bf16_channels_last_model(monkeypatch, weights, voc_root, tmp_path):
    monkeypatch.setattr(amp, "runs_bf16_natively", lambda device_type: True)
    cfg = config.load_config(CONFIGS, "pspnet_eval", [
        f"weights={weights}", f"data_root={voc_root}", "data.root=voc", f"output_dir={tmp_path}", "device=cpu",
        "data.workers=0", "data.test_scale=[96,36]", "amp=auto", *TINY_OVERRIDES], tasks.builder_defaults)
    result = tasks.evaluate_task(cfg)
    result.pop("val_loss")  # the loss beside the scores (tests/test_report.py checks it)
    model = loaded_model(weights).to(memory_format=CL)  # the same evaluation called directly
    dataset, _ = tasks.eval_dataset(cfg)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=evaluate.collate_views)
    matrix = evaluate.confusion_over(model, loader, torch.device("cpu"), 5, amp.autocast_for("cpu", "bf16"),
                                     cfg["test"])
    expected = metrics.metrics_from_confusion(matrix)
    assert json.dumps(result, sort_keys=True) == json.dumps(expected, sort_keys=True)  # NaN IoUs compare as text


# ---------------------------------------------------------------------------------------------- training

PSPNET_TRAIN = ["data.root=voc", "data.batch_size=4", "data.crop_hw=[32,32]", "data.scale=[128,48]",
                "model.num_classes=5", "model.base_channels=8", "model.stem_channels=8", "model.blocks=[1,1,1,1]",
                "model.channels=16", "model.aux_channels=8"]
POINTREND_TRAIN = ["data.root=cityscapes", "data.batch_size=2", "data.crop_hw=[32,64]", "data.short_edges=[48,64]",
                   "model.stem_channels=8", "model.base_channels=4", "model.fpn_channels=16", "model.head_channels=8",
                   "model.head_groups=4", "model.point_fc=16", "model.train_num_points=32"]


@pytest.fixture(scope="module")
def cityscapes_root(voc_root):
    prepare.make_demo_cityscapes(os.path.join(voc_root, "cityscapes"), n_train=4, n_val=1, size=(48, 96), seed=2)
    return voc_root


@pytest.mark.parametrize("section, extra", [("demo", PSPNET_TRAIN), ("demo_pointrend", POINTREND_TRAIN)])
def test_bf16_channels_last_training_on_cpu_resumes_exactly(cityscapes_root, tmp_path, section, extra):
    def train(output_dir, *more):
        return tasks.train_task(config.load_config(CONFIGS, section, [
            "task=train", f"data_root={cityscapes_root}", f"output_dir={output_dir}", "device=cpu", "data.workers=0",
            "iterations=4", "checkpoint_interval=2", "log_interval=1", "final_eval=false", "amp=bf16",
            "channels_last=true", *extra, *more], tasks.builder_defaults))
    model = train(tmp_path / "whole")
    convs = [p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=CL) and not p.is_contiguous() for p in convs)
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(v) for r in records for k, v in r.items() if k.startswith("loss"))
    (tmp_path / "resumed").mkdir()
    state = checkpoint.load_training_state(tmp_path / "whole" / "iter_0000002.pth")
    checkpoint.save_atomic(state, tmp_path / "resumed" / "iter_0000002.pth")
    train(tmp_path / "resumed", "resume=true")
    whole, resumed = (checkpoint.load_training_state(tmp_path / run / "iter_0000004.pth")["model"]
                      for run in ("whole", "resumed"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    moved = [k for k in whole if whole[k].is_floating_point() and not torch.equal(whole[k], state["model"][k])]
    assert len(moved) > len(whole) // 2  # training did move the weights


# --------------------------------------------------------------------------------------------- benchmark

def test_every_compiled_bench_combination_compiles_afresh(monkeypatch, tmp_path):
    """A second compiled combination must not inherit the batch sizes the first one saw (Dynamo would make them
    dynamic, and PointRend's torch.rand(..., generator=None) then fails to trace). Dynamo's eager backend: the
    tracing is what fails, and it takes seconds, not Inductor's minutes."""
    from seg import bench, losses, train
    from seg.pointrend import build_pointrend

    compile_model = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_model(model, backend="eager"))
    options = {"warmup": 0, "steps": 1, "batch_size": 2, "crop_hw": [32, 64], "eval_hw": [32, 64], "amp": ["off"],
               "channels_last": [False, True], "compile": [True], "peak_tflops": 0.0}
    small = dict(fpn_channels=16, head_channels=8, head_groups=4, point_fc=16, stem_channels=8, base_channels=4,
                 blocks=(1, 1, 1, 1), train_num_points=50, subdivision_num_points=300)
    result = bench.model_bench(lambda: build_pointrend(**small),
                               lambda model: train.build_optimizer(model, 0.01, 0.9, 1e-4, 0.0),
                               losses.pointrend_losses, options, torch.device("cpu"), str(tmp_path), "pointrend_bench",
                               num_classes=19, log=lambda *a: None)
    assert [(row["channels_last"], row["status"], row["note"][:60]) for row in result["rows"]] == [
        (False, "ok", ""), (True, "ok", "")]
