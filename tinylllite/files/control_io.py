"""Control files: any shared layout read into a branch, and the metadata every file this project writes carries.

    control = load_any_control("control_v11p_sd15_canny.pth", base)    # builds the branch the file holds
    load_control_weights("lllite.safetensors", base, lllite)           # fills a branch built before

`identify.py` tells what a file is (layouts "original", "full", "diffusers", "kohya"; the SD family);
this file turns its tensors into the branch's own names, diffusers' ControlNetModel names for a
ControlNet (via `ldm_format`) and kohya's `lllite_unet_*` names for an LLLite, and refuses a file
made for the other branch or for another SD family in one sentence, before any shape mismatch, and
one holding NaN or inf (a damaged file, or one saved from a diverged run) naming its first such tensor.

Files this project writes (`convert`, `tool_add_control.py`, training checkpoints) carry string
metadata in the safetensors header: architecture, base family, hint range and channels, and the
ControlNet's ControlNetModel config (or LLLite's C and M, plus kohya's SAI model-spec keys), so a
file made from a toy UNet converts back without guessing. Left out: metadata in pickles
(.ckpt/.pth have no header for it; they are written plain).
"""

import json
import re

import torch
from diffusers import ControlNetModel

from tinylllite.files import ldm_format as lf
from tinylllite.control_branch import branch_state_dict, control_kind, load_branch_state_dict
from tinylllite.controlnet import ControlNet
from tinylllite.errors import InputError
from tinylllite.files.identify import (KIND_NAMES, META, FileInfo, family_of_width, identify,
                                 ldm_control_tensors, refuse_other_family)
from tinylllite.lllite_unet import LLLite, attach_lllite_from_kohya
from tinylllite.files.sd_loading import family_config
from tinylllite.files.atomic import atomic_folder
from tinylllite.files.state_dicts import refuse_existing, refuse_non_finite, save_state_dict, tensor_shapes

CONTROLNET_HINT_RANGE = "0..1 RGB"  # what ControlNet's hint encoder reads (cldm.py's hint is image / 255)
LLLITE_HINT_RANGE = "-1..1 RGB inside the module (tinylllite's set_conditioning takes 0..1 and maps it)"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
SAI_ARCHITECTURE = {"sdxl": "stable-diffusion-xl-v1-base", "sd2": "stable-diffusion-v2", "sd1": "stable-diffusion-v1"}


# --- the metadata this project writes ---------------------------------------------------------------------

def control_metadata(config: dict, family: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A ControlNet's metadata."""
    return {
        META + "architecture": "controlnet", META + "base_family": family,
        META + "hint_range": CONTROLNET_HINT_RANGE, META + "hint_channels": str(config["conditioning_channels"]),
        META + "controlnet_config": json.dumps(config, sort_keys=True), **(extra or {}),
    }


def lllite_metadata(tensors: dict[str, torch.Tensor], family: str,
                    extra: dict[str, str] | None = None) -> dict[str, str]:
    """kohya's SAI model-spec architecture string plus this project's keys."""
    cond = next(v for k, v in tensors.items() if k.endswith("conditioning1.0.weight"))
    mlp = next(v for k, v in tensors.items() if k.endswith("down.0.weight"))
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{SAI_ARCHITECTURE.get(family, family)}/control-net-lllite",
        META + "architecture": "controlnet-lllite", META + "base_family": family,
        META + "hint_range": LLLITE_HINT_RANGE, META + "hint_channels": str(cond.shape[1]),
        META + "cond_emb_dim": str(cond.shape[0] * 2), META + "mlp_dim": str(mlp.shape[0]), **(extra or {}),
    }


def controlnet_config_of(control: ControlNet, unet_config) -> dict:
    """The diffusers ControlNetModel config of a built ControlNet: the UNet's, plus its hint encoder's sizes."""
    hint = control.controlnet_cond_embedding
    stages = [hint.conv_in.out_channels] + [conv.out_channels for conv in hint.blocks[1::2]]  # stride-2 convs
    return lf.controlnet_config(dict(unet_config), hint.conv_in.in_channels, stages)


