"""Speed of whole training runs from image files: `tutorial_train.py` vs a diffusers-style loop.

On a small Fill50K folder written for the run (`tinylllite.data.fill50k.write_fill50k`, at the base's
image size), both train a fresh ControlNet and encode every batch afresh (no cache):

- `tinylllite`: `tutorial_train.main([...], base=base)` with evaluation, image log and intermediate
  checkpoints off (`--tutorial-args` adds flags, e.g. `--cache`). Its rate is (N steps) / (time of a
  W+N-step run - time of a W-step run), so start-up, warm-up and the final checkpoint cancel out;
- `diffusers`: the loop of diffusers' `examples/controlnet/train_controlnet.py` written out here:
  images decoded by a plain DataLoader in the main process (`num_workers=0`, its default), VAE and CLIP
  run every step in the frozen dtype (the run's half precision on a GPU, fp32 on a CPU),
  `ControlNetModel.from_unet`, clipping at 1.0, torch's AdamW; timed over N steps after W.

Also reported: tinylllite's end-to-end rate as a fraction of its in-memory step rate (the step of
`train_step.py` on the same base), and the CPU data pipeline alone: Fill50K pairs decoded per second
by a torch DataLoader with 0 and with 2 workers.

    python bench/train_e2e.py --threads 1 --out bench/results/cpu_train_e2e.json
    python bench/train_e2e.py --device cuda --shape sd15 --precision bf16 --batch 4 --pairs 256
"""
import argparse
import contextlib
import copy
import shlex
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import common
import train_step
from common import training, tutorial_train


class DiffusersStyleDataset(Dataset):
    """train_controlnet.py's items: pixel_values in [-1, 1], conditioning_pixel_values in [0, 1], input_ids.

    Its torchvision transforms (resize, centre crop, to tensor, normalise) written with PIL and numpy;
    the Fill50K images already have the training size, so resizing is skipped as a no-op.
    """

    def __init__(self, pairs, tokenizer, size: int):
        self.pairs, self.tokenizer, self.size = pairs, tokenizer, size

    def __len__(self) -> int:
        return len(self.pairs)

    def _tensor(self, path) -> torch.Tensor:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        if rgb.size != (self.size, self.size):
            raise common.InputError(f"{path} is {rgb.size}, not {self.size} px: write the folder at the base's size")
        return torch.from_numpy(np.asarray(rgb, np.float32) / 255.0).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        ids = self.tokenizer(pair.caption, max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids[0]  # (77,)
        return dict(pixel_values=self._tensor(pair.image) * 2 - 1, conditioning_pixel_values=self._tensor(pair.hint),
                    input_ids=ids)


def diffusers_loop_rate(base, data: Path, args, device) -> float:
    """Optimizer steps per second of train_controlnet.py's loop, timed over --steps after --warmup."""
    weight_dtype = common.HALF[args.precision] if device.type == "cuda" and args.precision != "fp32" else torch.float32
    back_to_fp32(base)  # contiguous again after tutorial_train's channels-last run
    vae = common.move(copy.deepcopy(base.vae), device, weight_dtype).requires_grad_(False)
    text_encoder = common.move(copy.deepcopy(base.text_encoder), device, weight_dtype).requires_grad_(False)
    unet = common.move(base.unet.requires_grad_(False), device, weight_dtype)
    with device:  # fp32 (a fresh model, the UNet's weights copied in), initialised where it runs
        controlnet = ControlNetModel.from_unet(unet).train()
    params = list(controlnet.parameters())
    optimizer = torch.optim.AdamW(params, lr=train_step.LEARNING_RATE, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scaler = training.grad_scaler(device, args.precision)
    noise_scheduler = training.training_scheduler(base)
    dataset = DiffusersStyleDataset(common.Fill50KDataset(data).pairs, base.tokenizer, common.image_size(base))
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=0)

    def step(batch):
        latents = vae.encode(batch["pixel_values"].to(device, weight_dtype)).latent_dist.sample()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device).long()
        noisy = noise_scheduler.add_noise(latents.float(), noise.float(), t).to(dtype=weight_dtype)
        hidden = text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
        hint = batch["conditioning_pixel_values"].to(device, weight_dtype)
        with training.autocast(device, args.precision):  # accelerate wraps only the prepared ControlNet
            down, mid = controlnet(noisy, t, encoder_hidden_states=hidden, controlnet_cond=hint, return_dict=False)
        pred = unet(noisy, t, encoder_hidden_states=hidden,
                    down_block_additional_residuals=[r.float().to(dtype=weight_dtype) for r in down],
                    mid_block_additional_residual=mid.float().to(dtype=weight_dtype), return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, train_step.MAX_GRAD_NORM)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.detach().item()

    done, start = 0, None
    while done < args.warmup + args.steps:
        for batch in loader:
            if done == args.warmup:
                common.synchronize(device)
                start = time.perf_counter()
            step(batch)
            done += 1
            if done == args.warmup + args.steps:
                break
    common.synchronize(device)
    return args.steps / (time.perf_counter() - start)


def back_to_fp32(base) -> None:
    """Undo a previous run's half-precision cast and channels-last layout, so that every run starts from the same
    fp32, contiguous base."""
    for part in base.parts().values():
        common.move(part, part.device, torch.float32)
        part.to(memory_format=torch.contiguous_format)


