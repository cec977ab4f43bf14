"""seg's one entry point: run a section of configs.toml.

    python run.py --list                                  # every section, one line each
    python run.py pspnet_1p --show                        # the fully resolved config
    python run.py demo                                    # generated data, CPU, a few minutes
    python run.py pspnet_eval weights=PATH                # key=value overrides (TOML literals)
    python run.py pspnet_predict weights=PATH input=DIR output=DIR
    python run.py data_bench                              # benchmarks: pspnet_bench, pointrend_bench too
    torchrun --nproc_per_node 8 run.py pspnet_8p          # one node, 8 devices
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 \\
             --nproc_per_node 8 run.py pointrend_8p       # several nodes (node_rank 1 on the other)

Mistakes in the config or the data exit with code 2 and a message naming the key or file.
"""
import os
import sys

from seg import config as config_module
from seg.files import UserError

CONFIG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs.toml")


def run_task(config):
    from seg import demo, evaluate, files, prepare, train

    task = config["task"]
    root = os.path.join(config["data_root"], config["data"]["root"])
    if task == "train":
        return train.train(config)
    if task == "evaluate":
        return evaluate.evaluate(config)
    if task == "predict":
        from seg import predict

        return predict.predict(config)
    if task == "demo":
        generate = demo.make_demo_voc if config["data"]["dataset"] == "voc" else demo.make_demo_cityscapes
        # local ranks share the torchrun agent as parent: its pid names this launch's "data is ready" file
        ready = os.path.join(root, f".ready-{os.getppid()}")
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            generate(root)
            files.write_text_atomic("", ready)
        else:
            wait_for(ready)
        train.train(config)
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            os.remove(ready)
        if int(os.environ.get("RANK", "0")) == 0 and config["save_predictions"]:
            save_demo_predictions(config)
        return None
    if task == "prepare_voc_aug":
        sbd = os.path.join(config["data_root"], "VOCdevkit", "VOCaug", "dataset")
        return prepare.prepare_voc_aug(root, sbd)
    if task == "prepare_cityscapes":
        return prepare.prepare_cityscapes(root, workers=config["data"]["workers"])
    if task == "bench":
        from seg import bench

        return bench.model_bench(config)
    if task == "data_bench":
        from seg import databench

        from seg import models

        recipes = [config_module.load_config(CONFIG_PATH, name, [], models.builder_defaults)
                   for name in config["bench"]["sections"]]
        return databench.data_bench(config, recipes)
    raise UserError(f"[{config['section']}] task = {task!r} is not runnable; see `python run.py --list`")


def wait_for(path, timeout_s=600):
    """Other local ranks wait for rank 0 to finish generating the demo data."""
    import time

    start = time.time()
    while not os.path.exists(path):
        if time.time() - start > timeout_s:
            raise UserError(f"{path}: the demo data was not ready within {timeout_s} s")
        time.sleep(0.2)


def save_demo_predictions(config):
    """Reload the final checkpoint and write colour-coded predictions next to their inputs."""
    import torch

    from seg import checkpoint, evaluate, models

    model = models.build(config["model"])
    state = checkpoint.load_training_state(checkpoint.latest_checkpoint(config["output_dir"]))
    model.load_state_dict(state["model"])
    evaluate.save_predictions(config, model, torch.device("cpu"))


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] == "--list":
        for name, description in config_module.describe_sections(CONFIG_PATH):
            print(f"{name:<20} {description}")
        return 0
    from seg import models

    section, rest = argv[0], argv[1:]
    show = "--show" in rest
    overrides = [item for item in rest if item != "--show"]
    unknown_flags = [item for item in overrides if item.startswith("-")]
    if unknown_flags:
        raise UserError(f"unknown option {unknown_flags[0]}; options are --list and --show, the rest key=value")
    config = config_module.load_config(CONFIG_PATH, section, overrides, models.builder_defaults)
    if show:
        print(config_module.to_toml(config))
        return 0
    run_task(config)
    return 0


def user_message(error):
    """The user's message, without the worker traceback DataLoader wraps around it."""
    text = str(error)
    marker = "seg.files.UserError: "
    return text.rsplit(marker, 1)[-1].strip() if marker in text else text


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
