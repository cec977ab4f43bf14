"""seg's one entry point: run a section of configs.toml.

    python run.py --list                                  # every section, one line each
    python run.py pspnet_1p --show                        # the fully resolved config
    python run.py demo                                    # generated data, CPU, a few minutes
    python run.py pspnet_eval weights=PATH                # key=value overrides (TOML literals)
    python run.py pspnet_predict weights=PATH input=DIR output=DIR
    python run.py pspnet_1p --check-data                  # decode every image and label of a section's splits
    python run.py data_bench                              # benchmarks: pspnet_bench, pointrend_bench too
    torchrun --nproc_per_node 8 run.py pspnet_8p          # one node, 8 devices
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 \\
             --nproc_per_node 8 run.py pointrend_8p       # several nodes (node_rank 1 on the other)

Mistakes in the config or the data exit with code 2 and a message naming the key or file.
"""
import functools
import os
import signal
import sys

from seg import checkpoint, config, dist, tasks
from seg.files import UserError

CONFIG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs.toml")


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] == "--list":
        for name, description in config.describe_sections(CONFIG_PATH):
            print(f"{name:<20} {description}")
        return 0
    section, rest = argv[0], argv[1:]
    overrides = [item for item in rest if item not in ("--show", "--check-data")]
    unknown_flags = [item for item in overrides if item.startswith("-")]
    if unknown_flags:
        raise UserError(f"unknown option {unknown_flags[0]}; options: --list, --show, --check-data; the rest key=value")
    load = functools.partial(config.load_config, CONFIG_PATH, model_defaults_for=tasks.builder_defaults,
                             stored_config_for=checkpoint.stored_config)
    resolved = load(section, overrides)
    if "--show" in rest:
        print(config.to_toml(resolved))
    elif "--check-data" in rest:
        tasks.check_data_task(config.validate({**resolved, "task": "check_data"}))
    elif resolved["task"] not in tasks.TASKS:
        raise UserError(f"[{section}] task = {resolved['task']!r} is not runnable; see `python run.py --list`")
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


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops as Ctrl-C does
    try:
        sys.exit(main(sys.argv[1:]))
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
