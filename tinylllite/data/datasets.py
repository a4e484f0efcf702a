"""Paired datasets for ControlNet / LLLite training: Fill50K, JSON Lines files and kohya-style folders.

Mirrors the original `tutorial_dataset.py` (lllyasviel/ControlNet): every item is
`dict(jpg=image, txt=caption, hint=condition)`, HWC float32 RGB, `jpg` in [-1, 1] (what the VAE
encodes) and `hint` in [0, 1] (what the hint encoder reads). Three ways to list the pairs:

- a JSON Lines file in Fill50K's layout (`{"source": ..., "target": ..., "prompt": ...}` per line,
  paths relative to the file's folder), e.g. `training/fill50k/prompt.json`;
- kohya's folder convention (sd-scripts, ControlNet-LLLite guide): `image_dir/x.png`, its caption
  `image_dir/x.txt`, its condition `conditioning_data_dir/x.<any image extension>`;
- a kohya dataset `.toml` (see `tinylllite.data.kohya_toml`).

Additions to the original, all off by default: resize + centre-crop (image and hint together), a
horizontal flip (both together), prompt dropout (the paper's 50% is `prompt_dropout=0.5`), CHW
tensors. Colour augmentation is refused: it would change the image but not its condition.
Left out: kohya's aspect-ratio buckets, caption shuffling, latent caching.
Problems are found up front by `tinylllite.dataset_check`; constructors raise on missing pairs, and
an item that cannot be used raises `InputError` naming its file (and the JSON line) and what to do.
"""
import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tinylllite.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
JSONL_KEYS = ("source", "target", "prompt")  # Fill50K's key order
VAE_SCALE_FACTOR = 8  # SD's VAE downsamples by 8; LLLite's conditioning at depth 4 needs 64 (4 * 2^4)
MAX_SIDE = 4096  # larger sides are refused: SD trains at 512-1024 px; a 10000 px image is 1.2 GB as float32
CHECK_COMMAND = "python -m tinylllite.dataset_check"


@dataclass
class Pair:
    image: Path  # the training target ("jpg" / "target")
    hint: Path  # the condition ("hint" / "source")
    caption: str


