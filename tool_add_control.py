"""Add a fresh ControlNet to a Stable Diffusion checkpoint, like the original `tool_add_control.py`.

    python tool_add_control.py ./models/v1-5-pruned.ckpt ./models/control_sd15_ini.ckpt
    python tool_add_control.py ./models/v1-5-pruned.safetensors ./models/control_sd15_ini.safetensors
    python tool_add_control.py ./models/sd_xl_base_1.0.safetensors ./models/lllite_ini.safetensors --lllite

The output is what the original writes (lllyasviel/ControlNet `tool_add_control.py`): every key of the
input except its EMA copies (`model_ema.*`), plus `control_model.*` = the ControlNet of `cldm.py`,
whose encoder (time embedding, input blocks, middle block) is copied from `model.diffusion_model.*` and
whose new parts start as `cldm.py`'s `ControlNet.__init__` makes them: the hint encoder with PyTorch's
default init and a zero last conv (`zero_module(conv_nd(...))`), the zero convs at zero (paper,
sec. 3.1). Every number comes from the input's shapes (channels of each input block, number of skips,
vae_scale_factor), so SD1.x, SD2.x and SDXL files all work.

Unlike the original it reads .safetensors as well as pickles (pickles with `weights_only=True`,
memory-mapped), refuses a file that is not a complete SD checkpoint (UNet or VAE tensors missing,
the same check as `sd_loading.load_base`), creates missing folders, never overwrites an existing
file, writes atomically, and prints a summary instead of one line per key.

`--lllite` writes a fresh ControlNet-LLLite for the input's UNet in kohya's format instead, in the
UNet's own precision (an fp16 base gives an fp16 file, as kohya's released files are half precision).
It reads only the UNet's layout (conv_in, the cross-attention width, the VAE's levels).
"""

import argparse
import re
import sys
from pathlib import Path

import torch

from diffusers import UNet2DConditionModel

from tinylllite.files import ldm_format as lf
from tinylllite.files.control_io import control_metadata, controlnet_config_from_shapes, lllite_metadata
from tinylllite.errors import InputError, run_command
from tinylllite.hint import HintEncoder
from tinylllite.files.identify import FAMILY_NAMES, META, FileInfo, identify
from tinylllite.lllite import LLLiteModule
from tinylllite.lllite_unet import attach_lllite
from tinylllite.files.sd_loading import check_sd_parts, family_config
from tinylllite.files.state_dicts import refuse_existing, save_state_dict, tensor_shapes
from tinylllite.files.atomic import refuse_unwritable

ENCODER_PARTS = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")  # what cldm.py copies


def block_output_channels(shapes: dict[str, tuple], index: int) -> int:
    """Channels leaving `input_blocks.<index>`: its downsampler, else its resnet, else conv_in."""
    block = f"{lf.UNET_PREFIX}input_blocks.{index}.0."
    for last in ("op.weight", "out_layers.3.weight", "weight"):
        if block + last in shapes:
            return shapes[block + last][0]
    raise KeyError(f"input_blocks.{index} has none of op / out_layers.3 / a conv: unknown UNet layout")


def vae_scale_factor(shapes: dict[str, tuple]) -> int:
    """2 ** (VAE levels - 1), the levels counted from `first_stage_model.encoder.down.<i>` (8 for every SD)."""
    levels = {m[1] for k in shapes if (m := re.match(rf"{lf.VAE_PREFIX}encoder\.down\.(\d+)\.", k))}
    if not levels:
        raise InputError("the file holds no VAE (first_stage_model.encoder.down.*) to count its levels from: "
                         "use a complete SD checkpoint")
    return 2 ** (len(levels) - 1)


