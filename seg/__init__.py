"""seg: PSPNet and PointRend semantic segmentation trainers in plain PyTorch. The two ways in live here: the Python
API (README "Python API"), `seg.load("iter_0002000.pth")("photo.jpg")`, and the command line of the installed `seg`
command and of `python run.py` (`main`, `console`). `import seg` imports no torch: modules load on the first call."""
import functools
import json
import os
import signal
import sys

USAGE = """The installed `seg` command stands for `python run.py` from any folder (run.py's docstring lists the
launch commands):

    seg --list [--config my.toml]               # every section, grouped by the file it comes from
    seg pspnet_eval weights=PATH                # a section, key=value overrides (TOML literals), --show, --check-data
    seg mine --config my.toml                   # your sections: [mine] inherit = "pspnet_folder" + what differs
    torchrun --nproc_per_node 8 --no-python seg pspnet_8p   # one node, 8 devices

Mistakes in the config or the data exit with code 2 and a message naming the key or file.
"""

# configs.toml inside the installed package (setup.py copies it there), else the checkout's, next to run.py (a
# checkout or an editable install): one file, wherever seg runs from
HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_PATH = os.path.join(HERE if os.path.isfile(os.path.join(HERE, "configs.toml")) else os.path.dirname(HERE),
                           "configs.toml")


def split_config_files(argv):
    """(argv without them, the files of every `--config FILE` / `--config=FILE`, in order)."""
    from seg.files import UserError
    rest, paths, items = [], [], iter(argv)
    for item in items:
        if item == "--config" or item.startswith("--config="):
            path = item.split("=", 1)[1] if "=" in item else next(items, "")
            if not path:
                raise UserError("--config needs a file: --config my.toml (repeatable; later files win)")
            paths.append(path)
        else:
            rest.append(item)
    return rest, paths


def main(argv, usage=USAGE):
    from seg import checkpoint, config, dist, tasks
    from seg.files import UserError
    argv, user_files = split_config_files(argv)
    paths = [CONFIG_PATH, *user_files]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv[0] == "--list":
        origin = None
        for name, description, where in config.describe_sections(paths):
            print(*([f"# {where}"] if where != origin else []), f"{name:<20} {description}", sep="\n")
            origin = where
        return 0
    section, rest = argv[0], argv[1:]
    overrides = [item for item in rest if item not in ("--show", "--check-data")]
    if unknown_flags := [item for item in overrides if item.startswith("-")]:
        raise UserError(f"unknown option {unknown_flags[0]}; options: --list, --show, --check-data, --config FILE; the "
                        f"rest key=value")
    load = functools.partial(config.load_config, paths, model_defaults_for=tasks.builder_defaults,
                             stored_config_for=checkpoint.stored_config, log=dist.print_on_rank0)
    resolved = load(section, overrides)
    if "--show" in rest:
        print(config.to_toml(resolved))
    elif "--check-data" in rest:
        tasks.check_data_task(config.validate({**resolved, "task": "check_data"}))
    elif resolved["task"] not in tasks.TASKS:
        raise UserError(f"[{section}] task = {resolved['task']!r} is not runnable; see `seg --list`")
    else:
        try:
            tasks.TASKS[resolved["task"]](config.validate(resolved, dist.launch_ranks()[2]), load)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (a scheduler, torchrun stopping its workers)
            last = resolved["task"] in ("train", "demo") and checkpoint.latest_checkpoint(resolved["output_dir"])
            dist.print_on_rank0(f"interrupted; resume from {last} with resume=true" if last else "interrupted",
                                file=sys.stderr)
            return 130
    return 0


def user_message(error):
    """The user's message, without the worker traceback DataLoader wraps around it."""
    text, marker = str(error), "seg.files.UserError: "
    return text.rsplit(marker, 1)[-1].strip() if marker in text else text


