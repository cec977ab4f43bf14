"""seg/checkpoint.py: safe reading of every weights format, name conversion, load reports and atomic saves.

Synthetic files carry the published key names and shapes (tests/data/checkpoint_keys) with random values;
they are loaded into the real models (built on the meta device, then zero-filled: no init cost) and compared
tensor by tensor against the names the reference tools use.
"""
import collections
import os
import pickle
import pickletools
import re
import struct
import warnings
from _compat_pickle import REVERSE_IMPORT_MAPPING
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from seg.checkpoint import (convert_c2_names, latest_checkpoint, latest_loadable_checkpoint, load_into,
                            load_model_weights, load_pretrained_backbone, load_training_state, load_weights_file,
                            restricted_unpickle, save_atomic)
from seg.files import UserError

KEYS_DIR = Path(__file__).resolve().parent / "data" / "checkpoint_keys"  # the published files' key lists
MMSEG_KEYS = "mmseg_pspnet_r50_d8.txt"
D2_KEYS = "detectron2_pointrend_r101_fpn.txt"


# ------------------------------------------------------------------------------------------- helpers
def reference_shapes(filename):
    """{key: shape} of a published state_dict, from tests/data/checkpoint_keys."""
    path = KEYS_DIR / filename
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {key: tuple(int(n) for n in re.findall(r"\d+", shape)) for key, shape in rows}


def random_state(shapes, seed):
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randint(0, 10**6, shape, generator=generator) if key.endswith("num_batches_tracked")
            else torch.randn(shape, generator=generator) for key, shape in shapes.items()}


def blank_model(builder, **kwargs):
    """The real model, built without init cost, every tensor zero (file values are random, never all zero)."""
    with torch.device("meta"):
        model = builder(**kwargs)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()
    return model


def assert_landed(model, expected):
    """Every {model key: tensor} in `expected` equals the model's tensor, bit for bit."""
    state = model.state_dict()
    wrong = [key for key, value in expected.items() if not torch.equal(state[key], value.to(state[key].dtype))]
    assert not wrong, f"{len(wrong)} tensors differ, e.g. {wrong[:3]}"


C2_LAYER = {"shortcut": "branch1", "conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c"}
C2_NORM = {"weight": "bn_gamma", "bias": "bn_beta", "running_mean": "bn_running_mean",
           "running_var": "bn_running_var"}


def caffe2_name(key):
    """MSRA blob name of a detectron2 ResNet key (relative to bottom_up), written from the blob naming in
    the spec: conv1_w, res_conv1_bn_*, res{2..5}_{i}_branch{1,2a,2b,2c}_{w,bn_*}."""
    parts = key.split(".")
    if parts[0] == "stem":
        return "conv1_w" if parts[-1] == "weight" and parts[-2] == "conv1" else "res_conv1_" + C2_NORM[parts[-1]]
    stage, block, layer = parts[:3]
    prefix = f"{stage}_{block}_{C2_LAYER[layer]}"
    return prefix + "_w" if parts[3] == "weight" else f"{prefix}_{C2_NORM[parts[4]]}"


