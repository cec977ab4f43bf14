"""configs.toml sections: inheritance, `key=value` overrides, and key/type checking.

Every key a section may set is declared, with its default, in the `[base]` section, so defaults live in one visible
place. Keys under `model` are the keyword arguments of the model's builder function (seg/pspnet.py `build_pspnet`,
seg/pointrend.py `build_pointrend`) plus `name`."""
import copy
import difflib
import os
import sys
import tempfile

from seg.files import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python < 3.11 only
    import tomli as tomllib

BASE = "base"
CARRIED_DATA = ("dataset", "root", "val_splits", "classes", "palette", "label_suffix", "reduce_zero_label",
                "test_scale")
CHOICES = {"device": ("auto", "cpu", "cuda", "npu"), "amp": ("off", "fp16", "bf16", "auto"),
           "data.dataset": ("voc", "cityscapes", "folder"), "data.jitter_on": ("auto", "loader", "device"),
           "test.mode": ("whole", "slide"), "schedule.policy": ("poly", "multistep"), "loss.average": ("all", "valid"),
           "loss.class_weight_rule": ("", "enet"), "checkpoint.best": ("", "mIoU", "aAcc", "mAcc"),
           "label_ids": ("", "cityscapes")}
AT_LEAST = {"model.num_classes": 1, "iterations": 1, "log_interval": 1, "eval_interval": 0, "checkpoint_interval": 0,
            "save_predictions": 0, "data.batch_size": 1, "data.workers": 0, "data.max_size": 1, "test.max_size": 1,
            "bench.warmup": 0, "bench.steps": 1, "bench.batch_size": 1, "bench.images": 1, "accumulate": 1,
            "checkpoint.keep_last": 0, "checkpoint.early_stop_patience": 0, "loss.ohem_min_kept": 2, "report.worst": 0}
SIZES = ("data.crop_hw", "data.scale", "data.test_scale", "test.crop_hw", "test.stride_hw", "bench.crop_hw",
         "bench.eval_hw", "export.hw")
POSITIVE_LISTS = ("data.ratio_range", "data.short_edges", "test.scales")
CHECKPOINT = "a seg, mmsegmentation or detectron2 checkpoint"
REQUIRED = {"evaluate": {"weights": CHECKPOINT}, "predict": {"weights": CHECKPOINT, "input": "an image, a folder or "
            "a glob", "output": "the folder for label maps and overlays"}, "export": {"weights": CHECKPOINT,
            "output": "the .onnx file to write"}, "report": {"run": "a training or evaluation output_dir"}}
WRITES_OUTPUT_DIR = ("train", "evaluate", "demo", "bench", "data_bench")


def load_toml(path):
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as error:
        raise UserError(f"{path}: config file not found") from error
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path}: not valid TOML ({error})") from error


def load_sections(paths):
    """(sections, {section: the file it comes from}) of configs.toml followed by the user's files (`--config`): their
    sections may inherit the shipped ones and replace one of the same name (a config a run dumped, say)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    sections, origins = {}, {}
    for index, path in enumerate(paths):
        found = load_toml(path)
        if index and BASE in found:
            raise UserError(f"{path}: [{BASE}] is configs.toml's declaration of every key; name your section "
                            f"otherwise, with `inherit` = the section it starts from")
        for name, section in found.items():
            sections.pop(name, None)  # a replaced section moves to the end: checked with its file
            sections[name], origins[name] = section, str(path)
    return sections, origins


def closest(name, candidates):
    """A 'did you mean' suffix naming the closest valid names."""
    matches = difflib.get_close_matches(name, list(dict.fromkeys(candidates)), n=3, cutoff=0.5)
    return f"; closest: {', '.join(matches)}" if matches else ""


def resolve_section(sections, name, path="configs.toml"):
    """Merge a section over the chain it inherits from (`inherit = "other"`), ending at [base]."""
    chain, current = [], name
    while current is not None:
        if current not in sections:
            raise UserError(f"{path}: no section [{current}]{closest(current, sections)}. "
                            f"`python run.py --list` shows them all.")
        if current in chain:
            raise UserError(f"{path}: [{name}] inherits in a cycle: {' -> '.join(chain + [current])}")
        chain.append(current)
        current = sections[current].get("inherit", BASE if current != BASE else None)
    resolved = {}
    for section in reversed(chain):
        resolved = merge(resolved, sections[section])
    resolved.pop("inherit", None)
    resolved["section"] = name
    return resolved


def merge(base, update):
    """Deep merge of nested dicts; `update` wins."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def check_keys(config, schema, model_defaults, where, prefix=""):
    """Every key of `config` must exist in `schema` ([base]); model keys in the builder signature."""
    for key, value in config.items():
        dotted = prefix + key
        if dotted == "section":
            continue
        known = model_defaults if prefix == "model." and key != "name" else schema
        if key not in known:
            raise UserError(f"{where}: unknown key '{dotted}'{closest(key, known)}")
        if isinstance(value, dict) and isinstance(known[key], dict):
            check_keys(value, known[key], model_defaults, where, dotted + ".")
        else:
            check_type(dotted, value, known[key], where)


