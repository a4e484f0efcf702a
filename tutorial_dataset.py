"""Step 1 of the original tutorial: the Fill50K dataset (lllyasviel/ControlNet `tutorial_dataset.py`
and `tutorial_dataset_test.py` in one file).

`MyDataset` reads ./training/fill50k/prompt.json (JSON Lines) and returns the original's dict:
`jpg` = target image in [-1, 1], `txt` = prompt, `hint` = source outline in [0, 1], HWC float32 RGB
(the original read BGR with OpenCV and converted; PIL reads RGB). The loading itself lives in
`tinylllite.datasets.Fill50KDataset`.

    python tutorial_dataset.py                      # what tutorial_dataset_test.py printed
    python tutorial_dataset.py --make 50000         # synthesize Fill50K offline into ./training/fill50k
    python tutorial_dataset.py --make 2000 --size 64 --seed 1 --out ./training/fill50k_64
"""
import argparse
from pathlib import Path

from tinylllite.datasets import Fill50KDataset
from tinylllite.fill50k import write_fill50k

DATA_ROOT = Path("./training/fill50k")
DOWNLOAD_URL = "https://huggingface.co/lllyasviel/ControlNet/blob/main/training/fill50k.zip"


class MyDataset(Fill50KDataset):
    """The tutorial's dataset: Fill50K from ./training/fill50k, nothing resized, no prompt dropout."""

    def __init__(self, root=DATA_ROOT):
        super().__init__(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make", type=int, metavar="N", help="synthesize N Fill50K pairs offline")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="item i depends only on (seed, i)")
    parser.add_argument("--out", type=Path, default=DATA_ROOT, help=f"output folder (default {DATA_ROOT})")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args()
    if args.make is not None:
        write_fill50k(args.out, args.make, size=args.size, seed=args.seed, workers=args.workers)
        print(f"wrote {args.make} pairs to {args.out}")
        return
    if not (DATA_ROOT / "prompt.json").is_file():
        raise SystemExit(
            f"{DATA_ROOT}/prompt.json not found. Either download the real Fill50K ({DOWNLOAD_URL}) and "
            f"unzip it into ./training/, or synthesize a look-alike offline:\n"
            f"    python tutorial_dataset.py --make 50000 [--size 512] [--seed 0] [--out {DATA_ROOT}]")
    dataset = MyDataset()
    print(len(dataset))
    item = dataset[min(1234, len(dataset) - 1)]
    print(item["txt"])
    print(item["jpg"].shape)
    print(item["hint"].shape)


if __name__ == "__main__":
    main()
