"""Control checkpoints on disk: the layouts people share, the metadata this project writes, atomic saves.

A trained ControlNet travels in one of four layouts, all read here (`read_control`) into one form
(diffusers names + a diffusers ControlNetModel config), and written back by `write_control`:

    "original"   control_model.* only: lllyasviel's ControlNet 1.1 .pth files, A1111's .safetensors,
                 this project's own files (with metadata). Files without the prefix are accepted too.
    "full"       control_model.* plus the whole SD (control_sd15_ini.ckpt, lllyasviel's 1.0 files)
    "diffusers"  a folder with config.json + diffusion_pytorch_model.safetensors (ControlNetModel), or
                 that weights file alone (training checkpoints save it so; the config then comes
                 from our metadata or from the family the cross-attention width names)
    "kohya"      ControlNet-LLLite: lllite_unet_* keys only (kohya's bf16 files with SAI model-spec
                 metadata, or fp16 copies without); read by `read_lllite`

Files this project writes carry string metadata (safetensors header): architecture, base family,
hint range and channels, and the ControlNet's config, so a file made from a toy UNet converts back
without guessing. Left out: metadata in pickles (.ckpt/.pth have no header for it; written plain).
"""

import inspect
import json
import os
import re
import shutil
from pathlib import Path

import torch
from diffusers import ControlNetModel
from safetensors.torch import save_file

from tinylllite import ldm_format as lf
from tinylllite.controlnet import ControlNet
from tinylllite.lllite_unet import attach_lllite_from_kohya
from tinylllite.sd_loading import PICKLE_SUFFIXES, SafetensorsFile, family_config, open_state_dict, tensor_shapes

META = "tinylllite."  # prefix of this project's metadata keys
LLLITE_PREFIX = "lllite_unet_"
CONTROLNET_HINT_RANGE = "0..1 RGB"  # SPEC §2: what ControlNet's hint encoder expects
LLLITE_HINT_RANGE = "-1..1 RGB inside the module (tinylllite's set_conditioning takes 0..1 and maps it)"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_WEIGHT_FILES = (DIFFUSERS_WEIGHTS, "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin")


