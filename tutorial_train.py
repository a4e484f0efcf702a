"""Train a ControlNet (or a ControlNet-LLLite) on Fill50K: the original `tutorial_train.py`, loop written out.

The original (lllyasviel/ControlNet `tutorial_train.py`, SPEC §3) is a config block and a Lightning
`Trainer`. Here the block stays at the top and the loop is spelled out, adding what users of the
original ask for: resume, small checkpoints, mixed precision with a NaN guard, accumulation, Min-SNR,
8-bit Adam, caching, multi-GPU (`torchrun --nproc_per_node N tutorial_train.py`), fidelity numbers.

    python tutorial_train.py                       # tiny SD + fresh ControlNet on Fill50K, 10 minutes, CPU
    python tutorial_train.py --control lllite      # the same with ControlNet-LLLite
    python tutorial_train.py --base v1-5-pruned.safetensors --data ./training/fill50k   # the original run

Every option below is also a flag (`--batch-size` or `--batch_size`). Left out: EMA, LR schedules,
DeepSpeed, xformers; multi-GPU averages gradients with one explicit all_reduce per optimizer step
(what DistributedDataParallel does, without overlapping it with the backward pass).
"""
import time

PROCESS_START = time.time()  # the tiny-world goal is measured from here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tinylllite import checkpoint, image_log, nan_guard, training  # noqa: E402
from tinylllite.fidelity import evaluation_pairs  # noqa: E402

# ---- Configs: the original's block (defaults for real SD bases) -------------------------------------------
resume_path = None  # initial control weights (original: './models/control_sd15_ini.ckpt'); --resume-from continues a run
batch_size = 4
logger_freq = 300  # image log every this many optimizer steps (and at step 0); 0 = no image log
learning_rate = 1e-5
sd_locked = True  # True: only the control branch learns; False: the UNet decoder too (then try lr 2e-6)
only_mid_control = False

