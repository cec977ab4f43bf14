"""Understanding a run: scores from the confusion matrix against brute-force counts, the worst images against
per-image brute force, validation loss against F.cross_entropy, the report page (files it references exist, plots are
PNGs), and Cityscapes labelIds output scored by cityscapesScripts (or its formula) as seg scores it."""
import contextlib
import glob
import html.parser
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from seg import config, data, evaluate, metrics, prepare, tasks
from seg.pointrend import build_pointrend
from seg.pspnet import build_pspnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs.toml")
TINY_PSPNET = ["model.num_classes=5", "model.base_channels=8", "model.stem_channels=8", "model.blocks=[1,1,1,1]",
               "model.channels=16", "model.aux_channels=8"]


def nan_equal(a, b):
    return all((math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-12) for x, y in zip(a, b))


def nanmean(values):
    kept = [value for value in values if not math.isnan(value)]
    return sum(kept) / len(kept) if kept else math.nan


# ----------------------------------------------------------------------------------- scores from the matrix

@settings(max_examples=40, deadline=None, derandomize=True)
@given(classes=st.integers(1, 5), pixels=st.integers(1, 60), seed=st.integers(0, 10 ** 6))
def test_scores_from_the_matrix_equal_brute_force_counts(classes, pixels, seed):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, classes + 1, pixels)
    label[label == classes] = 255
    pred = rng.integers(0, classes, pixels)
    got = metrics.metrics_from_confusion(metrics.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label),
                                                                  classes))
    valid = [(t, p) for t, p in zip(label.tolist(), pred.tolist()) if t != 255]
    assert got["confusion"] == [[sum(1 for t, p in valid if (t, p) == (i, j)) for j in range(classes)]
                                for i in range(classes)]
    tp = [sum(1 for t, p in valid if t == p == k) for k in range(classes)]
    truth = [sum(1 for t, _ in valid if t == k) for k in range(classes)]
    guessed = [sum(1 for _, p in valid if p == k) for k in range(classes)]
    ratio = lambda a, b: a / b if b else math.nan  # noqa: E731
    expected = {"Precision": [ratio(tp[k], guessed[k]) for k in range(classes)],
                "Recall": [ratio(tp[k], truth[k]) for k in range(classes)],
                "Dice": [ratio(2 * tp[k], truth[k] + guessed[k]) for k in range(classes)],
                "IoU": [ratio(tp[k], truth[k] + guessed[k] - tp[k]) for k in range(classes)]}
    for key, values in expected.items():
        assert nan_equal(got[key], values), key
        assert nan_equal([got[f"m{key}"]], [nanmean(values)]), key
    fw = sum(truth[k] * expected["IoU"][k] for k in range(classes) if truth[k]) / len(valid) if valid else math.nan
    assert nan_equal([got["fwIoU"]], [fw])
    assert got["Recall"] == got["Acc"] or nan_equal(got["Recall"], got["Acc"])


def test_the_table_gains_mdice_on_its_summary_line_only():
    result = metrics.metrics_from_confusion(torch.tensor([[3, 1], [0, 4]]))
    lines = metrics.format_table(result, ["a", "b"]).splitlines()
    assert lines[-1] == "aAcc 87.50  mIoU 77.50  mAcc 87.50  mDice 87.30"  # Dice a 6/7, b 8/9
    assert metrics.format_table({k: result[k] for k in ("aAcc", "mIoU", "mAcc", "IoU", "Acc")}, ["a", "b"]) == \
        "\n".join(lines[:-1] + ["aAcc 87.50  mIoU 77.50  mAcc 87.50"])


# ------------------------------------------------------------------- worst images, validation loss, report

def eval_config(voc_root, output_dir, *extra):
    return config.validate(config.load_config(CONFIGS, "demo", [
        f"data_root={voc_root}", "data.root=voc", f"output_dir={output_dir}", "device=cpu", "data.workers=0",
        "data.test_scale=[64,48]", *TINY_PSPNET, *extra], tasks.builder_defaults))


