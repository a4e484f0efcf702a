"""The convergence lab: which training choices make control arrive sooner on the tiny SD.

Each variant is a set of `tutorial_train.py` flags on top of the tiny defaults, trained over several
seeds with the same budget of samples seen, evaluated every few hundred samples on a validation set
drawn with its own seed (never the held-out pairs the default job reports). The result for a run is
the number of steps, samples and minutes until the validation IoU first reaches 0.5, 0.8 and 0.9;
"not reached" is a result too. Steps and samples do not depend on how busy the machine is; minutes do.

    python bench/convergence.py                                # every variant, seeds 0 and 1, 2 runs at a time
    python bench/convergence.py --variants controlnet lllite   # some variants only
    python bench/convergence.py --summarise                    # JSON + plot from the runs already on disk

Writes bench/results/convergence/<variant>/seed<k>/ (each run's folder, as the training script
leaves it), bench/results/convergence.json and bench/results/convergence.png. Marked non-standard
variants change the architecture or protocol and say so.
"""
import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
VALIDATION_SEED = 2_000_003  # neither the training seed (0) nor the held-out evaluation seed
THRESHOLDS = (0.5, 0.8, 0.9)
# How each run computes, not what: one thread each, two runs at a time, batches encoded in the step (no shared
# cache for two runs to fill at once), the convolutions' default memory layout. The results in
# bench/results/ were made this way; the default job's speed settings change rounding only.
LAB_SPEED = ["--threads", "1", "--data-workers", "0", "--cache", "false", "--channels-last", "false"]

