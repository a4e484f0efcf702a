"""Pretrain the tiny Stable Diffusion of `tinylllite.sd.tiny_sd` from scratch on Fill50K at 64 px.

Four stages (`--stage`, default all in order), each seeded by `--seed` and run on its own if wanted:

1. vae: the AutoencoderKL learns to round-trip Fill50K targets rendered on the fly
   (`tinylllite.data.fill50k.make_pair`, never written to disk). Loss = MSE + 1e-6 KL (SD's KL weight).
   Afterwards the latent scaling factor is set to 1 / std of the latents, as SD's 0.18215 was.
2. decoder: the decoder alone is fine-tuned, the encoder frozen. The UNet only sees the encoder's
   latents, so this stage can run beside `unet` (two processes) and still improve its images.
3. text: the CLIP text encoder learns to name colours. A linear probe must read the prompt's circle and
   background RGB from every token from the end-of-text token on (the tokens a UNet can attend to
   after the prompt). The probe is thrown away; the encoder is then frozen. This shortcut is why the
   base learns colours within an hour on a CPU: the UNet never has to discover from pixels alone
   what "papaya whip" means.
4. unet: text-to-image diffusion on cached latents (a pool of rendered targets, encoded once):
   epsilon prediction, SD's noise schedule, Min-SNR-5 loss weights, 10% empty prompts (so
   classifier-free guidance works), AdamW with warmup + cosine decay, an EMA of the weights (saved).
   `--continue-unet` runs a second round from the saved weights.

Every stage writes its part to `--out/<part>/` in diffusers' layout (fp16 storage) atomically, logs
to `--log`, and records its wall time and metrics in `--out/training_report.json`. Positions are drawn
uniformly, so the base learns colours, not where the circle goes. The committed weights were made by
the commands in `tinylllite/sd/tiny_sd_weights/training_report.json` ("commands").

Left out: the VAE's perceptual and adversarial losses (flat discs need neither), offset noise.
"""
import argparse
import fcntl
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from tinylllite.data.fidelity import distinguishable, fill50k_fidelity
from tinylllite.data.fill50k import COLOUR_NAMES, COLOURS, make_pair, prompt_for
from tinylllite.files.atomic import atomic_file, atomic_folder
from tinylllite.sd.tiny_sd import SCHEDULER_CONFIG, TINY_IMAGE_SIZE, WEIGHTS_DIR, build_tiny_parts
from tinylllite.sd.tokenizer import clip_tokenizer

EVAL_SEED_OFFSET = 1000  # held-out pairs come from seed + 1000, training pairs from seed
KL_WEIGHT = 1e-6
# The text encoder is causal, so its first k outputs depend on the first k tokens only: the probe is
# trained on the first 24 of the 77 positions (every prompt ends by position 13), 3x cheaper than all 77.
PROBE_POSITIONS = 24


def log(message: str, path: Path) -> None:
    line = f"{time.strftime('%H:%M:%S')} {message}"
    print(line, flush=True)
    with open(path, "a") as f:
        f.write(line + "\n")


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine decay to peak / 10."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def targets(seed: int, indices) -> tuple[torch.Tensor, list]:
    """Rendered Fill50K targets -> ((B, 3, S, S) in [-1, 1], the pairs)."""
    pairs = [make_pair(seed, int(i), TINY_IMAGE_SIZE) for i in indices]
    images = torch.from_numpy(np.stack([p.target for p in pairs]))  # (B, S, S, 3) uint8
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1, pairs  # (B, 3, S, S)


def eval_pairs(seed: int, n: int) -> list:
    """The first n held-out pairs whose two colours the fidelity metric can tell apart."""
    pairs, index = [], 0
    while len(pairs) < n:
        pair = make_pair(seed + EVAL_SEED_OFFSET, index, TINY_IMAGE_SIZE)
        if distinguishable(pair.prompt):
            pairs.append(pair)
        index += 1
    return pairs


def save_part(module, out: Path, name: str) -> None:
    """save_pretrained in fp16 into a temporary folder, then swapped in place of out/name."""
    with atomic_folder(out / name, replace=True) as tmp:
        module.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    module.to(torch.float32)


def update_report(out: Path, stage: str, entry: dict) -> None:
    """Record a stage's numbers in out/training_report.json (locked: the decoder and unet stages run side by side)."""
    path = out / "training_report.json"
    folder = os.open(out, os.O_RDONLY)  # the lock is held on the folder itself
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        report = json.loads(path.read_text()) if path.exists() else {}
        report.update(device="cpu, 2 cores, shared", torch=torch.__version__)
        report.setdefault("stages", {})[stage] = dict(entry, threads=torch.get_num_threads(),
                                                      command="python scripts/pretrain_tiny_sd.py " + " ".join(sys.argv[1:]))
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        os.close(folder)


