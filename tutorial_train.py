"""Train a ControlNet (or a ControlNet-LLLite) on Fill50K: the original `tutorial_train.py`, loop written out.

The original (lllyasviel/ControlNet `tutorial_train.py`) is a config block and a Lightning `Trainer`.
Here the block stays at the top and is exactly what `python tutorial_train.py` runs: the package's tiny
Stable Diffusion learning where the circle goes, on a CPU, in 10 minutes. The original's values for a
real SD base are the `sd15` preset, chosen (and printed) for any base other than the tiny one.

    python tutorial_train.py                       # tiny SD + fresh ControlNet on Fill50K, 10 minutes, CPU
    python tutorial_train.py --control lllite      # the same with ControlNet-LLLite
    python tutorial_train.py --base v1-5-pruned.safetensors --data ./training/fill50k   # the original run

Every setting below is also a flag (`--batch-size` or `--batch_size`; how they are read: `tinylllite/run/
options.py`). Added to the original: resume, small checkpoints, mixed precision with a NaN guard that never
waits for the GPU, accumulation, Min-SNR and x0 loss weighting, a learning rate that decays over the end of
the budget, an EMA of the weights, 8-bit Adam, caching, `--compile`, a memory check on CUDA, several GPUs
with torch's DistributedDataParallel (`torchrun --nproc_per_node N tutorial_train.py`) and a
control-fidelity number. Left out: DeepSpeed, xformers.
"""
import argparse
import contextlib
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from tinylllite import control_branch, hint, training
from tinylllite.data.datasets import load_rgb
from tinylllite.data.fidelity import evaluation_pairs
from tinylllite.errors import InputError, run_command
from tinylllite.files import checkpoint, control_io
from tinylllite.files.atomic import refuse_unwritable
from tinylllite.files.identify import identify
from tinylllite.files.run_lock import RunLock
from tinylllite.files.sd_loading import load_base_or_tiny
from tinylllite.run import batches, cores, ema, image_log, options, stopping
from tinylllite.sd.base import check_image_size

# ---- Configs: what `python tutorial_train.py` runs (the tiny SD on a CPU), one block per --control ------------
# Why these values (the measurements are in bench/README.md, from bench/convergence.py): Min-SNR-5 weighting
# makes the tiny SD's ControlNet take off in half the steps of plain MSE, and raising its weight of the noisy
# timesteps to x0's (min-snr-x0) brings LLLite at step 1500 from IoU 0.77 to 0.86; lr 1e-3 at batch 16 was
# the fastest pair tried; the cache, channels-last and a thread on every free core make the CPU step faster
# without changing it; the evaluation samples at CFG 3 because the tiny SD overshoots at the original's 9.
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
    snr_gamma=5.0,  # the clip of the loss weighting below; None or 0 = plain MSE
    loss_weighting="min-snr-x0",  # min-snr: min(SNR, 5) / SNR (Hang et al. 2023); x0: min(1 / SNR, 5), the clean
    # latent's error; min-snr-x0: the larger of the two (x0's at the noisy timesteps, Min-SNR's at the clean ones)
    ema_decay=0.0,  # evaluate and export an exponential moving average of the weights (e.g. 0.999); 0 = off
    lr_decay=0.0,  # the last fraction of the budget (minutes or steps) over which lr falls to 0 (cosine); 0 = constant
    max_grad_norm=None,  # the original does not clip
    mixed_precision="fp32",
    gradient_checkpointing=False,
    use_8bit_adam=False,
    cache=True,  # encode every image and prompt once, up front, into --cache-dir
    data_workers=0,  # with the cache a batch is a lookup: both cores go to the step (`threads`), no worker needed
    channels_last=True,  # convolutions in NHWC, the layout oneDNN's CPU kernels prefer
    compile=False,  # torch.compile the loss (UNet + branch): pays on a GPU; on the CPU compiling costs minutes
    logger_freq=600,  # image log every this many optimizer steps (and at step 0); 0 = off
    log_every=10,  # loss line in metrics.jsonl
    eval_metric="fill50k-iou",  # control fidelity on held-out pairs: fill50k-iou, edge-f1 (your Canny data) or none
    canny_low=100,  # edge-f1: the Canny thresholds that made the hints (python -m tinylllite.canny's defaults)
    canny_high=200,
    eval_every=600,  # an evaluation costs about as much as 50 steps of training; the first lands near 2 minutes
    eval_pairs=64,
    eval_steps=20,
    eval_cfg=3.0,
    checkpoint_every=600,
    keep_checkpoints=3,
    seed=0,
    threads=None,  # None: one per core that other processes leave free, re-checked at every log line (run/cores.py)
)
# LLLite wraps every block: the tiny UNet has one transformer per level (kohya's SD1 set, input only, would be
# 12 modules).
LLLITE = dict(CONTROLNET, cond_emb_dim=32, mlp_dim=64, lllite_blocks="input,middle,output")
BRANCHES = {"controlnet": CONTROLNET, "lllite": LLLITE}

