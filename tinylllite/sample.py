"""Sampling: text (+ hint) -> images with DDIM or UniPC, classifier-free guidance and the control knobs.

One function, `sample`, serves every place that makes images: the image log during training, the
fidelity evaluation, and the command line. So what is validated is what is deployed.

Mirrors the original's `DDIMSampler` as its `tutorial_train.py` ImageLogger calls it
(lllyasviel/ControlNet `cldm/cldm.py`, `ControlLDM.log_images`: 50 steps, eta 0, CFG 9, unconditional
branch = empty prompt + the SAME hint) and diffusers'
`StableDiffusionControlNetPipeline` knobs: `controlnet_conditioning_scale` (strength), `guess_mode`
(control on the conditional half only, residual i scaled by logspace(-1, 0, n)[i]) and
`control_guidance_start/end` (the fraction of steps in which control is applied). LLLite gets its
`multiplier` and the same window. The original ramps guess mode as 0.825 ** (12 - i) instead: the same
curve rounded, within 9.4e-4 of diffusers'.

Also makes a synthetic training set from the base alone, as kohya's LLLite guide does: prompts with
`{a|b|c}` wildcards (every combination is expanded), N images each, the prompt saved in each PNG's
"prompt" text chunk. Left out: img2img, inpainting, negative-prompt weighting, schedulers beyond two.
"""
import argparse
import itertools
import os
import re
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, UniPCMultistepScheduler
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tinylllite.base import StableDiffusionBase
from tinylllite.control_branch import conditioned, control_kind, guess_mode_scales, unet_prediction
from tinylllite.hint import check_hint

SAMPLERS = {"ddim": DDIMScheduler, "unipc": UniPCMultistepScheduler}


def make_sampler(base: StableDiffusionBase, sampler: str = "ddim"):
    """DDIM or UniPC on the schedule the base was trained with (`base.noise_schedule_config`), offline."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not one of {sorted(SAMPLERS)}")
    # SD's released sampler settings: no clipping of x0, first step uses alphas_cumprod[0], timesteps + 1.
    return SAMPLERS[sampler].from_config(base.noise_schedule_config, clip_sample=False, set_alpha_to_one=False,
                                         steps_offset=1)


def hint_tensor(hint, batch: int, device, dtype) -> torch.Tensor:
    """uint8 (H, W, 3) / (B, H, W, 3) arrays (or a list of them) or a float (B, 3, H, W) tensor in [0, 1]
    -> (B, 3, H, W) in [0, 1]."""
    if isinstance(hint, (list, tuple)):
        hint = np.stack(hint)
    if isinstance(hint, np.ndarray):
        if hint.dtype != np.uint8 or hint.shape[-1] != 3:
            raise ValueError(f"a hint array must be uint8 (H, W, 3) or (B, H, W, 3) RGB; got {hint.dtype} {hint.shape}")
        hint = torch.from_numpy(hint.reshape(-1, *hint.shape[-3:]).copy()).permute(0, 3, 1, 2).float() / 255  # (B, H, W, 3) -> (B, 3, H, W)
    check_hint(hint)
    if hint.shape[0] == 1:
        hint = hint.expand(batch, -1, -1, -1)
    if hint.shape[0] != batch:
        raise ValueError(f"{hint.shape[0]} hints for {batch} prompts: give one hint or one per prompt")
    return hint.to(device=device, dtype=dtype)


def in_window(step: int, steps: int, start: float, end: float) -> bool:
    """diffusers' control_guidance_start/end rule: step i of n runs with control iff start <= i/n and (i+1)/n <= end."""
    return not (step / steps < start or (step + 1) / steps > end)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample(base: StableDiffusionBase, prompts, control=None, hint=None, steps: int = 50, cfg: float = 9.0,
           sampler: str = "ddim", strength: float = 1.0, guess_mode: bool = False, control_start: float = 0.0,
           control_end: float = 1.0, lllite_multiplier: float = 1.0, seed: int = 0, height: int | None = None,
           width: int | None = None, negative_prompt: str = "", eta: float = 0.0,
           only_mid_control: bool = False) -> np.ndarray:
    """Generate one image per prompt; returns uint8 (B, H, W, 3). Image i uses seed + i, whatever B is."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    kind, unet = control_kind(control), base.unet
    if kind is not None and hint is None:
        raise ValueError(f"sampling with a {kind} needs hint=...; pass control=None for the base alone")
    scales = guess_mode_scales(control) if guess_mode else None  # ControlNet only; SD: 12 encoder skips + 1 middle
    if hint is not None:
        hint = hint_tensor(hint, len(prompts), base.device, unet.dtype)
        height, width = hint.shape[-2:]
    factor = base.vae_scale_factor
    height = height or unet.config.sample_size * factor
    width = width or unet.config.sample_size * factor
    if height % factor or width % factor:
        raise ValueError(f"image size {height}x{width} must be a multiple of the VAE factor {factor}")

    scheduler = make_sampler(base, sampler)
    scheduler.set_timesteps(steps, device=base.device)
    latent_shape = (unet.config.in_channels, height // factor, width // factor)
    noise = [torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(len(prompts))]
    latents = torch.stack(noise).to(base.device, unet.dtype) * scheduler.init_noise_sigma  # (B, 4, h, w)

    hidden_c, pooled_c = base.encode_prompt(prompts)
    hidden_u, pooled_u = base.encode_prompt([negative_prompt] * len(prompts))
    added_c = base.added_cond_kwargs(pooled_c, height, width)
    added_u = base.added_cond_kwargs(pooled_u, height, width)
    step_kwargs = {"eta": eta, "generator": torch.Generator().manual_seed(seed)} if sampler == "ddim" else {}

    with conditioned(control, hint) as step_hint:  # an LLLite embeds the hint once for all timesteps
        for i, t in enumerate(scheduler.timesteps):
            s = strength if in_window(i, len(scheduler.timesteps), control_start, control_end) else 0.0
            x = scheduler.scale_model_input(latents, t)
            t_batch = t.expand(len(prompts))  # (B,)
            common = dict(hint=step_hint, scales=scales, only_mid_control=only_mid_control,
                          lllite_multiplier=lllite_multiplier)
            eps = unet_prediction(base, control, x, t_batch, hidden_c, added_c, strength=s, **common)
            if cfg != 1.0:
                # guess mode: the unconditional half sees no control at all (diffusers, original)
                eps_u = unet_prediction(base, control, x, t_batch, hidden_u, added_u,
                                        strength=0.0 if guess_mode else s, **common)
                eps = eps_u + cfg * (eps - eps_u)
            latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
    vae = base.vae
    return to_uint8(vae.decode(latents.to(vae.dtype) / base.latent_scale).sample)


def expand_wildcards(prompt: str) -> list[str]:
    """"a {red|blue} {cat|dog}" -> the 4 prompts of every combination, in reading order."""
    parts = re.split(r"\{([^{}]*)\}", prompt)  # text, options, text, options, ..., text
    choices = [[p] if i % 2 == 0 else p.split("|") for i, p in enumerate(parts)]
    return ["".join(combo) for combo in itertools.product(*choices)]


def save_png_with_prompt(image: np.ndarray, path: Path, prompt: str) -> None:
    """Atomic PNG write with the prompt in the "prompt" text chunk (read back: Image.open(p).text["prompt"])."""
    info = PngInfo()
    info.add_text("prompt", prompt)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def synthesize_dataset(base: StableDiffusionBase, prompts: list[str], out_dir, n_per_prompt: int = 4,
                       batch_size: int = 8, seed: int = 0, **sample_kwargs) -> list[Path]:
    """Images from the base alone for every expanded prompt, n each, saved as out_dir/{i}.png with their prompt."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [p for prompt in prompts for p in expand_wildcards(prompt) for _ in range(n_per_prompt)]
    paths = []
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        images = sample(base, batch, seed=seed + start, **sample_kwargs)
        for offset, (image, prompt) in enumerate(zip(images, batch)):
            paths.append(out_dir / f"{start + offset}.png")
            save_png_with_prompt(image, paths[-1], prompt)
    return paths


