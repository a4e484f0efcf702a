"""Check a training dataset before training and report every problem at once.

    python -m tinylllite.dataset_check training/fill50k            # a folder with prompt.json
    python -m tinylllite.dataset_check my_pairs.jsonl               # any JSON Lines file, Fill50K layout
    python -m tinylllite.dataset_check dataset.toml [--strict]      # kohya's dataset description

The original tutorial and kohya's scripts find bad data when the data loader reaches it, often hours
into training. This reads everything first: each JSON line (bad ones reported by line number),
every listed file (missing ones listed; files beside them that no pair lists reported as extra), every
image fully decoded (unreadable or truncated ones reported), the sizes of both members of a pair (they
must agree), the image mode (non-RGB images are converted when loaded, with a warning; `--strict`
refuses them) and the captions (missing ones are errors, empty ones warnings, errors with `--strict`).
It ends with summary counts and exits with status 1 when there is any error.
"""
import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from tinylllite.datasets import IMAGE_EXTENSIONS, JSONL_KEYS, VAE_MULTIPLE, images_by_stem
from tinylllite.kohya_toml import parse_kohya_toml


@dataclass
class Report:
    pairs: int = 0  # pairs listed
    good_pairs: int = 0  # pairs with no error
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        return (f"{self.pairs} pairs listed, {self.good_pairs} usable, {len(self.errors)} errors, "
                f"{len(self.warnings)} warnings")


@dataclass
class Listed:
    where: str  # how to find it in the user's files, e.g. "prompt.json line 12"
    image: Path | None
    hint: Path | None
    caption: str | None  # None: no caption found


def read_image(path: Path, where: str, report: Report, strict: bool) -> tuple[int, int] | None:
    """Decode an image fully; (width, height), or None after reporting why it is unusable."""
    try:
        with Image.open(path) as image:
            image.load()
            mode, size = image.mode, image.size
    except FileNotFoundError:
        report.errors.append(f"{where}: {path} does not exist")
        return None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        report.errors.append(f"{where}: {path} is unreadable or truncated ({error})")
        return None
    if mode != "RGB":
        if strict:
            report.errors.append(f"{where}: {path} is {mode}, not RGB (refused in strict mode; convert it)")
            return None
        report.warnings.append(f"{where}: {path} is {mode}, not RGB; it will be converted to RGB")
    return size


def check_listed(listed: list[Listed], report: Report, strict: bool, multiple: int | None) -> None:
    """Decode every pair and check sizes and captions; counts usable pairs."""
    report.pairs += len(listed)
    for item in tqdm(listed, desc="checking pairs", unit="pair", file=sys.stderr):
        errors_before = len(report.errors)
        sizes = [read_image(p, item.where, report, strict) for p in (item.image, item.hint) if p]
        if None not in sizes and len(sizes) == 2:
            if sizes[0] != sizes[1]:
                report.errors.append(f"{item.where}: {item.image} is {sizes[0][0]}x{sizes[0][1]} but "
                                     f"{item.hint} is {sizes[1][0]}x{sizes[1][1]}")
            elif multiple and (sizes[0][0] % multiple or sizes[0][1] % multiple):
                report.warnings.append(f"{item.where}: {sizes[0][0]}x{sizes[0][1]} is not a multiple of "
                                       f"{multiple}; train with size= to resize and centre-crop")
        if item.caption is None:
            report.errors.append(f"{item.where}: no caption")
        elif not item.caption.strip():
            (report.errors if strict else report.warnings).append(f"{item.where}: empty caption")
        if len(report.errors) == errors_before and item.image and item.hint:
            report.good_pairs += 1


def list_jsonl(path: Path, report: Report) -> list[Listed]:
    """Every line of a Fill50K-style JSON Lines file; bad lines reported with their numbers."""
    listed = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        report.errors.append(f"{path}: cannot be read ({error})")
        return listed
    for number, line in enumerate(lines, start=1):
        where = f"{path.name} line {number}"
        if not line.strip():
            report.warnings.append(f"{where}: empty line")
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            report.errors.append(f"{where}: not valid JSON ({error.msg} at column {error.colno})")
            continue
        if not isinstance(item, dict):
            report.errors.append(f"{where}: expected an object with keys {', '.join(JSONL_KEYS)}")
            continue
        missing = [k for k in JSONL_KEYS if not isinstance(item.get(k), str)]
        if missing:
            report.errors.append(f"{where}: missing or non-text key(s) {', '.join(missing)}")
            continue
        listed.append(Listed(where, path.parent / item["target"], path.parent / item["source"],
                             item["prompt"]))
    referenced = {p.resolve() for item in listed for p in (item.image, item.hint)}
    for folder in sorted({p.parent for p in referenced if p.parent.is_dir()}):
        extra = sorted(p.name for p in folder.iterdir()
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.resolve() not in referenced)
        if extra:
            report.warnings.append(f"{folder}: {len(extra)} images not listed in {path.name}: "
                                   f"{', '.join(extra)}")
    return listed


def list_folders(image_dir: Path, conditioning_dir: Path, caption_extension: str,
                 report: Report) -> list[Listed]:
    """kohya's layout: pairs by basename; images without a condition are errors, the reverse extra."""
    for folder in (image_dir, conditioning_dir):
        if not folder.is_dir():
            report.errors.append(f"{folder} is not a folder")
            return []
    images, hints = images_by_stem(image_dir), images_by_stem(conditioning_dir)
    extra = sorted(hints[s].name for s in set(hints) - set(images))
    if extra:
        report.warnings.append(f"{conditioning_dir}: {len(extra)} conditioning images without an image "
                               f"in {image_dir}: {', '.join(extra)}")
    listed = []
    for stem, image in images.items():
        caption_file = image.with_suffix(caption_extension)
        caption = caption_file.read_text() if caption_file.is_file() else None
        if stem not in hints:
            report.errors.append(f"{image}: no conditioning image named {stem}.* in {conditioning_dir}")
        listed.append(Listed(str(image.name), image, hints.get(stem), caption))
    return listed


def check_dataset(source, strict: bool = False, multiple: int | None = VAE_MULTIPLE) -> Report:
    """Check a Fill50K-style folder or JSON Lines file, or a kohya .toml; see the module docstring."""
    source, report = Path(source), Report()
    if source.suffix == ".toml":
        try:
            configs = parse_kohya_toml(source, multiple or 1)
        except (OSError, ValueError) as error:
            report.errors.append(str(error))
            return report
        for config in configs:
            for subset in config.subsets:
                listed = list_folders(subset.image_dir, subset.conditioning_data_dir,
                                      subset.caption_extension, report)
                check_listed(listed, report, strict, multiple=None)  # resized to the resolution
        return report
    jsonl = source / "prompt.json" if source.is_dir() else source
    if not jsonl.is_file():
        report.errors.append(f"{jsonl} not found (pass a folder holding prompt.json, a JSON Lines file, "
                             "or a kohya dataset .toml)")
        return report
    check_listed(list_jsonl(jsonl, report), report, strict, multiple)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description="Report every problem of a training dataset at once")
    parser.add_argument("source", type=Path, help="folder with prompt.json, a JSON Lines file or a .toml")
    parser.add_argument("--strict", action="store_true", help="refuse non-RGB images and empty captions")
    parser.add_argument("--multiple", type=int, default=VAE_MULTIPLE,
                        help="side multiple to expect (8; 64 for LLLite's depth 4)")
    args = parser.parse_args()
    report = check_dataset(args.source, args.strict, args.multiple)
    for message in report.errors:
        print(f"ERROR   {message}")
    for message in report.warnings:
        print(f"WARNING {message}")
    print(report.summary())
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
