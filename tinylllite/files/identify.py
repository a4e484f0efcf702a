"""What a weight file or folder holds: its layout, the branch or base inside, the SD family it was made for.

    info = identify("control_v11p_sd15_canny.pth")
    info.layout, info.kind, info.family   # ("original", "controlnet", "sd1")

Every command and loader of the package asks this one function, so a file is told apart the same way
everywhere and an unreadable one is refused in one sentence before any model is built. The layouts:

    "original"   control_model.* only: lllyasviel's ControlNet 1.1 .pth files, A1111's .safetensors;
                 files of input_hint_block.*, zero_convs.* ... saved without the prefix are this layout too
    "full"       control_model.* plus a whole SD (`tool_add_control.py`'s control_sd15_ini.ckpt)
    "diffusers"  a folder with config.json + diffusion_pytorch_model.safetensors (diffusers'
                 ControlNetModel.save_pretrained), or that weights file alone
    "kohya"      ControlNet-LLLite: lllite_unet_* keys only (kohya's networks/control_net_lllite.py)
    "sd"         a Stable Diffusion base: an original single file (model.diffusion_model.*) or a
                 diffusers pipeline folder (unet/, vae/, text_encoder/)

The family is what the file says in this project's metadata (`tinylllite.base_family`), else read
from the weights: the width of the text the cross-attention reads (`attn2.to_k` in_features) is 768
for SD1.x (CLIP ViT-L), 1024 for SD2.x (OpenCLIP ViT-H) and 2048 for SDXL (both encoders
concatenated); other widths are toy models, family "tiny". An LLLite wraps no layer that reads the
text; its file tells only SDXL (no attention in the first level, so no `input_blocks_1` modules) from
"sd1/sd2". Left out: telling SD2 768-v from 512-base files (same weights layout).
"""

import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import ControlNetModel

from tinylllite.files import ldm_format as lf
from tinylllite.errors import InputError
from tinylllite.files.state_dicts import file_metadata, open_state_dict, tensor_shapes

META = "tinylllite."  # prefix of this project's metadata keys
LLLITE_PREFIX = "lllite_unet_"
CROSS_WIDTH_TO_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # text width each UNet attends to
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd1/sd2": "SD1.x or SD2.x", "tiny": "the tiny SD"}
KIND_NAMES = {"controlnet": "ControlNet", "lllite": "ControlNet-LLLite", "sd": "Stable Diffusion base"}
DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                          "diffusion_pytorch_model.bin")


def family_of_width(cross_attention_dim: int) -> str:
    """"sd1", "sd2" or "sdxl" from the width of the text a UNet's cross-attention reads; "tiny" for other widths
    (a toy UNet such as the tiny SD of tiny_sd.py, of no released family)."""
    return CROSS_WIDTH_TO_FAMILY.get(cross_attention_dim, "tiny")


def unet_family(shapes: Mapping[str, tuple], prefix: str = lf.UNET_PREFIX) -> str:
    """The family of the UNet (or ControlNet) whose keys start with `prefix`; raises if it has none."""
    widths = [shape[1] for key, shape in shapes.items() if key.startswith(prefix) and key.endswith("attn2.to_k.weight")]
    if not widths:
        raise InputError(f"no cross-attention weights (`{prefix}...attn2.to_k.weight`) found: "
                         f"this is not a Stable Diffusion UNet or ControlNet")
    if widths[0] not in CROSS_WIDTH_TO_FAMILY:
        raise InputError(f"cross-attention width {widths[0]} matches no family (768 SD1.x, 1024 SD2.x, 2048 SDXL)")
    return family_of_width(widths[0])


@dataclass(frozen=True)
class FileInfo:
    """The answer of `identify`."""

    path: Path  # what was given
    layout: str  # "original", "full", "diffusers", "kohya" or "sd"
    kind: str  # "controlnet", "lllite" or "sd"
    family: str | None  # "sd1", "sd2", "sdxl", "sd1/sd2", "tiny", or None when the weights cannot tell
    metadata: dict[str, str]  # the safetensors header's strings ({} for pickles)
    state_dict: Mapping | None = field(default=None, repr=False)  # the tensors, opened lazily; None for SD folders
    config: dict | None = None  # a diffusers ControlNet folder's config.json (ControlNetModel arguments)

    def describe(self) -> str:
        """e.g. "a ControlNet (original layout) for SD1.x"."""
        family = f" for {FAMILY_NAMES.get(self.family, self.family)}" if self.family else ""
        return f"a {KIND_NAMES[self.kind]} ({self.layout} layout){family}"


