"""What a training run shows: image panels, the fidelity evaluation, metrics.jsonl and its plot.

Mirrors the original's `ImageLogger` (lllyasviel/ControlNet `cldm/logger.py`, called from
`tutorial_train.py` with `ControlLDM.log_images`): every `logger_freq` steps (and at step 0) it writes,
for 4 training items, the panels `control`, `reconstruction` (VAE round trip of the target),
`conditioning` (the prompt drawn as text) and `samples_cfg_scale_9.00` (DDIM 50 steps, eta 0, CFG 9,
unconditional = empty prompt + same hint) to `OUT/image_log/<panel>_gs-<step>.png`, and once more at
the last step. Added: a held-out grid that labels its rows and columns, user validation pairs
(diffusers' `--validation_prompt/--validation_image`), all made by `sample.sample` with the weights in
memory, and a control-fidelity number (Fill50K's disc IoU, or edge F1 on the user's Canny pairs) whose
take-off is marked in the plot. `RunLog` calls all of it at the steps a run's settings name.
Left out: the original's per-epoch folders and its EMA/`log_images` switches.
"""
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from tinylllite.sample import sample, to_uint8 as decoded_to_uint8
from tinylllite.data.edge_fidelity import sample_edge_f1
from tinylllite.data.fidelity import fill50k_fidelity
from tinylllite.files.atomic import atomic_file
from tinylllite.training import autocast



