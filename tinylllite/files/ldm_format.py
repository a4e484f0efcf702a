"""State-dict names between the original (LDM / CompVis) single-file layout and diffusers/transformers.

An original Stable Diffusion file is one flat dict with a prefix per part (ControlNet adds its own):

    model.diffusion_model.*   UNet                 -> diffusers UNet2DConditionModel
    control_model.*           ControlNet (cldm.py) -> diffusers ControlNetModel (= tinylllite's ControlNet)
    first_stage_model.*       VAE                  -> diffusers AutoencoderKL
    cond_stage_model.transformer.text_model.*       CLIP ViT-L (SD1)             -> transformers CLIPTextModel
    cond_stage_model.model.*                        OpenCLIP ViT-H (SD2)         -> CLIPTextModel
    conditioner.embedders.0.transformer.text_model. CLIP ViT-L (SDXL)            -> CLIPTextModel
    conditioner.embedders.1.model.*                 OpenCLIP bigG (SDXL)         -> CLIPTextModelWithProjection

Every map here is built from the diffusers parameter names of a model (or of a model built on the meta
device from its config), never from a table of layer indices: `tinylllite.sd.naming` counts the UNet's
layers, this file adds the three parts `cldm.py` gives a ControlNet beyond the copied encoder
(`input_hint_block`, `zero_convs`, `middle_block_out`), the VAE and the text encoders. The SD1.5 maps
equal the keymap checked against diffusers' own converters (tests/test_ldm_format.py), tensor for tensor.

Three places change a tensor, not only its name: the VAE's middle attention is a 1x1 conv in LDM and
a Linear in diffusers (same numbers, (C, C, 1, 1) <-> (C, C)); OpenCLIP stores q, k, v as one
`in_proj_weight` (3D, D) that transformers splits in three; OpenCLIP's `text_projection` is applied as
`x @ P`, a Linear stores P transposed. Left out: OpenCLIP's `logit_scale` (unused by diffusion) and,
for SD2, its `text_projection` (SD2 reads hidden states, not the pooled projection).
"""

import inspect
import re

import torch
from diffusers import ControlNetModel

from tinylllite.sd.naming import diffusers_to_ldm

UNET_PREFIX = "model.diffusion_model."
CONTROL_PREFIX = "control_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = {"sd1": "cond_stage_model.transformer.text_model.", "sdxl": "conditioner.embedders.0.transformer.text_model."}
OPENCLIP_PREFIX = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}
EMA_PREFIX = "model_ema."


def ema_name(key: str) -> str:
    """`model.diffusion_model.input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight`.

    LDM's `LitEma` (ldm/modules/ema.py) stores each EMA copy under the parameter's name with the dots removed.
    """
    return EMA_PREFIX + key.removeprefix("model.").replace(".", "")


def controlnet_config(unet_config: dict, hint_channels: int = 3, hint_stage_channels=(16, 32, 96, 256)) -> dict:
    """diffusers ControlNetModel arguments for a ControlNet copied from a UNet with `unet_config`."""
    accepted = inspect.signature(ControlNetModel.__init__).parameters
    config = {key: value for key, value in unet_config.items() if key in accepted}
    return dict(config, conditioning_channels=hint_channels, conditioning_embedding_out_channels=list(hint_stage_channels))


# --- names: diffusers key -> LDM key (without the part's prefix) ------------------------------------------

def unet_names(diffusers_keys, unet_config: dict) -> dict[str, str]:
    return {key: diffusers_to_ldm(key, unet_config) for key in diffusers_keys}