def branch_metadata(base, control, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The metadata of `control` trained on `base`, as every file this project writes carries it."""
    if control_kind(control) == "controlnet":
        return control_metadata(controlnet_config_of(control, base.unet.config), base.family, extra)
    return lllite_metadata(branch_state_dict(control), base.family, extra)


# --- reading a ControlNet file into diffusers names --------------------------------------------------------

def _hint_convs(shapes: dict[str, tuple]) -> list[str]:
    """Weight keys of the hint encoder's convs in order, in either naming (LDM `input_hint_block.<2k>`
    or diffusers `controlnet_cond_embedding.conv_in / blocks.j / conv_out`)."""
    ldm = {int(m[1]): k for k in shapes if (m := re.search(r"input_hint_block\.(\d+)\.weight$", k))}
    if ldm:
        return [ldm[i] for i in sorted(ldm)]
    blocks = {int(m[1]): k for k in shapes if (m := re.search(r"controlnet_cond_embedding\.blocks\.(\d+)\.weight$", k))}
    return ["controlnet_cond_embedding.conv_in.weight", *(blocks[j] for j in sorted(blocks)),
            "controlnet_cond_embedding.conv_out.weight"]


def file_controlnet_config(info: FileInfo) -> dict:
    """The ControlNetModel config of a ControlNet file: its folder's config.json, our metadata, or its shapes +
    the shipped config of its family (released SD1.x / SD2.x / SDXL ControlNets)."""
    if info.config is not None:
        return info.config
    if META + "controlnet_config" in info.metadata:
        return json.loads(info.metadata[META + "controlnet_config"])
    if info.family not in ("sd1", "sd2", "sdxl"):
        raise InputError(f"{info.path}: no ControlNet config: the file carries no {META}controlnet_config metadata "
                         f"and its cross-attention width matches no released SD family; give the diffusers folder "
                         f"or a .safetensors this project wrote")
    shapes = {k: v for k, v in tensor_shapes(info.state_dict).items() if not k.startswith(lf.UNET_PREFIX)}
    return controlnet_config_from_shapes(shapes, info.family)


def controlnet_config_from_shapes(shapes: dict[str, tuple], family: str) -> dict:
    """A released family's ControlNet config, with the input and hint sizes read from the control's shapes."""
    conv_in = next(k for k in shapes if k.endswith(("input_blocks.0.0.weight", "conv_in.weight"))
                   and "cond_embedding" not in k)
    convs = _hint_convs(shapes)
    outs = [shapes[k][0] for k in convs[:-1]]  # every hint conv but conv_out
    stages = outs[::2]  # conv_in, then the second (stride-2) conv of each pair: (16, 32, 96, 256)
    unet_config = dict(family_config(family)["unet"], in_channels=shapes[conv_in][1])
    return lf.controlnet_config(unet_config, shapes[convs[0]][1], stages)


def _diffusers_named(info: FileInfo, keys, unet_config) -> dict[str, torch.Tensor]:
    """A ControlNet file's tensors under the diffusers names `keys` (those of a ControlNet with `unet_config`)."""
    if info.layout == "diffusers":
        return {k: info.state_dict[k] for k in info.state_dict}
    try:
        return lf.from_ldm(ldm_control_tensors(info), lf.controlnet_names(keys, unet_config), lf.CONTROL_PREFIX)
    except KeyError as error:
        raise InputError(f"{info.path} does not fit this base ({error.args[0]}): it was made for another base model")


def read_control(info: FileInfo) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """An identified ControlNet file -> (diffusers-named tensors, ControlNetModel config, metadata)."""
    config = file_controlnet_config(info)
    with torch.device("meta"):
        keys = list(ControlNetModel(**config).state_dict().keys())
    tensors = _diffusers_named(info, keys, config)
    check_finite(info)
    return tensors, config, info.metadata


def check_finite(info: FileInfo) -> None:
    """One pass over a control file's tensors: NaN or inf in a floating tensor is refused, naming the first one.

    The keys are the file's own, in its order; a "full" file's SD part is not read (only `control_model.*`).
    """
    sd = info.state_dict
    refuse_non_finite(info.path, ((key, sd[key]) for key in sd
                                  if info.layout != "full" or key.startswith(lf.CONTROL_PREFIX)))


# --- loading any file onto a base --------------------------------------------------------------------------

def _refuse_wrong_kind(info: FileInfo, wanted: str) -> None:
    if info.kind != wanted:
        what = "a base (--base), or make a fresh ControlNet from it with tool_add_control.py" if info.kind == "sd" \
            else f"a {KIND_NAMES[info.kind]} branch"
        raise InputError(f"{info.path} holds {info.describe()}, not a {KIND_NAMES[wanted]}: load it as {what}")


