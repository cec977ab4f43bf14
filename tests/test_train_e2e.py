"""End to end on a tiny generated VOC-layout dataset: resume equals uninterrupted, torchrun with 2
processes equals one process with the same global batch, and bad input exits 2 naming the file."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from seg import checkpoint, config, data, files, prepare, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs.toml")
TINY_MODEL = ["model.num_classes=5", "model.base_channels=8", "model.stem_channels=8", "model.blocks=[1,1,1,1]",
              "model.channels=16", "model.aux_channels=8"]


def common_overrides(data_root, dataset_root, output_dir):
    """A fast CPU training run on a generated dataset under data_root/dataset_root."""
    return [f"data_root={data_root}", f"data.root={dataset_root}", f"output_dir={output_dir}", "task=train",
            "device=cpu", "data.workers=0", "log_interval=1", "eval_interval=0"]


def overrides(data_root, output_dir, *extra):
    return [*common_overrides(data_root, "voc", output_dir), "data.batch_size=4", "data.crop_hw=[32,32]",
            "data.scale=[128,48]", "data.test_scale=[128,48]", "final_eval=false", *TINY_MODEL, *extra]


def final_weights(output_dir):
    return checkpoint.load_training_state(checkpoint.latest_checkpoint(output_dir))["model"]


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        if atol:
            torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-5, atol=atol, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


def test_resume_equals_uninterrupted_run(voc_root, tmp_path):
    whole = str(tmp_path / "whole")
    tasks.train_task(config.load_config(CONFIGS, "demo", overrides(voc_root, whole, "iterations=4", "checkpoint_interval=2"),
                                   tasks.builder_defaults))
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    # an interrupted run: only the checkpoint at iteration 2 exists
    state = checkpoint.load_training_state(os.path.join(whole, "iter_0000002.pth"))
    checkpoint.save_atomic(state, os.path.join(resumed, "iter_0000002.pth"))
    tasks.train_task(config.load_config(CONFIGS, "demo", overrides(voc_root, resumed, "iterations=4", "checkpoint_interval=2",
                                                              "resume=true"), tasks.builder_defaults))
    assert_same_weights(final_weights(whole), final_weights(resumed))
    assert not torch.equal(state["model"]["decode_head.conv_seg.weight"],
                           final_weights(whole)["decode_head.conv_seg.weight"])  # training did move


def test_jitter_on_the_device_trains_the_same_weights(voc_root, tmp_path):
    runs = {}
    for place in ("loader", "device"):
        runs[place] = str(tmp_path / place)
        tasks.train_task(config.load_config(CONFIGS, "demo", overrides(voc_root, runs[place], "iterations=2",
                                                                  f'data.jitter_on="{place}"'), tasks.builder_defaults))
    assert_same_weights(final_weights(runs["loader"]), final_weights(runs["device"]))


def run_cli(*args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_two_processes_equal_one_with_the_same_global_batch(voc_root, tmp_path, free_port):
    common = ["iterations=2", "checkpoint_interval=0", "model.dropout=0.0", "norm_eval=true"]
    one = str(tmp_path / "one")
    result = run_cli("run.py", "demo", *overrides(voc_root, one, *common))
    assert result.returncode == 0, result.stderr
    two = str(tmp_path / "two")
    result = run_cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
                     "run.py", "demo", *overrides(voc_root, two, *common))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "img/s" in result.stdout  # global throughput on every log line
    assert "broadcast_buffers" not in result.stderr and "FutureWarning" not in result.stderr
    assert_same_weights(final_weights(one), final_weights(two), atol=1e-6)


def test_unknown_key_exits_2(tmp_path):
    result = run_cli("run.py", "demo", "model.num_clases=3")
    assert result.returncode == 2 and "num_classes" in result.stderr and "Traceback" not in result.stderr


def test_missing_dataset_exits_2_naming_the_folder(tmp_path):
    result = run_cli("run.py", "pspnet_1p", f"data_root={tmp_path}", "pretrained=", "device=cpu")
    assert result.returncode == 2 and str(tmp_path) in result.stderr and "Traceback" not in result.stderr


def test_label_out_of_range_exits_2_naming_the_file(voc_root, tmp_path):
    import shutil

    root = tmp_path / "voc"
    shutil.copytree(os.path.join(voc_root, "voc"), root)
    stem = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
    label_path = root / "SegmentationClass" / f"{stem}.png"
    label = np.array(Image.open(label_path))
    label[0, 0] = 40
    files.write_label_png(str(label_path), label, data.VOC_PALETTE)
    result = run_cli("run.py", "demo", *overrides(str(tmp_path), str(tmp_path / "out"), "iterations=20", "data.workers=1",
                                                'data.train_splits=["train:SegmentationClass"]'))
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{stem}.png" in result.stderr and "40" in result.stderr and "Traceback" not in result.stderr


TINY_POINTREND = ["model.norm=bn", "model.stem_channels=8", "model.base_channels=4", "model.blocks=[1,1,1,1]",
                  "model.fpn_channels=16", "model.head_channels=8", "model.head_groups=4", "model.point_fc=16",
                  "model.train_num_points=32", "model.subdivision_num_points=64"]


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
    data_root = tmp_path_factory.mktemp("data")
    prepare.make_demo_cityscapes(str(data_root / "cityscapes"), n_train=4, n_val=2, size=(64, 128), seed=2)
    return str(data_root)


def pointrend_overrides(data_root, output_dir, *extra):
    return [*common_overrides(data_root, "cityscapes", output_dir), "data.batch_size=2", "data.crop_hw=[64,128]",
            "data.short_edges=[64,80]", "data.test_scale=[128,64]", *TINY_POINTREND, *extra]


def test_pointrend_trains_and_evaluates_on_the_cityscapes_layout(cityscapes_root, tmp_path, capsys):
    import json

    out = str(tmp_path / "pr")
    tasks.train_task(config.load_config(CONFIGS, "demo_pointrend", pointrend_overrides(cityscapes_root, out, "iterations=3",
                                                                                  "measure_pipeline=true"),
                                   tasks.builder_defaults))
    assert "images/s per worker" in capsys.readouterr().out
    state = final_weights(out)
    assert "sem_seg_head.point_head.predictor.weight" in state and state["sem_seg_head.point_head.predictor.weight"].isfinite().all()
    record = json.load(open(os.path.join(out, "eval.json")))
    assert len(record["IoU"]) == 19 and 0.0 <= record["aAcc"] <= 1.0
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert all(key in lines[0] for key in ("loss_sem_seg", "loss_sem_seg_point", "lr", "images_per_s", "eta_min"))


def test_label_ids_instead_of_train_ids_exit_2_suggesting_prepare(cityscapes_root, tmp_path):
    import shutil

    root = tmp_path / "cityscapes"
    shutil.copytree(os.path.join(cityscapes_root, "cityscapes"), root)
    for train_ids in root.rglob("*_gtFine_labelTrainIds.png"):
        shutil.copy(str(train_ids).replace("labelTrainIds", "labelIds"), train_ids)  # someone pointed at labelIds
    result = run_cli("run.py", "demo_pointrend", *pointrend_overrides(str(tmp_path), str(tmp_path / "out"), "iterations=2"))
    assert result.returncode == 2 and "prepare_cityscapes" in result.stderr and "labelTrainIds.png" in result.stderr
