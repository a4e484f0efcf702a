"""The pieces of one training step: noise schedule, per-sample randomness, batch encoding, the loss.

Mirrors `ControlLDM`'s training (lllyasviel/ControlNet `ldm/models/diffusion/ddpm.py` p_losses,
SPEC §3): latents = VAE posterior sample * scale; t uniform in [0, 1000); x_t = sqrt(a_t) x_0 +
sqrt(1 - a_t) eps with the "scaled linear" betas 0.00085 .. 0.012; plain MSE against eps (or v for
v-prediction bases). Adds what diffusers' and kohya's trainers offer: Min-SNR-gamma loss weighting
(Hang et al. 2023), prompt dropout (the paper's 50 %, absent from the released code), caching of
latents and text embeddings, mixed precision and gradient checkpointing.

Every random draw of a training sample (data order, timestep, noise, VAE sample, prompt dropout)
comes from a generator seeded by (run seed, sample number). So a run's losses do not depend on how
the samples are split: one process or several, batch 4 or batch 2 x 2 accumulation, uninterrupted
or resumed from a checkpoint. The tests rely on that. Left out: EMA, LR schedules, offset noise.
"""
from contextlib import nullcontext
from functools import lru_cache

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import DDPMScheduler

from tinylllite import nan_guard
from tinylllite.base import StableDiffusionBase
from tinylllite.control_branch import control_kind, unet_prediction

# SPEC §3: the schedule every SD1/SD2/SDXL checkpoint was trained with.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def noise_schedule_config(base: StableDiffusionBase) -> dict:
    """SD's schedule, overridden by the base's own scheduler config, with the base's prediction type."""
    return {**SD_SCHEDULE, **base.scheduler_config, "prediction_type": base.prediction_type}


def training_scheduler(base: StableDiffusionBase) -> DDPMScheduler:
    return DDPMScheduler.from_config(noise_schedule_config(base))


