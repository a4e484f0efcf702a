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
curve rounded, within 9.4e-4 of diffusers'. As in diffusers' pipeline, both halves of CFG run as one
batch [uncond; cond] of 2B (guess mode, whose unconditional half is the plain UNet, runs them apart).

Also makes a synthetic training set from the base alone, as kohya's LLLite guide does: prompts with
`{a|b|c}` wildcards (every combination is expanded), N images each, the prompt saved in each PNG's
"prompt" text chunk and in a kohya caption file beside it. Settings that would fail late, run for
minutes on a useless size or silently skip the control are refused up front, as are outputs that
exist (unless --overwrite). Left out: img2img, inpainting, negative-prompt weighting, schedulers
beyond two.
"""
import argparse
import itertools
import math
import re
import warnings
import functools
from functools import partial
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, UniPCMultistepScheduler
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tinylllite.control_branch import conditioned, control_kind, guess_mode_scales, unet_prediction
from tinylllite.data.datasets import IMAGE_EXTENSIONS, load_rgb
from tinylllite.errors import InputError, run_command
from tinylllite.files.atomic import atomic_file, atomic_folder, refuse_unwritable
from tinylllite.files.sd_loading import load_base_or_tiny
from tinylllite.hint import check_hint
from tinylllite.sd.base import StableDiffusionBase, check_image_size

SAMPLERS = {"ddim": DDIMScheduler, "unipc": UniPCMultistepScheduler}
CAPTION_EXTENSION = ".txt"  # kohya's caption files, written beside synthesized images


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
            raise InputError(f"a hint array must be uint8 (H, W, 3) or (B, H, W, 3) RGB; got {hint.dtype} {hint.shape}")
        hint = torch.from_numpy(hint.reshape(-1, *hint.shape[-3:]).copy()).permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
        hint = hint.float() / 255
    check_hint(hint)
    if hint.shape[0] == 1:
        hint = hint.expand(batch, -1, -1, -1)
    if hint.shape[0] != batch:
        raise InputError(f"{hint.shape[0]} hints for {batch} prompts: give one hint or one per prompt")
    # contiguous, as diffusers' pipeline hands it on: a permuted or expanded view picks another convolution
    # kernel in the hint encoder, whose rounding differs in the last bit
    return hint.to(device=device, dtype=dtype).contiguous()


def in_window(step: int, steps: int, start: float, end: float) -> bool:
    """diffusers' control_guidance_start/end rule: step i of n runs with control iff start <= i/n and (i+1)/n <= end."""
    return not (step / steps < start or (step + 1) / steps > end)