def _layout_of_keys(keys) -> str | None:
    keys = list(keys)
    if any(k.startswith(LLLITE_PREFIX) for k in keys):
        return "kohya"
    if any(k.startswith("controlnet_cond_embedding.") for k in keys):
        return "diffusers"
    if any(k.startswith(lf.CONTROL_PREFIX) for k in keys):
        return "full" if any(k.startswith(lf.UNET_PREFIX) for k in keys) else "original"
    if any(k.startswith("input_hint_block.") for k in keys):
        return "original"  # control-only files saved without the prefix
    if any(k.startswith(lf.UNET_PREFIX) for k in keys):
        return "sd"
    return None


def _lllite_family(keys) -> str:
    """SDXL's first level has no attention, so its LLLite has no `input_blocks_1` modules; SD1/SD2's has."""
    return "sd1/sd2" if any(k.startswith(LLLITE_PREFIX + "input_blocks_1_") for k in keys) else "sdxl"


def _file_family(layout: str, shapes: dict[str, tuple]) -> str | None:
    if layout == "kohya":
        return _lllite_family(shapes)
    widths = [shape[1] for key, shape in shapes.items() if key.endswith("attn2.to_k.weight")]
    return family_of_width(widths[0]) if widths else None


def _identify_file(path: Path) -> FileInfo:
    sd = open_state_dict(path)
    layout = _layout_of_keys(sd.keys())
    if layout is None:
        raise InputError(f"{path}: holds no weights tinylllite knows (not a Stable Diffusion checkpoint, not a "
                         f"control checkpoint): it has no control_model.*, input_hint_block.*, "
                         f"controlnet_cond_embedding.*, lllite_unet_* or model.diffusion_model.* keys (first keys: {list(sd)[:3]})")
    metadata = file_metadata(sd)
    family = metadata.get(META + "base_family") or _file_family(layout, tensor_shapes(sd))
    kind = {"kohya": "lllite", "sd": "sd"}.get(layout, "controlnet")
    return FileInfo(path, layout, kind, family, metadata, sd)


def _identify_folder(path: Path) -> FileInfo:
    if (path / "unet" / "config.json").is_file():  # a diffusers pipeline folder
        unet_config = json.loads((path / "unet" / "config.json").read_text())
        sdxl = unet_config.get("addition_embed_type") == "text_time"
        family = "sdxl" if sdxl else family_of_width(unet_config["cross_attention_dim"])
        return FileInfo(path, "sd", "sd", family, {})
    weights = next((path / name for name in DIFFUSERS_WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".ckpt", ".pth", ".pt"))
        hint = f"; it holds {', '.join(found[:3])}: give that file instead" if found else ""
        raise InputError(f"{path}: a folder without model weights: a diffusers folder needs config.json + "
                         f"{DIFFUSERS_WEIGHT_FILES[0]} (a ControlNetModel) or unet/, vae/ and text_encoder/ "
                         f"subfolders (a Stable Diffusion pipeline){hint}")
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: a diffusers ControlNet folder needs config.json beside {weights.name}")
    info = _identify_file(weights)
    if info.kind != "controlnet":
        raise InputError(f"{path}: its {weights.name} holds {info.describe()}, not a diffusers ControlNetModel")
    accepted = inspect.signature(ControlNetModel.__init__).parameters  # drops _class_name, _diffusers_version
    config = {k: v for k, v in json.loads((path / "config.json").read_text()).items() if k in accepted}
    family = info.metadata.get(META + "base_family") or family_of_width(config["cross_attention_dim"])
    return FileInfo(path, "diffusers", "controlnet", family, info.metadata, info.state_dict, config)


def identify(path) -> FileInfo:
    """Layout, kind, family and metadata of a weight file or folder; InputError if it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; check the path")
    return _identify_folder(path) if path.is_dir() else _identify_file(path)


def refuse_other_family(info: FileInfo, base_family: str) -> None:
    """A control trained for one family does not work on another: say so before any shape mismatch."""
    family = info.family
    if family in (None, "tiny") or base_family == "tiny" or base_family in family.split("/"):
        return  # toy models have no family to compare: the shape checks that follow still apply
    raise InputError(f"{info.path} was trained for {FAMILY_NAMES.get(family, family)} but the base is "
                     f"{FAMILY_NAMES[base_family]}: load it onto an {FAMILY_NAMES.get(family, family)} base "
                     f"(ControlNets and LLLites only work on the base family they were trained on)")


def ldm_control_tensors(info: FileInfo) -> dict[str, torch.Tensor]:
    """The `control_model.*` tensors of an "original" or "full" file, the prefix added where a file lacks it.

    A "full" file's SD parts are left out; only the control tensors are read from disk.
    """
    if info.layout not in ("original", "full"):
        raise ValueError(f"{info.path} is {info.describe()}; only original and full files have control_model.* keys")
    sd = info.state_dict
    if any(k.startswith(lf.CONTROL_PREFIX) for k in sd):
        return {k: sd[k] for k in sd if k.startswith(lf.CONTROL_PREFIX)}
    return {lf.CONTROL_PREFIX + k: sd[k] for k in sd}