def py2_pickle(obj, core="numpy.core"):
    """`obj` (dicts, str, int, numpy arrays) as Python 2 cPickle protocol 2 with numpy 1.x wrote it:
    text as py2 `str` (BINSTRING), arrays rebuilt by `{core}.multiarray._reconstruct` with raw bytes in a str."""
    def text(value):
        data = value.encode("latin1") if isinstance(value, str) else value
        return (b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<I", len(data))) + data

    def integer(value):
        return b"K" + bytes([value]) if 0 <= value < 256 else b"J" + struct.pack("<i", value)

    def dump(value):
        if isinstance(value, dict):
            return b"}(" + b"".join(dump(k) + dump(v) for k, v in value.items()) + b"u"
        if isinstance(value, tuple):
            return b"(" + b"".join(dump(item) for item in value) + b"t"
        if isinstance(value, (str, bytes)):
            return text(value)
        if value is None:
            return b"N"
        if isinstance(value, int):
            return integer(value)
        order = "<" if value.dtype.itemsize > 1 else "|"
        dtype = (b"cnumpy\ndtype\n" + dump((value.dtype.str[1:], 0, 1)) + b"R"
                 + dump((3, order, None, None, None, -1, -1, 0)) + b"b")
        array = (f"c{core}.multiarray\n_reconstruct\n".encode() + b"cnumpy\nndarray\n" + dump((0,)) + text("b")
                 + b"\x87R")
        return array + b"(" + integer(1) + dump(value.shape) + dtype + b"\x89" + text(value.tobytes()) + b"tb"

    return b"\x80\x02" + dump(obj) + b"."


def numpy_core_pickle(obj, protocol):
    """pickle.dumps(obj) with numpy 2's `numpy._core` globals renamed to numpy 1.x's `numpy.core`."""
    data = pickle.dumps(obj, protocol=protocol)
    ops = [(op.name, position) for op, _, position in pickletools.genops(data)]
    ends = [position for _, position in ops[1:]] + [len(data)]
    # FRAME opcodes (protocol 4+) give byte counts that renaming would break; frames are optional
    data = b"".join(data[start:end] for (name, start), end in zip(ops, ends) if name != "FRAME")
    if protocol < 4:  # GLOBAL opcode: "module\nname\n"
        renamed = data.replace(b"cnumpy._core.", b"cnumpy.core.")
    else:  # STACK_GLOBAL after SHORT_BINUNICODE: the one-byte length shrinks with the name
        renamed = re.sub(rb"\x8c(.)numpy\._core\.", lambda m: b"\x8c" + bytes([m.group(1)[0] - 1]) + b"numpy.core.",
                         data, flags=re.DOTALL)
    assert renamed != data and b"numpy._core" not in renamed
    return renamed


class RunsCode:
    """Unpickling this calls `function(*args)`: the classic malicious pickle."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


# -------------------------------------------------------------------------------------- caffe2 names
def test_convert_c2_names_spec_examples():
    names = ["res4_22_branch2b_bn_running_var", "res_conv1_bn_gamma", "conv1_w", "conv1_b", "fc1000_w",
             "res2_0_branch1_w", "res3_1_branch2c_bn_beta", "res5_2_branch2a_bn_s", "res5_2_branch2b_bn_b",
             "res2_1_branch2a_bn_rm", "res2_1_branch2b_bn_riv", "pred_w"]
    assert convert_c2_names(names) == {
        "res4_22_branch2b_bn_running_var": "res4.22.conv2.norm.running_var",
        "res_conv1_bn_gamma": "stem.conv1.norm.weight", "conv1_w": "stem.conv1.weight",
        "conv1_b": "stem.conv1.bias", "fc1000_w": "fc1000.weight", "res2_0_branch1_w": "res2.0.shortcut.weight",
        "res3_1_branch2c_bn_beta": "res3.1.conv3.norm.bias", "res5_2_branch2a_bn_s": "res5.2.conv1.norm.weight",
        "res5_2_branch2b_bn_b": "res5.2.conv2.norm.bias", "res2_1_branch2a_bn_rm": "res2.1.conv1.norm.running_mean",
        "res2_1_branch2b_bn_riv": "res2.1.conv2.norm.running_var", "pred_w": "linear.weight"}


def test_convert_c2_names_reach_every_detectron2_backbone_key():
    prefix = "backbone.bottom_up."
    keys = [key[len(prefix):] for key in reference_shapes(D2_KEYS) if key.startswith(prefix)]
    renamed = convert_c2_names([caffe2_name(key) for key in keys])
    assert list(renamed.values()) == keys


def test_convert_c2_names_refuses_two_blobs_for_one_tensor():
    with pytest.raises(UserError, match="res2.0.conv1.norm.weight"):
        convert_c2_names(["res2_0_branch2a_bn_s", "res2_0_branch2a_bn_gamma"])


# -------------------------------------------------------------------------------- saving and resuming
def test_save_atomic_round_trip_and_no_leftovers(tmp_path):
    state = {"model": collections.OrderedDict(w=torch.arange(6.0).view(2, 3)), "iteration": 7,
             "config": {"lr": 0.01}, "rng": [torch.ByteTensor([1, 2])], "pair": (torch.ones(1), 3)}
    path = tmp_path / "out" / "iter_0000007.pth"
    save_atomic(state, path)
    loaded = torch.load(path, weights_only=True)
    assert isinstance(loaded["model"], collections.OrderedDict) and torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["iteration"] == 7 and loaded["config"] == {"lr": 0.01} and isinstance(loaded["pair"], tuple)
    assert sorted(p.name for p in path.parent.iterdir()) == ["iter_0000007.pth"]


def test_save_atomic_interrupted_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "iter_0000001.pth"
    save_atomic({"model": {"w": torch.ones(3)}, "iteration": 1}, path)
    old_bytes = path.read_bytes()

    def torn_save(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"model": {"w": torch.zeros(3)}, "iteration": 2}, path)
    assert path.read_bytes() == old_bytes
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to hold non-CPU tensors")
def test_save_atomic_stores_cpu_tensors(tmp_path):
    path = tmp_path / "gpu.pth"
    save_atomic({"model": {"w": torch.ones(2, device="cuda")}, "list": [torch.zeros(1, device="cuda")]}, path)
    loaded = torch.load(path, weights_only=True)  # no map_location: devices as stored
    assert loaded["model"]["w"].device.type == "cpu" and loaded["list"][0].device.type == "cpu"


def test_latest_checkpoint_picks_highest_iteration(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None
    for name in ["iter_0000010.pth", "iter_0000200.pth", "iter_0000030.pth", "latest.pth", "iter_x.pth",
                 ".iter_0000300.pth.abc.tmp", "iter_0000400.pth.json"]:
        (tmp_path / name).write_bytes(b"")
    assert latest_checkpoint(tmp_path) == tmp_path / "iter_0000200.pth"


def test_load_training_state(tmp_path):
    path = tmp_path / "iter_0000005.pth"
    save_atomic({"model": {"w": torch.ones(2)}, "iteration": 5, "config": {}}, path)
    assert load_training_state(path)["iteration"] == 5
    save_atomic({"w": torch.ones(2)}, tmp_path / "bare.pth")
    with pytest.raises(UserError, match="bare.pth.*not a seg training checkpoint"):
        load_training_state(tmp_path / "bare.pth")
    (tmp_path / "torn.pth").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(UserError, match="torn.pth"):
        load_training_state(tmp_path / "torn.pth")


def three_checkpoints(folder):
    """iter_0000010/20/30.pth, each holding its iteration and a weight equal to it."""
    paths = [folder / f"iter_{i:07d}.pth" for i in (10, 20, 30)]
    for i, path in zip((10, 20, 30), paths):
        save_atomic({"model": {"w": torch.full((64,), float(i))}, "iteration": i, "config": {}}, path)
    return paths


def tear(path):
    """Cut a file to half its length, as a copy or a crash outside save_atomic would leave it."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_latest_loadable_checkpoint_skips_a_torn_newest(tmp_path):
    paths = three_checkpoints(tmp_path)
    tear(paths[2])
    lines = []
    path, state = latest_loadable_checkpoint(tmp_path, log=lines.append)
    assert path == paths[1] and state["iteration"] == 20 and torch.equal(state["model"]["w"], torch.full((64,), 20.0))
    assert len(lines) == 1 and "iter_0000030.pth" in lines[0] and "not a readable torch file" in lines[0]
    assert "warning" in lines[0].lower()


def test_latest_loadable_checkpoint_all_torn_or_none(tmp_path):
    assert latest_loadable_checkpoint(tmp_path / "absent", log=pytest.fail) == (None, None)
    paths = three_checkpoints(tmp_path)
    for path in paths:
        tear(path)
    lines = []
    assert latest_loadable_checkpoint(tmp_path, log=lines.append) == (None, None)
    assert len(lines) == 3 and all(path.name in line for path, line in zip(reversed(paths), lines))


def test_latest_loadable_checkpoint_good_newest_without_warnings(tmp_path):
    paths = three_checkpoints(tmp_path)
    tear(paths[0])  # an older torn file is never opened
    path, state = latest_loadable_checkpoint(tmp_path, log=pytest.fail)
    assert path == paths[2] and state["iteration"] == 30


# ---------------------------------------------------------------------------------- safe unpickling
ARRAYS = {"f32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7, "i64": np.array([-(2**40), 5]),
          "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)), "mask": np.array([True, False]),
          "empty": np.zeros((0, 3), np.float32)}


def assert_same_arrays(loaded, expected):
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and np.array_equal(loaded[key], value), key


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("numpy_1x_names", [False, True])
def test_restricted_unpickle_reads_numpy_pickles(tmp_path, protocol, numpy_1x_names):
    obj = {"arrays": ARRAYS, "scalar": np.float32(2.5), "nested": [1, 2.0, None, "x", b"y", (True,)]}
    data = numpy_core_pickle(obj, protocol) if numpy_1x_names else pickle.dumps(obj, protocol=protocol)
    (tmp_path / "w.pkl").write_bytes(data)
    loaded = restricted_unpickle(tmp_path / "w.pkl")
    assert_same_arrays(loaded["arrays"], ARRAYS)
    assert loaded["scalar"] == np.float32(2.5) and loaded["scalar"].dtype == np.float32
    assert loaded["nested"] == obj["nested"]


@pytest.mark.parametrize("core", ["numpy.core", "numpy._core"])
def test_restricted_unpickle_reads_python2_pickles(tmp_path, core):
    data = py2_pickle({"blobs": ARRAYS, "__author__": "MSRA"}, core)
    (tmp_path / "py2.pkl").write_bytes(data)
    loaded = restricted_unpickle(tmp_path / "py2.pkl")
    assert_same_arrays(loaded["blobs"], ARRAYS)
    assert loaded["__author__"] == "MSRA"
    with warnings.catch_warnings():  # numpy 2 warns about the numpy.core alias; the bytes are what matter here
        warnings.simplefilter("ignore")
        reference = pickle.loads(data, encoding="latin1")  # the hand-written bytes mean what pickle says they mean
    assert_same_arrays(reference["blobs"], ARRAYS)


def test_restricted_unpickle_reads_ordered_dict(tmp_path):
    (tmp_path / "od.pkl").write_bytes(pickle.dumps(collections.OrderedDict(a=np.ones(2)), protocol=2))
    loaded = restricted_unpickle(tmp_path / "od.pkl")
    assert list(loaded) == ["a"] and np.array_equal(loaded["a"], np.ones(2))


@pytest.mark.parametrize("function", [os.system, eval, open])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, function):
    marker = tmp_path / "marker"
    args = {os.system: (f"touch {marker}",), eval: (f"open({str(marker)!r}, 'w')",), open: (str(marker), "w")}
    # the global as pickle writes it: protocol 2 names Python 3's builtins module __builtin__
    module = function.__module__
    refused = {f"{name}.{function.__name__}" for name in (module, REVERSE_IMPORT_MAPPING.get(module, module))}
    for path in (tmp_path / "evil.pkl", tmp_path / "evil.pth"):
        if path.suffix == ".pkl":
            path.write_bytes(pickle.dumps({"model": {"a": np.ones(2)}, "x": RunsCode(function, *args[function])}, 2))
        else:
            torch.save({"model": {"a": torch.ones(2)}, "x": RunsCode(function, *args[function])}, path)
        with pytest.raises(UserError) as error:
            load_weights_file(path)
        assert any(name in str(error.value) for name in refused) and path.name in str(error.value)
        assert not marker.exists()
    with pytest.raises(UserError, match="not a plain weights file"):
        restricted_unpickle(tmp_path / "evil.pkl")


