"""Check a training dataset before training: report every problem at once, or open it only when it has none.

    python -m tinylllite.dataset_check training/fill50k            # a folder with prompt.json
    python -m tinylllite.dataset_check my_pairs.jsonl               # any JSON Lines file, Fill50K layout
    python -m tinylllite.dataset_check dataset.toml [--strict]      # kohya's dataset description

The original tutorial and kohya's scripts find bad data when the data loader reaches it, often hours
into training. This reads everything first: the JSON Lines file as a whole (empty, or a JSON array
instead of one object per line) and each line (bad ones reported by number), every listed file
(missing ones listed; files beside them that no pair lists reported as extra), every image fully
decoded (unreadable or truncated ones reported), its size (over 4096 px on a side is refused), the
sizes of both members of a pair (they must agree) and, when nothing resizes them (`--size`), of all
pairs (a batch needs one size, a multiple of 8), the image mode (non-RGB images are converted when
loaded, with a warning; `--strict` refuses them) and the captions (missing or non-UTF-8 ones are
errors, empty ones warnings, errors with `--strict`). It ends with summary counts and exits with
status 1 when there is any error.

`open_checked` is the same check run by a trainer before its first step, reading image headers only
(50,000 full decodes would cost minutes): it raises `InputError` naming the first problem, or returns
the opened dataset with what kind of data it is.
"""
import argparse
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from tinylllite.data.datasets import (CHECK_COMMAND, IMAGE_EXTENSIONS, MAX_SIDE, VAE_SCALE_FACTOR, check_size, images_by_stem,
                                 parse_pair_line, read_utf8, size_flag, whole_file_problem)
from tinylllite.errors import InputError, run_command
from tinylllite.data.fidelity import is_fill50k_prompt
from tinylllite.data.kohya_toml import open_training_data, parse_kohya_toml

FOLDER, JSONL, TOML = "fill50k-folder", "json-lines", "kohya-toml"  # the three layouts


@dataclass
class Report:
    pairs: int = 0  # pairs listed
    good_pairs: int = 0  # pairs with no error
    fill50k_prompts: int = 0  # captions of the Fill50K template with known colour names
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
    caption_problem: str | None = None  # why the caption could not be read