def test_worst_images_and_val_loss_equal_per_image_brute_force(voc_root, tmp_path):
    cfg = eval_config(voc_root, tmp_path, "report.worst=2")
    os.makedirs(tmp_path, exist_ok=True)
    torch.manual_seed(3)
    model = tasks.build_model(cfg["model"]).eval()
    result = tasks.evaluation(cfg, model, torch.device("cpu"))()
    dataset, _ = tasks.eval_dataset(cfg)
    mious, loss, valid = [], 0.0, 0
    for views, label in dataset:
        image, hw = evaluate.stack_views(views)
        with torch.no_grad():
            logits = evaluate.test_time_scores(model, image, hw, label.shape, cfg["test"])
        pred, target = logits.argmax(dim=1)[0].numpy(), torch.from_numpy(label.astype(np.int64))[None]
        loss += F.cross_entropy(logits, target, ignore_index=255, reduction="sum").item()
        valid += int((label != 255).sum())
        keep = label != 255
        present = np.union1d(label[keep], pred[keep])
        mious.append(np.mean([np.sum((label == k) & (pred == k) & keep) / np.sum(((label == k) | (pred == k)) & keep)
                              for k in present]))
    record = json.loads((tmp_path / "eval.json").read_text())
    expected = sorted(range(len(mious)), key=lambda index: (mious[index], index))[:2]
    assert [item["index"] for item in record["worst"]] == expected
    assert [item["mIoU"] for item in record["worst"]] == pytest.approx([mious[index] for index in expected])
    for item in record["worst"]:
        with Image.open(tmp_path / item["panel"]) as picture:
            assert picture.size[0] == 3 * picture.size[1] * 64 // 48  # photo | truth | prediction
    assert result["val_loss"] == pytest.approx(loss / valid, rel=1e-5) == record["val_loss"]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"] == record["val_loss"]
    flipped = tasks.evaluation({**cfg, "test": {**cfg["test"], "flip": True}}, model, torch.device("cpu"))()
    assert flipped["val_loss"] is None  # probabilities averaged over flips are not logits: no loss, stated


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_per_image_counts_and_val_loss_never_synchronise_with_the_cuda_device():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_pspnet(num_classes=3, base_channels=8, stem_channels=8, blocks=(1, 1, 1, 1), channels=16,
                         aux_channels=8).to(device).eval()
    label = torch.randint(0, 3, (1, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    label[:, :5] = 255
    batch = {"image": torch.randint(0, 256, (1, 3, 40, 56), dtype=torch.uint8).pin_memory(),
             "hw": torch.tensor([[40, 56]]).pin_memory(), "label": label.pin_memory()}
    test = {"mode": "whole", "crop_hw": [512, 512], "stride_hw": [341, 341], "flip": False, "scales": [1.0]}

    def run():
        return evaluate.confusion_over(model, [batch, batch], device, 3, contextlib.nullcontext, test,
                                       per_image=(3, [2, 0]))
    run()  # warm-up: lazy CUDA/cuDNN set-up may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        matrix, details = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    counts = details["per_image"].cpu()
    assert counts[1].sum() == 0 and counts[0, 0].sum() == counts[2, 0].sum() == matrix.diag().sum() // 2
    assert details["val_loss"].item() > 0


class Sources(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.tags = [], set()

    def handle_starttag(self, tag, attributes):
        self.tags.add(tag)
        self.sources += [value for name, value in attributes if name in ("src", "href")]


def test_report_page_references_only_files_that_exist_and_plots_are_pngs(voc_root, tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    cfg = eval_config(voc_root, run, "task=train", "iterations=4", "log_interval=2", "eval_interval=2",
                      "checkpoint_interval=4", "report.worst=2", "data.batch_size=2", "data.crop_hw=[32,32]")
    tasks.train_task(cfg)
    tasks.train_task({**cfg, "iterations": 6, "resume": True})  # a resumed run
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"iteration": 7, "loss')  # a run in progress: its newest line is half written
    page = metrics.write_report(str(run))
    records = metrics.read_records(run / "metrics.jsonl")
    assert [r["iteration"] for r in metrics.by_iteration(records, "mIoU")] == [2, 4, 6]
    assert [r["iteration"] for r in metrics.by_iteration(records, "lr")] == [2, 4, 6]
    assert "evaluation at iteration 6:" in Path(page).read_text()
    parser = Sources()
    text = Path(page).read_text()
    parser.feed(text)
    assert "script" not in parser.tags and len(parser.sources) == 3 + 2  # curves, IoU, confusion; 2 worst panels
    for source in parser.sources:
        path = os.path.join(os.path.dirname(page), source)
        with Image.open(path) as picture:
            assert picture.format == "PNG" and picture.size[0] > 100
            picture.load()
    assert "num_classes = 5" in text  # the checkpoint's config


# ------------------------------------------------------------------------------------- Cityscapes labelIds

def cityscapes_scripts_miou(predictions, truths):
    """mIoU of labelIds PNGs by cityscapesScripts' own evaluator (evaluateImgLists), or None where not installed."""
    try:
        from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs
    except ImportError:
        return None
    arguments = cs.args
    saved = {key: getattr(arguments, key) for key in ("evalInstLevelScore", "JSONOutput", "quiet")}
    arguments.evalInstLevelScore, arguments.JSONOutput, arguments.quiet = False, False, True  # no instanceIds here
    try:
        return cs.evaluateImgLists(predictions, truths, arguments)["averageScoreClasses"]
    finally:
        for key, value in saved.items():
            setattr(arguments, key, value)


def cityscapes_formula_miou(predictions, truths):
    """cityscapesScripts' formula (evalPixelLevelSemanticLabeling.getIouScoreForLabel) reimplemented: TP / (TP + FP
    + FN) over the 19 evaluated ids, false positives counted on evaluated truth pixels only, NaN classes skipped."""
    matrix = np.zeros((256, 256), np.int64)
    for prediction, truth in zip(predictions, truths):
        pred, label = (np.asarray(Image.open(path)).astype(np.int64) for path in (prediction, truth))
        np.add.at(matrix, (label.ravel(), pred.ravel()), 1)
    evaluated = list(data.CITYSCAPES_TRAIN_LABEL_IDS)
    scores = [matrix[k, k] / (matrix[k].sum() + matrix[evaluated, k].sum() - matrix[k, k])
              if matrix[k].sum() + matrix[evaluated, k].sum() else math.nan for k in evaluated]
    return nanmean(scores)


def test_cityscapes_label_ids_round_trip_and_score_as_seg_does(tmp_path):
    assert data.CITYSCAPES_ID_TO_TRAINID[data.CITYSCAPES_TRAINID_TO_ID].tolist() == list(range(19))
    root = prepare.make_demo_cityscapes(tmp_path / "cityscapes", n_train=1, n_val=3, size=(48, 96), seed=2)
    torch.manual_seed(0)
    model_keys = dict(num_classes=19, norm="bn", stem_channels=8, base_channels=4, blocks=[1, 1, 1, 1],
                      fpn_channels=16, head_channels=8, head_groups=4, point_fc=16, subdivision_num_points=300)
    model = build_pointrend(**{k: tuple(v) if isinstance(v, list) else v for k, v in model_keys.items()})
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    cfg = config.validate(config.load_config(CONFIGS, "pointrend_eval", [
        f"data_root={tmp_path}", "data.root=cityscapes", f"output_dir={tmp_path / 'out'}", "device=cpu",
        "data.workers=0", "data.test_scale=[96,48]", f"weights={tmp_path / 'weights.pth'}", "label_ids=cityscapes",
        *[f"model.{key}={json.dumps(value)}" for key, value in model_keys.items()]], tasks.builder_defaults))
    result = tasks.evaluate_task(cfg)
    truths = sorted(glob.glob(str(root / "gtFine" / "val" / "*" / "*_gtFine_labelIds.png")))
    predictions = [str(tmp_path / "out" / "label_ids" / (os.path.basename(truth)[: -len("_gtFine_labelIds.png")]
                                                         + "_leftImg8bit.png")) for truth in truths]
    dataset, _ = tasks.eval_dataset(cfg)
    for prediction, (image, _) in zip(predictions, dataset.items):
        ids = np.asarray(Image.open(prediction))
        assert set(np.unique(ids).tolist()) <= set(data.CITYSCAPES_TRAIN_LABEL_IDS)
        with Image.open(image) as photo:
            assert ids.shape == photo.size[::-1]
    assert len(set(np.unique(np.asarray(Image.open(predictions[0]))).tolist())) > 1  # not a constant map
    assert cityscapes_formula_miou(predictions, truths) == pytest.approx(result["mIoU"], rel=1e-9)
    official = cityscapes_scripts_miou(predictions, truths)
    if official is None:
        pytest.skip("cityscapesscripts is not installed (pip install --no-deps cityscapesscripts pyquaternion)")
    assert official == pytest.approx(result["mIoU"], rel=1e-9)


def test_records_skip_torn_and_non_utf8_lines(tmp_path):
    """A metrics.jsonl line that is not UTF-8 is skipped like a torn one (reading it raised UnicodeDecodeError)."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"iteration": 2, "lr": 0.1}\n{"iteration": 4, "lr": "\xff"}\n{"iteration": 6, "lr": 0.05}\n'
                     b'{"iteration": 8, "l')
    assert metrics.read_records(path) == [{"iteration": 2, "lr": 0.1}, {"iteration": 6, "lr": 0.05}]
