"""Stop training at the first NaN/inf, saying where it appeared and what to try.

The original trainer keeps going after a NaN and writes checkpoints full of them; fp16 users of it
report black images hours later. Here the loss is checked every micro-batch and the gradients before
every optimizer step, with one device -> host read for all of them. Under fp16 loss scaling an inf
gradient is expected now and then (the scaler skips that step and halves its scale), so there only a
collapsed scale stops the run.
"""
import math

import torch

ADVICE = ("Try: a lower --learning-rate; --mixed-precision bf16 (or fp32) instead of fp16; --max-grad-norm 1.0; "
          "checking the data (hint in [0, 1], target in [-1, 1], no empty images); resuming from the last "
          "good checkpoint with --resume-from.")
MIN_LOSS_SCALE = 2.0 ** -16  # a GradScaler this low has skipped every step for a long time


class NonFiniteError(RuntimeError):
    """Training produced NaN or inf; the message says where."""


def check_loss(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss).all():
        raise NonFiniteError(f"the loss is {loss.item()} at optimizer step {step} (forward pass). {ADVICE}")


def check_gradients(named_params: list[tuple[str, torch.nn.Parameter]], step: int) -> None:
    """Raise naming the first parameter (module path) whose gradient holds NaN or inf.

    One device -> host read per step when all is finite (SD1.5's ControlNet has 340 gradient tensors; a read
    per tensor would stall the GPU 340 times); the culprit is looked for only after a failure.
    """
    grads = [(name, param) for name, param in named_params if param.grad is not None]
    if not grads or bool(torch.stack([torch.isfinite(p.grad).all() for _, p in grads]).all()):
        return
    name, param = next((n, p) for n, p in grads if not torch.isfinite(p.grad).all())
    bad = "NaN" if torch.isnan(param.grad).any() else "inf"
    raise NonFiniteError(f"{bad} in the gradient of {name} {tuple(param.shape)} at optimizer step {step} "
                         f"(backward pass). {ADVICE}")


def check_loss_scale(scaler: torch.amp.GradScaler | None, step: int) -> None:
    if scaler is not None and scaler.get_scale() < MIN_LOSS_SCALE:
        raise NonFiniteError(f"fp16 loss scale fell to {scaler.get_scale():.3g} (2^{math.log2(scaler.get_scale()):.0f}) "
                             f"at optimizer step {step}: the gradients are non-finite at every scale. {ADVICE}")
