"""What the three speed benchmarks share: flags, building the base, timing, memory, the JSON report.

The benchmarks compare tinylllite with the path diffusers' own examples take
(`examples/controlnet/train_controlnet.py`, `StableDiffusionControlNetPipeline`) on the same weights:

- `--shape tiny`: the committed tiny SD (64 px), so a CPU answers in seconds;
- `--shape sd15`: SD1.5's UNet, VAE and CLIP ViT-L built from `tinylllite/sd/configs/sd1.json` with random
  weights (512 px); speed does not depend on the weights' values, and nothing is downloaded;
- `--shape sdxl`: SDXL's UNet, VAE and both text encoders from `sdxl.json`, random weights (1024 px).

Every tinylllite name the benchmarks use is imported here, so a renamed API is fixed in one place.
Left out: multi-GPU.
"""
import argparse
import copy
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import diffusers
import torch
import transformers

# The benchmarks run as `python bench/<name>.py` from anywhere: put the repository (tutorial_train.py) on the path.
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import tutorial_train  # noqa: E402,F401  (re-exported, like the names below, for the benchmarks)
from tinylllite import control_branch, hint, training  # noqa: E402,F401
from tinylllite.sd.base import StableDiffusionBase  # noqa: E402
from tinylllite.controlnet import ControlNet  # noqa: E402,F401
from tinylllite.data.datasets import Fill50KDataset  # noqa: E402,F401
from tinylllite.errors import InputError, run_command  # noqa: E402,F401
from tinylllite.data.fill50k import write_fill50k  # noqa: E402,F401
from tinylllite.lllite_unet import attach_lllite  # noqa: E402
from tinylllite.sample import make_sampler, sample  # noqa: E402,F401
from tinylllite.files.atomic import atomic_file  # noqa: E402
from tinylllite.run.memory import config_base  # noqa: E402
from tinylllite.sd.tiny_sd import load_tiny_sd  # noqa: E402

SHAPES = ("tiny", "sd15", "sdxl")
FAMILIES = {"sd15": "sd1", "sdxl": "sdxl"}  # the shipped config each random-weight shape is built from
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
# tutorial_train.py's tiny-SD setting: LLLite on every block (the tiny UNet's one transformer per level).
LLLITE_BLOCKS = {"tiny": {"input", "middle", "output"}, "sd15": None, "sdxl": None}  # None: kohya's default set
PROMPT = "cyan circle with brown background"


def add_common_args(parser: argparse.ArgumentParser, steps: int, warmup: int, batch: int) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shape", choices=SHAPES, default="tiny",
                        help="tiny: the committed tiny SD (64 px); sd15 / sdxl: SD1.5 (512 px) or SDXL (1024 px) "
                             "shapes, random weights")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per implementation and round")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed steps before each timed run")
    parser.add_argument("--rounds", type=int, default=2, help="the implementations alternate this many times")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON report to this file")
    parser.add_argument("--cap-gib", type=float, help="CUDA: behave like a card of this many GiB (torch's per-process "
                                                      "memory fraction, less the CUDA context the card also holds)")


def check_args(args) -> torch.device:
    """Refuse settings that cannot run, in one line naming the flag; returns the device."""
    for flag in ("batch", "steps", "rounds"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise InputError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is visible to torch; use --device cpu")
    if args.precision == "fp16" and args.device == "cpu":
        raise InputError("--precision fp16 is for --device cuda; on a CPU use fp32 or bf16")
    if args.cap_gib and args.device != "cuda":
        raise InputError("--cap-gib caps a CUDA card's memory; it needs --device cuda")
    if args.cap_gib:
        from tinylllite.run.memory import CUDA_CONTEXT_BYTES, GIB

        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction((args.cap_gib * GIB - CUDA_CONTEXT_BYTES) / total)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return torch.device(args.device)


def random_base(family: str, device: torch.device) -> StableDiffusionBase:
    """SD1.5's (or SDXL's) networks from the shipped config, randomly initialised on `device`, fp32: initialised
    where the model will run, seconds on a GPU instead of a minute on the CPU."""
    return config_base(family, device)


def build_base(shape: str, device: torch.device) -> StableDiffusionBase:
    base = load_tiny_sd() if shape == "tiny" else random_base(FAMILIES[shape], device)
    return base.to(device)


def image_size(base: StableDiffusionBase) -> int:
    return base.unet.config.sample_size * base.vae_scale_factor


def lllite_copy(base: StableDiffusionBase, shape: str):
    """(a base whose UNet is a copy with LLLite attached, the LLLite): the original UNet stays plain."""
    unet = copy.deepcopy(base.unet)
    lllite = attach_lllite(unet, blocks=LLLITE_BLOCKS[shape], vae_scale_factor=base.vae_scale_factor)
    return dataclasses.replace(base, unet=unet), lllite


def move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """module.to(device, dtype), casting only when needed (diffusers warns about every dtype cast)."""
    module.to(device)
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype)
    return module


def random_batch(base: StableDiffusionBase, batch: int, device: torch.device, seed: int) -> dict:
    """An in-memory training batch on the device: latents, noise, timesteps, text embeddings, hint."""
    g = torch.Generator().manual_seed(seed)
    side, f = base.unet.config.sample_size, base.vae_scale_factor
    latents = torch.randn(batch, 4, side, side, generator=g)  # (B, 4, h, w)
    hint = (torch.rand(batch, 3, side * f, side * f, generator=g) > 0.9).float()  # (B, 3, H, W), outline-like
    hidden, pooled = base.encode_prompt([PROMPT] * batch)  # (B, 77, D), SDXL's pooled text (B, 1280) or None
    added = base.added_cond_kwargs(None if pooled is None else pooled.float(), side * f, side * f)  # SDXL only
    return dict(latents=latents.to(device), noise=torch.randn(latents.shape, generator=g).to(device),
                timesteps=torch.randint(0, 1000, (batch,), generator=g).to(device), hidden=hidden.float(),
                added_cond_kwargs=added, hint=hint.to(device))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds of one call of fn, the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """GPU: torch's peak allocation since the last reset. CPU: the process's peak RSS (never reset)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1)  # Linux reports KiB


def summary(seconds: list[float]) -> dict:
    """Median (the reported number), fastest and slowest of a list of step times, in milliseconds."""
    return dict(median_ms=round(1000 * statistics.median(seconds), 3), min_ms=round(1000 * min(seconds), 3),
                max_ms=round(1000 * max(seconds), 3), n=len(seconds))


def count_parameters(params) -> int:
    return sum(p.numel() for p in params)


def environment(device: torch.device, args) -> dict:
    """Where and with what the numbers were measured."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores visible"
    return dict(device=name, device_type=device.type, torch=torch.__version__, diffusers=diffusers.__version__,
                transformers=transformers.__version__, python=platform.python_version(),
                torch_threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d %H:%M"),
                settings={k: v for k, v in vars(args).items() if k != "out"})


def report(result: dict, out: str | None) -> dict:
    """Print the report as one JSON object; with --out also write it (atomically)."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        with atomic_file(out) as tmp:
            tmp.write_text(text + "\n")
    return result