LLLITE = dict(learning_rate=2e-4, cond_emb_dim=32, mlp_dim=64)  # kohya's recipe (SPEC §5)
# The tiny SD learns position in minutes at a far higher rate: its ControlNet took off after ~500 steps at lr 1e-3
# and ~1000 at 2e-3 (2e-4 idled for minutes). Evaluations (~10 s each) every 250 steps leave ~85 % of the time
# to training. One thread: tiny layers are too small to split, and two OpenMP threads on a busy 2-core machine
# ran 80x slower. LLLite wraps every block: the tiny UNet has one transformer per level (kohya's SD1 set,
# input only, would be 12 modules) and all its levels sit at depths 1-3, so the files still load in kohya's loaders.
# Evaluation CFG 3: at CFG 9 the tiny SD overshoots (blurred, oversaturated discs). Measured on one step-2500
# ControlNet checkpoint, 64 held-out pairs, 20 DDIM steps: IoU 0.776 at CFG 9, 0.826 at 5, 0.853 at 3, 0.858 at 1.5.
TINY = dict(batch_size=16, logger_freq=500, max_minutes=10.0, eval_every=250, eval_steps=20, eval_cfg=3.0, threads=1,
            controlnet=dict(learning_rate=1e-3), lllite=dict(learning_rate=1e-3, blocks="input,middle,output"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])

    def add(name, **kw):  # --batch-size and --batch_size both work
        p.add_argument(f"--{name}", f"--{name.replace('-', '_')}", dest=name.replace("-", "_"), **kw)

    add("resume-path", help="initial control weights (.safetensors / original .ckpt)")
    add("batch-size", type=int)
    add("logger-freq", type=int)
    add("learning-rate", type=float)
    add("sd-locked", type=lambda s: s.lower() in ("1", "true", "yes"), help="true/false")
    add("only-mid-control", type=lambda s: s.lower() in ("1", "true", "yes"), help="true/false")
    add("control", choices=("controlnet", "lllite"), default="controlnet")
    add("cond-emb-dim", type=int, default=LLLITE["cond_emb_dim"])
    add("mlp-dim", type=int, default=LLLITE["mlp_dim"])
    add("lllite-blocks", help="comma list of input,middle,output (default: kohya's, or all three on the tiny SD)")
    add("base", default="tiny", help="'tiny' (the package's tiny SD) or an SD checkpoint / diffusers folder")
    add("data", help="Fill50K-layout folder (default ./training/fill50k, tiny: ./training/fill50k_<size>)")
    add("out", help="run folder (default ./runs/<control>-<time>)")
    add("max-steps", type=int, help="optimizer steps to train")
    add("max-minutes", type=float, help="stop when the next evaluation would end past this, from process start")
    add("resume-from", help="a run folder or checkpoint folder to continue")
    add("gradient-accumulation", type=int, default=1)
    add("mixed-precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    add("gradient-checkpointing", action="store_true")
    add("use-8bit-adam", action="store_true")
    add("max-grad-norm", type=float, help="clip the gradient norm (the original does not clip)")
    add("cache", action="store_true", help="cache VAE latents and text embeddings")
    add("prompt-dropout", type=float, default=0.0, help="fraction of empty prompts (the paper: 0.5)")
    add("snr-gamma", type=float, help="Min-SNR weighting, e.g. 5.0")
    add("max-train-samples", type=int)
    add("checkpoint-every", type=int, default=500)
    add("keep-checkpoints", type=int, default=3)
    add("log-every", type=int, default=10, help="metrics.jsonl loss line every this many steps")
    add("eval-every", type=int, help="fidelity evaluation every this many steps (Fill50K data); 0 = off")
    add("eval-pairs", type=int, default=64)
    add("eval-steps", type=int, help="DDIM steps of the evaluation samples")
    add("eval-cfg", type=float, help="CFG of the evaluation samples (real SD: 9, as the image log)")
    add("validation-prompt", action="append", default=[])
    add("validation-image", action="append", default=[])
    add("seed", type=int, default=0)
    add("threads", type=int, help="CPU threads for torch (default: torch's choice; 1 on a busy shared machine)")
    return p.parse_args(argv)


def resolve_defaults(args, tiny: bool) -> str:
    """Fill unset options from the real-SD block above or the tiny-world set; returns which set was used."""
    lllite = args.control == "lllite"
    if lllite and (args.sd_locked is False or args.only_mid_control):
        raise SystemExit("--sd-locked false / --only-mid-control are ControlNet options; LLLite has no such switch")
    if tiny:
        chosen = dict(TINY, **TINY[args.control])
        lr, name = chosen["learning_rate"], f"tiny-SD defaults ({args.control})"
    else:
        chosen = dict(batch_size=batch_size, logger_freq=logger_freq, max_minutes=None, eval_every=logger_freq,
                      eval_steps=50, eval_cfg=9.0, threads=None, blocks=None)
        lr, name = LLLITE["learning_rate"] if lllite else learning_rate, f"real-SD defaults ({args.control})"
    for key, value in dict(chosen, learning_rate=lr, resume_path=resume_path, sd_locked=sd_locked,
                           only_mid_control=only_mid_control).items():
        if getattr(args, key, None) is None and key in vars(args):
            setattr(args, key, value)
    args.lllite_blocks = args.lllite_blocks or chosen.get("blocks")
    return name


def load_dataset(args, base, tiny: bool, rank: int):
    from tinylllite.datasets import Fill50KDataset

    size = base.unet.config.sample_size * base.vae_scale_factor
    data = Path(args.data or (f"./training/fill50k_{size}" if tiny else "./training/fill50k"))
    if tiny and not (data / "prompt.json").exists() and rank == 0:
        from tinylllite.fill50k import write_fill50k

        print(f"{data} is missing: writing 10,000 Fill50K pairs at {size} px (seed 0)")
        write_fill50k(data, n=10_000, size=size, seed=0)
    if dist.is_initialized():
        dist.barrier()
    return Fill50KDataset(data), data


def build_control(args, base):
    if args.control == "controlnet":
        from tinylllite.controlnet import ControlNet

        return ControlNet.from_unet(base.unet, vae_scale_factor=base.vae_scale_factor)
    from tinylllite.lllite_unet import attach_lllite

    blocks = set(args.lllite_blocks.split(",")) if args.lllite_blocks else None
    return attach_lllite(base.unet, args.cond_emb_dim, args.mlp_dim, blocks, vae_factor=base.vae_scale_factor)


def load_initial_weights(path, base, control) -> None:
    """--resume-path: a control .safetensors (ours, diffusers', kohya's) or the original's control .ckpt."""
    from tinylllite.sd_loading import open_state_dict

    tensors = dict(open_state_dict(path))
    if any(k.startswith("control_model.") for k in tensors):
        from tinylllite.ldm_format import controlnet_names, from_ldm

        names = controlnet_names(control.state_dict().keys(), dict(base.unet.config))
        tensors = from_ldm(tensors, names, "control_model.")
    checkpoint.load_trainable(base, control, {"control": tensors})


def main(argv=None, base=None):
    args = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if base is None:
        from tinylllite.sample import load_base_or_tiny

        base = load_base_or_tiny(args.base)
    tiny = base.family == "tiny"
    defaults = resolve_defaults(args, tiny)
    if args.threads:
        torch.set_num_threads(args.threads)
    base.to(device)
    dataset, data_dir = load_dataset(args, base, tiny, rank)
    torch.manual_seed(args.seed)  # the fresh branch's initial weights
    control = build_control(args, base).to(device)
    if args.resume_path:
        load_initial_weights(args.resume_path, base, control)
    named = training.prepare_trainable(base, control, args.sd_locked)
    params = [p for _, p in named]
    if world > 1:  # every rank starts from rank 0's weights
        for p in params:
            dist.broadcast(p.data, src=0)
    if args.gradient_checkpointing:
        training.enable_gradient_checkpointing(base, control)
    if args.mixed_precision != "fp32" and device.type == "cuda":  # frozen weights in half precision save memory
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
        for part in (base.unet, base.text_encoder, base.text_encoder_2):
            for p in part.parameters() if part is not None else []:
                p.data = p.data if p.requires_grad else p.data.to(half)
    optimizer = training.make_optimizer(params, args.learning_rate, use_8bit=args.use_8bit_adam)
    scaler = training.grad_scaler(device, args.mixed_precision)
    scheduler = training.training_scheduler(base)
    encoder = training.BatchEncoder(base, dataset, args.seed, args.prompt_dropout, args.cache, args.max_train_samples)
    out = Path(args.out or f"./runs/{args.control}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(PROCESS_START))}")
    if args.resume_from and not args.out:  # continue in the run folder the checkpoint belongs to
        out = checkpoint.resolve_checkpoint(args.resume_from).parent.parent

    step = 0
    if args.resume_from:
        weights, state = checkpoint.load_checkpoint(args.resume_from)
        checkpoint.load_trainable(base, control, weights)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        if state["effective_batch"] != args.batch_size * args.gradient_accumulation * world:
            raise SystemExit(f"the checkpoint was trained with effective batch {state['effective_batch']}: "
                             f"resume with the same batch size, accumulation and number of processes")
        step = state["step"]
    effective = args.batch_size * args.gradient_accumulation * world
    metrics = image_log.MetricsLog(out, append=bool(args.resume_from), keep_until=step) if rank == 0 else None
    is_fill50k = "fill50k" in data_dir.name
    eval_every = args.eval_every if is_fill50k else 0
    heldout = evaluation_pairs(args.eval_pairs, dataset[0]["hint"].shape[0]) if eval_every else []
    if rank == 0:
        print(f"{defaults}: base {args.base} ({base.family}), {args.control}, lr {args.learning_rate}, "
              f"{sum(p.numel() for p in params):,} trainable parameters, effective batch {effective} = "
              f"{args.batch_size} per process x {args.gradient_accumulation} accumulation x {world} processes; "
              f"data {data_dir} ({encoder.n} pairs); out {out}")
        (out / "config.json").write_text(json.dumps(vars(args) | {"defaults": defaults}, indent=1))

    def evaluate(at_step: int) -> None:  # fidelity on held-out pairs with the same `sample` as deployment
        started = time.time()
        with torch.no_grad(), training.autocast(device, args.mixed_precision):  # half-precision frozen weights
            scores = image_log.evaluate_fidelity(base, control, heldout, steps=args.eval_steps, cfg=args.eval_cfg)
        control.train()
        evaluate.seconds = time.time() - started
        metrics.write(step=at_step, minutes=round((time.time() - PROCESS_START) / 60, 2), **scores)
        metrics.plot()
        tqdm.write(f"step {at_step}: IoU {scores['fidelity_iou']:.3f}, colour error {scores['colour_error']:.1f} "
                   f"({evaluate.seconds:.0f} s on {len(heldout)} held-out pairs)")
    evaluate.seconds = 0.0

    def log_images(at_step: int) -> None:
        with training.autocast(device, args.mixed_precision):  # half-precision frozen weights on GPU
            items = [dataset[i] for i in range(min(4, len(dataset)))]
            image_log.log_training_panels(base, control, items, at_step, out, cfg=9.0, seed=args.seed)
            if heldout:
                grid = heldout[:8]
                image_log.log_pairs_grid(base, control, [p.prompt for p in grid], [p.source for p in grid],
                                         out / "image_log" / f"heldout_gs-{at_step:06d}.png", steps=args.eval_steps,
                                         cfg=args.eval_cfg, targets=[p.target for p in grid])
            for i, (prompt, image) in enumerate(zip(args.validation_prompt, args.validation_image)):
                hint = np.asarray(Image.open(image).convert("RGB"))
                image_log.log_pairs_grid(base, control, [prompt], hint[None], out / "image_log" /
                                         f"validation{i}_gs-{at_step:06d}.png", steps=50, cfg=9.0)
            control.train()

    def save() -> None:
        if rank == 0:
            state = dict(step=step, samples_seen=step * effective, effective_batch=effective, torch_rng=torch.get_rng_state(),
                         optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler else None)
            checkpoint.save_checkpoint(out, step, checkpoint.trainable_weights(base, control), state,
                                       args.keep_checkpoints)

    stop = {"requested": False}

    def on_sigint(signum, frame):  # first Ctrl-C: finish this step, save, exit; second: stop at once
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        tqdm.write("Ctrl-C: finishing this step, saving a checkpoint, then exiting (Ctrl-C again to abort)")
    previous_handler = signal.signal(signal.SIGINT, on_sigint)

    if rank == 0 and step == 0:
        if eval_every:
            evaluate(0)
        if args.logger_freq:
            log_images(0)
    progress = tqdm(total=args.max_steps, initial=step, disable=rank != 0, unit="step")
    autocast = training.autocast(device, args.mixed_precision)
    window, last_loss = [], float("nan")
    while args.max_steps is None or step < args.max_steps:
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        for micro in range(args.gradient_accumulation):
            # sample numbers of this micro-batch: the run's global order, this process's slice of it
            first = ((step * args.gradient_accumulation + micro) * world + rank) * args.batch_size
            batch = encoder.batch(list(range(first, first + args.batch_size)), scheduler.config.num_train_timesteps)
            with autocast:
                loss = training.diffusion_loss(base, control, scheduler, batch, args.snr_gamma, args.only_mid_control)
            nan_guard.check_loss(loss, step)
            loss = loss / args.gradient_accumulation  # the optimizer step sees the mean over the effective batch
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += loss.detach()
        if world > 1:  # average gradients (and the logged loss) over processes
            for p in params:
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
                dist.all_reduce(p.grad)
                p.grad /= world
            dist.all_reduce(step_loss)
            step_loss /= world
        if scaler:
            scaler.unscale_(optimizer)
        else:
            nan_guard.check_gradients(named, step)
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
            nan_guard.check_loss_scale(scaler, step)
        else:
            optimizer.step()
        step += 1
        last_loss = step_loss.item()
        window.append(last_loss)
        progress.update()
        minutes = (time.time() - PROCESS_START) / 60
        progress.set_postfix(loss=f"{last_loss:.4f}", minutes=f"{minutes:.1f}",
                             **({"left": f"{args.max_minutes - minutes:.1f} min"} if args.max_minutes else {}))
        if rank == 0 and step % args.log_every == 0:
            metrics.write(step=step, loss=sum(window) / len(window), lr=optimizer.param_groups[0]["lr"])
            window = []
        if rank == 0 and args.logger_freq and step % args.logger_freq == 0:
            log_images(step)
        if rank == 0 and eval_every and step % eval_every == 0:
            evaluate(step)
        if step % args.checkpoint_every == 0:
            save()
        # after this step's logs: stop on Ctrl-C or when the final evaluation would end past --max-minutes
        elapsed = time.time() - PROCESS_START + evaluate.seconds
        stop_now = torch.tensor(float(stop["requested"] or bool(args.max_minutes) and elapsed > 60 * args.max_minutes),
                                device=device)
        if world > 1:  # any process asking to stop stops them all at the same step
            dist.all_reduce(stop_now)
        if stop_now > 0:
            break
    progress.close()
    signal.signal(signal.SIGINT, previous_handler)
    save()
    if rank == 0:
        if eval_every and step % eval_every:
            evaluate(step)
        metrics.plot()
        print(f"stopped at step {step} after {(time.time() - PROCESS_START) / 60:.1f} min; last loss {last_loss:.4f}; "
              f"checkpoints in {out / 'checkpoints'}, metrics in {metrics.path}")
    if world > 1:
        dist.destroy_process_group()
    return dict(control=control, step=step, out=out)


if __name__ == "__main__":
    main()
