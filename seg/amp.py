"""Mixed precision, decided here only: which autocast context a forward pass runs in, whether a loss scaler exists,
its state in checkpoints, the overflow skip, and whether the device runs the precision at all.

amp = "off" | "fp16" | "bf16", and "auto" for evaluation and prediction (inference_precision). fp16 needs loss_scale =
"dynamic" (2**16, halved on overflow, doubled after 2000 clean steps) or a number (static, like the Ascend scripts' 128
and 512); bf16 needs none. A step whose gradients overflow is skipped, never applied. The scaler is torch's GradScaler,
enabled for fp16 only, so one code path serves every precision (elsewhere its calls pass through)."""
import contextlib
import functools

import torch

STATIC_SCALE = 2**31 - 1  # growth interval of a static loss scale: it never grows


def unsupported(device_type, amp):
    """An error message when the device cannot run this precision, else None. torch silently disables
    autocast for an unsupported dtype (a 910A asked for bf16 runs fp32), so the trainer asks first."""
    if amp == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this CUDA GPU does not support bf16; use amp = \"fp16\""
    if amp == "bf16" and device_type == "npu" and not torch.npu.is_bf16_supported():
        return "this Ascend chip (910A family) has no bf16; use amp = \"fp16\" with loss_scale = 128 or 512"
    return None


def runs_bf16_natively(device_type):
    """Whether the device computes bf16 in hardware, as torch reports it: a CPU with AMX tiles (Intel Sapphire Rapids
    and later) or AVX512-BF16 (Cooper Lake, AMD Zen 4), where oneDNN emulates bf16 otherwise, 1.2-10x slower than fp32
    (BENCHMARKS.md); a CUDA GPU of compute capability >= 8.0 (not the emulation torch also counts). The one check."""
    if device_type == "cpu":
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return device_type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def inference_precision(device_type, amp, channels_last):
    """(amp, channels_last) that evaluation and prediction run in; values other than amp = "auto" pass through. "auto":
    bf16 + channels_last where the device runs bf16 natively (2.3-2.8x faster than fp32 on an AMX CPU); fp16 on NPU
    (Ascend's documented mixed precision: its BatchNorm lists no bf16 input, nor channels_last); fp32 elsewhere."""
    if amp != "auto":
        return amp, channels_last
    if runs_bf16_natively(device_type):
        return "bf16", True
    return ("fp16", False) if device_type == "npu" else ("off", channels_last)


def autocast_context(device_type, amp):
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[amp])


def autocast_for(device_type, amp):
    """autocast() -> a fresh context for `amp` on `device_type`: what the loops and inference take."""
    return functools.partial(autocast_context, device_type, amp)


def make_scaler(device_type, amp, loss_scale):
    """The module docstring's GradScaler; a static scale never grows, and step() undoes its halving on overflow."""
    dynamic = loss_scale == "dynamic"
    options = {"init_scale": 2.0**16 if dynamic else float(loss_scale), "enabled": amp == "fp16",
               "growth_interval": 2000 if dynamic else STATIC_SCALE}
    if device_type == "npu":  # torch.amp's generic "npu" scaler needs torch >= 2.3; torch_npu's own exists in every 2.x
        return torch.npu.amp.GradScaler(**options)
    return torch.amp.GradScaler(device_type, **options)


def step(scaler, optimizer):
    """optimizer.step() through the scaler; returns whether the step was applied (False: fp16 gradients
    overflowed, the step was skipped). Only fp16 reads anything back (GradScaler's overflow flag)."""
    if not scaler.is_enabled():
        optimizer.step()
        return True
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    applied = scaler.get_scale() >= before  # an overflow halves the scale
    if not applied and scaler.get_growth_interval() == STATIC_SCALE:
        scaler.update(before)
    return applied


def scaler_state(scaler):
    """The scaler in checkpoints as plain numbers: {"scale", "dynamic", "clean_steps"}, or None without fp16."""
    if not scaler.is_enabled():
        return None
    return {"scale": scaler.get_scale(), "dynamic": scaler.get_growth_interval() != STATIC_SCALE,
            "clean_steps": int(scaler.state_dict()["_growth_tracker"])}


def load_scaler_state(scaler, state):
    if scaler.is_enabled() and state:
        scaler.load_state_dict({**scaler.state_dict(), "scale": state["scale"],
                                "_growth_tracker": state["clean_steps"]})