def check_knobs(prompts: list, steps: int, cfg: float, strength: float, control_start: float, control_end: float,
                max_steps: int, control=None) -> None:
    """Refuse settings that would fail late or silently do nothing; each message names the setting and its flag."""
    if not prompts:
        raise InputError("no prompts: give at least one (--prompt TEXT)")
    if not 1 <= steps <= max_steps:
        raise InputError(f"steps={steps} (--steps): give between 1 and {max_steps} denoising steps "
                         f"(the base was trained on {max_steps} timesteps)")
    if not (math.isfinite(cfg) and cfg >= 0):
        raise InputError(f"cfg={cfg} (--cfg): the guidance scale must be 0 or more (1 turns guidance off; the "
                         "original uses 9)")
    if not (math.isfinite(strength) and strength >= 0):
        raise InputError(f"strength={strength} (--strength): the control strength must be 0 or more (0 = no control)")
    if not 0 <= control_start < control_end <= 1:
        raise InputError(f"control window [{control_start}, {control_end}] (--control-start, --control-end): "
                         "give 0 <= start < end <= 1, the fractions of the steps that run with control")
    if control is not None and not any(in_window(i, steps, control_start, control_end) for i in range(steps)):
        raise InputError(f"control window [{control_start}, {control_end}] holds none of the {steps} steps, so the "
                         "control would never run: widen it (--control-start, --control-end) or raise --steps")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample(base: StableDiffusionBase, prompts, control=None, hint=None, steps: int = 50, cfg: float = 9.0,
           sampler: str = "ddim", strength: float = 1.0, guess_mode: bool = False, control_start: float = 0.0,
           control_end: float = 1.0, lllite_multiplier: float = 1.0, seed: int = 0, height: int | None = None,
           width: int | None = None, negative_prompt: str = "", eta: float = 0.0,
           only_mid_control: bool = False, compile: bool | str = False) -> np.ndarray:
    """Generate one image per prompt; returns uint8 (B, H, W, 3). Image i uses seed + i, whatever B is.

    compile: run the UNet (+ branch) through torch.compile (True: its default backend, or a backend's name);
    the first call compiles, later calls of the same shapes reuse it.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    kind, unet = control_kind(control), base.unet
    if kind is not None and hint is None:
        raise InputError(f"sampling with a {kind} needs a hint image (hint=..., --hint IMAGE); "
                         "pass control=None for the base alone")
    if kind is None and hint is not None:
        raise InputError("a hint image was given without a control to read it: give the ControlNet or LLLite "
                         "(control=..., --control FILE) or drop the hint")
    check_knobs(prompts, steps, cfg, strength, control_start, control_end,
                base.noise_schedule_config["num_train_timesteps"], control)
    scales = guess_mode_scales(control) if guess_mode else None  # ControlNet only; SD: 12 encoder skips + 1 middle
    if hint is not None:
        hint = hint_tensor(hint, len(prompts), base.device, unet.dtype)
        height, width = hint.shape[-2:]
    factor = base.vae_scale_factor
    height = height or unet.config.sample_size * factor
    width = width or unet.config.sample_size * factor
    check_image_size(base, height, width, "the hint" if hint is not None else "the image size (--height, --width)")

    scheduler = make_sampler(base, sampler)
    scheduler.set_timesteps(steps, device=base.device)
    latent_shape = (unet.config.in_channels, height // factor, width // factor)
    noise = [torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(len(prompts))]
    latents = torch.stack(noise).to(base.device, unet.dtype) * scheduler.init_noise_sigma  # (B, 4, h, w)

    for text in dict.fromkeys([*prompts, negative_prompt]):
        dropped = base.truncated_words(text)
        if dropped:
            warnings.warn(f"the prompt {text!r} is longer than CLIP's {base.tokenizer.model_max_length} tokens; "
                          f"these words are cut off and have no effect: {dropped!r}", stacklevel=3)  # the caller of sample
    # Classifier-free guidance batches the negative prompt before the prompt: (2B, 77, D) = [uncond; cond]
    guided = cfg != 1.0
    hidden, pooled = base.encode_prompt([negative_prompt] * len(prompts) + prompts if guided else prompts)
    added = base.added_cond_kwargs(pooled, height, width)
    step_kwargs = {"eta": eta, "generator": torch.Generator().manual_seed(seed)} if sampler == "ddim" else {}
    prediction = compiled_prediction("inductor" if compile is True else compile) if compile else unet_prediction
    predict = partial(prediction, base, control, scales=scales, only_mid_control=only_mid_control,
                      lllite_multiplier=lllite_multiplier)

    with conditioned(control, hint) as step_hint:  # an LLLite embeds the hint once for all timesteps
        for i, t in enumerate(scheduler.timesteps):
            s = strength if in_window(i, len(scheduler.timesteps), control_start, control_end) else 0.0
            x = scheduler.scale_model_input(latents, t)  # (B, 4, h, w)
            if not guided:
                eps = predict(x, t.expand(len(prompts)), hidden, added, hint=step_hint, strength=s)
            elif guess_mode:
                # guess mode: the unconditional half sees no control at all (diffusers, original): one call,
                # the ControlNet on the conditional half, zero residuals for the unconditional one
                eps_u, eps = predict(torch.cat([x, x]), t.expand(2 * len(prompts)), hidden, added, hint=step_hint,
                                     strength=s, guess_mode=True).chunk(2)  # (2B, 4, h, w) -> 2 x (B, 4, h, w)
                eps = eps_u + cfg * (eps - eps_u)
            else:
                # one call for both halves; the unconditional half reads the same hint (the original's
                # log_images; an LLLite repeats its embedding to the doubled batch itself)
                doubled_hint = None if step_hint is None else torch.cat([step_hint, step_hint])  # (2B, 3, H, W)
                eps_u, eps = predict(torch.cat([x, x]), t.expand(2 * len(prompts)), hidden, added,
                                     hint=doubled_hint, strength=s).chunk(2)  # (2B, 4, h, w) -> 2 x (B, 4, h, w)
                eps = eps_u + cfg * (eps - eps_u)
            latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
    vae = base.vae
    return to_uint8(vae.decode(latents.to(vae.dtype) / base.latent_scale).sample)


@functools.cache
def compiled_prediction(backend: str):
    """`unet_prediction` through torch.compile, made once per backend so that every call shares its cache."""
    return torch.compile(unet_prediction, backend=backend)


def expand_wildcards(prompt: str) -> list[str]:
    """"a {red|blue} {cat|dog}" -> the 4 prompts of every combination, in reading order."""
    depth = 0
    for position, char in enumerate(prompt):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth not in (0, 1):
            raise InputError(f"prompt {prompt!r}: {'nested' if depth > 1 else 'unopened'} brace at character "
                             f"{position + 1}; wildcards are {{a|b|c}}, one level deep")
    if depth:
        raise InputError(f"prompt {prompt!r}: a {{ wildcard is never closed; write {{a|b|c}} with its closing }}")
    parts = re.split(r"\{([^{}]*)\}", prompt)  # text, options, text, options, ..., text
    choices = [[p] if i % 2 == 0 else p.split("|") for i, p in enumerate(parts)]
    return ["".join(combo) for combo in itertools.product(*choices)]


def save_png_with_prompt(image: np.ndarray, path: Path, prompt: str) -> None:
    """Atomic PNG write with the prompt in the "prompt" text chunk (read back: Image.open(p).text["prompt"])."""
    info = PngInfo()
    info.add_text("prompt", prompt)
    with atomic_file(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)


def check_dataset_folder(folder: Path, overwrite: bool) -> None:
    """A synthesized set goes into a new or empty folder, or with `overwrite` over an earlier set (images
    and captions only, so no other file of the user's is ever deleted)."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out {folder} is a file; --synthesize writes a folder of images: give a new folder")
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    if entries and not overwrite:
        raise InputError(f"--out {folder} already holds {len(entries)} entries; give a new or empty folder, or pass "
                         "--overwrite to replace the images and captions in it")
    foreign = [p.name for p in entries if not p.is_file() or p.suffix.lower() not in (*IMAGE_EXTENSIONS,
                                                                                        CAPTION_EXTENSION)]
    if foreign:
        raise InputError(f"--out {folder} holds more than images and captions ({', '.join(foreign[:5])}), so it "
                         "is not replaced even with --overwrite; give a new folder")


def synthesize_dataset(base: StableDiffusionBase, prompts: list[str], out_dir, n_per_prompt: int = 4,
                       batch_size: int = 8, seed: int = 0, overwrite: bool = False, **sample_kwargs) -> list[Path]:
    """Images from the base alone for every expanded prompt, n each: out_dir/{i}.png with the prompt in the PNG
    and in kohya's caption file out_dir/{i}.txt.

    The set is built in a temporary folder of this process's own beside out_dir
    (`tinylllite.files.atomic`) and takes out_dir's place only when complete, so a failure leaves an
    earlier set as it was, and a replaced set leaves no stale image or caption behind.
    """
    if n_per_prompt < 1 or batch_size < 1:
        raise InputError(f"n_per_prompt={n_per_prompt} (--n-per-prompt), batch_size={batch_size}: both must be 1 "
                         "or more")
    out_dir = Path(out_dir).absolute()
    check_dataset_folder(out_dir, overwrite)
    jobs = [p for prompt in prompts for p in expand_wildcards(prompt) for _ in range(n_per_prompt)]
    # replace=True: checked above, an existing out_dir holds nothing but an earlier set's images and captions
    with atomic_folder(out_dir, replace=True, durable=False) as partial_dir:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            images = sample(base, batch, seed=seed + start, **sample_kwargs)
            for offset, (image, prompt) in enumerate(zip(images, batch)):
                save_png_with_prompt(image, partial_dir / f"{start + offset}.png", prompt)
                (partial_dir / f"{start + offset}{CAPTION_EXTENSION}").write_text(prompt + "\n", encoding="utf-8")
    return [out_dir / f"{i}.png" for i in range(len(jobs))]


def output_paths(out: Path, count: int, overwrite: bool) -> list[Path]:
    """--out for `count` images (one: out itself; more: out_0.png, out_1.png, ...), refused before any work
    if a path is taken (unless --overwrite) or is not a .png."""
    if out.suffix.lower() != ".png":
        raise InputError(f"--out {out}: sampling writes PNG images; give a file name ending in .png "
                         "(or use --synthesize for a folder)")
    paths = [out] if count == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]
    for path in paths:
        if path.is_dir():
            raise InputError(f"--out {path} is a folder; give a file name ending in .png")
        if path.exists() and not overwrite:
            raise InputError(f"--out {path} already exists; give another name, or pass --overwrite to replace it")
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tinylllite.sample", description="Sample from a base "
                                     "(+ ControlNet or LLLite), or synthesize a dataset.")
    parser.add_argument("--base", default="tiny", help="'tiny' or an SD checkpoint file / diffusers folder")
    parser.add_argument("--control", help="a control .safetensors (ControlNet or LLLite) or a training checkpoint dir")
    parser.add_argument("--hint", help="conditioning image (RGB PNG/JPG) for --control")
    parser.add_argument("--prompt", action="append", required=True, help="repeatable; {a|b} wildcards expand")
    parser.add_argument("--out", required=True, help="output PNG (sampling) or folder (--synthesize)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (PNG, or an earlier "
                                                                 "synthesized set)")
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
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet and branch (pays on a GPU)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    args = parser.parse_args(argv)

    # everything the user gave is checked before the (slow) base is loaded
    if args.n_per_prompt < 1:
        raise InputError(f"--n-per-prompt {args.n_per_prompt}: give 1 or more images per prompt")
    if bool(args.control) != bool(args.hint):
        raise InputError("--control and --hint go together: a control reads the hint image, and a hint needs a "
                         "control (give both, or neither for the base alone)")
    knobs = dict(steps=args.steps, cfg=args.cfg, sampler=args.sampler, height=args.height, width=args.width)
    out = Path(args.out)
    if args.synthesize:
        if args.control:
            raise InputError("--synthesize makes images from the base alone; drop --control and --hint")
        check_dataset_folder(out, args.overwrite)
        refuse_unwritable(out, "--out folder", inside=True)
        base = load_base_or_tiny(args.base)
        paths = synthesize_dataset(base, args.prompt, out, args.n_per_prompt, seed=args.seed,
                                   overwrite=args.overwrite, **knobs)
        print(f"wrote {len(paths)} images and captions to {out}")
        return
    prompts = [p for prompt in args.prompt for p in expand_wildcards(prompt) for _ in range(args.n_per_prompt)]
    paths = output_paths(out, len(prompts), args.overwrite)
    refuse_unwritable(out, "--out image")
    hint = np.asarray(load_rgb(args.hint, "--hint")) if args.hint else None
    base = load_base_or_tiny(args.base)
    control = None
    if args.control:
        from tinylllite.files.checkpoint import load_control

        control = load_control(base, args.control)
    images = sample(base, prompts, control, hint, strength=args.strength, guess_mode=args.guess_mode,
                    control_start=args.control_start, control_end=args.control_end,
                    lllite_multiplier=args.lllite_multiplier, seed=args.seed, compile=args.compile, **knobs)
    for path, image, prompt in zip(paths, images, prompts):
        save_png_with_prompt(image, path, prompt)
        print(path)


if __name__ == "__main__":
    raise SystemExit(run_command("python -m tinylllite.sample", main))
