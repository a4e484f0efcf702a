"""How well a generated Fill50K image follows its outline and its prompt.

The original tutorial judges Fill50K results by eye ("the model suddenly learns to follow the
condition", `docs/train.md`). This file puts two numbers on it:

- `iou`: the disc the image shows against the true disc of the source outline. The image is split
  into its two dominant colours (k-means, k = 2, in RGB), and the prompt's colours decide which of
  the two is the circle: the assignment with the smaller total RGB distance to (circle, background).
  Choosing by the prompt, not by whichever assignment gives the best IoU, is what makes a disc
  painted in swapped colours score low; being a segmentation, it still works when a young model's
  colours are a little off. The true disc comes from a least-squares circle fitted to the ring's
  pixels, so outlines clipped by the border (about half of Fill50K) work too.
- `colour_error`: the mean RGB (0-255) Euclidean distance between the two dominant colours and the
  prompt's circle and background colours, under the same assignment. It ignores where the disc is,
  so a base model that draws the circle anywhere is judged on colour alone. Chance, a random colour
  pair scored against a random prompt, is 163.5 (`chance_colour_error`; letting each prompt colour
  take its nearest image colour, without a one-to-one assignment, would give 146).

Pairs whose two colours are closer than ~60 cannot be segmented reliably and are left out of
evaluation sets (`distinguishable`). Not a perceptual metric; not defined for other datasets.
"""
import re

import numpy as np

from tinylllite.errors import InputError
from tinylllite.data.fill50k import COLOURS, Fill50KPair, make_pair

MIN_COLOUR_DISTANCE = 60.0  # RGB 0-255; closer circle/background colours are left out of evaluation
EVALUATION_SEED = 1_000_003  # held out: training sets are drawn with other seeds (default 0)
KMEANS_ITERATIONS = 20
GAUSS_NEWTON_STEPS = 5
PROMPT_PATTERN = re.compile(r"^(?P<circle>.+) circle with (?P<background>.+) background$")


