"""kohya sd-scripts dataset `.toml` files, read as a dataset description for ControlNet / LLLite training.

kohya's ControlNet-LLLite guide (sd-scripts `docs/train_lllite_README.md`) describes data like this:

    [general]
    flip_aug = false
    color_aug = false
    resolution = [1024, 1024]

    [[datasets]]
    batch_size = 8

      [[datasets.subsets]]
      image_dir = "path/to/image/dir"
      caption_extension = ".txt"
      conditioning_data_dir = "path/to/conditioning/image/dir"

Options set in `[general]` apply to every dataset, options of a `[[datasets]]` table to its subsets;
the innermost wins, as in sd-scripts. Paths are taken as written (relative ones from the current
folder, as sd-scripts does). Supported: the keys below. Anything else (buckets, caption shuffling,
regularisation images, ...) is refused by name rather than silently ignored. `color_aug = true` is
refused: colour augmentation changes the image but not its condition. `open_training_data` opens
any of the three dataset descriptions (Fill50K folder, JSON Lines file, .toml).
"""
import tomllib
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import ConcatDataset

from tinylllite.data.datasets import (VAE_SCALE_FACTOR, Fill50KDataset, PairedDataset, PairedFolderDataset, check_size,
                                 read_folder_pairs, read_utf8)
from tinylllite.errors import InputError

SUBSET_ONLY = ("image_dir", "conditioning_data_dir")
SUBSET_INHERITED = ("caption_extension", "num_repeats", "flip_aug", "color_aug")  # any level
DATASET_INHERITED = ("resolution", "batch_size")  # [general] or [[datasets]]
DEFAULTS = dict(caption_extension=".caption", num_repeats=1, flip_aug=False, color_aug=False,
                batch_size=1)  # sd-scripts' defaults; resolution has none and must be given


@dataclass
class SubsetConfig:
    image_dir: Path
    conditioning_data_dir: Path
    caption_extension: str
    num_repeats: int
    flip_aug: bool
    color_aug: bool


@dataclass
class DatasetConfig:
    resolution: tuple[int, int]  # (width, height)
    batch_size: int
    subsets: list[SubsetConfig]


def _refuse_unknown(table: dict, allowed: tuple, where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise InputError(f"{where}: unsupported key(s) {', '.join(unknown)}; tinylllite reads "
                         f"{', '.join(allowed)} here")


def _positive_int(value, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{where}: {key} = {value!r} must be a whole number of at least 1")
    return value


def parse_kohya_toml(path, multiple: int = VAE_SCALE_FACTOR) -> list[DatasetConfig]:
    """The datasets a kohya .toml describes, every option resolved; raises naming the table and key."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found; pass a kohya dataset .toml")
    try:
        config = tomllib.loads(read_utf8(path, "TOML file"))
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"{path}: not valid TOML ({error})") from None
    _refuse_unknown(config, ("general", "datasets"), str(path))
    general = config.get("general", {})
    _refuse_unknown(general, SUBSET_INHERITED + DATASET_INHERITED, f"{path} [general]")
    if not config.get("datasets"):
        raise InputError(f"{path}: no [[datasets]] table")
    datasets = []
    for d, dataset in enumerate(config["datasets"], start=1):
        where = f"{path} [[datasets]] #{d}"
        _refuse_unknown(dataset, SUBSET_INHERITED + DATASET_INHERITED + ("subsets",), where)
        options = DEFAULTS | general | {k: v for k, v in dataset.items() if k != "subsets"}
        if "resolution" not in options:
            raise InputError(f"{where}: no resolution (set e.g. resolution = 512 in [general])")
        resolution = options["resolution"]
        try:
            resolution = check_size(resolution, multiple)
        except (TypeError, ValueError) as error:
            raise InputError(f"{where}: resolution {resolution!r}: {error}") from None
        subsets = []
        for s, subset in enumerate(dataset.get("subsets", []), start=1):
            here = f"{where} [[datasets.subsets]] #{s}"
            _refuse_unknown(subset, SUBSET_ONLY + SUBSET_INHERITED, here)
            missing = [k for k in SUBSET_ONLY if k not in subset]
            if missing:
                raise InputError(f"{here}: missing {', '.join(missing)} (a conditioning dataset "
                                 "needs both image_dir and conditioning_data_dir)")
            merged = {k: v for k, v in options.items() if k in SUBSET_INHERITED} | subset
            if merged["color_aug"]:
                raise InputError(f"{here}: color_aug = true is refused for a conditioning dataset: it "
                                 "changes the image's colours but not the hint's; set color_aug = false")
            for key in SUBSET_ONLY + ("caption_extension",):
                if not isinstance(merged[key], str):
                    raise InputError(f"{here}: {key} = {merged[key]!r} must be text in quotes")
            subsets.append(SubsetConfig(Path(merged["image_dir"]), Path(merged["conditioning_data_dir"]),
                                        merged["caption_extension"],
                                        _positive_int(merged["num_repeats"], "num_repeats", here),
                                        bool(merged["flip_aug"]), False))
        if not subsets:
            raise InputError(f"{where}: no [[datasets.subsets]]")
        datasets.append(DatasetConfig(resolution, _positive_int(options["batch_size"], "batch_size", where),
                                      subsets))
    return datasets


@dataclass
class KohyaDataset:
    dataset: ConcatDataset  # every subset, each repeated num_repeats times
    batch_size: int
    resolution: tuple[int, int]  # (width, height)


def load_kohya_toml(path, multiple: int = VAE_SCALE_FACTOR, chw: bool = False,
                    prompt_dropout: float = 0.0) -> list[KohyaDataset]:
    """One dataset per [[datasets]] table, images resized and centre-cropped to its resolution."""
    loaded = []
    for config in parse_kohya_toml(path, multiple):
        parts = []
        for subset in config.subsets:
            pairs = read_folder_pairs(subset.image_dir, subset.conditioning_data_dir,
                                      subset.caption_extension)
            part = PairedDataset(pairs, size=config.resolution, multiple=multiple, chw=chw,
                                 prompt_dropout=prompt_dropout, flip=subset.flip_aug)
            parts += [part] * subset.num_repeats
        loaded.append(KohyaDataset(ConcatDataset(parts), config.batch_size, config.resolution))
    return loaded


def open_training_data(path, size=None, multiple: int = VAE_SCALE_FACTOR, chw: bool = False,
                       prompt_dropout: float = 0.0):
    """(dataset, batch size or None) from a Fill50K-style folder, a JSON Lines file or a kohya .toml.

    A .toml must describe one [[datasets]] table (its resolution replaces `size`); the other two
    keep their images' size unless `size` is given.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; pass a folder holding prompt.json, a JSON Lines file or a "
                         "kohya dataset .toml")
    if path.suffix == ".toml":
        loaded = load_kohya_toml(path, multiple, chw, prompt_dropout)
        if len(loaded) != 1:
            raise InputError(f"{path}: {len(loaded)} [[datasets]] tables; tinylllite trains on one "
                             "(merge their subsets into a single [[datasets]])")
        return loaded[0].dataset, loaded[0].batch_size
    if path.is_dir():
        if not (path / "prompt.json").is_file():
            raise InputError(f"{path} holds no prompt.json; pass a Fill50K-layout folder, a JSON Lines file, "
                             "or, for image and conditioning folders, a kohya dataset .toml naming them")
        return Fill50KDataset(path, chw=chw, prompt_dropout=prompt_dropout, size=size,
                              multiple=multiple), None
    return PairedFolderDataset(path, size=size, multiple=multiple, chw=chw,
                               prompt_dropout=prompt_dropout), None
