"""Tests for prediction (seg/evaluate.py pictures, seg/tasks.py predict_task): inputs, indexed label maps, overlays, the predict task on a folder with a
corrupt file, the slide switch for large images, and the command line."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from seg import amp, checkpoint, config, data, evaluate, predict, tasks
from seg.files import UserError
from seg.pspnet import build_pspnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs.toml")
TINY = dict(num_classes=3, base_channels=8, stem_channels=8, blocks=(1, 1, 1, 1), channels=16, aux_channels=8)
TINY_OVERRIDES = [f"model.{key}={list(value) if isinstance(value, tuple) else value}".replace(" ", "")
                  for key, value in TINY.items()]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A seg checkpoint of the tiny PSPNet (random init), as training would save it."""
    torch.manual_seed(0)
    model = build_pspnet(**TINY).eval()
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    checkpoint.save_atomic({"model": model.state_dict(), "iteration": 0, "config": {}}, path)
    return str(path)


def loaded_model(path):
    model = build_pspnet(**TINY).eval()
    checkpoint.load_model_weights(model, path, log=lambda *a: None)
    return model


def photo(height, width, seed):
    """A smooth RGB picture (JPEG keeps it close) with a few flat blocks, uint8 H×W×3."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    image = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 90)], axis=-1)
    for _ in range(3):
        top, left = rng.integers(0, height - 8), rng.integers(0, width - 8)
        image[top: top + 12, left: left + 16] = rng.integers(0, 256, 3)
    return image.astype(np.uint8)


def predict_config(weights, input_path, output, *extra):
    """amp=off: these tests compare with fp32 calls, and "auto" picks bf16 on a CPU with bf16 units
    (tests/test_cpu_speed.py tests "auto")."""
    return config.load_config(CONFIGS, "pspnet_predict", [
        f"weights={weights}", f"input={input_path}", f"output={output}", "device=cpu", "data.test_scale=[96,36]",
        "amp=off", *TINY_OVERRIDES, *extra], tasks.builder_defaults)


# ------------------------------------------------------------------------------------------- inputs

def test_inputs_file_folder_and_glob(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.webp", "notes.txt", "d.jpeg", "e.bmp"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.jpg").mkdir()
    assert data.list_images(str(tmp_path)) == [str(tmp_path / n) for n in ["a.jpg", "b.PNG", "c.webp", "d.jpeg",
                                                                            "e.bmp"]]
    assert data.list_images(str(tmp_path / "notes.txt")) == [str(tmp_path / "notes.txt")]
    assert data.list_images(str(tmp_path / "[ab].*")) == [str(tmp_path / "a.jpg"), str(tmp_path / "b.PNG")]
    with pytest.raises(UserError, match="input="):
        data.list_images(str(tmp_path / "missing*.jpg"))
    assert data.output_stems(["x/a.jpg", "y/a.png", "b.jpg", "z/a.bmp"]) == ["a", "a_2", "b", "a_3"]


# ------------------------------------------------------------------------------------------ outputs

def test_label_map_is_an_indexed_png_with_the_palette(tmp_path, weights):
    picture = photo(48, 64, seed=0)
    Image.fromarray(picture).save(tmp_path / "street.png")
    tasks.predict_task(predict_config(weights, tmp_path / "street.png", tmp_path / "out"))
    with torch.no_grad():  # the same inference, called directly on the BGR image
        image, hw = evaluate.stack_views(evaluate.resize_to_scales(picture[:, :, ::-1], (96, 36), [1.0]))
        expected = evaluate.test_time_scores(loaded_model(weights), image, hw, (48, 64), {
            "mode": "whole", "flip": False}).argmax(dim=1)[0].numpy()
    with Image.open(tmp_path / "out" / "street.png") as saved:
        assert saved.mode == "P" and saved.size == (64, 48)
        np.testing.assert_array_equal(np.asarray(saved), expected)
        assert saved.getpalette()[:9] == [value for colour in data.VOC_PALETTE[:3] for value in colour]
    assert len(np.unique(expected)) >= 2  # the check above compares more than one class


def test_overlay_blends_colours_at_half_away_from_the_legend(tmp_path):
    picture = photo(96, 160, seed=1)
    label = np.zeros((96, 160), np.uint8)
    label[:, 60:110], label[50:, 110:] = 1, 2
    palette, names = predict.palette_and_names(data.VOC_PALETTE, data.VOC_CLASSES, 3)
    predict.write_prediction(str(tmp_path), "scene", picture, label, palette, names)
    _, box = predict.overlay(picture, label, palette, names)
    with Image.open(tmp_path / "scene_overlay.jpg") as saved:
        assert saved.format == "JPEG" and saved.size == (160, 96)
        written = np.asarray(saved.convert("RGB")).astype(np.int32)
    expected = (picture.astype(np.int32) + np.asarray(palette)[label]) / 2
    away = np.ones(label.shape, bool)
    away[: box[3] + 3, : box[2] + 3] = False  # the legend and the JPEG blocks it touches
    error = np.abs(written - expected)[away]
    assert error.mean() < 1.5 and np.percentile(error, 99) < 8
    legend = written[box[1] + 1: box[3], box[0] + 1: box[2]]
    assert (np.abs(legend - expected[box[1] + 1: box[3], box[0] + 1: box[2]]) > 20).mean() > 0.5  # drawn over
    assert box[3] > 3 * 10  # three rows: every class present is listed


def test_classes_beyond_the_palette_get_colours_and_names():
    palette, names = predict.palette_and_names(data.CITYSCAPES_PALETTE, data.CITYSCAPES_CLASSES, 21)
    assert palette[:19] == [tuple(c) for c in data.CITYSCAPES_PALETTE] and names[19:] == ["class 19", "class 20"]
    assert len(set(palette)) == 21


# ------------------------------------------------------------------------------------- predict task

def test_folder_with_a_corrupt_file(tmp_path, weights, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(photo(48, 64, 2)).save(folder / "one.jpg", quality=95)
    Image.fromarray(photo(40, 72, 3)).save(folder / "two.png")
    Image.fromarray(photo(64, 48, 4)).save(folder / "three.jpeg", quality=95)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert tasks.predict_task(predict_config(weights, folder, tmp_path / "out")) == 3
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "warning" in captured.err
    assert sorted(os.listdir(tmp_path / "out")) == ["one.png", "one_overlay.jpg", "three.png", "three_overlay.jpg",
                                                    "two.png", "two_overlay.jpg"]
    lines = [line for line in captured.out.splitlines() if line.split(" ")[0].count("/") == 1]
    assert [line.split(" ")[:3] for line in lines] == [["2/4", "one.jpg", "48x64"], ["3/4", "three.jpeg", "64x48"],
                                                       ["4/4", "two.png", "40x72"]]
    for stem, size in [("one", (64, 48)), ("two", (72, 40)), ("three", (48, 64))]:
        with Image.open(tmp_path / "out" / f"{stem}.png") as label, Image.open(tmp_path / "out" /
                                                                               f"{stem}_overlay.jpg") as over:
            assert label.size == over.size == size and np.asarray(label).max() < 3


def test_nothing_readable_is_a_user_error(tmp_path, weights):
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="could be read"):
        tasks.predict_task(predict_config(weights, tmp_path / "bad.png", tmp_path / "out"))


def test_large_images_switch_to_slide_mode_once(tmp_path, weights, capsys):
    for name, seed in [("a.png", 5), ("b.png", 6)]:
        Image.fromarray(photo(48, 64, seed)).save(tmp_path / name)
    # test resize to 36×48; max_size 40 < 48 sends both images to slide mode with 32×32 windows
    cfg = predict_config(weights, tmp_path / "*.png", tmp_path / "out", "test.max_size=40", "test.crop_hw=[32,32]",
                         "test.stride_hw=[16,16]")
    tasks.predict_task(cfg)
    assert capsys.readouterr().out.count("slide mode") == 1
    model = loaded_model(weights)
    picture = np.asarray(Image.open(tmp_path / "b.png"))
    off = lambda: amp.autocast_context("cpu", "off")  # noqa: E731
    slide_label, slid = predict.predict_label(model, picture[:, :, ::-1], {**cfg["test"], "mode": "slide",
                                                                           "max_size": 10**6}, (96, 36), off)
    whole_label, _ = predict.predict_label(model, picture[:, :, ::-1], {**cfg["test"], "max_size": 10**6}, (96, 36),
                                            off)
    assert slid is False and not np.array_equal(slide_label, whole_label)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "b.png")), slide_label)


# ----------------------------------------------------------------------------------------- command line

def run_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=120)


def test_command_line(tmp_path, weights):
    Image.fromarray(photo(48, 64, 7)).save(tmp_path / "cli.jpg")
    common = [f"weights={weights}", f"output={tmp_path / 'out'}", "device=cpu", "data.test_scale=[96,36]",
              *TINY_OVERRIDES]
    result = run_cli("pspnet_predict", f"input={tmp_path / 'cli.jpg'}", *common)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["cli.png", "cli_overlay.jpg"]
    assert "1/1 cli.jpg 48x64" in result.stdout
    missing = run_cli("pspnet_predict", *common)
    assert missing.returncode == 2 and "input=" in missing.stderr and "Traceback" not in missing.stderr
