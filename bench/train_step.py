"""Speed of one training step with the batch already on the device: tinylllite vs diffusers' example.

Three implementations share one frozen base (in the run's half precision on a GPU, as both trainers
keep it) and the same in-memory batch:

- `tinylllite`: the body of `tutorial_train.py`'s loop: `training.TrainingLoss` under
  `training.autocast`, the on-device NaN checks of `training.FiniteCheck` (read every 10 steps, as the
  loop reads them with its log line), gradient clipping at 1.0, torch's AdamW from
  `training.make_optimizer`;
- `diffusers`: the body of diffusers' `examples/controlnet/train_controlnet.py` loop:
  `ControlNetModel.from_unet`, the ControlNet under autocast (what `accelerator.prepare` adds), the
  UNet in the frozen dtype, `clip_grad_norm_(1.0)`, torch's AdamW, eager, NCHW;
- `lllite`: tinylllite's step with ControlNet-LLLite attached to a copy of the UNet.
- `tinylllite-compiled`, `lllite-compiled`: the same steps with the loss through `torch.compile`
  (`--compile-mode`), as `tutorial_train.py --compile` runs it. The first step, which compiles, is
  reported apart (`first_step_seconds`, and under `compile`: the compile time, eager/compiled step
  ratios and the steps after which compiling has paid for itself).

The implementations alternate `--rounds` times in one process (a busy machine slows all of them
alike); each round runs `--warmup` untimed then `--steps` timed steps. Reported: median step time, the
ratio diffusers / tinylllite (> 1: tinylllite is faster), peak memory, trainable parameters, and the
FLOPs of one step counted by `torch.utils.flop_counter.FlopCounterMode` (on a GPU also the achieved
TFLOP/s against a bf16 matmul measured in the same process).

    python bench/train_step.py --threads 1 --out bench/results/cpu_train_step.json
    python bench/train_step.py --device cuda --shape sd15 --precision bf16 --batch 4
    python bench/train_step.py --impls tinylllite,tinylllite-compiled --batch 16 --out bench/results/cpu_compile.json
"""
import argparse
import time

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel
from torch.utils.flop_counter import FlopCounterMode

import common
from common import control_branch, hint, training

EAGER = ("tinylllite", "diffusers", "lllite")  # the default set: compiling takes minutes, so it is asked for
IMPLEMENTATIONS = (*EAGER, "tinylllite-compiled", "lllite-compiled")
LEARNING_RATE = 1e-5  # the original's; the speed does not depend on it
MAX_GRAD_NORM = 1.0  # diffusers' default; tinylllite's --max-grad-norm 1.0
LOG_EVERY = 10  # tutorial_train.py's default: the loss and NaN flags are read once per 10 steps


class Implementation:
    """One trainer's step on a fixed batch: `step()` runs forward, backward and the optimizer update."""

    def __init__(self, name: str, step, params: list[torch.nn.Parameter]):
        self.name, self.step, self.params = name, step, params


def optimizer_for(params, args):
    if args.fused_adamw:
        return torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.01, fused=True)
    return training.make_optimizer(params, LEARNING_RATE)


def tinylllite_implementation(name, base, control, batch, args, device) -> Implementation:
    """tutorial_train.py's step: loss under autocast, NaN checks, clipping at 1.0, AdamW (GradScaler for fp16)."""
    named = training.prepare_trainable(base, control)
    params = [p for _, p in named]
    if args.gradient_checkpointing:
        control_branch.enable_gradient_checkpointing(base.unet, control)
    optimizer = optimizer_for(params, args)
    scaler = training.grad_scaler(device, args.precision)
    scheduler = training.training_scheduler(base)

    loss_fn = training.TrainingLoss(base, control, scheduler, params)
    if name.endswith("-compiled"):  # what `tutorial_train.py --compile` runs
        loss_fn = torch.compile(loss_fn, mode=args.compile_mode)
    finite, steps = training.FiniteCheck(named, device), [0]

    def step():
        optimizer.zero_grad(set_to_none=True)
        with training.autocast(device, args.precision), hint.checked_on_host():
            loss = loss_fn(batch)
        finite.add_loss(loss)
        (scaler.scale(loss) if scaler else loss).backward()
        training.optimizer_step(optimizer, scaler, params, MAX_GRAD_NORM, finite)  # NaN flags, clipping, AdamW
        finite.next_step()
        steps[0] += 1
        if steps[0] % LOG_EVERY == 0:  # the log line: the loss and the NaN flags come back together
            loss.item()
            finite.read(scaler)
    return Implementation(name, step, params)