@torch.no_grad()
def vae_fidelity(vae: AutoencoderKL, pairs: list) -> dict:
    """Mean fidelity of VAE round trips (posterior mode) of the pairs' targets."""
    images = torch.from_numpy(np.stack([p.target for p in pairs])).permute(0, 3, 1, 2).float() / 127.5 - 1
    recon = vae.decode(vae.encode(images).latent_dist.mode()).sample  # (B, 3, S, S)
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    scores = [fill50k_fidelity(r, p.source, p.prompt) for r, p in zip(recon, pairs)]
    return {k: float(np.mean([s[k] for s in scores])) for k in ("iou", "colour_error")}


def train_vae(args, log_path: Path) -> None:
    vae, _, _ = build_tiny_parts(args.seed)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    held_out = eval_pairs(args.seed, args.eval_pairs)
    start = time.time()
    for step in range(args.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.vae_steps, args.vae_lr, warmup=100)
        images, _ = targets(args.seed, range(step * args.vae_batch, (step + 1) * args.vae_batch))
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - images).pow(2).mean() + KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.vae_steps:
            vae.eval()
            metrics = vae_fidelity(vae, held_out)
            vae.train()
            log(f"vae step {step + 1}/{args.vae_steps} loss {loss.item():.5f} round-trip iou {metrics['iou']:.4f} "
                f"colour error {metrics['colour_error']:.2f} ({time.time() - start:.0f} s)", log_path)
    vae.eval()
    with torch.no_grad():  # SD's rule: scale latents to unit variance
        images, _ = targets(args.seed, range(10**6, 10**6 + 512))
        latents = vae.encode(images).latent_dist.sample()
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    save_part(vae, args.out, "vae")
    update_report(args.out, "vae", dict(seed=args.seed, steps=args.vae_steps, batch=args.vae_batch, lr=args.vae_lr,
                                        wall_s=round(time.time() - start), final_loss=loss.item(),
                                        scaling_factor=vae.config.scaling_factor, eval_pairs=len(held_out),
                                        round_trip=vae_fidelity(vae, held_out)))
    log(f"vae saved, scaling factor {vae.config.scaling_factor:.4f}", log_path)


def train_decoder(args, log_path: Path) -> None:
    """Fine-tune the VAE decoder alone, the encoder (and so the UNet's latent space) frozen.

    The UNet only ever sees the encoder's latents, so the decoder can keep improving while the UNet
    trains (run this stage beside `unet`): sharper discs and truer colours at no cost to the UNet.
    """
    vae = AutoencoderKL.from_pretrained(args.out / "vae", torch_dtype=torch.float32)
    torch.manual_seed(args.seed)  # latent_dist.sample() draws from torch's global generator
    vae.requires_grad_(False)
    trainable = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=args.decoder_lr, weight_decay=0.0)
    held_out = eval_pairs(args.seed, args.eval_pairs)
    first = 2 * 10**6  # images not used by the vae stage
    start = time.time()
    for step in range(args.decoder_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.decoder_steps, args.decoder_lr, warmup=50)
        images, _ = targets(args.seed, range(first + step * args.vae_batch, first + (step + 1) * args.vae_batch))
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample()
        loss = (vae.decode(latents).sample - images).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.decoder_steps:
            vae.eval()
            metrics = vae_fidelity(vae, held_out)
            vae.train()
            log(f"decoder step {step + 1}/{args.decoder_steps} loss {loss.item():.5f} round-trip iou "
                f"{metrics['iou']:.4f} colour error {metrics['colour_error']:.2f} ({time.time() - start:.0f} s)",
                log_path)
        if (step + 1) % args.save_every == 0 or step + 1 == args.decoder_steps:
            save_part(vae.eval(), args.out, "vae")
            vae.train()
    update_report(args.out, "decoder", dict(seed=args.seed, steps=args.decoder_steps, batch=args.vae_batch,
                                            lr=args.decoder_lr, wall_s=round(time.time() - start),
                                            final_loss=loss.item(), round_trip=metrics))


