"""A newcomer's mistakes, typed at the real commands: each is refused in one line, and no file is touched.

Every case runs the command as a user would (`python tutorial_train.py ...`, `python -m tinylllite.sample ...`)
in a folder of small files made here: the tiny SD's ControlNet and LLLite, a Fill50K-like set of 8 pairs, an
earlier run, and the broken files people really end up with (a download cut in half, random bytes, an empty
file, a text file). Each must exit with a non-zero status, print no traceback, name the file or flag, and
leave every file in the folder byte for byte as it was (and add none).
"""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_tool_add_control import tiny_ldm_checkpoint
from test_training import tiny_fill50k

from tinylllite.files.control_io import save_controlnet, save_lllite
from tinylllite.controlnet import ControlNet
from tinylllite.lllite_unet import attach_lllite
from tinylllite.sd.tiny_sd import load_tiny_sd

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [str(ROOT / "tutorial_train.py"), "--max-steps", "1", "--eval-every", "0", "--logger-freq", "0"]
SAMPLE = ["-m", "tinylllite.sample", "--prompt", "a red circle", "--steps", "1"]
BROKEN = ["truncated.safetensors", "random.ckpt", "empty.safetensors", "notes.txt"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The user's folder: good files, broken files and earlier outputs that a mistake must not touch."""
    d = tmp_path_factory.mktemp("user")
    tiny_fill50k(d / "data")
    base = load_tiny_sd()
    save_controlnet(ControlNet.from_unet(base.unet), base.unet, d / "controlnet.safetensors")
    tiny_unet = load_tiny_sd().unet
    save_lllite(attach_lllite(tiny_unet), tiny_unet, d / "lllite.safetensors")
    whole = (d / "controlnet.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    (d / "random.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    (d / "empty.safetensors").write_bytes(b"")
    (d / "notes.txt").write_text("my notes\n")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(d / "hint.png")
    (d / "hint_text.png").write_text("not an image\n")
    torch.save(tiny_ldm_checkpoint(False), d / "sd.ckpt")
    (d / "earlier_run" / "checkpoints").mkdir(parents=True)
    (d / "earlier_run" / "config.json").write_text('{"control": "controlnet"}\n')
    (d / "picture.png").write_bytes(b"a picture I care about")
    (d / "synthetic").mkdir()
    (d / "synthetic" / "0.png").write_bytes(b"an image of an earlier set")
    (d / "synthetic" / "0.txt").write_text("its caption\n")
    (d / "existing.ckpt").write_bytes(b"an earlier output")
    (d / "existing.safetensors").write_bytes(b"another earlier output")
    return d


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under folder (relative path -> sha256) and every folder (-> 'dir')."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def refused(folder: Path, args: list[str], named: str) -> None:
    """Run `python *args` in folder: non-zero exit, no traceback, `named` in what it printed (a refusal goes to
    stderr; dataset_check's report, errors included, to stdout), nothing changed or added."""
    before = snapshot(folder)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert named in result.stderr + result.stdout, result.stderr
    assert snapshot(folder) == before


@pytest.mark.parametrize("broken", BROKEN)
@pytest.mark.parametrize("flag", ["--base", "--control", "--resume-path"])
def test_an_unusable_weights_file_is_refused_naming_it(folder, flag, broken):
    """A cut download, random bytes, an empty file or a text file, as a base, a control or initial weights."""
    if flag == "--control":
        args = SAMPLE + ["--control", broken, "--hint", "hint.png", "--out", "new.png"]
    else:
        args = TRAIN + ["--data", "data", "--out", "new_run", flag, broken]
    refused(folder, args, broken)


def test_an_lllite_file_as_a_controlnets_initial_weights_is_refused(folder):
    """--resume-path lllite.safetensors for a ControlNet run says what the file holds."""
    refused(folder, TRAIN + ["--data", "data", "--out", "new_run", "--resume-path", "lllite.safetensors"],
            "not a ControlNet")


@pytest.mark.parametrize("args, named", [
    (["--data", "no_such_folder"], "no_such_folder"),
    (["--data", "data", "--out", "earlier_run"], "--out earlier_run"),
    (["--data", "data", "--batch-size", "0"], "--batch-size"),
    (["--data", "data", "--sd-locked", "flase"], "--sd-locked"),
], ids=["missing data", "out onto an earlier run", "batch size 0", "sd-locked typo"])
def test_training_refuses_a_bad_flag_before_it_writes_anything(folder, args, named):
    """A missing --data is not created, an earlier run is not written into, a bad value names its flag."""
    refused(folder, TRAIN + args, named)


@pytest.mark.parametrize("args, named", [
    (SAMPLE + ["--out", "picture.png"], "--overwrite"),
    (SAMPLE + ["--synthesize", "--out", "synthetic"], "--overwrite"),
    ([str(ROOT / "tool_add_control.py"), "sd.ckpt", "existing.ckpt"], "existing.ckpt"),
    (["-m", "tinylllite.convert", "controlnet.safetensors", "existing.safetensors", "--to", "original"],
     "existing.safetensors"),
    ([str(ROOT / "tutorial_dataset.py"), "--make", "4", "--size", "64", "--out", "data"], "--overwrite"),
    (["-m", "tinylllite.canny", "data/target", "data/source"], "--overwrite"),
], ids=["sample out", "synthesize", "tool_add_control", "convert", "tutorial_dataset", "canny"])
def test_no_command_writes_over_an_existing_output(folder, args, named):
    """Every command that writes refuses an existing file or non-empty folder, and says how to replace it."""
    refused(folder, args, named)


@pytest.mark.parametrize("args, named", [
    (SAMPLE + ["--control", "controlnet.safetensors", "--hint", "hint_text.png", "--out", "new.png"], "--hint"),
    (["-m", "tinylllite.dataset_check", "notes.txt"], "notes.txt"),
], ids=["hint", "dataset"])
def test_an_unreadable_input_is_named(folder, args, named):
    """A hint that is not an image and data that is not a dataset are named in one line."""
    refused(folder, args, named)