def diffusers_implementation(base, controlnet: ControlNetModel, batch, args, device) -> Implementation:
    """train_controlnet.py's step, with the batch's latents and text embeddings given instead of encoded."""
    unet, weight_dtype = base.unet, base.unet.dtype
    controlnet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        controlnet.enable_gradient_checkpointing()
    params = list(controlnet.parameters())
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scaler = training.grad_scaler(device, args.precision)
    noise_scheduler = training.training_scheduler(base)
    hidden, hint = batch["hidden"].to(weight_dtype), batch["hint"].to(weight_dtype)

    def step():
        latents, noise, t = batch["latents"], batch["noise"], batch["timesteps"]
        noisy = noise_scheduler.add_noise(latents.float(), noise.float(), t).to(dtype=weight_dtype)
        with training.autocast(device, args.precision):  # accelerate wraps only the prepared ControlNet
            down, mid = controlnet(noisy, t, encoder_hidden_states=hidden, controlnet_cond=hint, return_dict=False)
        pred = unet(noisy, t, encoder_hidden_states=hidden,
                    down_block_additional_residuals=[r.float().to(dtype=weight_dtype) for r in down],
                    mid_block_additional_residual=mid.float().to(dtype=weight_dtype), return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.detach().item()  # the progress bar's loss
    return Implementation("diffusers", step, params)


def build_implementations(base, batch, args, device, names) -> dict[str, Implementation]:
    """The requested implementations on one base; branches are built before the base goes to half precision."""
    branches = {}
    for name in ("tinylllite", "tinylllite-compiled"):
        if name in names:
            branches[name] = common.ControlNet.from_unet(base.unet, vae_scale_factor=base.vae_scale_factor)
    if "diffusers" in names:
        with device:  # initialised where it runs
            branches["diffusers"] = ControlNetModel.from_unet(base.unet)
    for name in ("lllite", "lllite-compiled"):
        if name in names:
            branches[name] = common.lllite_copy(base, args.shape)
    impls = {}
    for name in names:
        if name in ("tinylllite", "tinylllite-compiled"):
            impls[name] = tinylllite_implementation(name, base, branches[name], batch, args, device)
        elif name == "diffusers":
            base.unet.requires_grad_(False)
            impls[name] = diffusers_implementation(base, branches[name], batch, args, device)
        else:
            lllite_base, lllite = branches[name]
            impls[name] = tinylllite_implementation(name, lllite_base, lllite, batch, args, device)
    if device.type == "cuda":  # tutorial_train.py's rule: frozen weights in the run's half precision
        for frozen in [base] + [b[0] for b in branches.values() if isinstance(b, tuple)]:
            training.cast_frozen_weights_to_half(frozen, args.precision)
    apply_levers(base, branches, args, batch)
    return impls


def apply_levers(base, branches, args, batch) -> None:
    """--channels-last acts on every network of the run (the frozen UNet is shared)."""
    modules = [base.unet, *(b[0].unet if isinstance(b, tuple) else b for b in branches.values())]
    if args.channels_last:
        for module in modules:
            module.to(memory_format=torch.channels_last)
        for key in ("latents", "noise", "hint"):
            batch[key] = batch[key].contiguous(memory_format=torch.channels_last)


def count_flops(impl: Implementation) -> int:
    """FLOPs of one step (forward and backward), counted on the operators torch knows formulas for."""
    counter = FlopCounterMode(display=False)
    with counter:
        impl.step()
    return counter.get_total_flops()


def matmul_peak_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """Achieved TFLOP/s of an n x n bf16 matmul: the ceiling a training step can be compared to."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    seconds = common.timed(lambda: [a @ b for _ in range(repeats)], device)
    return round(2 * n**3 * repeats / seconds / 1e12, 1)


def measure(impls: dict[str, Implementation], args, device) -> dict[str, dict]:
    """Alternate the implementations; per implementation: every timed step and the peak memory."""
    times = {name: [] for name in impls}
    peaks = {name: 0.0 for name in impls}
    first = {}  # the very first step of each: a compiled one compiles there
    for _ in range(args.rounds):
        for name, impl in impls.items():
            if name not in first:
                first[name] = common.timed(impl.step, device)
            for _ in range(args.warmup):
                impl.step()
            common.synchronize(device)
            common.reset_peak_memory(device)
            times[name] += [common.timed(impl.step, device) for _ in range(args.steps)]
            peaks[name] = max(peaks[name], common.peak_memory_mib(device))
    return {name: dict(common.summary(times[name]), first_step_seconds=round(first[name], 2), peak_memory_mib=peaks[name],
                       trainable_parameters=common.count_parameters(impls[name].params)) for name in impls}


def break_even(compiled: dict, eager: dict) -> int | None:
    """Steps after which the compiled step has paid for its compilation (None if it is not faster)."""
    saved_ms = eager["median_ms"] - compiled["median_ms"]
    if saved_ms <= 0:
        return None
    return round((compiled["first_step_seconds"] * 1000 - compiled["median_ms"]) / saved_ms)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser, steps=5, warmup=2, batch=4)
    parser.add_argument("--impls", default=",".join(EAGER),
                        help=f"comma list of {', '.join(IMPLEMENTATIONS)} (one alone: a clean memory number)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--fused-adamw", action="store_true", help="lever: fused AdamW for tinylllite's optimizers")
    parser.add_argument("--channels-last", action="store_true", help="lever: channels-last networks and inputs")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode of the *-compiled implementations "
                        "(default, max-autotune-no-cudagraphs, reduce-overhead)")
    parser.add_argument("--no-flops", action="store_true", help="skip counting the FLOPs of one step")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.check_args(args)
    names = [n for n in args.impls.split(",") if n]
    if not names or set(names) - set(IMPLEMENTATIONS):
        raise common.InputError(f"--impls {args.impls!r}: choose from {', '.join(IMPLEMENTATIONS)}")
    started = time.perf_counter()
    base = common.build_base(args.shape, device)
    batch = common.random_batch(base, args.batch, device, args.seed)
    impls = build_implementations(base, batch, args, device, names)
    flops = {} if args.no_flops else {name: count_flops(impl) for name, impl in impls.items()
                                      if not name.endswith("-compiled")}
    results = measure(impls, args, device)
    for name, flop in flops.items():
        results[name]["flops_per_step"] = flop
        results[name]["gflop_per_sample"] = round(flop / args.batch / 1e9, 2)
        results[name]["achieved_tflops"] = round(flop / (results[name]["median_ms"] / 1000) / 1e12, 3)
    result = dict(benchmark="train_step", **common.environment(device, args),
                  image_size=common.image_size(base), implementations=results)
    for name in ("tinylllite", "lllite"):  # what compiling costs up front, and what it gains per step
        if f"{name}-compiled" in results and name in results:
            compiled, eager = results[f"{name}-compiled"], results[name]
            result.setdefault("compile", {})[name] = dict(
                compile_seconds=round(compiled["first_step_seconds"] - compiled["median_ms"] / 1000, 1),
                eager_over_compiled_median=round(eager["median_ms"] / compiled["median_ms"], 3),
                eager_over_compiled_fastest=round(eager["min_ms"] / compiled["min_ms"], 3),
                break_even_steps=break_even(compiled, eager))
    if "tinylllite" in results:
        ours = results["tinylllite"]["median_ms"]
        result["ratios"] = {f"{name}/tinylllite": round(r["median_ms"] / ours, 3)
                            for name, r in results.items() if name != "tinylllite"}
        fastest = results["tinylllite"]["min_ms"]  # less sensitive to a busy machine than the median
        result["ratios_of_fastest_steps"] = {f"{name}/tinylllite": round(r["min_ms"] / fastest, 3)
                                             for name, r in results.items() if name != "tinylllite"}
    if device.type == "cuda":
        result["bf16_matmul_tflops"] = peak = matmul_peak_tflops(device)
        for r in results.values():
            if "achieved_tflops" in r:
                r["fraction_of_matmul_peak"] = round(r["achieved_tflops"] / peak, 3)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return common.report(result, args.out)


if __name__ == "__main__":
    raise SystemExit(common.run_command("train_step.py", main))
