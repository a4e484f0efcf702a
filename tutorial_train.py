"""Train a ControlNet (or a ControlNet-LLLite) on Fill50K: the original `tutorial_train.py`, loop written out.

The original (lllyasviel/ControlNet `tutorial_train.py`) is a config block and a Lightning `Trainer`.
Here the block stays at the top and is exactly what `python tutorial_train.py` runs: the package's tiny
Stable Diffusion learning where the circle goes, on a CPU, in 10 minutes. The original's values for a
real SD base are the `sd15` preset, chosen (and printed) for any base other than the tiny one.

    python tutorial_train.py                       # tiny SD + fresh ControlNet on Fill50K, 10 minutes, CPU
    python tutorial_train.py --control lllite      # the same with ControlNet-LLLite
    python tutorial_train.py --base v1-5-pruned.safetensors --data ./training/fill50k   # the original run

Every setting below is also a flag (`--batch-size` or `--batch_size`). Added to the original: resume,
small checkpoints, mixed precision with a NaN guard, accumulation, Min-SNR, 8-bit Adam, caching,
multi-GPU (`torchrun --nproc_per_node N tutorial_train.py`) and a control-fidelity number. Left out:
EMA, LR schedules, DeepSpeed, xformers.
"""
import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from tinylllite import control_branch, nan_guard, training
from tinylllite.files import checkpoint, control_io
from tinylllite.run import batches, image_log, stopping
from tinylllite.errors import InputError, run_command
from tinylllite.data.fidelity import EVALUATION_SEED, evaluation_pairs

# ---- Configs: what `python tutorial_train.py` runs (the tiny SD on a CPU), one block per --control ------------
# Measured on the tiny SD (bench/convergence.py, 2 seeds each): with Min-SNR-5 weighting its ControlNet passes
# IoU 0.7 by step 400 (0.73-0.74), where plain MSE reached 0.28-0.42; lr 1e-3 at batch 16 (2e-4 idles for
# minutes; 2e-3, batch 8 and cubic timesteps were no faster). On the 2-core CPU a step with the cache, 2 threads
# and channels-last takes 0.20-0.29 s (the shared machine varies), 1.4x faster than one thread beside a worker.
# Evaluation CFG 3: at CFG 9 the tiny SD overshoots (IoU 0.776 at 9, 0.853 at 3).
CONTROLNET = dict(
    batch_size=16,
    learning_rate=1e-3,
    gradient_accumulation=1,
    max_steps=None,  # no step limit: the time limit ends the tiny run
    max_minutes=10.0,  # counted from the start of the process; the last evaluation ends inside it
    sd_locked=True,  # True: only the control branch learns; False: the UNet decoder too (then try lr 2e-6)
    only_mid_control=False,
    prompt_dropout=0.0,  # fraction of empty prompts (the paper: 0.5)
    timestep_sampling="uniform",  # uniform, as SD was trained, or cubic: more noisy timesteps
    snr_gamma=5.0,  # Min-SNR loss weighting (Hang et al. 2023): min(SNR, 5) / SNR; None or 0 = plain MSE
    max_grad_norm=None,  # the original does not clip
    mixed_precision="fp32",
    gradient_checkpointing=False,
    use_8bit_adam=False,
    cache=True,  # encode every image and prompt once, up front (~20 s for the 10,000 tiny pairs), into --cache-dir
    data_workers=0,  # with the cache a batch is a lookup: both cores go to the step (`threads`), no worker needed
    channels_last=True,  # convolutions in NHWC, the layout oneDNN's CPU kernels prefer
    logger_freq=500,  # image log every this many optimizer steps (and at step 0); 0 = off
    log_every=10,  # loss line in metrics.jsonl
    eval_metric="fill50k-iou",  # control fidelity on held-out pairs: fill50k-iou, edge-f1 (your Canny data) or none
    canny_low=100,  # edge-f1: the Canny thresholds that made the hints (python -m tinylllite.canny's defaults)
    canny_high=200,
    eval_every=500,  # each evaluation costs ~50 steps of training
    eval_pairs=64,
    eval_steps=20,
    eval_cfg=3.0,
    checkpoint_every=500,
    keep_checkpoints=3,
    seed=0,
    threads=2,
)
# LLLite wraps every block: the tiny UNet has one transformer per level (kohya's SD1 set, input only, would be
# 12 modules).
LLLITE = dict(CONTROLNET, cond_emb_dim=32, mlp_dim=64, lllite_blocks="input,middle,output")
BRANCHES = {"controlnet": CONTROLNET, "lllite": LLLITE}