# The original's values for a real SD base (batch 4, lr 1e-5, image log every 300 steps at CFG 9), and
# kohya's LLLite recipe (lr 2e-4, C 32, M 64, its SD1 block set).
SD15 = dict(batch_size=4, learning_rate=1e-5, max_minutes=None, logger_freq=300, eval_every=300, eval_steps=50,
            eval_cfg=9.0, data_workers=4, cache=False, channels_last=False, snr_gamma=None)
PRESETS = {"sd15": {"controlnet": SD15, "lllite": dict(SD15, learning_rate=2e-4, lllite_blocks=None)}}


def parse_args(argv=None):
    return options.parse_args(argv, BRANCHES, PRESETS, __doc__.split("\n")[0])


def resolve_settings(args, tiny: bool, recorded: dict | None = None) -> tuple[dict, str | None]:
    """The branch's block, a preset, then the flags given; a resumed run starts from its own recorded settings."""
    return options.resolve_settings(args, BRANCHES, PRESETS, tiny, recorded)


def open_data(args, settings: dict, base, tiny: bool, rank: int):
    """The training pairs, checked up front (image headers, captions) by the same checks as dataset_check.

    Only the tiny SD's own default folder is ever created; a given --data must exist. The data says what
    it is: Fill50K's IoU is computed only when every caption is a Fill50K prompt."""
    from tinylllite.data.dataset_check import open_checked

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
    pairs = []
    for prompt, path in zip(args.validation_prompt, args.validation_image):
        image = np.asarray(load_rgb(path, "--validation-image"))
        check_image_size(base, *image.shape[:2], f"--validation-image {path}")
        pairs.append((prompt, image))
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


def open_cache(cache_dir, base, dataset, n: int, rank: int, stop) -> batches.LatentCache | None:
    """--cache: every item's VAE latent moments and every prompt's embedding, filled up front (rank 0), on disk.

    The fill counts against --max-minutes: one that cannot finish in time is abandoned (None), and the run
    ends with its step-0 checkpoint instead of running past its limit."""
    cache = batches.LatentCache(cache_dir, batches.fingerprint(dataset, n, base))
    complete = cache.load()
    if not complete:
        if rank == 0:
            print(f"filling the latent and text cache for {n} pairs in {cache.path}")
            complete = cache.fill(base, dataset, n, batch_size=64, deadline=stop.deadline)
            if not complete:
                print(f"the cache could not be filled within --max-minutes {stop.max_minutes:g}; stopping now "
                      f"(a longer --max-minutes, or --cache false, trains instead)")
        if dist.is_initialized():
            done = torch.tensor(float(complete))
            dist.broadcast(done, src=0)
            complete = bool(done)
        if complete:
            cache.load()
    return cache if complete else None


