"""tool_add_control.py: the original's output layout, exact copies, fresh init, refusals, --lllite, full size."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tool_add_control as tool
from test_sd_loading import POSITION_IDS, pattern, sd15_ldm_shapes
from tinylllite.files import ldm_format as lf
from tinylllite.controlnet import ControlNet
from tinylllite.errors import InputError, run_command
from tinylllite.files.sd_loading import check_sd_parts, family_config, load_base
from tinylllite.files.state_dicts import open_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent


def tiny_ldm_checkpoint(with_ema: bool = True) -> dict[str, torch.Tensor]:
    """A tiny SD1-layout original file: UNet, VAE, CLIP under their LDM prefixes, plus EMA copies."""
    from tiny_models import tiny_base
    base = tiny_base("sd1")
    unet, vae, text = base.unet.state_dict(), base.vae.state_dict(), base.text_encoder.state_dict()
    sd = lf.to_ldm(unet, lf.unet_names(unet, base.unet.config), lf.UNET_PREFIX)
    sd |= lf.to_ldm(vae, lf.vae_names(vae, base.vae.config), lf.VAE_PREFIX, vae=True)
    sd |= lf.to_ldm(text, lf.clip_names(text), lf.CLIP_PREFIX["sd1"])
    if with_ema:
        sd |= {lf.ema_name(k): v + 1 for k, v in sd.items() if k.startswith(lf.UNET_PREFIX)}
    return sd


@pytest.mark.parametrize("suffix_in,suffix_out", [(".ckpt", ".ckpt"), (".safetensors", ".safetensors")])
def test_output_is_input_without_ema_plus_the_controlnet_of_cldm(tmp_path, suffix_in, suffix_out):
    """Output keys = input - model_ema.* + control_model.*, laid out as tinylllite's ControlNet in LDM names."""
    from tiny_models import tiny_unet
    sd = tiny_ldm_checkpoint()
    src, out = tmp_path / f"in{suffix_in}", tmp_path / "new" / "dir" / f"out{suffix_out}"
    torch.save(sd, src) if suffix_in == ".ckpt" else save_file(sd, src)
    summary = tool.add_control(src, out)

    result = dict(open_state_dict(out))
    kept = {k for k in sd if not k.startswith(lf.EMA_PREFIX)}
    control = ControlNet.from_unet(tiny_unet()).state_dict()
    expected_control = lf.to_ldm(control, lf.controlnet_names(control, tiny_unet().config), lf.CONTROL_PREFIX)
    assert result.keys() == kept | expected_control.keys()
    assert {k: result[k].shape for k in expected_control} == {k: v.shape for k, v in expected_control.items()}
    assert summary["dropped_ema"] == len(sd) - len(kept) and summary["new"] == 42
    assert all(torch.equal(result[k], sd[k]) for k in kept)


def test_encoder_is_copied_and_new_tensors_start_as_in_spec(tmp_path):
    """control_model.X equals model.diffusion_model.X (own storage); zero convs and hint conv_out are 0."""
    src, out = tmp_path / "in.ckpt", tmp_path / "out.ckpt"
    torch.save(tiny_ldm_checkpoint(), src)
    tool.add_control(src, out)
    result = torch.load(out, weights_only=True)
    copied = [k for k in result if k.startswith(lf.CONTROL_PREFIX) and
              lf.UNET_PREFIX + k.removeprefix(lf.CONTROL_PREFIX) in result]
    for key in copied:
        unet_key = lf.UNET_PREFIX + key.removeprefix(lf.CONTROL_PREFIX)
        assert torch.equal(result[key], result[unet_key])
        assert result[key].untyped_storage().data_ptr() != result[unet_key].untyped_storage().data_ptr()
    zero = [k for k in result if ".zero_convs." in k or "middle_block_out" in k or "input_hint_block.14" in k]
    assert len(zero) == 2 * 13 + 2 and all(not result[k].any() for k in zero)
    assert result["control_model.input_hint_block.0.weight"].std() > 0  # PyTorch's default init, not zeros


def test_existing_output_is_refused_and_left_untouched(tmp_path, capsys):
    """An existing output file is neither overwritten nor touched; the command exits with 1 and says why."""
    src, out = tmp_path / "in.ckpt", tmp_path / "out.ckpt"
    torch.save(tiny_ldm_checkpoint(False), src)
    out.write_bytes(b"precious")
    assert run_command("tool_add_control", tool.main, [str(src), str(out)]) == 1
    assert out.read_bytes() == b"precious" and "refusing to overwrite" in capsys.readouterr().err