def controlnet_names(diffusers_keys, unet_config: dict | None) -> dict[str, str]:
    """The UNet encoder names plus cldm.py's three extras: `input_hint_block`, `zero_convs` and
    `middle_block_out` (`unet_config=None` when `diffusers_keys` hold only extras, e.g. a fresh hint encoder).

    LDM's `input_hint_block` is one Sequential of convs with a SiLU after each but the last, so conv k
    sits at index 2k: conv_in is conv 0, `blocks.j` conv j + 1, conv_out the last one.
    """
    keys = list(diffusers_keys)
    n_blocks = len({m[1] for k in keys if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))})
    names = {}
    for key in keys:
        if m := re.fullmatch(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(\w+)", key):
            conv = 0 if m[1] == "conv_in" else n_blocks + 1 if m[1] == "conv_out" else int(m[2]) + 1
            names[key] = f"input_hint_block.{2 * conv}.{m[3]}"
        elif m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(\w+)", key):
            names[key] = f"zero_convs.{m[1]}.0.{m[2]}"
        elif m := re.fullmatch(r"controlnet_mid_block\.(\w+)", key):
            names[key] = f"middle_block_out.0.{m[1]}"
        else:
            names[key] = diffusers_to_ldm(key, unet_config)
    return names


VAE_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_name(key: str, levels: int) -> str:
    """One AutoencoderKL key in LDM's names; the LDM decoder counts its levels from the bottom up."""
    side, rest = key.split(".", 1) if key.startswith(("encoder.", "decoder.")) else ("", key)
    for diff, ldm in {"conv_norm_out": "norm_out", **VAE_RESNET_PARTS}.items():
        rest = re.sub(rf"(^|\.){diff}\.", rf"\g<1>{ldm}.", rest)
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(.*)", rest):
        rest = f"down.{m[1]}.block.{m[2]}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.(.*)", rest):
        rest = f"down.{m[1]}.downsample.{m[2]}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(.*)", rest):
        rest = f"up.{levels - 1 - int(m[1])}.block.{m[2]}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", rest):
        rest = f"up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
    elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
        rest = f"mid.block_{int(m[1]) + 1}.{m[2]}"
    elif m := re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", rest):
        rest = f"mid.attn_1.{VAE_ATTENTION_PARTS[m[1]]}.{m[2]}"
    return f"{side}.{rest}" if side else rest


def vae_names(diffusers_keys, vae_config: dict) -> dict[str, str]:
    levels = len(vae_config["block_out_channels"])
    return {key: _vae_name(key, levels) for key in diffusers_keys}


def clip_names(diffusers_keys) -> dict[str, str]:
    """CLIP ViT-L keeps its transformers names under the prefix; `position_ids` is a buffer, not a weight."""
    return {key: key for key in diffusers_keys if not key.endswith("position_ids")}


# --- tensors ---------------------------------------------------------------------------------------------

def _is_vae_attention_weight(diffusers_key: str) -> bool:
    return re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", diffusers_key) is not None


def from_ldm(ldm_sd, names: dict[str, str], prefix: str, strict: bool = True) -> dict[str, torch.Tensor]:
    """Pick the tensors of one part out of an LDM state dict, under their diffusers names.

    `strict` also refuses LDM keys under `prefix` that no diffusers name claims: they mean the
    config does not fit the file (an SD2 file read as SD1, an inpainting UNet read as a plain one).
    """
    missing = [prefix + ldm for ldm in names.values() if prefix + ldm not in ldm_sd]
    if missing:
        raise KeyError(f"{len(missing)} tensors missing under {prefix!r}, e.g. {missing[:3]}: "
                       f"the file does not hold the part this config describes")
    if strict:
        claimed = {prefix + ldm for ldm in names.values()}
        extra = [k for k in ldm_sd if k.startswith(prefix) and k not in claimed and not k.endswith("position_ids")]
        if extra:
            raise KeyError(f"{len(extra)} unexpected tensors under {prefix!r}, e.g. {extra[:3]}: "
                           f"the file holds a different architecture than this config")
    out = {}
    for diff, ldm in names.items():
        tensor = ldm_sd[prefix + ldm]
        if _is_vae_attention_weight(diff) and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]  # 1x1 conv (C, C, 1, 1) -> Linear (C, C)
        out[diff] = tensor
    return out


def to_ldm(diffusers_sd: dict[str, torch.Tensor], names: dict[str, str], prefix: str, vae: bool = False) -> dict:
    """The inverse of `from_ldm`; `vae=True` turns the middle attention Linears back into 1x1 convs."""
    out = {}
    for diff, tensor in diffusers_sd.items():
        if diff not in names:
            if diff.endswith("position_ids"):
                continue
            raise KeyError(f"no LDM name for {diff!r} under {prefix!r}")
        if vae and _is_vae_attention_weight(diff) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out[prefix + names[diff]] = tensor
    return out


