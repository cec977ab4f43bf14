"""Config resolution and checking, the loss scaler, learning-rate schedules and optimizer groups."""
import math
import os
import textwrap

import pytest
import torch

from seg import amp, config, tasks, train
from seg.files import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs.toml")


def load(section, *overrides):
    return config.load_config(CONFIGS, section, overrides, tasks.builder_defaults)


def test_pspnet_sections_match_the_spec():
    one, eight = load("pspnet_1p"), load("pspnet_8p")
    assert (one["data"]["batch_size"], eight["data"]["batch_size"]) == (16, 32)
    assert one["iterations"] == eight["iterations"] == 20000
    assert one["optimizer"] == {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005, "weight_decay_norm": 0.0005}
    assert one["schedule"]["policy"] == "poly" and one["schedule"]["power"] == 0.9
    assert one["schedule"]["min_lr"] == 1e-4 and one["loss"] == {"average": "all", "aux_weight": 0.4, "class_weight": [],
                                                                 "class_weight_rule": "", "ohem": False,
                                                                 "ohem_thresh": 0.7, "ohem_min_kept": 100000}
    assert one["data"]["crop_hw"] == [512, 512] and one["data"]["ratio_range"] == [0.5, 2.0]
    assert eight["sync_bn"] and eight["eval_interval"] == 2000 and eight["checkpoint_interval"] == 2000


def test_pointrend_sections_match_the_spec():
    one, eight = load("pointrend_1p"), load("pointrend_8p")
    assert (one["data"]["batch_size"], one["optimizer"]["lr"]) == (16, 0.005)
    assert (eight["data"]["batch_size"], eight["optimizer"]["lr"]) == (32, 0.01)
    assert eight["iterations"] == 65000 and eight["schedule"]["steps"] == [40000, 55000]
    assert eight["schedule"]["warmup_iters"] == 1000 and eight["schedule"]["warmup_factor"] == 0.001
    assert eight["optimizer"]["weight_decay"] == 1e-4 and eight["optimizer"]["weight_decay_norm"] == 0.0
    assert eight["data"]["crop_hw"] == [512, 1024] and eight["data"]["short_edges"][0] == 512


def test_overrides_are_typed_and_checked():
    cfg = load("pspnet_1p", "model.num_classes=5", "optimizer.lr=1", "amp=fp16", "loss_scale=512",
               "weights=some/path.pth")
    assert cfg["model"]["num_classes"] == 5 and cfg["optimizer"]["lr"] == 1.0 and isinstance(cfg["optimizer"]["lr"], float)
    assert cfg["amp"] == "fp16" and cfg["loss_scale"] == 512 and cfg["weights"] == "some/path.pth"
    with pytest.raises(UserError, match="num_classes"):
        load("pspnet_1p", "model.num_clases=5")
    with pytest.raises(UserError, match="expected a int"):
        load("pspnet_1p", "data.batch_size=abc")
    with pytest.raises(UserError, match="pspnet_1p"):
        load("pspnet_1x")