def test_non_sd_and_already_controlled_files_are_refused(tmp_path, capsys):
    """A state dict without an SD UNet, or one that already has control_model.*, is refused clearly."""
    save_file({"encoder.layer.weight": torch.zeros(2)}, tmp_path / "bert.safetensors")
    argv = [str(tmp_path / "bert.safetensors"), str(tmp_path / "a.safetensors")]
    assert run_command("tool_add_control", tool.main, argv) == 1
    assert "not a Stable Diffusion checkpoint" in capsys.readouterr().err
    torch.save(tiny_ldm_checkpoint(False), tmp_path / "in.ckpt")
    tool.add_control(tmp_path / "in.ckpt", tmp_path / "ini.ckpt")
    assert run_command("tool_add_control", tool.main, [str(tmp_path / "ini.ckpt"), str(tmp_path / "b.ckpt")]) == 1
    assert "already holds a ControlNet" in capsys.readouterr().err
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b.ckpt").exists()


def test_summary_is_a_few_lines_not_one_per_key(tmp_path, capsys):
    """The command prints the family and the kept / copied / new counts in four lines."""
    torch.save(tiny_ldm_checkpoint(), tmp_path / "in.ckpt")
    assert tool.main([str(tmp_path / "in.ckpt"), str(tmp_path / "out.ckpt")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and "EMA" in lines[1] and "copied" in lines[2] and "new    42" in lines[3]


def sd_vae_on_meta(family: str) -> dict[str, torch.Tensor]:
    """The family's VAE under its LDM names, as meta tensors (shapes only, no memory)."""
    from diffusers import AutoencoderKL
    with torch.device("meta"):
        vae = AutoencoderKL(**family_config(family)["vae"])
    return lf.to_ldm(vae.state_dict(), lf.vae_names(vae.state_dict(), vae.config), lf.VAE_PREFIX, vae=True)


def test_sd21_layout_gets_exactly_the_control_sd21_keys():
    """An SD2.1 UNet (meta tensors) gets control_model.* names and shapes equal to control_sd21_ini's."""
    shapes = json.loads((FIXTURES / "ldm_sd21_unet_keys.json").read_text())
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()} | sd_vae_on_meta("sd2")
    check_sd_parts({k: tuple(v.shape) for k, v in sd.items()}, "sd2", "sd21")  # complete UNet and VAE: no error
    _, copied, new = tool.with_control(sd)
    control = {k: list(v.shape) for k, v in {**copied, **new}.items()}
    assert control == json.loads((FIXTURES / "control_sd21_keys.json").read_text())


def shape_only_sd_file(path, cross_width: int, conv_in=(320, 4, 3, 3), dtype=torch.float32) -> None:
    """The few tensors --lllite reads: conv_in, one cross-attention k, and the VAE's four levels."""
    tensors = {lf.UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(conv_in, dtype=dtype),
               lf.UNET_PREFIX + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(1, cross_width)}
    tensors |= {f"{lf.VAE_PREFIX}encoder.down.{i}.block.0.conv1.bias": torch.zeros(1) for i in range(4)}
    save_file(tensors, path)


def test_lllite_mode_writes_kohyas_sdxl_key_set(tmp_path):
    """--lllite on an SDXL file writes exactly kohya's 1600 keys and shapes (C=32, M=64), up.0.weight zero."""
    shape_only_sd_file(tmp_path / "xl.safetensors", 2048)
    assert tool.main([str(tmp_path / "xl.safetensors"), str(tmp_path / "lllite.safetensors"), "--lllite",
                      "--cond-emb-dim", "32", "--mlp-dim", "64"]) == 0
    written = load_file(tmp_path / "lllite.safetensors")
    expected = json.loads((FIXTURES / "lllite_sdxl_keys.json").read_text())
    assert {k: list(v.shape) for k, v in written.items()} == expected
    assert sum(v.numel() for v in written.values()) == 22969600
    assert all(not v.any() for k, v in written.items() if k.endswith("up.0.weight"))
    with safe_open(tmp_path / "lllite.safetensors", "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base/control-net-lllite"


def test_lllite_mode_on_sd15_wraps_the_input_blocks(tmp_path):
    """--lllite on an SD1.5 file: 24 modules on the input blocks, 2,612,992 parameters at C=32, M=64."""
    shape_only_sd_file(tmp_path / "sd15.safetensors", 768)
    summary = tool.add_lllite(tmp_path / "sd15.safetensors", tmp_path / "l.safetensors", 32, 64)
    assert (summary["family"], summary["modules"], summary["params"]) == ("sd1", 24, 2612992)


def test_lllite_mode_keeps_the_precision_of_the_base(tmp_path):
    """An fp16 SD1.5 file gets an fp16 LLLite file (kohya's released files are half precision too)."""
    shape_only_sd_file(tmp_path / "sd15_fp16.safetensors", 768, dtype=torch.float16)
    summary = tool.add_lllite(tmp_path / "sd15_fp16.safetensors", tmp_path / "l.safetensors", 32, 64)
    written = load_file(tmp_path / "l.safetensors")
    assert summary["dtype"] == "float16" and {v.dtype for v in written.values()} == {torch.float16}


def test_an_sd_file_missing_unet_tensors_or_its_vae_is_refused(tmp_path, capsys):
    """38 UNet tensors gone, or the whole VAE gone: exit 1 with one line that says how many and what, no output."""
    shapes = json.loads((FIXTURES / "ldm_sd21_unet_keys.json").read_text())
    complete = {k: tuple(s) for k, s in shapes.items()} | {k: tuple(v.shape) for k, v in sd_vae_on_meta("sd2").items()}
    unet_keys = [k for k in complete if k.startswith(lf.UNET_PREFIX)]
    with pytest.raises(InputError, match="38 of the 686 UNet tensors of an SD2.x checkpoint are missing"):
        check_sd_parts({k: v for k, v in complete.items() if k not in unet_keys[:38]}, "sd2", "sd21.ckpt")
    with pytest.raises(InputError, match="has no VAE"):
        check_sd_parts({k: complete[k] for k in unet_keys}, "sd2", "sd21.ckpt")
    sd = tiny_ldm_checkpoint(False)
    save_file({k: v for k, v in sd.items() if not k.startswith(lf.VAE_PREFIX)}, tmp_path / "no_vae.safetensors")
    argv = [str(tmp_path / "no_vae.safetensors"), str(tmp_path / "o.ckpt")]
    assert run_command("tool_add_control", tool.main, argv) == 1
    assert "no_vae.safetensors" in capsys.readouterr().err and not (tmp_path / "o.ckpt").exists()


def write_full_size_sd15(path) -> dict[str, list[int]]:
    """A full-size SD1.5 original file (UNet + VAE + CLIP, 1.07 B parameters) in fp16, ~2.1 GB."""
    shapes = sd15_ldm_shapes()
    tensors = {key: pattern(shape, i) for i, (key, shape) in enumerate(shapes.items())}
    tensors[POSITION_IDS] = torch.arange(77).unsqueeze(0)
    save_file(tensors, path)
    return shapes


def peak_memory_of_loading(path) -> tuple[float, float]:
    """(peak RSS in GB, seconds) of a fresh process that runs load_base(path) and reads every weight once."""
    code = ("import sys, time; from tinylllite.files.sd_loading import load_base; t = time.time(); "
            "base = load_base(sys.argv[1], dtype=None); "
            "total = sum(p.float().sum().item() for m in base.parts().values() for p in m.parameters()); "
            "hwm = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]; "  # kB, this process only
            "print(int(hwm) / 2**20, time.time() - t)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT, check=True)
    peak, seconds = map(float, out.stdout.split())
    return peak, seconds


def test_full_size_sd15_file_loads_and_gets_its_controlnet(tmp_path):
    """Full-size SD1.5 file: load_base exact, tool_add_control keys = control_sd15_keys.json, memory ~ file size."""
    src, out = tmp_path / "v1-5.safetensors", tmp_path / "models" / "control_sd15_ini.ckpt"
    try:
        check_full_size_sd15(src, out)
    finally:  # 5 GB: pytest keeps the last three runs' tmp_path folders
        src.unlink(missing_ok=True)
        out.unlink(missing_ok=True)


def check_full_size_sd15(src: Path, out: Path) -> None:
    """The body of the full-size test: write, load, add the ControlNet, measure the reload."""
    shapes = write_full_size_sd15(src)
    index = {key: i for i, key in enumerate(shapes)}

    base = load_base(src, dtype=None)
    unet_key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.weight"
    assert torch.equal(base.unet.up_blocks[3].attentions[2].transformer_blocks[0].attn2.to_out[0].weight,
                       pattern(shapes[unet_key], index[unet_key]))
    vae_key = "first_stage_model.encoder.mid.attn_1.v.weight"
    assert torch.equal(base.vae.encoder.mid_block.attentions[0].to_v.weight,
                       pattern(shapes[vae_key], index[vae_key])[:, :, 0, 0])
    del base

    start = time.time()
    summary = tool.add_control(src, out)
    seconds = time.time() - start
    result = open_state_dict(out)
    control = {k: list(v.shape) for k, v in result.items() if k.startswith(lf.CONTROL_PREFIX)}
    assert control == json.loads((FIXTURES / "control_sd15_keys.json").read_text())
    assert set(result) - set(control) == set(shapes) | {POSITION_IDS}
    assert (summary["copied"], summary["new"]) == (298, 42)
    key = "control_model.middle_block.1.proj_out.weight"
    assert torch.equal(result[key], pattern(shapes[lf.UNET_PREFIX + "middle_block.1.proj_out.weight"],
                                            index[lf.UNET_PREFIX + "middle_block.1.proj_out.weight"]))
    del result

    peak_gb, load_seconds = peak_memory_of_loading(out)  # the .ckpt output: memory-mapped pickle path
    file_gb = out.stat().st_size / 2**30
    print(f"\nadd_control {seconds:.1f} s; load_base + read all weights of a {file_gb:.2f} GB .ckpt: "
          f"peak RSS {peak_gb:.2f} GB, {load_seconds:.1f} s")
    assert peak_gb < file_gb + 1.0  # one copy of the weights (memory-mapped) plus the libraries, not two