# The lab began with plain MSE as the tiny default; every variant but the two Min-SNR ones is measured against
# that baseline, so they turn Min-SNR off (--snr-gamma 0). Min-SNR-5 won and is the default now.
MSE = ["--snr-gamma", "0"]
# Min-SNR-5 alone: the default of the second and third rounds (the default weighting is min-snr-x0 since)
MIN_SNR = ["--snr-gamma", "5", "--loss-weighting", "min-snr"]
# name: (branch, flags on top of the tiny defaults, what it changes)
VARIANTS = {
    "controlnet": ("controlnet", MSE, "baseline: plain MSE, lr 1e-3, batch 16 (the defaults the lab began with)"),
    "controlnet-minsnr5": ("controlnet", MIN_SNR, "Min-SNR-5 loss weighting (the second round's winner)"),
    "controlnet-paper-lr1e-5-b4": ("controlnet", MSE + ["--learning-rate", "1e-5", "--batch-size", "4"],
                                   "the original's SD1.5 recipe (lr 1e-5, batch 4)"),
    "controlnet-dropout0.5": ("controlnet", MSE + ["--prompt-dropout", "0.5"], "the paper's 50 % empty prompts"),
    "controlnet-cubic": ("controlnet", MSE + ["--timestep-sampling", "cubic"], "T2I-Adapter's t = (1 - u^3) T"),
    "controlnet-lr2e-3-b32": ("controlnet", MSE + ["--learning-rate", "2e-3", "--batch-size", "32"],
                              "twice the batch and rate at equal samples seen"),
    "controlnet-lr5e-4-b8": ("controlnet", MSE + ["--learning-rate", "5e-4", "--batch-size", "8"],
                             "half the batch and rate at equal samples seen"),
    "controlnet-lr2e-3": ("controlnet", MSE + ["--learning-rate", "2e-3"], "twice the rate at the same batch"),
    "controlnet-b8": ("controlnet", MSE + ["--batch-size", "8"], "half the batch at the same rate"),
    "lllite": ("lllite", MSE, "baseline: plain MSE, lr 1e-3, batch 16, C 32, M 64, all blocks"),
    "lllite-minsnr5": ("lllite", MIN_SNR, "Min-SNR-5 loss weighting (the second round's winner)"),
    "lllite-cubic": ("lllite", MSE + ["--timestep-sampling", "cubic"], "T2I-Adapter's t = (1 - u^3) T"),
    "lllite-lr3e-3": ("lllite", MSE + ["--learning-rate", "3e-3"], "a higher rate for the small modules"),
    "lllite-c64-m128": ("lllite", MSE + ["--cond-emb-dim", "64", "--mlp-dim", "128"], "wider LLLite modules"),
    "lllite-c16-m32": ("lllite", MSE + ["--cond-emb-dim", "16", "--mlp-dim", "32"], "narrower LLLite modules"),
    "lllite-b8": ("lllite", MSE + ["--batch-size", "8"], "half the batch at the same rate"),
    "lllite-input-only": ("lllite", MSE + ["--lllite-blocks", "input"], "kohya's SD1 block set (input blocks only)"),
    # the third round asks what brings the end of a default-length run (about 2,000 steps) closer to the ceiling,
    # on top of the second round's winner (Min-SNR-5), with a longer budget (LONG_SAMPLES) than the take-off rounds
    "controlnet-long": ("controlnet", MIN_SNR, "Min-SNR-5, run longer (the third round's baseline)"),
    "controlnet-lr-decay": ("controlnet", MIN_SNR + ["--lr-decay", "0.3"], "lr falls to 0 (cosine) over the last 30 %"),
    "controlnet-x0": ("controlnet", ["--loss-weighting", "x0"], "x0 supervision: eps loss x min(1 / SNR, 5)"),
    "lllite-long": ("lllite", MIN_SNR, "Min-SNR-5, run longer (the third round's baseline)"),
    "lllite-lr-decay": ("lllite", MIN_SNR + ["--lr-decay", "0.3"], "lr falls to 0 (cosine) over the last 30 %"),
    "lllite-x0": ("lllite", ["--loss-weighting", "x0"], "x0 supervision: eps loss x min(1 / SNR, 5)"),
    "controlnet-x0-lr-decay": ("controlnet", ["--loss-weighting", "x0", "--lr-decay", "0.3"], "x0 and lr decay together"),
    "lllite-x0-lr-decay": ("lllite", ["--loss-weighting", "x0", "--lr-decay", "0.3"], "x0 and lr decay together"),
    "controlnet-min-snr-x0": ("controlnet", ["--loss-weighting", "min-snr-x0"],
                              "the larger of Min-SNR-5's and x0's weight at each timestep (the default now)"),
    "lllite-min-snr-x0": ("lllite", ["--loss-weighting", "min-snr-x0"],
                          "the larger of Min-SNR-5's and x0's weight at each timestep (the default now)"),
    "controlnet-x0-ema": ("controlnet", ["--loss-weighting", "x0", "--ema-decay", "0.995"],
                          "x0, evaluated with an EMA of the weights (decay 0.995)"),
    "lllite-x0-ema": ("lllite", ["--loss-weighting", "x0", "--ema-decay", "0.995"],
                      "x0, evaluated with an EMA of the weights (decay 0.995)"),
}
LONG = {"controlnet-long", "controlnet-lr-decay", "controlnet-x0", "lllite-long", "lllite-lr-decay", "lllite-x0",
        "controlnet-x0-lr-decay", "lllite-x0-lr-decay", "controlnet-x0-ema", "lllite-x0-ema", "controlnet-min-snr-x0",
        "lllite-min-snr-x0"}
LONG_SAMPLES = 24_000  # 1,500 steps at batch 16: where a default job's curve flattens, not where it takes off


