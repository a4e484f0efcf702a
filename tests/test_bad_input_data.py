"""Mistakes in a user's data or flags end in one line naming the file and what to do, and leave their files alone."""
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from tinylllite.data import fill50k
from tinylllite.data.canny import canny_folder
from tinylllite.data.canny import main as canny_main
from tinylllite.data.dataset_check import FOLDER, JSONL, TOML, check_dataset, open_checked
from tinylllite.data.dataset_check import main as dataset_check_main
from tinylllite.data.datasets import Fill50KDataset, PairedFolderDataset, load_rgb
from tinylllite.errors import InputError
from tinylllite.data.fill50k import write_fill50k

ROOT = Path(__file__).parent.parent


def tutorial_dataset():
    """The tutorial_dataset.py script as a module (it lives beside the package, not in it)."""
    spec = importlib.util.spec_from_file_location("tutorial_dataset", ROOT / "tutorial_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snapshot(folder: Path) -> dict:
    """Every file under folder (relative path -> bytes), to show nothing was changed or added."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run(args: list, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env)


def assert_one_line_refusal(result: subprocess.CompletedProcess, prog: str, *needles: str) -> None:
    """Exit 1, no traceback, `prog: message` naming each needle."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{prog}: ") and all(n in result.stderr for n in needles), result.stderr


@pytest.fixture
def fill50k_set(tmp_path):
    """A 3-pair, 32 px Fill50K set in tmp_path/fill50k."""
    return write_fill50k(tmp_path / "fill50k", 3, size=32, workers=1)


def kohya_folders(root: Path, caption: bytes = b"a caption\n") -> Path:
    """images/a.png + images/a.txt + cond/a.png and a .toml naming them; returns the .toml."""
    for folder in ("images", "cond"):
        (root / folder).mkdir()
        Image.new("RGB", (32, 32), (200, 0, 0)).save(root / folder / "a.png")
    (root / "images" / "a.txt").write_bytes(caption)
    toml = root / "d.toml"
    toml.write_text(f"[general]\nresolution = 32\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "
                    f"'{root / 'images'}'\nconditioning_data_dir = '{root / 'cond'}'\ncaption_extension = '.txt'\n")
    return toml


def rewrite_prompts(root: Path, edit) -> None:
    """Replace each line's object of root/prompt.json by edit(object)."""
    lines = [json.loads(line) for line in (root / "prompt.json").read_text().splitlines()]
    (root / "prompt.json").write_text("".join(json.dumps(edit(item)) + "\n" for item in lines))


# ---- loading: the first batch names the file -----------------------------------------------------------

def test_a_truncated_image_is_named_when_its_item_is_loaded(fill50k_set):
    """A half PNG raises InputError naming it at item time, and the file stays as it was."""
    target = fill50k_set / "target" / "1.png"
    target.write_bytes(target.read_bytes()[:100])
    before = snapshot(fill50k_set)
    with pytest.raises(InputError, match=r"target/1\.png cannot be read as an image.*replace or remove it"):
        Fill50KDataset(fill50k_set)[1]
    assert snapshot(fill50k_set) == before


def test_a_pair_of_two_sizes_is_named_when_its_item_is_loaded(fill50k_set):
    """An image and hint of different sizes raise naming both files and sizes."""
    Image.new("RGB", (40, 32)).save(fill50k_set / "source" / "2.png")
    with pytest.raises(InputError, match=r"target/2\.png is 32x32 but its hint .*source/2\.png is 40x32"):
        Fill50KDataset(fill50k_set)[2]


def test_a_non_utf8_kohya_caption_is_named_with_its_file(tmp_path):
    """A Latin-1 caption raises naming the caption file, its line and UTF-8."""
    kohya_folders(tmp_path, caption="caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"images/a\.txt line 1: this caption is not UTF-8 text.*re-save it"):
        PairedFolderDataset(tmp_path / "images", tmp_path / "cond")


def test_a_non_utf8_prompt_json_names_the_line(fill50k_set):
    """A Latin-1 byte on line 2 of prompt.json is reported as line 2, not as a decode traceback."""
    lines = (fill50k_set / "prompt.json").read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"circle", b"c\xefrcle")
    (fill50k_set / "prompt.json").write_bytes(b"\n".join(lines))
    with pytest.raises(InputError, match=r"prompt\.json line 2: this JSON Lines file is not UTF-8"):
        Fill50KDataset(fill50k_set)


