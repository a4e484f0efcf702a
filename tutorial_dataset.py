"""Step 1 of the original tutorial: the Fill50K dataset (lllyasviel/ControlNet `tutorial_dataset.py`
and `tutorial_dataset_test.py` in one file).

`MyDataset` reads ./training/fill50k/prompt.json (JSON Lines) and returns the original's dict:
`jpg` = target image in [-1, 1], `txt` = prompt, `hint` = source outline in [0, 1], HWC float32 RGB
(the original read BGR with OpenCV and converted; PIL reads RGB). The loading itself lives in
`tinylllite.data.datasets.Fill50KDataset`.

    python tutorial_dataset.py                      # what tutorial_dataset_test.py printed (falls back to the
                                                    # tiny training job's ./training/fill50k_<size>)
    python tutorial_dataset.py --make 50000         # synthesize Fill50K offline into ./training/fill50k
    python tutorial_dataset.py --make 2000 --size 64 --seed 1 --out ./training/fill50k_64
    python tutorial_dataset.py --make 2000 --size 64 --out ./training/fill50k_64 --overwrite   # replace that set
"""
import argparse
import sys
from pathlib import Path

from tinylllite.data.datasets import Fill50KDataset, size_flag
from tinylllite.errors import InputError, run_command
from tinylllite.data.fill50k import write_fill50k

DATA_ROOT = Path("./training/fill50k")
TINY_ROOTS = "./training/fill50k_*"  # where the default tiny training job writes its set, e.g. fill50k_64
DOWNLOAD_URL = "https://huggingface.co/lllyasviel/ControlNet/blob/main/training/fill50k.zip"


class MyDataset(Fill50KDataset):
    """The tutorial's dataset: Fill50K from ./training/fill50k, nothing resized, no prompt dropout."""

    def __init__(self, root=DATA_ROOT):
        super().__init__(root)


def find_root() -> Path:
    """./training/fill50k, else the first ./training/fill50k_<size> of the tiny training job; else refused."""
    tiny = sorted(p for p in DATA_ROOT.parent.glob(Path(TINY_ROOTS).name) if not p.name.endswith(".partial"))
    for root in [DATA_ROOT, *tiny]:
        if (root / "prompt.json").is_file():
            return root
    raise InputError(f"no prompt.json in {DATA_ROOT} or {TINY_ROOTS}: download the real Fill50K ({DOWNLOAD_URL}) "
                     f"and unzip it into ./training/, or make a look-alike with `python tutorial_dataset.py --make "
                     f"50000` (--size, --seed, --out {DATA_ROOT})")


def at_least_one(text: str) -> int:
    """argparse type of a count: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make", type=at_least_one, metavar="N", help="synthesize N Fill50K pairs offline")
    parser.add_argument("--size", type=size_flag, default=512, help="image side in pixels, a multiple of 8 "
                        "(default 512)")
    parser.add_argument("--seed", type=int, default=0, help="item i depends only on (seed, i)")
    parser.add_argument("--out", type=Path, default=DATA_ROOT, help=f"output folder (default {DATA_ROOT})")
    parser.add_argument("--overwrite", action="store_true", help="replace a Fill50K set already in --out")
    parser.add_argument("--workers", type=at_least_one, default=None, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be 0 or more, got {args.seed}")
    if args.make is not None:
        try:
            write_fill50k(args.out, args.make, size=args.size, seed=args.seed, workers=args.workers,
                          overwrite=args.overwrite)
        except KeyboardInterrupt:  # Ctrl-C: the half-written set is already removed (write_fill50k is atomic)
            print(f"\ntutorial_dataset.py: interrupted; {args.out} was not written (an earlier set there is "
                  f"unchanged): run the command again to make it", file=sys.stderr)
            return 130
        print(f"wrote {args.make} pairs to {args.out}")
        return 0
    root = find_root()
    if root != DATA_ROOT:
        print(f"no {DATA_ROOT}: opened {root}", file=sys.stderr)
    dataset = MyDataset(root)
    print(len(dataset))
    item = dataset[min(1234, len(dataset) - 1)]
    print(item["txt"])
    print(item["jpg"].shape)
    print(item["hint"].shape)
    return 0


if __name__ == "__main__":
    sys.exit(run_command("tutorial_dataset.py", main))