def prompt_tokens(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of every (circle, background) prompt and of the empty prompt.

    Returns ((N, N, 77) ids, (77,) empty-prompt ids), N = 140 colours; [i, j] is "<i> circle with <j> background".
    """
    prompts = [prompt_for(c, b) for c in COLOUR_NAMES for b in COLOUR_NAMES]
    ids = tokenizer(prompts + [""], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids  # (N*N + 1, 77)
    n = len(COLOUR_NAMES)
    return ids[:-1].view(n, n, -1), ids[-1]


def colour_table() -> torch.Tensor:
    """(N, 3) RGB of COLOUR_NAMES in [-1, 1]."""
    return torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=torch.float32) / 127.5 - 1


def train_text(args, log_path: Path) -> None:
    _, _, text_encoder = build_tiny_parts(args.seed)
    tokenizer = clip_tokenizer()
    ids, _ = prompt_tokens(tokenizer)
    n, rgb = len(COLOUR_NAMES), colour_table()
    # The probe reads (circle RGB, background RGB) from each token at or after the first end-of-text token.
    probe = torch.nn.Linear(text_encoder.config.hidden_size, 6)
    params = [*text_encoder.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.text_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    positions = torch.arange(PROBE_POSITIONS)  # (P,)

    def probe_error(circle: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        """Per-prompt mean squared error of the probe over the tokens after the prompt: (B,)."""
        tokens = ids[circle, background, :PROBE_POSITIONS]  # (B, P)
        hidden = text_encoder(tokens).last_hidden_state  # (B, P, D)
        after = (positions[None] >= (tokens == tokenizer.eos_token_id).int().argmax(1)[:, None]).float()  # (B, P)
        target = torch.cat([rgb[circle], rgb[background]], dim=1)  # (B, 6)
        error = (probe(hidden) - target[:, None]).pow(2).mean(-1)  # (B, P)
        return (error * after).sum(1) / after.sum(1)

    held_out = torch.randint(n, (2, 1024), generator=torch.Generator().manual_seed(args.seed + EVAL_SEED_OFFSET))
    start = time.time()
    for step in range(args.text_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.text_steps, args.text_lr, warmup=50)
        circle, background = torch.randint(n, (2, args.text_batch), generator=generator)
        loss = probe_error(circle, background).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.text_steps:
            with torch.no_grad():
                rmse = float(probe_error(*held_out).mean().sqrt() * 127.5)
            log(f"text step {step + 1}/{args.text_steps} loss {loss.item():.5f} probe RGB error on 1024 prompts "
                f"{rmse:.2f} (0-255, {time.time() - start:.0f} s)", log_path)
    save_part(text_encoder.eval(), args.out, "text_encoder")
    update_report(args.out, "text", dict(seed=args.seed, steps=args.text_steps, batch=args.text_batch,
                                         lr=args.text_lr, wall_s=round(time.time() - start),
                                         probe_rgb_rmse=rmse))


@torch.no_grad()
def latent_pool(vae: AutoencoderKL, seed: int, size: int, chunk: int = 256) -> dict:
    """Encode `size` rendered targets once: posterior mean and std (P, 4, h, w) and colour indices (P,)."""
    means, stds, circles, backgrounds = [], [], [], []
    index_of = {name: i for i, name in enumerate(COLOUR_NAMES)}
    for first in range(0, size, chunk):
        images, pairs = targets(seed, range(first, min(first + chunk, size)))
        posterior = vae.encode(images).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        circles += [index_of[p.circle] for p in pairs]
        backgrounds += [index_of[p.background] for p in pairs]
    return dict(mean=torch.cat(means), std=torch.cat(stds), circle=torch.tensor(circles),
                background=torch.tensor(backgrounds))


@torch.no_grad()
def prompt_states(text_encoder: CLIPTextModel, ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """The frozen encoder's hidden states of token ids (P, 77) -> (P, 77, D), stored in fp16."""
    return torch.cat([text_encoder(ids[i:i + chunk]).last_hidden_state.half() for i in range(0, len(ids), chunk)])


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction: min(SNR, gamma) / SNR (Hang et al. 2023)."""
    alpha_bar = alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / snr


def train_unet(args, log_path: Path) -> None:
    _, unet, _ = build_tiny_parts(args.seed)
    stage = "unet"
    if args.continue_unet:  # a second round from the saved (EMA) weights, with fresh batches and noise
        unet = UNet2DConditionModel.from_pretrained(args.out / "unet", torch_dtype=torch.float32)
        stage = "unet_continued"
    vae = AutoencoderKL.from_pretrained(args.out / "vae", torch_dtype=torch.float32).eval()
    text_encoder = CLIPTextModel.from_pretrained(args.out / "text_encoder", torch_dtype=torch.float32).eval()
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    start = time.time()
    pool = latent_pool(vae, args.seed, args.pool_size)
    ids, empty = prompt_tokens(clip_tokenizer())
    # Only the prompts that occur in the pool are encoded; pool item i reads states[prompt_of[i]].
    used, prompt_of = torch.unique(pool["circle"] * ids.shape[1] + pool["background"], return_inverse=True)
    states = prompt_states(text_encoder, ids.flatten(0, 1)[used])  # (U, 77, D)
    empty_state = prompt_states(text_encoder, empty[None])[0].float()  # (77, D)
    log(f"unet: {args.pool_size} latents and {len(used)} prompts encoded ({time.time() - start:.0f} s)", log_path)
    scale = vae.config.scaling_factor
    ema = [p.detach().clone() for p in unet.parameters()]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed + int(args.continue_unet))
    unet.train()
    losses, start = [], time.time()
    for step in range(args.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.unet_steps, args.unet_lr, warmup=200)
        k = torch.randint(args.pool_size, (args.unet_batch,), generator=generator)
        noise_std = torch.randn(pool["std"][k].shape, generator=generator)
        latents = (pool["mean"][k] + pool["std"][k] * noise_std) * scale  # (B, 4, h, w)
        hidden = states[prompt_of[k]].float()  # (B, 77, D)
        dropped = torch.rand(args.unet_batch, generator=generator) < args.prompt_dropout
        hidden[dropped] = empty_state  # unconditional = empty prompt, as classifier-free guidance samples it
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(scheduler.config.num_train_timesteps, (args.unet_batch,), generator=generator)
        prediction = unet(scheduler.add_noise(latents, noise, t), t, hidden).sample
        per_sample = (prediction - noise).pow(2).mean(dim=(1, 2, 3))  # (B,)
        loss = (min_snr_weights(scheduler.alphas_cumprod, t, args.min_snr_gamma) * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for shadow, p in zip(ema, unet.parameters()):
                shadow.lerp_(p.detach(), 1 - decay)
        losses.append(per_sample.mean().item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.unet_steps:
            rate = (step + 1) / (time.time() - start)
            log(f"unet step {step + 1}/{args.unet_steps} mse {np.mean(losses[-args.eval_every:]):.4f} "
                f"{rate:.2f} steps/s, {(args.unet_steps - step - 1) / rate / 60:.1f} min left", log_path)
        if (step + 1) % args.save_every == 0 or step + 1 == args.unet_steps:
            save_ema(unet, ema, args.out)
            update_report(args.out, stage, dict(seed=args.seed, steps=step + 1, planned_steps=args.unet_steps,
                                                 batch=args.unet_batch, lr=args.unet_lr, pool_size=args.pool_size,
                                                 prompt_dropout=args.prompt_dropout, min_snr_gamma=args.min_snr_gamma,
                                                 ema_decay=args.ema_decay, wall_s=round(time.time() - start),
                                                 steps_per_s=round(rate, 3), final_mse=float(np.mean(losses[-200:]))))
            log(f"unet EMA weights saved at step {step + 1}", log_path)


def save_ema(unet: UNet2DConditionModel, ema: list[torch.Tensor], out: Path) -> None:
    """Save the EMA weights (not the raw ones) as the UNet part, leaving the trained copy untouched."""
    raw = [p.detach().clone() for p in unet.parameters()]
    with torch.no_grad():
        for p, shadow in zip(unet.parameters(), ema):
            p.copy_(shadow)
        save_part(unet, out, "unet")
        for p, value in zip(unet.parameters(), raw):
            p.copy_(value)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("vae", "decoder", "text", "unet", "all"), default="all")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="where the diffusers folders go")
    parser.add_argument("--log", type=Path, default=Path("runs/pretrain_tiny_sd.log"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process; more than 1 is far slower on a busy machine")
    parser.add_argument("--eval-pairs", type=int, default=128, help="held-out pairs per evaluation")
    parser.add_argument("--eval-every", type=int, default=250, help="optimizer steps between evaluations")
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--decoder-steps", type=int, default=8000)
    parser.add_argument("--decoder-lr", type=float, default=5e-4)
    parser.add_argument("--text-steps", type=int, default=1000)
    parser.add_argument("--text-batch", type=int, default=128)
    parser.add_argument("--text-lr", type=float, default=3e-3)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--pool-size", type=int, default=16000, help="rendered targets encoded once for the UNet")
    parser.add_argument("--continue-unet", action="store_true", help="start from --out/unet instead of scratch")
    parser.add_argument("--prompt-dropout", type=float, default=0.1)
    parser.add_argument("--min-snr-gamma", type=float, default=5.0)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--save-every", type=int, default=500, help="steps between saves (unet: of the EMA weights)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    log(f"pretrain_tiny_sd {' '.join(sys.argv[1:])}", args.log)
    if args.stage in ("vae", "all"):
        train_vae(args, args.log)
    if args.stage in ("decoder", "all"):
        train_decoder(args, args.log)
    if args.stage in ("text", "all"):
        train_text(args, args.log)
    if args.stage in ("unet", "all"):
        train_unet(args, args.log)


if __name__ == "__main__":
    main()