def test_an_image_over_4096_pixels_is_refused_when_loaded(tmp_path):
    """load_rgb refuses a side over 4096 px, naming the file and advising a resize."""
    Image.new("RGB", (8, 4104)).save(tmp_path / "tall.png")
    with pytest.raises(InputError, match=r"tall\.png is 8x4104, over 4096 px on a side; resize it"):
        load_rgb(tmp_path / "tall.png")


# ---- dataset_check: refused input never exits 0 -------------------------------------------------------

def test_a_json_array_is_one_error_that_names_json_lines(fill50k_set):
    """prompt.json written as a JSON array is one error saying the format is JSON Lines, not one per line."""
    items = [json.loads(line) for line in (fill50k_set / "prompt.json").read_text().splitlines()]
    (fill50k_set / "prompt.json").write_text(json.dumps(items, indent=1))
    report = check_dataset(fill50k_set)
    assert len(report.errors) == 1
    assert "is a JSON array; the format is JSON Lines (one object per line)" in report.errors[0]


def test_the_check_exits_1_on_an_empty_prompt_json(fill50k_set):
    """An empty prompt.json is an error and the command's exit status is 1."""
    (fill50k_set / "prompt.json").write_text("")
    result = run(["-m", "tinylllite.dataset_check", fill50k_set])
    assert result.returncode == 1
    assert "prompt.json is empty; list one pair per line" in result.stdout


def test_the_check_exits_1_on_pairs_of_mixed_sizes_unless_a_size_is_given(fill50k_set, capsys):
    """Pairs of two sizes are refused without --size (a batch needs one size) and accepted with it."""
    for folder in ("source", "target"):
        Image.new("RGB", (48, 48)).save(fill50k_set / folder / "2.png")
    refused = dataset_check_main([str(fill50k_set)])
    refusal = capsys.readouterr().out
    accepted = dataset_check_main([str(fill50k_set), "--size", "32"])
    assert refused == 1 and "the pairs have 2 different sizes" in refusal
    assert "prompt.json line 1: 32x32" in refusal and "line 3: 48x48" in refusal
    assert accepted == 0, capsys.readouterr().out


def test_a_pair_over_4096_pixels_is_refused_with_advice_to_resize(fill50k_set):
    """A pair with a side over 4096 px is an error naming the file, the limit and a resize."""
    for folder in ("source", "target"):
        Image.new("RGB", (5000, 8)).save(fill50k_set / folder / "0.png")
    errors = check_dataset(fill50k_set).errors
    assert any("target/0.png is over 4096 px on a side; resize it" in e and "(5000x8)" in e for e in errors)


def test_the_check_command_reports_a_non_utf8_kohya_caption_and_exits_1(tmp_path):
    """A Latin-1 caption in a kohya set is an error line naming it, not a crash."""
    toml = kohya_folders(tmp_path, caption=b"caf\xe9\n")
    result = run(["-m", "tinylllite.dataset_check", toml])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "images/a.txt line 1: this caption is not UTF-8 text" in result.stdout


def test_the_check_command_refuses_a_bad_size_flag_before_reading_anything(fill50k_set, capsys):
    """--size 7 is refused by argparse naming the flag (exit 2), not checked against the data."""
    with pytest.raises(SystemExit) as exit_status:
        dataset_check_main([str(fill50k_set), "--size", "7"])
    output = capsys.readouterr()
    assert exit_status.value.code == 2 and "--size" in output.err and "multiple of 8" in output.err
    assert output.out == ""


# ---- open_checked: the trainer's one call -------------------------------------------------------------

def test_open_checked_opens_a_generated_set_as_fill50k(fill50k_set):
    """A written set opens as a Fill50K folder, every item usable."""
    checked = open_checked(fill50k_set)
    assert (checked.layout, checked.is_fill50k, checked.batch_size) == (FOLDER, True, None)
    assert len(checked.dataset) == 3 and checked.dataset[0]["jpg"].shape == (32, 32, 3)