def parse_override(text):
    """`a.b=value` -> (["a", "b"], value); the value is a TOML literal, else a bare string."""
    if "=" not in text:
        raise UserError(f"override '{text}' is not key=value (e.g. model.num_classes=21)")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # paths and names need no quotes on the command line
    return key.strip().split("."), value


def check_type(key, value, default, where="override"):
    """An override must have the type of the value it replaces (an int may replace a float)."""
    if isinstance(default, dict) or isinstance(value, dict):  # an inline table would replace the whole table
        keys = " ".join(f"{key}.{k}={_literal(v)}" for k, v in value.items()) if isinstance(value, dict) else ""
        raise UserError(f"override {key}={value!r}: set a table's keys one by one, like {keys or key + '.KEY=VALUE'}")
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    elif isinstance(default, (int, str, list)):
        ok = type(value) is type(default)
        if key == "loss_scale":  # "dynamic" or a number
            ok = value == "dynamic" or isinstance(value, (int, float))
    else:
        ok = True
    if not ok:
        raise UserError(f"{where} {key}={value!r}: expected a {type(default).__name__} like {default!r}")
    return value


def apply_overrides(config, overrides, model_defaults):
    for text in overrides:
        keys, value = parse_override(text)
        node, dotted = config, ".".join(keys)
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                raise UserError(f"unknown key '{dotted}'{closest(key, node)}")
            node = node[key]
        last = keys[-1]
        if last in node:
            default = node[last]
        elif keys[0] == "model" and len(keys) == 2 and last in model_defaults:
            default = model_defaults[last]
        else:
            candidates = list(node) + (list(model_defaults) if keys[0] == "model" else [])
            raise UserError(f"unknown key '{dotted}'{closest(last, candidates)}")
        node[last] = check_type(dotted, value, default)
    return config


def load_config(path, section, overrides=(), model_defaults_for=lambda name: {}, stored_config_for=lambda path: None,
                log=print):
    """The fully resolved, checked config of one section with command-line overrides applied.

    path: configs.toml, or a list of it and the user's files (load_sections). model_defaults_for(name) returns the
    builder's keyword defaults for model `name`; they fill the [model] table so that --show prints every value the
    run uses. Every section of every file is checked, keys and types, so a typo anywhere is caught before a long run
    starts. log(line) reports what a checkpoint carried."""
    sections, origins = load_sections(path)
    if BASE not in sections:
        raise UserError(f"{path}: needs a [{BASE}] section declaring every key")
    shipped = origins[BASE]
    for name in sorted(sections, key=lambda name: origins[name] == shipped):  # the user's first: named with its file
        resolved = resolve_section(sections, name, origins[name])
        defaults = model_defaults_for(resolved.get("model", {}).get("name", ""))
        check_keys(resolved, sections[BASE], defaults, f"{origins[name]} [{name}]")
    config = resolve_section(sections, section, origins.get(section, ", ".join(dict.fromkeys(origins.values()))))
    model_name = config.get("model", {}).get("name", "")
    overridden = apply_overrides(copy.deepcopy(config), overrides, model_defaults_for(model_name))
    config = carry_from_checkpoint(config, overridden, stored_config_for, log)
    config = apply_overrides(config, overrides, model_defaults_for(config.get("model", {}).get("name", "")))
    if not model_name:
        return config
    if config["model"].get("num_classes") == 0 and config.get("data", {}).get("classes"):
        config["model"]["num_classes"] = len(config["data"]["classes"])
    if not model_defaults_for(config["model"]["name"]):
        raise UserError(f"model.name = {config['model']['name']!r} is not a model seg builds; use \"pspnet\" or "
                        f"\"pointrend\"")
    defaults = {key: list(value) if isinstance(value, tuple) else value  # TOML-friendly
                for key, value in model_defaults_for(config["model"]["name"]).items() if value is not None}
    config["model"] = {"name": config["model"]["name"], **defaults, **config["model"]}  # name first
    return config


