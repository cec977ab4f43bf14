import os
import socket
import sys

import pytest
import torch

# tests share 2 cores with everything else: one thread each keeps them fast and predictable
torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    """A data_root holding a tiny generated VOC-layout dataset under voc/ (8 train, 4 val images of 48×64)."""
    from seg import prepare

    data_root = tmp_path_factory.mktemp("data")
    prepare.make_demo_voc(str(data_root / "voc"), n_train=8, n_val=4, size=(48, 64), seed=1)
    return str(data_root)


@pytest.fixture
def free_port():
    """A TCP port nothing listens on now, for a test's process group (fixed ports collide when test runs overlap)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