def test_pickles_that_build_non_weights_are_refused(tmp_path):
    cases = {"set.pkl": pickle.dumps({"a": {1, 2}}, protocol=4),  # EMPTY_SET needs no global
             "objects.pkl": pickle.dumps({"a": np.array([1, "x"], dtype=object)}, protocol=2),
             "rot13.pkl": b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.",
             "truncated.pkl": pickle.dumps({"a": np.ones(3)}, protocol=2)[:-20]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=re.escape(name)):
            restricted_unpickle(tmp_path / name)


# ----------------------------------------------------------------------------------- format detection
def small_torch_files(tmp_path):
    """{file name: (object to torch.save, expected format, expected names)}"""
    w = torch.ones(2)
    mmseg = {"backbone.stem.0.weight": w, "decode_head.conv_seg.weight": w}
    backbone = {"stem.0.weight": w, "layer1.0.conv1.weight": w}
    d2 = {"backbone.bottom_up.stem.conv1.weight": w, "sem_seg_head.point_head.fc1.bias": w}
    return {"mmseg.pth": ({"meta": {"epoch": 3}, "state_dict": mmseg}, "mmseg", set(mmseg)),
            "ddp.pth": ({"meta": {}, "state_dict": {"module." + k: v for k, v in mmseg.items()}}, "mmseg", set(mmseg)),
            "mmcv.pth": ({"state_dict": backbone}, "mmcv_backbone", set(backbone)),
            "mmcv_bare.pth": (backbone, "mmcv_backbone", set(backbone)),
            "d2.pth": ({"model": d2, "iteration": 90000, "optimizer": {}}, "detectron2", set(d2)),
            "seg.pth": ({"model": d2, "iteration": 10, "config": {"lr": 1.0}}, "seg", set(d2)),
            "d2_bare.pth": (d2, "detectron2", set(d2)),
            "bare.pth": ({"fc.weight": w, "note": "text"}, "state_dict", {"fc.weight"})}


