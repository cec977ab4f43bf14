"""Devices and torchrun: one process per device, falling back cleanly to a single process.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them, srun's SLURM_PROCID, SLURM_LOCALID and SLURM_NTASKS
(as torchvision's references/segmentation `utils.py`), else seg runs as rank 0 of 1."""
import inspect
import os
import re
import time
import warnings

import torch
import torch.distributed as torch_dist

from seg.files import UserError

BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}
SLURM_RANKS = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")


def import_torch_npu():
    """Import torch_npu (it registers the "npu" device); a UserError explains how to install it."""
    try:
        import torch_npu  # noqa: F401
    except (ImportError, RuntimeError) as error:
        version = torch.__version__.split("+")[0]
        raise UserError(f"device = \"npu\" needs torch_npu, which failed to import ({error}). Install the torch_npu "
                        f"build that matches torch {version} (pip install torch-npu=={version}) and source the "
                        f"CANN set_env.sh first.") from error
    return torch.npu


def resolve_device_type(device):
    """"auto" picks cuda, then npu, then cpu; an explicit choice must be available."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        try:
            return "npu" if import_torch_npu().is_available() else "cpu"
        except UserError:
            return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device = \"cuda\" but no CUDA GPU is visible; use device = \"cpu\" or \"auto\"")
    if device == "npu" and not import_torch_npu().is_available():
        raise UserError("device = \"npu\" but torch_npu sees no NPU; check ASCEND_RT_VISIBLE_DEVICES")
    return device


def launch_ranks():
    """(rank, local rank, world size) the launcher set (module docstring); the only reader of its environment."""
    if "RANK" not in os.environ and all(key in os.environ for key in SLURM_RANKS):
        return tuple(int(os.environ[key]) for key in SLURM_RANKS)
    return tuple(int(os.environ.get(key, default)) for key, default in
                 (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")))


def first_node(nodelist):
    """The first host of a SLURM node list: "gpu[01-04,07],cpu3" -> "gpu01", "a1,a2" -> "a1", "n[3-4]-ib" -> "n3-ib"."""
    prefix, numbers, suffix = re.match(r"([^,\[]*)(?:\[([^,\]-]*)[^\]]*\]([^,\[]*))?", nodelist.strip()).groups()
    return prefix + (numbers or "") + (suffix or "")


def slurm_rendezvous():
    """tcp://HOST:PORT for srun's tasks: MASTER_ADDR or the job's first node, MASTER_PORT or 29500."""
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "127.0.0.1")
    return f"tcp://{os.environ.get('MASTER_ADDR') or first_node(nodes)}:{os.environ.get('MASTER_PORT', '29500')}"


def print_on_rank0(*args, **kwargs):
    """print() on the launch's rank 0 only (usable before the process group exists)."""
    if launch_ranks()[0] == 0:
        print(*args, **kwargs)


def setup(device="auto"):
    """Initialise the process group when launched by torchrun or srun. Returns (torch.device, rank, world_size)."""
    device_type = resolve_device_type(device)
    rank, local_rank, world_size = launch_ranks()
    torch_device = torch.device("cpu")
    if device_type != "cpu":
        # set the device before the process group: hccl's barrier uses the current device
        torch.get_device_module(device_type).set_device(local_rank)
        if device_type == "npu" and hasattr(torch.npu, "set_compile_mode"):
            # prebuilt operator binaries: online compilation per new shape makes evaluation crawl
            torch.npu.set_compile_mode(jit_compile=False)
        torch_device = torch.device(device_type, local_rank)
    if world_size > 1 and not torch_dist.is_initialized():
        options = {} if "RANK" in os.environ else {"init_method": slurm_rendezvous(), "rank": rank,
                                                   "world_size": world_size}  # torchrun's is env://
        torch_dist.init_process_group(backend=BACKENDS[device_type], **options)
    return torch_device, rank, world_size


def is_distributed():
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def rank():
    return torch_dist.get_rank() if is_distributed() else 0


def world_size():
    return torch_dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor):
    """Sum a tensor across ranks in place (int64 is fine on every backend); returns it."""
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def barrier():
    return torch_dist.barrier() if is_distributed() else None


def cleanup():
    return torch_dist.destroy_process_group() if is_distributed() else None


def convert_sync_batchnorm(model, device_type, sync_bn):
    """SyncBN when distributed on CUDA/NPU; elsewhere plain BN, with one warning if SyncBN was asked."""
    if not sync_bn or not is_distributed():
        return model  # one process: BN already sees the whole batch
    if device_type == "cpu":
        warnings.warn("sync_bn = true but SyncBatchNorm cannot run on CPU (gloo); using per-process BN", stacklevel=2)
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap_ddp(model, torch_device):
    """DistributedDataParallel when distributed, with rank-local buffers as both references (broadcast_buffers=False;
    torch 2.13's forward_sync_buffers=False syncs them once at init: a no-op, every rank has the same buffers)."""
    if not is_distributed():
        return model
    device_ids = None if torch_device.type == "cpu" else [torch_device.index]
    ddp = torch.nn.parallel.DistributedDataParallel
    local = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
             else {"broadcast_buffers": False})  # torch_npu pins older torch releases
    return ddp(model, device_ids=device_ids, **local)


def synchronize(torch_device):
    """Wait for queued device work (timing and peak-memory readings only)."""
    if torch_device.type != "cpu":
        torch.get_device_module(torch_device).synchronize()


def time_calls(function, torch_device, warmup, steps):
    """(seconds of the first call, [seconds of each of `steps` calls after `warmup` untimed ones]), each call timed
    between two synchronize()s."""
    times = []
    for _ in range(warmup + steps):
        synchronize(torch_device)
        start = time.perf_counter()
        function()
        synchronize(torch_device)
        times.append(time.perf_counter() - start)
    return times[0], times[warmup:]


def peak_memory_mib(torch_device):
    device = None if torch_device.type == "cpu" else torch.get_device_module(torch_device)  # cpu: no allocator count
    return device.max_memory_allocated(torch_device) / 2**20 if device else 0.0


def peer_failed(error):
    """Whether `error` is a collective failing because another process of the run exited (it said why)."""
    return isinstance(error, torch_dist.DistError) or (isinstance(error, RuntimeError) and any(
        text in str(error) for text in ("Connection closed by peer", "Connection reset by peer")))