def new_control_tensors(shapes: dict[str, tuple], dtype: torch.dtype, hint_channels: int = 3) -> dict[str, torch.Tensor]:
    """The 42 (for SD) tensors the original initialises: hint encoder + one zero conv per skip + the middle one."""
    first_channels = shapes[lf.UNET_PREFIX + "input_blocks.0.0.weight"][0]
    hint = HintEncoder(hint_channels, first_channels, vae_scale_factor(shapes))
    hint_sd = {f"controlnet_cond_embedding.{k}": v for k, v in hint.state_dict().items()}
    new = lf.to_ldm(hint_sd, lf.controlnet_names(hint_sd, unet_config=None), lf.CONTROL_PREFIX)

    n_skips = len({m[1] for k in shapes if (m := re.match(rf"{lf.UNET_PREFIX}input_blocks\.(\d+)\.", k))})
    zero_convs = [block_output_channels(shapes, i) for i in range(n_skips)]
    zero_convs.append(shapes[lf.UNET_PREFIX + "middle_block.2.out_layers.3.weight"][0])
    for i, channels in enumerate(zero_convs):  # "zero_module(conv_nd(dims, channels, channels, 1, padding=0))"
        name = f"zero_convs.{i}.0" if i < n_skips else "middle_block_out.0"
        new[f"{lf.CONTROL_PREFIX}{name}.weight"] = torch.zeros(channels, channels, 1, 1)
        new[f"{lf.CONTROL_PREFIX}{name}.bias"] = torch.zeros(channels)
    return {k: v.to(dtype) for k, v in new.items()}


def check_sd_checkpoint(info: FileInfo) -> str | None:
    """The family of an SD checkpoint (None for a toy UNet of no released family), or an InputError that says
    what the file is instead, or which of its UNet and VAE tensors are missing."""
    if info.layout == "full":
        raise InputError(f"{info.path} already holds a ControlNet (`control_model.*`)")
    if info.kind != "sd" or info.state_dict is None:
        raise InputError(f"{info.path} is {info.describe()}, not a Stable Diffusion checkpoint: give an original "
                         f"single-file SD checkpoint (model.diffusion_model.*, first_stage_model.*, ...)")
    if info.family in ("sd1", "sd2", "sdxl"):
        check_sd_parts(tensor_shapes(info.state_dict), info.family, info.path)
    elif not any(k.startswith(lf.VAE_PREFIX) for k in info.state_dict):  # a toy UNet: at least its VAE must be there
        raise InputError(f"{info.path}: has no VAE ({lf.VAE_PREFIX}*): a complete SD checkpoint holds UNet, VAE and "
                         f"text encoder; use the full file, not a pruned part")
    return info.family if info.family in ("sd1", "sd2", "sdxl") else None


def full_metadata(control: dict[str, torch.Tensor], family: str | None, source) -> dict[str, str]:
    """Metadata for the output; the ControlNet config only for the families shipped in configs/."""
    extra = {META + "source": Path(source).name}
    if family is None:
        return {META + "architecture": "controlnet", **extra}
    config = controlnet_config_from_shapes({k: tuple(v.shape) for k, v in control.items()}, family)
    return control_metadata(config, family, extra)