# --- OpenCLIP (SD2, SDXL's second encoder) <-> transformers CLIP ------------------------------------------

OPENCLIP_LAYER_PARTS = {  # transformers encoder.layers.i.* -> OpenCLIP transformer.resblocks.i.*
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}
OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
OPENCLIP_UNUSED = ("logit_scale", "attn_mask")  # contrastive temperature, causal mask buffer: not weights


def _text_body(with_projection: bool) -> str:
    """transformers >= 5.6 dropped the `text_model.` wrapper from CLIPTextModel, not from ...WithProjection."""
    return "text_model." if with_projection else ""


def openclip_from_ldm(ldm_sd, prefix: str, n_layers: int, with_projection: bool) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower -> transformers CLIPTextModel[WithProjection] state dict."""
    body = _text_body(with_projection)
    out = {body + diff: ldm_sd[prefix + ldm] for diff, ldm in OPENCLIP_TOP.items()}
    for i in range(n_layers):
        src, dst = f"{prefix}transformer.resblocks.{i}.", f"{body}encoder.layers.{i}."
        for diff, ldm in OPENCLIP_LAYER_PARTS.items():
            for p in ("weight", "bias"):
                out[f"{dst}{diff}.{p}"] = ldm_sd[f"{src}{ldm}.{p}"]
        for p in ("weight", "bias"):
            q, k, v = ldm_sd[f"{src}attn.in_proj_{p}"].chunk(3, dim=0)  # (3D, ...) -> 3 x (D, ...)
            out[f"{dst}self_attn.q_proj.{p}"] = q
            out[f"{dst}self_attn.k_proj.{p}"] = k
            out[f"{dst}self_attn.v_proj.{p}"] = v
    if with_projection:
        out["text_projection.weight"] = ldm_sd[prefix + "text_projection"].T  # x @ P -> Linear(P.T)
    expected = {prefix + k for k in (*OPENCLIP_TOP.values(), *OPENCLIP_UNUSED, "text_projection")}
    expected |= {f"{prefix}transformer.resblocks.{i}.{part}.{p}" for i in range(n_layers)
                 for part in (*OPENCLIP_LAYER_PARTS.values(), "attn.in_proj") for p in ("weight", "bias")}
    extra = [k.replace("in_proj_", "in_proj.") for k in ldm_sd if k.startswith(prefix)]
    extra = [k for k in extra if k not in expected]
    if extra:
        raise KeyError(f"{len(extra)} unexpected tensors under {prefix!r}, e.g. {extra[:3]}: "
                       f"the text encoder has more layers than the {n_layers} of this config")
    return out


def openclip_to_ldm(diffusers_sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIP state dict -> OpenCLIP names (q, k, v joined back into `in_proj`)."""
    body = _text_body("text_projection.weight" in diffusers_sd)
    out = {prefix + ldm: diffusers_sd[body + diff] for diff, ldm in OPENCLIP_TOP.items()}
    n_layers = len({m[2] for k in diffusers_sd if (m := re.match(r"(text_model\.)?encoder\.layers\.(\d+)\.", k))})
    for i in range(n_layers):
        src, dst = f"{body}encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for diff, ldm in OPENCLIP_LAYER_PARTS.items():
            for p in ("weight", "bias"):
                out[f"{dst}{ldm}.{p}"] = diffusers_sd[f"{src}{diff}.{p}"]
        for p in ("weight", "bias"):
            qkv = [diffusers_sd[f"{src}self_attn.{x}_proj.{p}"] for x in "qkv"]
            out[f"{dst}attn.in_proj_{p}"] = torch.cat(qkv, dim=0)  # 3 x (D, ...) -> (3D, ...)
    if "text_projection.weight" in diffusers_sd:
        out[prefix + "text_projection"] = diffusers_sd["text_projection.weight"].T.contiguous()
    return out