def run_folder(args, started: float) -> Path:
    """--out, the folder of --resume-from, or a fresh ./runs/<control>-<time>."""
    if args.resume_from:
        return Path(args.out) if args.out else checkpoint.resolve_checkpoint(args.resume_from).parent.parent
    return Path(args.out or f"./runs/{args.control}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}")


def refuse_other_runs(out: Path, resuming: bool) -> None:
    """A fresh run never writes into a folder that holds another run's files (checked under the run's lock)."""
    held = [p.name for p in out.iterdir() if p.name != RunLock.LOCK_NAME] if out.is_dir() else []
    if held and not resuming:
        raise InputError(f"--out {out} already holds files; choose a new folder, or continue that run with "
                         f"--resume-from {out}")


def fit_memory(args, settings: dict, base, resolution: int, free_bytes: int, rank: int = 0) -> dict:
    """The run's estimated peak GPU memory (tinylllite/run/memory.py, docs/memory.md) beside the card's free memory.

    A run that would not fit is refused before its data is cached or a step is taken, naming the switches that
    would fit; `--fit-memory` turns on the first such set instead (said aloud), `--fit-memory warn` runs anyway.
    Returns the settings the run trains with."""
    from tinylllite.run import memory

    estimate, problem = memory.training_fit(args, free_bytes, settings, family=base.family, resolution=resolution)
    if rank == 0:
        print(f"GPU memory: about {estimate.peak / memory.GIB:.1f} GiB estimated peak for "
              f"{estimate.config.describe()}; {free_bytes / memory.GIB:.1f} GiB free")
    if problem is None:
        return settings
    if args.fit_memory == "warn":
        print(f"warning: {problem} (--fit-memory warn: running anyway)")
        return settings
    switches = memory.fitting_switches(estimate.config, free_bytes) if args.fit_memory == "pick" else None
    if not switches:
        advice = ("" if args.fit_memory == "pick" else
                  "; --fit-memory turns on the first switches that fit, --fit-memory warn runs anyway")
        raise InputError(f"{problem}{advice}")
    if rank == 0:
        print(f"--fit-memory: turning on {' '.join(memory.FLAGS[name] for name in switches)} to fit")
    return dict(settings, **{name: True for name in switches})


def share_cores(threads: "cores.ThreadBudget | None") -> None:
    """Follow the cores other processes use (a thread count that no longer fits is changed, and said)."""
    change = threads.update() if threads is not None else None
    if change:
        tqdm.write(change)


def mean_loss(window: torch.Tensor, steps: int, world: int) -> float:
    """The mean step loss since the last log line, over every process: the one device read of a log step."""
    if world > 1:
        dist.all_reduce(window)
        window /= world
    return window.item() / steps


def main(argv=None, base=None):
    args = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    recorded = checkpoint.recorded_run(args.resume_from) if args.resume_from else None
    if args.resume_path:
        identify(args.resume_path)  # a missing or unreadable file is refused now, not after the base and data
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    tiny = base.family == "tiny" if base is not None else args.base in (None, "tiny")  # picks a fresh run's preset
    settings, preset = resolve_settings(args, tiny, recorded)
    s = argparse.Namespace(**settings)
    stop = stopping.StopRule(s.max_steps, s.max_minutes)
    out = run_folder(args, stop.started)
    # the folders are checked before anything slow: a run that cannot write ends in one line, at once.
    # One writer per run folder: rank 0 holds the lock until it ends.
    if rank == 0:
        refuse_other_runs(out, bool(args.resume_from))  # before the lock, which would add its file to the folder
    with RunLock(out) if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            refuse_other_runs(out, bool(args.resume_from))
        return train(args, settings, preset, out, stop, base, world, rank, device)


