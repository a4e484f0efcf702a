"""Load a Stable Diffusion base offline: an original single file (.ckpt / .safetensors) or a diffusers folder.

    base = load_base("models/v1-5-pruned.ckpt")              # SD1.x, SD2.x or SDXL, told apart by the weights
    base = load_base("models/v1-5-pruned.ckpt", ema=True)    # the EMA copy of the UNet instead
    base = load_base("models/stable-diffusion-v1-5/")        # a diffusers folder, local files only

What the original ControlNet code does with `torch.load` + an OmegaConf yaml + a hub download of the
CLIP weights, this file does from the weights alone: the family comes from the width of the UNet's
cross-attention (768 SD1, 1024 SD2, 2048 SDXL; `identify.py`), the architecture from the
configs shipped in `tinylllite/sd/configs/`, the tokenizer from `tinylllite.sd.tokenizer`. Nothing is downloaded.

Memory stays near the file size: modules are built on the meta device (no random init, no memory),
`.ckpt` files are memory-mapped (`torch.load(mmap=True, weights_only=True)`: pickles never run code),
`.safetensors` tensors come from `safe_open` (also memory-mapped), and `load_state_dict(assign=True)`
adopts each tensor instead of copying it into a second, freshly allocated model. With `dtype=None` (or
the file's own dtype) the weights are read from disk when first used; a different dtype converts them
once, so the peak is then the converted model plus the file's pages.

EMA: `v1-5-pruned.ckpt` holds both the trained UNet and its EMA under `model_ema.` with the dots
removed (LDM's `LitEma`). lllyasviel/ControlNet's `tool_add_control.py` keeps the non-EMA weights; so
does `load_base` unless `ema=True`.

Left out: SD2 768-v files cannot be told from 512-base ones by their weights; pass
`prediction_type="v_prediction"` for them. Refiner, inpainting text encoders and LoRA merging.
"""

import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tinylllite.files import ldm_format as lf
from tinylllite.sd.base import StableDiffusionBase
from tinylllite.errors import InputError
from tinylllite.files.identify import FAMILY_NAMES, identify, unet_family
from tinylllite.files.state_dicts import tensor_shapes
from tinylllite.sd.tiny_sd import load_tiny_sd
from tinylllite.sd.tokenizer import clip_tokenizer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "sd" / "configs"


@lru_cache(maxsize=None)
def _config_text(family: str) -> str:
    path = CONFIG_DIR / f"{family}.json"
    if not path.exists():
        raise ValueError(f"no shipped config for family {family!r}; shipped: {sorted(p.stem for p in CONFIG_DIR.glob('*.json'))}")
    return path.read_text()


def family_config(family: str) -> dict:
    """The shipped constructor arguments of every part of `family` (a fresh copy each call)."""
    config = json.loads(_config_text(family))
    config.pop("_note", None)
    return config


def check_sd_parts(shapes: Mapping[str, tuple], family: str, source) -> None:
    """Refuse an original SD file whose UNet or VAE lacks tensors its family has, naming how many and which.

    The names come from the family's UNet and VAE built on the meta device, so nothing is allocated.
    """
    config = family_config(family)
    conv_in = shapes.get(lf.UNET_PREFIX + "input_blocks.0.0.weight", (0, 4))
    with torch.device("meta"):
        unet = UNet2DConditionModel(**dict(config["unet"], in_channels=conv_in[1]))
        vae = AutoencoderKL(**config["vae"])
    parts = {"UNet": (lf.UNET_PREFIX, lf.unet_names(unet.state_dict(), unet.config)),
             "VAE": (lf.VAE_PREFIX, lf.vae_names(vae.state_dict(), vae.config))}
    for part, (prefix, names) in parts.items():
        missing = sorted(prefix + ldm for ldm in names.values() if prefix + ldm not in shapes)
        if len(missing) == len(names):
            raise InputError(f"{source}: has no {part} ({prefix}*): a complete {FAMILY_NAMES[family]} checkpoint "
                             f"holds UNet, VAE and text encoder; use the full file, not a pruned part")
        if missing:
            raise InputError(f"{source}: {len(missing)} of the {len(names)} {part} tensors of an "
                             f"{FAMILY_NAMES[family]} checkpoint are missing (e.g. {missing[0]}): the file is "
                             f"incomplete; download or copy it again")


class _EmaView(Mapping):
    """The state dict with every UNet key answered by its EMA copy (`model_ema.diffusion_model...`)."""

    def __init__(self, sd: Mapping):
        self._sd = sd
        unet_keys = [k for k in sd if k.startswith(lf.UNET_PREFIX)]
        missing = [lf.ema_name(k) for k in unet_keys if lf.ema_name(k) not in sd]
        if missing:
            raise ValueError(f"ema=True but the file has no EMA copy of {len(missing)} UNet tensors "
                             f"(e.g. {missing[0]}); load it with ema=False")

    def __getitem__(self, key):
        return self._sd[lf.ema_name(key) if key.startswith(lf.UNET_PREFIX) else key]

    def __iter__(self):
        return iter(self._sd)

    def __len__(self):
        return len(self._sd)


