"""Issue 17: a run's folder is its own (run.json, refusals, resume of this run only, the lock), the demo's pictures
come from the model it trained, any aspect ratio, the measured data time, odd inputs and fine-tuning's config."""
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from seg import amp, checkpoint, config, data, evaluate, metrics, predict, tasks, train, transforms
from seg.files import UserError

from test_evaluate import small_pspnet
from test_own_data import write_folder_dataset
from test_train_e2e import CONFIGS, ROOT, overrides


def load(*overrides_, section="demo"):
    return config.load_config(CONFIGS, section, list(overrides_), tasks.builder_defaults,
                              stored_config_for=checkpoint.stored_config)


def train_run(voc_root, output_dir, *extra):
    return tasks.train_task(load(*overrides(voc_root, str(output_dir), *extra)))


def logged(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return [json.loads(line)["iteration"] for line in handle]


def listing(folder):
    return {name: (folder / name).read_bytes() for name in os.listdir(folder)}


# ------------------------------------------------------------------------------------- the run's folder

def test_a_folder_of_someone_elses_files_is_refused_and_left_as_it_was(voc_root, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("eval.json", "iter_0000002.pth", "metrics.jsonl"):
        (out / name).write_bytes(b"my own " + name.encode())
    before = listing(out)
    for extra in ((), ("resume=true",)):  # resume: not a seg checkpoint of this run either (no run.json, a foreign file)
        with pytest.raises(UserError, match=f"output_dir = {out} holds files no seg run.*eval.json, iter_0000002.pth"):
            train_run(voc_root, out, "iterations=2", *extra)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=f"output_dir = {out} holds files no seg run.*notes.txt"):
        train_run(voc_root, out, "iterations=2", "resume=true")
    assert listing(out) == {**before, "notes.txt": b"mine"}


def test_run_json_marks_the_folder_and_a_second_run_without_resume_is_refused(voc_root, tmp_path):
    out = tmp_path / "out"
    train_run(voc_root, out, "iterations=2")
    cfg = load(*overrides(voc_root, str(out), "iterations=2"))
    marker = json.loads((out / "run.json").read_text())
    identity = {"model": cfg["model"], "data": {key: cfg["data"][key] for key in (
        "dataset", "root", "train_splits", "classes", "reduce_zero_label", "label_suffix")}}
    assert marker["section"] == "demo" and time.strptime(marker["created"], "%Y-%m-%dT%H:%M:%S%z")
    assert marker["fingerprint"] == hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    with pytest.raises(UserError, match=r"holds this run's files \(config.toml, iter_0000002.pth, log.txt, "
                                        r"metrics.jsonl, run.json and 1 more\): resume=true continues it"):
        train_run(voc_root, out, "iterations=2")
    assert logged(out) == [1, 2]  # the refused run appended nothing (it used to give [1, 2, 1, 2])
    with pytest.raises(UserError, match=r"holds a run of \[demo\] with another model or data"):
        train_run(voc_root, out, "iterations=4", "resume=true", "model.channels=8")
    train_run(voc_root, out, "iterations=4", "resume=true")  # the same run: iterations may grow
    assert logged(out) == [1, 2, 3, 4] and not (out / ".lock").exists()


def test_resume_takes_only_this_runs_checkpoints_unless_resume_from(voc_root, tmp_path):
    other, out = tmp_path / "other", tmp_path / "out"
    train_run(voc_root, other, "iterations=1", 'data.train_splits=["val:SegmentationClass"]')
    out.mkdir()  # checkpoints copied by hand, no run.json: resumed into only when they are this run's
    (out / "iter_0000001.pth").write_bytes((other / "iter_0000001.pth").read_bytes())
    with pytest.raises(UserError, match=r"iter_0000001.pth is not a checkpoint of this run: its data.train_splits is "
                                        r"\['val:SegmentationClass'\]"):
        train_run(voc_root, out, "iterations=2", "resume=true")
    pointrend = {"model": {"w": torch.zeros(1)}, "iteration": 3, "config": {"model": {"name": "pointrend"}}}
    checkpoint.save_atomic(pointrend, out / "iter_0000003.pth")
    with pytest.raises(UserError, match="iter_0000003.pth is not a checkpoint of this run: its model.name is "
                                        "'pointrend', this run's 'pspnet'"):
        train_run(voc_root, out, "iterations=4", "resume=true")
    checkpoint.save_atomic({"decode_head.conv_seg.bias": torch.zeros(5)}, out / "iter_0000003.pth")
    with pytest.raises(UserError, match="iter_0000003.pth is not a seg training checkpoint"):
        train_run(voc_root, out, "iterations=4", "resume=true")  # named, not skipped
    expert = tmp_path / "expert"
    train_run(voc_root, expert, "iterations=2", f"resume_from={other / 'iter_0000001.pth'}")
    assert logged(expert) == [2]  # went on from the other run's iteration 1
    with pytest.raises(UserError, match="resume_from = .*absent.pth.*an existing checkpoint"):
        config.validate(load(*overrides(voc_root, str(expert), f"resume_from={tmp_path / 'absent.pth'}")))


def test_the_demo_panels_come_from_the_model_it_trained(voc_root, tmp_path, monkeypatch):
    """A newer iter_0099999.pth appearing in the folder (here written as soon as training ends) is not used."""
    out, trained = tmp_path / "demo", {}
    real_train_task = tasks.train_task

    def train_then_drop_a_foreign_file(cfg, load_section=None):
        trained["model"] = real_train_task(cfg)
        foreign = {name: torch.zeros_like(value) for name, value in trained["model"].state_dict().items()}
        foreign["decode_head.conv_seg.bias"] = torch.tensor([0.0, 0.0, 0.0, 9.0, 0.0])  # "triangle" everywhere
        checkpoint.save_atomic({"model": foreign, "iteration": 99999, "config": cfg}, out / "iter_0099999.pth")
        return trained["model"]
    monkeypatch.setattr(tasks, "train_task", train_then_drop_a_foreign_file)
    monkeypatch.setattr(tasks.prepare, "make_demo_voc", lambda root: None)  # voc_root holds the data already
    cfg = load(*overrides(voc_root, str(out), "iterations=2", "task=demo", "save_predictions=2"))
    tasks.demo_task(config.validate(cfg))
    for stem, picture in tasks.panels_of(cfg, trained["model"], torch.device("cpu"), 2):
        saved = np.array(Image.open(out / "predictions" / f"{stem}.png").convert("RGB"))
        assert np.array_equal(saved, picture)
        triangle = np.array(data.VOC_PALETTE[3], np.uint8)
        third = saved[:, 2 * saved.shape[1] // 3:]  # the prediction panel is not all "triangle"
        assert not (third == triangle).all(axis=-1).mean() > 0.9


# -------------------------------------------------------------------------------------------- the lock

def test_a_live_lock_keeps_a_second_run_out_and_a_stale_one_is_taken_over(voc_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with subprocess.Popen(["sleep", "60"]) as holder:
        (out / ".lock").write_text(f"{socket.gethostname()} {holder.pid}")
        with pytest.raises(UserError, match=f"{out} is in use by process {holder.pid} on {socket.gethostname()}"):
            train_run(voc_root, out, "iterations=1")
        assert os.listdir(out) == [".lock"]  # nothing written
        holder.kill()
    train_run(voc_root, out, "iterations=1")  # its process is gone: stale
    assert sorted(os.listdir(out)) == ["config.toml", "iter_0000001.pth", "log.txt", "metrics.jsonl", "run.json", "tb"]


def run_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "run.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_with_one_line_naming_the_checkpoint_and_releases_the_lock(voc_root, tmp_path, signum):
    out = tmp_path / "out"
    process = run_cli("demo", *overrides(voc_root, str(out), "iterations=40", "checkpoint_interval=4"))
    for line in process.stdout:
        if line.startswith("iter 6/40"):
            assert (out / ".lock").exists()
            process.send_signal(signum)
            break
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr
    last = checkpoint.latest_checkpoint(out)  # iter_0000004.pth, or a later one if the signal came late
    assert stderr.strip().splitlines()[-1] == f"interrupted; resume from {last} with resume=true"
    assert not (out / ".lock").exists()


def test_the_lock_goes_when_a_run_fails(voc_root, tmp_path):
    out = tmp_path / "out"
    train_run(voc_root, out, "iterations=2")
    process = run_cli("demo", *overrides(voc_root, str(out), "iterations=2", "resume=true"))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and "nothing is left to train" in stderr and not (out / ".lock").exists()


# ---------------------------------------------------------------------------------------- right answers

@pytest.mark.parametrize("hw", [(20, 4000), (4000, 20), (1, 300), (300, 1)])
def test_any_aspect_ratio_predicts_evaluates_and_trains(hw):
    image = np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8)
    view_hw = transforms.rescale_hw(*hw, (96, 72))  # a side of 0.48 pixels rounds up to 1, not down to 0
    assert view_hw == {(20, 4000): (1, 96), (4000, 20): (96, 1), (1, 300): (1, 96), (300, 1): (96, 1)}[hw]
    assert transforms.shortest_edge_hw(1, 1000, 128, 256) == (1, 256)  # 0.256 rows used to round to 0
    model = small_pspnet()
    test = {"mode": "whole", "scales": [1.0], "flip": False, "max_size": 4096}
    label, _ = predict.predict_label(model, image, test, (96, 72), contextlib.nullcontext)
    view = torch.from_numpy(transforms.resize_image(image, view_hw)).permute(2, 0, 1)[None].contiguous()
    with torch.no_grad():
        expected = F.interpolate(evaluate.whole_logits(model, view), size=hw, mode="bilinear").argmax(1)[0]
    assert label.shape == hw and np.array_equal(label, expected.numpy())
    crop, crop_label, _ = transforms.voc_train_sample(np.random.default_rng(0), image, np.zeros(hw, np.uint8),
                                                      scale=(96, 72), ratio_range=(0.75, 1.25), crop_hw=(72, 96))
    assert crop.shape[:2] == crop_label.shape and min(crop_label.shape) >= 1


def test_data_time_is_the_wait_for_the_batch_not_the_iteration():
    wait_s, step_s, records = 0.03, 0.09, []

    def batches():
        while True:
            time.sleep(wait_s)
            yield {"image": torch.ones(2, 1), "label": torch.zeros(2, dtype=torch.uint8), "hw": None}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))

        def forward(self, image, hw):
            time.sleep(step_s)
            return image * self.weight
    model = Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = {"loss_fn": lambda outputs, label: {"loss": outputs.mean()}, "optimizer": optimizer, "seed": 0, "rank": 0,
            "scaler": amp.make_scaler("cpu", "off", "dynamic"), "autocast": contextlib.nullcontext,
            "norm_eval": False, "lr_at": lambda iteration: 0.1}
    hooks = {"say": print, "log": records.append, "checkpoint": lambda i: None, "evaluate": None}
    intervals = {"log": 3, "checkpoint": 0, "eval": 0, "final_eval": False}
    train.train(model, batches(), step, range(1, 7), intervals, hooks, metrics.Meter(2, torch.device("cpu")))
    for record in records:
        iteration_s = 2 / record["images_per_s"]
        assert wait_s <= record["data_time_s"] < wait_s + 0.04 and iteration_s >= wait_s + step_s
        assert record["data_time_s"] < 0.6 * iteration_s  # it used to equal the whole iteration


