"""Devices and torchrun: one process per device, falling back cleanly to a single process.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them seg runs as rank 0 of 1. The backend
follows the device: nccl (CUDA), hccl (Ascend), gloo (CPU).
"""
import os
import warnings

import torch
import torch.distributed as torch_dist

from seg.files import UserError

BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


def import_torch_npu():
    """Import torch_npu (it registers the "npu" device); a UserError explains how to install it."""
    try:
        import torch_npu  # noqa: F401
    except (ImportError, RuntimeError) as error:
        raise UserError(
            f"device = \"npu\" needs torch_npu, which failed to import ({error}). Install the torch_npu "
            f"build that matches torch {torch.__version__.split('+')[0]} (pip install torch-npu=="
            f"{torch.__version__.split('+')[0]}) and source the CANN set_env.sh first."
        ) from error
    return torch.npu


def resolve_device_type(device):
    """"auto" picks cuda, then npu, then cpu; an explicit choice must be available."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        try:
            if import_torch_npu().is_available():
                return "npu"
        except UserError:
            pass
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device = \"cuda\" but no CUDA GPU is visible; use device = \"cpu\" or \"auto\"")
    if device == "npu" and not import_torch_npu().is_available():
        raise UserError("device = \"npu\" but torch_npu sees no NPU; check ASCEND_RT_VISIBLE_DEVICES")
    return device


def setup(device="auto"):
    """Initialise the process group when launched by torchrun. Returns (torch.device, rank, world_size)."""
    device_type = resolve_device_type(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cpu":
        torch_device = torch.device("cpu")
    else:
        # set the device before the process group: hccl's barrier uses the current device
        getattr(torch, device_type).set_device(local_rank)
        if device_type == "npu" and hasattr(torch.npu, "set_compile_mode"):
            # prebuilt operator binaries: online compilation per new shape makes evaluation crawl
            torch.npu.set_compile_mode(jit_compile=False)
        torch_device = torch.device(device_type, local_rank)
    if world_size > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=BACKENDS[device_type])
    return torch_device, rank, world_size


def is_distributed():
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def all_reduce_sum(tensor):
    """Sum a tensor across ranks in place (int64 is fine on every backend); returns it."""
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def barrier():
    if is_distributed():
        torch_dist.barrier()


def cleanup():
    if is_distributed():
        torch_dist.destroy_process_group()


def convert_sync_batchnorm(model, device_type, sync_bn):
    """SyncBN when distributed on CUDA/NPU; elsewhere plain BN, with one warning if SyncBN was asked."""
    if not sync_bn:
        return model
    if not is_distributed():
        return model  # one process: BN already sees the whole batch
    if device_type == "cpu":
        warnings.warn("sync_bn = true but SyncBatchNorm cannot run on CPU (gloo); using per-process BN",
                      stacklevel=2)
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap_ddp(model, torch_device):
    """DistributedDataParallel when distributed (broadcast_buffers=False, as both references)."""
    if not is_distributed():
        return model
    device_ids = None if torch_device.type == "cpu" else [torch_device.index]
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def synchronize(torch_device):
    """Wait for queued device work (timing and peak-memory readings only)."""
    if torch_device.type != "cpu":
        getattr(torch, torch_device.type).synchronize()


def peak_memory_mib(torch_device):
    if torch_device.type == "cpu":
        return 0.0
    return getattr(torch, torch_device.type).max_memory_allocated(torch_device) / 2**20