def _load_into(info: FileInfo, base, control) -> None:
    refuse_other_family(info, base.family)
    own = branch_state_dict(control)
    tensors = dict(info.state_dict) if info.kind == "lllite" else _diffusers_named(info, own.keys(), base.unet.config)
    wrong = [f"{k}: file {tuple(tensors[k].shape)}, branch {tuple(v.shape)}" for k, v in own.items()
             if k in tensors and tensors[k].shape != v.shape]
    wrong += [f"{k}: not in this branch" for k in tensors.keys() - own.keys()]
    wrong += [f"{k}: missing from the file" for k in own.keys() - tensors.keys()]
    if wrong:
        raise InputError(f"{info.path} does not fit this base and branch ({len(wrong)} problems, e.g. "
                         f"{'; '.join(sorted(wrong)[:3])}): it was made for another base model or other sizes")
    check_finite(info)
    load_branch_state_dict(control, tensors)


def load_control_weights(path, base, control) -> None:
    """Fill an existing branch (ControlNet or LLLite built on `base`) from any supported file.

    Accepts original .ckpt/.pth/.safetensors (with or without `control_model.`), full files, diffusers
    folders or their bare weights file, kohya LLLite files and this project's own checkpoint files.
    A file for the other kind of branch or for another SD family is refused with a sentence.
    """
    info = identify(path)
    _refuse_wrong_kind(info, control_kind(control))
    _load_into(info, base, control)


def load_any_control(path, base):
    """The branch a control file holds (ControlNet or LLLite), built on `base`, its weights loaded, in eval mode."""
    info = identify(path)
    _refuse_wrong_kind(info, "lllite" if info.kind == "lllite" else "controlnet")
    refuse_other_family(info, base.family)
    if info.kind == "lllite":
        try:
            control = attach_lllite_from_kohya(base.unet, dict(info.state_dict), vae_scale_factor=base.vae_scale_factor)
        except ValueError as error:
            raise InputError(f"{info.path}: {error}") from None
        check_finite(info)
    else:
        shapes = tensor_shapes(info.state_dict)
        hint_channels = shapes[_hint_convs(shapes)[0]][1]  # conv_in: (16, hint channels, 3, 3)
        control = ControlNet.from_unet(base.unet, hint_channels, base.vae_scale_factor)
        _load_into(info, base, control)
    return control.to(base.device, base.unet.dtype).eval()


# --- writing -----------------------------------------------------------------------------------------------

def write_control(tensors: dict[str, torch.Tensor], config: dict, out, layout: str,
                  metadata: dict[str, str] | None = None) -> None:
    """Diffusers-named ControlNet tensors -> `out` in the "original" or "diffusers" layout, atomically."""
    refuse_existing(out)
    metadata = metadata or {}
    family = metadata.get(META + "base_family") or family_of_width(config["cross_attention_dim"])
    metadata = {**metadata, **control_metadata(config, family)}
    if layout == "original":
        ldm = lf.to_ldm(tensors, lf.controlnet_names(tensors.keys(), config), lf.CONTROL_PREFIX)
        save_state_dict(ldm, out, metadata)
        return
    if layout != "diffusers":
        raise InputError(f"unknown ControlNet layout {layout!r}; use 'original' or 'diffusers'")
    with atomic_folder(out) as tmp:
        with torch.device("meta"):
            ControlNetModel(**config).save_config(tmp)  # config.json as from_pretrained expects it
        save_state_dict(tensors, tmp / DIFFUSERS_WEIGHTS, dict(metadata, format="pt"))


def save_lllite(lllite: LLLite, unet, out, dtype: torch.dtype | None = None, family: str | None = None) -> None:
    """Save an LLLite attached to `unet` as a kohya-format .safetensors file, with this project's metadata.

    The file loads in kohya's sd-scripts and its ComfyUI node; `family` defaults to the one the UNet's
    cross-attention width names ("tiny" for toy widths). Existing files are never overwritten.
    """
    refuse_existing(out)
    tensors = {k: v if dtype is None else v.to(dtype) for k, v in lllite.kohya_state_dict().items()}
    family = family or family_of_width(unet.config.cross_attention_dim)
    save_state_dict(tensors, out, lllite_metadata(tensors, family))


def save_controlnet(control: ControlNet, unet, out, layout: str = "original", family: str | None = None) -> None:
    """Save a ControlNet built on `unet` in the original (A1111) or diffusers layout, with this project's metadata.

    `family` defaults to the one the UNet's cross-attention width names ("tiny" for toy widths).
    """
    config = controlnet_config_of(control, unet.config)
    family = family or family_of_width(config["cross_attention_dim"])
    write_control(branch_state_dict(control), config, out, layout, {META + "base_family": family})