# The original's values for a real SD base (batch 4, lr 1e-5, image log every 300 steps at CFG 9), and
# kohya's LLLite recipe (lr 2e-4, C 32, M 64, its SD1 block set).
SD15 = dict(batch_size=4, learning_rate=1e-5, max_minutes=None, logger_freq=300, eval_every=300, eval_steps=50,
            eval_cfg=9.0, threads=None, data_workers=4, cache=False, channels_last=False, snr_gamma=None)
PRESETS = {"sd15": {"controlnet": SD15, "lllite": dict(SD15, learning_rate=2e-4, lllite_blocks=None)}}


def strict_bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def count(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text}")
        return value
    return parse


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def off_or_positive(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, or 0 for off, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


# how each setting is read from the command line (0 = off where a count or snr_gamma allows it)
SETTING_TYPES = dict(
    batch_size=count(1), learning_rate=positive_float, gradient_accumulation=count(1), max_steps=count(1),
    max_minutes=positive_float, sd_locked=strict_bool, only_mid_control=strict_bool, prompt_dropout=fraction,
    timestep_sampling=str, snr_gamma=off_or_positive, max_grad_norm=positive_float, mixed_precision=str,
    gradient_checkpointing=strict_bool, use_8bit_adam=strict_bool, cache=strict_bool, data_workers=count(0),
    channels_last=strict_bool,
    logger_freq=count(0), log_every=count(1), eval_metric=str, canny_low=positive_float, canny_high=positive_float,
    eval_every=count(0), eval_pairs=count(1), eval_steps=count(1), eval_cfg=positive_float, checkpoint_every=count(1),
    keep_checkpoints=count(1), seed=count(0), threads=count(1), cond_emb_dim=count(1), mlp_dim=count(1),
    lllite_blocks=str)
CHOICES = dict(mixed_precision=("fp32", "bf16", "fp16"), eval_metric=("fill50k-iou", "edge-f1", "none"),
               timestep_sampling=batches.TIMESTEP_SAMPLING)
SWITCHES = ("gradient_checkpointing", "use_8bit_adam", "cache")  # `--cache` alone means true


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])

    def add(name, **kw):  # --batch-size and --batch_size both work
        p.add_argument(f"--{name.replace('_', '-')}", f"--{name}", dest=name, **kw)

    add("control", choices=tuple(BRANCHES), default="controlnet", help="which branch to train")
    add("preset", choices=tuple(PRESETS), help="settings for a real SD base (default for any base but the tiny SD)")
    add("base", default="tiny", help="'tiny' (the package's tiny SD) or an SD checkpoint file / diffusers folder")
    add("data", help="training data: a Fill50K-layout folder, JSON Lines file or kohya .toml "
                     "(default ./training/fill50k; tiny SD: ./training/fill50k_<size>, made if missing)")
    add("out", help="run folder to create (default ./runs/<control>-<time>)")
    add("resume_from", help="a run folder or checkpoint folder to continue")
    add("resume_path", help="initial control weights: any ControlNet or LLLite file or diffusers folder")
    add("max_train_samples", type=count(1), help="train on the first N pairs only")
    add("cache_dir", default="./cache", help="where --cache keeps encoded latents and prompts (default ./cache)")
    add("eval_seed", type=count(0), default=EVALUATION_SEED,
        help="seed of the held-out evaluation pairs (tuning uses another seed: bench/convergence.py)")
    add("validation_prompt", action="append", default=[], help="with --validation-image; repeatable")
    add("validation_image", action="append", default=[], help="hint image for the --validation-prompt at its place")
    for name, parse in SETTING_TYPES.items():
        extra = dict(nargs="?", const=True) if name in SWITCHES else {}
        add(name, type=parse, choices=CHOICES.get(name), help=f"default {LLLITE[name]!r} (tiny SD)", **extra)
    args = p.parse_args(argv)
    if len(args.validation_prompt) != len(args.validation_image):
        p.error(f"{len(args.validation_prompt)} --validation-prompt for {len(args.validation_image)} "
                f"--validation-image: give them in pairs")
    return args