def test_load_weights_file_detects_torch_formats(tmp_path):
    for name, (obj, expected_format, names) in small_torch_files(tmp_path).items():
        torch.save(obj, tmp_path / name)
        state, file_format = load_weights_file(tmp_path / name)
        assert (file_format, set(state)) == (expected_format, names), name
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert load_weights_file(tmp_path / "legacy.pth")[1] == "state_dict"


def test_load_weights_file_detects_pickle_formats(tmp_path):
    arrays = {"res2_0_branch2a_w": np.ones((4, 2, 1, 1), np.float32), "res_conv1_bn_gamma": np.arange(3.0),
              "res2_0_branch2a_w_momentum": np.ones((4, 2, 1, 1), np.float32)}
    d2 = {"model": {"stem.conv1.weight": np.ones(2, np.float32), "stem.conv1.norm.weight_momentum": np.ones(2)},
          "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}
    for name, obj in {"c2.pkl": arrays, "c2_blobs.pkl": {"blobs": arrays}, "d2.pkl": d2}.items():
        (tmp_path / name).write_bytes(py2_pickle(obj))
    state, file_format = load_weights_file(tmp_path / "c2.pkl")
    assert file_format == "caffe2" and set(state) == {"res2.0.conv1.weight", "stem.conv1.norm.weight"}
    assert torch.equal(state["stem.conv1.norm.weight"], torch.arange(3.0, dtype=torch.float64))
    assert load_weights_file(tmp_path / "c2_blobs.pkl")[0].keys() == state.keys()
    state, file_format = load_weights_file(tmp_path / "d2.pkl")
    assert file_format == "detectron2" and set(state) == {"stem.conv1.weight"}


def test_load_weights_file_reports_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_weights_file(tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00 not a pickle")
    with pytest.raises(UserError, match="junk.pth"):
        load_weights_file(tmp_path / "junk.pth")
    torch.save({"meta": {}}, tmp_path / "empty.pth")
    with pytest.raises(UserError, match="empty.pth holds no tensors"):
        load_weights_file(tmp_path / "empty.pth")


# -------------------------------------------------------------------------------------- load_into
def small_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 5))


