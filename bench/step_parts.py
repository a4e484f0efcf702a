"""Two parts of the training step, each done both ways in one process: which way the step takes, and why.

- the optimizer update: torch's AdamW in its default implementation (on the CPU a loop over the tensors,
  on a GPU the multi-tensor `foreach` one) against its fused kernel (`training.make_optimizer` asks for
  the fused one on a GPU and on the CPU), over the trainable tensors of a ControlNet and of an LLLite;
- LLLite's conditioning embedding, forward and backward: every module's own conv stack
  (`LLLite.set_conditioning(image)`, kohya's sums, what sampling uses) against one stack per depth
  (`set_conditioning(image, together=True)`, `lllite.embed_together`, what training uses).

The two ways alternate `--rounds` times; each round runs `--warmup` untimed then `--steps` timed calls.
Reported: the median milliseconds of each way and the ratio default / fused and per-module / together
(> 1: the way training takes is faster).

    python bench/step_parts.py --threads 2 --out bench/results/cpu_step_parts.json
    python bench/step_parts.py --device cuda --shape sd15
"""
import argparse

import torch

import common
from common import training


def adamw_update(params: list[torch.nn.Parameter], fused: bool):
    """One AdamW step over `params` (gradients set once, to ones: the update's cost does not depend on them)."""
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=fused)
    return optimizer.step


def lllite_embedding(lllite, hint: torch.Tensor, together: bool):
    """Embed `hint` for every module and backpropagate a sum of the embeddings into conditioning1."""
    def run():
        lllite.set_conditioning(hint, together=together)
        sum(m.embedding.float().square().mean() for m in lllite.values()).backward()
    return run


def measure(ways: dict, args, device) -> dict:
    seconds = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, fn in ways.items():
            for _ in range(args.warmup):
                fn()
            seconds[name] += [common.timed(fn, device) for _ in range(args.steps)]
    return {name: common.summary(s) for name, s in seconds.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser, steps=20, warmup=3, batch=16)
    args = parser.parse_args(argv)
    device = common.check_args(args)
    base = common.build_base(args.shape, device)
    lllite_base, lllite = common.lllite_copy(base, args.shape)
    controlnet = common.ControlNet.from_unet(base.unet, vae_scale_factor=base.vae_scale_factor).to(device)
    lllite.to(device)
    hint = common.random_batch(base, args.batch, device, args.seed)["hint"]

    results = {}
    for name, branch in (("controlnet", controlnet), ("lllite", lllite)):
        params = list(branch.parameters())
        times = measure({"default_loop": adamw_update(params, fused=False), "fused": adamw_update(params, fused=True)},
                        args, device)
        results[f"adamw_{name}"] = dict(tensors=len(params), parameters=common.count_parameters(params), **times,
                                        ratio=round(times["default_loop"]["median_ms"] / times["fused"]["median_ms"], 2))
    training.prepare_trainable(lllite_base, lllite)  # conditioning1 trainable, the base frozen
    times = measure({"per_module": lllite_embedding(lllite, hint, together=False),
                     "together": lllite_embedding(lllite, hint, together=True)}, args, device)
    results["lllite_embedding"] = dict(modules=len(lllite), **times,
                                       ratio=round(times["per_module"]["median_ms"] / times["together"]["median_ms"], 2))
    return common.report(dict(benchmark="step_parts", environment=common.environment(device, args), **results), args.out)


if __name__ == "__main__":
    raise SystemExit(common.run_command("step_parts.py", main))
