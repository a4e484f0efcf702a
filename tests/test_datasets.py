"""Datasets return the original tutorial's dict, transform image and hint together, and fail loudly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinylllite.data.datasets import Fill50KDataset, PairedFolderDataset
from tinylllite.errors import InputError
from tinylllite.data.fill50k import make_pair, write_fill50k
from tinylllite.data.kohya_toml import load_kohya_toml, open_training_data, parse_kohya_toml

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def fill50k_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "fill50k"
    write_fill50k(root, 3, size=32, workers=1)
    return root


def marked_pair(folder: Path, stem: str, width=96, height=64):
    """An image and hint sharing an off-centre square, so geometric transforms can be compared."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, :] = (0, 0, 200)
    image[10:30, 50:70] = (255, 0, 0)
    hint = np.zeros_like(image)
    hint[10:30, 50:70] = 255
    (folder / "images").mkdir(exist_ok=True)
    (folder / "cond").mkdir(exist_ok=True)
    Image.fromarray(image).save(folder / "images" / f"{stem}.png")
    Image.fromarray(hint).save(folder / "cond" / f"{stem}.png")
    (folder / "images" / f"{stem}.txt").write_text(f"caption of {stem}\n")


def square_masks(item):
    """(image mask of the red square, hint mask of the white square), both (H, W) bool."""
    return item["jpg"][..., 0] > 0, item["hint"][..., 0] > 0.5


def test_fill50k_items_are_the_original_dict_hwc_float32_in_the_original_ranges(fill50k_root):
    """jpg = target in [-1, 1], hint = source in [0, 1], txt = prompt, exactly as the original scales them."""
    item = Fill50KDataset(fill50k_root)[1]
    pair = make_pair(0, 1, 32)
    assert set(item) == {"jpg", "txt", "hint"}
    assert item["jpg"].shape == item["hint"].shape == (32, 32, 3)
    assert item["jpg"].dtype == item["hint"].dtype == np.float32
    assert np.array_equal(item["jpg"], pair.target.astype(np.float32) / 127.5 - 1.0)
    assert np.array_equal(item["hint"], pair.source.astype(np.float32) / 255.0)
    assert item["txt"] == pair.prompt


def test_chw_option_returns_channel_first_tensors(fill50k_root):
    """chw=True gives (3, H, W) torch tensors with the same values."""
    hwc, chw = Fill50KDataset(fill50k_root)[0], Fill50KDataset(fill50k_root, chw=True)[0]
    assert isinstance(chw["jpg"], torch.Tensor) and chw["jpg"].shape == (3, 32, 32)
    assert torch.equal(chw["hint"], torch.from_numpy(hwc["hint"]).permute(2, 0, 1))


def test_prompt_dropout_is_off_by_default_and_empties_captions_when_on(fill50k_root):
    """Default keeps every prompt; prompt_dropout=1 replaces each with the empty string."""
    assert all(Fill50KDataset(fill50k_root)[i]["txt"] for i in range(3))
    assert [Fill50KDataset(fill50k_root, prompt_dropout=1.0)[i]["txt"] for i in range(3)] == [""] * 3


def test_resize_and_centre_crop_move_image_and_hint_together(tmp_path):
    """A 96x64 pair cropped to 32x32 keeps the image's square exactly where the hint's is."""
    marked_pair(tmp_path, "a")
    item = PairedFolderDataset(tmp_path / "images", tmp_path / "cond", size=32)[0]
    assert item["jpg"].shape == item["hint"].shape == (32, 32, 3)
    image_mask, hint_mask = square_masks(item)
    assert image_mask.any() and np.mean(image_mask == hint_mask) > 0.98


def test_flip_flips_image_and_hint_together(tmp_path):
    """Over many draws both flipped and unflipped items occur, always with image and hint agreeing."""
    marked_pair(tmp_path, "a")
    dataset = PairedFolderDataset(tmp_path / "images", tmp_path / "cond", flip=True)
    torch.manual_seed(0)
    flipped = []
    for _ in range(12):
        image_mask, hint_mask = square_masks(dataset[0])
        assert np.array_equal(image_mask, hint_mask)
        flipped.append(bool(image_mask[:, :48].any()))  # the square starts right of centre
    assert any(flipped) and not all(flipped)


def test_kohya_folders_pair_by_basename_and_read_txt_captions(tmp_path):
    """image_dir/x.png pairs with cond/x.png and caption image_dir/x.txt."""
    marked_pair(tmp_path, "b")
    marked_pair(tmp_path, "a")
    dataset = PairedFolderDataset(tmp_path / "images", tmp_path / "cond")
    assert len(dataset) == 2 and [dataset[i]["txt"] for i in range(2)] == ["caption of a", "caption of b"]


def test_a_jsonl_file_in_fill50k_layout_is_a_paired_dataset(fill50k_root):
    """PairedFolderDataset accepts prompt.json itself."""
    assert len(PairedFolderDataset(fill50k_root / "prompt.json")) == 3


def test_missing_conditioning_images_are_listed_by_name(tmp_path):
    """An image without its condition is refused, naming it."""
    marked_pair(tmp_path, "a")
    Image.new("RGB", (96, 64)).save(tmp_path / "images" / "lonely.png")
    with pytest.raises(InputError, match="1 images without a condition .*lonely"):
        PairedFolderDataset(tmp_path / "images", tmp_path / "cond")