@settings(max_examples=30, deadline=None)
@given(choices=st.lists(st.sampled_from(["same", "missing", "reshaped"]), min_size=9, max_size=9),
       extra=st.integers(0, 3), seed=st.integers(0, 2**31))
def test_load_into_report_partitions_the_names(choices, extra, seed):
    model = small_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state, expected = {}, {"loaded": [], "shape_mismatch": [], "missing": []}
    for (key, value), choice in zip(before.items(), choices):
        # reshaped: first dimension 1, a shape that copy_ would happily broadcast
        shape = value.shape if choice != "reshaped" else (1,) if value.dim() == 0 else (1, *value.shape[1:])
        if choice != "missing":
            state[key] = torch.randn(shape, generator=generator).to(value.dtype)
        expected["loaded" if choice == "same" else "missing" if choice == "missing" else "shape_mismatch"].append(
            key if choice != "reshaped" else (key, tuple(shape), tuple(value.shape)))
    state.update({f"extra.{i}": torch.ones(1) for i in range(extra)})
    lines = []
    report = load_into(model, state, log=lines.append)
    assert report == {**expected, "unused": [f"extra.{i}" for i in range(extra)]}
    after = model.state_dict()
    for key in before:
        assert torch.equal(after[key], state[key] if key in report["loaded"] else before[key]), key
    assert len(lines) == 1 and f"loaded {len(expected['loaded'])}/9" in lines[0]