def test_open_checked_decides_fill50k_from_the_captions_not_the_folder_name(fill50k_set):
    """The same images with other captions, still in a folder named fill50k, are not Fill50K."""
    rewrite_prompts(fill50k_set, lambda item: dict(item, prompt="a photo of a cat"))
    assert open_checked(fill50k_set).is_fill50k is False
    rewrite_prompts(fill50k_set, lambda item: dict(item, prompt="blurple circle with white background"))
    assert open_checked(fill50k_set).is_fill50k is False


def test_open_checked_accepts_a_json_lines_file_and_a_kohya_toml(tmp_path, fill50k_set):
    """A JSON Lines file and a .toml open with their layouts; only the .toml brings a batch size."""
    jsonl = open_checked(fill50k_set / "prompt.json", size=16)
    toml = open_checked(kohya_folders(tmp_path))
    assert (jsonl.layout, jsonl.is_fill50k, jsonl.dataset[0]["jpg"].shape) == (JSONL, True, (16, 16, 3))
    assert (toml.layout, toml.is_fill50k, toml.batch_size) == (TOML, False, 1)


def test_open_checked_reads_image_headers_only(fill50k_set, monkeypatch):
    """No pixel is decoded by the check: it passes even when decoding would fail."""
    def no_decoding(self):
        raise AssertionError("decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("tinylllite.data.dataset_check.open_training_data", lambda *args: ([], None))
    assert open_checked(fill50k_set).layout == FOLDER


def test_open_checked_converts_rgba_and_greyscale_with_one_warning(fill50k_set):
    """RGBA and L images warn once (naming a file and the count) and load as RGB."""
    Image.new("RGBA", (32, 32)).save(fill50k_set / "target" / "0.png")
    Image.new("L", (32, 32)).save(fill50k_set / "source" / "1.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checked = open_checked(fill50k_set)
    assert len(caught) == 1 and "2 warning(s)" in str(caught[0].message)
    assert "target/0.png is RGBA, not RGB; it will be converted to RGB" in str(caught[0].message)
    assert checked.dataset[0]["jpg"].shape == checked.dataset[1]["hint"].shape == (32, 32, 3)


def mixed_sizes(root: Path) -> Path:
    for folder in ("source", "target"):
        Image.new("RGB", (48, 48)).save(root / folder / "2.png")
    return root


def too_large(root: Path) -> Path:
    for folder in ("source", "target"):
        Image.new("RGB", (8, 4160)).save(root / folder / "1.png")
    return root


def empty_prompt_json(root: Path) -> Path:
    (root / "prompt.json").write_text("\n\n")
    return root


def json_array(root: Path) -> Path:
    (root / "prompt.json").write_text('[{"source": "source/0.png", "target": "target/0.png", "prompt": "x"}]')
    return root


def without_prompt_json(root: Path) -> Path:
    (root / "prompt.json").unlink()
    return root


def empty_folder(root: Path) -> Path:
    (root.parent / "empty").mkdir()
    return root.parent / "empty"


def latin1_caption(root: Path) -> Path:
    return kohya_folders(root.parent, caption=b"na\xefve\n")


def missing_hint(root: Path) -> Path:
    (root / "source" / "1.png").unlink()
    return root


@pytest.mark.parametrize("spoil, message", [
    (lambda root: root.parent / "nowhere", r"nowhere does not exist; pass a folder holding prompt\.json"),
    (empty_folder, r"empty/prompt\.json not found"),
    (without_prompt_json, r"fill50k/prompt\.json not found"),
    (empty_prompt_json, r"prompt\.json is empty; list one pair per line"),
    (json_array, r"is a JSON array; the format is JSON Lines"),
    (mixed_sizes, r"the pairs have 2 different sizes .*pass a size"),
    (too_large, r"target/1\.png is over 4096 px on a side; resize it"),
    (latin1_caption, r"images/a\.txt line 1: this caption is not UTF-8 text"),
    (missing_hint, r"prompt\.json line 2: .*source/1\.png does not exist"),
], ids=["missing path", "empty folder", "no prompt.json", "blank prompt.json", "json array", "mixed sizes",
        "too large", "non-utf8 caption", "missing hint"])
def test_open_checked_refuses_bad_data_naming_the_file_and_leaves_it_untouched(fill50k_set, spoil, message):
    """Each problem is one InputError naming the file, raised before any item is loaded; no file changes."""
    path = spoil(fill50k_set)
    before = snapshot(fill50k_set.parent)
    with pytest.raises(InputError, match=message):
        open_checked(path)
    assert snapshot(fill50k_set.parent) == before


def test_open_checked_counts_the_other_problems_and_names_the_check_command(fill50k_set):
    """With several problems, the one line says how many more and how to list them."""
    for index in (0, 1):
        (fill50k_set / "source" / f"{index}.png").unlink()
    with pytest.raises(InputError, match=r"\(and 1 more problem: run `python -m tinylllite.dataset_check "):
        open_checked(fill50k_set)


# ---- writing Fill50K: refuse before writing, clean up after failing -----------------------------------

def test_make_refuses_a_non_empty_folder_without_overwrite_and_keeps_its_files(tmp_path):
    """--make into a folder holding the user's files exits 1 naming it; the files are unchanged."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = run([ROOT / "tutorial_dataset.py", "--make", "2", "--size", "16", "--out", "mine", "--workers", "1"],
                 cwd=tmp_path)
    assert_one_line_refusal(result, "tutorial_dataset.py", "mine already exists and is not empty", "--overwrite")
    assert snapshot(tmp_path) == {"mine/notes.txt": b"keep me"}


def test_overwrite_replaces_a_fill50k_set_but_never_a_folder_with_other_files(tmp_path):
    """overwrite=True replaces a set written before; a folder with foreign files is refused even then."""
    write_fill50k(tmp_path / "set", 2, size=16, seed=1, workers=1)
    write_fill50k(tmp_path / "set", 3, size=16, seed=2, workers=1, overwrite=True)
    (tmp_path / "set" / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    with pytest.raises(InputError, match=r"holds files that are not part of a Fill50K set \(notes\.txt\)"):
        write_fill50k(tmp_path / "set", 1, size=16, workers=1, overwrite=True)
    assert len((tmp_path / "set" / "prompt.json").read_text().splitlines()) == 3
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["set"]


@pytest.mark.parametrize("flags, message", [
    (["--size", "7"], "multiple of 8"), (["--size", "4104"], "over 4096"), (["--make", "0"], "at least 1"),
    (["--workers", "0"], "at least 1"), (["--seed", "-1"], "0 or more")])
def test_make_refuses_bad_flags_before_writing_anything(tmp_path, monkeypatch, capsys, flags, message):
    """A bad size, count, worker count or seed exits 2 naming the flag; no folder, no .partial."""
    monkeypatch.chdir(tmp_path)
    args = {"--make": "2", "--size": "16", "--workers": "1", "--seed": "0"} | dict(zip(flags[::2], flags[1::2]))
    with pytest.raises(SystemExit) as exit_status:
        tutorial_dataset().main([x for kv in args.items() for x in kv])
    stderr = capsys.readouterr().err
    assert exit_status.value.code == 2 and flags[0] in stderr and message in stderr
    assert list(tmp_path.iterdir()) == []


def test_a_failing_write_removes_its_partial_folder(tmp_path, monkeypatch):
    """Any exception while drawing leaves neither the set nor <out>.partial."""
    def fails(seed, index, size):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(fill50k, "make_pair", fails)
    with pytest.raises(RuntimeError):
        write_fill50k(tmp_path / "out", 2, size=16, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_png_write_names_its_destination_and_leaves_nothing(tmp_path, monkeypatch):
    """A full disk while saving is one InputError naming the PNG; no .tmp, no partial set."""
    def disk_full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(InputError, match=r"cannot write .*out \(No space left on device\)"):
        write_fill50k(tmp_path / "out", 2, size=16, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_the_usual_permissions(tmp_path):
    """PNGs and prompt.json are readable by others, as files written without a temporary name would be."""
    umask = os.umask(0)
    os.umask(umask)
    root = write_fill50k(tmp_path / "set", 1, size=16, workers=1)
    modes = {p.stat().st_mode & 0o777 for p in (root / "prompt.json", root / "source" / "0.png")}
    assert modes == {0o666 & ~umask}


# ---- tutorial_dataset.py without flags ----------------------------------------------------------------

def test_plain_run_falls_back_to_the_tiny_jobs_set_and_says_which(tmp_path):
    """With only ./training/fill50k_16, a plain run opens it, names it, and prints the usual lines."""
    write_fill50k(tmp_path / "training" / "fill50k_16", 2, size=16, workers=1)
    result = run([ROOT / "tutorial_dataset.py"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "opened training/fill50k_16" in result.stderr
    assert result.stdout.splitlines()[0] == "2" and result.stdout.splitlines()[2] == "(16, 16, 3)"


def test_plain_run_without_any_set_prints_one_line_of_advice(tmp_path):
    """No set at all: exit 1, one stderr line with the download and the --make command."""
    result = run([ROOT / "tutorial_dataset.py"], cwd=tmp_path)
    assert_one_line_refusal(result, "tutorial_dataset.py", "fill50k.zip", "python tutorial_dataset.py --make")
    assert len(result.stderr.strip().splitlines()) == 1


# ---- canny: never over the user's images ---------------------------------------------------------------

def test_canny_refuses_to_write_edge_maps_into_the_image_folder(tmp_path):
    """conditioning_dir == image_dir would replace the images: refused, images unchanged."""
    kohya_folders(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(InputError, match="is the image folder: the edge maps would replace the images"):
        canny_folder(tmp_path / "images", tmp_path / "images" / ".." / "images")
    assert snapshot(tmp_path) == before


def test_canny_command_refuses_existing_edge_maps_without_overwrite(tmp_path):
    """Edge maps already there exit 1 naming them and are kept; --overwrite replaces them."""
    kohya_folders(tmp_path)
    before = snapshot(tmp_path)
    refused = run(["-m", "tinylllite.canny", tmp_path / "images", tmp_path / "cond"])
    assert_one_line_refusal(refused, "canny", "already holds 1 of the edge maps (a.png)", "--overwrite")
    assert snapshot(tmp_path) == before
    replaced = canny_main([str(tmp_path / "images"), str(tmp_path / "cond"), "--overwrite"])
    assert replaced == 0 and snapshot(tmp_path) != before


def test_canny_names_an_unreadable_image(tmp_path):
    """A truncated image is one InputError naming it, not a PIL traceback."""
    kohya_folders(tmp_path)
    (tmp_path / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(InputError, match=r"images/b\.png cannot be read as an image"):
        canny_folder(tmp_path / "images", tmp_path / "edges")


def test_canny_refuses_thresholds_out_of_order_before_writing(tmp_path):
    """low > high is refused naming both, and no conditioning folder is made."""
    kohya_folders(tmp_path)
    with pytest.raises(InputError, match="low=200, high=100"):
        canny_folder(tmp_path / "images", tmp_path / "edges", low=200, high=100)
    assert not (tmp_path / "edges").exists()


# ---- kohya .toml values ----------------------------------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ("batch_size = 0", "batch_size = 0 must be a whole number of at least 1"),
    ("num_repeats = 'two'", "num_repeats = 'two' must be a whole number"),
    ("image_dir = 5", "image_dir = 5 must be text in quotes")])
def test_bad_kohya_values_are_refused_naming_the_key(tmp_path, line, message):
    """A zero batch size, a text repeat count or a numeric folder raise naming the key and value."""
    toml = kohya_folders(tmp_path)
    key = line.split(" = ")[0]
    text = "\n".join(x for x in toml.read_text().splitlines() if not x.startswith(key + " ="))
    toml.write_text(text.replace("[[datasets.subsets]]", f"{line}\n[[datasets.subsets]]") if key == "batch_size"
                    else text + f"\n{line}\n")
    with pytest.raises(InputError, match=message):
        open_checked(toml)