def test_sizes_that_do_not_suit_the_model_are_refused(tmp_path, fill50k_root):
    """size 60 is not a multiple of 8; 32 is not a multiple of 64 (LLLite depth 4); odd images need size=."""
    with pytest.raises(ValueError, match="not a multiple of 8"):
        Fill50KDataset(fill50k_root, size=60)
    with pytest.raises(ValueError, match="not a multiple of 64"):
        Fill50KDataset(fill50k_root, size=32, multiple=64)
    marked_pair(tmp_path, "odd", width=90, height=64)
    with pytest.raises(ValueError, match="90x64, not a multiple of 8; pass size="):
        PairedFolderDataset(tmp_path / "images", tmp_path / "cond")[0]


def test_pair_members_of_different_sizes_are_refused(tmp_path):
    """An image and hint of different sizes raise, naming both files and sizes."""
    marked_pair(tmp_path, "a")
    Image.new("RGB", (48, 32)).save(tmp_path / "cond" / "a.png")
    with pytest.raises(ValueError, match="is 96x64 but its hint .* is 48x32"):
        PairedFolderDataset(tmp_path / "images", tmp_path / "cond")[0]


def test_bad_json_line_is_refused_with_its_line_number(tmp_path):
    """A broken line of prompt.json raises naming the file and the line."""
    root = tmp_path / "set"
    root.mkdir()
    good = json.dumps({"source": "s.png", "target": "t.png", "prompt": "p"})
    (root / "prompt.json").write_text(good + "\n{oops\n")
    with pytest.raises(ValueError, match="prompt.json line 2: not valid JSON"):
        Fill50KDataset(root)


def test_colour_augmentation_is_refused_on_a_conditioning_dataset(tmp_path):
    """color_aug=True raises explaining why."""
    marked_pair(tmp_path, "a")
    with pytest.raises(ValueError, match="colour augmentation is refused"):
        PairedFolderDataset(tmp_path / "images", tmp_path / "cond", color_aug=True)


def write_toml(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def test_kohya_toml_describes_a_dataset_with_resolution_batch_size_and_flip(tmp_path):
    """[general] options reach the subsets; items come out at the resolution, repeats multiply."""
    marked_pair(tmp_path, "a")
    toml = write_toml(tmp_path / "d.toml", f"""
[general]
flip_aug = true
color_aug = false
resolution = [32, 48]

[[datasets]]
batch_size = 4

  [[datasets.subsets]]
  image_dir = "{tmp_path / 'images'}"
  caption_extension = ".txt"
  conditioning_data_dir = "{tmp_path / 'cond'}"
  num_repeats = 3
""")
    config = parse_kohya_toml(toml)[0]
    assert config.resolution == (32, 48) and config.batch_size == 4 and config.subsets[0].flip_aug
    loaded = load_kohya_toml(toml)[0]
    assert len(loaded.dataset) == 3 and loaded.batch_size == 4
    item = loaded.dataset[0]
    assert item["jpg"].shape == (48, 32, 3) and item["txt"] == "caption of a"


def test_open_training_data_accepts_a_folder_a_jsonl_file_and_a_toml(tmp_path, fill50k_root):
    """One call opens each description; only the .toml brings a batch size."""
    marked_pair(tmp_path, "a")
    toml = write_toml(tmp_path / "d.toml", f"""[general]\nresolution = 32\n[[datasets]]\nbatch_size = 2
[[datasets.subsets]]\nimage_dir = "{tmp_path / 'images'}"\nconditioning_data_dir = "{tmp_path / 'cond'}"
caption_extension = ".txt"\n""")
    folder, batch = open_training_data(fill50k_root)
    assert len(folder) == 3 and batch is None
    assert len(open_training_data(fill50k_root / "prompt.json", size=16)[0][0]["jpg"]) == 16
    dataset, batch = open_training_data(toml)
    assert batch == 2 and dataset[0]["hint"].shape == (32, 32, 3)


@pytest.mark.parametrize("body, message", [
    ("[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'i'\n"
     "conditioning_data_dir = 'c'\ncolor_aug = true\n", "color_aug = true is refused"),
    ("[general]\nresolution = 64\nenable_bucket = true\n[[datasets]]\n", "unsupported key.*enable_bucket"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'i'\nconditioning_data_dir = 'c'\n", "no resolution"),
    ("[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'i'\n",
     "missing conditioning_data_dir"),
    ("[general]\nresolution = 60\n[[datasets]]\n", "not a multiple of 8"),
    ("[general\n", "not valid TOML"),
])
def test_bad_kohya_toml_is_refused_naming_the_table_and_key(tmp_path, body, message):
    """Each bad .toml raises a message pointing at what to change."""
    with pytest.raises(ValueError, match=message):
        parse_kohya_toml(write_toml(tmp_path / "bad.toml", body))


def run_tutorial(cwd: Path, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "tutorial_dataset.py"), *args], cwd=cwd,
                          capture_output=True, text=True, env=env)


def test_tutorial_dataset_explains_how_to_get_fill50k_when_it_is_missing(tmp_path):
    """Without ./training/fill50k the script names the download and the --make command, and fails."""
    result = run_tutorial(tmp_path)
    assert result.returncode != 0
    assert "fill50k.zip" in result.stderr and "python tutorial_dataset.py --make" in result.stderr


def test_tutorial_dataset_makes_fill50k_and_prints_what_the_original_test_printed(tmp_path):
    """--make writes ./training/fill50k; a plain run prints the count, a prompt and both shapes."""
    assert run_tutorial(tmp_path, "--make", "5", "--size", "32", "--workers", "1").returncode == 0
    lines = run_tutorial(tmp_path).stdout.splitlines()
    assert lines == ["5", make_pair(0, 4, 32).prompt, "(32, 32, 3)", "(32, 32, 3)"]