def with_control(sd) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An SD state dict -> (kept: input without EMA, copied: encoder as control_model.*, new tensors)."""
    shapes = tensor_shapes(sd)
    kept = {k: sd[k] for k in sd if not k.startswith(lf.EMA_PREFIX)}
    # clone: a copy that shares storage with the UNet would be trained in place together with it
    copied = {lf.CONTROL_PREFIX + k.removeprefix(lf.UNET_PREFIX): kept[k].clone() for k in kept
              if k.startswith(lf.UNET_PREFIX) and k.removeprefix(lf.UNET_PREFIX).startswith(ENCODER_PARTS)}
    return kept, copied, new_control_tensors(shapes, kept[lf.UNET_PREFIX + "input_blocks.0.0.weight"].dtype)


def add_control(in_path, out_path) -> dict:
    """Write IN + a fresh `control_model.*` to OUT; returns the counts the summary prints."""
    refuse_existing(out_path)
    refuse_unwritable(out_path)  # before the input's gigabytes are read and copied
    info = identify(in_path)
    family = check_sd_checkpoint(info)
    sd = info.state_dict
    kept, copied, new = with_control(sd)
    save_state_dict({**kept, **copied, **new}, out_path, full_metadata({**copied, **new}, family, in_path))
    return dict(family=family, kept=len(kept), dropped_ema=len(sd) - len(kept), copied=len(copied), new=len(new))


def add_lllite(in_path, out_path, cond_emb_dim: int, mlp_dim: int) -> dict:
    """Write a fresh ControlNet-LLLite for IN's UNet (kohya's default blocks) in kohya's format, in the UNet's dtype."""
    refuse_existing(out_path)
    refuse_unwritable(out_path)
    info = identify(in_path)
    if info.kind != "sd" or info.family not in ("sd1", "sd2", "sdxl"):
        raise InputError(f"{in_path} is {info.describe()}: --lllite needs an SD1.x, SD2.x or SDXL checkpoint "
                         f"to know the UNet layout")
    shapes = tensor_shapes(info.state_dict)
    conv_in = lf.UNET_PREFIX + "input_blocks.0.0.weight"
    unet_config = dict(family_config(info.family)["unet"], in_channels=shapes[conv_in][1])
    with torch.device("meta"):  # only names, widths and depths are needed from the UNet
        lllite = attach_lllite(UNet2DConditionModel(**unet_config), cond_emb_dim, mlp_dim,
                               vae_scale_factor=vae_scale_factor(shapes))
    dtype = info.state_dict[conv_in].dtype  # the base's precision: fp16 base -> fp16 file
    tensors = {}
    for name, module in lllite.items():
        fresh = LLLiteModule(module.in_features, cond_emb_dim, mlp_dim, module.depth)
        tensors.update({f"{name}.{k}": v.to(dtype) for k, v in fresh.state_dict().items()})
    save_state_dict(tensors, out_path, lllite_metadata(tensors, info.family))
    return dict(family=info.family, modules=len(lllite), new=len(tensors),
                params=sum(t.numel() for t in tensors.values()), dtype=str(dtype).removeprefix("torch."))


def run(argv=None) -> int:
    """Parse the flags and do the work; refused input raises InputError."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="SD checkpoint (.ckpt, .pth or .safetensors)")
    parser.add_argument("output", help="file to create (.ckpt or .safetensors); never overwritten")
    parser.add_argument("--lllite", action="store_true", help="write a fresh ControlNet-LLLite (kohya format) instead")
    parser.add_argument("--cond-emb-dim", type=int, default=32, help="LLLite conditioning embedding width C")
    parser.add_argument("--mlp-dim", type=int, default=64, help="LLLite MLP width M (kohya's --network_dim)")
    args = parser.parse_args(argv)
    if args.lllite:
        s = add_lllite(args.input, args.output, args.cond_emb_dim, args.mlp_dim)
        print(f"found {FAMILY_NAMES[s['family']]}; wrote {s['modules']} LLLite modules "
              f"({s['new']} tensors, {s['params']:,} parameters, C={args.cond_emb_dim}, M={args.mlp_dim}, "
              f"{s['dtype']} like the base) to {args.output}")
    else:
        s = add_control(args.input, args.output)
        family = FAMILY_NAMES.get(s["family"], "an SD-layout UNet of unknown family")
        print(f"found {family}; wrote {args.output}:\n"
              f"  kept   {s['kept']} input tensors (left out {s['dropped_ema']} EMA copies)\n"
              f"  copied {s['copied']} encoder tensors to control_model.*\n"
              f"  new    {s['new']} tensors (hint encoder, zero convs)")
    return 0


def main(argv=None) -> int:
    """The command: refused input becomes one line `tool_add_control: ...` on stderr and exit status 1."""
    return run_command("tool_add_control", run, argv)


if __name__ == "__main__":
    sys.exit(main())
