"""Control files: identify() tells every layout apart and refuses unreadable input; load_control_weights reads all.

Also: the project's own training checkpoints convert with `tinylllite.convert` and load back, files are
written with the umask's permissions, and the branch switch decides by type.
"""
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_tool_add_control import tiny_ldm_checkpoint
from tiny_models import tiny_base

import tool_add_control as tool
from tinylllite.files import checkpoint
from tinylllite.control_branch import branch_state_dict, control_kind
from tinylllite.files.control_io import (branch_metadata, lllite_metadata, load_any_control, load_control_weights,
                                   save_controlnet)
from tinylllite.controlnet import ControlNet
from tinylllite.files.convert import convert
from tinylllite.errors import InputError
from tinylllite.files.identify import identify
from tinylllite.lllite_unet import attach_lllite
from tinylllite.files.state_dicts import save_state_dict


def randomised(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Every parameter redrawn, so a load that silently kept fresh weights (zero convs at zero) is caught."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=0.1)
    return module


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One trained ControlNet and one trained LLLite, written in every layout the package reads."""
    d = tmp_path_factory.mktemp("control_files")
    base = tiny_base()
    control = randomised(ControlNet.from_unet(base.unet))
    save_controlnet(control, base.unet, d / "ours.safetensors")
    ours = load_file(d / "ours.safetensors")
    torch.save({k.removeprefix("control_model."): v for k, v in ours.items()}, d / "no_prefix.pth")
    save_controlnet(control, base.unet, d / "folder", layout="diffusers")
    save_file(tiny_ldm_checkpoint(False) | ours, d / "full.safetensors")
    checkpoint.save_checkpoint(d / "run", 5, checkpoint.trainable_weights(base, control), {"step": 5},
                               metadata=branch_metadata(base, control))
    lllite_base = tiny_base()
    lllite = randomised(attach_lllite(lllite_base.unet))
    save_state_dict(lllite.kohya_state_dict(), d / "kohya.safetensors")  # as kohya writes it: no metadata
    checkpoint.save_checkpoint(d / "lllite_run", 5, checkpoint.trainable_weights(lllite_base, lllite), {"step": 5},
                               metadata=branch_metadata(lllite_base, lllite))
    torch.save(tiny_ldm_checkpoint(False), d / "sd.ckpt")
    return dict(dir=d, controlnet=control.state_dict(), lllite=lllite.kohya_state_dict(),
                original=d / "ours.safetensors", no_prefix=d / "no_prefix.pth", folder=d / "folder",
                bare=d / "folder" / "diffusion_pytorch_model.safetensors", full=d / "full.safetensors",
                checkpoint=d / "run" / "checkpoints" / "step_0000005" / "control.safetensors",
                kohya=d / "kohya.safetensors", sd=d / "sd.ckpt",
                lllite_checkpoint=d / "lllite_run" / "checkpoints" / "step_0000005" / "control.safetensors")


@pytest.mark.parametrize("name, layout, kind, family", [
    ("original", "original", "controlnet", "tiny"), ("no_prefix", "original", "controlnet", "tiny"),
    ("folder", "diffusers", "controlnet", "tiny"), ("bare", "diffusers", "controlnet", "tiny"),
    ("full", "full", "controlnet", "tiny"), ("checkpoint", "diffusers", "controlnet", "sd1"),
    ("kohya", "kohya", "lllite", "sd1/sd2"), ("lllite_checkpoint", "kohya", "lllite", "sd1"),
    ("sd", "sd", "sd", "tiny"),
])
def test_identify_tells_each_layout_kind_and_family(files, name, layout, kind, family):
    """Each file the package writes or reads is named by its layout, the branch it holds and its family."""
    info = identify(files[name])
    assert (info.layout, info.kind, info.family) == (layout, kind, family)


def text_file(path: Path) -> None:
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 1000000\n")


def truncated_safetensors(path: Path) -> None:
    save_file({"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, path)
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize("name, make, message", [
    ("cut.safetensors", truncated_safetensors, "truncated"),
    ("random.ckpt", lambda p: p.write_bytes(bytes(range(256)) * 8), "not a PyTorch checkpoint"),
    ("lfs.safetensors", text_file, "Git LFS pointer"),
    ("notes.ckpt", lambda p: p.write_text("these are not weights\n"), "a text file"),
    ("empty.pth", lambda p: p.touch(), "is empty"),
    ("absent.safetensors", lambda p: None, "no such file"),
    ("folder", lambda p: p.mkdir(), "a folder without model weights"),
])
def test_unreadable_input_is_refused_in_one_line_naming_the_file(tmp_path, name, make, message):
    """Truncated, random, text, empty, missing, weightless folder: one InputError line with the path and a remedy."""
    path = tmp_path / name
    make(path)
    with pytest.raises(InputError) as refused:
        identify(path)
    text = str(refused.value)
    assert str(path) in text and message in text and "\n" not in text and "weights_only=False" not in text


@pytest.mark.parametrize("name", ["original", "no_prefix", "folder", "bare", "checkpoint"])
def test_load_control_weights_fills_a_controlnet_from_each_layout(files, name):
    """Every ControlNet layout gives back exactly the trained tensors."""
    base = tiny_base()
    control = ControlNet.from_unet(base.unet)
    load_control_weights(files[name], base, control)
    assert same(control.state_dict(), files["controlnet"])


def test_load_control_weights_takes_the_control_part_of_a_full_file(files):
    """A full file (SD + control_model.*) fills the ControlNet from its control part only."""
    base = tiny_base()
    control = ControlNet.from_unet(base.unet)
    load_control_weights(files["full"], base, control)
    assert same(control.state_dict(), files["controlnet"])


@pytest.mark.parametrize("name", ["kohya", "lllite_checkpoint"])
def test_load_control_weights_fills_an_lllite_from_kohya_files(files, name):
    """A kohya file and an LLLite training checkpoint give back exactly the trained tensors."""
    base = tiny_base()
    lllite = attach_lllite(base.unet)
    load_control_weights(files[name], base, lllite)
    assert same(lllite.kohya_state_dict(), files["lllite"])


def test_a_file_for_the_other_branch_or_a_base_is_refused(files):
    """An LLLite file into a ControlNet, a ControlNet file into an LLLite, an SD base into either: a sentence."""
    base = tiny_base()
    with pytest.raises(InputError, match="ControlNet-LLLite .* not a ControlNet"):
        load_control_weights(files["kohya"], base, ControlNet.from_unet(base.unet))
    with pytest.raises(InputError, match="holds a ControlNet .* not a ControlNet-LLLite"):
        load_control_weights(files["original"], base, attach_lllite(base.unet))
    with pytest.raises(InputError, match="Stable Diffusion base .*tool_add_control"):
        load_any_control(files["sd"], base)


def test_a_control_for_another_family_is_refused(files, tmp_path):
    """A ControlNet saved for SD2 and an LLLite saved for SDXL are refused on an SD1 base before any shape check."""
    base = tiny_base()
    control = ControlNet.from_unet(base.unet)
    save_controlnet(control, base.unet, tmp_path / "sd2.safetensors", family="sd2")
    with pytest.raises(InputError, match="trained for SD2.x but the base is SD1.x"):
        load_control_weights(tmp_path / "sd2.safetensors", base, control)
    save_state_dict(files["lllite"], tmp_path / "xl.safetensors", lllite_metadata(files["lllite"], "sdxl"))
    with pytest.raises(InputError, match="trained for SDXL but the base is SD1.x"):
        load_control_weights(tmp_path / "xl.safetensors", base, attach_lllite(base.unet))


@pytest.mark.parametrize("to", ["original", "diffusers"])
def test_a_controlnet_training_checkpoint_converts_and_loads_back(files, tmp_path, to):
    """step_N/control.safetensors -> original or diffusers with tinylllite.convert -> the same tensors load back."""
    out = tmp_path / ("control.safetensors" if to == "original" else "folder")
    convert(files["checkpoint"], out, to)
    base = tiny_base()
    control = ControlNet.from_unet(base.unet)
    load_control_weights(out, base, control)
    assert identify(out).family == "sd1" and same(control.state_dict(), files["controlnet"])


def test_an_lllite_training_checkpoint_converts_to_kohya_and_loads_back(files, tmp_path):
    """An LLLite checkpoint -> kohya fp16 file: same keys, half precision, the values load back."""
    convert(files["lllite_checkpoint"], tmp_path / "lllite.safetensors", "kohya", torch.float16)
    base = tiny_base()
    lllite = load_any_control(tmp_path / "lllite.safetensors", base)
    written = load_file(tmp_path / "lllite.safetensors")
    assert all(v.dtype == torch.float16 for v in written.values())
    expected = {k: v.half().float() for k, v in files["lllite"].items()}
    assert same({k: v.float() for k, v in branch_state_dict(lllite).items()}, expected)


def test_written_files_follow_the_umask_not_0600(tmp_path):
    """save_state_dict creates files with the permissions every other program would: 0666 minus the umask."""
    old = os.umask(0o022)
    try:
        save_state_dict({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
        save_state_dict({"w": torch.zeros(2)}, tmp_path / "b.ckpt")
    finally:
        os.umask(old)
    modes = {stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("a.safetensors", "b.ckpt")}
    assert modes == {0o644} and not list(tmp_path.glob("*.tmp"))


def test_the_branch_is_told_by_its_type_not_by_its_attributes():
    """An object that merely has set_conditioning and multiplier is no LLLite; real branches are named."""
    class LooksLikeLLLite(torch.nn.Module):
        multiplier = 1.0

        def set_conditioning(self, image):
            pass

    base = tiny_base()
    assert control_kind(ControlNet.from_unet(base.unet)) == "controlnet"
    assert control_kind(attach_lllite(base.unet)) == "lllite"
    with pytest.raises(TypeError, match="neither a ControlNet"):
        control_kind(LooksLikeLLLite())


def test_tool_add_control_output_is_identified_as_a_full_file(tmp_path):
    """tool_add_control.py's output is read back as the "full" layout, a ControlNet, with its metadata."""
    save_file(tiny_ldm_checkpoint(False), tmp_path / "sd.safetensors")
    tool.add_control(tmp_path / "sd.safetensors", tmp_path / "ini.safetensors")
    info = identify(tmp_path / "ini.safetensors")
    assert (info.layout, info.kind, info.metadata["tinylllite.architecture"]) == ("full", "controlnet", "controlnet")