def test_load_into_strict_missing_refuses_before_copying():
    model = small_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    state = {key: torch.full_like(value, 3) for key, value in before.items() if key != "2.bias"}
    state.pop("1.num_batches_tracked")  # optional: counts as missing but is not fatal
    with pytest.raises(UserError, match=r"1 model tensors.*2\.bias.*fine-tune"):
        load_into(model, state, strict_missing=True, log=lambda line: None)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())
    state["2.bias"] = torch.ones(5)
    report = load_into(model, state, strict_missing=True, verbose=True, log=lambda line: None)
    assert report["missing"] == ["1.num_batches_tracked"] and len(report["loaded"]) == 8


def test_load_into_suffix_rule_takes_longest_and_refuses_ambiguity():
    model = nn.Module()
    model.a = nn.Module()
    model.a.b = nn.Linear(2, 2, bias=False)
    model.c = nn.Linear(2, 2, bias=False)
    state = {"b.weight": torch.full((2, 2), 1.0), "weight": torch.full((2, 2), 2.0), "x.b.weight": torch.ones(2, 2)}
    lines = []
    report = load_into(model, state, suffix_match=True, verbose=True, log=lines.append)
    assert torch.equal(model.a.b.weight, state["b.weight"]) and torch.equal(model.c.weight, state["weight"])
    assert report["unused"] == ["x.b.weight"] and "  unused: x.b.weight" in lines
    with pytest.raises(UserError, match="weight fits several model tensors"):
        load_into(model, {"weight": torch.ones(2, 2)}, suffix_match=True)
    report = load_into(model, {"net.a.b.weight": torch.ones(2, 2)}, prefix_map={"net.": ""}, log=len)
    assert report["loaded"] == ["a.b.weight"]


# ------------------------------------------------------------------------- real models: PSPNet (mmseg)
@pytest.fixture(scope="module")
def mmseg_file(tmp_path_factory):
    """An mmseg PSPNet R50-D8 VOC checkpoint: published names and shapes, random values."""
    state = random_state(reference_shapes(MMSEG_KEYS), seed=1)
    path = tmp_path_factory.mktemp("mmseg") / "pspnet_r50-d8_512x512_20k_voc12aug.pth"
    torch.save({"meta": {"mmseg_version": "0.10.0", "CLASSES": list(range(21))}, "state_dict": state}, path)
    return path, state


@pytest.fixture(scope="module")
def pspnet():
    from seg.pspnet import build_pspnet
    return blank_model(build_pspnet, num_classes=21, depth=50)


def test_mmseg_checkpoint_loads_into_pspnet(mmseg_file, pspnet):
    path, state = mmseg_file
    report = load_model_weights(pspnet, path, log=lambda line: None)
    assert (len(report["loaded"]), report["missing"], report["unused"], report["shape_mismatch"]) == (370, [], [], [])
    assert_landed(pspnet, state)