def run_one(name: str, seed: int, samples: int, samples_per_eval: int, eval_pairs: int, data: Path,
            extra: list[str], max_minutes: float) -> Path:
    """Train one variant with one seed in its own process (one thread); returns its run folder."""
    branch, flags, _ = VARIANTS[name]
    flags = flags + extra
    samples = LONG_SAMPLES if name in LONG else samples
    batch = int(flags[flags.index("--batch-size") + 1]) if "--batch-size" in flags else 16
    out = RESULTS / "convergence" / name / f"seed{seed}"
    if (out / "metrics.jsonl").exists():
        return out  # done before: the lab resumes where it stopped
    partial = out.with_name(out.name + ".partial")
    subprocess.run(["rm", "-rf", str(partial)], check=True)
    argv = [sys.executable, str(REPO / "tutorial_train.py"), "--control", branch, "--data", str(data), "--out",
            str(partial), "--seed", str(seed), "--max-steps", str(samples // batch), "--max-minutes", str(max_minutes),
            "--eval-every", str(max(samples_per_eval // batch, 1)), "--eval-pairs", str(eval_pairs),
            "--eval-seed", str(VALIDATION_SEED), "--logger-freq", "0", "--checkpoint-every", str(10 ** 9),
            "--keep-checkpoints", "1", *LAB_SPEED, *flags]
    started = time.time()
    with open(RESULTS / "convergence" / f"{name}-seed{seed}.log", "w") as log:
        subprocess.run(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    subprocess.run(["rm", "-rf", str(partial / "checkpoints")], check=True)  # weights are not the result
    partial.rename(out)
    print(f"{name} seed {seed}: {(time.time() - started) / 60:.1f} min", flush=True)
    return out


def first_crossing(events: list[dict], threshold: float, batch: int) -> dict | None:
    for e in events:
        if "fidelity_iou" in e and e["fidelity_iou"] >= threshold:
            return dict(step=e["step"], samples=e["step"] * batch, minutes=e["minutes"])
    return None


def summarise(names: list[str]) -> dict:
    """Per variant and seed: the IoU curve and the first crossing of each threshold; then the medians."""
    summary = {}
    for name in names:
        runs = sorted((RESULTS / "convergence" / name).glob("seed*/config.json"))
        per_seed = []
        for config_path in runs:
            config = json.loads(config_path.read_text())
            batch, max_steps = config["settings"]["batch_size"], config["settings"]["max_steps"]
            events = [json.loads(line) for line in (config_path.parent / "metrics.jsonl").read_text().splitlines()]
            curve = [(e["step"], e["fidelity_iou"]) for e in events if "fidelity_iou" in e]
            per_seed.append(dict(
                seed=config["settings"]["seed"], batch=batch, last_step=curve[-1][0] if curve else 0,
                max_steps=max_steps, curve=curve, final_iou=curve[-1][1] if curve else None,
                reached={str(t): first_crossing(events, t, batch) for t in THRESHOLDS}))
        summary[name] = dict(branch=VARIANTS[name][0], flags=VARIANTS[name][1], note=VARIANTS[name][2], runs=per_seed)
    return summary


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for axis, branch in zip(axes, ("controlnet", "lllite")):
        names = [n for n, v in summary.items() if v["branch"] == branch]
        for colour, name in zip(plt.cm.tab10.colors, names):
            for k, run in enumerate(summary[name]["runs"]):
                samples = [step * run["batch"] / 1000 for step, _ in run["curve"]]
                axis.plot(samples, [iou for _, iou in run["curve"]], color=colour, alpha=0.8,
                          label=name if k == 0 else None, linestyle="-" if k == 0 else "--")
        for t in THRESHOLDS:
            axis.axhline(t, color="grey", linewidth=0.5)
        axis.set_title(branch)
        axis.set_xlabel("thousand samples seen")
        axis.legend(fontsize=7)
    axes[0].set_ylabel("validation IoU")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--samples", type=int, default=12_800, help="samples seen per run (800 steps at batch 16)")
    p.add_argument("--samples-per-eval", type=int, default=3_200)
    p.add_argument("--eval-pairs", type=int, default=16)
    p.add_argument("--max-minutes", type=float, default=10.0, help="a run also stops here (the lab's cap)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--data", type=Path, default=REPO / "training" / "fill50k_64")
    p.add_argument("--summarise", action="store_true", help="only collect the runs already on disk")
    p.add_argument("extra", nargs="*", help="flags after -- go to every run")
    args = p.parse_args(argv)
    if not args.summarise:
        if not (args.data / "prompt.json").exists():
            from tinylllite.data.fill50k import write_fill50k

            write_fill50k(args.data, n=10_000, size=64, seed=0)  # the default job's data
        jobs = [(n, s) for n in args.variants for s in args.seeds]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: run_one(*job, args.samples, args.samples_per_eval, args.eval_pairs, args.data,
                                              args.extra, args.max_minutes), jobs))
    names = [n for n in VARIANTS if (RESULTS / "convergence" / n).is_dir()]
    summary = summarise(names)
    (RESULTS / "convergence.json").write_text(json.dumps(summary, indent=1))
    plot(summary, RESULTS / "convergence.png")
    print(json.dumps({n: {s["seed"]: s["reached"] for s in v["runs"]} for n, v in summary.items()}, indent=1))


if __name__ == "__main__":
    main()
