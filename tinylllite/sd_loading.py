"""Load a Stable Diffusion base offline: an original single file (.ckpt / .safetensors) or a diffusers folder.

    base = load_base("models/v1-5-pruned.ckpt")              # SD1.x, SD2.x or SDXL, told apart by the weights
    base = load_base("models/v1-5-pruned.ckpt", ema=True)    # the EMA copy of the UNet instead
    base = load_base("models/stable-diffusion-v1-5/")        # a diffusers folder, local files only

What the original ControlNet code does with `torch.load` + an OmegaConf yaml + a hub download of the
CLIP weights, this file does from the weights alone: the family comes from the width of the UNet's
cross-attention (768 SD1, 1024 SD2, 2048 SDXL; `ldm_format.detect_family`), the architecture from the
configs shipped in `tinylllite/configs/`, the tokenizer from `tinylllite.tokenizer`. Nothing is downloaded.

Memory stays near the file size: modules are built on the meta device (no random init, no memory),
`.ckpt` files are memory-mapped (`torch.load(mmap=True, weights_only=True)`: pickles never run code),
`.safetensors` tensors come from `safe_open` (also memory-mapped), and `load_state_dict(assign=True)`
adopts each tensor instead of copying it into a second, freshly allocated model. With `dtype=None` (or
the file's own dtype) the weights are read from disk when first used; a different dtype converts them
once, so the peak is then the converted model plus the file's pages.

EMA (SPEC §4): `v1-5-pruned.ckpt` holds both the trained UNet and its EMA under `model_ema.` with the
dots removed. The original tool keeps the non-EMA weights; so does `load_base` unless `ema=True`.

Left out: SD2 768-v files cannot be told from 512-base ones by their weights; pass
`prediction_type="v_prediction"` for them. Refiner, inpainting text encoders and LoRA merging.
"""

import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tinylllite import ldm_format as lf
from tinylllite.base import StableDiffusionBase
from tinylllite.tokenizer import clip_tokenizer

CONFIG_DIR = Path(__file__).parent / "configs"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


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


class SafetensorsFile(Mapping):
    """A .safetensors file as a read-only dict that reads each tensor only when asked for it."""

    def __init__(self, path):
        self.path = Path(path)
        self._file = safe_open(str(path), framework="pt", device="cpu")
        self._keys = list(self._file.keys())
        self._key_set = set(self._keys)
        self.metadata = self._file.metadata() or {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(f"{key!r} is not in {self.path}")
        return self._file.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())


def open_state_dict(path) -> Mapping[str, torch.Tensor]:
    """A checkpoint file's tensors, lazily: safetensors read on access, pickles memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors or {PICKLE_SUFFIXES}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):  # files saved before torch 1.6 (not zip) cannot be memory-mapped
            raise
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # Lightning checkpoints nest the weights
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def tensor_shapes(sd: Mapping) -> dict[str, tuple[int, ...]]:
    if isinstance(sd, SafetensorsFile):
        return {key: sd.shape(key) for key in sd}
    return {key: tuple(value.shape) for key, value in sd.items()}


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
    family = lf.detect_family(shapes)
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


def _family_of_diffusers_unet(unet_config) -> str:
    """The family of a diffusers UNet config; unknown widths (toy models) count as 'tiny'."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return lf.CROSS_WIDTH_TO_FAMILY.get(unet_config["cross_attention_dim"], "tiny")


def _load_diffusers_folder(folder: Path, dtype, prediction_type: str | None) -> StableDiffusionBase:
    if not (folder / "unet" / "config.json").exists():
        raise ValueError(f"{folder}: a diffusers folder needs unet/, vae/ and text_encoder/ subfolders with config.json")
    local = dict(local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, **local).eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **local).eval()
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype, **local).eval()
    family = _family_of_diffusers_unet(unet.config)
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
    path = Path(path)
    if path.is_dir():
        if ema:
            raise ValueError(f"{path}: diffusers folders hold one set of UNet weights; ema=True needs a single file")
        return _load_diffusers_folder(path, dtype, prediction_type)
    return base_from_ldm(open_state_dict(path), ema=ema, dtype=dtype, prediction_type=prediction_type, source=str(path))
