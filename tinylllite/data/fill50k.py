"""Fill50K, the toy dataset of the original ControlNet tutorial, synthesized offline.

The original tutorial (lllyasviel/ControlNet, `docs/train.md`, `tutorial_dataset.py`) trains on
Fill50K: 50,000 pairs of a white circle outline on black (the condition, `source/{i}.png`) and the
same circle filled with one named colour on a background of another (the image, `target/{i}.png`),
captioned "<circle> circle with <background> background". No generator was published, so this file
reproduces the format and look measured on the real files (circle geometry estimated from 52 of them):

- colours: the 140 CSS3/X11 names (CamelCase split into lowercase words, `gray` spelling), exact RGB;
- radius uniform in [64, 256], centre x and y uniform in [96, 416] (512 px), all integers, so about
  half of the circles run past the border;
- source: a pure white, not anti-aliased ring covering radii r-2 .. r+2 on pure black;
- target: a flat disc of radius r on a flat background, no outline;
- `prompt.json` is JSON Lines with keys source, target, prompt in that order.

Item i depends only on (seed, i): its random numbers come from `SeedSequence([seed, i])`, so any N,
any worker count and any image size draw the same circle and colours. Other sizes scale the 512 px
geometry (ring at least 1 px wide). What it leaves out: pixel parity with the real files' colour
draws (the real dataset's random stream is unknown; item 1234 of ours is not "burly wood ... orange").
"""
import json
import os
import signal
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from tinylllite.errors import InputError
from tinylllite.files.atomic import atomic_file, atomic_folder, refuse_unwritable

# CSS3/X11 named colours as they appear in Fill50K prompts (tests/fixtures/fill50k_colours.json).
COLOURS: dict[str, tuple[int, int, int]] = {
    "alice blue": (240, 248, 255), "antique white": (250, 235, 215), "aqua": (0, 255, 255),
    "aquamarine": (127, 255, 212), "azure": (240, 255, 255), "beige": (245, 245, 220),
    "bisque": (255, 228, 196), "black": (0, 0, 0), "blanched almond": (255, 235, 205), "blue": (0, 0, 255),
    "blue violet": (138, 43, 226), "brown": (165, 42, 42), "burly wood": (222, 184, 135),
    "cadet blue": (95, 158, 160), "chartreuse": (127, 255, 0), "chocolate": (210, 105, 30),
    "coral": (255, 127, 80), "cornflower blue": (100, 149, 237), "corn silk": (255, 248, 220),
    "crimson": (220, 20, 60), "cyan": (0, 255, 255), "dark blue": (0, 0, 139), "dark cyan": (0, 139, 139),
    "dark golden rod": (184, 134, 11), "dark gray": (169, 169, 169), "dark green": (0, 100, 0),
    "dark khaki": (189, 183, 107), "dark magenta": (139, 0, 139), "dark olive green": (85, 107, 47),
    "dark orange": (255, 140, 0), "dark orchid": (153, 50, 204), "dark red": (139, 0, 0),
    "dark salmon": (233, 150, 122), "dark sea green": (143, 188, 143), "dark slate blue": (72, 61, 139),
    "dark slate gray": (47, 79, 79), "dark turquoise": (0, 206, 209), "dark violet": (148, 0, 211),
    "deep pink": (255, 20, 147), "deep sky blue": (0, 191, 255), "dim gray": (105, 105, 105),
    "dodger blue": (30, 144, 255), "fire brick": (178, 34, 34), "floral white": (255, 250, 240),
    "forest green": (34, 139, 34), "fuchsia": (255, 0, 255), "gainsboro": (220, 220, 220),
    "ghost white": (248, 248, 255), "gold": (255, 215, 0), "golden rod": (218, 165, 32),
    "gray": (128, 128, 128), "green": (0, 128, 0), "green yellow": (173, 255, 47),
    "honey dew": (240, 255, 240), "hot pink": (255, 105, 180), "indian red": (205, 92, 92),
    "indigo": (75, 0, 130), "ivory": (255, 255, 240), "khaki": (240, 230, 140),
    "lavender": (230, 230, 250), "lavender blush": (255, 240, 245), "lawn green": (124, 252, 0),
    "lemon chiffon": (255, 250, 205), "light blue": (173, 216, 230), "light coral": (240, 128, 128),
    "light cyan": (224, 255, 255), "light golden rod yellow": (250, 250, 210),
    "light gray": (211, 211, 211), "light green": (144, 238, 144), "light pink": (255, 182, 193),
    "light salmon": (255, 160, 122), "light sea green": (32, 178, 170), "light sky blue": (135, 206, 250),
    "light slate gray": (119, 136, 153), "light steel blue": (176, 196, 222),
    "light yellow": (255, 255, 224), "lime": (0, 255, 0), "lime green": (50, 205, 50),
    "linen": (250, 240, 230), "magenta": (255, 0, 255), "maroon": (128, 0, 0),
    "medium aquamarine": (102, 205, 170), "medium blue": (0, 0, 205), "medium orchid": (186, 85, 211),
    "medium purple": (147, 112, 219), "medium sea green": (60, 179, 113),
    "medium slate blue": (123, 104, 238), "medium spring green": (0, 250, 154),
    "medium turquoise": (72, 209, 204), "medium violet red": (199, 21, 133),
    "midnight blue": (25, 25, 112), "mint cream": (245, 255, 250), "misty rose": (255, 228, 225),
    "moccasin": (255, 228, 181), "navajo white": (255, 222, 173), "navy": (0, 0, 128),
    "old lace": (253, 245, 230), "olive": (128, 128, 0), "olive drab": (107, 142, 35),
    "orange": (255, 165, 0), "orange red": (255, 69, 0), "orchid": (218, 112, 214),
    "pale golden rod": (238, 232, 170), "pale green": (152, 251, 152), "pale turquoise": (175, 238, 238),
    "pale violet red": (219, 112, 147), "papaya whip": (255, 239, 213), "peach puff": (255, 218, 185),
    "peru": (205, 133, 63), "pink": (255, 192, 203), "plum": (221, 160, 221),
    "powder blue": (176, 224, 230), "purple": (128, 0, 128), "red": (255, 0, 0),
    "rosy brown": (188, 143, 143), "royal blue": (65, 105, 225), "saddle brown": (139, 69, 19),
    "salmon": (250, 128, 114), "sandy brown": (244, 164, 96), "sea green": (46, 139, 87),
    "sea shell": (255, 245, 238), "sienna": (160, 82, 45), "silver": (192, 192, 192),
    "sky blue": (135, 206, 235), "slate blue": (106, 90, 205), "slate gray": (112, 128, 144),
    "snow": (255, 250, 250), "spring green": (0, 255, 127), "steel blue": (70, 130, 180),
    "tan": (210, 180, 140), "teal": (0, 128, 128), "thistle": (216, 191, 216), "tomato": (255, 99, 71),
    "turquoise": (64, 224, 208), "violet": (238, 130, 238), "wheat": (245, 222, 179),
    "white": (255, 255, 255), "white smoke": (245, 245, 245), "yellow": (255, 255, 0),
    "yellow green": (154, 205, 50),}