def save_png(image: np.ndarray, path: Path) -> None:
    with atomic_file(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def row(images) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (H, N*W, 3) strip with a 2 px gap."""
    gap = np.full((images[0].shape[0], 2, 3), 255, np.uint8)
    return np.concatenate([part for image in images for part in (image, gap)][:-1], axis=1)


def text_panel(prompt: str, size: int) -> np.ndarray:
    """The prompt drawn on white, wrapped to the image width (the original's `conditioning` panel)."""
    canvas = Image.new("RGB", (size, size), "white")
    font_px = max(size // 8, 7)  # the original draws ~40 chars per 512 px line
    draw, font, line, lines = ImageDraw.Draw(canvas), ImageFont.load_default(size=font_px), "", []
    chars_per_line = max(int(size / (0.55 * font_px)), 4)
    for word in prompt.split():
        if line and len(line) + 1 + len(word) > chars_per_line:
            lines.append(line)
            line = ""
        line = f"{line} {word}".strip()
    draw.multiline_text((2, 2), "\n".join(lines + [line]), fill="black", font=font, spacing=1)
    return np.asarray(canvas)


def to_uint8(image01_or_pm1: np.ndarray, signed: bool) -> np.ndarray:
    """HWC float in [-1, 1] (signed) or [0, 1] -> uint8."""
    scaled = (np.asarray(image01_or_pm1) + 1) * 127.5 if signed else np.asarray(image01_or_pm1) * 255
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


@torch.no_grad()
def log_training_panels(base, control, items: list[dict], step: int, out_dir, steps: int = 50, cfg: float = 9.0,
                        seed: int = 0) -> list[Path]:
    """The original's four panels for these dataset items (dicts jpg [-1,1], txt, hint [0,1], HWC), one strip
    each under the original's file names, each strip labelled on its left with what it shows."""
    hints = np.stack([to_uint8(item["hint"], signed=False) for item in items])  # (N, H, W, 3)
    targets = torch.stack([torch.as_tensor(item["jpg"]) for item in items]).permute(0, 3, 1, 2)  # (N, 3, H, W)
    vae = base.vae
    latents = vae.encode(targets.to(vae.device, vae.dtype)).latent_dist.mode()
    reconstruction = vae.decode(latents).sample.permute(0, 2, 3, 1).float().cpu().numpy()  # (N, H, W, 3)
    prompts = [item["txt"] for item in items]
    samples = sample(base, prompts, control, hints, steps=steps, cfg=cfg, seed=seed)
    panels = {"control": hints, "reconstruction": [to_uint8(r, signed=True) for r in reconstruction],
              "conditioning": [text_panel(p, hints.shape[1]) for p in prompts],
              f"samples_cfg_scale_{cfg:.2f}": samples}
    folder = Path(out_dir) / "image_log"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}_gs-{step:06d}.png" for name in panels]
    for path, (name, images) in zip(paths, panels.items()):
        save_png(row([text_panel(name.replace("_", " "), hints.shape[1])] + list(images)), path)
    return paths


def log_pairs_grid(base, control, prompts: list[str], hints: np.ndarray, path: Path, steps: int, cfg: float,
                   seed: int = 0, targets: np.ndarray | None = None, hint_name: str = "hint") -> np.ndarray:
    """A grid that reads on its own: one column per prompt (written above it), rows labelled on the left:
    the hint, the sample, and the target when known. Used for the held-out grid and validation pairs."""
    size = hints.shape[1]
    samples = sample(base, prompts, control, hints if control is not None else None, steps=steps, cfg=cfg, seed=seed,
                     height=size, width=size)
    rows = {hint_name: hints, "sample": samples} | ({"target": targets} if targets is not None else {})
    lines = [row([np.full((size, size, 3), 255, np.uint8)] + [text_panel(p, size) for p in prompts])]
    lines += [row([text_panel(name, size)] + list(images)) for name, images in rows.items()]
    gap = np.full((2, lines[0].shape[1], 3), 255, np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(np.concatenate([part for line in lines for part in (line, gap)][:-1], axis=0), path)
    return samples


@torch.no_grad()
def evaluate(base, control, pairs: list, metric: str = "fill50k-iou", steps: int = 20, cfg: float = 9.0,
             sampler: str = "ddim", batch_size: int = 16, seed: int = 0, canny_low: float = 100,
             canny_high: float = 200, deadline: float | None = None) -> dict:
    """Control fidelity of `sample` outputs on held-out pairs, averaged: {"fidelity_iou", "colour_error"} for
    Fill50K (pairs: Fill50KPair), {"edge_f1"} for Canny data (pairs: dataset items, hint in [0, 1] and txt).

    Image i is sampled with seed + i, so a score does not depend on `batch_size`. With a `deadline`
    (time.time()), batches that would end after it are left out: "pairs" says how many were scored.
    """
    if metric == "fill50k-iou":
        prompts, hints = [p.prompt for p in pairs], np.stack([p.source for p in pairs])  # (N, H, W, 3) uint8
        def score(image, i):
            found = fill50k_fidelity(image, pairs[i].source, pairs[i].prompt)
            return {"fidelity_iou": found["iou"], "colour_error": found["colour_error"]}
    elif metric == "edge-f1":
        prompts = [item["txt"] for item in pairs]
        hints = np.stack([np.round(np.asarray(item["hint"]) * 255).astype(np.uint8) for item in pairs])
        def score(image, i):
            return {"edge_f1": sample_edge_f1(image, hints[i], canny_low, canny_high)}
    else:
        raise ValueError(f"unknown evaluation metric {metric!r}; use fill50k-iou or edge-f1")
    scores, started = [], time.time()
    for start in range(0, len(pairs), batch_size):
        per_batch = (time.time() - started) / (start // batch_size) if start else 0.0
        if deadline is not None and time.time() + per_batch > deadline:
            break
        images = sample(base, prompts[start:start + batch_size], control, hints[start:start + batch_size],
                        steps=steps, cfg=cfg, sampler=sampler, seed=seed + start)
        scores += [score(image, start + offset) for offset, image in enumerate(images)]
    if not scores:
        return {"pairs": 0}
    return {**{name: float(np.mean([s[name] for s in scores])) for name in scores[0]}, "pairs": len(scores)}


@torch.no_grad()
def vae_ceiling(base, pairs: list, batch_size: int = 16) -> dict:
    """The Fill50K scores of the VAE's own round trip of the true targets (posterior mode, decoded as `sample`
    decodes): the ceiling of every branch, whose samples all pass through this VAE's decoder."""
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        targets = torch.from_numpy(np.stack([p.target for p in chunk])).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = base.vae.encode(targets.to(base.device, base.vae.dtype)).latent_dist.mode()
        for pair, image in zip(chunk, decoded_to_uint8(base.vae.decode(latents).sample)):
            found = fill50k_fidelity(image, pair.source, pair.prompt)
            scores.append((found["iou"], found["colour_error"]))
    return {"vae_ceiling_iou": float(np.mean([s[0] for s in scores])),
            "vae_ceiling_colour_error": float(np.mean([s[1] for s in scores]))}


SAVE_RESERVE_SECONDS = 5.0  # what a run keeps of --max-minutes for its final checkpoint
FINAL_MARGIN = 1.25  # the final evaluation and image log are planned at this times the slowest seen
SCORE_NAMES = {"fidelity_iou": "IoU", "colour_error": "colour error", "edge_f1": "edge F1"}
CONTROL_SCORES = ("fidelity_iou", "edge_f1")  # the number whose jump is the "sudden convergence"
TAKE_OFF = 0.5  # the score at which control has visibly arrived


class MetricsLog:
    """OUT/metrics.jsonl, one JSON object per log event, and OUT/metrics.png plotting its curves by step."""

    NOT_PLOTTED = ("lr", "minutes", "eval_pairs")  # bookkeeping fields
    CEILINGS = {"fidelity_iou": "vae_ceiling_iou", "colour_error": "vae_ceiling_colour_error"}  # drawn as lines

    def __init__(self, out_dir, append: bool = False, keep_until: int = 0):
        """append: continue a resumed run's file, dropping events after `keep_until` (logged after its checkpoint)."""
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [e for e in self.events() if e["step"] <= keep_until] if append and self.path.exists() else []
        with atomic_file(self.path) as tmp:
            tmp.write_text("".join(json.dumps(e) + "\n" for e in kept))

    def write(self, **event) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(event) + "\n")

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    @staticmethod
    def take_off(events: list[dict]) -> tuple[str, int] | None:
        """(score name, first step at which the control score reached TAKE_OFF), or None while it has not."""
        for e in events:
            for name in CONTROL_SCORES:
                if e.get(name, -1) >= TAKE_OFF:
                    return name, e["step"]
        return None

    def summary(self, last_loss: float | None = None) -> str:
        """One line for the end of a run: when control arrived, the last scores, and the loss beside them."""
        events = self.events()
        losses = [e["loss"] for e in events if "loss" in e]
        scores = [e for e in events if any(k in e for k in CONTROL_SCORES)]
        parts = []
        if scores:
            name = next(k for k in CONTROL_SCORES if k in scores[-1])
            take_off = self.take_off(events)
            parts.append(f"{SCORE_NAMES[name]} {scores[0][name]:.3f} -> {scores[-1][name]:.3f}, first >= {TAKE_OFF} at "
                         f"step {take_off[1]}" if take_off else f"{SCORE_NAMES[name]} {scores[-1][name]:.3f}, "
                         f"not yet >= {TAKE_OFF}")
        if losses:
            parts.append(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        elif last_loss is not None:
            parts.append(f"last loss {last_loss:.4f}")
        return "; ".join(parts) or "nothing logged"

    def plot(self) -> Path | None:
        """OUT/metrics.png, one panel per logged number; None (and no file) while nothing is logged yet."""
        events = self.events()
        fields = sorted({k for e in events for k, v in e.items()
                         if k not in ("step", *self.NOT_PLOTTED, *self.CEILINGS.values()) and isinstance(v, (int, float))})
        ceilings = {name: e[ceiling] for e in events for name, ceiling in self.CEILINGS.items() if ceiling in e}
        if not fields:
            return None
        figure = Figure(figsize=(6, 2.2 * len(fields)))  # drawn off-screen: no pyplot, no backend chosen
        axes = figure.subplots(len(fields), 1, squeeze=False)
        take_off = self.take_off(events)
        for axis, name in zip(axes[:, 0], fields):
            points = [(e["step"], e[name]) for e in events if name in e]
            axis.plot(*zip(*points), marker="." if len(points) < 50 else None)
            axis.set_ylabel(name)
            if name in ceilings:  # what the VAE's own round trip of the true targets scores
                axis.axhline(ceilings[name], color="0.5", linewidth=0.8, linestyle=":")
                axis.annotate(f"VAE round trip {ceilings[name]:.3g}", (points[0][0], ceilings[name]), fontsize=7,
                              color="0.4", textcoords="offset points", xytext=(2, 2 if name == "fidelity_iou" else -9))
            if take_off:  # the sudden convergence, marked on every panel (the loss barely moves there)
                axis.axvline(take_off[1], color="tab:red", linewidth=0.8, linestyle="--")
                if name == take_off[0]:  # the label on the side of the line with more room
                    left = take_off[1] > points[-1][0] / 2
                    axis.annotate(f"{SCORE_NAMES[name]} >= {TAKE_OFF} at step {take_off[1]}", (take_off[1], TAKE_OFF),
                                  textcoords="offset points", xytext=(-4 if left else 4, -12), fontsize=8,
                                  color="tab:red", ha="right" if left else "left")
        axes[-1, 0].set_xlabel("optimizer step")
        figure.tight_layout()
        out = self.path.with_suffix(".png")
        with atomic_file(out) as tmp:
            figure.savefig(tmp, format="png", dpi=80)
        return out


class RunLog:
    """What rank 0 of a training run writes besides checkpoints: config.json, metrics.jsonl and its plot,
    the image logs and the fidelity evaluations, at the steps the run's settings name."""

    def __init__(self, out: Path, settings: dict, base, control, dataset, validation: list[tuple[str, np.ndarray]], clock,
                 heldout: list, resumed_at: int | None = None, weights=None):
        """settings: the run's resolved settings (tutorial_train.py's block); validation: (prompt, uint8 hint image)
        pairs; clock: the StopRule (.minutes(), .deadline); heldout: the evaluation's pairs (Fill50KPair for fill50k-iou, dataset items
        for edge-f1); resumed_at: the step of the checkpoint a resumed run continues from."""
        self.out, self.s, self.base, self.control, self.dataset = Path(out), settings, base, control, dataset
        self.validation, self.clock, self.heldout, self.resumed_at = validation, clock, heldout, resumed_at
        self.weights = weights or contextlib.nullcontext  # e.g. WeightAverage.applied: evaluate and log its average
        self.metrics = MetricsLog(out, append=resumed_at is not None, keep_until=resumed_at or 0)
        self.evaluation_seconds = self.image_seconds = 0.0  # how long the slowest of each took
        self.last_grid = -1
        self.ceiling_logged = any("vae_ceiling_iou" in e for e in self.metrics.events())  # a resumed run's own

    @property
    def evaluating(self) -> bool:
        return self.s["eval_metric"] != "none" and self.s["eval_every"] > 0 and bool(self.heldout)

    def write_config(self, run: dict) -> Path:
        """config.json of a new run (run identity + settings); a resumed run keeps it and writes
        config_resume_<step>.json beside it."""
        name = "config.json" if self.resumed_at is None else f"config_resume_{self.resumed_at}.json"
        path = self.out / name
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(dict(run, settings=self.s), indent=1))
        return path

    def loss(self, step: int, value: float, lr: float) -> None:
        """A metrics line: the mean loss of the steps since the last one (the loop reads it every log_every steps)."""
        self.metrics.write(step=step, loss=value, lr=lr)

    def after_step(self, step: int) -> None:
        if self.s["logger_freq"] and step % self.s["logger_freq"] == 0:
            with self.weights():
                self.images(step)
        if self.evaluating and step % self.s["eval_every"] == 0:
            with self.weights():
                self.evaluate(step)

    def evaluate(self, step: int) -> None:
        """Fidelity on held-out pairs with the same `sample` as deployment, under the run's autocast."""
        started, s = time.time(), self.s
        deadline = None if self.clock.deadline is None else self.clock.deadline - SAVE_RESERVE_SECONDS
        with torch.no_grad(), autocast(self.base.device, s["mixed_precision"]):
            scores = evaluate(self.base, self.control, self.heldout, s["eval_metric"], steps=s["eval_steps"],
                              cfg=s["eval_cfg"], canny_low=s["canny_low"], canny_high=s["canny_high"],
                              deadline=deadline)
        self.control.train()
        pairs = scores.pop("pairs")
        if pairs == 0:
            tqdm.write(f"step {step}: evaluation skipped: it would not end inside --max-minutes")
            return
        if pairs < len(self.heldout):  # a shortened evaluation says so, and is not the time of a whole one
            tqdm.write(f"step {step}: evaluation shortened to {pairs} of {len(self.heldout)} held-out pairs "
                       f"to end inside --max-minutes")
        self.metrics.write(step=step, minutes=round(self.clock.minutes(), 2), **scores,
                           **({"eval_pairs": pairs} if pairs < len(self.heldout) else {}))
        if s["eval_metric"] == "fill50k-iou" and not self.ceiling_logged:  # once per run, beside its first scores
            self.metrics.write(step=step, **vae_ceiling(self.base, self.heldout))
            self.ceiling_logged = True
        self.metrics.plot()
        if pairs == len(self.heldout):  # a shortened evaluation is not the time of a whole one
            self.evaluation_seconds = max(self.evaluation_seconds, time.time() - started)
        shown = ", ".join(f"{SCORE_NAMES[k]} {v:.3f}" for k, v in scores.items())
        tqdm.write(f"step {step}: {shown} ({time.time() - started:.0f} s on {pairs} held-out pairs)")

    @property
    def final_seconds(self) -> float:
        """How long `finish` may take: one more evaluation and one more image log (the slowest of each so far,
        with a quarter more for a machine that slows down), and the final checkpoint's reserve. The loop
        stops when this no longer fits, so the last evaluation is a whole one."""
        return FINAL_MARGIN * (self.evaluation_seconds + self.image_seconds) + SAVE_RESERVE_SECONDS

    def images(self, step: int) -> None:
        """The original's panels for 4 training items, the held-out grid and the user's validation pairs."""
        base, control, s, folder = self.base, self.control, self.s, self.out / "image_log"
        started = time.time()
        with autocast(base.device, s["mixed_precision"]):
            items = [self.dataset[i] for i in range(min(4, len(self.dataset)))]
            log_training_panels(base, control, items, step, self.out, cfg=9.0, seed=s["seed"])
            if self.heldout and s["eval_metric"] == "fill50k-iou":
                grid = self.heldout[:8]
                log_pairs_grid(base, control, [p.prompt for p in grid], np.stack([p.source for p in grid]),
                               folder / f"heldout_gs-{step:06d}.png", steps=s["eval_steps"], cfg=s["eval_cfg"],
                               targets=np.stack([p.target for p in grid]), hint_name="outline")
            for i, (prompt, hint) in enumerate(self.validation):
                log_pairs_grid(base, control, [prompt], hint[None], folder / f"validation{i}_gs-{step:06d}.png",
                               steps=50, cfg=9.0)
        control.train()
        self.last_grid, self.image_seconds = step, max(self.image_seconds, time.time() - started)

    def finish(self, step: int, last_loss: float | None = None) -> None:
        """The last evaluation and image log (if this step had none), the final plot, and the run's summary line."""
        with self.weights():
            if self.evaluating and step % self.s["eval_every"]:
                self.evaluate(step)
            if self.s["logger_freq"] and self.last_grid != step:
                self.images(step)
        self.metrics.plot()
        print(f"stopped at step {step} after {self.clock.minutes():.1f} min; {self.metrics.summary(last_loss)}; "
              f"checkpoints in {self.out / 'checkpoints'}, metrics in {self.metrics.path}")
