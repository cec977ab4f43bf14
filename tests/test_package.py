"""Issue 20, seg as a package and a library: installed into a fresh virtual environment, `seg` runs from another
folder; `--config` files inherit the shipped sections (and a dumped resolved config loads); the Python API equals
`pspnet_predict` pixel for pixel; `save_probabilities`; export at the checkpoint's size; the README API snippet."""
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import seg
from seg import checkpoint, config, evaluate, predict, tasks
from seg.files import UserError
from seg.pspnet import build_pspnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs.toml")
TINY_MODEL = ["model.num_classes=5", "model.base_channels=8", "model.stem_channels=8", "model.blocks=[1,1,1,1]",
              "model.channels=16", "model.aux_channels=8"]


def train_overrides(data_root, output_dir, *extra):
    """A tiny demo-section training run on the voc_root fixture (48×64 images: test_scale [64, 48] keeps them)."""
    return [f"data_root={data_root}", "data.root=voc", f"output_dir={output_dir}", "task=train", "device=cpu",
            "data.workers=0", "log_interval=1", "eval_interval=0", "final_eval=false", "data.batch_size=4",
            "data.crop_hw=[32,32]", "data.scale=[64,48]", "data.test_scale=[64,48]", "optimizer.lr=0.1", *TINY_MODEL,
            *extra]


@pytest.fixture(scope="module")
def trained(voc_root, tmp_path_factory):
    """(a seg checkpoint trained 24 iterations: it already tells discs from the background, its photo paths)."""
    output = tmp_path_factory.mktemp("trained")
    tasks.train_task(config.validate(config.load_config(CONFIGS, "demo", train_overrides(voc_root, output,
                                                                                         "iterations=24"),
                                                        tasks.builder_defaults)))
    photos = os.path.join(voc_root, "voc", "JPEGImages")
    return str(checkpoint.latest_checkpoint(output)), sorted(os.path.join(photos, name) for name in os.listdir(photos))