def test_mmcv_backbone_and_mmseg_backbone_part_load_into_pspnet_backbone(mmseg_file, pspnet, tmp_path):
    path, state = mmseg_file
    backbone_state = {key[len("backbone."):]: value + 1 for key, value in state.items() if key.startswith("backbone.")}
    torch.save(backbone_state, tmp_path / "resnet50_v1c-2cccc1ad.pth")
    report = load_pretrained_backbone(pspnet.backbone, tmp_path / "resnet50_v1c-2cccc1ad.pth", log=lambda l: None)
    assert len(report["loaded"]) == len(backbone_state) and not report["missing"] and not report["unused"]
    assert_landed(pspnet.backbone, backbone_state)
    report = load_pretrained_backbone(pspnet.backbone, path, log=lambda line: None)  # the whole mmseg file
    assert len(report["loaded"]) == len(backbone_state) and len(report["unused"]) == 370 - len(backbone_state)
    assert_landed(pspnet, {key: value for key, value in state.items() if key.startswith("backbone.")})


def test_mmseg_21_class_checkpoint_into_19_class_pspnet(mmseg_file):
    from seg.pspnet import build_pspnet
    path, state = mmseg_file
    model = blank_model(build_pspnet, num_classes=19, depth=50)
    with pytest.raises(UserError, match=r"4 model tensors.*decode_head\.conv_seg\.weight"):
        load_model_weights(model, path, log=lambda line: None)
    assert all(not value.any() for value in model.state_dict().values())  # nothing copied
    lines = []
    report = load_model_weights(model, path, allow_missing=True, log=lines.append)
    heads = ("decode_head.conv_seg.", "auxiliary_head.conv_seg.")
    assert [name for name, _, _ in report["shape_mismatch"]] == [k for k in state if k.startswith(heads)]
    assert ("decode_head.conv_seg.weight", (21, 512, 1, 1), (19, 512, 1, 1)) in report["shape_mismatch"]
    assert (len(report["loaded"]), report["missing"], report["unused"]) == (366, [], [])
    assert "366/370" in lines[0] and "4 skipped for shape mismatch" in lines[0]
    assert_landed(model, {key: value for key, value in state.items() if not key.startswith(heads)})
    assert not model.decode_head.conv_seg.weight.any() and not model.auxiliary_head.conv_seg.bias.any()


# ------------------------------------------------------------------- real models: PointRend (detectron2)
@pytest.fixture(scope="module")
def d2_state():
    return random_state(reference_shapes(D2_KEYS), seed=2)


@pytest.fixture(scope="module")
def pointrend():
    from seg.pointrend import build_pointrend
    return blank_model(build_pointrend, num_classes=19, depth=101)


def test_detectron2_pkl_from_numpy_1x_loads_into_pointrend(d2_state, pointrend, tmp_path):
    arrays = {key: value.numpy() for key, value in d2_state.items()}
    arrays["pixel_mean"] = np.array([[[103.53]], [[116.28]], [[123.675]]], np.float32)
    (tmp_path / "model_final_cf6ac1.pkl").write_bytes(
        py2_pickle({"model": arrays, "__author__": "Detectron2 Model Zoo"}))
    report = load_model_weights(pointrend, tmp_path / "model_final_cf6ac1.pkl", log=lambda line: None)
    assert (len(report["loaded"]), report["missing"], report["unused"], report["shape_mismatch"]) == (567, [], [], [])
    assert_landed(pointrend, d2_state)