def prompt_colours(prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """(circle RGB, background RGB) as float arrays, from a Fill50K prompt."""
    match = PROMPT_PATTERN.match(prompt)
    if match is None:
        raise InputError(f"prompt {prompt!r} is not of the form '<colour> circle with <colour> background'")
    unknown = [name for name in match.groups() if name not in COLOURS]
    if unknown:
        raise InputError(f"prompt {prompt!r}: unknown colour name(s) {unknown}; "
                         "see tinylllite.data.fill50k.COLOURS")
    return tuple(np.array(COLOURS[name], np.float64) for name in match.groups())


def is_fill50k_prompt(prompt: str) -> bool:
    """True when the caption is "<colour> circle with <colour> background" with two known colour names."""
    match = PROMPT_PATTERN.match(prompt)
    return match is not None and all(name in COLOURS for name in match.groups())


def distinguishable(prompt: str, min_distance: float = MIN_COLOUR_DISTANCE) -> bool:
    """True when the prompt's two colours are at least `min_distance` apart in RGB."""
    circle, background = prompt_colours(prompt)
    return bool(np.linalg.norm(circle - background) >= min_distance)


def box_blur(image: np.ndarray) -> np.ndarray:
    """3 x 3 mean filter (edges repeated): (H, W, 3) uint8 -> (H, W, 3) float64."""
    padded = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9


def evaluation_pairs(n: int, size: int = 64, seed: int = EVALUATION_SEED,
                     min_distance: float = MIN_COLOUR_DISTANCE) -> list[Fill50KPair]:
    """The first n pairs of `seed` whose two colours are at least `min_distance` apart."""
    pairs, index = [], 0
    while len(pairs) < n:
        pair = make_pair(seed, index, size)
        if distinguishable(pair.prompt, min_distance):
            pairs.append(pair)
        index += 1
    return pairs


def two_colours(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """k-means with k = 2 on the pixels: (colours (2, 3), label of every pixel (H, W)).

    The pixels are clustered after a 3 x 3 blur, which divides pixel noise by 3 so that a small disc
    in a noisy image is not lost to a split of the background's noise.
    """
    pixels = box_blur(image).reshape(-1, 3)  # (H, W, 3) -> (H*W, 3)
    # Deterministic, noise-robust start: split the pixels across their mean along the direction of
    # largest colour variance (the first principal component).
    centred = pixels - pixels.mean(0)
    direction = np.linalg.eigh(centred.T @ centred)[1][:, -1]  # (3,), eigenvalues ascend
    labels = (centred @ direction > 0).astype(np.int64)  # (H*W,)
    for _ in range(KMEANS_ITERATIONS):
        centres = np.stack([pixels[labels == k].mean(0) if (labels == k).any() else pixels.mean(0)
                            for k in range(2)])  # (2, 3)
        distances = np.linalg.norm(pixels[:, None, :] - centres[None], axis=2)  # (H*W, 2)
        updated = distances.argmin(1)
        if np.array_equal(updated, labels):
            break
        labels = updated
    # Report each cluster's colour from the unblurred pixels; the median ignores edge pixels.
    raw = image.reshape(-1, 3).astype(np.float64)  # (H*W, 3)
    colours = np.stack([np.median(raw[labels == k], axis=0) if (labels == k).any() else centres[k]
                        for k in range(2)])  # (2, 3)
    return colours, labels.reshape(image.shape[:2])


def fit_circle(source: np.ndarray) -> tuple[float, float, float]:
    """(x, y, r) of the least-squares circle through the outline's white pixels."""
    ys, xs = np.nonzero(source.max(axis=2) > 127)
    if len(xs) < 3:
        raise InputError("the source image has no circle outline (fewer than 3 white pixels)")
    # x^2 + y^2 = 2 a x + 2 b y + c is linear in (a, b, c); r^2 = c + a^2 + b^2.
    design = np.stack([2 * xs, 2 * ys, np.ones_like(xs)], axis=1).astype(np.float64)  # (N, 3)
    (a, b, c), *_ = np.linalg.lstsq(design, (xs ** 2 + ys ** 2).astype(np.float64), rcond=None)
    r = np.sqrt(c + a * a + b * b)
    # Kasa's fit is biased on short arcs (clipped circles); a few Gauss-Newton steps on the
    # geometric residual |p - centre| - r remove the bias.
    for _ in range(GAUSS_NEWTON_STEPS):
        dx, dy = xs - a, ys - b
        dist = np.maximum(np.hypot(dx, dy), 1e-9)
        jacobian = np.stack([-dx / dist, -dy / dist, -np.ones_like(dist)], axis=1)  # (N, 3)
        step, *_ = np.linalg.lstsq(jacobian, -(dist - r), rcond=None)
        a, b, r = a + step[0], b + step[1], r + step[2]
    return float(a), float(b), float(r)


def true_disc(source: np.ndarray) -> np.ndarray:
    """(H, W) bool: the disc the outline encloses (its interior and the inner half of the ring)."""
    x, y, r = fit_circle(source)
    ys, xs = np.mgrid[0:source.shape[0], 0:source.shape[1]]
    dist = np.hypot(xs - x, ys - y)  # (H, W)
    ring = source.max(axis=2) > 127
    # Off the ring, the side of the ring decides, which a sub-pixel fitting error cannot flip; on it,
    # the generator's rule round(dist) <= r.
    return np.where(ring, dist < r + 0.5, dist < r)


def fill50k_fidelity(image: np.ndarray, source: np.ndarray, prompt: str) -> dict:
    """dict(iou, colour_error) of a generated image (S, S, 3) uint8 against its source outline and prompt."""
    if image.shape != source.shape or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"image {image.shape} and source {source.shape} must both be (S, S, 3)")
    circle, background = prompt_colours(prompt)
    centres, labels = two_colours(image)
    straight = np.linalg.norm(centres[0] - circle) + np.linalg.norm(centres[1] - background)
    swapped = np.linalg.norm(centres[1] - circle) + np.linalg.norm(centres[0] - background)
    circle_label = 0 if straight <= swapped else 1
    predicted, truth = labels == circle_label, true_disc(source)
    union = np.logical_or(predicted, truth).sum()
    iou = np.logical_and(predicted, truth).sum() / union if union else 1.0
    return dict(iou=float(iou), colour_error=float(min(straight, swapped) / 2))


def chance_colour_error(samples: int = 100_000, seed: int = 0) -> float:
    """Mean colour error of a flat image made of a random colour pair, against a random prompt."""
    rng = np.random.default_rng(seed)
    table = np.array(list(COLOURS.values()), np.float64)  # (140, 3)
    drawn, asked = table[rng.integers(len(table), size=(samples, 2))], table[rng.integers(
        len(table), size=(samples, 2))]  # (samples, 2, 3) each: (circle, background)
    straight = np.linalg.norm(drawn - asked, axis=2).sum(1)
    swapped = np.linalg.norm(drawn[:, ::-1] - asked, axis=2).sum(1)
    return float(np.minimum(straight, swapped).mean() / 2)
