"""How much the evaluation's own settings move a trained branch's score: CFG and sampler, on one checkpoint.

The default job reports IoU at one fixed setting (64 held-out pairs, 20 DDIM steps, CFG 3). The same
weights score differently at another CFG or sampler; this table says by how much, so a reader knows what
the reported number means. Every row scores the same 64 held-out pairs (the job's seed) with
`tinylllite.run.image_log.evaluate`, as the job does.

    python bench/eval_settings.py bench/results/default_job_controlnet bench/results/default_job_lllite \
        --out bench/results/cpu_eval_settings.json
"""
import argparse
import json
from pathlib import Path

import torch

from tinylllite.data.fidelity import evaluation_pairs
from tinylllite.files.checkpoint import load_control
from tinylllite.run.image_log import evaluate
from tinylllite.sd.tiny_sd import load_tiny_sd

SETTINGS = (  # (sampler, steps, cfg): the job's own first
    ("ddim", 20, 3.0), ("ddim", 20, 2.0), ("ddim", 20, 1.5), ("ddim", 20, 5.0), ("unipc", 50, 2.0), ("unipc", 50, 3.0))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (their newest checkpoint) or control files")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = load_tiny_sd()
    pairs = evaluation_pairs(args.pairs, base.unet.config.sample_size * base.vae_scale_factor)
    report = dict(benchmark="eval_settings", pairs=args.pairs, runs={})
    for run in args.runs:
        control = load_control(base, run)
        rows = []
        for sampler, steps, cfg in SETTINGS:
            scores = evaluate(base, control, pairs, steps=steps, cfg=cfg, sampler=sampler)
            rows.append(dict(sampler=sampler, steps=steps, cfg=cfg, iou=round(scores["fidelity_iou"], 3),
                             colour_error=round(scores["colour_error"], 1)))
            print(run.name, rows[-1], flush=True)
        report["runs"][str(run)] = rows
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
