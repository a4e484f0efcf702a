"""The pieces of one training step: the noise schedule, the loss, the optimizer and its step.

Mirrors `ControlLDM`'s training (lllyasviel/ControlNet `ldm/models/diffusion/ddpm.py`, `p_losses`):
latents = VAE posterior sample * scale; t uniform in [0, 1000); x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps
with the "scaled linear" betas 0.00085 .. 0.012; plain MSE against eps (or v for v-prediction bases).
Adds what diffusers' and kohya's trainers offer: Min-SNR-gamma loss weighting (Hang et al. 2023), mixed
precision, gradient checkpointing, 8-bit Adam, and a NaN guard that never makes the CPU wait for the GPU.
How a batch is drawn and encoded is `run/batches.py`; the loop is tutorial_train.py.
Adds, measured on the tiny SD (bench/convergence.py): x0 (clean-latent) loss weighting, alone or with
Min-SNR's, and a learning rate that decays over the end of the run's budget. Left out: offset noise.
"""
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from tinylllite import control_branch
from tinylllite.sd.base import StableDiffusionBase
from tinylllite.control_branch import unet_prediction

# torch's fused AdamW: the same update up to float rounding, in one pass over all tensors instead of several
# ops per tensor, which for the tiny branches' hundreds of small tensors dominates the step (bench/step_parts.py)
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def training_scheduler(base: StableDiffusionBase) -> DDPMScheduler:
    return DDPMScheduler.from_config(base.noise_schedule_config)


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma: weight = min(SNR, gamma) / SNR for eps targets, / (SNR + 1) for v targets."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alpha_bar / (1 - alpha_bar)  # (B,)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else clipped / snr


def clean_latent_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, clip: float) -> torch.Tensor:
    """x0 supervision as a weight on the eps (or v) loss, clipped: min(1 / SNR, clip), or min(1 / (SNR + 1), clip).

    The error of the clean latent predicted from eps is |x0' - x0|^2 = |eps' - eps|^2 (1 - a_t) / a_t, i.e. the eps
    loss over SNR (from v: times 1 - a_t = 1 / (SNR + 1)). It moves the weight to the noisy timesteps, where the
    layout of the image (here: where the circle goes) is decided; the clip keeps the noisiest from dominating.
    """
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alpha_bar / (1 - alpha_bar)  # (B,)
    weight = 1 / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else 1 / snr
    return torch.clamp(weight, max=clip)


def min_snr_and_clean_latent_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """The larger of the two: Min-SNR's weight where the latent is clean (SNR > 1: the colours and details),
    the clean latent's where it is noisy (SNR < 1: the layout)."""
    return torch.maximum(min_snr_weights(scheduler, timesteps, gamma), clean_latent_weights(scheduler, timesteps, gamma))


# how snr_gamma weighs each timestep: Min-SNR's clip, the clean-latent weight's clip, or the larger of the two
LOSS_WEIGHTINGS = {"min-snr": min_snr_weights, "x0": clean_latent_weights, "min-snr-x0": min_snr_and_clean_latent_weights}


def diffusion_loss(base: StableDiffusionBase, control, scheduler: DDPMScheduler, batch: dict,
                   snr_gamma: float | None = None, only_mid_control: bool = False,
                   weighting: str = "min-snr") -> torch.Tensor:
    """The training loss of one batch: MSE between the UNet's prediction and eps (or v), optionally weighted per
    timestep (`weighting`, a key of LOSS_WEIGHTINGS, clipped at snr_gamma; snr_gamma 0 or None: plain MSE)."""
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
        per_sample = per_sample * LOSS_WEIGHTINGS[weighting](scheduler, t, snr_gamma)
    return per_sample.mean()


class TrainingLoss(torch.nn.Module):
    """`TrainingLoss(...)(batch)` is `diffusion_loss(...)`, as a module whose parameters are exactly the trained ones.

    torch's DistributedDataParallel and torch.compile take a module. This one registers the trained
    parameters (so DDP averages exactly their gradients and starts every process from rank 0's values) and
    holds the base, the branch and the scheduler in a plain tuple, unregistered, so DDP neither broadcasts
    nor watches the gigabytes of frozen weights. An LLLite's parameters live inside the frozen UNet; they
    are trained all the same, since they are in `params`.
    """

    def __init__(self, base: StableDiffusionBase, control, scheduler: DDPMScheduler,
                 params: list[torch.nn.Parameter], snr_gamma: float | None = None, only_mid_control: bool = False,
                 weighting: str = "min-snr"):
        super().__init__()
        self.trained = torch.nn.ParameterList(params)
        self.parts = (base, control, scheduler)  # a tuple, so nn.Module does not register them as children
        self.snr_gamma, self.only_mid_control, self.weighting = snr_gamma, only_mid_control, weighting

    def forward(self, batch: dict) -> torch.Tensor:
        base, control, scheduler = self.parts
        return diffusion_loss(base, control, scheduler, batch, self.snr_gamma, self.only_mid_control, self.weighting)


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


