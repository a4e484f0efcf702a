"""The pieces of one training step: the noise schedule, the loss, the optimizer and its step.

Mirrors `ControlLDM`'s training (lllyasviel/ControlNet `ldm/models/diffusion/ddpm.py`, `p_losses`):
latents = VAE posterior sample * scale; t uniform in [0, 1000); x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps
with the "scaled linear" betas 0.00085 .. 0.012; plain MSE against eps (or v for v-prediction bases).
Adds what diffusers' and kohya's trainers offer: Min-SNR-gamma loss weighting (Hang et al. 2023), mixed
precision, gradient checkpointing, 8-bit Adam. How a batch is drawn and encoded is `batches.py`.
Left out: EMA, LR schedules, offset noise.
"""
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import DDPMScheduler

from tinylllite import control_branch, nan_guard
from tinylllite.sd.base import StableDiffusionBase
from tinylllite.control_branch import unet_prediction

# torch's fused AdamW: the same update up to float rounding, in one pass over all tensors. On the 2-core CPU
# 6x faster than the default loop for the tiny branches' hundreds of small tensors (bench/step_parts.py)
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def training_scheduler(base: StableDiffusionBase) -> DDPMScheduler:
    return DDPMScheduler.from_config(base.noise_schedule_config)


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma: weight = min(SNR, gamma) / SNR for eps targets, / (SNR + 1) for v targets."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alpha_bar / (1 - alpha_bar)  # (B,)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else clipped / snr


def diffusion_loss(base: StableDiffusionBase, control, scheduler: DDPMScheduler, batch: dict,
                   snr_gamma: float | None = None, only_mid_control: bool = False) -> torch.Tensor:
    """The training loss of one batch: MSE between the UNet's prediction and eps (or v), optionally Min-SNR weighted."""
    latents, noise, t = batch["latents"], batch["noise"], batch["timesteps"]
    noisy = scheduler.add_noise(latents, noise, t)  # sqrt(a_t) x0 + sqrt(1 - a_t) eps
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    hint = batch["hint"]
    if control_branch.control_kind(control) == "lllite":  # embed for training: one conv stack per depth
        control.set_conditioning(hint, together=True)
        hint = None  # unet_prediction reuses the embedding set here
    pred = unet_prediction(base, control, noisy, t, batch["hidden"], batch["added_cond_kwargs"], hint,
                           only_mid_control=only_mid_control)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma:
        per_sample = per_sample * min_snr_weights(scheduler, t, snr_gamma)
    return per_sample.mean()


def prepare_trainable(base: StableDiffusionBase, control,
                      sd_locked: bool = True) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze the base, unfreeze exactly the branch (and the UNet decoder when not sd_locked), name each trainable
    parameter by where it lives: the paper, Sec. 3.2, trains the copy and keeps the locked model fixed."""
    for part in base.parts().values():
        part.requires_grad_(False).eval()
    trainable = {id(p) for p in control_branch.set_trainable(base.unet, control, sd_locked)}
    control.train()  # LLLite's dropout (if any); the frozen base stays in eval mode
    named, seen = [], set()
    for prefix, module in (("control", control), ("unet", base.unet)):  # an LLLite's modules live in both
        for name, p in module.named_parameters():
            if id(p) in trainable and id(p) not in seen:
                named.append((f"{prefix}.{name}", p))
                seen.add(id(p))
    if not named:
        raise RuntimeError("no trainable parameters: the control branch is empty or everything is frozen")
    return named


def use_channels_last(base: StableDiffusionBase, control) -> None:
    """Keep the UNet's and the branch's conv weights in NHWC, the layout oneDNN's CPU convolutions prefer
    (the tiny default job's `channels_last`). Activations follow the weights' layout; the numbers only round
    differently."""
    base.unet.to(memory_format=torch.channels_last)
    control.to(memory_format=torch.channels_last)


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float = 0.01, use_8bit: bool = False):
    """AdamW (the original's optimizer, weight decay 0.01) over exactly the trainable params; 8-bit via bitsandbytes."""
    if not use_8bit:  # the fused kernel updates every tensor in one pass instead of several ops per tensor
        fused = bool(params) and all(p.device.type in FUSED_ADAMW_DEVICES for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    try:
        import bitsandbytes
    except ImportError as error:
        raise SystemExit("--use-8bit-adam needs bitsandbytes (CUDA only): pip install bitsandbytes, "
                         "or drop the flag to use torch's AdamW") from error
    return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast of the forward pass; the trainable weights stay fp32 (their optimizer state too)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=HALF[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def cast_frozen_weights_to_half(base: StableDiffusionBase, precision: str) -> None:
    """On a GPU, keep the frozen UNet and text encoders in the run's half precision, and the VAE too under bf16
    (as diffusers' train_controlnet.py does; SD's VAE overflows in fp16): half the memory, no per-step casts.
    Trainable weights (and their optimizer state) stay fp32."""
    if precision == "fp32":
        return
    for part in (base.unet, base.text_encoder, base.text_encoder_2, base.vae if precision == "bf16" else None):
        for p in part.parameters() if part is not None else []:
            if not p.requires_grad:
                p.data = p.data.to(HALF[precision])


class GradientAverager:
    """The mean of every gradient over the processes (what DistributedDataParallel computes), communicated while
    the backward pass still runs: on the step's last micro-batch, each parameter's all_reduce starts, without
    waiting, as soon as its gradient is complete; `finish` waits for them. Every process runs the same graph, so
    the hooks fire, and the collectives start, in the same order everywhere."""

    def __init__(self, params: list[torch.nn.Parameter], world: int):
        self.params, self.world, self.pending, self.last_micro_batch = params, world, [], False
        for p in params:
            p.register_post_accumulate_grad_hook(self._reduce)

    def _reduce(self, p: torch.nn.Parameter) -> None:
        if self.last_micro_batch:
            self.pending.append(dist.all_reduce(p.grad, async_op=True))

    def finish(self, loss: torch.Tensor) -> None:
        """Wait for the gradients, divide by the number of processes; average the logged loss too."""
        for handle in self.pending:
            handle.wait()
        self.pending, self.last_micro_batch = [], False
        for p in self.params:
            if p.grad is not None:
                p.grad /= self.world
        dist.all_reduce(loss)
        loss /= self.world


def optimizer_step(optimizer, scaler, named: list[tuple[str, torch.nn.Parameter]], max_grad_norm: float | None,
                   step: int) -> None:
    """Unscale (fp16), check the gradients for NaN/inf, clip, step; with a scaler a skipped step is normal."""
    params = [p for _, p in named]
    if scaler:
        scaler.unscale_(optimizer)
    else:
        nan_guard.check_gradients(named, step)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
        nan_guard.check_loss_scale(scaler, step)
    else:
        optimizer.step()