COLOUR_NAMES = tuple(COLOURS)  # fixed order: index drawn by the generator -> name

REFERENCE_SIZE = 512  # the real dataset's size; the geometry below is defined at this size
RADIUS_RANGE = (64, 256)  # inclusive, pixels at 512
CENTRE_RANGE = (96, 416)  # inclusive, for x and for y, pixels at 512
RING_HALF_WIDTH = 2.5  # the ring covers radii r-2 .. r+2: 5 pixel rings at 512
PNG_COMPRESS_LEVEL = 1  # flat images compress well even at level 1, and it is several times faster
SET_ENTRIES = {"prompt.json", "source", "target"}  # all that write_fill50k puts in its folder


def prompt_for(circle: str, background: str) -> str:
    """The exact Fill50K caption template (lowercase, no article, no period)."""
    return f"{circle} circle with {background} background"


@dataclass
class Fill50KPair:
    source: np.ndarray  # (S, S, 3) uint8, white ring on black
    target: np.ndarray  # (S, S, 3) uint8, flat disc on flat background
    prompt: str
    circle: str  # colour names, keys of COLOURS
    background: str
    centre: tuple[float, float]  # (x, y) in pixels of this size (integers at 512)
    radius: float  # in pixels of this size (an integer at 512)


def draw_parameters(seed: int, index: int) -> tuple[int, int, int, str, str]:
    """The random draw of item `index`: (radius, cx, cy) at 512 px and the two colour names."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    radius = int(rng.integers(RADIUS_RANGE[0], RADIUS_RANGE[1] + 1))
    cx, cy = (int(v) for v in rng.integers(CENTRE_RANGE[0], CENTRE_RANGE[1] + 1, size=2))
    circle, background = (COLOUR_NAMES[i] for i in rng.integers(len(COLOUR_NAMES), size=2))
    return radius, cx, cy, circle, background


def make_pair(seed: int, index: int, size: int = REFERENCE_SIZE) -> Fill50KPair:
    """Draw item `index` of the Fill50K-like set with `seed`, at `size` x `size` pixels."""
    if size < 8:
        raise InputError(f"Fill50K size must be at least 8 pixels, got {size}")
    radius, cx, cy, circle, background = draw_parameters(seed, index)
    scale = size / REFERENCE_SIZE
    # Pixel centres of a 512 grid map to (i + 0.5) * scale - 0.5 on the smaller grid.
    x0, y0 = (cx + 0.5) * scale - 0.5, (cy + 0.5) * scale - 0.5
    r = radius * scale
    axis = np.arange(size, dtype=np.float64)
    dist2 = (axis[None, :] - x0) ** 2 + (axis[:, None] - y0) ** 2  # (S, S) squared distance to the centre
    half_width = max(RING_HALF_WIDTH * scale, 0.5)
    # |dist - r| < half_width (at 512: round(dist) in r-2 .. r+2), compared squared to skip the root.
    ring = (dist2 > max(r - half_width, 0.0) ** 2) & (dist2 < (r + half_width) ** 2)
    disc = dist2 < (r + 0.5) ** 2  # round(dist) <= r: a filled, not anti-aliased disc
    source = np.repeat((ring * np.uint8(255))[..., None], 3, axis=2)  # (S, S) -> (S, S, 3)
    palette = np.array([COLOURS[background], COLOURS[circle]], np.uint8)  # (2, 3)
    target = palette[disc.astype(np.intp)]  # (S, S) -> (S, S, 3)
    return Fill50KPair(source, target, prompt_for(circle, background), circle, background,
                       (x0, y0), r)


def save_png(image: np.ndarray, path: Path) -> None:
    """Write a PNG atomically (a temporary beside it, then a rename)."""
    with atomic_file(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def _write_item(job: tuple[Path, int, int, int]) -> tuple[int, str]:
    """Worker: draw one pair, save both PNGs, return (index, prompt)."""
    root, seed, index, size = job
    pair = make_pair(seed, index, size)
    for folder, image in (("source", pair.source), ("target", pair.target)):  # the folder is written atomically
        Image.fromarray(image).save(root / folder / f"{index}.png", format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return index, pair.prompt


def _ignore_ctrl_c() -> None:
    """Pool worker start-up: Ctrl-C reaches the whole process group, but only the main process handles it (it
    stops the workers and removes the half-written set), so workers print no traceback of their own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_replaceable(folder: Path, overwrite: bool, own: set[str]) -> None:
    """Refuse to write over a folder unless it is empty, or `overwrite` and it holds only `own` entries."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file, not a folder; pick another output folder")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not overwrite:
        raise InputError(f"{folder} already exists and is not empty; pick another output folder, or pass "
                         "--overwrite (overwrite=True) to replace the Fill50K set in it")
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in own)
    if foreign:
        raise InputError(f"{folder} holds files that are not part of a Fill50K set ({', '.join(foreign[:5])}), "
                         "so it is not replaced even with --overwrite; pick another output folder")


def write_fill50k(out_dir, n: int, size: int = REFERENCE_SIZE, seed: int = 0,
                  workers: int | None = None, overwrite: bool = False) -> Path:
    """Write n pairs in the Fill50K layout to out_dir; return out_dir.

    The set is built in a temporary folder beside out_dir and renamed to out_dir only when complete
    (`tinylllite.files.atomic`); any failure, Ctrl-C included, removes it, so no half-written set is
    left (a killed process's temporary is removed by the next run). An existing non-empty out_dir is
    refused unless `overwrite`, and even then only when it holds nothing but a Fill50K set.
    """
    out_dir = Path(out_dir)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"the number of pairs must be a whole number of at least 1, got {n!r}")
    if not isinstance(size, int) or size < 8 or size % 8:
        raise InputError(f"Fill50K size must be a multiple of 8 pixels, at least 8, got {size!r} "
                         "(the VAE downsamples by 8)")
    if workers is not None and workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    if seed < 0:
        raise InputError(f"seed must be 0 or more, got {seed}")
    check_replaceable(out_dir, overwrite, SET_ENTRIES)
    refuse_unwritable(out_dir, "output folder")
    with atomic_folder(out_dir, replace=True, durable=False) as partial:
        (partial / "source").mkdir()
        (partial / "target").mkdir()
        workers = workers or len(os.sched_getaffinity(0))
        jobs = [(partial, seed, i, size) for i in range(n)]
        prompts = [""] * n
        progress = tqdm(total=n, desc=f"Fill50K {size}px", unit="pair")
        if workers == 1:
            for index, prompt in map(_write_item, jobs):
                prompts[index] = prompt
                progress.update()
        else:
            with get_context("fork").Pool(workers, initializer=_ignore_ctrl_c) as pool:
                for index, prompt in pool.imap_unordered(_write_item, jobs, chunksize=64):
                    prompts[index] = prompt
                    progress.update()
        progress.close()
        lines = (json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": p})
                 for i, p in enumerate(prompts))
        text = "\n".join(lines) + "\n"
        (partial / "prompt.json").write_text(text, encoding="utf-8")
    return out_dir
