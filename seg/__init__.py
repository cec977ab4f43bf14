"""seg: PSPNet and PointRend semantic segmentation trainers in plain PyTorch."""