def test_same_stem_images_duplicate_classes_and_a_short_palette_are_errors(tmp_path):
    write_folder_dataset(str(tmp_path / "mine"), ".png", False, counts=(("train", 2), ("val", 1)))
    Image.new("RGB", (64, 48)).save(tmp_path / "mine" / "images" / "train" / "train0.jpg")  # beside train0.png
    with pytest.raises(UserError, match="train0.jpg and train0.png share one stem"):
        data.folder_items(str(tmp_path / "mine"), ["train"])
    common = ["data.dataset=folder", f"output_dir={tmp_path / 'out'}", "model.num_classes=3", "data.classes=[]"]
    with pytest.raises(UserError, match=r"data.classes = \[\"a\", \"b\", \"a\"\]: expected distinct names"):
        config.validate(load(*common, 'data.classes=["a","b","a"]'))
    with pytest.raises(UserError, match=r"data.palette = .*a colour for each of the 3 classes"):
        config.validate(load(*common, "data.palette=[[0,0,0],[9,9,9]]"))
    config.validate(load(*common, "data.palette=[[0,0,0],[9,9,9],[1,2,3],[4,5,6]]"))


def test_a_dangling_symlink_among_predict_inputs_is_named(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "b.jpg")
    for pattern in (str(tmp_path), str(tmp_path / "*")):
        assert data.list_images(pattern) == [str(tmp_path / "a.png")]
        assert f"skipping {tmp_path / 'b.jpg'}: a symbolic link to {tmp_path / 'gone.jpg'}" in capsys.readouterr().err


