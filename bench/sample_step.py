"""Speed of sampling: what ControlNet and LLLite add to the base, and tinylllite vs diffusers' pipeline.

Every variant generates `--batch` images with DDIM, `--steps` steps, classifier-free guidance `--cfg`
(empty negative prompt), then decodes them with the VAE; the reported number is seconds per image:

- `plain`: `tinylllite.sample.sample` with no control (the base alone);
- `controlnet`: the same with a ControlNet (the branch runs for the conditional and the
  unconditional half, as in the original's sampler);
- `lllite`: the same with LLLite attached to a copy of the UNet;
- `pipeline`: diffusers' `StableDiffusionControlNetPipeline` on the very same UNet, VAE, text
  encoder and ControlNet weights (a `ControlNetModel` loaded from tinylllite's state dict: the keys are
  diffusers'), the same DDIM settings, steps, CFG and hint.

Overheads are the variant's time over `plain`'s, in %; `pipeline/controlnet` > 1 means tinylllite is
faster. The variants alternate `--rounds` times in one process; before each timed call an untimed
call of `--warmup` denoising steps. On a GPU every network runs in the
half precision `--precision` names.

    python bench/sample_step.py --threads 1 --out bench/results/cpu_sample_step.json
    python bench/sample_step.py --device cuda --shape sd15 --precision bf16 --steps 50
"""
import argparse
import time

import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

import common

VARIANTS = ("plain", "controlnet", "lllite", "pipeline")
CFG = 9.0  # the original's image-log guidance


def make_variants(base, args, device) -> dict:
    """variant name -> function(steps) that generates the batch of images once."""
    prompts = [common.PROMPT] * args.batch
    size = common.image_size(base)
    g = torch.Generator().manual_seed(args.seed)
    hint = (torch.rand(args.batch, 3, size, size, generator=g) > 0.9).float()  # (B, 3, H, W) in [0, 1]
    control = common.ControlNet.from_unet(base.unet, vae_scale_factor=base.vae_scale_factor).to(device)
    lllite_base, lllite = common.lllite_copy(base, args.shape)
    with device:  # initialised where it runs
        controlnet = ControlNetModel.from_unet(base.unet)
    controlnet.load_state_dict(control.state_dict())  # the same weights, key for key
    dtype = common.HALF.get(args.precision, torch.float32) if device.type == "cuda" else torch.float32
    for module in (*base.parts().values(), control, lllite_base.unet, controlnet):
        common.move(module, device, dtype).eval()
    pipe = StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        controlnet=controlnet, scheduler=common.make_sampler(base, "ddim"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    knobs = dict(cfg=args.cfg, seed=args.seed)

    def pipeline(steps):
        generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.batch)]
        pipe(prompt=prompts, negative_prompt=[""] * args.batch, image=hint, num_inference_steps=steps,
             guidance_scale=args.cfg, eta=0.0, generator=generators, output_type="np", height=size, width=size)

    variants = dict(plain=lambda steps: common.sample(base, prompts, steps=steps, **knobs),
                    controlnet=lambda steps: common.sample(base, prompts, control, hint, steps=steps, **knobs),
                    lllite=lambda steps: common.sample(lllite_base, prompts, lllite, hint, steps=steps, **knobs),
                    pipeline=pipeline)
    return {name: variants[name] for name in args.variants.split(",")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser, steps=50, warmup=2, batch=2)
    parser.add_argument("--cfg", type=float, default=CFG)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.check_args(args)
    chosen = [v for v in args.variants.split(",") if v]
    if not chosen or set(chosen) - set(VARIANTS):
        raise common.InputError(f"--variants {args.variants!r}: choose from {', '.join(VARIANTS)}")
    started = time.perf_counter()
    base = common.build_base(args.shape, device)
    variants = make_variants(base, args, device)
    seconds = {name: [] for name in variants}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, generate in variants.items():
                if args.warmup:
                    generate(args.warmup)
                seconds[name].append(common.timed(lambda: generate(args.steps), device))
    results = {}
    for name, values in seconds.items():
        per_image = [s / args.batch for s in values]
        results[name] = dict(common.summary(per_image), steps=args.steps, images_per_call=args.batch)
    result = dict(benchmark="sample_step", **common.environment(device, args), image_size=common.image_size(base),
                  per_image=results)
    if "plain" in results:
        plain = results["plain"]["median_ms"]
        result["overhead_percent"] = {name: round(100 * (r["median_ms"] / plain - 1), 1)
                                      for name, r in results.items() if name != "plain"}
    if {"pipeline", "controlnet"} <= results.keys():
        result["ratios"] = {"pipeline/controlnet": round(results["pipeline"]["median_ms"]
                                                         / results["controlnet"]["median_ms"], 3),
                            "pipeline/controlnet, fastest calls": round(results["pipeline"]["min_ms"]
                                                                        / results["controlnet"]["min_ms"], 3)}
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return common.report(result, args.out)


if __name__ == "__main__":
    raise SystemExit(common.run_command("sample_step.py", main))