def test_unknown_key_in_file_names_section(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(textwrap.dedent("""
        [base]
        task = ""
        iterations = 1
        [a]
        task = "train"
        iteration = 5
    """))
    with pytest.raises(UserError, match=r"\[a\].*iteration.*closest: iterations"):
        config.load_config(str(path), "a")


def test_inheritance_merges_nested_tables(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(textwrap.dedent("""
        [base]
        task = ""
        data = { a = 1, b = 2 }
        [parent]
        data = { a = 10 }
        [child]
        inherit = "parent"
        data = { b = 20 }
    """))
    assert config.load_config(str(path), "child")["data"] == {"a": 10, "b": 20}


def test_poly_schedule_hand_values():
    schedule = {"policy": "poly", "power": 0.9, "min_lr": 1e-4}
    assert train.lr_at(0, 0.01, schedule, 20000) == pytest.approx(0.01)
    assert train.lr_at(10000, 0.01, schedule, 20000) == pytest.approx((0.01 - 1e-4) * 0.5**0.9 + 1e-4)
    assert train.lr_at(19999, 0.01, schedule, 20000) > 1e-4


def test_warmup_multistep_hand_values():
    schedule = {"policy": "multistep", "steps": [40000, 55000], "gamma": 0.1, "warmup_iters": 1000,
                "warmup_factor": 0.001}
    assert train.lr_at(0, 0.01, schedule, 65000) == pytest.approx(0.01 * 0.001)
    assert train.lr_at(500, 0.01, schedule, 65000) == pytest.approx(0.01 * (0.001 + 0.999 * 0.5))
    assert train.lr_at(1000, 0.01, schedule, 65000) == pytest.approx(0.01)
    assert train.lr_at(39999, 0.01, schedule, 65000) == pytest.approx(0.01)
    assert train.lr_at(40000, 0.01, schedule, 65000) == pytest.approx(0.001)
    assert train.lr_at(55000, 0.01, schedule, 65000) == pytest.approx(0.0001)


def test_param_groups_put_norm_parameters_apart():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.GroupNorm(8, 32), torch.nn.BatchNorm2d(32))
    groups = train.param_groups(model, 1e-4, 0.0)
    assert [len(g["params"]) for g in groups] == [2, 4]
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]


class Linear(torch.nn.Module):
    """The smallest model train_one_step can drive: loss = sum(weights * factors)."""

    def __init__(self, size):
        super().__init__()
        self.parameter = torch.nn.Parameter(torch.ones(size))

    def forward(self, image, hw):
        return {"seg": self.parameter * image}


def step(scaler, factors, lr=1.0):
    model = Linear(len(factors))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = lambda outputs, label: {"loss": outputs["seg"].sum()}  # noqa: E731
    batch = {"image": torch.tensor(factors), "hw": None, "label": None}
    _, applied = train.train_one_step(model, batch, loss_fn, optimizer, scaler, lambda: amp.autocast_context("cpu", "off"))
    return model.parameter.detach(), applied


@pytest.mark.parametrize("loss_scale", ["dynamic", 128])
def test_scaler_skips_step_with_inf_gradients(loss_scale):
    scaler = amp.make_scaler("cpu", "fp16", loss_scale)
    before = scaler.get_scale()
    parameter, applied = step(scaler, [1.0, float("inf"), 1.0])
    assert not applied
    assert torch.equal(parameter, torch.ones(3))  # never applied
    assert scaler.get_scale() == (before / 2 if loss_scale == "dynamic" else 128.0)


@pytest.mark.parametrize("loss_scale", ["dynamic", 512])
def test_scaler_applies_unscaled_gradients(loss_scale):
    scaler = amp.make_scaler("cpu", "fp16", loss_scale)
    parameter, applied = step(scaler, [1.0, 3.0], lr=0.5)
    assert applied and torch.equal(parameter, torch.tensor([1 - 0.5, 1 - 1.5]))
    assert scaler.get_scale() == (2.0**16 if loss_scale == "dynamic" else 512.0)


def test_scaler_state_round_trips_and_grows_after_2000_clean_steps():
    scaler = amp.make_scaler("cpu", "fp16", "dynamic")
    amp.load_scaler_state(scaler, {"scale": 1024.0, "dynamic": True, "clean_steps": 1999})
    assert amp.scaler_state(scaler) == {"scale": 1024.0, "dynamic": True, "clean_steps": 1999}
    _, applied = step(scaler, [1.0, 2.0])
    assert applied and amp.scaler_state(scaler) == {"scale": 2048.0, "dynamic": True, "clean_steps": 0}
    static = amp.make_scaler("cpu", "fp16", 128)
    assert amp.scaler_state(static)["dynamic"] is False
    assert amp.scaler_state(amp.make_scaler("cpu", "bf16", "dynamic")) is None


def test_bf16_training_step_on_cpu():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    before = [p.detach().clone() for p in model.parameters()]
    with amp.autocast_context("cpu", "bf16"):
        out = model(x)
    assert out.dtype == torch.bfloat16
    loss = torch.nn.functional.cross_entropy(out.float(), y)
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item())
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert not amp.make_scaler("cpu", "bf16", "dynamic").is_enabled()
