"""python -m tinylllite.convert and load_any_control: exact round trips between every layout, bad inputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tool_add_control as tool
from test_sd_loading import pattern, sdxl_meta_ldm
from test_tool_add_control import tiny_ldm_checkpoint
from tiny_models import tiny_base, tiny_unet
from tinylllite.sd.base import StableDiffusionBase
from tinylllite.files.control_io import load_any_control, save_controlnet
from tinylllite.controlnet import ControlNet
from tinylllite.files.convert import convert, main
from tinylllite.errors import run_command
from tinylllite.lllite_unet import attach_lllite
from tinylllite.files.sd_loading import base_from_ldm

FIXTURES = Path(__file__).parent / "fixtures"


def trained_controlnet(seed: int = 0) -> ControlNet:
    """A tinylllite ControlNet on the tiny SD1 UNet with every tensor non-zero, as after training."""
    control = ControlNet.from_unet(tiny_unet())
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in control.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return control


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_project_file_to_diffusers_and_back_is_exact(tmp_path):
    """original (ours) -> diffusers folder -> original gives the same keys, dtypes and numbers."""
    control = trained_controlnet()
    save_controlnet(control, tiny_unet(), tmp_path / "control.safetensors")
    main([str(tmp_path / "control.safetensors"), str(tmp_path / "diffusers"), "--to", "diffusers"])
    main([str(tmp_path / "diffusers"), str(tmp_path / "again.safetensors"), "--to", "original"])
    first, again = load_file(tmp_path / "control.safetensors"), load_file(tmp_path / "again.safetensors")
    assert all(k.startswith("control_model.") for k in first) and same_tensors(first, again)
    with safe_open(tmp_path / "again.safetensors", "pt") as f:
        metadata = f.metadata()
    assert (metadata["tinylllite.architecture"], metadata["tinylllite.hint_channels"]) == ("controlnet", "3")
    assert metadata["tinylllite.hint_range"] == "0..1 RGB" and metadata["tinylllite.base_family"] == "tiny"


def test_diffusers_folder_loads_in_controlnetmodel_and_computes_the_same_residuals(tmp_path):
    """The written folder loads with ControlNetModel.from_pretrained and matches tinylllite's ControlNet."""
    control = trained_controlnet().eval()
    save_controlnet(control, tiny_unet(), tmp_path / "diffusers", layout="diffusers")
    reference = ControlNetModel.from_pretrained(tmp_path / "diffusers", local_files_only=True).eval()
    torch.manual_seed(1)
    sample, hidden, hint = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ours = control(sample, torch.tensor([10]), hidden, hint)
        down, mid = reference(sample, torch.tensor([10]), hidden, controlnet_cond=hint, return_dict=False)
    assert len(down) == len(ours.down) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(down, ours.down))
    assert torch.allclose(mid, ours.mid, atol=1e-5)


def test_converted_folder_runs_in_stablediffusioncontrolnetpipeline(tmp_path):
    """diffusers' own ControlNet pipeline samples with the converted folder (2 steps, tiny parts)."""
    base = tiny_base("sd1")
    save_controlnet(trained_controlnet(), base.unet, tmp_path / "control.safetensors")
    convert(tmp_path / "control.safetensors", tmp_path / "folder", "diffusers")
    pipe = StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        controlnet=ControlNetModel.from_pretrained(tmp_path / "folder", local_files_only=True), scheduler=DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only contend on a shared CPU
    try:
        images = pipe("a red circle", image=torch.rand(1, 3, 64, 64), num_inference_steps=2, height=64, width=64,
                      output_type="np", generator=torch.Generator().manual_seed(0)).images
    finally:
        torch.set_num_threads(threads)
    assert images.shape == (1, 64, 64, 3) and images.min() >= 0 and images.max() <= 1


def test_diffusers_folder_from_diffusers_round_trips_exactly(tmp_path):
    """A folder saved by diffusers itself -> original -> diffusers: same config entries and tensors."""
    reference = ControlNetModel.from_unet(tiny_unet())
    reference.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "control.pth", "original")
    convert(tmp_path / "control.pth", tmp_path / "back.safetensors", "original")
    with pytest.raises(ValueError, match="config"):  # a pickle has no metadata and a toy UNet no shipped config
        convert(tmp_path / "control.pth", tmp_path / "dir", "diffusers")
    convert(tmp_path / "src", tmp_path / "copy", "diffusers")
    back = ControlNetModel.from_pretrained(tmp_path / "copy", local_files_only=True)
    assert same_tensors(reference.state_dict(), back.state_dict())
    assert torch.load(tmp_path / "control.pth", weights_only=True).keys() == load_file(tmp_path / "back.safetensors").keys()


