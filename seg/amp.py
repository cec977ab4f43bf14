"""The one place that decides mixed precision: the autocast context and whether a loss scaler exists.

amp = "off" | "fp16" | "bf16". fp16 needs a loss scaler: loss_scale = "dynamic" (start 2**16, halve on
overflow, double after 2000 clean steps, as torch.amp.GradScaler) or a number (static, like the Ascend
scripts' 128 and 512). bf16 has fp32's range and needs none. A step whose gradients overflow is skipped,
never applied, with either kind of scale.
"""
import contextlib

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_context(device_type, amp):
    """A context manager running the forward pass in the requested precision."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[amp])


def check_amp_supported(device_type, amp):
    """Return an error message when the device cannot run this precision, else None.

    torch silently disables autocast for an unsupported dtype (an Ascend 910A asked for bf16 runs fp32),
    so the trainer asks first.
    """
    if amp != "bf16":
        return None
    if device_type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this CUDA GPU does not support bf16; use amp = \"fp16\""
    if device_type == "npu" and not torch.npu.is_bf16_supported():
        return "this Ascend chip (910A family) has no bf16; use amp = \"fp16\" with loss_scale = 128 or 512"
    return None


class LossScaler:
    """Loss scaling for fp16: scale the loss, unscale the gradients, skip steps that overflowed.

    The overflow check reads one flag per step (a host sync, as in torch.amp.GradScaler): a step can
    only be skipped by knowing it overflowed. State is plain numbers so checkpoints stay portable.
    """

    def __init__(self, loss_scale="dynamic", growth_interval=2000):
        self.dynamic = loss_scale == "dynamic"
        self.scale = 2.0**16 if self.dynamic else float(loss_scale)
        self.growth_interval = growth_interval
        self.clean_steps = 0

    def scale_loss(self, loss):
        return loss * self.scale

    def step(self, optimizer):
        """Unscale gradients in place; apply the step unless they hold inf/NaN. Returns True if applied."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        found_inf = torch.zeros(1, device=grads[0].device) if grads else torch.zeros(1)
        inverse = torch.full((1,), 1.0 / self.scale, device=found_inf.device)
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inverse)
        overflow = bool(found_inf.item())
        if not overflow:
            optimizer.step()
        self._update(overflow)
        return not overflow

    def _update(self, overflow):
        if not self.dynamic:
            return
        if overflow:
            self.scale /= 2.0
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= 2.0
            self.clean_steps = 0

    def state_dict(self):
        return {"scale": self.scale, "dynamic": self.dynamic, "clean_steps": self.clean_steps}

    def load_state_dict(self, state):
        self.scale, self.dynamic, self.clean_steps = state["scale"], state["dynamic"], state["clean_steps"]


def make_scaler(amp, loss_scale):
    """A LossScaler for fp16, None otherwise."""
    return LossScaler(loss_scale) if amp == "fp16" else None
