"""Model name -> builder, loss and class metadata: plain dicts, no registries."""
import inspect
import os

from seg import checkpoint, losses, pointrend, pspnet, resnet
from seg.files import UserError

BUILDERS = {"pspnet": pspnet.build_pspnet, "pointrend": pointrend.build_pointrend}
# build_pointrend passes its **backbone_kwargs on to build_resnet_fpn
FORWARDED_KWARGS = {"pointrend": resnet.build_resnet_fpn}


def builder_defaults(name):
    """The builder's keyword arguments and defaults: the keys a config's [model] table may set."""
    if name not in BUILDERS:
        return {}
    defaults = {}
    for function in (FORWARDED_KWARGS.get(name), BUILDERS[name]):
        if function is not None:
            defaults.update({key: p.default for key, p in inspect.signature(function).parameters.items()
                             if p.default is not inspect.Parameter.empty})
    if name in FORWARDED_KWARGS:  # set by build_pointrend itself
        defaults.pop("out_channels", None)
    return defaults


def build(model_config):
    """Build from a [model] table: `name` picks the builder, every other key is its argument."""
    kwargs = {key: tuple(value) if isinstance(value, list) else value
              for key, value in model_config.items() if key != "name"}
    return BUILDERS[model_config["name"]](**kwargs)


def loss_function(config):
    """outputs, label -> dict of losses, for the configured model."""
    if config["model"]["name"] == "pspnet":
        average, aux_weight = config["loss"]["average"], config["loss"]["aux_weight"]
        return lambda outputs, label: losses.pspnet_losses(outputs, label, average, aux_weight)
    return losses.pointrend_losses


def load_initial_weights(model, config, log=print):
    """`pretrained` (backbone only) then `weights` (whole model; tensors may be missing when fine-tuning)."""
    if config["pretrained"] and not os.path.isfile(config["pretrained"]):
        raise UserError(f"pretrained = {config['pretrained']}: file not found. Download the ImageNet backbone "
                        f"(mmcv resnet50_v1c-2cccc1ad.pth for PSPNet, detectron2's MSRA R-101.pkl for PointRend) "
                        f"to that path, or train from scratch with pretrained=\"\"")
    if config["pretrained"]:
        checkpoint.load_pretrained_backbone(model.backbone, config["pretrained"], log=log,
                                            verbose=config["verbose"])
    if config["weights"]:
        checkpoint.load_model_weights(model, config["weights"], allow_missing=config["allow_missing_weights"],
                                      log=log, verbose=config["verbose"])