def test_full_ini_file_converts_to_its_control_part_only(tmp_path):
    """A control_sd15_ini-style file (SD inside) -> control_model.* only, every tensor equal."""
    torch.save(tiny_ldm_checkpoint(False), tmp_path / "sd.ckpt")
    tool.add_control(tmp_path / "sd.ckpt", tmp_path / "ini.ckpt")
    convert(tmp_path / "ini.ckpt", tmp_path / "control.safetensors", "original", torch.float16)
    full = torch.load(tmp_path / "ini.ckpt", weights_only=True)
    control = load_file(tmp_path / "control.safetensors")
    assert control.keys() == {k for k in full if k.startswith("control_model.")}
    assert all(torch.equal(control[k], full[k].half()) for k in control)


def kohya_file(tmp_path, dtype, with_metadata: bool) -> tuple[Path, dict]:
    """A trained-looking LLLite on the tiny SDXL UNet saved like kohya (bf16 + model spec) or a fp16 copy."""
    base = tiny_base("sdxl")
    lllite = attach_lllite(base.unet, cond_emb_dim=8, mlp_dim=16)
    torch.manual_seed(0)
    tensors = {k: (torch.randn_like(v) * 0.1).to(dtype) for k, v in lllite.kohya_state_dict().items()}
    metadata = {"modelspec.architecture": "stable-diffusion-xl-v1-base/control-net-lllite"} if with_metadata else None
    path = tmp_path / f"lllite_{str(dtype)[6:]}.safetensors"
    save_file(tensors, path, metadata)
    return path, tensors


@pytest.mark.parametrize("dtype,with_metadata", [(torch.bfloat16, True), (torch.float16, False)])
def test_kohya_lllite_files_round_trip_exactly_and_gain_metadata(tmp_path, dtype, with_metadata):
    """kohya -> kohya keeps every tensor and dtype, keeps kohya's metadata and adds ours."""
    path, tensors = kohya_file(tmp_path, dtype, with_metadata)
    assert main([str(path), str(tmp_path / "out.safetensors"), "--to", "kohya"]) == 0
    assert same_tensors(load_file(tmp_path / "out.safetensors"), tensors)
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        metadata = f.metadata()
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/control-net-lllite"
    assert (metadata["tinylllite.base_family"], metadata["tinylllite.cond_emb_dim"]) == ("sdxl", "8")
    convert(path, tmp_path / "fp32.safetensors", "kohya", torch.float32)
    assert all(torch.equal(v, tensors[k].float()) for k, v in load_file(tmp_path / "fp32.safetensors").items())


def test_bad_conversions_are_refused_and_leave_files_alone(tmp_path, capsys):
    """ControlNet -> kohya, LLLite -> original, an existing output, a non-control file: exit 1 with a reason."""
    save_controlnet(trained_controlnet(), tiny_unet(), tmp_path / "control.safetensors")
    lllite, _ = kohya_file(tmp_path, torch.bfloat16, True)
    save_file({"encoder.weight": torch.zeros(2)}, tmp_path / "bert.safetensors")
    (tmp_path / "exists.safetensors").write_bytes(b"keep")
    cases = [(tmp_path / "control.safetensors", "kohya", "only ControlNet-LLLite"),
             (lllite, "original", "converts only --to kohya"),
             (tmp_path / "bert.safetensors", "original", "not a control checkpoint"),
             (tmp_path / "absent.safetensors", "original", "no such file")]
    for src, to, message in cases:
        assert run_command("convert", main, [str(src), str(tmp_path / "new.safetensors"), "--to", to]) == 1
        assert message in capsys.readouterr().err and not (tmp_path / "new.safetensors").exists()
    assert run_command("convert", main, [str(tmp_path / "control.safetensors"), str(tmp_path / "exists.safetensors"),
                                          "--to", "original"]) == 1
    assert (tmp_path / "exists.safetensors").read_bytes() == b"keep"


@pytest.mark.parametrize("layout", ["project", "control_only_no_prefix", "full", "diffusers_folder"])
def test_every_controlnet_layout_loads_onto_a_base_for_inference(tmp_path, layout):
    """Project files, lllyasviel-style control-only and full files, diffusers folders: same ControlNet."""
    control, base = trained_controlnet(), tiny_base("sd1")
    save_controlnet(control, base.unet, tmp_path / "control.safetensors")
    path = {"project": tmp_path / "control.safetensors", "control_only_no_prefix": tmp_path / "bare.pth",
            "full": tmp_path / "full.ckpt", "diffusers_folder": tmp_path / "folder"}[layout]
    ldm = load_file(tmp_path / "control.safetensors")
    if layout == "control_only_no_prefix":
        torch.save({k.removeprefix("control_model."): v for k, v in ldm.items()}, path)
    elif layout == "full":
        torch.save(tiny_ldm_checkpoint() | ldm, path)
    elif layout == "diffusers_folder":
        convert(tmp_path / "control.safetensors", path, "diffusers")
    loaded = load_any_control(path, base)
    assert same_tensors(loaded.state_dict(), control.state_dict())