def tutorial_seconds(base, data: Path, out: Path, steps: int, args) -> float:
    """Wall time of `tutorial_train.main` for `steps` optimizer steps (its console output goes to stderr)."""
    back_to_fp32(base)
    argv = ["--data", str(data), "--out", str(out), "--max-steps", str(steps), "--batch-size", str(args.batch),
            "--mixed-precision", args.precision, "--eval-every", "0", "--logger-freq", "0", "--max-minutes", "1e9",
            "--checkpoint-every", "1000000000", "--log-every", "1000000000", "--seed", str(args.seed),
            "--cache-dir", str(out.parent / "cache")]  # kept between rounds: filled by the untimed first run
    if args.threads:
        argv += ["--threads", str(args.threads)]
    argv += shlex.split(args.tutorial_args)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        result = tutorial_train.main(argv, base=base)
    seconds = time.perf_counter() - start
    if result["step"] != steps:
        raise RuntimeError(f"tutorial_train stopped at step {result['step']} instead of {steps}")
    return seconds


def tutorial_rate(base, data: Path, scratch: Path, args, round_number: int) -> float:
    """Steps per second of tutorial_train.py, after an untimed run that fills what persists between runs
    (CUDA kernels and autotuning, a --cache folder)."""
    warmup = max(args.warmup, 1)  # tutorial_train.py takes at least one step
    tutorial_seconds(base, data, scratch / f"run{round_number}_priming", warmup, args)
    short = tutorial_seconds(base, data, scratch / f"run{round_number}_short", warmup, args)
    full = tutorial_seconds(base, data, scratch / f"run{round_number}_full", warmup + args.steps, args)
    return args.steps / (full - short)


def in_memory_rate(base, args, device) -> float:
    """Optimizer steps per second of tinylllite's step on an in-memory batch (train_step.py's)."""
    back_to_fp32(base)
    batch = common.random_batch(base, args.batch, device, args.seed)
    control = common.ControlNet.from_unet(base.unet, vae_scale_factor=base.vae_scale_factor).to(device)
    options = Namespace(precision=args.precision, gradient_checkpointing=False, fused_adamw=False)
    impl = train_step.tinylllite_implementation("tinylllite", base, control, batch, options, device)
    if device.type == "cuda":  # as tutorial_train.py does once the branch is built and the base frozen
        training.cast_frozen_weights_to_half(base, args.precision)
    for _ in range(args.warmup):
        impl.step()
    seconds = [common.timed(impl.step, device) for _ in range(args.steps)]
    return 1 / float(np.median(seconds))


def loader_rate(data: Path, batch: int, workers: int, epochs: int) -> float:
    """Fill50K pairs decoded per second by a DataLoader, median over epochs after a first untimed one."""
    loader = DataLoader(common.Fill50KDataset(data), batch_size=batch, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0)
    rates = []
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        count = sum(len(b["txt"]) for b in loader)
        if epoch:
            rates.append(count / (time.perf_counter() - start))
    return float(np.median(rates))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser, steps=10, warmup=2, batch=4)
    parser.add_argument("--pairs", type=int, default=64, help="Fill50K pairs written for the run")
    parser.add_argument("--data", help="an existing Fill50K folder at the base's image size (default: write one)")
    parser.add_argument("--loader-workers", default="0,2", help="DataLoader workers to compare, comma list")
    parser.add_argument("--tutorial-args", default="", help="more tutorial_train.py flags, e.g. '--cache' (a lever)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.check_args(args)
    if (device.type == "cuda") != torch.cuda.is_available():
        raise common.InputError(f"--device {args.device}: tutorial_train.py trains on CUDA exactly when it is "
                                f"available; pass --device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    if args.pairs < args.batch:
        raise common.InputError(f"--pairs {args.pairs} is smaller than --batch {args.batch}")
    workers = [int(w) for w in args.loader_workers.split(",") if w]
    started = time.perf_counter()
    base = common.build_base(args.shape, device)
    size = common.image_size(base)
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as scratch:
        scratch = Path(scratch)
        data = Path(args.data) if args.data else common.write_fill50k(scratch / "fill50k", args.pairs, size=size,
                                                                     seed=args.seed)
        rates = {"tinylllite": [], "diffusers": []}
        for round_number in range(args.rounds):
            rates["tinylllite"].append(tutorial_rate(base, data, scratch, args, round_number))
            rates["diffusers"].append(diffusers_loop_rate(base, data, args, device))
        memory_rate = in_memory_rate(base, args, device)
        loader = {str(w): round(loader_rate(data, args.batch, w, args.rounds), 1) for w in workers}
    steps_per_second = {name: round(float(np.median(r)), 3) for name, r in rates.items()}
    ours, theirs = steps_per_second["tinylllite"], steps_per_second["diffusers"]
    result = dict(benchmark="train_e2e", **common.environment(device, args), image_size=size,
                  steps_per_second=steps_per_second,
                  steps_per_second_per_round={k: [round(x, 3) for x in v] for k, v in rates.items()},
                  tinylllite_in_memory_steps_per_second=round(memory_rate, 3),
                  tinylllite_e2e_fraction_of_in_memory=round(ours / memory_rate, 3),
                  ratios={"tinylllite/diffusers": round(ours / theirs, 3)},
                  loader_pairs_per_second_by_workers=loader)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return common.report(result, args.out)


if __name__ == "__main__":
    raise SystemExit(common.run_command("train_e2e.py", main))