def _assign(build, convert, dtype) -> torch.nn.Module:
    """Build a module on the meta device and adopt the converted tensors as its parameters."""
    with torch.device("meta"):
        module = build()
    state = {key: tensor if dtype is None else tensor.to(dtype)
             for key, tensor in convert(module.state_dict().keys()).items()}
    module.load_state_dict(state, strict=True, assign=True)
    for name, buffer in module.named_buffers():
        if buffer.is_meta:  # non-persistent buffers are not in files; CLIP's position_ids is the only one
            if not name.endswith("position_ids"):
                raise RuntimeError(f"buffer {name!r} of {type(module).__name__} was not loaded")
            owner = module.get_submodule(name.rpartition(".")[0])
            owner.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand(1, -1), persistent=False)
    return module.eval()


def base_from_ldm(sd: Mapping, ema: bool = False, dtype=torch.float32, prediction_type: str | None = None,
                  source: str = "state dict") -> StableDiffusionBase:
    """An original-layout state dict (all parts under their LDM prefixes) -> StableDiffusionBase."""
    shapes = tensor_shapes(sd)
    conv_in = lf.UNET_PREFIX + "input_blocks.0.0.weight"
    if conv_in not in shapes:
        raise ValueError(f"{source}: no `{conv_in}`: not a Stable Diffusion checkpoint "
                         f"(its first keys: {list(shapes)[:3]})")
    family = unet_family(shapes)
    check_sd_parts(shapes, family, source)
    config = family_config(family)
    unet_config = dict(config["unet"], in_channels=shapes[conv_in][1])  # 9 for inpainting UNets
    if ema:
        sd = _EmaView(sd)

    unet = _assign(lambda: UNet2DConditionModel(**unet_config),
                   lambda keys: lf.from_ldm(sd, lf.unet_names(keys, unet_config), lf.UNET_PREFIX), dtype)
    vae = _assign(lambda: AutoencoderKL(**config["vae"]),
                  lambda keys: lf.from_ldm(sd, lf.vae_names(keys, config["vae"]), lf.VAE_PREFIX), dtype)
    if family == "sd2":
        text_config = config["text_encoder"]
        text_encoder = _assign(lambda: CLIPTextModel(CLIPTextConfig(**text_config)),
                               lambda keys: lf.openclip_from_ldm(sd, lf.OPENCLIP_PREFIX["sd2"],
                                                                 text_config["num_hidden_layers"], False), dtype)
    else:
        text_encoder = _assign(lambda: CLIPTextModel(CLIPTextConfig(**config["text_encoder"])),
                               lambda keys: lf.from_ldm(sd, lf.clip_names(keys), lf.CLIP_PREFIX[family]), dtype)
    text_encoder_2 = tokenizer_2 = None
    if family == "sdxl":
        text_config = config["text_encoder_2"]
        text_encoder_2 = _assign(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**text_config)),
                                 lambda keys: lf.openclip_from_ldm(sd, lf.OPENCLIP_PREFIX["sdxl"],
                                                                   text_config["num_hidden_layers"], True), dtype)
        tokenizer_2 = clip_tokenizer(config["pad_token_2"])
    return StableDiffusionBase(
        family=family, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(config["pad_token"]),
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        prediction_type=prediction_type or config["scheduler"]["prediction_type"], scheduler_config=config["scheduler"],
    )


def _load_diffusers_folder(folder: Path, family: str, dtype, prediction_type: str | None) -> StableDiffusionBase:
    local = dict(local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, **local).eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **local).eval()
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype, **local).eval()
    text_encoder_2 = tokenizer_2 = None
    if family == "sdxl":
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", dtype=dtype,
                                                                     **local).eval()
        tokenizer_2 = clip_tokenizer("!")
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.exists() else family_config("sd1")["scheduler"]
    return StableDiffusionBase(
        family=family, unet=unet, vae=vae, text_encoder=text_encoder,
        tokenizer=clip_tokenizer("!" if family == "sd2" else "<|endoftext|>"),
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        prediction_type=prediction_type or scheduler.get("prediction_type", "epsilon"), scheduler_config=scheduler,
    )


def load_base(path, ema: bool = False, dtype=torch.float32, prediction_type: str | None = None) -> StableDiffusionBase:
    """A Stable Diffusion base from a single .ckpt/.safetensors file or a diffusers folder, offline.

    `dtype=None` keeps the file's own dtypes (an fp16 file stays fp16 and costs no conversion).
    """
    info = identify(path)
    if info.kind != "sd" and info.layout != "full":
        raise InputError(f"{path} holds {info.describe()}, not a Stable Diffusion checkpoint: give an SD base file "
                         f"or folder as the base, and this file as the control")
    if info.state_dict is None:  # a diffusers pipeline folder
        if ema:
            raise InputError(f"{path}: diffusers folders hold one set of UNet weights; ema=True needs a single file")
        return _load_diffusers_folder(info.path, info.family, dtype, prediction_type)
    return base_from_ldm(info.state_dict, ema=ema, dtype=dtype, prediction_type=prediction_type, source=str(path))


def load_base_or_tiny(path) -> StableDiffusionBase:
    """"tiny" = the tiny SD shipped with the package; anything else is `load_base(path)` (offline)."""
    if str(path) == "tiny":
        return load_tiny_sd()
    return load_base(path)