def carry_from_checkpoint(config, overridden, stored_config_for, log=print):
    """When `weights` (after the overrides) is a seg checkpoint and the task evaluates, predicts or exports, the
    section's model table, dataset and test size become the checkpoint's; a train task takes only its model table
    (with the section's num_classes); overrides apply after. stored_config_for(path) -> stored config or None."""
    stored = overridden.get("weights") and overridden.get("task") in ("train", "evaluate", "predict", "export") and \
        stored_config_for(overridden["weights"])
    if not stored or "model" not in stored:
        return config
    if overridden["task"] == "train":  # fine-tuning: the section's data and class count (a new head starts afresh)
        log(f"{overridden['weights']}: took model (but num_classes) from the checkpoint")
        return {**config, "model": {**copy.deepcopy(stored["model"]), "num_classes": config["model"]["num_classes"]}}
    keys = [key for key in CARRIED_DATA if key in stored.get("data", {})]  # older checkpoints lack some
    config = {**config, "model": copy.deepcopy(stored["model"]),
              "data": {**config["data"], **{key: copy.deepcopy(stored["data"][key]) for key in keys}}}
    taken = [f"data.{key}" for key in keys]
    long_short = stored["data"].get("test_scale", [])
    if overridden["task"] == "export" and long_short and max(long_short) <= 2 * min(long_short):
        # a test scale that names an image size (mmseg's [2048, 512] only caps the long side): export that size
        config["export"] = {**config["export"], "hw": [min(long_short), max(long_short)]}
        taken.append(f"export.hw = {config['export']['hw']} (data.test_scale)")
    log(f"{overridden['weights']}: took model, {', '.join(taken)} from the checkpoint (command-line overrides win)")
    return config


def describe_sections(path):
    """(name, description, its file) of every runnable section (one with a task); path as load_config's."""
    sections, origins = load_sections(path)
    resolved = [resolve_section(sections, name, origins[name]) for name in sections]
    return [(config["section"], config.get("description", ""), origins[config["section"]]) for config in resolved
            if config.get("task")]


def to_toml(config, prefix=""):
    """Render a resolved config back as TOML text (for --show and checkpoints)."""
    lines = [f"{key} = {_literal(value)}" for key, value in config.items() if not isinstance(value, dict)]
    for key, value in config.items():
        if isinstance(value, dict):
            lines += [f"\n[{prefix}{key}]", to_toml(value, prefix=f"{prefix}{key}.")]
    return "\n".join(lines)


def section_toml(config):
    """The resolved config as a TOML file of one section named after it (for <output_dir>/config.toml)."""
    name = config["section"]
    body = to_toml({key: value for key, value in config.items() if key != "section"}, prefix=f"{name}.")
    return f"# the resolved config of [{name}]; run it again with run.py's --config FILE option\n[{name}]\n{body}\n"