def run_cli(*args, cwd=ROOT, program=(sys.executable, "run.py"), env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*program, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


# ------------------------------------------------------------------------------------------ the API

def test_api_equals_pspnet_predict_pixel_for_pixel(trained, tmp_path):
    weights, photos = trained
    result = run_cli("pspnet_predict", f"weights={weights}", f"input={os.path.dirname(photos[0])}",
                     f"output={tmp_path}", "device=cpu", "save_probabilities=true")
    assert result.returncode == 0, result.stderr[-2000:]
    predictor = seg.load(weights, device="cpu")
    assert predictor.classes == ["background", "disc", "square", "triangle", "cross"]
    assert predictor.palette[:2] == [(0, 0, 0), (128, 0, 0)]
    arrays = [np.asarray(Image.open(path).convert("RGB")) for path in photos]
    labels = predictor(photos)
    assert [label.dtype for label in labels] == [np.uint8] * len(photos)
    for path, label, from_array, from_pillow in zip(photos, labels, predictor(arrays),
                                                    predictor([Image.open(path) for path in photos])):
        stem = os.path.splitext(os.path.basename(path))[0]
        with Image.open(tmp_path / f"{stem}.png") as written:
            np.testing.assert_array_equal(label, np.asarray(written))
        np.testing.assert_array_equal(from_array, label)
        np.testing.assert_array_equal(from_pillow, label)
        stored = np.load(tmp_path / f"{stem}_prob.npz")["probabilities"]
        assert stored.dtype == np.float16 and stored.shape == (5, 48, 64)
        np.testing.assert_allclose(stored, predictor.probabilities(path), atol=1e-3)
    assert len(np.unique(np.concatenate(labels))) >= 2  # the comparison covers more than the background


def test_probabilities_are_the_softmax_of_the_models_logits(trained):
    """At the test scale the photo keeps its size: the probabilities are softmax(logits), with flip the mean of the
    softmax of the photo's and the mirrored photo's mirrored-back logits (mmseg aug_test), at the photo's size."""
    weights, photos = trained
    predictor = seg.load(weights, device="cpu", overrides=["amp=off"])  # exact fp32, as the logits below
    image = torch.from_numpy(np.asarray(Image.open(photos[5]).convert("RGB"))[:, :, ::-1].copy()).permute(2, 0, 1)[None]
    with torch.no_grad():
        logits = evaluate.whole_logits(predictor.model, image)
        mirrored = evaluate.whole_logits(predictor.model, image.flip(-1)).flip(-1)
    plain, flipped = predictor.probabilities(photos[5]), predictor.probabilities(photos[5], flip=True)
    assert plain.dtype == np.float32 and plain.shape == (5, 48, 64)
    np.testing.assert_allclose(plain, logits.softmax(1)[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(flipped, ((logits.softmax(1) + mirrored.softmax(1)) / 2)[0].numpy(), atol=1e-6)
    np.testing.assert_array_equal(predictor(photos[5]), logits.argmax(1)[0].numpy())
    assert not np.allclose(plain, flipped)
    with pytest.raises(UserError, match="test.mode"):
        predictor(photos[0], mode="sliding")
    with pytest.raises(UserError, match="H×W×3 RGB"):
        predictor(np.zeros((4, 4), np.float32))


def test_api_options_equal_predict_with_the_same_test_keys(trained, tmp_path):
    weights, photos = trained
    options = ["test.flip=true", "test.scales=[0.75,1.0,1.5]"]
    tasks.predict_task(config.validate(config.load_config(CONFIGS, "pspnet_predict", [
        f"weights={weights}", f"input={photos[8]}", f"output={tmp_path}", "device=cpu", *options],
        tasks.builder_defaults, checkpoint.stored_config)))
    label = seg.load(weights, device="cpu")(photos[8], flip=True, scales=[0.75, 1.0, 1.5])
    with Image.open(tmp_path / (os.path.splitext(os.path.basename(photos[8]))[0] + ".png")) as written:
        np.testing.assert_array_equal(label, np.asarray(written))


def test_files_of_other_formats_need_the_model_name(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "mmseg_like.pth"  # an mmseg file's layout: {"meta", "state_dict"}
    tiny = dict(num_classes=21, base_channels=8, stem_channels=8, blocks=(1, 1, 1, 1), channels=16, aux_channels=8)
    torch.save({"meta": {}, "state_dict": build_pspnet(**tiny).state_dict()}, path)
    with pytest.raises(UserError, match='model="pspnet"'):
        seg.load(path, device="cpu")
    model = ["model.base_channels=8", "model.stem_channels=8", "model.blocks=[1,1,1,1]", "model.channels=16",
             "model.aux_channels=8"]
    predictor = seg.load(path, device="cpu", model="pspnet", overrides=model)
    assert len(predictor.classes) == 21 and predictor.classes[15] == "person"  # pspnet_predict's VOC classes
    assert predictor(np.zeros((20, 30, 3), np.uint8)).shape == (20, 30)


def readme_snippet():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.search(r"```python\n(.*?)```", text[text.index("## Python API"):], re.S).group(1)


def test_the_readme_snippet_as_written(trained, tmp_path, monkeypatch, capsys):
    weights, photos = trained
    shutil.copy(weights, tmp_path / "iter_0002000.pth")
    shutil.copy(photos[11], tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    names = {}
    exec(readme_snippet(), names)  # noqa: S102 - the README's own code
    tasks.predict_task(config.validate(config.load_config(CONFIGS, "pspnet_predict", [
        f"weights={weights}", f"input={tmp_path / 'photo.jpg'}", f"output={tmp_path / 'out'}", "device=cpu"],
        tasks.builder_defaults, checkpoint.stored_config)))
    with Image.open(tmp_path / "out" / "photo.png") as written:
        np.testing.assert_array_equal(names["label"], np.asarray(written))
    assert len(np.unique(names["label"])) >= 2
    with Image.open(tmp_path / "photo_colours.png") as colours:
        np.testing.assert_array_equal(np.asarray(colours), np.asarray(names["predictor"].palette)[names["label"]])
    assert names["probabilities"].shape == (5, 48, 64) and len(names["labels"]) == 2
    assert "background" in capsys.readouterr().out


def test_import_seg_is_cheap():
    loaded = subprocess.run([sys.executable, "-c", "import sys, seg; print(sorted(m.split('.')[0] for m in "
                             "sys.modules if m.split('.')[0] in ('torch', 'numpy', 'PIL')))"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert loaded.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------- export size

def test_export_takes_the_checkpoints_fixed_size(trained, tmp_path, capsys, monkeypatch):
    weights, _ = trained
    exported = []
    monkeypatch.setattr(predict, "export_and_check", lambda model, hw, path, images: exported.append(hw))
    tasks.export_task(config.validate(config.load_config(CONFIGS, "pspnet_export", [
        f"weights={weights}", f"output={tmp_path / 'tiny.onnx'}"], tasks.builder_defaults, checkpoint.stored_config)))
    assert exported == [(48, 64)] and "exporting for H×W = 48×64" in capsys.readouterr().out


def export_hw(weights, *extra, log=print):
    return config.load_config(CONFIGS, "pspnet_export", [f"weights={weights}", "output=x.onnx", *extra],
                              tasks.builder_defaults, checkpoint.stored_config, log=log)["export"]["hw"]


def test_export_keeps_the_recipe_size_for_keep_ratio_scales(trained, tmp_path):
    weights, _ = trained
    lines = []
    assert export_hw(weights, log=lines.append) == [48, 64] and "export.hw = [48, 64]" in lines[0]
    assert export_hw(weights, "export.hw=[32,32]") == [32, 32]  # the command line wins
    state = checkpoint.load_training_state(weights)
    state["config"]["data"]["test_scale"] = [2048, 512]  # mmseg's: a cap on the long side, short side 512
    checkpoint.save_atomic(state, tmp_path / "recipe.pth")
    assert export_hw(tmp_path / "recipe.pth") == [512, 683]
    checkpoint.save_atomic({"meta": {}, "state_dict": state["model"]}, tmp_path / "mmseg.pth")
    assert export_hw(tmp_path / "mmseg.pth") == [512, 683]


# -------------------------------------------------------------------------------------- --config files

def write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_user_sections_inherit_the_shipped_ones(tmp_path):
    mine = write(tmp_path / "my.toml", """
        [mine]
        inherit = "pspnet_folder"
        iterations = 7
        data = { root = "boxes", classes = ["background", "box"] }
    """)
    expected = config.load_config(CONFIGS, "pspnet_folder", ["iterations=7", "data.root=boxes",
                                                             'data.classes=["background","box"]'],
                                  tasks.builder_defaults)
    got = config.load_config([CONFIGS, mine], "mine", [], tasks.builder_defaults)
    assert got == {**expected, "section": "mine"} and got["model"]["num_classes"] == 2
    assert config.load_config([CONFIGS, mine], "mine", ["iterations=9"], tasks.builder_defaults)["iterations"] == 9


@pytest.mark.parametrize("text, message", [
    ('[mine]\ninherit = "pspnet_folder"\ndata = { clases = [] }\n', r"my\.toml \[mine\]: unknown key 'data\.clases'; "
                                                                     r"closest: classes"),
    ('[mine]\ninherit = "pspnet_folder"\niterations = "2000"\n', r"my\.toml \[mine\] iterations='2000': expected a int"),
    ('[mine]\ninherit = "pspnet_fodler"\n', r"my\.toml: no section \[pspnet_fodler\]; closest: pspnet_folder"),
    ('[base]\niterations = 1\n', r"my\.toml: \[base\] is configs\.toml's"),
    ('[mine\n', r"my\.toml: not valid TOML"),
])
def test_mistakes_in_the_users_file_name_it(tmp_path, text, message):
    mine = write(tmp_path / "my.toml", text)
    with pytest.raises(UserError, match=message):
        config.load_config([CONFIGS, mine], "mine", [], tasks.builder_defaults)


@pytest.mark.parametrize("name", ["pspnet_1p", "my_run"])
def test_a_dumped_resolved_config_loads_as_it_was(tmp_path, name):
    """A file whose one section is a whole resolved config (every key, `section` and `task` too), under the name of the
    shipped section it came from (it replaces that one) or another."""
    resolved = config.load_config(CONFIGS, "pspnet_1p", ["iterations=123", "data.workers=1", "model.dropout=0.2"],
                                  tasks.builder_defaults)
    dumped = write(tmp_path / "config.toml", f"[{name}]\n" + config.to_toml(resolved, prefix=f"{name}."))
    loaded = config.load_config([CONFIGS, dumped], name, [], tasks.builder_defaults)
    assert loaded == {**resolved, "section": name}
    assert config.load_config([CONFIGS, dumped], "pspnet_8p", [], tasks.builder_defaults)["sync_bn"] is True


def test_list_shows_each_sections_file_and_the_command_line_takes_config(tmp_path, capsys, monkeypatch):
    mine = write(tmp_path / "my.toml", '[mine]\ninherit = "demo"\ndescription = "my demo"\niterations = 3\n')
    assert seg.main(["--list", "--config", mine]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"# {CONFIGS}" and lines[-2:] == [f"# {mine}", f"{'mine':<20} my demo"]
    assert "demo" in [line.split()[0] for line in lines[1:-2]]
    seg.main(["mine", f"--config={mine}", "--show"])
    assert "iterations = 3" in capsys.readouterr().out
    with pytest.raises(UserError, match="--config needs a file"):
        seg.main(["mine", "--config"])
    bad = write(tmp_path / "bad.toml", '[mine]\ninherit = "demo"\nitrations = 3\n')
    monkeypatch.setattr(sys, "argv", ["seg", "mine", "--config", bad])
    with pytest.raises(SystemExit) as exited:
        seg.console()
    assert exited.value.code == 2 and capsys.readouterr().err.startswith(
        f"error: {bad} [mine]: unknown key 'itrations'; closest: iterations")
    assert seg.main(["--help"]) == 0 and "seg mine --config my.toml" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ the installed package

def test_installed_package_runs_from_another_folder(voc_root, tmp_path):
    """pip install of a copy of the checkout into a venv that reuses this Python's packages (torch included;
    --no-index: nothing is downloaded); then `seg` from an unrelated folder, with its configs.toml inside the package."""
    source = tmp_path / "source"
    shutil.copytree(os.path.join(ROOT, "seg"), source / "seg", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "configs.toml", "requirements.txt"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              "--quiet", str(source)], capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere.mkdir()
    seg_command = (str(venv / "bin" / "seg"),)
    listed = run_cli("--list", cwd=elsewhere, program=seg_command, env=env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    first = listed.stdout.splitlines()[0]
    assert first.startswith(f"# {venv}") and first.endswith(os.path.join("site-packages", "seg", "configs.toml"))
    assert len(listed.stdout.splitlines()) == len(config.describe_sections(CONFIGS)) + 1 and "pspnet_folder" in listed.stdout
    trained = run_cli("demo", *train_overrides(voc_root, "out", "iterations=2"), cwd=elsewhere, program=seg_command,
                      env=env)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert os.path.isfile(elsewhere / "out" / "iter_0000002.pth")