def load_base_or_tiny(path: str) -> StableDiffusionBase:
    """"tiny" = the tiny SD shipped with the package; anything else goes to sd_loading.load_base (offline)."""
    if path == "tiny":
        from tinylllite.tiny_sd import load_tiny_sd

        return load_tiny_sd()
    from tinylllite.sd_loading import load_base

    return load_base(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Sample from a base (+ ControlNet or LLLite), or synthesize a dataset.")
    parser.add_argument("--base", default="tiny", help="'tiny' or an SD checkpoint file / diffusers folder")
    parser.add_argument("--control", help="a control .safetensors (ControlNet or LLLite) or a training checkpoint dir")
    parser.add_argument("--hint", help="conditioning image (RGB PNG/JPG) for --control")
    parser.add_argument("--prompt", action="append", required=True, help="repeatable; {a|b} wildcards expand")
    parser.add_argument("--out", required=True, help="output PNG (sampling) or folder (--synthesize)")
    parser.add_argument("--synthesize", action="store_true", help="write a dataset of N images per prompt to --out")
    parser.add_argument("--n-per-prompt", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=9.0)
    parser.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--guess-mode", action="store_true")
    parser.add_argument("--control-start", type=float, default=0.0)
    parser.add_argument("--control-end", type=float, default=1.0)
    parser.add_argument("--lllite-multiplier", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    args = parser.parse_args(argv)

    base = load_base_or_tiny(args.base)
    knobs = dict(steps=args.steps, cfg=args.cfg, sampler=args.sampler, height=args.height, width=args.width)
    if args.synthesize:
        paths = synthesize_dataset(base, args.prompt, args.out, args.n_per_prompt, seed=args.seed, **knobs)
        print(f"wrote {len(paths)} images to {args.out}")
        return
    control, hint = None, None
    if args.control:
        from tinylllite.checkpoint import load_control

        control = load_control(base, args.control)
        if not args.hint:
            parser.error("--control needs --hint IMAGE")
    if args.hint:
        hint = np.asarray(Image.open(args.hint).convert("RGB"))
    prompts = [p for prompt in args.prompt for p in expand_wildcards(prompt) for _ in range(args.n_per_prompt)]
    images = sample(base, prompts, control, hint, strength=args.strength, guess_mode=args.guess_mode,
                    control_start=args.control_start, control_end=args.control_end,
                    lllite_multiplier=args.lllite_multiplier, seed=args.seed, **knobs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        save_png_with_prompt(image, path, prompt)
        print(path)


if __name__ == "__main__":
    main()
