"""The tiny SD's base quality gate: does it draw the prompt's colours, from the prompt alone?

Generates one image per held-out Fill50K prompt with the shared sampler (`tinylllite.sample.sample`:
DDIM, 50 steps, CFG 9, unconditional = empty prompt) and scores it with
`tinylllite.data.fidelity.fill50k_fidelity` against the pair's own outline:

- colour error (position-free): must be <= 40 (chance is about 147), aim <= 20;
- IoU: should stay near what a disc at a random place scores, since the base was never told where.

Also reports the VAE round trip of the same pairs' targets (IoU should be >= 0.95: the control branch can
place discs no sharper than the VAE decodes them). Held-out pairs: `make_pair(seed=1, i)` with both
colours at least 60 apart (`distinguishable`); training used seed 0.

    python bench/tiny_sd_gate.py [--weights DIR] [--n 64] [--report]

`--report` writes the numbers into DIR/training_report.json under "gate".
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tinylllite.data.fidelity import chance_colour_error, distinguishable, fill50k_fidelity
from tinylllite.data.fill50k import make_pair
from tinylllite.files.atomic import atomic_file
from tinylllite.sample import sample, to_uint8
from tinylllite.sd.tiny_sd import TINY_IMAGE_SIZE, WEIGHTS_DIR, load_tiny_sd

HELD_OUT_SEED = 1


def held_out_pairs(n: int) -> list:
    pairs, index = [], 0
    while len(pairs) < n:
        pair = make_pair(HELD_OUT_SEED, index, TINY_IMAGE_SIZE)
        if distinguishable(pair.prompt):
            pairs.append(pair)
        index += 1
    return pairs


def mean_scores(images: np.ndarray, pairs: list) -> dict:
    scores = [fill50k_fidelity(image, p.source, p.prompt) for image, p in zip(images, pairs)]
    return {k: round(float(np.mean([s[k] for s in scores])), 4) for k in ("iou", "colour_error")}


@torch.no_grad()
def vae_round_trip(base, pairs: list) -> np.ndarray:
    images = torch.from_numpy(np.stack([p.target for p in pairs])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return to_uint8(base.vae.decode(base.vae.encode(images).latent_dist.mode()).sample)  # (B, S, S, 3)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--n", type=int, default=64, help="held-out prompts")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=9.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="record the result in training_report.json")
    parser.add_argument("--grid", type=Path, help="save the first 16 images (over their targets) as a PNG")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = load_tiny_sd(weights_dir=args.weights)
    pairs = held_out_pairs(args.n)
    start = time.time()
    images = sample(base, [p.prompt for p in pairs], steps=args.steps, cfg=args.cfg, seed=0)  # (n, S, S, 3)
    # The IoU a disc drawn with no knowledge of the outline gets: the same images scored against shuffled outlines.
    shuffled = pairs[1:] + pairs[:1]
    result = dict(prompts=args.n, sampler=f"ddim {args.steps} steps, cfg {args.cfg}", **mean_scores(images, pairs),
                  iou_against_other_outlines=mean_scores(images, [dataclasses.replace(p, source=q.source)
                                                                  for p, q in zip(pairs, shuffled)])["iou"],
                  chance_colour_error=round(chance_colour_error(), 1), sample_s=round(time.time() - start, 1),
                  vae_round_trip=mean_scores(vae_round_trip(base, pairs), pairs))
    print(json.dumps(result, indent=2))
    if args.grid:
        shown = min(16, len(pairs))
        rows = [np.concatenate([p.target for p in pairs[:shown]], axis=1), np.concatenate(images[:shown], axis=1)]
        Image.fromarray(np.concatenate(rows, axis=0)).save(args.grid)  # targets above, samples below
    if args.report:
        path = args.weights / "training_report.json"
        report = json.loads(path.read_text()) if path.exists() else {}
        report["gate"] = result
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