def resolve_settings(args, tiny: bool) -> tuple[dict, str | None]:
    """The branch's block, then a preset (sd15 for any real base unless named), then the flags given."""
    preset = args.preset or (None if tiny else "sd15")
    settings = dict(BRANCHES[args.control], **(PRESETS[preset][args.control] if preset else {}))
    settings.update({k: getattr(args, k) for k in settings if getattr(args, k, None) is not None})
    if args.control == "lllite" and (not settings["sd_locked"] or settings["only_mid_control"]):
        raise InputError("--sd-locked false / --only-mid-control are ControlNet options; LLLite has no such switch")
    return settings, preset


def open_data(args, settings: dict, base, tiny: bool, rank: int):
    """The training pairs, checked up front (image headers, captions) by the same checks as dataset_check.

    Only the tiny SD's own default folder is ever created; a given --data must exist. The data says what
    it is: Fill50K's IoU is computed only when every caption is a Fill50K prompt."""
    from tinylllite.data.dataset_check import open_checked
    from tinylllite.sample import check_image_size

    size = base.unet.config.sample_size * base.vae_scale_factor
    data = Path(args.data or (f"./training/fill50k_{size}" if tiny else "./training/fill50k"))
    if args.data is None and tiny and not (data / "prompt.json").exists() and rank == 0:
        from tinylllite.data.fill50k import write_fill50k

        print(f"{data} is missing: writing 10,000 Fill50K pairs at {size} px (seed 0)")
        write_fill50k(data, n=10_000, size=size, seed=0)
    if dist.is_initialized():
        dist.barrier()
    checked = open_checked(data, multiple=base.vae_scale_factor)
    check_image_size(base, *checked.dataset[0]["hint"].shape[:2], f"--data {data}: its images")
    if settings["eval_metric"] == "fill50k-iou" and settings["eval_every"] and not checked.is_fill50k:
        raise InputError(f"--data {data} is not Fill50K (not every caption reads '<colour> circle with <colour> "
                         f"background'), so its IoU cannot be measured: use --eval-metric edge-f1 for Canny hints, "
                         f"or --eval-metric none")
    return checked.dataset, data


def validation_pairs(args, base) -> list[tuple[str, np.ndarray]]:
    """--validation-prompt/--validation-image pairs, each image read and size-checked now, not at the first log."""
    from tinylllite.sample import check_image_size, read_hint_image

    pairs = []
    for prompt, path in zip(args.validation_prompt, args.validation_image):
        hint = read_hint_image(path, "--validation-image")
        check_image_size(base, *hint.shape[:2], f"--validation-image {path}")
        pairs.append((prompt, hint))
    return pairs