def test_the_readme_names_the_checkpoint_the_demo_writes():
    with open(os.path.join(ROOT, "README.md")) as handle:
        named = set(re.findall(r"output/demo/(iter_\d+\.pth)", handle.read()))
    assert named == {f"iter_{load()['iterations']:07d}.pth"}


def test_fine_tuning_a_seg_checkpoint_keeps_the_sections_data_and_class_count(voc_root, tmp_path):
    demo_run = tmp_path / "demo"
    train_run(voc_root, demo_run, "iterations=1")
    weights = f"weights={demo_run / 'iter_0000001.pth'}"
    classes = 'data.classes=["background","box","bar"]'
    cfg = load(weights, classes, section="pspnet_folder")
    stored = checkpoint.stored_config(demo_run / "iter_0000001.pth")
    assert cfg["data"] == load(classes, section="pspnet_folder")["data"]  # folder, mydata, its splits: not voc
    assert cfg["model"] == {**stored["model"], "num_classes": 3}
    assert load(weights, section="pspnet_eval")["data"]["root"] == "voc"  # evaluate still carries the data
    write_folder_dataset(str(tmp_path / "mydata"), ".png", False, counts=(("train", 2), ("val", 1)))
    model = tasks.train_task(load(weights, classes, f"data_root={tmp_path}", f"output_dir={tmp_path / 'tuned'}",
                                  "device=cpu", "data.workers=0", "iterations=1", "data.batch_size=2",
                                  "data.crop_hw=[32,48]", "eval_interval=0", "final_eval=false", "pretrained=",
                                  section="pspnet_folder"))
    assert model.decode_head.conv_seg.out_channels == 3  # a new head for the section's classes


def test_evaluate_says_where_it_wrote_eval_json(voc_root, tmp_path, capsys):
    train_run(voc_root, tmp_path / "run", "iterations=1")
    out = tmp_path / "eval"
    tasks.evaluate_task(load(f"weights={tmp_path / 'run' / 'iter_0000001.pth'}", f"data_root={voc_root}",
                             f"output_dir={out}", "device=cpu", "data.workers=0", section="pspnet_eval"))
    assert f"wrote {out / 'eval.json'}" in capsys.readouterr().out and json.loads((out / "eval.json").read_text())