def train(args, settings: dict, preset: str | None, out: Path, stop, base, world: int, rank: int, device) -> dict:
    """The run itself: data, branch, optimizer, then the loop (under the run folder's lock)."""
    s = argparse.Namespace(**settings)
    if s.cache:
        refuse_unwritable(args.cache_dir, "--cache-dir", inside=True)  # made when the cache is filled
    if base is None:
        base = load_base_or_tiny(args.base)
    # CPU threads: --threads, or one per core that other processes leave free, looked at again at every log line
    threads = cores.ThreadBudget(s.threads) if device.type == "cpu" else None
    dataset, data_dir = open_data(args, settings, base, base.family == "tiny", rank)
    if device.type == "cuda":  # before anything is on the card: will the run fit in its free memory?
        free_bytes, _ = torch.cuda.mem_get_info(device)
        settings = fit_memory(args, settings, base, max(dataset[0]["hint"].shape[:2]), free_bytes, rank)
        s = argparse.Namespace(**settings)
    torch.manual_seed(s.seed)  # the fresh branch's initial weights
    control = control_branch.build(args.control, base, settings.get("cond_emb_dim", 0), settings.get("mlp_dim", 0),
                                   settings.get("lllite_blocks"))  # on the host, beside the base, until both move
    if s.channels_last:
        training.use_channels_last(base, control)
    if args.resume_path:
        control_io.load_control_weights(args.resume_path, base, control)  # any layout; kind and family checked
    named = training.prepare_trainable(base, control, s.sd_locked)
    params = [p for _, p in named]
    if s.gradient_checkpointing:
        control_branch.enable_gradient_checkpointing(base.unet, control)
    if device.type == "cuda":  # cast before the move: the card never holds the frozen base in fp32
        training.cast_frozen_weights_to_half(base, s.mixed_precision)
    base.to(device)
    control.to(device)  # an LLLite's modules moved with the UNet already; a ControlNet moves here
    optimizer = training.make_optimizer(params, s.learning_rate, use_8bit=s.use_8bit_adam)
    scaler = training.grad_scaler(device, s.mixed_precision)
    scheduler = training.training_scheduler(base)
    # the loss as a module: torch's DistributedDataParallel averages exactly the trained parameters' gradients
    # (bucketed, overlapping the backward pass) and starts every process from rank 0's weights
    loss_module = training.TrainingLoss(base, control, scheduler, params, s.snr_gamma, s.only_mid_control,
                                        s.loss_weighting)
    if world > 1:
        loss_module = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = torch.compile(loss_module) if s.compile else loss_module
    heldout, trainable_items = heldout_pairs(settings, base, dataset, args.eval_seed)
    n_items = min(args.max_train_samples or trainable_items, trainable_items)
    share_cores(threads)
    cache = open_cache(args.cache_dir, base, dataset, n_items, rank, stop) if s.cache else None
    if s.cache and cache is None:
        stop.out_of_time = True  # the run ends at once, with a checkpoint
    encode = batches.BatchEncoder(base, cache)
    stream = batches.SampleStream(dataset, s.seed, n_items, base.vae.config.latent_channels, base.vae_scale_factor,
                                  scheduler.config.num_train_timesteps, s.prompt_dropout, s.timestep_sampling)
    effective = s.batch_size * s.gradient_accumulation * world
    average = ema.WeightAverage(params, s.ema_decay) if s.ema_decay else None
    step = 0
    if args.resume_from:
        step = checkpoint.resume_training(args.resume_from, base, control, optimizer, scaler, effective,
                                          s.learning_rate, average)
    train_batches = batches.training_batches(stream, encode, device, step, s.batch_size, s.gradient_accumulation,
                                             world, rank, s.data_workers)
    validation = validation_pairs(args, base)
    log = image_log.RunLog(out, settings, base, control, dataset, validation, stop, heldout,
                           resumed_at=step if args.resume_from else None,
                           weights=average.applied if average else None) if rank == 0 else None
    if rank == 0:
        resumed = f"resumed at step {step} from {checkpoint.resolve_checkpoint(args.resume_from)}; " if args.resume_from else ""
        print(f"{resumed}{preset or 'tiny-SD'} settings ({args.control}): base {args.base} ({base.family}), "
              f"lr {s.learning_rate}, {sum(p.numel() for p in params):,} trainable parameters, effective batch "
              f"{effective} = {s.batch_size} per process x {s.gradient_accumulation} accumulation x {world} processes; "
              f"data {data_dir} ({n_items} pairs); out {out}")
        log.write_config(dict(control=args.control, preset=preset, base=args.base, data=str(data_dir),
                              eval_seed=args.eval_seed, resume_from=args.resume_from, resume_path=args.resume_path))
        if step == 0 and not stop.out_of_time:
            share_cores(threads)
            log.after_step(0)

    autocast = training.autocast(device, s.mixed_precision)
    finite = training.FiniteCheck(named, device)
    progress = tqdm(total=s.max_steps, initial=step, disable=rank != 0, unit="step")
    window, window_steps, last_loss = torch.zeros((), device=device), 0, None
    with stop, hint.checked_on_host():  # each training item's hint range is checked on the host (batches.py)
        while not stop.should_stop(step, log.final_seconds if log else 0.0, device, agree=step % s.log_every == 0):
            # one optimizer step over the effective batch: micro-batches of this process, then all processes.
            # Nothing here reads the device; the loss and the NaN check are read with the log line.
            optimizer.zero_grad(set_to_none=True)
            if s.lr_decay:  # a host number: the schedule reads the step and the clock, never the device
                for group in optimizer.param_groups:
                    group["lr"] = s.learning_rate * training.learning_rate_scale(stop.progress(step), s.lr_decay)
            for micro in range(s.gradient_accumulation):
                last_micro = micro == s.gradient_accumulation - 1  # DDP averages gradients on this one only
                batch = next(train_batches)  # this process's slice of the run's samples, prepared ahead
                with contextlib.nullcontext() if world == 1 or last_micro else loss_module.no_sync():
                    with autocast:
                        loss = loss_fn(batch)
                    finite.add_loss(loss)
                    loss = loss / s.gradient_accumulation  # the optimizer step sees the mean over the effective batch
                    (scaler.scale(loss) if scaler else loss).backward()
                window += loss.detach()
            training.optimizer_step(optimizer, scaler, params, s.max_grad_norm, finite)
            if average:
                average.update()
            finite.next_step()
            step, window_steps = step + 1, window_steps + 1
            progress.update()
            logging, saving = step % s.log_every == 0, step % s.checkpoint_every == 0
            if logging or saving:
                finite.read(scaler)  # the NaN flags, once: with the log line, and never a checkpoint of NaN weights
            if logging:
                share_cores(threads)
                last_loss, window_steps = mean_loss(window, window_steps, world), 0
                window.zero_()
                progress.set_postfix(loss=f"{last_loss:.4f}", minutes=f"{stop.minutes():.1f}")
                if rank == 0:
                    log.loss(step, last_loss, optimizer.param_groups[0]["lr"])
            if rank == 0:
                log.after_step(step)
            if saving:
                save(base, control, optimizer, scaler, out, step, effective, s.keep_checkpoints, rank, settings, average)
    progress.close()
    if window_steps:
        last_loss = mean_loss(window, window_steps, world)
    finite.read(scaler)
    save(base, control, optimizer, scaler, out, step, effective, s.keep_checkpoints, rank, settings, average)
    if rank == 0:
        log.finish(step, last_loss)
    if world > 1:
        dist.destroy_process_group()
    return dict(control=control, step=step, out=out)


def save(base, control, optimizer, scaler, out: Path, step: int, effective: int, keep: int, rank: int,
         settings: dict, average=None) -> None:
    """A checkpoint of the trained weights (or their EMA) and everything a resume needs (rank 0 writes it)."""
    if rank == 0:
        checkpoint.save_training(out, step, base, control, optimizer, scaler, effective, keep, settings, average)


if __name__ == "__main__":
    raise SystemExit(run_command("tutorial_train.py", main))