def test_detectron2_pth_into_8_class_pointrend(d2_state, tmp_path):
    from seg.pointrend import build_pointrend
    torch.save({"model": d2_state, "iteration": 65000, "optimizer": {}}, tmp_path / "model_final.pth")
    model = blank_model(build_pointrend, num_classes=8, depth=101)
    report = load_model_weights(model, tmp_path / "model_final.pth", allow_missing=True, log=lambda line: None)
    skipped = {"sem_seg_head.coarse_sem_seg_head.predictor.weight", "sem_seg_head.coarse_sem_seg_head.predictor.bias",
               "sem_seg_head.point_head.fc1.weight",  # 256 fine + 19 coarse input channels
               "sem_seg_head.point_head.predictor.weight", "sem_seg_head.point_head.predictor.bias"}
    assert {name for name, _, _ in report["shape_mismatch"]} == skipped
    assert ("sem_seg_head.point_head.fc1.weight", (256, 275, 1), (256, 264, 1)) in report["shape_mismatch"]
    assert (len(report["loaded"]), report["missing"], report["unused"]) == (562, [], [])
    assert_landed(model, {key: value for key, value in d2_state.items() if key not in skipped})
    assert not model.sem_seg_head.point_head.fc1.weight.any()
    # a detectron2 model as pretrained backbone, into the ResNet alone or into ResNet + FPN
    with torch.no_grad():
        for tensor in model.backbone.state_dict().values():
            tensor.zero_()
    report = load_pretrained_backbone(model.backbone.bottom_up, tmp_path / "model_final.pth", log=lambda line: None)
    bottom_up = {key: value for key, value in d2_state.items() if key.startswith("backbone.bottom_up.")}
    assert len(report["loaded"]) == len(bottom_up) and len(report["unused"]) == 567 - len(bottom_up)
    assert_landed(model, bottom_up)
    assert not model.backbone.fpn_output2.weight.any()
    report = load_pretrained_backbone(model.backbone, tmp_path / "model_final.pth", log=lambda line: None)
    assert len(report["loaded"]) == len(bottom_up) + 16 and not report["missing"]
    assert_landed(model, {key: value for key, value in d2_state.items() if key.startswith("backbone.")})


def test_msra_r101_pkl_loads_into_pointrend_backbone(d2_state, pointrend, tmp_path):
    prefix = "backbone.bottom_up."
    blobs = {caffe2_name(key[len(prefix):]): (value + 1).numpy() for key, value in d2_state.items()
             if key.startswith(prefix)}
    extras = {"fc1000_w": np.ones((1000, 2048), np.float32), "fc1000_b": np.ones(1000, np.float32),
              "conv1_b": np.ones(64, np.float32), "res2_0_branch2a_w_momentum": np.ones((64, 64, 1, 1), np.float32),
              "res_conv1_bn_gamma_momentum": np.ones(64, np.float32)}
    (tmp_path / "R-101.pkl").write_bytes(py2_pickle({**blobs, **extras}))
    before = {key: value.clone() for key, value in pointrend.state_dict().items() if not key.startswith(prefix)}
    report = load_pretrained_backbone(pointrend.backbone, tmp_path / "R-101.pkl", log=lambda line: None)
    fpn = [key[len("backbone."):] for key in d2_state if key.startswith("backbone.fpn_")]
    assert len(report["loaded"]) == len(blobs) == 567 - 16 - 31 and not report["shape_mismatch"]
    assert report["missing"] == fpn and sorted(report["unused"]) == ["fc1000.bias", "fc1000.weight", "stem.conv1.bias"]
    assert_landed(pointrend, {key: value + 1 for key, value in d2_state.items() if key.startswith(prefix)})
    assert_landed(pointrend, before)  # FPN and heads untouched
    with pytest.raises(UserError, match="backbone weights"):
        load_model_weights(pointrend, tmp_path / "R-101.pkl")


def test_wrong_backbone_file_is_refused(mmseg_file, pointrend):
    with pytest.raises(UserError, match="no tensor whose name and shape fit this backbone"):
        load_pretrained_backbone(pointrend.backbone.bottom_up, mmseg_file[0], log=lambda line: None)


def test_seg_checkpoint_round_trip(pointrend, tmp_path):
    save_atomic({"model": pointrend.state_dict(), "iteration": 3, "config": {"model": {"name": "pointrend"}}},
                tmp_path / "iter_0000003.pth")
    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.fpn_lateral2 = nn.Conv2d(256, 256, 1)
    lines = []
    report = load_model_weights(model, tmp_path / "iter_0000003.pth", log=lines.append)
    assert report["loaded"] == ["backbone.fpn_lateral2.weight", "backbone.fpn_lateral2.bias"]
    assert len(report["unused"]) == 565 and "(seg)" in lines[0]
    assert_landed(model, {key: pointrend.state_dict()[key] for key in model.state_dict()})
