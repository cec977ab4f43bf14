"""Issue 10: nothing lost, nothing silent. Resume after kill -9 and with evaluations on checkpoint iterations,
non-finite losses, outputs that would replace inputs, and a config validated before anything runs."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from seg import checkpoint, config, metrics, tasks
from seg.files import UserError

from test_train_e2e import CONFIGS, ROOT, assert_same_weights, final_weights, overrides


def load(*overrides_):
    return config.load_config(CONFIGS, "demo", list(overrides_), tasks.builder_defaults)


def test_resume_is_exact_with_evaluations_on_checkpoint_iterations(voc_root, tmp_path):
    every2 = ["iterations=4", "checkpoint_interval=2", "eval_interval=2"]
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    tasks.train_task(load(*overrides(voc_root, whole, *every2)))
    os.makedirs(resumed)
    state = checkpoint.load_training_state(os.path.join(whole, "iter_0000002.pth"))
    checkpoint.save_atomic(state, os.path.join(resumed, "iter_0000002.pth"))
    tasks.train_task(load(*overrides(voc_root, resumed, *every2, "resume=true")))
    assert_same_weights(final_weights(whole), final_weights(resumed))


def iterations_logged(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return [json.loads(line)["iteration"] for line in handle]


def test_kill_9_then_resume_ends_as_the_uninterrupted_run_with_one_record_per_iteration(voc_root, tmp_path):
    """What torchrun --max-restarts does after a crash, by hand: a run killed mid-way and started again with
    resume=true continues from its last checkpoint; metrics.jsonl keeps one record per iteration."""
    common = ["iterations=30", "checkpoint_interval=4", "model.dropout=0.1"]
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    tasks.train_task(load(*overrides(voc_root, whole, *common)))
    command = [sys.executable, "run.py", "demo", *overrides(voc_root, killed, *common, "resume=true")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)
    for line in process.stdout:
        if line.startswith("iter 7/30"):  # 6 is in metrics.jsonl by now; the next checkpoint is at 8
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert 6 in iterations_logged(killed) and checkpoint.latest_checkpoint(killed).name == "iter_0000004.pth"
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout and "iter_0000004.pth" in result.stdout
    assert iterations_logged(killed) == list(range(1, 31))
    assert_same_weights(final_weights(whole), final_weights(killed))


def test_resume_past_the_last_iteration_says_so(voc_root, tmp_path):
    out = str(tmp_path / "out")
    tasks.train_task(load(*overrides(voc_root, out, "iterations=3")))
    with pytest.raises(UserError, match="iteration 3.*iterations = 2.*nothing is left to train"):
        tasks.train_task(load(*overrides(voc_root, out, "iterations=2", "resume=true")))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_losses_stop_naming_the_checkpoint_to_resume_from(tmp_path, value):
    checkpoint.save_atomic({"model": {}, "iteration": 20}, str(tmp_path / "iter_0000020.pth"))
    record = {"iteration": 23, "total": 100, "loss_seg": 0.5, "loss_aux": value, "lr": 0.01}
    with pytest.raises(UserError, match=r"not finite.*iter_0000020\.pth.*resume=true"):
        metrics.log_record(record, str(tmp_path), 0)
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_predict_never_writes_over_an_input(tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (32, 24), (10, 200, 30)).save(folder / "photo.png")
    before = (folder / "photo.png").read_bytes()
    cfg = config.load_config(CONFIGS, "pspnet_predict", ["weights=w.pth", f"input={folder}", f"output={folder}"],
                             tasks.builder_defaults)
    with pytest.raises(UserError, match="photo.png would replace the input"):
        tasks.predict_jobs(cfg)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match="existing file"):
        tasks.predict_jobs({**cfg, "output": str(tmp_path / "file")})
    assert (folder / "photo.png").read_bytes() == before and (tmp_path / "file").read_text() == "mine"
    assert tasks.predict_jobs({**cfg, "output": str(tmp_path / "out")}) == [(str(folder / "photo.png"), "photo")]


BAD = [("amp=fp8", "amp"), ("device=tpu", "device"), ("log_interval=0", "log_interval"),
       ("data.batch_size=0", "data.batch_size"), ("loss_scale=0", "loss_scale"), ("data.crop_hw=[0,0]", "data.crop_hw"),
       ("data.workers=-1", "data.workers"), ("test.mode=sliding", "test.mode"), ("iterations=0", "iterations"),
       ("iterations=-5", "iterations"), ("data.dataset=coco", "data.dataset"), ("test.scales=[]", "test.scales"),
       ("data.ratio_range=[2.0,0.5]", "data.ratio_range"), ("data.jitter_on=gpu", "data.jitter_on")]


@pytest.mark.parametrize("override, key", BAD)
def test_bad_values_are_found_before_anything_runs(override, key, tmp_path):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        config.validate(load(f"output_dir={tmp_path / 'out'}", override))
    assert not os.path.exists(tmp_path / "out")  # nothing made for a config that fails


def test_unknown_model_and_unwritable_output_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="model.name = 'unet'"):
        load("model.name=unet")
    (tmp_path / "file").write_text("mine")
    for folder in ("/proc/seg-test", str(tmp_path / "file"), str(tmp_path / "file" / "below")):
        with pytest.raises(UserError, match="output_dir = .*cannot write there"):
            config.validate(load(f"output_dir={folder}"))
    assert (tmp_path / "file").read_text() == "mine"


def test_command_line_errors_are_one_line_exit_2_and_write_nothing(tmp_path):
    """An invalid data.dataset used to generate a Cityscapes demo into the VOC folder before failing."""
    result = subprocess.run([sys.executable, "run.py", "demo", f"data_root={tmp_path}", "data.dataset=coco",
                             f"output_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "data.dataset" in result.stderr
    assert os.listdir(tmp_path) == []



@pytest.mark.parametrize("key", ["pretrained", "weights"])
def test_a_missing_weights_file_is_found_before_data_or_output_are_made(tmp_path, key):
    """A missing pretrained file used to surface once the demo data were generated and the run folder made."""
    result = subprocess.run([sys.executable, "run.py", "demo", f"data_root={tmp_path}", f"{key}={tmp_path / 'no.pth'}",
                             f"output_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and f"{key} = " in result.stderr
    assert os.listdir(tmp_path) == []

def copy_of_voc(voc_root, tmp_path):
    import shutil

    shutil.copytree(os.path.join(voc_root, "voc"), tmp_path / "voc")
    return tmp_path / "voc"


def test_a_missing_val_image_stops_training_before_it_starts(voc_root, tmp_path):
    root = copy_of_voc(voc_root, tmp_path)
    stem = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[1]
    os.remove(root / "JPEGImages" / f"{stem}.jpg")
    cfg = load(*overrides(str(tmp_path), str(tmp_path / "out"), "iterations=2", "final_eval=true"))
    with pytest.raises(UserError, match=f"{stem}.jpg: not found.*data.val_splits"):
        tasks.train_task(cfg)
    assert checkpoint.latest_checkpoint(tmp_path / "out") is None  # nothing trained


def test_check_data_reports_every_problem_and_the_pixels_per_class(voc_root, tmp_path):
    from PIL import Image

    root = copy_of_voc(voc_root, tmp_path)
    train_stems = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    (root / "JPEGImages" / f"{train_stems[0]}.jpg").write_bytes(b"not a jpeg")
    os.remove(root / "SegmentationClass" / f"{train_stems[1]}.png")
    val_stem = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    label = np.array(Image.open(root / "SegmentationClass" / f"{val_stem}.png"))
    label[0, 0] = 9
    Image.fromarray(label).save(root / "SegmentationClass" / f"{val_stem}.png")
    result = subprocess.run([sys.executable, "run.py", "demo", "--check-data", f"data_root={tmp_path}",
                             "data.root=voc", f"output_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "3 problems" in result.stderr and "Traceback" not in result.stderr
    for name in (f"{train_stems[0]}.jpg", f"{train_stems[1]}.png", f"{val_stem}.png: label value 9"):
        assert name in result.stderr
    counts = {}  # the val split's pixels per class, counted here from the files that are fine
    for stem in (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[1:]:
        values, numbers = np.unique(np.array(Image.open(root / "SegmentationClass" / f"{stem}.png")), return_counts=True)
        for value, number in zip(values.tolist(), numbers.tolist()):
            counts[value] = counts.get(value, 0) + number
    val_table = result.stdout[result.stdout.index("data.val_splits"):]
    rows = [line.split() for line in val_table.splitlines()[1:6]]
    assert [row[0] for row in rows] == tasks.dataset_info(load())["classes"]
    assert [int(row[1].replace(",", "")) for row in rows] == [counts.get(class_id, 0) for class_id in range(5)]


# ------------------------------------------------------------------ issue 17: faults end in one line, exit 2

def test_a_full_disk_at_a_checkpoint_names_the_file_and_keeps_the_previous_one(voc_root, tmp_path, monkeypatch):
    import errno
    import io

    import torch

    out, real_save = tmp_path / "out", torch.save

    class FullDisk(io.RawIOBase):
        def writable(self):
            return True

        def write(self, payload):
            raise OSError(errno.ENOSPC, "No space left on device")

    def save(obj, stream, *args, **kwargs):  # the first checkpoint fits, the second finds the disk full
        return real_save(obj, FullDisk() if obj["iteration"] == 4 else stream, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(UserError, match=r"iter_0000004.pth: cannot write \(No space left on device\)"):
        tasks.train_task(load(*overrides(voc_root, str(out), "iterations=4", "checkpoint_interval=2")))
    assert checkpoint.load_training_state(out / "iter_0000002.pth")["iteration"] == 2
    assert sorted(os.listdir(out)) == ["config.toml", "iter_0000002.pth", "log.txt", "metrics.jsonl", "run.json", "tb"]  # no torn temporary


def test_an_unusable_tensorboard_folder_warns_and_training_goes_on(voc_root, tmp_path, capsys):
    out = tmp_path / "out"
    tasks.train_task(load(*overrides(voc_root, str(out), "iterations=2")))
    import shutil

    shutil.rmtree(out / "tb")
    (out / "tb").write_text("a file where the folder goes")
    tasks.train_task(load(*overrides(voc_root, str(out), "iterations=3", "resume=true")))
    assert f"warning: TensorBoard logging is off: cannot write {out / 'tb'}" in capsys.readouterr().out
    assert checkpoint.latest_checkpoint(out).name == "iter_0000003.pth"


def test_unreadable_metrics_lines_are_dropped_on_resume_saying_so(voc_root, tmp_path, capsys):
    out = tmp_path / "out"
    tasks.train_task(load(*overrides(voc_root, str(out), "iterations=2")))
    with open(out / "metrics.jsonl", "ab") as handle:
        handle.write(b'\xff\xfe{"iteration": 1}\n{"iteration": "3"}\n[1, 2]\n{"iteration": 2, "mIoU": 0.5}\n')
    tasks.train_task(load(*overrides(voc_root, str(out), "iterations=3", "resume=true")))
    assert "dropped 3 unreadable lines" in capsys.readouterr().out
    assert iterations_logged(out) == [1, 2, 2, 3]  # the readable evaluation record at 2 stays


@pytest.mark.parametrize("override, example", [("data={batch_size=4}", "data.batch_size=4"),
                                               ("optimizer={lr=0.001}", "optimizer.lr=0.001"),
                                               ("test={}", "test.KEY=VALUE"), ("seed={a=1}", "seed.a=1")])
def test_inline_table_overrides_are_a_clear_error(override, example):
    with pytest.raises(UserError, match=f"set a table's keys one by one, like {example}"):
        load(override)


def test_a_batch_the_processes_cannot_share_is_refused_before_any_work(tmp_path):
    with pytest.raises(UserError, match=r"data.batch_size = 8: expected a global batch divisible by the 3 processes"):
        config.validate(load(f"output_dir={tmp_path / 'out'}"), world_size=3)
    env = {**os.environ, "WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}  # what torchrun would set
    result = subprocess.run([sys.executable, "run.py", "demo", f"data_root={tmp_path}", f"output_dir={tmp_path / 'out'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and "data.batch_size" in result.stderr and os.listdir(tmp_path) == []


def test_a_user_error_on_one_rank_stops_every_rank_with_exit_2_and_no_traceback(tmp_path, free_port):
    """Rank 0 cannot generate the demo data (data_root is a file); rank 1 waits for it at a barrier."""
    (tmp_path / "file").write_text("not a folder")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(free_port), "run.py", "demo", f"data_root={tmp_path / 'file'}", f"output_dir={tmp_path / 'out'}",
                             "data.workers=0"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    ranks = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "[rank1]: Traceback" not in result.stderr and "Connection closed" not in result.stderr, result.stderr[-3000:]
    import re

    assert len(re.findall(r"exitcode\s*: 2 ", result.stderr)) == 2  # torchrun's summary of both processes
    assert len(ranks) == 2 and "cannot write" in ranks[0] + ranks[1] and "another process" in ranks[0] + ranks[1]
