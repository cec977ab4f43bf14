"""seg's one entry point: run a section of configs.toml.

    python run.py --list                                  # every section, one line each, by file
    python run.py pspnet_1p --show                        # the fully resolved config
    python run.py demo                                    # generated data, CPU, a few minutes
    python run.py pspnet_eval weights=PATH                # key=value overrides (TOML literals)
    python run.py pspnet_predict weights=PATH input=DIR output=DIR
    python run.py mine --config my.toml                   # your [mine]: inherit = "pspnet_folder", what differs
    python run.py pspnet_1p --check-data                  # decode every image and label of a section's splits
    python run.py data_bench                              # benchmarks: pspnet_bench, pointrend_bench too
    torchrun --nproc_per_node 8 run.py pspnet_8p          # one node, 8 devices
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 \\
             --nproc_per_node 8 run.py pointrend_8p       # several nodes (node_rank 1 on the other)

Installed (pip install -e .), `seg` is the same command from any folder (seg/__init__.py).
Mistakes in the config or the data exit with code 2 and a message naming the key or file.
"""
from seg import CONFIG_PATH, console, main, user_message  # noqa: F401 - scripts and tests use run.main

if __name__ == "__main__":
    console(__doc__)