def heldout_pairs(settings: dict, base, dataset, eval_seed: int) -> tuple[list, int]:
    """The evaluation's pairs, and how many dataset items training may use.

    fill50k-iou: fresh Fill50K pairs of a seed no training set uses. edge-f1: the last min(eval_pairs, 5 %) of
    the user's pairs, kept out of training."""
    if settings["eval_metric"] == "none" or settings["eval_every"] == 0:
        return [], len(dataset)
    if settings["eval_metric"] == "fill50k-iou":
        size = base.unet.config.sample_size * base.vae_scale_factor
        return evaluation_pairs(settings["eval_pairs"], size, seed=eval_seed), len(dataset)
    held = min(settings["eval_pairs"], -(-len(dataset) // 20))
    if len(dataset) - held < 1:
        raise InputError(f"--eval-metric edge-f1 keeps {held} of {len(dataset)} pairs for evaluation and none are left "
                         f"to train on: add pairs or use --eval-metric none")
    return [dataset[i] for i in range(len(dataset) - held, len(dataset))], len(dataset) - held


def build_control(args, settings: dict, base):
    if args.control == "controlnet":
        from tinylllite.controlnet import ControlNet

        return ControlNet.from_unet(base.unet, vae_scale_factor=base.vae_scale_factor)
    from tinylllite.lllite_unet import attach_lllite

    blocks = set(settings["lllite_blocks"].split(",")) if settings["lllite_blocks"] else None
    return attach_lllite(base.unet, settings["cond_emb_dim"], settings["mlp_dim"], blocks,
                         vae_scale_factor=base.vae_scale_factor)


def open_cache(cache_dir, base, dataset, n: int, rank: int) -> batches.LatentCache:
    """--cache: every item's VAE latent moments and every prompt's embedding, filled up front (rank 0), on disk."""
    cache = batches.LatentCache(cache_dir, batches.fingerprint(dataset, n, base))
    if not cache.load():
        if rank == 0:
            print(f"filling the latent and text cache for {n} pairs in {cache.path}")
            cache.fill(base, dataset, n, batch_size=64)
        if dist.is_initialized():
            dist.barrier()
        cache.load()
    return cache


def run_folder(args, started: float) -> Path:
    """--out, the folder of --resume-from, or a fresh ./runs/<control>-<time>; never an existing run by accident."""
    if args.resume_from:
        return Path(args.out) if args.out else checkpoint.resolve_checkpoint(args.resume_from).parent.parent
    out = Path(args.out or f"./runs/{args.control}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out} already holds files; choose a new folder, or continue that run with "
                         f"--resume-from {out}")
    return out


def resume(path, base, control, optimizer, scaler, effective_batch: int) -> int:
    """Put a checkpoint's weights, optimizer, loss scale and RNG back; returns its step."""
    weights, state = checkpoint.load_checkpoint(path)
    if state["effective_batch"] != effective_batch:
        raise InputError(f"{path} was trained with effective batch {state['effective_batch']}: resume with the same "
                         f"batch size, accumulation and number of processes")
    checkpoint.load_trainable(base, control, weights)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"]


def main(argv=None, base=None):
    args = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if base is None:
        from tinylllite.sample import load_base_or_tiny

        base = load_base_or_tiny(args.base)
    settings, preset = resolve_settings(args, tiny=base.family == "tiny")
    s = argparse.Namespace(**settings)
    stop = stopping.StopRule(s.max_steps, s.max_minutes)
    out = run_folder(args, stop.started)
    if s.threads:
        torch.set_num_threads(s.threads)
    base.to(device)
    dataset, data_dir = open_data(args, settings, base, base.family == "tiny", rank)
    torch.manual_seed(s.seed)  # the fresh branch's initial weights
    control = build_control(args, settings, base).to(device)
    if s.channels_last:
        training.use_channels_last(base, control)
    if args.resume_path:
        control_io.load_control_weights(args.resume_path, base, control)  # any layout; kind and family checked
    named = training.prepare_trainable(base, control, s.sd_locked)
    params = [p for _, p in named]
    averager = None
    if world > 1:  # every rank starts from rank 0's weights, and averages gradients during backward
        for p in params:
            dist.broadcast(p.data, src=0)
        averager = training.GradientAverager(params, world)
    if s.gradient_checkpointing:
        control_branch.enable_gradient_checkpointing(base.unet, control)
    if device.type == "cuda":
        training.cast_frozen_weights_to_half(base, s.mixed_precision)
    optimizer = training.make_optimizer(params, s.learning_rate, use_8bit=s.use_8bit_adam)
    scaler = training.grad_scaler(device, s.mixed_precision)
    scheduler = training.training_scheduler(base)
    heldout, trainable_items = heldout_pairs(settings, base, dataset, args.eval_seed)
    n_items = min(args.max_train_samples or trainable_items, trainable_items)
    encode = batches.BatchEncoder(base, open_cache(args.cache_dir, base, dataset, n_items, rank) if s.cache else None)
    stream = batches.SampleStream(dataset, s.seed, n_items, base.vae.config.latent_channels, base.vae_scale_factor,
                                  scheduler.config.num_train_timesteps, s.prompt_dropout, s.timestep_sampling)
    effective = s.batch_size * s.gradient_accumulation * world
    step = resume(args.resume_from, base, control, optimizer, scaler, effective) if args.resume_from else 0
    train_batches = batches.training_batches(stream, encode, device, step, s.batch_size, s.gradient_accumulation,
                                             world, rank, s.data_workers)
    validation = validation_pairs(args, base)
    log = image_log.RunLog(out, settings, base, control, dataset, validation, stop, heldout,
                           resumed_at=step if args.resume_from else None) if rank == 0 else None
    if rank == 0:
        print(f"{preset or 'tiny-SD'} settings ({args.control}): base {args.base} ({base.family}), "
              f"lr {s.learning_rate}, {sum(p.numel() for p in params):,} trainable parameters, effective batch "
              f"{effective} = {s.batch_size} per process x {s.gradient_accumulation} accumulation x {world} processes; "
              f"data {data_dir} ({n_items} pairs); out {out}")
        log.write_config(dict(control=args.control, preset=preset, base=args.base, data=str(data_dir),
                              eval_seed=args.eval_seed, resume_from=args.resume_from, resume_path=args.resume_path))
        if step == 0:
            log.after_step(0)

    autocast = training.autocast(device, s.mixed_precision)
    progress = tqdm(total=s.max_steps, initial=step, disable=rank != 0, unit="step")
    last_loss = None
    with stop:
        while not stop.should_stop(step, log.final_seconds if log else 0.0, device):
            # one optimizer step over the effective batch: micro-batches of this process, then all processes
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device)
            for micro in range(s.gradient_accumulation):
                if averager:
                    averager.last_micro_batch = micro == s.gradient_accumulation - 1
                batch = next(train_batches)  # this process's slice of the run's samples, prepared ahead
                with autocast:
                    loss = training.diffusion_loss(base, control, scheduler, batch, s.snr_gamma, s.only_mid_control)
                nan_guard.check_loss(loss, step)
                loss = loss / s.gradient_accumulation  # the optimizer step sees the mean over the effective batch
                (scaler.scale(loss) if scaler else loss).backward()
                step_loss += loss.detach()
            if averager:
                averager.finish(step_loss)
            training.optimizer_step(optimizer, scaler, named, s.max_grad_norm, step)
            step, last_loss = step + 1, step_loss.item()

            progress.update()
            progress.set_postfix(loss=f"{last_loss:.4f}", minutes=f"{stop.minutes():.1f}")
            if rank == 0:
                log.loss(step, last_loss, optimizer.param_groups[0]["lr"])
                log.after_step(step)
            if step % s.checkpoint_every == 0:
                save(base, control, optimizer, scaler, out, step, effective, s.keep_checkpoints, rank)
    progress.close()
    save(base, control, optimizer, scaler, out, step, effective, s.keep_checkpoints, rank)
    if rank == 0:
        log.finish(step, last_loss)
    if world > 1:
        dist.destroy_process_group()
    return dict(control=control, step=step, out=out)


def save(base, control, optimizer, scaler, out: Path, step: int, effective: int, keep: int, rank: int) -> None:
    """A checkpoint of the trained weights and everything a resume needs (rank 0 writes it)."""
    if rank == 0:
        state = dict(step=step, samples_seen=step * effective, effective_batch=effective,
                     torch_rng=torch.get_rng_state(), optimizer=optimizer.state_dict(),
                     scaler=scaler.state_dict() if scaler else None)
        checkpoint.save_checkpoint(out, step, checkpoint.trainable_weights(base, control), state, keep,
                                   metadata=control_io.branch_metadata(base, control))


if __name__ == "__main__":
    raise SystemExit(run_command("tutorial_train.py", main))
