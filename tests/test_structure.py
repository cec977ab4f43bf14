"""The shape the code promises: evaluation leaves the model's modes alone, validation creates nothing, only dist.py
reads the launcher's environment, the ONNX export leaves torch.onnx's logger as it found it."""
import ast
import logging
import os
from pathlib import Path

import pytest
import torch

from seg import amp, config, data, evaluate, predict, prepare, tasks, train

from test_evaluate import CONFIGS, TINY_PSPNET, small_pspnet

SEG = Path(__file__).resolve().parents[1] / "seg"


def modes(model):
    return [module.training for module in model.modules()]


def test_evaluation_and_panels_restore_every_module_mode(tmp_path):
    """A training model with norm_eval's BN layers in eval mode comes back from confusion_over and
    prediction_panels with each module in the mode it had."""
    prepare.make_demo_voc(str(tmp_path / "voc"), n_train=2, n_val=2, size=(48, 64), seed=1)
    cfg = config.load_config(CONFIGS, "pspnet_eval", [
        f"data_root={tmp_path}", "data.root=voc", "device=cpu", "data.workers=0", "data.test_scale=[64,48]",
        "model.num_classes=5", *[f"model.{key}={list(v) if isinstance(v, tuple) else v}"
                                 for key, v in TINY_PSPNET.items()]], tasks.builder_defaults)
    model = small_pspnet(num_classes=5).train()
    train.set_norm_eval(model, True)
    before = modes(model)
    assert True in before and False in before
    dataset, info = tasks.eval_dataset(cfg)
    loader = data.eval_loader(dataset, 0, 1, 0, False, evaluate.collate_views)
    evaluate.confusion_over(model, loader, torch.device("cpu"), 5, amp.autocast_for("cpu", "off"), cfg["test"])
    assert modes(model) == before
    inference = {"test": cfg["test"], "test_scale": cfg["data"]["test_scale"], "autocast": amp.autocast_for("cpu", "off")}
    predict.prediction_panels(model, dataset, 1, inference, (info["palette"], info["classes"]))
    assert modes(model) == before


def test_validation_creates_no_folder(tmp_path):
    target = tmp_path / "a" / "b" / "run"
    cfg = config.load_config(CONFIGS, "demo", [f"output_dir={target}", f"data_root={tmp_path / 'data'}"],
                             tasks.builder_defaults)
    config.validate(cfg)
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []


def test_validation_still_refuses_an_output_dir_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    cfg = config.load_config(CONFIGS, "demo", [f"output_dir={tmp_path / 'file' / 'run'}"], tasks.builder_defaults)
    with pytest.raises(config.UserError, match="output_dir"):
        config.validate(cfg)


def test_only_dist_reads_the_launcher_environment():
    readers = []
    for path in SEG.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and path.name != "dist.py":
                readers.append(f"{path.name}:{node.lineno}")
    assert readers == []


def test_onnx_export_leaves_the_logger_level(tmp_path):
    pytest.importorskip("onnxscript")
    logger = logging.getLogger("torch.onnx")
    logger.setLevel(logging.INFO)
    try:
        predict.export_onnx(small_pspnet(num_classes=3), (32, 32), str(tmp_path / "m.onnx"))
        assert logger.level == logging.INFO and os.path.isfile(tmp_path / "m.onnx")
    finally:
        logger.setLevel(logging.NOTSET)