def test_kohya_lllite_loads_onto_a_base_for_inference(tmp_path):
    """A kohya fp16 file without metadata attaches to a fresh SDXL base with its numbers."""
    path, tensors = kohya_file(tmp_path, torch.float16, False)
    lllite = load_any_control(path, tiny_base("sdxl"))
    assert all(torch.equal(v, tensors[k].float()) for k, v in lllite.kohya_state_dict().items())


def test_released_sdxl_lllite_layout_attaches_to_a_full_size_sdxl_base(tmp_path):
    """kohya's released key set (1600 tensors, C=32, M=64, fp16, no metadata) fits an SDXL base (meta device)."""
    shapes = json.loads((FIXTURES / "lllite_sdxl_keys.json").read_text())
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, tmp_path / "canny.safetensors")
    lllite = load_any_control(tmp_path / "canny.safetensors", base_from_ldm(sdxl_meta_ldm()))
    assert len(lllite) == 136 and lllite.describe() == "136 modules, C=[32], M=[64], depths=[2, 3]"


def test_control_for_another_family_is_refused_with_a_sentence(tmp_path):
    """An SD1 ControlNet on an SD2 base, an SD1/SD2 LLLite on SDXL, a misfit shape: readable errors."""
    save_controlnet(trained_controlnet(), tiny_unet(), tmp_path / "control.safetensors")
    path = tmp_path / "sd1.safetensors"
    with safe_open(tmp_path / "control.safetensors", "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, path, f.metadata() | {"tinylllite.base_family": "sd1"})
    parts = tiny_base("sd1")
    sd2_base = StableDiffusionBase("sd2", parts.unet, parts.vae, parts.text_encoder, parts.tokenizer)
    with pytest.raises(ValueError, match="trained for SD1.x but the base is SD2.x"):
        load_any_control(path, sd2_base)
    with pytest.raises(ValueError, match="does not fit this base"):
        load_any_control(tmp_path / "control.safetensors", tiny_base("sdxl"))
    released_sd15 = {"control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768),
                     "control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}  # no metadata: width says SD1
    save_file(released_sd15, tmp_path / "control_sd15_canny.safetensors")
    with pytest.raises(ValueError, match="trained for SD1.x but the base is SD2.x"):
        load_any_control(tmp_path / "control_sd15_canny.safetensors", sd2_base)
    sd15_lllite = {k: torch.zeros(v) for k, v in {"lllite_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q."
                                                 "conditioning1.0.weight": (4, 3, 4, 4)}.items()}
    save_file(sd15_lllite, tmp_path / "lllite15.safetensors")
    with pytest.raises(ValueError, match="SD1.x or SD2.x but the base is SDXL"):
        load_any_control(tmp_path / "lllite15.safetensors", tiny_base("sdxl"))


def test_sd15_diffusers_weights_without_config_convert_to_the_original_key_set(tmp_path):
    """An SD1.5 `diffusion_pytorch_model.safetensors` alone (as training checkpoints save it) -> original
    layout with exactly control_sd15_keys.json, and back to a diffusers folder with the same tensors."""
    shapes = json.loads((FIXTURES / "diffusers_controlnet_sd15_keys.json").read_text())
    tensors = {k: pattern(s, i) for i, (k, s) in enumerate(shapes.items())}
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
    convert(tmp_path / "diffusion_pytorch_model.safetensors", tmp_path / "control.safetensors", "original")
    original = load_file(tmp_path / "control.safetensors")
    assert {k: list(v.shape) for k, v in original.items()} == json.loads((FIXTURES / "control_sd15_keys.json").read_text())
    convert(tmp_path / "control.safetensors", tmp_path / "folder", "diffusers")
    assert same_tensors(load_file(tmp_path / "folder" / "diffusion_pytorch_model.safetensors"), tensors)
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert (config["_class_name"], config["cross_attention_dim"], config["attention_head_dim"]) == ("ControlNetModel", 768, 8)


def test_module_runs_from_the_command_line(tmp_path):
    """`python -m tinylllite.convert IN OUT --to diffusers` works as a command and prints one line."""
    save_controlnet(trained_controlnet(), tiny_unet(), tmp_path / "control.safetensors")
    done = subprocess.run([sys.executable, "-m", "tinylllite.convert", str(tmp_path / "control.safetensors"),
                           str(tmp_path / "folder"), "--to", "diffusers"], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0 and done.stdout.count("\n") == 1 and (tmp_path / "folder" / "config.json").exists()
