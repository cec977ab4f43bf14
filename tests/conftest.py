import os
import sys

import torch

# tests share 2 cores with everything else: one thread each keeps them fast and predictable
torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
