"""seg: PSPNet and PointRend semantic segmentation trainers in plain PyTorch; as a library (README "Python API"),
`seg.load("iter_0002000.pth")("photo.jpg")`. `import seg` imports no torch: the modules load on the first call."""
import json
import os


def load(weights, device="auto", model=None, overrides=()):
    """A Predictor of `weights` on `device` (auto, cpu, cuda, npu): a seg checkpoint brings its model, classes, palette
    and test scale; an mmseg or detectron2 file needs `model` ("pspnet", "pointrend") and gets its *_predict section.
    overrides: key=value strings as on the command line, e.g. ["amp=bf16"]."""
    from seg import checkpoint, cli, config, files, tasks
    name = (checkpoint.stored_config(weights) or {}).get("model", {}).get("name") or model
    if name not in tasks.MODELS:
        raise files.UserError(f"{weights}: not a seg checkpoint (or not there); for an mmseg or detectron2 file say "
                              f"which model it holds: seg.load(..., model=\"pspnet\") or model=\"pointrend\"")
    resolved = config.load_config(cli.CONFIG_PATH, f"{name}_predict", [
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