def _literal(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    return repr(value)


def lookup(config, dotted):
    for key in dotted.split("."):
        config = config[key]
    return config


def validate(config, world_size=1):
    """Check the resolved config before any data is read or model built: choices, counts, list lengths, test windows,
    required paths, a writable output folder, a batch `world_size` processes share; UserError names the bad key."""
    def check(key, ok, expected):
        if not ok:
            raise UserError(f"[{config['section']}] {key} = {_literal(lookup(config, key))}: expected {expected}")
    data, test = config["data"], config["test"]
    for key, choices in CHOICES.items():
        check(key, lookup(config, key) in choices, " or ".join(f'"{choice}"' for choice in choices))
    check("data.classes", config["model"]["num_classes"] != 0 or data["classes"], 'your class names, e.g. '
          'data.classes=\'["background", "road"]\' (model.num_classes = 0 takes their count)')
    for key, least in AT_LEAST.items():
        check(key, lookup(config, key) >= least, f"an integer >= {least}")
    for key in SIZES:
        value = lookup(config, key)
        check(key, len(value) == 2 and all(type(v) is int and v > 0 for v in value), "two positive integers [h, w]")
    for key in POSITIVE_LISTS:
        value = lookup(config, key)
        check(key, value and all(isinstance(v, (int, float)) and v > 0 for v in value), "a list of positive numbers")
    check("amp", config["amp"] != "auto" or config["task"] in ("predict", "evaluate", "load"), '"off", "fp16" or '
          '"bf16" ("auto" picks an inference precision, for predict and evaluate sections and seg.load only)')
    check("bench.amp", set(config["bench"]["amp"]) <= {"off", "fp16", "bf16"}, 'a list of "off", "fp16", "bf16"')
    check("loss_scale", config["loss_scale"] == "dynamic" or config["loss_scale"] > 0, '"dynamic" or a number > 0')
    check("data.ratio_range", len(data["ratio_range"]) == 2 and data["ratio_range"][0] <= data["ratio_range"][1],
          "[low, high] with low <= high")
    check("data.cat_max_ratio", 0 < data["cat_max_ratio"] <= 1, "a share in (0, 1]")
    check("optimizer.lr", config["optimizer"]["lr"] > 0, "a learning rate > 0")
    check("data.classes", len(data["classes"]) in (0, config["model"]["num_classes"]),
          f"one name per class (model.num_classes = {config['model']['num_classes']}), or [] for the dataset's")
    check("data.palette", all(len(c) == 3 and all(type(v) is int and 0 <= v < 256 for v in c) for c in data["palette"]),
          "[[r, g, b], ...] with values 0..255")
    check("data.classes", len(set(data["classes"])) == len(data["classes"]), "distinct names")
    check("data.palette", not data["palette"] or len(data["palette"]) >= config["model"]["num_classes"],
          f"a colour for each of the {config['model']['num_classes']} classes, or [] for the dataset's")
    check("resume_from", not config["resume_from"] or os.path.isfile(config["resume_from"]), "an existing checkpoint")
    if config["task"] in ("train", "demo"):
        check("data.batch_size", data["batch_size"] % (world_size * config["accumulate"]) == 0,
              f"a global batch divisible by the {world_size} processes × accumulate = {config['accumulate']}")
    check("label_ids", config["label_ids"] != "cityscapes" or config["model"]["num_classes"] == 19,
          '"" unless model.num_classes = 19 (the Cityscapes train ids)')
    check("test.stride_hw", all(s <= c for s, c in zip(test["stride_hw"], test["crop_hw"])),
          "strides no larger than test.crop_hw (larger ones leave gaps between the windows)")
    check_long_runs(config, check)
    check_paths(config, check)
    return config


def check_paths(config, check):
    """The paths the task needs are given, and where it writes can be written."""
    for key, hint in REQUIRED.get(config["task"], {}).items():
        if not config[key]:
            raise UserError(f"[{config['section']}] needs {key}=PATH ({hint})")
    if config["task"] in ("train", "demo", "evaluate", "predict", "export", "load"):  # the tasks that read weights
        check("weights", not config["weights"] or os.path.isfile(config["weights"]), f"a file: {CHECKPOINT}")
        check("pretrained", not config["pretrained"] or os.path.isfile(config["pretrained"]), "the ImageNet backbone "
              "there (mmcv resnet50_v1c-2cccc1ad.pth for PSPNet, MSRA R-101.pkl for PointRend), or \"\" from scratch")
    if config["task"] in WRITES_OUTPUT_DIR:
        check_writable_folder(config["output_dir"], "output_dir")
    if config["task"] == "predict":
        check_writable_folder(config["output"], "output")
    if config["task"] == "export":
        check("output", config["output"].endswith(".onnx"), "a path ending in .onnx")
        check_writable_folder(os.path.dirname(os.path.abspath(config["output"])), "output")


def check_long_runs(config, check):
    """What the checkpoint policy and the loss options need."""
    policy, loss, pspnet = config["checkpoint"], config["loss"], config["model"]["name"] == "pspnet"
    check("checkpoint.best", not policy["best"] or config["eval_interval"] or config["final_eval"],
          "\"\" without evaluations (eval_interval = 0 and final_eval = false)")
    check("checkpoint.early_stop_patience", not policy["early_stop_patience"] or policy["best"],
          "0 unless checkpoint.best names the score it watches (e.g. checkpoint.best=mIoU)")
    for key in ("class_weight", "class_weight_rule", "ohem"):
        check(f"loss.{key}", pspnet or not loss[key], "its default: PointRend's losses take no class weights or OHEM")
    check("loss.class_weight", len(loss["class_weight"]) in (0, config["model"]["num_classes"]) and all(
          isinstance(w, (int, float)) and w >= 0 for w in loss["class_weight"]), "[] or a weight >= 0 per class")
    check("loss.class_weight_rule", not (loss["class_weight_rule"] and loss["class_weight"]), '"" with class weights')
    check("loss.ohem_thresh", 0 < loss["ohem_thresh"] <= 1, "a probability in (0, 1]")


def check_writable_folder(folder, key):
    """Check that `folder` can be made and written: its nearest existing ancestor is a folder in which a file can be
    created (an unnamed temporary one, gone at once). Creates nothing; UserError naming the key otherwise."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(20, f"{existing} is not a folder")
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise UserError(f"{key} = {folder}: cannot write there ({error.strerror or error}); choose another {key}") \
            from None