def read_image(path: Path, where: str, report: Report, strict: bool, decode: bool) -> tuple[int, int] | None:
    """(width, height) from the header, the pixels decoded too if `decode`; None after reporting a problem."""
    too_large = (f"{where}: {path} is over {MAX_SIDE} px on a side; resize it (e.g. to 512 or 1024 px; "
                 "training resizes to the model's size anyway)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by size
            with Image.open(path) as image:
                mode, size = image.mode, image.size
                if max(size) > MAX_SIDE:
                    report.errors.append(f"{too_large} ({size[0]}x{size[1]})")
                    return None
                if decode:
                    image.load()
    except FileNotFoundError:
        report.errors.append(f"{where}: {path} does not exist")
        return None
    except Image.DecompressionBombError:
        report.errors.append(too_large)
        return None
    except (OSError, SyntaxError, ValueError) as error:
        report.errors.append(f"{where}: {path} is unreadable or truncated ({error}); replace or remove it")
        return None
    if mode != "RGB":
        if strict:
            report.errors.append(f"{where}: {path} is {mode}, not RGB (refused in strict mode; convert it)")
            return None
        report.warnings.append(f"{where}: {path} is {mode}, not RGB; it will be converted to RGB")
    return size


def check_listed(listed: list[Listed], report: Report, strict: bool, size, multiple: int,
                 decode: bool) -> None:
    """Check every pair's images and caption; without a resize `size`, all pairs must share one size."""
    report.pairs += len(listed)
    first_of_size = {}  # (width, height) -> where it was first seen
    for item in tqdm(listed, desc="checking pairs", unit="pair", file=sys.stderr, disable=len(listed) < 1000):
        errors_before = len(report.errors)
        sizes = [read_image(p, item.where, report, strict, decode) for p in (item.image, item.hint) if p]
        if None not in sizes and len(sizes) == 2:
            if sizes[0] != sizes[1]:
                report.errors.append(f"{item.where}: {item.image} is {sizes[0][0]}x{sizes[0][1]} but "
                                     f"{item.hint} is {sizes[1][0]}x{sizes[1][1]}; resize one to the other")
            else:
                first_of_size.setdefault(sizes[0], item.where)
        if item.caption_problem:
            report.errors.append(item.caption_problem)
        elif item.caption is None:
            report.errors.append(f"{item.where}: no caption")
        elif not item.caption.strip():
            (report.errors if strict else report.warnings).append(f"{item.where}: empty caption")
        elif is_fill50k_prompt(item.caption):
            report.fill50k_prompts += 1
        if len(report.errors) == errors_before and item.image and item.hint:
            report.good_pairs += 1
    if size is not None:
        return
    resize = "or pass a size (`--size N`, or size= when training) to resize and centre-crop every pair"
    if len(first_of_size) > 1:
        seen = ", ".join(f"{where}: {w}x{h}" for (w, h), where in list(first_of_size.items())[:3])
        report.errors.append(f"the pairs have {len(first_of_size)} different sizes ({seen}); a batch needs one "
                             f"size: resize the images to one size, {resize}")
    for (width, height), where in first_of_size.items():
        if width % multiple or height % multiple:
            report.errors.append(f"{where}: {width}x{height} is not a multiple of {multiple} on each side "
                                 f"(the VAE needs 8, LLLite's depth 4 needs 64); resize the images, {resize}")


def list_jsonl(path: Path, report: Report) -> list[Listed]:
    """Every line of a Fill50K-style JSON Lines file; bad lines reported with their numbers."""
    listed = []
    try:
        text = read_utf8(path, "JSON Lines file")
    except (OSError, InputError) as error:
        report.errors.append(f"{path} cannot be read ({error})" if isinstance(error, OSError) else str(error))
        return listed
    problem = whole_file_problem(path, text)
    if problem:
        report.errors.append(problem)
        return listed
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{path.name} line {number}"
        if not line.strip():
            report.warnings.append(f"{where}: empty line")
            continue
        item, problem = parse_pair_line(line)
        if problem:
            report.errors.append(f"{where}: {problem}")
            continue
        listed.append(Listed(where, path.parent / item["target"], path.parent / item["source"],
                             item["prompt"]))
    # abspath, not resolve: one string operation instead of a system call per path (50,000 pairs)
    referenced = {os.path.abspath(p) for item in listed for p in (item.image, item.hint)}
    for folder in sorted({Path(p).parent for p in referenced if Path(p).parent.is_dir()}):
        extra = sorted(p.name for p in folder.iterdir()
                       if p.suffix.lower() in IMAGE_EXTENSIONS and os.path.abspath(p) not in referenced)
        if extra:
            report.warnings.append(f"{folder}: {len(extra)} images not listed in {path.name}: "
                                   f"{', '.join(extra[:20])}{', ...' if len(extra) > 20 else ''}")
    return listed


def list_folders(image_dir: Path, conditioning_dir: Path, caption_extension: str,
                 report: Report) -> list[Listed]:
    """kohya's layout: pairs by basename; images without a condition are errors, the reverse extra."""
    for folder in (image_dir, conditioning_dir):
        if not folder.is_dir():
            report.errors.append(f"{folder} is not a folder")
            return []
    images, hints = images_by_stem(image_dir), images_by_stem(conditioning_dir)
    if not images:
        report.errors.append(f"{image_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    extra = sorted(hints[s].name for s in set(hints) - set(images))
    if extra:
        report.warnings.append(f"{conditioning_dir}: {len(extra)} conditioning images without an image "
                               f"in {image_dir}: {', '.join(extra)}")
    listed = []
    for stem, image in images.items():
        item = Listed(str(image.name), image, hints.get(stem), None)
        caption_file = image.with_suffix(caption_extension)
        if caption_file.is_file():
            try:
                item.caption = read_utf8(caption_file, "caption")
            except (OSError, InputError) as error:
                item.caption_problem = f"{image.name}: caption {error}" if isinstance(error, OSError) else str(error)
        if stem not in hints:
            report.errors.append(f"{image}: no conditioning image named {stem}.* in {conditioning_dir}")
        listed.append(item)
    return listed


def check_dataset(source, strict: bool = False, multiple: int = VAE_SCALE_FACTOR, size=None,
                  decode: bool = True) -> Report:
    """Check a Fill50K-style folder or JSON Lines file, or a kohya .toml; see the module docstring.

    `size`: the (width, height) or side the pairs will be resized to, None for as they are;
    `decode=False` reads image headers only (sizes and modes), not the pixels.
    """
    source, report = Path(source), Report()
    if source.suffix == ".toml":
        try:
            configs = parse_kohya_toml(source, multiple)
        except (OSError, ValueError) as error:
            report.errors.append(str(error))
            return report
        for config in configs:
            for subset in config.subsets:
                listed = list_folders(subset.image_dir, subset.conditioning_data_dir,
                                      subset.caption_extension, report)
                check_listed(listed, report, strict, config.resolution, multiple, decode)
        return report
    jsonl = source / "prompt.json" if source.is_dir() else source
    if not jsonl.is_file():
        report.errors.append(f"{jsonl} not found (pass a folder holding prompt.json, a JSON Lines file, "
                             "or a kohya dataset .toml)")
        return report
    check_listed(list_jsonl(jsonl, report), report, strict, size, multiple, decode)
    return report


@dataclass
class CheckedData:
    dataset: Dataset  # items dict(jpg, txt, hint), as `tinylllite.data.kohya_toml.open_training_data` opens them
    batch_size: int | None  # a kohya .toml's batch_size, else None
    layout: str  # FOLDER, JSONL or TOML
    is_fill50k: bool  # every caption is a Fill50K prompt (known colours), so its fidelity metric applies
    warnings: list[str]  # what will be converted or ignored (non-RGB images, extra files, empty captions)


def open_checked(path, size=None, multiple: int = VAE_SCALE_FACTOR, chw: bool = False,
                 prompt_dropout: float = 0.0) -> CheckedData:
    """Check a dataset from its image headers, then open it; raises `InputError` naming the first problem.

    `path`: a folder holding prompt.json, a JSON Lines file or a kohya .toml; `size`: resize and
    centre-crop to it (an int or (width, height)), None to keep the images' one shared size.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; pass a folder holding prompt.json, a JSON Lines file or a "
                         "kohya dataset .toml")
    if size is not None:
        size = check_size(size, multiple)
    report = check_dataset(path, multiple=multiple, size=size, decode=False)
    if report.errors:
        more = len(report.errors) - 1
        raise InputError(report.errors[0] + (f" (and {more} more problem{'s' * (more > 1)}: run "
                                             f"`{CHECK_COMMAND} {path}` to list them all)" if more else ""))
    if report.warnings:
        warnings.warn(f"{path}: {len(report.warnings)} warning(s), e.g. {report.warnings[0]}; run "
                      f"`{CHECK_COMMAND} {path}` to list them all", stacklevel=2)
    layout = TOML if path.suffix == ".toml" else FOLDER if path.is_dir() else JSONL
    dataset, batch_size = open_training_data(path, size, multiple, chw, prompt_dropout)
    is_fill50k = layout != TOML and report.fill50k_prompts == report.pairs > 0
    return CheckedData(dataset, batch_size, layout, is_fill50k, report.warnings)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Report every problem of a training dataset at once")
    parser.add_argument("source", type=Path, help="folder with prompt.json, a JSON Lines file or a .toml")
    parser.add_argument("--strict", action="store_true", help="refuse non-RGB images and empty captions")
    parser.add_argument("--multiple", type=int, choices=(8, 16, 32, 64), default=VAE_SCALE_FACTOR,
                        help="side multiple to expect (8; 64 for LLLite's depth 4)")
    parser.add_argument("--size", type=size_flag, help="side the pairs will be resized to (default: as they are)")
    args = parser.parse_args(argv)
    if args.size is not None and args.size % args.multiple:
        parser.error(f"--size {args.size} is not a multiple of --multiple {args.multiple}")
    report = check_dataset(args.source, args.strict, args.multiple, args.size)
    for message in report.errors:
        print(f"ERROR   {message}")
    for message in report.warnings:
        print(f"WARNING {message}")
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(run_command("dataset_check", main))
