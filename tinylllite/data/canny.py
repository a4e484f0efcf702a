"""Canny edges in numpy, and a folder of images turned into LLLite / ControlNet training data.

kohya's ControlNet-LLLite guide (sd-scripts `docs/train_lllite_README.md`) builds a Canny dataset by
generating images whose prompts are stored in the PNG metadata, writing those prompts as captions,
and running OpenCV's Canny on every image. This file does the same without OpenCV:

    python -m tinylllite.canny IMAGE_DIR CONDITIONING_DIR [--low 100 --high 200 | --random] [--seed 0]

writes `CONDITIONING_DIR/<name>.png` (white edges on black, same size) for every image and
`IMAGE_DIR/<name>.txt` from the PNG text chunk `prompt` where an image has one (existing captions
are kept; existing edge maps are replaced only with `--overwrite`). The detector is Canny's (1986):
Gaussian blur, Sobel gradients, non-maximum suppression, double threshold, hysteresis. Thresholds apply to the L1 gradient magnitude |gx| + |gy| of the 0-255
grey image, OpenCV's default, so 100 / 200 mean roughly what they mean there; no pixel parity with
OpenCV is claimed (OpenCV does not blur first, and differs at ties and borders).
Random thresholds (ControlNet 1.1 trained Canny with random ones): low uniform in [50, 150], high = 2 low.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tinylllite.data.datasets import IMAGE_EXTENSIONS, images_by_stem, load_rgb
from tinylllite.errors import InputError, run_command
from tinylllite.files.atomic import atomic_file, refuse_unwritable, writable_folder

BLUR_SIGMA = 1.0
RANDOM_LOW = (50, 150)  # inclusive range of the low threshold when drawn at random; high = 2 * low
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 weights, as OpenCV's RGB -> grey


def filter_rows_and_columns(image: np.ndarray, along_x: np.ndarray, along_y: np.ndarray) -> np.ndarray:
    """Separable 2-D filter (correlation), borders repeated: (H, W) -> (H, W)."""
    rx, ry = len(along_x) // 2, len(along_y) // 2
    padded = np.pad(image, ((ry, ry), (rx, rx)), mode="edge")
    h, w = image.shape
    rows = sum(k * padded[:, i:i + w] for i, k in enumerate(along_x))  # (H + 2ry, W)
    return sum(k * rows[i:i + h] for i, k in enumerate(along_y))  # (H, W)


def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """out[y, x] = image[y + dy, x + dx], zero outside."""
    padded = np.pad(image, 1)
    h, w = image.shape
    return padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def canny(image: np.ndarray, low: float = 100, high: float = 200, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """White edges on black: (H, W, 3) or (H, W) uint8 -> (H, W, 3) uint8."""
    if not 0 <= low <= high:
        raise InputError(f"Canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    grey = image.astype(np.float64) @ LUMA if image.ndim == 3 else image.astype(np.float64)  # (H, W)
    radius = max(1, int(np.ceil(2 * sigma)))
    gauss = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    grey = filter_rows_and_columns(grey, gauss / gauss.sum(), gauss / gauss.sum())
    # Sobel: a central difference along one axis, a [1, 2, 1] smoothing along the other.
    gx = filter_rows_and_columns(grey, np.array([-1.0, 0.0, 1.0]), np.array([1.0, 2.0, 1.0]))
    gy = filter_rows_and_columns(grey, np.array([1.0, 2.0, 1.0]), np.array([-1.0, 0.0, 1.0]))
    magnitude = np.abs(gx) + np.abs(gy)
    # Non-maximum suppression: keep a pixel only if it is a maximum among its two neighbours across
    # the edge, i.e. along the gradient direction quantised to 0, 45, 90 or 135 degrees (strictly
    # above the one before, so a plateau of two equal pixels keeps one).
    angle = np.rad2deg(np.arctan2(gy, gx)) % 180
    sector = (np.round(angle / 45).astype(int)) % 4  # 0: x, 1: diagonal, 2: y, 3: anti-diagonal
    keep = np.zeros_like(magnitude, dtype=bool)
    for index, (dy, dx) in enumerate([(0, 1), (1, 1), (1, 0), (1, -1)]):
        peak = (magnitude > shifted(magnitude, -dy, -dx)) & (magnitude >= shifted(magnitude, dy, dx))
        keep |= (sector == index) & peak
    thin = np.where(keep, magnitude, 0.0)
    strong, weak = thin >= high, thin >= low
    # Hysteresis: grow the strong edges through 8-connected weak pixels until nothing changes.
    edges = strong
    while True:
        grown = edges.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                grown |= shifted(edges, dy, dx)
        grown &= weak
        if np.array_equal(grown, edges):
            break
        edges = grown
    return np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=2)  # (H, W) -> (H, W, 3)


def png_prompt(path: Path) -> str | None:
    """The `prompt` text chunk of a PNG (as image generators store it), or None."""
    with Image.open(path) as image:
        return getattr(image, "text", {}).get("prompt")


def canny_folder(image_dir, conditioning_dir, low: float = 100, high: float = 200,
                 random_thresholds: bool = False, seed: int = 0, caption_extension: str = ".txt",
                 overwrite: bool = False) -> dict:
    """Edge maps for every image of image_dir, captions from PNG prompts; returns what was done.

    Nothing is written when the input is refused: thresholds out of order, image_dir missing or
    empty, conditioning_dir being image_dir (the edge maps would replace the images), or edge maps
    already in conditioning_dir (unless `overwrite`). Existing captions are never replaced.
    """
    image_dir, conditioning_dir = Path(image_dir), Path(conditioning_dir)
    if not 0 <= low <= high:
        raise InputError(f"Canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    if not caption_extension.startswith("."):
        raise InputError(f"caption extension {caption_extension!r} must start with a dot, e.g. .txt")
    if not image_dir.is_dir():
        raise InputError(f"{image_dir} is not a folder")
    images = images_by_stem(image_dir)
    if not images:
        raise InputError(f"{image_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    if conditioning_dir.exists() and not conditioning_dir.is_dir():
        raise InputError(f"{conditioning_dir} is a file; pass a folder for the edge maps")
    refuse_unwritable(conditioning_dir, "edge-map folder", inside=True)  # before 50,000 images are read
    if conditioning_dir.resolve() == image_dir.resolve():
        raise InputError(f"{conditioning_dir} is the image folder: the edge maps would replace the images; "
                         "pass another folder")
    existing = [f"{stem}.png" for stem in images if (conditioning_dir / f"{stem}.png").exists()]
    if existing and not overwrite:
        raise InputError(f"{conditioning_dir} already holds {len(existing)} of the edge maps "
                         f"({', '.join(existing[:5])}); pass --overwrite to replace them, or another folder")
    for path in images.values():  # every input is read whole before the first edge map is written
        load_rgb(path)
    writable_folder(conditioning_dir, "edge-map")
    captions, no_caption = 0, []
    for index, (stem, path) in enumerate(images.items()):
        if random_thresholds:
            rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
            low = int(rng.integers(RANDOM_LOW[0], RANDOM_LOW[1] + 1))
            high = 2 * low
        edges = Image.fromarray(canny(np.asarray(load_rgb(path)), low, high))
        with atomic_file(conditioning_dir / f"{stem}.png") as tmp:
            edges.save(tmp, format="PNG")
        caption = path.with_suffix(caption_extension)
        prompt = png_prompt(path) if path.suffix.lower() == ".png" else None
        if prompt is not None and not caption.exists():
            text = prompt.strip() + "\n"
            with atomic_file(caption) as tmp:
                tmp.write_text(text, encoding="utf-8")
            captions += 1
        elif not caption.exists():
            no_caption.append(path.name)
    return dict(images=len(images), captions_written=captions, without_caption=no_caption)


def threshold(text: str) -> float:
    """argparse type of --low / --high: a gradient magnitude, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Canny edge maps and PNG-prompt captions for a folder")
    parser.add_argument("image_dir", type=Path)
    parser.add_argument("conditioning_dir", type=Path)
    parser.add_argument("--low", type=threshold, default=100)
    parser.add_argument("--high", type=threshold, default=200)
    parser.add_argument("--random", action="store_true", help="random thresholds per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--caption-extension", default=".txt")
    parser.add_argument("--overwrite", action="store_true", help="replace edge maps already in conditioning_dir")
    args = parser.parse_args(argv)
    if args.low > args.high:
        parser.error(f"--low {args.low:g} is above --high {args.high:g}")
    if args.seed < 0:
        parser.error(f"--seed must be 0 or more, got {args.seed}")
    done = canny_folder(args.image_dir, args.conditioning_dir, args.low, args.high, args.random,
                        args.seed, args.caption_extension, args.overwrite)
    print(f"{done['images']} edge maps in {args.conditioning_dir}, {done['captions_written']} captions "
          f"written from PNG prompts")
    if done["without_caption"]:
        print(f"{len(done['without_caption'])} images have neither a caption nor a PNG prompt: "
              f"{', '.join(done['without_caption'])}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command("canny", main))