def read_utf8(path: Path, what: str = "file") -> str:
    """A text file's contents; non-UTF-8 bytes are refused naming the file and the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise InputError(f"{path} line {line}: this {what} is not UTF-8 text (byte {data[error.start]:#04x}); "
                         "re-save it as UTF-8") from None


def whole_file_problem(path: Path, text: str) -> str | None:
    """What makes a JSON Lines file unusable as a whole (empty, or a JSON array), or None."""
    if not text.strip():
        return (f"{path} is empty; list one pair per line as "
                '{"source": "source/0.png", "target": "target/0.png", "prompt": "..."}')
    if text.lstrip().startswith("["):
        return (f"{path} is a JSON array; the format is JSON Lines (one object per line): write each "
                "object of the array on its own line, without the surrounding [ ] and commas")
    return None


def parse_pair_line(line: str) -> tuple[dict | None, str | None]:
    """(the line's object, None), or (None, what is wrong with it)."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as error:
        return None, f"not valid JSON ({error.msg} at column {error.colno})"
    if not isinstance(item, dict) or any(not isinstance(item.get(k), str) for k in JSONL_KEYS):
        return None, f"expected an object with text keys {', '.join(JSONL_KEYS)}, got {line[:120]}"
    return item, None


def read_jsonl_pairs(path) -> list[Pair]:
    """Pairs listed in a JSON Lines file of Fill50K's layout; paths relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found; pass a JSON Lines file of pairs")
    text = read_utf8(path, "JSON Lines file")
    problem = whole_file_problem(path, text)
    if problem:
        raise InputError(problem)
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        item, problem = parse_pair_line(line)
        if problem:
            raise InputError(f"{path} line {number}: {problem}; run `{CHECK_COMMAND} {path}` to list "
                             "every problem")
        pairs.append(Pair(path.parent / item["target"], path.parent / item["source"], item["prompt"]))
    return pairs


def images_by_stem(folder: Path) -> dict[str, Path]:
    """Image files of a folder by basename without extension."""
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}


def read_folder_pairs(image_dir, conditioning_data_dir, caption_extension=".txt") -> list[Pair]:
    """Pairs in kohya's convention; raises listing every image without a condition or caption."""
    image_dir, conditioning_data_dir = Path(image_dir), Path(conditioning_data_dir)
    for folder in (image_dir, conditioning_data_dir):
        if not folder.is_dir():
            raise InputError(f"{folder} is not a folder")
    images, hints = images_by_stem(image_dir), images_by_stem(conditioning_data_dir)
    if not images:
        raise InputError(f"{image_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    no_hint = sorted(set(images) - set(hints))
    no_caption = [s for s in images if not images[s].with_suffix(caption_extension).is_file()]
    if no_hint or no_caption:
        raise InputError(
            f"{image_dir}: {len(no_hint)} images without a condition in {conditioning_data_dir} "
            f"({', '.join(no_hint[:10])}), {len(no_caption)} without a {caption_extension} caption "
            f"({', '.join(no_caption[:10])}); run `{CHECK_COMMAND}` for the full list")
    return [Pair(images[s], hints[s], read_utf8(images[s].with_suffix(caption_extension), "caption").strip())
            for s in images]


def check_size(size, multiple: int) -> tuple[int, int]:
    """(width, height) from an int or a pair, each a positive multiple of `multiple`, at most MAX_SIDE."""
    width, height = (size, size) if isinstance(size, int) else tuple(size)
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        raise InputError(f"size {width}x{height} is not a multiple of {multiple} on each side (the VAE "
                         f"needs 8, LLLite's depth 4 needs 64); pick e.g. "
                         f"{max(multiple, round(width / multiple) * multiple)}")
    if max(width, height) > MAX_SIDE:
        raise InputError(f"size {width}x{height} is over {MAX_SIDE} px on a side; pick a smaller one")
    return width, height


def size_flag(text: str) -> int:
    """argparse type of a --size flag: an image side in pixels, a multiple of 8 from 8 to MAX_SIDE."""
    try:
        return check_size(int(text), VAE_SCALE_FACTOR)[0]
    except ValueError as error:  # InputError is a ValueError, and so is int("x")'s
        raise argparse.ArgumentTypeError(f"{text!r}: {error}" if isinstance(error, InputError) else
                                         f"{text!r} is not a whole number of pixels") from None


def resize_centre_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale so the image covers width x height, then cut the centre out."""
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - width) // 2, (h - height) // 2
    return image.crop((left, top, left + width, top + height))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, keeping what the pixels mean.

    16-bit greyscale (a depth map, typically: modes I;16 and I) is scaled to 8 bits (v / 257) rather than
    clipped at 255, which would turn almost every pixel white. Transparent pixels (RGBA, LA, a palette with
    transparency) are composited on black, the hint convention for "nothing here", rather than keeping
    whatever colour lies under the transparency. Float images (mode F) carry no known range and are refused.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.int64)  # (H, W)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"a {image.mode} image with values outside 0..65535 has no 8-bit meaning")
        grey = np.round(values / 257).astype(np.uint8)  # 65535 -> 255, 257 -> 1
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        raise ValueError("a 32-bit float image has no known range; save it as 8- or 16-bit PNG")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        black = Image.new("RGBA", image.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: Path, flag: str | None = None) -> Image.Image:
    """An image file as 8-bit RGB (`to_rgb`); one that cannot be used is refused naming it.

    `flag` names the command-line flag the path came from (e.g. "--hint"); without it the path is a
    dataset's file and the message points at the dataset check.
    """
    given = f"{flag} {path}" if flag else str(path)
    fix = "give a PNG or JPG file" if flag else f"replace or remove it, and run `{CHECK_COMMAND}` to find every such file"
    try:
        with Image.open(path) as image:
            if max(image.size) > MAX_SIDE:
                raise InputError(f"{given} is {image.width}x{image.height}, over {MAX_SIDE} px on a side; "
                                 "resize it (training resizes to the model's size anyway)")
            return to_rgb(image)
    except FileNotFoundError:
        then = "check the path" if flag else f"run `{CHECK_COMMAND}` to list every missing file"
        raise InputError(f"{given} does not exist; {then}") from None
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise InputError(f"{given} cannot be read as an image ({error}); {fix}") from None


class PairedDataset(Dataset):
    """Items `dict(jpg=[-1, 1], txt=str, hint=[0, 1])` from a list of pairs (HWC float32, or CHW tensors)."""

    def __init__(self, pairs: list[Pair], size=None, multiple: int = VAE_SCALE_FACTOR, chw: bool = False,
                 prompt_dropout: float = 0.0, flip: bool = False, color_aug: bool = False):
        if color_aug:
            raise InputError("colour augmentation is refused on a conditioning dataset: it changes the "
                             "image's colours but not the hint's, so the model learns to ignore colour "
                             "words; turn color_aug off")
        if not 0.0 <= prompt_dropout <= 1.0:
            raise InputError(f"prompt_dropout must be in [0, 1], got {prompt_dropout}")
        if not pairs:
            raise InputError("the dataset lists no pairs")
        self.pairs = pairs
        self.size = None if size is None else check_size(size, multiple)
        self.multiple, self.chw, self.prompt_dropout, self.flip = multiple, chw, prompt_dropout, flip

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        image, hint = load_rgb(pair.image), load_rgb(pair.hint)
        if image.size != hint.size:
            raise InputError(f"{pair.image} is {image.width}x{image.height} but its hint {pair.hint} is "
                             f"{hint.width}x{hint.height}; a pair must have one size")
        if self.size is not None:
            image, hint = (resize_centre_crop(x, *self.size) for x in (image, hint))
        elif image.width % self.multiple or image.height % self.multiple:
            raise InputError(f"{pair.image} is {image.width}x{image.height}, not a multiple of "
                             f"{self.multiple}; pass size= to resize and centre-crop")
        jpg = np.asarray(image, np.float32) / 127.5 - 1.0  # (H, W, 3) in [-1, 1]
        hint01 = np.asarray(hint, np.float32) / 255.0  # (H, W, 3) in [0, 1]
        if self.flip and torch.rand(()) < 0.5:
            jpg, hint01 = jpg[:, ::-1].copy(), hint01[:, ::-1].copy()  # both or neither
        caption = pair.caption
        if self.prompt_dropout and torch.rand(()) < self.prompt_dropout:
            caption = ""
        if self.chw:  # (H, W, 3) -> (3, H, W)
            return dict(jpg=torch.from_numpy(jpg).permute(2, 0, 1).contiguous(), txt=caption,
                        hint=torch.from_numpy(hint01).permute(2, 0, 1).contiguous())
        return dict(jpg=jpg, txt=caption, hint=hint01)


class Fill50KDataset(PairedDataset):
    """Fill50K as the original tutorial reads it: `root/prompt.json`, no resize, no dropout by default."""

    def __init__(self, root="./training/fill50k", chw: bool = False, prompt_dropout: float = 0.0,
                 size=None, multiple: int = VAE_SCALE_FACTOR, flip: bool = False):
        prompt_file = Path(root) / "prompt.json"
        if not prompt_file.is_file():
            raise InputError(f"{prompt_file} not found; make a Fill50K-like set with "
                             f"`python tutorial_dataset.py --make 50000 --out {root}`")
        super().__init__(read_jsonl_pairs(prompt_file), size=size, multiple=multiple, chw=chw,
                         prompt_dropout=prompt_dropout, flip=flip)


class PairedFolderDataset(PairedDataset):
    """Users' own pairs: kohya folders (`image_dir` + `conditioning_data_dir`) or a JSON Lines file."""

    def __init__(self, image_dir_or_jsonl, conditioning_data_dir=None, caption_extension: str = ".txt",
                 size=None, multiple: int = VAE_SCALE_FACTOR, chw: bool = False, prompt_dropout: float = 0.0,
                 flip: bool = False, color_aug: bool = False):
        source = Path(image_dir_or_jsonl)
        if not source.exists():
            raise InputError(f"{source} does not exist")
        if source.is_file():
            pairs = read_jsonl_pairs(source)
        elif conditioning_data_dir is None:
            raise InputError(f"{source} is a folder: also pass conditioning_data_dir (kohya's layout), "
                             "or pass a JSON Lines file instead")
        else:
            pairs = read_folder_pairs(source, conditioning_data_dir, caption_extension)
        super().__init__(pairs, size=size, multiple=multiple, chw=chw, prompt_dropout=prompt_dropout,
                         flip=flip, color_aug=color_aug)
