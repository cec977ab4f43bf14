"""ONNX export (issue 12): the reduced PSPNet and PointRend exported, run in onnxruntime and compared with eager seg on
images of the export size; the README's onnxruntime snippet run as written."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from seg import amp, checkpoint, evaluate, predict
from seg.files import UserError
from seg.pointrend import build_pointrend
from seg.pspnet import build_pspnet

pytest.importorskip("onnxruntime", reason="pip install onnx onnxscript onnxruntime")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PSPNET = dict(num_classes=5, base_channels=8, stem_channels=8, blocks=(1, 1, 1, 1), channels=16, aux_channels=8)
POINTREND = dict(num_classes=5, norm="bn", fpn_channels=16, head_channels=8, head_groups=4, point_fc=16,
                 stem_channels=8, base_channels=4, blocks=(1, 1, 1, 1), subdivision_num_points=300)
MODELS = {"pspnet": (build_pspnet, PSPNET), "pointrend": (build_pointrend, POINTREND)}


def model_of(name):
    torch.manual_seed(0)
    build, kwargs = MODELS[name]
    return build(**kwargs).eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_onnxruntime_equals_eager_seg(tmp_path, name):
    """Labels agree on >= 99.9% of pixels and logits within 1e-4 for a batch size other than the export's; the
    model is unchanged by exporting, so predictions on other sizes stay what they were."""
    model, path = model_of(name), tmp_path / f"{name}.onnx"
    other_size = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    test = {"mode": "whole", "flip": False, "scales": [1.0], "max_size": 4096}
    autocast = lambda: amp.autocast_context("cpu", "off")  # noqa: E731
    before, _ = predict.predict_label(model, other_size, test, (90, 60), autocast)
    predict.export_onnx(model, (64, 96), path)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 3, 64, 96), dtype=np.uint8))
    check = predict.compare_onnx(path, model, images)
    assert check["runtime_s"] > 0 and check["eager_s"] > 0 and check["max_logit"] > 0
    assert check["agreement"] >= 0.999 and check["max_difference"] < 1e-4
    with torch.no_grad():  # an independent eager reference: the inference path evaluation uses
        hw = torch.tensor([[64, 96]])
        reference = torch.cat([evaluate.test_time_scores(model, image[None], hw, (64, 96), test) for image in images])
    import onnxruntime

    logits, label = onnxruntime.InferenceSession(str(path)).run(None, {"image": images.numpy()})
    assert logits.shape == (3, 5, 64, 96) and label.dtype == np.int64
    np.testing.assert_allclose(logits, reference.numpy(), atol=1e-4, rtol=0)
    assert (label == reference.argmax(dim=1).numpy()).mean() >= 0.999
    after, _ = predict.predict_label(model, other_size, test, (90, 60), autocast)
    np.testing.assert_array_equal(before, after)
    assert predict.is_seg_onnx(path) and not predict.is_seg_onnx(__file__)


def readme_snippet():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## Deploy"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_export_command_and_the_readme_snippet(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pth"
    checkpoint.save_atomic({"model": build_pspnet(**PSPNET).state_dict(), "iteration": 1, "config": {}}, weights)
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    model = [f"model.{key}={list(value) if isinstance(value, tuple) else value}".replace(" ", "")
             for key, value in PSPNET.items()]
    command = [sys.executable, "run.py", "pspnet_export", f"weights={weights}", f"output={tmp_path / 'pspnet.onnx'}",
               "export.hw=[48,64]", f"input={tmp_path / 'photo.jpg'}", *model]
    (tmp_path / "pspnet.onnx").write_text("someone's notes")
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "not an ONNX file seg wrote" in refused.stderr
    assert (tmp_path / "pspnet.onnx").read_text() == "someone's notes"
    os.remove(tmp_path / "pspnet.onnx")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "labels agree on 100" in result.stdout or "labels agree on 99.9" in result.stdout
    subprocess.run([sys.executable, "-c", readme_snippet()], cwd=tmp_path, check=True, timeout=120)
    with Image.open(tmp_path / "photo_label.png") as saved:
        assert saved.size == (64, 48) and np.asarray(saved).max() < 5


def test_missing_onnxruntime_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match="pip install onnxruntime"):
        predict.compare_onnx("x.onnx", None, None)