def save_state_dict(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    """Write .safetensors (with metadata) or a pickle atomically: `path.tmp` first, then a rename."""
    path = Path(path)
    if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: unknown checkpoint type {path.suffix!r}; use .safetensors or {PICKLE_SUFFIXES}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if path.suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        else:
            torch.save(dict(tensors), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def refuse_existing(path) -> None:
    """Outputs are never overwritten: a half-finished run must not destroy an earlier result."""
    if Path(path).exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it (delete it or choose another name)")


def file_metadata(sd) -> dict[str, str]:
    return dict(sd.metadata) if isinstance(sd, SafetensorsFile) else {}


def diffusers_weights(folder: Path) -> Path:
    """The weights file of a diffusers model folder (safetensors preferred, as diffusers does)."""
    for name in DIFFUSERS_WEIGHT_FILES:
        if (folder / name).exists():
            return folder / name
    raise ValueError(f"{folder}: no weights file; a diffusers ControlNet folder holds one of {DIFFUSERS_WEIGHT_FILES}")


# --- ControlNet ----------------------------------------------------------------------------------------------

def detect_layout(keys) -> str:
    """"kohya", "diffusers", "full" or "original", from the key names alone."""
    keys = list(keys)
    if any(k.startswith(LLLITE_PREFIX) for k in keys):
        return "kohya"
    if any(k.startswith("controlnet_cond_embedding.") for k in keys):
        return "diffusers"
    if any(k.startswith(lf.CONTROL_PREFIX) for k in keys):
        return "full" if any(k.startswith(lf.UNET_PREFIX) for k in keys) else "original"
    if any(k.startswith("input_hint_block.") for k in keys):
        return "original"  # control-only files saved without the prefix
    raise ValueError(f"not a control checkpoint: no control_model.*, input_hint_block.*, controlnet_cond_embedding.* "
                     f"or lllite_unet_* keys (first keys: {keys[:3]})")


def _hint_convs(shapes: dict[str, tuple]) -> list[str]:
    """Weight keys of the hint encoder's convs in order, in either naming (LDM `input_hint_block.<2k>`
    or diffusers `controlnet_cond_embedding.conv_in / blocks.j / conv_out`)."""
    ldm = {int(m[1]): k for k in shapes if (m := re.search(r"input_hint_block\.(\d+)\.weight$", k))}
    if ldm:
        return [ldm[i] for i in sorted(ldm)]
    blocks = {int(m[1]): k for k in shapes if (m := re.search(r"controlnet_cond_embedding\.blocks\.(\d+)\.weight$", k))}
    return ["controlnet_cond_embedding.conv_in.weight", *(blocks[j] for j in sorted(blocks)),
            "controlnet_cond_embedding.conv_out.weight"]


def controlnet_config_from_shapes(shapes: dict[str, tuple], metadata: dict[str, str]) -> dict:
    """The ControlNetModel config of a control file: from our metadata, else from its shapes + the shipped
    config of the family its cross-attention width names (released SD1.x / SD2.x / SDXL ControlNets)."""
    if META + "controlnet_config" in metadata:
        return json.loads(metadata[META + "controlnet_config"])
    try:
        family = lf.detect_family(shapes, prefix="")
    except ValueError as error:
        raise ValueError(f"no ControlNet config: the file carries no {META}controlnet_config metadata and {error}; "
                         f"convert a .safetensors this project wrote, or the diffusers folder") from error
    conv_in = next(k for k in shapes if k.endswith(("input_blocks.0.0.weight", "conv_in.weight"))
                   and "cond_embedding" not in k)
    convs = _hint_convs(shapes)
    outs = [shapes[k][0] for k in convs[:-1]]  # every hint conv but conv_out
    stages = outs[::2]  # conv_in, then the second (stride-2) conv of each pair: (16, 32, 96, 256)
    unet_config = dict(family_config(family)["unet"], in_channels=shapes[conv_in][1])
    return lf.controlnet_config(unet_config, shapes[convs[0]][1], stages)


def _control_keys(config: dict) -> list[str]:
    with torch.device("meta"):
        return list(ControlNetModel(**config).state_dict().keys())


def read_control(path) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """Any ControlNet layout -> (diffusers-named tensors, ControlNetModel config, metadata)."""
    path = Path(path)
    if path.is_dir():
        config_file, weights = path / "config.json", diffusers_weights(path)
        if not config_file.exists():
            raise ValueError(f"{path}: a diffusers ControlNet folder needs config.json")
        accepted = inspect.signature(ControlNetModel.__init__).parameters  # drops _class_name, _diffusers_version
        config = {k: v for k, v in json.loads(config_file.read_text()).items() if k in accepted}
        sd = open_state_dict(weights)
        return {k: sd[k] for k in sd}, config, file_metadata(sd)
    sd = open_state_dict(path)
    metadata = file_metadata(sd)
    layout = detect_layout(sd.keys())
    if layout == "kohya":
        raise ValueError(f"{path} is a ControlNet-LLLite file (lllite_unet_* keys), not a ControlNet")
    if not any(k.startswith(lf.CONTROL_PREFIX) for k in sd) and layout != "diffusers":
        sd = {lf.CONTROL_PREFIX + k: v for k, v in sd.items()}  # control-only files saved without the prefix
    prefix = "" if layout == "diffusers" else lf.CONTROL_PREFIX
    config = controlnet_config_from_shapes({k: v for k, v in tensor_shapes(sd).items() if k.startswith(prefix)}, metadata)
    if layout == "diffusers":  # a bare diffusion_pytorch_model.safetensors, or a training checkpoint's file
        return {k: sd[k] for k in sd}, config, metadata
    names = lf.controlnet_names(_control_keys(config), config)
    return lf.from_ldm(sd, names, lf.CONTROL_PREFIX), config, metadata


def control_metadata(config: dict, family: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        META + "architecture": "controlnet", META + "base_family": family,
        META + "hint_range": CONTROLNET_HINT_RANGE, META + "hint_channels": str(config["conditioning_channels"]),
        META + "controlnet_config": json.dumps(config, sort_keys=True), **(extra or {}),
    }


def control_family(config: dict) -> str:
    return lf.CROSS_WIDTH_TO_FAMILY.get(config["cross_attention_dim"], "tiny")


def write_control(tensors: dict[str, torch.Tensor], config: dict, out, layout: str,
                  metadata: dict[str, str] | None = None) -> Path:
    """Diffusers-named ControlNet tensors -> `out` in the "original" or "diffusers" layout, atomically."""
    out = Path(out)
    refuse_existing(out)
    metadata = {**(metadata or {}), **control_metadata(config, control_family(config))}
    if layout == "original":
        ldm = lf.to_ldm(tensors, lf.controlnet_names(tensors.keys(), config), lf.CONTROL_PREFIX)
        return save_state_dict(ldm, out, metadata if out.suffix == ".safetensors" else None)
    if layout != "diffusers":
        raise ValueError(f"unknown ControlNet layout {layout!r}; use 'original' or 'diffusers'")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with torch.device("meta"):
            ControlNetModel(**config).save_config(tmp)  # config.json as from_pretrained expects it
        save_state_dict(tensors, tmp / DIFFUSERS_WEIGHTS, dict(metadata, format="pt"))
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_controlnet(control, unet, out, layout: str = "original") -> Path:
    """Save a tinylllite ControlNet built on `unet` in the original (A1111) or diffusers layout."""
    hint = control.controlnet_cond_embedding
    stages = [hint.conv_in.out_channels] + [conv.out_channels for conv in hint.blocks[1::2]]  # stride-2 convs
    config = lf.controlnet_config(dict(unet.config), hint.conv_in.in_channels, stages)
    tensors = {k: v.detach().cpu() for k, v in control.state_dict().items()}
    return write_control(tensors, config, out, layout)


# --- ControlNet-LLLite (kohya) -------------------------------------------------------------------------------

def read_lllite(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A kohya LLLite file (any dtype, with or without metadata) -> (its tensors, its metadata)."""
    sd = open_state_dict(path)
    if detect_layout(sd.keys()) != "kohya":
        raise ValueError(f"{path}: no lllite_unet_* keys, not a ControlNet-LLLite file")
    return {k: sd[k] for k in sd}, file_metadata(sd)


def lllite_metadata(tensors: dict[str, torch.Tensor], family: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """kohya's SAI model-spec architecture string plus this project's keys."""
    cond = next(v for k, v in tensors.items() if k.endswith("conditioning1.0.weight"))
    mlp = next(v for k, v in tensors.items() if k.endswith("down.0.weight"))
    spec = {"sdxl": "stable-diffusion-xl-v1-base", "sd2": "stable-diffusion-v2", "sd1": "stable-diffusion-v1"}
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{spec.get(family, family)}/control-net-lllite",
        META + "architecture": "controlnet-lllite", META + "base_family": family,
        META + "hint_range": LLLITE_HINT_RANGE, META + "hint_channels": str(cond.shape[1]),
        META + "cond_emb_dim": str(cond.shape[0] * 2), META + "mlp_dim": str(mlp.shape[0]), **(extra or {}),
    }


def lllite_family(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """From our metadata, kohya's model-spec, or the layout: SDXL has no attention in input block 1.

    LLLite wraps only self-attention, which looks the same in SD1 and SD2: without metadata such a
    file is "sd1/sd2" and loads on either.
    """
    if META + "base_family" in metadata:
        return metadata[META + "base_family"]
    if "xl" in metadata.get("modelspec.architecture", ""):
        return "sdxl"
    return "sd1/sd2" if any(k.startswith(LLLITE_PREFIX + "input_blocks_1_") for k in tensors) else "sdxl"


# --- loading any layout onto a base, for inference ------------------------------------------------------------

FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd1/sd2": "SD1.x or SD2.x", "tiny": "the tiny SD"}


def _check_family(path, family: str | None, base) -> None:
    if family in (None, "tiny") or base.family == "tiny" or base.family in family.split("/"):
        return  # toy models have no family to compare: the shape checks that follow still apply
    raise ValueError(f"{path} was trained for {FAMILY_NAMES.get(family, family)} but the base is "
                     f"{FAMILY_NAMES[base.family]}: load it onto an {FAMILY_NAMES.get(family, family)} base "
                     f"(ControlNets and LLLites only work on the base family they were trained on)")


def _file_family(metadata: dict[str, str], shapes: dict[str, tuple], prefix: str) -> str | None:
    if META + "base_family" in metadata:
        return metadata[META + "base_family"]
    try:
        return lf.detect_family(shapes, prefix)
    except ValueError:
        return None


def load_any_control(path, base):
    """A ControlNet (original, full, A1111, diffusers folder or file) or a kohya LLLite, built on `base`.

    The family the file was trained for is checked against the base first, so an SD1 control on an
    SD2 base fails with a sentence, not with a page of shape mismatches.
    """
    path = Path(path)
    if path.is_file() and detect_layout(open_state_dict(path).keys()) == "kohya":
        tensors, metadata = read_lllite(path)
        _check_family(path, lllite_family(tensors, metadata), base)
        return attach_lllite_from_kohya(base.unet, tensors, vae_factor=base.vae_scale_factor)
    sd = open_state_dict(diffusers_weights(path) if path.is_dir() else path)
    metadata = file_metadata(sd)
    if path.is_dir() or detect_layout(sd.keys()) == "diffusers":
        prefix, hint_key = "", "controlnet_cond_embedding.conv_in.weight"
    else:
        if not any(k.startswith(lf.CONTROL_PREFIX) for k in sd):
            sd = {lf.CONTROL_PREFIX + k: v for k, v in sd.items()}
        prefix, hint_key = lf.CONTROL_PREFIX, lf.CONTROL_PREFIX + "input_hint_block.0.weight"
    shapes = tensor_shapes(sd)
    _check_family(path, _file_family(metadata, shapes, prefix), base)
    control = ControlNet.from_unet(base.unet, shapes[hint_key][1], base.vae_scale_factor)
    own = control.state_dict()
    try:
        tensors = lf.from_ldm(sd, lf.controlnet_names(own, base.unet.config), prefix) if prefix else dict(sd)
    except KeyError as error:
        raise ValueError(f"{path} does not fit this base's UNet ({error}): it was made for another base model") from error
    wrong = [f"{k}: file {tuple(tensors[k].shape)}, base {tuple(v.shape)}" for k, v in own.items()
             if k in tensors and tensors[k].shape != v.shape]
    wrong += [f"{k}: not in this ControlNet" for k in tensors.keys() - own.keys()]
    wrong += [f"{k}: missing from the file" for k in own.keys() - tensors.keys()]
    if wrong:
        raise ValueError(f"{path} does not fit this base's UNet ({len(wrong)} problems, e.g. {wrong[:3]}): "
                         f"it was made for another base model")
    control.load_state_dict(tensors)
    return control.to(base.device, base.unet.dtype).eval()