def learning_rate_scale(progress: float, decay: float) -> float:
    """The learning rate's factor at `progress` (0 to 1) of the run's budget: 1, then a half cosine down to 0 over
    the last `decay` of it, so the run ends annealed rather than at its full rate (0: constant)."""
    start = 1 - decay
    if decay <= 0 or progress <= start:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min((progress - start) / decay, 1.0)))


def optimizer_step(optimizer, scaler, params: list[torch.nn.Parameter], max_grad_norm: float | None,
                   finite: "FiniteCheck") -> None:
    """Unscale (fp16), note whether the gradients are finite (on the device, read later), clip, step.

    With an fp16 scaler an inf gradient is expected now and then (the scaler skips that step and lowers its
    scale), so there the gradients are not watched; `FiniteCheck.read` watches the scale instead.
    """
    if scaler:
        scaler.unscale_(optimizer)
    else:
        finite.add_gradients(params)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler:
        scaler.step(optimizer)  # fused AdamW takes found_inf on the device; other optimizers read it back
        scaler.update()
    else:
        optimizer.step()


# ---- NaN and inf, watched without waiting for the device ------------------------------------------------------

ADVICE = ("Try: a lower --learning-rate; --mixed-precision bf16 (or fp32) instead of fp16; --max-grad-norm 1.0; "
          "checking the data (hint in [0, 1], target in [-1, 1], no empty images); resuming from the last "
          "good checkpoint with --resume-from.")
MIN_LOSS_SCALE = 2.0 ** -16  # a GradScaler this low has skipped every step for a long time


class NonFiniteError(RuntimeError):
    """Training produced NaN or inf; the message says where and at which step."""


class FiniteCheck:
    """Whether every loss and gradient since the run began was finite, kept on the device.

    The original trainer keeps going after a NaN and writes checkpoints full of them. Reading `isfinite`
    back at every step would make the CPU wait for the GPU four times a step, so each check only updates
    a few device tensors: the first step whose loss was not finite, the first step whose gradients were
    not, and which parameters' gradients were not. `read()` brings them to the host in one transfer; the
    training loop calls it with every log line, before every checkpoint and at the end, so a NaN stops the
    run within `--log-every` steps and no checkpoint with NaN weights is written.
    """

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], device):
        self.names = [name for name, _ in named]
        self.first_bad = torch.full((2,), -1, dtype=torch.int64, device=device)  # [loss, gradients]
        self.param_finite = torch.ones(len(named), dtype=torch.bool, device=device)
        self.step = torch.zeros((), dtype=torch.int64, device=device)  # the optimizer step being taken

    def _note(self, which: int, finite: torch.Tensor) -> None:
        unset = self.first_bad[which] < 0
        self.first_bad[which] = torch.where(unset & ~finite, self.step, self.first_bad[which])

    def add_loss(self, loss: torch.Tensor) -> None:
        self._note(0, torch.isfinite(loss.detach()).all())

    def add_gradients(self, params: list[torch.nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        # one fused norm per tensor: NaN or inf anywhere makes that tensor's norm NaN or inf
        finite = torch.isfinite(torch.stack(torch._foreach_norm(grads)))  # (P,)
        if len(grads) == len(params):
            self.param_finite &= finite
        self._note(1, finite.all())

    def next_step(self) -> None:
        self.step += 1

    def read(self, scaler=None) -> None:
        """Bring the flags to the host (one read) and raise if anything was NaN or inf."""
        loss_step, grad_step = self.first_bad.tolist()
        if loss_step >= 0:
            raise NonFiniteError(f"the loss became NaN or inf at optimizer step {loss_step} (forward pass); the run "
                                 f"stopped at the next check and saved nothing after it. {ADVICE}")
        if grad_step >= 0:
            bad = [name for name, ok in zip(self.names, self.param_finite.tolist()) if not ok]
            where = f" of {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "") if bad else ""
            raise NonFiniteError(f"NaN or inf in the gradient{where} at optimizer step {grad_step} (backward "
                                 f"pass); the run stopped at the next check and saved nothing after it. {ADVICE}")
        if scaler is not None and scaler.get_scale() < MIN_LOSS_SCALE:
            raise NonFiniteError(f"fp16 loss scale fell to {scaler.get_scale():.3g} (2^{math.log2(scaler.get_scale()):.0f}): "
                                 f"the gradients are non-finite at every scale. {ADVICE}")