def console(usage=USAGE):
    """The `seg` command (and run.py): main on sys.argv; a user's mistake exits 2 with its message, no traceback,
    on every rank (a rank whose peer failed says so in one line)."""
    from seg import dist
    from seg.files import UserError
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops as Ctrl-C does
    try:
        sys.exit(main(sys.argv[1:], usage))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:
        if not isinstance(error, UserError) and not dist.peer_failed(error):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun stops the other processes: let them exit 2 first
        print(f"error: {user_message(error)}" if isinstance(error, UserError) else f"error: rank "
              f"{dist.launch_ranks()[0]} stops: another process of this run failed (its message says why)",
              file=sys.stderr)
        sys.exit(2)


def load(weights, device="auto", model=None, overrides=()):
    """A Predictor of `weights` on `device` (auto, cpu, cuda, npu): a seg checkpoint brings its model, classes, palette
    and test scale; an mmseg or detectron2 file needs `model` ("pspnet", "pointrend") and gets its *_predict section.
    overrides: key=value strings as on the command line, e.g. ["amp=bf16"]."""
    from seg import checkpoint, config, files, tasks
    name = (checkpoint.stored_config(weights) or {}).get("model", {}).get("name") or model
    if name not in tasks.MODELS:
        raise files.UserError(f"{weights}: not a seg checkpoint (or not there); for an mmseg or detectron2 file say "
                              f"which model it holds: seg.load(..., model=\"pspnet\") or model=\"pointrend\"")
    resolved = config.load_config(CONFIG_PATH, f"{name}_predict", [
        f"weights={json.dumps(str(weights))}", f"device={json.dumps(device)}", *overrides], tasks.builder_defaults,
        checkpoint.stored_config, log=lambda line: None)
    return Predictor(config.validate({**resolved, "task": "load"}))


class Predictor:
    """predictor(image) -> uint8 H×W class indices, .probabilities(image) -> float32 K×H×W softmax, at the image's
    size as *_predict computes them; a list gives a list. image: a path (read as *_predict reads it), a Pillow image
    or a uint8 H×W×3 RGB array (the models take BGR: reversed here). flip, scales, mode: [test] options for this
    call. Attributes: classes, palette ([(r, g, b)] per class), model (in eval mode), config (resolved section)."""

    def __init__(self, resolved):
        import torch

        from seg import dist, tasks
        torch_device = torch.device(dist.resolve_device_type(resolved["device"]))
        quiet = lambda *args, **kwargs: None  # noqa: E731 - a library call prints nothing
        self.model, self.config = tasks.inference_model(resolved, torch_device, quiet)  # amp "auto" resolved
        self.inference = tasks.inference_options(self.config, torch_device)
        info = tasks.dataset_info(resolved)
        self.classes, self.palette = info["classes"], info["palette"]

    def __call__(self, image, flip=None, scales=None, mode=None):
        return self._predict(image, dict(flip=flip, scales=scales, mode=mode), probabilities=False)

    def probabilities(self, image, flip=None, scales=None, mode=None):
        return self._predict(image, dict(flip=flip, scales=scales, mode=mode), probabilities=True)

    def _predict(self, image, options, probabilities):
        from seg import config, predict
        if isinstance(image, list):
            return [self._predict(one, options, probabilities) for one in image]
        test = {**self.inference["test"], **{key: value for key, value in options.items() if value is not None}}
        config.validate({**self.config, "test": test})  # the command line's checks: mode, scales, windows
        scores, _ = predict.predict_scores(self.model, image_bgr(image), test, self.inference["test_scale"],
                                           self.inference["autocast"])
        return predict.probabilities_of(scores, test) if probabilities else predict.label_of(scores)


def image_bgr(image):
    """uint8 H×W×3 BGR of a path, a Pillow image or a uint8 H×W×3 RGB array."""
    import numpy as np
    from PIL import Image

    from seg import files
    if isinstance(image, (str, os.PathLike)):
        return files.read_image_bgr(image, upright=True)
    if isinstance(image, Image.Image):
        return files.to_bgr(image)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise files.UserError(f"image: expected a path, a Pillow image or a uint8 H×W×3 RGB array, not a "
                              f"{array.dtype} array of shape {array.shape}")
    return np.ascontiguousarray(array[:, :, ::-1])


def colorize(label, palette):
    """H×W class indices -> H×W×3 uint8 RGB in `palette` (predictor.palette); 255 and classes beyond it: white."""
    from seg import predict
    return predict.colorize(label, palette)
