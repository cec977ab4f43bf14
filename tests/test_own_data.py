"""Issue 11: a folder dataset of one's own (custom label suffix, reduce_zero_label both ways) trained with
pspnet_folder and pointrend_folder, then evaluated and predicted from the checkpoint alone (it carries its model,
classes and palette), with class names in eval.json and TensorBoard scalars in <output_dir>/tb."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from seg import checkpoint, config, data, tasks
from seg.files import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs.toml")
CLASSES = ["background", "box", "bar"]
TINY = {"pspnet_folder": ["model.base_channels=8", "model.stem_channels=8", "model.blocks=[1,1,1,1]", "model.channels=16",
                          "model.aux_channels=8", "data.crop_hw=[32,48]", "data.scale=[96,32]"],
        "pointrend_folder": ["model.norm=bn", "model.stem_channels=8", "model.base_channels=4", "model.blocks=[1,1,1,1]",
                             "model.fpn_channels=16", "model.head_channels=8", "model.head_groups=4", "model.point_fc=16",
                             "model.train_num_points=32", "model.subdivision_num_points=64", "data.crop_hw=[32,64]",
                             "data.short_edges=[48,64]"]}


def write_folder_dataset(root, suffix, reduce_zero_label, counts=(("train", 6), ("val", 3))):
    """images/<split>/<stem>.jpg|png and labels/<split>/<stem><suffix>: boxes (1) and bars (2) on background (0),
    an ignored border; with reduce_zero_label the files hold class + 1 and 0 for ignored, as mmseg's ADE20K."""
    rng = np.random.default_rng(0)
    for split, count in counts:
        for kind in ("images", "labels"):
            os.makedirs(os.path.join(root, kind, split), exist_ok=True)
        for index in range(count):
            label = np.zeros((48, 64), np.uint8)
            top, left = rng.integers(0, 24), rng.integers(0, 32)
            label[top:top + 20, left:left + 24] = 1
            label[:, rng.integers(0, 56):][:, :6] = 2
            label[:2] = 255
            image = (np.array([[90, 90, 90], [200, 40, 40], [40, 40, 200]])[np.minimum(label, 2)]
                     + rng.normal(0, 10, (48, 64, 3))).clip(0, 255).astype(np.uint8)
            stored = np.where(label == 255, 0, label + 1).astype(np.uint8) if reduce_zero_label else label
            Image.fromarray(image).save(os.path.join(root, "images", split, f"{split}{index}.{'jpg' if index % 2 else 'png'}"))
            Image.fromarray(stored).save(os.path.join(root, "labels", split, f"{split}{index}{suffix}"))


def overrides(section, data_root, output_dir, *extra):
    return [f"data_root={data_root}", "data.root=mine", f"output_dir={output_dir}", "device=cpu", "pretrained=",
            "data.workers=0", "iterations=3", "log_interval=1", "eval_interval=3", "checkpoint_interval=3",
            "data.batch_size=2", f"data.classes={json.dumps(CLASSES)}", "data.palette=[[0,0,0],[255,0,0],[0,0,255]]",
            *TINY[section], *extra]


def run(*args):
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("section, predict", [("pspnet_folder", "pspnet_predict"),
                                              ("pointrend_folder", "pointrend_predict")])
def test_train_then_evaluate_and_predict_from_the_checkpoint_alone(tmp_path, section, predict):
    write_folder_dataset(str(tmp_path / "mine"), "_mask.png", reduce_zero_label=True)
    out = tmp_path / "out"
    result = run(section, *overrides(section, tmp_path, out, 'data.label_suffix="_mask.png"', "data.reduce_zero_label=true"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "eval.json").read_text())["classes"] == CLASSES
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "tb")).Reload()
    tags = board.Tags()["scalars"]
    assert {"train/lr", "train/images_per_s", "val/mIoU", "val/IoU/box"} <= set(tags) and board.Tags()["images"]
    assert [event.step for event in board.Scalars("train/lr")] == [1, 2, 3]
    weights = checkpoint.latest_checkpoint(out)
    evaluated = run(section.replace("folder", "eval"), f"weights={weights}", f"data_root={tmp_path}",
                    f"output_dir={tmp_path / 'eval'}", "device=cpu", "data.workers=0")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "took model, data.dataset, data.root" in evaluated.stdout
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["classes"] == CLASSES
    predicted = run(predict, f"weights={weights}", f"input={tmp_path / 'mine' / 'images' / 'val'}",
                    f"output={tmp_path / 'pred'}", "device=cpu")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    with Image.open(tmp_path / "pred" / "val0.png") as label_map:
        assert label_map.getpalette()[:9] == [0, 0, 0, 255, 0, 0, 0, 0, 255] and np.asarray(label_map).max() < 3


def test_reduce_zero_label_both_ways_trains_the_same_weights(tmp_path):
    """The same labels stored plain (255 = ignore) or shifted by one (0 = ignore, reduce_zero_label) train alike."""
    finals = []
    for reduce, suffix in ((False, ".png"), (True, "_mask.png")):
        root = tmp_path / str(reduce)
        write_folder_dataset(str(root / "mine"), suffix, reduce)
        cfg = config.load_config(CONFIGS, "pspnet_folder", overrides("pspnet_folder", root, root / "out", "final_eval=false",
                                                                    f'data.label_suffix="{suffix}"',
                                                                    f"data.reduce_zero_label={str(reduce).lower()}"),
                                 tasks.builder_defaults)
        tasks.train_task(config.validate(cfg))
        finals.append(checkpoint.load_training_state(checkpoint.latest_checkpoint(root / "out"))["model"])
    assert all((finals[0][key] == finals[1][key]).all() for key in finals[0])


def test_folder_dataset_errors_name_the_files(tmp_path):
    root = tmp_path / "mine"
    write_folder_dataset(str(root), ".png", False, counts=(("train", 2),))
    os.remove(root / "labels" / "train" / "train1.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "labels" / "train" / "stray.png")
    with pytest.raises(UserError, match=r"images without a label, e\.g\. train1"):
        data.folder_items(str(root), ["train"])
    os.remove(root / "images" / "train" / "train1.jpg")
    with pytest.raises(UserError, match=r"labels \(\*\.png\) without an image, e\.g\. stray"):
        data.folder_items(str(root), ["train"])
    os.remove(root / "labels" / "train" / "stray.png")
    assert data.folder_items(str(root), ["train"]) == [(str(root / "images" / "train" / "train0.png"),
                                                        str(root / "labels" / "train" / "train0.png"))]
    with pytest.raises(UserError, match="images/val: folder not found"):
        data.folder_items(str(root), ["val"])
    bad = config.load_config(CONFIGS, "pspnet_folder", [f"data.classes={json.dumps(CLASSES)}", "model.num_classes=5"],
                             tasks.builder_defaults)
    with pytest.raises(UserError, match="data.classes"):
        config.validate(bad)