def sample_generator(seed: int, sample_number: int) -> torch.Generator:
    """The generator of the sample_number-th training sample of a run (independent of batching and ranks)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, sample_number]).generate_state(1)[0]))


@lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def dataset_index(seed: int, sample_number: int, n: int) -> int:
    """Data order: a fresh shuffle of the n items every epoch; sample k is item order[k % n] of epoch k // n."""
    return int(_epoch_order(seed, sample_number // n, n)[sample_number % n])


TIMESTEP_SAMPLING = ("uniform", "cubic")


def draw_timestep(g: torch.Generator, num_train_timesteps: int, how: str = "uniform") -> torch.Tensor:
    """uniform: t ~ U{0..T-1}, as SD was trained. cubic: t = (1 - u^3) T with u ~ U[0, 1), which favours noisy
    timesteps, where the layout of an image is decided (T2I-Adapter, Mou et al. 2023, Sec. 3.4)."""
    if how == "uniform":
        return torch.randint(0, num_train_timesteps, (), generator=g)
    u = torch.rand((), generator=g)
    return ((1 - u ** 3) * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)


class BatchEncoder:
    """Dataset items -> (latents, text embeddings, hint), with optional caching of the frozen encoders' outputs.

    With caching the VAE's posterior mean and std are kept per item and the latent is still drawn fresh
    (mean + std * eps, the same eps as without caching), so caching changes speed, not results.
    """

    def __init__(self, base: StableDiffusionBase, dataset, seed: int = 0, prompt_dropout: float = 0.0,
                 cache: bool = False, max_samples: int | None = None, timestep_sampling: str = "uniform"):
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling {timestep_sampling!r} is not one of {TIMESTEP_SAMPLING}")
        self.base, self.dataset, self.seed, self.prompt_dropout, self.cache = base, dataset, seed, prompt_dropout, cache
        self.timestep_sampling = timestep_sampling
        self.n = min(len(dataset), max_samples or len(dataset))
        self.latent_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @torch.no_grad()
    def _moments(self, indices: list[int], items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior mean and std (B, 4, h, w) of the items' target images."""
        todo = [i for i in indices if not (self.cache and i in self.latent_cache)]
        if todo:
            vae, item_of = self.base.vae, dict(zip(indices, items))
            images = torch.stack([torch.as_tensor(item_of[i]["jpg"]) for i in todo])  # (B, H, W, 3) in [-1, 1]
            images = images.permute(0, 3, 1, 2).to(vae.device, vae.dtype)  # (B, H, W, 3) -> (B, 3, H, W)
            dist = vae.encode(images).latent_dist  # a Gaussian over (B, 4, H/f, W/f) latents
            fresh = {i: (m, s) for i, m, s in zip(todo, dist.mean, dist.std)}
            if not self.cache:
                return torch.stack([fresh[i][0] for i in indices]), torch.stack([fresh[i][1] for i in indices])
            self.latent_cache.update(fresh)
        return (torch.stack([self.latent_cache[i][0] for i in indices]),
                torch.stack([self.latent_cache[i][1] for i in indices]))

    def _text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.cache:
            return self.base.encode_prompt(prompts)
        missing = sorted({p for p in prompts if p not in self.text_cache})
        if missing:
            hidden, pooled = self.base.encode_prompt(missing)
            for j, p in enumerate(missing):
                self.text_cache[p] = (hidden[j], None if pooled is None else pooled[j])
        hidden = torch.stack([self.text_cache[p][0] for p in prompts])  # (B, 77, D)
        pooled = None if self.text_cache[prompts[0]][1] is None else torch.stack([self.text_cache[p][1] for p in prompts])
        return hidden, pooled

    def batch(self, sample_numbers: list[int], num_train_timesteps: int) -> dict:
        """The training batch made of these samples of the run, with their noise and timesteps."""
        indices = [dataset_index(self.seed, k, self.n) for k in sample_numbers]
        items = [self.dataset[i] for i in indices]
        mean, std = self._moments(indices, items)
        draws = []
        for k in sample_numbers:
            g = sample_generator(self.seed, k)
            t = draw_timestep(g, num_train_timesteps, self.timestep_sampling)
            noise, vae_eps = torch.randn(mean.shape[1:], generator=g), torch.randn(mean.shape[1:], generator=g)
            drop = bool(torch.rand((), generator=g) < self.prompt_dropout)
            draws.append((t, noise, vae_eps, drop))
        device, dtype = mean.device, mean.dtype
        latents = (mean + std * torch.stack([d[2] for d in draws]).to(device, dtype)) * self.base.latent_scale
        prompts = ["" if d[3] else item["txt"] for d, item in zip(draws, items)]
        hidden, pooled = self._text(prompts)
        hint = torch.stack([torch.as_tensor(item["hint"]) for item in items]).permute(0, 3, 1, 2)  # (B,H,W,3)->(B,3,H,W)
        height, width = hint.shape[-2:]
        return dict(latents=latents, noise=torch.stack([d[1] for d in draws]).to(device, dtype),
                    timesteps=torch.stack([d[0] for d in draws]).to(device), hidden=hidden,
                    added_cond_kwargs=self.base.added_cond_kwargs(pooled, height, width),
                    hint=hint.to(device, dtype), prompts=prompts, indices=indices)


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
    pred = unet_prediction(base, control, noisy, t, batch["hidden"], batch["added_cond_kwargs"], batch["hint"],
                           only_mid_control=only_mid_control)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma:
        per_sample = per_sample * min_snr_weights(scheduler, t, snr_gamma)
    return per_sample.mean()


def prepare_trainable(base: StableDiffusionBase, control, sd_locked: bool = True) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze the base, unfreeze exactly the branch (SPEC §2), and name every trainable parameter."""
    for part in base.parts().values():
        part.requires_grad_(False).eval()
    named = []
    if control_kind(control) == "controlnet":
        from tinylllite.controlnet import set_trainable

        set_trainable(base.unet, control, sd_locked=sd_locked)
        named += [(f"controlnet.{n}", p) for n, p in control.named_parameters() if p.requires_grad]
    else:
        from tinylllite.lllite_unet import set_trainable

        if not sd_locked:
            raise ValueError("sd_locked=False unlocks the UNet decoder for a ControlNet; LLLite trains only its modules")
        set_trainable(base.unet, control)
    control.train()  # LLLite's dropout (if any); the frozen base stays in eval mode
    named += [(f"unet.{n}", p) for n, p in base.unet.named_parameters() if p.requires_grad]
    if not named:
        raise RuntimeError("no trainable parameters: the control branch is empty or everything is frozen")
    return named


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float = 0.01, use_8bit: bool = False):
    """AdamW (the original's optimizer, weight decay 0.01) over exactly the trainable params; 8-bit via bitsandbytes."""
    if not use_8bit:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
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
    """On a GPU, keep the frozen UNet and text encoders in the run's half precision: half the memory and no
    per-step casts under autocast. Trainable weights (and their optimizer state) stay fp32."""
    if precision == "fp32":
        return
    for part in (base.unet, base.text_encoder, base.text_encoder_2):
        for p in part.parameters() if part is not None else []:
            if not p.requires_grad:
                p.data = p.data.to(HALF[precision])


def average_gradients(params: list[torch.nn.Parameter], loss: torch.Tensor, world: int) -> None:
    """Mean of every gradient (and of the logged loss) over the processes, as DistributedDataParallel computes it."""
    for p in params:
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        dist.all_reduce(p.grad)
        p.grad /= world
    dist.all_reduce(loss)
    loss /= world


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


def enable_gradient_checkpointing(base: StableDiffusionBase, control) -> None:
    """Recompute block activations in backward: diffusers' switch on the UNet, the same attribute on the branch."""
    from torch.utils.checkpoint import checkpoint

    base.unet.enable_gradient_checkpointing()
    if control_kind(control) == "controlnet":
        for module in control.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = True
                module._gradient_checkpointing_func = lambda fn, *args: checkpoint(fn, *args, use_reentrant=False)
